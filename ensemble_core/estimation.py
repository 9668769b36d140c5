"""The k subset regressions of DESIGN.md step 2, as plain functions (no Prefect).

``estimate_subset`` is the unit of work (one subset S: fit the first-order surrogate on the train
examples of S, evaluate f̂_i(S) on each i ∈ S); ``run_subsets`` maps it over the sampled subsets,
optionally in worker processes. The Prefect layer can call ``estimate_subset`` per task run and
feed the records to ``affinity.task_affinity`` (eq. 1).
"""
from __future__ import annotations

import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Mapping, Sequence

from .features import FeatureTable
from .surrogate import fit_subset

__all__ = ["estimate_subset", "run_subsets"]

TablesByTask = Sequence[tuple[FeatureTable, FeatureTable]] | Mapping[int, tuple[FeatureTable,
                                                                                FeatureTable]]


def estimate_subset(subset: Sequence[int], tables_by_task: TablesByTask, **surrogate_kw) -> dict:
    """Fit the surrogate on the union of the subset's train tables and score each member task.

    ``tables_by_task[i] = (train_table, val_table)`` of task index i. Returns a JSON-able record
    ``{"subset": [i, ...], "per_task": {i: {"loss", "accuracy", "n_examples"}}, "fit": {...}}``
    (``fit`` as in surrogate.fit_subset); ``affinity.task_affinity`` accepts a list of these.
    """
    subset = [int(i) for i in subset]
    if len(set(subset)) != len(subset) or not subset:
        raise ValueError(f"subset must be a non-empty list of distinct task indices, got {subset}")
    pairs = [tables_by_task[i] for i in subset]
    names = [train.task for train, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"subset {subset} maps to duplicate task names {names}")
    out = fit_subset([train for train, _ in pairs], [val for _, val in pairs], **surrogate_kw)
    per_task = {i: out["tasks"][val.task] for i, (_, val) in zip(subset, pairs)}
    return {"subset": subset, "per_task": per_task, "fit": out["fit"]}


# Worker-process state: the tables are sent once per worker (initializer), not once per subset.
_WORKER_TABLES: TablesByTask | None = None


def _init_worker(tables_by_task: TablesByTask) -> None:
    global _WORKER_TABLES
    _WORKER_TABLES = tables_by_task


def _worker_estimate(args) -> dict:
    subset, kw = args
    return estimate_subset(subset, _WORKER_TABLES, **kw)


def run_subsets(tables_by_task: TablesByTask, subsets: Sequence[Sequence[int]],
                n_workers: int = 1, mp_context: str | None = None, **surrogate_kw) -> list[dict]:
    """``estimate_subset`` for every subset, in order. ``n_workers > 1`` uses a
    ProcessPoolExecutor (tables shipped once per worker; ``mp_context`` e.g. "spawn", default
    the platform's); ``n_workers = 1`` runs in this process."""
    subsets = [tuple(int(i) for i in s) for s in subsets]
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if n_workers == 1 or len(subsets) <= 1:
        return [estimate_subset(s, tables_by_task, **surrogate_kw) for s in subsets]
    ctx = mp.get_context(mp_context) if mp_context else None
    chunk = max(1, math.ceil(len(subsets) / (4 * n_workers)))
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tables_by_task,)) as pool:
        return list(pool.map(_worker_estimate, [(s, surrogate_kw) for s in subsets],
                             chunksize=chunk))
