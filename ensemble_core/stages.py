"""Library-level stages of a run (no Prefect): each takes the config and writes files under the run
directory, returning a small JSON-able record (paths + content hashes). The Prefect tasks in
``tasks/`` wrap these one to one.

Run directory layout::

    gradients/<task>/<split>.parquet     stage 1 features (one row per example × choice)
    gradients/<task>/manifest.json       seed, d, p, fingerprints, template, row counts
    gradients/linearity.json             first-order check (Table 5 / Figure 2)
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

from . import __version__
from .config import RunConfig
from .data import TaskData, load_tasks
from .gradients import extract_features, linearity_check
from .models import ChoiceScorer, LoadedModel, load_model
from .projection import GaussianProjector
from .storage import join, read_json, write_features, write_json, exists, file_sha256

GRADIENT_SPLITS = ("train", "validation")

_MODELS: dict[str, tuple[LoadedModel, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def code_version() -> str:
    """Package version + a hash of the library's source: part of every cache key."""
    h = hashlib.sha256(__version__.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_key(cfg: RunConfig) -> str:
    return cfg.fingerprint("model", "adapter", "seed")


def get_model(cfg: RunConfig) -> tuple[LoadedModel, threading.Lock]:
    """The base model with a fresh adapter θ*, loaded once per process (and a lock: the gradient
    hooks must not run concurrently on one model)."""
    key = model_key(cfg)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = (load_model(cfg, cfg.cache_dir and Path(cfg.cache_dir)),
                            threading.Lock())
        return _MODELS[key]


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


def projector_for(cfg: RunConfig, p: int, device) -> GaussianProjector:
    e = cfg.estimation
    return GaussianProjector(p, e.projection_dim, seed=e.projection_seed,
                             block_rows=e.projection_block_rows, device=device)


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
    manifest = {
        "task": task, "seed": cfg.estimation.projection_seed, "d": projector.d, "p": projector.p,
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
