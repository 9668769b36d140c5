"""``boosting.mode: first-order`` (steps 2–4 of the package docstring): the residuals fitted by
ridge regression on the stage-1 features, the fit restored as the real adapter θ* + η·P x̂."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..choices import Choices
from ..features import FeatureTable
from ..records import BoostRecord, GroupEnsemble
from ..rundir import THETA_STAR
from . import (BoostContext, BoostingMode, _distances, _train_layout, _train_state,
               register_boosting_mode, with_boosting_member)


def centred(G: np.ndarray, layout: Choices) -> np.ndarray:
    """Each row minus the mean of its example's rows (the part a softmax over the choices
    sees)."""
    mean = np.add.reduceat(G, layout.starts, axis=0) / layout.n_choices[:, None]
    return G - mean[layout.example_of_row]


def fit_residuals(tables: Sequence[FeatureTable], residual: np.ndarray,
                  l2: float = 1e-3) -> np.ndarray:
    """Ridge regression of the residuals on the per-example centred features (rows of
    ``tables`` in order, step 2 of the module docstring): x̂ = (GᵀG/N + λI)⁻¹ Gᵀr/N with
    G = g̃ − ḡ."""
    G = np.concatenate([t.grad for t in tables]).astype(np.float64)
    if G.shape[0] != residual.shape[0]:
        raise ValueError(f"{residual.shape[0]} residuals for {G.shape[0]} gradient rows")
    G = centred(G, _train_layout(tables))
    N, d = G.shape
    A = G.T @ G / N + l2 * np.eye(d)
    return np.linalg.solve(A, G.T @ residual / N)


def restore(model, x: np.ndarray, eta: float, projector) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the model's adapter to θ* + η·P x̂; returns (θ*, η·P x̂). The model must hold θ*."""
    from ..models import adapter_vector, set_adapter_vector

    theta0 = adapter_vector(model)
    if theta0.numel() != projector.p:
        raise ValueError(f"the adapter has {theta0.numel()} parameters, the projection p = "
                         f"{projector.p}")
    delta = eta * projector.expand(torch.from_numpy(x).float())
    set_adapter_vector(model, theta0 + delta)
    return theta0, delta


def boost_step(group: GroupEnsemble, step: int, model, score_train, save,
               tables: Sequence[FeatureTable], h_current: np.ndarray, l2: float, eta: float,
               projector, theta_star: str = THETA_STAR, full_norm: float = 0.0) -> BoostRecord:
    """One boosting step on ``group`` (steps 2–4 of the module docstring). ``model`` holds θ*
    and ends holding θ* + η·P x̂; ``save(model)`` writes it as the boosting adapter and returns
    its ``AdapterRecord``; ``score_train(model)`` returns the model's scores of the group's
    train examples (flat, in the rows' order); ``h_current`` are the group ensemble's current
    train scores (flat)."""
    t0 = time.perf_counter()
    gold, h0, loss_before = _train_state(group, tables, h_current)
    x = fit_residuals(tables, gold.residuals(h_current), l2=l2)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"group {group.name}: the boosting fit is not finite (estimation.l2 = "
                         f"{l2}); the features or the members' scores hold NaN or inf")
    theta0, delta = restore(model, x, eta, projector)
    adapter = save(model)
    h_k = np.asarray(score_train(model), np.float64)
    loss_after = gold.log_loss(h_current + (h_k - h0))
    if not np.isfinite(loss_after):
        raise ValueError(f"group {group.name}: the boosted ensemble's training loss is "
                         f"{loss_after} (boosting.eta = {eta} too large?)")
    G = np.concatenate([t.grad for t in tables]).astype(np.float64)
    return BoostRecord(
        adapter=adapter, group=group.name, step=step, eta=eta, train_loss_before=loss_before,
        train_loss_after=loss_after,
        train_loss_first_order=gold.log_loss(h_current + eta * (G @ x)),
        x_norm=float(np.linalg.norm(x)),
        relative_distance=_distances(float(delta.norm()), theta0, full_norm)[0],
        adapter_distance=_distances(float(delta.norm()), theta0, full_norm)[1],
        accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0,
        mode="first-order",
        members=with_boosting_member(group, adapter.name, theta_star).members)



@register_boosting_mode
class FirstOrder(BoostingMode):
    name = "first-order"

    def step(self, ctx: BoostContext) -> BoostRecord:
        from ..projection import GaussianProjector

        info = ctx.projection  # only this mode restores θ* + η·P x̂, so only it needs P
        proj = GaussianProjector(info.p, info.d, seed=info.seed, block_rows=info.block_rows,
                                 cache_bytes=0)  # one expand: each block is used once
        return boost_step(ctx.group, ctx.step, ctx.model, ctx.score_train, ctx.save,
                          ctx.tables, ctx.h_current, ctx.l2, ctx.eta, proj, ctx.theta_star,
                          ctx.projection.full_norm)
