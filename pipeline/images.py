"""Decode one image file's bytes into an 8-bit RGB PIL image, safely and deterministically.

Why each rule exists (one line each):

- Only ``ALLOWED_FORMATS`` are parsed: rare Pillow plugins are attack surface (e.g. the FITS
  gzip bomb, CVE-2026-40192) and never hold photos.
- Pixel count is capped from the header before decoding: a small file can claim gigapixels
  (decompression bomb) and exhaust memory.
- Aspect ratio can be capped from the header too (``max_aspect_ratio``; the network's
  resize in :mod:`tlp.preprocess` asks for ``MAX_ASPECT_RATIO``, 64:1). That resize scales
  the *shorter* side to about the crop size, so memory after it grows with the ratio: a PNG
  of a few hundred bytes holding 60000x2 pixels (well under the pixel cap) resizes to
  2,190,000 x 73 pixels at image size 64 and 7,680,000 x 256 (6 GB) at the default size;
  measured peaks were 4 GB for four such files at image size 64 and 13 GB at the default
  size. Real photos stay far below 64:1: cameras shoot 1:1 to 21:9, 360-degree panoramas
  are 2:1 (equirectangular) to about 7:1 (12000x2000 is 6:1), and long stitched panoramas
  rarely pass 20:1. At the cap, one resized image holds 64 square crops' worth of pixels
  (12 MB at the default size). The decoder itself has no cap: thin strips decode fine.
- Pillow's globals (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) are never changed:
  they are process-wide, so changing them would alter every other caller.
- ``decode_image`` forces a full ``load()``: ``Image.open`` is lazy and ``verify()`` passes
  truncated JPEGs, so without it a bad file crashes a run hours later.
- Truncated files fail instead of being padded: Pillow's "allow truncated" mode silently
  fills missing rows with grey, which would poison the cached features.
- EXIF orientation is applied: phones store sideways pixels plus a tag, and ignoring the tag
  gives rotated training images; a corrupt EXIF block means no rotation, since the pixels
  themselves are fine.
- Multi-frame files (GIF, TIFF, MPO, WebP) give their first frame: one file, one example.
- JPEGs are decoded at a reduced scale when the caller needs fewer pixels (``reduce_to``:
  the short side it will resize to): libjpeg's scaled inverse DCT gives 1/2, 1/4 or 1/8
  of the stored size directly, and the largest reduction that keeps the short side at
  ``reduce_to`` or more is used (Pillow's ``draft``). A 4032x3024 phone photo for a
  256-pixel resize decodes at 504x378: about 1/40 of the pixels, so decoding no longer
  costs many times the forward pass. The pixels differ slightly from a full decode
  followed by the same resize (the DCT scaling is its own low-pass filter), so this mode
  is named in ``DECODER_ID``. Other formats have no such scale and decode fully.
- 16-bit data is scaled (``value * 255 / 65535``, rounded), not clipped: Pillow's
  ``convert`` clips, which turns about 99% of a 16-bit image white.
- Float images are clipped to [0, 1] then scaled by 255: a float image stores no range, and
  [0, 1] is the common convention; NaN becomes 0.
- Transparent pixels are composited over white: the colour hidden under alpha 0 is junk, so
  compositing makes the output deterministic, and white matches common "flatten" tools.
- Every failure is an :class:`~tlp.errors.ImageDecodeError` naming the path and a short
  reason, so a caller can skip the file and list why.

``DECODER_ID`` names this policy and the Pillow version (which bundles the JPEG, PNG and
WebP codecs); it is part of the feature cache key, so bump its ``v`` number whenever the
output pixels of any file could change.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import PIL
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, TlpInputError

__all__ = [
    "ALLOWED_FORMATS",
    "DECODER_ID",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "decode_image",
    "probe_image",
]

logger = logging.getLogger(__name__)

#: Images with more pixels than this are refused; equal to Pillow's own ``MAX_IMAGE_PIXELS``.
DEFAULT_MAX_PIXELS: int = 89_478_485

#: Network inputs whose long side is more than this many times their short side are refused
#: before decoding (see above).
MAX_ASPECT_RATIO: int = 64

#: Pillow format names this module decodes; everything else is refused.
#: MPO is a JPEG with extra frames (as written by many cameras).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

# What Image.open(formats=...) gets. Pillow registers no opener named "MPO" (passing it
# raises KeyError): its JPEG opener returns an MPO image when the file has extra frames.
_OPENER_FORMATS: tuple[str, ...] = tuple(fmt for fmt in ALLOWED_FORMATS if fmt != "MPO")

#: Names the decoding policy and Pillow version; part of the feature cache key.
#: v2: JPEGs decoded at a reduced DCT scale where the resize allows (see ``reduce_to``).
DECODER_ID: str = f"pil-{PIL.__version__}-exif-rgb-jpeg-dct-scaled-v2"

# Formats whose decoder can scale while decoding (libjpeg's 1/2, 1/4, 1/8 inverse DCT).
_SCALABLE_FORMATS = frozenset({"JPEG", "MPO"})

# Modes that Pillow converts to RGB correctly (no clipping, no alpha to handle).
_DIRECT_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes with an alpha channel (or a palette that may carry transparency).
_ALPHA_MODES = frozenset({"LA", "La", "P", "PA", "RGBA", "RGBa"})
# Integer grayscale modes holding 16-bit data. Pillow delivers 16-bit PGM (and, in older
# versions, 16-bit PNG) as "I" with values scaled to 0..65535, so "I" is treated the same.
_INT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

_MAX_REASON_CHARS = 200
_PREVIEW_BYTES = 16


def probe_image(
    data: bytes, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: int | None = None
) -> tuple[str, int, int]:
    """Check an image file's header without decoding its pixels.

    Parameters
    ----------
    data : bytes
        The whole file's contents.
    path : str
        The file as the user named it; only used in error messages.
    max_pixels : int, optional
        Largest accepted ``width * height``.
    max_aspect_ratio : int, optional
        Largest accepted ratio of the long side to the short side (None: any).

    Returns
    -------
    tuple of (str, int, int)
        ``(format, width, height)`` as stored in the file, before EXIF rotation.

    Raises
    ------
    ImageDecodeError
        Empty file, not an image, a format outside ``ALLOWED_FORMATS``, an unreadable header,
        more than ``max_pixels`` pixels, or a long side more than ``max_aspect_ratio`` times
        the short side. A truncated file usually passes: only
        :func:`decode_image` reads the pixel data and catches it.
    TlpInputError
        ``max_pixels`` is not a positive integer.
    """
    _check_max_pixels(max_pixels)
    with _open(data, path) as image:
        return _check_header(image, path, max_pixels, max_aspect_ratio)


def decode_image(
    data: bytes, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: int | None = None,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode an image file's bytes to an 8-bit RGB image, the same way every time.

    Parameters
    ----------
    data : bytes
        The whole file's contents.
    path : str
        The file as the user named it; only used in error messages.
    max_pixels : int, optional
        Largest accepted ``width * height``. Pillow itself still refuses images above twice
        its global ``MAX_IMAGE_PIXELS`` at open time; that is reported the same way.
    max_aspect_ratio : int, optional
        Largest accepted ratio of the long side to the short side, checked from the header
        before any pixel is decoded (None: any).
    reduce_to : int, optional
        The short side the caller will resize to: a JPEG whose short side is at least
        twice that is decoded at 1/2, 1/4 or 1/8 scale, the smallest that keeps its short
        side at ``reduce_to`` or more (None: always the stored size).

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, size ``(width, height)`` after EXIF orientation (divided by the
        decode scale, rounded up, for a reduced JPEG); first frame only.

    Raises
    ------
    ImageDecodeError
        Everything :func:`probe_image` refuses, plus truncated or corrupt pixel data and
        colour modes this policy does not know.
    TlpInputError
        ``max_pixels`` is not a positive integer.

    Notes
    -----
    Conversion rules by Pillow mode:

    - ``1, L, RGB, RGBX, CMYK, YCbCr, LAB, HSV``: Pillow's ``convert("RGB")``. Adobe
      (inverted) CMYK JPEGs are un-inverted by Pillow's JPEG reader already.
    - ``I;16*`` and ``I``: clipped to 0..65535, then ``round(value * 255 / 65535)``; gray.
    - ``F``: NaN to 0, clipped to [0, 1], then ``round(value * 255)``; gray.
    - ``LA, La, P, PA, RGBA, RGBa``: composited over white using alpha, so a pixel with
      alpha 0 is (255, 255, 255) whatever colour it stores.
    """
    _check_max_pixels(max_pixels)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone else changed the process-wide flag; we must not change it back, but
        # truncated files will now decode padded with grey, which DECODER_ID cannot see.
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by other code: "
            "truncated images will not be detected"
        )
    with _open(data, path) as image:
        _check_header(image, path, max_pixels, max_aspect_ratio)
        _load_first_frame(image, path, reduce_to)
        oriented = _apply_exif_orientation(image, path)
        return _to_rgb(oriented, path)


def _check_max_pixels(max_pixels: int) -> None:
    """Refuse a cap that is not a positive integer (``True`` included)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise TlpInputError(
            f"max_pixels must be a positive integer; got {max_pixels!r}. "
            f"Use the default {DEFAULT_MAX_PIXELS} unless you need larger images."
        )


@contextmanager
def _open(data: bytes, path: str) -> Iterator[Image.Image]:
    """Open ``data`` lazily with only the allowed format plugins; close it afterwards."""
    if len(data) == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        with _quiet_pillow():
            image = Image.open(io.BytesIO(data), formats=_OPENER_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, _unidentified_reason(data)) from None
    except Image.DecompressionBombError as exc:
        # Above twice its global limit Pillow refuses before we see the size; its message
        # names the pixel count and the limit.
        raise ImageDecodeError(path, _reason("decompression bomb guard", exc)) from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: a parser error is the file's fault
        raise ImageDecodeError(path, _damage_reason("image header", "unreadable", exc)) from exc
    with image:
        yield image


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence the Pillow warnings this module handles itself, in this block only.

    The decompression bomb warning is replaced by our own ``max_pixels`` check; corrupt
    EXIF is handled by not rotating. Silencing matters beyond noise: under ``-W error``
    the EXIF warning, raised while opening a JPEG, would otherwise reject a good image.
    ``catch_warnings`` restores the filters on exit. It is not thread-safe before
    Python 3.14, and tlp decodes in threads: the worst a race can do is leave these two
    Pillow warnings silenced process-wide, which changes no pixels.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings(
            "ignore", message=r"(Possibly )?[Cc]orrupt EXIF", category=UserWarning
        )
        yield


def _unidentified_reason(data: bytes) -> str:
    """Say why no allowed plugin accepted ``data``, using only the plugins' magic checks.

    The plugins' ``accept`` functions compare a few leading bytes and parse nothing, so
    naming a refused format this way does not run the refused parser.
    """
    Image.init()
    prefix = data[:_PREVIEW_BYTES]
    for fmt, (_factory, accept) in Image.OPEN.items():
        if accept is None or not _safe_accept(accept, prefix):
            continue
        if fmt in ALLOWED_FORMATS:
            return f"corrupt {fmt} header"
        # Magic numbers can collide (an uncompressed TGA starts like a CUR icon), so the
        # name is reported as a guess.
        return (
            f"format {fmt} (guessed from the first bytes) is not allowed "
            f"(allowed: {', '.join(ALLOWED_FORMATS)}); convert it to PNG or JPEG"
        )
    return f'not a recognised image format (starts with "{_preview(prefix)}")'


def _safe_accept(accept: object, prefix: bytes) -> bool:
    """Call a plugin's magic-number check; a check that fails counts as "no match"."""
    try:
        return bool(accept(prefix))  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - a broken third-party check must not hide the reason
        return False


def _preview(prefix: bytes) -> str:
    """Printable ASCII as is, every other byte as ``\\xNN``: safe to show in a terminal."""
    return "".join(
        chr(byte) if 32 <= byte < 127 and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in prefix
    )


def _check_header(image: Image.Image, path: str, max_pixels: int,
                  max_aspect_ratio: int | None) -> tuple[str, int, int]:
    """Return ``(format, width, height)`` after checking format, pixel count and shape."""
    fmt = image.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        # Image.open(formats=...) already restricts this; kept so a plugin that reports a
        # different name than it registered under cannot slip through.
        raise ImageDecodeError(path, f"format {fmt} is not allowed")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(path, f"image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            path,
            f"image is {width}x{height} = {pixels} pixels, more than the limit of "
            f"{max_pixels} pixels (decompression bomb guard)",
        )
    long, short = max(width, height), min(width, height)
    if max_aspect_ratio is not None and long > max_aspect_ratio * short:
        raise ImageDecodeError(
            path,
            f"image is {width}x{height}: its long side is {long // short} times its short side, more than "
            f"the limit of {max_aspect_ratio} (resizing its short side for the network would take "
            f"{long // short} times the memory of a square photo; no camera or panorama comes near)",
        )
    return fmt, width, height


def _load_first_frame(image: Image.Image, path: str, reduce_to: int | None = None) -> None:
    """Decode all pixel data of frame 0, so truncated or corrupt files fail here; a JPEG
    at the reduced scale ``reduce_to`` allows."""
    try:
        image.seek(0)
        if reduce_to is not None and image.format in _SCALABLE_FORMATS:
            image.draft(None, _smallest_size(image.size, reduce_to))
        with _quiet_pillow():
            image.load()
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: a decoder error is the file's fault
        raise ImageDecodeError(path, _damage_reason("image data", "corrupt", exc)) from exc


def _smallest_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``size`` scaled so that its short side is ``short_side`` (rounded up): what
    ``draft`` may reduce to, never below (it picks the largest DCT scale that keeps both
    sides at least this)."""
    width, height = size
    short = min(width, height)
    if short <= short_side:
        return width, height
    return max(1, -(-width * short_side // short)), max(1, -(-height * short_side // short))


def _apply_exif_orientation(image: Image.Image, path: str) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; no rotation if EXIF is unreadable."""
    try:
        with _quiet_pillow():
            return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - EXIF parsers fail in many ways; pixels are fine
        logger.debug("ignoring unreadable EXIF in %r: %s", path, exc)
        return image


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """Convert any supported mode to 8-bit RGB (see :func:`decode_image` Notes)."""
    mode = image.mode
    try:
        if mode in _DIRECT_MODES:
            return image.convert("RGB")
        if mode in _ALPHA_MODES:
            return _flatten_on_white(image)
        if mode in _INT_MODES:
            return _gray_to_rgb(_scale_16bit(np.asarray(image)))
        if mode == "F":
            return _gray_to_rgb(_scale_unit_float(np.asarray(image)))
    except Exception as exc:  # noqa: BLE001 - odd palettes/modes from untrusted files
        raise ImageDecodeError(path, _reason(f"cannot convert mode {mode} to RGB", exc)) from exc
    raise ImageDecodeError(path, f"unsupported colour mode {mode}")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite over an opaque white background with exact integer rounding."""
    if image.mode == "La":
        # Pillow has no La -> RGBA conversion; La -> LA un-premultiplies first.
        image = image.convert("LA")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    flat = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(flat.astype(np.uint8))


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 as ``round(v * 255 / 65535)``; out-of-range values clip.

    Parameters
    ----------
    values : numpy.ndarray, shape (H, W), any integer dtype

    Returns
    -------
    numpy.ndarray, shape (H, W), uint8
    """
    clipped = np.clip(values.astype(np.int64), 0, 65535)
    return ((clipped * 255 + 32767) // 65535).astype(np.uint8)


def _scale_unit_float(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to 0..255 rounded half up; NaN -> 0, values outside [0, 1] clip.

    Parameters
    ----------
    values : numpy.ndarray, shape (H, W), float

    Returns
    -------
    numpy.ndarray, shape (H, W), uint8
    """
    finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.floor(np.clip(finite, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Repeat one uint8 channel of shape (H, W) three times."""
    return Image.fromarray(gray).convert("RGB")


def _damage_reason(part: str, otherwise: str, exc: BaseException) -> str:
    """Say "truncated" when Pillow says so (the usual cause), else ``otherwise``."""
    damage = "truncated" if "truncat" in str(exc).lower() else otherwise
    return _reason(f"{damage} {part}", exc)


def _reason(what: str, exc: BaseException) -> str:
    """``what`` plus Pillow's own message, shortened so one bad file is one log line."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > _MAX_REASON_CHARS:
        detail = detail[: _MAX_REASON_CHARS - 3] + "..."
    return f"{what} ({detail})"
