"""The three boosting modes (boosting.mode; ensemble_core/boosting/, issue 13): AdaBoost's
weights and α against the formula on a constructed case, and every mode lowering the chosen
group's exact training loss on the tiny model — the loss recomputed here from the saved
adapter's own scores and the step's members, independently of the step's bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ensemble_core import stages
from ensemble_core.boosting import adaboost_alphas
from ensemble_core.choices import flatten
from ensemble_core.config import parse_config
from ensemble_core.records import GroupEnsemble, Member
from ensemble_core.run import Run
from ensemble_core.runtime import member_model
from ensemble_core.scoring import predict_scores
from ensemble_core.storage import file_sha256

from conftest import tiny_config


def test_adaboost_weights_and_alpha_follow_the_formula():
    # 5 examples; member 0 wrong on example 4 only, member 1 wrong on examples 0 and 4
    wrong = [np.array([0, 0, 0, 0, 1]), np.array([1, 0, 0, 0, 1])]
    errs, alphas, w = adaboost_alphas(wrong)
    assert errs[0] == pytest.approx(1 / 5)
    assert alphas[0] == pytest.approx(math.log(4))          # log((1 − 0.2)/0.2)
    w1 = np.array([1, 1, 1, 1, 4.0])                         # w·exp(α·wrong)
    assert errs[1] == pytest.approx((1 + 4) / w1.sum())      # 5/8
    assert alphas[1] == pytest.approx(math.log((3 / 8) / (5 / 8)))  # negative: worse than 1/2
    w2 = w1 * np.exp(alphas[1] * wrong[1])
    assert w == pytest.approx(w2 / w2.mean())
    # a perfect member: err clipped, α finite
    errs, alphas, _ = adaboost_alphas([np.zeros(4)])
    assert errs[0] > 0 and math.isfinite(alphas[0]) and alphas[0] > 10


@pytest.fixture(scope="module")
def boosting_setup(data_root, cache_dir, tmp_path_factory):
    raw = tiny_config(data_root, tmp_path_factory.mktemp("run"), cache_dir=str(cache_dir))
    raw["tasks"] = [{"name": t, "builtin": f"superglue/{t}",
                     "max_examples": {"train": 12, "validation": 6}} for t in ("rte", "boolq")]
    raw["training"] = {"epochs": 6, "batch_size": 4, "learning_rate": 1e-2}
    run = Run.open(parse_config(raw))
    tasks = ["rte", "boolq"]  # two-choice tasks: AdaBoost.M1 needs err < 1/2
    features = {t: stages.gradient_features(run, t) for t in tasks}
    adapter = stages.train_group(run, "group-0", tasks)
    theta = stages.save_theta_star(run)
    plan = {t: {"group-0": ["train", "validation"], "theta-star": ["validation"]}
            for t in tasks}
    scores = stages.score_members(run, [adapter, theta], plan).records
    assert sorted(scores) == sorted(f"{m}/{t}" for m in ("group-0", "theta-star") for t in tasks)
    return raw, features, scores, GroupEnsemble("group-0", tasks, [Member("group-0", 1.0)])


@pytest.mark.parametrize("mode,eta", [("first-order", 0.02), ("exact", 0.5), ("adaboost", 0.1)])
def test_each_mode_lowers_the_chosen_groups_training_loss(boosting_setup, mode, eta):
    raw, features, scores, group = boosting_setup
    raw = dict(raw, boosting={"mode": mode, "eta": eta})
    run = Run(parse_config(raw))
    rec = stages.boost_group(run, group, features, scores, 1)
    assert rec.mode == mode and rec.accepted
    assert rec.train_loss_after < rec.train_loss_before

    # independently: score every member of the boosted group on the train sample and take the
    # log loss of Σ scale·h
    train = [e for t in group.tasks for e in stages.estimation_examples(run, t, "train")]

    def scores_of(name):
        sha = file_sha256(run.dir.adapter_weights(name))
        model, tok = member_model(run.cfg, run.dir.local(run.dir.adapter(name)), name, sha)
        return predict_scores(model, tok, train, run.cfg.model.max_length, 4)

    def loss(members):
        h = [scores_of(m.name) for m in members]
        total = [sum(m.scale * h[k][i] for k, m in enumerate(members))
                 for i in range(len(train))]
        z, layout = flatten(total, [e.label for e in train])
        return layout.log_loss(z)

    assert loss(rec.members) == pytest.approx(rec.train_loss_after, rel=1e-5)
    assert loss(group.members) == pytest.approx(rec.train_loss_before, rel=1e-5)
    if mode == "adaboost":  # members weighted by α, normalised
        assert [m.name for m in rec.members] == ["group-0", "group-0-boost-1"]
        assert sum(m.scale for m in rec.members) == pytest.approx(1.0)
        assert rec.alpha > 0 and 0 < rec.error < 0.5
    else:  # + η·(h_k − h0) for exact, + (h_k − h0) with η inside the step for first-order
        scale = eta if mode == "exact" else 1.0
        assert [(m.name, m.scale) for m in rec.members] == [
            ("group-0", 1.0), ("group-0-boost-1", scale), ("theta-star", -scale)]
