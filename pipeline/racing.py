"""Racing across folds: the sweep's scheduler.

Every (layer, head) is a :class:`Cell` that runs its folds round by round; joblib runs the
independent (cell, fold) tasks of a round in parallel, longest first, and between rounds
a cell that is clearly behind the leader stops (see RACE_Z). Then the winner is refit as
the plain pipeline that is saved; the other cells that ran every fold get their test
accuracy from the head's cheaper scoring form.

Nothing here imports torch: joblib's workers import this module for the fold tasks, and
should not pay for torch.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from joblib import delayed
from threadpoolctl import threadpool_limits
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from .errors import TlpInputError
from .heads import HEADS, GridScores, grid_scores, make_head

__all__ = ["RACE_FOLDS", "CENTRE_FOLDS", "RACE_P", "RACE_Z", "RACE_MIN_GAP", "race_threshold", "paired_z",
           "clearly_behind", "one_blas_thread", "Cell", "Problem", "cv_folds", "run_cells"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- splits
def cv_folds(labels: np.ndarray, cv: int, val: float | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
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
# clear loser costs one or two folds, not five.
#
# "Clearly behind" asks whether the row could still end the sweep with the higher CV
# accuracy, which is what selection compares. On the n validation samples seen so far,
# paired (McNemar, continuity-corrected): z = (b - c - 1) / sqrt(b + c), b = samples only
# the leader got right, c = only the row, each at its own best grid point. Predicting the
# paired difference on the m samples still to come from the n seen (flat prior, normal
# approximation), the row ends ahead with probability Phi(-z sqrt((n + m) / m)). It stops
# when that is below RACE_P, i.e. z >= RACE_Z * sqrt(m / (n + m)) with RACE_Z =
# Phi^-1(1 - RACE_P) = 3.09 (after the first of 5 folds 2.76, after 2: 2.39, 3: 1.95,
# 4: 1.38), and it is RACE_MIN_GAP or more behind. The earlier rule (z >= 3.5 after any
# fold) ignored that fewer samples remain each round, and ran a row 3 points behind on
# 2,000 rows to its last fold. RACE_P is small against the ~30 comparisons of a sweep and
# the leader's head start as the best of ~12 rows; the gap keeps rows within a point of
# the leader, where folds differ by more than the sample noise z sees, running. The same
# rule inside a row skips, on later folds, grid points clearly behind the row's best (the
# warm-started softmax path fits every point: each starts from the one before).
# RACE_FOLDS folds are the fewest a row runs before it can stop. Measured against
# --no-racing on the three real sets' training parts and on benchmarks/sweep.py's rows:
# the same winners and CV accuracy (see benchmarks/README.md).
RACE_FOLDS = 1
# Folds of a warm-started path's coarse pass that place its fine centre (their mean), and
# the rounds that run one fold each (so the second fold also tells later folds which grid
# points both skipped, see _fold_jobs).
CENTRE_FOLDS = 2
RACE_P = 0.001
RACE_Z = NormalDist().inv_cdf(1.0 - RACE_P)
RACE_MIN_GAP = 0.01


def race_threshold(seen: int, total: int) -> float:
    """The z a row (or grid point) must reach after ``seen`` of ``total`` validation
    samples to stop: RACE_Z * sqrt(remaining / total); infinite when nothing remains."""
    remaining = total - seen
    return RACE_Z * float(np.sqrt(remaining / total)) if remaining > 0 else float("inf")


def paired_z(leading: np.ndarray, other: np.ndarray) -> float:
    """McNemar's continuity-corrected z of ``other`` behind ``leading`` (bool correctness
    on the same samples); 0 when they never disagree."""
    only_leading, only_other = int(np.sum(leading & ~other)), int(np.sum(~leading & other))
    disagree = only_leading + only_other
    return (only_leading - only_other - 1) / np.sqrt(disagree) if disagree else 0.0


def clearly_behind(leading: np.ndarray, other: np.ndarray, total: int) -> tuple[bool, float]:
    """(whether ``other`` is clearly behind ``leading`` with ``total`` samples in all, z)."""
    z = paired_z(leading, other)
    gap = float(leading.mean() - other.mean()) if len(leading) else 0.0
    return z >= race_threshold(len(leading), total) and gap >= RACE_MIN_GAP, z


@dataclass
class Cell:
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

    def points_behind(self, total: int) -> set[int]:
        """Grid points clearly behind this cell's best point on every fold it ran (see
        clearly_behind), ``total`` validation samples in all: later folds skip them."""
        means = self.means()
        best = int(np.argmax(means))
        correct = np.concatenate([self.folds[f].correct for f in sorted(self.folds)], axis=1)
        return {int(p) for p in np.flatnonzero(np.isfinite(means))
                if p != best and clearly_behind(correct[best], correct[p], total)[0]}

    def task_seconds(self) -> float:
        return self.seconds / max(1, self.n_tasks)


def _race(active: list[Cell], n_folds: int, total: int) -> tuple[Cell, list[Cell]]:
    """The leader and the cells clearly behind it, on the folds every active cell ran
    (``total``: validation samples over all folds).

    Only cells with folds left to run are tested (and get ``z``); a cell that ran every
    fold has nothing left to save.
    """
    n = min(len(cell.folds) for cell in active)
    leader = max(active, key=lambda cell: cell.means(n).max())
    leading = leader.correct(n)
    behind = []
    for cell in active:
        if cell is leader or len(cell.folds) == n_folds:
            continue
        stops, cell.z = clearly_behind(leading, cell.correct(n), total)
        if stops:
            behind.append(cell)
    return leader, behind


def _first_folds(n_folds: int, racing: bool) -> list[int]:
    """The folds every cell runs in the first round: RACE_FOLDS when racing, else
    CENTRE_FOLDS (nothing to decide before a path's centre)."""
    return list(range(min(n_folds, RACE_FOLDS if racing else CENTRE_FOLDS)))


def _next_folds(cell: Cell, n_folds: int, racing: bool) -> list[int]:
    """The folds a running cell runs in the next round.

    One fold at a time up to CENTRE_FOLDS, and after that while the race could still
    stop the cell: its z, growing as the square root of the samples seen at a constant
    gap, would reach the threshold of the last check (before the last fold; folds taken
    as equal in size). Otherwise every remaining fold at once: fewer rounds, and so fewer
    waits for a round's last task (~0.5 s each on digits with 2 workers).
    """
    done = len(cell.folds)
    remaining = list(range(done, n_folds))
    could_stop = (racing and remaining
                  and cell.z * np.sqrt((n_folds - 1) / done) >= race_threshold(n_folds - 1, n_folds))
    return remaining[:1] if could_stop or done < CENTRE_FOLDS else remaining


# ----------------------------------------------------------------------------- fitting
# Expected seconds of a first-round fold task, (dimension + 300) x head weight, to start
# the longest first. Fitted to fold tasks on digits with 2 workers (svm 0.7/0.9/2.0 s on
# the 160/448/1,280-d layers; mlp ~1.5x, softmax's coarse pass ~0.6x, knn ~0.03x that);
# later rounds use each cell's measured seconds.
_FIRST_ROUND_WEIGHT = {"mlp": 1.5, "svm": 1.0, "softmax": 0.6, "knn": 0.03}


@dataclass(frozen=True)
class Problem:
    """What every task of one sweep shares: the training and test rows per layer, folds, seed."""

    train_X: dict[str, np.ndarray]  # layer -> (n_train, D)
    y_train: np.ndarray
    test_X: dict[str, np.ndarray]  # layer -> (n_test, D)
    y_test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]  # (training rows, validation rows) per fold
    seed: int

    @property
    def n_validation(self) -> int:
        """Validation samples over all folds: the total the race's thresholds scale by."""
        return sum(len(val) for _, val in self.folds)


@dataclass(frozen=True)
class _FoldTask:
    """One cell's grid on one fold (one phase of it, for a warm-started path). The layer's
    features travel beside it, as their own argument: joblib's dask backend sends an
    argument array to each worker once (see tlp.scheduler), not once per task."""

    layer: str
    head: str
    fold: int
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    grid: list[dict]
    seed: int
    phase: str = "all"
    center: int | None = None
    start: tuple | None = None
    only: list[int] | None = None


def _fold_task(task: _FoldTask, X: np.ndarray):
    _freeze_worker_imports()
    started = time.perf_counter()
    with one_blas_thread():
        scores = grid_scores(task.head, task.grid, X[task.train], task.y[task.train], X[task.val],
                             task.y[task.val], seed=task.seed, phase=task.phase, center=task.center,
                             start=task.start, only=task.only)
    return "fold", (task.layer, task.head), (task.fold, scores, time.perf_counter() - started)


@dataclass(frozen=True)
class _RefitTask:
    """One cell's best point, fitted on all training rows and scored on the test part."""

    layer: str
    head: str
    params: dict
    y_train: np.ndarray
    y_test: np.ndarray
    seed: int
    plain: bool  # the plain pipeline (the winner, saved and plotted), or the scoring form


def _refit_task(task: _RefitTask, X_train: np.ndarray, X_test: np.ndarray):
    """The winner: the plain pipeline, fitted on all training rows (saved, plotted). Any
    other row only needs its test accuracy, which the head's scoring form gives up to float
    rounding, faster (grid_scores on a one-point grid; see the scoring forms in tlp.heads)."""
    _freeze_worker_imports()
    started = time.perf_counter()
    with one_blas_thread():
        if task.plain:
            estimator = make_head(task.head, task.params, task.seed).fit(X_train, task.y_train)
            accuracy = float((estimator.predict(X_test) == task.y_test).mean()) if len(task.y_test) else None
        else:
            estimator = None
            accuracy = grid_scores(task.head, [task.params], X_train, task.y_train, X_test, task.y_test,
                                   seed=task.seed).scores[0]
    return "refit", (task.layer, task.head), (estimator, accuracy, time.perf_counter() - started)


def one_blas_thread():
    """One BLAS/OpenMP thread for the fits inside, as joblib's loky workers already run. In
    the calling process (``n_jobs=1``) a thread per core made scikit-learn's L-BFGS softmax
    3.8x slower on two cores (0.98 against 0.26 s, 2,000 x 1,280; the MLP 1.58 against
    1.40 s): too little work per iteration to split, and two OpenMP runtimes (torch's,
    scikit-learn's) whose threads wait on each other."""
    return threadpool_limits(limits=1)


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


class _Progress:
    """A bar of (layer, head) cells done out of all, with the leader so far."""

    def __init__(self, cells: list[Cell], n_folds: int, enabled: bool):
        from tqdm.auto import tqdm

        self.cells, self.n_folds = cells, n_folds
        self.bar = tqdm(total=len(cells), desc="sweep", unit="cell", file=sys.stderr, disable=not enabled,
                        leave=False)

    def update(self) -> None:
        done = sum(cell.stopped or len(cell.folds) == self.n_folds for cell in self.cells)
        self.bar.update(done - self.bar.n)
        ran = [cell for cell in self.cells if cell.folds]
        if ran:
            leader = max(ran, key=lambda cell: cell.means().max())
            self.bar.set_postfix_str(f"leader {leader.layer}/{leader.head} {leader.means().max():.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_cells(parallel, cells: list[Cell], problem: Problem, *, racing: bool, progress: bool = False):
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
    n_folds = len(problem.folds)
    plan = {cell.key: _first_folds(n_folds, racing) for cell in cells}
    refits: dict[tuple[str, str], tuple] = {}
    bar = _Progress(cells, n_folds, progress)
    try:
        for _round in itertools.count():
            jobs = [job for cell in cells if not cell.stopped
                    for job in _fold_jobs(cell, plan.get(cell.key, []), problem, racing)]
            jobs += [job for cell in cells if not cell.stopped and cell.center is not None
                     for job in _fine_jobs(cell, problem)]
            if not jobs:
                break
            _run(parallel, jobs, cells, refits, bar)
            for cell in cells:
                if cell.coarse_only and cell.center is None and len(cell.folds) >= min(CENTRE_FOLDS, n_folds):
                    cell.center = cell.best()
            active = [cell for cell in cells if not cell.stopped]
            if racing and any(len(cell.folds) < n_folds for cell in active):
                leader, stopped = _race(active, n_folds, problem.n_validation)
                for cell in stopped:
                    cell.stopped = True
                    logger.debug("racing: %s/%s stops after %d of %d folds: %.3f against %.3f of %s/%s (z %.1f)",
                                 cell.layer, cell.head, len(cell.folds), n_folds, cell.means().max(),
                                 leader.means(len(cell.folds)).max(), leader.layer, leader.head, cell.z)
            bar.update()
            plan = {cell.key: _next_folds(cell, n_folds, racing) for cell in cells if not cell.stopped}
    finally:
        bar.close()
    winner = _winner(cells, n_folds)
    _run(parallel, [_refit_job(cell, problem, plain=cell is winner) for cell in cells
                    if cell is winner or (not cell.stopped and len(problem.y_test))], cells, refits, None)
    return winner, refits


def _run(parallel, jobs, cells: list[Cell], refits: dict, bar: _Progress | None) -> None:
    """Run (expected seconds, task) pairs longest first; file each result with its cell as
    it arrives."""
    by_key = {cell.key: cell for cell in cells}
    for kind, key, result in parallel(job for _cost, job in sorted(jobs, key=lambda pair: -pair[0])):
        if kind == "refit":
            refits[key] = result
            continue
        fold_index, scores, seconds = result
        cell = by_key[key]
        cell.folds[fold_index] = cell.folds[fold_index].merge(scores) if fold_index in cell.folds else scores
        cell.seconds, cell.n_tasks = cell.seconds + seconds, cell.n_tasks + 1
        if bar is not None:
            bar.update()


def _winner(cells: list[Cell], n_folds: int) -> Cell:
    """The best cell among those that ran every fold (racing never stops the leader, so
    there is one); first of equals: earlier layer, listed head."""
    return max((cell for cell in cells if len(cell.folds) == n_folds), key=lambda cell: cell.means().max())


def _fold_jobs(cell: Cell, fold_indices, problem: Problem, racing: bool):
    """(expected seconds, task) for these folds of one cell."""
    X = problem.train_X[cell.layer]
    cost = cell.task_seconds() if cell.n_tasks else (X.shape[1] + 300) * _FIRST_ROUND_WEIGHT.get(cell.head, 1.0)
    warm_start = HEADS[cell.head].warm_start
    # A path's first folds fit the coarse pass only: the fine centre needs their mean.
    phase = "coarse" if warm_start and cell.center is None else "all"
    if phase == "coarse":
        cell.coarse_only += list(fold_indices)
    # Points an earlier fold did not fit (past a path's peak there) can no longer be
    # selected: later folds skip them. On digits' mid layer the linear SVM's two largest
    # C were otherwise fitted on 3 and 2 of 5 folds for nothing (~40% of that row's time).
    # Racing also skips the points clearly behind the cell's best (see Cell.points_behind).
    only = None
    if not warm_start and cell.folds:
        behind = cell.points_behind(problem.n_validation) if racing else set()
        only = [int(p) for p in np.flatnonzero(np.isfinite(cell.means())) if p not in behind]
    for f in fold_indices:
        train, val = problem.folds[f]
        task = _FoldTask(layer=cell.layer, head=cell.head, fold=f, y=problem.y_train, train=train, val=val,
                         grid=cell.grid, seed=problem.seed, phase=phase, center=cell.center, only=only)
        yield cost, delayed(_fold_task)(task, X)


def _fine_jobs(cell: Cell, problem: Problem):
    """(expected seconds, task) for the fine phase of a path's first folds, around its centre."""
    fold_indices, cell.coarse_only = cell.coarse_only, []
    for f in fold_indices:
        train, val = problem.folds[f]
        task = _FoldTask(layer=cell.layer, head=cell.head, fold=f, y=problem.y_train, train=train, val=val,
                         grid=cell.grid, seed=problem.seed, phase="fine", center=cell.center,
                         start=cell.folds[f].solutions[cell.center])
        yield cell.task_seconds() / 2, delayed(_fold_task)(task, problem.train_X[cell.layer])


def _refit_job(cell: Cell, problem: Problem, plain: bool):
    """(expected seconds, task) of a cell's refit with its best parameters."""
    # One grid point on all the training part: about a fold task's share per point, x2.
    cost = cell.task_seconds() / max(1, int(np.isfinite(cell.means()).sum())) * 2
    task = _RefitTask(layer=cell.layer, head=cell.head, params=cell.grid[cell.best()], y_train=problem.y_train,
                      y_test=problem.y_test, seed=problem.seed, plain=plain)
    return cost, delayed(_refit_task)(task, problem.train_X[cell.layer], problem.test_X[cell.layer])
