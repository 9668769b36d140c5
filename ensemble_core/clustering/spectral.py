"""Spectral clustering of the task affinity (``clustering.method: spectral``), the baseline to
the SDP (stage 3)."""
from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
from pydantic import Field

from .base import (ClusteringConfig, ClusteringMethod, Estimator, _as_matrix, _check_m,
                   _groups_to_labels, centered_affinity, labels_to_groups,
                   register_clustering_method)

__all__ = ["SpectralClustering", "spectral_cluster", "SpectralConfig"]


def spectral_cluster(T, m: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Spectral-clustering baseline: normalized affinity → top-m eigenvectors → k-means.

    The row-centered symmetric affinity is min-max scaled to [0, 1] off the diagonal (W_uu = 0),
    normalized as D^{-1/2} W D^{-1/2}; the rows of its top-m eigenvectors are unit-normalized
    (Ng–Jordan–Weiss) and clustered with scipy's k-means (k-means++ init, ``n_init`` seeded
    restarts, lowest distortion wins). Deterministic for a given seed; canonical labels.
    """
    from scipy.cluster.vq import kmeans2, ClusterError

    mat = _as_matrix(T)
    n = mat.shape[0]
    _check_m(m, n)
    if m == 1:
        return np.zeros(n, np.int64)
    if m == n:
        return np.arange(n, dtype=np.int64)
    A = centered_affinity(mat)
    off = ~np.eye(n, dtype=bool)
    lo, hi = float(A[off].min()), float(A[off].max())
    W = np.zeros((n, n)) if hi == lo else (A - lo) / (hi - lo)
    W[~off] = 0.0
    deg = W.sum(axis=1) + 1e-12
    L = W / np.sqrt(deg)[:, None] / np.sqrt(deg)[None, :]
    _, vecs = np.linalg.eigh(L)
    U = vecs[:, -m:]
    U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    # fix eigenvector signs so the embedding (hence k-means) is reproducible across LAPACKs
    U = U * np.where(U[np.argmax(np.abs(U), axis=0), np.arange(m)] < 0, -1.0, 1.0)
    rng = np.random.default_rng(seed)
    best, best_labels = math.inf, None
    for _ in range(n_init):
        sub = np.random.default_rng(int(rng.integers(2**63 - 1)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cent, lab = kmeans2(U, m, iter=50, minit="++", missing="raise", rng=sub)
        except ClusterError:
            continue
        if len(np.unique(lab)) != m:
            continue
        inertia = float(((U - cent[lab]) ** 2).sum())
        if inertia < best - 1e-12:
            best, best_labels = inertia, lab
    if best_labels is None:
        raise RuntimeError(f"k-means found no partition into m={m} non-empty groups of n={n} "
                           "tasks")
    return _groups_to_labels(labels_to_groups(best_labels), n)


class SpectralClustering(Estimator):
    """Estimator wrapper of :func:`spectral_cluster` (baseline to the SDP)."""

    def __init__(self, m: int, seed: int = 0, n_init: int = 10):
        self.m = m
        self.seed = seed
        self.n_init = n_init

    def fit(self, T) -> "SpectralClustering":
        self.labels_ = spectral_cluster(T, self.m, seed=self.seed, n_init=self.n_init)
        self.groups_ = labels_to_groups(self.labels_)
        self.m_ = int(self.m)
        return self


class SpectralConfig(ClusteringConfig):
    method: Literal["spectral"] = "spectral"
    n_init: int = Field(10, ge=1)  # k-means restarts


@register_clustering_method
class Spectral(ClusteringMethod):
    name = "spectral"
    config = SpectralConfig
    needs_m = True

    def group(self, T, m, cfg: SpectralConfig, seed: int):
        est = SpectralClustering(m, seed=seed, n_init=cfg.n_init).fit(T)
        return [list(g) for g in est.groups_], {"method": "spectral"}
