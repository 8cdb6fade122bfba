"""Distribution and classification metrics, written out so their math can be checked against known answers.

- FID: Fréchet distance between Gaussian fits of two feature sets,
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)``. The trace of the matrix square
  root is taken from the eigenvalues of ``S1^1/2 S2 S1^1/2`` (symmetric PSD, so ``eigh`` in
  float64 is exact and stable); no scipy needed (scipy is not a dependency of the project).
- KID: unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)^3``,
  averaged over random subsets (mean ± std); kernel entries in float32, sums in float64.
  Unbiased means the estimate for two samples of one distribution is centred on 0 and
  can be negative.
- Intra-class diversity: the mean pairwise Euclidean distance within a feature set, and its
  ratio between generated and real faces of one class (1.0 = as varied as real; a G that
  ignores z draws one face per class and scores 0).
- Confusion matrices and per-class accuracy for the classifier-based measures.

The linear algebra runs in torch on the CPU, not numpy: torch honours
``torch.set_num_threads``, while numpy's OpenBLAS starts its own threads, which on a
machine busy with other work made KID ten times slower.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_f64(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {arr.shape}")
    return arr


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of (N, D) features, in float64."""
    f = _as_f64(features)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    ft = _t(f)
    centred = ft - ft.mean(0)
    return ft.mean(0).numpy(), (centred.T @ centred / (f.shape[0] - 1)).numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance² between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, covariances {s1.shape} vs {s2.shape}")
    t1, t2 = _t(s1), _t(s2)
    r1 = _sqrt_psd(t1)
    inner = r1 @ t2 @ r1
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(eig.clamp(min=0).sqrt().sum())
    diff = mu1 - mu2
    return float(max(float(diff @ diff) + float(t1.trace()) + float(t2.trace()) - 2 * tr_covmean, 0.0))


def fid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """FID between two feature sets (any feature space: say which one when you report it)."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _poly_kernel_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(sum, trace) of the cubic kernel matrix; entries in float32 (4x faster), sums in float64."""
    k = (x @ y.T / x.shape[1] + 1.0).pow_(3).double()
    return float(k.sum()), float(k.diagonal().sum())


def mmd2_unbiased(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Unbiased MMD² (diagonals of the within-set kernels excluded) with the cubic polynomial kernel."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).float()
    m, n = x.shape[0], y.shape[0]
    (sum_xx, tr_xx), (sum_yy, tr_yy), (sum_xy, _) = (_poly_kernel_sums(x, x), _poly_kernel_sums(y, y),
                                                      _poly_kernel_sums(x, y))
    return (sum_xx - tr_xx) / (m * (m - 1)) + (sum_yy - tr_yy) / (n * (n - 1)) - 2 * sum_xy / (m * n)


def kid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID as (mean, std) of unbiased MMD² over ``subsets`` random subsets drawn without replacement.

    ``subset_size`` shrinks to the smaller set's size when the sets are small.
    """
    a, b = _as_f64(features_a), _as_f64(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    at, bt = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    vals = np.array([mmd2_unbiased(at[torch.from_numpy(rng.choice(a.shape[0], size, replace=False))],
                                   bt[torch.from_numpy(rng.choice(b.shape[0], size, replace=False))])
                     for _ in range(subsets)])
    return float(vals.mean()), float(vals.std())


def mean_pairwise_distance(features: torch.Tensor | np.ndarray) -> float:
    """Mean Euclidean distance over all pairs i < j of (N, D) features (0 for identical rows)."""
    f = torch.from_numpy(_as_f64(features))
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for pairwise distances, got {n}")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


def confusion_matrix(y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    t = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred.cpu() if isinstance(y_pred, torch.Tensor) else y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} labels but {p.shape[0]} predictions")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy_from_confusion(cm: np.ndarray) -> tuple[float, list[float | None]]:
    """Overall accuracy and per-class recall (None for a class with no samples)."""
    total = cm.sum()
    overall = float(np.trace(cm) / total) if total else float("nan")
    rows = cm.sum(1)
    per_class = [float(cm[i, i] / rows[i]) if rows[i] else None for i in range(cm.shape[0])]
    return overall, per_class
