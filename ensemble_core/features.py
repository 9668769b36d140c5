"""In-memory form of the stage-1 gradient features (DESIGN.md step 1).

One row per (example, answer choice), rows of one example contiguous and in choice order:

    task, split, example_id, choice, is_gold, output h_c(s) at θ*, grad g̃_c(s) = Pᵀ ∇h_c(s) (d floats)

This is the only contract between stage 1 (gradients) and stage 2 (surrogate, boosting).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FeatureTable:
    task: str
    split: str
    example_id: np.ndarray  # [R] str (object)
    choice: np.ndarray  # [R] int32, 0..C_i-1 within an example
    is_gold: np.ndarray  # [R] bool, exactly one True per example
    output: np.ndarray  # [R] float32, h_c(s) at θ*
    grad: np.ndarray  # [R, d] float32, projected gradient
    offsets: np.ndarray = field(default=None)  # [n_examples + 1] row offsets, derived

    def __post_init__(self):
        r = len(self.choice)
        for name in ("example_id", "is_gold", "output"):
            if len(getattr(self, name)) != r:
                raise ValueError(f"FeatureTable {self.task}/{self.split}: column {name} has "
                                 f"{len(getattr(self, name))} rows, expected {r}")
        if self.grad.ndim != 2 or self.grad.shape[0] != r:
            raise ValueError(f"FeatureTable {self.task}/{self.split}: grad has shape "
                             f"{self.grad.shape}, expected ({r}, d)")
        if self.offsets is None:
            starts = np.flatnonzero(np.asarray(self.choice) == 0)
            object.__setattr__(self, "offsets", np.append(starts, r).astype(np.int64))
        gold_per_example = np.add.reduceat(self.is_gold.astype(np.int64), self.offsets[:-1]) \
            if r else np.zeros(0, np.int64)
        if r and not np.all(gold_per_example == 1):
            bad = int(np.flatnonzero(gold_per_example != 1)[0])
            raise ValueError(f"FeatureTable {self.task}/{self.split}: example "
                             f"{self.example_id[self.offsets[bad]]!r} has {gold_per_example[bad]} "
                             "gold choices, expected exactly 1")

    @property
    def d(self) -> int:
        return int(self.grad.shape[1])

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_choices(self) -> np.ndarray:
        """[n_examples] number of answer choices of each example."""
        return np.diff(self.offsets)

    @property
    def gold_index(self) -> np.ndarray:
        """[n_examples] index (within the example) of the gold choice."""
        return self.choice[self.is_gold].astype(np.int64)

    @property
    def example_index(self) -> np.ndarray:
        """[R] example number of each row (0..n_examples-1)."""
        return np.repeat(np.arange(self.n_examples), self.n_choices)

    def select_examples(self, idx: np.ndarray) -> "FeatureTable":
        idx = np.asarray(idx, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) \
            if len(idx) else np.zeros(0, np.int64)
        return FeatureTable(self.task, self.split, self.example_id[rows], self.choice[rows],
                            self.is_gold[rows], self.output[rows], self.grad[rows])
