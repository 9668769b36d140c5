"""The whole EnsembleLoRA pipeline (Algorithm 2 of the paper), one subflow per stage group:
stage 1 (gradient features), stages 2–3 (subset regressions, affinity, groups), stage 4 (group
adapters), stages 5–6 (boosting, weights, evaluation) and the report with the version. The order
of the stages inside each is the library's (``ensemble_core.algorithm2``); the flows run it with
their Prefect tasks (``tasks.runner.TaskRunner``) and sequence the subflows, locally or as
deployments.

The orchestrating flow holds no data and touches no file: it passes the records one subflow
returns to the next, and every read and write of the run directory happens in a task of a
subflow, on the pool that owns it (docs/design.md, "Object storage and several machines")."""
from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ensemble_core import algorithm2
from ensemble_core.records import (AdaptersResult, EnsembleResult, FeaturesRecord,
                                   FeaturesResult, FinishResult, GroupingResult, GroupsRecord,
                                   PipelineResult)
from ensemble_core.report import ACCURACY_HEADERS, accuracy_rows
from ensemble_core.run import Run
from ensemble_core.runtime import release_models
from tasks.runner import TaskRunner

from .affinity import run_affinity
from .common import artifact_key, config_dict, open_run, resolve_config
from .gradient_features import gradient_features


@flow(name="group_adapters")
def group_adapters(config, groups: GroupsRecord,
                   features: dict[str, FeaturesRecord]) -> AdaptersResult:
    """Stage 4: the baselines' plan, one adapter per group (fan-out), the single adapter on all
    tasks, θ*, and the adapters of the paper's other baselines (MTL-FT's after the single
    adapter, from its weights)."""
    run = open_run(config)
    return algorithm2.group_adapters(run, TaskRunner(run), GroupsRecord.from_json(groups),
                                     _features(features))


@flow(name="boosting_and_weights")
def boosting_and_weights(config, adapters: AdaptersResult,
                         features: dict[str, FeaturesRecord],
                         estimation_s: float = 0.0) -> EnsembleResult:
    """Stages 5–6: b boosting steps on the group with the highest training loss, then the
    per-task ensemble weights, then the evaluation against the single-adapter baseline (and
    the other baselines, each adapter scored on its own tasks' test split)."""
    run = open_run(config)
    res = algorithm2.boosting_and_weights(
        run, TaskRunner(run), AdaptersResult.from_json(adapters), _features(features),
        estimation_s, get_run_logger())
    release_models()  # the scoring base model with its members
    return res


@flow(name="report")
def report_and_version(config, features: FeaturesResult, groups: GroupsRecord,
                       adapters: AdaptersResult, result: EnsembleResult) -> FinishResult:
    """The report (report.md, affinity.png), manifest.json, and the ensemble published as a
    version (current unless worse on validation)."""
    run = open_run(config)
    return algorithm2.finish(run, TaskRunner(run), FeaturesResult.from_json(features),
                             GroupsRecord.from_json(groups), AdaptersResult.from_json(adapters),
                             EnsembleResult.from_json(result), config_dict(run.cfg))


def _features(features: dict) -> dict[str, FeaturesRecord]:
    return {k: FeaturesRecord.from_json(f) for k, f in features.items()}


@flow(name="ensemble_lora", log_prints=True)
def ensemble_lora(config, overrides: list[str] | None = None) -> PipelineResult:
    """Gradient features (1) → subset regressions, affinity, groups (2–3) → group adapters
    (4) → boosting and ensemble weights (5) → evaluation against one adapter on all tasks and
    the configured baselines (6) → the report and a published version."""
    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    s1 = FeaturesResult.from_json(_stage(cfg, "gradient-features", gradient_features))
    s23 = GroupingResult.from_json(_stage(cfg, "affinity", run_affinity, features=s1.features))
    s4 = AdaptersResult.from_json(_stage(cfg, "group-adapters", group_adapters,
                                         groups=s23.groups, features=s1.features))
    s56 = EnsembleResult.from_json(_stage(cfg, "boosting-and-weights", boosting_and_weights,
                                          adapters=s4, features=s1.features,
                                          estimation_s=s23.seconds))
    done = FinishResult.from_json(_stage(cfg, "report", report_and_version, features=s1,
                                         groups=s23.groups, adapters=s4, result=s56))
    metrics = s56.evaluation.metrics
    try:
        create_markdown_artifact(done.report.markdown, key=artifact_key(cfg.name, "report"),
                                 description="EnsembleLoRA report")
        create_table_artifact([dict(zip(ACCURACY_HEADERS, r)) for r in accuracy_rows(metrics)],
                              key=artifact_key(cfg.name, "accuracy"), description="Test accuracy")
    except Exception as e:  # artifacts are a convenience; never fail a finished run for them
        log.warning("could not create artifacts: %s", e)
    log.info("average test accuracy: baseline %.1f%%, ensemble %.1f%%",
             100 * metrics.average.baseline_accuracy, 100 * metrics.average.ensemble_accuracy)
    log.info("version %s: %s", done.version.version,
             ("current; " if done.version.promoted else "not promoted; ")
             + done.version.promotion)
    return algorithm2.pipeline_result(Run(cfg), s23, s56, done)


def _stage(cfg, name: str, fn, **params):
    """:func:`_stage_run`, with what to do when the Prefect server refuses the subflow's
    parameters: the config and the records passed between stage groups grow with the number
    of tasks (about 1.2 KB a task for stage 2's), over the server's default 512 KB at about
    400 tasks (BENCHMARKS.md, "Many datasets, continued")."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        return _stage_run(cfg, name, fn, **params)
    except PrefectHTTPStatusError as e:
        if "parameters must be less than" not in str(e):
            raise
        found = re.search(r"Flow run parameters must be less than [^)]*\)", str(e))
        raise RuntimeError(
            f"stage group {name}: the Prefect server refused its flow run's parameters (the "
            f"config and the records of {len(cfg.tasks)} tasks): "
            f"{found.group(0) if found else e}. Raise the server's "
            "PREFECT_SERVER_API_MAX_PARAMETER_SIZE (server.api.max_parameter_size; 0: no "
            "limit) and restart it") from None


def _stage_run(cfg, name: str, fn, **params):
    """One stage group of the pipeline: ``fn`` (its subflow) in this process, or a run of its
    deployment ``<flow name>/<name>`` (prefect.yaml) waited for, when the deployment's kind —
    its ``gpu`` or ``cpu`` tag in prefect.yaml — has a pool in the config's
    ``runner.work_pools``; its result either way. A deployment run's result is read back from
    Prefect's result storage (JSON), so the workers must persist results (prefect.yaml sets
    PREFECT_RESULTS_PERSIST_BY_DEFAULT) to storage this process can read (on several machines:
    remote result storage, deployments/README.md)."""
    if not cfg.runner.work_pools:
        return fn(cfg, **params)
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import MissingResult

    flow_name = getattr(fn, "flow_name", None) or fn.name
    deployment = f"{flow_name}/{name}"
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
    kind = next((k for k in ("gpu", "cpu") if k in (dep.tags or [])), None)
    pool = cfg.runner.work_pools.get(kind) if kind else None
    if not pool:
        return fn(cfg, **params)
    if dep.work_pool_name != pool:
        raise ValueError(f"runner.work_pools.{kind} is {pool!r} but deployment {deployment!r} "
                         f"runs on work pool {dep.work_pool_name!r}; redeploy it (prefect.yaml) "
                         "or fix the config")
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
