"""Camera-size JPEGs are decoded at the DCT scale the resize needs, not at full size.

What a user would notice: the same features (within a stated tolerance) from a large
photo, much faster; EXIF rotation still applied; small photos and other formats exactly
as before; and caches written by the full decoder are not served for the new pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

import tlp
from tlp.images import DECODER_ID, decode_image


def camera_photo(width: int = 2048, height: int = 1536, seed: int = 0) -> Image.Image:
    """A photo-like image at camera size: four upscaled crops of the bundled sample photos."""
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    photo = Image.new("RGB", (width, height))
    tile_w, tile_h = width // 2, height // 2
    for index in range(4):
        source = sources[(index + seed) % 2]
        left, top = rng.uniform(0, 200), rng.uniform(0, 100)
        tile = source.resize((tile_w, tile_h), Image.BICUBIC, box=(left, top, left + 400, top + 300))
        photo.paste(tile, ((index % 2) * tile_w, (index // 2) * tile_h))
    return photo


def jpeg(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def test_large_jpeg_decodes_at_the_smallest_scale_that_keeps_the_resize_side():
    data = jpeg(camera_photo(2048, 1536))
    assert decode_image(data, "big.jpg").size == (2048, 1536)
    # 1536 / 256 = 6: the largest DCT scale not above it is 1/4.
    assert decode_image(data, "big.jpg", reduce_to=256).size == (512, 384)
    # 1536 / 700 = 2.2: half size still leaves 768 >= 700 on the short side.
    assert decode_image(data, "big.jpg", reduce_to=700).size == (1024, 768)
    assert decode_image(data, "big.jpg", reduce_to=1000).size == (2048, 1536)


def test_small_jpeg_and_other_formats_decode_exactly_as_before():
    small = jpeg(camera_photo(500, 375))
    assert np.array_equal(np.asarray(decode_image(small, "s.jpg", reduce_to=256)),
                          np.asarray(decode_image(small, "s.jpg")))
    buffer = io.BytesIO()
    camera_photo(1024, 768).save(buffer, "PNG")
    png = decode_image(buffer.getvalue(), "big.png", reduce_to=128)
    assert png.size == (1024, 768)


def test_exif_rotation_still_applies_to_a_reduced_jpeg():
    stored = camera_photo(2048, 1536)
    marked = np.asarray(stored).copy()
    marked[:256, :256] = 255  # a white block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = jpeg(Image.fromarray(marked), exif=exif.tobytes())
    decoded = np.asarray(decode_image(data, "phone.jpg", reduce_to=256))
    assert decoded.shape[:2] == (512, 384)  # displayed portrait, at 1/4 scale
    assert (decoded[:40, -40:] > 240).all()  # the stored top-left ends at the top-right


def test_reduced_decode_features_stay_within_tolerance_of_the_full_decode(tmp_path):
    # The same pixels reach tlp twice: as a large JPEG (decoded reduced) and as a PNG of
    # that JPEG's full decode (PNG has no reduced scale). Measured with efficientnet_lite0
    # at 224 px, per image: cosine 0.996-0.997 on late and 0.999 on mid here (1/4 scale),
    # 0.994 on late for 4032x3024 photos (1/8 scale); the bound leaves room for other CPUs.
    for seed in range(2):
        data = jpeg(camera_photo(2048, 1536, seed=seed))
        (tmp_path / "jpeg" / "photos").mkdir(parents=True, exist_ok=True)
        (tmp_path / "jpeg" / "photos" / f"{seed}.jpg").write_bytes(data)
        (tmp_path / "png" / "photos").mkdir(parents=True, exist_ok=True)
        decode_image(data, "full").save(tmp_path / "png" / "photos" / f"{seed}.png")
    features = {}
    for kind in ("jpeg", "png"):
        result = tlp.extract(str(tmp_path / kind), layers=["mid", "late"], pool="avg",
                             cache_dir=str(tmp_path / "cache"), progress=False)
        with tlp.FeatureFile(result.path) as cached:
            features[kind] = {name: cached.load(name) for name in ("mid", "late")}
    for name in ("mid", "late"):
        reduced, full = features["jpeg"][name], features["png"][name]
        cosine = (reduced * full).sum(1) / (np.linalg.norm(reduced, axis=1) * np.linalg.norm(full, axis=1))
        assert cosine.min() >= 0.98, (name, cosine)
        assert not np.allclose(reduced, full)  # it did decode differently


def test_the_cache_key_names_the_reduced_decoder(tmp_path):
    root = tmp_path / "data" / "photos"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(camera_photo(640, 480)))
    result = tlp.extract(str(tmp_path / "data"), layers=["late"], image_size=64, weights="none",
                         cache_dir=str(tmp_path / "cache"), progress=False)
    with tlp.FeatureFile(result.path) as cached:
        assert cached.attrs["fingerprint_spec"]["extractor"]["decoder"] == DECODER_ID
    assert "dct-scaled" in DECODER_ID


@pytest.mark.parametrize("short_side", [1, 255, 256, 3024])
def test_reduce_to_never_gives_fewer_pixels_than_asked(short_side):
    data = jpeg(camera_photo(1200, 900))
    decoded = decode_image(data, "x.jpg", reduce_to=short_side)
    assert min(decoded.size) >= min(short_side, 900)
