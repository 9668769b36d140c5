"""Stages 2–3 as a flow: subset regressions fanned out over CPU workers, then the task affinity
and the groups; and the paper's Table 3 check of the estimates."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core import stages
from ensemble_core.records import (EstimateCheck, FeaturesRecord, GroupingResult, GroupsRecord,
                                   SubsetBatch)
from tasks.common import for_run
from tasks.stages import affinity_and_groups, fit_subsets

from .common import open_run, resolve_config, task_runner_for
from .gradient_features import gradient_features


@flow(name="affinity")
def affinity_flow(config, overrides: list[str] | None = None,
                  features: dict[str, FeaturesRecord] | None = None) -> GroupingResult:
    """Stages 2–3: sample k task subsets, fit the first-order surrogate on each (in parallel),
    average into the task affinity T (eq. 1), and group the tasks with the SDP relaxation."""
    run = open_run(config, overrides)
    log = get_run_logger()
    if features is None:
        features = gradient_features(run.cfg).features
    features = {t: FeaturesRecord.from_json(r) for t, r in features.items()}
    previous = stages.previous_plan(run.dir)
    batches = stages.plan_batches(run.cfg, previous)  # an existing plan is extended, not redrawn
    run.dir.write_json(run.dir.subset_plan, stages.subset_plan(run.cfg, batches))
    subsets = [s for b in batches for s in b]
    log.info("%d subsets of size %d over %d tasks, in %d task runs", len(subsets),
             run.cfg.estimation.subset_size, len(run.task_names), len(batches))
    fit = for_run(fit_subsets, run)
    futures = [fit.submit(run, features, i, [list(s) for s in batch], run.task_names)
               for i, batch in enumerate(batches)]
    done = [SubsetBatch.from_json(f.result()) for f in futures]
    results = [r for b in done for r in b.results]
    previous = None  # the groups this directory had, for incremental grouping
    if run.cfg.clustering.incremental and run.dir.exists(run.dir.groups):
        previous = [g["tasks"] for g in run.dir.read_json(run.dir.groups)["groups"]]
    groups = GroupsRecord.from_json(
        for_run(affinity_and_groups, run)(run, results, run.task_names, previous))
    for k, g in enumerate(groups.group_tasks):
        log.info("group %d: %s", k, ", ".join(g))
    return GroupingResult(done, groups)


def run_affinity(config, overrides=None, features=None) -> GroupingResult:
    """The affinity flow on the task runner the config names (threads, or Dask)."""
    cfg = resolve_config(config, overrides)
    runner = task_runner_for(cfg)
    fl = affinity_flow.with_options(task_runner=runner) if runner is not None else affinity_flow
    return fl(cfg, features=features)


@flow(name="check_estimates")
def check_estimates_flow(config, overrides: list[str] | None = None, r: int = 3,
                         dims: list[int] | None = None) -> EstimateCheck:
    """The paper's Table 3: fine-tune for real on r of the sampled subsets and compare with
    the first-order estimates (mean relative error, Spearman correlation, compute ratio), at
    every projection dimension of ``dims`` (default: all of estimation.projection_dim)."""
    from ensemble_core.checks import check_estimates

    run = open_run(config, overrides)
    log = get_run_logger()
    features = gradient_features(run.cfg).features
    previous = stages.previous_plan(run.dir)
    subsets = [s for b in stages.plan_batches(run.cfg, previous) for s in b]
    res = check_estimates(run, features, subsets, r, seed=run.cfg.seed,
                          progress=lambda i, n, what: log.info("fine-tuned subset %d/%d (%s)",
                                                               i, n, what), dims=dims)
    for s in res.summaries:
        log.info("estimate check at d = %d: %d pairs, mean relative error %.2f%%, Spearman %s, "
                 "compute ratio %.1fx (with amortized gradients %.1fx)", s.d, s.pairs,
                 100 * s.mean_relative_error, "-" if s.spearman is None else f"{s.spearman:.2f}",
                 s.compute_ratio_fits_only, s.compute_ratio_with_gradients)
    return res
