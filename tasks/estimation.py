"""Stage 2 tasks: subset regressions (CPU workers, fanned out) and clustering."""
from __future__ import annotations

from prefect import task

from ensemble_core import stages

from .common import as_config, keyed, retry_unless_input_error, stage_key


def _inputs_of(records: dict, names) -> list:
    """Content hashes of the gradient files a computation reads."""
    return [(n, records[n]["files"]["train"]["sha256"], records[n]["files"]["validation"]["sha256"])
            for n in names]


def _subsets_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    names = [t.name for t in cfg.tasks]
    used = sorted({names[i] for s in parameters["subsets"] for i in s})
    e = cfg.estimation
    # Only what the fits read: the features of the tasks in these subsets (by content), l2 and
    # max_norm, and the model/adapter (p and ‖θ*‖ of the relative distance). Not the whole
    # config (sections ()), or changing one dataset would refit every subset.
    return stage_key("subsets", cfg, ("model", "adapter", "seed"),
                     [e.l2, e.max_norm, e.max_relative_distance], parameters["subsets"], [names[i] for s in parameters["subsets"] for i in s],
                     _inputs_of(parameters["gradient_records"], used), parameters["batch_index"])


@task(name="fit_subsets", tags=["cpu"], cache_policy=keyed(_subsets_key), persist_result=True,
      result_serializer="json", retries=1, retry_condition_fn=retry_unless_input_error,
      task_run_name="subsets[{batch_index}]")
def fit_subsets(config: dict, gradient_records: dict, batch_index: int, subsets: list) -> dict:
    """First-order surrogate fits for a batch of task subsets (DESIGN step 2)."""
    cfg = as_config(config)
    return stages.estimate_subsets(cfg, gradient_records, [tuple(s) for s in subsets],
                                   batch_index)


def _cluster_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    results = [(r["subset"], r["per_task"]) for r in parameters["subset_results"]]
    return stage_key("clusters", cfg, ("clustering",), cfg.estimation.metric,
                     [t.name for t in cfg.tasks], results)


@task(name="cluster_tasks", tags=["cpu"], cache_policy=keyed(_cluster_key), persist_result=True,
      result_serializer="json", task_run_name="affinity-and-groups")
def cluster_tasks(config: dict, subset_results: list) -> dict:
    """Task affinity (eq. 1) and the SDP grouping (Appendix A.1)."""
    return stages.cluster_tasks(as_config(config), subset_results)
