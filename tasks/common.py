"""What every task of a run shares: how its cache key is made and where results live.

A task's cache key is the hash of what its library stage declares it depends on
(``ensemble_core.stages.Stage.inputs``: the version of the code the stage runs, the config
fields it reads, the data fingerprints of the tasks it reads, and the content keys of its
arguments — never where the run directory is) — nothing is listed by hand here. Results are
small JSON records (paths relative to the run directory + content hashes,
``ensemble_core.records``) stored under ``<run_dir>/.prefect`` beside the files they describe,
with a lock per key so two runs on one output location never compute the same task at the same
time (SERIALIZABLE cache isolation).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.transactions import IsolationLevel

from ensemble_core.runtime import StopRequested

from .locking import LockWaitInterrupted, LockWaitTimeout, checked_key_fn, run_store


def stage_key(stage_fn, parameters: dict) -> str:
    """The cache key of a task that runs the library stage ``stage_fn`` with ``parameters``
    (the task's parameters are the stage function's)."""
    spec = stage_fn.stage
    args = {k: v for k, v in parameters.items() if k != "run"}
    blob = json.dumps(spec.inputs(parameters["run"], **args), sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def keyed(stage_fn) -> CachePolicy:
    """The cache policy of a task wrapping ``stage_fn`` (and returning the JSON of the record
    the stage declares), configured per run by :func:`for_run`: a cached result is served only
    while every file the record names is there with its recorded sha256."""
    def key_fn(context, parameters):
        return stage_key(stage_fn, parameters)

    key_fn.record = stage_fn.stage.returns
    return CachePolicy.from_cache_key_fn(key_fn)


def for_run(task_obj, run):
    """The task with its cache records and their result payloads stored in the run directory
    (``.prefect/cache``, ``.prefect/results``: a local path, or Prefect's RemoteFileSystem at
    the directory's URL) and a lock per key (files on one machine, Redis leases across
    machines: ``locking.run_store``), so an interrupted run resumes from its own directory
    wherever it is read from, two runs never compute one key at once, and processes with
    different ``PREFECT_HOME``s — or on different machines — share the results."""
    from ensemble_core.coordination import redis_url

    store = run_store(run.dir.url, redis_url(run.cfg.runner.redis_url))
    policy = task_obj.cache_policy.configure(
        key_storage=store.keys, lock_manager=store.locks,
        isolation_level=IsolationLevel.SERIALIZABLE)
    # a record whose result payload is gone, or whose files are gone or changed, is
    # recomputed, not served or a task failure; one of a copied directory is read here
    policy.cache_key_fn = checked_key_fn(policy.cache_key_fn, store.keys_url, _logger(),
                                         getattr(policy.cache_key_fn, "record", None),
                                         store.results_url, store.run_dir)
    return task_obj.with_options(cache_policy=policy, result_storage=store.results)


def retry_unless_input_error(task, task_run, state) -> bool:
    """Retry condition of the tasks with retries: a task that failed on its input (a
    ValueError — config, data, model, shapes: ConfigError, DataError, ModelError, …) fails the
    same way every time, so it is not retried; anything else (I/O, device, a lost worker) is."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return True
    # nor is a task whose cache lock stayed held past its bound, or that was stopped
    return not isinstance(exc, (ValueError, LockWaitTimeout, LockWaitInterrupted,
                                StopRequested))


class ProgressReporter:
    """Logs progress (about every 10% or 30 s) and keeps a Prefect progress artifact current."""

    def __init__(self, what: str, artifact_key: str | None = None):
        from prefect.artifacts import create_progress_artifact

        self.what = what
        self.log = _logger()
        self._last = (0.0, -1.0)
        self._artifact = None
        if not _in_run():  # plain Python use: logging only
            return
        try:
            self._artifact = create_progress_artifact(
                progress=0.0, key=artifact_key, description=f"Progress of {what}")
        except Exception as e:  # artifacts are a convenience; never fail the work for them
            self.log.warning("could not create the progress artifact %r: %s", artifact_key, e)

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.monotonic()
        t_last, p_last = self._last
        if done == total or pct - p_last >= 10 or now - t_last >= 30:
            self.log.info("%s %s: %d/%d (%.0f%%)", self.what, detail, done, total, pct)
            self._publish(now, pct)

    def finish(self) -> None:
        """Marks the work complete (100%), e.g. when training stopped before its last epoch."""
        if self._last[1] < 100.0:
            self._publish(time.monotonic(), 100.0)

    def _publish(self, now: float, pct: float) -> None:
        self._last = (now, pct)
        if self._artifact is not None:
            from prefect.artifacts import update_progress_artifact
            try:
                update_progress_artifact(self._artifact, progress=pct)
            except Exception:
                pass


GPU_LIMIT = "gpu"


@contextmanager
def gpu_slot():
    """Holds one slot of the global concurrency limit ``gpu`` while the body runs, so that no
    more GPU tasks run at once, over all workers, than the limit allows
    (``prefect gcl create gpu --limit 1``: one at a time).

    A no-op when no limit named ``gpu`` exists, outside a Prefect run, or when the server cannot
    be asked. (Prefect's own ``concurrency()`` neither creates a missing limit nor blocks on one;
    it logs a warning on every call, which this check avoids.)
    """
    if not _global_limit_exists(GPU_LIMIT):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1):
        yield


def _global_limit_exists(name: str) -> bool:
    if not _in_run():
        return False  # plain Python use: do not reach for (or start) a server
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                return bool(client.read_global_concurrency_limit_by_name(name).active)
            except ObjectNotFound:
                return False
    except Exception as e:  # no server reachable: run without the limit
        _logger().debug("concurrency limit %r not checked (%s); running without it", name, e)
        return False


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _logger():
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("ensemble_lora")
