"""What every task of a run shares: how its cache key is made and where results live.

A cache key is made from the stage name, the code version, the config sections the stage
depends on, the content fingerprint of the data it reads, and its own parameters. Results are
small JSON records (paths + content hashes) stored under ``<run_dir>/.prefect`` beside the files
they describe, with a file-system lock so two runs on one output location never compute the
same task at the same time (SERIALIZABLE cache isolation).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

from ensemble_core.config import RunConfig, parse_config
from ensemble_core.stages import code_version


def as_config(config) -> RunConfig:
    return config if isinstance(config, RunConfig) else parse_config(config)


def stage_key(stage: str, cfg: RunConfig, sections: tuple[str, ...], *extra) -> str:
    blob = json.dumps([stage, code_version(), cfg.run_dir, cfg.fingerprint(*sections),
                       [str(e) for e in extra]], sort_keys=True)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def keyed(key_fn) -> CachePolicy:
    """A cache policy from a key function (configured per run by :func:`for_run`)."""
    return CachePolicy.from_cache_key_fn(key_fn)


def for_run(task_obj, cfg: RunConfig):
    """The task with its cache records stored in the run directory and a file lock per key, so
    an interrupted run resumes from its own directory and two runs never compute one key at
    once. (A remote run directory keeps Prefect's default result storage.)"""
    if "://" in cfg.run_dir:
        return task_obj
    base = Path(cfg.run_dir) / ".prefect"
    policy = task_obj.cache_policy.configure(
        key_storage=base / "cache",
        lock_manager=FileSystemLockManager(lock_files_directory=base / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE)
    return task_obj.with_options(cache_policy=policy)


class ProgressReporter:
    """Logs progress (about every 10% or 30 s) and keeps a Prefect progress artifact current."""

    def __init__(self, what: str, artifact_key: str | None = None):
        from prefect.artifacts import create_progress_artifact

        self.what = what
        self.log = _logger()
        self._last = (0.0, -1.0)
        self._artifact = None
        try:
            self._artifact = create_progress_artifact(
                progress=0.0, key=artifact_key, description=f"Progress of {what}")
        except Exception:  # outside a run context (plain Python use): logging only
            self._artifact = None

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.monotonic()
        t_last, p_last = self._last
        if done == total or pct - p_last >= 10 or now - t_last >= 30:
            self._last = (now, pct)
            self.log.info("%s %s: %d/%d (%.0f%%)", self.what, detail, done, total, pct)
            if self._artifact is not None:
                from prefect.artifacts import update_progress_artifact
                try:
                    update_progress_artifact(self._artifact, progress=pct)
                except Exception:
                    pass


def _logger():
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("ensemble_lora")
