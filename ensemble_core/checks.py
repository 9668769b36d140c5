"""The paper's two checks of the first-order approach (docs/design.md, "Checks").

* **Table 5 / Figure 2, the first-order approximation** (:func:`linearity_check`): move the
  adapter a small relative distance from θ* along P x and compare the true outputs with
  h0 + g̃ᵀx. Stage 1 runs it on one task (``stages.linearity``).
* **Table 3, the estimates against real fine-tuning** (:func:`check_estimates`): for r of the
  sampled subsets S, the adapter is really fine-tuned on S's train examples and each task
  i ∈ S is evaluated on its validation examples; the surrogate's f̂_i(S) is refitted on the
  same subsets (timed). Reported per (subset, task): estimated and true validation loss and
  accuracy; overall: the mean relative error of the loss, the Spearman correlation of
  estimated and true losses across pairs, and the compute ratio (true fine-tuning time /
  estimation time). Estimation time is given two ways: the surrogate fits alone, and the fits
  plus the amortized share of stage 1 (computed once for all k subsets, so each subset carries
  stage-1 time / k).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from .data import Example
from .features import FeatureTable
from .gradients import GradientError, extract_features
from .models import adapter_vector, set_adapter_vector
from .projection import GaussianProjector
from .records import (EstimateCheck, EstimateCheckRow, EstimateCheckSummary, FeaturesRecord,
                      Progress)
from .scoring import ChoiceScorer, score_rows

__all__ = ["linearity_check", "check_estimates"]


def linearity_check(model, scorer: ChoiceScorer, examples: Sequence[Example],
                    projector: GaussianProjector, features: FeatureTable | None = None,
                    distances: Sequence[float] = (0.0005, 0.001, 0.0015, 0.002, 0.0025),
                    seed: int = 0, batch_size: int = 16) -> list[dict]:
    """The paper's Table 5 / Figure 2: move the adapter to θ = θ* + P x at relative distance
    ‖P x‖/‖θ*‖ = r and compare the true outputs h(θ) with the first-order model h0 + g̃ᵀx.

    ``relative_error`` = ‖h(θ) − h0 − g̃ᵀx‖ / ‖h(θ)‖ (the paper's measure);
    ``error_vs_change`` = ‖h(θ) − h0 − g̃ᵀx‖ / ‖h(θ) − h0‖ (how much of the change is missed).
    """
    if features is None:
        features = extract_features(model, scorer, examples, projector, task="check",
                                    split="check", batch_size=batch_size)
    theta0 = adapter_vector(model)
    norm0 = float(theta0.norm())
    if norm0 == 0:
        raise GradientError("adapter weights at θ* are all zero; relative distance undefined")
    # h0 from the same batching as the perturbed outputs, so batch composition cancels out
    h0 = score_rows(model, scorer, examples, batch_size=batch_size).double()
    Gp = torch.from_numpy(features.grad).double()
    rng = np.random.default_rng(seed)
    report = []
    try:
        for r in distances:
            x = torch.from_numpy(rng.standard_normal(projector.d)).float()
            delta = projector.expand(x).cpu()
            scale = r * norm0 / float(delta.norm())
            x, delta = x * scale, delta * scale
            set_adapter_vector(model, theta0 + delta)
            h = score_rows(model, scorer, examples, batch_size=batch_size).double()
            lin = h0 + Gp @ x.double()
            err = float((h - lin).norm())
            report.append({"relative_distance": float(r),
                           "relative_error": err / float(h.norm()),
                           "error_vs_change": err / max(float((h - h0).norm()), 1e-30),
                           "n_rows": int(h.numel())})
    finally:
        set_adapter_vector(model, theta0)
    return report


def check_estimates(run, features: dict[str, FeaturesRecord], subsets: Sequence[Sequence[int]],
                    r: int, seed: int = 0, progress: Progress | None = None) -> EstimateCheck:
    """The paper's Table 3 on ``r`` of the sampled ``subsets`` (indices into the run's tasks,
    chosen with ``seed``); writes estimate_check.json."""
    from scipy.stats import spearmanr

    from .models import load_model
    from .runtime import DEVICE_LOCK, cache_path, feature_table
    from .surrogate import fit_subset, norm_bound
    from .training import evaluate, train_adapter

    cfg, names = run.cfg, run.task_names
    rng = np.random.default_rng(seed)
    chosen = [tuple(subsets[i]) for i in sorted(rng.choice(len(subsets), size=min(r, len(subsets)),
                                                           replace=False))]
    tables = {}
    for t in sorted({names[i] for s in chosen for i in s}):
        f = features[t]
        tables[t] = (feature_table(f.train.path, f.train.sha256),
                     feature_table(f.validation.path, f.validation.sha256))
    stage1_s = sum(f.seconds for f in features.values())
    info = features[names[chosen[0][0]]].projection
    e = cfg.estimation
    bound = norm_bound(e.max_norm, e.max_relative_distance, info)
    rows, fit_s, true_s = [], 0.0, 0.0
    for k, s in enumerate(chosen):
        task_names = [names[i] for i in s]
        t0 = time.perf_counter()
        est = fit_subset([tables[t][0] for t in task_names], [tables[t][1] for t in task_names],
                         l2=e.l2, max_norm=bound)["tasks"]
        fit_s += time.perf_counter() - t0
        val = run.examples(task_names, "validation")
        with DEVICE_LOCK:
            t0 = time.perf_counter()
            lm = load_model(cfg, cache_path(cfg))
            train_adapter(lm.model, lm.tokenizer, run.examples(task_names, "train"), val,
                          cfg.training, cfg.model.max_length, cfg.model.choice_mode)
            true = evaluate(lm.model, lm.tokenizer, val, cfg.model.max_length,
                            e.batch_size, cfg.model.choice_mode)
            true_s += time.perf_counter() - t0
        for t in task_names:
            est_t, true_t = est[t], true[t]
            rows.append(EstimateCheckRow(
                list(task_names), t, est_t["loss"], true_t["loss"], est_t["accuracy"],
                true_t["accuracy"],
                abs(est_t["loss"] - true_t["loss"]) / max(true_t["loss"], 1e-12)))
        if progress:
            progress(k + 1, len(chosen), "+".join(task_names))
    est_l = np.array([x.estimated_loss for x in rows])
    true_l = np.array([x.true_loss for x in rows])
    rho = float(spearmanr(est_l, true_l).statistic) if len(rows) > 2 else None
    amortized = fit_s + stage1_s * len(chosen) / max(len(subsets), 1)
    summary = EstimateCheckSummary(
        pairs=len(rows), subsets=len(chosen),
        mean_relative_error=float(np.mean([x.relative_error for x in rows])), spearman=rho,
        accuracy_abs_error=float(np.mean([abs(x.estimated_accuracy - x.true_accuracy)
                                          for x in rows])),
        true_finetune_s=true_s, surrogate_fit_s=fit_s,
        estimation_with_amortized_gradients_s=amortized,
        compute_ratio_fits_only=true_s / max(fit_s, 1e-12),
        compute_ratio_with_gradients=true_s / max(amortized, 1e-12),
        k_subsets=len(subsets), stage1_s=stage1_s)
    body = {"summary": summary.to_json(), "rows": [r.to_json() for r in rows]}
    return EstimateCheck(run.dir.write_json(run.dir.estimate_check, body), summary, rows)
