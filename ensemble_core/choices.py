"""The per-example choice math, in one place (docs/design.md, "Choices").

Every example s has C_s ≥ 2 answer choices and one gold choice. Its scores h_c(s) become
probabilities by a softmax over *its own* choices only, so the rows of a batch are ragged: the rows
of one example are contiguous, examples follow each other. :class:`Choices` holds that layout
and computes, vectorized over examples:

    p_c(s)  = exp(z_c(s)) / Σ_c' exp(z_c'(s))              (softmax)
    lse(s)  = log Σ_c exp(z_c(s))                           (log-sum-exp)
    ℓ(s)    = lse(s) − z_gold(s)                             (log loss)
    r_c(s)  = 1[c = gold] − p_c(s)                           (residual: −∂ℓ/∂z_c)
    ŷ(s)    = argmax_c z_c(s), ties to the lowest c          (prediction)

Every stage that needs one of these uses this module: the surrogate (stage 2), training and
evaluation (stages 4, 6), boosting (stage 5), the ensemble weights and predictions (stage 5).
``segment_log_softmax`` is the same in torch, for the training loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["Choices", "flatten", "segment_log_softmax"]


class Choices:
    """The ragged layout of R rows over N examples (rows of one example contiguous), with the
    gold row of each example when labels are known."""

    def __init__(self, n_choices: Sequence[int], gold: Sequence[int] | None = None):
        n = np.asarray(n_choices, dtype=np.int64).reshape(-1)
        if len(n) and n.min() < 1:
            raise ValueError(f"every example needs at least one choice, got {n.min()}")
        self.n_choices = n
        self.starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) if len(n) \
            else np.zeros(0, np.int64)
        self.n_rows = int(n.sum())
        self.example_of_row = np.repeat(np.arange(len(n)), n)
        self.slot = np.arange(self.n_rows) - self.starts[self.example_of_row]  # choice index
        self.gold_rows = None
        if gold is not None:
            g = np.asarray(gold, dtype=np.int64).reshape(-1)
            if len(g) != len(n):
                raise ValueError(f"{len(g)} gold labels for {len(n)} examples")
            if len(g) and (g.min() < 0 or np.any(g >= n)):
                bad = int(np.flatnonzero((g < 0) | (g >= n))[0])
                raise ValueError(f"example {bad}: gold index {g[bad]} outside 0..{n[bad] - 1}")
            self.gold_rows = self.starts + g

    @classmethod
    def from_offsets(cls, offsets: np.ndarray, gold_rows: np.ndarray | None = None) -> "Choices":
        """From row offsets [N + 1] (``FeatureTable.offsets``) and absolute gold rows."""
        offsets = np.asarray(offsets, np.int64)
        gold = None if gold_rows is None else np.asarray(gold_rows, np.int64) - offsets[:-1]
        return cls(np.diff(offsets), gold)

    @classmethod
    def concat(cls, parts: Sequence["Choices"]) -> "Choices":
        """The layout of several layouts' rows stacked in order."""
        n = np.concatenate([p.n_choices for p in parts]) if parts else np.zeros(0, np.int64)
        if parts and all(p.gold_rows is not None for p in parts):
            gold = np.concatenate([p.gold_rows - p.starts for p in parts])
            return cls(n, gold)
        return cls(n)

    @property
    def n_examples(self) -> int:
        return len(self.n_choices)

    def _gold(self) -> np.ndarray:
        if self.gold_rows is None:
            raise ValueError("this layout has no gold labels")
        return self.gold_rows

    def log_softmax_parts(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lse [N], p [R]): log-sum-exp per example and softmax per row. Stable: each
        example's maximum is subtracted before exponentiating."""
        z = np.asarray(z, dtype=np.float64)
        zmax = np.maximum.reduceat(z, self.starts)
        e = np.exp(z - zmax[self.example_of_row])
        s = np.add.reduceat(e, self.starts)
        return zmax + np.log(s), e / s[self.example_of_row]

    def softmax(self, z: np.ndarray) -> np.ndarray:
        if self.n_rows == 0:
            return np.zeros(0)
        return self.log_softmax_parts(z)[1]

    def losses(self, z: np.ndarray) -> np.ndarray:
        """[N] log loss ℓ(s) = lse(s) − z_gold(s) of every example."""
        z = np.asarray(z, dtype=np.float64)
        lse, _ = self.log_softmax_parts(z)
        return lse - z[self._gold()]

    def log_loss(self, z: np.ndarray) -> float:
        """Mean log loss over examples."""
        return float(np.mean(self.losses(z)))

    def residuals(self, z: np.ndarray) -> np.ndarray:
        """[R] r = onehot(gold) − softmax(z): the negative gradient of ℓ w.r.t. the scores."""
        r = -self.softmax(z)
        r[self._gold()] += 1.0
        return r

    def argmax(self, z: np.ndarray) -> np.ndarray:
        """[N] the highest-scoring choice of every example (ties: the lowest choice index)."""
        if self.n_rows == 0:
            return np.zeros(0, np.int64)
        z = np.asarray(z)
        zmax = np.maximum.reduceat(z, self.starts)
        is_max = z >= zmax[self.example_of_row]
        big = np.iinfo(np.int64).max
        return np.minimum.reduceat(np.where(is_max, self.slot, big), self.starts)

    def correct(self, z: np.ndarray) -> np.ndarray:
        """[N] bool: the prediction is the gold choice."""
        return self.argmax(z) == self._gold() - self.starts

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Rows back into one vector per example."""
        flat = np.asarray(flat)
        return [flat[a:a + n] for a, n in zip(self.starts, self.n_choices)]


def flatten(per_example: Sequence[Sequence[float]], gold: Sequence[int] | None = None,
            dtype=np.float64) -> tuple[np.ndarray, Choices]:
    """One score vector per example -> (rows [R], their layout)."""
    n = [len(v) for v in per_example]
    flat = (np.concatenate([np.asarray(v, dtype) for v in per_example]) if per_example
            else np.zeros(0, dtype))
    return flat, Choices(n, gold)


def segment_log_softmax(scores, n_choices: Sequence[int]):
    """torch: log softmax of each example's choice scores (rows contiguous per example);
    differentiable, for the training loss (stage 4)."""
    import torch

    n = torch.as_tensor(list(n_choices), device=scores.device)
    ex = torch.repeat_interleave(torch.arange(len(n), device=scores.device), n)
    mx = torch.full((len(n),), -torch.inf, device=scores.device, dtype=scores.dtype)
    mx = mx.scatter_reduce(0, ex, scores.detach(), reduce="amax")
    z = torch.exp(scores - mx[ex])
    lse = torch.zeros(len(n), device=scores.device, dtype=scores.dtype).index_add(0, ex, z).log()
    return scores - mx[ex] - lse[ex]
