"""A small saved ensemble on the tiny random Llama, without running the pipeline: two group
adapters trained for two steps and an ensemble.json (tests of serving and versions)."""
from __future__ import annotations

from ensemble_core.adapters import save_adapter
from ensemble_core.config import parse_config
from ensemble_core.data import load_task
from ensemble_core.ensemble import task_entry, write_ensemble_json
from ensemble_core.models import adapter_vector, load_model, set_adapter_vector
from ensemble_core.training import train_adapter

from conftest import tiny_config

MAX_LEN = 128
WEIGHTS = {"rte": (0, [0.7, 0.3]), "cb": (0, [1.0, 0.0]), "copa": (1, [0.25, 0.75])}


def write_ensemble(run_dir, cfg, fingerprint, weights, validation=None) -> None:
    """ensemble.json over adapters/group-0 (rte, cb) and adapters/group-1 (copa)."""
    groups = [{"name": "group-0", "tasks": ["rte", "cb"],
               "members": [{"adapter": "adapters/group-0", "scale": 1.0}]},
              {"name": "group-1", "tasks": ["copa"],
               "members": [{"adapter": "adapters/group-1", "scale": 1.0}]}]
    tasks = {t: task_entry(cfg.task(t), g, w) for t, (g, w) in weights.items()}
    extra = {} if validation is None else {"validation": validation}
    write_ensemble_json(run_dir / "ensemble.json", base_model=cfg.model, tasks=tasks,
                        groups=groups, max_length=MAX_LEN, choice_mode="auto", eta=0.1,
                        base_fingerprint=fingerprint, **extra)


def train_tiny_adapters(run_dir, cfg, lm, data, plan) -> dict:
    """Each adapter of ``plan`` (name -> (tasks, seed)) fine-tuned for two steps from θ* on
    its tasks' train split and saved under run_dir/adapters; name -> its adapter vector."""
    theta0 = adapter_vector(lm.model)
    thetas = {}
    for name, (tasks, seed) in plan.items():
        set_adapter_vector(lm.model, theta0)
        train = [ex for t in tasks for ex in data[t].splits["train"]]
        tcfg = cfg.training.model_copy(update={"learning_rate": 2e-2, "max_steps": 2,
                                               "batch_size": 4, "seed": seed})
        res = train_adapter(lm.model, lm.tokenizer, train, [], tcfg, MAX_LEN)
        save_adapter(lm.model, run_dir / "adapters" / name, res,
                     base_fingerprint=lm.fingerprint["base"])
        thetas[name] = adapter_vector(lm.model)
    return thetas


def build_tiny_ensemble(run_dir, data_root, cache_dir) -> dict:
    cfg = parse_config(tiny_config(data_root, run_dir, cache_dir=str(cache_dir)))
    lm = load_model(cfg, cache_dir)
    data = {t: load_task(cfg.task(t), data_root) for t in ("rte", "cb", "copa")}
    train_tiny_adapters(run_dir, cfg, lm, data, {"group-0": (("rte", "cb"), 0),
                                                  "group-1": (("copa",), 1)})
    write_ensemble(run_dir, cfg, lm.fingerprint["base"], WEIGHTS)
    return dict(cfg=cfg, lm=lm, data=data, fingerprint=lm.fingerprint["base"],
                weights=WEIGHTS)
