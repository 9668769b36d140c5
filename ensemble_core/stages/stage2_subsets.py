"""Stage 2: subset regressions — the first-order surrogate fitted on each sampled subset of
tasks, whose estimates f̂_i(S) the affinity (eq. 1) averages."""
from __future__ import annotations

import os
import socket
import time
from typing import Sequence

from ..records import (FeaturesRecord, FileRef, SubsetBatch, SubsetEstimate, SurrogateFit,
                       TaskEstimate)
from ..run import Run
from ..runtime import check_stop, feature_table
from .declaration import stage
from .planning import subset_plan

__all__ = ["save_subset_plan", "fit_subsets"]


@stage(2, "plan", config=("seed", "estimation.n_subsets", "estimation.subset_size",
                          "estimation.min_pair_coverage", "estimation.subsets_per_task_run"),
       key_args=lambda batches: {"batches": batches}, returns=FileRef)
def save_subset_plan(run: Run, batches: Sequence[Sequence[Sequence[int]]]) -> FileRef:
    """estimation/plan.json: the subsets in their batches (``planning.plan_batches``), with
    the sampling settings, so the next run on this directory extends the plan instead of
    drawing a new one."""
    return run.dir.write_json(run.dir.subset_plan, subset_plan(run.cfg, batches))


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
        tables[t] = (feature_table(rec.train.path, rec.train.sha256, d),
                     feature_table(rec.validation.path, rec.validation.sha256, d))
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
