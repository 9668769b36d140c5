"""Adding and removing a dataset in a finished run directory (issue 14, items 1 and 2), on the
tiny model under a real Prefect server, counted from task states: adding a task computes only
its gradients, the subsets that cover its pairs, the adapter of the group it joins (and the
all-task baseline, whose tasks changed) and, of the members that did not change, only their
scores on the new task; removing a task computes no gradients."""
from __future__ import annotations

import json

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import ensemble_lora

from conftest import REPO
from prefect_utils import task_states

pytestmark = pytest.mark.integration  # Prefect server (make test-fast skips)


def _config(data_root, cache_dir, out, tasks):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    by_name = {t["name"]: t for t in cfg["tasks"]}
    cfg.update(data_root=str(data_root), cache_dir=str(cache_dir), output_dir=str(out),
               tasks=[by_name[t] for t in tasks])
    cfg["estimation"]["subsets_per_task_run"] = 1  # one subset per task run: countable
    cfg["clustering"].update(incremental=True, regroup_below=10.0)  # always incremental here
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root, cache_dir):
    out = tmp_path_factory.mktemp("incremental") / "run"
    states, groups, written = {}, {}, {}
    with prefect_test_harness(server_startup_timeout=120):
        for name, tasks in (("three", ["rte", "cb", "copa"]),
                            ("four", ["rte", "cb", "copa", "wic"]),
                            ("without-cb", ["rte", "copa", "wic"])):
            state = ensemble_lora(_config(data_root, cache_dir, out, tasks), return_state=True)
            assert state.is_completed(), state
            states[name] = task_states(state.state_details.flow_run_id)
            groups[name] = json.loads((out / "groups.json").read_text())
            # when each member's scores of each task were last written
            written[name] = {str(p.relative_to(out / "scores")): p.stat().st_mtime_ns
                             for p in (out / "scores").rglob("*.json")}
            if name == "three":
                plan = json.loads((out / "estimation" / "plan.json").read_text())
    return out, states, groups, plan, written


def _group_of(groups, task):
    return next(k for k, g in enumerate(groups["groups"]) if task in g["tasks"])


def test_adding_a_task_computes_only_what_depends_on_it(runs):
    _, states, groups, plan, written = runs
    s = states["four"]
    assert s["gradients[wic]"] == "Completed"
    for t in ("rte", "cb", "copa"):
        assert s[f"gradients[{t}]"] == "Cached", (t, s)
    old = len(plan["batches"])  # the three pairs of three tasks
    subsets = sorted((k for k in s if k.startswith("subsets[")),
                     key=lambda k: int(k[8:-1]))
    assert [s[k] for k in subsets] == ["Cached"] * old + ["Completed"] * (len(subsets) - old)
    assert len(subsets) - old == 3  # wic's three pairs
    inc = groups["four"]["incremental"]
    assert inc["used"] == "incremental" and inc["joined"] == ["wic"]
    before = [g["tasks"] for g in groups["three"]["groups"]]
    after = [g["tasks"] for g in groups["four"]["groups"]]
    joined = _group_of(groups["four"], "wic")
    for k, g in enumerate(after):  # the other group is the same, the joined one grew by wic
        assert g == (before[k] + ["wic"] if k == joined else before[k]), (before, after)
    assert sorted(map(sorted, inc["incremental_groups"])) == sorted(map(sorted, after))
    assert s[f"train[group-{joined}]"] == "Completed"
    assert s[f"train[group-{1 - joined}]"] == "Cached"
    assert s["train[all-tasks]"] == "Completed"  # the baseline's tasks changed
    assert s["theta-star"] == "Cached"
    # stage 5 scores a task's members together, one task run per task (every old task's run
    # includes the joined group, whose adapter changed), and reads back a member's scores of
    # a task whose inputs did not change: the members that did not change are scored on the
    # new task only
    other = f"group-{1 - joined}"
    before, after = written["three"], written["four"]
    for t in ("rte", "cb", "copa"):
        assert s[f"scores-fit[{t}]"] == "Completed", (t, s)
        assert after[f"{other}/{t}.json"] == before[f"{other}/{t}.json"], t
        assert after[f"theta-star/{t}.json"] == before[f"theta-star/{t}.json"], t
        assert after[f"group-{joined}/{t}.json"] != before[f"group-{joined}/{t}.json"], t
    assert s["scores-fit[wic]"] == "Completed"
    assert f"{other}/wic.json" in after and f"{other}/wic.json" not in before
    # a boosting step reads only its group's scores: on the group that did not change it is
    # the same step as before
    boosted = [k for k in s if k.startswith("boost[")]
    assert boosted, s
    for k in boosted:
        if not k.startswith(f"boost[group-{joined}-") and k in states["three"]:
            assert s[k] == "Cached", (k, s)


def test_removing_a_task_computes_no_gradients(runs):
    _, states, _, _, _ = runs
    s = states["without-cb"]
    grads = {k: v for k, v in s.items() if k.startswith("gradients[")}
    assert set(grads) == {"gradients[rte]", "gradients[copa]", "gradients[wic]"}
    assert set(grads.values()) == {"Cached"}, grads
    assert not any(k == "gradients[cb]" for k in s)
