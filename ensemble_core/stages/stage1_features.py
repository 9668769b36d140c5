"""Stage 1: gradient features — the outputs and projected gradients at θ* (the paper's
first-order approximation, §2.2), and its check (Table 5 / Figure 2)."""
from __future__ import annotations

import hashlib
import time
from typing import Sequence

import numpy as np

from ..records import (FeaturesPack, FeaturesRecord, LinearityPoint, LinearityRecord,
                       ProjectionInfo, SplitFeatures)
from ..run import Run
from ..rundir import GRADIENT_SPLITS
from ..runtime import DEVICE_LOCK, code_version, projector, release_memory, theta_star_model
from .declaration import MODEL, PROJECTION, stage

__all__ = ["estimation_examples", "scored_examples", "gradient_features",
           "gradient_features_pack", "linearity"]


def estimation_examples(run: Run, task: str, split: str):
    """The examples of a task's split that stage 1 and the surrogate use: all of them, or a
    seeded sample of ``estimation.max_examples[split]`` (original order kept), so the gradient
    pass does not grow with the training set. Fine-tuning uses every example."""
    examples = run.task_data(task).splits[split]
    cap = run.cfg.estimation.max_examples.get(split)
    if cap is None:
        return examples
    if cap > len(examples):
        raise ValueError(f"estimation.max_examples.{split} = {cap}, but task {task!r} has only "
                         f"{len(examples)} {split} examples; lower it to at most "
                         f"{len(examples)}")
    digest = hashlib.sha256(f"estimation/{run.cfg.seed}/{task}/{split}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    keep = sorted(int(i) for i in rng.permutation(len(examples))[:cap])
    return [examples[i] for i in keep]


def scored_examples(run: Run, task: str, split: str):
    """The examples stage 5 scores a member on: for "train" the examples stage 1 computed
    features of (:func:`estimation_examples`, which boosting reads), else the whole split."""
    return (estimation_examples(run, task, split) if split == "train"
            else run.task_data(task).splits[split])


def _stage1_projector(run: Run, lm):
    from ..adapter_kinds import adapter_kind

    e, a = run.cfg.estimation, run.cfg.adapter
    p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
    d = e.stored_dim
    if d > p:  # name the config key, not only the projector's d and p
        raise ValueError(f"estimation.projection_dim = {d} (d) is larger than the "
                         f"number of adapter parameters p = {p} (model {run.cfg.model.name!r}, "
                         f"adapter {a.kind} {adapter_kind(a).describe(a)} on "
                         f"{', '.join(a.target_modules)}); choose d <= {p}")
    return projector(p, d, e.projection_seed, e.projection_block_rows, e.projection_cache_gb,
                     lm.device)


@stage(1, "gradients", config=MODEL + PROJECTION + ("estimation.batch_size",
                                                     "estimation.max_examples"),
       uses=("estimation.projection_cache_gb",), reads=lambda task: [task],
       returns=FeaturesRecord)
def gradient_features(run: Run, task: str, progress=None) -> FeaturesRecord:
    """Outputs h_c(s) and the projected gradients of the score differences
    g̃ = Pᵀ∇(h_c(s) − h_0(s)) at θ* of one task's train and validation examples (or their
    estimation sample) as Parquet (``features``), and the task's manifest."""
    return _task_features(run, task, progress)


@stage(1, "gradients-pack", config=MODEL + PROJECTION + ("estimation.batch_size",
                                                          "estimation.max_examples"),
       uses=("estimation.projection_cache_gb",), reads=lambda tasks: list(tasks),
       returns=FeaturesPack)
def gradient_features_pack(run: Run, tasks: Sequence[str], progress=None) -> FeaturesPack:
    """Stage 1 for several tasks in one call (issue 32: small datasets packed into one task
    run, ``runner.feature_runs``): each task exactly as :func:`gradient_features` computes it
    alone. A task whose manifest in the run directory carries the same key (the inputs of
    ``gradient_features`` for that task alone: config, data, code) and whose feature files
    still hold the bytes it names is read back, not computed, so adding a task to a run
    computes only the new one, however the tasks are packed. ``progress(done, total, task)``
    counts examples over all the pack's tasks."""
    sizes = {t: {s: len(estimation_examples(run, t, s)) for s in GRADIENT_SPLITS}
             for t in tasks}
    total, before = sum(sum(n.values()) for n in sizes.values()), 0
    records = []
    for t in tasks:
        rec = _stored_features(run, t, _task_key(run, t))
        if rec is None:
            offset = {"train": before, "validation": before + sizes[t]["train"]}
            rec = _task_features(run, t, None if progress is None else (
                lambda done, _n, split, t=t, o=offset: progress(o[split] + done, total, t)))
        before += sum(sizes[t].values())
        records.append(rec)
    return FeaturesPack(records)


def _task_key(run: Run, task: str) -> str:
    """``gradient_features``' inputs for one task (its cache key's content), hashed: what a
    manifest must carry to be read back by :func:`gradient_features_pack`."""
    import json

    from .declaration import STAGES

    inputs = STAGES["gradients"].inputs(run, task=task)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _stored_features(run: Run, task: str, key: str) -> FeaturesRecord | None:
    """The FeaturesRecord of a task's manifest written under ``key`` whose feature files hold
    the bytes it names, or None (missing, unreadable, another key, a file changed)."""
    from ..records import FileRef
    from ..storage import read_keyed_json

    url = run.dir.features_manifest(task)
    found = read_keyed_json(url, key)
    if found is None:
        return None
    doc, data = found
    try:
        files = {}
        for split in GRADIENT_SPLITS:
            f = doc["files"][split]
            # a path of the run directory, as this stage writes it (never one from outside)
            if f["path"] != run.dir.relative(run.dir.features(task, split)):
                return None
            files[split] = SplitFeatures(f["path"], f["sha256"], int(f["rows"]),
                                         int(f["examples"]))
        rec = FeaturesRecord(task, FileRef(run.dir.relative(url),
                                           hashlib.sha256(data).hexdigest()),
                             files["train"], files["validation"],
                             ProjectionInfo.from_json(doc["projection_info"]),
                             seconds=float(doc["seconds"]), flops=float(doc["flops"]))
    except (ValueError, KeyError, TypeError):
        return None
    return rec if rec.verified(run.dir.url) else None


def _task_features(run: Run, task: str, progress=None) -> FeaturesRecord:
    from ..features import FEATURES_FORMAT, GRAD_MEANING, write_features
    from ..gradients import extract_features
    from ..models import adapter_vector, base_norm
    from ..scoring import ChoiceScorer
    from ..training import forward_parameters

    cfg, td = run.cfg, run.task_data(task)
    lm = theta_star_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    with DEVICE_LOCK:
        # timed from here: the tasks of stage 1 run concurrently and take turns on the device,
        # and the compute ratio (stage 6) sums their seconds, so waiting is not work
        t_start = time.perf_counter()
        proj = _stage1_projector(run, lm)
        files, timings, sample = {}, {}, {}
        for split in GRADIENT_SPLITS:
            t0 = time.perf_counter()
            tim: dict = {}
            examples = estimation_examples(run, task, split)
            if len(examples) < len(td.splits[split]):
                sample[split] = {"max": cfg.estimation.max_examples[split],
                                 "from_n": len(td.splits[split]),
                                 "ids": [e.example_id for e in examples]}
            table = extract_features(lm.model, scorer, examples, proj, task=task,
                                     split=split, batch_size=cfg.estimation.batch_size,
                                     timings=tim, progress=progress)
            url = run.dir.features(task, split)
            files[split] = SplitFeatures(run.dir.relative(url), write_features(url, table),
                                         int(len(table.choice)), table.n_examples)
            timings[split] = dict(tim, total_s=time.perf_counter() - t0)
        theta_norm = float(adapter_vector(lm.model).norm())
        full_norm = base_norm(lm.model)
        # FLOPs as training counts them (records.TrainResult): 2N a token forward, 4N a
        # token backward, N the parameters applied at every position
        n_forward = forward_parameters(lm.model)
        flops = float(sum(2 * n_forward * t["tokens"] + 4 * n_forward * t["backward_tokens"]
                          for t in timings.values()))
        seconds = time.perf_counter() - t_start
    info = ProjectionInfo(proj.p, proj.d, proj.seed, proj.block_rows, theta_norm, full_norm)
    manifest = {
        "task": task, "seed": info.seed, "d": info.d, "p": info.p, "theta_norm": theta_norm,
        "full_norm": full_norm,
        "dims": cfg.estimation.dims, "format": FEATURES_FORMAT.decode(),
        "grad": GRAD_MEANING.decode(), "reference_choice": 0,
        "projection": proj.fingerprint(), "model": lm.fingerprint,
        "template": td.config.template, "choices": td.config.choices,
        "choice_mode": scorer.mode_for(td.splits["train"]),
        "tokenizer": {"class": type(lm.tokenizer).__name__, "vocab_size": len(lm.tokenizer),
                      "max_length": cfg.model.max_length, "padding_side": "right",
                      "truncation": "left (keeps BOS and the end of the prompt)"},
        "data": td.provenance, "estimation_sample": sample,
        "files": {s: {"path": f.path, "sha256": f.sha256, "rows": f.rows,
                      "examples": f.examples} for s, f in files.items()},
        "timings": timings, "code_version": code_version(),
        # what gradient_features_pack reads back: this task's inputs, hashed, and its record
        "key": _task_key(run, task), "projection_info": info.to_json(),
        "seconds": seconds, "flops": flops,
    }
    # written last: its presence marks the task complete
    man = run.dir.write_json(run.dir.features_manifest(task), manifest)
    release_memory()
    return FeaturesRecord(task, man, files["train"], files["validation"], info, seconds=seconds,
                          flops=flops)


@stage(1, "linearity", config=MODEL + PROJECTION + ("estimation.batch_size",
                                                     "estimation.linearity_examples"),
       uses=("estimation.projection_cache_gb",), reads=lambda task, distances=None: [task],
       returns=LinearityRecord)
def linearity(run: Run, task: str, distances: Sequence[float] | None = None) -> LinearityRecord:
    """The first-order check (the paper's Table 5 / Figure 2) on the first examples of one
    task's validation split (``checks.linearity_check``): at the paper's relative distances
    (0.05%–0.25% of ‖θ*_Full‖; gradients/linearity.json), or at ``distances`` — the distances
    the trained adapters actually moved, in the same unit (gradients/linearity-trained.json;
    ``algorithm2.group_adapters`` asks for it after training)."""
    from ..checks import PAPER_DISTANCES, linearity_check
    from ..models import base_norm
    from ..scoring import ChoiceScorer

    cfg = run.cfg
    lm = theta_star_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    examples = run.task_data(task).splits["validation"][:cfg.estimation.linearity_examples]
    with DEVICE_LOCK:
        rows = linearity_check(lm.model, scorer, examples, _stage1_projector(run, lm),
                               distances=PAPER_DISTANCES if distances is None else distances,
                               batch_size=cfg.estimation.batch_size,
                               full_norm=base_norm(lm.model))
    result = {"task": task, "examples": len(examples), "results": rows,
              "distances": "the paper's (0.05%-0.25% of the whole model's norm)"
              if distances is None else "those the trained adapters moved"}
    url = run.dir.linearity if distances is None else run.dir.linearity_trained
    ref = run.dir.write_json(url, result)
    return LinearityRecord(task, len(examples), [LinearityPoint(**r) for r in rows], ref)
