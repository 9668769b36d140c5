"""Helpers for tests that read task-run states back from the Prefect API."""
import time

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
