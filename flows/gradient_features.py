"""Stage 1 as a flow: one `compute_gradients` task per dataset task (fan-out, `gpu` tag)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core.stages import claim_run_dir, gradient_record_valid
from tasks.common import for_run
from tasks.gradients import compute_gradients, linearity_check

from .common import config_dict, resolve_config


@flow(name="gradient_features")
def gradient_features(config, overrides: list[str] | None = None) -> dict:
    """Outputs h(s) and projected gradients g̃ = Pᵀ∇h(s) at θ* for every task (DESIGN step 1)."""
    cfg = resolve_config(config, overrides)
    claim_run_dir(cfg)
    log = get_run_logger()
    data = config_dict(cfg)
    compute = for_run(compute_gradients, cfg)
    futures = {t.name: compute.submit(data, t.name) for t in cfg.tasks}
    records = {}
    for name, fut in futures.items():
        rec = fut.result()
        if not gradient_record_valid(rec):  # a cached record whose files are gone or changed
            log.warning("gradients[%s]: cached files missing or changed; recomputing", name)
            rec = compute.with_options(refresh_cache=True)(data, name)
        records[name] = rec
    result = {"run_dir": cfg.run_dir, "tasks": records}
    if cfg.estimation.linearity_check:
        lin = for_run(linearity_check, cfg)(data, cfg.tasks[0].name)
        for row in lin["results"]:
            log.info("linearity[%s] distance %.2f%%: relative error %.3g%%",
                     lin["task"], 100 * row["relative_distance"], 100 * row["relative_error"])
        result["linearity"] = lin
    return result
