"""Who works on a run directory, across machines (docs/design.md, "Object storage and several
machines").

Two things need to know: the run claim (``RunDir.claim``: one config at a time writes a
directory; processes of one config share it) and the cache locks (tasks/locking.py: one task
run computes a cache key at a time). On one machine with a local run directory, files in the
directory do both, with no server (``.prefect/holders``, ``.prefect/locks``; a holder whose
process is gone is recognised by its pid). Processes on several machines cannot see each
other's pids, and an object store cannot create a file only if it is absent; there a Redis
server does both: ``runner.redis_url`` in the config, or ``ENSEMBLE_LORA_REDIS_URL``.

Everything a process holds in Redis is a lease: a key with a time to live (``LEASE_S``,
``ENSEMBLE_LORA_LEASE_S``) that one daemon thread of the process renews while the process
lives (:class:`Leases`). A process killed with SIGKILL, or a machine that is lost, holds
nothing a lease later — no pid to check, no lock to break by hand.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time

from .storage import positive_env

__all__ = ["REDIS_ENV", "redis_url", "client", "lease_s", "Leases", "RedisHolders",
           "CoordinationError"]

REDIS_ENV = "ENSEMBLE_LORA_REDIS_URL"
LEASE_ENV = "ENSEMBLE_LORA_LEASE_S"
PREFIX = "ensemble-lora"
_log = logging.getLogger("ensemble_lora")


class CoordinationError(RuntimeError):
    """The Redis server cannot be reached (naming its URL, without the password)."""


def redis_url(configured: str | None = None) -> str | None:
    """The Redis server that coordinates a run: the config's ``runner.redis_url``, else
    ``ENSEMBLE_LORA_REDIS_URL``, else None (files in a local run directory)."""
    return configured or os.environ.get(REDIS_ENV) or None


def lease_s() -> float:
    return positive_env(LEASE_ENV, 30.0, "seconds")


def shown(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


@functools.lru_cache(maxsize=None)
def client(url: str):
    """A Redis client for ``url``, checked once per process (CoordinationError naming the
    URL when the server cannot be reached)."""
    import redis

    try:
        c = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=30)
        c.ping()
    except Exception as e:
        client.cache_clear()
        raise CoordinationError(f"cannot reach the Redis server {shown(url)} (runner.redis_url "
                                f"or {REDIS_ENV}): {e}") from None
    return c


def scope(run_dir_url: str) -> str:
    """The Redis name space of one run directory."""
    return hashlib.sha256(run_dir_url.rstrip("/").encode()).hexdigest()[:16]


class Leases:
    """The leases this process holds on one Redis server, renewed every third of a lease by a
    daemon thread until released (or the process ends: then they expire)."""

    _all: dict[str, "Leases"] = {}
    _guard = threading.Lock()

    def __init__(self, url: str):
        self.url = url
        self._keys: dict[str, bytes] = {}  # key -> the value this process set
        self._locks: dict[int, object] = {}  # redis-py Lock objects, renewed by reacquire()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, url: str) -> "Leases":
        with cls._guard:
            return cls._all.setdefault(url, cls(url))

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._renew_forever, daemon=True,
                                            name="ensemble-lora-leases")
            self._thread.start()

    def hold_key(self, key: str, value: bytes) -> None:
        """Set ``key`` to ``value`` for a lease, renewed until :meth:`release_key`."""
        client(self.url).set(key, value, px=int(lease_s() * 1000))
        with self._mutex:
            self._keys[key] = value
            self._start()

    def release_key(self, key: str) -> None:
        with self._mutex:
            mine = self._keys.pop(key, None)
        if mine is not None:
            with contextlib.suppress(Exception):
                if client(self.url).get(key) == mine:
                    client(self.url).delete(key)

    def hold_lock(self, lock) -> None:
        """Renew a redis-py ``Lock`` (taken with a lease as its timeout) until released."""
        with self._mutex:
            self._locks[id(lock)] = lock
            self._start()

    def release_lock(self, lock) -> None:
        with self._mutex:
            self._locks.pop(id(lock), None)

    def _renew_forever(self) -> None:
        from redis.exceptions import LockError

        while True:
            time.sleep(lease_s() / 3)
            with self._mutex:
                keys, locks = dict(self._keys), list(self._locks.values())
            ms = int(lease_s() * 1000)
            for key, value in keys.items():
                try:
                    # SET XX keeps the key only if it exists: a lease that expired (this
                    # process stalled longer than a lease) is not silently taken back
                    if not client(self.url).set(key, value, px=ms, xx=True):
                        _log.warning("lease %s expired before it was renewed", key)
                        with self._mutex:
                            self._keys.pop(key, None)
                except Exception as e:  # the server is away: try again next round
                    _log.debug("lease %s not renewed: %s", key, e)
            for lock in locks:
                try:
                    lock.reacquire()
                except LockError:
                    _log.warning("cache lock %s was lost before it was renewed", lock.name)
                    self.release_lock(lock)
                except Exception as e:
                    _log.debug("cache lock %s not renewed: %s", lock.name, e)


class RedisHolders:
    """The run claim's guard and holders in Redis, for one run directory: the guard is a Redis
    lock (a lease); each process holding the directory is a key
    ``ensemble-lora:<scope>:holder:<host>-<pid>`` whose value is its config and which expires
    a lease after the process stops renewing it."""

    def __init__(self, url: str, run_dir_url: str):
        self.url = url
        self.prefix = f"{PREFIX}:{scope(run_dir_url)}"

    @contextlib.contextmanager
    def guard(self, wait_s: float = 60.0):
        lock = client(self.url).lock(f"{self.prefix}:claim", timeout=lease_s(),
                                     blocking_timeout=wait_s, thread_local=False)
        if not lock.acquire():
            raise CoordinationError(f"the claim of this run directory has been held for over "
                                    f"{wait_s:.0f} s in {shown(self.url)}")
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                lock.release()

    def others(self, me: str) -> list[dict]:
        """The holders other than ``me`` (their host, pid, config and its digest)."""
        c = client(self.url)
        out = []
        for key in c.scan_iter(match=f"{self.prefix}:holder:*", count=500):
            name = key.decode().rsplit(":", 1)[-1]
            if name == me:
                continue
            raw = c.get(key)
            if raw is None:  # expired meanwhile
                continue
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def hold(self, me: str, holder: dict) -> None:
        Leases.of(self.url).hold_key(f"{self.prefix}:holder:{me}",
                                     json.dumps(holder, sort_keys=True).encode())
