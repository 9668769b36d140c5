"""The Prefect tasks, one per library stage function and in stage order (docs/design.md).

Each task runs one ``ensemble_core.stages`` function with the same parameters, under a cache
key derived from what that stage declares it depends on (``common.keyed``), tagged with the
kind of worker it needs (``gpu``/``cpu``) and returning the stage's record as JSON
(``Record.to_json``; flows read it back with ``Record.from_json``). No math here.
"""
from __future__ import annotations

from prefect import task

from ensemble_core import stages
from ensemble_core.records import (AdapterRecord, AdaptersResult, BaselinesRecord, BoostRecord,
                                   Compute, EnsembleRecord, EvaluationRecord, FeaturesRecord,
                                   GroupEnsemble, GroupsRecord, LinearityRecord, ScoresRecord,
                                   SubsetBatch, SubsetEstimate)
from ensemble_core.run import Run

from .common import ProgressReporter, gpu_slot, keyed, retry_unless_input_error

JSON = dict(persist_result=True, result_serializer="json")
RETRY = dict(retries=1, retry_condition_fn=retry_unless_input_error)


# -- stage 1: gradient features -------------------------------------------------------------

@task(name="compute_gradients", tags=["gpu"], cache_policy=keyed(stages.gradient_features, FeaturesRecord),
      retry_delay_seconds=5, task_run_name="gradients[{task}]", **JSON, **RETRY)
def compute_gradients(run: Run, task: str) -> dict:
    """Outputs and projected gradients of one task's train and validation examples at θ*."""
    td = run.task_data(task)
    sizes = {s: len(td.splits[s]) for s in ("train", "validation")}
    progress = ProgressReporter(f"gradients[{task}]", artifact_key=f"gradients-{task.lower()}")
    # one progress bar over both splits
    offset = {"train": 0, "validation": sizes["train"]}
    with gpu_slot():
        rec = stages.gradient_features(run, task, progress=lambda done, total, split: progress(
            offset[split] + done, sum(sizes.values()), split))
    progress.finish()
    return rec.to_json()


@task(name="linearity_check", tags=["gpu"], cache_policy=keyed(stages.linearity, LinearityRecord),
      task_run_name="linearity[{task}]", **JSON)
def linearity_check(run: Run, task: str) -> dict:
    """First-order check: true outputs vs h0 + g̃ᵀx at relative distances 0.05%–0.25%."""
    with gpu_slot():
        return stages.linearity(run, task).to_json()


# -- stage 2: subset regressions ------------------------------------------------------------

@task(name="fit_subsets", tags=["cpu"], cache_policy=keyed(stages.fit_subsets, SubsetBatch),
      task_run_name="subsets[{batch}]", **JSON, **RETRY)
def fit_subsets(run: Run, features: dict[str, FeaturesRecord], batch: int, subsets: list,
                tasks: list[str]) -> dict:
    """First-order surrogate fits for a batch of task subsets."""
    return stages.fit_subsets(run, features, batch, subsets, tasks).to_json()


# -- stage 3: affinity and groups -----------------------------------------------------------

@task(name="affinity_and_groups", tags=["cpu"], cache_policy=keyed(stages.affinity_and_groups, GroupsRecord),
      task_run_name="affinity-and-groups", **JSON)
def affinity_and_groups(run: Run, results: list[SubsetEstimate], tasks: list[str],
                        previous: list[list[str]] | None = None) -> dict:
    """Task affinity (eq. 1) and the SDP grouping (Appendix A.1), or the previous groups with
    the new tasks joined (clustering.incremental)."""
    return stages.affinity_and_groups(run, results, tasks, previous).to_json()


# -- stage 4: group adapters ----------------------------------------------------------------

@task(name="train_adapter", tags=["gpu"], cache_policy=keyed(stages.train_group, AdapterRecord),
      task_run_name="train[{name}]", **JSON, **RETRY)
def train_adapter(run: Run, name: str, tasks: list[str], start: AdapterRecord | None = None
                  ) -> dict:
    """Fine-tune one adapter on the union of its tasks (a group, all tasks: the single-adapter
    baseline, or a baseline's), from θ* or from ``start``'s weights."""
    progress = ProgressReporter(f"train[{name}]", artifact_key=f"train-{name.lower()}")
    with gpu_slot():
        rec = stages.train_group(run, name, tasks, start=start, progress=progress)
    progress.finish()
    return rec.to_json()


@task(name="save_theta_star", tags=["gpu"], cache_policy=keyed(stages.save_theta_star, AdapterRecord),
      task_run_name="theta-star", **JSON)
def save_theta_star(run: Run) -> dict:
    with gpu_slot():
        return stages.save_theta_star(run).to_json()


# -- stage 5: boosting and weights ----------------------------------------------------------

@task(name="score_member", tags=["gpu"], cache_policy=keyed(stages.score_member, ScoresRecord),
      task_run_name="scores-{phase}[{adapter.name}/{task}]", **JSON)
def score_member(run: Run, adapter: AdapterRecord, task: str, splits: list[str],
                 phase: str = "fit") -> dict:
    """Scores h_c(s) of one member adapter on ``splits`` of one task."""
    with gpu_slot():
        return stages.score_member(run, adapter, task, splits, phase).to_json()


@task(name="boost_group", tags=["gpu"], cache_policy=keyed(stages.boost_group, BoostRecord),
      task_run_name="boost[{group.name}-{step}]", **JSON)
def boost_group(run: Run, group: GroupEnsemble, features: dict[str, FeaturesRecord],
                scores: dict[str, ScoresRecord], step: int) -> dict:
    """One boosting step: residual fit on projected gradients, restored as a PEFT adapter."""
    with gpu_slot():
        return stages.boost_group(run, group, features, scores, step).to_json()


@task(name="fit_weights", tags=["cpu"], cache_policy=keyed(stages.fit_weights, EnsembleRecord),
      task_run_name="weights", **JSON)
def fit_weights(run: Run, groups: list[GroupEnsemble], scores: dict[str, ScoresRecord]) -> dict:
    """Ensemble weights per task over the group ensembles (validation); ensemble.json."""
    return stages.fit_weights(run, groups, scores).to_json()


# -- stage 6: evaluation --------------------------------------------------------------------

@task(name="evaluate_baselines", tags=["cpu"], cache_policy=keyed(stages.evaluate_baselines, BaselinesRecord),
      task_run_name="baselines", **JSON)
def evaluate_baselines(run: Run, plan: dict, adapters: AdaptersResult,
                       scores: dict[str, ScoresRecord]) -> dict:
    """Test accuracy and compute of the paper's baselines; baselines.json."""
    return stages.evaluate_baselines(run, plan, adapters, scores).to_json()


@task(name="evaluate", tags=["cpu"], cache_policy=keyed(stages.evaluate, EvaluationRecord),
      task_run_name="evaluation", **JSON)
def evaluate(run: Run, ensemble: EnsembleRecord, scores: dict[str, ScoresRecord], baseline: str,
             compute: Compute) -> dict:
    """Test accuracy of the ensemble, the own-group ensembles and the baseline; metrics.json."""
    return stages.evaluate(run, ensemble, scores, baseline, compute).to_json()
