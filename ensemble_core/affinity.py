"""Stage 3: task affinity from the subset surrogates — eq. (1) of the paper (docs/design.md,
"Stage 3").

    T_ij = 1/n_ij · Σ_{S sampled, i ∈ S, j ∈ S} f̂_i(S),    T_ii = mean of f̂_i(S) over S ∋ i,

where f̂_i(S) is the surrogate fitted on the tasks of S, evaluated on task i's validation set, and
n_ij the number of sampled subsets containing both tasks. T is not symmetric (row i is always
measured on task i); the clustering symmetrizes it.

Orientation: larger T_ij means "training with j helps i". For ``metric="accuracy"`` f̂ is the
accuracy as is; for ``metric="loss"`` f̂ is the NEGATIVE validation loss (lower loss = higher
affinity).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Affinity", "task_affinity"]

_METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class Affinity:
    """Task affinity matrix T (eq. 1) with the co-occurrence counts n_ij.

    ``matrix[i, j]``: mean oriented performance on task i over the subsets containing i and j
    (larger = better). ``counts[i, j]``: number of such subsets (``counts[i, i]``: subsets with i).
    """

    names: list
    matrix: np.ndarray
    counts: np.ndarray
    metric: str

    def __post_init__(self):
        n = len(self.names)
        m = np.asarray(self.matrix, np.float64)
        c = np.asarray(self.counts, np.int64)
        if m.shape != (n, n) or c.shape != (n, n):
            raise ValueError(f"Affinity for {n} tasks needs ({n},{n}) matrix and counts, got "
                             f"{m.shape} and {c.shape}")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}")
        object.__setattr__(self, "names", [str(x) for x in self.names])
        object.__setattr__(self, "matrix", m)
        object.__setattr__(self, "counts", c)

    @property
    def n_tasks(self) -> int:
        return len(self.names)

    def to_json(self) -> str:
        return json.dumps({
            "names": self.names,
            "metric": self.metric,
            "orientation": "larger is better" + (" (negative validation loss)"
                                                 if self.metric == "loss" else ""),
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "counts": [[int(v) for v in row] for row in self.counts],
        })

    @classmethod
    def from_json(cls, text: str) -> "Affinity":
        obj = json.loads(text)
        return cls(names=list(obj["names"]), matrix=np.asarray(obj["matrix"], np.float64),
                   counts=np.asarray(obj["counts"], np.int64), metric=obj["metric"])


def _normalize(item) -> tuple[tuple[int, ...], Mapping]:
    """Accept (subset, per_task) pairs, records {"subset": ..., "per_task": ...} and
    ``records.SubsetEstimate``."""
    if isinstance(item, Mapping):
        return tuple(int(t) for t in item["subset"]), item["per_task"]
    if hasattr(item, "subset") and hasattr(item, "per_task"):
        return tuple(int(t) for t in item.subset), item.per_task
    subset, per_task = item
    return tuple(int(t) for t in subset), per_task


def _value(result, metric: str) -> float:
    return float(result[metric] if isinstance(result, Mapping) else getattr(result, metric))


def task_affinity(subset_results: Iterable, task_names: Sequence[str],
                  metric: str = "loss", uncovered: str = "error") -> Affinity:
    """Eq. (1): average the per-task surrogate results over the subsets containing each pair.

    ``subset_results``: list of ``(subset, per_task)`` where ``subset`` holds task indices into
    ``task_names`` and ``per_task`` has the result ``{"loss": …, "accuracy": …}`` (or a
    ``records.TaskEstimate``) of every task of the subset, keyed by task name or by index;
    ``records.SubsetEstimate`` records work too.
    For ``metric="loss"`` the affinity is −loss, so larger always means "helps".

    ``uncovered``: what a pair of tasks no sampled subset holds together gets. ``"error"``
    raises; ``"neutral"`` sets T_ij = T_ii (no evidence either way: the clustering sees
    T_ij − T_ii = 0, ``clustering.centered_affinity``), which is what the paper's federated
    setting needs — 2,000 subsets of 10 cover at most 90,000 of the 124,750 pairs of 500 tasks
    (§4; ``estimation.min_pair_coverage: 0``). ``counts[i, j] = 0`` marks the imputed pairs.
    """
    if uncovered not in ("error", "neutral"):
        raise ValueError(f"uncovered must be 'error' or 'neutral', got {uncovered!r}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    names = [str(x) for x in task_names]
    n = len(names)
    if n < 2:
        raise ValueError(f"task affinity needs at least 2 tasks, got {n}")
    sign = -1.0 if metric == "loss" else 1.0
    total = np.zeros((n, n), np.float64)
    counts = np.zeros((n, n), np.int64)
    for item in subset_results:
        subset, per_task = _normalize(item)
        if len(set(subset)) != len(subset):
            raise ValueError(f"subset {subset} repeats a task")
        bad = [t for t in subset if not 0 <= t < n]
        if bad:
            raise ValueError(f"subset {subset} has task index {bad[0]} outside 0..{n - 1}")
        index = {name: i for i, name in enumerate(names)}
        values = {}
        for k, v in per_task.items():
            if isinstance(k, str) and k not in index:
                raise ValueError(f"subset {subset} reports a result for {k!r}, which is not one "
                                 f"of the tasks {names}")
            values[index[k] if isinstance(k, str) else int(k)] = v
        missing = [t for t in subset if t not in values]
        if missing:
            raise ValueError(f"subset {subset} has no result for task {names[missing[0]]!r} "
                             f"(index {missing[0]})")
        extra = sorted(set(values) - set(subset))
        if extra:
            raise ValueError(f"subset {subset} reports a result for task index {extra[0]} that "
                             "is not in the subset")
        idx = np.asarray(subset, np.int64)
        f = np.empty(len(subset))
        for a, t in enumerate(subset):
            v = _value(values[t], metric)
            if not math.isfinite(v):
                raise ValueError(f"non-finite {metric}={v} for task {names[t]!r} (index {t}) in "
                                 f"subset {subset}")
            f[a] = sign * v
        # row i accumulates f̂_i(S) for every j in S (including j = i: the diagonal)
        total[np.ix_(idx, idx)] += f[:, None]
        counts[np.ix_(idx, idx)] += 1
    zero = np.argwhere(counts == 0)
    if uncovered == "neutral":  # only a task in no subset at all is an error
        zero = zero[zero[:, 0] == zero[:, 1]]
    if len(zero):
        i, j = (int(v) for v in zero[0])
        if i == j:
            raise ValueError(f"task {names[i]!r} (index {i}) is in no sampled subset")
        raise ValueError(f"tasks {names[i]!r} and {names[j]!r} (indices {i}, {j}) were never "
                         f"sampled together; {len(zero) // 2} pairs uncovered — sample more "
                         "subsets (sampling.sample_subsets min_pair_coverage)")
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = total / counts  # eq. (1)
    gap = counts == 0  # (only with uncovered="neutral") T_ij = T_ii
    matrix[gap] = np.broadcast_to(np.diag(matrix)[:, None], matrix.shape)[gap]
    tiny = 1e-12 * max(1.0, float(np.max(np.abs(matrix))))  # averaging rounds off ~1 ulp
    if np.ptp(matrix) <= tiny:
        raise ValueError(f"task affinity is constant ({matrix[0, 0]!r} everywhere): the subset "
                         "results carry no information to cluster on")
    if np.all(np.ptp(matrix, axis=1) <= tiny):
        # T_ij = c_i: no task's result depends on its partners; since adding a constant to a row
        # does not change the clustering objective, this is as uninformative as a constant T
        raise ValueError("task affinity is constant within every row (no task's result depends "
                         "on which tasks it was trained with): nothing to cluster on")
    return Affinity(names=names, matrix=matrix, counts=counts, metric=metric)
