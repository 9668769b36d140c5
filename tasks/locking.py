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

import contextlib
import dataclasses
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from prefect.locking.filesystem import FileSystemLockManager
from prefect_redis.locking import RedisLockManager

from ensemble_core.storage import (atomic_write_bytes, exists, fs_and_path, is_local_fs, join,
                                   positive_env, process_alive, process_start_time, read_bytes)

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


def checked_key_fn(key_fn, key_dir, log=None, record=None, results_dir=None,
                   run_dir: str | None = None):
    """``key_fn`` (a Prefect cache key function), checking the cache record under ``key_dir``
    (a local path or fsspec URL) before returning its key: an orphaned record is removed, a
    record whose payload lies outside ``results_dir`` (the task's result storage) is pointed
    at this directory's copy of it, or its payload copied in, and — when the task returns a
    ``record`` (an ``ensemble_core.records`` class) — a record naming a file of ``run_dir``
    that is missing or changed is removed, so the task is computed again (see the module
    docstring)."""
    import functools

    @functools.wraps(key_fn)
    def wrapper(context, parameters):
        key = key_fn(context, parameters)
        if key:
            drop_orphaned_record(join(str(key_dir), key), log, record,
                                 None if results_dir is None else str(results_dir), run_dir)
        return key
    return wrapper


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _relocate(meta_url: str, meta: dict, payload_url: str, data: bytes | None, log=None,
              results: str | None = None) -> None:
    """A record whose payload is not in the task's result storage ``results``: a run
    directory copied or moved to another path or URL (its records name the payloads where
    they were written: this directory's copy, of the same name, is used), or a record of an
    older release whose payload is in a ``PREFECT_HOME``'s storage (copied in). Prefect
    refuses to read a payload outside its storage's base path ("outside of the base path");
    the record is pointed at the copy here (each file written whole: ``atomic_write_bytes``).
    ``data`` is the payload where the record names it (None: not readable there)."""
    if results is None:
        return
    name = posixpath.basename(payload_url.rstrip("/"))
    target = join(results, name)
    if _same_place(payload_url, target):
        return  # already ours
    if not exists(target):
        if data is None:
            return
        atomic_write_bytes(target, data)
    if "://" not in target:
        target = str(Path(target).resolve())
    atomic_write_bytes(meta_url, json.dumps(dict(meta, storage_key=target)).encode())
    if log is not None:
        log.info("cache record %s: its result was in %s; now read from %s", name,
                 posixpath.dirname(payload_url), results)


def drop_orphaned_record(meta_url, log=None, record=None, results_dir: str | None = None,
                         run_dir: str | None = None) -> bool:
    """Remove the cache record metadata at ``meta_url`` when the payload it points to is
    missing or (for JSON results) unreadable, or when it is a ``record`` naming files (of
    ``run_dir``) that are missing or changed. Returns True when it was removed.

    On a local disk Prefect writes a record's payload, then its metadata, each in place:
    unreadable metadata younger than ``UNREADABLE_GRACE_S`` is being written and is left
    alone; a payload that is missing or cut short under complete metadata is an orphan (a
    rewrite in progress writes the metadata again after it, so dropping it costs nothing). On
    an object store each is one object, written whole or not at all."""
    meta_url = str(meta_url)
    fs, meta_path = fs_and_path(meta_url)
    try:
        raw = fs.cat_file(meta_path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    data = None
    try:
        meta = json.loads(raw)
        payload = str(meta["storage_key"])
        serializer = (meta.get("serializer") or {}).get("type")
        elsewhere = meta.get("storage_block_id") is not None
    except (ValueError, KeyError, TypeError) as e:
        try:
            if is_local_fs(fs) and time.time() - os.stat(meta_path).st_mtime \
                    < UNREADABLE_GRACE_S:
                return False
        except FileNotFoundError:
            return False
        why = f"it is unreadable ({type(e).__name__})"
    else:
        why = None
        if elsewhere:  # a saved block's key, relative to its base path: the run's storage
            if results_dir is None:
                return False
            payload = where = ours = join(results_dir, payload)
        else:
            ours = None if results_dir is None else \
                join(results_dir, posixpath.basename(payload.rstrip("/")))
            where = ours if ours is not None and not _same_place(payload, ours) \
                and exists(ours) else payload
        try:
            data = read_bytes(where)
            if serializer == "json":
                value = json.loads(data)
                if record is not None:
                    why = _changed_files(record, value, run_dir)
        except FileNotFoundError:
            why = "its result payload is missing"
        except (ValueError, OSError) as e:
            why = f"its result payload is unreadable ({type(e).__name__})"
        if why is None:
            _relocate(meta_url, meta, payload, data, log, results_dir)
            return False
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(meta_path)
    if log is not None:
        log.warning("cache record %s dropped: %s; the task is computed again",
                    posixpath.basename(meta_path), why)
    return True


def _changed_files(record, value, run_dir: str | None = None) -> str | None:
    """Why the cached ``record`` (its JSON ``value``) cannot be served, or None."""
    try:
        rec = record.from_json(value)
    except ValueError:
        return f"its result is not a valid {record.__name__}"
    gone = rec.unverified(run_dir)
    if not gone:
        return None
    more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
    return f"files it names are missing or changed: {', '.join(gone[:3])}{more}"


# -- several machines: Redis ------------------------------------------------------------------

class LeasedRedisLockManager(RedisLockManager):
    """prefect-redis's ``RedisLockManager`` with every lock a lease: taken with a time to live
    (``coordination.lease_s``) and renewed by this process while it lives
    (``coordination.Leases``), so the lock of a worker killed with SIGKILL, or of a lost
    machine, frees itself a lease later. (Prefect takes cache locks with no hold timeout,
    which in Redis means forever.) Lock names are in the run directory's name space; a wait
    ends when the process is stopping (LockWaitInterrupted), as with the file locks."""

    def __init__(self, url: str, run_dir_url: str):
        from ensemble_core.coordination import PREFIX, client, scope

        client(url)  # reachable, or an error naming the URL
        self.run_dir_url = run_dir_url
        self.prefix = f"{PREFIX}:{scope(run_dir_url)}:lock:"
        super().__init__(connection_url=url)

    def __getstate__(self):
        return dict(super().__getstate__(), run_dir_url=self.run_dir_url, prefix=self.prefix)

    def _lock_name_for_key(self, key: str) -> str:
        return self.prefix + key

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        from ensemble_core.coordination import Leases, lease_s

        leased = hold_timeout is None
        ok = super().acquire_lock(key, holder, acquire_timeout,
                                  lease_s() if leased else hold_timeout)
        if ok and leased:
            Leases.of(self.connection_url).hold_lock(self._locks[self._lock_name_for_key(key)])
        return ok

    async def aacquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None):
        import anyio

        return await anyio.to_thread.run_sync(
            lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout))

    def release_lock(self, key, holder):
        from ensemble_core.coordination import Leases

        lock = self._locks.get(self._lock_name_for_key(key))
        if lock is not None:
            Leases.of(self.connection_url).release_lock(lock)
        super().release_lock(key, holder)

    def wait_for_lock(self, key, timeout=None):
        t0 = time.monotonic()
        while self.is_locked(key):
            if _stopping():
                raise LockWaitInterrupted(f"stopped while waiting for cache key {key} "
                                          "(locked in Redis)")
            if timeout is not None and time.monotonic() - t0 >= timeout:
                return False
            time.sleep(0.1)
        return True

    async def await_for_lock(self, key, timeout=None):
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.wait_for_lock(key, timeout))


# -- where a run's cache lives ----------------------------------------------------------------

@dataclasses.dataclass
class RunStore:
    """Where the cache records of one run directory live and what locks them: the records'
    metadata (``keys``, Prefect's ``key_storage``) and payloads (``results``, the tasks'
    result storage) under ``<run_dir>/.prefect/`` — a local path (Prefect's LocalFileSystem)
    or, for a run directory at a URL, Prefect's RemoteFileSystem at that URL — so the cache
    travels with the directory; and the lock manager: files in ``.prefect/locks``
    (:class:`RunLockManager`, one machine) or Redis leases (:class:`LeasedRedisLockManager`,
    with ``runner.redis_url``). A run directory on an object store without Redis is locked
    in this process only (``MemoryLockManager``): one process at a time."""
    run_dir: str
    keys_url: str
    results_url: str
    keys: object
    results: object
    locks: object


_STORES: dict[tuple, RunStore] = {}
_STORES_LOCK = threading.Lock()


def run_store(run_dir: str, redis: str | None = None) -> RunStore:
    """The :class:`RunStore` of a run directory, one per process (its lock manager keeps the
    locks this process holds)."""
    key = (run_dir, redis)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = _make_store(run_dir, redis)
        return store


def _saved_results_block(url: str):
    """Prefect's RemoteFileSystem block at ``url``, saved on the server (Prefect takes only a
    saved block as a task's result storage), named after the URL (``ensemble-lora-<hash>``).
    A record written through a saved block names its payload relative to the block's base
    path, so the records of a run directory copied to another URL read the copy's payloads."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.filesystems import RemoteFileSystem

    from ensemble_core.coordination import scope

    name = f"ensemble-lora-{scope(url)}"
    try:
        block = RemoteFileSystem.load(name)
        if block.basepath == url:
            return block
    except ValueError:  # no such block yet
        pass
    block = RemoteFileSystem(basepath=url)
    try:
        block.save(name, overwrite=True)
    except ObjectAlreadyExists:  # saved by another process meanwhile
        return RemoteFileSystem.load(name)
    return block


def _make_store(run_dir: str, redis: str | None) -> RunStore:
    from ensemble_core.rundir import RunDir

    rd = RunDir(run_dir)
    base = join(rd.url, ".prefect")
    keys_url, results_url = join(base, "cache"), join(base, "results")
    if rd.is_local:
        local = rd.local(base)
        keys, results = local / "cache", local / "results"
        keys_url, results_url = str(keys), str(results)
    else:
        from prefect.filesystems import RemoteFileSystem

        keys = RemoteFileSystem(basepath=keys_url)
        results = _saved_results_block(results_url)
    if redis:
        locks = LeasedRedisLockManager(redis, rd.url)
    elif rd.is_local:
        locks = RunLockManager(lock_files_directory=rd.local(base) / "locks")
    else:
        from prefect.locking.memory import MemoryLockManager

        locks = MemoryLockManager()
    return RunStore(rd.url, keys_url, results_url, keys, results, locks)
