"""The paper's baselines, beside the ensemble in one run (docs/design.md, "Baselines").

Each is a set of adapters and, for every task, the adapter that answers it:

* ``single``: one adapter on all tasks (stage 4's ``all-tasks``; always trained);
* ``per-task``: one adapter per task, fine-tuned from θ* on that task alone (the n-adapter
  reference the paper's ensemble of m ≪ n adapters is measured against);
* ``mtl-ft``: multitask learning, then fine-tuning: the single adapter, fine-tuned further on
  each task, starting from the shared weights (the paper's Table 4 compares with MTL-FT);
* ``random-groups``: the SDP's group sizes with the tasks assigned at random (seeded): is the
  affinity worth computing?
* ``gradient-groups``: tasks grouped by the cosine similarity of their mean loss gradients at θ*
  (the paper's Table 7 compares this grouping with the affinity's), into as many groups as the
  SDP found.

The two groupings are compared through each task's own group adapter, like the ensemble's
"group adapter" column, so that only the grouping differs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .features import FeatureTable

__all__ = ["BASELINES", "random_grouping", "task_gradient", "gradient_similarity",
           "gradient_grouping"]

BASELINES = ("per-task", "mtl-ft", "random-groups", "gradient-groups")


def random_grouping(tasks: Sequence[str], sizes: Sequence[int], seed: int) -> list[list[str]]:
    """The tasks in a seeded random order, cut into groups of the given sizes."""
    if sum(sizes) != len(tasks):
        raise ValueError(f"group sizes {list(sizes)} do not add up to {len(tasks)} tasks")
    order = [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))]
    out, start = [], 0
    for n in sizes:
        out.append(order[start:start + n])
        start += n
    return out


def task_gradient(table: FeatureTable) -> np.ndarray:
    """The gradient of a task's mean log loss at θ* in the projected space: ∇_x of
    mean_s −log softmax(h(s) + g̃(s)·x)[gold] at x = 0, = −mean_s Σ_c r_c(s) g̃_c(s) with the
    residuals r = onehot(gold) − p (the same for per-choice and difference features, since
    Σ_c r_c = 0)."""
    layout = table.choices
    r = layout.residuals(np.asarray(table.output, np.float64))
    return -(table.grad.astype(np.float64).T @ r) / max(layout.n_examples, 1)


def gradient_similarity(gradients: np.ndarray) -> np.ndarray:
    """Cosine similarity between the rows (tasks)."""
    g = np.asarray(gradients, np.float64)
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("a task has a zero mean gradient at θ*: its cosine similarity is "
                         "undefined")
    u = g / norm
    return u @ u.T


def gradient_grouping(tables: Mapping[str, FeatureTable], m: int,
                      solver: str | None = None) -> list[list[str]]:
    """m groups of the tasks by the SDP relaxation on the cosine similarity of their mean
    gradients (``clustering.SDPClustering``, as for the affinity)."""
    from .clustering import SDPClustering

    names = list(tables)
    sim = gradient_similarity(np.stack([task_gradient(tables[t]) for t in names]))
    if m >= len(names):
        return [[t] for t in names]
    est = SDPClustering(m=m, solver=solver).fit(sim)
    return [[names[i] for i in g] for g in est.groups_]
