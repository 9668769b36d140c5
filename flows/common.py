"""What the flows share: resolving the config parameter, opening the run, the task runner."""
from __future__ import annotations

import hashlib
import json
import threading

from ensemble_core.config import RunConfig, load_config, parse_config
from ensemble_core.run import Run

_RUNS: dict[str, Run] = {}
_RUNS_LOCK = threading.Lock()


def resolve_config(config, overrides: list[str] | None = None) -> RunConfig:
    """A flow's ``config`` parameter: a path/URL to a YAML file, an inline mapping, or a
    RunConfig; ``overrides`` are ``key=value`` strings (dotted keys)."""
    if isinstance(config, RunConfig):
        return parse_config(config_dict(config), overrides=overrides) if overrides else config
    if isinstance(config, str):
        return load_config(config, overrides)
    if isinstance(config, dict):
        return parse_config(config, source="<inline config>", overrides=overrides)
    raise TypeError(f"config must be a path, a mapping or a RunConfig, not {type(config).__name__}")


def open_run(config, overrides: list[str] | None = None) -> Run:
    """The run of a flow's ``config`` parameter, once per process: the subflows of one
    pipeline in one process share it (its config parsed once, its data read once). Opening
    touches no file; the directory is claimed by the first stage that runs in a process
    (``Run.claimed``), so an orchestrating flow never needs the run directory. An earlier stop
    request of this process is forgotten: a new flow run starts."""
    from ensemble_core.runtime import clear_stop

    clear_stop()
    if isinstance(config, RunConfig) and not overrides:
        cfg = config
    elif isinstance(config, dict) and not overrides:
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        with _RUNS_LOCK:
            run = _RUNS.get(key)
        if run is None:
            run = Run(resolve_config(config))
            with _RUNS_LOCK:
                run = _RUNS.setdefault(key, run)
        return run
    else:
        cfg = resolve_config(config, overrides)
    return Run(cfg)


def config_dict(cfg: RunConfig) -> dict:
    """The JSON form of a config (a deployment's parameter, the manifest): only what was set,
    so builtin task defaults still apply when it is parsed again."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def artifact_key(name: str, what: str) -> str:
    """A Prefect artifact key for a run's ``what`` (lowercase letters, digits and dashes)."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower()).strip("-")


def task_runner_for(cfg: RunConfig):
    """A DaskTaskRunner when the config asks for Dask (a scheduler address, or a local
    cluster of runner.n_workers processes); None keeps the flow's default thread pool."""
    if cfg.runner.kind != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.runner.address:
        return DaskTaskRunner(address=cfg.runner.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runner.n_workers,
                                          "threads_per_worker": 1, "processes": True})
