"""The paper's two checks of the first-order approach (docs/design.md, "Checks").

* **Table 5 / Figure 2, the first-order approximation** (:func:`linearity_check`): move the
  adapter a small relative distance from θ* along P x and compare the true margins between an
  example's choices with m0 + g̃ᵀx. Stage 1 runs it on one task (``stages.linearity``).
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

__all__ = ["linearity_check", "check_estimates", "PAPER_DISTANCES"]


PAPER_DISTANCES = (0.0005, 0.001, 0.0015, 0.002, 0.0025)  # Table 5 / Figure 2: 0.05%–0.25%


def linearity_check(model, scorer: ChoiceScorer, examples: Sequence[Example],
                    projector: GaussianProjector, features: FeatureTable | None = None,
                    distances: Sequence[float] = PAPER_DISTANCES, seed: int = 0,
                    batch_size: int = 16, full_norm: float | None = None) -> list[dict]:
    """The paper's Table 5 / Figure 2, on the margins: move the adapter to θ = θ* + P x at
    relative distance ‖P x‖/‖θ*_Full‖ = r (the paper's measure, §2.2: over the norm of the
    entire pretrained model, ``full_norm``; ``models.base_norm``) and compare the true margins
    m_c(θ) = h_c(θ) − h_0(θ) (every choice c ≥ 1 against the example's first) with the
    first-order model m0 + g̃ᵀx, g̃ the stage-1 features Pᵀ∇(h_c − h_0). The margins are what a
    softmax over the choices reads. ``full_norm`` (default: computed from ``model``) is
    ‖θ*_Full‖; each point also gives the move over the adapter's own norm ‖θ*‖
    (``adapter_distance``).

    ``relative_error`` = ‖m(θ) − m0 − g̃ᵀx‖ / ‖m(θ)‖ (the paper's measure);
    ``error_vs_change`` = ‖m(θ) − m0 − g̃ᵀx‖ / ‖m(θ) − m0‖ (how much of the change is missed).
    """
    if features is None:
        features = extract_features(model, scorer, examples, projector, task="check",
                                    split="check", batch_size=batch_size)
    from .models import base_norm

    theta0 = adapter_vector(model)
    norm0 = float(theta0.norm())
    if norm0 == 0:
        raise GradientError("adapter weights at θ* are all zero; relative distance undefined")
    full_norm = full_norm or base_norm(model)
    first = torch.from_numpy(np.repeat(features.offsets[:-1], features.n_choices))
    rows = torch.from_numpy(features.choice > 0)  # the margins' rows (c ≥ 1)

    def margins(h):
        return (h - h[first])[rows]

    # m0 from the same batching as the perturbed outputs, so batch composition cancels out
    m0 = margins(score_rows(model, scorer, examples, batch_size=batch_size).double())
    Gp = torch.from_numpy(features.grad).double()[rows]
    rng = np.random.default_rng(seed)
    report = []
    try:
        for r in distances:
            x = torch.from_numpy(rng.standard_normal(projector.d)).float()
            delta = projector.expand(x).cpu()
            scale = r * full_norm / float(delta.norm())
            x, delta = x * scale, delta * scale
            set_adapter_vector(model, theta0 + delta)
            m = margins(score_rows(model, scorer, examples, batch_size=batch_size).double())
            err = float((m - m0 - Gp @ x.double()).norm())
            report.append({"relative_distance": float(r),
                           "adapter_distance": float(delta.norm()) / norm0,
                           "relative_error": err / max(float(m.norm()), 1e-30),
                           "error_vs_change": err / max(float((m - m0).norm()), 1e-30),
                           "n_rows": int(m.numel())})
    finally:
        set_adapter_vector(model, theta0)
    return report


def check_estimates(run, features: dict[str, FeaturesRecord], subsets: Sequence[Sequence[int]],
                    r: int, seed: int = 0, progress: Progress | None = None,
                    dims: Sequence[int] | None = None,
                    test_examples: int | None = None) -> EstimateCheck:
    """The paper's Table 3 on ``r`` of the sampled ``subsets`` (indices into the run's tasks,
    chosen with ``seed``), at every projection dimension of ``dims`` (default: all that stage 1
    computed, ``estimation.projection_dim``) from the one stage-1 pass; each subset is
    fine-tuned for real once, as stage 4 trains.

    Measured per (subset, task): the relative error of test accuracy — the paper's measure:
    the surrogate fitted on S scored on the task's test examples (their features computed here,
    at θ*, with stage 1's projection; ``test_examples`` caps them, seeded) against the
    fine-tuned adapter's test accuracy — and, beside it, the validation loss and accuracy
    (what stage 2 feeds the affinity). The speed-up is given in wall time and, as the paper
    counts it, in FLOPs: fine-tuning the r subsets against the fits plus their share r/k of
    stage 1 (computed once for all k subsets). Writes estimate_check.json."""
    from .models import load_model
    from .runtime import DEVICE_LOCK, cache_path, feature_table
    from .surrogate import fit_subset, norm_bound
    from .training import evaluate, train_adapter

    cfg, names = run.cfg, run.task_names
    e = cfg.estimation
    dims = sorted(dims or e.dims)
    bad = [d for d in dims if d not in e.dims]
    if bad:
        raise ValueError(f"projection dimension(s) {bad} were not computed "
                         f"(estimation.projection_dim = {e.dims})")
    rng = np.random.default_rng(seed)
    chosen = [tuple(subsets[i]) for i in sorted(rng.choice(len(subsets), size=min(r, len(subsets)),
                                                           replace=False))]
    used = sorted({names[i] for s in chosen for i in s})
    stage1_s = sum(f.seconds for f in features.values())
    stage1_flops = sum(f.flops for f in features.values())
    info = features[used[0]].projection
    tests = _test_examples(run, used, test_examples, seed)
    test_tables = _test_features(run, tests, info)
    rows: list[EstimateCheckRow] = []
    fit_s = {d: 0.0 for d in dims}
    fit_flops = {d: 0.0 for d in dims}
    true_s = true_flops = 0.0
    for k, s in enumerate(chosen):
        task_names = [names[i] for i in s]
        estimates = {}
        for d in dims:
            tables = [(feature_table(run.dir.at(features[t].train.path),
                                     features[t].train.sha256, d),
                       feature_table(run.dir.at(features[t].validation.path),
                                     features[t].validation.sha256, d)) for t in task_names]
            t0 = time.perf_counter()
            estimates[d] = fit_subset(
                [tr for tr, _ in tables], [va for _, va in tables],
                [test_tables[t].at_dim(d) for t in task_names], l2=e.l2,
                max_norm=norm_bound(e.max_norm, e.max_adapter_distance, info.at_dim(d)))
            fit_s[d] += time.perf_counter() - t0
            fit = estimates[d]["fit"]  # L-BFGS: a product with G and one with Gᵀ an iteration
            fit_flops[d] += 4.0 * max(fit["n_iter"], 1) * fit["n_train_rows"] * d
        val = run.examples(task_names, "validation")
        test = [ex for t in task_names for ex in tests[t]]
        with DEVICE_LOCK:
            t0 = time.perf_counter()
            lm = load_model(cfg, cache_path(cfg))
            res = train_adapter(lm.model, lm.tokenizer, run.examples(task_names, "train"), val,
                                cfg.training, cfg.model.max_length, cfg.model.choice_mode,
                                validate_initial=False)  # as stage 4 trains
            true = evaluate(lm.model, lm.tokenizer, val, cfg.model.max_length,
                            e.batch_size, cfg.model.choice_mode)
            true_s += time.perf_counter() - t0
            true_flops += res.flops_estimate
            true_test = evaluate(lm.model, lm.tokenizer, test, cfg.model.max_length,
                                 e.batch_size, cfg.model.choice_mode)
        for d in dims:
            for t in task_names:
                est_t, true_t = estimates[d]["tasks"][t], true[t]
                est_acc, true_acc = estimates[d]["test"][t]["accuracy"], true_test[t]["accuracy"]
                rows.append(EstimateCheckRow(
                    d, list(task_names), t, est_t["loss"], true_t["loss"], est_t["accuracy"],
                    true_t["accuracy"],
                    abs(est_t["loss"] - true_t["loss"]) / max(true_t["loss"], 1e-12),
                    est_acc, true_acc, abs(est_acc - true_acc) / max(true_acc, 1e-12)))
        if progress:
            progress(k + 1, len(chosen), "+".join(task_names))
    summaries = [_summary(d, rows, len(chosen), len(subsets), fit_s[d], true_s, stage1_s,
                          fit_flops[d], true_flops, stage1_flops) for d in dims]
    body = {"summaries": [x.to_json() for x in summaries], "rows": [x.to_json() for x in rows]}
    return EstimateCheck(run.dir.write_json(run.dir.estimate_check, body), summaries, rows)


def _test_examples(run, tasks: Sequence[str], cap: int | None, seed: int) -> dict:
    """Each task's test examples (a seeded sample of ``cap`` of them, order kept)."""
    out = {}
    for t in tasks:
        test = run.task_data(t).splits["test"]
        if not test:
            raise ValueError(f"task {t!r} has no test split: the Table 3 check measures test "
                             "accuracy")
        if cap is not None and cap < len(test):
            keep = sorted(np.random.default_rng([seed, len(t)]).permutation(len(test))[:cap])
            test = [test[i] for i in keep]
        out[t] = test
    return out


def _test_features(run, tests: dict, info) -> dict[str, FeatureTable]:
    """Stage-1 features of the test examples (at θ*, with stage 1's projection, at its d)."""
    from .runtime import DEVICE_LOCK, projector, theta_star_model

    cfg = run.cfg
    lm = theta_star_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    e = cfg.estimation
    proj = projector(info.p, info.d, info.seed, info.block_rows, e.projection_cache_gb,
                     lm.device)
    with DEVICE_LOCK:
        return {t: extract_features(lm.model, scorer, ex, proj, task=t, split="test",
                                    batch_size=e.batch_size) for t, ex in tests.items()}


def _summary(d: int, rows: Sequence[EstimateCheckRow], n_chosen: int, k: int, fit_s: float,
             true_s: float, stage1_s: float, fit_flops: float = 0.0, true_flops: float = 0.0,
             stage1_flops: float = 0.0) -> EstimateCheckSummary:
    """Table 3's figures at projection dimension d over the (subset, task) pairs of ``rows``:
    the mean relative error of test accuracy (the paper's), of the validation loss, the
    Spearman correlation of estimated and true validation losses, and the speed-ups in wall
    time and FLOPs (fits alone; fits plus the amortized share of stage 1)."""
    from scipy.stats import spearmanr

    at = [x for x in rows if x.d == d]
    est_l = np.array([x.estimated_loss for x in at])
    true_l = np.array([x.true_loss for x in at])
    rho = float(spearmanr(est_l, true_l).statistic) if len(at) > 2 else None
    amortized = fit_s + stage1_s * n_chosen / max(k, 1)
    est_flops = fit_flops + stage1_flops * n_chosen / max(k, 1)
    test_err = [x.test_accuracy_relative_error for x in at
                if x.test_accuracy_relative_error is not None]
    return EstimateCheckSummary(
        d=d, pairs=len(at), subsets=n_chosen,
        mean_relative_error=float(np.mean([x.relative_error for x in at])), spearman=rho,
        accuracy_abs_error=float(np.mean([abs(x.estimated_accuracy - x.true_accuracy)
                                          for x in at])),
        true_finetune_s=true_s, surrogate_fit_s=fit_s,
        estimation_with_amortized_gradients_s=amortized,
        compute_ratio_fits_only=true_s / max(fit_s, 1e-12),
        compute_ratio_with_gradients=true_s / max(amortized, 1e-12),
        k_subsets=k, stage1_s=stage1_s,
        mean_test_accuracy_relative_error=float(np.mean(test_err)) if test_err else None,
        true_finetune_flops=true_flops, estimation_flops=est_flops,
        flops_speedup=true_flops / max(est_flops, 1e-12))
