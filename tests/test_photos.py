"""The built-in ``photos`` data set: classes, counts, stable bytes, missing scikit-image."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pytest
from PIL import Image

from tlp import load_dataset
from tlp.cli import main
from tlp.errors import TlpInputError
from tlp.builtin import PHOTO_CLASSES, PHOTO_SOURCES, load_photos, photos_images, source_photo

# scikit-image is in the test extra; without it only the missing-package test runs.
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")


@needs_skimage
def test_classes_counts_and_item_names():
    dataset = load_dataset("photos")
    assert dataset.kind == "builtin" and dataset.name == "photos"
    assert dataset.classes == ["cat", "coffee", "flower", "motorcycle", "pagoda", "rocket"] == PHOTO_CLASSES
    assert np.bincount([item.label for item in dataset.items]).tolist() == [20] * 6
    assert dataset.items[0].path == "photos/cat/000.png" and dataset.items[-1].path == "photos/rocket/019.png"
    image = Image.open(io.BytesIO(dataset.read_bytes(dataset.items[-1])))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (160, 160)


@needs_skimage
def test_two_builds_are_byte_identical():
    first, second = load_photos(per_class=3), load_photos(per_class=3)
    assert first.identity() == second.identity()
    assert [first.read_bytes(i) for i in first.items] == [second.read_bytes(i) for i in second.items]
    assert len({item.digest for item in first.items}) == len(first.items)  # no two crops alike


@needs_skimage
def test_more_per_class_only_appends_crops():
    few, few_labels = photos_images(per_class=2, size=32)
    many, many_labels = photos_images(per_class=4, size=32)
    assert few.shape == (12, 32, 32, 3) and few.dtype == np.uint8
    np.testing.assert_array_equal(few, many.reshape(6, 4, 32, 32, 3)[:, :2].reshape(12, 32, 32, 3))
    assert many_labels.tolist() == np.repeat(np.arange(6), 4).tolist()


@needs_skimage
def test_every_keep_box_fits_the_smallest_crop():
    for _, package, filename, (x0, y0, x1, y1) in PHOTO_SOURCES:
        height, width = source_photo(package, filename).shape[:2]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, filename
        assert max(x1 - x0, y1 - y0) <= round(0.5 * min(width, height)), filename


def test_missing_scikit_image_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(TlpInputError, match=r"pip install scikit-image \(or pip install tlp\[photos\]\)"):
        load_dataset("photos")
    assert main(["extract", "photos", "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err.strip()
    assert "pip install scikit-image" in error and "\n" not in error
