"""The order the stages run in: the paper's Algorithm 2 as plain functions (docs/design.md, "The
stages in order").

Each function runs one group of stages through a :class:`Runner`: the default runs the stage
functions in this process, one after another (a notebook, a test, plain Python, no Prefect);
``tasks.runner.TaskRunner`` runs each call as its Prefect task (cached, locked, on the pool
its tag names) and the calls of a ``map`` concurrently. Both take the same calls, so the
algorithm is written once, here, and the flows only choose the runner:

    features = gradient_features(run, runner)                       # stage 1
    grouping = affinity_and_groups(run, runner, features.features)  # stages 2–3
    adapters = group_adapters(run, runner, grouping.groups, features.features)  # stage 4
    result = boosting_and_weights(run, runner, adapters, features.features, ...) # stages 5–6
    done = finish(run, runner, ...)                                 # report, version

Every read and write of the run directory happens inside a stage function (a task, on the
pool that owns it, under a ``TaskRunner``); the functions here handle only records, so the
process that runs them (an orchestrating flow on its own machine) needs no access to the
run directory (docs/design.md, "Object storage and several machines").
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

from . import stages
from .records import (AdaptersResult, BoostRecord, EnsembleResult, FeaturesRecord,
                      FeaturesResult, FinishResult, GroupEnsemble, GroupingResult, GroupsRecord,
                      Member, ScoresRecord)
from .rundir import BASELINE

__all__ = ["Runner", "gradient_features", "affinity_and_groups", "group_adapters",
           "boosting_and_weights", "finish", "pipeline"]

_log = logging.getLogger("ensemble_lora")


class Runner:
    """Runs stage functions of one run in this process. ``call`` runs one and returns its
    record; ``map`` runs several (``calls``: argument tuples) and returns their records in
    order. ``tasks.runner.TaskRunner`` does the same as Prefect tasks."""

    def __init__(self, run):
        self.run = run

    def call(self, stage_fn, *args, **kwargs):
        return stage_fn(self.run, *args, **kwargs)

    def map(self, stage_fn, calls: Sequence[tuple]) -> list:
        return [self.call(stage_fn, *args) for args in calls]


def gradient_features(run, runner: Runner | None = None) -> FeaturesResult:
    """Stage 1: the outputs and projected gradients at θ* of every task, and the first-order
    check on the first task (Table 5 / Figure 2)."""
    runner = runner or Runner(run)
    tasks, packs = run.task_names, run.cfg.runner.feature_runs
    if packs and len(tasks) > packs:
        # at most runner.feature_runs task runs of consecutive tasks (each task computed as
        # alone, and read back when only the packing changed)
        size = -(-len(tasks) // packs)
        done = runner.map(stages.gradient_features_pack,
                          [(tasks[i:i + size],) for i in range(0, len(tasks), size)])
        records = [r for pack in done for r in pack.records]
    else:
        records = runner.map(stages.gradient_features, [(t,) for t in tasks])
    features = {t: rec for t, rec in zip(tasks, records)}
    linearity = None
    if run.cfg.estimation.linearity_check:
        linearity = runner.call(stages.linearity, run.task_names[0])
    return FeaturesResult(features, linearity)


def affinity_and_groups(run, runner: Runner | None = None,
                        features: dict[str, FeaturesRecord] | None = None,
                        log=None) -> GroupingResult:
    """Stages 2–3: the k sampled subsets (this directory's plan, extended when tasks
    changed), the first-order surrogate fitted on each (batches of subsets, concurrently),
    the affinity T (eq. 1) and the groups; with ``clustering.incremental``, the directory's
    previous groups are the starting point."""
    runner, log = runner or Runner(run), log or _log
    features = features if features is not None else gradient_features(run, runner).features
    batches = runner.call(stages.save_subset_plan, run.task_names).batches
    log.info("%d subsets of size %d over %d tasks, in %d task runs",
             sum(len(b) for b in batches), run.cfg.estimation.subset_size,
             len(run.task_names), len(batches))
    done = runner.map(stages.fit_subsets, [(features, i, [list(s) for s in batch],
                                            run.task_names)
                                           for i, batch in enumerate(batches)])
    groups = runner.call(stages.affinity_and_groups, [r for b in done for r in b.results],
                         run.task_names)
    for k, g in enumerate(groups.group_tasks):
        log.info("group %d: %s", k, ", ".join(g))
    return GroupingResult(done, groups)


def group_adapters(run, runner: Runner | None, groups: GroupsRecord,
                   features: dict[str, FeaturesRecord]) -> AdaptersResult:
    """Stage 4: the configured baselines' plan (``stages.plan_baselines``), one adapter per
    group, the single adapter on all tasks, θ*, and the baselines' adapters; those of methods
    that start from the single adapter (MTL-FT) after it, from its weights."""
    runner = runner or Runner(run)
    baselines = runner.call(stages.plan_baselines, groups, features)
    groups = groups.group_tasks
    first = [(f"group-{k}", list(g)) for k, g in enumerate(groups)]
    first.append((BASELINE, run.task_names))
    first += [(name, tasks) for method, members in baselines.plans.items()
              if method not in baselines.after_single for name, tasks in members.items()]
    theta = runner.call(stages.save_theta_star)
    if run.cfg.training.one_pass and len(first) > 1:  # all of them in one task run
        trained = {r.name: r for r in runner.call(stages.train_groups, first).records}
    else:
        trained = dict(zip([name for name, _ in first], runner.map(stages.train_group, first)))
    single = trained[BASELINE]
    after = [(name, tasks, single) for method in baselines.after_single
             for name, tasks in baselines.plans[method].items()]
    trained.update(zip([a[0] for a in after], runner.map(stages.train_group, after)))
    group_names = [name for name, _ in first[:len(groups)]]
    others = {k: v for k, v in trained.items() if k not in group_names and k != BASELINE}
    linearity = None
    if run.cfg.estimation.linearity_check:  # the check again, at the distances they moved
        moved = sorted({round(a.train.relative_distance, 6) for a in
                        [*(trained[k] for k in group_names), single]
                        if a.train and a.train.relative_distance})
        if moved:
            linearity = runner.call(stages.linearity, run.task_names[0], moved)
    return AdaptersResult({k: trained[k] for k in group_names}, single, theta, others,
                          linearity, baselines)


def boosting_and_weights(run, runner: Runner | None, adapters: AdaptersResult,
                         features: dict[str, FeaturesRecord], estimation_s: float = 0.0,
                         log=None) -> EnsembleResult:
    """Stages 5–6 (Algorithm 2, from "for each boosting step"): score the members where a
    later step reads them; b times, boost the group with the highest training loss and keep
    the step only if the loss fell (the first rejected step ends boosting); fit the per-task
    weights over the groups on validation; score the test split (only what the evaluation
    reads) and evaluate against the single adapter and the baselines."""
    from .boosting import choose_group

    runner, log = runner or Runner(run), log or _log
    baselines = adapters.plan
    groups = [GroupEnsemble(k, a.tasks, [Member(k, 1.0)]) for k, a in adapters.groups.items()]
    known = adapters.all()

    def score_all(plans: dict[str, dict[str, list[str]]], phase: str = "fit"
                  ) -> dict[str, ScoresRecord]:
        # at most runner.scoring_runs task runs, each a run of consecutive tasks with their
        # members scored together (stages.score_members); a member's scores of a task that
        # did not change are read back, not computed
        per_task: dict[str, dict[str, list[str]]] = {}
        for name, plan in plans.items():
            for task, splits in stages.by_task(plan).items():
                per_task.setdefault(task, {})[name] = splits
        order = list(per_task)
        size = max(1, -(-len(order) // run.cfg.runner.scoring_runs))
        calls = []
        for i in range(0, len(order), size):
            chunk = {t: per_task[t] for t in order[i:i + size]}
            names = sorted({n for members in chunk.values() for n in members})
            calls.append(([known[n] for n in names], chunk, phase))
        records = runner.map(stages.score_members, calls)
        return {k: r for rec in records for k, r in rec.records.items()}

    steps_wanted = run.cfg.boosting.steps
    scores = score_all(stages.score_plans(run.task_names, groups, steps_wanted,
                                          run.cfg.boosting.mode))
    boosting: list[BoostRecord] = []
    for step in range(1, steps_wanted + 1):
        losses = runner.call(stages.group_losses, groups, features, scores).losses
        chosen = choose_group(groups, losses)
        log.info("boosting step %d: training losses %s; boosting %s", step,
                 {k: round(v, 4) for k, v in losses.items()}, chosen.name)
        rec = runner.call(stages.boost_group, chosen, features, scores, step)
        boosting.append(rec)
        log.info("boosting step %d (%s): train loss %.4f -> %.4f", step, chosen.name,
                 rec.train_loss_before, rec.train_loss_after)
        if not rec.accepted:
            log.info("boosting stopped early: the training loss did not fall")
            break
        groups = [replace(g, members=rec.members) if g is chosen else g for g in groups]
        known[rec.adapter.name] = rec.adapter
        scores.update(score_all({rec.adapter.name: stages.boost_score_plan(run.task_names,
                                                                           chosen)}))
    runner.call(stages.record_boosting, boosting)
    ensemble = runner.call(stages.fit_weights, groups, scores)
    # the test split, after the weights: only the members the evaluation reads (test_plans),
    # and each baseline adapter on its own tasks
    plans = stages.test_plans(ensemble, BASELINE)
    for members in (baselines.plans if baselines else {}).values():
        plans.update({name: {"test": tasks} for name, tasks in members.items()})
    scores.update(score_all(plans, "test"))
    compute = stages.compute_summary(features, estimation_s, adapters, boosting, scores)
    evaluation = runner.call(stages.evaluate, ensemble, scores, BASELINE, compute)
    baseline_results = None
    if baselines and baselines.plans:
        baseline_results = runner.call(stages.evaluate_baselines, baselines, adapters, scores)
    return EnsembleResult(boosting, ensemble, evaluation, baseline_results)


def finish(run, runner: Runner | None, features: FeaturesResult, groups: GroupsRecord,
           adapters: AdaptersResult, result: EnsembleResult, config: dict[str, Any]
           ) -> FinishResult:
    """The report and manifest, then the version."""
    runner = runner or Runner(run)
    report = runner.call(stages.finish, features.features, groups, adapters,
                         result.boosting, result.ensemble, result.evaluation,
                         features.linearity, config, run.cfg.fingerprint(), result.baselines)
    version = runner.call(stages.publish_version, result.ensemble, config)
    return FinishResult(report, version)


def pipeline(run, runner: Runner | None = None, log=None):
    """The whole pipeline in order (stages 1–6, the report and the version) on one runner:
    ``pipeline(Run.open(load_config("configs/tiny.yaml")))`` runs it in this process, without
    Prefect. Returns ``records.PipelineResult``. (The ``ensemble_lora`` flow runs the same
    stage groups, each as a subflow or a deployment.)"""
    from .runtime import release_models

    runner, log = runner or Runner(run), log or _log
    config = run.cfg.model_dump(mode="json", exclude_unset=True)
    s1 = gradient_features(run, runner)
    release_models()
    s23 = affinity_and_groups(run, runner, s1.features, log)
    s4 = group_adapters(run, runner, s23.groups, s1.features)
    s56 = boosting_and_weights(run, runner, s4, s1.features, s23.seconds, log)
    release_models()
    done = finish(run, runner, s1, s23.groups, s4, s56, config)
    return pipeline_result(run, s23, s56, done)


def pipeline_result(run, grouping: GroupingResult, result: EnsembleResult,
                    done: FinishResult):
    """The ``records.PipelineResult`` of a finished run."""
    from .records import PipelineResult

    return PipelineResult(run.dir.url, result.evaluation.metrics, grouping.groups.group_tasks,
                          done.report.report, done.report.manifest,
                          {} if result.baselines is None else result.baselines.results,
                          done.version.version, done.version.promoted, done.version.promotion)
