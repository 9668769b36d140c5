"""``boosting.mode: adaboost`` (AdaBoost.M1 over the group's members; the paper's code,
Appendix A.2): sample weights from the members' errors, α = log((1 − err)/err)."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from ..features import FeatureTable
from ..records import BoostRecord, GroupEnsemble, Member
from . import (BoostContext, BoostingMode, _example_keys, _distances, _moved, _train_layout,
               register_boosting_mode)


def weighted_choice_loss(weights: Mapping[tuple[str, str], float]):
    """AdaBoost's training loss: Σ_s w_s·ℓ_s / n over a batch, ℓ the multiple-choice log loss
    and ``weights[(task, example_id)]`` the sample weights (mean 1 over the training set)."""
    from ..choices import segment_log_softmax
    from ..scoring import choice_outputs, gold_rows

    def loss_fn(model, batch, examples):
        scores = choice_outputs(model, batch)
        nll = -segment_log_softmax(scores, batch.n_choices)[gold_rows(examples).to(scores.device)]
        w = torch.as_tensor([weights[(e.task, e.example_id)] for e in examples],
                            dtype=nll.dtype, device=nll.device)
        return (w * nll).mean()
    return loss_fn


ERR_FLOOR = 1e-6  # err is clipped to [ERR_FLOOR, 1 − ERR_FLOOR]: α stays finite for a perfect member


def adaboost_alphas(wrong: Sequence[np.ndarray]) -> tuple[list[float], list[float], np.ndarray]:
    """AdaBoost.M1 over members in order (module docstring): ``wrong[t]`` [N] is 1 where member
    t misclassifies example s. Returns (err_t, α_t, the sample weights after the last member,
    normalised to mean 1). Starts from uniform weights."""
    n = len(wrong[0]) if wrong else 0
    w = np.full(n, 1.0)
    errs, alphas = [], []
    for m in wrong:
        m = np.asarray(m, np.float64)
        err = float(np.clip(np.sum(w * m) / np.sum(w), ERR_FLOOR, 1 - ERR_FLOOR))
        alpha = float(np.log((1 - err) / err))
        w = w * np.exp(alpha * m)
        w = w / w.mean()
        errs.append(err)
        alphas.append(alpha)
    return errs, alphas, w


def adaboost_step(group: GroupEnsemble, step: int, model, score_train, save, train,
                  tables: Sequence[FeatureTable], member_train: Mapping[str, np.ndarray],
                  eta: float, full_norm: float = 0.0) -> BoostRecord:
    """One ``adaboost`` step (module docstring). ``member_train[name]`` are the flat train
    scores of each of the group's members (in ``group.members`` order); ``model`` holds θ* and
    is fine-tuned in place by ``train(model, loss_fn)`` with the sample weights."""
    from ..models import adapter_vector

    t0 = time.perf_counter()
    gold = _train_layout(tables)
    names = [m.name for m in group.members]
    wrong = [~gold.correct(np.asarray(member_train[n], np.float64)) for n in names]
    _, alphas, w = adaboost_alphas(wrong)
    h_current = sum(m.scale * np.asarray(member_train[m.name], np.float64)
                    for m in group.members)
    loss_before = gold.log_loss(h_current)
    theta0 = adapter_vector(model)
    keys = _example_keys(tables)
    train(model, weighted_choice_loss(dict(zip(keys, w.tolist()))))
    adapter = save(model)
    h_k = np.asarray(score_train(model), np.float64)
    errs, alphas_new, _ = adaboost_alphas([*wrong, ~gold.correct(h_k)])
    alpha = alphas_new[-1]
    total = sum(alphas) + alpha
    if total > 0:  # the group re-weighted: Σ_t α_t h_t / Σ_t α_t
        members = [Member(n, a / total) for n, a in zip(names, alphas)]
        members.append(Member(adapter.name, alpha / total))
        scores = {**member_train, adapter.name: h_k}
        h_new = sum(m.scale * np.asarray(scores[m.name], np.float64) for m in members)
    else:
        members, h_new = list(group.members), h_current
    loss_after = gold.log_loss(h_new)
    return BoostRecord(
        adapter=adapter, group=group.name, step=step, eta=eta, train_loss_before=loss_before,
        train_loss_after=loss_after, train_loss_first_order=None, x_norm=None,
        relative_distance=_distances(_moved(model, theta0), theta0, full_norm)[0],
        adapter_distance=_distances(_moved(model, theta0), theta0, full_norm)[1],
        accepted=bool(alpha > 0 and loss_after < loss_before and all(a > 0 for a in alphas)),
        seconds=time.perf_counter() - t0, mode="adaboost", members=members,
        alpha=alpha, error=errs[-1])


@register_boosting_mode
class AdaBoost(BoostingMode):
    name = "adaboost"
    uses_theta_star = False  # the group becomes Σ α_t h_t over trained members only

    def step(self, ctx: BoostContext) -> BoostRecord:
        flat = {m.name: ctx.member_train(m.name) for m in ctx.group.members}
        return adaboost_step(ctx.group, ctx.step, ctx.model, ctx.score_train, ctx.save,
                             ctx.train, ctx.tables, flat, ctx.eta, ctx.projection.full_norm)
