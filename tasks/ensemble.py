"""Stage 3 tasks: group adapters (gpu fan-out), member scores, boosting, weights."""
from __future__ import annotations

from prefect import task

from ensemble_core import pipeline, stages
from ensemble_core.data import load_task

from .common import (ProgressReporter, as_config, gpu_slot, keyed, retry_unless_input_error,
                     stage_key)

MODEL_SECTIONS = ("model", "adapter", "seed")


def _data_fps(cfg, names) -> list:
    return [(n, stages.data_fingerprint(load_task(cfg.task(n), cfg.data_root)))
            for n in sorted(set(names))]


def _train_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    return stage_key("train", cfg, MODEL_SECTIONS + ("training",), parameters["name"],
                     _data_fps(cfg, parameters["task_names"]))


@task(name="train_adapter", tags=["gpu"], cache_policy=keyed(_train_key), persist_result=True,
      result_serializer="json", retries=1, retry_condition_fn=retry_unless_input_error,
      task_run_name="train[{name}]")
def train_adapter(config: dict, name: str, task_names: list) -> dict:
    """Fine-tune one adapter on the union of its tasks (a group, or all tasks: the baseline)."""
    cfg = as_config(config)
    progress = ProgressReporter(f"train[{name}]", artifact_key=f"train-{name.lower()}")

    def report(ev):
        if ev.get("event") == "epoch":
            progress(ev["epoch"], cfg.training.epochs,
                     f"epoch {ev['epoch']}: train loss {ev.get('train_loss', float('nan')):.4f}, "
                     f"val loss {ev.get('val_loss', float('nan')):.4f}")
    with gpu_slot():
        rec = pipeline.train_group(cfg, name, task_names, progress=report)
    progress.finish()
    return rec


def _theta_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    return stage_key("theta-star", cfg, MODEL_SECTIONS)


@task(name="save_theta_star", tags=["gpu"], cache_policy=keyed(_theta_key), persist_result=True,
      result_serializer="json", task_run_name="theta-star")
def save_theta_star(config: dict) -> dict:
    with gpu_slot():
        return pipeline.save_theta_star(as_config(config))


def _score_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    plan = parameters["plan"]
    return stage_key("scores", cfg, ("model",), parameters["adapter"]["sha256"],
                     parameters["adapter"]["name"], sorted((k, sorted(v)) for k, v in plan.items()),
                     _data_fps(cfg, [t for v in plan.values() for t in v]),
                     cfg.estimation.batch_size)


@task(name="score_member", tags=["gpu"], cache_policy=keyed(_score_key), persist_result=True,
      result_serializer="json", task_run_name="scores[{adapter[name]}]")
def score_member(config: dict, adapter: dict, plan: dict) -> dict:
    """Scores h_c(s) of one member adapter on the splits and tasks of ``plan``."""
    with gpu_slot():
        return pipeline.score_member(as_config(config), adapter, plan)


def _boost_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    g = parameters["group"]
    grads = [(t, parameters["gradient_records"][t]["files"]["train"]["sha256"])
             for t in g["tasks"]]
    return stage_key("boost", cfg, MODEL_SECTIONS + ("boosting",), g["name"],
                     [(m["name"], m["scale"]) for m in g["members"]], parameters["score_shas"],
                     grads, parameters["step"], cfg.estimation.l2,
                     cfg.estimation.projection_dim, cfg.estimation.projection_seed)


@task(name="boost_group", tags=["gpu"], cache_policy=keyed(_boost_key), persist_result=True,
      result_serializer="json", task_run_name="boost[{group[name]}-{step}]")
def boost_group(config: dict, group: dict, gradient_records: dict, group_scores: dict,
                score_shas: list, step: int) -> dict:
    """One boosting step: residual fit on projected gradients, restored as a PEFT adapter."""
    with gpu_slot():
        return pipeline.boost_group(as_config(config), group, gradient_records, group_scores,
                                    step)


def _weights_key(context, parameters) -> str:
    cfg = as_config(parameters["config"])
    return stage_key("weights", cfg, ("boosting",), parameters["groups"],
                     parameters["score_shas"], parameters["baseline"],
                     _data_fps(cfg, [t.name for t in cfg.tasks]))


@task(name="fit_weights_and_evaluate", tags=["cpu"], cache_policy=keyed(_weights_key),
      persist_result=True, result_serializer="json", task_run_name="weights-and-evaluation")
def fit_weights_and_evaluate(config: dict, groups: list, member_scores: dict, score_shas: list,
                             baseline: str, timings: dict, fingerprint: dict) -> dict:
    """Ensemble weights per task (validation), test accuracy of ensemble and baseline."""
    return pipeline.fit_weights_and_evaluate(as_config(config), groups, member_scores, baseline,
                                             timings, fingerprint)
