"""Helpers for tests that read task-run states back from the Prefect API."""
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId,
                                            TaskRunFilter, TaskRunFilterFlowRunId)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort


def task_states(flow_run_id) -> dict[str, str]:
    """task-run name -> state name for a flow run and all its subflow runs. The task runs that
    stand for a subflow call in its parent (named like ``affinity-0``; always Completed, they
    compute nothing) are left out: the subflow's own task runs are listed instead."""
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
        return {tr.name: (tr.state.name if tr.state else None) for tr in runs
                if tr.id not in wrappers}
