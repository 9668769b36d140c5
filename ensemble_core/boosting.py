"""Stage 5, boosting: gradient boosting of a group's ensemble with first-order adapters
(Algorithm 2, Appendix A.2; docs/design.md, "Stage 5").

A group's ensemble is a list of members with scales (:class:`records.GroupEnsemble`); its score
for example s and choice c is the score-space sum

    h(s) = Σ_members scale · h_member(s)                                    (group_scores)

which starts as the group's fine-tuned adapter alone (scale 1). A boosting step:

1. chooses the group whose ensemble has the highest exact training loss (choose_group);
2. fits the residuals r_c(s) = 1[c = gold] − p_c(s) — the negative gradient of the log loss
   w.r.t. the scores — with the first-order model on the stage-1 features. These are gradients
   of score differences, g̃_c(s) = Pᵀ∇(h_c − h_0)(s): a change x moves the scores by g̃_c(s)ᵀx
   up to a shift common to all of s's choices, which no softmax sees. Since the residuals sum
   to zero over each example's choices, they are fitted by the part of the change that differs
   between the choices, the per-example centred features g̃_c(s) − ḡ(s) (ḡ the mean over s's
   choices): x̂ = argmin_x mean_(s,c) (r_c(s) − (g̃_c(s) − ḡ(s))ᵀx)² + λ‖x‖² (ridge, closed form
   in d dimensions; fit_residuals). It is the same for any reference choice, and it is the fit
   on per-choice gradients g_c − ḡ with the common part removed;
3. restores the step as a real PEFT adapter θ* + η·P x̂: the step size η is taken in parameter
   space, so h_k − h0 ≈ η·g̃ᵀx̂ while the adapter stays 1/η times closer to θ*, where the
   first-order model that fitted x̂ holds (restore);
4. measures the group's exact training loss with the adapter's change added,
   h + (h_k − h0), and accepts the step only if that loss is lower than before (boost_step);
5. an accepted step adds two members: the boosting adapter (scale +1) and θ* (scale −1), so
   the group adds exactly h_k − h0 (with_boosting_member).

The ``stages`` module reads the records this needs and writes the adapter; the flow only
sequences the steps.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch

from .choices import Choices, flatten
from .features import FeatureTable
from .records import BoostRecord, GroupEnsemble, Member

__all__ = ["group_scores", "group_train_loss", "choose_group", "fit_residuals", "restore",
           "boost_step", "with_boosting_member"]

MemberScores = Mapping[str, Mapping[str, Mapping[str, list]]]  # member -> task -> split -> rows


def group_scores(member_scores: MemberScores, group: GroupEnsemble, task: str,
                 split: str) -> list[np.ndarray]:
    """The group ensemble's scores per example: Σ_members scale · h_member (score space).
    ``member_scores[member][task][split]`` is one score vector per example."""
    return combine_scores([member_scores[m.name][task][split] for m in group.members],
                          [m.scale for m in group.members])


def combine_scores(member_scores: Sequence[Sequence], scales: Sequence[float]) -> list[np.ndarray]:
    """Per example, ``Σ_k scales[k] · member_scores[k][i]`` (float64)."""
    if len(member_scores) != len(scales) or not member_scores:
        raise ValueError(f"combine_scores: {len(member_scores)} members but {len(scales)} "
                         "scales (need at least one member)")
    n = len(member_scores[0])
    if any(len(m) != n for m in member_scores):
        raise ValueError("combine_scores: members score different numbers of examples")
    total = None
    for m, s in zip(member_scores, scales):
        part = [np.asarray(v, np.float64) * float(s) for v in m]
        total = part if total is None else [a + b for a, b in zip(total, part)]
    return total


def _train_layout(tables: Sequence[FeatureTable]) -> Choices:
    return Choices.concat([t.choices for t in tables])


def group_train_loss(member_scores: MemberScores, group: GroupEnsemble,
                     tables: Sequence[FeatureTable]) -> float:
    """The exact training loss of a group's current ensemble (from its members' scores);
    ``tables`` are the group's train features (for the gold choices), in ``group.tasks``
    order."""
    h = [s for t in group.tasks for s in group_scores(member_scores, group, t, "train")]
    z, layout = flatten(h)
    gold = _train_layout(tables)
    if layout.n_rows != gold.n_rows:
        raise ValueError(f"group {group.name}: {layout.n_rows} scored rows, {gold.n_rows} "
                         "feature rows")
    return gold.log_loss(z)


def choose_group(groups: Sequence[GroupEnsemble], losses: Mapping[str, float]) -> GroupEnsemble:
    """The group to boost: the highest training loss (ties: the first group)."""
    return max(groups, key=lambda g: losses[g.name])


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
    from .models import adapter_vector, set_adapter_vector

    theta0 = adapter_vector(model)
    if theta0.numel() != projector.p:
        raise ValueError(f"the adapter has {theta0.numel()} parameters, the projection p = "
                         f"{projector.p}")
    delta = eta * projector.expand(torch.from_numpy(x).float())
    set_adapter_vector(model, theta0 + delta)
    return theta0, delta


def boost_step(group: GroupEnsemble, step: int, model, score_train, save,
               tables: Sequence[FeatureTable], h_current: np.ndarray, l2: float, eta: float,
               projector) -> BoostRecord:
    """One boosting step on ``group`` (steps 2–4 of the module docstring). ``model`` holds θ*
    and ends holding θ* + η·P x̂; ``save(model)`` writes it as the boosting adapter and returns
    its ``AdapterRecord``; ``score_train(model)`` returns the model's scores of the group's
    train examples (flat, in the rows' order); ``h_current`` are the group ensemble's current
    train scores (flat)."""
    t0 = time.perf_counter()
    gold = _train_layout(tables)
    h0 = np.concatenate([t.output for t in tables]).astype(np.float64)
    if len(h_current) != len(h0):
        raise ValueError(f"group {group.name}: {len(h_current)} scored rows, {len(h0)} feature "
                         "rows")
    loss_before = gold.log_loss(h_current)
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
        relative_distance=float(delta.norm() / max(float(theta0.norm()), 1e-30)),
        accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0)


def with_boosting_member(group: GroupEnsemble, adapter: str, theta_star: str) -> GroupEnsemble:
    """The group after an accepted step: + h_k − h0, as members (adapter, +1), (θ*, −1)."""
    return replace(group, members=[*group.members, Member(adapter, 1.0),
                                   Member(theta_star, -1.0)])
