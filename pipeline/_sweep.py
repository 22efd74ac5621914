"""The CPU stage: sweep classical heads over cached layers, honestly.

:func:`sweep` takes images (extracted first, or read from the cache), a cache file, or
feature arrays; holds out the test part; and fits every (layer x head x hyperparameter)
on the training part only: selection is by stratified K-fold cross-validation (or one
validation split), never by the test part. The winner is refit with its best
parameters on all training data and scored once on the test part, as is every other
(layer, head) that ran every fold, for the report.

Work is shared wherever the numbers allow: each layer is read from HDF5 once, folds are
the same for every head, preprocessing is fitted once per fold and head family, the
logistic-regression path is warm-started coarse-to-fine, and grids are scored in
cheaper equivalent forms (precomputed RBF kernels, linear models on the training rows'
span; see :mod:`tlp.heads`). Work is skipped only where it cannot matter: racing (see
:mod:`tlp.racing`) stops a (layer, head) that is clearly behind the leader after a fold
or more (its row says how many, and it is not refit: no test accuracy), and a later
fold skips grid points an earlier fold left out (they can no longer be selected).

Nothing here imports torch at module level (extraction is imported where it runs).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import as_dataset, require_classes, require_labels, split, stratified_split
from .dataset import Dataset
from .errors import TlpInputError
from .featurefile import FeatureFile
from .files import write_text
from .heads import head_grid
from .racing import RACE_FOLDS, RACE_MIN_GAP, RACE_Z, Cell, Problem, cv_folds, run_cells
from .settings import DEFAULT_HEADS, ExtractSettings, SweepSettings, route_options

if TYPE_CHECKING:
    from ._extract import ExtractResult

__all__ = ["SweepResult", "sweep", "DEFAULT_HEADS"]

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """A layer x head table of cross-validated (and test) accuracy, plus the winner."""

    model: str
    classes: list[str]
    n_train: int
    n_test: int
    results: list[dict]  # one per (layer, head): params, cv_accuracy, cv_std, n_folds, test_accuracy, ...
    best: dict  # the row with the highest cv_accuracy among those that ran every fold
    timings: dict[str, float] = field(default_factory=dict)
    extract: ExtractResult | None = None  # the training part's extraction (None for arrays and cache files)
    n_folds: int = 0  # folds (or 1 validation split) every row would run without racing
    racing: bool = False  # whether rows behind could stop early
    cv_results: dict[str, list] = field(default_factory=dict, repr=False)  # per grid point, see _cv_results
    best_estimator: object = field(default=None, repr=False)  # the winner's plain pipeline, fitted on all training rows

    def __repr__(self) -> str:
        best = self.best
        test = "" if best.get("test_accuracy") is None else f", test {best['test_accuracy']:.4f}"
        return (f"SweepResult({self.model}: {self.n_train} training, {self.n_test} test rows, "
                f"{self.n_folds}-fold CV)\n{self.table()}\n"
                f"best: {best['head']} on {best['layer']} {best['params']}, CV {best['cv_accuracy']:.4f}{test}")

    def to_frame(self):
        """Every grid point of every (layer, head) as a pandas DataFrame, in the spirit of
        scikit-learn's ``cv_results_``: ``layer``, ``head``, ``params`` and one
        ``param_NAME`` column per parameter (full precision), ``split{k}_test_score`` per
        fold (NaN where racing stopped the row or a path skipped the point),
        ``mean_test_score``, ``std_test_score`` (over the folds the point ran),
        ``n_splits_run`` and ``rank_test_score`` (1 = the winner's point; points that did
        not run every fold rank last)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("SweepResult.to_frame() needs pandas, which is not installed: pip install pandas "
                              "(SweepResult.cv_results holds the same columns as a dict of lists)") from None
        return pandas.DataFrame(self.cv_results)

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
            "cv_folds": self.n_folds,
            "racing": {"enabled": self.racing, "first_folds": RACE_FOLDS, "z": RACE_Z, "min_gap": RACE_MIN_GAP},
            "extract": self.extract.to_report() if self.extract else None,
        }

    def table(self) -> str:
        """Layer x head table of CV accuracy (mean +- std); the winner marked with *, rows
        that racing stopped early with ~ (and a legend line under the table)."""
        from .report import format_table

        layers = list(dict.fromkeys(row["layer"] for row in self.results))
        heads = list(dict.fromkeys(row["head"] for row in self.results))
        cell = {(row["layer"], row["head"]): row for row in self.results}
        rows = []
        spread = any(row["cv_std"] is not None for row in self.results)  # else one split: no ± at all
        for layer in layers:
            values = []
            for head in heads:
                row = cell.get((layer, head))
                mark = "*" if row is self.best else "~" if row is not None and self._stopped(row) else " "
                values.append("" if row is None else f"{_accuracy_text(row, spread)}{mark}")
            rows.append([layer] + values)
        table = format_table(rows, ["layer"] + heads)
        stopped = sorted({row["n_folds"] for row in self.results if self._stopped(row)})
        if stopped:
            table += (f"\n~ stopped by racing after {' or '.join(map(str, stopped))} of {self.n_folds} folds, "
                      "clearly behind the best (mean over the folds run; --no-racing runs them all)")
        return table

    def _stopped(self, row: dict) -> bool:
        return row.get("n_folds", self.n_folds) < self.n_folds

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["layer", "head", "params", "cv_accuracy", "cv_std", "n_folds", "test_accuracy", "fit_seconds",
                   "n_convergence_warnings"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.results:
            writer.writerow({**{c: row.get(c) for c in columns}, "params": _params_text(row["params"])})
        return write_text(path, buffer.getvalue())


def _accuracy_text(row: dict, spread: bool) -> str:
    """Mean ± std over the folds a row ran; a single fold (or --val split) has no spread,
    and is padded to line up with the rows that have one when the table shows any."""
    if row["cv_std"] is None:
        return f"{row['cv_accuracy']:.3f}" + (" " * 8 if spread else "")
    return f"{row['cv_accuracy']:.3f} ± {row['cv_std']:.3f}"


def _public(row: dict) -> dict:
    keep = ("layer", "head", "params", "cv_accuracy", "cv_std", "n_folds", "test_accuracy", "fit_seconds",
            "n_convergence_warnings")
    return {k: row[k] for k in keep if k in row}


def _params_text(params: dict) -> str:
    return ";".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def sweep(data, settings: SweepSettings | None = None, *, test=None, out: str | Path | None = None,
          extraction: ExtractSettings | None = None, **overrides) -> SweepResult:
    """Fit every (layer x head x hyperparameter) on features of ``data`` and pick the best by CV.

    Parameters
    ----------
    data : Dataset, str, path, cache file or (X, y)
        Images (a folder, CSV, built-in name or scanned Dataset; extracted first if not
        cached), a finished cache file (``.h5``), or feature arrays ``(X, y)`` where ``X``
        is (N, D) or a dict ``{layer: (N, D)}``.
    settings : SweepSettings, optional
        Heads, ``cv``/``val``, ``n_jobs``, ``seed``, ``racing``; keyword ``overrides``
        set single fields of SweepSettings or, for images, of ExtractSettings (``heads=["knn"]``,
        ``image_size=96``).
    test : float, int, Dataset, str, path or (X, y), optional
        The test part: a fraction or count of ``data`` (stratified, seeded) or separate
        data of the same kind as ``data``. Never used for selection.
    out : path, optional
        Folder for ``results.csv``, ``accuracy_by_depth.png``, ``confusion_matrix.png``
        and, for images and cache files, the saved winner (``head-<sha12>.skops`` +
        ``model.json``, which ``tlp predict`` reads; replaced atomically, see :mod:`tlp.saved`).
    extraction : ExtractSettings, optional
        How images are extracted (pooling defaults to ``auto``: grid2 for early and mid).

    Returns
    -------
    SweepResult
    """
    if isinstance(settings, ExtractSettings):  # the spelling of 0.1: sweep(data, settings=ExtractSettings(...))
        settings, extraction = None, settings
    routed = route_options(overrides, (SweepSettings, ExtractSettings), "sweep()")
    settings = dataclasses.replace(settings or SweepSettings(), **routed[SweepSettings]).validated()
    extraction = dataclasses.replace(extraction or ExtractSettings(pool="auto"), **routed[ExtractSettings])
    started = time.perf_counter()
    inputs = _inputs(data, test, settings, extraction)
    timings = {"extract_seconds": inputs.extract_seconds, "load_seconds": time.perf_counter() - started}

    mark = time.perf_counter()
    train, held = inputs.train, inputs.test
    folds = cv_folds(train.labels, settings.cv, settings.val, settings.seed)
    grids = {head: head_grid(head, train.labels) for head in settings.heads}
    cells = [Cell(layer, head, grids[head]) for layer in train.layers for head in settings.heads]
    problem = Problem(train.layers, train.labels, held.layers, held.labels, folds, settings.seed)
    logger.debug("sweeping %d layers x %d heads on %d training rows, %d folds", len(train.layers),
                 len(settings.heads), len(train.labels), len(folds))
    from joblib import Parallel

    # One task per call keeps the longest-first order; the pool lives across the rounds.
    with Parallel(n_jobs=settings.n_jobs if settings.n_jobs is not None else -1, batch_size=1,
                  return_as="generator") as parallel:
        winner, refits = run_cells(parallel, cells, problem, racing=settings.racing, progress=settings.progress)
    rows = []
    for cell in cells:
        _estimator, accuracy, seconds = refits.get(cell.key, (None, None, None))
        rows.append({**_row(cell), "test_accuracy": accuracy,
                     "fit_seconds": None if seconds is None else round(seconds, 4)})
    timings["sweep_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started
    result = SweepResult(
        model=inputs.model, classes=train.classes, n_train=len(train.labels), n_test=len(held.labels), results=rows,
        best=rows[cells.index(winner)], timings=timings, extract=inputs.extract, n_folds=len(folds),
        racing=settings.racing, cv_results=_cv_results(cells, len(folds)),
        best_estimator=refits[winner.key][0],
    )
    if out is not None:
        _write_outputs(result, Path(out), held, inputs)
    return result


# ----------------------------------------------------------------------------- inputs
@dataclass
class _Features:
    layers: dict[str, np.ndarray]  # layer -> (N, D) float32
    labels: np.ndarray  # (N,) class indices
    classes: list[str]
    paths: list[str] | None = None  # the image of each row, for features read from a cache file

    def rows(self, positions) -> "_Features":
        paths = None if self.paths is None else [self.paths[i] for i in positions]
        return _Features({k: v[positions] for k, v in self.layers.items()}, self.labels[positions], self.classes,
                         paths)

    def part(self, dataset: Dataset) -> "_Features":
        """The rows of ``dataset``'s images, in its order (an image that could not be
        decoded has no row and is left out)."""
        row = {path: i for i, path in enumerate(self.paths)}
        return self.rows(np.asarray([row[item.path] for item in dataset.items if item.path in row], dtype=np.int64))


@dataclass
class _Inputs:
    train: _Features
    test: _Features  # empty (0 rows) without a test part
    model: str  # the network's name, as the cache file records it
    cache_file: Path | None = None  # the training features' cache file: what a saved winner names
    model_option: str | None = None  # the --model that made them (None: as recorded)
    weights: str | None = None  # the --weights that made them
    extract: ExtractResult | None = None
    extract_seconds: float = 0.0


def _from_file(path) -> tuple[_Features, dict]:
    """A cache file's layers, labels and classes, and its root attributes."""
    with FeatureFile(path) as features:
        loaded = _Features({name: features.load(name) for name in features.layers}, features.labels,
                           features.classes, features.paths)
        return loaded, features.attrs


def _from_arrays(pair, classes=None) -> _Features:
    try:
        X, y = pair
    except (TypeError, ValueError):
        raise TlpInputError("feature data must be a pair (X, y): X (N, D) or {layer: (N, D)}, y (N,)") from None
    layers = {k: np.asarray(v, dtype=np.float32) for k, v in (X.items() if isinstance(X, dict) else {"features": X}.items())}
    y = np.asarray(y)
    if any(v.ndim != 2 or len(v) != len(y) for v in layers.values()):
        raise TlpInputError(f"X must be (N, D) with N = len(y) = {len(y)}, got shapes "
                            f"{', '.join(str(v.shape) for v in layers.values())}")
    names = [str(c) for c in np.unique(y)] if classes is None else classes
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in y} - set(position))
    if unknown:
        raise TlpInputError(f"test labels {', '.join(unknown[:5])} are not among the training labels")
    return _Features(layers, np.asarray([position[str(v)] for v in y], dtype=np.int64), names)


def _is_cache_file(data) -> bool:
    return isinstance(data, (str, Path)) and str(data).endswith(".h5") and Path(data).is_file()


def _held_out(train: _Features, test, seed: int) -> tuple[_Features, _Features]:
    """A fraction or count of feature rows held out (the stratified split images get)."""
    if test is None:
        return train, train.rows(np.arange(0))
    if isinstance(test, bool) or not isinstance(test, (int, float, np.integer, np.floating)):
        raise TlpInputError(f"with features as data, test must be a fraction, a count, (X_test, y_test) or a "
                            f"cache file, got {test!r}")
    kept, held = stratified_split(train.labels, test, seed, "test")
    return train.rows(kept), train.rows(held)


def _inputs(data, test, settings: SweepSettings, extraction: ExtractSettings) -> _Inputs:
    if not (isinstance(data, tuple) or _is_cache_file(data)):
        return _extracted(data, test, settings, extraction)
    if isinstance(data, tuple):
        whole, model, weights, cache_file = _from_arrays(data), "features", None, None
    else:
        whole, attrs = _from_file(data)
        model, cache_file = attrs["model"], Path(data)
        weights = "none" if attrs["weights_id"] == "none" else None  # a weights file's path is not recorded
    if isinstance(test, tuple):
        train, held = whole, _from_arrays(test, whole.classes)
    elif _is_cache_file(test):
        other, _ = _from_file(test)
        train, held = whole, _Features(other.layers, _by_name(other, whole.classes, test), whole.classes)
    else:
        train, held = _held_out(whole, test, settings.seed)
    require_labels(train.labels, train.classes,
                   "the feature rows have labels" if cache_file is None else f"cache file {str(cache_file)!r} has rows")
    return _Inputs(train, held, model, cache_file, weights)


def _by_name(features: _Features, classes: list[str], source) -> np.ndarray:
    from .data import labels_by_class_name

    return labels_by_class_name(features.labels, features.classes, classes, source)


def _extracted(data, test, settings: SweepSettings, extraction: ExtractSettings) -> _Inputs:
    """Images: split once (see tlp.data.split), then extract (or reuse) what the parts need.

    When the two parts are the whole of one scanned data set (``--test FRACTION``, or the
    parts ``run`` hands on), that data set is extracted as one cache file and each part
    takes its rows from it; otherwise each part is extracted on its own.
    """
    from ._extract import extract

    extraction = extraction.validated()
    dataset = as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    training, test_part = split(dataset, test, settings.seed, on_error=extraction.on_error,
                                max_pixels=extraction.max_pixels)
    require_classes(training)
    whole = _whole_of(training, test_part)
    result = extract(whole if whole is not None else training, extraction)
    features, _ = _from_file(result.path)
    seconds = result.seconds
    if whole is not None:
        train, held = features.part(training), features.part(test_part)
    else:
        train, held = features, features.rows(np.arange(0))
        if test_part is not None:
            held_result = extract(test_part, extraction)
            held, _ = _from_file(held_result.path)
            seconds += held_result.seconds
    return _Inputs(train, held, result.model, cache_file=result.path, model_option=extraction.model,
                   weights=extraction.weights, extract=result, extract_seconds=seconds)


def _whole_of(training: Dataset, test_part: Dataset | None) -> Dataset | None:
    """The scanned data set that the two parts together make up, if they do."""
    source = training.source
    if test_part is None or source is None or test_part.source is not source:
        return None
    return source if sorted(training.origin + test_part.origin) == list(range(len(source.items))) else None


# ----------------------------------------------------------------------------- results
def _row(cell: Cell) -> dict:
    """A cell's result: its best point, mean and std over the folds it ran."""
    matrix = np.asarray([cell.folds[f].scores for f in sorted(cell.folds)])  # (folds, grid)
    best = cell.best()
    return {
        "layer": cell.layer,
        "head": cell.head,
        "params": cell.grid[best],
        "cv_accuracy": round(float(matrix[:, best].mean()), 5),
        "cv_std": round(float(matrix[:, best].std()), 5) if len(matrix) > 1 else None,
        "n_folds": len(cell.folds),
        "grid_size": len(cell.grid),
        "cv_seconds": round(cell.seconds, 4),
        "n_convergence_warnings": sum(scores.n_warnings for scores in cell.folds.values()),
    }


def _cv_results(cells: list[Cell], n_folds: int) -> dict[str, list]:
    """One entry per (layer, head, grid point); see SweepResult.to_frame."""
    columns: dict[str, list] = {"layer": [], "head": [], "params": []}
    names = sorted({name for cell in cells for point in cell.grid for name in point})
    columns.update({f"param_{name}": [] for name in names})
    columns.update({f"split{k}_test_score": [] for k in range(n_folds)})
    columns.update({"mean_test_score": [], "std_test_score": [], "n_splits_run": []})
    for cell in cells:
        scores = np.full((n_folds, len(cell.grid)), np.nan)
        for fold, grid in cell.folds.items():
            scores[fold] = np.where(np.isfinite(grid.scores), grid.scores, np.nan)
        for index, point in enumerate(cell.grid):
            run = scores[:, index][np.isfinite(scores[:, index])]
            columns["layer"].append(cell.layer)
            columns["head"].append(cell.head)
            columns["params"].append(dict(point))
            for name in names:
                columns[f"param_{name}"].append(point.get(name))
            for k in range(n_folds):
                columns[f"split{k}_test_score"].append(float(scores[k, index]))
            columns["mean_test_score"].append(float(run.mean()) if len(run) else float("nan"))
            columns["std_test_score"].append(float(run.std()) if len(run) else float("nan"))
            columns["n_splits_run"].append(int(len(run)))
    # Points that ran every fold, best mean first, first of equals first: as the winner is chosen.
    complete = [i for i, n in enumerate(columns["n_splits_run"]) if n == n_folds]
    rank = {i: place for place, i in enumerate(sorted(complete, key=lambda i: -columns["mean_test_score"][i]), 1)}
    columns["rank_test_score"] = [rank.get(i, len(complete) + 1) for i in range(len(columns["layer"]))]
    return columns


def _write_outputs(result: SweepResult, out: Path, held: _Features, inputs: _Inputs) -> None:
    """results.csv, accuracy_by_depth.png, the winner's confusion_matrix.png (with a test
    part) and, when the features came from images, the saved winner for ``tlp predict``."""
    from .plots import plot_accuracy_by_depth, plot_confusion_matrix
    from .saved import save_head

    result.to_csv(out / "results.csv")
    plot_accuracy_by_depth(result.results, out / "accuracy_by_depth.png", title=f"{result.model}: CV accuracy by depth")
    best = result.best
    if len(held.labels):
        predicted = result.best_estimator.predict(held.layers[best["layer"]])
        plot_confusion_matrix(held.labels, predicted, result.classes, out / "confusion_matrix.png",
                              title=f"{best['head']} on {best['layer']}, test part")
    if inputs.cache_file is None:
        logger.info("features given as arrays: no model.json for `tlp predict` "
                                         "(the winner is SweepResult.best_estimator)")
        return
    with FeatureFile(inputs.cache_file) as features:
        save_head(out, result.best_estimator, head=best["head"], params=best["params"], layer=best["layer"],
                  features=features, model=inputs.model_option or inputs.model, weights=inputs.weights)
