"""Evil-image corpus for ``pipeline.images``: every file is generated here with PIL/numpy.

Each test states what a user would notice: a bad file fails with a reason naming it, and
a good but unusual file (CMYK, 16-bit, transparent, rotated) gives the pixels a person
looking at it would expect.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, ImageFile, ImageOps, features

from tlp.errors import ImageDecodeError, TlpInputError
from tlp.images import (
    ALLOWED_FORMATS,
    DECODER_ID,
    DEFAULT_MAX_PIXELS,
    decode_image,
    probe_image,
)

# Where the stored top-left pixel of a W x H image must end up after each EXIF orientation,
# as (x, y) in the displayed image, and whether width and height swap. From the EXIF spec,
# written out by hand rather than taken from Pillow.
ORIENTATION_CORNER = {
    1: ("left", "top", False),
    2: ("right", "top", False),
    3: ("right", "bottom", False),
    4: ("left", "bottom", False),
    5: ("left", "top", True),
    6: ("right", "top", True),
    7: ("right", "bottom", True),
    8: ("left", "bottom", True),
}


# ---------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> tuple[bytes, str]:
    """Store ``data`` in the corpus folder; return the bytes read back and the path."""
    path = tmp_path / name
    path.write_bytes(data)
    return path.read_bytes(), str(path)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def noise_rgb(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth_rgb(height: int = 64, width: int = 64) -> np.ndarray:
    """A gradient: JPEG keeps it nearly exact, so colour errors stand out."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
        axis=-1,
    ).astype(np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming ``width x height`` RGB pixels and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes())


# ---------------------------------------------------------------- public constants


def test_constants_describe_the_policy():
    assert DEFAULT_MAX_PIXELS == 89_478_485
    assert {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "MPO"} <= set(ALLOWED_FORMATS)
    assert PIL.__version__ in DECODER_ID


# ---------------------------------------------------------------- broken files


def test_truncated_jpeg_fails_at_decode_not_at_probe(tmp_path):
    whole = encode(Image.fromarray(noise_rgb()), "JPEG")
    data, path = write(tmp_path, "cut.jpg", whole[: len(whole) // 2])

    # The header survives the cut, so the cheap probe passes: only the full decode, which
    # reads every byte of pixel data, can tell the file is truncated.
    assert probe_image(data, path) == ("JPEG", 64, 64)
    with pytest.raises(ImageDecodeError, match="truncat") as caught:
        decode_image(data, path)
    assert caught.value.path == path
    assert path in str(caught.value)


def test_truncated_png_fails(tmp_path):
    whole = encode(Image.fromarray(noise_rgb()), "PNG")
    data, path = write(tmp_path, "cut.png", whole[: len(whole) // 2])
    with pytest.raises(ImageDecodeError, match="truncat"):
        decode_image(data, path)


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_zero_byte_file_is_reported_empty(tmp_path, check):
    data, path = write(tmp_path, "empty.jpg", b"")
    with pytest.raises(ImageDecodeError, match=r"empty file \(0 bytes\)") as caught:
        check(data, path)
    assert path in str(caught.value)


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_html_saved_as_jpg_is_not_an_image(tmp_path, check):
    html = b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n"
    data, path = write(tmp_path, "download.jpg", html)
    with pytest.raises(ImageDecodeError) as caught:
        check(data, path)
    reason = caught.value.reason
    assert reason.startswith("not a recognised image format")
    assert 'starts with "<!DOCTYPE html>\\x0a"' in reason
    assert path in str(caught.value)


def test_binary_junk_preview_is_escaped(tmp_path):
    data, path = write(tmp_path, "junk.png", b"\x00\x1b[31m\xff\xfe" + b"x" * 40)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, path)
    # No raw escape or control bytes reach the user's terminal.
    assert "\x1b" not in str(caught.value)
    assert "\\x1b[31m" in caught.value.reason


def test_png_cut_inside_its_header_is_truncated(tmp_path):
    whole = encode(Image.fromarray(noise_rgb()), "PNG")
    data, path = write(tmp_path, "stub.png", whole[:20])
    with pytest.raises(ImageDecodeError, match="truncated image header"):
        probe_image(data, path)


def test_corrupt_png_header_is_named(tmp_path):
    # PNG signature and IHDR claiming colour type 9, which does not exist.
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 9, 0, 0, 0))
    data, path = write(tmp_path, "bad.png", b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match="corrupt PNG header"):
        probe_image(data, path)


def test_png_with_bad_crc_fails(tmp_path):
    whole = bytearray(encode(Image.fromarray(noise_rgb()), "PNG"))
    idat = whole.index(b"IDAT")
    whole[idat + 10] ^= 0xFF  # flip bits inside the compressed pixel data
    data, path = write(tmp_path, "crc.png", bytes(whole))
    with pytest.raises(ImageDecodeError, match="corrupt|truncat"):
        decode_image(data, path)


# ---------------------------------------------------------------- size limits


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_more_pixels_than_the_cap_is_refused(tmp_path, check):
    data, path = write(tmp_path, "small.png", encode(Image.new("RGB", (20, 20)), "PNG"))
    with pytest.raises(ImageDecodeError, match="400 pixels, more than the limit of 100 pixels"):
        check(data, path, max_pixels=100)
    assert check(data, path, max_pixels=400) is not None


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_header_only_100_megapixel_png_is_refused_by_our_cap(tmp_path, check):
    # Above Pillow's warning threshold but below its hard limit: our cap must catch it,
    # and Pillow's DecompressionBombWarning must not leak out.
    data, path = write(tmp_path, "bomb100.png", header_only_png(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="100000000 pixels.*decompression bomb"):
            check(data, path)


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_header_only_400_megapixel_png_is_refused(tmp_path, check):
    # Above twice Pillow's limit, Pillow refuses inside Image.open; still one clean error.
    data, path = write(tmp_path, "bomb400.png", header_only_png(20_000, 20_000))
    with pytest.raises(ImageDecodeError, match="decompression bomb.*400000000 pixels"):
        check(data, path)


def test_pillow_globals_are_left_alone(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    data, path = write(tmp_path, "bomb100.png", header_only_png(10_000, 10_000))
    with pytest.raises(ImageDecodeError):
        decode_image(data, path, max_pixels=10)
    decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), "ok.png")
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100"])
def test_bad_max_pixels_is_a_usage_error(bad):
    with pytest.raises(TlpInputError, match="max_pixels must be a positive integer"):
        decode_image(b"irrelevant", "x.png", max_pixels=bad)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("check", [probe_image, decode_image])
def test_format_outside_the_allow_list_is_refused_by_name(tmp_path, check):
    data, path = write(tmp_path, "icon.ico", encode(Image.new("RGB", (16, 16)), "ICO"))
    with pytest.raises(ImageDecodeError, match="format ICO .*is not allowed") as caught:
        check(data, path)
    assert path in str(caught.value)


def test_format_without_a_magic_number_is_refused(tmp_path):
    # TGA has no magic number; an uncompressed one starts like a CUR icon, so the reason
    # may name CUR as its guess. Either way the file is refused, never parsed.
    data, path = write(tmp_path, "picture.tga", encode(Image.new("RGB", (16, 16)), "TGA"))
    with pytest.raises(ImageDecodeError, match="not allowed|not a recognised image format"):
        decode_image(data, path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_allowed_formats_decode_to_rgb(tmp_path, fmt):
    data, path = write(tmp_path, f"ok.{fmt.lower()}", encode(Image.new("RGB", (12, 8)), fmt))
    assert probe_image(data, path) == (fmt, 12, 8)
    decoded = decode_image(data, path)
    assert decoded.mode == "RGB" and decoded.size == (12, 8)


# ---------------------------------------------------------------- colour modes


def test_adobe_cmyk_jpeg_round_trip_stays_close_to_rgb(tmp_path):
    original = smooth_rgb()
    data, path = write(
        tmp_path, "cmyk.jpg", encode(Image.fromarray(original).convert("CMYK"), "JPEG", quality=95)
    )
    # Pillow writes CMYK JPEGs the way Photoshop does: an Adobe APP14 marker and inverted
    # ink values. Its reader un-inverts them, so colours must come back, not a negative.
    assert b"Adobe" in data[:64]
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    decoded = pixels(decode_image(data, path)).astype(int)
    assert np.abs(decoded - original.astype(int)).mean() < 3


def test_16bit_png_ramp_is_scaled_not_clipped(tmp_path):
    ramp = np.round(np.linspace(0, 65535, 512)).astype(np.uint16)[None, :].repeat(4, axis=0)
    data, path = write(tmp_path, "ramp16.png", encode(Image.fromarray(ramp), "PNG"))
    decoded = pixels(decode_image(data, path))
    row = decoded[0, :, 0].astype(int)

    assert decoded[..., 0].tolist() == decoded[..., 1].tolist() == decoded[..., 2].tolist()
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) == 256  # every 8-bit level used: a clip would give ~2
    assert (row == 255).mean() < 0.01


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_values_map_exactly(tmp_path, fmt):
    values = np.array([[0, 257, 128, 129, 32896, 65535]], dtype=np.uint16)
    data, path = write(tmp_path, f"exact16.{fmt.lower()}", encode(Image.fromarray(values), fmt))
    # 257 * x is the 16-bit form of the 8-bit value x; 128/257 = 0.498 rounds to 0.
    assert pixels(decode_image(data, path))[0, :, 0].tolist() == [0, 1, 0, 1, 128, 255]


def test_16bit_pgm_opened_as_mode_i_is_scaled(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=">u2")
    data, path = write(tmp_path, "gray16.pgm", b"P5\n4 1\n65535\n" + values.tobytes())
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I"
    assert pixels(decode_image(data, path))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_tiff_is_clipped_to_unit_range(tmp_path):
    values = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)
    data, path = write(tmp_path, "float.tif", encode(Image.fromarray(values), "TIFF"))
    assert pixels(decode_image(data, path))[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]


def test_palette_png_transparent_index_becomes_white(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([255, 0, 0, 0, 200, 0])  # index 0 red, index 1 green
    palette_image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    data, path = write(
        tmp_path, "palette.png", encode(palette_image, "PNG", transparency=0)
    )
    decoded = pixels(decode_image(data, path))
    index = np.asarray(palette_image)
    assert (decoded[index == 0] == 255).all()
    assert (decoded[index == 1] == [0, 200, 0]).all()


def test_rgba_junk_under_zero_alpha_becomes_white(tmp_path):
    rgba = np.dstack([noise_rgb(8, 8), np.zeros((8, 8), np.uint8)])
    rgba[0, 0] = [10, 20, 30, 255]  # opaque: kept as is
    rgba[0, 1] = [0, 0, 0, 128]  # half-transparent black over white: mid grey
    data, path = write(tmp_path, "junk_alpha.png", encode(Image.fromarray(rgba), "PNG"))
    decoded = pixels(decode_image(data, path))
    assert decoded[0, 0].tolist() == [10, 20, 30]
    assert decoded[0, 1].tolist() == [127, 127, 127]
    assert (decoded.reshape(-1, 3)[2:] == 255).all()


def test_gray_with_alpha_is_flattened_on_white(tmp_path):
    alpha = np.array([[0, 255], [255, 0]], np.uint8)
    la = Image.fromarray(np.dstack([np.full((2, 2), 7, np.uint8), alpha]))
    assert la.mode == "LA"
    data, path = write(tmp_path, "la.png", encode(la, "PNG"))
    assert pixels(decode_image(data, path))[..., 0].tolist() == [[255, 7], [7, 255]]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_gives_equal_channels(tmp_path, mode):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert(mode)
    data, path = write(tmp_path, f"gray_{mode}.png", encode(gray, "PNG"))
    decoded = pixels(decode_image(data, path))
    assert (decoded == decoded[..., :1]).all()
    assert decoded[..., 0].tolist() == np.asarray(gray.convert("L")).tolist()


@pytest.mark.skipif(not features.check("littlecms2"), reason="Pillow built without LittleCMS")
def test_lab_tiff_converts_to_the_right_colour(tmp_path):
    from PIL import ImageCms

    to_lab = ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
    )
    lab = ImageCms.applyTransform(Image.new("RGB", (4, 4), (200, 30, 40)), to_lab)
    data, path = write(tmp_path, "lab.tif", encode(lab, "TIFF"))
    decoded = pixels(decode_image(data, path)).astype(int)
    assert np.abs(decoded - [200, 30, 40]).max() <= 3


# ---------------------------------------------------------------- orientation


def marked_image(width: int = 40, height: int = 20) -> Image.Image:
    """Black image with a white 4x4 block in the stored top-left corner."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:4, :4] = 255
    return Image.fromarray(array)


def corner_is_marked(decoded: np.ndarray, horizontal: str, vertical: str) -> bool:
    rows = slice(0, 4) if vertical == "top" else slice(-4, None)
    cols = slice(0, 4) if horizontal == "left" else slice(-4, None)
    return bool((decoded[rows, cols] > 200).all() and decoded.mean() < 20)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_displayed_image(tmp_path, orientation):
    horizontal, vertical, swaps = ORIENTATION_CORNER[orientation]
    data, path = write(
        tmp_path, f"o{orientation}.png", with_orientation(marked_image(), "PNG", orientation)
    )
    assert probe_image(data, path) == ("PNG", 40, 20)  # probe reports the stored size
    decoded = decode_image(data, path)
    assert decoded.size == ((20, 40) if swaps else (40, 20))
    assert corner_is_marked(pixels(decoded), horizontal, vertical)


def test_jpeg_orientation_6_is_rotated_clockwise(tmp_path):
    data, path = write(tmp_path, "phone.jpg", with_orientation(marked_image(), "JPEG", 6))
    decoded = decode_image(data, path)
    assert decoded.size == (20, 40)
    # Orientation 6 means "rotate 90 degrees clockwise to display": the stored top-left
    # corner ends at the top-right.
    assert (pixels(decoded)[:3, -3:] > 150).all()
    assert (pixels(decoded)[:3, :3] < 100).all()


def test_corrupt_exif_does_not_crash(tmp_path):
    corrupt = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x01" * 20
    data, path = write(tmp_path, "bad_exif.jpg", encode(marked_image(), "JPEG", exif=corrupt))
    with warnings.catch_warnings():
        # Pillow warns "Corrupt EXIF data" while opening the JPEG; under -W error that
        # would reject a good image unless the decoder handles it.
        warnings.simplefilter("error")
        decoded = decode_image(data, path)
    assert decoded.size == (40, 20)  # no rotation when the tag cannot be read


def test_exif_parser_exception_falls_back_to_no_rotation(tmp_path, monkeypatch):
    def explode(image, **kwargs):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", explode)
    data, path = write(tmp_path, "o6.png", with_orientation(marked_image(), "PNG", 6))
    decoded = decode_image(data, path)
    assert decoded.size == (40, 20)
    assert corner_is_marked(pixels(decoded), "left", "top")


# ---------------------------------------------------------------- frames and determinism


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_gives_first_frame(tmp_path, fmt):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), colour) for colour in colours]
    animation = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    data, path = write(tmp_path, f"anim.{fmt.lower()}", animation)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.n_frames == 3
    assert (pixels(decode_image(data, path)) == [255, 0, 0]).all()


def test_mpo_camera_file_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 8), colour) for colour in [(0, 0, 255), (255, 255, 0)]]
    mpo = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    data, path = write(tmp_path, "stereo.jpg", mpo)
    assert probe_image(data, path) == ("MPO", 16, 8)
    assert np.abs(pixels(decode_image(data, path)).astype(int) - [0, 0, 255]).max() <= 2


@pytest.mark.parametrize(
    "name, image, fmt",
    [
        ("noise.jpg", Image.fromarray(noise_rgb()), "JPEG"),
        ("cmyk.jpg", Image.fromarray(smooth_rgb()).convert("CMYK"), "JPEG"),
        ("ramp16.png", Image.fromarray(np.arange(256, dtype=np.uint16)[None] * 257), "PNG"),
        ("noise.webp", Image.fromarray(noise_rgb()), "WEBP"),
    ],
)
def test_decoding_is_deterministic(tmp_path, name, image, fmt):
    data, path = write(tmp_path, name, encode(image, fmt))
    first = pixels(decode_image(data, path))
    second = pixels(decode_image(data, path))
    assert first.dtype == np.uint8
    assert np.array_equal(first, second)
