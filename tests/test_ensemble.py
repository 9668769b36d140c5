"""Ensemble weights (Algorithm 2, last step) and the saved ensemble as a predictor."""
import json

import numpy as np
import pytest
import torch

from ensemble_core.config import parse_config
from ensemble_core.data import DataError, load_task, read_records
from ensemble_core.boosting import group_scores
from ensemble_core.ensemble import (EnsembleError, EnsembleModel, ensemble_log_loss,
                                    fit_ensemble_weights, probabilities, task_entry,
                                    write_ensemble_json)
from ensemble_core.models import load_model, set_adapter_vector
from ensemble_core.records import GroupEnsemble, Member
from ensemble_core.scoring import ChoiceScorer, choice_outputs

from conftest import tiny_config
from ensemble_utils import MAX_LEN, train_tiny_adapters



# ---------------------------------------------------------------------------- weight fitting

def _informative_vs_noise(n=300, c=3, seed=0):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, c, n).tolist()
    noise = [rng.dirichlet(np.ones(c)) for _ in range(n)]
    informative = []
    for g in gold:
        p = np.full(c, 0.15 / (c - 1))
        p[g] = 0.85
        informative.append(p)
    return [noise, informative], gold


@pytest.mark.parametrize("method", ["slsqp", "eg"])
def test_weights_favour_the_informative_member(method):
    members, gold = _informative_vs_noise()
    w = fit_ensemble_weights(members, gold, start=0, method=method)
    assert w.shape == (2,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[1] > 0.95, w
    assert ensemble_log_loss(members, gold, w) <= ensemble_log_loss(members, gold, [0, 1]) + 1e-9
    # started from the right member, it stays there
    w1 = fit_ensemble_weights(members, gold, start=1, method=method)
    assert w1[1] > 0.95


@pytest.mark.parametrize("method", ["slsqp", "eg"])
def test_weights_reach_the_optimum_of_a_mixture(method):
    # each member is right on its own half of the examples: the best mixture is interior
    rng = np.random.default_rng(1)
    n, gold = 200, rng.integers(0, 2, 200).tolist()
    a, b = [], []
    for i, g in enumerate(gold):
        good, bad = np.eye(2)[g] * 0.9 + 0.05, np.eye(2)[1 - g] * 0.9 + 0.05
        (a if i < n // 2 else b).append(good)
        (b if i < n // 2 else a).append(bad)
    noise = [rng.dirichlet([1, 1]) for _ in range(n)]
    members = [a, b, noise]
    w = fit_ensemble_weights(members, gold, start=2, method=method)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    A = np.array([[m[i][g] for m in members] for i, g in enumerate(gold)])  # p_k(gold_i)
    x, y = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201))
    grid = np.stack([x.ravel(), y.ravel(), 1 - x.ravel() - y.ravel()], 1)
    grid = grid[grid[:, 2] >= -1e-12].clip(0, None)
    best = float((-np.log(A @ grid.T).mean(0)).min())
    assert ensemble_log_loss(members, gold, w) <= best + 1e-4
    assert w[0] == pytest.approx(0.5, abs=0.05) and w[1] == pytest.approx(0.5, abs=0.05)


def test_weights_edge_cases():
    members, gold = _informative_vs_noise(n=20)
    assert fit_ensemble_weights(members[:1], gold, start=0).tolist() == [1.0]
    assert fit_ensemble_weights(members, [], start=1).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="start"):
        fit_ensemble_weights(members, gold, start=2)
    with pytest.raises(ValueError, match="member 1 has probabilities for 19"):
        fit_ensemble_weights([members[0], members[1][:19]], gold, start=0)


def test_boosting_adds_in_score_space():
    # a group adapter, one boosting adapter (+1) and θ* (−1): h = h_g + (h_k − h0)
    scores = {"g": {"t": {"train": [[1.0, -1.0], [0.5, 0.0, 2.0]]}},
              "g-boost-1": {"t": {"train": [[2.0, 0.0], [1.0, 1.0, -1.0]]}},
              "theta-star": {"t": {"train": [[0.5, 0.5], [0.0, 2.0, 0.0]]}}}
    group = GroupEnsemble("g", ["t"], [Member("g", 1.0), Member("g-boost-1", 1.0),
                                       Member("theta-star", -1.0)])
    out = group_scores(scores, group, "t", "train")
    np.testing.assert_allclose(out[0], [2.5, -1.5])
    np.testing.assert_allclose(out[1], [1.5, -1.0, 1.0])
    p = probabilities([[0.0, np.log(3.0)], [0.0, 0.0, np.log(2.0)]])
    np.testing.assert_allclose(p[0], [0.25, 0.75])
    np.testing.assert_allclose(p[1], [0.25, 0.25, 0.5])


# ---------------------------------------------------------------------------- EnsembleModel

@pytest.fixture(scope="module")
def run(data_root, cache_dir, tmp_path_factory):
    """Three tiny adapters (two groups, one boosting member) saved in a run directory."""
    run_dir = tmp_path_factory.mktemp("ensemble-run")
    cfg = parse_config(tiny_config(data_root, run_dir, cache_dir=str(cache_dir)))
    lm = load_model(cfg, cache_dir)
    data = {t: load_task(cfg.task(t), data_root) for t in ("rte", "cb", "copa")}
    thetas = train_tiny_adapters(run_dir, cfg, lm, data, {
        "group-0": (("rte", "cb"), 0), "group-1": (("copa",), 1),
        "group-0-boost-1": (("rte", "cb"), 2)})
    groups = [
        {"name": "group-0", "tasks": ["rte", "cb"],
         "members": [{"adapter": "adapters/group-0", "scale": 1.0},
                     {"adapter": "adapters/group-0-boost-1", "scale": 0.1}]},
        {"name": "group-1", "tasks": ["copa"], "members": [{"adapter": "adapters/group-1",
                                                            "scale": 1.0}]},
    ]
    weights = {"rte": (0, [0.7, 0.3]), "cb": (0, [1.0, 0.0]), "copa": (1, [0.25, 0.75])}
    tasks = {t: task_entry(cfg.task(t), g, w) for t, (g, w) in weights.items()}
    write_ensemble_json(run_dir / "ensemble.json", base_model=cfg.model, tasks=tasks,
                        groups=groups, max_length=MAX_LEN, choice_mode="auto", eta=0.1,
                        base_fingerprint=lm.fingerprint["base"])
    em = EnsembleModel.from_pretrained(run_dir, cache_dir)
    return dict(cfg=cfg, lm=lm, data=data, thetas=thetas, weights=weights, run_dir=run_dir,
                em=em)


def _by_hand(run, task, examples):
    """Each adapter's choice_outputs on the in-memory model, combined by hand."""
    lm, thetas = run["lm"], run["thetas"]
    scorer = ChoiceScorer(lm.tokenizer, MAX_LEN)
    batch = scorer.encode(examples, mode=scorer.mode_for(examples))
    offs = np.concatenate([[0], np.cumsum(batch.n_choices)])
    scores = {}
    for name, theta in thetas.items():
        set_adapter_vector(lm.model, theta)
        with torch.no_grad():
            s = choice_outputs(lm.model, batch).double().numpy()
        scores[name] = [s[offs[i]:offs[i + 1]] for i in range(len(examples))]
    w = run["weights"][task][1]
    out = []
    for i in range(len(examples)):
        h0 = scores["group-0"][i] + 0.1 * scores["group-0-boost-1"][i]
        h1 = scores["group-1"][i]
        p0 = np.exp(h0 - h0.max()) / np.exp(h0 - h0.max()).sum()
        p1 = np.exp(h1 - h1.max()) / np.exp(h1 - h1.max()).sum()
        out.append(w[0] * p0 + w[1] * p1)
    return out


@pytest.mark.parametrize("task", ["rte", "copa"])
def test_ensemble_predictions_equal_by_hand_combination(run, task):
    examples = run["data"][task].splits["validation"]
    preds = run["em"].predict(task, examples, batch_size=4)
    expected = _by_hand(run, task, examples)
    assert len(preds) == len(examples)
    for p, e, ex in zip(preds, expected, examples):
        np.testing.assert_allclose(list(p["probabilities"].values()), e, rtol=1e-5, atol=1e-6)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["choice"] == int(np.argmax(e))
        assert p["continuation"] == ex.choices[p["choice"]]
        labels = run["em"].labels(task, len(ex.choices))
        assert p["label"] == labels[p["choice"]]
        assert list(p["probabilities"]) == [str(x) for x in labels]
    # the members really differ, so the test pins the combination
    probs = run["em"].group_probabilities(task, examples)
    assert not np.allclose(probs[0], probs[1])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_one_pass_serving_equals_member_by_member(run, batch_size):
    """EnsembleModel scores every member of the used groups in one pass over the base
    (ensemble_core/members.py, issue 34): the probabilities equal one pass per member."""
    em = run["em"]
    for task in ("rte", "cb", "copa"):
        examples = run["data"][task].splits["validation"]
        one = em.predict_proba(task, examples, batch_size)
        em.one_pass = False
        try:
            apart = em.predict_proba(task, examples, batch_size)
        finally:
            em.one_pass = True
        np.testing.assert_allclose(np.concatenate(one), np.concatenate(apart), rtol=0,
                                   atol=1e-6)


def test_raw_records_are_formatted_like_training(run, data_root):
    em, data = run["em"], run["data"]
    for task, file in (("copa", "superglue/COPA/dev32.jsonl"),
                       ("cb", "superglue/CB/dev32.jsonl")):
        examples = data[task].splits["validation"]
        ids = [e.example_id for e in examples]
        by_id = {str(r["idx"]): r for r in read_records(f"{data_root}/{file}")}
        records = [by_id[i] for i in ids]
        from_records = em.predict(task, records)
        from_examples = em.predict(task, examples)
        assert from_records == from_examples
    # unused groups (weight 0) do not matter: cb uses group 0 only
    cb = data["cb"].splits["validation"]
    only0 = em.group_probabilities("cb", cb, groups=[0])[0]
    np.testing.assert_allclose([list(p["probabilities"].values()) for p in em.predict("cb", cb)],
                               only0,
                               atol=1e-12)


def test_missing_template_field_is_a_clear_error(run):
    em = run["em"]
    with pytest.raises(DataError) as err:
        em.predict("rte", [{"premise": "It rained."}])
    assert "'rte'" in str(err.value) and "'hypothesis'" in str(err.value)
    assert "record 0" in str(err.value)
    with pytest.raises(DataError, match=r"task 'copa': record 1: COPA record lacks field 'choice2'"):
        em.predict("copa", [{"premise": "a.", "question": "cause", "choice1": "b", "choice2": "c"},
                            {"premise": "a.", "question": "cause", "choice1": "b"}])
    with pytest.raises(EnsembleError, match="unknown task 'boolq'"):
        em.predict("boolq", [{"passage": "x", "question": "y"}])


def test_ensemble_json_is_validated(run, tmp_path):
    run_dir = run["run_dir"]
    spec = json.loads((run_dir / "ensemble.json").read_text())
    assert spec["tasks"]["copa"]["choice_fields"] == ["choice1", "choice2"]
    assert spec["tasks"]["rte"]["template"].startswith("{premise}")
    kw = dict(base_model=spec["base_model"], groups=spec["groups"], max_length=MAX_LEN)
    bad = dict(spec["tasks"], rte=dict(spec["tasks"]["rte"], weights=[0.7, 0.7]))
    with pytest.raises(EnsembleError, match="tasks.rte.weights must be nonnegative and sum"):
        write_ensemble_json(tmp_path / "ensemble.json", tasks=bad, **kw)
    bad = dict(spec["tasks"], cb=dict(spec["tasks"]["cb"], weights=[1.0]))
    with pytest.raises(EnsembleError, match="tasks.cb.weights must be a list of 2 numbers"):
        write_ensemble_json(tmp_path / "ensemble.json", tasks=bad, **kw)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries
    write_ensemble_json(tmp_path / "ensemble.json", tasks=spec["tasks"], **kw)
    assert [p.name for p in tmp_path.iterdir()] == ["ensemble.json"]
    # a missing adapter is named when loading
    import shutil
    shutil.copytree(run_dir / "adapters", tmp_path / "adapters")
    spec["groups"][1]["members"][0]["adapter"] = "adapters/nowhere"
    (tmp_path / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(EnsembleError, match="adapters/nowhere"):
        EnsembleModel.from_pretrained(tmp_path)
    # adapter paths read from ensemble.json must stay inside the run directory
    for bad in [str(run_dir / "adapters" / "group-0"), "../ensemble-run/adapters/group-0",
                "~/adapters/group-0", "adapters/../../x"]:
        spec["groups"][1]["members"][0]["adapter"] = bad
        (tmp_path / "ensemble.json").write_text(json.dumps(spec))
        with pytest.raises(EnsembleError, match="relative to the run directory|leaves the run"):
            EnsembleModel.from_pretrained(tmp_path)


def test_base_fingerprint_is_checked_and_remote_code_is_the_callers(run, tmp_path, monkeypatch):
    """ensemble.json is data, not authority: it cannot turn on trust_remote_code, a missing
    base_fingerprint is an error unless the caller waives the check, and a different base
    model is refused before it is loaded."""
    import shutil
    from ensemble_core import models

    run_dir = run["run_dir"]
    shutil.copytree(run_dir / "adapters", tmp_path / "adapters")
    spec = json.loads((run_dir / "ensemble.json").read_text())
    seen = []
    real = models.load_base

    def spy(mcfg, cache_dir=None):
        seen.append(mcfg.trust_remote_code)
        return real(mcfg, cache_dir)

    monkeypatch.setattr(models, "load_base", spy)
    forged = dict(spec, base_model=dict(spec["base_model"], trust_remote_code=True))
    (tmp_path / "ensemble.json").write_text(json.dumps(forged))
    EnsembleModel.from_pretrained(tmp_path)
    assert seen == [False]

    (tmp_path / "ensemble.json").write_text(json.dumps(
        {k: v for k, v in spec.items() if k != "base_fingerprint"}))
    with pytest.raises(EnsembleError, match="no base_fingerprint"):
        EnsembleModel.from_pretrained(tmp_path)
    EnsembleModel.from_pretrained(tmp_path, check_fingerprint=False)

    other = dict(spec["base_fingerprint"], weights_sha256="0" * 64)
    (tmp_path / "ensemble.json").write_text(json.dumps(dict(spec, base_fingerprint=other)))
    n = len(seen)
    with pytest.raises(EnsembleError, match="differs from the one the ensemble was trained on"):
        EnsembleModel.from_pretrained(tmp_path)
    assert len(seen) == n  # refused before the base model was loaded


def test_cross_fitted_weights_keep_the_own_group_against_a_member_of_pure_noise():
    """Issue 33, item 9: on a small validation set, the in-sample fit puts weight on a member
    that is pure noise (it happens to fit a few examples); held out, that weight loses, so the
    task keeps its own group. A member that really is better keeps its weight."""
    from ensemble_core.ensemble import cross_fitted_weights, fit_ensemble_weights

    rng = np.random.default_rng(4)
    lean = kept = 0
    for trial in range(40):
        gold = rng.integers(0, 2, 12).tolist()  # 12 validation examples
        right = rng.random(12) < 0.7  # the own group: 70% right, 0.65 sure
        own = [np.array([0.35, 0.65]) if (g == 1) == r else np.array([0.65, 0.35])
               for g, r in zip(gold, right)]
        noise = [np.array([q, 1 - q]) for q in rng.uniform(0.3, 0.7, 12)]  # knows nothing
        fitted = fit_ensemble_weights([own, noise], gold, start=0)
        w, info = cross_fitted_weights([own, noise], gold, start=0, folds=4, seed=trial)
        lean += fitted[1] > 0.05  # the in-sample fit leans on the noise
        kept += w[1] == 0.0
        assert info["kept"] in ("fitted", "own group")
    assert lean >= 8, lean  # the trap is real (14 of 40 here)
    assert kept >= 36, kept  # and the guard keeps the own group (39 of 40 here)
    # a member that is better everywhere keeps its weight
    gold = rng.integers(0, 2, 24).tolist()
    weak = [np.array([0.45, 0.55]) if g else np.array([0.55, 0.45]) for g in gold]
    strong = [np.array([0.1, 0.9]) if g else np.array([0.9, 0.1]) for g in gold]
    w, info = cross_fitted_weights([weak, strong], gold, start=0, folds=4)
    assert info["kept"] == "fitted" and w[1] > 0.9


def test_one_weight_per_group_fits_all_tasks_together():
    """The paper's Algorithm 2 form: one simplex for all tasks, minimising the mean log loss
    over every task's validation examples (checked against a grid)."""
    from ensemble_core.ensemble import ensemble_log_loss, fit_group_weights

    rng = np.random.default_rng(1)
    probs, gold = {}, {}
    for t in ("a", "b"):
        gold[t] = rng.integers(0, 2, 30).tolist()
        probs[t] = [[np.array([1 - q, q]) for q in rng.uniform(0.05, 0.95, 30)]
                    for _ in range(2)]
    w = fit_group_weights(probs, gold, 2)
    total = lambda v: sum(ensemble_log_loss(probs[t], gold[t], v) * 30 for t in probs)  # noqa
    grid = min((total(np.array([a, 1 - a])), a) for a in np.linspace(0, 1, 201))
    assert total(w) <= grid[0] + 1e-6 and abs(w.sum() - 1) < 1e-9
