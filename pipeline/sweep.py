"""The CPU stage: sweep classical heads over cached layers, honestly.

:func:`sweep` extracts (or reuses) the features, holds out the test part, and fits every
(layer x head x hyperparameter) on the training part only: selection is by stratified
K-fold cross-validation (or one validation split), never by the test part. Each
(layer, head) is then refit with its best parameters on all training data and scored
once on the test part, for the report.

Work is shared wherever the numbers allow: each layer is read from HDF5 once, folds are
the same for every head, preprocessing is fitted once per fold and head family, and
the logistic-regression path is warm-started (see :mod:`pipeline.heads`). Independent
(layer, head, fold) fits run in parallel with joblib.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit, train_test_split

from .cache import FeatureFile
from .errors import TlpInputError
from .extract import ExtractResult, ExtractSettings, extract
from .heads import HEADS, check_heads, grid_scores, head_grid, make_head

__all__ = ["SweepResult", "sweep", "DEFAULT_HEADS"]

logger = logging.getLogger(__name__)

DEFAULT_HEADS = ("softmax", "svm", "mlp", "knn")


@dataclass
class SweepResult:
    """A layer x head table of cross-validated (and test) accuracy, plus the winner."""

    model: str
    classes: list[str]
    n_train: int
    n_test: int
    results: list[dict]  # one per (layer, head): params, cv_accuracy, cv_std, test_accuracy, ...
    best: dict  # the row with the highest cv_accuracy
    timings: dict[str, float] = field(default_factory=dict)
    extract: ExtractResult | None = None

    def to_report(self) -> dict:
        return {
            "case": None,
            "model": self.model,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "best": _public(self.best),
            "results": [_public(row) for row in self.results],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "classes": self.classes,
            "extract": self.extract.to_report() if self.extract else None,
        }

    def table(self) -> str:
        """Layer x head table of CV accuracy (mean +- std); the winner marked with *."""
        from .report import format_table

        layers = list(dict.fromkeys(row["layer"] for row in self.results))
        heads = list(dict.fromkeys(row["head"] for row in self.results))
        cell = {(row["layer"], row["head"]): row for row in self.results}
        rows = []
        for layer in layers:
            values = []
            for head in heads:
                row = cell.get((layer, head))
                mark = "*" if row is self.best else " "
                values.append("" if row is None else f"{row['cv_accuracy']:.3f} ± {row['cv_std']:.3f}{mark}")
            rows.append([layer] + values)
        return format_table(rows, ["layer"] + heads)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["layer", "head", "params", "cv_accuracy", "cv_std", "test_accuracy", "fit_seconds",
                   "n_convergence_warnings"]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.results:
                writer.writerow({**{c: row.get(c) for c in columns}, "params": _params_text(row["params"])})
        return path


def _public(row: dict) -> dict:
    keep = ("layer", "head", "params", "cv_accuracy", "cv_std", "test_accuracy", "fit_seconds",
            "n_convergence_warnings")
    return {k: row[k] for k in keep if k in row}


def _params_text(params: dict) -> str:
    return ";".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------- splits
def _test_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < fraction < 1.0:
        raise TlpInputError(f"--test must be a fraction between 0 and 1 or a data set, got {fraction}")
    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as error:
        raise TlpInputError(f"cannot hold out {fraction} of the data stratified by class ({error}); "
                            "use a smaller --test or add images to small classes") from None
    return np.sort(train), np.sort(test)


def _folds(labels: np.ndarray, cv: int, val: float | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K folds (fewer when a class is tiny, with a warning) or one validation split."""
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    if smallest < 2:
        raise TlpInputError("a class has fewer than 2 training images; cross-validation needs at least 2 per class")
    if val is not None:
        if not 0.0 < val < 1.0:
            raise TlpInputError(f"--val must be a fraction between 0 and 1, got {val}")
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=val, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels))
    if cv < 2:
        raise TlpInputError(f"--cv must be at least 2, got {cv}")
    k = min(cv, smallest)
    if k < cv:
        logger.warning("the smallest class has %d training images: using %d folds instead of %d", smallest, k, cv)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


# ----------------------------------------------------------------------------- fitting
def _fold_task(layer, head, fold_index, X, y, train, val, grid, seed):
    started = time.perf_counter()
    scores, n_warnings = grid_scores(head, grid, X[train], y[train], X[val], y[val], seed)
    return layer, head, fold_index, scores, n_warnings, time.perf_counter() - started


def _refit_task(layer, head, params, X_train, y_train, X_test, y_test, seed):
    started = time.perf_counter()
    estimator = make_head(head, params, seed).fit(X_train, y_train)
    seconds = time.perf_counter() - started
    accuracy = float((estimator.predict(X_test) == y_test).mean()) if X_test is not None and len(X_test) else None
    return layer, head, estimator, accuracy, seconds


def sweep(
    data,
    *,
    test=None,
    heads=DEFAULT_HEADS,
    cv: int = 5,
    val: float | None = None,
    n_jobs: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    settings: ExtractSettings | None = None,
    **extract_options,
) -> SweepResult:
    """Fit every (layer x head x hyperparameter) on cached features and pick the best.

    Parameters
    ----------
    data : str or path
        Training data (folder, CSV, ``digits``); extracted first if not cached.
    test : float, str or path, optional
        A fraction of ``data`` to hold out (stratified, seeded) or a separate data set.
        Never used for selection.
    heads : sequence of str
        Some of ``softmax``, ``svm``, ``mlp``, ``knn``.
    cv, val : int, float
        Stratified K-fold CV (default 5) or, with ``val``, one validation split.
    n_jobs : int, optional
        joblib workers for independent fits (default: all cores).
    out : path, optional
        Folder for ``results.csv`` and the saved winner (``head.joblib`` + ``model.json``,
        which ``tlp predict`` reads).
    settings, **extract_options
        Extraction settings (model, layers, image_size, cache_dir, ...); pooling
        defaults to ``auto`` (grid2 for early and mid, avg elsewhere).

    Returns
    -------
    SweepResult
    """
    heads = check_heads(heads)
    # Sweeps pool early and mid maps on a 2 x 2 grid by default (see pooling.AUTO_POOLING).
    settings = dataclasses.replace(settings or ExtractSettings(pool="auto"), **extract_options).validated()
    started = time.perf_counter()
    extracted = extract(data, settings)
    timings = {"extract_seconds": extracted.seconds}

    mark = time.perf_counter()
    with FeatureFile(extracted.path) as features:
        classes = features.classes
        labels = features.labels
        layers = {name: features.load(name) for name in features.layers}
    test_layers, test_labels = None, None
    if isinstance(test, (int, float)) and not isinstance(test, bool):
        train_idx, test_idx = _test_split(labels, float(test), seed)
    else:
        train_idx, test_idx = np.arange(len(labels)), np.arange(0)
        if test is not None:
            test_layers, test_labels = _load_test_set(test, settings, classes)
    y_train = labels[train_idx]
    y_test = test_labels if test_labels is not None else labels[test_idx]
    n_test = len(y_test)
    folds = _folds(y_train, cv, val, seed)
    grids = {head: head_grid(head, y_train) for head in heads}
    timings["load_seconds"] = time.perf_counter() - mark

    mark = time.perf_counter()
    train_X = {name: values[train_idx] for name, values in layers.items()}
    test_X = {name: (test_layers[name] if test_layers is not None else values[test_idx]) for name, values in layers.items()}
    parallel = Parallel(n_jobs=n_jobs if n_jobs is not None else -1)
    fold_results = parallel(
        delayed(_fold_task)(layer, head, i, train_X[layer], y_train, tr, va, grids[head], seed)
        for layer in train_X for head in heads for i, (tr, va) in enumerate(folds)
    )
    rows = _aggregate(fold_results, grids, list(train_X), heads)
    refits = parallel(
        delayed(_refit_task)(row["layer"], row["head"], row["params"], train_X[row["layer"]], y_train,
                             test_X[row["layer"]], y_test, seed)
        for row in rows
    )
    estimators = {}
    for (layer, head, estimator, accuracy, seconds), row in zip(refits, rows):
        row["test_accuracy"], row["fit_seconds"] = accuracy, round(seconds, 4)
        estimators[(layer, head)] = estimator
    timings["sweep_seconds"] = time.perf_counter() - mark
    best = max(rows, key=lambda row: row["cv_accuracy"])  # first of equals: earlier layer, listed head
    timings["total_seconds"] = time.perf_counter() - started
    result = SweepResult(
        model=extracted.model, classes=classes, n_train=len(y_train), n_test=n_test,
        results=rows, best=best, timings=timings, extract=extracted,
    )
    if out is not None:
        result.to_csv(Path(out) / "results.csv")
        _write_plots(result, Path(out), estimators, test_X, y_test)
        from .predict import save_head

        with FeatureFile(extracted.path) as features:
            save_head(out, estimators[(best["layer"], best["head"])], head=best["head"], params=best["params"],
                      layer=best["layer"], extract_result=extracted, settings=settings, features_file=features)
    return result


def _write_plots(result: SweepResult, out: Path, estimators, test_X, y_test) -> None:
    """accuracy_by_depth.png always; confusion_matrix.png of the winner when there is a test part."""
    from .plots import plot_accuracy_by_depth, plot_confusion_matrix

    plot_accuracy_by_depth(result.results, out / "accuracy_by_depth.png", title=f"{result.model}: CV accuracy by depth")
    if len(y_test):
        best = result.best
        predicted = estimators[(best["layer"], best["head"])].predict(test_X[best["layer"]])
        plot_confusion_matrix(y_test, predicted, result.classes, out / "confusion_matrix.png",
                              title=f"{best['head']} on {best['layer']}, test part")


def _aggregate(fold_results, grids, layers, heads) -> list[dict]:
    """Mean/std over folds per grid point; the best point per (layer, head)."""
    scores: dict[tuple[str, str], list[list[float]]] = {}
    warnings_count: dict[tuple[str, str], int] = {}
    seconds: dict[tuple[str, str], float] = {}
    for layer, head, _fold, fold_scores, n_warnings, fold_seconds in fold_results:
        scores.setdefault((layer, head), []).append(fold_scores)
        warnings_count[(layer, head)] = warnings_count.get((layer, head), 0) + n_warnings
        seconds[(layer, head)] = seconds.get((layer, head), 0.0) + fold_seconds
    rows = []
    for layer in layers:
        for head in heads:
            matrix = np.asarray(scores[(layer, head)])  # (folds, grid)
            means = matrix.mean(axis=0)
            best = int(np.argmax(means))  # first maximum: the most regularised of equals
            rows.append({
                "layer": layer,
                "head": head,
                "params": grids[head][best],
                "cv_accuracy": round(float(means[best]), 5),
                "cv_std": round(float(matrix[:, best].std()), 5),
                "grid_size": len(grids[head]),
                "cv_seconds": round(seconds[(layer, head)], 4),
                "n_convergence_warnings": warnings_count[(layer, head)],
            })
    return rows


def _load_test_set(test, settings: ExtractSettings, classes: list[str]):
    """Extract a separate test set with the same settings; map its labels by class name."""
    extracted = extract(test, settings)
    with FeatureFile(extracted.path) as features:
        unknown = sorted(set(features.classes) - set(classes))
        if unknown:
            raise TlpInputError(
                f"test data {str(test)!r} has classes not in the training data: {', '.join(unknown[:5])}; "
                "use the same class names"
            )
        position = {name: i for i, name in enumerate(classes)}
        labels = np.asarray([position[features.classes[label]] for label in features.labels])
        layers = {name: features.load(name) for name in features.layers}
    return layers, labels
