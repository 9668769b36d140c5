"""Stage 2 under a real Prefect server: subset fan-out, affinity, SDP groups; cached re-run;
the same fan-out on a real Dask LocalCluster reached through its address."""
import os
from pathlib import Path

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from ensemble_core.affinity import Affinity
from ensemble_core.storage import read_json
from flows.affinity import affinity_flow, run_affinity

from conftest import tiny_config
from prefect_utils import task_states

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def run_cfg(data_root, cache_dir, tmp_path_factory):
    cfg = tiny_config(data_root, tmp_path_factory.mktemp("run"), cache_dir=str(cache_dir))
    cfg["tasks"].append({"name": "wic", "builtin": "superglue/wic",
                         "max_examples": {"train": 8, "validation": 6}})
    cfg["estimation"] = dict(cfg["estimation"], n_subsets=6, subset_size=2,
                             subsets_per_task_run=2, linearity_check=False)
    cfg["clustering"] = {"n_groups": 2}
    return cfg


def test_affinity_flow_groups_and_cache(prefect_server, run_cfg):
    state = affinity_flow(run_cfg, return_state=True)
    res = state.result()
    assert len(res.results) == 6  # all C(4, 2) pairs
    groups = read_json(res.groups.groups.url(run_cfg["output_dir"]))
    tasks = sorted(t for g in groups["groups"] for t in g["tasks"])
    assert tasks == ["cb", "copa", "rte", "wic"] and groups["n_groups"] == 2
    with open(res.groups.affinity.url(run_cfg["output_dir"])) as f:
        aff = Affinity.from_json(f.read())
    assert aff.names == ["rte", "cb", "copa", "wic"]
    assert (aff.counts[~np.eye(4, dtype=bool)] == 1).all()
    states = task_states(state.state_details.flow_run_id)
    assert states["subsets[0]"] == "Completed" and states["affinity-and-groups"] == "Completed"

    state2 = affinity_flow(run_cfg, return_state=True)
    states2 = task_states(state2.state_details.flow_run_id)
    assert {states2[f"subsets[{i}]"] for i in range(3)} == {"Cached"}
    assert states2["gradients[rte]"] == "Cached"
    assert states2["affinity-and-groups"] == "Cached"
    assert state2.result().groups.group_tasks == res.groups.group_tasks


def test_subset_fanout_on_dask_local_cluster(prefect_server, run_cfg, tmp_path):
    from distributed import LocalCluster

    cfg = dict(run_cfg, output_dir=str(tmp_path / "dask-run"))
    threads = run_affinity(cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        cfg_dask = dict(cfg, runner={"kind": "dask", "address": cluster.scheduler_address},
                        output_dir=str(tmp_path / "dask-run-2"))
        on_dask = run_affinity(cfg_dask, features=threads_records(threads, cfg,
                                                                  tmp_path / "dask-run-2"))
        with cluster.get_client() as client:
            worker_pids = set(client.run(os.getpid).values())
    # the subset tasks really ran in the cluster's worker processes, not in this one
    used = {int(w.rsplit(":", 1)[1]) for w in on_dask.workers}
    assert used and used <= worker_pids and os.getpid() not in used
    assert {int(w.rsplit(":", 1)[1]) for w in threads.workers} == {os.getpid()}
    for a, b in zip(threads.results, on_dask.results):
        assert a.subset == b.subset and a.tasks == b.tasks
        for t in a.per_task:
            assert a.per_task[t].loss == pytest.approx(b.per_task[t].loss, rel=1e-6)
    assert on_dask.groups.group_tasks == threads.groups.group_tasks


def threads_records(result, cfg, to: Path):
    """Reuse the gradient files of the first run: copied into the Dask run's directory (the
    records name them relative to the run directory)."""
    import shutil

    from flows.gradient_features import gradient_features
    shutil.copytree(Path(cfg["output_dir"]) / "gradients", to / "gradients")
    return gradient_features(cfg).features
