"""Classical heads for cached features: scikit-learn estimators and the grids tlp sweeps.

Every head is a plain scikit-learn ``Pipeline`` (preprocessing + classifier), so users
can take a winner into their own code, ``clone`` it or put it in ``GridSearchCV``.

The sweep does not fit pipelines blindly per grid point: :func:`grid_scores` fits a
head's whole grid on one train/validation split, sharing the preprocessing across the
grid and warm-starting along regularisation paths (the logistic-regression path of
Kornblith et al. 2019 / DINOv2: C over 45 log-spaced values from 1e-6 to 1e5).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from .errors import TlpInputError

__all__ = ["HEADS", "Head", "make_head", "head_grid", "grid_scores", "check_heads"]

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
# Stop a warm-started path once this many consecutive C values (a factor of ~300 in C)
# scored below the best so far: weaker regularisation only costs solver time from there
# (on digits the large-C tail took ~70% of the path's time). Points not reached score -inf.
PATH_PATIENCE = 10
# The linear SVM's C path (6 values, x10 apart) stops after 2 worse values: on digits'
# mid layer C=1 alone took ~45% of the sweep's CPU time and never won.
SVM_PATH_PATIENCE = 2
SVM_MAX_ITER = 5000


@dataclass(frozen=True)
class Head:
    """One head family: how to build it and which grid to sweep."""

    name: str
    preprocess: Callable[[], object]  # fresh transformer fitted once per split, shared by the grid
    grid: Callable[[np.ndarray], list[dict]]  # training labels -> parameter dicts, in path order
    classifier: Callable[[dict, int], object]  # (params, seed) -> unfitted classifier
    warm_start: bool = False  # fit the grid in order on one estimator, reusing the solution
    # Points of an ascending regularisation path (weaker regularisation = more solver time):
    # the path stops once `patience` consecutive points scored below its best.
    on_path: Callable[[dict], bool] = lambda params: False
    patience: int = 0


def _softmax(params: dict, seed: int):
    return LogisticRegression(C=params["C"], max_iter=SOFTMAX_MAX_ITER, tol=SOFTMAX_TOL, random_state=seed)


def _svm(params: dict, seed: int):
    if params.get("kernel", "linear") == "rbf":
        return SVC(kernel="rbf", C=params["C"], gamma="scale", random_state=seed)
    # The dual solver always: sklearn's "auto" picks the primal when samples outnumber
    # features, which took 7.5 s instead of 0.9 s at C=1 on digits' mid layer (same accuracy).
    return LinearSVC(C=params["C"], dual=True, max_iter=SVM_MAX_ITER, random_state=seed)


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
    "softmax": Head("softmax", StandardScaler, lambda y: [{"C": c} for c in SOFTMAX_C], _softmax, warm_start=True,
                    on_path=lambda params: True, patience=PATH_PATIENCE),
    "svm": Head("svm", StandardScaler, _svm_grid, _svm,
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


def grid_scores(
    name: str, grid: list[dict], X_train, y_train, X_val, y_val, seed: int = 0
) -> tuple[list[float], int]:
    """Validation accuracy for every grid point, and the number of convergence warnings.

    The preprocessing is fitted once on the training part; along a warm-started path
    each fit starts from the previous solution.
    """
    head = HEADS[name]
    transform = head.preprocess().fit(X_train)
    train, val = transform.transform(X_train), transform.transform(X_val)
    scores, n_warnings = [], 0
    estimator = None
    path_scores: list[float] = []  # scores of the path points fitted so far, in order
    for params in grid:
        on_path = head.on_path(params)
        if on_path and path_scores and len(path_scores) - 1 - int(np.argmax(path_scores)) >= head.patience:
            scores.append(float("-inf"))  # past the path's peak: not fitted, never selected
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if head.warm_start and estimator is not None:
                estimator.set_params(**_classifier_params(name, params))
            else:
                estimator = head.classifier(params, seed)
                if head.warm_start:
                    estimator.set_params(warm_start=True)
            estimator.fit(train, y_train)
        n_warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        scores.append(float((estimator.predict(val) == y_val).mean()))
        if on_path:
            path_scores.append(scores[-1])
    return scores, n_warnings


def _classifier_params(name: str, params: dict) -> dict:
    # Only softmax is warm-started, and its grid key is the classifier's own parameter.
    return {"C": params["C"]}
