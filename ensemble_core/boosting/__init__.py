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

Each mode is an entry of the :data:`BOOSTING_MODES` registry (``boosting.mode``), one module
each (``first_order``, ``exact``, ``adaboost``): ``step(ctx)`` takes a :class:`BoostContext` —
the group, θ* as a model, the group's train features and members' scores, and how to score,
save and fine-tune an adapter — and returns the step's ``records.BoostRecord``. The stage
(``stages/stage5_boosting.py``) builds the context; the loop of Algorithm 2 that chooses,
boosts and accepts is ``algorithm2``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..choices import Choices, flatten
from ..features import FeatureTable
from ..records import BoostRecord, GroupEnsemble, Member, ProjectionInfo
from ..registry import Registry, RegistryError
from ..rundir import THETA_STAR

__all__ = ["group_scores", "combine_scores", "group_train_loss", "choose_group",
           "with_boosting_member", "BoostContext", "BoostingMode", "BOOSTING_MODES",
           "register_boosting_mode", "boosting_mode", "fit_residuals", "restore", "boost_step",
           "exact_boost_step", "residual_loss", "adaboost_step", "adaboost_alphas",
           "weighted_choice_loss"]

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


def with_boosting_member(group: GroupEnsemble, adapter: str, theta_star: str,
                         scale: float = 1.0) -> GroupEnsemble:
    """The group after an accepted step: + scale·(h_k − h0), as members (adapter, +scale),
    (θ*, −scale)."""
    return replace(group, members=[*group.members, Member(adapter, scale),
                                   Member(theta_star, -scale)])


def _example_keys(tables: Sequence[FeatureTable]) -> list[tuple[str, str]]:
    return [(t.task, str(t.example_id[i])) for t in tables for i in t.choices.starts]


def _distances(moved: float, theta0: torch.Tensor, full_norm: float) -> tuple[float, float]:
    """How far a boosting adapter moved from θ*, ``moved`` = ‖θ − θ*‖: (the paper's relative
    distance ‖θ − θ*‖/‖θ*_Full‖, §2.2: over the whole pretrained model's norm; the adapter
    distance ‖θ − θ*‖/‖θ*‖, over the adapter's own norm at θ*). 0 where a norm is unknown."""
    own = float(theta0.norm())
    return (moved / full_norm if full_norm > 0 else 0.0, moved / own if own > 0 else 0.0)


def _moved(model, theta0: torch.Tensor) -> float:
    from ..models import adapter_vector

    return float((adapter_vector(model) - theta0).norm())


# -------------------------------------------------------------------------------------------
# The modes' registry
# -------------------------------------------------------------------------------------------

@dataclass
class BoostContext:
    """What one boosting step works with (built by stage 5's ``boost_group``)."""
    group: GroupEnsemble
    step: int
    model: object  # θ* (a PeftModel, fresh): a mode changes it into the boosting adapter
    tables: list[FeatureTable]  # the group's train features at the fit's d, in group.tasks order
    member_scores: MemberScores  # the group's members on its tasks' train sample
    score_train: Callable  # score_train(model) -> the model's train scores (flat)
    save: Callable  # save(model) -> the boosting adapter's records.AdapterRecord
    train: Callable  # train(model, loss_fn): fine-tune on the group's train sample
    eta: float
    l2: float
    projection: ProjectionInfo  # stage 1's projection at the fit's d
    theta_star: str = THETA_STAR

    def member_train(self, name: str) -> np.ndarray:
        """One member's train scores, flat, in the rows' order."""
        return flatten([s for t in self.group.tasks
                        for s in self.member_scores[name][t]["train"]])[0]

    @property
    def h_current(self) -> np.ndarray:
        """The group ensemble's train scores, flat."""
        return flatten([s for t in self.group.tasks
                        for s in group_scores(self.member_scores, self.group, t, "train")])[0]


class BoostingMode:
    """A boosting mode (module docstring): ``step(ctx)`` returns the step's BoostRecord.
    ``uses_theta_star``: an accepted step adds θ* as a member (so stage 5 scores θ*)."""
    name: ClassVar[str]
    uses_theta_star: ClassVar[bool] = True

    def step(self, ctx: BoostContext) -> BoostRecord:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<boosting mode {self.name!r}>"


def _check_entry(mode: BoostingMode) -> None:
    if not callable(getattr(mode, "step", None)):
        raise RegistryError(f"boosting mode {mode.name!r} needs a step(ctx) method")


BOOSTING_MODES: Registry[BoostingMode] = Registry("boosting mode", "boosting.mode", _check_entry)


def register_boosting_mode(mode, *, replace: bool = False):
    """Register a boosting mode (an instance or a subclass, which is instantiated). Usable as
    a class decorator."""
    BOOSTING_MODES.register(mode() if isinstance(mode, type) else mode, replace=replace)
    return mode


def boosting_mode(name: str) -> BoostingMode:
    return BOOSTING_MODES.get(name)


from . import adaboost, exact, first_order, paper  # noqa: E402,F401  (the builtin modes register)
from .adaboost import adaboost_alphas, adaboost_step, weighted_choice_loss  # noqa: E402
from .exact import exact_boost_step, residual_loss  # noqa: E402
from .first_order import boost_step, centred, fit_residuals, restore  # noqa: E402,F401
