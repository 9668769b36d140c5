"""A run: its config, its tasks' data (read once), and its directory.

``Run`` is what every stage function takes (``stages``). Its tasks' data is read on first use
and kept for the process, keyed by the task's resolved config and checked against the files'
size and modification time, so the cache-key functions and the task bodies of one process read
each file once, and a file changed between two runs is read again.

A stage sees the run through :meth:`Run.for_stage`: a view whose config answers only the
fields the stage declared (``ConfigView``) and whose data only the tasks it declared. What a
stage reads is therefore exactly what its cache key is made of — a stage that reads an
undeclared field fails at once (:class:`StageInputError`) instead of leaving a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import threading
from typing import Iterable, Sequence

from pydantic import BaseModel

from .config import RunConfig
from .data import Example, TaskData, load_task, resolve_task
from .rundir import RunDir

__all__ = ["Run", "ConfigView", "StageInputError", "data_fingerprint"]

# Fields of the config that say where things are, not what is computed: readable by every stage
# and part of no cache key (the run directory is part of every key; data and models enter keys
# through their content: data fingerprints, model fingerprints).
LOCATION_FIELDS = frozenset({"name", "output_dir", "run_dir", "data_root", "cache_dir",
                             "runner", "tasks", "task"})


class StageInputError(RuntimeError):
    """A stage read a config field or a task it did not declare (a bug: its cache key would
    not cover it)."""


def data_fingerprint(td: TaskData) -> str:
    """Content of a task's data: file hashes, resolved task config, and the example ids of
    each split (which captures carving and caps) — not where the files live."""
    blob = json.dumps({"files": sorted(td.provenance.get("files", {}).values()),
                       "config": td.config.model_dump(mode="json"),
                       "splits": {s: [e.example_id for e in ex] for s, ex in td.splits.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -------------------------------------------------------------------------------------------
# Task data, read once per process
# -------------------------------------------------------------------------------------------

_DATA: dict[tuple[str, str], tuple[tuple, TaskData, str]] = {}
_DATA_LOCK = threading.Lock()
_CLAIMED: set[tuple] = set()  # (run directory, config digest, Redis URL) claimed here
_CLAIM_LOCK = threading.Lock()


def _stamp(urls: Iterable[str]) -> tuple | None:
    """(size, modification time) of each file, or None when a file cannot be asked."""
    from .storage import fs_and_path

    out = []
    for url in sorted(urls):
        try:
            fs, path = fs_and_path(url)
            info = fs.info(path)
        except Exception:
            return None
        when = next((info.get(k) for k in ("mtime", "LastModified", "last_modified", "ETag",
                                           "etag", "created") if info.get(k) is not None), None)
        if when is None:
            return None
        out.append((url, info.get("size"), str(when)))
    return tuple(out)


def _load(task_cfg, data_root: str) -> tuple[TaskData, str]:
    key = (resolve_task(task_cfg).model_dump_json(), data_root)
    with _DATA_LOCK:
        hit = _DATA.get(key)
    if hit is not None and _stamp(u for u, _, _ in hit[0]) == hit[0]:
        return hit[1], hit[2]
    td = load_task(task_cfg, data_root)
    fp = data_fingerprint(td)
    stamp = _stamp(td.provenance.get("files", {}))
    if stamp is not None:
        with _DATA_LOCK:
            _DATA[key] = (stamp, td, fp)
    return td, fp


# -------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------

class Run:
    """A run's config, its tasks' data and its directory."""

    def __init__(self, cfg: RunConfig):
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"Run needs a RunConfig, not {type(cfg).__name__}")
        self.cfg = cfg
        self.dir = RunDir(cfg.run_dir)

    def __repr__(self) -> str:
        return f"Run({self.cfg.name!r}, {self.dir.url!r})"

    @classmethod
    def open(cls, cfg: RunConfig) -> "Run":
        """The run, with its directory claimed (``RunDir.claim``)."""
        return cls(cfg).claimed()

    def claimed(self) -> "Run":
        """This run with its directory claimed (``RunDir.claim``), once per process and
        config: every stage function claims it before it runs (``stages.declaration``), so a
        process that only sequences stages (an orchestrating flow) never touches the
        directory. The coordinating Redis server, if any, is ``runner.redis_url`` or
        ``ENSEMBLE_LORA_REDIS_URL`` (``coordination``)."""
        from .coordination import redis_url

        held = self.held_config
        redis = redis_url(self.cfg.runner.redis_url)
        key = (self.dir.url, hashlib.sha256(json.dumps(held, sort_keys=True, default=str)
                                            .encode()).hexdigest(), redis)
        with _CLAIM_LOCK:
            if key not in _CLAIMED:
                self.dir.claim(self.identity, held, normalize=_identity_today, redis_url=redis)
                _CLAIMED.add(key)
        return self

    @property
    def held_config(self) -> dict:
        """The resolved config a process holds the run directory with (``RunDir.claim``):
        all of it but ``runner`` (where the work runs does not change what it computes)."""
        data = self.cfg.model_dump(mode="json")
        data.pop("runner", None)
        return data

    @property
    def identity(self) -> dict:
        """What a run directory belongs to: the run's name, base model, adapter and seed."""
        c = self.cfg
        return {"name": c.name, "model": c.model.model_dump(mode="json"),
                "adapter": c.adapter.model_dump(mode="json"), "seed": c.seed}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.cfg.tasks]

    def task_data(self, name: str) -> TaskData:
        return _load(self.cfg.task(name), self.cfg.data_root)[0]

    def data_fingerprint(self, name: str) -> str:
        return _load(self.cfg.task(name), self.cfg.data_root)[1]

    def examples(self, names: Sequence[str], split: str) -> list[Example]:
        """The examples of a split of several tasks, tasks in the given order."""
        return [e for n in names for e in self.task_data(n).splits[split]]

    def for_stage(self, stage: str, config: Iterable[str], tasks: Iterable[str] | None) -> "Run":
        """This run as the stage ``stage`` may see it: the config fields in ``config`` (dotted
        paths; a section name allows the whole section) and the tasks in ``tasks`` (None:
        every task)."""
        return _StageRun(self, stage, frozenset(config), None if tasks is None else set(tasks))


def _identity_today(stored: dict) -> dict:
    """A stored run identity in today's form: an adapter section written when one config class
    held every kind's fields (before the adapter-kind registry) keeps only its kind's."""
    import warnings

    from .adapter_kinds import validate_adapter

    adapter = stored.get("adapter")
    if not isinstance(adapter, dict):
        return stored
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = validate_adapter(adapter).model_dump(mode="json")
    except ValueError:
        return stored  # not a config we know: compared as it is (and refused)
    return dict(stored, adapter=adapter)


class _StageRun(Run):
    def __init__(self, run: Run, stage: str, config: frozenset, tasks: set | None):
        self._run, self._stage, self._tasks = run, stage, tasks
        self.dir = run.dir
        self.cfg = ConfigView(run.cfg, config, stage)

    def __repr__(self) -> str:
        return f"{self._run!r} as stage {self._stage!r}"

    @property
    def task_names(self) -> list[str]:
        return self._run.task_names

    def _check(self, name: str) -> None:
        if self._tasks is not None and name not in self._tasks:
            raise StageInputError(f"stage {self._stage!r} reads the data of task {name!r}, "
                                  f"which it does not declare (it declares "
                                  f"{sorted(self._tasks)})")

    def task_data(self, name: str) -> TaskData:
        self._check(name)
        return self._run.task_data(name)

    def data_fingerprint(self, name: str) -> str:
        self._check(name)
        return self._run.data_fingerprint(name)

    def for_stage(self, stage, config, tasks):
        return self._run.for_stage(stage, config, tasks)

    def claimed(self) -> "Run":
        self._run.claimed()
        return self


class ConfigView:
    """Read-only view of the part of a config (or of one of its sections) that a stage
    declared; any other field is a :class:`StageInputError`."""

    def __init__(self, obj, allowed: frozenset, stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        path = self._prefix + name
        prop = getattr(type(self._obj), name, None)
        if isinstance(prop, property) and not (not self._prefix and name in LOCATION_FIELDS):
            return prop.fget(self)  # a derived value: computed through this view
        value = getattr(self._obj, name)
        if (not self._prefix and name in LOCATION_FIELDS) or path in self._allowed:
            return value
        if any(a.startswith(path + ".") for a in self._allowed) and isinstance(value, BaseModel):
            return ConfigView(value, self._allowed, self._stage, path + ".")
        raise StageInputError(f"stage {self._stage!r} reads config field {path!r}, which it does "
                              "not declare (ensemble_core/stages/): its cache would not see "
                              "a change of it")

    def __setattr__(self, name, value):
        raise AttributeError("the config is read-only inside a stage")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {self._prefix or 'config'})"


def dotted(cfg, path: str):
    """The value of a dotted config path, JSON-able."""
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
