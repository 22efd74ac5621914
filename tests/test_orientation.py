"""Data with no up: the orientation measurement (:mod:`tlp.orientation`), features averaged
over quarter turns and flips (``--tta d4``), training on quarter-turned crops
(``--rotate``), and what ``tlp run`` does with them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import tlp
from tlp.cli import main
from tlp.data import as_dataset
from tlp.featurefile import FeatureFile
from tlp.orientation import measure_orientation
from tlp.settings import ExtractSettings

from helpers import FAST, write_images


# Every MISLABELLED-th image of a class folder is drawn as the other class: label noise that
# keeps cross-validated accuracy below 1.0, where tlp run would stop measuring recipes.
MISLABELLED = 8


def _drawn_as(names: tuple[str, str], name: str, i: int) -> str:
    return names[1 - names.index(name)] if i % MISLABELLED == MISLABELLED - 1 else name


def _stripes(root, n: int, seed: int = 0) -> None:
    """Two classes a quarter turn apart: horizontal and vertical stripes of random period,
    phase and colours. Turning an image makes it the other class: the data has an up."""
    rng = np.random.default_rng(seed)
    names = ("horizontal", "vertical")
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            period, phase = rng.uniform(6, 14), rng.uniform(0, 2 * np.pi)
            wave = (np.sin(2 * np.pi * np.arange(80) / period + phase) > 0).astype(np.float32)
            horizontal = _drawn_as(names, name, i) == "horizontal"
            mask = np.repeat(wave[:, None], 80, axis=1) if horizontal else np.repeat(wave[None], 80, axis=0)
            dark, light = rng.integers(0, 90, 3), rng.integers(160, 256, 3)
            pixels = dark + mask[..., None] * (light - dark)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")


def _tints(root, n: int, seed: int = 0) -> None:
    """Two classes told apart by colour (red or blue), each image stripes at a random angle:
    a quarter turn changes nothing about the class. The data has no up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float32)
    names = ("red", "blue")
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
            wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0
            pixels = np.full((80, 80, 3), 40.0) + rng.normal(0, 8, (80, 80, 3))
            pixels[..., 0 if _drawn_as(names, name, i) == "red" else 2] += 120 + 80 * wave
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")


def test_the_orientation_measurement_tells_data_with_an_up_from_data_without(tmp_path, cache_dir):
    settings = ExtractSettings(cache_dir=str(cache_dir), precision="fp32", **FAST)
    _stripes(tmp_path / "stripes", 80)
    _tints(tmp_path / "tints", 80)
    stripes = measure_orientation(as_dataset(str(tmp_path / "stripes")), settings)
    tints = measure_orientation(as_dataset(str(tmp_path / "tints")), settings)
    assert stripes["has_up"] is True and "has an up" in stripes["why"]
    assert stripes["upright_accuracy"] - stripes["turned_accuracy"] >= 0.5  # turning swaps the classes
    assert tints["has_up"] is False and "has no up" in tints["why"]
    assert tints["turned_accuracy"] >= tints["upright_accuracy"] - 0.1
    assert stripes["n_images"] == tints["n_images"] == 40  # a quarter of the 160 images held out
    _tints(tmp_path / "few", 24)
    few = measure_orientation(as_dataset(str(tmp_path / "few")), settings)
    assert few["has_up"] is None and few["why"].startswith("not measured")


def test_d4_features_do_not_depend_on_how_the_image_was_turned_or_mirrored(tmp_path, cache_dir):
    # 80 px squares cropped to 70 (resize 80): the crop of a turned image is the turned crop.
    root = tmp_path / "turns"
    originals = write_images(root / "a", 3, size=(80, 80), fmt="PNG")
    (root / "b").mkdir()
    for path in originals:
        image = Image.open(path)
        image.transpose(Image.ROTATE_90).save(root / "b" / f"turned_{path.name}")
        image.transpose(Image.TRANSPOSE).save(root / "b" / f"transposed_{path.name}")
    options = {**FAST, "image_size": 70, "precision": "fp32", "layers": ("mid", "late"), "cache_dir": cache_dir}
    flipped = tlp.extract(root, tta="flip", **options)
    turned = tlp.extract(root, tta="d4", **options)
    assert turned.key != flipped.key and turned.n_extracted == 9  # its own fingerprint: nothing reused
    for result, gap_ok in ((flipped, lambda gap: gap > 0.1), (turned, lambda gap: gap < 1e-5)):
        for layer in ("mid", "late"):
            with FeatureFile(result.path) as features:
                values, row = features.load(layer), {path: i for i, path in enumerate(features.paths)}
            for p in originals:
                a = values[row[f"a/{p.name}"]]
                for other in (f"b/turned_{p.name}", f"b/transposed_{p.name}"):
                    gap = float(np.linalg.norm(a - values[row[other]]) / np.linalg.norm(a))
                    assert gap_ok(gap), (result.key, layer, other, gap)
    with FeatureFile(turned.path) as features:
        assert features.attrs["tta"] == "d4"


def test_a_saved_head_on_d4_features_predicts_with_d4(tmp_path, cache_dir):
    _tints(tmp_path / "data", 8)
    out = tmp_path / "M"
    assert main(["sweep", str(tmp_path / "data"), "--layers", "late", "--tta", "d4", "--heads", "softmax", "--cv",
                 "3", "--image-size", "64", "--cache-dir", str(cache_dir), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "model.json").read_text())["tta"] == "d4"
    cached = tlp.extract(tmp_path / "data", layers=("late",), tta="d4", cache_dir=cache_dir, **FAST)
    assert cached.n_extracted == 0
    with FeatureFile(cached.path) as features:
        late, paths = features.load("late"), features.paths
    expected = dict(zip((str(tmp_path / "data" / p) for p in paths),
                        tlp.load_model(out).estimator.predict_proba(late).max(axis=1)))
    for row in tlp.predict(out, sorted(expected)).rows:
        assert row["probabilities"][0] == pytest.approx(float(expected[row["path"]]), abs=1e-6)


def test_rotate_turns_the_same_training_crops_by_quarter_turns(tmp_path):
    from tlp.finetuning.augment import DecodedImages, training_batches
    from tlp.finetuning.parallel import Ranks
    from tlp.models import resolve_model
    from tlp.settings import FinetuneSettings

    _stripes(tmp_path / "data", 8)
    dataset = as_dataset(str(tmp_path / "data"))
    images = DecodedImages(dataset, resolve_model("efficientnet_lite0", image_size=64).preprocessing)
    positions = list(range(len(dataset.items)))

    def first_batch(**options):
        settings = FinetuneSettings(image_size=64, batch_size=16, precision="fp32", progress=False, **options)
        with ThreadPoolExecutor(2) as pool:
            pixels, _, _ = next(training_batches(images, dataset.labels, positions, settings, 1, workers=0,
                                                 pool=pool, ranks=Ranks()))
        return pixels

    plain, turned = first_batch(), first_batch(rotate=True)
    turns = []
    for a, b in zip(plain, turned):  # the same crop and flip, then a quarter turn (the last number drawn)
        turns.append(next(k for k in range(4) if torch.equal(a.rot90(k, dims=(1, 2)), b)))
    assert len(set(turns)) > 1 and set(turns) <= {0, 1, 2, 3}
    assert torch.equal(first_batch(), plain)  # without --rotate: the crops of runs from before it existed


def _run(data, report, cache_dir, *more: str) -> dict:
    assert main(["run", str(data), "--test", "0.25", "--image-size", "64", "--heads", "softmax", "--layers", "late",
                 "--precision", "fp32", "--cache-dir", str(cache_dir), "--report", str(report), "--quiet",
                 *more]) == 0
    return {entry["recipe"]: entry for entry in json.loads(report.read_text())["evidence"]["candidates"]}


TURNS = "frozen, features averaged over quarter turns and flips (d4)"
FLIP = "frozen, flip-averaged features"


def test_run_measures_d4_features_or_trains_on_turned_crops_only_where_the_data_has_no_up(tmp_path, cache_dir):
    _tints(tmp_path / "tints", 110)
    _stripes(tmp_path / "stripes", 110)
    report = tmp_path / "run.json"
    small = _run(tmp_path / "tints", report, cache_dir)  # 82 per class: too few to fine-tune (100)
    assert small["frozen"]["cv_accuracy"] < 1.0
    assert small[TURNS]["orientation"]["has_up"] is False and small[TURNS]["tta"] == "d4"
    assert "cv_accuracy" in small[TURNS] and small[TURNS]["kept"] in (True, False)

    # 1000 epochs cannot fit the budget: the flip step's passes go to fine-tuning's epochs
    # (which early stopping then ends after a few). A fresh cache: the estimate needs a
    # timed extraction.
    tuned = _run(tmp_path / "tints", report, tmp_path / "fresh-cache", "--finetune-per-class", "10",
                 "--epochs", "1000", "--patience", "1")
    assert tuned[TURNS]["skipped"].startswith("fine-tuning follows") and tuned["fine-tune"]["rotate"] is True
    assert "1000 epochs" in tuned[FLIP]["skipped"] and "the budget goes to its epochs" in tuned[FLIP]["skipped"]
    assert 1 <= tuned["fine-tune"]["epochs_run"] < 1000

    upright = _run(tmp_path / "stripes", report, cache_dir, "--finetune-per-class", "10", "--epochs", "1")
    assert upright[TURNS]["orientation"]["has_up"] is True and "has an up" in upright[TURNS]["skipped"]
    assert upright["fine-tune"]["rotate"] is False
    assert "cv_accuracy" in upright[FLIP]  # its one epoch fits: flip-averaged features are measured
