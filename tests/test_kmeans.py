"""The runtime 1-D k-means equals scikit-learn's KMeans(n_clusters=2, random_state=42)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cellsam_trt.prompts import dynamic_threshold, kmeans_1d_centres

sklearn_cluster = pytest.importorskip("sklearn.cluster", reason="scikit-learn (the dev extra) is the reference")


def sklearn_threshold(scores, bbox_threshold=0.4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        km = sklearn_cluster.KMeans(n_clusters=2, random_state=42).fit(scores.reshape(-1, 1))
    return 0.66 * bbox_threshold + 0.33 * np.mean(km.cluster_centers_), km.cluster_centers_.ravel()


def score_vector(rng, i):
    """Score vectors of the kinds a detector emits: flat, bimodal, trimodal, saturated, tiny."""
    n = [3500, int(rng.integers(2, 60)), int(rng.integers(60, 4000))][i % 3]
    kind = i % 7
    if kind == 0:
        x = rng.random(n)
    elif kind == 1:
        x = 1 / (1 + np.exp(-rng.normal(-2, 1, n)))
    elif kind == 2:
        x = np.concatenate([rng.normal(0.1, 0.02, n), rng.normal(0.8, 0.05, max(1, n // 20))])
    elif kind == 3:
        x = np.concatenate([rng.normal(0.1, 0.02, n), rng.normal(0.5, 0.05, n // 3), rng.normal(0.9, 0.05, n // 3)])
    elif kind == 4:
        x = rng.beta(0.5, 0.5, n)
    elif kind == 5:
        x = 1 / (1 + np.exp(-rng.normal(-1.8, 0.01, n)))  # a random checkpoint: nearly equal scores
    else:
        x = np.round(rng.random(n) * 4) / 4  # heavy ties
    return np.sort(np.clip(x, 0, 1).astype(np.float32))[::-1].copy()


def test_1000_random_score_vectors_match_sklearn():
    rng = np.random.default_rng(20261121)
    worst = 0.0
    for i in range(1000):
        x = score_vector(rng, i)
        ref_thr, _ = sklearn_threshold(x)
        thr, _ = dynamic_threshold(x, 0.4)
        worst = max(worst, abs(thr - ref_thr))
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("bbox_threshold", [0.2, 0.4, 0.6])
def test_threshold_formula(bbox_threshold):
    x = score_vector(np.random.default_rng(3), 1)
    ref, _ = sklearn_threshold(x, bbox_threshold)
    assert abs(dynamic_threshold(x, bbox_threshold)[0] - ref) <= 1e-6


def test_centres_in_estimator_order_and_deterministic():
    x = score_vector(np.random.default_rng(5), 2)
    _, ref = sklearn_threshold(x)
    a, b = kmeans_1d_centres(x), kmeans_1d_centres(x)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref, atol=1e-6)


def test_fewer_than_two_scores_use_the_plain_threshold():
    assert dynamic_threshold(np.array([0.9], np.float32), 0.4) == (0.4, None)
    assert dynamic_threshold(np.zeros(0, np.float32), 0.4) == (0.4, None)


def test_constant_scores():
    x = np.full(100, 0.25, np.float32)
    ref, _ = sklearn_threshold(x)
    assert abs(dynamic_threshold(x)[0] - ref) <= 1e-7
