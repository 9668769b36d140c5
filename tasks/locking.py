"""File locks for the cache records of a run directory that survive their holder being killed.

Prefect's ``FileSystemLockManager`` (SERIALIZABLE cache isolation) writes a lock file per cache
key and waits while it exists. Its lock files never expire (Prefect acquires them without a hold
timeout) and say nothing about who holds them, so a run killed while computing a task (SIGKILL,
OOM killer, a lost machine) leaves a lock behind, and the next run on the same directory — the
resume — waits for it forever. Lock creation is also two steps (create an empty file, then write
it), so a concurrent reader can find an empty, unparseable lock file.

:class:`RunLockManager` keeps Prefect's semantics and file layout and adds:

* the lock file names its holder process (host, pid, process start time) and is created
  atomically with its content (a complete temporary file hard-linked into place);
* a lock whose holder process is gone — same host, and the pid no longer exists, is a zombie,
  or was reused by a process started at another time — is stale and is broken (under a
  short-lived ``.break`` guard, so two waiters never break a fresh lock by mistake);
* a lock file that cannot be parsed is treated as held until it is 30 s old (a writer between
  its two steps), then as stale.

A lock held by a live process on another host cannot be checked from here and is waited for,
as with Prefect's own manager, but not forever: a wait longer than ``ENSEMBLE_LORA_LOCK_WAIT_S``
(default 4 hours) fails the task with :class:`LockWaitTimeout`, naming the holder's host and
process and the lock file. A wait also ends when the process is stopping (Ctrl-C, SIGTERM, a cancellation: see
``_stopping``), so a run waiting on a lock can be interrupted instead of hanging in the join of
its worker threads.

:func:`checked_key_fn` guards the other half of a cache record: Prefect keeps the record's
metadata under the run directory (``key_storage``) and its payload in the task's result storage,
the run directory's ``.prefect/results`` (``common.for_run``). A record whose payload is gone or
unreadable — a cleaned directory, a write cut short — would make Prefect fail the task ("Path
... does not exist") instead of recomputing it, and leave the key's lock held; such a record is
removed before the cache is consulted. A payload outside the run directory's result storage (a
record written by an older release into a ``PREFECT_HOME``'s storage) is copied into it, since
Prefect refuses to read it where it is. And a record
is data about files: one that names a file which is missing or differs from the sha256 it was
written with is removed too, so the stage is computed again instead of being served stale
(docs/design.md, "Caching").
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager

from ensemble_core.storage import positive_env, process_alive, process_start_time

UNREADABLE_GRACE_S = 30.0  # an unparseable lock file younger than this is being written
BREAK_GUARD_STALE_S = 30.0  # a .break guard older than this was left by a killed breaker
LOCK_WAIT_ENV = "ENSEMBLE_LORA_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 4 * 3600.0

_HOST = socket.gethostname()


class LockWaitTimeout(TimeoutError):
    """A cache lock stayed held for longer than the bound (``ENSEMBLE_LORA_LOCK_WAIT_S``)."""


class LockWaitInterrupted(RuntimeError):
    """The process is stopping (its main thread ended) while a task waited for a lock."""


def lock_wait_bound() -> float:
    return positive_env(LOCK_WAIT_ENV, DEFAULT_LOCK_WAIT_S, "seconds")


def _stopping() -> bool:
    """The process is stopping, so a lock wait in a worker thread must end: a signal or a
    cancellation asked the run to stop (``runtime.request_stop``, set where the flows' main
    thread waits for task runs: tasks/runner.py); the main thread has ended (the interpreter is
    shutting down and joins the worker threads); or the main thread is leaving a ``with`` block
    because of Ctrl-C or a termination signal (KeyboardInterrupt, SystemExit, Prefect's
    TerminationSignal: a BaseException that is not an Exception) — a thread pool's exit, which
    joins its worker threads, one of which may be waiting here, in a process that is not a
    flow's. The main thread's stack is read with ``sys._current_frames``."""
    from ensemble_core.runtime import stop_requested

    main = threading.main_thread()
    if stop_requested() or not main.is_alive():
        return True
    if threading.current_thread() is main:
        return False
    frame = sys._current_frames().get(main.ident)
    while frame is not None:
        if frame.f_code.co_name == "__exit__":
            exc_type = frame.f_locals.get("exc_type")
            if isinstance(exc_type, type) and issubclass(exc_type, BaseException) \
                    and not issubclass(exc_type, Exception):
                return True
        frame = frame.f_back
    return False


class RunLockManager(FileSystemLockManager):
    """A ``FileSystemLockManager`` whose locks name their holder process and are broken when
    that process is gone (see the module docstring)."""

    # -- reading -----------------------------------------------------------------------------

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # empty or partly written lock file
            path = self._lock_path_for_key(key)
            return {"holder": None, "expiration": None, "path": path, "unreadable": True}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is None:
            return False
        if info.get("unreadable"):
            self._locks.pop(key, None)  # read it again next time
            try:
                age = time.time() - os.stat(info["path"]).st_mtime
            except FileNotFoundError:
                return False
            if age < UNREADABLE_GRACE_S:
                return True
            return not self._break_stale(key, info)
        if self._holder_gone(info):
            return not self._break_stale(key, info)
        return super().is_locked(key, use_cache=True)  # Prefect's expiration handling

    @staticmethod
    def _holder_gone(info: dict) -> bool:
        pid = info.get("pid")
        if info.get("host") != _HOST or not isinstance(pid, int):
            return False  # another host, or a lock written by Prefect's own manager
        return not process_alive(pid, info.get("started"))

    def _break_stale(self, key: str, info: dict) -> bool:
        """Remove a stale lock file unless someone else replaced it meanwhile. Returns True when
        the lock is gone (broken here or by someone else)."""
        path = Path(info["path"])
        guard = path.with_name(path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # someone else is breaking it; a guard left by a killed breaker expires
                if time.time() - os.stat(guard).st_mtime > BREAK_GUARD_STALE_S:
                    os.unlink(guard)
            except FileNotFoundError:
                pass
            return False
        try:
            self._locks.pop(key, None)
            current = self._get_lock_info(key, use_cache=False)
            if current is None:
                return True
            same = (current.get("holder") == info.get("holder")
                    and current.get("pid") == info.get("pid")
                    and bool(current.get("unreadable")) == bool(info.get("unreadable")))
            if same:
                path.unlink(missing_ok=True)
                self._locks.pop(key, None)
                return True
            return False  # replaced by a new holder meanwhile: judge that one next time
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    # -- waiting -----------------------------------------------------------------------------

    def _describe(self, key: str) -> str:
        info = self._get_lock_info(key, use_cache=False) or {}
        path = info.get("path") or self._lock_path_for_key(key)
        who = (f"process {info.get('pid')} on host {info.get('host')}" if info.get("host")
               else "an unknown holder")
        return f"cache key {key} is locked by {who} (lock file {path})"

    def _waited_too_long(self, key: str, bound: float) -> LockWaitTimeout:
        return LockWaitTimeout(
            f"{self._describe(key)} and stayed locked for over {bound:.0f} s; if that run is "
            f"gone, remove the lock file (the bound is {LOCK_WAIT_ENV})")

    def _still_waiting(self, key: str, timeout: Optional[float], bound: float,
                       t0: float) -> bool | None:
        """One check of a lock wait: True to keep waiting, False when ``timeout`` has passed,
        None when the lock is free; raises :class:`LockWaitInterrupted` when the process is
        stopping and :class:`LockWaitTimeout` after ``bound`` with no timeout given."""
        if not self.is_locked(key, use_cache=False):
            return None
        if _stopping():
            raise LockWaitInterrupted(f"stopped while waiting: {self._describe(key)}")
        if time.monotonic() - t0 >= bound:
            if timeout is not None:
                return False
            raise self._waited_too_long(key, bound)
        return True

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        """Wait while ``key`` is locked: False after ``timeout`` seconds; with no timeout, a
        :class:`LockWaitTimeout` after the bound, and :class:`LockWaitInterrupted` as soon as
        the process is stopping."""
        bound, t0 = (lock_wait_bound() if timeout is None else timeout), time.monotonic()
        while (waiting := self._still_waiting(key, timeout, bound, t0)):
            time.sleep(0.1)
        return waiting is None

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        """:meth:`wait_for_lock` for the event loop."""
        import anyio

        bound, t0 = (lock_wait_bound() if timeout is None else timeout), time.monotonic()
        while (waiting := self._still_waiting(key, timeout, bound, t0)):
            await anyio.sleep(0.1)
        return waiting is None

    # -- acquiring ---------------------------------------------------------------------------

    def _create(self, path: Path, holder: str, expiration) -> bool:
        """Create the lock file with its full content in one step; False if it exists."""
        data = json.dumps({"holder": holder,
                           "expiration": str(expiration) if expiration is not None else None,
                           "host": _HOST, "pid": os.getpid(),
                           "started": process_start_time(os.getpid())}).encode()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _try_acquire(self, key: str, holder: str, hold_timeout: Optional[float]) -> bool:
        from datetime import timedelta

        from prefect.types._datetime import now

        path = self._lock_path_for_key(key)
        expiration = now("UTC") + timedelta(seconds=hold_timeout) \
            if hold_timeout is not None else None
        if self._create(path, holder, expiration):
            self._locks[key] = {"holder": holder, "expiration": expiration, "path": path}
            return True
        return self.is_lock_holder(key, holder)  # re-entrant, as Prefect's manager

    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        self._ensure_lock_files_directory_exists()
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if left == 0.0 or not self.wait_for_lock(key, left):
                    return False
            if self._try_acquire(key, holder, hold_timeout):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # lost a race for a free lock: wait for the winner

    async def aacquire_lock(self, key: str, holder: str,
                            acquire_timeout: Optional[float] = None,
                            hold_timeout: Optional[float] = None) -> bool:
        import anyio

        self._ensure_lock_files_directory_exists()
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_locked(key) and not self.is_lock_holder(key, holder):
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if left == 0.0 or not await self.await_for_lock(key, left):
                    return False
            if self._try_acquire(key, holder, hold_timeout):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await anyio.sleep(0.05)


def checked_key_fn(key_fn, key_dir: Path, log=None, record=None,
                   results_dir: Path | None = None):
    """``key_fn`` (a Prefect cache key function), checking the cache record under ``key_dir``
    before returning its key: an orphaned record is removed, a record whose payload lies outside
    ``results_dir`` (the task's result storage) is moved into it, and — when the task returns a
    ``record`` (an ``ensemble_core.records`` class) — a record naming a file that is missing
    or changed is removed, so the task is computed again (see the module docstring)."""
    import functools

    @functools.wraps(key_fn)
    def wrapper(context, parameters):
        key = key_fn(context, parameters)
        if key:
            drop_orphaned_record(Path(key_dir) / key, log, record, results_dir)
        return key
    return wrapper


def _adopt_payload(meta_path: Path, meta: dict, payload: Path, data: bytes, log=None,
                   base: Path | None = None) -> None:
    """A record whose payload lies outside the task's result storage ``base`` (written by an
    older release into a ``PREFECT_HOME``'s storage), which Prefect refuses to read ("outside
    of the base path"): copy the payload into ``base`` and point the record at the copy (both
    written through a temporary file renamed into place)."""
    if base is None:
        return
    base = Path(base).resolve()
    try:
        payload.resolve().relative_to(base)
        return  # already ours
    except ValueError:
        pass
    target = base / meta_path.name
    base.mkdir(parents=True, exist_ok=True)
    for path, content in ((target, data),
                          (meta_path, json.dumps(dict(meta, storage_key=str(target))).encode())):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    if log is not None:
        log.info("cache record %s: its result was in %s; copied into %s", meta_path.name,
                 payload.parent, base)


def drop_orphaned_record(meta_path: Path, log=None, record=None,
                         results_dir: Path | None = None) -> bool:
    """Remove the cache record metadata at ``meta_path`` when the payload it points to is
    missing or (for JSON results) unreadable, or when it is a ``record`` naming files that are
    missing or changed. Returns True when it was removed.

    Prefect writes a record's payload, then its metadata, each in place: unreadable metadata
    younger than ``UNREADABLE_GRACE_S`` is being written and is left alone; a payload that is
    missing or cut short under complete metadata is an orphan (a rewrite in progress writes the
    metadata again after it, so dropping it costs nothing)."""
    try:
        raw = meta_path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        meta = json.loads(raw)
        payload = Path(meta["storage_key"])
        serializer = (meta.get("serializer") or {}).get("type")
        elsewhere = meta.get("storage_block_id") is not None or "://" in str(payload)
    except (ValueError, KeyError, TypeError) as e:
        try:
            if time.time() - meta_path.stat().st_mtime < UNREADABLE_GRACE_S:
                return False
        except FileNotFoundError:
            return False
        why = f"it is unreadable ({type(e).__name__})"
    else:
        if elsewhere:
            return False  # stored by a saved block or at a URL: Prefect's business
        why = None
        try:
            data = payload.read_bytes()
            if serializer == "json":
                value = json.loads(data)
                if record is not None:
                    why = _changed_files(record, value)
        except FileNotFoundError:
            why = "its result payload is missing"
        except (ValueError, OSError) as e:
            why = f"its result payload is unreadable ({type(e).__name__})"
        if why is None:
            _adopt_payload(meta_path, meta, payload, data, log, results_dir)
            return False
    meta_path.unlink(missing_ok=True)
    if log is not None:
        log.warning("cache record %s dropped: %s; the task is computed again", meta_path.name, why)
    return True


def _changed_files(record, value) -> str | None:
    """Why the cached ``record`` (its JSON ``value``) cannot be served, or None."""
    try:
        rec = record.from_json(value)
    except ValueError:
        return f"its result is not a valid {record.__name__}"
    gone = rec.unverified()
    if not gone:
        return None
    more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
    return f"files it names are missing or changed: {', '.join(gone[:3])}{more}"
