"""Stage 1 tasks: projected gradient features per dataset task (GPU workers)."""
from __future__ import annotations

from prefect import task

from ensemble_core import stages
from ensemble_core.data import load_task

from .common import (ProgressReporter, as_config, gpu_slot, keyed, retry_unless_input_error,
                     stage_key)


def _gradient_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    td = load_task(cfg.task(parameters["task_name"]), cfg.data_root)
    return stage_key("gradients", cfg, ("model", "adapter", "seed"),
                     stages.features_fingerprint(cfg), parameters["task_name"],
                     td.config.model_dump_json(), stages.data_fingerprint(td))


@task(name="compute_gradients", tags=["gpu"], cache_policy=keyed(_gradient_key),
      persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_input_error,
      task_run_name="gradients[{task_name}]")
def compute_gradients(config: dict, task_name: str) -> dict:
    """Outputs and projected gradients of one task's train and validation examples at θ*."""
    cfg = as_config(config)
    td = load_task(cfg.task(task_name), cfg.data_root)
    progress = ProgressReporter(f"gradients[{task_name}]",
                                artifact_key=f"gradients-{task_name.lower()}")
    sizes = [len(td.splits[s]) for s in stages.GRADIENT_SPLITS]  # one progress bar, both splits
    before = {s: sum(sizes[:k]) for k, s in enumerate(stages.GRADIENT_SPLITS)}
    with gpu_slot():
        rec = stages.gradient_features(
            cfg, td, progress=lambda t, s, i, n: progress(before[s] + i, sum(sizes), s))
    progress.finish()
    return rec


def _linearity_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    td = load_task(cfg.task(parameters["task_name"]), cfg.data_root)  # it reads the task's data
    return stage_key("linearity", cfg, ("model", "adapter", "seed"),
                     stages.features_fingerprint(cfg), parameters["task_name"],
                     stages.data_fingerprint(td), cfg.estimation.linearity_examples,
                     cfg.estimation.batch_size)


@task(name="linearity_check", tags=["gpu"], cache_policy=keyed(_linearity_key),
      persist_result=True, result_serializer="json", task_run_name="linearity[{task_name}]")
def linearity_check(config: dict, task_name: str) -> dict:
    """First-order check: true outputs vs h0 + g̃ᵀx at relative distances 0.05%–0.25%."""
    cfg = as_config(config)
    td = load_task(cfg.task(task_name), cfg.data_root)
    with gpu_slot():
        return stages.run_linearity_check(cfg, td)
