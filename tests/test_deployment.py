"""EnsembleLoRA as a service, with real processes: a `prefect server start` on 127.0.0.1,
deployments/setup.sh (work pools, the `gpu` concurrency limit, `prefect deploy --all` from
prefect.yaml), process workers started from elsewhere (the pull step moves each flow run into the
checkout), and the tiny pipeline triggered through the `ensemble-lora` deployment: once
in-process, once with its stages run on the stage deployments of the `gpu` and `cpu` pools."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from deployments import local_server, start, stop  # noqa: E402
from prefect_utils import api_client, trigger_deployment, wait_for_flow_run  # noqa: E402

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)

TINY = REPO / "configs" / "tiny.yaml"
STAGES = {"gradient_features/gradient-features": "gpu", "affinity/affinity": "cpu",
          "group_adapters/group-adapters": "gpu",
          "boosting_and_weights/boosting-and-weights": "gpu", "report/report": "cpu"}


@pytest.fixture(scope="module")
def service(tmp_path_factory, data_root, cache_dir):
    """Server + setup.sh + one process worker per pool; yields (env, tmp dir)."""
    tmp = tmp_path_factory.mktemp("service")
    with local_server(tmp / "prefect-home") as env:
        env = dict(env, ENSEMBLE_LORA_DATA=data_root, ENSEMBLE_LORA_CACHE=str(cache_dir))
        setup = subprocess.run(["bash", "deployments/setup.sh"], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert setup.returncode == 0, setup.stdout[-4000:]
        workers = []
        try:
            for pool in ("cpu", "gpu"):
                workers.append(start(["prefect", "worker", "start", "--pool", pool,
                                      "--type", "process", "--name", f"test-{pool}"],
                                     env, tmp / f"worker-{pool}.log", cwd=tmp))
            yield env, tmp
        finally:
            stop(*workers)


def _run_and_wait(env, tmp, overrides, timeout=420):
    """Triggers the ensemble-lora deployment as the README says (`prefect deployment run`) and
    waits for the flow run to finish; returns it."""
    return _deployment_run(env, tmp, "ensemble_lora/ensemble-lora",
                           {"config": str(TINY), "overrides": overrides}, timeout)


def _deployment_run(env, tmp, deployment, params, timeout=420):
    run_id = trigger_deployment(env, deployment, params, tmp)
    return wait_for_flow_run(env, run_id, timeout,
                             [tmp / f"worker-{p}.log" for p in ("cpu", "gpu")])


def test_deployments_schedule_and_pools(service):
    env, _ = service
    with api_client(env) as client:
        dep = client.read_deployment_by_name("ensemble_lora/ensemble-lora")
        assert dep.work_pool_name == "gpu"
        assert dep.parameters == {"config": "configs/demo.yaml", "overrides": []}
        [sched] = dep.schedules
        assert sched.active and sched.schedule.cron == "0 3 * * 1"
        assert sched.schedule.timezone == "UTC"
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(REPO)}}]
        for name, pool in STAGES.items():
            assert client.read_deployment_by_name(name).work_pool_name == pool
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1


def test_ensemble_lora_deployment_run(service):
    """The whole tiny pipeline in the flow-run process of the `gpu` worker."""
    env, tmp = service
    run_dir = tmp / "run-local"
    t0 = time.monotonic()
    run = _run_and_wait(env, tmp, [f"output_dir={run_dir}"])
    print(f"ensemble-lora deployment run: {time.monotonic() - t0:.0f} s")
    assert run.work_pool_name == "gpu"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"rte", "cb", "copa", "wic"}
    from ensemble_core.records import PipelineResult  # JSON-persisted (prefect.yaml env)
    assert PipelineResult.from_json(run.state.result()).run_dir == str(run_dir)


def test_batch_predict_deployment_run(service, data_root):
    """Issue 14, item 4: the batch-predict deployment, on the gpu worker, scores a file of
    raw records with the current version of the run above and writes the predictions beside
    it: those of EnsembleModel.predict, one line per record."""
    from ensemble_core.ensemble import EnsembleModel
    from ensemble_core.versions import current

    env, tmp = service
    run_dir = tmp / "run-local"  # made by test_ensemble_lora_deployment_run
    lines = (Path(data_root) / "superglue" / "RTE" / "val.jsonl").read_text().splitlines()[:12]
    records = tmp / "incoming" / "rte.jsonl"
    records.parent.mkdir()
    records.write_text("\n".join(lines) + "\n")
    run = _deployment_run(env, tmp, "batch_predict/batch-predict",
                          {"run_dir": str(run_dir), "task": "rte", "input": str(records)})
    assert run.work_pool_name == "gpu"
    out = Path(f"{records}.predictions.jsonl")
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g.pop("index") for g in got] == list(range(12))
    model = EnsembleModel.from_pretrained(run_dir)
    assert model.version == current(run_dir)
    expected = json.loads(json.dumps(model.predict("rte", [json.loads(x) for x in lines])))
    assert got == expected


def test_stages_on_work_pools(service):
    """runner.work_pools: each stage is a run of its deployment, picked up by the worker of its
    pool, and its result comes back to the orchestrating flow."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    env, tmp = service
    run_dir = tmp / "run-pools"
    t0 = time.monotonic()
    run = _run_and_wait(env, tmp, [f"output_dir={run_dir}",
                                   'runner.work_pools={"gpu": "gpu", "cpu": "cpu"}'])
    print(f"ensemble-lora with stages on work pools: {time.monotonic() - t0:.0f} s")
    assert (run_dir / "metrics.json").exists() and (run_dir / "report.md").exists()
    with api_client(env) as client:
        for name, pool in STAGES.items():
            dep = client.read_deployment_by_name(name)
            [stage_run] = client.read_flow_runs(  # (sort, limit: see test_artifacts._artifacts)
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])),
                sort=FlowRunSort.START_TIME_ASC, limit=10)
            assert stage_run.state.is_completed(), name
            assert stage_run.work_pool_name == pool
            parent = client.read_task_run(stage_run.parent_task_run_id)
            assert parent.flow_run_id == run.id  # a subflow of the orchestrating run
    # the stage runs really computed (in the workers' flow-run processes) into the run dir
    grads = json.loads((run_dir / "gradients" / "rte" / "manifest.json").read_text())
    assert grads["files"]["train"]["rows"] > 0
    assert len(list((run_dir / "adapters").glob("group-*"))) >= 2
    with api_client(env) as client:  # GPU tasks took and gave back slots of the `gpu` limit
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0


def test_a_cancelled_deployment_run_stops_during_training(service):
    """Issue 36, item 2: a run of the ensemble-lora deployment cancelled through the API (as
    the UI's Cancel button does) while stage 4 trains: the worker's SIGTERM stops the training
    at its next step, and the flow run ends Cancelled within 30 s, on its own terms (not killed
    after the worker's grace period)."""
    env, tmp = service
    run_dir = tmp / "run-cancelled"
    out = subprocess.run(
        ["prefect", "--no-prompt", "deployment", "run", "ensemble_lora/ensemble-lora",
         "--params", json.dumps({"config": str(TINY), "overrides": [
             f"output_dir={run_dir}", "training.epochs=400"]})],
        cwd=tmp, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=120)
    assert out.returncode == 0, out.stdout
    run_id = next(line.split("UUID:")[1].strip() for line in out.stdout.splitlines()
                  if "UUID:" in line)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob(".prefect/cache/theta-star-*")):  # stage 4 under way
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    time.sleep(2)
    from prefect.states import Cancelling

    with api_client(env) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
        sent = time.monotonic()
        while True:
            run = client.read_flow_run(run_id)
            if run.state.is_final():
                break
            assert time.monotonic() - sent < 60, f"still {run.state.name} after 60 s"
            time.sleep(0.5)
    took = time.monotonic() - sent
    logs = (tmp / "worker-gpu.log").read_text()[-4000:]
    assert run.state.is_cancelled(), f"{run.state.name}: {run.state.message}\n{logs}"
    assert took < 30, f"{took:.0f} s\n{logs}"
    assert not list(run_dir.glob("adapters/group-*/training.json"))  # 400 epochs: none done
