"""Stages 2–3 as a flow: subset regressions fanned out over CPU workers, then the task affinity
and the groups; and the paper's Table 3 check of the estimates."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core import algorithm2, stages
from ensemble_core.records import EstimateCheck, FeaturesRecord, GroupingResult
from tasks.checks import check_estimates
from tasks.runner import TaskRunner

from .common import open_run, resolve_config, task_runner_for
from .gradient_features import gradient_features


@flow(name="affinity")
def affinity_flow(config, overrides: list[str] | None = None,
                  features: dict[str, FeaturesRecord] | None = None) -> GroupingResult:
    """Stages 2–3: sample k task subsets, fit the first-order surrogate on each (in parallel),
    average into the task affinity T (eq. 1), and group the tasks with the SDP relaxation
    (``ensemble_core.algorithm2.affinity_and_groups``)."""
    run = open_run(config, overrides)
    if features is None:
        features = gradient_features(run.cfg).features
    features = {t: FeaturesRecord.from_json(r) for t, r in features.items()}
    return algorithm2.affinity_and_groups(run, TaskRunner(run), features, get_run_logger())


def run_affinity(config, overrides=None, features=None) -> GroupingResult:
    """The affinity flow on the task runner the config names (threads, or Dask)."""
    cfg = resolve_config(config, overrides)
    runner = task_runner_for(cfg)
    fl = affinity_flow.with_options(task_runner=runner) if runner is not None else affinity_flow
    return fl(cfg, features=features)


run_affinity.flow_name = affinity_flow.name  # its deployment (flows/pipeline._stage)


@flow(name="check_estimates")
def check_estimates_flow(config, overrides: list[str] | None = None, r: int = 50,
                         dims: list[int] | None = None,
                         test_examples: int | None = None) -> EstimateCheck:
    """The paper's Table 3: fine-tune for real on r of the sampled subsets and compare with
    the first-order estimates (relative error of test accuracy, the paper's measure; of the
    validation loss; Spearman correlation; speed-up in FLOPs and wall time), at every
    projection dimension of ``dims`` (default: all of estimation.projection_dim)."""
    run = open_run(config, overrides)
    log = get_run_logger()
    features = gradient_features(run.cfg).features
    subsets = [s for b in TaskRunner(run).call(stages.save_subset_plan, run.task_names).batches
               for s in b]
    res = EstimateCheck.from_json(check_estimates(run, features, subsets, r, dims,
                                                  test_examples))
    for s in res.summaries:
        log.info("estimate check at d = %d: %d pairs, test accuracy relative error %s, "
                 "validation loss relative error %.2f%%, Spearman %s, speed-up %.0fx in FLOPs "
                 "(%.1fx in wall time with stage 1)", s.d, s.pairs,
                 "-" if s.mean_test_accuracy_relative_error is None
                 else f"{100 * s.mean_test_accuracy_relative_error:.2f}%",
                 100 * s.mean_relative_error, "-" if s.spearman is None else f"{s.spearman:.2f}",
                 s.flops_speedup, s.compute_ratio_with_gradients)
    return res
