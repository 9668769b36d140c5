"""Stage 1 under a real Prefect server: fan-out per task, JSON records, second run cached."""
import json

import pytest
from prefect.testing.utilities import prefect_test_harness

from ensemble_core.features import read_features
from ensemble_core.storage import read_json
from flows.gradient_features import gradient_features

from conftest import tiny_config
from prefect_utils import task_states

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_gradient_flow_runs_and_second_run_is_cached(prefect_server, data_root, cache_dir,
                                                     tmp_path):
    cfg = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    cfg["tasks"] = cfg["tasks"][:2]
    state1 = gradient_features(cfg, return_state=True)
    res1 = state1.result()
    assert set(res1.features) == {"rte", "cb"}
    json.dumps(res1.to_json())  # a small JSON-able record
    rec = res1.features["cb"]
    run_dir = str(tmp_path / "run")
    assert not rec.validation.path.startswith("/")  # relative to the run directory
    table = read_features(rec.validation.url(run_dir))
    assert table.task == "cb" and table.d == 32 and table.n_examples == 6
    manifest = read_json(rec.manifest.url(run_dir))
    assert rec.projection.d == 32 and rec.projection.p == manifest["p"]
    assert manifest["d"] == 32 and manifest["p"] > 32
    assert manifest["files"]["train"]["rows"] == 8 * 3  # CB has 3 choices
    states1 = task_states(state1.state_details.flow_run_id)
    assert states1["gradients[rte]"] == "Completed"

    state2 = gradient_features(cfg, return_state=True)
    res2 = state2.result()
    states2 = task_states(state2.state_details.flow_run_id)
    assert states2["gradients[rte]"] == "Cached"
    assert states2["gradients[cb]"] == "Cached"
    assert states2["linearity[rte]"] == "Cached"
    assert res2.features == res1.features

    # a changed setting that affects features recomputes
    cfg["estimation"] = dict(cfg["estimation"], projection_dim=16)
    state3 = gradient_features(cfg, return_state=True)
    assert task_states(state3.state_details.flow_run_id)["gradients[cb]"] == "Completed"
    assert read_features(state3.result().features["cb"].train.url(run_dir)).d == 16
