"""Fine-tuning one adapter on the union of a group's tasks (DESIGN.md step 4, Algorithm 2 line
"train one adapter per group"), evaluation, and saving/loading adapters as ordinary PEFT
adapter directories.

Training minimizes the multiple-choice log loss of ``models.choice_loss``: for example s with
choices c, ``-log softmax_c(h_c(s))[gold]``, where h_c(s) is the verbalizer logit (``token``
mode) or the summed log-probability of the continuation (``sequence`` mode). One batch holds
examples of one task (so one choice mode); the batches of all tasks are interleaved in a seeded
random order, so every optimizer step mixes the tasks of the group over an epoch.

Everything random (batch order, LoRA dropout) is seeded from ``TrainingConfig.seed``; on CPU a
fixed seed gives bit-identical adapter weights across runs. The caller's global torch RNG
state is left as it was (``torch.random.fork_rng``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .data import Example
from .models import ChoiceScorer, choice_loss, choice_outputs, trainable_parameters

log = logging.getLogger(__name__)

__all__ = [
    "TrainResult", "AdapterMismatchError", "train_adapter", "evaluate", "predict_scores",
    "save_adapter", "load_adapter", "check_adapter_fits", "read_train_result", "TRAINING_FILE",
    "BASE_MODEL_FILE",
]

TRAINING_FILE = "training.json"  # TrainResult of the adapter, next to the PEFT files
BASE_MODEL_FILE = "base_model.json"  # fingerprint of the base model the adapter was trained on
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """An adapter directory that does not fit the base model; the message names the directory
    and the mismatch."""


# ----------------------------------------------------------------------------------------------
# Result record
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What one ``train_adapter`` call did. JSON-able via ``to_json()``.

    ``history`` has one entry per epoch: ``{"epoch", "train_loss", "steps", "seconds",
    "val_loss", "val": evaluate(...)}``; entry 0 (when validated) is the adapter before training
    (``train_loss`` None). ``val_loss`` is the selection criterion: the unweighted mean over
    tasks of each task's mean validation loss. ``best_epoch`` is chosen among epochs >= 1.

    ``flops_estimate`` = 6 · n_params_forward · tokens_seen: the usual forward (2N) + backward
    (4N) floating-point operations per token, N = parameters applied at every position (all weights,
    LoRA included, except the input embedding table, a lookup, and the output head, which
    ``choice_outputs`` applies to a few rows or positions only). With frozen base weights the
    backward pass skips their weight gradients, so the true cost is nearer 4N per token: the
    estimate is an upper bound of the usual kind.
    ``tokens_seen`` counts non-padding input tokens of training batches (in sequence mode, one
    sequence per answer choice); validation forwards are not counted.

    ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on the training device when it
    is a GPU (reset at the start of training), else the process's peak resident set size
    (``getrusage``), which covers the whole process lifetime, not only this call.
    """
    best_epoch: int
    history: list[dict]
    wall_seconds: float
    n_steps: int
    tokens_seen: int
    flops_estimate: float
    peak_memory_bytes: int
    trainable_parameters: int
    n_params_forward: int = 0
    examples_seen: int = 0
    best_val_loss: float | None = None
    device: str = "cpu"
    config: dict = field(default_factory=dict)  # the TrainingConfig used, + max_length, mode

    def to_json(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> "TrainResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------

def _by_task(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Indices of the examples of each task, tasks in first-seen order."""
    out: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault(ex.task, []).append(i)
    return out


def _task_modes(scorer: ChoiceScorer, examples: Sequence[Example]) -> dict[str, str]:
    """One choice mode per task, decided on all of that task's examples (not per batch), so a
    task's scores have one meaning throughout."""
    return {t: scorer.mode_for([examples[i] for i in idx])
            for t, idx in _by_task(examples).items()}


def _eval_batches(scorer: ChoiceScorer, examples: Sequence[Example], batch_size: int):
    """(indices, mode) batches: within a task, sorted by prompt length (less padding)."""
    for t, idx in _by_task(examples).items():
        mode = scorer.mode_for([examples[i] for i in idx])
        idx = sorted(idx, key=lambda i: (len(examples[i].prompt), i))
        for j in range(0, len(idx), batch_size):
            yield idx[j:j + batch_size], mode


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _score_arrays(model, scorer: ChoiceScorer, examples: Sequence[Example],
                  batch_size: int) -> list[np.ndarray]:
    """h_c(s) for every example (float32 numpy vector over its choices), in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray | None] = [None] * len(examples)
    if not examples:
        return []
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx, mode in _eval_batches(scorer, examples, batch_size):
                batch = scorer.encode([examples[i] for i in idx], mode=mode).to(device)
                scores = choice_outputs(model, batch).float().cpu().numpy()
                offs = np.concatenate([[0], np.cumsum(batch.n_choices)])
                for k, i in enumerate(idx):
                    out[i] = scores[offs[k]:offs[k + 1]].copy()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _log_softmax(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return v - m - np.log(np.exp(v - m).sum())


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def predict_scores(model, tokenizer, examples: Sequence[Example], max_length: int,
                   batch_size: int = 16, choice_mode: str = "auto") -> list[np.ndarray]:
    """Per example, the vector of h_c(s) over its choices (float32), in input order, computed
    in eval mode without gradients.

    h_c are raw verbalizer logits in ``token`` mode and summed continuation log-probabilities
    in ``sequence`` mode; either way the choice probabilities are the softmax over each
    example's own choices. The mode is decided per task on all given examples of that task.
    """
    return _score_arrays(model, ChoiceScorer(tokenizer, max_length, choice_mode), examples,
                         batch_size)


def _summarize(examples: Sequence[Example], scores: Sequence[np.ndarray]) -> dict:
    per_task: dict[str, dict] = {}
    for t, idx in _by_task(examples).items():
        losses, correct = [], []
        for i in idx:
            lp = _log_softmax(scores[i])
            losses.append(-lp[examples[i].label])
            correct.append(int(np.argmax(scores[i])) == examples[i].label)
        per_task[t] = {"loss": float(np.mean(losses)), "accuracy": float(np.mean(correct)),
                       "n": len(idx)}
    if "average" in per_task:
        raise ValueError("a task named 'average' clashes with the summary key of evaluate()")
    if per_task:
        per_task["average"] = {
            "loss": float(np.mean([r["loss"] for r in per_task.values()])),
            "accuracy": float(np.mean([r["accuracy"] for r in per_task.values()])),
            "n": int(sum(r["n"] for r in per_task.values())),
        }
    return per_task


def evaluate(model, tokenizer, examples: Sequence[Example], max_length: int,
             batch_size: int = 16, choice_mode: str = "auto") -> dict:
    """Mean log loss and accuracy per task: ``{task: {"loss", "accuracy", "n"}, ...,
    "average": {"loss", "accuracy", "n"}}``. ``average`` is the unweighted mean over tasks of
    the per-task loss and accuracy (``n``: total examples). Empty input gives ``{}``.
    Ties in the argmax go to the first choice."""
    scores = predict_scores(model, tokenizer, examples, max_length, batch_size, choice_mode)
    return _summarize(examples, scores)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _forward_param_count(model) -> int:
    """Parameters multiplied in every position of a forward pass: all but the input embedding
    table (a lookup) and the output head (``choice_outputs`` multiplies only the verbalizer rows
    or the continuation positions with it); 4-bit weights counted by their logical size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            m = getattr(base, get)()
            if m is not None:
                skip.add(id(m.weight))
        except (AttributeError, NotImplementedError):
            pass
    n = 0
    for p in model.parameters():
        if id(p) in skip:
            continue
        qs = getattr(p, "quant_state", None)
        n += int(np.prod(qs.shape)) if qs is not None and hasattr(qs, "shape") else p.numel()
    return n


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


@torch.no_grad()
def _restore(model, snap: dict[str, torch.Tensor]) -> None:
    params = dict(trainable_parameters(model))
    for n, v in snap.items():
        params[n].copy_(v)


def _epoch_batches(rng: np.random.Generator, examples: Sequence[Example], batch_size: int
                   ) -> list[tuple[str, list[int]]]:
    """Shuffle each task's examples, cut them into batches of one task, interleave the batches
    of all tasks in a random order."""
    batches = []
    for t, idx in _by_task(examples).items():
        perm = [idx[i] for i in rng.permutation(len(idx))]
        batches += [(t, perm[j:j + batch_size]) for j in range(0, len(perm), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def train_adapter(model, tokenizer, train_examples: Sequence[Example],
                  val_examples: Sequence[Example], tcfg, max_length: int,
                  choice_mode: str = "auto",
                  progress: Callable[[dict], None] | None = None, *,
                  eval_batch_size: int | None = None, validate_initial: bool = True,
                  max_grad_norm: float | None = None) -> TrainResult:
    """Fine-tune the trainable (LoRA / QLoRA) weights of a PeftModel on examples of several
    tasks; return a TrainResult. The model is modified in place and ends holding the weights of
    the best epoch (lowest validation loss; the last epoch when there are no validation
    examples), in the train/eval mode it had before.

    ``tcfg`` is a ``config.TrainingConfig``: AdamW with ``learning_rate`` and ``weight_decay``;
    ``epochs`` passes over the data in batches of ``batch_size`` examples (one task per batch),
    an optimizer step every ``grad_accumulation`` batches (the last, shorter group of an epoch
    is averaged over its own size); ``max_steps`` caps the number of optimizer steps (training
    stops after whichever of ``epochs`` / ``max_steps`` comes first; a partial last epoch is
    still validated). Dropout is active during training (``model.train()``); validation runs in
    eval mode after every epoch.

    ``progress``, if given, is called with ``{"event": "step", "epoch", "step", "loss"}`` after
    every optimizer step and ``{"event": "epoch", "epoch", "train_loss", "val_loss", "val"}``
    after every epoch's validation (before the best weights are restored at the end).
    """
    if not train_examples:
        raise ValueError("train_adapter: no training examples")
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("train_adapter: the model has no trainable parameters (was the adapter "
                         "loaded with is_trainable=False?)")
    device = _model_device(model)
    scorer = ChoiceScorer(tokenizer, max_length, choice_mode)
    train_modes = _task_modes(scorer, train_examples)
    eval_bs = eval_batch_size or max(tcfg.batch_size, 16)
    n_trainable = int(sum(p.numel() for p in params))
    n_forward = _forward_param_count(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def validate() -> tuple[dict, float | None]:
        if not val_examples:
            return {}, None
        res = _summarize(val_examples, _score_arrays(model, scorer, val_examples, eval_bs))
        return res, res["average"]["loss"]

    history: list[dict] = []
    was_training = model.training
    t_start = time.perf_counter()
    rng = np.random.default_rng(tcfg.seed)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    n_steps = tokens = seen = 0
    best_epoch, best_loss, best_snap = 0, None, None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(tcfg.seed)  # LoRA dropout masks
            if validate_initial and val_examples:
                val, vloss = validate()
                history.append({"epoch": 0, "train_loss": None, "steps": 0, "seconds": 0.0,
                                "val_loss": vloss, "val": val})
            opt = torch.optim.AdamW(params, lr=tcfg.learning_rate,
                                    weight_decay=tcfg.weight_decay)
            for epoch in range(1, tcfg.epochs + 1):
                t_epoch = time.perf_counter()
                model.train()
                batches = _epoch_batches(rng, train_examples, tcfg.batch_size)
                acc = tcfg.grad_accumulation
                loss_sum, loss_n, epoch_steps = 0.0, 0, 0
                for g in range(0, len(batches), acc):
                    group = batches[g:g + acc]
                    opt.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for task, idx in group:
                        exs = [train_examples[i] for i in idx]
                        batch = scorer.encode(exs, mode=train_modes[task]).to(device)
                        loss = choice_loss(model, batch, exs)
                        (loss / len(group)).backward()
                        lv = float(loss.detach())
                        loss_sum += lv * len(exs)
                        loss_n += len(exs)
                        step_loss += lv / len(group)
                        tokens += int(batch.attention_mask.sum())
                        seen += len(exs)
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    opt.step()
                    n_steps += 1
                    epoch_steps += 1
                    if progress:
                        progress({"event": "step", "epoch": epoch, "step": n_steps,
                                  "loss": step_loss})
                    if tcfg.max_steps is not None and n_steps >= tcfg.max_steps:
                        break
                opt.zero_grad(set_to_none=True)
                val, vloss = validate()
                entry = {"epoch": epoch, "train_loss": loss_sum / max(loss_n, 1),
                         "steps": epoch_steps, "seconds": time.perf_counter() - t_epoch,
                         "val_loss": vloss, "val": val}
                history.append(entry)
                log.info("epoch %d: train loss %.4f, val loss %s", epoch, entry["train_loss"],
                         vloss)
                if progress:
                    progress({"event": "epoch", "epoch": epoch, "train_loss": entry["train_loss"],
                              "val_loss": vloss, "val": val})
                # keep the best epoch (validation loss; ties keep the earlier epoch)
                if vloss is None or best_loss is None or vloss < best_loss:
                    best_epoch, best_loss = epoch, vloss
                    best_snap = _snapshot(model) if val_examples else None
                if tcfg.max_steps is not None and n_steps >= tcfg.max_steps:
                    break
            last_epoch = history[-1]["epoch"]
            if best_snap is not None and best_epoch != last_epoch:
                _restore(model, best_snap)
    finally:
        model.train(was_training)
    wall = time.perf_counter() - t_start
    return TrainResult(
        best_epoch=best_epoch, history=history, wall_seconds=wall, n_steps=n_steps,
        tokens_seen=tokens, flops_estimate=6.0 * n_forward * tokens,
        peak_memory_bytes=_peak_memory(device), trainable_parameters=n_trainable,
        n_params_forward=n_forward, examples_seen=seen, best_val_loss=best_loss,
        device=str(device),
        config=dict(_config_dict(tcfg), max_length=max_length, choice_mode=choice_mode,
                    task_modes=train_modes, max_grad_norm=max_grad_norm))


def _config_dict(tcfg) -> dict:
    if hasattr(tcfg, "model_dump"):
        return tcfg.model_dump(mode="json")
    if hasattr(tcfg, "__dataclass_fields__"):
        return asdict(tcfg)
    return dict(vars(tcfg))


# ----------------------------------------------------------------------------------------------
# Saving and loading adapters
# ----------------------------------------------------------------------------------------------

def _write_json_file(path: Path, obj) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def save_adapter(model, out_dir, result: TrainResult | None = None, *,
                 adapter_name: str | None = None, base_fingerprint: dict | None = None) -> Path:
    """Write the (active, or ``adapter_name``) adapter of a PeftModel as an ordinary PEFT
    adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained``; plus ``training.json`` (the TrainResult, when given) and
    ``base_model.json`` (the base model fingerprint, when given; ``load_adapter`` checks it).

    The directory is built under a temporary sibling name and renamed into place when
    complete, so an interrupted save never leaves a complete-looking ``out_dir``; an existing
    ``out_dir`` is replaced. Local paths only (PEFT reads and writes local files).
    """
    out_dir = Path(out_dir)
    name = adapter_name or getattr(model, "active_adapter", None) or "default"
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name not in getattr(model, "peft_config", {}):
        raise ValueError(f"save_adapter: the model has no adapter named {name!r} "
                         f"(adapters: {sorted(getattr(model, 'peft_config', {}))})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[name])
        if name != "default":  # PEFT writes a non-default adapter into a subdirectory
            sub = tmp / name
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (tmp / f).is_file():
                raise RuntimeError(f"save_adapter: PEFT did not write {f} for adapter {name!r}")
        _canonical_adapter_config(tmp / ADAPTER_CONFIG)
        if result is not None:
            _write_json_file(tmp / TRAINING_FILE, result.to_json())
        if base_fingerprint is not None:
            _write_json_file(tmp / BASE_MODEL_FILE, base_fingerprint)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _canonical_adapter_config(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in set order, which follows Python's
    per-process string hashing: the same adapter saved by two processes would differ in
    adapter_config.json. Sort it (PEFT reads it back as a set), keeping PEFT's formatting."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _module_io(module) -> tuple[int | None, int | None]:
    """(in_features, out_features) of a linear-like module, LoRA-wrapped or not."""
    m = getattr(module, "base_layer", module)
    fin = getattr(module, "in_features", None) or getattr(m, "in_features", None)
    fout = getattr(module, "out_features", None) or getattr(m, "out_features", None)
    if fin is None and hasattr(m, "nx"):  # transformers Conv1D (GPT-2 style)
        fin, fout = m.nx, m.nf
    return fin, fout


def check_adapter_fits(base_model, adapter_dir) -> None:
    """Raise AdapterMismatchError unless every LoRA weight in ``adapter_dir`` has a module of
    the right shape in ``base_model`` (a plain transformers model or a PeftModel). Reads only
    the safetensors header. Checked before PEFT touches the model, because a failed
    ``PeftModel.from_pretrained`` leaves LoRA layers injected into the base model."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise AdapterMismatchError(f"adapter directory {adapter_dir} has no {f.name}: not a "
                                       "complete PEFT adapter")
    inner = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model
    modules = dict(inner.named_modules())
    problems = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            path = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            for marker, which in ((".lora_A.", "A"), (".lora_B.", "B")):
                if marker in path:
                    mod_path = path.split(marker)[0]
                    break
            else:
                continue  # other PEFT weights (embeddings, magnitudes): left to PEFT
            module = modules.get(mod_path)
            if module is None:
                problems.append(f"{key}: the base model has no module {mod_path!r}")
                continue
            fin, fout = _module_io(module)
            if fin is None or len(shape) != 2:
                continue
            want = shape[1] if which == "A" else shape[0]
            have = fin if which == "A" else fout
            if want != have:
                side = "input" if which == "A" else "output"
                problems.append(f"{key}: shape {list(shape)} needs {side} size {want}, module "
                                f"{mod_path!r} of the base model has {have}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit the base model "
            f"{getattr(getattr(inner, 'config', None), '_name_or_path', '?')!r}: "
            + "; ".join(problems[:5]) + more)


_FINGERPRINT_KEYS = ("name", "kind", "weights_sha256", "n_parameters")


def _check_fingerprint(adapter_dir: Path, expected: dict | None) -> None:
    f = adapter_dir / BASE_MODEL_FILE
    if expected is None or not f.is_file():
        return
    stored = json.loads(f.read_text())
    diff = [k for k in _FINGERPRINT_KEYS
            if stored.get(k) is not None and expected.get(k) is not None
            and stored[k] != expected[k]]
    # n_parameters differs between a 4-bit and a full-precision load of the same weights
    if "n_parameters" in diff and stored.get("quantization") != expected.get("quantization"):
        diff.remove("n_parameters")
    if diff:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on another base model: "
            + ", ".join(f"{k} {stored[k]!r} (adapter) vs {expected[k]!r} (base)" for k in diff))
    if stored.get("quantization") != expected.get("quantization"):
        log.warning("adapter %s was trained on a base with quantization %r, loading it on %r",
                    adapter_dir, stored.get("quantization"), expected.get("quantization"))


def load_adapter(base_model, adapter_dir, adapter_name: str | None = None, *,
                 base_fingerprint: dict | None = None, is_trainable: bool = False):
    """Load a saved adapter onto a base model and return the PeftModel.

    ``base_model`` is a plain transformers model (wrapped with ``PeftModel.from_pretrained``,
    which modifies it in place) or a PeftModel (the adapter is added with ``load_adapter``
    under ``adapter_name`` — required then — and the same PeftModel is returned; activate it
    with ``set_adapter``). Raises AdapterMismatchError naming the directory and the mismatch
    when the adapter does not fit: module shapes (e.g. another hidden size), modules missing in
    the base, or a stored base fingerprint (``base_model.json``) that differs from
    ``base_fingerprint``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    _check_fingerprint(adapter_dir, base_fingerprint)
    check_adapter_fits(base_model, adapter_dir)
    try:
        if isinstance(base_model, PeftModel):
            if adapter_name is None:
                raise ValueError("load_adapter: adapter_name is required when adding an adapter "
                                 "to a PeftModel")
            if adapter_name in base_model.peft_config:
                raise ValueError(f"load_adapter: the model already has an adapter named "
                                 f"{adapter_name!r}")
            base_model.load_adapter(str(adapter_dir), adapter_name=adapter_name,
                                    is_trainable=is_trainable)
            return base_model
        return PeftModel.from_pretrained(base_model, str(adapter_dir),
                                         adapter_name=adapter_name or "default",
                                         is_trainable=is_trainable)
    except RuntimeError as e:
        if "size mismatch" in str(e) or "Error(s) in loading state_dict" in str(e):
            raise AdapterMismatchError(f"adapter {adapter_dir} does not fit the base model: "
                                       f"{e}") from e
        raise


def read_train_result(adapter_dir) -> TrainResult | None:
    f = Path(adapter_dir) / TRAINING_FILE
    return TrainResult.from_json(json.loads(f.read_text())) if f.is_file() else None
