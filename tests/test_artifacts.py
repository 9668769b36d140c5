"""What the Prefect UI shows of a run, read back through the client from a real server: the
report and accuracy artifacts, live progress artifacts, task-run names that say which dataset
task, group or subset they work on; and the `gpu` concurrency slot the GPU tasks hold."""
import json

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound
from prefect.testing.utilities import prefect_test_harness

from conftest import REPO
from flows.pipeline import ensemble_lora
from prefect_utils import task_states
from tasks.common import gpu_slot

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)

TASKS = ["rte", "cb", "copa", "wic"]


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def finished_run(prefect_server, data_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts-run")
    state = ensemble_lora(str(REPO / "configs" / "tiny.yaml"),
                          overrides=[f"output_dir={out}", f"data_root={data_root}",
                                     f"cache_dir={cache_dir}"], return_state=True)
    assert state.is_completed(), state.message
    return state.state_details.flow_run_id, state.result()


def _artifacts(flow_run_id) -> dict:
    """key -> artifact (a dict), for a flow run and its subflows (tasks' artifacts included).

    The requests spell out every field: Prefect 3.8.8's client sends null for the arguments
    left out (``read_artifacts``, ``Artifact.get``, ``read_flow_runs`` without sort/limit), and
    Prefect 3.8.8's server, as the lock installs it, rejects null with 422."""
    with get_client(sync_client=True) as client:
        ids, frontier = [str(flow_run_id)], [str(flow_run_id)]
        while frontier:
            children = client.request("POST", "/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": frontier}},
                "sort": "START_TIME_ASC", "limit": 200, "offset": 0}).json()
            frontier = [r["id"] for r in children]
            ids += frontier
        arts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": ids}}, "sort": "ID_DESC", "limit": 200,
            "offset": 0}).json()
    return {a["key"]: a for a in arts if a["key"]}


def test_report_and_accuracy_artifacts(finished_run):
    run_id, result = finished_run
    arts = _artifacts(run_id)
    report = arts["tiny-report"]
    assert report["type"] == "markdown" and report["flow_run_id"] == str(run_id)
    md = report["data"]
    assert "## Test accuracy" in md and "| average |" in md
    for t in TASKS:
        assert f"| {t} |" in md
    for k, g in enumerate(result.groups):  # the groups, as the pipeline returned them
        assert f"- group-{k}: {', '.join(g)}" in md
    # the heatmap is inlined: the UI cannot resolve the report's relative image path
    assert "](data:image/png;base64," in md and "](affinity.png)" not in md

    table = arts["tiny-accuracy"]
    assert table["type"] == "table"
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [r["task"] for r in rows] == TASKS + ["average"]
    assert rows[-1]["ensemble %"] == pytest.approx(
        100 * result.metrics.average.ensemble_accuracy)


def test_progress_artifacts(finished_run):
    run_id, _ = finished_run
    arts = _artifacts(run_id)
    keys = [f"gradients-{t}" for t in TASKS] + ["train-group-0", "train-group-1",
                                                "train-all-tasks"]
    for key in keys:
        assert arts[key]["type"] == "progress", key
        assert float(arts[key]["data"]) == 100.0, key
        assert arts[key]["task_run_id"] is not None


def test_run_names_identify_their_work(finished_run):
    run_id, result = finished_run
    states = task_states(run_id)
    expected = ([f"gradients[{t}]" for t in TASKS] + ["linearity[rte]", "subsets[0]",
                "affinity-and-groups", "train[group-0]", "train[group-1]", "train[all-tasks]",
                "theta-star", *(f"scores-fit[{t}]" for t in TASKS),
                *(f"scores-test[{t}]" for t in TASKS), "weights", "evaluation"])
    for name in expected:
        assert states.get(name) == "Completed", (name, sorted(states))
    # a boosting adapter is scored alone: its name and the task
    assert any(n.startswith("scores-fit[group-") and "-boost-" in n for n in states), states
    assert any(n.startswith("boost[group-") for n in states)


def _gpu_limit():
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name("gpu")
        except ObjectNotFound:
            return None


@flow
def _holds_gpu_slot():
    with gpu_slot():
        limit = _gpu_limit()
        return None if limit is None else limit.active_slots


def test_gpu_slot(prefect_server):
    with gpu_slot():  # outside any run: a no-op that asks no server
        pass
    assert _gpu_limit() is None
    assert _holds_gpu_slot() is None  # no limit: nothing held, nothing created
    assert _gpu_limit() is None
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
    try:
        assert _holds_gpu_slot() == 1  # the slot is held inside the block
        assert _gpu_limit().active_slots == 0  # and given back after it
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name("gpu")
