"""Stage 1 as a flow: one `compute_gradients` task per dataset task (fan-out, `gpu` tag), then
the first-order check on the first task (``ensemble_core.algorithm2.gradient_features``)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core import algorithm2
from ensemble_core.records import FeaturesResult
from ensemble_core.runtime import release_models
from tasks.runner import TaskRunner

from .common import open_run


@flow(name="gradient_features")
def gradient_features(config, overrides: list[str] | None = None) -> FeaturesResult:
    """Stage 1: outputs h(s) and projected gradients g̃ = Pᵀ∇h(s) at θ* for every task."""
    run = open_run(config, overrides)
    log = get_run_logger()
    res = algorithm2.gradient_features(run, TaskRunner(run))
    if res.linearity is not None:
        for row in res.linearity.results:
            log.info("linearity[%s] distance %.2f%%: relative error %.3g%%", res.linearity.task,
                     100 * row.relative_distance, 100 * row.relative_error)
    release_models()  # θ* and P's cached blocks are stage 1's alone
    return res
