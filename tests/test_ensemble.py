"""The average of the frozen winner and the fine-tuned network: the rule that keeps it,
the saved ensemble folder (members inside it, checked like any saved model) and
`tlp predict` on it (the weighted mean of the members' probabilities, by class name).
`tlp run` choosing it end to end is in test_plan.py (it shares that module's cache)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tlp.cli import main
from tlp.ensemble import MAX_MEMBER_GAP, Scored, average, compare
from tlp.saved import save_ensemble

from helpers import write_images

CLASSES = ["cat", "dog", "owl"]


# ----------------------------------------------------------------------------- the rule
def _scored(right: np.ndarray, confidence: np.ndarray, classes=("a", "b")) -> Scored:
    """Two-class scores: image i's true class is "a"; its probability is ``confidence[i]``
    where ``right[i]``, else 1 - ``confidence[i]``."""
    p = np.where(right, confidence, 1.0 - confidence)
    return Scored([f"img{i}.png" for i in range(len(right))], np.zeros(len(right), dtype=np.int64),
                  np.stack([p, 1.0 - p], axis=1), list(classes))


def test_the_average_is_kept_when_neither_member_is_clearly_ahead():
    n = 200
    frozen_right, tuned_right = np.ones(n, bool), np.ones(n, bool)
    frozen_right[:3], tuned_right[3:6] = False, False  # each 0.985, wrong on different images
    confidence = np.full(n, 0.9)
    confidence[:6] = 0.6  # the wrong member is unsure where the other is right
    frozen, tuned = _scored(frozen_right, confidence), _scored(tuned_right, np.where(tuned_right, 0.9, 0.6))
    comparison = compare(frozen, tuned)
    assert comparison.winner == "ensemble" and comparison.to_report()["kept"]
    assert comparison.frozen_accuracy == comparison.finetune_accuracy == 0.985
    assert comparison.average_accuracy == 1.0 and comparison.n_images == n


def test_a_member_clearly_behind_wins_nothing_and_is_not_averaged():
    n = 200
    tuned_right = np.ones(n, bool)
    tuned_right[:20] = False  # 0.90 against the frozen winner's 1.0: clearly behind
    comparison = compare(_scored(np.ones(n, bool), np.full(n, 0.9)), _scored(tuned_right, np.full(n, 0.95)))
    assert comparison.winner == "sweep" and "clearly behind" in comparison.why


def test_a_member_beyond_the_gap_is_not_averaged_even_where_validation_cannot_tell():
    n = 30  # few validation images: 4 points behind is not significant, the cap decides
    frozen_right = np.ones(n, bool)
    frozen_right[:2] = False
    tuned_right = np.ones(n, bool)
    tuned_right[2:5] = False
    comparison = compare(_scored(frozen_right, np.full(n, 0.9)), _scored(tuned_right, np.full(n, 0.9)))
    assert comparison.finetune_accuracy < comparison.frozen_accuracy - MAX_MEMBER_GAP
    assert comparison.z["finetune behind sweep"] < 1.645
    assert comparison.winner == "sweep" and "points behind" in comparison.why


def test_an_average_clearly_behind_the_better_member_is_not_kept():
    n = 200
    frozen_right, tuned_right = np.ones(n, bool), np.ones(n, bool)
    frozen_right[:4] = False  # confidently wrong where the fine-tuned network is unsure
    tuned_right[4:12] = False  # confidently wrong where the frozen winner is unsure
    frozen = _scored(frozen_right, np.where(frozen_right, np.where(np.arange(n) < 12, 0.55, 0.9), 0.95))
    tuned = _scored(tuned_right, np.where(tuned_right, np.where(np.arange(n) < 12, 0.55, 0.9), 0.95))
    comparison = compare(frozen, tuned)
    assert (comparison.frozen_accuracy, comparison.finetune_accuracy, comparison.average_accuracy) == \
        (0.98, 0.96, 0.94)
    assert comparison.winner == "sweep" and "the average is clearly behind" in comparison.why


def test_the_average_aligns_images_by_path_and_classes_by_name():
    rng = np.random.default_rng(0)
    first = Scored(["x", "y", "z"], np.array([0, 1, 2]), rng.dirichlet(np.ones(3), 3), ["a", "b", "c"])
    order, columns = [2, 0], [2, 0, 1]  # the second scored z and x only, classes as c, a, b
    second = Scored(["z", "x"], np.array([0, 0]),  # z is "c" (its column 0), x is "a" (its column 1)
                    rng.dirichlet(np.ones(3), 3)[order][:, columns], ["c", "a", "b"])
    mean = average([first, second], weights=[1.0, 3.0])
    assert mean.paths == ["x", "z"] and mean.classes == ["a", "b", "c"] and mean.labels.tolist() == [0, 2]
    back = {"c": 0, "a": 1, "b": 2}
    for row, path in enumerate(mean.paths):
        i, j = first.paths.index(path), second.paths.index(path)
        expected = [0.25 * first.probabilities[i, k] + 0.75 * second.probabilities[j, back[name]]
                    for k, name in enumerate(first.classes)]
        assert mean.probabilities[row] == pytest.approx(expected)


# ----------------------------------------------------------------------------- the saved folder
@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """A head (kNN on early features) and a fine-tuned network (1 epoch, 64 px) on the
    same 3 classes x 8 photos, and the images to predict."""
    root = tmp_path_factory.mktemp("members")
    for index, name in enumerate(CLASSES):
        write_images(root / "data" / name, 8, start=100 * index)
    fast = ["--image-size", "64", "--workers", "0", "--quiet"]
    assert main(["sweep", str(root / "data"), *fast, "--cache-dir", str(root / "cache"), "--heads", "knn",
                 "--cv", "2", "--layers", "early", "--out", str(root / "head")]) == 0
    assert main(["finetune", str(root / "data"), "--case", "4", "--batch-size", "8", "--epochs", "1",
                 "--precision", "fp32", "--val", "0", *fast, "--out", str(root / "net")]) == 0
    images = [str(p) for name in CLASSES for p in sorted((root / "data" / name).iterdir())[:2]]
    return {"root": root, "head": root / "head", "net": root / "net", "images": images}


def _ensemble(members, tmp_path: Path, weights=(1.0, 3.0)) -> Path:
    folder = tmp_path / "E"
    shutil.copytree(members["head"], folder / "frozen")
    shutil.copytree(members["net"], folder / "finetune")
    save_ensemble(folder, [("frozen", weights[0]), ("finetune", weights[1])])
    return folder


def _probabilities(model: Path, images: list[str], out: Path) -> dict[str, dict[str, float]]:
    """Every class's probability per image, from `tlp predict --top-k 3 --out`."""
    assert main(["predict", str(model), *images, "--top-k", "3", "--out", str(out)]) == 0
    table = {}
    for row in csv.reader(out.read_text().splitlines()[1:]):
        table[row[0]] = {row[i]: float(row[i + 1]) for i in range(1, len(row), 2)}
    return table


def test_predict_on_an_ensemble_is_the_weighted_mean_of_its_members(members, tmp_path):
    folder = _ensemble(members, tmp_path)
    spec = json.loads((folder / "model.json").read_text())
    assert spec["format"] == "tlp-ensemble-v1" and spec["classes"] == CLASSES
    assert [m["folder"] for m in spec["members"]] == ["frozen", "finetune"]
    head = _probabilities(members["head"], members["images"], tmp_path / "head.csv")
    net = _probabilities(members["net"], members["images"], tmp_path / "net.csv")
    both = _probabilities(folder, members["images"], tmp_path / "both.csv")
    assert set(both) == set(members["images"])
    for path, row in both.items():
        assert row == pytest.approx({c: 0.25 * head[path][c] + 0.75 * net[path][c] for c in CLASSES}, abs=2e-6)
    assert sum(row["cat"] == max(row.values()) for row in both.values()) >= 1  # a real, varied prediction


def test_saving_an_ensemble_over_a_head_removes_the_replaced_weights(members, tmp_path):
    folder = tmp_path / "E"
    shutil.copytree(members["head"], folder)  # the folder held a head: its model.json and weights
    old = json.loads((folder / "model.json").read_text())["head"]["file"]
    shutil.copytree(members["head"], folder / "frozen")
    shutil.copytree(members["net"], folder / "finetune")
    save_ensemble(folder, [("frozen", 0.5), ("finetune", 0.5)])
    assert not (folder / old).exists() and (folder / "frozen" / old).exists()
    assert len(_probabilities(folder, members["images"][:2], tmp_path / "p.csv")) == 2


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlp: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["parent folder", "absolute", "link outside", "missing", "nested ensemble",
                                  "zero weight", "one member", "other classes"])
def test_a_bad_ensemble_folder_is_one_line_exit_2_before_any_image_is_read(members, tmp_path, capsys, case):
    folder = _ensemble(members, tmp_path)
    spec = json.loads((folder / "model.json").read_text())
    outside = tmp_path / "outside"
    shutil.copytree(members["net"], outside)  # a valid model: only its place is wrong
    if case == "parent folder":
        spec["members"][1]["folder"] = "../outside"
    elif case == "absolute":
        spec["members"][1]["folder"] = str(outside)
    elif case == "link outside":
        shutil.rmtree(folder / "finetune")
        (folder / "finetune").symlink_to(outside)
    elif case == "missing":
        shutil.rmtree(folder / "finetune")
    elif case == "nested ensemble":
        shutil.copytree(folder, tmp_path / "inner")
        shutil.rmtree(folder / "finetune")
        shutil.copytree(tmp_path / "inner", folder / "finetune")
    elif case == "zero weight":
        spec["members"][0]["weight"] = 0
    elif case == "one member":
        spec["members"] = spec["members"][:1]
    elif case == "other classes":
        spec["classes"] = ["cat", "dog", "emu"]
    (folder / "model.json").write_text(json.dumps(spec))
    error = _one_line_error(capsys, main(["predict", str(folder), "/no/such/image.png"]))
    expected = {"parent folder": "not a plain name", "absolute": "not a plain name", "link outside": "outside the "
                "folder", "missing": "is missing", "nested ensemble": "holds an ensemble", "zero weight": "positive",
                "one member": "at least 2", "other classes": "do not predict the classes"}[case]
    assert "model.json" in error or "members of" in error
    assert expected in error
