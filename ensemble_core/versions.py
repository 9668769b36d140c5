"""Versions of a run directory's ensemble, and which one is current (issue 14, item 3).

Every completed run publishes its ensemble as an immutable version::

    versions/<id>/            ensemble.json, the member adapters it names (adapters/<name>/),
                              metrics.json, manifest.json, config.json (the resolved config),
                              version.json (id, time, digests, validation metrics, promotion)
    versions/current.json     {"current": <id>, "history": [{version, at, why}, ...]}

An id is ``v<n>-<first 8 hex of ensemble.json's sha256>``; a run whose ensemble is one that is
already published (a rerun served from the cache) publishes nothing new. A version owns its
files: they are copied from the run directory (never hard-linked, so a working copy changed in
place cannot change a version), each copy checked against the sha256 of what it was copied from,
and ``version.json`` pins every file by its sha256 (``files``); loading a version checks them
all before anything is read (:func:`check_files`). The version is built under a temporary name
and renamed into place when complete. No path is followed through a link out of the run
directory. On an object store (a run directory at an fsspec URL such as s3://), where nothing
renames a directory atomically, the files are written in place and ``version.json`` last: a
version is a directory with a ``version.json`` (and every file it pins), so a publication cut
short is no version; the next publication of the same ensemble writes it again.

Promotion: the new version becomes current unless, on some task, its ensemble's validation
accuracy (``ensemble.json``'s ``validation``, computed where the weights are fitted, never on
the test split) is lower than the current version's by more than ``tolerance`` (an absolute
fraction, ``evaluation.promote_tolerance``), or when forced. :func:`rollback` moves ``current``
back to the version that was current before. ``EnsembleModel.from_pretrained`` and
``ensemble-lora predict``/``serve`` load the current version (or a named one); a run directory
without versions loads its own ``ensemble.json`` as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .rundir import RunDir, RunDirError
from .storage import (atomic_write_bytes, dumps_json, exists, file_sha256, fs_and_path,
                      is_local_fs, join, read_bytes, temporary_dir, temporary_prefix)

__all__ = ["VersionError", "publish", "promote", "rollback", "list_versions", "current",
           "version_dir", "resolve", "ensemble_ref", "check_files"]

_ID = re.compile(r"^v(\d{4,})-([0-9a-f]{8})$")


class VersionError(ValueError):
    pass


def _root(run_dir) -> str:
    return join(RunDir(str(run_dir)).url, "versions")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _state(run_dir) -> dict:
    path = join(_root(run_dir), "current.json")
    if not exists(path):
        return {"current": None, "history": []}
    try:
        state = json.loads(read_bytes(path))
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise ValueError("not an object with a history list")
    except ValueError as e:
        raise VersionError(f"{path}: not a valid versions file ({e})") from None
    return state


def _write_state(run_dir, state: dict) -> None:
    atomic_write_bytes(join(_root(run_dir), "current.json"), dumps_json(state))


def _ids(run_dir) -> list[str]:
    """The published versions: the version directories with a version.json."""
    fs, root = fs_and_path(_root(run_dir))
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return sorted((n for n in names if _ID.match(n)
                   and fs.exists(f"{root}/{n}/version.json")),
                  key=lambda v: int(_ID.match(v).group(1)))


def _info(run_dir, vid: str) -> dict:
    path = join(version_dir(run_dir, vid), "version.json")
    try:
        return json.loads(read_bytes(path))
    except (OSError, ValueError) as e:
        raise VersionError(f"version {vid}: {path} is not readable ({e})") from None


def version_dir(run_dir, vid: str) -> str:
    """The directory (path or URL) of version ``vid`` (which must be published)."""
    if not isinstance(vid, str) or not _ID.match(vid):
        raise VersionError(f"{vid!r} is not a version id (v<n>-<8 hex digits>)")
    d = join(_root(run_dir), vid)
    if not exists(join(d, "version.json")):
        known = ", ".join(_ids(run_dir)) or "none"
        raise VersionError(f"{RunDir(str(run_dir)).url} has no version {vid} (versions: "
                           f"{known})")
    return d


def ensemble_ref(run_dir, vid: str):
    """The ``records.FileRef`` of version ``vid``'s ensemble.json, relative to the run
    directory (a record of the published version names it, so a cached record of a version
    that was removed is not served)."""
    from .records import FileRef

    path = join(version_dir(run_dir, vid), "ensemble.json")
    return FileRef(f"versions/{vid}/ensemble.json", file_sha256(path))

def current(run_dir) -> str | None:
    """The id of the current version, or None (no version published)."""
    return _state(run_dir)["current"]


def resolve(run_dir, version: str | None = None) -> tuple[str | None, str]:
    """(version id, directory holding its ensemble.json): the named version, else the current
    one, else the run directory itself (a run from before versions: id None)."""
    if version is not None:
        return version, version_dir(run_dir, version)
    vid = current(run_dir)
    if vid is None:
        return None, str(run_dir)
    return vid, version_dir(run_dir, vid)


def _place(src: str, dst: str, root: str) -> str:
    """Copy ``src`` (a file of the run directory ``root``; on a local disk, not reached
    through a link out of it) to ``dst``; returns the copy's sha256, checked against the
    source's."""
    from .rundir import inside

    if RunDir(root).is_local:
        inside(src, root)
    want = file_sha256(src)
    fs, path = fs_and_path(dst)
    sfs, spath = fs_and_path(src)
    if "/" in path and is_local_fs(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if fs is sfs or type(fs) is type(sfs):
        fs.copy(spath, path)  # a server-side copy on an object store
    else:
        fs.pipe_file(path, read_bytes(src))
    got = file_sha256(dst)
    if got != want:
        raise VersionError(f"{dst}: the copy of {src} differs from it (sha256 {got[:12]} vs "
                           f"{want[:12]}); the file changed while it was published: run again")
    return got


def check_files(version_path) -> None:
    """Every file ``version.json`` pins (``files``: relative path -> sha256) is there, inside
    the version's directory (on a local disk: no link out of it), with that content;
    VersionError naming the first that is not. A version published before pinning pins
    nothing here."""
    from .rundir import inside

    root = str(version_path).rstrip("/")
    info = json.loads(read_bytes(join(root, "version.json")))
    local = RunDir(root).is_local
    for rel, sha in sorted((info.get("files") or {}).items()):
        path = join(root, rel)
        if local:
            try:
                inside(path, root)
            except RunDirError as e:
                raise VersionError(str(e)) from None
        if not exists(path):
            raise VersionError(f"{path}: missing from version {root.rsplit('/', 1)[-1]}")
        if file_sha256(path) != sha:
            raise VersionError(f"{path}: changed since version {root.rsplit('/', 1)[-1]} was "
                               "published (sha256 differs); versions are immutable: publish a "
                               "new one")


def worse_tasks(new: dict, old: dict, tolerance: float) -> list[str]:
    """The tasks on which validation metrics ``new`` fall more than ``tolerance`` below
    ``old`` in accuracy (tasks in both only), each as 'task: old -> new'."""
    out = []
    for task in sorted(set(new) & set(old)):
        a_old, a_new = old[task].get("accuracy"), new[task].get("accuracy")
        if a_old is None or a_new is None:
            continue
        if a_new < a_old - tolerance:
            out.append(f"{task}: {a_old:.4f} -> {a_new:.4f}")
    return out


def _copy_files(rd: RunDir, spec: dict, out: str, config: dict | None) -> dict[str, str]:
    """The version's files into ``out``: ensemble.json, the member adapters it names (their
    weights checked against the sha256 the ensemble was fitted with), metrics, manifest,
    report and the config. Returns relative path -> sha256 of every file."""
    base = rd.url
    files = {"ensemble.json": _place(rd.ensemble, join(out, "ensemble.json"), base)}
    for g in spec["groups"]:
        for mem in g["members"]:
            src = rd.resolve(mem["adapter"])
            fs, spath = fs_and_path(src)
            for f in sorted(fs.find(spath)):
                rel = f"{mem['adapter']}/{f[len(spath):].lstrip('/')}"
                files[rel] = _place(join(base, rel), join(out, rel), base)
            want = mem.get("sha256")
            if want is not None and files[f"{mem['adapter']}/adapter_model.safetensors"] != want:
                raise VersionError(f"{src}: the adapter changed after the ensemble was "
                                   "fitted; run again")
    for name in ("metrics.json", "manifest.json", "report.md"):
        if exists(join(base, name)):
            files[name] = _place(join(base, name), join(out, name), base)
    if config is not None:
        data = dumps_json(config)
        atomic_write_bytes(join(out, "config.json"), data)
        files["config.json"] = hashlib.sha256(data).hexdigest()
    return files


def _promotion(run_dir, cur: str | None, validation: dict, tolerance: float,
               force: bool) -> tuple[bool, str]:
    """Whether a version with these validation metrics becomes current, and why."""
    if cur is None or force:
        return True, "forced" if force else "first version"
    worse = worse_tasks(validation, _info(run_dir, cur).get("validation") or {}, tolerance)
    if not worse:
        return True, f"not worse than {cur} on validation (tolerance {tolerance})"
    return False, (f"worse than {cur} on validation by more than {tolerance}: "
                   + "; ".join(worse))


def publish(run_dir, config: dict | None = None, *, tolerance: float = 0.02,
            force: bool = False) -> dict:
    """Publish the run directory's ensemble as a version and promote it if it is not worse
    (see the module docstring). Returns the version's ``version.json`` content."""
    rd = RunDir(str(run_dir))
    if not exists(rd.ensemble):
        raise VersionError(f"{rd.ensemble}: no ensemble to publish (the run is not finished)")
    if not tolerance >= 0:
        raise VersionError(f"promote tolerance must be >= 0, got {tolerance}")
    raw = read_bytes(rd.ensemble)
    sha = hashlib.sha256(raw).hexdigest()
    for vid in _ids(rd.url):
        info = _info(rd.url, vid)
        if info.get("ensemble_sha256") == sha:  # already published (a cached rerun)
            return info
    spec = json.loads(raw)
    ids = _ids(rd.url)
    n = 1 + max((int(_ID.match(v).group(1)) for v in ids), default=0)
    vid = f"v{n:04d}-{sha[:8]}"
    final = join(_root(rd.url), vid)
    if rd.is_local:  # built aside and renamed into place
        root = Path(rd.local(_root(rd.url)))
        root.mkdir(parents=True, exist_ok=True)
        out = str(temporary_dir(temporary_prefix(f".{vid}"), root))
    else:  # an object store renames nothing: written in place, version.json last
        out = final
    try:
        files = _copy_files(rd, spec, out, config)
        if files["ensemble.json"] != sha:
            raise VersionError(f"{rd.ensemble} changed while it was published; run again")
        state = _state(rd.url)
        cur = state["current"]
        validation = spec.get("validation") or {}
        promoted, why = _promotion(rd.url, cur, validation, tolerance, force)
        metrics = {}
        if exists(join(rd.url, "metrics.json")):
            metrics = json.loads(read_bytes(join(rd.url, "metrics.json"))).get("average", {})
        info = {"version": vid, "created": _now(), "ensemble_sha256": sha,
                "validation": validation, "test_average": metrics,
                "promoted": promoted, "promotion": why, "files": files}
        atomic_write_bytes(join(out, "version.json"), dumps_json(info))
        if rd.is_local:
            try:
                os.replace(out, rd.local(final))
            except OSError:  # a run of the same config published the same ensemble meanwhile
                shutil.rmtree(out, ignore_errors=True)
                theirs = _info(rd.url, vid)
                if theirs.get("ensemble_sha256") != sha:
                    raise
                return theirs
    except BaseException:
        if rd.is_local:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if promoted:
        state["current"] = vid
        state["history"].append({"version": vid, "at": _now(), "why": why})
        _write_state(rd.url, state)
    return info


def promote(run_dir, vid: str) -> None:
    """Make version ``vid`` current, whatever its metrics."""
    version_dir(run_dir, vid)
    state = _state(run_dir)
    state["current"] = vid
    state["history"].append({"version": vid, "at": _now(), "why": "promoted by hand"})
    _write_state(run_dir, state)


def rollback(run_dir) -> str:
    """Move ``current`` back to the version that was current before it; returns its id."""
    state = _state(run_dir)
    cur = state["current"]
    if cur is None:
        raise VersionError(f"{RunDir(str(run_dir)).url} has no versions to roll back")
    before = [h["version"] for h in state["history"] if h.get("version") != cur]
    if not before:
        raise VersionError(f"{cur} is the only version that was ever current; nothing to roll "
                           "back to")
    target = before[-1]
    version_dir(run_dir, target)
    state["current"] = target
    state["history"].append({"version": target, "at": _now(), "why": f"rollback from {cur}"})
    _write_state(run_dir, state)
    return target


def list_versions(run_dir) -> list[dict]:
    """Every version's ``version.json`` with ``current`` marked, oldest first."""
    cur = current(run_dir)
    return [dict(_info(run_dir, v), current=v == cur) for v in _ids(run_dir)]

