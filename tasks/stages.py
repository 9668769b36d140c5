"""The Prefect tasks, one per library stage function and in stage order (docs/design.md).

Each task runs one ``ensemble_core.stages`` function with the same parameters, under a cache
key derived from what that stage declares it depends on (``common.keyed``), tagged with the
kind of worker it needs (``gpu``/``cpu``) and returning the stage's record as JSON
(``Record.to_json``; ``tasks.runner.TaskRunner`` reads it back with the record type the stage
declares). No math here. :data:`TASKS` maps each stage function to its task.
"""
from __future__ import annotations

from prefect import task

from ensemble_core import stages
from ensemble_core.records import (AdapterRecord, AdaptersResult, BaselinePlan, BoostRecord,
                                   Compute, EnsembleRecord, FeaturesRecord, GroupEnsemble,
                                   GroupsRecord, ScoresRecord, SubsetEstimate)
from ensemble_core.run import Run

from .common import ProgressReporter, gpu_slot, keyed, retry_unless_input_error

JSON = dict(persist_result=True, result_serializer="json")
RETRY = dict(retries=1, retry_condition_fn=retry_unless_input_error)


# -- stage 1: gradient features -------------------------------------------------------------

@task(name="compute_gradients", tags=["gpu"], cache_policy=keyed(stages.gradient_features),
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


def _pack_run_name() -> str:
    """gradients[<first task>+<how many more>]"""
    from prefect.runtime import task_run

    tasks = task_run.parameters["tasks"]
    return f"gradients[{tasks[0]}+{len(tasks) - 1}]"


@task(name="compute_gradients_pack", tags=["gpu"],
      cache_policy=keyed(stages.gradient_features_pack), retry_delay_seconds=5,
      task_run_name=_pack_run_name, **JSON, **RETRY)
def compute_gradients_pack(run: Run, tasks: list[str]) -> dict:
    """Stage 1 for several small tasks in one task run (``runner.feature_runs``)."""
    progress = ProgressReporter(f"gradients[{tasks[0]}+{len(tasks) - 1}]",
                                artifact_key=f"gradients-{tasks[0].lower()}-pack")
    with gpu_slot():
        rec = stages.gradient_features_pack(
            run, tasks, progress=lambda done, total, task: progress(done, total, task))
    progress.finish()
    return rec.to_json()


def _linearity_run_name() -> str:
    """linearity[<task>] at the paper's distances; linearity-trained[<task>] at the distances
    the adapters moved (stage 4)."""
    from prefect.runtime import task_run

    p = task_run.parameters
    return ("linearity-trained" if p.get("distances") else "linearity") + f"[{p['task']}]"


@task(name="linearity_check", tags=["gpu"], cache_policy=keyed(stages.linearity),
      task_run_name=_linearity_run_name, **JSON)
def linearity_check(run: Run, task: str, distances: list[float] | None = None) -> dict:
    """First-order check: true margins vs m0 + g̃ᵀx at the paper's relative distances
    (0.05%–0.25% of the whole model's norm), or at the ``distances`` the adapters moved."""
    with gpu_slot():
        return stages.linearity(run, task, distances).to_json()


# -- stage 2: subset regressions ------------------------------------------------------------

@task(name="save_subset_plan", tags=["cpu"], cache_policy=keyed(stages.save_subset_plan),
      task_run_name="subset-plan", **JSON)
def save_subset_plan(run: Run, tasks: list[str]) -> dict:
    """estimation/plan.json: the sampled subsets in their batches (this directory's plan,
    extended to the tasks, or a fresh one)."""
    return stages.save_subset_plan(run, tasks).to_json()


@task(name="fit_subsets", tags=["cpu"], cache_policy=keyed(stages.fit_subsets),
      task_run_name="subsets[{batch}]", **JSON, **RETRY)
def fit_subsets(run: Run, features: dict[str, FeaturesRecord], batch: int, subsets: list,
                tasks: list[str]) -> dict:
    """First-order surrogate fits for a batch of task subsets."""
    return stages.fit_subsets(run, features, batch, subsets, tasks).to_json()


# -- stage 3: affinity and groups -----------------------------------------------------------

@task(name="affinity_and_groups", tags=["cpu"], cache_policy=keyed(stages.affinity_and_groups),
      task_run_name="affinity-and-groups", **JSON)
def affinity_and_groups(run: Run, results: list[SubsetEstimate], tasks: list[str]) -> dict:
    """Task affinity (eq. 1) and the groups (the SDP of Appendix A.1, or another registered
    clustering method), or the directory's previous groups with the new tasks joined."""
    return stages.affinity_and_groups(run, results, tasks).to_json()


@task(name="plan_baselines", tags=["cpu"], cache_policy=keyed(stages.plan_baselines),
      task_run_name="baseline-plan", **JSON)
def plan_baselines(run: Run, groups: GroupsRecord, features: dict[str, FeaturesRecord]) -> dict:
    """The adapters of the configured baselines."""
    return stages.plan_baselines(run, groups, features).to_json()


# -- stage 4: group adapters ----------------------------------------------------------------

@task(name="train_group", tags=["gpu"], cache_policy=keyed(stages.train_group),
      task_run_name="train[{name}]", **JSON, **RETRY)
def train_group(run: Run, name: str, tasks: list[str], start: AdapterRecord | None = None
                  ) -> dict:
    """Fine-tune one adapter on the union of its tasks (a group, all tasks: the single-adapter
    baseline, or a baseline's), from θ* or from ``start``'s weights."""
    progress = ProgressReporter(f"train[{name}]", artifact_key=f"train-{name.lower()}")
    with gpu_slot():
        rec = stages.train_group(run, name, tasks, start=start, progress=progress)
    progress.finish()
    return rec.to_json()


@task(name="train_groups", tags=["gpu"], cache_policy=keyed(stages.train_groups),
      task_run_name="train-together", **JSON, **RETRY)
def train_groups(run: Run, plans: list[tuple[str, list[str]]]) -> dict:
    """Fine-tune several adapters together, one pass over the base per step for all of them
    (``training.one_pass``)."""
    with gpu_slot():
        return stages.train_groups(run, plans).to_json()


@task(name="save_theta_star", tags=["gpu"], cache_policy=keyed(stages.save_theta_star),
      task_run_name="theta-star", **JSON)
def save_theta_star(run: Run) -> dict:
    with gpu_slot():
        return stages.save_theta_star(run).to_json()


# -- stage 5: boosting and weights ----------------------------------------------------------

def _scores_run_name() -> str:
    """scores-<phase>[<task>] (its members together), scores-<phase>[<member>/<task>] when one
    member is scored (a boosting adapter); several tasks: the first and how many more."""
    from prefect.runtime import task_run

    p = task_run.parameters
    plan = p["plan"]
    members = {m for by_member in plan.values() for m in by_member}
    first = next(iter(plan))
    what = first if len(plan) == 1 else f"{first}+{len(plan) - 1}"
    if len(members) == 1:
        what = f"{next(iter(members))}/{what}"
    return f"scores-{p.get('phase', 'fit')}[{what}]"


@task(name="score_members", tags=["gpu"], cache_policy=keyed(stages.score_members),
      task_run_name=_scores_run_name, **JSON)
def score_members(run: Run, adapters: list[AdapterRecord], plan: dict[str, dict[str, list[str]]],
                  phase: str = "fit") -> dict:
    """Scores h_c(s) of member adapters on the splits of tasks (task -> member -> splits)."""
    with gpu_slot():
        return stages.score_members(run, adapters, plan, phase).to_json()


@task(name="group_losses", tags=["cpu"], cache_policy=keyed(stages.group_losses),
      task_run_name="group-losses", **JSON)
def group_losses(run: Run, groups: list[GroupEnsemble], features: dict[str, FeaturesRecord],
                 scores: dict[str, ScoresRecord]) -> dict:
    """The exact training loss of every group's current ensemble (which group to boost)."""
    return stages.group_losses(run, groups, features, scores).to_json()


@task(name="boost_group", tags=["gpu"], cache_policy=keyed(stages.boost_group),
      task_run_name="boost[{group.name}-{step}]", **JSON)
def boost_group(run: Run, group: GroupEnsemble, features: dict[str, FeaturesRecord],
                scores: dict[str, ScoresRecord], step: int) -> dict:
    """One boosting step in the configured boosting mode, saved as a PEFT adapter."""
    with gpu_slot():
        return stages.boost_group(run, group, features, scores, step).to_json()


@task(name="record_boosting", tags=["cpu"], cache_policy=keyed(stages.record_boosting),
      task_run_name="boosting-record", **JSON)
def record_boosting(run: Run, steps: list[BoostRecord]) -> dict:
    """boosting.json: the steps taken."""
    return stages.record_boosting(run, steps).to_json()


@task(name="fit_weights", tags=["cpu"], cache_policy=keyed(stages.fit_weights),
      task_run_name="weights", **JSON)
def fit_weights(run: Run, groups: list[GroupEnsemble], scores: dict[str, ScoresRecord]) -> dict:
    """Ensemble weights per task over the group ensembles (validation); ensemble.json."""
    return stages.fit_weights(run, groups, scores).to_json()


# -- stage 6: evaluation --------------------------------------------------------------------

@task(name="evaluate_baselines", tags=["cpu"], cache_policy=keyed(stages.evaluate_baselines),
      task_run_name="baselines", **JSON)
def evaluate_baselines(run: Run, plan: BaselinePlan, adapters: AdaptersResult,
                       scores: dict[str, ScoresRecord]) -> dict:
    """Test accuracy and compute of the paper's baselines; baselines.json."""
    return stages.evaluate_baselines(run, plan, adapters, scores).to_json()


@task(name="evaluate", tags=["cpu"], cache_policy=keyed(stages.evaluate),
      task_run_name="evaluation", **JSON)
def evaluate(run: Run, ensemble: EnsembleRecord, scores: dict[str, ScoresRecord], baseline: str,
             compute: Compute) -> dict:
    """Test accuracy of the ensemble, the own-group ensembles and the baseline; metrics.json."""
    return stages.evaluate(run, ensemble, scores, baseline, compute).to_json()


@task(name="finish", tags=["cpu"], cache_policy=keyed(stages.finish), task_run_name="report",
      **JSON)
def finish(run: Run, features, groups, adapters, boosting, ensemble, evaluation, linearity,
           config: dict, config_sha256: str, baselines=None) -> dict:
    """The report (report.md, affinity.png) and manifest.json."""
    return stages.finish(run, features, groups, adapters, boosting, ensemble, evaluation,
                         linearity, config, config_sha256, baselines).to_json()


@task(name="publish_version", tags=["cpu"], cache_policy=keyed(stages.publish_version),
      task_run_name="publish", **JSON)
def publish_version(run: Run, ensemble: EnsembleRecord, config: dict) -> dict:
    """The ensemble published as a version, current unless worse on validation."""
    return stages.publish_version(run, ensemble, config).to_json()


# the task of each stage function (tasks.runner.TaskRunner)
TASKS = {stages.gradient_features: compute_gradients,
         stages.gradient_features_pack: compute_gradients_pack, stages.linearity: linearity_check,
         stages.save_subset_plan: save_subset_plan, stages.fit_subsets: fit_subsets,
         stages.affinity_and_groups: affinity_and_groups,
         stages.plan_baselines: plan_baselines, stages.train_group: train_group,
         stages.train_groups: train_groups,
         stages.save_theta_star: save_theta_star, stages.score_members: score_members,
         stages.group_losses: group_losses, stages.boost_group: boost_group, stages.record_boosting: record_boosting,
         stages.fit_weights: fit_weights, stages.evaluate: evaluate,
         stages.evaluate_baselines: evaluate_baselines, stages.finish: finish,
         stages.publish_version: publish_version}
