"""The SDP clustering of the paper (``clustering.method: sdp``; stage 3, Appendix A.1;
docs/design.md, "Stage 3").

SDP relaxation of "maximize the total within-group affinity" (each group normalized by its size):

    maximize   ⟨T, X⟩ + λ · Tr X
    subject to X · 1 = 1,   X ≥ 0 (elementwise),   X ⪰ 0            [+ Tr X = m when m is given]

For a partition into groups G_1..G_m the feasible point X = Σ_k 1_{G_k} 1_{G_k}ᵀ / |G_k| has
Tr X = m, so the trace counts groups and λ trades affinity for the number of groups (trace
regularization). T is symmetrized, (T + Tᵀ)/2, because ⟨T, X⟩ only sees the symmetric part of T
for symmetric X. Adding a constant a_i to row i of T adds Σ_i a_i to the objective (X·1 = 1), so
the optimum does not change; we use that freedom to work with the row-centered affinity
A = sym(T_ij − T_ii) ("how much j helps i beyond i's average"), scaled to max |A| = 1, which makes
solver tolerances and the automatic λ grid independent of the units of T.

Rounding (X̂ → groups; Appendix A.1): tasks u, v go together when X̂_uv ≥ c/n with c ≥ 1 (the
paper's condition; default c = 1). In an exact block solution X̂_uv = 1/|G| ≥ 1/n inside a group
and 0 across groups, so c = 1 separates them; a group of all n tasks, whose entries are exactly
1/n, may fall apart under solver noise below 1/n, which the greedy rounding and, with m given,
the merging below make whole again. The threshold graph need not be
transitive, so the groups are formed greedily: repeatedly take the unassigned task with the
largest X̂_uu (smallest implied group; ties → lowest index) and give it every unassigned task
v with X̂_uv ≥ c/n. With m given, the rounding is then made exactly m groups: merge the two
groups with the highest mean affinity, or split the least coherent group around its least
affine pair — all ties broken by task index, so the result is deterministic.

Choosing m automatically (``m_selection``):
- ``"density"`` (the paper's rule, §3.3, the default): for m = 1..min(n, max_groups) solve with
  Tr X = m, round to m groups v_1..v_m (indicator vectors) and score the average density
  (1/m) Σ_j v_jᵀ D v_j / v_jᵀ v_j; take the largest (ties → fewer groups). D is the affinity
  with each row centred by its mean over the other tasks (``density_affinity``; the paper's T
  is "larger = helps" in unspecified units: on −loss itself every group's density is
  −|group|·loss, which favours singletons whatever the data, so the rule is read on the
  centred affinity, where a group of tasks that help each other has positive density and a
  group of unrelated ones none).
- ``"contrast"``: as ``"density"``, scoring instead the average within-group density contrast:
  per task, mean affinity inside its group minus mean affinity to the closest other group
  (singletons and m = 1 score 0), averaged over tasks (a rule of this project's; BENCHMARKS.md,
  "Choosing m", says where it differs).
- ``"trace"``: solve for a grid of λ (default: −n·max|A|·{1e-3..1}, 0, +max|A|·{1e-3..1}, log
  spaced), round each solution and take the number of groups that is optimal over the longest
  λ-range (the most stable m; each grid point owns the λ-interval between the midpoints to its
  neighbours, so a densely sampled neighbourhood of λ = 0 does not outvote a wide plateau; the
  trivial 1 and n only if nothing else occurs; ties → fewer groups). Then re-solve with
  Tr X = m. (Trace regularization, Appendix A.1's λ Tr X, used to choose m: a rule of this
  project's.)
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from .base import (ClusteringConfig, ClusteringMethod, Estimator, _as_matrix, _check_m,
                   _groups_to_labels, centered_affinity, labels_to_groups,
                   register_clustering_method)

__all__ = ["SDPClustering", "SDPSolveError", "solve_sdp", "round_solution", "SDPConfig",
           "paper_density", "density_affinity"]

_OK = ("optimal", "optimal_inaccurate")
# Clarabel's interior-point KKT system for an n×n PSD cone is dense in n(n+1)/2 unknowns, so its
# cost grows like n^6; SCS (first-order) scales much better. Auto order: Clarabel first for small
# problems (accurate, fast), SCS first above this size, Clarabel never above the second size.
_CLARABEL_FIRST_MAX_N = 30
_CLARABEL_MAX_N = 120


class SDPSolveError(RuntimeError):
    """No solver returned a usable solution of the clustering SDP."""


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _solver_order(solver, n: int) -> list[str]:
    if solver is None:
        if n <= _CLARABEL_FIRST_MAX_N:
            return ["CLARABEL", "SCS"]
        return ["SCS"] + (["CLARABEL"] if n <= _CLARABEL_MAX_N else [])
    if isinstance(solver, str):
        return [solver.upper()]
    return [s.upper() for s in solver]


def _solver_options(name: str) -> dict:
    if name == "SCS":
        # rounding needs X̂ to ~1e-4 (entries are ≥ 1/n or ≈ 0): eps 1e-5 is ample
        return {"eps_abs": 1e-5, "eps_rel": 1e-5, "max_iters": 50_000}
    if name == "CLARABEL":
        return {"tol_gap_abs": 1e-7, "tol_gap_rel": 1e-7, "tol_feas": 1e-7}
    return {}


class _SDPProblem:
    """The clustering SDP for one affinity, compiled once; λ is a cvxpy Parameter so a λ sweep
    reuses the compiled problem (and SCS warm-starts from the previous solution)."""

    def __init__(self, T, m: int | None = None, solver=None):
        import cvxpy as cp

        self._cp = cp
        self.T = _as_matrix(T)
        n = self.n = self.T.shape[0]
        _check_m(m, n)
        self.m = m
        self.solver = solver
        A = centered_affinity(self.T)
        self.scale = float(np.max(np.abs(A)))
        if self.scale == 0.0:
            raise ValueError("affinity is degenerate: T_ij − T_ii is zero for all pairs, every "
                             "partition has the same objective")
        self.X = cp.Variable((n, n), PSD=True)  # X ⪰ 0 (symmetric)
        self.lam = cp.Parameter(name="lam_scaled")  # λ / max|A|
        cons = [cp.sum(self.X, axis=1) == 1, self.X >= 0]  # X·1 = 1, X ≥ 0
        obj = cp.sum(cp.multiply(A / self.scale, self.X))  # ⟨A, X⟩ ≡ ⟨sym T, X⟩ + const
        if m is not None:
            cons.append(cp.trace(self.X) == int(m))  # λ·Tr X = λm: constant, dropped
        else:
            obj = obj + self.lam * cp.trace(self.X)
        self.problem = cp.Problem(cp.Maximize(obj), cons)
        self._solved_once: set = set()

    def solve(self, lam: float = 0.0):
        cp, n = self._cp, self.n
        self.lam.value = float(lam) / self.scale
        attempts = []
        for name in _solver_order(self.solver, n):
            if name not in cp.installed_solvers():
                attempts.append(f"{name}: not installed")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.problem.solve(solver=name, warm_start=name in self._solved_once,
                                       **_solver_options(name))
            except (cp.error.SolverError, ArithmeticError, ValueError) as exc:
                attempts.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            status, Xval = self.problem.status, self.X.value
            if status in _OK and Xval is not None and np.all(np.isfinite(Xval)):
                self._solved_once.add(name)
                Xv = (Xval + Xval.T) / 2.0
                sym = (self.T + self.T.T) / 2.0
                objective = float(np.sum(sym * Xv) + float(lam) * np.trace(Xv))
                return Xv, objective, str(status), name
            attempts.append(f"{name}: status {status}")
        raise SDPSolveError(f"clustering SDP (n={n} tasks, {n * (n + 1) // 2} PSD variables, "
                            f"{n * n} nonnegativity constraints, m={self.m}, λ={lam}) failed "
                            f"with every solver: {'; '.join(attempts)}")


def solve_sdp(T, lam: float = 0.0, m: int | None = None, solver=None):
    """Solve max ⟨sym T, X⟩ + λ Tr X s.t. X·1 = 1, X ≥ 0, X ⪰ 0 (+ Tr X = m).

    Internally solves the equivalent problem on the row-centered affinity scaled to max |A| = 1
    (λ scaled alike). Returns ``(X, objective, status, solver_name)`` with the objective in the
    units of T: ⟨(T+Tᵀ)/2, X⟩ + λ Tr X. Raises SDPSolveError when every solver fails.
    """
    return _SDPProblem(T, m=m, solver=solver).solve(lam)


# --------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------
def _mean_block(A: np.ndarray, rows: list[int], cols: list[int]) -> float:
    return float(A[np.ix_(rows, cols)].mean())


def _mean_within(A: np.ndarray, g: list[int]) -> float:
    if len(g) < 2:
        return 0.0
    sub = A[np.ix_(g, g)]
    return float((sub.sum() - np.trace(sub)) / (len(g) * (len(g) - 1)))


def _merge_to(groups: list[list[int]], m: int, A: np.ndarray) -> list[list[int]]:
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    while len(groups) > m:
        best, pair = -math.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                v = _mean_block(A, groups[a], groups[b])
                if v > best + 1e-12:  # strict: first (lowest-index) pair wins ties
                    best, pair = v, (a, b)
        a, b = pair
        merged = sorted(groups[a] + groups[b])
        groups = [g for k, g in enumerate(groups) if k not in pair] + [merged]
        groups.sort(key=lambda g: g[0])
    return groups


def _split_to(groups: list[list[int]], m: int, A: np.ndarray) -> list[list[int]]:
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    while len(groups) < m:
        # least coherent splittable group (ties: larger, then lower first index)
        cands = [k for k, g in enumerate(groups) if len(g) >= 2]
        k = min(cands, key=lambda k: (_mean_within(A, groups[k]), -len(groups[k]),
                                      groups[k][0]))
        g = groups[k]
        sub = A[np.ix_(g, g)].copy()
        np.fill_diagonal(sub, np.inf)
        u_, v_ = np.unravel_index(int(np.argmin(sub)), sub.shape)  # least affine pair
        u, v = g[min(u_, v_)], g[max(u_, v_)]
        left, right = [u], [v]
        for w in g:
            if w in (u, v):
                continue
            (left if A[w, u] >= A[w, v] else right).append(w)
        groups = groups[:k] + groups[k + 1:] + [sorted(left), sorted(right)]
        groups.sort(key=lambda g: g[0])
    return groups


def round_solution(X: np.ndarray, c: float = 1.0, m: int | None = None,
                   affinity=None) -> np.ndarray:
    """Round an SDP solution to labels: u ~ v when X̂_uv ≥ c/n (greedy, see module doc).

    With ``m`` the groups are merged/split (by mean affinity, ``affinity`` if given else X̂)
    until there are exactly m. Labels are canonical: groups numbered by their lowest task.
    """
    X = np.asarray(X, np.float64)
    n = X.shape[0]
    _check_m(m, n)
    thr = c / n
    diag = np.diag(X)
    order = np.lexsort((np.arange(n), -diag))  # largest diagonal first, ties → lowest index
    unassigned = np.ones(n, bool)
    groups: list[list[int]] = []
    for u in order:
        if not unassigned[u]:
            continue
        members = np.flatnonzero(unassigned & (X[u] >= thr))
        g = sorted(set(int(v) for v in members) | {int(u)})
        unassigned[g] = False
        groups.append(g)
    if m is not None and len(groups) != m:
        A = centered_affinity(affinity) if affinity is not None else (X + X.T) / 2.0
        groups = _merge_to(groups, m, A) if len(groups) > m else _split_to(groups, m, A)
    return _groups_to_labels(groups, n)


TRACE_PATH_C = 0.5


def density_affinity(T) -> np.ndarray:
    """The affinity the density rule reads: sym(T_ij − mean_{k≠i} T_ik), zero diagonal — how
    much j helps i beyond i's average partner. (Centring each row also removes the constant
    part of T that would otherwise decide m alone; by the off-diagonal mean rather than
    T_ii, which may hold as much signal as a partner's entry.)"""
    T = _as_matrix(T)
    n = T.shape[0]
    off = (T.sum(axis=1) - np.diag(T)) / (n - 1)
    D = T - off[:, None]
    D = (D + D.T) / 2.0
    np.fill_diagonal(D, 0.0)
    return D


def paper_density(A: np.ndarray, labels: np.ndarray) -> float:
    """The paper's average density of a partition (§3.3; ``m_selection="density"``):
    (1/m) Σ_j v_jᵀ A v_j / v_jᵀ v_j over the groups' indicator vectors v_j."""
    groups = labels_to_groups(labels)
    return float(np.mean([A[np.ix_(g, g)].sum() / len(g) for g in groups]))


def _contrast(A: np.ndarray, labels: np.ndarray) -> float:
    """Average within-group density contrast of a partition (``m_selection="contrast"``).

    Per task u: mean affinity to the other members of its group minus the mean affinity to the
    closest other group (the one u is most affine to); singletons and the one-group partition
    score 0. Averaged over tasks. Comparing with the *closest* other group (rather than all
    other tasks) penalizes splitting a coherent group, which a plain within-minus-between mean
    rewards through selection bias (small groups keep only their best pairs).
    """
    n = len(labels)
    groups = labels_to_groups(labels)
    if len(groups) < 2:
        return 0.0
    total = 0.0
    for g in groups:
        if len(g) < 2:
            continue
        others = [h for h in groups if h is not g]
        for u in g:
            within = (A[u, g].sum() - A[u, u]) / (len(g) - 1)
            closest = max(float(A[u, h].mean()) for h in others)
            total += within - closest
    return total / n


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------
class SDPClustering(Estimator):
    """Task grouping by the SDP relaxation (Appendix A.1), scikit-learn style.

    Parameters
    ----------
    m : int or None — number of groups; None chooses it with ``m_selection``.
    lam : float, sequence or None — λ of the trace term. With m given it only shifts the
        reported objective. With m=None and ``m_selection="trace"`` it is the λ grid to sweep
        (absolute, in the units of T); None = automatic grid scaled to the affinity.
    c : float — rounding threshold X̂_uv ≥ c/n.
    m_selection : "density" (the paper's) | "contrast" | "trace".
    max_groups : int or None — largest m considered by ``"density"`` and ``"contrast"``
        (default min(n, 10)).
    solver : None (auto: Clarabel then SCS; SCS first for n > 30), a cvxpy solver name, or a list.
    refine : int — bisection rounds locating the λ breakpoints of the ``"trace"`` sweep.

    Fitted: ``labels_``, ``groups_`` (sorted lists of task indices), ``m_``, ``X_``,
    ``objective_`` (⟨sym T, X̂⟩ + λ Tr X̂), ``status_``, ``solver_``, ``selection_`` (JSON-able
    record of how m was chosen).
    """

    def __init__(self, m: int | None = None, lam=None, c: float = 1.0,
                 m_selection: str = "density", max_groups: int | None = None, solver=None,
                 refine: int = 4):
        self.m = m
        self.lam = lam
        self.c = c
        self.m_selection = m_selection
        self.max_groups = max_groups
        self.solver = solver
        self.refine = refine

    def _lam_grid(self, A_scale: float, n: int) -> list[float]:
        if self.lam is None:
            # In units of max|A|: all singletons are optimal once λ ≥ max A (≤ 1); one group
            # needs λ ≈ −O(n). Log-spaced on both sides of 0 (dense near the small breakpoints).
            neg = -(n * A_scale) * np.geomspace(1e-3, 1.0, 10)[::-1]
            pos = A_scale * np.geomspace(1e-3, 1.0, 7)
            return [float(v) for v in np.concatenate([neg, [0.0], pos])]
        if np.ndim(self.lam) == 0:
            return [float(self.lam)]
        return sorted(float(v) for v in self.lam)

    def _solve_m(self, T: np.ndarray, m: int):
        """Solve with Tr X = m and round to exactly m groups (trivial m = 1, n need no SDP)."""
        n = T.shape[0]
        lam = float(self.lam) if self.lam is not None and np.ndim(self.lam) == 0 else 0.0
        if m in (1, n):
            X = np.full((n, n), 1.0 / n) if m == 1 else np.eye(n)
            sym = (T + T.T) / 2.0
            obj = float(np.sum(sym * X) + lam * np.trace(X))
            return X, obj, "trivial", None, np.zeros(n, np.int64) if m == 1 else np.arange(n)
        X, obj, status, name = solve_sdp(T, lam=0.0, m=m, solver=self.solver)
        obj += lam * m
        labels = round_solution(X, c=self.c, m=m, affinity=T)
        return X, obj, status, name, labels

    def fit(self, T) -> "SDPClustering":
        T = _as_matrix(T)
        n = T.shape[0]
        _check_m(self.m, n)
        if not self.c > 0:
            raise ValueError(f"rounding constant c must be > 0, got {self.c}")
        if self.m_selection not in ("trace", "density", "contrast"):
            raise ValueError(f"m_selection must be 'density', 'contrast' or 'trace', got "
                             f"{self.m_selection!r}")
        A = centered_affinity(T)
        scale = float(np.max(np.abs(A)))
        if scale == 0.0:
            raise ValueError("affinity is degenerate: T_ij − T_ii is zero for all pairs")
        m = self.m
        selection: dict = {"method": "given" if m is not None else self.m_selection}
        if m is None and self.m_selection == "trace":
            sdp = _SDPProblem(T, m=None, solver=self.solver)
            path: dict[float, int] = {}

            def groups_at(lam: float) -> int:
                X, _, _, _ = sdp.solve(lam)
                # the rule as it was measured: the λ-path rounded at c = 0.5 (the final
                # partition is rounded at self.c)
                return int(len(np.unique(round_solution(X, c=TRACE_PATH_C))))

            for lam in self._lam_grid(scale, n):
                path[lam] = groups_at(lam)
            # refine: bisect every grid interval whose end points disagree, so the λ-range of
            # each m (the stability measure) is located to 2^-refine of the grid spacing
            # (only around the two leading candidates: the others cannot change the choice
            # much, and each bisection is an SDP solve)
            for _ in range(int(self.refine)):
                lams = sorted(path)
                lead = _leading(_lam_widths(lams, [path[v] for v in lams]), n, 2)
                mids = [(a + b) / 2.0 for a, b in zip(lams[:-1], lams[1:])
                        if path[a] != path[b] and (path[a] in lead or path[b] in lead)]
                for lam in mids:
                    path[lam] = groups_at(lam)
            lams = sorted(path)
            ms = [path[lam] for lam in lams]
            width = _lam_widths(lams, ms)
            m = _leading(width, n, 1)[0]
            selection.update({"lams": lams, "m_per_lam": ms,
                              "lam_width": {str(k): v for k, v in sorted(width.items())}})
        elif m is None:  # density (the paper's) or contrast
            if self.m_selection == "density":
                D = density_affinity(T)
                score, M = paper_density, D / max(float(np.max(np.abs(D))), 1e-300)
            else:
                score, M = _contrast, A / scale
            top = min(n, self.max_groups or 10)
            scores, fits = {}, {}
            for k in range(1, top + 1):
                fits[k] = self._solve_m(T, k)
                scores[k] = score(M, fits[k][4])
            m = max(scores, key=lambda k: (scores[k], -k))
            selection["scores"] = {str(k): float(v) for k, v in scores.items()}
        if selection["method"] in ("density", "contrast"):
            X, obj, status, name, labels = fits[m]
        else:
            X, obj, status, name, labels = self._solve_m(T, int(m))
        self.m_ = int(m)
        self.X_ = X
        self.objective_ = obj
        self.status_ = status
        self.solver_ = name
        self.labels_ = labels
        self.groups_ = labels_to_groups(labels)
        self.selection_ = selection
        return self



def _lam_widths(lams: Sequence[float], ms: Sequence[int]) -> dict[int, float]:
    """Length of the λ-range over which each number of groups is the (rounded) optimum.

    Each grid point owns the interval between the midpoints to its neighbours (end points: the
    half interval to their one neighbour), so the measure is the linear λ-length of the stable
    range, independent of how densely the grid samples it. A single-point grid gives width 1.
    """
    lams = np.asarray(lams, np.float64)
    if len(lams) == 1:
        return {int(ms[0]): 1.0}
    mid = (lams[1:] + lams[:-1]) / 2.0
    lo = np.concatenate([[lams[0]], mid])
    hi = np.concatenate([mid, [lams[-1]]])
    width: dict[int, float] = {}
    for k, w in zip(ms, hi - lo):
        width[int(k)] = width.get(int(k), 0.0) + float(w)
    return width


def _leading(width: dict[int, float], n: int, top: int) -> list[int]:
    """The ``top`` numbers of groups with the longest λ-range; the trivial 1 and n only when
    nothing else occurs; ties → fewer groups."""
    nontrivial = {k: v for k, v in width.items() if 1 < k < n} or width
    return sorted(nontrivial, key=lambda k: (-nontrivial[k], k))[:top]


class SDPConfig(ClusteringConfig):
    method: Literal["sdp"] = "sdp"
    # how m is chosen when n_groups is auto: the paper's average density (§3.3), or this
    # project's contrast or trace rules (module docstring)
    m_selection: Literal["density", "contrast", "trace"] = "density"
    lam: float | None = None  # λ of the trace term (None: an automatic grid for m = "auto")
    threshold_c: float = Field(1.0, ge=1.0)  # round X̂_uv >= c/n, c >= 1 (Appendix A.1)
    max_groups: int | None = Field(None, ge=1, le=10_000)  # largest m for density, contrast
    solver: str | None = None  # a cvxpy solver name; default Clarabel, then SCS


@register_clustering_method
class SDP(ClusteringMethod):
    name = "sdp"
    config = SDPConfig

    def group(self, T, m, cfg: SDPConfig, seed: int):
        est = SDPClustering(m=m, lam=cfg.lam, c=cfg.threshold_c, m_selection=cfg.m_selection,
                            max_groups=cfg.max_groups, solver=cfg.solver).fit(T)
        return [list(g) for g in est.groups_], {
            "method": "sdp", "status": est.status_, "solver": est.solver_,
            "objective": float(est.objective_), "selection": est.selection_,
            "X": est.X_.tolist()}
