"""Stage 2: first-order surrogate, subset sampling, subset estimation.

Optimality is checked against independent computations: a per-example Python loop of the loss
minimized by scipy with finite-difference gradients, torch autograd + LBFGS, and logistic
regression written on the margin.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from ensemble_core.features import FeatureTable
from ensemble_core.sampling import pair_counts, sample_subsets
from ensemble_core.surrogate import FirstOrderSurrogate, _design, _objective, fit_subset


# ---- synthetic FeatureTables ----------------------------------------------------------------
def make_table(task, n_examples, d, n_choices, seed, x_true=None, split="train", scale=1.0):
    """Examples with 2 or 3 choices (n_choices: int or list to draw from); gold drawn from the
    linearized model with x_true so the problem is well posed (not separable)."""
    rng = np.random.default_rng(seed)
    sizes = (np.full(n_examples, n_choices) if np.isscalar(n_choices)
             else rng.choice(n_choices, size=n_examples))
    rows = int(sizes.sum())
    grad = (scale * rng.standard_normal((rows, d))).astype(np.float32)
    output = (0.5 * rng.standard_normal(rows)).astype(np.float32)
    x_true = rng.standard_normal(d) if x_true is None else x_true
    z = output.astype(np.float64) + grad.astype(np.float64) @ x_true
    choice, is_gold, eid = [], [], []
    start = 0
    for e, s in enumerate(sizes):
        p = np.exp(z[start:start + s] - z[start:start + s].max())
        g = rng.choice(s, p=p / p.sum())
        choice += list(range(s))
        is_gold += [c == g for c in range(s)]
        eid += [f"{task}-{split}-{e}"] * s
        start += s
    return FeatureTable(task, split, np.array(eid, dtype=object), np.array(choice, np.int32),
                        np.array(is_gold), output, grad)


def loop_objective(x, tables, l2):
    """Independent reference: per-example loop, softmax over the example's own choices."""
    losses = []
    for t in tables:
        for e in range(t.n_examples):
            a, b = t.offsets[e], t.offsets[e + 1]
            z = t.output[a:b].astype(np.float64) + t.grad[a:b].astype(np.float64) @ x
            gold = int(np.flatnonzero(t.is_gold[a:b])[0])
            losses.append(logsumexp(z) - z[gold])
    return float(np.mean(losses)) + l2 * float(x @ x)


# ---- objective and optimum ------------------------------------------------------------------
def test_gradient_matches_finite_differences():
    tables = [make_table("a", 30, 6, [2, 3], 0), make_table("b", 20, 6, 3, 1)]
    des = _design(tables)
    rng = np.random.default_rng(5)
    for _ in range(3):
        x = rng.standard_normal(6)
        f, g = _objective(x, des, 0.05)
        assert f == pytest.approx(loop_objective(x, tables, 0.05), rel=1e-10)
        h = 1e-6
        fd = np.array([(_objective(x + h * e, des, 0.05)[0] - _objective(x - h * e, des, 0.05)[0])
                       / (2 * h) for e in np.eye(6)])
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_reaches_optimum_of_independent_loop_objective():
    tables = [make_table("a", 40, 5, [2, 3], 0), make_table("b", 30, 5, [2, 3], 1)]
    l2 = 0.01
    model = FirstOrderSurrogate(l2=l2).fit(tables)
    assert model.converged_ and model.coef_.shape == (5,)
    ref = minimize(loop_objective, np.zeros(5), args=(tables, l2), method="BFGS",
                   options={"gtol": 1e-9})  # finite-difference gradients
    np.testing.assert_allclose(model.coef_, ref.x, atol=2e-5)
    assert model.objective_ == pytest.approx(ref.fun, abs=1e-9)
    assert model.loss_ == pytest.approx(ref.fun - l2 * ref.x @ ref.x, abs=1e-8)


def test_matches_torch_autograd_lbfgs():
    torch = pytest.importorskip("torch")
    tables = [make_table("a", 60, 8, [2, 3], 2), make_table("b", 40, 8, 2, 3)]
    l2 = 1e-3
    model = FirstOrderSurrogate(l2=l2).fit(tables)
    terms = []
    for t in tables:
        out = torch.tensor(t.output, dtype=torch.float64)
        G = torch.tensor(t.grad, dtype=torch.float64)
        for e in range(t.n_examples):
            a, b = int(t.offsets[e]), int(t.offsets[e + 1])
            terms.append((out[a:b], G[a:b], int(np.flatnonzero(t.is_gold[a:b])[0])))
    x = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.stack([-torch.log_softmax(o + g @ x, 0)[c] for o, g, c in terms]).mean() \
            + l2 * (x * x).sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    np.testing.assert_allclose(model.coef_, x.detach().numpy(), atol=1e-5)
    assert model.objective_ == pytest.approx(float(closure().detach()), abs=1e-10)


def test_binary_case_is_logistic_regression_on_the_margin():
    tables = [make_table("a", 80, 6, 2, 4), make_table("b", 50, 6, 2, 5)]
    l2 = 0.02
    model = FirstOrderSurrogate(l2=l2).fit(tables)
    # margin form: m = (h_gold − h_other) + (g_gold − g_other)·x, loss = log(1 + e^{−m})
    h, G = [], []
    for t in tables:
        out, grad = t.output.astype(np.float64), t.grad.astype(np.float64)
        gold = np.flatnonzero(t.is_gold)
        other = gold + np.where(t.choice[gold] == 0, 1, -1)
        h.append(out[gold] - out[other])
        G.append(grad[gold] - grad[other])
    h, G = np.concatenate(h), np.concatenate(G)

    def logistic(x):
        m = h + G @ x
        p = 1.0 / (1.0 + np.exp(m))
        return np.mean(np.logaddexp(0.0, -m)) + l2 * x @ x, -G.T @ p / len(m) + 2 * l2 * x

    ref = minimize(logistic, np.zeros(6), jac=True, method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(model.coef_, ref.x, atol=1e-6)
    assert model.objective_ == pytest.approx(ref.fun, abs=1e-10)


def test_mixed_two_and_three_choices_and_predictions():
    d = 7
    x_true = np.random.default_rng(9).standard_normal(d)
    train = [make_table("a", 120, d, [2, 3], 6, x_true), make_table("b", 80, d, 3, 7, x_true)]
    val = make_table("a", 60, d, [2, 3], 8, x_true, split="val")
    model = FirstOrderSurrogate(l2=1e-3).fit(train)
    ref = minimize(loop_objective, np.zeros(d), args=(train, 1e-3), method="BFGS",
                   options={"gtol": 1e-9})
    np.testing.assert_allclose(model.coef_, ref.x, atol=5e-5)

    z = model.decision_function(val)
    np.testing.assert_allclose(z, val.output + val.grad.astype(np.float64) @ model.coef_,
                               rtol=1e-6)
    p = model.predict_proba(val)
    assert p.shape == (len(val.choice),)
    np.testing.assert_allclose(np.add.reduceat(p, val.offsets[:-1]), 1.0, atol=1e-12)
    pred = model.predict(val)
    assert pred.shape == (val.n_examples,)
    for e in range(val.n_examples):  # predict = argmax of the example's own probabilities
        a, b = val.offsets[e], val.offsets[e + 1]
        assert pred[e] == int(np.argmax(p[a:b])) and pred[e] < b - a
    s = model.score(val)
    assert s["accuracy"] == pytest.approx(np.mean(pred == val.gold_index))
    assert s["loss"] == pytest.approx(-np.mean(np.log(p[val.is_gold])), rel=1e-10)
    assert s["loss"] == pytest.approx(loop_objective(model.coef_, [val], 0.0), rel=1e-10)
    assert s["accuracy"] > 0.6  # x_true is shared: the surrogate learned something


def test_max_norm_is_the_norm_ball_optimum():
    tables = [make_table("a", 60, 5, [2, 3], 10, scale=1.0)]
    free = FirstOrderSurrogate(l2=1e-4).fit(tables)
    radius = 0.3 * np.linalg.norm(free.coef_)
    model = FirstOrderSurrogate(l2=1e-4, max_norm=radius).fit(tables)
    norm = np.linalg.norm(model.coef_)
    assert norm <= radius * (1 + 1e-9) and norm == pytest.approx(radius, rel=1e-4)
    assert model.l2_ > 1e-4
    # independent: constrained minimization of the loop objective (SLSQP, numerical gradients)
    ref = minimize(loop_objective, np.zeros(5), args=(tables, 1e-4), method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda x: radius ** 2 - x @ x}],
                   options={"ftol": 1e-12, "maxiter": 500})
    np.testing.assert_allclose(model.coef_, ref.x, atol=1e-4)
    # KKT: the loss gradient is anti-parallel to x̂ on the sphere
    _, g = _objective(model.coef_, _design(tables), 0.0)
    cos = g @ model.coef_ / (np.linalg.norm(g) * norm)
    assert cos == pytest.approx(-1.0, abs=1e-5)
    # an inactive bound changes nothing
    loose = FirstOrderSurrogate(l2=1e-4, max_norm=10 * np.linalg.norm(free.coef_)).fit(tables)
    assert loose.l2_ == 1e-4
    np.testing.assert_allclose(loose.coef_, free.coef_)


def test_max_norm_without_ridge():
    tables = [make_table("a", 40, 4, 2, 11)]
    model = FirstOrderSurrogate(l2=0.0, max_norm=0.1).fit(tables)
    assert np.linalg.norm(model.coef_) <= 0.1 * (1 + 1e-9)
    assert np.linalg.norm(model.coef_) == pytest.approx(0.1, rel=1e-4)


def test_errors():
    t = make_table("a", 10, 4, 2, 0)
    with pytest.raises(ValueError, match="no FeatureTables"):
        FirstOrderSurrogate().fit([])
    with pytest.raises(ValueError, match="no examples"):
        FirstOrderSurrogate().fit([t.select_examples(np.array([], np.int64))])
    with pytest.raises(ValueError, match="d=3"):
        FirstOrderSurrogate().fit([t, make_table("b", 10, 3, 2, 1)])
    model = FirstOrderSurrogate().fit([t])
    with pytest.raises(ValueError, match="d=4"):
        model.predict(make_table("b", 10, 3, 2, 1))
    with pytest.raises(RuntimeError, match="not fitted"):
        FirstOrderSurrogate().predict(t)
    bad = FeatureTable("c", "train", t.example_id, t.choice, t.is_gold,
                       np.where(np.arange(len(t.choice)) == 3, np.nan, t.output), t.grad)
    with pytest.raises(ValueError, match="NaN"):
        FirstOrderSurrogate().fit([bad])


def test_relative_distance_as_the_paper_defines_it():
    """ProjectionInfo: ‖P x‖ ≈ sqrt(p/d)·‖x‖ (E‖P x‖² = (p/d)‖x‖² for N(0, 1/d) entries), over
    the whole pretrained model's norm (the paper's relative distance, §2.2) and over the
    adapter's own norm (the surrogate bound's unit), against an explicit P."""
    from ensemble_core.records import ProjectionInfo

    rng = np.random.default_rng(0)
    p, d = 20000, 40
    P = rng.standard_normal((p, d)) / np.sqrt(d)  # entries N(0, 1/d)
    x = rng.standard_normal(d)
    info = ProjectionInfo(p, d, 0, 1024, theta_norm=50.0, full_norm=2000.0)
    norm = float(np.linalg.norm(x))
    assert info.moved(norm) == pytest.approx(np.linalg.norm(P @ x), rel=0.05)
    assert info.relative_distance(norm) == pytest.approx(math.sqrt(p / d) * norm / 2000.0)
    assert info.adapter_distance(norm) == pytest.approx(math.sqrt(p / d) * norm / 50.0)
    assert info.norm_for_adapter_distance(info.adapter_distance(norm)) == pytest.approx(norm)
    assert ProjectionInfo(p, d, 0, 1024, 50.0).relative_distance(norm) == 0.0  # unknown


def test_fit_subset_is_json_able():
    d = 6
    train = [make_table(n, 30, d, [2, 3], s) for n, s in (("a", 0), ("b", 1))]
    val = [make_table(n, 15, d, [2, 3], s + 10, split="val") for n, s in (("a", 0), ("b", 1))]
    out = fit_subset(train, val, l2=1e-2)
    assert set(out["tasks"]) == {"a", "b"}
    for r in out["tasks"].values():
        assert set(r) >= {"loss", "accuracy"} and 0 <= r["accuracy"] <= 1
    assert out["fit"]["converged"] is True and out["fit"]["n_iter"] > 0
    assert json.loads(json.dumps(out)) == out
    model = FirstOrderSurrogate(l2=1e-2).fit(train)
    assert out["tasks"]["b"]["loss"] == pytest.approx(model.score(val[1])["loss"])
    assert out["fit"]["norm"] == pytest.approx(np.linalg.norm(model.coef_))


# ---- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,size,cover", [(10, 30, 3, 1), (10, 60, 3, 2), (12, 80, 4, 2),
                                            (6, 15, 2, 1), (25, 150, 3, 1),
                                            # the demo's settings with a seventh task: the
                                            # greedy growth ends on taken subsets only, the
                                            # best unused one is searched instead
                                            (7, 20, 3, 2)])
def test_sample_subsets_cover_pairs(n, k, size, cover):
    subsets = sample_subsets(n, k, size, min_pair_coverage=cover, seed=3)
    assert len(subsets) == k and len(set(subsets)) == k
    assert all(len(s) == size and list(s) == sorted(set(s)) for s in subsets)
    assert all(0 <= i < n for s in subsets for i in s)
    counts = pair_counts(subsets, n)
    assert counts[np.triu_indices(n, 1)].min() >= cover
    assert np.array_equal(counts, counts.T) and counts.trace() == k * size


@pytest.mark.integration  # a subprocess
def test_sample_subsets_deterministic_across_processes():
    a = sample_subsets(10, 40, 3, seed=7)
    assert a == sample_subsets(10, 40, 3, seed=7)
    assert a != sample_subsets(10, 40, 3, seed=8)
    code = ("from ensemble_core.sampling import sample_subsets;"
            "print(sample_subsets(10, 40, 3, seed=7))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=_repo_root())
    assert out.stdout.strip() == str(a)


def test_sample_all_subsets_when_k_is_the_total():
    subsets = sample_subsets(6, math.comb(6, 3), 3, seed=0)
    assert sorted(subsets) == sorted(__import__("itertools").combinations(range(6), 3))


@pytest.mark.parametrize("args,msg", [
    ((5, 3, 6, 1), "exceeds the number of tasks 5"),
    ((5, 3, 1, 1), "size must be >= 2"),
    ((5, 11, 3, 1), "C\\(5,3\\)=10"),
    ((10, 14, 3, 1), "cover at most 42 task pairs"),
    ((10, 120, 3, 9), "min_pair_coverage=9 over C\\(10,2\\) pairs needs 405"),
    ((9, 12, 3, 1), "greedy pair covering"),  # a Steiner system exists; greedy misses it
])
def test_impossible_sampling_raises(args, msg):
    with pytest.raises(ValueError, match=msg):
        sample_subsets(*args, seed=0)


def _repo_root():
    import pathlib
    return str(pathlib.Path(__file__).resolve().parents[1])


def test_blas_stays_single_threaded_until_the_last_concurrent_fit_ends():
    """Concurrent fits (subset batches run as threads) share the process's BLAS thread count:
    it must stay 1 until the last of them ends, or a fit still running would switch to several
    threads mid-way and its reductions would depend on timing."""
    import threading

    from ensemble_core.surrogate import _blas_controls, _single_threaded_blas

    controls = _blas_controls()
    if not controls:
        pytest.skip("no OpenBLAS thread control found in this process")
    get, set_ = controls[0]
    before = get()
    set_(2)
    try:
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with _single_threaded_blas():
                a_in.set()
                b_in.wait(10)
            a_out.set()

        def second():
            a_in.wait(10)
            with _single_threaded_blas():
                b_in.set()
                a_out.wait(10)  # the first fit has ended; this one still runs
                seen["during"] = get()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen["during"] == 1
        assert get() == 2  # restored when the last one ended
    finally:
        set_(before)


def _as_differences(t: FeatureTable) -> FeatureTable:
    """The same data with each example's gradients replaced by g_c − g_0 (stage 1's v2)."""
    first = np.repeat(t.offsets[:-1], t.n_choices)
    g = t.grad.astype(np.float64)
    return FeatureTable(t.task, t.split, t.example_id, t.choice, t.is_gold, t.output,
                        g - g[first])


@pytest.mark.parametrize("max_norm", [None, 0.3])
def test_surrogate_on_difference_features_finds_the_same_solution(max_norm):
    """A softmax over an example's choices does not see a vector added to all its g̃_c, so
    the surrogate fitted on per-choice features and on the differences to the first choice
    is the same problem: the same x̂ (relative difference ≤ 1e-8), with and without the norm
    bound."""
    d = 12
    x_true = np.random.default_rng(9).standard_normal(d)
    tables = [make_table("a", 60, d, [2, 3, 4], 1, x_true), make_table("b", 40, d, 2, 2, x_true)]
    per_choice = FirstOrderSurrogate(l2=1e-3, max_norm=max_norm, tol=1e-12).fit(tables)
    diffs = FirstOrderSurrogate(l2=1e-3, max_norm=max_norm, tol=1e-12).fit(
        [_as_differences(t) for t in tables])
    rel = np.linalg.norm(diffs.coef_ - per_choice.coef_) / np.linalg.norm(per_choice.coef_)
    assert rel <= 1e-8, rel
    assert diffs.loss_ == pytest.approx(per_choice.loss_, rel=1e-10)
