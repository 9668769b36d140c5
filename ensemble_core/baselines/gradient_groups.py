"""``gradient-groups``: the tasks grouped by the cosine similarity of their mean loss gradients
at θ* (the paper's Table 7 compares this grouping with the affinity's), by the SDP, into as
many groups as the run's grouping found."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..features import FeatureTable
from . import Baseline, register_baseline

__all__ = ["task_gradient", "gradient_similarity", "gradient_grouping"]

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
    from ..clustering import SDPClustering

    names = list(tables)
    sim = gradient_similarity(np.stack([task_gradient(tables[t]) for t in names]))
    if m >= len(names):
        return [[t] for t in names]
    est = SDPClustering(m=m, solver=solver).fit(sim)
    return [[names[i] for i in g] for g in est.groups_]


@register_baseline
class GradientGroups(Baseline):
    name = "gradient-groups"
    label = "gradient-similarity groups, own group's adapter"
    # the features' dimension (estimation.surrogate_dim) and the SDP's solver
    config = ("estimation.fit_dim", "estimation.projection_dim", "clustering")

    def plan(self, run, groups, features):
        from ..runtime import feature_table

        d = run.cfg.estimation.surrogate_dim
        tables = {t: feature_table(run.dir.at(features[t].train.path), features[t].train.sha256,
                                   d)
                  for t in run.task_names}
        solver = getattr(run.cfg.clustering, "solver", None)  # the SDP's, when it is the method
        return {f"gradient-{k}": g for k, g in enumerate(
            gradient_grouping(tables, len(groups), solver))}
