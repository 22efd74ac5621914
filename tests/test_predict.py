"""Saved heads and `tlp predict`: new image files through the same extractor and head."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from tlp.cli import main
from tlp.builtin import digits_images


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A head swept on 600 digit PNGs (60 per class), and 20 other digits to predict."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_images()
    per_class = {d: 0 for d in range(10)}
    held_out = []
    for index, (image, label) in enumerate(zip(images, labels)):
        if per_class[label] < 60:
            (root / "train" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "train" / str(label) / f"{index}.png")
            per_class[label] += 1
        elif len(held_out) < 20 and index % 7 == 0:
            path = root / "new" / f"{index}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(image).save(path)
            held_out.append((path, str(label)))
    out = root / "M"
    code = main(["sweep", str(root / "train"), "--image-size", "96", "--heads", "softmax,knn", "--cv", "3",
                 "--cache-dir", str(root / "cache"), "--out", str(out), "--quiet"])
    assert code == 0
    return out, held_out


def test_saved_model_spec_and_files(digits_model):
    out, _ = digits_model
    spec = json.loads((out / "model.json").read_text())
    assert spec["model"] == "efficientnet_lite0" and spec["classes"] == [str(d) for d in range(10)]
    assert spec["layer"] in ("early", "mid", "late") and spec["head"]["name"] in ("softmax", "knn")
    assert len(spec["head"]["sha256"]) == 64 and spec["versions"]["sklearn"]
    assert spec["format"] == "tlp-head-v2" and spec["head"]["file"].endswith(".skops")
    assert (out / spec["head"]["file"]).is_file() and (out / "results.csv").is_file()


def test_predict_new_digit_files(digits_model, tmp_path):
    out, held_out = digits_model
    csv_path = tmp_path / "pred.csv"
    assert main(["predict", str(out), *[str(p) for p, _ in held_out], "--out", str(csv_path)]) == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["path"] for r in rows] == [str(p) for p, _ in held_out]
    correct = sum(r["label"] == label for r, (_, label) in zip(rows, held_out))
    assert correct >= 18, f"{correct} of 20 correct"
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)


def test_predict_a_folder_prints_csv_on_stdout(digits_model, tmp_path):
    """`tlp predict M imgs/ > preds.txt` gives the predictions as CSV, top-k columns included."""
    import os
    import subprocess
    import sys

    out, held_out = digits_model
    folder = held_out[0][0].parent
    preds = tmp_path / "preds.txt"
    with open(preds, "w") as handle:
        subprocess.run([sys.executable, "-m", "tlp", "predict", str(out), str(folder), "--top-k", "2"], check=True,
                       stdout=handle, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    rows = list(csv.DictReader(open(preds)))
    assert [r["path"] for r in rows] == sorted(str(p) for p, _ in held_out)
    assert set(rows[0]) == {"path", "label", "probability", "label_2", "probability_2"}
    truth = {str(p): label for p, label in held_out}
    assert sum(r["label"] == truth[r["path"]] for r in rows) >= 18


def test_a_missing_image_cannot_be_read(digits_model, tmp_path, capsys):
    out, held_out = digits_model
    assert main(["predict", str(out), str(tmp_path / "gone.png")]) == 2
    error = capsys.readouterr().err
    assert "cannot read image" in error and "gone.png" in error and "file not found" in error
    assert main(["predict", str(out), str(held_out[0][0]), str(tmp_path / "gone.png"), "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2 and "gone.png" in captured.err  # header + one row; the skip is logged


def test_tampered_head_is_refused_without_unpickling(digits_model, tmp_path, monkeypatch, capsys):
    import shutil

    import skops.io

    out, held_out = digits_model
    copy = tmp_path / "M"
    shutil.copytree(out, copy)
    with open(copy / json.loads((copy / "model.json").read_text())["head"]["file"], "ab") as handle:
        handle.write(b"\0")
    monkeypatch.setattr(skops.io, "load", lambda *a, **k: pytest.fail("a tampered head must not be loaded"))
    assert main(["predict", str(copy), str(held_out[0][0])]) == 2
    assert "sha256" in capsys.readouterr().err


def test_a_model_name_that_now_resolves_to_other_preprocessing_is_refused(digits_model, tmp_path, capsys):
    import shutil

    out, held_out = digits_model
    copy = tmp_path / "M"
    shutil.copytree(out, copy)
    spec = json.loads((copy / "model.json").read_text())
    spec["preprocessing"]["resize_size"] += 8  # as if trained with another weights enum's transforms
    (copy / "model.json").write_text(json.dumps(spec))
    assert main(["predict", str(copy), str(held_out[0][0])]) == 2
    assert "was trained with" in capsys.readouterr().err


def test_head_from_another_sklearn_major_is_refused(digits_model, tmp_path, capsys):
    import shutil

    out, held_out = digits_model
    copy = tmp_path / "M"
    shutil.copytree(out, copy)
    spec = json.loads((copy / "model.json").read_text())
    spec["versions"]["sklearn"] = "0.24.2"
    (copy / "model.json").write_text(json.dumps(spec))
    assert main(["predict", str(copy), str(held_out[0][0])]) == 2
    assert "scikit-learn 0.24.2" in capsys.readouterr().err


def test_truncated_spec_exits_2_and_names_both_commands(digits_model, tmp_path, capsys):
    import shutil

    out, held_out = digits_model
    copy = tmp_path / "M"
    shutil.copytree(out, copy)
    (copy / "model.json").write_text((copy / "model.json").read_text()[:40])
    assert main(["predict", str(copy), str(held_out[0][0])]) == 2
    error = capsys.readouterr().err
    assert "model.json" in error and "not valid JSON" in error and "tlp finetune --out" in error


def test_imagenet_labels_without_training(tmp_path):
    paths = []
    for name in ("china", "flower"):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(load_sample_image(f"{name}.jpg")).save(path, quality=95)
        paths.append(str(path))
    out = tmp_path / "imagenet.csv"
    assert main(["predict", "--imagenet", *paths, "--top-k", "3", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["palace", "daisy"]
    assert "label_3" in rows[0]
