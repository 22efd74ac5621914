"""Hostile data input: CSV manifests, class order and data no stage can train on.

Every fault is a user's to fix, so each must end as one ``tlp: error:`` line with exit 2
naming the file (and line) before any image is extracted; a repeat that cannot change
the meaning is dropped with one warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlp import load_dataset
from tlp.cli import main
from tlp.data import split

from helpers import write_images

pytestmark = pytest.mark.faults

FAST = ["--image-size", "64", "--batch-size", "8", "--workers", "0"]


def _one_error(capsys) -> str:
    """The single ``tlp: error:`` line on stderr (and no traceback anywhere)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tlp: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def _no_features(cache: Path) -> None:
    assert not list(cache.rglob("*.h5")), "features were extracted before the input was refused"


@pytest.fixture
def imgs(tmp_path) -> Path:
    write_images(tmp_path / "imgs", 6)
    return tmp_path / "imgs"


def _manifest(tmp_path: Path, text: str | bytes, name: str = "list.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ----------------------------------------------------------------------------- duplicates
def test_path_listed_twice_with_two_labels_is_refused(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "imgs/img_0000.jpg,a\nimgs/img_0001.jpg,b\n./imgs/img_0000.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "-q", "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "list.csv:3" in line and "line 1" in line and "'a'" in line and "'b'" in line
    _no_features(tmp_path / "c")


def test_same_file_by_two_spellings_is_kept_once_with_one_warning(tmp_path, imgs, capsys):
    rows = ["imgs/img_0000.jpg,a", "./imgs/img_0000.jpg,a", "imgs//img_0000.jpg,a", "imgs/./img_0001.jpg,a",
            "imgs/img_0001.jpg,a", "imgs/img_0002.jpg,b", "imgs/img_0003.jpg,b", "imgs/img_0004.jpg,b",
            "imgs/img_0005.jpg,a"]
    manifest = _manifest(tmp_path, "\n".join(rows) + "\n")
    assert main(["extract", str(manifest), *FAST, "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_images"] == 6
    warnings = [line for line in err.splitlines() if "duplicate" in line]
    assert len(warnings) == 1 and "3 duplicate" in warnings[0] and "line 2 './imgs/img_0000.jpg'" in warnings[0]
    # A fraction split can no longer put one image on both sides.
    training, test = split(load_dataset(manifest), 0.5)
    assert not {i.path for i in training.items} & {i.path for i in test.items}
    assert len(training.items) + len(test.items) == 6


def test_symlink_to_a_listed_file_counts_as_the_same_file(tmp_path, imgs, capsys):
    (imgs / "alias.jpg").symlink_to(imgs / "img_0000.jpg")
    same = _manifest(tmp_path, "imgs/img_0000.jpg,a\nimgs/alias.jpg,a\nimgs/img_0001.jpg,b\n")
    assert [i.path for i in load_dataset(same).items] == ["imgs/img_0000.jpg", "imgs/img_0001.jpg"]
    other = _manifest(tmp_path, "imgs/img_0000.jpg,a\nimgs/alias.jpg,b\n", "other.csv")
    assert main(["extract", str(other), *FAST, "-q", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "other.csv:2" in _one_error(capsys)


# ----------------------------------------------------------------------------- labels and headers
@pytest.mark.parametrize("label", ["", "   "])
def test_empty_label_is_refused_naming_the_line(tmp_path, imgs, capsys, label):
    manifest = _manifest(tmp_path, f"imgs/img_0000.jpg,a\nimgs/img_0001.jpg,{label}\nimgs/img_0002.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "-q", "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "list.csv:2" in line and "empty label" in line
    _no_features(tmp_path / "c")


def test_other_header_is_skipped_with_a_warning(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "file,class\nimgs/img_0000.jpg,a\nimgs/img_0001.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_images"] == 2
    assert sum("first line 'file,class' read as a header" in line for line in err.splitlines()) == 1


def test_path_label_header_is_skipped_silently(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "path,label\nimgs/img_0000.jpg,a\nimgs/img_0001.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_images"] == 2 and "header" not in err


def test_first_line_naming_a_missing_image_is_data(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "imgs/nope.jpg,a\nimgs/img_0000.jpg,a\nimgs/img_0001.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "-q", "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "nope.jpg" in line and "file not found" in line


def test_first_line_naming_an_existing_file_without_extension_is_data(tmp_path, imgs):
    (imgs / "img_0000.jpg").rename(tmp_path / "first")
    manifest = _manifest(tmp_path, "first,a\nimgs/img_0001.jpg,b\n")
    assert [i.path for i in load_dataset(manifest).items] == ["first", "imgs/img_0001.jpg"]


# ----------------------------------------------------------------------------- encodings
def test_manifest_that_is_not_utf8_is_one_line(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "imgs/img_0000.jpg,a\nimgs/img_0001.jpg,caf\xe9\n".encode("latin-1"))
    assert main(["extract", str(manifest), *FAST, "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "list.csv:2" in line and "UTF-8" in line


def test_nul_byte_in_a_path_is_one_line(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, b"imgs/img_0000.jpg,a\nimgs/img_0001.jpg,b\nimgs/img\x00_0002.jpg,b\n")
    assert main(["extract", str(manifest), *FAST, "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "list.csv:3" in line and "NUL" in line


# ----------------------------------------------------------------------------- class order
_IDENTITY = "import json, sys; from tlp import load_dataset; print(json.dumps(load_dataset(sys.argv[1]).identity()))"


def _identities(data: Path) -> set[str]:
    """Classes and labels (what decides the cache key) as printed by fresh interpreters
    whose string hashes, and so set orders, differ."""
    outputs = set()
    for seed in ("0", "1", "2", "3", "4", "5"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _IDENTITY, str(data)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    return outputs


def test_class_order_of_colliding_numeric_labels_is_independent_of_the_hash_seed(tmp_path, imgs):
    labels = ["1", "01", "2", "02", "10", "001"]
    manifest = _manifest(tmp_path, "".join(f"imgs/img_{i:04d}.jpg,{label}\n" for i, label in enumerate(labels)))
    outputs = _identities(manifest)
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["classes"] == ["001", "01", "1", "02", "2", "10"]
    assert [load_dataset(manifest).classes[i.label] for i in load_dataset(manifest).items] == labels


def test_class_folders_sort_by_name_whatever_the_hash_seed(tmp_path):
    root = tmp_path / "data"
    for index, name in enumerate(["1", "01", "10", "2"]):
        write_images(root / name, 1, start=index)
    outputs = _identities(root)
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["classes"] == ["01", "1", "10", "2"]


# ----------------------------------------------------------------------------- nothing to train on
@pytest.fixture
def one_class(tmp_path) -> Path:
    write_images(tmp_path / "one" / "cat", 6)
    return tmp_path / "one"


@pytest.mark.parametrize("verb", [["sweep"], ["finetune", "--epochs", "1"], ["advise"], ["run"]])
def test_one_class_is_refused_before_extraction(tmp_path, one_class, capsys, verb):
    cache = tmp_path / "c"
    assert main([verb[0], str(one_class), *verb[1:], *FAST, "--cache-dir", str(cache)]) == 2
    line = _one_error(capsys)
    assert "only class 'cat'" in line and "at least 2 classes" in line
    _no_features(cache)


def test_one_class_left_after_skipping_bad_files_is_refused(tmp_path, capsys):
    root = tmp_path / "data"
    write_images(root / "cat", 4)
    (root / "dog").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / "dog" / name).write_bytes(b"not an image")
    assert main(["sweep", str(root), "--on-error", "skip", *FAST, "-q", "--cache-dir", str(tmp_path / "c")]) == 2
    line = _one_error(capsys)
    assert "only class 'cat'" in line and "2 unreadable files were left out" in line
    _no_features(tmp_path / "c")


def test_one_class_in_the_training_part_of_a_manifest_is_refused(tmp_path, imgs, capsys):
    manifest = _manifest(tmp_path, "".join(f"imgs/img_{i:04d}.jpg,a\n" for i in range(6)))
    assert main(["sweep", str(manifest), "--test", "0.5", *FAST, "--cache-dir", str(tmp_path / "c")]) == 2
    assert "only class 'a'" in _one_error(capsys)
    _no_features(tmp_path / "c")


def test_n_jobs_zero_is_refused_before_extraction(tmp_path, image_folder, capsys):
    assert main(["sweep", str(image_folder), "--n-jobs", "0", *FAST, "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--n-jobs" in _one_error(capsys)
    _no_features(tmp_path / "c")


def test_one_class_cache_file_in_sweep_is_one_line_exit_2(tmp_path, one_class, capsys):
    cache = tmp_path / "c"
    assert main(["extract", str(one_class), *FAST, "--cache-dir", str(cache), "-q"]) == 0
    [features] = cache.glob("*.h5")
    capsys.readouterr()
    assert main(["sweep", str(features), "--heads", "softmax", "--cv", "2"]) == 2
    line = _one_error(capsys)
    assert str(features) in line and "only class 'cat'" in line
