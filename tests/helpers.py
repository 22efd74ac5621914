"""Test helpers: small generated photo files (importable as ``helpers``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FAST = dict(image_size=64, batch_size=8, workers=0, progress=False)


def _photo(seed: int, size=(80, 60)) -> Image.Image:
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    base = load_sample_image("china.jpg" if seed % 2 else "flower.jpg")
    h, w = base.shape[:2]
    top = int(rng.integers(0, h - 200))
    left = int(rng.integers(0, w - 260))
    crop = base[top:top + 200, left:left + 260]
    image = Image.fromarray(crop).resize(size, Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def write_images(directory: Path, count: int, *, start: int = 0, fmt: str = "JPEG", size=(80, 60)) -> list[Path]:
    """Write ``count`` small photo crops into ``directory``; names are stable per index."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = {"JPEG": ".jpg", "PNG": ".png"}[fmt]
    paths = []
    for index in range(start, start + count):
        path = directory / f"img_{index:04d}{suffix}"
        _photo(index, size).save(path, format=fmt, quality=90) if fmt == "JPEG" else _photo(index, size).save(path, format=fmt)
        paths.append(path)
    return paths
