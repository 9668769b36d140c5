"""Running the library's stage functions as their Prefect tasks: the runner
``ensemble_core.algorithm2`` takes when a flow runs it (docs/design.md, "The stages in order")."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

from ensemble_core.runtime import request_stop

from .common import for_run
from .stages import TASKS


class TaskRunner:
    """``call`` runs a stage function's task and waits for its record; ``map`` submits one
    task run per argument tuple (concurrently, on the flow's task runner) and returns their
    records in order. Tasks are configured for the run (``common.for_run``: cache records
    and locks in its directory)."""

    def __init__(self, run):
        self.run = run
        self._tasks: dict = {}

    def _task(self, stage_fn):
        task = self._tasks.get(stage_fn)
        if task is None:
            task = self._tasks[stage_fn] = for_run(TASKS[stage_fn], self.run)
        return task

    def _record(self, stage_fn, value):
        # (a cached record whose files are gone or changed was dropped by the cache key
        # function before Prefect looked it up: common.for_run)
        return stage_fn.stage.returns.from_json(value)

    def call(self, stage_fn, *args, **kwargs):
        with _stop_on_interrupt():
            return self._record(stage_fn, self._task(stage_fn)(self.run, *args, **kwargs))

    def map(self, stage_fn, calls: Sequence[tuple]) -> list:
        task = self._task(stage_fn)
        with _stop_on_interrupt():
            futures = [task.submit(self.run, *args) for args in calls]
            return [self._record(stage_fn, f.result()) for f in futures]


@contextmanager
def _stop_on_interrupt():
    """A signal or a cancellation reaches the main thread while it waits for task runs (Ctrl-C:
    KeyboardInterrupt; SIGTERM, a cancellation: Prefect's TerminationSignal): the task runs of
    this process are told to stop at their next step (``runtime.request_stop``), so the
    flow's thread pool, which joins them on the way out, is not held for the rest of their
    work."""
    try:
        yield
    except Exception:
        raise
    except BaseException:
        request_stop()
        raise
