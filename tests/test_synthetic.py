"""Synthetic tasks with a planted grouping (ensemble_core/synthetic.py; issue 32): the data
follow their rule, the adjusted Rand index matches a hand computation, and the whole flow on
the tiny model finds the planted groups from real files within the task-run bound."""
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


def test_the_code_rule_by_hand():
    """"code": one key word a sentence, the answer its bit of the cluster's Walsh code (or
    the complement): balanced, the same within a cluster, and two clusters disagree on half
    the key words or on all of them."""
    from itertools import combinations

    from ensemble_core.synthetic import code_label

    # C = 5: K = 4 key words (2(K − 1) = 6 ≥ 5); clusters 0–2 the codes of rows 1–3, 3–4 the
    # complements of rows 1–2; bit k of row r is popcount(r & k) mod 2
    table = [[code_label(c, k, 4) for k in range(4)] for c in range(5)]
    assert table == [[0, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]]
    for c in range(20):  # C = 20: K = 16
        assert sum(code_label(c, k, 16) for k in range(16)) == 8
    for a, b in combinations(range(20), 2):
        assert sum(code_label(a, k, 16) != code_label(b, k, 16) for k in range(16)) in (8, 16)
    for c in range(5):
        for r in make_examples(c, 5, 50, seed=[2, c], rule="code", length=2):
            words = r["text"].split()
            assert len(words) == 3
            key = [KEYS.index(w) for w in words if w in KEYS]
            assert len(key) == 1 and r["label"] == table[c][key[0]]
    alone = make_examples(0, 2, 20, seed=0, rule="code", length=0)  # the key word alone
    assert {r["text"] for r in alone} == {"true", "false"}
    assert all(r["label"] == int(r["text"] == "false") for r in alone)


def test_adjusted_rand_by_hand():
    assert adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0  # names do not matter
    # contingency [[2, 1], [0, 3]]: index C(2,2) + C(3,2) = 4; rows 3, 3: C(3,2)·2 = 6;
    # columns 2, 4: 1 + 6 = 7; C(6,2) = 15: expected 6·7/15 = 2.8, max (6 + 7)/2 = 6.5,
    # ARI = (4 − 2.8)/(6.5 − 2.8) = 12/37
    assert adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(12 / 37)
    assert adjusted_rand([0, 0, 0, 1], [0, 0, 1, 1]) == 0.0  # no better than chance
    assert adjusted_rand([0, 1, 2, 3], [0, 0, 1, 1]) == 0.0


@pytest.mark.integration  # a Prefect server (make test-fast skips)
def test_the_flow_finds_the_planted_groups_within_the_task_run_bound(tmp_path, cache_dir):
    """Twelve tasks in three planted clusters ("code" rule), written as JSONL files and read
    like a user's data, through the ``ensemble_lora`` flow on a Prefect server with
    bench/scale.py's settings: the groups found are the planted ones (ARI 1), and the flow
    made at most 3(n + m) task runs (issue 32; stage 1 packs the tasks, runner.feature_runs)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import ensemble_lora
    from prefect_utils import task_states

    n, m = 12, 3
    tasks, clusters = write_tasks(tmp_path / "data", n, m, rule="code", length=0,
                                  sizes={"train": 64, "validation": 12, "test": 12})
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
               cache_dir=str(cache_dir), tasks=tasks)
    k = 3 * math.ceil(math.comb(n, 2) / math.comb(4, 2))  # as bench/scale.py
    cfg["estimation"].update(n_subsets=k, subset_size=4, projection_dim=128,
                             max_adapter_distance=10.0)
    cfg["clustering"]["n_groups"] = m
    with prefect_test_harness(server_startup_timeout=120):
        state = ensemble_lora(cfg, return_state=True)
        assert state.is_completed(), state
        states = task_states(state.state_details.flow_run_id)
    groups = json.loads((tmp_path / "run" / "groups.json").read_text())["groups"]
    found = {t: k for k, g in enumerate(groups) for t in g["tasks"]}
    assert adjusted_rand(clusters, [found[t["name"]] for t in tasks]) == 1.0, groups
    assert set(states.values()) == {"Completed"}, states
    packs = [name for name in states if name.startswith("gradients[")]
    assert len(packs) == 6 and "gradients[task-00+1]" in packs, packs  # 12 tasks, 8 runs at most
    assert len(states) <= 3 * (n + m), sorted(states)


@pytest.mark.integration  # a Prefect server (make test-fast skips)
def test_a_refused_subflow_says_which_server_setting(tmp_path, cache_dir, data_root,
                                                      monkeypatch):
    """Many tasks make the subflows' parameters (config and records) larger than the Prefect
    server accepts (512 KB by default; about 400 tasks): the run stops with an error naming
    the stage group and the server setting to raise, not a bare HTTP 422."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import ensemble_lora

    monkeypatch.setenv("PREFECT_SERVER_API_MAX_PARAMETER_SIZE", "1500")
    with prefect_test_harness(server_startup_timeout=120):
        state = ensemble_lora(str(REPO / "configs" / "tiny.yaml"),
                              [f"output_dir={tmp_path / 'run'}", f"data_root={data_root}",
                               f"cache_dir={cache_dir}"], return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError) as err:
        state.result()
    message = str(err.value)
    assert "stage group gradient-features" in message and "4 tasks" in message
    assert "PREFECT_SERVER_API_MAX_PARAMETER_SIZE" in message
    assert "must be less than 1,500 bytes" in message
    assert not (tmp_path / "run" / "gradients").exists()  # refused before any work
