"""Library-level stages of a run (no Prefect): each takes the config and writes files under the run
directory, returning a small JSON-able record (paths + content hashes). The Prefect tasks in
``tasks/`` wrap these one to one.

Run directory layout::

    gradients/<task>/<split>.parquet     stage 1 features (one row per example × choice)
    gradients/<task>/manifest.json       seed, d, p, fingerprints, template, row counts
    gradients/linearity.json             first-order check (Table 5 / Figure 2)
    estimation/subsets-<i>.json          stage 2: surrogate results of a batch of subsets
    affinity.json, groups.json           task affinity (eq. 1) and the SDP groups
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from . import __version__
from .affinity import task_affinity
from .clustering import SDPClustering, SpectralClustering, groups_to_json
from .config import RunConfig
from .data import TaskData, load_tasks
from .estimation import estimate_subset
from .features import FeatureTable
from .sampling import sample_subsets
from .storage import read_features
from .gradients import extract_features, linearity_check
from .models import ChoiceScorer, LoadedModel, adapter_vector, load_model
from .projection import GaussianProjector
from .storage import (atomic_write_bytes, exists, file_sha256, join, read_json,
                      write_features, write_json)

GRADIENT_SPLITS = ("train", "validation")

_MODELS: dict[str, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
# Model work in one process runs one at a time: it shares a device, seeds the global torch RNG
# (adapter init, dropout) and installs hooks, so interleaving threads would be neither fast nor
# reproducible. Parallelism across devices comes from several worker processes.
DEVICE_LOCK = threading.RLock()


def code_version() -> str:
    """Package version + a hash of the library's source: part of every cache key."""
    h = hashlib.sha256(__version__.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_key(cfg: RunConfig) -> str:
    return cfg.fingerprint("model", "adapter", "seed")


def get_model(cfg: RunConfig) -> tuple[LoadedModel, threading.RLock]:
    """The base model with a fresh adapter θ*, loaded once per process, and the device lock."""
    key = model_key(cfg)
    with DEVICE_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir))
        return _MODELS[key], DEVICE_LOCK


def features_fingerprint(cfg: RunConfig) -> str:
    """Everything that determines stage-1 features besides the task's data."""
    e = cfg.estimation
    blob = json.dumps([cfg.fingerprint("model", "adapter", "seed"), e.projection_dim,
                       e.projection_seed, e.projection_block_rows], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(td: TaskData) -> str:
    """Content of a task's data: file hashes, resolved task config, and the example ids of
    each split (which captures carving and caps) — not where the files live."""
    blob = json.dumps({"files": sorted(td.provenance.get("files", {}).values()),
                       "config": td.config.model_dump(mode="json"),
                       "splits": {s: [e.example_id for e in ex] for s, ex in td.splits.items()}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_run_data(cfg: RunConfig) -> dict[str, TaskData]:
    return load_tasks(cfg.tasks, cfg.data_root)


_PROJECTORS: dict[tuple, GaussianProjector] = {}


class RunDirError(ValueError):
    pass


def claim_run_dir(cfg: RunConfig) -> dict:
    """Mark the run directory as this run's (``run.json``) or check that it is.

    A run directory belongs to one run identity: its name, base model, adapter and seed —
    nothing computed under another identity can be reused. Data, estimation, clustering,
    training and boosting settings may change between runs in one directory: the stages whose
    inputs changed are recomputed, the rest is served from the cache.
    """
    ident = {"name": cfg.name, "model": cfg.model.model_dump(mode="json"),
             "adapter": cfg.adapter.model_dump(mode="json"), "seed": cfg.seed}
    url = join(cfg.run_dir, "run.json")
    if exists(url):
        have = read_json(url)
        diff = [k for k in ident if have.get(k) != ident[k]]
        if diff:
            raise RunDirError(
                f"run directory {cfg.run_dir} belongs to another run (different "
                f"{', '.join(diff)}); choose another output_dir, e.g. --set "
                f"output_dir=runs/{cfg.name}-2")
        return have
    write_json(url, ident)
    return ident


def projector_for(cfg: RunConfig, p: int, device) -> GaussianProjector:
    """One projector (and its cache of P's blocks) per process and setting, shared by tasks."""
    e = cfg.estimation
    if e.projection_dim > p:  # name the config key, not only the projector's d and p
        a = cfg.adapter
        raise ValueError(f"estimation.projection_dim = {e.projection_dim} (d) is larger than the "
                         f"number of adapter parameters p = {p} (model {cfg.model.name!r}, "
                         f"adapter r = {a.r} on {', '.join(a.target_modules)}); choose d <= {p}")
    cache = None if e.projection_cache_gb is None else int(e.projection_cache_gb * 2**30)
    key = (p, e.projection_dim, e.projection_seed, e.projection_block_rows, str(device), cache)
    with _MODELS_LOCK:
        if key not in _PROJECTORS:
            _PROJECTORS[key] = GaussianProjector(p, e.projection_dim, seed=e.projection_seed,
                                                 block_rows=e.projection_block_rows,
                                                 cache_bytes=cache, device=device)
        return _PROJECTORS[key]


def release_models() -> None:
    """Drop the process's cached θ* models and projection blocks (after stage 1)."""
    with DEVICE_LOCK, _MODELS_LOCK:
        _MODELS.clear()
        _PROJECTORS.clear()
    release_memory()


def release_memory() -> None:
    """Give freed memory back after a model stage: without it glibc keeps each worker thread's
    arena at its peak (a training step's activations) and a long run's resident size only
    grows; on CUDA, empty the caching allocator."""
    import ctypes
    import gc

    gc.collect()
    if torch_cuda_available():
        import torch
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def gradient_features(cfg: RunConfig, td: TaskData, progress=None) -> dict:
    """Stage 1 for one task: write train/validation features and the task manifest."""
    lm, lock = get_model(cfg)
    task = td.config.name
    out_dir = join(cfg.run_dir, "gradients", task)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    with lock:
        p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
        projector = projector_for(cfg, p, lm.device)
        files, timings = {}, {}
        for split in GRADIENT_SPLITS:
            examples = td.splits[split]
            t0 = time.perf_counter()
            tim: dict = {}
            table = extract_features(
                lm.model, scorer, examples, projector, task=task, split=split,
                batch_size=cfg.estimation.batch_size, timings=tim,
                progress=(lambda i, n, s=split: progress(task, s, i, n)) if progress else None)
            url = join(out_dir, f"{split}.parquet")
            sha = write_features(url, table)
            files[split] = {"path": url, "sha256": sha, "rows": int(len(table.choice)),
                            "examples": table.n_examples}
            timings[split] = dict(tim, total_s=time.perf_counter() - t0)
        theta_norm = float(adapter_vector(lm.model).norm())
    manifest = {
        "task": task, "seed": cfg.estimation.projection_seed, "d": projector.d, "p": projector.p,
        "theta_norm": theta_norm,
        "projection": projector.fingerprint(), "model": lm.fingerprint,
        "template": td.config.template, "choices": td.config.choices,
        "choice_mode": scorer.mode_for(td.splits["train"]),
        "tokenizer": {"class": type(lm.tokenizer).__name__, "vocab_size": len(lm.tokenizer),
                      "max_length": cfg.model.max_length, "padding_side": "right",
                      "truncation": "left (keeps BOS and the end of the prompt)"},
        "data": td.provenance, "files": files, "timings": timings,
        "code_version": code_version(),
    }
    manifest_url = join(out_dir, "manifest.json")
    write_json(manifest_url, manifest)  # written last: its presence marks the task complete
    release_memory()
    return {"task": task, "manifest": manifest_url, "files": files}


def gradient_record_valid(record: dict) -> bool:
    """A cached stage-1 record is usable when every file it names is there with its hash."""
    try:
        return exists(record["manifest"]) and all(
            exists(f["path"]) and file_sha256(f["path"]) == f["sha256"]
            for f in record["files"].values())
    except Exception:
        return False


def run_linearity_check(cfg: RunConfig, td: TaskData) -> dict:
    """The first-order check on the first examples of one task's validation split."""
    lm, lock = get_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    examples = td.splits["validation"][:cfg.estimation.linearity_examples]
    with lock:
        p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
        rows = linearity_check(lm.model, scorer, examples, projector_for(cfg, p, lm.device),
                               batch_size=cfg.estimation.batch_size)
    result = {"task": td.config.name, "examples": len(examples), "results": rows}
    url = join(cfg.run_dir, "gradients", "linearity.json")
    write_json(url, result)
    return dict(result, path=url)


def read_manifest(cfg: RunConfig, task: str) -> dict:
    return read_json(join(cfg.run_dir, "gradients", task, "manifest.json"))


# ----------------------------------------------------------------------------------------------
# Stage 2: subset regressions, affinity, clustering
# ----------------------------------------------------------------------------------------------

_TABLES: dict[tuple[str, str], FeatureTable] = {}
_TABLES_LOCK = threading.Lock()


def feature_table(path: str, sha256: str) -> FeatureTable:
    """Read a features file once per process (keyed by path and content hash): a worker that
    handles many subsets does not re-read what it already holds."""
    key = (path, sha256)
    with _TABLES_LOCK:
        hit = _TABLES.get(key)
    if hit is None:
        hit = read_features(path)
        with _TABLES_LOCK:
            _TABLES[key] = hit
    return hit


def plan_subsets(cfg: RunConfig) -> list[tuple[int, ...]]:
    """The k sampled task subsets S (seeded; every pair covered min_pair_coverage times)."""
    e, n = cfg.estimation, len(cfg.tasks)
    if n < 2:
        raise ValueError(f"stage 2 needs at least two tasks, the config has {n}")
    if e.subset_size > n:
        raise ValueError(f"estimation.subset_size = {e.subset_size} is larger than the number "
                         f"of tasks ({n})")
    from math import comb
    k = min(e.n_subsets, comb(n, e.subset_size))
    return sample_subsets(n, k, e.subset_size, e.min_pair_coverage, seed=cfg.seed)


def subset_batches(cfg: RunConfig, subsets) -> list[list[tuple[int, ...]]]:
    b = cfg.estimation.subsets_per_task_run
    return [list(subsets[i:i + b]) for i in range(0, len(subsets), b)]


def estimate_subsets(cfg: RunConfig, gradient_records: dict, subsets, batch_index: int) -> dict:
    """Stage 2 for a batch of subsets: fit the first-order surrogate on each S's train rows and
    score every i ∈ S on its validation rows (f̂_i(S)). Writes estimation/subsets-<i>.json."""
    t0 = time.perf_counter()
    names = [t.name for t in cfg.tasks]
    tables = {}
    for i in sorted({i for s in subsets for i in s}):
        files = gradient_records[names[i]]["files"]
        tables[i] = (feature_table(files["train"]["path"], files["train"]["sha256"]),
                     feature_table(files["validation"]["path"], files["validation"]["sha256"]))
        if tables[i][1].n_examples == 0:
            raise ValueError(f"task {names[i]} has no validation rows")
    manifest = read_json(gradient_records[names[0]]["manifest"])
    e = cfg.estimation
    results = [estimate_subset(s, tables, l2=e.l2, max_norm=surrogate_max_norm(cfg, manifest))
               for s in subsets]
    scale = (manifest["p"] / manifest["d"]) ** 0.5 / max(manifest.get("theta_norm", 0), 1e-30)
    for r in results:  # the paper's Table 2: ‖P x̂‖/‖θ*‖ ≈ sqrt(p/d)·‖x̂‖/‖θ*‖
        r["fit"]["relative_distance"] = r["fit"]["norm"] * scale
        r["tasks"] = [names[i] for i in r["subset"]]
        r["per_task"] = {str(i): v for i, v in r["per_task"].items()}  # JSON-stable keys
    url = join(cfg.run_dir, "estimation", f"subsets-{batch_index:04d}.json")
    write_json(url, {"batch": batch_index, "results": results})
    worker = f"{socket.gethostname()}:{os.getpid()}"  # provenance: which process fitted these
    return {"batch": batch_index, "path": url, "results": results, "worker": worker,
            "seconds": time.perf_counter() - t0}


def surrogate_max_norm(cfg: RunConfig, manifest: dict) -> float | None:
    """The bound on ‖x̂‖: max_norm, and ‖P x‖ ≈ sqrt(p/d)·‖x‖ ≤ max_relative_distance·‖θ*‖."""
    e = cfg.estimation
    bounds = [b for b in [e.max_norm] if b is not None]
    if e.max_relative_distance is not None and manifest.get("theta_norm"):
        bounds.append(e.max_relative_distance * manifest["theta_norm"]
                      / (manifest["p"] / manifest["d"]) ** 0.5)
    return min(bounds) if bounds else None


def cluster_tasks(cfg: RunConfig, subset_results: list[dict]) -> dict:
    """Affinity T (eq. 1) from the subset results, then groups by the SDP relaxation
    (Appendix A.1) or the spectral baseline. Writes affinity.json and groups.json."""
    t0 = time.perf_counter()
    names = [t.name for t in cfg.tasks]
    aff = task_affinity(subset_results, names, metric=cfg.estimation.metric)
    c = cfg.clustering
    m = None if c.n_groups == "auto" else int(c.n_groups)
    if c.method == "spectral":
        if m is None:
            raise ValueError("clustering.method = spectral needs clustering.n_groups")
        est = SpectralClustering(m, seed=cfg.seed).fit(aff.matrix)
        info = {"method": "spectral"}
    else:
        est = SDPClustering(m=m, lam=c.lam, c=c.threshold_c, m_selection=c.m_selection,
                            max_groups=c.max_groups, solver=c.solver).fit(aff.matrix)
        info = {"method": "sdp", "status": est.status_, "solver": est.solver_,
                "objective": float(est.objective_), "selection": est.selection_,
                "X": est.X_.tolist()}
    groups = groups_to_json(est.groups_, names)
    groups.update(info)
    aff_url, groups_url = join(cfg.run_dir, "affinity.json"), join(cfg.run_dir, "groups.json")
    aff_sha = atomic_write_bytes(aff_url, aff.to_json().encode())
    groups_sha = write_json(groups_url, groups)
    return {"affinity": {"path": aff_url, "sha256": aff_sha},
            "groups": {"path": groups_url, "sha256": groups_sha},
            "group_tasks": [g["tasks"] for g in groups["groups"]],
            "seconds": time.perf_counter() - t0}
