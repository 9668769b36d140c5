"""The whole EnsembleLoRA pipeline (Algorithm 2 of the paper), one subflow per stage."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ensemble_core import pipeline as core
from ensemble_core.affinity import Affinity
from ensemble_core.report import ACCURACY_HEADERS, accuracy_rows, write_report
from ensemble_core.stages import claim_run_dir, read_manifest, release_models
from ensemble_core.storage import join, read_json, write_json
from tasks.common import for_run
from tasks.ensemble import (boost_group, fit_weights_and_evaluate, save_theta_star,
                            score_member, train_adapter)

from .affinity import run_affinity
from .common import config_dict, resolve_config
from .gradient_features import gradient_features


@flow(name="group_adapters")
def group_adapters(config, groups: list[list[str]]) -> dict:
    """Stage 3: one adapter per group (fan-out), the all-task baseline, and θ*."""
    cfg = resolve_config(config)
    data = config_dict(cfg)
    train = for_run(train_adapter, cfg)
    futures = {f"group-{k}": train.submit(data, f"group-{k}", g) for k, g in enumerate(groups)}
    futures[core.BASELINE] = train.submit(data, core.BASELINE, [t.name for t in cfg.tasks])
    theta = for_run(save_theta_star, cfg).submit(data)
    return {"adapters": {k: f.result() for k, f in futures.items()}, "theta_star": theta.result()}


@flow(name="boosting_and_weights")
def boosting_and_weights(config, adapters: dict, gradient_records: dict,
                         estimation_s: float = 0.0) -> dict:
    """Stage 4: b boosting steps on the group with the highest training loss, then the
    per-task ensemble weights and the evaluation against the baseline."""
    cfg = resolve_config(config)
    log = get_run_logger()
    data = config_dict(cfg)
    names = [t.name for t in cfg.tasks]
    score = for_run(score_member, cfg)
    groups = [{"name": k, "tasks": a["tasks"], "members": [{"name": k, "scale": 1.0}]}
              for k, a in adapters["adapters"].items() if k != core.BASELINE]
    plans = {g["name"]: {"train": g["tasks"], "validation": names, "test": names} for g in groups}
    plans[core.BASELINE] = {"test": names}
    members = dict(adapters["adapters"])
    if cfg.boosting.steps > 0:  # θ* is a member (scale −1) of every boosted group
        plans[core.THETA_STAR] = {"validation": names, "test": names}
        if cfg.boosting.steps > 1:  # later steps need the boosted groups' train scores
            plans[core.THETA_STAR]["train"] = names
        members[core.THETA_STAR] = adapters["theta_star"]
    futures = {k: score.submit(data, members[k], plan) for k, plan in plans.items()}
    score_records = {k: f.result() for k, f in futures.items()}
    member_scores = {k: read_json(r["path"])["scores"] for k, r in score_records.items()}

    boosting = []
    for step in range(1, cfg.boosting.steps + 1):
        losses = {g["name"]: core.group_train_loss(member_scores, g, gradient_records)
                  for g in groups}
        worst = max(groups, key=lambda g: losses[g["name"]])
        log.info("boosting step %d: training losses %s; boosting %s", step,
                 {k: round(v, 4) for k, v in losses.items()}, worst["name"])
        group_scores = {t: {"train": [list(map(float, s)) for s in core.group_member_scores(
            member_scores, worst["members"], t, "train")]} for t in worst["tasks"]}
        shas = [score_records[m["name"]]["sha256"] for m in worst["members"]]
        rec = for_run(boost_group, cfg)(data, worst, gradient_records, group_scores, shas, step)
        boosting.append(rec)
        log.info("boosting step %d (%s): train loss %.4f -> %.4f", step, worst["name"],
                 rec["train_loss_before"], rec["train_loss_after"])
        if not rec["accepted"]:
            log.info("boosting stopped early: the training loss did not fall")
            break
        # h = h_G + (h_k − h0): the step size η is inside the boosting adapter (θ* + η P x̂)
        worst["members"] += [{"name": rec["name"], "scale": 1.0},
                             {"name": core.THETA_STAR, "scale": -1.0}]
        score_records[rec["name"]] = score(
            data, rec, {"train": worst["tasks"], "validation": names, "test": names})
        member_scores[rec["name"]] = read_json(score_records[rec["name"]]["path"])["scores"]
    write_json(join(cfg.run_dir, "boosting.json"), {"steps": boosting})

    timings = _compute(gradient_records, adapters, boosting, estimation_s)
    fp = read_manifest(cfg, names[0])["model"]["base"]
    result = for_run(fit_weights_and_evaluate, cfg)(
        data, groups, member_scores, sorted(r["sha256"] for r in score_records.values()),
        core.BASELINE, timings, fp)
    return dict(result, boosting=boosting, groups=groups)


def _compute(gradient_records, adapters, boosting, estimation_s) -> dict:
    """Wall seconds per part, from the records (so a resumed run reports the original work).
    The compute ratio is (stage 1 + stage 2 + group adapters + boosting) / baseline training."""
    s1 = sum(t["total_s"] for rec in gradient_records.values()
             for t in read_json(rec["manifest"])["timings"].values())
    groups_s = sum(a["train"]["wall_seconds"] for k, a in adapters["adapters"].items()
                   if k != core.BASELINE)
    base_s = adapters["adapters"][core.BASELINE]["train"]["wall_seconds"]
    boost_s = sum(b.get("seconds", 0.0) for b in boosting)
    ensemble_s = s1 + estimation_s + groups_s + boost_s
    out = {"gradients_s": s1, "estimation_s": estimation_s, "group_adapters_s": groups_s,
           "boosting_s": boost_s, "ensemble_pipeline_s": ensemble_s, "baseline_s": base_s,
           "ratio": ensemble_s / max(base_s, 1e-9),
           "baseline_flops": adapters["adapters"][core.BASELINE]["train"]["flops_estimate"],
           "group_flops": sum(a["train"]["flops_estimate"]
                              for k, a in adapters["adapters"].items() if k != core.BASELINE),
           "peak_memory_bytes": max(a["train"]["peak_memory_bytes"]
                                    for a in adapters["adapters"].values())}
    return out


@flow(name="ensemble_lora", log_prints=True)
def ensemble_lora(config, overrides: list[str] | None = None) -> dict:
    """Gradient features → subset regressions, affinity, groups → group adapters → boosting and
    ensemble weights → evaluation against one adapter on all tasks."""
    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    grads = _stage(cfg, "gradient-features", gradient_features)
    aff = _stage(cfg, "affinity", run_affinity, gradient_records=grads["tasks"])
    adapters = _stage(cfg, "group-adapters", group_adapters, groups=aff["group_tasks"])
    ens = _stage(cfg, "boosting-and-weights", boosting_and_weights, adapters=adapters,
                 gradient_records=grads["tasks"], estimation_s=aff["seconds"])
    metrics = ens["summary"]
    with open(aff["affinity"]["path"]) as f:
        affinity = Affinity.from_json(f.read())
    report = write_report(cfg.run_dir, cfg.name, metrics, affinity,
                          read_json(aff["groups"]["path"]), ens["boosting"],
                          grads.get("linearity"))
    manifest = _write_run_manifest(cfg, grads, aff, adapters, ens, report)
    try:
        create_markdown_artifact(_inline_heatmap(report), key=_key(cfg.name, "report"),
                                 description="EnsembleLoRA report")
        create_table_artifact([dict(zip(ACCURACY_HEADERS, r)) for r in accuracy_rows(metrics)],
                              key=_key(cfg.name, "accuracy"), description="Test accuracy")
    except Exception as e:  # artifacts are a convenience; never fail a finished run for them
        log.warning("could not create artifacts: %s", e)
    log.info("average test accuracy: baseline %.1f%%, ensemble %.1f%%",
             100 * metrics["average"]["baseline_accuracy"],
             100 * metrics["average"]["ensemble_accuracy"])
    return {"run_dir": cfg.run_dir, "metrics": metrics, "manifest": manifest,
            "report": report["path"], "groups": aff["group_tasks"]}


# Stage deployments (prefect.yaml): name -> (flow/deployment, the kind of work pool it runs on).
STAGE_DEPLOYMENTS = {
    "gradient-features": ("gradient_features/gradient-features", "gpu"),
    "affinity": ("affinity/affinity", "cpu"),
    "group-adapters": ("group_adapters/group-adapters", "gpu"),
    "boosting-and-weights": ("boosting_and_weights/boosting-and-weights", "cpu"),
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


def _inline_heatmap(report: dict) -> str:
    """The report's Markdown with the affinity heatmap inlined (a data URI), since the UI
    cannot resolve the report's relative image path."""
    import base64

    import fsspec
    try:
        with fsspec.open(report["heatmap"]["path"], "rb") as f:
            png = base64.b64encode(f.read()).decode()
    except Exception:
        return report["markdown"]
    return report["markdown"].replace("](affinity.png)", f"](data:image/png;base64,{png})")


def _key(name: str, what: str) -> str:
    import re
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


def _write_run_manifest(cfg, grads, aff, adapters, ens, report) -> str:
    from ensemble_core.stages import code_version

    files = {}
    for t, rec in grads["tasks"].items():
        for split, f in rec["files"].items():
            files[f"gradients/{t}/{split}.parquet"] = f["sha256"]
    files["affinity.json"] = aff["affinity"]["sha256"]
    files["groups.json"] = aff["groups"]["sha256"]
    for name, a in list(adapters["adapters"].items()) + [("theta-star", adapters["theta_star"])]:
        files[f"adapters/{name}/adapter_model.safetensors"] = a["sha256"]
    for b in ens["boosting"]:
        files[f"adapters/{b['name']}/adapter_model.safetensors"] = b["sha256"]
    files["ensemble.json"] = ens["ensemble"]["sha256"]
    files["metrics.json"] = ens["metrics"]["sha256"]
    files["report.md"] = report["sha256"]
    url = join(cfg.run_dir, "manifest.json")
    write_json(url, {"name": cfg.name, "config_sha256": cfg.fingerprint(),
                     "config": config_dict(cfg), "code_version": code_version(), "files": files})
    return url
