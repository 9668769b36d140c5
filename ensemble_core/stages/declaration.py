"""How a stage says what its result depends on (docs/design.md, "Caching and what a stage
depends on").

Each stage function is declared with :func:`stage`: the config fields its result depends on,
the fields it reads that change no result, the tasks whose data it reads, which of its
arguments identify its inputs, and the record it returns. ``Stage.inputs(run, ...)`` gives
exactly that as JSON — the Prefect layer makes its cache keys from it (tasks/common.py) — and
the stage function sees only what it declared: reading any other config field or task is an
error (``run.ConfigView``), so a cache cannot miss an input.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from ..run import Run, dotted
from ..runtime import code_version

__all__ = ["Stage", "stage", "STAGES", "PLANNING", "MODEL", "PROJECTION"]


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: its number (1–6), a short name (cache keys, task names), the
    config fields its result depends on (plus ``more_config(cfg)``, fields that depend on the
    config itself, e.g. those a registered method reads), the fields it reads that do not
    change its result (``uses``), which tasks' data it reads (``reads(**args)``; None: none),
    the arguments that identify its inputs, and the record type it returns."""
    number: int
    name: str
    config: tuple[str, ...]
    uses: tuple[str, ...] = ()
    reads: Callable[..., Sequence[str]] | None = None
    key_args: Callable[..., dict] | None = None  # the arguments that identify the inputs
    returns: type | None = None  # the records.Record it returns
    more_config: Callable[..., Sequence[str]] | None = None
    module: str | None = None  # where the stage function is: its code version is that code

    def fields(self, cfg) -> tuple[str, ...]:
        """Every config field the stage's result depends on, for this config."""
        more = tuple(self.more_config(cfg)) if self.more_config else ()
        return self.config + tuple(f for f in more if f not in self.config)

    def inputs(self, run: Run, **args) -> dict:
        """Everything the stage's result depends on, as JSON: the declared config fields,
        the data fingerprints of the tasks it reads, and the content keys of its arguments
        (records contribute ``Record.key()``)."""
        args = {k: v for k, v in args.items() if k != "progress"}
        tasks = sorted(set(self.reads(**args))) if self.reads else []
        chosen = self.key_args(**args) if self.key_args else args
        return {"stage": f"{self.number}:{self.name}", "code": code_version(self.module),
                "config": {path: dotted(run.cfg, path) for path in self.fields(run.cfg)},
                "data": {t: run.data_fingerprint(t) for t in tasks},
                "args": _key_of(chosen)}


def _key_of(obj):
    if hasattr(obj, "key") and callable(obj.key):
        return obj.key()
    if isinstance(obj, dict):
        return {str(k): _key_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_key_of(v) for v in obj]
    return obj


STAGES: dict[str, Stage] = {}


def stage(number: int, name: str, config: Sequence[str], uses: Sequence[str] = (),
          reads: Callable | None = None, key_args: Callable | None = None,
          returns: type | None = None, more_config: Callable | None = None):
    """Declare a stage function (see :class:`Stage`). The function is called with the run as
    the stage may see it (``Run.for_stage``); ``fn.stage`` is the declaration."""
    def wrap(fn):
        spec = Stage(number, name, tuple(config), tuple(uses), reads, key_args, returns,
                     more_config, fn.__module__)
        STAGES[name] = spec
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run_stage(run: Run, *a, **k):
            bound = sig.bind(run, *a, **k)
            args = {n: v for n, v in bound.arguments.items() if n not in ("run", "progress")}
            tasks = spec.reads(**args) if spec.reads else ()
            run.claimed()  # the first stage a process runs claims the directory
            view = run.for_stage(name, spec.fields(run.cfg) + spec.uses, tasks)
            return fn(view, *a, **k)

        run_stage.stage = spec
        return run_stage
    return wrap


# Config fields read outside the stage functions, by the code that decides what the stages are
# given (planning.plan_subsets, planning.score_plans, algorithm2): their effect reaches the
# cache keys through the stages' arguments (the subsets, the plans, the steps taken).
PLANNING = ("seed", "estimation.n_subsets", "estimation.subset_size",
            "estimation.min_pair_coverage", "estimation.subsets_per_task_run",
            "estimation.linearity_check", "boosting.steps", "boosting.mode")

MODEL = ("model", "adapter", "seed")
PROJECTION = ("estimation.projection_dim", "estimation.projection_seed",
              "estimation.projection_block_rows")
