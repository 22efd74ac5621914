"""Transferability scores: how well cached features suit target labels, without training.

``tlp advise`` has to decide, before any head is fitted, whether a target data set looks
like the network's source domain. The three scores here read only an (N, D) feature
array and N class labels, so they cost one matrix decomposition instead of a sweep:

- :func:`logme`: LogME (You et al., ICML 2021; JMLR 2022), the per-sample log evidence
  of a Bayesian linear model from features to one-hot labels. Higher is better; it is
  comparable across layers and models on the same labels.
- :func:`h_score`: the H-score of Bao et al. (ICIP 2019), tr(cov(f)^+ cov(E[f|y])). It
  lies in [0, K-1] for K classes, and saturates near K-1 for *any* features once D is
  close to N (the covariance estimate overfits).
- :func:`shrinkage_h_score`: the H-score with a Ledoit-Wolf shrinkage covariance
  (Ibrahim, Ponomareva, Mazumder, ECML-PKDD 2022), stable when N < D.

All three work in float64 whatever the input precision: the cache stores float16, whose
Gram matrices would overflow at 65504 and keep about 3 significant digits, far too few
for the small eigenvalues these scores divide by.

These are implemented from the papers' formulas, not from their reference code. Each
docstring writes its formula out in full so it can be checked without the paper.
TODO: the equation numbers cited are as recalled, not yet checked against the
published PDFs; check them there (LogME's are the likeliest to be right).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from sklearn.covariance import ledoit_wolf

from .errors import TlpInputError

__all__ = ["logme", "logme_fit", "LogMEFit", "h_score", "shrinkage_h_score"]

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)

# LogME's fixed-point iteration (see logme_fit). It stops for a class when the
# ridge ratio alpha/beta changes by less than this relative amount between iterations...
LOGME_RATIO_TOL = 1e-6
# ...or when its log evidence per sample changes by less than this. The second test ends
# the slow geometric drift of alpha/beta towards a boundary (features that carry nothing
# for a class send alpha/beta to infinity, a tiny N < D set can send it to 0): the
# evidence is flat there, and on such cases the stopped value was within 2e-7 per sample
# of a brute-force maximum over 20,000 ratios.
LOGME_EVIDENCE_TOL = 1e-9
# Digits pixels converge in 6 iterations; a class the features cannot fit drifts for a
# few hundred (up to ~800 for pure noise with N < D).
LOGME_MAX_ITER = 2000


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the maximum log evidence per sample of a linear model from features to labels.

    You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021, Section 4 (extended in "Ranking and Tuning Pre-trained Models",
    JMLR 2022). Each class k gets a Bayesian linear regression of its one-hot column
    y_k on the features, w ~ N(0, alpha^-1 I), y_k | F, w ~ N(F w, beta^-1 I). Its log
    evidence (the paper's closed form, Eq. 2) is::

        L(alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2pi
                         - beta/2 ||F m - y||^2 - alpha/2 m'm - 1/2 log|A|,
        A = alpha I + beta F'F,   m = beta A^-1 F' y,

    maximised over alpha and beta by MacKay's fixed point (the paper's Eq. 3 and its
    Algorithm 2): gamma = sum_i beta s_i / (alpha + beta s_i), alpha <- gamma / m'm,
    beta <- (n - gamma) / ||F m - y||^2, with s_i the eigenvalues of F'F. LogME is the
    class average of max L, divided by n. Features are used as given: no centring and
    no intercept, as in the paper.

    Why this is cheap: m and gamma depend on alpha and beta only through the ridge
    ratio alpha/beta, so one eigendecomposition of the smaller Gram matrix (F'F if
    N > D, F F' otherwise; equivalently the SVD of F) serves every class and every
    iteration, each of which then costs O(min(N, D)) per class. Stopping rules are
    ``LOGME_RATIO_TOL``, ``LOGME_EVIDENCE_TOL`` and ``LOGME_MAX_ITER``; a class that hits
    the cap is logged as a warning and scored at its last (lower-bound) evidence.

    Parameters
    ----------
    features : array of shape (N, D)
        One row per sample; any float dtype (float16 is computed in float64).
    labels : array of shape (N,)
        Class labels; at least two distinct values.

    Returns
    -------
    float
        Mean over classes of the maximum log evidence, divided by N. For features that
        carry no information it is close to the no-feature baseline
        ``mean_k (-log(p_k) - log(2 pi) - 1) / 2``, p_k the class frequencies.

    Raises
    ------
    TlpInputError
        (a ValueError) when the inputs are not a finite 2-D array and matching 1-D
        labels with at least two classes.
    """
    fit = logme_fit(features, labels)
    return float(np.mean(fit.log_evidence) / fit.n_samples)


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score: how much of the feature covariance the class means explain.

    Bao et al., "An Information-Theoretic Approach to
    Transferability in Task Transfer Learning", ICIP 2019: the H-score of a feature f
    for labels y, in the trace form the paper computes::

        H(f) = tr( cov(f)^-1 cov(E[f | y]) )

    estimated with sample covariances (both with the same normaliser, which cancels).
    The inverse is a pseudo-inverse that drops eigenvalues below
    ``D * eps * largest``: constant or collinear features (zero-variance pixels,
    dead ReLU units) would otherwise divide by rounding noise. Because
    cov(f) = within-class + between-class covariance, H lies in [0, K-1]; it is
    invariant to any invertible linear map of the features when cov(f) has full rank.

    When D approaches N the sample covariance is near-singular and H saturates at
    K-1 whatever the features (pure noise with N=40, D=200 scores exactly K-1); use
    :func:`shrinkage_h_score` there.

    Parameters
    ----------
    features : array of shape (N, D)
    labels : array of shape (N,)
        At least two distinct classes.

    Returns
    -------
    float
        The H-score, in [0, K-1] up to rounding.
    """
    features, class_index, n_classes = _check_inputs(features, labels, metric="H-score")
    centred = features - features.mean(axis=0)
    total_cov = centred.T @ centred / len(centred)
    between = _between_class_factor(centred, class_index, n_classes)
    return _trace_pinv_times_gram(total_cov, between)


def shrinkage_h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score with a Ledoit-Wolf shrinkage covariance, stable when N < D.

    Ibrahim, Ponomareva, Mazumder, "Newer is not always better: Rethinking
    transferability metrics, their peculiarities, stability and performance",
    ECML-PKDD 2022 (arXiv 2110.06893), the shrinkage-based H-score::

        H_a(f) = tr( cov_a(f)^-1 (1 - a) cov(E[f | y]) ),
        cov_a(f) = (1 - a) cov(f) + a (tr(cov(f)) / D) I,

    with the shrinkage coefficient ``a`` of Ledoit and Wolf (2004), taken from
    :func:`sklearn.covariance.ledoit_wolf` on the centred features (its ``cov_a`` is
    exactly the matrix above, with the 1/N sample covariance). The paper's point is
    that the plain H-score's poor ranking comes from inverting a badly estimated
    covariance; shrinking towards a scaled identity keeps the inverse well
    conditioned. The between-class covariance is scaled by the same (1 - a).

    Parameters
    ----------
    features : array of shape (N, D)
    labels : array of shape (N,)
        At least two distinct classes.

    Returns
    -------
    float
        The shrinkage H-score, in [0, K-1]. It approaches :func:`h_score` as the
        shrinkage coefficient goes to 0, i.e. with many samples per feature and a
        covariance far from a multiple of the identity.
    """
    features, class_index, n_classes = _check_inputs(features, labels, metric="shrinkage H-score")
    centred = features - features.mean(axis=0)
    shrunk_cov, shrinkage = ledoit_wolf(centred, assume_centered=True)
    between = _between_class_factor(centred, class_index, n_classes)
    return (1.0 - float(shrinkage)) * _trace_pinv_times_gram(shrunk_cov, between)


# --------------------------------------------------------------------------- inputs


def _check_inputs(features, labels, *, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate and convert: float64 features, class indices 0..K-1, K.

    Every score here is undefined (or silently meaningless) for a 1-D feature vector,
    mismatched lengths, a single class or NaNs, so these raise instead of returning a
    number the planner would trust.
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise TlpInputError(
            f"{metric}: features must be a 2-D array (samples x features), got shape {features.shape}; "
            "reshape with features.reshape(len(features), -1)"
        )
    if features.shape[1] == 0:
        raise TlpInputError(
            f"{metric}: features have no columns (shape {features.shape}); expected at least one feature per sample"
        )
    if labels.ndim != 1:
        raise TlpInputError(
            f"{metric}: labels must be a 1-D array with one class label per sample, got shape {labels.shape}; "
            "for one-hot labels pass labels.argmax(axis=1)"
        )
    if len(labels) != len(features):
        raise TlpInputError(
            f"{metric}: features have {len(features)} rows but labels have {len(labels)} entries; "
            "expected one label per row of features"
        )
    if features.dtype.kind not in "biuf":
        raise TlpInputError(
            f"{metric}: features must be real numbers, got dtype {features.dtype}; pass the cached float array"
        )
    features = features.astype(np.float64, copy=False)
    n_non_finite = int(np.size(features) - np.count_nonzero(np.isfinite(features)))
    if n_non_finite > 0:
        raise TlpInputError(
            f"{metric}: features contain {n_non_finite} non-finite values (NaN or inf); expected finite numbers; "
            "drop or impute those rows first"
        )
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise TlpInputError(
            f"{metric}: labels must be class labels (integers or strings), got non-integer floats such as "
            f"{float(labels[labels != np.round(labels)][0])}"
        )
    classes, class_index = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise TlpInputError(
            f"{metric}: labels hold {len(classes)} distinct class(es); at least 2 are needed to score how well "
            "features separate classes; pass labels from a data set with two or more classes"
        )
    return features, class_index.ravel(), len(classes)


def _class_indicator(class_index: np.ndarray, n_classes: int) -> scipy.sparse.csr_matrix:
    """The (K, N) one-hot matrix Y', sparse: a dense one would be K times the labels' size."""
    n_samples = len(class_index)
    return scipy.sparse.csr_matrix(
        (np.ones(n_samples), (class_index, np.arange(n_samples))), shape=(n_classes, n_samples)
    )


# --------------------------------------------------------------------------- LogME


@dataclass(frozen=True)
class _Spectrum:
    """The features seen from every class's regression, after one eigendecomposition.

    With F = U diag(sqrt(s)) V' (thin SVD), each class's one-hot column y enters the
    evidence only through z = U'y and through the part of y outside the span of F.
    """

    eigenvalues: np.ndarray  # (r,) s_i = squared singular values of F, r = min(N, D); tiny ones set to 0
    projections: np.ndarray  # (r, K) z = U'y per class, 0 where s_i was zeroed
    outside: np.ndarray  # (K,) ||y||^2 - ||z||^2: label energy no feature direction can fit
    n_samples: int
    n_features: int


@dataclass(frozen=True)
class LogMEFit:
    """Per-class result of LogME's maximisation, to check against the textbook formula."""

    alpha: np.ndarray  # (K,) prior precision of the weights at the maximum; inf = "use no feature"
    beta: np.ndarray  # (K,) noise precision at the maximum
    log_evidence: np.ndarray  # (K,) max over (alpha, beta) of log p(y_k | F), not divided by N
    iterations: int
    n_samples: int


def logme_fit(features, labels) -> LogMEFit:
    """Maximise every class's log evidence over (alpha, beta) with one shared spectrum.

    The fixed point is run on the ridge ratio alpha/beta for all classes at once; the
    final beta is the exact maximiser for that ratio (n / (||Fm - y||^2 + ratio m'm),
    which is where the paper's two updates agree), so the returned evidence is exactly
    L(alpha, beta) at the returned pair.
    """
    features, class_index, n_classes = _check_inputs(features, labels, metric="LogME")
    spectrum = _spectrum(features, _class_indicator(class_index, n_classes))
    ratio, iterations = _maximise_ratio(spectrum, n_classes)
    evidence, beta = _profile_evidence(spectrum, ratio)
    return LogMEFit(alpha=beta * ratio, beta=beta, log_evidence=evidence, iterations=iterations,
                        n_samples=spectrum.n_samples)


def _maximise_ratio(spectrum: _Spectrum, n_classes: int) -> tuple[np.ndarray, int]:
    """Iterate the fixed point on alpha/beta until every class meets a stopping rule."""
    largest = float(spectrum.eigenvalues.max())
    # Scale-free start: alpha/beta scales with the squared feature scale, so starting at
    # the mean eigenvalue makes the iterates (and the result) invariant to feature units.
    # All-zero features start (and stay) at infinity: the no-feature model.
    start = float(spectrum.eigenvalues.mean()) if largest > 0 else np.inf
    ratio = np.full(n_classes, start)
    evidence, _ = _profile_evidence(spectrum, ratio)
    converged = np.zeros(n_classes, dtype=bool)
    iteration = 0
    while iteration < LOGME_MAX_ITER and not converged.all():
        iteration += 1
        new_ratio = _clip_ratio(_mackay_step(spectrum, ratio), largest)
        new_evidence, _ = _profile_evidence(spectrum, new_ratio)
        with np.errstate(invalid="ignore"):  # inf - inf where a ratio stays at infinity
            converged = (
                (new_ratio == ratio)
                | (np.abs(new_ratio - ratio) <= LOGME_RATIO_TOL * ratio)
                | (np.abs(new_evidence - evidence) <= LOGME_EVIDENCE_TOL * spectrum.n_samples)
            )
        ratio, evidence = new_ratio, new_evidence
    if not converged.all():
        logger.warning(
            "LogME: %d of %d classes had not converged after %d iterations; their evidence is a lower bound",
            int(np.count_nonzero(~converged)), n_classes, LOGME_MAX_ITER,
        )
    return ratio, iteration


def _spectrum(features: np.ndarray, indicator: scipy.sparse.csr_matrix) -> _Spectrum:
    """Eigendecompose the smaller Gram matrix: O(N D min(N, D)), never an N x N or D x D inverse per class.

    Eigenvalues below ``max(N, D) * eps * largest`` are rounding noise of a rank-deficient
    F (constant pixels, dead units); they are set to 0, which the evidence formulas
    treat exactly as directions the features do not span.
    """
    n_samples, n_features = features.shape
    label_energy = np.asarray(indicator.sum(axis=1)).ravel()  # ||y_k||^2 = class size, for 0/1 targets
    if n_samples > n_features:
        eigenvalues, right_vectors = np.linalg.eigh(features.T @ features)
        eigenvalues = _zero_rounding_noise(eigenvalues, n_samples, n_features)
        class_sums = (indicator @ features).T  # F'Y, (D, K)
        spanned = eigenvalues > 0
        # U'y = diag(s)^-1/2 V'F'y on the spanned directions; the rest belongs to `outside`.
        projections = np.zeros((n_features, indicator.shape[0]))
        projections[spanned] = (right_vectors[:, spanned].T @ class_sums) / np.sqrt(eigenvalues[spanned])[:, None]
        outside = np.maximum(label_energy - np.sum(projections**2, axis=0), 0.0)
    else:
        eigenvalues, left_vectors = np.linalg.eigh(features @ features.T)
        eigenvalues = _zero_rounding_noise(eigenvalues, n_samples, n_features)
        projections = np.asarray((indicator @ left_vectors).T)  # U'Y; U is a full basis of R^N
        outside = np.zeros(indicator.shape[0])
    return _Spectrum(eigenvalues, projections, outside, n_samples, n_features)


def _zero_rounding_noise(eigenvalues: np.ndarray, n_samples: int, n_features: int) -> np.ndarray:
    threshold = max(n_samples, n_features) * _EPS * max(float(eigenvalues.max()), 0.0)
    return np.where(eigenvalues > threshold, eigenvalues, 0.0)


def _mackay_step(spectrum: _Spectrum, ratio: np.ndarray) -> np.ndarray:
    """One fixed-point update of alpha/beta for every class (the paper's Eq. 3).

    In the SVD basis, for ratio t = alpha/beta: the posterior mean has coordinates
    sqrt(s) z / (s + t), gamma = sum s / (s + t), and the residual F m - y has
    coordinates -z / (1 + s/t) plus the part of y outside the span.
    """
    s = spectrum.eigenvalues[:, None]
    z = spectrum.projections
    gamma = np.sum(s / (s + ratio), axis=0)
    weight_norm = np.sum(s * z**2 / (s + ratio) ** 2, axis=0)  # m'm
    residual = np.sum((z / (1.0 + s / ratio)) ** 2, axis=0) + spectrum.outside  # ||F m - y||^2
    alpha_over_beta = np.full_like(ratio, np.inf)  # m = 0: no direction fits y, the prior wins
    fits = weight_norm > 0
    alpha_over_beta[fits] = (gamma[fits] / weight_norm[fits]) * (
        residual[fits] / (spectrum.n_samples - gamma[fits]))
    return alpha_over_beta


def _clip_ratio(ratio: np.ndarray, largest: float) -> np.ndarray:
    """Keep alpha/beta where float64 can still tell it apart from its limits.

    Above largest/eps every s/(s + t) rounds to 0, so the features are ignored exactly:
    jump to infinity (the no-feature evidence). Below largest*eps the model interpolates;
    stop there rather than divide by 0.
    """
    return np.where(ratio * _EPS > largest, np.inf, np.maximum(ratio, largest * _EPS))


def _profile_evidence(spectrum: _Spectrum, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log evidence at ratio t = alpha/beta with beta at its optimum for that t; and that beta.

    Substituting alpha = beta t in the paper's Eq. 2 and the SVD gives, without any
    cancellation between large terms (so t near 0 or infinity stays accurate)::

        L = n/2 log beta - n/2 log 2pi - beta/2 E(t) - 1/2 sum_i log(1 + s_i / t),
        E(t) = ||F m - y||^2 + t m'm = sum_i z_i^2 / (1 + s_i / t) + outside,

    maximised over beta at beta = n / E(t).
    """
    n = spectrum.n_samples
    s = spectrum.eigenvalues[:, None]
    fit_error = np.sum(spectrum.projections**2 / (1.0 + s / ratio), axis=0) + spectrum.outside
    beta = n / fit_error
    evidence = 0.5 * n * (np.log(beta) - np.log(2 * np.pi) - 1.0) - 0.5 * np.sum(np.log1p(s / ratio), axis=0)
    return evidence, beta


# --------------------------------------------------------------------------- H-scores


def _between_class_factor(centred: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """M of shape (K, D) with M'M = cov(E[f | y]) (the 1/N sample covariance of class means).

    Row k is sqrt(N_k / N) (mean_k - mean); the features are already centred, so mean = 0.
    Working with M keeps the between-class covariance at rank K-1 instead of a D x D matrix.
    """
    indicator = _class_indicator(class_index, n_classes)
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    class_means = (indicator @ centred) / counts[:, None]
    return np.sqrt(counts / len(centred))[:, None] * class_means


def _trace_pinv_times_gram(cov: np.ndarray, factor: np.ndarray) -> float:
    """tr(cov^+ M'M) = sum over kept eigenpairs (w, v) of cov of ||M v||^2 / w.

    One symmetric eigendecomposition serves as a numerically safe pseudo-inverse: the
    eigenvalues below ``D * eps * largest`` are rounding noise and are dropped.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    kept = eigenvalues > len(cov) * _EPS * max(float(eigenvalues.max()), 0.0)
    projected = factor @ eigenvectors[:, kept]
    return float(np.sum(np.sum(projected**2, axis=0) / eigenvalues[kept]))
