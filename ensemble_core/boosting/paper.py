"""``boosting.mode: paper``: the boosting step as the paper writes it (§3.3, Appendix A.2), for a
comparison with ``first-order`` (BENCHMARKS.md, "The paper's measures").

The paper fits the boosting adapter X to the residual of the gold answer,

    min_X Σ_s ( 1 − p_s − h_θ*(s, y) − g_sᵀ(X − θ*) )²

— the linearized *output* h_X(s, y) ≈ h_θ*(s, y) + g_sᵀ(X − θ*) regressed on 1 − p_s, p_s the
group ensemble's probability of the gold answer y — and adds η·h_X to the ensemble. Our
features are gradients of score differences, and a softmax over an example's choices reads
scores only up to a shift common to its choices, so the output here is the centred one, what
that softmax sees: h̃_c = h_c − mean_c' h_c', with features g̃_c − ḡ (the same centring as
``first_order``). With x = Pᵀ(X − θ*) in the projected space:

    x̂ = argmin_x  1/N Σ_s ( 1 − p_s − h̃_θ*(s, y) − (g̃_y(s) − ḡ(s))ᵀx )² + λ‖x‖²

restored as the whole adapter θ* + P x̂ (η is applied to its output, not in parameter space),
entering the group as one member with scale η: h ← h + η·h_X. Kept, as every mode, only if the
group's exact training loss falls. What differs from ``first-order`` (the default, chosen by
measurement): that mode fits every choice's residual with the *change* g̃ᵀx and adds the change
h_X − h_θ* (members X with +1 and θ* with −1, the step η·P x̂ taken in parameter space, inside
the first-order regime); this one fits only the gold row with the whole output, so the target
carries the base model's own (centred) output and the ensemble gains η·h_θ* beside the change.
"""
from __future__ import annotations

import time

import numpy as np

from ..records import BoostRecord, Member
from . import BoostContext, BoostingMode, _distances, _train_state, register_boosting_mode
from .first_order import centred, restore


def fit_gold_output(G: np.ndarray, h0: np.ndarray, layout, p_gold: np.ndarray,
                    l2: float) -> np.ndarray:
    """The paper's regression on the gold rows (module docstring): centred features G
    [rows, d], θ*'s scores h0 [rows], the gold probabilities of the group ensemble [examples]."""
    Gc = centred(G, layout)
    h0c = h0 - (np.add.reduceat(h0, layout.starts) / layout.n_choices)[layout.example_of_row]
    rows = layout.gold_rows
    X, target = Gc[rows], 1.0 - p_gold - h0c[rows]
    N, d = X.shape
    return np.linalg.solve(X.T @ X / N + l2 * np.eye(d), X.T @ target / N)


@register_boosting_mode
class Paper(BoostingMode):
    name = "paper"
    uses_theta_star = False  # the member is η·h_X itself: no θ* to subtract

    def step(self, ctx: BoostContext) -> BoostRecord:
        from ..projection import GaussianProjector

        t0 = time.perf_counter()
        h_current = ctx.h_current
        gold, h0, loss_before = _train_state(ctx.group, ctx.tables, h_current)
        p = gold.softmax(h_current)
        G = np.concatenate([t.grad for t in ctx.tables]).astype(np.float64)
        x = fit_gold_output(G, h0, gold, p[gold.gold_rows], ctx.l2)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"group {ctx.group.name}: the boosting fit is not finite "
                             f"(estimation.l2 = {ctx.l2})")
        info = ctx.projection
        proj = GaussianProjector(info.p, info.d, seed=info.seed, block_rows=info.block_rows,
                                 cache_bytes=0)
        theta0, delta = restore(ctx.model, x, 1.0, proj)
        adapter = ctx.save(ctx.model)
        h_x = np.asarray(ctx.score_train(ctx.model), np.float64)
        loss_after = gold.log_loss(h_current + ctx.eta * h_x)
        if not np.isfinite(loss_after):
            raise ValueError(f"group {ctx.group.name}: the boosted ensemble's training loss is "
                             f"{loss_after} (boosting.eta = {ctx.eta} too large?)")
        rel, own = _distances(float(delta.norm()), theta0, info.full_norm)
        return BoostRecord(
            adapter=adapter, group=ctx.group.name, step=ctx.step, eta=ctx.eta,
            train_loss_before=loss_before, train_loss_after=loss_after,
            train_loss_first_order=None, x_norm=float(np.linalg.norm(x)),
            relative_distance=rel, adapter_distance=own,
            accepted=bool(loss_after < loss_before), seconds=time.perf_counter() - t0,
            mode=self.name,
            members=[*ctx.group.members, Member(adapter.name, ctx.eta)])
