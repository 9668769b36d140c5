"""First-order (linearized) surrogate of fine-tuning on a subset of tasks (stage 2;
docs/design.md, "Stage 2").

The paper approximates the fine-tuned model around the base weights θ* by its first-order Taylor
expansion. With the stage-1 features g̃_c(s) = Pᵀ∇(h_c(s) − h_0(s)) (the gradients of the score
differences against the example's first choice) and an adapter change x ∈ R^d,

    logit_c(s; x) = h_c(s) + g̃_c(s) · x                                   (linearization)
    p_c(s; x)     = softmax over the choices c of example s                 (per example)

— the per-choice linearization h_c + (Pᵀ∇h_c)·x less (Pᵀ∇h_0)·x for every choice of s, which the
softmax does not see: the same objective as with per-choice gradients.

and the fine-tuned adapter weights are restored as θ̂ = θ* + P x̂. The surrogate for a subset S
of tasks minimizes the mean log loss over the train examples of S plus a ridge penalty:

    x̂_S = argmin_x  1/N Σ_s [ logsumexp_c logit_c(s; x) − logit_gold(s; x) ] + λ ‖x‖²

(for two choices this is exactly the logistic loss on the margin h_gold − h_other). It is a
strictly convex problem in d (≈ 400) variables, solved with L-BFGS on an analytic gradient:

    ∇ = 1/N Gᵀ (p − y) + 2 λ x,   G = stacked g̃ rows, y = one-hot gold rows.

The evaluation f̂_i(S) (loss and accuracy of x̂_S on task i's validation examples) feeds the
task affinity of eq. (1), see affinity.py.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from .choices import Choices
from .features import FeatureTable

__all__ = ["FirstOrderSurrogate", "norm_bound", "fit_subset"]


# --------------------------------------------------------------------------------------------
# Stacked design: rows of several FeatureTables, examples contiguous.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Design:
    output: np.ndarray  # [R] float64, h_c(s)
    grad: np.ndarray  # [R, d] float64, g̃_c(s)
    choices: Choices  # the rows' ragged layout and gold rows

    @property
    def n_examples(self) -> int:
        return self.choices.n_examples

    @property
    def d(self) -> int:
        return int(self.grad.shape[1])


def _check_table(table: FeatureTable, d: int | None = None) -> None:
    if not isinstance(table, FeatureTable):
        raise TypeError(f"expected a FeatureTable, got {type(table).__name__}")
    if d is not None and table.d != d:
        raise ValueError(f"FeatureTable {table.task}/{table.split} has d={table.d} projected "
                         f"gradient columns, expected d={d}")
    if table.n_examples and not (np.all(np.isfinite(table.output))
                                 and np.all(np.isfinite(table.grad))):
        raise ValueError(f"FeatureTable {table.task}/{table.split} contains NaN or inf in "
                         "output or grad")


def _design(tables: Sequence[FeatureTable], d: int | None = None) -> _Design:
    """Concatenate tables into one design; validates d and finiteness."""
    tables = list(tables)
    if not tables:
        raise ValueError("no FeatureTables given")
    if d is None:
        d = tables[0].d
    for t in tables:
        _check_table(t, d)
    n_rows = [len(t.choice) for t in tables]
    output = np.concatenate([np.asarray(t.output, np.float64) for t in tables])
    grad = np.concatenate([np.asarray(t.grad, np.float64).reshape(len(t.choice), d)
                           for t in tables]) if sum(n_rows) else np.zeros((0, d))
    return _Design(output, grad, Choices.concat([t.choices for t in tables]))


def _objective(x: np.ndarray, des: _Design, l2: float) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of the linearized logits + l2‖x‖², and its analytic gradient."""
    z = des.output + des.grad @ x  # linearization: h + g̃·x
    lse, prob = des.choices.log_softmax_parts(z)
    n = des.n_examples
    ce = float(np.mean(lse - z[des.choices.gold_rows]))
    resid = prob.copy()  # ∂CE_s/∂z_c = p_c − 1[c = gold]
    resid[des.choices.gold_rows] -= 1.0
    g = des.grad.T @ resid / n + 2.0 * l2 * x
    return ce + l2 * float(x @ x), g


# --------------------------------------------------------------------------------------------
# BLAS threads. scipy's L-BFGS-B makes many tiny BLAS calls per iteration (d ≈ 400); with a
# multi-threaded OpenBLAS each call pays thread wake-up/synchronization, which measured ~15x
# slower than one thread on a 2-core machine, and k parallel subset fits oversubscribe the cores.
# The fit therefore runs with the bundled OpenBLAS libraries (numpy's and scipy's) set to one
# thread and restores the previous setting afterwards. Found through /proc/self/maps (Linux);
# elsewhere, or for other BLAS builds, this is a no-op.
# --------------------------------------------------------------------------------------------
_BLAS_CONTROLS: list | None = None


def _blas_controls() -> list:
    global _BLAS_CONTROLS
    if _BLAS_CONTROLS is not None:
        return _BLAS_CONTROLS
    controls = []
    try:
        import ctypes
        import os

        with open("/proc/self/maps") as fh:
            paths = sorted({line.split(None, 5)[-1].strip() for line in fh
                            if "openblas" in os.path.basename(line.strip()).lower()
                            and ".so" in line})
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for stem, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                                 ("openblas", "64_"), ("openblas", "")):
                get = getattr(lib, f"{stem}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{stem}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    controls.append((get, set_))
                    break
    except Exception:  # pragma: no cover - best effort, never fatal
        controls = []
    _BLAS_CONTROLS = controls
    return controls


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_SAVED: list = []


class _single_threaded_blas:
    """One BLAS thread while any fit runs. The thread count is the process's, so concurrent
    fits (the subset batches run as task threads) share one setting: the first to enter sets
    it to 1, the last to leave restores it. (Restoring it when the first fit ends would switch
    a fit still running to several threads, whose reductions (ddot in L-BFGS-B) sum in another
    order: its result would then depend on timing.)"""

    def __enter__(self):
        global _BLAS_USERS
        with _BLAS_LOCK:
            if _BLAS_USERS == 0:
                _BLAS_SAVED.clear()
                for get, set_ in _blas_controls():
                    n = get()
                    if n > 1:
                        set_(1)
                        _BLAS_SAVED.append((set_, n))
            _BLAS_USERS += 1
        return self

    def __exit__(self, *exc):
        global _BLAS_USERS
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                for set_, n in _BLAS_SAVED:
                    set_(n)
                _BLAS_SAVED.clear()
        return False


# --------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------
class FirstOrderSurrogate:
    """Ridge-regularized softmax regression on projected gradients (the first-order surrogate).

    Parameters
    ----------
    l2 : float
        Ridge weight λ in  mean CE + λ‖x‖².
    max_norm : float or None
        If the ridge solution has ‖x̂‖ > max_norm, the norm-ball constrained optimum
        (min CE s.t. ‖x‖ ≤ max_norm) is returned instead. By convex duality it is the ridge solution
        for a larger λ; that λ is found by bisection and stored in ``l2_``.
    max_iter, tol : L-BFGS iteration limit and gradient tolerance (inf-norm of the gradient).

    Fitted attributes: ``coef_`` (x̂, [d]), ``l2_`` (effective λ), ``n_iter_`` (total L-BFGS
    iterations), ``converged_``, ``loss_`` (mean train CE without the penalty), ``objective_``
    (with the penalty), ``n_features_in_`` (d), ``n_train_examples_``.
    """

    def __init__(self, l2: float = 1e-3, max_norm: float | None = None, max_iter: int = 500,
                 tol: float = 1e-8):
        self.l2 = l2
        self.max_norm = max_norm
        self.max_iter = max_iter
        self.tol = tol

    # sklearn-style parameter access (lets callers clone/log the estimator)
    def get_params(self, deep: bool = True) -> dict:
        return {"l2": self.l2, "max_norm": self.max_norm, "max_iter": self.max_iter,
                "tol": self.tol}

    def set_params(self, **params) -> "FirstOrderSurrogate":
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"unknown parameter {k!r} for FirstOrderSurrogate")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"FirstOrderSurrogate({args})"

    # ---- fitting ---------------------------------------------------------------------------
    def _solve(self, des: _Design, l2: float, x0: np.ndarray):
        res = minimize(_objective, x0, args=(des, l2), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(self.max_iter), "gtol": float(self.tol),
                                "ftol": float(self.tol) * 1e-3, "maxcor": 20})
        x = np.asarray(res.x, np.float64)
        f, g = _objective(x, des, l2)
        # L-BFGS-B may stop on "no further decrease possible" once the objective is at machine
        # precision; accept that as converged when the gradient is tiny relative to its scale.
        gnorm = float(np.max(np.abs(g))) if len(g) else 0.0
        converged = bool(res.success) or gnorm <= max(float(self.tol), 1e-6)
        return x, f, int(res.nit), converged

    def fit(self, tables: Sequence[FeatureTable] | FeatureTable) -> "FirstOrderSurrogate":
        if isinstance(tables, FeatureTable):
            tables = [tables]
        if self.l2 < 0 or not math.isfinite(self.l2):
            raise ValueError(f"l2 must be finite and >= 0, got {self.l2}")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None, got {self.max_norm}")
        des = _design(tables)
        if des.n_examples == 0:
            raise ValueError("FeatureTables given to fit contain no examples")
        d = des.d
        with _single_threaded_blas():
            x, f, nit, conv = self._solve(des, float(self.l2), np.zeros(d))
            l2_eff = float(self.l2)
            if self.max_norm is not None and np.linalg.norm(x) > self.max_norm:
                x, f, l2_eff, extra, conv = self._fit_norm_ball(des, x, float(self.max_norm))
                nit += extra
        self.coef_ = x
        self.l2_ = l2_eff
        self.n_iter_ = nit
        self.converged_ = conv
        self.objective_ = float(f)
        self.loss_ = float(f - l2_eff * float(x @ x))
        self.n_features_in_ = d
        self.n_train_examples_ = des.n_examples
        return self

    def _fit_norm_ball(self, des: _Design, x_lo: np.ndarray, radius: float):
        """Bisection on λ so that the ridge solution has ‖x̂(λ)‖ = radius.

        ‖x̂(λ)‖ is non-increasing in λ (strictly convex loss + ridge), and the solution of
        min CE s.t. ‖x‖ ≤ r is x̂(λ*) with the KKT multiplier λ* — so bisection finds it.
        Works in log λ; returns the side with ‖x̂‖ ≤ radius so the constraint always holds.
        """
        lo = float(self.l2)  # ‖x̂(lo)‖ > radius
        hi = max(10.0 * lo, 1e-6)
        x_hi = x_lo
        total_iter = 0
        while True:  # bracket: grow λ until the ball constraint holds
            x_hi, f_hi, it, conv_hi = self._solve(des, hi, x_hi)
            total_iter += it
            if np.linalg.norm(x_hi) <= radius:
                break
            lo, x_lo = hi, x_hi
            hi *= 10.0
            if hi > 1e30:
                raise RuntimeError("could not find a ridge weight meeting max_norm="
                                   f"{radius}; the features may be degenerate")
        for _ in range(100):
            nrm = np.linalg.norm(x_hi)
            if radius - nrm <= 1e-6 * radius:
                break
            mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-3
            if lo == 0 and mid < 1e-300:
                break
            x_mid, f_mid, it, conv_mid = self._solve(des, mid, x_hi)
            total_iter += it
            if np.linalg.norm(x_mid) > radius:
                lo, x_lo = mid, x_mid
            else:
                hi, x_hi, f_hi, conv_hi = mid, x_mid, f_mid, conv_mid
            if lo > 0 and hi / lo - 1.0 < 1e-12:
                break
        return x_hi, f_hi, hi, total_iter, conv_hi

    # ---- prediction ------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("FirstOrderSurrogate is not fitted; call fit() first")

    def _design_for(self, table: FeatureTable) -> _Design:
        self._check_fitted()
        return _design([table], d=self.n_features_in_)

    def decision_function(self, table: FeatureTable) -> np.ndarray:
        """[R] linearized logits h_c(s) + g̃_c(s)·x̂."""
        des = self._design_for(table)
        return des.output + des.grad @ self.coef_

    def predict_proba(self, table: FeatureTable) -> np.ndarray:
        """[R] softmax probability of each row within its own example's choices."""
        des = self._design_for(table)
        if des.n_examples == 0:
            return np.zeros(0)
        return des.choices.softmax(des.output + des.grad @ self.coef_)

    def predict(self, table: FeatureTable) -> np.ndarray:
        """[n_examples] predicted choice index (ties: the lowest choice index)."""
        des = self._design_for(table)
        if des.n_examples == 0:
            return np.zeros(0, np.int64)
        return des.choices.argmax(des.output + des.grad @ self.coef_)

    def score(self, table: FeatureTable) -> dict:
        """Mean cross-entropy and accuracy of the surrogate on a table: f̂_i(S) of stage 2."""
        des = self._design_for(table)
        if des.n_examples == 0:
            raise ValueError(f"FeatureTable {table.task}/{table.split} has no examples to score")
        z = des.output + des.grad @ self.coef_
        return {"loss": des.choices.log_loss(z), "accuracy": float(np.mean(des.choices.correct(z)))}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def norm_bound(max_norm: float | None, max_adapter_distance: float | None,
               projection) -> float | None:
    """The bound on ‖x̂‖ of the surrogate fits: ``max_norm``, and ‖P x̂‖ ≤
    max_adapter_distance·‖θ*‖ (over the adapter's own norm, ``records.ProjectionInfo``); None
    when neither is set."""
    bounds = [b for b in [max_norm] if b is not None]
    if max_adapter_distance is not None and projection.theta_norm:
        bounds.append(projection.norm_for_adapter_distance(max_adapter_distance))
    return min(bounds) if bounds else None


def fit_subset(train_tables: Sequence[FeatureTable], val_tables: Sequence[FeatureTable],
               test_tables: Sequence[FeatureTable] = (), **surrogate_kw) -> dict:
    """Fit the surrogate on the union of ``train_tables`` and evaluate it per validation task.

    Returns a JSON-able dict::

        {"tasks": {task_name: {"loss": float, "accuracy": float, "n_examples": int}},
         "fit": {"norm": ‖x̂‖, "l2": effective λ, "n_iter": int, "converged": bool,
                 "train_loss": mean train CE, "n_train_examples": int, "n_train_rows": int},
         "test": {task_name: {"loss", "accuracy"}}}   # with test_tables

    ``tasks[i]`` is f̂_i(S) of stage 2 (the input of eq. (1)).
    """
    val_tables = list(val_tables)
    names = [t.task for t in val_tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate validation tasks in fit_subset: {names}")
    model = FirstOrderSurrogate(**surrogate_kw).fit(list(train_tables))
    tasks = {}
    for t in val_tables:
        s = model.score(t)
        tasks[t.task] = {"loss": float(s["loss"]), "accuracy": float(s["accuracy"]),
                         "n_examples": int(t.n_examples)}
    out = {"tasks": tasks,
           "fit": {"norm": float(np.linalg.norm(model.coef_)), "l2": float(model.l2_),
                    "n_iter": int(model.n_iter_), "converged": bool(model.converged_),
                   "train_loss": float(model.loss_),
                   "n_train_examples": int(model.n_train_examples_),
                   "n_train_rows": int(sum(t.grad.shape[0] for t in train_tables))}}
    if test_tables:  # the same fit scored on other examples (the paper's Table 3: test)
        out["test"] = {t.task: {k: float(v) for k, v in model.score(t).items()}
                       for t in test_tables}
    return out
