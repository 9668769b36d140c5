"""What the stages are given: the plans the code around the stage functions makes (docs/design.md,
"Caching and what a stage depends on"). Stage 2's subsets in their batches (kept and extended
when tasks change), stage 5's scoring plans (which member is scored on which split of which
tasks), and the compute summary stage 6 reports. Plain functions of the config and the
records: they read no file but a run directory's stored plan, and write none.
"""
from __future__ import annotations

import logging
from math import comb
from typing import Sequence

from ..records import (AdaptersResult, BoostRecord, Compute, EnsembleRecord, FeaturesRecord,
                       GroupEnsemble, ScoresRecord)
from ..rundir import THETA_STAR

__all__ = ["plan_subsets", "subset_batches", "plan_batches", "previous_plan", "subset_plan",
           "score_plans", "boost_score_plan", "test_plans", "by_task", "scores_key",
           "scores_of", "compute_summary"]


# -------------------------------------------------------------------------------------------
# Stage 2: the sampled subsets
# -------------------------------------------------------------------------------------------

def plan_subsets(cfg) -> list[tuple[int, ...]]:
    """The k sampled task subsets S (seeded; every pair covered min_pair_coverage times), as
    indices into the config's task list."""
    from ..sampling import sample_subsets

    e, n = cfg.estimation, len(cfg.tasks)
    if n < 2:
        raise ValueError(f"stage 2 needs at least two tasks, the config has {n}")
    if e.subset_size > n:
        raise ValueError(f"estimation.subset_size = {e.subset_size} is larger than the number "
                         f"of tasks ({n})")
    k = min(e.n_subsets, comb(n, e.subset_size))
    if k < e.n_subsets:  # said, not silent: the plan holds every subset there is
        logging.getLogger("ensemble_lora").warning(
            "estimation.n_subsets = %d, but %d tasks have only %d subsets of size %d: all %d "
            "are used", e.n_subsets, n, k, e.subset_size, k)
    return sample_subsets(n, k, e.subset_size, e.min_pair_coverage, seed=cfg.seed)


def subset_batches(cfg, subsets) -> list[list[tuple[int, ...]]]:
    """The subsets cut into the batches of one task run each."""
    b = cfg.estimation.subsets_per_task_run
    return [list(subsets[i:i + b]) for i in range(0, len(subsets), b)]


def _plan_params(cfg) -> dict:
    e = cfg.estimation
    return {"seed": cfg.seed, "n_subsets": e.n_subsets, "subset_size": e.subset_size,
            "min_pair_coverage": e.min_pair_coverage,
            "subsets_per_task_run": e.subsets_per_task_run}


def plan_batches(cfg, previous: dict | None = None) -> list[list[tuple[int, ...]]]:
    """The subsets of stage 2 in their batches (one task run each), as indices into the
    config's tasks. Without ``previous`` (a plan of this run directory, :func:`subset_plan`)
    or when its sampling settings differ: :func:`plan_subsets`, cut into batches. Otherwise
    the plan is extended, not redrawn (issue 14, item 1): every previous subset whose tasks
    are all still configured stays in its batch (so its cached fit is reused), the subsets of
    removed tasks are dropped, and only the subsets that bring every pair of the new task set
    back to ``min_pair_coverage`` are added, in new batches (``sampling.extend_subsets``)."""
    from ..sampling import extend_subsets

    names = [t.name for t in cfg.tasks]
    if not previous or previous.get("params") != _plan_params(cfg):
        return subset_batches(cfg, plan_subsets(cfg))
    if len(names) < 2 or cfg.estimation.subset_size > len(names):
        plan_subsets(cfg)  # raises, naming the setting
    index = {t: i for i, t in enumerate(names)}
    batches = [[tuple(sorted(index[t] for t in sub)) for sub in batch
                if all(t in index for t in sub)] for batch in previous["batches"]]
    batches = [b for b in batches if b]
    kept = [sub for b in batches for sub in b]
    added = extend_subsets(len(names), kept, cfg.estimation.subset_size,
                           cfg.estimation.min_pair_coverage, seed=cfg.seed)
    return batches + subset_batches(cfg, added)


def previous_plan(rundir) -> dict | None:
    """The run directory's stored subset plan (``estimation/plan.json``), or None: what
    :func:`plan_batches` extends."""
    return rundir.read_json(rundir.subset_plan) if rundir.exists(rundir.subset_plan) else None


def subset_plan(cfg, batches) -> dict:
    """The stored form of a plan (``estimation/plan.json``): the sampling settings, the tasks,
    and every batch's subsets by task name."""
    names = [t.name for t in cfg.tasks]
    return {"params": _plan_params(cfg), "tasks": names,
            "batches": [[[names[i] for i in sub] for sub in b] for b in batches]}


# -------------------------------------------------------------------------------------------
# Stage 5: which member is scored where
# -------------------------------------------------------------------------------------------

def score_plans(tasks: Sequence[str], groups: Sequence[GroupEnsemble], boosting_steps: int,
                mode: str = "first-order") -> dict[str, dict[str, list[str]]]:
    """Which member is scored on which split of which tasks before the weights — only what a
    later step reads: a group adapter on its own train sample (boosting) and every task's
    validation examples (weights); θ* (a member of every boosted group, unless the boosting
    mode says otherwise: ``BoostingMode.uses_theta_star``) on validation, and on train when
    boosting takes several steps. The test split comes after the weights
    (:func:`test_plans`)."""
    plans = {g.name: {"train": list(g.tasks), "validation": list(tasks)} for g in groups}
    from ..boosting import boosting_mode

    if boosting_steps > 0 and boosting_mode(mode).uses_theta_star:
        plans[THETA_STAR] = {"validation": list(tasks)}
        if boosting_steps > 1:
            plans[THETA_STAR]["train"] = list(tasks)
    return plans


def boost_score_plan(tasks: Sequence[str], group: GroupEnsemble) -> dict[str, list[str]]:
    """What a boosting adapter is scored on before the weights: its group's train sample (the
    next step) and every task's validation examples."""
    return {"train": list(group.tasks), "validation": list(tasks)}


def test_plans(ensemble: EnsembleRecord, single: str) -> dict[str, dict[str, list[str]]]:
    """Which member is scored on which tasks' test split: the single adapter on every task;
    each member of group g on the tasks whose ensemble gives g a nonzero weight, and on its own
    tasks (the "group adapter" column) — no other test example is read."""
    plans: dict[str, set] = {single: set(ensemble.weights)}
    for k, g in enumerate(ensemble.groups):
        tasks = {t for t, w in ensemble.weights.items() if w[k] > 0} | set(g.tasks)
        for m in g.members:
            plans.setdefault(m.name, set()).update(tasks)
    order = list(ensemble.weights)
    return {name: {"test": [t for t in order if t in ts]} for name, ts in plans.items()}


def by_task(plan: dict[str, list[str]]) -> dict[str, list[str]]:
    """A scoring plan (split -> tasks) as task -> splits, in the plan's order: stage 5 scores a
    member one task at a time, so adding a task to a run scores only the new task with the
    members that did not change (BENCHMARKS.md, "Adding a seventh task")."""
    out: dict[str, list[str]] = {}
    for split, tasks in plan.items():
        for t in tasks:
            out.setdefault(t, []).append(split)
    return out


def scores_key(member: str, task: str, phase: str = "fit") -> str:
    """The key of one member's scores on one task in the flows' dict of score records."""
    return f"{member}/{task}" if phase == "fit" else f"{member}/{task}:{phase}"


def scores_of(scores: dict[str, ScoresRecord], names,
              tasks: Sequence[str] | None = None) -> dict[str, ScoresRecord]:
    """The score records (any phase) of the given members, on ``tasks`` only if given, in a
    stable order."""
    names = set(names)
    return {k: r for k, r in sorted(scores.items())
            if r.name in names and (tasks is None or r.task in tasks)}


# -------------------------------------------------------------------------------------------
# Stage 6: the compute summary
# -------------------------------------------------------------------------------------------

def compute_summary(features: dict[str, FeaturesRecord], estimation_s: float,
                    adapters: AdaptersResult, boosting: Sequence[BoostRecord],
                    scores: dict[str, ScoresRecord] | None = None) -> Compute:
    """What the ensemble cost against the baseline's training, from the records (so a resumed
    run reports the original work), the paper's way and with the member scoring that the
    weights and the boosting choice read (``records.Compute``; the fit-phase ``scores``)."""
    groups = list(adapters.groups.values())
    base = adapters.single.train
    s1 = sum(f.seconds for f in features.values())
    groups_s = sum(a.train.wall_seconds for a in groups)
    boost_s = sum(b.seconds for b in boosting)
    fit = [r for r in (scores or {}).values() if r.phase == "fit"]
    scoring_s = sum(r.seconds for r in fit)
    ensemble_s = s1 + estimation_s + groups_s + boost_s
    s1_flops = sum(f.flops for f in features.values())
    group_flops = sum(a.train.flops_estimate for a in groups)
    scoring_flops = sum(r.flops for r in fit)
    base_s, base_flops = max(base.wall_seconds, 1e-9), max(base.flops_estimate, 1e-9)
    return Compute(gradients_s=s1, estimation_s=estimation_s, group_adapters_s=groups_s,
                   boosting_s=boost_s, ensemble_pipeline_s=ensemble_s,
                   baseline_s=base.wall_seconds, ratio=ensemble_s / base_s,
                   baseline_flops=base.flops_estimate, group_flops=group_flops,
                   peak_memory_bytes=max(a.train.peak_memory_bytes
                                         for a in [*groups, adapters.single]),
                   scoring_s=scoring_s, gradients_flops=s1_flops, scoring_flops=scoring_flops,
                   flops_ratio=(s1_flops + group_flops) / base_flops,
                   ratio_with_scoring=(ensemble_s + scoring_s) / base_s,
                   flops_ratio_with_scoring=(s1_flops + group_flops + scoring_flops)
                   / base_flops)
