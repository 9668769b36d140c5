"""Stage 1 as a flow: one `compute_gradients` task per dataset task (fan-out, `gpu` tag), then
the first-order check on the first task."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core.records import FeaturesRecord, FeaturesResult, LinearityRecord
from ensemble_core.runtime import release_models
from tasks.common import for_run
from tasks.stages import compute_gradients, linearity_check

from .common import open_run


@flow(name="gradient_features")
def gradient_features(config, overrides: list[str] | None = None) -> FeaturesResult:
    """Stage 1: outputs h(s) and projected gradients g̃ = Pᵀ∇h(s) at θ* for every task."""
    run = open_run(config, overrides)
    log = get_run_logger()
    compute = for_run(compute_gradients, run)
    futures = {t: compute.submit(run, t) for t in run.task_names}
    features = {}
    for task, fut in futures.items():
        rec = FeaturesRecord.from_json(fut.result())
        # a cached record whose files are gone or changed: in a local run directory the
        # cache key function has checked that before serving it (tasks/common.for_run); a
        # remote one keeps Prefect's own storage, so it is checked here
        if run.dir.prefect is None and not rec.verified():
            log.warning("gradients[%s]: cached files missing or changed; recomputing", task)
            rec = FeaturesRecord.from_json(compute.with_options(refresh_cache=True)(run, task))
        features[task] = rec
    linearity = None
    if run.cfg.estimation.linearity_check:
        linearity = LinearityRecord.from_json(
            for_run(linearity_check, run)(run, run.task_names[0]))
        for row in linearity.results:
            log.info("linearity[%s] distance %.2f%%: relative error %.3g%%", linearity.task,
                     100 * row.relative_distance, 100 * row.relative_error)
    release_models()  # θ* and P's cached blocks are stage 1's alone
    return FeaturesResult(features, linearity)
