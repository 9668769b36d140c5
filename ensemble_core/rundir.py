"""The run directory: one object owns its layout (docs/design.md, "Run directory").

Every path of a run is made here, on any fsspec URL; nothing else joins run paths::

    run.json                              the run's identity (name, model, adapter, seed)
    manifest.json                         every output with its sha256, the config, the code
    gradients/<task>/{train,validation}.parquet, manifest.json    stage 1
    gradients/linearity.json              stage 1's first-order check (Table 5 / Figure 2)
    gradients/linearity-trained.json      the same at the distances the adapters moved
    estimation/plan.json                  stage 2: the subsets, in their batches (kept when
                                          tasks are added or removed: stages.plan_batches)
    estimation/subsets-<batch>.json       stage 2: surrogate fits of a batch of subsets
    estimate_check.json                   the estimates against real fine-tuning (Table 3)
    affinity.json, affinity.png           stage 3: task affinity T (eq. 1) and its heatmap
    groups.json                           stage 3: the groups (SDP, Appendix A.1)
    adapters/<name>/                      stage 4 (group-<k>, all-tasks, theta-star) and
                                          stage 5 (group-<k>-boost-<j>): PEFT adapters
    scores/<name>/<task>.json, .test.json stages 5, 6: a member adapter's scores h_c(s), per task
    boosting.json, ensemble.json          stage 5: boosting steps; groups, members, weights
    metrics.json, report.md               stage 6: test accuracy, compute; the report
    predictions.json, baselines.json      stage 6: test predictions; the paper's baselines
    .prefect/cache, .prefect/locks        Prefect's cache records and locks (tasks/)

A benchmark (``ensemble-lora benchmark``) keeps one run directory per seed below its own,
``seed-<s>/``, and writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` beside them.

Adapters are read and written by PEFT, which needs local files: a remote run directory is an
error at the first adapter (:meth:`RunDir.local`).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import posixpath
import re
import socket
import time
from pathlib import Path

from .records import FileRef
from .storage import (atomic_write_bytes, dumps_json, exists, join, process_alive,
                      process_start_time, read_bytes, read_json, remove_stale_temporaries)

GRADIENT_SPLITS = ("train", "validation")
THETA_STAR = "theta-star"
BASELINE = "all-tasks"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RunDirError(ValueError):
    pass


def inside(path, root) -> Path:
    """``path`` (a local file or directory below ``root``) with every link resolved, checked to
    stay inside ``root``: a run's or a version's files are read only where they are, never
    through a link out of the directory (RunDirError naming the path and where it leads)."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise RunDirError(f"{path} leads out of {root} (to {real}) through a link; a run's and "
                          "a version's files must be inside their directory")
    return real


class RunDir:
    """The paths and files of one run directory (a local path or an fsspec URL)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    # -- composing paths ---------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        for p in parts:
            if not _NAME.match(p) or ".." in p:
                raise RunDirError(f"{p!r} cannot be a file name in the run directory {self.url}")
        return join(self.url, *parts)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def local(self, url: str) -> Path:
        """A path of this run directory as a local file path (for PEFT, which reads and writes
        local files only)."""
        if not self.is_local:
            raise RunDirError(f"{url} is not a local path (the run directory {self.url} is "
                              "not on a local disk)")
        return Path(url.replace("file://", "", 1) if url.startswith("file://") else url)

    def fetch(self, rel: str, pins: dict[str, str] | None = None) -> Path:
        """A directory of the run (``rel``: an adapter, what PEFT reads) as a local directory.
        For a local run directory, the directory itself. For one at a URL, a complete copy in
        the local cache (``fetched/<key>-<name>/`` under ENSEMBLE_LORA_CACHE), downloaded once
        per content: the key is the sha256 of ``pins`` (file name in the directory -> the
        sha256 a record pins it to), or, without pins, of the listing's sizes and ETags. The
        copy is built under a temporary name, its pinned files checked, and only then renamed
        into place, so a half-downloaded copy or one of other content is never used
        (RunDirError naming the URL of a file that differs from its pin)."""
        url = self.at(rel)
        if self.is_local:
            return self.local(url)
        import shutil

        from .models import default_cache_dir
        from .storage import file_sha256, fs_and_path, temporary_dir, temporary_prefix

        fs, path = fs_and_path(url)
        try:
            listing = {p: info for p, info in fs.find(path, detail=True).items()
                       if info.get("type", "file") == "file"}
        except FileNotFoundError:
            listing = {}
        if not listing:
            raise RunDirError(f"{url}: no such directory in the run directory")
        if pins:
            key = json.dumps(sorted(pins.items()))
        else:
            key = json.dumps(sorted((posixpath.relpath(p, path), info.get("size"),
                                     str(info.get("ETag") or info.get("etag")
                                         or info.get("mtime")))
                                    for p, info in listing.items()))
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        dest = default_cache_dir() / "fetched" / f"{digest}-{posixpath.basename(path)}"
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(str(dest.parent))  # downloads cut short by a killed process
        tmp = temporary_dir(temporary_prefix(dest.name), dest.parent)
        try:
            for p in listing:
                target = tmp / posixpath.relpath(p, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(p, str(target))
            for name, sha in (pins or {}).items():
                got = file_sha256(str(tmp / name)) if (tmp / name).is_file() else None
                if got != sha:
                    raise RunDirError(f"{url}/{name}: " + (
                        "missing" if got is None else "its content differs from the sha256 "
                        "the run's records pin (changed since it was written)"))
            try:
                os.rename(tmp, dest)
            except OSError:  # another process fetched the same content meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @contextlib.contextmanager
    def writing_dir(self, url: str):
        """Where a library that writes local files only (PEFT) writes a directory of the run:
        for a local run directory, ``url`` itself (the writer renames it into place); for one
        at a URL, a private temporary directory, uploaded when the writer is done and then
        removed. An object store renames nothing, so the upload is ordered instead: the
        weights a previous write left there are deleted first, the small files uploaded, the
        weights last (each object appears only once its upload is complete). A record pins
        the weights' sha256, so an upload cut short at any point — no weights, or the old
        config beside no weights — is never taken as done (docs/design.md, "Object storage and
        several machines")."""
        if self.is_local:
            yield self.local(url)
            return
        import shutil
        import tempfile

        from .storage import fs_and_path

        tmp = Path(tempfile.mkdtemp(prefix="ensemble-lora-upload-"))
        try:
            yield tmp / "dir"
            fs, path = fs_and_path(url)
            files = sorted(p for p in (tmp / "dir").rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name.endswith(".safetensors"))  # the weights last
            try:
                old = [p for p in fs.find(path) if p.endswith(".safetensors")]
            except FileNotFoundError:
                old = []
            for p in old:  # first: no old weights beside new files
                fs.rm_file(p)
            for f in files:
                fs.put_file(str(f), f"{path}/{f.relative_to(tmp / 'dir').as_posix()}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def relative(self, url: str) -> str:
        """A path of this run directory relative to it (as ensemble.json stores adapters)."""
        prefix = self.url + "/"
        if not url.startswith(prefix):
            raise RunDirError(f"{url} is not inside the run directory {self.url}")
        return url[len(prefix):]

    def resolve(self, rel: str) -> str:
        """A relative path read from one of the run's files, as a path of this directory; an
        absolute path or one that leaves the directory is an error."""
        if not isinstance(rel, str) or not rel or rel.startswith(("/", "~")) or "://" in rel \
                or "\\" in rel:
            raise RunDirError(f"path {rel!r} (from a file of {self.url}) must be relative to "
                              "the run directory")
        norm = posixpath.normpath(rel)
        if norm == ".." or norm.startswith("../") or norm == ".":
            raise RunDirError(f"path {rel!r} (from a file of {self.url}) leaves the run "
                              "directory")
        return join(self.url, norm)

    # -- the layout --------------------------------------------------------------------------
    @property
    def run_json(self) -> str:
        return self._path("run.json")

    @property
    def manifest(self) -> str:
        return self._path("manifest.json")

    def features(self, task: str, split: str) -> str:
        if split not in GRADIENT_SPLITS:
            raise RunDirError(f"stage-1 features have splits {GRADIENT_SPLITS}, not {split!r}")
        return self._path("gradients", task, f"{split}.parquet")

    def features_manifest(self, task: str) -> str:
        return self._path("gradients", task, "manifest.json")

    @property
    def linearity(self) -> str:
        return self._path("gradients", "linearity.json")

    @property
    def linearity_trained(self) -> str:
        return self._path("gradients", "linearity-trained.json")

    @property
    def subset_plan(self) -> str:
        return self._path("estimation", "plan.json")

    def subsets(self, batch: int) -> str:
        return self._path("estimation", f"subsets-{int(batch):04d}.json")

    @property
    def estimate_check(self) -> str:
        return self._path("estimate_check.json")

    @property
    def affinity(self) -> str:
        return self._path("affinity.json")

    @property
    def affinity_png(self) -> str:
        return self._path("affinity.png")

    @property
    def groups(self) -> str:
        return self._path("groups.json")

    def adapter(self, name: str) -> str:
        return self._path("adapters", name)

    def adapter_weights(self, name: str) -> str:
        return self._path("adapters", name, "adapter_model.safetensors")

    def scores(self, member: str, phase: str, task: str) -> str:
        return self._path("scores", member, f"{task}.json" if phase == "fit" else
                          f"{task}.{phase}.json")

    @property
    def boosting(self) -> str:
        return self._path("boosting.json")

    @property
    def ensemble(self) -> str:
        return self._path("ensemble.json")

    @property
    def metrics(self) -> str:
        return self._path("metrics.json")

    @property
    def predictions(self) -> str:
        return self._path("predictions.json")

    @property
    def baselines(self) -> str:
        return self._path("baselines.json")

    @property
    def report(self) -> str:
        return self._path("report.md")

    # -- a benchmark: one run directory per seed below this one ------------------------------
    def seed_run(self, seed: int) -> str:
        return self._path(f"seed-{int(seed)}")

    @property
    def benchmark_json(self) -> str:
        return self._path("benchmark.json")

    @property
    def benchmark_md(self) -> str:
        return self._path("benchmark.md")

    @property
    def benchmark_png(self) -> str:
        return self._path("benchmark.png")

    @property
    def prefect(self) -> Path | None:
        """Where Prefect keeps this run's cache records and locks (local run directories)."""
        return self.local(join(self.url, ".prefect")) if self.is_local else None

    # -- reading and writing -----------------------------------------------------------------
    def write_json(self, url: str, obj) -> FileRef:
        """Write a file of the run; its FileRef names it relative to the run directory."""
        return FileRef(self.relative(url), atomic_write_bytes(url, dumps_json(obj)))

    def write_bytes(self, url: str, data: bytes) -> FileRef:
        return FileRef(self.relative(url), atomic_write_bytes(url, data))

    def at(self, rel: str) -> str:
        """A path from a record (relative to the run directory) as a URL of this directory;
        one that leaves the directory is an error (``resolve``)."""
        return self.resolve(rel)

    @staticmethod
    def read_json(url: str):
        return read_json(url)

    @staticmethod
    def read_text(url: str) -> str:
        return read_bytes(url).decode("utf-8")

    @staticmethod
    def exists(url: str) -> bool:
        return exists(url)

    # -- claiming ----------------------------------------------------------------------------
    def claim(self, identity: dict, config: dict | None = None, normalize=None,
              redis_url: str | None = None) -> dict:
        """Mark the directory as this run's (``run.json``) or check that it is; leftovers of
        writes that a killed process did not finish are removed.

        A run directory belongs to one run identity: its name, base model, adapter and seed —
        nothing computed under another identity can be reused. Data, estimation, clustering,
        training and boosting settings may change from one run to the next in one directory:
        the stages whose inputs changed are recomputed (overwriting their files), the rest is
        served from the cache after its files are checked (tasks/common.py).

        While a process works on the directory it holds it with its resolved ``config``
        (``.prefect/holders/``, removed when the process exits): a process with another
        config is refused while one is running, with the keys that differ — two configs
        writing one directory at once would overwrite each other's files. Processes with the
        same config share it (the cache's locks keep them from computing one thing twice).
        The check and the first ``run.json`` are made under a short exclusive guard, so two
        processes starting together cannot both claim a fresh directory. Guard and holders
        are files in a local run directory (one machine), or leases in the Redis server at
        ``redis_url`` (several machines, or a run directory on an object store:
        ``coordination``). A run directory on an object store without Redis has neither: one
        process at a time is up to you (a warning says so).
        ``normalize(stored)`` puts a stored identity in today's form before comparing."""
        from .coordination import RedisHolders
        from .storage import check_writable

        if not self.is_local:  # an unreachable store, a missing bucket, wrong credentials
            try:
                check_writable(self.url, "run directory")
            except OSError as e:
                raise RunDirError(str(e)) from None
        redis = RedisHolders(redis_url, self.url) if redis_url else None
        if redis is None and not self.is_local:
            _warn_uncoordinated(self.url)
        with (redis.guard() if redis is not None else self._claim_guard()):
            if exists(self.run_json):
                have = read_json(self.run_json)
                if normalize is not None:  # an identity written by an older release
                    have = normalize(have)
                diff = [k for k in identity if have.get(k) != identity[k]]
                if diff:
                    raise RunDirError(
                        f"run directory {self.url} belongs to another run (different "
                        f"{', '.join(diff)}); choose another output_dir, e.g. --set "
                        f"output_dir=runs/{identity.get('name', 'run')}-2")
                if config is not None:
                    self._hold(config, redis)
                if self.is_local:  # an object store has no temporaries (storage.py)
                    remove_stale_temporaries(self.url)
                return have
            if config is not None:
                self._hold(config, redis)
            self.write_json(self.run_json, identity)
            return identity

    # the directory's guard and holders (local run directories)
    def _holders_dir(self) -> Path | None:
        base = self.prefect
        return None if base is None else base / "holders"

    @contextlib.contextmanager
    def _claim_guard(self, wait_s: float = 60.0):
        if not self.is_local:
            yield
            return
        base = self.prefect
        base.mkdir(parents=True, exist_ok=True)
        guard = base / "claim.lock"
        me = json.dumps(_me()).encode()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _guard_stale(guard):
                    guard.unlink(missing_ok=True)
                    continue
                if time.monotonic() > deadline:
                    raise RunDirError(f"{guard} has been held for over {wait_s:.0f} s; if no "
                                      "run is starting on this directory, remove it") from None
                time.sleep(0.05)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(me)
            break
        try:
            yield
        finally:
            guard.unlink(missing_ok=True)

    def _hold(self, config: dict, redis=None) -> None:
        digest = _config_digest(config)
        me = _me()
        if redis is not None:
            for h in redis.others(f"{me['host']}-{me['pid']}"):
                if h.get("config_sha256") != digest:
                    self._refuse(h, config, None)
            redis.hold(f"{me['host']}-{me['pid']}", dict(me, config_sha256=digest, config=config))
            return
        d = self._holders_dir()
        if d is None:
            return
        d.mkdir(parents=True, exist_ok=True)
        mine = d / f"{me['host']}-{me['pid']}.json"
        for f in sorted(d.glob("*.json")):
            if f == mine:
                continue
            try:
                h = json.loads(f.read_bytes())
                host, pid = h["host"], int(h["pid"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                if time.time() - f.stat().st_mtime > 60:  # a holder file cut short
                    f.unlink(missing_ok=True)
                continue
            if host == _HOST and not process_alive(pid, h.get("started")):
                f.unlink(missing_ok=True)  # its process is gone
                continue
            if h.get("config_sha256") != digest:
                self._refuse(h, config, f)
        atomic_write_bytes(str(mine), dumps_json(dict(me, config_sha256=digest,
                                                      config=config)))
        _release_at_exit(mine)

    def _refuse(self, holder: dict, config: dict, file: Path | None) -> None:
        keys = config_difference(holder.get("config") or {}, config)
        shown = "; ".join(keys[:6]) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
        host = holder.get("host")
        raise RunDirError(
            f"run directory {self.url} is in use by another run with a different config (pid "
            f"{holder.get('pid')} on host {host}): {shown or 'the configs differ'}. Wait for "
            "it to finish, or use another output_dir (two configs writing one directory at "
            "once would overwrite each other's files)"
            + (f"; if that process is gone, remove {file}" if file is not None
               and host != _HOST else ""))


_HOST = socket.gethostname()
_HELD: set[Path] = set()
_WARNED: set[str] = set()


def _warn_uncoordinated(url: str) -> None:
    if url in _WARNED:
        return
    _WARNED.add(url)
    import logging

    logging.getLogger("ensemble_lora").warning(
        "run directory %s is not on a local disk and no Redis server coordinates it "
        "(runner.redis_url or ENSEMBLE_LORA_REDIS_URL): only one process may work on it at a "
        "time", url)


def _me() -> dict:
    return {"host": _HOST, "pid": os.getpid(), "started": process_start_time(os.getpid())}


def _guard_stale(guard: Path) -> bool:
    """A claim guard whose process is gone, or that is unreadable and over 10 s old."""
    try:
        h = json.loads(guard.read_bytes())
        if h.get("host") == _HOST:
            return not process_alive(int(h["pid"]), h.get("started"))
        return time.time() - guard.stat().st_mtime > 600
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return time.time() - guard.stat().st_mtime > 10
        except FileNotFoundError:
            return False


def _release_at_exit(path: Path) -> None:
    if not _HELD:
        atexit.register(_release_all)
    _HELD.add(path)


def _release_all() -> None:
    for p in list(_HELD):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass
    _HELD.clear()


def _config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def config_difference(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON configs differ, each with both values."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_difference(va, vb, key + "."))
        elif isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            out.extend(config_difference(dict(enumerate(va)), dict(enumerate(vb)), key + "."))
        elif va != vb:
            out.append(f"{key}: {_short(va)} vs {_short(vb)}")
    return out


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
