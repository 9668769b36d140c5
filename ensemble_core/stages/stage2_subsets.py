"""Stage 2: subset regressions — the first-order surrogate fitted on each sampled subset of
tasks, whose estimates f̂_i(S) the affinity (eq. 1) averages."""
from __future__ import annotations

import os
import socket
import time
from typing import Sequence

from ..records import (FeaturesRecord, SubsetBatch, SubsetEstimate, SubsetPlan, SurrogateFit,
                       TaskEstimate)
from ..run import Run
from ..runtime import check_stop, feature_table
from .declaration import stage
from .planning import plan_batches, previous_plan, subset_plan

__all__ = ["save_subset_plan", "fit_subsets"]


@stage(2, "plan", config=("seed", "estimation.n_subsets", "estimation.subset_size",
                          "estimation.min_pair_coverage", "estimation.subsets_per_task_run"),
       returns=SubsetPlan)
def save_subset_plan(run: Run, tasks: Sequence[str]) -> SubsetPlan:
    """The subsets of stage 2 in their batches (``planning.plan_batches``): this directory's
    plan (estimation/plan.json) extended to the configured ``tasks``, or a fresh one; written
    back with the sampling settings, so the next run on this directory extends it instead of
    drawing a new one. (The key holds the settings and the tasks; the plan read is the one
    this stage wrote last, whose sha256 the cached record pins: a plan changed since is
    read and extended again.)"""
    batches = plan_batches(run.cfg, previous_plan(run.dir))
    ref = run.dir.write_json(run.dir.subset_plan, subset_plan(run.cfg, batches))
    return SubsetPlan(ref, [[list(s) for s in b] for b in batches])


def _used(features: dict, subsets, names) -> dict:
    """The features of the tasks in ``subsets`` (indices into ``names``)."""
    return {t: features[t] for t in sorted({names[i] for s in subsets for i in s})}


@stage(2, "subsets", config=("estimation.l2", "estimation.max_norm",
                             "estimation.max_adapter_distance", "estimation.fit_dim",
                             "estimation.projection_dim"),
       key_args=lambda features, batch, subsets, tasks: {
           "features": _used(features, subsets, tasks), "batch": batch,
           "subsets": [[tasks[i] for i in s] for s in subsets]},
       returns=SubsetBatch)
def fit_subsets(run: Run, features: dict[str, FeaturesRecord], batch: int,
                subsets: Sequence[Sequence[int]], tasks: Sequence[str]) -> SubsetBatch:
    """For each subset S of the batch (indices into ``tasks``), the first-order surrogate
    fitted on S's train rows and f̂_i(S) on each i ∈ S's validation rows."""
    from ..surrogate import fit_subset, norm_bound

    t0 = time.perf_counter()
    e = run.cfg.estimation
    d = e.surrogate_dim
    tables = {}
    for t, rec in _used(features, subsets, tasks).items():
        tables[t] = (feature_table(run.dir.at(rec.train.path), rec.train.sha256, d),
                     feature_table(run.dir.at(rec.validation.path), rec.validation.sha256, d))
        if tables[t][1].n_examples == 0:
            raise ValueError(f"task {t} has no validation rows")
    info = features[tasks[subsets[0][0]]].projection.at_dim(d)
    bound = norm_bound(e.max_norm, e.max_adapter_distance, info)
    results = []
    for s in subsets:
        check_stop()
        names = [tasks[i] for i in s]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"subset {list(s)} must be distinct task indices")
        out = fit_subset([tables[n][0] for n in names], [tables[n][1] for n in names],
                         l2=e.l2, max_norm=bound)
        fit = out["fit"]
        results.append(SubsetEstimate(
            [int(i) for i in s], names, {n: TaskEstimate(**out["tasks"][n]) for n in names},
            SurrogateFit(**fit, relative_distance=info.relative_distance(fit["norm"]),
                         adapter_distance=info.adapter_distance(fit["norm"]))))
    url = run.dir.subsets(batch)
    ref = run.dir.write_json(url, {"batch": batch, "results": [r.to_json() for r in results]})
    worker = f"{socket.gethostname()}:{os.getpid()}"  # provenance: which process fitted these
    return SubsetBatch(batch, ref, results, worker, time.perf_counter() - t0)
