"""Shared fixtures: small generated image folders and a fast extraction setup.

Images are drawn with PIL from scikit-learn's bundled sample photos, so they decode like
real photos; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import write_images

# Keep the suite quiet and single-machine friendly.
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True, scope="session")
def default_cache_dir(tmp_path_factory):
    """Commands run without --cache-dir use a temporary cache, not the checkout's cache/."""
    previous = os.environ.get("TLP_CACHE_DIR")
    os.environ["TLP_CACHE_DIR"] = str(tmp_path_factory.mktemp("default-cache"))
    yield
    if previous is None:
        os.environ.pop("TLP_CACHE_DIR", None)
    else:
        os.environ["TLP_CACHE_DIR"] = previous

@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An ImageFolder data set: 3 classes x 8 images."""
    root = tmp_path / "data"
    for class_index, name in enumerate(["cat", "dog", "owl"]):
        write_images(root / name, 8, start=100 * class_index)
    return root


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
