"""Stage 3: affinity and groups — the task affinity T (eq. 1) from the subset estimates, the
groups by the configured clustering method (the paper's SDP, Appendix A.1), and the adapters
of the configured baselines."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..records import BaselinePlan, FeaturesRecord, GroupsRecord, SubsetEstimate
from ..run import Run
from .declaration import stage

__all__ = ["affinity_and_groups", "plan_baselines"]


@stage(3, "groups", config=("estimation.metric", "estimation.min_pair_coverage", "clustering",
                             "seed"),
       key_args=lambda results, tasks: {
           "results": [(r.tasks, r.per_task) for r in results], "tasks": tasks},
       returns=GroupsRecord)
def affinity_and_groups(run: Run, results: Sequence[SubsetEstimate],
                        tasks: Sequence[str]) -> GroupsRecord:
    """Task affinity T (eq. 1) from the subset results, then groups by ``clustering.method``
    (a registered clustering method: the SDP relaxation of Appendix A.1, or the spectral
    baseline); affinity.json and groups.json.

    With ``clustering.incremental`` and the groups this run directory has (groups.json, which
    this stage wrote last: a cached record pins its sha256), the previous groups are kept (less removed tasks) and each new task joins the
    group of highest affinity (``clustering.join_by_affinity``), unless that partition's SDP
    objective is more than ``clustering.regroup_below`` (a fraction) below the fresh
    grouping's (``clustering.partition_objective``); groups.json says which was used and both
    objectives."""
    from ..affinity import task_affinity
    from ..clustering import (clustering_method, groups_to_json, join_by_affinity,
                              partition_objective)

    t0 = time.perf_counter()
    # estimation.min_pair_coverage 0 (the paper's federated scale: fewer subsets than
    # covering every pair takes) leaves pairs no subset holds; they get no evidence either way
    uncovered = "neutral" if run.cfg.estimation.min_pair_coverage == 0 else "error"
    aff = task_affinity([(r.subset, r.per_task) for r in results], list(tasks),
                        metric=run.cfg.estimation.metric, uncovered=uncovered)
    c = run.cfg.clustering
    m = None if c.n_groups == "auto" else int(c.n_groups)
    chosen, info = clustering_method(c).group(aff.matrix, m, c, run.cfg.seed)
    chosen = [list(g) for g in chosen]
    previous = None
    if c.incremental and run.dir.exists(run.dir.groups):
        previous = [g["tasks"] for g in run.dir.read_json(run.dir.groups)["groups"]]
    if c.incremental and previous:
        index = {t: i for i, t in enumerate(tasks)}
        kept = [[index[t] for t in g if t in index] for g in previous]
        kept = [g for g in kept if g]
        placed = {i for g in kept for i in g}
        new = [i for i in range(len(tasks)) if i not in placed]
        if kept and (m is None or len(kept) == m):
            inc = join_by_affinity(aff.matrix, kept, new)
            fresh_obj = partition_objective(aff.matrix, chosen)
            inc_obj = partition_objective(aff.matrix, inc)
            use = inc_obj >= fresh_obj - c.regroup_below * abs(fresh_obj)
            info["incremental"] = {
                "used": "incremental" if use else "fresh",
                "joined": [tasks[i] for i in new],
                # the partition the incremental policy proposed, whether used or not
                "incremental_groups": [[tasks[i] for i in g] for g in inc],
                "incremental_objective": inc_obj, "fresh_objective": fresh_obj,
                "regroup_below": c.regroup_below}
            if use:
                chosen = inc
    groups = groups_to_json(chosen, list(tasks))
    groups.update(info)
    groups["stability"] = _stability(results, list(tasks), groups, run.cfg.estimation.metric,
                                     c, run.cfg.seed, uncovered)
    gaps = int(np.count_nonzero(aff.counts == 0)) // 2
    if gaps:  # pairs of tasks no subset held together (T_ij = T_ii)
        groups["uncovered_pairs"] = gaps
    aff_ref = run.dir.write_bytes(run.dir.affinity, aff.to_json().encode())
    groups_ref = run.dir.write_json(run.dir.groups, groups)
    return GroupsRecord(aff_ref, groups_ref, [g["tasks"] for g in groups["groups"]],
                        time.perf_counter() - t0)


def _baseline_fields(cfg) -> list[str]:
    from ..baselines import baseline

    return [f for name in cfg.evaluation.baselines for f in baseline(name).config]


@stage(3, "baseline-plan", config=("evaluation.baselines",), more_config=_baseline_fields,
       key_args=lambda groups, features: {"groups": groups.group_tasks, "features": features},
       returns=BaselinePlan)
def plan_baselines(run: Run, groups: GroupsRecord,
                   features: dict[str, FeaturesRecord]) -> BaselinePlan:
    """The adapters of the baselines that ``evaluation.baselines`` asks for (registered in
    ``baselines``): method -> adapter name -> the tasks it is trained on and answers, and the
    methods whose adapters start from the single adapter (MTL-FT's: stage 4 trains them after
    it, from its weights)."""
    from ..baselines import baseline

    plans, after = {}, []
    for method in run.cfg.evaluation.baselines:
        entry = baseline(method)
        plans[method] = {k: list(v) for k, v in
                         entry.plan(run, groups.group_tasks, features).items()}
        if entry.starts_from_single:
            after.append(method)
    return BaselinePlan(plans, after)


def _stability(results: Sequence[SubsetEstimate], tasks: list[str], groups: dict, metric: str,
               c, seed: int, uncovered: str = "error") -> dict | None:
    """How stable the grouping is under the sampling of the subsets: the k subset estimates
    resampled with replacement ``clustering.stability_draws`` times (seeded), the affinity
    (eq. 1) and the groups found again by the same method with the same number of groups,
    each compared with the chosen groups by the adjusted Rand index (1: the same groups; about
    0: as alike as chance). A draw that leaves a pair of tasks without a common subset cannot
    give an affinity and is skipped."""
    import numpy as np

    from ..affinity import task_affinity
    from ..clustering import clustering_method
    from ..comparison import adjusted_rand_index

    if not c.stability_draws or len(tasks) < 3:
        return None
    chosen = [g["tasks"] for g in groups["groups"]]
    rng = np.random.default_rng([seed, 3])
    items = [(r.subset, r.per_task) for r in results]
    aris = []
    for _ in range(c.stability_draws):
        draw = [items[i] for i in rng.integers(0, len(items), len(items))]
        try:
            aff = task_affinity(draw, tasks, metric=metric, uncovered=uncovered)
            found, _ = clustering_method(c).group(aff.matrix, len(chosen), c, seed)
        except (ValueError, RuntimeError):
            continue
        aris.append(adjusted_rand_index(chosen, [[tasks[i] for i in g] for g in found]))
    if not aris:
        return {"draws": 0, "tried": c.stability_draws,
                "reason": "every resample left a pair of tasks without a common subset (too "
                          "few subsets per pair: raise estimation.n_subsets or "
                          "min_pair_coverage)"}
    return {"draws": len(aris), "mean_ari": float(np.mean(aris)),
            "min_ari": float(np.min(aris)),
            "same_groups": float(np.mean([a == 1.0 for a in aris]))}
