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

import contextlib
import csv
import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .candidates import Candidate, Part, distinct
from .featurefile import FeatureFile
from .files import write_text
from .heads import head_grid
from .racing import RACE_FOLDS, RACE_MIN_GAP, RACE_P, RACE_Z, Cell, one_blas_thread, Problem, cv_folds, run_cells
from .scheduler import fit_backend, scheduler_address
from .settings import DEFAULT_HEADS, ExtractSettings, SweepSettings, route_options
from .sweepinputs import Features, Inputs, sweep_inputs

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
    other_extracts: list = field(default_factory=list)  # other networks' extractions (fused candidates)
    n_folds: int = 0  # folds (or 1 validation split) every row would run without racing
    racing: bool = False  # whether rows behind could stop early
    cv_results: dict[str, list] = field(default_factory=dict, repr=False)  # per grid point, see _cv_results
    best_estimator: object = field(default=None, repr=False)  # the winner's plain pipeline, fitted on all training rows
    inputs: Inputs | None = field(default=None, repr=False, compare=False)  # the features swept

    def save(self, out: str | Path, *, tables: bool = True) -> None:
        """Write what ``sweep(out=...)`` writes: results.csv and the plots (unless
        ``tables=False``) and the saved winner."""
        _write_outputs(self, Path(out), self.inputs.test, self.inputs, tables=tables)

    def holdout_accuracy(self, train_paths, val_paths, seed: int = 0) -> float:
        """The winner (its layer, head and parameters) refit on the training rows of
        ``train_paths`` and scored on those of ``val_paths``: how ``tlp run`` compares it
        with a fine-tuned network on the same validation images."""
        return self.holdout_scores(train_paths, val_paths, seed).accuracy

    def holdout_scores(self, train_paths, val_paths, seed: int = 0):
        """As :meth:`holdout_accuracy`, the class probabilities of each validation image
        (a :class:`tlp.ensemble.Scored`; images without features are left out)."""
        from .ensemble import Scored, head_probabilities
        from .heads import make_head

        features = self.inputs.train
        row = {path: i for i, path in enumerate(features.paths or ())}
        fit = np.asarray([row[p] for p in train_paths if p in row], dtype=np.int64)
        score = np.asarray([row[p] for p in val_paths if p in row], dtype=np.int64)
        X, y = features.layers[self.best["layer"]], features.labels
        with one_blas_thread():
            estimator = make_head(self.best["head"], self.best["params"], seed).fit(X[fit], y[fit])
            probabilities = head_probabilities(estimator, X[score], len(self.classes))
        return Scored([features.paths[i] for i in score], y[score], probabilities, list(self.classes))

    def test_scores(self):
        """The saved winner's class probabilities on the test part (a
        :class:`tlp.ensemble.Scored`), or None without a test part of images."""
        from .ensemble import Scored, head_probabilities

        held = self.inputs.test if self.inputs is not None else None
        if held is None or not len(held.labels) or held.paths is None:
            return None
        probabilities = head_probabilities(self.best_estimator, held.layers[self.best["layer"]], len(self.classes))
        return Scored(list(held.paths), held.labels, probabilities, list(self.classes))

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
            "racing": {"enabled": self.racing, "first_folds": RACE_FOLDS, "z": round(RACE_Z, 4), "p": RACE_P,
                       "min_gap": RACE_MIN_GAP},
            "extract": self.extract.to_report() if self.extract else None,
            **({"other_extracts": [r.to_report() for r in self.other_extracts]} if self.other_extracts else {}),
        }

    def table(self) -> str:
        """Layer x head table of CV accuracy (mean +- std); the winner marked with *, rows
        that racing stopped early with ~ (and a legend line under the table)."""
        from .report import format_table

        layers = list(dict.fromkeys(row["layer"] for row in self.results))
        heads = list(dict.fromkeys(row["head"] for row in self.results))
        cell = {(row["layer"], row["head"]): row for row in self.results}
        same_as = {row["layer"]: row.get("same_as") or [] for row in self.results}
        rows = []
        spread = any(row["cv_std"] is not None for row in self.results)  # else one split: no ± at all
        for layer in layers:
            values = []
            for head in heads:
                row = cell.get((layer, head))
                mark = "*" if row is self.best else "~" if row is not None and self._stopped(row) else " "
                values.append("" if row is None else f"{_accuracy_text(row, spread)}{mark}")
            rows.append([" = ".join([layer, *same_as[layer]])] + values)
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
            "n_convergence_warnings", "same_as")
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
    inputs = sweep_inputs(data, test, settings, extraction)
    timings = {"extract_seconds": inputs.extract_seconds, "load_seconds": time.perf_counter() - started}

    mark = time.perf_counter()
    train, held = inputs.train, inputs.test
    stands_for = distinct(train.layers, held.layers)  # identical candidates are swept once
    train.layers = {name: train.layers[name] for name in stands_for}
    held.layers = {name: held.layers[name] for name in stands_for}
    folds = cv_folds(train.labels, settings.cv, settings.val, settings.seed)
    grids = {head: head_grid(head, train.labels) for head in settings.heads}
    cells = [Cell(layer, head, grids[head]) for layer in train.layers for head in settings.heads]
    problem = Problem(train.layers, train.labels, held.layers, held.labels, folds, settings.seed)
    logger.debug("sweeping %d layers x %d heads on %d training rows, %d folds", len(train.layers),
                 len(settings.heads), len(train.labels), len(folds))
    from joblib import Parallel

    # One task per call keeps the longest-first order; the pool lives across the rounds.
    arrays = [*problem.train_X.values(), *problem.test_X.values()]
    with fit_backend(scheduler_address(settings.scheduler), arrays), \
            Parallel(n_jobs=settings.n_jobs if settings.n_jobs is not None else -1, batch_size=1,
                     return_as="generator") as parallel:
        winner, refits = run_cells(parallel, cells, problem, racing=settings.racing, progress=settings.progress)
    rows = []
    for cell in cells:
        _estimator, accuracy, seconds = refits.get(cell.key, (None, None, None))
        rows.append({**_row(cell), "same_as": stands_for[cell.layer], "test_accuracy": accuracy,
                     "fit_seconds": None if seconds is None else round(seconds, 4)})
    timings["sweep_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started
    result = SweepResult(
        model=inputs.model, classes=train.classes, n_train=len(train.labels), n_test=len(held.labels), results=rows,
        best=rows[cells.index(winner)], timings=timings, extract=inputs.extract,
        other_extracts=inputs.other_extracts, n_folds=len(folds), racing=settings.racing,
        cv_results=_cv_results(cells, len(folds)),
        best_estimator=refits[winner.key][0], inputs=inputs,
    )
    if out is not None:
        _write_outputs(result, Path(out), held, inputs)
    return result


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


def _write_outputs(result: SweepResult, out: Path, held: Features, inputs: Inputs, tables: bool = True) -> None:
    """results.csv, accuracy_by_depth.png, the winner's confusion_matrix.png (with a test
    part) and, when the features came from images, the saved winner for ``tlp predict``."""
    from .plots import plot_accuracy_by_depth, plot_confusion_matrix
    from .saved import HeadPart, save_head

    best = result.best
    if tables:
        result.to_csv(out / "results.csv")
        plot_accuracy_by_depth(result.results, out / "accuracy_by_depth.png",
                               title=f"{result.model}: CV accuracy by depth")
    if len(held.labels):
        predicted = result.best_estimator.predict(held.layers[best["layer"]])
        plot_confusion_matrix(held.labels, predicted, result.classes, out / "confusion_matrix.png",
                              title=f"{best['head']} on {best['layer']}, test part")
    if inputs.cache_file is None:
        logger.info("features given as arrays: no model.json for `tlp predict` "
                                         "(the winner is SweepResult.best_estimator)")
        return
    candidate = next((c for c in inputs.candidates or () if c.name == best["layer"]),
                     Candidate(best["layer"], (Part(None, best["layer"]),)))
    with contextlib.ExitStack() as stack:
        parts = []
        for part in candidate.parts:
            source = inputs.sources[part.model]
            features = stack.enter_context(FeatureFile(source.cache_file))
            parts.append(HeadPart(part.layer, features, source.model, source.weights))
        save_head(out, result.best_estimator, head=best["head"], params=best["params"], layer=best["layer"],
                  parts=parts)
