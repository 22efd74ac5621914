"""The CPU stage: sweep classical heads over cached layers, honestly.

:func:`sweep` extracts (or reuses) the features, holds out the test part, and fits every
(layer x head x hyperparameter) on the training part only: selection is by stratified
K-fold cross-validation (or one validation split), never by the test part. Each
(layer, head) is then refit with its best parameters on all training data and scored
once on the test part, for the report.

Work is shared wherever the numbers allow: each layer is read from HDF5 once, folds are
the same for every head, preprocessing is fitted once per fold and head family, the
logistic-regression path is warm-started coarse-to-fine, and grids are scored in
cheaper equivalent forms (precomputed RBF kernels, linear models on the training rows'
span; see :mod:`pipeline.heads`). Work is skipped only where it cannot matter: racing
(see RACE_Z) stops a (layer, head) that is clearly behind the leader after a fold or
more (its row says how many, and it is not refit: no test accuracy), a later fold skips
grid points an earlier fold left out (they can no longer be selected), and only the
winner is refit as the plain pipeline that is saved; the other rows that ran every fold
get their test accuracy from the scoring form. Independent (layer, head, fold) tasks
run in parallel with joblib, round by round, longest first.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import itertools
import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from .cache import FeatureFile
from .errors import TlpInputError
from .heads import HEADS, GridScores, check_heads, grid_scores, head_grid, make_head

if TYPE_CHECKING:
    from .extract import ExtractResult, ExtractSettings

# Nothing here imports torch at module level (extraction is imported where it runs):
# joblib's workers import this module for the fold tasks, and should not pay for torch.

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
    results: list[dict]  # one per (layer, head): params, cv_accuracy, cv_std, n_folds, test_accuracy, ...
    best: dict  # the row with the highest cv_accuracy among those that ran every fold
    timings: dict[str, float] = field(default_factory=dict)
    extract: ExtractResult | None = None
    n_folds: int = 0  # folds (or 1 validation split) every row would run without racing
    racing: bool = False  # whether rows behind could stop early

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
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.results:
                writer.writerow({**{c: row.get(c) for c in columns}, "params": _params_text(row["params"])})
        return path


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


# ----------------------------------------------------------------------------- splits
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


# ----------------------------------------------------------------------------- racing
# Racing across folds (successive elimination, the idea of Hoeffding races and of
# scikit-learn's HalvingGridSearchCV, spent on folds instead of samples): every (layer,
# head) runs its folds one round at a time, from the first fold on; after each round, a row
# that is clearly behind the leader on the validation samples both have seen stops, so a
# clear loser costs one fold, not five. "Clearly": a paired
# test on the same samples (McNemar's, continuity-corrected: z = (b - c - 1) / sqrt(b + c),
# b = samples only the leader got right, c = only the row), each row at its own best grid
# point, with z >= RACE_Z and the mean accuracy RACE_MIN_GAP or more below the leader's.
# z = 3.5 is one-sided p = 2e-4 per comparison, small against the ~30 comparisons of a
# sweep and the leader's head start from being the best of ~12 rows; the gap keeps large
# data sets, where small differences are significant, from stopping rows within noise of
# the folds. RACE_FOLDS folds are the fewest a row runs before it can stop: one fold of a
# few hundred validation samples already needs ~15 more samples against the row than for
# it to reach z 3.5. On digits (898 training images, 5 folds, 180 validation samples per
# fold) late svm, mlp and knn stop after 1 fold, late softmax after 2, early mlp and knn
# after 3; the others run every fold.
RACE_FOLDS = 1
# Folds of a warm-started path's coarse pass that place its fine centre (their mean), and
# the rounds that run one fold each (so the second fold also tells later folds which grid
# points both skipped, see _fold_jobs).
CENTRE_FOLDS = 2
RACE_Z = 3.5
RACE_MIN_GAP = 0.02


@dataclass
class _Cell:
    """One (layer, head) during the sweep: its folds so far and whether it still runs."""

    layer: str
    head: str
    grid: list[dict]
    folds: dict[int, GridScores] = field(default_factory=dict)
    seconds: float = 0.0  # CPU seconds of its fold tasks, summed
    n_tasks: int = 0
    center: int | None = None  # a warm-started path's fine centre, fixed after CENTRE_FOLDS folds
    coarse_only: list[int] = field(default_factory=list)  # path folds still waiting for their fine phase
    stopped: bool = False  # stopped by the race: no further folds
    z: float = 0.0  # its last race statistic against the leader

    @property
    def key(self) -> tuple[str, str]:
        return self.layer, self.head

    def means(self, n: int | None = None) -> np.ndarray:
        """Mean validation accuracy per grid point over the first ``n`` folds (default: all
        it ran); -inf where a point was not fitted on every one of them."""
        return np.asarray([self.folds[f].scores for f in sorted(self.folds)[:n]]).mean(axis=0)

    def best(self, n: int | None = None) -> int:
        return int(np.argmax(self.means(n)))  # first maximum: the most regularised of equals

    def correct(self, n: int) -> np.ndarray:
        """Per-sample correctness of the best point over the first ``n`` folds, in fold order."""
        best = self.best(n)
        return np.concatenate([self.folds[f].correct[best] for f in sorted(self.folds)[:n]])

    def task_seconds(self) -> float:
        return self.seconds / max(1, self.n_tasks)


def _race(active: list[_Cell], n_folds: int) -> tuple[_Cell, list[_Cell]]:
    """The leader and the cells clearly behind it, on the folds every active cell ran.

    Only cells with folds left to run are tested (and get ``z``); a cell that ran every
    fold has nothing left to save.
    """
    n = min(len(cell.folds) for cell in active)
    leader = max(active, key=lambda cell: cell.means(n).max())
    leading, leader_accuracy = leader.correct(n), leader.means(n).max()
    behind = []
    for cell in active:
        if cell is leader or len(cell.folds) == n_folds:
            continue
        correct = cell.correct(n)
        only_leader, only_cell = int(np.sum(leading & ~correct)), int(np.sum(~leading & correct))
        cell.z = (only_leader - only_cell - 1) / np.sqrt(only_leader + only_cell) if only_leader + only_cell else 0.0
        if cell.z >= RACE_Z and leader_accuracy - cell.means(n).max() >= RACE_MIN_GAP:
            behind.append(cell)
    return leader, behind


def _first_folds(n_folds: int, racing: bool) -> list[int]:
    """The folds every cell runs in the first round: RACE_FOLDS when racing, else
    CENTRE_FOLDS (nothing to decide before a path's centre)."""
    return list(range(min(n_folds, RACE_FOLDS if racing else CENTRE_FOLDS)))


def _next_folds(cell: _Cell, n_folds: int, racing: bool) -> list[int]:
    """The folds a running cell runs in the next round.

    One fold at a time up to CENTRE_FOLDS, and after that while the race could still
    stop the cell: its z, growing as the square root of the samples seen at a constant
    gap, would reach RACE_Z by the last check (before the last fold). Otherwise every
    remaining fold at once: fewer rounds, and so fewer waits for a round's last task
    (~0.5 s each on digits with 2 workers).
    """
    done = len(cell.folds)
    remaining = list(range(done, n_folds))
    could_stop = racing and remaining and cell.z * np.sqrt((n_folds - 1) / done) >= RACE_Z
    return remaining[:1] if could_stop or done < CENTRE_FOLDS else remaining


# ----------------------------------------------------------------------------- fitting
# Expected seconds of a first-round fold task, (dimension + 300) x head weight, to start
# the longest first. Fitted to fold tasks on digits with 2 workers (svm 0.7/0.9/2.0 s on
# the 160/448/1,280-d layers; mlp ~1.5x, softmax's coarse pass ~0.6x, knn ~0.03x that);
# later rounds use each cell's measured seconds.
_FIRST_ROUND_WEIGHT = {"mlp": 1.5, "svm": 1.0, "softmax": 0.6, "knn": 0.03}


def _fold_task(layer, head, fold_index, X, y, train, val, grid, seed, phase, center, start, only):
    _freeze_worker_imports()
    started = time.perf_counter()
    scores = grid_scores(head, grid, X[train], y[train], X[val], y[val], seed, phase=phase, center=center,
                         start=start, only=only)
    return "fold", (layer, head), (fold_index, scores, time.perf_counter() - started)


def _refit_task(layer, head, params, X_train, y_train, X_test, y_test, seed, plain):
    """The winner: the plain pipeline, fitted on all training rows (saved, plotted). Any
    other row only needs its test accuracy, which the head's scoring form gives up to float
    rounding, faster (grid_scores on a one-point grid; see heads._Split)."""
    _freeze_worker_imports()
    started = time.perf_counter()
    if plain:
        estimator = make_head(head, params, seed).fit(X_train, y_train)
        accuracy = float((estimator.predict(X_test) == y_test).mean()) if len(y_test) else None
    else:
        estimator, accuracy = None, grid_scores(head, [params], X_train, y_train, X_test, y_test, seed).scores[0]
    return "refit", (layer, head), (estimator, accuracy, time.perf_counter() - started)


def _freeze_worker_imports() -> None:
    """In a loky worker process, once: move everything imported so far out of the garbage
    collector's sight.

    Without psutil, loky runs a full ``gc.collect()`` after every task that ends a second
    or more after the previous collection. With torch imported that scanned ~250,000
    objects, 0.1-0.2 s each time: 11% of the sweep's wall time on digits with 2 workers.
    The workers no longer import torch, but what they import still leaves ~95,000.
    Frozen, those collections only scan what the tasks create.
    Never in the calling process (n_jobs=1 runs tasks there), where it would hide the
    caller's own objects from the collector.
    """
    global _FROZEN
    if not _FROZEN and multiprocessing.current_process().name.startswith("LokyProcess"):
        gc.collect()
        gc.freeze()
        _FROZEN = True


_FROZEN = False


def _run_cells(parallel, cells: list[_Cell], train_X, y_train, test_X, y_test, folds, seed, racing: bool):
    """Fold tasks round by round, racing between rounds, then the refits.

    Round 1 runs the first folds of every cell (see _first_folds; a warm-started path's
    coarse pass only, until CENTRE_FOLDS folds place its fine centre). Each later round
    runs the next folds of the cells still running (see _next_folds), the fine phase of
    path folds that ran before their centre was known; the last round, the refits of
    the cells that ran every fold (a cell that stopped is not refit: it cannot win, and
    the test part is for the contenders). Within a round, tasks start longest first, so
    neither worker idles long at its end.
    Returns the winner and ``{key: (estimator or None, test accuracy, seconds)}``.
    """
    n_folds = len(folds)
    plan = {cell.key: _first_folds(n_folds, racing) for cell in cells}
    refits: dict[tuple[str, str], tuple] = {}
    for _round in itertools.count():
        jobs = [job for cell in cells if not cell.stopped
                for job in _fold_jobs(cell, plan.get(cell.key, []), train_X, y_train, folds, seed)]
        jobs += [job for cell in cells if not cell.stopped and cell.center is not None
                 for job in _fine_jobs(cell, train_X, y_train, folds, seed)]
        if not jobs:
            break
        _run(parallel, jobs, cells, refits)
        for cell in cells:
            if cell.coarse_only and cell.center is None and len(cell.folds) >= min(CENTRE_FOLDS, n_folds):
                cell.center = cell.best()
        active = [cell for cell in cells if not cell.stopped]
        if racing and any(len(cell.folds) < n_folds for cell in active):
            leader, stopped = _race(active, n_folds)
            for cell in stopped:
                cell.stopped = True
                logger.info("racing: %s/%s stops after %d of %d folds: %.3f against %.3f of %s/%s (z %.1f)",
                            cell.layer, cell.head, len(cell.folds), n_folds, cell.means().max(),
                            leader.means(len(cell.folds)).max(), leader.layer, leader.head, cell.z)
        plan = {cell.key: _next_folds(cell, n_folds, racing) for cell in cells if not cell.stopped}
    winner = _winner(cells, n_folds)
    _run(parallel, [_refit_job(cell, train_X, y_train, test_X, y_test, seed, plain=cell is winner)
                    for cell in cells if cell is winner or (not cell.stopped and len(y_test))], cells, refits)
    return winner, refits


def _run(parallel, jobs, cells: list[_Cell], refits: dict) -> None:
    """Run (expected seconds, task) pairs longest first; file each result with its cell."""
    by_key = {cell.key: cell for cell in cells}
    for kind, key, result in parallel(job for _cost, job in sorted(jobs, key=lambda pair: -pair[0])):
        if kind == "refit":
            refits[key] = result
            continue
        fold_index, scores, seconds = result
        cell = by_key[key]
        cell.folds[fold_index] = cell.folds[fold_index].merge(scores) if fold_index in cell.folds else scores
        cell.seconds, cell.n_tasks = cell.seconds + seconds, cell.n_tasks + 1


def _winner(cells: list[_Cell], n_folds: int) -> _Cell:
    """The best cell among those that ran every fold (racing never stops the leader, so
    there is one); first of equals: earlier layer, listed head."""
    return max((cell for cell in cells if len(cell.folds) == n_folds), key=lambda cell: cell.means().max())


def _fold_jobs(cell: _Cell, fold_indices, train_X, y_train, folds, seed):
    """(expected seconds, task) for these folds of one cell."""
    X = train_X[cell.layer]
    cost = cell.task_seconds() if cell.n_tasks else (X.shape[1] + 300) * _FIRST_ROUND_WEIGHT.get(cell.head, 1.0)
    warm_start = HEADS[cell.head].warm_start
    # A path's first folds fit the coarse pass only: the fine centre needs their mean.
    phase = "coarse" if warm_start and cell.center is None else "all"
    if phase == "coarse":
        cell.coarse_only += list(fold_indices)
    # Points an earlier fold did not fit (past a path's peak there) can no longer be
    # selected: later folds skip them. On digits' mid layer the linear SVM's two largest
    # C were otherwise fitted on 3 and 2 of 5 folds for nothing (~40% of that row's time).
    only = None if warm_start or not cell.folds else np.flatnonzero(np.isfinite(cell.means())).tolist()
    for f in fold_indices:
        yield cost, delayed(_fold_task)(cell.layer, cell.head, f, X, y_train, *folds[f], cell.grid, seed,
                                        phase, cell.center, None, only)


def _fine_jobs(cell: _Cell, train_X, y_train, folds, seed):
    """(expected seconds, task) for the fine phase of a path's first folds, around its centre."""
    fold_indices, cell.coarse_only = cell.coarse_only, []
    for f in fold_indices:
        start = cell.folds[f].solutions[cell.center]
        yield cell.task_seconds() / 2, delayed(_fold_task)(cell.layer, cell.head, f, train_X[cell.layer], y_train,
                                                           *folds[f], cell.grid, seed, "fine", cell.center, start,
                                                           None)


def _refit_job(cell: _Cell, train_X, y_train, test_X, y_test, seed, plain: bool):
    """(expected seconds, task) of a cell's refit with its best parameters."""
    # One grid point on all the training part: about a fold task's share per point, x2.
    cost = cell.task_seconds() / max(1, int(np.isfinite(cell.means()).sum())) * 2
    task = delayed(_refit_task)(cell.layer, cell.head, cell.grid[cell.best()], train_X[cell.layer], y_train,
                                test_X[cell.layer], y_test, seed, plain)
    return cost, task


def sweep(
    data,
    *,
    test=None,
    heads=DEFAULT_HEADS,
    cv: int = 5,
    val: float | None = None,
    n_jobs: int | None = None,
    seed: int = 0,
    racing: bool = True,
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
    racing : bool
        Stop a (layer, head) after RACE_FOLDS or more folds once it is clearly behind the
        leader (see RACE_Z); its row says how many folds it ran (``n_folds``) and has no
        test accuracy (it is not refit). False runs every fold of every row.
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
    from .data import test_split
    from .extract import ExtractSettings, extract

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
        train_idx, test_idx = test_split(labels, float(test), seed)
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
    cells = [_Cell(layer, head, grids[head]) for layer in train_X for head in heads]
    # One task per call keeps the longest-first order; the pool lives across the rounds.
    with Parallel(n_jobs=n_jobs if n_jobs is not None else -1, batch_size=1) as parallel:
        winner, refits = _run_cells(parallel, cells, train_X, y_train, test_X, y_test, folds, seed, racing)
    rows = []
    for cell in cells:
        _estimator, accuracy, seconds = refits.get(cell.key, (None, None, None))
        rows.append({**_row(cell), "test_accuracy": accuracy,
                     "fit_seconds": None if seconds is None else round(seconds, 4)})
    best, best_estimator = rows[cells.index(winner)], refits[winner.key][0]
    timings["sweep_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started
    result = SweepResult(
        model=extracted.model, classes=classes, n_train=len(y_train), n_test=n_test,
        results=rows, best=best, timings=timings, extract=extracted, n_folds=len(folds), racing=racing,
    )
    if out is not None:
        result.to_csv(Path(out) / "results.csv")
        _write_plots(result, Path(out), best_estimator, test_X, y_test)
        from .predict import save_head

        with FeatureFile(extracted.path) as features:
            save_head(out, best_estimator, head=best["head"], params=best["params"],
                      layer=best["layer"], extract_result=extracted, settings=settings, features_file=features)
    return result


def _write_plots(result: SweepResult, out: Path, best_estimator, test_X, y_test) -> None:
    """accuracy_by_depth.png always; confusion_matrix.png of the winner when there is a test part."""
    from .plots import plot_accuracy_by_depth, plot_confusion_matrix

    plot_accuracy_by_depth(result.results, out / "accuracy_by_depth.png", title=f"{result.model}: CV accuracy by depth")
    if len(y_test):
        best = result.best
        predicted = best_estimator.predict(test_X[best["layer"]])
        plot_confusion_matrix(y_test, predicted, result.classes, out / "confusion_matrix.png",
                              title=f"{best['head']} on {best['layer']}, test part")


def _row(cell: _Cell) -> dict:
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


def _load_test_set(test, settings: ExtractSettings, classes: list[str]):
    """Extract a separate test set with the same settings; map its labels by class name."""
    from .data import labels_by_class_name
    from .extract import extract

    extracted = extract(test, settings)
    with FeatureFile(extracted.path) as features:
        labels = labels_by_class_name(features.labels, features.classes, classes, test)
        layers = {name: features.load(name) for name in features.layers}
    return layers, labels
