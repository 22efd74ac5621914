"""Transferability scores: real numbers on small generated sets and on digits, no mocks.

LogME is checked against a slow textbook evaluation of the evidence (You et al. 2021,
the closed form with an explicit D x D matrix), the H-score against Bao et al.'s
definition with np.cov and np.linalg.pinv.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tlp.transferability import logme_fit, h_score, logme, shrinkage_h_score

SCORES = [logme, h_score, shrinkage_h_score]


def _separable(n_samples: int, n_features: int, n_classes: int = 3, *, shift: float = 4.0, seed: int = 0):
    """Noise features, with the first n_classes columns shifted by `shift` for their own class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % n_classes
    features = rng.standard_normal((n_samples, n_features))
    features[:, :n_classes] += shift * np.eye(n_classes)[labels]
    return features, labels


def _clustered(n_samples: int, n_features: int, n_classes: int = 3, *, spread: float = 0.5, seed: int = 0):
    """Class centres drawn at random in every dimension (signal spread thinly over all features), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_samples) % n_classes
    centres = spread * rng.standard_normal((n_classes, n_features))
    return centres[labels] + rng.standard_normal((n_samples, n_features)), labels


def _noise(n_samples: int, n_features: int, n_classes: int = 3, *, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_samples, n_features)), np.arange(n_samples) % n_classes


def _textbook_log_evidence(features, target, alpha, beta):
    """log p(y | F, alpha, beta) exactly as printed in the LogME paper: no SVD, no shortcuts."""
    n, d = features.shape
    a_matrix = alpha * np.eye(d) + beta * features.T @ features
    mean = beta * np.linalg.solve(a_matrix, features.T @ target)
    sign, log_det = np.linalg.slogdet(a_matrix)
    assert sign > 0
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * np.sum((features @ mean - target) ** 2) - alpha / 2 * mean @ mean - log_det / 2)


def _no_feature_baseline(labels) -> float:
    """Per-sample LogME of features that explain nothing: each class column fitted by noise alone."""
    _, counts = np.unique(labels, return_counts=True)
    frequencies = counts / len(labels)
    return float(np.mean(-0.5 * np.log(frequencies) - 0.5 * np.log(2 * np.pi) - 0.5))


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("features, labels, message", [
    (np.zeros(10), np.arange(10) % 2, "features must be a 2-D array"),
    (np.zeros((10, 3)), np.zeros((10, 2)), "labels must be a 1-D array"),
    (np.zeros((10, 3)), np.arange(9) % 2, "features have 10 rows but labels have 9 entries"),
    (np.ones((10, 3)), np.zeros(10, dtype=int), "labels hold 1 distinct class"),
    (np.full((4, 2), np.nan), np.arange(4) % 2, "features contain 8 non-finite values"),
    (np.zeros((4, 0)), np.arange(4) % 2, "features have no columns"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(score, features, labels, message):
    with pytest.raises(ValueError, match=message):
        score(features, labels)


@pytest.mark.parametrize("score", SCORES)
def test_float16_cache_features_are_scored_in_float64(score):
    features, labels = _separable(90, 6)
    half = features.astype(np.float16)
    assert score(half, labels) == pytest.approx(score(half.astype(np.float64), labels), rel=1e-12)


# ----------------------------------------------------------------------------- LogME


def test_logme_prefers_separable_features_and_noise_sits_at_the_no_feature_baseline():
    separable, labels = _separable(600, 20)
    noise, noise_labels = _noise(600, 20)
    baseline = _no_feature_baseline(noise_labels)
    assert logme(separable, labels) > logme(noise, noise_labels) + 0.2
    # Noise cannot do worse than ignoring the features (up to the stopping tolerance),
    # and a chance fit of 20 noise columns buys only a little.
    assert baseline - 1e-6 <= logme(noise, noise_labels) <= baseline + 0.01


def test_logme_rises_when_an_informative_column_is_added():
    noise, labels = _noise(500, 10)
    rng = np.random.default_rng(7)
    informative = (labels == 0) + 0.3 * rng.standard_normal(len(labels))
    assert logme(np.column_stack([noise, informative]), labels) > logme(noise, labels) + 0.05


def test_logme_ignores_sample_order_column_order_and_feature_units():
    features, labels = _separable(150, 8, shift=1.5)
    reference = logme(features, labels)
    rng = np.random.default_rng(11)
    rows, columns = rng.permutation(150), rng.permutation(8)
    assert logme(features[rows], labels[rows]) == pytest.approx(reference, rel=1e-9)
    assert logme(features[:, columns], labels) == pytest.approx(reference, rel=1e-9)
    assert logme(1000.0 * features, labels) == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("n_samples, n_features", [(40, 60), (120, 12)], ids=["N<D", "N>D"])
def test_logme_evidence_matches_the_textbook_formula_at_its_maximum(n_samples, n_features):
    features, labels = _separable(n_samples, n_features)
    fit = logme_fit(features, labels)
    # An interior maximum, so the comparison exercises both alpha and beta.
    assert np.all(np.isfinite(fit.alpha)) and np.all(fit.beta < 1e4)
    for k, (alpha, beta) in enumerate(zip(fit.alpha, fit.beta)):
        target = (labels == k).astype(float)
        expected = _textbook_log_evidence(features, target, alpha, beta)
        assert fit.log_evidence[k] == pytest.approx(expected, rel=1e-9, abs=1e-8)
        # ...and it is the maximum: moving alpha or beta by 10% either way lowers it.
        for factor in (0.9, 1.1):
            assert _textbook_log_evidence(features, target, alpha * factor, beta) < expected
            assert _textbook_log_evidence(features, target, alpha, beta * factor) < expected
    assert logme(features, labels) == pytest.approx(fit.log_evidence.mean() / n_samples, rel=1e-12)


# ----------------------------------------------------------------------------- H-scores


def test_h_score_equals_the_definition_with_pinv():
    features, labels = _separable(60, 5, shift=1.0)
    class_means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    conditional_mean = class_means[labels]  # E[f | y] for every sample
    expected = np.trace(np.linalg.pinv(np.cov(features.T)) @ np.cov(conditional_mean.T))
    assert h_score(features, labels) == pytest.approx(expected, rel=1e-10)


def test_h_score_is_invariant_to_invertible_linear_maps_and_prefers_separable_features():
    features, labels = _separable(200, 6, shift=1.0)
    rng = np.random.default_rng(5)
    mixing = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    offset = rng.standard_normal(6)
    assert h_score(features @ mixing + offset, labels) == pytest.approx(h_score(features, labels), rel=1e-8)
    noise, noise_labels = _noise(200, 6)
    assert h_score(features, labels) > 5 * h_score(noise, noise_labels)
    assert 0.0 <= h_score(noise, noise_labels) <= h_score(features, labels) <= 2.0  # K - 1 = 2


def test_shrinkage_h_score_stays_informative_when_samples_are_fewer_than_features():
    separable, labels = _clustered(40, 200)
    noise, noise_labels = _noise(40, 200)
    # The plain H-score saturates at K - 1 = 2 for noise and signal alike...
    assert h_score(noise, noise_labels) == pytest.approx(2.0, abs=1e-6)
    assert h_score(separable, labels) == pytest.approx(2.0, abs=1e-6)
    # ...the shrinkage one stays finite and tells them apart.
    shrunk_separable, shrunk_noise = shrinkage_h_score(separable, labels), shrinkage_h_score(noise, noise_labels)
    assert np.isfinite(shrunk_separable) and np.isfinite(shrunk_noise)
    assert shrunk_separable > 2 * shrunk_noise


def test_shrinkage_h_score_approaches_the_plain_one_with_plenty_of_samples():
    # Unequal column scales: far from the scaled-identity target, so Ledoit-Wolf's
    # coefficient (and the gap between the two scores) falls as samples accumulate.
    column_scales = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    gaps = []
    for n_samples in (300, 20000):
        features, labels = _separable(n_samples, 5, shift=1.0)
        plain = h_score(features * column_scales, labels)
        gaps.append(abs(shrinkage_h_score(features * column_scales, labels) - plain) / plain)
    assert gaps[1] < gaps[0] / 5 and gaps[1] < 0.01


# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("score", SCORES)
def test_digits_pixels_score_real_labels_above_shuffled_in_well_under_a_second(score):
    pixels, labels = load_digits(return_X_y=True)
    shuffled = np.random.default_rng(0).permutation(labels)
    start = time.perf_counter()
    real, chance = score(pixels, labels), score(pixels, shuffled)
    elapsed = time.perf_counter() - start
    assert real > chance
    assert elapsed < 1.0, f"{score.__name__} took {elapsed:.2f} s for two digits evaluations"
