"""The paper's baselines and the benchmark's statistics: the random grouping keeps the SDP's
group sizes and is seeded, the gradient-similarity grouping follows the cosine similarity of
the tasks' mean gradients, MTL-FT's second phase starts from the shared adapter's weights, the
learning-rate schedule, and the paired bootstrap against a by-hand one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble_core.baselines import (gradient_grouping, gradient_similarity, random_grouping,
                                     task_gradient)
from ensemble_core.comparison import majority_rates, paired_bootstrap, summarize_seeds
from ensemble_core.features import FeatureTable

TASKS = ["a", "b", "c", "d", "e", "f", "g"]


def test_random_grouping_keeps_the_sizes_and_is_seeded():
    groups = random_grouping(TASKS, [3, 2, 2], seed=4)
    assert [len(g) for g in groups] == [3, 2, 2]
    assert sorted(t for g in groups for t in g) == TASKS
    assert random_grouping(TASKS, [3, 2, 2], seed=4) == groups
    assert any(random_grouping(TASKS, [3, 2, 2], seed=s) != groups for s in range(5, 10))
    with pytest.raises(ValueError, match="do not add up to 7"):
        random_grouping(TASKS, [3, 3], seed=0)


def _table(task, direction, n=40, seed=0):
    """Binary examples whose loss gradient at x = 0 points along ``direction``: the gold
    choice's feature row is −direction (plus noise), the other's 0 (difference features)."""
    rng = np.random.default_rng(seed)
    d = len(direction)
    grad = np.zeros((2 * n, d), np.float32)
    grad[0::2] = -direction + 0.05 * rng.standard_normal((n, d))
    return FeatureTable(task, "train", np.repeat([f"{task}{i}" for i in range(n)], 2).astype(object),
                        np.tile([0, 1], n).astype(np.int32), np.tile([True, False], n),
                        np.zeros(2 * n, np.float32), grad)


def test_task_gradient_is_the_surrogates_gradient_at_zero():
    from ensemble_core.surrogate import _design, _objective

    t = _table("a", np.array([1.0, 0.0, 0.5]))
    _, g = _objective(np.zeros(3), _design([t]), 0.0)
    np.testing.assert_allclose(task_gradient(t), g, rtol=1e-12)


def test_gradient_grouping_follows_the_cosine_similarity_of_mean_gradients():
    rng = np.random.default_rng(1)
    u, v = np.eye(6)[0], np.eye(6)[3]
    dirs = {"a": u, "b": u + 0.1 * rng.standard_normal(6), "c": 2 * u, "d": v, "e": 3 * v,
            "f": v + 0.1 * rng.standard_normal(6)}
    tables = {t: _table(t, dirs[t], seed=k) for k, t in enumerate(dirs)}
    sim = gradient_similarity(np.stack([task_gradient(tables[t]) for t in tables]))
    assert sim[0, 2] > 0.99 and abs(sim[0, 3]) < 0.1  # scale does not matter, direction does
    groups = sorted(sorted(g) for g in gradient_grouping(tables, 2))
    assert groups == [["a", "b", "c"], ["d", "e", "f"]]


def test_learning_rate_warms_up_then_decays():
    from ensemble_core.config import TrainingConfig
    from ensemble_core.data import Example
    from ensemble_core.training import lr_schedule, total_steps

    exs = [Example(t, "train", str(i), "p", (" a", " b"), 0) for t in "xy" for i in range(10)]
    tcfg = TrainingConfig(batch_size=4, epochs=2, warmup_ratio=0.2)
    assert total_steps(exs, tcfg) == 2 * (3 + 3)  # ceil(10/4) batches per task per epoch
    f = lr_schedule(tcfg, 12)
    assert [round(f(k), 4) for k in range(4)] == [0.5, 1.0, 1.0, 0.9]  # 2 warm-up steps
    assert f(11) == pytest.approx(0.1) and f(12) == 0.0
    cos = lr_schedule(TrainingConfig(schedule="cosine", warmup_ratio=0.0), 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert lr_schedule(TrainingConfig(schedule="constant", warmup_ratio=0.0), 10)(9) == 1.0
    capped = TrainingConfig(batch_size=4, epochs=2, max_steps=5)
    assert total_steps(exs, capped) == 5


def _by_hand(a, b, n_boot, seed):
    """The bootstrap of ensemble_core.comparison written plainly: seeds, then each task's
    examples, drawn with replacement in the same order from the same generator."""
    rng = np.random.default_rng(seed)
    tasks = sorted(a[0])
    stats = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(a), len(a))
        total = 0.0
        for s in drawn:
            per_task = 0.0
            for t in tasks:
                n = len(a[s][t])
                idx = rng.integers(0, n, n)
                per_task += sum(a[s][t][i] - b[s][t][i] for i in idx) / n
            total += per_task / len(tasks)
        stats.append(total / len(drawn))
    return np.percentile(stats, [2.5, 97.5])


def test_paired_bootstrap_equals_a_by_hand_bootstrap():
    a = [{"x": np.array([1, 1, 0, 1, 0, 1.0]), "y": np.array([1, 0, 1, 1.0])},
         {"x": np.array([1, 0, 0, 1, 1, 1.0]), "y": np.array([0, 0, 1, 1.0])},
         {"x": np.array([1, 1, 1, 1, 0, 1.0]), "y": np.array([1, 1, 1, 0.0])}]
    b = [{"x": np.array([0, 1, 0, 1, 0, 0.0]), "y": np.array([1, 0, 0, 1.0])},
         {"x": np.array([1, 0, 1, 0, 1, 0.0]), "y": np.array([0, 1, 1, 0.0])},
         {"x": np.array([0, 1, 1, 0, 0, 1.0]), "y": np.array([1, 0, 1, 0.0])}]
    d, lo, hi = paired_bootstrap(a, b, n_boot=300, seed=7)
    expected_d = np.mean([np.mean([(sa[t] - sb[t]).mean() for t in ("x", "y")])
                          for sa, sb in zip(a, b)])
    assert d == pytest.approx(expected_d)
    np.testing.assert_allclose([lo, hi], _by_hand(a, b, 300, 7), rtol=1e-12)
    assert lo <= d <= hi
    same = paired_bootstrap(a, a, n_boot=50)
    assert same == (0.0, 0.0, 0.0)
    ones = [{"x": np.ones(5)}]
    assert paired_bootstrap(ones, [{"x": np.zeros(5)}], n_boot=20) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="'x' has 5 and 4 test examples"):
        paired_bootstrap(ones, [{"x": np.zeros(4)}])


def test_summaries_over_seeds_and_majority_rates():
    acc = [{"single": {"x": 0.5, "y": 0.7}}, {"single": {"x": 0.7, "y": 0.9}}]
    s = summarize_seeds(acc)["single"]
    assert s["x"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert s["average"][0] == pytest.approx(0.7)
    assert majority_rates({"x": {"gold": [0, 1, 1, 1]}}) == {"x": 0.75}


def test_mtl_ft_second_phase_starts_from_the_shared_weights(data_root, cache_dir, tmp_path):
    """stages.train_group(start=...) loads the shared adapter's weights into the fresh model
    before fine-tuning: with a learning rate of (nearly) zero the result is the shared adapter."""
    from conftest import tiny_config
    from ensemble_core import stages
    from ensemble_core.adapters import load_weights
    from ensemble_core.config import parse_config
    from ensemble_core.models import adapter_vector, load_model
    from ensemble_core.run import Run
    from safetensors.torch import load_file

    raw = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    raw["training"] = {"epochs": 1, "batch_size": 4, "learning_rate": 5e-2}
    run = Run.open(parse_config(raw))
    shared = stages.train_group(run, "all-tasks", run.task_names)
    weights = load_file(str(run.dir.local(run.dir.adapter_weights("all-tasks"))))
    lm = load_model(run.cfg, cache_dir)
    theta0 = adapter_vector(lm.model)
    load_weights(lm.model, run.dir.local(run.dir.at(shared.path)))
    loaded = adapter_vector(lm.model)
    assert not torch.equal(loaded, theta0)
    from ensemble_core.models import trainable_parameters
    saved = torch.cat([weights[n.replace(".default", "")].reshape(-1).float()
                       for n, _ in trainable_parameters(lm.model)])
    assert torch.equal(loaded, saved)  # exactly the shared adapter's saved weights
    raw["training"] = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-12}
    run2 = Run(parse_config(raw))
    second = stages.train_group(run2, "mtl-rte", ["rte"], start=shared)
    lm2 = load_model(run.cfg, cache_dir)
    load_weights(lm2.model, run.dir.local(run.dir.at(second.path)))
    assert torch.allclose(adapter_vector(lm2.model), loaded, atol=1e-9)
    assert not torch.allclose(adapter_vector(lm2.model), theta0)
