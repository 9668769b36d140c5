"""Synthetic tasks with a planted grouping (ensemble_core/synthetic.py; issue 32): the data
follow their rule, the adjusted Rand index matches a hand computation, and the whole pipeline
on the tiny model finds the planted groups from real files."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from ensemble_core.synthetic import (KEYS, adjusted_rand, make_examples, planted_clusters,
                                     write_tasks)

from conftest import REPO


def test_examples_follow_the_planted_rule():
    for c in range(3):
        recs = make_examples(c, 3, 200, seed=[1, c])
        for r in recs:
            present = [k for k in KEYS[:3] if k in r["text"].split()]
            assert len(present) == 1  # one-of: exactly one key word
            assert r["label"] == int(present[0] == KEYS[c])
        assert 0.2 < sum(r["label"] for r in recs) / 200 < 0.45  # about 1/3 "yes"
    # the same seed gives the same data; "key": each word independently
    assert make_examples(0, 2, 5, seed=3) == make_examples(0, 2, 5, seed=3)
    for r in make_examples(1, 2, 100, seed=4, rule="key"):
        assert r["label"] == int(KEYS[1] in r["text"].split())
    assert planted_clusters(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="rule"):
        make_examples(0, 2, 1, seed=0, rule="xor")


def test_adjusted_rand_by_hand():
    assert adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0  # names do not matter
    # contingency [[2, 1], [0, 3]]: index C(2,2) + C(3,2) = 4; rows 3, 3: C(3,2)·2 = 6;
    # columns 2, 4: 1 + 6 = 7; C(6,2) = 15: expected 6·7/15 = 2.8, max (6 + 7)/2 = 6.5,
    # ARI = (4 − 2.8)/(6.5 − 2.8) = 12/37
    assert adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(12 / 37)
    assert adjusted_rand([0, 0, 0, 1], [0, 0, 1, 1]) == 0.0  # no better than chance
    assert adjusted_rand([0, 1, 2, 3], [0, 0, 1, 1]) == 0.0


def test_the_pipeline_finds_the_planted_groups(tmp_path, cache_dir):
    """Eight tasks in two planted clusters, written as JSONL files and read like a user's
    data, through all six stages on the tiny model (in this process): the groups found are
    the planted ones (ARI 1)."""
    from ensemble_core.algorithm2 import pipeline
    from ensemble_core.config import parse_config
    from ensemble_core.run import Run

    n = 8
    tasks, clusters = write_tasks(tmp_path / "data", n, 2)
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
               cache_dir=str(cache_dir), tasks=tasks)
    cfg["estimation"].update(n_subsets=2 * math.ceil(n * (n - 1) / 2 / 3), subset_size=3)
    cfg["boosting"]["steps"] = 0
    pipeline(Run.open(parse_config(cfg)))
    groups = json.loads((tmp_path / "run" / "groups.json").read_text())["groups"]
    found = {t: k for k, g in enumerate(groups) for t in g["tasks"]}
    assert adjusted_rand(clusters, [found[t["name"]] for t in tasks]) == 1.0, groups
