"""`tlp sweep`: heads as scikit-learn estimators, honest selection, the report contract."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits

from tlp.cli import main
from tlp.heads import HEADS, grid_scores, head_grid, make_head
from tlp import sweep

from helpers import FAST


def test_sweep_report_contract_and_selection_on_training_part_only(image_folder, cache_dir, tmp_path):
    report_path, out = tmp_path / "r.json", tmp_path / "M"
    code = main(["sweep", str(image_folder), "--image-size", "64", "--workers", "0", "--cache-dir", str(cache_dir),
                 "--test", "0.25", "--cv", "3", "--out", str(out), "--report", str(report_path), "--quiet"])
    assert code == 0
    report = json.loads(report_path.read_text())
    for key in ("case", "model", "n_train", "n_test", "best", "results", "timings"):
        assert key in report
    assert report["n_train"] + report["n_test"] == 24 and report["n_test"] == 6
    assert {(r["layer"], r["head"]) for r in report["results"]} == {
        (layer, head) for layer in ("early", "mid", "late") for head in ("softmax", "svm", "mlp", "knn")}
    for row in report["results"]:
        assert set(row) >= {"layer", "head", "params", "cv_accuracy", "test_accuracy", "fit_seconds", "n_folds"}
        assert 0.0 <= row["cv_accuracy"] <= 1.0 and 2 <= row["n_folds"] <= 3
        # Rows that racing stopped are not tested: the test part is for the contenders.
        assert 0.0 <= row["test_accuracy"] <= 1.0 if row["n_folds"] == 3 else row["test_accuracy"] is None
    # Selection uses cross-validation only: the best row has the highest CV accuracy of the
    # rows that ran every fold.
    full = [r for r in report["results"] if r["n_folds"] == 3]
    assert report["best"]["n_folds"] == 3 and report["best"]["cv_accuracy"] == max(r["cv_accuracy"] for r in full)
    assert report["cv_folds"] == 3 and report["racing"]["enabled"] is True
    assert set(report["timings"]) >= {"extract_seconds", "sweep_seconds"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 12 and rows[0]["layer"] == "early" and "n_folds" in rows[0]


def test_test_part_is_stratified_and_never_in_training(cache_dir, image_folder):
    result = sweep(image_folder, test=0.5, cv=2, heads=["knn"], cache_dir=cache_dir, **FAST)
    assert result.n_train == 12 and result.n_test == 12
    assert "*" in result.table()


def test_separate_test_set_is_mapped_by_class_name(image_folder, cache_dir, tmp_path):
    from helpers import write_images

    test_root = tmp_path / "test"
    write_images(test_root / "owl", 3, start=700)
    write_images(test_root / "cat", 3, start=800)
    result = sweep(image_folder, test=str(test_root), cv=2, heads=["softmax"], cache_dir=cache_dir, **FAST)
    assert result.n_train == 24 and result.n_test == 6
    assert all(row["test_accuracy"] is not None for row in result.results)


def test_separate_test_set_with_an_unknown_class_exits_2(image_folder, cache_dir, tmp_path, capsys):
    from helpers import write_images

    test_root = tmp_path / "test"
    write_images(test_root / "cat", 2, start=900)
    write_images(test_root / "emu", 2, start=950)
    code = main(["sweep", str(image_folder), "--test", str(test_root), "--heads", "knn", "--cv", "2",
                 "--cache-dir", str(cache_dir), "--image-size", str(FAST["image_size"])])
    assert code == 2
    assert "has classes not in the training data: emu" in capsys.readouterr().err


def test_tiny_class_reduces_folds_with_a_warning(image_folder, cache_dir, caplog):
    for path in sorted((image_folder / "owl").iterdir())[3:]:
        path.unlink()
    with caplog.at_level(logging.WARNING):
        result = sweep(image_folder, cv=5, heads=["knn"], cache_dir=cache_dir, **FAST)
    assert "using 3 folds instead of 5" in caplog.text
    assert result.n_test == 0 and result.best["test_accuracy"] is None


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_are_scikit_learn_estimators(name):
    X, y = load_digits(return_X_y=True)
    params = head_grid(name, y)[0]
    estimator = make_head(name, params)
    fitted = clone(estimator).fit(X[:600], y[:600])
    assert fitted.predict(X[600:700]).shape == (100,)
    assert estimator.get_params()["classifier"] is not None


def test_warm_started_path_scores_like_independent_fits():
    X, y = load_digits(return_X_y=True)
    grid = head_grid("softmax", y)[::6]
    warm = grid_scores("softmax", grid, X[:800], y[:800], X[800:1200], y[800:1200]).scores
    reached = [i for i, s in enumerate(warm) if s != float("-inf")]
    warm, grid = [warm[i] for i in reached], [grid[i] for i in reached]
    cold = [float((make_head("softmax", p).fit(X[:800], y[:800]).predict(X[800:1200]) == y[800:1200]).mean())
            for p in grid]
    np.testing.assert_allclose(warm, cold, atol=0.01)


def test_knn_grid_is_capped_by_class_size():
    labels = np.array([0] * 30 + [1] * 6)
    assert head_grid("knn", labels) == [{"k": 6}]


def test_bad_heads_exit_2(capsys):
    assert main(["sweep", "digits", "--heads", "svm,forest"]) == 2
    assert "--heads" in capsys.readouterr().err


def test_softmax_path_is_coarse_then_fine_around_the_best_coarse_c():
    from tlp.heads import PATH_REFINE, PATH_STEP

    X, y = load_digits(return_X_y=True)
    grid = head_grid("softmax", y)
    scores = grid_scores("softmax", grid, X[:800], y[:800], X[800:1200], y[800:1200]).scores
    assert len(scores) == len(grid) == 45
    coarse = list(range(0, 45, PATH_STEP))
    assert all(scores[i] > 0 for i in coarse)  # the whole range, 1e-6..1e5, at every 4th C
    center = max(coarse, key=lambda i: (scores[i], -i))
    fine = {i for i in range(center - PATH_REFINE, center + PATH_REFINE + 1) if 0 <= i < 45} - {center}
    assert {i for i, s in enumerate(scores) if s != float("-inf")} == set(coarse) | fine
    assert max(scores) >= 0.9


def test_fine_phase_on_a_given_centre_continues_a_coarse_phase():
    X, y = load_digits(return_X_y=True)
    grid = head_grid("softmax", y)
    args = ("softmax", grid, X[:600], y[:600], X[600:900], y[600:900])
    coarse = grid_scores(*args, phase="coarse")
    assert sum(s != float("-inf") for s in coarse.scores) == 12 and len(coarse.solutions) == 12
    fine = grid_scores(*args, phase="fine", center=20, start=coarse.solutions[20])
    assert [i for i, s in enumerate(fine.scores) if s != float("-inf")] == [17, 18, 19, 21, 22, 23]
    both = grid_scores(*args, phase="all", center=20)
    np.testing.assert_allclose(coarse.merge(fine).scores, both.scores, atol=0.01)


def test_sweep_out_writes_plots(image_folder, cache_dir, tmp_path):
    out = tmp_path / "M"
    sweep(image_folder, test=0.25, cv=2, heads=["knn"], out=out, cache_dir=cache_dir, **FAST)
    for name in ("accuracy_by_depth.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_features_transformer_in_a_grid_search(image_folder, cache_dir):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    from tlp import CachedFeatures, FeatureFile, extract
    from tlp.errors import TlpInputError

    result = extract(image_folder, cache_dir=cache_dir, **FAST)
    with FeatureFile(result.path) as features:
        paths, labels, late = features.paths, features.labels, features.load("late")
    transformer = CachedFeatures(result.path, layer="late").fit()
    np.testing.assert_array_equal(transformer.transform(paths[::-1]), late[::-1])
    model = make_pipeline(CachedFeatures(result.path), LogisticRegression(max_iter=500))
    search = GridSearchCV(model, {"cachedfeatures__layer": ["early", "mid", "late"]}, cv=2).fit(paths, labels)
    assert search.best_params_["cachedfeatures__layer"] in ("early", "mid", "late")
    with pytest.raises(TlpInputError, match="not in cache file"):
        transformer.transform(["cat/unknown.jpg"])


def test_linear_svm_path_stops_but_rbf_points_always_run():
    from tlp.heads import SVM_PATH_PATIENCE

    X, y = load_digits(return_X_y=True)
    grid = head_grid("svm", y[:800])
    scores = grid_scores("svm", grid, X[:800], y[:800], X[800:1200], y[800:1200]).scores
    linear = [s for p, s in zip(grid, scores) if p["kernel"] == "linear"]
    rbf = [s for p, s in zip(grid, scores) if p["kernel"] == "rbf"]
    assert len(rbf) == 3 and all(s > 0.5 for s in rbf)
    fitted = [s for s in linear if s != float("-inf")]
    best = int(np.argmax(fitted))
    assert len(fitted) == min(len(linear), best + SVM_PATH_PATIENCE + 1)


def _plain_correct(name, params, X_train, y_train, X_val, y_val):
    return make_head(name, params).fit(X_train, y_train).predict(X_val) == y_val


def test_svm_scoring_forms_score_like_plain_pipelines():
    """The precomputed RBF kernel and the linear SVM on the training rows' span give the
    plain pipelines' predictions, sample by sample."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    grid = head_grid("svm", y[:400])
    result = grid_scores("svm", grid, X[:400], y[:400], X[400:700], y[400:700])
    for index, params in enumerate(grid):
        if result.scores[index] == float("-inf"):
            continue  # the linear path stopped before this C
        plain = _plain_correct("svm", params, X[:400], y[:400], X[400:700], y[400:700])
        np.testing.assert_array_equal(result.correct[index], plain, err_msg=str(params))
    assert sum(p["kernel"] == "rbf" for p in grid) == 3 and all(
        s > 0.5 for p, s in zip(grid, result.scores) if p["kernel"] == "rbf")


def test_softmax_on_wide_features_scores_like_the_plain_pipeline():
    """More features than training rows: the path runs on the rows' span (fewer columns)."""
    X, y = load_digits(return_X_y=True)
    wide = np.hstack([X, np.random.default_rng(0).normal(size=(len(X), 100))]).astype(np.float32)  # 164 > 120
    grid = [{"C": c} for c in (1e-3, 1e-2, 1e-1, 1.0)]
    scores = grid_scores("softmax", grid, wide[:120], y[:120], wide[120:420], y[120:420]).scores
    plain = [float(_plain_correct("softmax", p, wide[:120], y[:120], wide[120:420], y[120:420]).mean()) for p in grid]
    np.testing.assert_allclose(scores, plain, atol=0.01)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """400 digits as PNG files (40 per class)."""
    from PIL import Image

    from tlp.builtin import digits_images

    root = tmp_path_factory.mktemp("digits") / "train"
    images, labels = digits_images()
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        for index in np.flatnonzero(labels == digit)[:40]:
            Image.fromarray(images[index]).save(root / str(digit) / f"{index}.png")
    return root


def test_racing_stops_a_clearly_worse_layer_and_says_so(digit_folder, tmp_path, capsys):
    # At 32 pixels the late layer (stride 32) sees one position: ~18 points behind on digits.
    common = ["sweep", str(digit_folder), "--image-size", "32", "--heads", "knn", "--cv", "5", "--test", "0.25",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(common + ["--report", str(tmp_path / "race.json")]) == 0
    report = json.loads((tmp_path / "race.json").read_text())
    rows = {row["layer"]: row for row in report["results"]}
    # Stopped rows are not refit: no test accuracy, no fit time (the test part is for contenders).
    assert rows["late"]["n_folds"] < 5 and rows["late"]["test_accuracy"] is None and rows["late"]["fit_seconds"] is None
    assert all(row["test_accuracy"] is not None for row in report["results"] if row["n_folds"] == 5)
    assert rows["late"]["cv_accuracy"] < report["best"]["cv_accuracy"] - 0.05
    assert report["best"]["n_folds"] == 5 and report["best"]["layer"] != "late"
    table = capsys.readouterr().out
    assert "~" in next(line for line in table.splitlines() if line.startswith("late"))
    assert f"stopped by racing after {rows['late']['n_folds']} of 5 folds" in table

    assert main(common + ["--no-racing", "--report", str(tmp_path / "full.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    assert [row["n_folds"] for row in full["results"]] == [5, 5, 5]
    assert full["racing"]["enabled"] is False and "stopped by racing" not in capsys.readouterr().out
    # The rows that ran every fold either way have the same numbers.
    assert {(r["layer"], r["cv_accuracy"]) for r in full["results"]} >= {
        (r["layer"], r["cv_accuracy"]) for r in report["results"] if r["n_folds"] == 5}


def _graded_layers(n: int = 2000, seed: int = 1):
    """Three layers of the same 10-class data: ``a``, ``near`` (a + a little noise, within a
    point of a for kNN) and ``behind`` (a + more noise, about 2 points behind a)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    a = rng.normal(size=(10, 30))[y] + 1.6 * rng.normal(size=(n, 30))
    behind = a + 0.5 * rng.normal(size=(n, 30))
    near = a + 0.25 * rng.normal(size=(n, 30))
    return {"a": a.astype(np.float32), "near": near.astype(np.float32), "behind": behind.astype(np.float32)}, y


def test_racing_stops_a_row_two_points_behind_before_its_last_fold_and_keeps_close_rows():
    """On 2,000 rows (400 validation samples a fold) a row about 2 points behind cannot catch
    up on the folds left, and stops; a row within a point of the leader runs every fold; the
    winner and its CV accuracy are those of a sweep without racing."""
    layers, y = _graded_layers()
    raced = sweep((layers, y), heads=["knn"], cv=5, n_jobs=1, progress=False)
    full = sweep((layers, y), heads=["knn"], cv=5, racing=False, n_jobs=1, progress=False)
    rows = {row["layer"]: row for row in raced.results}
    full_rows = {row["layer"]: row for row in full.results}
    assert full_rows["a"]["cv_accuracy"] - full_rows["behind"]["cv_accuracy"] > 0.015
    assert rows["behind"]["n_folds"] < 5
    assert abs(full_rows["a"]["cv_accuracy"] - full_rows["near"]["cv_accuracy"]) < 0.01 and rows["near"]["n_folds"] == 5
    assert (raced.best["layer"], raced.best["params"], raced.best["cv_accuracy"]) == (
        full.best["layer"], full.best["params"], full.best["cv_accuracy"])
    assert raced.to_report()["racing"]["p"] == pytest.approx(0.001)


def test_racing_skips_grid_points_clearly_behind_their_rows_best_on_later_folds():
    """Inside a row, a grid point far behind the row's best point after the first folds is not
    fitted on the rest (NaN in cv_results; it can no longer be selected); the row's choice
    and CV accuracy are those of a sweep without racing."""
    X, y = load_digits(return_X_y=True)
    X = np.hstack([X[:400], 4 * np.random.default_rng(0).normal(size=(400, 60))]).astype(np.float32)
    y = y[:400]
    raced = sweep((X, y), heads=["svm"], cv=5, n_jobs=1, progress=False)
    full = sweep((X, y), heads=["svm"], cv=5, racing=False, n_jobs=1, progress=False)
    scores = np.asarray([raced.cv_results[f"split{k}_test_score"] for k in range(5)])
    full_scores = np.asarray([full.cv_results[f"split{k}_test_score"] for k in range(5)])
    skipped = np.isfinite(scores[0]) & ~np.isfinite(scores[-1])  # run on the first fold, not the last
    assert skipped.any()
    best = int(np.argmax(full.cv_results["mean_test_score"]))
    assert np.all(np.nanmean(full_scores[:, skipped], axis=0) < full.cv_results["mean_test_score"][best] - 0.03)
    assert (raced.best["params"], raced.best["cv_accuracy"]) == (full.best["params"], full.best["cv_accuracy"])


def test_later_folds_skip_grid_points_an_earlier_fold_skipped():
    """A linear-SVM C that one fold's path stopped before can never be selected (it needs a
    score on every fold), so the folds after it do not fit it either; the points fitted on
    every fold keep the numbers an unskipped sweep gives."""
    from sklearn.model_selection import StratifiedKFold

    X, y = load_digits(return_X_y=True)
    # 60 noise columns make the largest C overfit on some folds (the path stops before it
    # on folds 0 and 2, not on 1, 3 and 4).
    X = np.hstack([X[:400], 4 * np.random.default_rng(0).normal(size=(400, 60))]).astype(np.float32)
    y = y[:400]
    result = sweep((X, y), heads=["svm"], cv=5, racing=False, n_jobs=1, progress=False)
    frame = result.cv_results
    scores = np.asarray([frame[f"split{k}_test_score"] for k in range(5)])  # (folds, grid)
    fitted = np.isfinite(scores)
    # The sweep's folds: stratified, shuffled, seed 0, as scikit-learn makes them.
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(X, y))
    grid = head_grid("svm", y)
    assert frame["params"] == grid
    unskipped = [grid_scores("svm", grid, X[train], y[train], X[val], y[val]) for train, val in folds]
    on_its_own = np.isfinite(np.asarray([scores.scores for scores in unskipped]))
    # Folds 0 and 1 run first (without racing, the first round), the rest after: a point
    # missing from either is missing from every later fold, though some would fit it.
    skipped_early = ~on_its_own[:2].all(axis=0)
    assert on_its_own[2:, skipped_early].any(), "some later fold's own path should reach a skipped C"
    assert not fitted[2:, skipped_early].any()
    for point in np.flatnonzero(fitted.all(axis=0)):
        assert frame["mean_test_score"][point] == np.mean([fold.scores[point] for fold in unskipped])


def test_a_row_stopped_after_one_fold_shows_no_spread():
    from tlp import SweepResult

    rows = [{"layer": "early", "head": "knn", "params": {"k": 10}, "cv_accuracy": 0.9, "cv_std": None, "n_folds": 1},
            {"layer": "mid", "head": "knn", "params": {"k": 10}, "cv_accuracy": 0.99, "cv_std": 0.01, "n_folds": 5}]
    table = SweepResult("m", ["a"], 10, 0, rows, rows[1], n_folds=5, racing=True).table()
    assert "0.900   " in table and "0.900 ±" not in table and "0.990 ± 0.010*" in table
    assert "stopped by racing after 1 of 5 folds" in table
    # One validation split (--val): no row has a spread, and none is padded for one.
    single = [dict(row, cv_std=None, n_folds=1) for row in rows]
    table = SweepResult("m", ["a"], 10, 0, single, single[1], n_folds=1, racing=True).table()
    assert "0.990*" in table and "~" not in table and "±" not in table


def test_fold_task_workers_do_not_import_torch():
    """joblib's workers import the sweep's modules to run fold tasks; without torch they start
    in about 1.5 s instead of 4. The public functions keep their names next to their modules."""
    import subprocess
    import sys

    code = (
        "import sys, tlp, tlp.racing, tlp.heads\n"
        "sweep, result = tlp.sweep, tlp.SweepResult\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]\n"
        "import tlp.finetuning.stage, tlp.plan\n"
        "assert all(callable(f) for f in (tlp.sweep, tlp.run, tlp.finetune, tlp.extract, tlp.advise, tlp.predict))\n"
        "assert tlp.sweep is sweep and 'sweep' in dir(tlp) and tlp.SweepResult is result\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
