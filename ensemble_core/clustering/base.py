"""What every clustering method shares (stage 3; Appendix A.1 of the paper; docs/design.md,
"Stage 3"): the registry of methods, their config section, the affinity as the methods read
it, and partitions (labels, groups.json, objectives, incremental joining).

A clustering method is one module that defines a :class:`ClusteringMethod` and registers it
with :func:`register_clustering_method`: ``clustering.method`` in a run config selects it by
name, its ``config`` (a subclass of :class:`ClusteringConfig`) adds its own fields to the
``clustering`` section, and ``group(T, m, cfg, seed)`` partitions the tasks given the task
affinity T (larger = "helps"): it returns the groups (lists of task indices) and a JSON-able
record of how they were found, which groups.json keeps.
"""
from __future__ import annotations

import inspect
from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import Field

from ..registry import Registry, StrictModel, check_section, field_error, section_of

__all__ = ["ClusteringConfig", "ClusteringMethod", "CLUSTERING_METHODS",
           "register_clustering_method", "clustering_method", "validate_clustering",
           "Estimator", "centered_affinity", "labels_to_groups", "groups_to_json",
           "partition_objective", "join_by_affinity"]


class ClusteringConfig(StrictModel):
    """The ``clustering`` fields every method has; a method's config subclasses it."""
    method: str = "sdp"
    n_groups: int | Literal["auto"] = "auto"  # m
    # incremental grouping (issue 14): when tasks were added to a run directory's previous
    # grouping, each new task joins the group of highest affinity and the other groups stay as
    # they were (their adapters are reused) — unless that grouping's objective falls more than
    # regroup_below (a fraction) below a fresh grouping's; false: every run groups afresh
    incremental: bool = False
    regroup_below: float = Field(0.1, ge=0.0)
    # group stability: the groups found again from this many bootstrap resamples of the
    # subset estimates (the same method and number of groups), compared with the chosen ones
    # by the adjusted Rand index (groups.json, the report); 0: not measured
    stability_draws: int = Field(20, ge=0, le=1000)


class ClusteringMethod:
    """A clustering method (see the module docstring)."""
    name: ClassVar[str]
    config: ClassVar[type[ClusteringConfig]]
    needs_m: ClassVar[bool] = False  # True: clustering.n_groups cannot be "auto"

    def group(self, T: np.ndarray, m: int | None, cfg: ClusteringConfig,
              seed: int) -> tuple[list[list[int]], dict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<clustering method {self.name!r}>"


def _check_entry(method: ClusteringMethod) -> None:
    check_section(method, ClusteringConfig, "method", "clustering method")


CLUSTERING_METHODS: Registry[ClusteringMethod] = Registry("clustering method",
                                                          "clustering.method", _check_entry)


def register_clustering_method(method, *, replace: bool = False):
    """Register a clustering method (an instance or a subclass, which is instantiated).
    Usable as a class decorator."""
    CLUSTERING_METHODS.register(method() if isinstance(method, type) else method,
                                replace=replace)
    return method


def clustering_method(cfg_or_name) -> ClusteringMethod:
    return CLUSTERING_METHODS.get(getattr(cfg_or_name, "method", cfg_or_name))


def validate_clustering(data) -> ClusteringConfig:
    """A ``clustering`` config section validated by its method's config class (``method``
    defaults to ``sdp``; ``registry.section_of``); a method that needs a number of groups
    refuses ``n_groups: auto``."""
    if isinstance(data, ClusteringConfig):
        return data
    entry, cfg = section_of(CLUSTERING_METHODS, data, "method", "sdp")
    if entry.needs_m and cfg.n_groups == "auto":
        raise field_error("n_groups", "auto", f"clustering.method {entry.name} needs a number "
                                              "of groups")
    return cfg


class Estimator:
    """scikit-learn style: parameters are the ``__init__`` arguments, kept as attributes of
    the same names; ``fit`` sets attributes ending in ``_`` and returns self."""

    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------------------------
# The affinity and partitions
# --------------------------------------------------------------------------------------------
def _as_matrix(T) -> np.ndarray:
    mat = getattr(T, "matrix", T)  # accepts affinity.Affinity
    mat = np.asarray(mat, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"affinity must be a square matrix, got shape {mat.shape}")
    if mat.shape[0] < 2:
        raise ValueError(f"clustering needs at least 2 tasks, got {mat.shape[0]}")
    if not np.all(np.isfinite(mat)):
        i, j = (int(v) for v in np.argwhere(~np.isfinite(mat))[0])
        raise ValueError(f"affinity contains NaN/inf (first at [{i}, {j}] = {mat[i, j]})")
    return mat


def _check_m(m, n: int) -> None:
    if m is None:
        return
    if int(m) != m or m < 1:
        raise ValueError(f"number of groups m must be a positive integer, got {m!r}")
    if m > n:
        raise ValueError(f"number of groups m={m} exceeds the number of tasks n={n}")


def centered_affinity(T) -> np.ndarray:
    """A = sym(T_ij − T_ii), zero diagonal. Same SDP optimum as T (row shifts are constant)."""
    mat = _as_matrix(T)
    rel = mat - np.diag(mat)[:, None]
    return (rel + rel.T) / 2.0


def labels_to_groups(labels: Sequence[int]) -> list[list[int]]:
    labels = np.asarray(labels)
    groups = [sorted(int(i) for i in np.flatnonzero(labels == g)) for g in np.unique(labels)]
    return sorted((g for g in groups if g), key=lambda g: g[0])


def _groups_to_labels(groups: list[list[int]], n: int) -> np.ndarray:
    labels = np.full(n, -1, dtype=np.int64)
    for k, g in enumerate(sorted((sorted(g) for g in groups), key=lambda g: g[0])):
        labels[g] = k
    assert (labels >= 0).all(), "every task must be in exactly one group"
    return labels


# --------------------------------------------------------------------------------------------
# The SDP (Appendix A.1)
# --------------------------------------------------------------------------------------------

def groups_to_json(groups: Sequence[Sequence[int]], names: Sequence[str]) -> dict:
    """JSON-able record for groups.json: task names and indices per group."""
    names = [str(x) for x in names]
    groups = sorted((sorted(int(i) for i in g) for g in groups), key=lambda g: g[0])
    seen = [i for g in groups for i in g]
    if sorted(seen) != list(range(len(names))):
        raise ValueError(f"groups must place each of the {len(names)} tasks in exactly one "
                         f"group, got {groups}")
    return {"n_tasks": len(names), "n_groups": len(groups),
            "groups": [{"id": k, "tasks": [names[i] for i in g], "indices": g}
                       for k, g in enumerate(groups)]}


def partition_objective(T, groups: Sequence[Sequence[int]]) -> float:
    """⟨A, X⟩ of a partition (the SDP's objective at the partition's X: X_uv = 1/|g| for u, v
    in one group g, 0 otherwise; A = ``centered_affinity(T)``): Σ_g (1/|g|) Σ_{u,v ∈ g} A_uv.
    Comparable between any two partitions of the same tasks."""
    A = centered_affinity(T)
    return float(sum(A[np.ix_(g, g)].sum() / len(g) for g in groups if len(g)))


def join_by_affinity(T, groups: Sequence[Sequence[int]], new: Sequence[int]) -> list[list[int]]:
    """Incremental grouping (issue 14, item 2): each task of ``new``, in order, joins the group
    with which its mean affinity (``centered_affinity``, both directions) is highest (ties: the
    first group); the groups keep their order and their other tasks."""
    A = centered_affinity(T)
    out = [list(g) for g in groups]
    if not out:
        raise ValueError("incremental grouping needs at least one existing group")
    for t in new:
        k = int(np.argmax([A[t, g].mean() for g in out]))
        out[k].append(int(t))
    return out
