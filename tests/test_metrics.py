"""FID, KID and confusion matrices against answers known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bicogan_dist.evaluate.metrics import (accuracy_from_confusion, confusion_matrix, fid, frechet_distance,
                                           gaussian_stats, kid, mmd2_unbiased)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    d = 8
    s = random_spd(d, rng)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Same covariance: only the means differ.
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-9)
    # Scaled covariance k²S: tr(S) + k² tr(S) - 2k tr(S) = (1 - k)² tr(S).
    k = 1.7
    assert frechet_distance(mu1, s, mu1, k * k * s) == pytest.approx((1 - k) ** 2 * np.trace(s), rel=1e-9)
    # Diagonal covariances: sum of (sigma1 - sigma2)² plus the mean term.
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expect = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expect, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    d = 12
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = linalg.sqrtm(s1 @ s2).real
    expect = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-7)


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.0]), np.diag([1.0, 0.5, 0.5, 3.0])
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    assert fid(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)
    mu, cov = gaussian_stats(a)
    assert np.allclose(mu, mu1, atol=0.02) and np.allclose(cov, s1, atol=0.03)


def test_mmd2_unbiased_matches_its_definition():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    syy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    sxy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert mmd2_unbiased(x, y) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-6)  # float32 kernel entries


def test_kid_is_unbiased_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    mean, std = kid(a, b, subsets=50, subset_size=200, seed=0)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3  # centred on zero ...
    values = [mmd2_unbiased(a[i * 100:(i + 1) * 100], b[i * 100:(i + 1) * 100]) for i in range(20)]
    assert min(values) < 0  # ... so single estimates go below zero (a biased estimator never would)
    shifted = b + 0.5
    mean_s, std_s = kid(a, shifted, subsets=50, subset_size=200, seed=0)
    assert mean_s > 0 and mean_s > 10 * max(std, abs(mean))
    assert kid(a, b, subsets=10, subset_size=100, seed=7) == kid(a, b, subsets=10, subset_size=100, seed=7)


def test_kid_subset_size_shrinks_to_small_sets():
    rng = np.random.default_rng(6)
    mean, std = kid(rng.normal(size=(30, 4)), rng.normal(size=(50, 4)), subsets=5, subset_size=1000)
    assert np.isfinite(mean) and np.isfinite(std)


def test_confusion_matrix_and_accuracy():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    overall, per_class = accuracy_from_confusion(cm)
    assert overall == pytest.approx(4 / 6)
    assert per_class == [0.5, 1.0, pytest.approx(2 / 3), None]
    with pytest.raises(ValueError):
        confusion_matrix([0, 5], [0, 1], 4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
