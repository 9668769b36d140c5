"""Stage 3: task affinity (eq. 1) and SDP clustering (Appendix A.1)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ensemble_core.affinity import Affinity, task_affinity
from ensemble_core.clustering import (SDPClustering, SDPSolveError, SpectralClustering,
                                      groups_to_json, labels_to_groups, round_solution,
                                      solve_sdp, spectral_cluster)
from ensemble_core.sampling import sample_subsets

NAMES3 = ["boolq", "cb", "rte"]


# ---- affinity (eq. 1) -----------------------------------------------------------------------
def _hand_results():
    r = lambda loss, acc: {"loss": loss, "accuracy": acc}  # noqa: E731
    return [
        ((0, 1), {0: r(1.0, 0.5), 1: r(2.0, 0.4)}),
        ((0, 1, 2), {0: r(3.0, 0.7), 1: r(4.0, 0.6), 2: r(5.0, 0.9)}),
        ((1, 2), {1: r(6.0, 0.2), 2: r(7.0, 0.3)}),
        ((0, 2), {"boolq": r(8.0, 0.1), "rte": r(9.0, 0.8)}),  # keyed by name (stage 2)
    ]


def test_eq1_on_hand_built_example():
    aff = task_affinity(_hand_results(), NAMES3, metric="loss")
    # T_ij = −mean loss of task i over the subsets containing i and j; T_ii over subsets ∋ i
    expected = -np.array([
        [(1 + 3 + 8) / 3, (1 + 3) / 2, (3 + 8) / 2],
        [(2 + 4) / 2, (2 + 4 + 6) / 3, (4 + 6) / 2],
        [(5 + 9) / 2, (5 + 7) / 2, (5 + 7 + 9) / 3],
    ])
    np.testing.assert_allclose(aff.matrix, expected)
    np.testing.assert_array_equal(aff.counts, [[3, 2, 2], [2, 3, 2], [2, 2, 3]])
    assert aff.names == NAMES3 and aff.metric == "loss"
    acc = task_affinity(_hand_results(), NAMES3, metric="accuracy")
    assert acc.matrix[0, 1] == pytest.approx((0.5 + 0.7) / 2)
    assert acc.matrix[2, 2] == pytest.approx((0.9 + 0.3 + 0.8) / 3)


def test_orientation_larger_means_helps():
    # task 0 has a lower loss / higher accuracy with task 1 than with task 2
    r = lambda loss, acc: {"loss": loss, "accuracy": acc}  # noqa: E731
    res = [((0, 1), {0: r(0.2, 0.9), 1: r(0.5, 0.5)}),
           ((0, 2), {0: r(0.9, 0.4), 2: r(0.5, 0.5)}),
           ((1, 2), {1: r(0.5, 0.5), 2: r(0.6, 0.5)})]
    for metric in ("loss", "accuracy"):
        T = task_affinity(res, NAMES3, metric=metric).matrix
        assert T[0, 1] > T[0, 2], metric


def test_affinity_records_and_json_round_trip():
    records = [{"subset": list(s), "per_task": p} for s, p in _hand_results()]
    aff = task_affinity(records, NAMES3)
    back = Affinity.from_json(aff.to_json())
    np.testing.assert_array_equal(back.matrix, aff.matrix)
    np.testing.assert_array_equal(back.counts, aff.counts)
    assert back.names == aff.names and back.metric == aff.metric
    assert "negative validation loss" in json.loads(aff.to_json())["orientation"]


def test_affinity_errors():
    res = _hand_results()
    with pytest.raises(ValueError, match="'cb' and 'rte'"):  # pair (1,2) never together
        task_affinity([res[0], res[3]], NAMES3)
    bad = [((0, 1), {0: {"loss": np.nan, "accuracy": 1.0}, 1: {"loss": 1.0, "accuracy": 1.0}})]
    with pytest.raises(ValueError, match=r"'boolq'.*\(0, 1\)"):
        task_affinity(bad + res, NAMES3)
    inf = [((1, 2), {1: {"loss": 1.0, "accuracy": 1.0}, 2: {"loss": np.inf, "accuracy": 1.0}})]
    with pytest.raises(ValueError, match=r"'rte'.*\(1, 2\)"):
        task_affinity(inf + res, NAMES3)
    const = [((s), {i: {"loss": 0.7, "accuracy": 0.5} for i in s}) for s, _ in res]
    with pytest.raises(ValueError, match="constant"):
        task_affinity(const, NAMES3)
    rows = [((s), {i: {"loss": 0.1 * (i + 1), "accuracy": 0.5} for i in s}) for s, _ in res]
    with pytest.raises(ValueError, match="constant within every row"):
        task_affinity(rows, NAMES3)
    with pytest.raises(ValueError, match="no result for task 'rte'"):
        task_affinity([((0, 2), {0: {"loss": 1.0, "accuracy": 1.0}})], NAMES3)
    with pytest.raises(ValueError, match="metric"):
        task_affinity(res, NAMES3, metric="f1")


# ---- planted groups -------------------------------------------------------------------------
def planted_from_subsets(sizes=(4, 4, 4), noise=0.1, seed=0, k=60):
    """Simulate the whole step: subset results where same-group partners lower the loss."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    labels = np.repeat(np.arange(len(sizes)), sizes)[rng.permutation(n)]
    base = rng.uniform(0.3, 1.0, n)
    results = []
    for s in sample_subsets(n, k, 3, seed=seed):
        per = {}
        for i in s:
            same = sum(labels[j] == labels[i] for j in s if j != i)
            loss = base[i] - 0.2 * same + 0.2 * (len(s) - 1 - same) + noise * rng.standard_normal()
            per[i] = {"loss": loss, "accuracy": 0.5}
        results.append((s, per))
    return task_affinity(results, [f"task{i}" for i in range(n)]), labels


def planted_matrix(n_groups=3, size=4, noise=0.15, seed=0):
    """High within, low between, plus noise (diagonal like the within-group entries)."""
    rng = np.random.default_rng(seed)
    n = n_groups * size
    labels = np.repeat(np.arange(n_groups), size)[rng.permutation(n)]
    T = np.where(labels[:, None] == labels[None, :], 1.0, 0.0) + noise * rng.standard_normal((n, n))
    return T, labels


PLANTED = [("subsets", 0), ("subsets", 1), ("matrix", 0), ("matrix", 1)]


def _planted(kind, seed):
    return planted_from_subsets(seed=seed) if kind == "subsets" else planted_matrix(seed=seed)


def _partition_ok(groups, n):
    flat = [i for g in groups for i in g]
    return sorted(flat) == list(range(n)) and all(g == sorted(g) for g in groups)


@pytest.mark.parametrize("kind,seed", PLANTED)
def test_sdp_recovers_planted_groups_with_m_given(kind, seed):
    T, labels = _planted(kind, seed)
    est = SDPClustering(m=3).fit(T)
    assert est.groups_ == labels_to_groups(labels)
    assert _partition_ok(est.groups_, 12) and est.m_ == 3
    X = est.X_  # feasible for the SDP
    np.testing.assert_allclose(X.sum(axis=1), 1.0, atol=1e-5)
    assert X.min() > -1e-6 and np.linalg.eigvalsh(X).min() > -1e-6
    assert np.trace(X) == pytest.approx(3.0, abs=1e-5)
    assert est.status_ in ("optimal", "optimal_inaccurate")


@pytest.mark.parametrize("selection", ["density", "contrast", "trace"])
@pytest.mark.parametrize("kind,seed", PLANTED)
def test_sdp_recovers_planted_groups_with_m_automatic(kind, seed, selection):
    T, labels = _planted(kind, seed)
    est = SDPClustering(m_selection=selection).fit(T)
    assert est.m_ == 3 and est.groups_ == labels_to_groups(labels)
    assert _partition_ok(est.groups_, 12)
    json.dumps(est.selection_)


def test_unequal_planted_groups_and_scs():
    T, labels = planted_from_subsets(sizes=(5, 4, 3), seed=2)
    assert SDPClustering().fit(T).groups_ == labels_to_groups(labels)
    assert SDPClustering(m=3, solver="SCS").fit(T).groups_ == labels_to_groups(labels)


def test_sdp_is_deterministic_and_row_shift_invariant():
    T, _ = planted_matrix(seed=3)
    a = SDPClustering(m=3).fit(T)
    b = SDPClustering(m=3).fit(T.copy())
    assert a.groups_ == b.groups_ and np.array_equal(a.labels_, b.labels_)
    shifted = T + np.random.default_rng(0).normal(size=(12, 1)) * 5  # constant per row
    assert SDPClustering(m=3).fit(shifted).groups_ == a.groups_
    assert SDPClustering().fit(shifted).groups_ == SDPClustering().fit(T).groups_


@pytest.mark.parametrize("m", [1, 2, 4, 5, 12])
def test_exactly_m_groups(m):
    T, _ = planted_matrix(seed=4)
    est = SDPClustering(m=m).fit(T)
    assert len(est.groups_) == m and est.m_ == m and _partition_ok(est.groups_, 12)
    assert list(est.labels_) == [k for i in range(12) for k, g in enumerate(est.groups_) if i in g]


def test_rounding_threshold_and_resolution():
    # exact block solution: {0,1} (1/2 each) and {2,3,4} (1/3 each)
    X = np.zeros((5, 5))
    X[:2, :2] = 1 / 2
    X[2:, 2:] = 1 / 3
    assert labels_to_groups(round_solution(X)) == [[0, 1], [2, 3, 4]]
    assert labels_to_groups(round_solution(X, m=3)) != [[0, 1], [2, 3, 4]]
    assert len(labels_to_groups(round_solution(X, m=1))) == 1
    # a non-transitive threshold graph still yields a partition
    Y = np.eye(4) * 0.5
    Y[0, 1] = Y[1, 0] = Y[1, 2] = Y[2, 1] = 0.5
    groups = labels_to_groups(round_solution(Y))
    assert _partition_ok(groups, 4)


def test_objective_matches_formula():
    T, _ = planted_matrix(seed=5)
    X, obj, status, solver = solve_sdp(T, lam=0.3)
    assert obj == pytest.approx(np.sum((T + T.T) / 2 * X) + 0.3 * np.trace(X), rel=1e-9)
    assert solver == "CLARABEL" and status == "optimal"


@pytest.mark.parametrize("kind,seed", PLANTED)
def test_spectral_baseline_recovers_planted_groups(kind, seed):
    T, labels = _planted(kind, seed)
    est = SpectralClustering(m=3, seed=0).fit(T)
    assert est.groups_ == labels_to_groups(labels)
    assert np.array_equal(spectral_cluster(T, 3, seed=0), spectral_cluster(T, 3, seed=0))


def test_clustering_errors():
    T, _ = planted_matrix()
    with pytest.raises(ValueError, match="m=13 exceeds"):
        SDPClustering(m=13).fit(T)
    with pytest.raises(ValueError, match="m=13 exceeds"):
        spectral_cluster(T, 13)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        SDPClustering().fit(np.ones((1, 1)))
    with pytest.raises(ValueError, match="at least 2 tasks"):
        SpectralClustering(m=1).fit(np.ones((1, 1)))
    bad = T.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[2, 5\]"):
        SDPClustering(m=3).fit(bad)
    with pytest.raises(ValueError, match="square"):
        SDPClustering().fit(np.ones((3, 4)))
    with pytest.raises(ValueError, match="m_selection"):
        SDPClustering(m_selection="gap").fit(T)
    with pytest.raises(SDPSolveError, match="n=12 tasks.*NO_SUCH_SOLVER"):
        SDPClustering(m=3, solver="NO_SUCH_SOLVER").fit(T)


def test_accepts_affinity_object_and_groups_json():
    aff, labels = planted_from_subsets(seed=0)
    est = SDPClustering(m=3).fit(aff)
    out = groups_to_json(est.groups_, aff.names)
    assert out["n_groups"] == 3 and out["n_tasks"] == 12
    assert sorted(n for g in out["groups"] for n in g["tasks"]) == sorted(aff.names)
    assert [g["indices"] for g in out["groups"]] == est.groups_
    assert json.loads(json.dumps(out)) == out
    with pytest.raises(ValueError, match="exactly one group"):
        groups_to_json([[0, 1], [1, 2]], ["a", "b", "c"])


def test_incremental_grouping_joins_the_group_of_highest_affinity():
    """Issue 14, item 2, on a constructed affinity: tasks 0-1 and 2-3 help each other; a new
    task 4 that helps 2 and 3 joins their group, the other group is untouched, and the
    partition objective is the SDP's <A, X> at the partition's X."""
    from ensemble_core.clustering import centered_affinity, join_by_affinity, partition_objective

    T = np.full((5, 5), 0.1)
    np.fill_diagonal(T, 0.0)
    T[0, 1] = T[1, 0] = 1.0
    T[2, 3] = T[3, 2] = 1.0
    T[4, 2] = T[2, 4] = T[4, 3] = T[3, 4] = 0.8
    assert join_by_affinity(T, [[0, 1], [2, 3]], [4]) == [[0, 1], [2, 3, 4]]
    A = centered_affinity(T)
    X = np.zeros((5, 5))
    for g in ([0, 1], [2, 3, 4]):
        X[np.ix_(g, g)] = 1.0 / len(g)
    assert partition_objective(T, [[0, 1], [2, 3, 4]]) == pytest.approx(float((A * X).sum()))
    assert partition_objective(T, [[0, 1], [2, 3, 4]]) > partition_objective(T, [[0, 1, 4],
                                                                                [2, 3]])


def test_the_papers_density_rule_against_its_formula():
    """Issue 33, item 4: m by the paper's average density (§3.3), (1/m) Σ_j v_jᵀ D v_j / v_jᵀ v_j
    over the groups' indicator vectors, computed here with explicit vectors on a constructed
    affinity; SDPClustering(m_selection="density") takes the m where it is largest."""
    from ensemble_core.clustering import density_affinity, paper_density

    T, labels = planted_matrix(seed=5)
    D = density_affinity(T)
    n = T.shape[0]
    off = (T.sum(1) - np.diag(T)) / (n - 1)  # D by hand: rows less their off-diagonal mean
    by_hand = (T - off[:, None] + (T - off[:, None]).T) / 2
    np.fill_diagonal(by_hand, 0.0)
    np.testing.assert_allclose(D, by_hand)
    for part in (labels, np.zeros(n, int), np.arange(n), labels % 2):
        vs = [(part == g).astype(float) for g in np.unique(part)]
        formula = np.mean([v @ D @ v / (v @ v) for v in vs])
        assert paper_density(D, part) == pytest.approx(formula)
    est = SDPClustering(m_selection="density").fit(T)
    scores = {int(k): v for k, v in est.selection_["scores"].items()}
    assert est.m_ == max(scores, key=lambda k: (scores[k], -k)) == 3
    assert est.groups_ == labels_to_groups(labels)


@pytest.mark.parametrize("c", [1.0, 1.5, 3.0])
def test_rounding_with_c_at_least_one_puts_every_task_in_one_group(c):
    """Issue 33, item 4: Appendix A.1 rounds X̂_uv ≥ c/n with c ≥ 1; on noisy and on exact
    solutions every task ends in exactly one group, and with m given in exactly m."""
    rng = np.random.default_rng(int(10 * c))
    T, labels = planted_matrix(seed=7)
    X = SDPClustering(m=3).fit(T).X_
    for noisy in (X, np.clip(X + 0.02 * rng.standard_normal(X.shape), 0, None)):
        for m in (None, 2, 3, 4):
            lab = round_solution(noisy, c=c, m=m, affinity=T)
            assert _partition_ok(labels_to_groups(lab), 12)
            assert m is None or len(np.unique(lab)) == m
    from ensemble_core.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match="'clustering.threshold_c'"):
        parse_config({"tasks": [{"name": "rte", "builtin": "superglue/rte"}],
                      "clustering": {"threshold_c": 0.5}})


def test_uncovered_pairs_are_neutral_when_asked():
    """estimation.min_pair_coverage 0 (the paper's federated scale): a pair no subset holds
    gets T_ij = T_ii (no evidence either way); by default it is an error naming the pair."""
    from ensemble_core.affinity import task_affinity

    results = [((0, 1), {0: {"loss": 1.0}, 1: {"loss": 2.0}}),
               ((1, 2), {1: {"loss": 4.0}, 2: {"loss": 3.0}})]
    with pytest.raises(ValueError, match="'a' and 'c'"):
        task_affinity(results, ["a", "b", "c"])
    aff = task_affinity(results, ["a", "b", "c"], uncovered="neutral")
    # by hand: T = −loss averaged over the subsets holding both; a–c never together
    assert aff.matrix.tolist() == [[-1.0, -1.0, -1.0], [-2.0, -3.0, -4.0], [-3.0, -3.0, -3.0]]
    assert aff.counts[0, 2] == aff.counts[2, 0] == 0
    with pytest.raises(ValueError, match="in no sampled subset"):
        task_affinity(results, ["a", "b", "c", "d"], uncovered="neutral")
