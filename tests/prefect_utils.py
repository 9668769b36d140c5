"""Helpers for tests that trigger deployments and read flow- and task-run states back from the
Prefect API."""
import json
import subprocess
import time
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId,
                                            TaskRunFilter, TaskRunFilterFlowRunId)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort


def task_states(flow_run_id, settle: float = 1.0, timeout: float = 120.0) -> dict[str, str]:
    """task-run name -> state name for a flow run and all its subflow runs, once the server
    has recorded them all. The task runs that stand for a subflow call in its parent (named
    like ``affinity-0``; always Completed, they compute nothing) are left out: the subflow's
    own task runs are listed instead.

    Prefect 3 records task runs from the events the client sends; the server's recorder
    writes them after the flow has returned, and on a loaded machine (two test workers) it
    was seen behind: a task run still under its default name (``score_member-6d5``, named
    from its parameters once running) and the last two tasks not there yet. So the client's
    events are flushed first, and the listing is read until every task run in it is final and
    it has not changed for ``settle`` seconds (at most ``timeout``)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout, at_exit=False)
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        states, final = _read_task_states(flow_run_id)
        now = time.monotonic()
        if states != last or not final:
            last, since = states, now
        if (final and now - since >= settle) or now > deadline:
            return states
        time.sleep(0.25)


def _read_task_states(flow_run_id) -> tuple[dict[str, str], bool]:
    with get_client(sync_client=True) as client:
        ids, frontier, wrappers = [flow_run_id], [flow_run_id], set()
        while frontier:  # subflows, recursively
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)),
                sort=FlowRunSort.START_TIME_ASC, limit=200)
            frontier = [c.id for c in children]
            wrappers |= {c.parent_task_run_id for c in children}
            ids += frontier
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
        runs = [tr for tr in runs if tr.id not in wrappers]
        return ({tr.name: (tr.state.name if tr.state else None) for tr in runs},
                all(tr.state is not None and tr.state.is_final() for tr in runs))


@contextmanager
def api_client(env: dict):
    """A sync Prefect client for the server whose PREFECT_API_URL is in ``env``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as client:
        yield client


def trigger_deployment(env: dict, deployment: str, params: dict, cwd) -> str:
    """`prefect deployment run` as the README says; returns the flow run's id."""
    out = subprocess.run(["prefect", "--no-prompt", "deployment", "run", deployment,
                          "--params", json.dumps(params)], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert out.returncode == 0, out.stdout
    return next(line.split("UUID:")[1].strip() for line in out.stdout.splitlines()
                if "UUID:" in line)


def wait_for_flow_run(env: dict, run_id: str, timeout: float, logs=()):
    """The flow run once final (asserted Completed, with the tails of ``logs`` otherwise)."""
    deadline = time.monotonic() + timeout
    with api_client(env) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                break
            time.sleep(2)
    tail = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
    assert run.state.is_final(), f"flow run not finished after {timeout} s\n{tail}"
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{tail}"
    return run
