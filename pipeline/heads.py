"""Classical heads for cached features: scikit-learn estimators and the grids tlp sweeps.

Every head is a plain scikit-learn ``Pipeline`` (preprocessing + classifier), so users
can take a winner into their own code, ``clone`` it or put it in ``GridSearchCV``.

The sweep does not fit pipelines blindly per grid point: :func:`grid_scores` fits a
head's whole grid on one train/validation split, sharing the preprocessing across the
grid and warm-starting along regularisation paths (the logistic-regression path of
Kornblith et al. 2019 / DINOv2: C over 45 log-spaced values from 1e-6 to 1e5). Where an
equivalent but cheaper form of the same estimator exists, the grid is scored with it:
the RBF SVM on a kernel matrix computed once per split, the linear models on the
training rows' own coordinates (see :class:`_Split`). Both give the numbers of the plain
pipeline up to float rounding; refits and saved models are always the plain pipeline.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np
import scipy.linalg
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from .errors import TlpInputError

__all__ = ["HEADS", "Head", "GridScores", "make_head", "head_grid", "grid_scores", "check_heads"]

SOFTMAX_C = tuple(float(c) for c in np.logspace(-6, 5, 45))
# C above 1 on standardised features is close to a hard margin, and liblinear then takes
# 10-20 s per fit on digits' mid layer without changing the choice.
SVM_C = tuple(float(c) for c in np.logspace(-5, 0, 6))
RBF_C = (1.0, 10.0, 100.0)
RBF_MAX_TRAIN = 5000  # kernel SVMs scale quadratically: offered for small training sets only
MLP_GRID = tuple({"hidden": h, "alpha": a} for h in (256, 512) for a in (1e-4, 1e-2))
KNN_K = (10, 20)
SOFTMAX_MAX_ITER = 1000  # enough for every C on standardised features; non-convergence is counted
# Converge for real (DINOv2 uses 1e-12): at tol 1e-4 a warm-started path and independent
# fits stop at different points for large C (test accuracy 0.945 vs 0.965 on digits);
# at 1e-8 they agree within 0.003, for about 4x the solver time.
SOFTMAX_TOL = 1e-8
# The softmax path is fitted coarse-to-fine: every 4th C (x10 apart, 1e-6..1e5, all 12
# warm-started in order), then the 3 values either side of the best coarse C, each side
# warm-started from that coarse solution. Measured on digits (5 folds, one core) against
# the earlier rule, "stop 10 values past the best": 20% less solver time (early/mid/late
# 3.0/4.1/7.1 s against 3.6/5.1/8.9 s) and a better best (late C=1e3, CV 0.927 against
# C=0.01, 0.923, where the stopped path never saw accuracy rise again), equal to the best
# of all 45 values fitted in order (which took 4.0/7.3/12.0 s). The sweep picks one centre
# per (layer, head) from the mean coarse scores over folds, so every fold fits the same
# fine points and they can be selected. Points not fitted score -inf, never selected.
PATH_STEP = 4
PATH_REFINE = 3
# The linear SVM's C path (6 values, x10 apart) stops after 2 worse values: on digits'
# mid layer C=1 alone took ~45% of the sweep's CPU time and never won.
SVM_PATH_PATIENCE = 2
SVM_MAX_ITER = 5000


class _Split:
    """One train/validation split after a head's preprocessing, with the forms of it that
    several grid points share, each computed once, on first use.

    ``span``: the rows in coordinates of the training rows' span. With Q R = X_trainᵀ
    (thin QR), Z_train = Rᵀ and Z_val = X_val Q keep every inner product between training
    and validation rows, so an L2-regularised linear model (softmax, linear SVM) has the
    same optimisation problem there, solved by the same iterates, and makes the same
    predictions up to float rounding. It pays twice: Z has min(n, d) columns instead of d
    (the late layer: 718 instead of 1,280 on digits), and Z_train is lower-trapezoidal, so
    liblinear, which skips zeros, touches 28% of the entries on digits' late layer and
    69% on mid (linear SVM fits 3-4x faster on late, ~1.3x on mid; the same number of
    iterations and predictions as the plain fit).

    ``rbf``: the RBF kernel between rows with ``gamma="scale"`` evaluated as scikit-learn's
    SVC does on the same training part, for ``SVC(kernel="precomputed")``: one BLAS
    product per split instead of libsvm's per-entry kernel for every C.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray):
        self.train, self.val = train, val

    @property
    def wide(self) -> bool:
        """More features than training rows: ``span`` has fewer columns than the features."""
        return self.train.shape[1] > self.train.shape[0]

    @cached_property
    def float64(self) -> tuple[np.ndarray, np.ndarray]:
        # liblinear, libsvm and L-BFGS compute in float64; convert once, not once per fit.
        return (np.ascontiguousarray(self.train, dtype=np.float64),
                np.ascontiguousarray(self.val, dtype=np.float64))

    @cached_property
    def span(self) -> tuple[np.ndarray, np.ndarray]:
        train, val = self.float64
        q, r = scipy.linalg.qr(train.T, mode="economic", check_finite=False)
        return np.ascontiguousarray(r.T), val @ q

    @cached_property
    def rbf(self) -> tuple[np.ndarray, np.ndarray]:
        train, val = self.float64
        variance = train.var()  # as SVC(gamma="scale") computes it, on float64 rows
        gamma = 1.0 / (train.shape[1] * variance) if variance != 0 else 1.0
        return rbf_kernel(train, gamma=gamma), rbf_kernel(val, train, gamma=gamma)


def _as_is(classifier: Callable[[dict, int], object]):
    """Score a grid point with the plain classifier on the preprocessed split."""
    return lambda params, seed, split: (classifier(params, seed), split.train, split.val)


@dataclass(frozen=True)
class Head:
    """One head family: how to build it and which grid to sweep."""

    name: str
    preprocess: Callable[[], object]  # fresh transformer fitted once per split, shared by the grid
    grid: Callable[[np.ndarray], list[dict]]  # training labels -> parameter dicts, in path order
    classifier: Callable[[dict, int], object]  # (params, seed) -> unfitted classifier
    # (params, seed, split) -> (classifier, train X, val X) that grid_scores fits: the plain
    # classifier, or an equivalent form scoring the same up to float rounding (see _Split).
    scoring_form: Callable[[dict, int, _Split], tuple] | None = None
    # A warm-started path: the grid is one ascending regularisation parameter, fitted
    # coarse-to-fine on one estimator that starts each fit from the previous solution.
    warm_start: bool = False
    # Points of an ascending regularisation path fitted independently (weaker regularisation
    # = more solver time): the path stops once `patience` consecutive points scored below its best.
    on_path: Callable[[dict], bool] = lambda params: False
    patience: int = 0

    def form(self, params: dict, seed: int, split: _Split) -> tuple:
        return (self.scoring_form or _as_is(self.classifier))(params, seed, split)


def _softmax(params: dict, seed: int):
    return LogisticRegression(C=params["C"], max_iter=SOFTMAX_MAX_ITER, tol=SOFTMAX_TOL, random_state=seed)


def _softmax_form(params: dict, seed: int, split: _Split) -> tuple:
    # The span only when it has fewer columns, and in the features' own dtype, as the plain
    # pipeline fits: L-BFGS stops on the largest gradient entry and, in float32, on a
    # stalled loss, both of which depend on the coordinates. On digits' late layer the path
    # ran 1.9x faster with 6 of 5,400 validation predictions different (C 1e-6..3).
    if not split.wide:
        return _softmax(params, seed), split.train, split.val
    train, val = split.span
    return _softmax(params, seed), train.astype(split.train.dtype), val.astype(split.train.dtype)


def _svm(params: dict, seed: int):
    if params.get("kernel", "linear") == "rbf":
        return SVC(kernel="rbf", C=params["C"], gamma="scale", random_state=seed)
    # The dual solver always: sklearn's "auto" picks the primal when samples outnumber
    # features, which took 7.5 s instead of 0.9 s at C=1 on digits' mid layer (same accuracy).
    return LinearSVC(C=params["C"], dual=True, max_iter=SVM_MAX_ITER, random_state=seed)


def _svm_form(params: dict, seed: int, split: _Split) -> tuple:
    if params.get("kernel", "linear") == "rbf":
        return (SVC(kernel="precomputed", C=params["C"], random_state=seed), *split.rbf)
    return (_svm(params, seed), *split.span)


def _svm_grid(labels: np.ndarray) -> list[dict]:
    linear = [{"kernel": "linear", "C": c} for c in SVM_C]
    rbf = [{"kernel": "rbf", "C": c} for c in RBF_C] if len(labels) <= RBF_MAX_TRAIN else []
    return linear + rbf


def _mlp(params: dict, seed: int):
    return MLPClassifier(
        hidden_layer_sizes=(params["hidden"],), alpha=params["alpha"], early_stopping=True,
        validation_fraction=0.1, max_iter=300, n_iter_no_change=10, random_state=seed,
    )


def _knn(params: dict, seed: int):
    # On L2-normalised rows Euclidean order equals cosine order, and the fast tree/brute
    # Euclidean code applies.
    return KNeighborsClassifier(n_neighbors=params["k"], weights="distance")


def _knn_grid(labels: np.ndarray) -> list[dict]:
    smallest_class = int(np.bincount(labels).min(initial=len(labels)) or len(labels))
    ks = sorted({max(1, min(k, smallest_class, len(labels) - 1)) for k in KNN_K})
    return [{"k": k} for k in ks]


HEADS: dict[str, Head] = {
    "softmax": Head("softmax", StandardScaler, lambda y: [{"C": c} for c in SOFTMAX_C], _softmax,
                    scoring_form=_softmax_form, warm_start=True),
    "svm": Head("svm", StandardScaler, _svm_grid, _svm, scoring_form=_svm_form,
                on_path=lambda params: params.get("kernel", "linear") == "linear", patience=SVM_PATH_PATIENCE),
    "mlp": Head("mlp", StandardScaler, lambda y: [dict(p) for p in MLP_GRID], _mlp),
    "knn": Head("knn", lambda: Normalizer(norm="l2"), _knn_grid, _knn),
}


def check_heads(names) -> list[str]:
    """Validate a list (or comma-separated string) of head names."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in HEADS]
    if unknown or not names:
        raise TlpInputError(f"--heads must name some of {', '.join(HEADS)}, got {', '.join(names) or 'nothing'}")
    return list(dict.fromkeys(names))


def head_grid(name: str, labels: np.ndarray) -> list[dict]:
    return HEADS[name].grid(np.asarray(labels))


def make_head(name: str, params: dict, seed: int = 0) -> Pipeline:
    """An unfitted scikit-learn pipeline: the head's preprocessing and classifier."""
    head = HEADS[name]
    return Pipeline([("preprocess", head.preprocess()), ("classifier", head.classifier(params, seed))])


@dataclass
class GridScores:
    """A head's grid on one train/validation split."""

    scores: list[float]  # validation accuracy per grid point; -inf where not fitted (never selected)
    correct: np.ndarray  # (n_points, n_val) bool: which validation samples each point got right
    n_warnings: int  # ConvergenceWarnings raised by the fits
    # Warm-started paths: grid index -> (coef, intercept) of each coarse point, as the
    # estimator holds them (valid for this split only: the span is recomputed identically),
    # so that a later "fine" phase can start from the solution at its centre.
    solutions: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def merge(self, other: "GridScores") -> "GridScores":
        """These scores with the points ``other`` fitted (another phase on the same split)."""
        fitted = np.isfinite(other.scores)
        scores = [b if f else a for a, b, f in zip(self.scores, other.scores, fitted)]
        correct = np.where(fitted[:, None], other.correct, self.correct)
        return GridScores(scores, correct, self.n_warnings + other.n_warnings, {**self.solutions, **other.solutions})


def coarse_points(n_points: int) -> list[int]:
    """Grid indices of a path's coarse pass: every PATH_STEP-th."""
    return list(range(0, n_points, PATH_STEP))


def fine_points(n_points: int, center: int) -> list[int]:
    """The PATH_REFINE indices either side of a coarse centre: below it first, nearest first."""
    below = [center - j for j in range(1, PATH_REFINE + 1) if center - j >= 0]
    above = [center + j for j in range(1, PATH_REFINE + 1) if center + j < n_points]
    return below + above


def grid_scores(name: str, grid: list[dict], X_train, y_train, X_val, y_val, *, seed: int = 0,
                phase: str = "all", center: int | None = None, start=None, only=None) -> GridScores:
    """Validation accuracy (and per-sample correctness) for every grid point.

    The preprocessing is fitted once on the training part. A warm-started path (softmax)
    is fitted in phases: ``"coarse"`` fits every PATH_STEP-th point in order and keeps
    their solutions; ``"fine"`` fits the points around ``center``, starting from
    ``start`` (that coarse point's solution on the same split); ``"all"`` (default) does
    both, around ``center`` or, without one, around this split's best coarse point.
    Other heads fit their whole grid in every phase, or with ``only`` (grid indices) just
    those points: the sweep passes the points still selectable, so that a later fold does
    not fit a point an earlier fold skipped (past its path's peak), which could never win.
    """
    head = HEADS[name]
    if phase not in ("all", "coarse", "fine"):
        raise ValueError(f"phase must be 'all', 'coarse' or 'fine', got {phase!r}")
    transform = head.preprocess().fit(X_train)
    split = _Split(transform.transform(X_train), transform.transform(X_val))
    y_val = np.asarray(y_val)
    if head.warm_start:
        return _path_scores(head, grid, split, (y_train, y_val), seed=seed, phase=phase, center=center, start=start)
    return _independent_scores(head, grid, split, (y_train, y_val), seed=seed, only=only)


class _Fits:
    """Accumulates one split's scores, correctness and convergence warnings."""

    def __init__(self, n_points: int, y_val: np.ndarray):
        self.y_val = y_val
        self.result = GridScores([float("-inf")] * n_points, np.zeros((n_points, len(y_val)), dtype=bool), 0)

    def fit(self, index: int, estimator, train, y_train, val) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            estimator.fit(train, y_train)
        self.result.n_warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.result.correct[index] = estimator.predict(val) == self.y_val
        self.result.scores[index] = float(self.result.correct[index].mean())
        return self.result.scores[index]


def _independent_scores(head: Head, grid, split: _Split, labels, *, seed, only=None) -> GridScores:
    y_train, y_val = labels
    fits = _Fits(len(grid), y_val)
    path_scores: list[float] = []  # scores of the path points fitted so far, in order
    wanted = set(range(len(grid)) if only is None else only)
    for i, params in enumerate(grid):
        if i not in wanted:
            continue  # not fitted, never selected
        on_path = head.on_path(params)
        if on_path and path_scores and len(path_scores) - 1 - int(np.argmax(path_scores)) >= head.patience:
            continue  # past the path's peak: not fitted, never selected
        estimator, train, val = head.form(params, seed, split)
        score = fits.fit(i, estimator, train, y_train, val)
        if on_path:
            path_scores.append(score)
    return fits.result


def _path_scores(head: Head, grid, split: _Split, labels, *, seed, phase, center, start) -> GridScores:
    y_train, y_val = labels
    fits = _Fits(len(grid), y_val)
    estimator, train, val = head.form(grid[0], seed, split)
    estimator.set_params(warm_start=True)
    if phase != "fine":
        for i in coarse_points(len(grid)):
            estimator.set_params(**_classifier_params(grid[i]))
            fits.fit(i, estimator, train, y_train, val)
            fits.result.solutions[i] = (estimator.coef_.copy(), estimator.intercept_.copy())
        if center is None:
            center = int(np.argmax(fits.result.scores))  # first maximum: the most regularised of equals
        start = fits.result.solutions[center]
    if phase == "coarse":
        return fits.result
    fits.result.solutions = {}  # nothing later starts from them
    if center is None or start is None:
        raise ValueError("the fine phase of a path needs its centre and the solution there")
    for i in fine_points(len(grid), center):
        if i in (center - 1, center + 1):  # each side starts from the centre's solution
            estimator.coef_, estimator.intercept_ = start[0].copy(), start[1].copy()
        estimator.set_params(**_classifier_params(grid[i]))
        fits.fit(i, estimator, train, y_train, val)
    return fits.result


def _classifier_params(params: dict) -> dict:
    # Only softmax is warm-started, and its grid key is the classifier's own parameter.
    return {"C": params["C"]}
