"""Fine-tuning: freezing, frozen BatchNorm, checkpoints, kill-and-resume, saved model, predict."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tlp.cli import main
from tlp import finetune
from tlp.finetuning.surgery import build_finetune_model, freeze_layers, parameterised_layers
from tlp.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=64, batch_size=8, precision="fp32", seed=0, progress=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_new_classifier_is_sized_to_the_classes_and_seeded():
    spec = resolve_model("efficientnet_lite0", image_size=64)
    first = build_finetune_model(spec, 3, seed=0)
    second = build_finetune_model(spec, 3, seed=0)
    assert first.classifier.out_features == 3
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    pretrained = spec.build()
    # Everything but the classifier starts from the pretrained weights.
    assert torch.equal(first.conv_stem.weight, pretrained.conv_stem.weight)
    scratch = build_finetune_model(spec, 3, from_scratch=True)
    assert not torch.equal(scratch.conv_stem.weight, pretrained.conv_stem.weight)


def test_freeze_by_fraction_and_by_module_name():
    spec = resolve_model("efficientnet_lite0", image_size=64)
    model = build_finetune_model(spec, 3)
    layers = parameterised_layers(model, "classifier")
    frozen = freeze_layers(model, layers, 0.7)
    assert len(frozen) == int(0.7 * len(layers))
    assert frozen[0] == "conv_stem" and not model.conv_stem.weight.requires_grad
    assert model.classifier.weight.requires_grad and model.conv_head.weight.requires_grad

    model = build_finetune_model(spec, 3)
    frozen = freeze_layers(model, parameterised_layers(model, "classifier"), "blocks.2")
    assert frozen[-1].startswith("blocks.2.") and not any(name.startswith("blocks.3") for name in frozen)
    assert model.blocks[3][0].conv_pw.weight.requires_grad


def test_frozen_batchnorm_statistics_and_weights_do_not_move(image_folder):
    spec = resolve_model("efficientnet_lite0", image_size=64)
    # Run the real training loop, then compare against the network it started from.
    result = finetune(str(image_folder), freeze=0.5, epochs=1, val=0.0, **SMALL)
    start = build_finetune_model(spec, 3)
    model = build_finetune_model(spec, 3)
    frozen = set(freeze_layers(model, parameterised_layers(model, "classifier"), 0.5))
    trained = result.network.state_dict()
    frozen_bn = [name for name, module in model.named_modules()
                 if name in frozen and isinstance(module, nn.BatchNorm2d)]
    assert frozen_bn, "the frozen half holds BatchNorm layers"
    for name in frozen_bn:
        for buffer in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(trained[f"{name}.{buffer}"], start.state_dict()[f"{name}.{buffer}"]), name
    trainable_bn = [name for name, module in model.named_modules()
                    if name not in frozen and isinstance(module, nn.BatchNorm2d)]
    assert any(not torch.equal(trained[f"{n}.running_mean"], start.state_dict()[f"{n}.running_mean"])
               for n in trainable_bn)
    assert not torch.equal(trained["classifier.weight"], start.state_dict()["classifier.weight"])
    assert result.recipe["n_frozen_layers"] == len(frozen)


def test_dataloader_workers_train_the_same_weights_as_threads(image_folder):
    """Augmentation is seeded per (seed, epoch, image), so the decoding strategy does not
    change the numbers."""
    threads = finetune(str(image_folder), case="4", epochs=1, val=0.0, workers=0, **SMALL)
    workers = finetune(str(image_folder), case="4", epochs=1, val=0.0, workers=1, **SMALL)
    expected, actual = threads.network.state_dict(), workers.network.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_outputs_and_predict(image_folder, tmp_path, capsys):
    out = tmp_path / "ft"
    report = tmp_path / "r.json"
    code = main(["finetune", str(image_folder), "--case", "4", "--image-size", "64", "--batch-size", "8",
                 "--epochs", "2", "--precision", "fp32", "--test", "0.25", "--out", str(out),
                 "--report", str(report), "--quiet"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["case"] == 4 and data["n_test"] == 6 and data["resumed_from_epoch"] is None
    assert [row["epoch"] for row in data["history"]] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_accuracy", "seconds"} <= set(data["history"][0])
    assert 0.0 <= data["best"]["test_accuracy"] <= 1.0
    weights = out / json.loads((out / "model.json").read_text())["finetuned"]["file"]
    state = torch.load(weights, weights_only=True)
    assert state["classifier.weight"].shape[0] == 3
    with open(out / "history.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert (out / "history.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt"]

    images = sorted(str(p) for p in (image_folder / "owl").iterdir())[:3]
    predictions = tmp_path / "p.csv"
    assert main(["predict", str(out), *images, "--out", str(predictions)]) == 0
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == images
    assert all(row["label"] in ("cat", "dog", "owl") and 0 < float(row["probability"]) <= 1 for row in rows)

    # Tampered weights are refused before loading.
    with open(weights, "ab") as handle:
        handle.write(b"\0")
    assert main(["predict", str(out), images[0]]) == 2
    assert "sha256" in capsys.readouterr().err


def test_changed_settings_do_not_resume_silently(image_folder, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", str(image_folder), "--case", "4", "--image-size", "64", "--batch-size", "8",
            "--precision", "fp32", "--val", "0", "--out", str(out), "--quiet"]
    assert main(args + ["--epochs", "1"]) == 0
    assert main(args + ["--epochs", "1", "--lr", "0.01"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main(args + ["--epochs", "1", "--lr", "0.01", "--restart"]) == 0


def test_separate_test_set_with_an_unknown_class_fails_before_training(image_folder, tmp_path, capsys):
    from helpers import write_images

    write_images(tmp_path / "test" / "emu", 2, start=990)
    out = tmp_path / "ft"
    code = main(["finetune", str(image_folder), "--case", "4", "--image-size", "64", "--epochs", "1",
                 "--test", str(tmp_path / "test"), "--out", str(out)])
    assert code == 2
    assert "has classes not in the training data: emu" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_bad_freeze_is_a_one_line_error(image_folder, capsys):
    assert main(["finetune", str(image_folder), "--freeze", "no.such.module", "--image-size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.such.module" in err[0]


@pytest.mark.parametrize("size", ["0", "5000"])
def test_a_bad_train_size_is_a_one_line_error(image_folder, size, capsys):
    assert main(["finetune", str(image_folder), "--train-size", size, "--image-size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-size" in err[0] and size in err[0], err


def _finetune_command(data: Path, out: Path, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "tlp", "finetune", str(data), "--model", "efficientnet_lite0",
            "--image-size", "64", "--batch-size", "8", "--epochs", str(epochs), "--precision", "fp32",
            "--seed", "0", "--case", "4", "--out", str(out), "--quiet"]


def _weights_file(out: Path) -> Path:
    """The fine-tuned weights the folder's model.json names."""
    return out / json.loads((out / "model.json").read_text())["finetuned"]["file"]


def test_killed_run_resumes_bit_identical(image_folder, tmp_path):
    """SIGKILL after the first checkpoint, rerun the same command: the final weights equal
    those of an uninterrupted run, and the report says where it resumed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    whole = tmp_path / "whole"  # the uninterrupted run, beside the one that is killed
    uninterrupted = subprocess.Popen(_finetune_command(image_folder, whole), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_finetune_command(image_folder, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "epoch-001.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), "the run wrote its first checkpoint before the kill"
    if (killed / "model.json").exists():
        uninterrupted.kill()
        pytest.skip("the run finished before it could be killed")

    report = tmp_path / "resumed.json"
    subprocess.run(_finetune_command(image_folder, killed) + ["--report", str(report)], check=True, env=env,
                   capture_output=True, timeout=300)
    _, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr[-2000:]
    assert json.loads(report.read_text())["resumed_from_epoch"] >= 1
    expected = torch.load(_weights_file(whole), weights_only=True)
    resumed = torch.load(_weights_file(killed), weights_only=True)
    assert expected.keys() == resumed.keys()
    differing = {k: float((expected[k].double() - resumed[k].double()).abs().max())
                 for k in expected if not torch.equal(expected[k], resumed[k])}
    history = json.loads(report.read_text())["history"]
    assert not differing, f"{len(differing)} tensors differ (max abs diff {max(differing.values())}); history {history}"


def test_a_deadline_keeps_only_the_epochs_that_fit(image_folder, caplog):
    # A deadline that the first epoch already passes: that epoch is the last one.
    with caplog.at_level("INFO", logger="tlp.finetuning.loop"):
        result = finetune(image_folder, epochs=6, val=0.25, deadline=time.monotonic() + 0.5, **SMALL)
    assert len(result.history) == 1 and result.recipe["epochs_run"] == 1 and result.best_epoch == 1
    assert "time budget: 1 of 6 epochs fit" in caplog.text
    unhurried = finetune(image_folder, epochs=2, val=0.25, deadline=time.monotonic() + 3600, **SMALL)
    assert len(unhurried.history) == 2 and unhurried.history[0]["lr"] > 0


@pytest.mark.parametrize("budget", ["0", "-1", "soon"])
def test_a_bad_budget_exits_2_on_one_line(image_folder, budget, capsys):
    assert main(["run", str(image_folder), "--budget", budget]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget" in err, err


def test_training_crops_smaller_than_the_evaluation_crop(image_folder, tmp_path):
    """--train-size 48 trains on 48-pixel crops; validation, the saved model and predict
    stay at the 64-pixel evaluation crop, and a run that trains at the evaluation size
    keeps the checkpoints of runs that never named --train-size."""
    from concurrent.futures import ThreadPoolExecutor

    from tlp.data import as_dataset
    from tlp.finetuning.augment import DecodedImages, training_batches
    from tlp.finetuning.parallel import Ranks
    from tlp.settings import FinetuneSettings

    dataset = as_dataset(str(image_folder))
    settings = FinetuneSettings(train_size=48, **SMALL)
    images = DecodedImages(dataset, resolve_model("efficientnet_lite0", image_size=64).preprocessing)
    with ThreadPoolExecutor(2) as pool:
        pixels, _, _ = next(training_batches(images, dataset.labels, list(range(len(dataset.items))), settings, 1,
                                             workers=0, pool=pool, ranks=Ranks()))
    assert tuple(pixels.shape[1:]) == (3, 48, 48)

    out = tmp_path / "ft"
    args = ["finetune", str(image_folder), "--case", "4", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
            "--precision", "fp32", "--val", "0.25", "--out", str(out), "--quiet"]
    report = tmp_path / "small.json"
    assert main(args + ["--train-size", "48", "--report", str(report)]) == 0
    recipe = json.loads(report.read_text())["recipe"]
    assert (recipe["train_size"], recipe["image_size"]) == (48, 64)
    assert json.loads((out / "model.json").read_text())["preprocessing"]["crop_size"] == 64
    image = str(sorted((image_folder / "owl").iterdir())[0])
    assert main(["predict", str(out), image, "--out", str(tmp_path / "p.csv")]) == 0

    small = torch.load(_weights_file(out), weights_only=True)
    plain = tmp_path / "plain.json"
    assert main(args + ["--restart", "--report", str(plain)]) == 0  # the evaluation size: other weights
    at_evaluation_size = torch.load(_weights_file(out), weights_only=True)
    assert not torch.equal(small["conv_stem.weight"], at_evaluation_size["conv_stem.weight"])
    again = tmp_path / "again.json"
    assert main(args + ["--train-size", "64", "--report", str(again)]) == 0
    assert json.loads(again.read_text())["resumed_from_epoch"] == 1
