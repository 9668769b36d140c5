"""Library-level stages 4–6 (no Prefect): group adapters, member scores, boosting, ensemble
weights, evaluation. Like ``stages``, each writes files under the run directory and returns a
small JSON-able record.

Run directory additions::

    adapters/<name>/                 ordinary PEFT adapters (group-<k>, all-tasks, theta-star,
                                     group-<k>-boost-<j>) + training.json, base_model.json
    scores/<name>.json               a member's scores h_c(s) on the examples it is used for
    boosting.json                    the boosting steps (chosen group, loss before/after)
    ensemble.json                    groups, members, weights, η, base fingerprint
    metrics.json, report.md          per-task test accuracy of the baseline and the ensemble
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .boosting import fit_residual_adapter, gold_rows_of, log_loss, residuals
from .config import RunConfig
from .data import Example, load_task
from .ensemble import fit_ensemble_weights, softmax, task_entry, write_ensemble_json
from .models import adapter_vector, load_model, set_adapter_vector
from .projection import GaussianProjector
from .stages import DEVICE_LOCK, feature_table, release_memory
from .storage import file_sha256, join, read_json, write_json
from .training import load_adapter, predict_scores, save_adapter, train_adapter

THETA_STAR = "theta-star"
BASELINE = "all-tasks"


def _on_device(fn):
    """Run a model-using stage under the process's device lock (see stages.DEVICE_LOCK)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        with DEVICE_LOCK:
            try:
                return fn(*a, **k)
            finally:
                release_memory()
    return wrapper


def _examples(cfg: RunConfig, task_names: Sequence[str], split: str) -> list[Example]:
    out = []
    for name in task_names:
        out += load_task(cfg.task(name), cfg.data_root).splits[split]
    return out


def _local(url: str) -> Path:
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"adapters are written with PEFT, which needs a local run directory; "
                         f"got {url}")
    return Path(url.replace("file://", ""))


def _adapter_record(name: str, path: str, tasks, extra: dict | None = None) -> dict:
    return {"name": name, "tasks": list(tasks), "path": path,
            "sha256": file_sha256(join(path, "adapter_model.safetensors")), **(extra or {})}


@_on_device
def train_group(cfg: RunConfig, name: str, task_names: Sequence[str], progress=None) -> dict:
    """Fine-tune one adapter on the union of the given tasks (stage 4; also the baseline)."""
    lm = load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir))  # fresh θ*: training mutates it
    train = _examples(cfg, task_names, "train")
    val = _examples(cfg, task_names, "validation")
    result = train_adapter(lm.model, lm.tokenizer, train, val, cfg.training,
                           cfg.model.max_length, cfg.model.choice_mode, progress=progress)
    path = join(cfg.run_dir, "adapters", name)
    save_adapter(lm.model, _local(path), result, base_fingerprint=lm.fingerprint["base"])
    summary = {k: v for k, v in result.to_json().items() if k != "history"}
    return _adapter_record(name, path, task_names, {"train": summary})


@_on_device
def save_theta_star(cfg: RunConfig) -> dict:
    """The fresh adapter θ* as a PEFT adapter: the ensemble subtracts it to use a boosting
    adapter's change h_k − h0 (with the standard B = 0 init it is exactly the base model)."""
    lm = load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir))
    path = join(cfg.run_dir, "adapters", THETA_STAR)
    save_adapter(lm.model, _local(path), None, base_fingerprint=lm.fingerprint["base"])
    return _adapter_record(THETA_STAR, path, [t.name for t in cfg.tasks])


def _load_member(cfg: RunConfig, adapter: dict):
    from .models import load_base

    base, tok, fp = load_base(cfg.model, cfg.cache_dir and Path(cfg.cache_dir))
    model = load_adapter(base, _local(adapter["path"]), base_fingerprint=fp)
    model.eval()
    return model, tok


@_on_device
def score_member(cfg: RunConfig, adapter: dict, plan: dict[str, Sequence[str]]) -> dict:
    """Scores h_c(s) of one member adapter: ``plan`` maps split -> task names. Written to
    scores/<name>.json as {task: {split: [[scores of example 0], ...]}}."""
    t0 = time.perf_counter()
    model, tok = _load_member(cfg, adapter)
    out: dict = {}
    for split, names in plan.items():
        for name in names:
            ex = _examples(cfg, [name], split)
            scores = predict_scores(model, tok, ex, cfg.model.max_length,
                                    cfg.estimation.batch_size, cfg.model.choice_mode)
            out.setdefault(name, {})[split] = [s.astype(float).tolist() for s in scores]
    url = join(cfg.run_dir, "scores", f"{adapter['name']}.json")
    sha = write_json(url, {"adapter": adapter["name"], "adapter_sha256": adapter["sha256"],
                           "scores": out})
    return {"name": adapter["name"], "path": url, "sha256": sha,
            "seconds": time.perf_counter() - t0}


def _scores(record: dict) -> dict:
    return read_json(record["path"])["scores"]


def _flat(scores_per_example: list) -> tuple[np.ndarray, list[int]]:
    return (np.concatenate([np.asarray(s, np.float64) for s in scores_per_example]),
            [len(s) for s in scores_per_example])


@_on_device
def boost_group(cfg: RunConfig, group: dict, gradient_records: dict, group_scores: dict,
                step: int) -> dict:
    """One boosting step for a group (Algorithm 2): fit the residuals of the group's current
    ensemble on its train rows with the first-order regression on projected gradients, restore
    θ* + P x̂ as a real PEFT adapter, and measure the exact train loss before and after."""
    t0 = time.perf_counter()
    tasks = group["tasks"]
    tables = [feature_table(gradient_records[t]["files"]["train"]["path"],
                            gradient_records[t]["files"]["train"]["sha256"]) for t in tasks]
    h_cur, n_choices = _flat([s for t in tasks for s in group_scores[t]["train"]])
    h0 = np.concatenate([t.output for t in tables]).astype(np.float64)
    gold = gold_rows_of(tables)
    if len(h_cur) != len(h0):
        raise ValueError(f"group {group['name']}: {len(h_cur)} scored rows, {len(h0)} feature rows")
    loss_before = log_loss(h_cur, n_choices, gold)
    x = fit_residual_adapter(tables, residuals(h_cur, n_choices, gold), l2=cfg.estimation.l2)

    # Step size η in parameter space: the adapter is θ* + η·P x̂ and the group adds its whole
    # change h_k − h0. To first order this is the same as η·g̃ᵀx̂, but the real adapter stays
    # 1/η times closer to θ*, where the first-order model that fitted x̂ holds.
    eta = cfg.boosting.eta
    lm = load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir))
    theta0 = adapter_vector(lm.model)
    projector = GaussianProjector(theta0.numel(), cfg.estimation.projection_dim,
                                  seed=cfg.estimation.projection_seed,
                                  block_rows=cfg.estimation.projection_block_rows,
                                  cache_bytes=0)  # one expand: each block is used once
    delta = eta * projector.expand(torch.from_numpy(x).float())
    set_adapter_vector(lm.model, theta0 + delta)
    name = f"{group['name']}-boost-{step}"
    path = join(cfg.run_dir, "adapters", name)
    save_adapter(lm.model, _local(path), None, base_fingerprint=lm.fingerprint["base"])
    train = _examples(cfg, tasks, "train")
    h_k, _ = _flat(predict_scores(lm.model, lm.tokenizer, train, cfg.model.max_length,
                                  cfg.estimation.batch_size, cfg.model.choice_mode))
    loss_after = log_loss(h_cur + (h_k - h0), n_choices, gold)
    G = np.concatenate([t.grad for t in tables]).astype(np.float64)
    return _adapter_record(name, path, tasks, {
        "group": group["name"], "step": step, "eta": eta, "train_loss_before": loss_before,
        "train_loss_after": loss_after,
        "train_loss_first_order": log_loss(h_cur + eta * (G @ x), n_choices, gold),
        "x_norm": float(np.linalg.norm(x)),
        "relative_distance": float(delta.norm() / max(float(theta0.norm()), 1e-30)),
        "accepted": bool(loss_after < loss_before), "seconds": time.perf_counter() - t0})


def group_train_loss(member_scores: dict, group: dict, gradient_records: dict) -> float:
    """The exact training loss of a group's current ensemble (from its members' scores)."""
    tables = [feature_table(gradient_records[t]["files"]["train"]["path"],
                            gradient_records[t]["files"]["train"]["sha256"])
              for t in group["tasks"]]
    h = [s for t in group["tasks"]
         for s in group_member_scores(member_scores, group["members"], t, "train")]
    return log_loss(np.concatenate(h), [len(x) for x in h], gold_rows_of(tables))


def group_member_scores(member_scores: dict, members: list[dict], task: str, split: str):
    """A group's ensemble scores per example: Σ_members scale · h_member (score space)."""
    total = None
    for m in members:
        s = [np.asarray(v, np.float64) * m["scale"] for v in member_scores[m["name"]][task][split]]
        total = s if total is None else [a + b for a, b in zip(total, s)]
    return total


def fit_weights_and_evaluate(cfg: RunConfig, groups: list[dict], member_scores: dict,
                             baseline: str, timings: dict, fingerprint: dict) -> dict:
    """Per-task ensemble weights over the m group ensembles (validation), then test accuracy
    of the ensemble and of the single-adapter baseline. Writes ensemble.json, metrics.json."""
    task_names = [t.name for t in cfg.tasks]
    group_of = {t: k for k, g in enumerate(groups) for t in g["tasks"]}
    tasks_entry, per_task = {}, {}
    for t in task_names:
        val_gold = [e.label for e in _examples(cfg, [t], "validation")]
        test_ex = _examples(cfg, [t], "test")
        val_probs = [[softmax(s) for s in group_member_scores(member_scores, g["members"], t,
                                                                "validation")] for g in groups]
        w = fit_ensemble_weights(val_probs, val_gold, start=group_of[t])
        test_probs = [[softmax(s) for s in group_member_scores(member_scores, g["members"], t,
                                                                 "test")] for g in groups]
        combined = [sum(w[k] * test_probs[k][i] for k in range(len(groups)))
                    for i in range(len(test_ex))]
        own = test_probs[group_of[t]]
        base = [softmax(np.asarray(s)) for s in member_scores[baseline][t]["test"]]
        gold = np.array([e.label for e in test_ex])
        acc = lambda probs: float(np.mean([int(np.argmax(p)) == y for p, y in zip(probs, gold)]))
        per_task[t] = {"n_test": len(test_ex), "group": group_of[t], "weights": w.tolist(),
                       "baseline_accuracy": acc(base), "group_accuracy": acc(own),
                       "ensemble_accuracy": acc(combined)}
        tasks_entry[t] = task_entry(cfg.task(t), group_of[t], w)
    avg = {k: float(np.mean([v[k] for v in per_task.values()]))
           for k in ("baseline_accuracy", "group_accuracy", "ensemble_accuracy")}
    ens_groups = [{"name": g["name"], "tasks": g["tasks"],
                   "members": [{"adapter": f"adapters/{m['name']}", "scale": m["scale"]}
                               for m in g["members"]]} for g in groups]
    ens_sha = write_ensemble_json(join(cfg.run_dir, "ensemble.json"), base_model=cfg.model,
                                  tasks=tasks_entry, groups=ens_groups,
                                  max_length=cfg.model.max_length,
                                  choice_mode=cfg.model.choice_mode,
                                  base_fingerprint=fingerprint, eta=cfg.boosting.eta)
    metrics = {"tasks": per_task, "average": avg, "compute": timings,
               "n_groups": len(groups), "groups": [g["tasks"] for g in groups]}
    metrics_sha = write_json(join(cfg.run_dir, "metrics.json"), metrics)
    return {"ensemble": {"path": join(cfg.run_dir, "ensemble.json"), "sha256": ens_sha},
            "metrics": {"path": join(cfg.run_dir, "metrics.json"), "sha256": metrics_sha},
            "summary": metrics}
