"""The whole EnsembleLoRA pipeline (Algorithm 2 of the paper), one subflow per stage group:
stage 1 (gradient features), stages 2–3 (subset regressions, affinity, groups), stage 4 (group
adapters) and stages 5–6 (boosting, weights, evaluation). The flows only sequence the library's
stages (ensemble_core.stages) through their Prefect tasks (tasks/stages.py)."""
from __future__ import annotations

from dataclasses import replace

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ensemble_core import stages, versions
from ensemble_core.boosting import choose_group
from ensemble_core.records import (AdapterRecord, AdaptersResult, BaselinesRecord, BoostRecord,
                                   EnsembleRecord, EnsembleResult, EvaluationRecord,
                                   FeaturesRecord, FeaturesResult, GroupEnsemble, GroupingResult,
                                   Member, PipelineResult, ScoresRecord)
from ensemble_core.report import ACCURACY_HEADERS, accuracy_rows
from ensemble_core.rundir import BASELINE
from ensemble_core.runtime import release_models
from tasks.common import for_run
from tasks.stages import (boost_group, evaluate, evaluate_baselines, fit_weights,
                          save_theta_star, score_member, train_adapter)

from .affinity import run_affinity
from .common import config_dict, open_run, resolve_config
from .gradient_features import gradient_features


@flow(name="group_adapters")
def group_adapters(config, groups: list[list[str]],
                   baselines: dict[str, dict[str, list[str]]] | None = None) -> AdaptersResult:
    """Stage 4: one adapter per group (fan-out), the single adapter on all tasks, θ*, and the
    adapters of the paper's other baselines (``stages.baseline_plan``; MTL-FT's after the single
    adapter, from its weights)."""
    run = open_run(config)
    train = for_run(train_adapter, run)
    baselines = baselines or {}
    futures = {f"group-{k}": train.submit(run, f"group-{k}", g) for k, g in enumerate(groups)}
    single = train.submit(run, BASELINE, run.task_names)
    theta = for_run(save_theta_star, run).submit(run)
    others = {name: train.submit(run, name, tasks) for method, members in baselines.items()
              if method != "mtl-ft" for name, tasks in members.items()}
    single = AdapterRecord.from_json(single.result())
    others.update({name: train.submit(run, name, tasks, single)
                   for name, tasks in baselines.get("mtl-ft", {}).items()})
    return AdaptersResult({k: AdapterRecord.from_json(f.result()) for k, f in futures.items()},
                          single, AdapterRecord.from_json(theta.result()),
                          {k: AdapterRecord.from_json(f.result()) for k, f in others.items()})


@flow(name="boosting_and_weights")
def boosting_and_weights(config, adapters: AdaptersResult,
                         features: dict[str, FeaturesRecord], estimation_s: float = 0.0,
                         baselines: dict[str, dict[str, list[str]]] | None = None
                         ) -> EnsembleResult:
    """Stages 5–6: b boosting steps on the group with the highest training loss, then the
    per-task ensemble weights, then the evaluation against the single-adapter baseline (and
    the other baselines of ``baselines``, each adapter scored on its own tasks' test split)."""
    run = open_run(config)
    log = get_run_logger()
    adapters = AdaptersResult.from_json(adapters)
    features = {k: FeaturesRecord.from_json(f) for k, f in features.items()}
    steps_wanted = run.cfg.boosting.steps
    groups = [GroupEnsemble(k, a.tasks, [Member(k, 1.0)]) for k, a in adapters.groups.items()]
    score = for_run(score_member, run)
    known = adapters.all()

    def score_all(plans: dict[str, dict[str, list[str]]], phase: str = "fit") -> dict:
        # one task run per member and task: a task added to the run is scored alone
        futures = {stages.scores_key(name, task, phase):
                   score.submit(run, known[name], task, splits, phase)
                   for name, plan in plans.items()
                   for task, splits in stages.by_task(plan).items()}
        return {k: ScoresRecord.from_json(f.result()) for k, f in futures.items()}

    scores = score_all(stages.score_plans(run.task_names, groups, steps_wanted,
                                          run.cfg.boosting.mode))
    boosting: list[BoostRecord] = []
    for step in range(1, steps_wanted + 1):
        losses = stages.group_losses(run, groups, features, scores)
        chosen = choose_group(groups, losses)
        log.info("boosting step %d: training losses %s; boosting %s", step,
                 {k: round(v, 4) for k, v in losses.items()}, chosen.name)
        rec = BoostRecord.from_json(
            for_run(boost_group, run)(run, chosen, features, scores, step))
        boosting.append(rec)
        log.info("boosting step %d (%s): train loss %.4f -> %.4f", step, chosen.name,
                 rec.train_loss_before, rec.train_loss_after)
        if not rec.accepted:
            log.info("boosting stopped early: the training loss did not fall")
            break
        groups = [replace(g, members=rec.members) if g is chosen else g for g in groups]
        known[rec.adapter.name] = rec.adapter
        scores.update(score_all(
            {rec.adapter.name: stages.boost_score_plan(run.task_names, chosen)}))
    stages.write_boosting(run, boosting)
    ensemble = EnsembleRecord.from_json(for_run(fit_weights, run)(run, groups, scores))
    # the test split, after the weights: only the members the evaluation reads (test_plans),
    # and each baseline adapter on its own tasks
    plans = stages.test_plans(ensemble, BASELINE)
    for members in (baselines or {}).values():
        plans.update({name: {"test": tasks} for name, tasks in members.items()})
    scores.update(score_all(plans, "test"))
    compute = stages.compute_summary(features, estimation_s, adapters, boosting)
    evaluation = EvaluationRecord.from_json(
        for_run(evaluate, run)(run, ensemble, scores, BASELINE, compute))
    baseline_results = None
    if baselines:
        baseline_results = BaselinesRecord.from_json(
            for_run(evaluate_baselines, run)(run, baselines, adapters, scores))
    release_models()  # the scoring base model with its members
    return EnsembleResult(boosting, ensemble, evaluation, baseline_results)


@flow(name="ensemble_lora", log_prints=True)
def ensemble_lora(config, overrides: list[str] | None = None) -> PipelineResult:
    """Gradient features (1) → subset regressions, affinity, groups (2–3) → group adapters
    (4) → boosting and ensemble weights (5) → evaluation against one adapter on all tasks and
    the configured baselines (6)."""
    cfg = resolve_config(config, overrides)
    run = open_run(cfg)
    log = get_run_logger()
    s1 = FeaturesResult.from_json(_stage(cfg, "gradient-features", gradient_features))
    s23 = GroupingResult.from_json(_stage(cfg, "affinity", run_affinity, features=s1.features))
    baselines = stages.baseline_plan(run, s23.groups, s1.features)
    s4 = AdaptersResult.from_json(_stage(cfg, "group-adapters", group_adapters,
                                         groups=s23.groups.group_tasks, baselines=baselines))
    s56 = EnsembleResult.from_json(_stage(cfg, "boosting-and-weights", boosting_and_weights,
                                          adapters=s4, features=s1.features,
                                          estimation_s=s23.seconds, baselines=baselines))
    metrics = s56.evaluation.metrics
    report, manifest = stages.finish(run, s1.features, s23.groups, s4, s56.boosting,
                                     s56.ensemble, s56.evaluation, s1.linearity, config_dict(cfg),
                                     s56.baselines)
    try:
        create_markdown_artifact(_inline_heatmap(run, report), key=_key(cfg.name, "report"),
                                 description="EnsembleLoRA report")
        create_table_artifact([dict(zip(ACCURACY_HEADERS, r)) for r in accuracy_rows(metrics)],
                              key=_key(cfg.name, "accuracy"), description="Test accuracy")
    except Exception as e:  # artifacts are a convenience; never fail a finished run for them
        log.warning("could not create artifacts: %s", e)
    log.info("average test accuracy: baseline %.1f%%, ensemble %.1f%%",
             100 * metrics.average.baseline_accuracy, 100 * metrics.average.ensemble_accuracy)
    # an immutable version of the ensemble; current unless worse on validation
    version = versions.publish(run.dir.url, config_dict(cfg),
                               tolerance=cfg.evaluation.promote_tolerance)
    log.info("version %s: %s", version["version"],
             ("current; " if version["promoted"] else "not promoted; ") + version["promotion"])
    return PipelineResult(run.dir.url, metrics, s23.groups.group_tasks, report.file, manifest,
                          {} if s56.baselines is None else s56.baselines.results,
                          version["version"], version["promoted"], version["promotion"])


# Stage deployments (prefect.yaml): name -> (flow/deployment, the kind of work pool it runs
# on): stage 1, stages 2–3, stage 4, stages 5–6.
STAGE_DEPLOYMENTS = {
    "gradient-features": ("gradient_features/gradient-features", "gpu"),
    "affinity": ("affinity/affinity", "cpu"),
    "group-adapters": ("group_adapters/group-adapters", "gpu"),
    # boosting restores adapters and scores them with the model: a gpu pool's stage
    "boosting-and-weights": ("boosting_and_weights/boosting-and-weights", "gpu"),
}


def _stage(cfg, name: str, fn, **params):
    """One stage of the pipeline: ``fn`` (its subflow) in this process, or, when the config's
    ``runner.work_pools`` names a pool for the stage's kind (gpu/cpu), a run of the stage's
    deployment on that pool, waited for; its result either way. A deployment run's result is
    read back from Prefect's result storage (JSON), so the workers must persist results
    (prefect.yaml sets PREFECT_RESULTS_PERSIST_BY_DEFAULT) to storage this process can read."""
    deployment, kind = STAGE_DEPLOYMENTS[name]
    pool = cfg.runner.work_pools.get(kind)
    if not pool:
        return fn(cfg, **params)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import MissingResult

    with get_client(sync_client=True) as client:
        on = client.read_deployment_by_name(deployment).work_pool_name
    if on != pool:
        raise ValueError(f"runner.work_pools.{kind} is {pool!r} but deployment {deployment!r} "
                         f"runs on work pool {on!r}; redeploy it (prefect.yaml) or fix the config")
    run = run_deployment(deployment, parameters=dict(params, config=config_dict(cfg)),
                         timeout=None, poll_interval=2)
    if not run.state.is_completed():
        raise RuntimeError(f"stage {name} (flow run {run.name}, {run.id}) ended "
                           f"{run.state.name}: {run.state.message or ''}".strip())
    try:
        return run.state.result()
    except MissingResult as e:
        raise RuntimeError(f"stage {name} finished but its result was not persisted; run its "
                           "workers with PREFECT_RESULTS_PERSIST_BY_DEFAULT=true") from e


def _inline_heatmap(run, report) -> str:
    """The report's Markdown with the affinity heatmap inlined (a data URI), since the UI
    cannot resolve the report's relative image path."""
    import base64

    from ensemble_core.storage import read_bytes

    try:
        png = base64.b64encode(read_bytes(report.heatmap.path)).decode()
    except Exception:
        return report.markdown
    return report.markdown.replace("](affinity.png)", f"](data:image/png;base64,{png})")


def _key(name: str, what: str) -> str:
    import re
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")
