"""Checking the first-order estimates against real fine-tuning (the paper's Table 3).

For r of the sampled subsets S, the adapter is really fine-tuned on S's train examples and each
task i ∈ S is evaluated on its validation examples; the surrogate's f̂_i(S) is refitted on the
same subsets (timed). Reported per (subset, task): estimated and true validation loss and
accuracy; overall: the mean relative error of the loss, the Spearman correlation of estimated
and true losses across pairs, and the compute ratio (true fine-tuning time / estimation time).

Estimation time is given two ways: the surrogate fits alone, and the fits plus the amortized
share of stage 1 (the gradient features are computed once for all k subsets, so each subset
carries stage-1 time / k).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from .config import RunConfig
from .data import load_task
from .estimation import estimate_subset
from .models import load_model
from .stages import DEVICE_LOCK, feature_table, surrogate_max_norm
from .storage import join, read_json, write_json
from .training import evaluate, train_adapter


def check_estimates(cfg: RunConfig, gradient_records: dict, subsets: list, r: int,
                    seed: int = 0, progress=None) -> dict:
    names = [t.name for t in cfg.tasks]
    rng = np.random.default_rng(seed)
    chosen = [tuple(subsets[i]) for i in sorted(rng.choice(len(subsets), size=min(r, len(subsets)),
                                                           replace=False))]
    tables = {}
    for i in sorted({i for s in chosen for i in s}):
        f = gradient_records[names[i]]["files"]
        tables[i] = (feature_table(f["train"]["path"], f["train"]["sha256"]),
                     feature_table(f["validation"]["path"], f["validation"]["sha256"]))
    stage1_s = sum(t["total_s"] for rec in gradient_records.values()
                   for t in read_json(rec["manifest"])["timings"].values())
    data = {n: load_task(cfg.task(n), cfg.data_root) for n in {names[i] for s in chosen for i in s}}
    max_norm = surrogate_max_norm(cfg, read_json(gradient_records[names[0]]["manifest"]))
    rows, fit_s, true_s = [], 0.0, 0.0
    for k, s in enumerate(chosen):
        t0 = time.perf_counter()
        est = estimate_subset(s, tables, l2=cfg.estimation.l2, max_norm=max_norm)
        fit_s += time.perf_counter() - t0
        task_names = [names[i] for i in s]
        train = [e for n in task_names for e in data[n].splits["train"]]
        val = [e for n in task_names for e in data[n].splits["validation"]]
        with DEVICE_LOCK:
            t0 = time.perf_counter()
            lm = load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir))
            train_adapter(lm.model, lm.tokenizer, train, val, cfg.training, cfg.model.max_length,
                          cfg.model.choice_mode)
            true = evaluate(lm.model, lm.tokenizer, val, cfg.model.max_length,
                            cfg.estimation.batch_size, cfg.model.choice_mode)
            true_s += time.perf_counter() - t0
        for i in s:
            e, t = est["per_task"][i], true[names[i]]
            rows.append({"subset": list(task_names), "task": names[i],
                         "estimated_loss": e["loss"], "true_loss": t["loss"],
                         "estimated_accuracy": e["accuracy"], "true_accuracy": t["accuracy"],
                         "relative_error": abs(e["loss"] - t["loss"]) / max(t["loss"], 1e-12)})
        if progress:
            progress(k + 1, len(chosen))
    est_l = np.array([x["estimated_loss"] for x in rows])
    true_l = np.array([x["true_loss"] for x in rows])
    rho = float(spearmanr(est_l, true_l).statistic) if len(rows) > 2 else float("nan")
    amortized = fit_s + stage1_s * len(chosen) / max(len(subsets), 1)
    summary = {
        "pairs": len(rows), "subsets": len(chosen),
        "mean_relative_error": float(np.mean([x["relative_error"] for x in rows])),
        "spearman": rho,
        "accuracy_abs_error": float(np.mean([abs(x["estimated_accuracy"] - x["true_accuracy"])
                                             for x in rows])),
        "true_finetune_s": true_s, "surrogate_fit_s": fit_s,
        "estimation_with_amortized_gradients_s": amortized,
        "compute_ratio_fits_only": true_s / max(fit_s, 1e-12),
        "compute_ratio_with_gradients": true_s / max(amortized, 1e-12),
        "k_subsets": len(subsets), "stage1_s": stage1_s,
    }
    url = join(cfg.run_dir, "estimate_check.json")
    sha = write_json(url, {"summary": summary, "rows": rows})
    return {"path": url, "sha256": sha, "summary": summary, "rows": rows}
