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

Two more modes (``boosting.mode``; the paper's code, Appendix A.2) replace steps 2–3 and keep
the accept/reject of step 4 on the exact training loss:

* ``exact`` (:func:`exact_boost_step`): the boosting adapter is really fine-tuned from θ* to fit
  the residuals, minimising the mean over the group's train sample of
  Σ_c ((h_k − h0)_c(s) − mean_c'(h_k − h0)_c'(s) − r_c(s))² (the squared error of its centred
  change of the scores to the residuals; centred because no softmax sees a shift common to an
  example's choices), and enters the group with scale η: h + η·(h_k − h0), members (adapter,
  +η), (θ*, −η) — gradient boosting with shrinkage η;
* ``adaboost`` (:func:`adaboost_step`, AdaBoost.M1): the group's members m_0 (its fine-tuned
  adapter), m_1, … in order, from uniform sample weights w: err_t = Σ w·1[m_t wrong] / Σ w,
  α_t = log((1 − err_t)/err_t), w ← w·exp(α_t·1[m_t wrong]); the new adapter is fine-tuned
  from θ* on the group's train sample with the example weights w (mean 1) in its log loss, and
  the group becomes Σ_t α_t·h_t / Σ_t α_t (scores weighted by α, normalised so that they stay
  on one model's scale). A member with err ≥ 1/2 has α ≤ 0 and ends boosting (rejected). η is
  not used.

Both train on the examples the members' train scores exist for: the group's stage-1 train
sample (``estimation.max_examples``), with ``training`` (learning rate, epochs, batch size) and
no validation (the last epoch is kept).

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
from .rundir import THETA_STAR

__all__ = ["group_scores", "group_train_loss", "choose_group", "fit_residuals", "restore",
           "boost_step", "with_boosting_member", "exact_boost_step", "adaboost_step",
           "adaboost_alphas", "residual_loss", "weighted_choice_loss", "MODES"]

MODES = ("first-order", "exact", "adaboost")

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


def _train_state(group: GroupEnsemble, tables: Sequence[FeatureTable],
                 h_current: np.ndarray) -> tuple[Choices, np.ndarray, float]:
    """What a boosting step starts from: the train layout (gold choices), θ*'s train scores
    h0 (the feature tables' outputs, flat) and the group's current training loss."""
    gold = _train_layout(tables)
    h0 = np.concatenate([t.output for t in tables]).astype(np.float64)
    if len(h_current) != len(h0):
        raise ValueError(f"group {group.name}: {len(h_current)} scored rows, {len(h0)} feature "
                         "rows")
    return gold, h0, gold.log_loss(h_current)


def boost_step(group: GroupEnsemble, step: int, model, score_train, save,
               tables: Sequence[FeatureTable], h_current: np.ndarray, l2: float, eta: float,
               projector, theta_star: str = THETA_STAR) -> BoostRecord:
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
        relative_distance=float(delta.norm() / max(float(theta0.norm()), 1e-30)),
        accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0,
        mode="first-order",
        members=with_boosting_member(group, adapter.name, theta_star).members)


def with_boosting_member(group: GroupEnsemble, adapter: str, theta_star: str,
                         scale: float = 1.0) -> GroupEnsemble:
    """The group after an accepted step: + scale·(h_k − h0), as members (adapter, +scale),
    (θ*, −scale)."""
    return replace(group, members=[*group.members, Member(adapter, scale),
                                   Member(theta_star, -scale)])


def _relative_distance(model, theta0: torch.Tensor) -> float:
    from .models import adapter_vector

    return float((adapter_vector(model) - theta0).norm() / max(float(theta0.norm()), 1e-30))


def residual_loss(targets: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]]):
    """The exact mode's training loss (module docstring): for a batch, the mean over its
    examples of Σ_c (centred(h_θ − h0)_c − r_c)². ``targets[(task, example_id)]`` = (h0, r),
    the example's θ* scores and residuals. Returns ``loss_fn(model, batch, examples)`` for
    ``training.train_adapter``."""
    from .scoring import choice_outputs

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


def weighted_choice_loss(weights: Mapping[tuple[str, str], float]):
    """AdaBoost's training loss: Σ_s w_s·ℓ_s / n over a batch, ℓ the multiple-choice log loss
    and ``weights[(task, example_id)]`` the sample weights (mean 1 over the training set)."""
    from .choices import segment_log_softmax
    from .scoring import choice_outputs, gold_rows

    def loss_fn(model, batch, examples):
        scores = choice_outputs(model, batch)
        nll = -segment_log_softmax(scores, batch.n_choices)[gold_rows(examples).to(scores.device)]
        w = torch.as_tensor([weights[(e.task, e.example_id)] for e in examples],
                            dtype=nll.dtype, device=nll.device)
        return (w * nll).mean()
    return loss_fn


def _example_keys(tables: Sequence[FeatureTable]) -> list[tuple[str, str]]:
    return [(t.task, str(t.example_id[i])) for t in tables for i in t.choices.starts]


def exact_boost_step(group: GroupEnsemble, step: int, model, score_train, save, train,
                     tables: Sequence[FeatureTable], h_current: np.ndarray, eta: float,
                     theta_star: str) -> BoostRecord:
    """One ``exact`` boosting step (module docstring). ``model`` holds θ* and is fine-tuned in
    place by ``train(model, loss_fn)`` on the group's train sample; ``save``, ``score_train``,
    ``h_current`` as in :func:`boost_step`."""
    from .models import adapter_vector

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
        relative_distance=_relative_distance(model, theta0),
        accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0,
        mode="exact",
        members=with_boosting_member(group, adapter.name, theta_star, eta).members)


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
                  eta: float) -> BoostRecord:
    """One ``adaboost`` step (module docstring). ``member_train[name]`` are the flat train
    scores of each of the group's members (in ``group.members`` order); ``model`` holds θ* and
    is fine-tuned in place by ``train(model, loss_fn)`` with the sample weights."""
    from .models import adapter_vector

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
        relative_distance=_relative_distance(model, theta0),
        accepted=bool(alpha > 0 and loss_after < loss_before and all(a > 0 for a in alphas)),
        seconds=time.perf_counter() - t0, mode="adaboost", members=members,
        alpha=alpha, error=errs[-1])
