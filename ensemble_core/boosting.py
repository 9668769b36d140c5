"""Gradient boosting of a group's ensemble with first-order adapters (Algorithm 2, Appendix A.2).

A group's ensemble scores an example's choices as h(s) = h_G(s) + Σ_k (h_k(s) − h0(s)), where
h_G is the group's fine-tuned adapter, h0 the base model at θ* and h_k a boosting adapter. A
boosting step fits the residuals r_c(s) = 1[c = gold] − p_c(s) — the negative gradient of the log
loss w.r.t. the scores — with the first-order model on the stage-1 projected gradients,
g̃(s)ᵀx ≈ r(s): x̂ = argmin_x mean_(s,c) (r_c(s) − g̃_c(s)ᵀx)² + λ‖x‖² (ridge; closed form in d
dimensions), and takes a step of size η: the boosting adapter is the real PEFT adapter
θ* + η·P x̂, so h_k − h0 ≈ η·g̃ᵀx̂ while the adapter stays in the first-order regime.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .features import FeatureTable


def softmax_rows(scores: np.ndarray, n_choices: Sequence[int]) -> np.ndarray:
    """Softmax over each example's choices; rows contiguous per example."""
    out = np.empty_like(scores, dtype=np.float64)
    i = 0
    for n in n_choices:
        z = scores[i:i + n] - scores[i:i + n].max()
        e = np.exp(z)
        out[i:i + n] = e / e.sum()
        i += n
    return out


def log_loss(scores: np.ndarray, n_choices: Sequence[int], gold_rows: np.ndarray) -> float:
    p = softmax_rows(scores, n_choices)
    return float(-np.mean(np.log(np.clip(p[gold_rows], 1e-12, None))))


def residuals(scores: np.ndarray, n_choices: Sequence[int], gold_rows: np.ndarray) -> np.ndarray:
    """r = onehot(gold) − softmax(scores): the negative gradient of the log loss."""
    r = -softmax_rows(scores, n_choices)
    r[gold_rows] += 1.0
    return r


def fit_residual_adapter(tables: Sequence[FeatureTable], residual: np.ndarray,
                         l2: float = 1e-3) -> np.ndarray:
    """Ridge regression of the residuals on the projected gradients (rows of ``tables`` in
    order): x̂ = (GᵀG/N + λI)⁻¹ Gᵀr/N."""
    G = np.concatenate([t.grad for t in tables]).astype(np.float64)
    if G.shape[0] != residual.shape[0]:
        raise ValueError(f"{residual.shape[0]} residuals for {G.shape[0]} gradient rows")
    N, d = G.shape
    A = G.T @ G / N + l2 * np.eye(d)
    return np.linalg.solve(A, G.T @ residual / N)


def gold_rows_of(tables: Sequence[FeatureTable]) -> np.ndarray:
    offs, rows = 0, []
    for t in tables:
        rows.append(np.flatnonzero(t.is_gold) + offs)
        offs += len(t.choice)
    return np.concatenate(rows)
