"""Files on any fsspec URL: atomic writes, JSON, content hashes, stale temporaries.

Every file on a local disk is written under a temporary name in the same directory and renamed
when complete, so a reader never sees a half-written file under its final name (on an object
store, an object is written in one request and appears only when complete:
:func:`atomic_write_bytes`). A temporary's name carries
its writer (``<name>.tmp-<host>-<pid>-<random>``), so the leftovers of a killed writer can be
told from a live writer's work in progress (:func:`remove_stale_temporaries`).

Only :class:`rundir.RunDir` composes paths inside a run directory; this module is the layer
under it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid

import fsspec

_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:32] or "host"


# A run directory on an object store is written by other processes and machines: no listing
# cache (s3fs, gcsfs and adlfs keep one per file-system instance), so a file another worker
# wrote is seen at once.
for _protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def fs_and_path(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def temporary_prefix(name: str) -> str:
    """The start of a temporary name for ``name``, naming this host and process (a random
    part follows: ``tempfile.mkdtemp(prefix=...)`` or :func:`temporary_name`)."""
    return f"{name}.tmp-{_HOST}-{os.getpid()}-"


def positive_env(name: str, default: float, unit: str, error: type = ValueError) -> float:
    """A positive number read from the environment variable ``name`` (``default`` when unset);
    ``error`` naming the variable, its value and the unit when it is not one."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise error(f"{name}={raw!r} is not a number of {unit}") from None
    if not value > 0:  # also NaN
        raise error(f"{name}={raw!r} must be a positive number of {unit}")
    return value


def temporary_dir(prefix: str, parent):
    """A new empty directory under ``parent`` to be renamed into place when complete, with the
    permissions a plain ``mkdir`` gives (``tempfile.mkdtemp`` makes it owner-only, which the
    rename would keep: adapters other users of a shared run directory could not read)."""
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def temporary_name(path: str) -> str:
    """A sibling temporary name for ``path`` that names this host and process."""
    return temporary_prefix(path) + uuid.uuid4().hex[:12]


def is_local_fs(fs) -> bool:
    """Whether ``fs`` is the local file system (where a rename is atomic)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def atomic_write_bytes(url: str, data: bytes) -> str:
    """Write bytes to url so that no reader sees them half-written; returns the sha256 of the
    content. On a local disk, through a temporary sibling renamed into place. On an object
    store, in one request: an object appears under its key only once its upload is complete (a
    PUT, or a multipart upload's completion), and an object store has no atomic rename to
    offer anyway (docs/design.md, "Object storage")."""
    fs, path = fs_and_path(url)
    if not is_local_fs(fs):
        try:
            fs.pipe_file(path, data)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise named_os_error(e, f"cannot write {url}") from e
        return hashlib.sha256(data).hexdigest()
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        try:
            fs.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise named_os_error(e, f"cannot create the directory of {url}") from e
    tmp = temporary_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException as e:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise named_os_error(e, f"cannot write {url}") from e
        raise
    return hashlib.sha256(data).hexdigest()


def check_writable(url: str, what: str = "output_dir") -> None:
    """Create the directory ``url`` (if needed) and a probe file in it, then remove the probe:
    an OSError naming ``what`` and the URL (an unreachable store, a missing bucket, wrong
    credentials, a read-only disk) before anything is computed for it."""
    try:
        fs, path = fs_and_path(url)
        if is_local_fs(fs):  # (on an object store, makedirs would create a missing bucket)
            fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:12]}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        blocker = _file_in_the_way(url)
        if blocker:
            why += f"; {blocker} is a file, not a directory"
        raise OSError(f"{what} {url} is not writable: {why}") from None


def _file_in_the_way(url: str) -> str | None:
    from pathlib import Path

    if "://" in url and not url.startswith("file://"):
        return None
    p = Path(url.replace("file://", ""))
    for parent in [p, *p.parents]:
        if parent.exists():
            return str(parent) if not parent.is_dir() else None
    return None


def named_os_error(e: OSError, what: str) -> OSError:
    """An OSError (a full disk: ENOSPC, no permission, a read-only file system) whose message
    says what was being done to which path (``what``): the bare "[Errno 28] No space left on
    device" names nothing."""
    import errno as _errno

    reason = e.strerror or str(e) or type(e).__name__
    hint = " (the disk is full: free space or choose another location)" \
        if e.errno == _errno.ENOSPC else ""
    out = OSError(e.errno, f"{what}: {reason}{hint}")
    return out


def jsonable(obj):
    """A JSON-able copy: numpy scalars as Python numbers, non-finite floats as null."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def dumps_json(obj) -> bytes:
    """The one JSON form of every file we write: sorted keys, indent 2, newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(url: str, obj) -> str:
    return atomic_write_bytes(url, dumps_json(obj))


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def read_keyed_json(url: str, key: str) -> tuple[dict, bytes] | None:
    """A JSON object written by ``write_json`` that carries ``key`` (its ``"key"`` field) and
    is exactly the bytes ``dumps_json`` gives it (a file changed in any way, even by a space
    that leaves the JSON the same, is not it), with those bytes; None when the file is
    missing, unreadable, of another key or changed. Stages read back per-item results with it
    (stage 1's manifests, stage 5's scores)."""
    try:
        if not exists(url):
            return None
        data = read_bytes(url)
        doc = json.loads(data)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or dumps_json(doc) != data:
        return None
    return doc, data


def read_json(url: str):
    return json.loads(read_bytes(url))


def file_sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_TMP = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-)?[0-9a-z_]+$")
ORPHAN_AGE_S = 24 * 3600  # a temporary of another host (or of an old name) older than this


def process_start_time(pid: int) -> str | None:
    """The start time of a process (Linux: field 22 of /proc/<pid>/stat, in clock ticks since
    boot), which tells a pid's original process from a later one that reused the pid; None when
    unknown (no /proc, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` exists on this host, is not a zombie, and (when ``started`` is
    given and /proc is readable) is the process that started at that time."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True  # cannot tell: assume alive (waiting is safe, breaking is not)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    if started is not None and len(fields) > 19 and fields[19] != started:
        return False  # the pid was reused by another process
    return True


def _writer_gone(name: str, age_s: float) -> bool:
    m = _TMP.search(name)
    if m is None:
        return False
    if m.group("host") == _HOST and m.group("pid"):
        return not process_alive(int(m.group("pid")))
    return age_s > ORPHAN_AGE_S


def remove_stale_temporaries(url_dir: str) -> int:
    """Delete the leftovers of interrupted writes (``*.tmp-*`` files and directories) under a
    directory: those whose writer process on this host is gone, and those of other hosts older
    than a day. Temporaries of live writers (a concurrent run) are left alone. Returns the
    number removed."""
    fs, path = fs_and_path(url_dir)
    if not fs.exists(path):
        return 0
    n = 0
    now = time.time()
    for p, info in sorted(fs.find(path, withdirs=True, detail=True).items(), reverse=True):
        base = os.path.basename(p.rstrip("/"))
        if ".tmp-" not in base:
            continue
        mtime = info.get("mtime") or info.get("created") or now
        try:
            age = now - float(mtime if not hasattr(mtime, "timestamp") else mtime.timestamp())
        except (TypeError, ValueError):
            age = 0.0
        if not _writer_gone(base, age):
            continue
        try:
            fs.rm(p, recursive=True)
            n += 1
        except FileNotFoundError:
            pass
    return n
