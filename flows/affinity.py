"""Stage 2 as a flow: subset regressions fanned out over CPU workers, then affinity and groups."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core import stages
from tasks.common import for_run
from tasks.estimation import cluster_tasks, fit_subsets

from .common import config_dict, resolve_config, task_runner_for
from .gradient_features import gradient_features


@flow(name="affinity")
def affinity_flow(config, overrides: list[str] | None = None,
                  gradient_records: dict | None = None) -> dict:
    """Sample k task subsets, fit the first-order surrogate on each (in parallel), average into
    the task affinity T (eq. 1), and group the tasks with the SDP relaxation."""
    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    data = config_dict(cfg)
    if gradient_records is None:
        gradient_records = gradient_features(cfg)["tasks"]
    subsets = stages.plan_subsets(cfg)
    batches = stages.subset_batches(cfg, subsets)
    log.info("%d subsets of size %d over %d tasks, in %d task runs", len(subsets),
             cfg.estimation.subset_size, len(cfg.tasks), len(batches))
    fit = for_run(fit_subsets, cfg)
    futures = [fit.submit(data, gradient_records, i, [list(s) for s in batch])
               for i, batch in enumerate(batches)]
    batch_records = [f.result() for f in futures]
    results = [r for b in batch_records for r in b["results"]]
    clusters = for_run(cluster_tasks, cfg)(data, results)
    for k, g in enumerate(clusters["group_tasks"]):
        log.info("group %d: %s", k, ", ".join(g))
    seconds = sum(b["seconds"] for b in batch_records) + clusters["seconds"]
    return {"subsets": results, "workers": sorted({b["worker"] for b in batch_records}),
            **clusters, "seconds": seconds}


def run_affinity(config, overrides=None, gradient_records=None) -> dict:
    """The affinity flow on the task runner the config names (threads, or Dask)."""
    cfg = resolve_config(config, overrides)
    runner = task_runner_for(cfg)
    fl = affinity_flow.with_options(task_runner=runner) if runner is not None else affinity_flow
    return fl(cfg, gradient_records=gradient_records)


@flow(name="check_estimates")
def check_estimates_flow(config, overrides: list[str] | None = None, r: int = 3) -> dict:
    """The paper's Table 3: fine-tune for real on r of the sampled subsets and compare with
    the first-order estimates (mean relative error, Spearman correlation, compute ratio)."""
    from ensemble_core.checks import check_estimates

    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    records = gradient_features(cfg)["tasks"]
    res = check_estimates(cfg, records, stages.plan_subsets(cfg), r, seed=cfg.seed,
                          progress=lambda i, n: log.info("fine-tuned subset %d/%d", i, n))
    s = res["summary"]
    log.info("estimate check: %d pairs, mean relative error %.2f%%, Spearman %.2f, "
             "compute ratio %.1fx (with amortized gradients %.1fx)", s["pairs"],
             100 * s["mean_relative_error"], s["spearman"], s["compute_ratio_fits_only"],
             s["compute_ratio_with_gradients"])
    return res
