"""``boosting.mode: exact`` (the paper's code, Appendix A.2): the boosting adapter fine-tuned
from θ* on the residuals (squared error of its centred change), added with shrinkage η."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from ..features import FeatureTable
from ..records import BoostRecord, GroupEnsemble
from . import (BoostContext, BoostingMode, _example_keys, _distances, _moved, _train_state, register_boosting_mode, with_boosting_member)


def residual_loss(targets: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]):
    """The exact mode's training loss (module docstring): for a batch, the mean over its
    examples of Σ_c (centred(h_θ − h0)_c − r_c)². ``targets[(task, example_id)]`` = (h0, r),
    the example's θ* scores and residuals. Returns ``loss_fn(model, batch, examples)`` for
    ``training.train_adapter``."""
    from ..scoring import choice_outputs

    def loss_fn(model, batch, examples):
        h = choice_outputs(model, batch)
        h0 = np.concatenate([targets[(e.task, e.example_id)][0] for e in examples])
        r = np.concatenate([targets[(e.task, e.example_id)][1] for e in examples])
        f = h - torch.as_tensor(h0, dtype=h.dtype, device=h.device)
        n = torch.as_tensor(batch.n_choices, device=h.device)
        ex = torch.repeat_interleave(torch.arange(len(n), device=h.device), n)
        mean = torch.zeros(len(n), dtype=h.dtype, device=h.device).index_add(0, ex, f) / n
        err = f - mean[ex] - torch.as_tensor(r, dtype=h.dtype, device=h.device)
        return torch.zeros(len(n), dtype=h.dtype, device=h.device).index_add(
            0, ex, err ** 2).mean()
    return loss_fn


def exact_boost_step(group: GroupEnsemble, step: int, model, score_train, save, train,
                     tables: Sequence[FeatureTable], h_current: np.ndarray, eta: float,
                     theta_star: str, full_norm: float = 0.0) -> BoostRecord:
    """One ``exact`` boosting step (module docstring). ``model`` holds θ* and is fine-tuned in
    place by ``train(model, loss_fn)`` on the group's train sample; ``save``, ``score_train``,
    ``h_current`` as in :func:`boost_step`."""
    from ..models import adapter_vector

    t0 = time.perf_counter()
    gold, h0, loss_before = _train_state(group, tables, h_current)
    r = gold.residuals(h_current)
    keys = _example_keys(tables)
    targets = {k: (h0[a:a + n], r[a:a + n])
               for k, a, n in zip(keys, gold.starts, gold.n_choices)}
    theta0 = adapter_vector(model)
    train(model, residual_loss(targets))
    adapter = save(model)
    h_k = np.asarray(score_train(model), np.float64)
    loss_after = gold.log_loss(h_current + eta * (h_k - h0))
    if not np.isfinite(loss_after):
        raise ValueError(f"group {group.name}: the boosted ensemble's training loss is "
                         f"{loss_after} (lower training.learning_rate or boosting.eta)")
    return BoostRecord(
        adapter=adapter, group=group.name, step=step, eta=eta, train_loss_before=loss_before,
        train_loss_after=loss_after, train_loss_first_order=None, x_norm=None,
        relative_distance=_distances(_moved(model, theta0), theta0, full_norm)[0],
        adapter_distance=_distances(_moved(model, theta0), theta0, full_norm)[1],
        accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0,
        mode="exact",
        members=with_boosting_member(group, adapter.name, theta_star, eta).members)



@register_boosting_mode
class Exact(BoostingMode):
    name = "exact"

    def step(self, ctx: BoostContext) -> BoostRecord:
        return exact_boost_step(ctx.group, ctx.step, ctx.model, ctx.score_train, ctx.save,
                                ctx.train, ctx.tables, ctx.h_current, ctx.eta, ctx.theta_star,
                                ctx.projection.full_norm)
