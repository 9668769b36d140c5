"""Stage 4: fine-tuning one adapter on the union of a group's tasks (Algorithm 2, "train one
adapter per group"; docs/design.md, "Stage 4"), and evaluating an adapter.

Training minimizes the multiple-choice log loss of ``scoring.choice_loss``: for example s with
choices c, ``-log softmax_c(h_c(s))[gold]``, where h_c(s) is the verbalizer logit (``token``
mode) or the summed log-probability of the continuation (``sequence`` mode). One batch holds
examples of one task (so one choice mode) of similar length (each run of a few shuffled batches
is sorted by length before it is cut: little padding); the batches of all tasks are
interleaved in a seeded random order, so the optimizer steps mix the tasks of the group over an
epoch. The learning rate warms up and decays (:func:`lr_schedule`).

Everything random (batch order, LoRA dropout) is seeded from ``TrainingConfig.seed``; on CPU a
fixed seed gives bit-identical adapter weights across runs. The caller's global torch RNG
state is left as it was (``torch.random.fork_rng``). Saving and loading adapters: ``adapters``.
"""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .choices import flatten
from .data import Example
from .models import adapter_vector, base_norm, trainable_parameters
from .records import Progress, TrainResult
from .runtime import check_stop
from .scoring import (ChoiceScorer, choice_loss, examples_by_task, model_device, predict_scores,
                      score_examples)

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingError", "train_adapter", "evaluate", "summarize"]


class TrainingError(ValueError):
    """Training that cannot give a usable adapter (a non-finite loss or weights); the message
    says where and which setting to change."""



# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------

def _task_modes(scorer: ChoiceScorer, examples: Sequence[Example]) -> dict[str, str]:
    """One choice mode per task, decided on all of that task's examples (not per batch), so a
    task's scores have one meaning throughout."""
    return {t: scorer.mode_for([examples[i] for i in idx])
            for t, idx in examples_by_task(examples).items()}


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def summarize(examples: Sequence[Example], scores: Sequence[np.ndarray]) -> dict:
    """Mean log loss and accuracy per task of per-example scores (see :func:`evaluate`)."""
    per_task: dict[str, dict] = {}
    for t, idx in examples_by_task(examples).items():
        z, layout = flatten([scores[i] for i in idx], [examples[i].label for i in idx])
        per_task[t] = {"loss": layout.log_loss(z), "accuracy": float(np.mean(layout.correct(z))),
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
    return summarize(examples, scores)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def forward_parameters(model) -> int:
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


def total_steps(examples: Sequence[Example], tcfg) -> int:
    """Optimizer steps of a whole training run: every epoch cuts each task's examples into
    batches of ``batch_size`` (see :func:`_epoch_batches`), a step every ``grad_accumulation``
    batches; ``max_steps`` caps it."""
    batches = sum(math.ceil(len(idx) / tcfg.batch_size)
                  for idx in examples_by_task(examples).values())
    steps = math.ceil(batches / tcfg.grad_accumulation) * tcfg.epochs
    return min(steps, tcfg.max_steps) if tcfg.max_steps is not None else steps


def lr_schedule(tcfg, total: int):
    """The factor of ``learning_rate`` at optimizer step k (0-based, torch's LambdaLR): linear
    warm-up over the first ``warmup_ratio`` of the steps, then linear or cosine decay to 0 at
    step ``total`` (or constant)."""
    warmup = int(round(tcfg.warmup_ratio * total))

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        if tcfg.schedule == "constant":
            return 1.0
        left = max(total - warmup, 1)
        done = min(max(k - warmup, 0) / left, 1.0)
        return 1.0 - done if tcfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
    return factor


BUCKET_BATCHES = 8  # batches whose examples are sorted by length together (less padding)


def _epoch_batches(rng: np.random.Generator, examples: Sequence[Example], batch_size: int,
                   length=None) -> list[tuple[str, list[int]]]:
    """Shuffle each task's examples, cut them into batches of one task, interleave the batches
    of all tasks in a random order. With ``length`` (example index -> tokens), each run of
    ``BUCKET_BATCHES`` batches of the shuffled order is sorted by length before it is cut, so a
    batch pads little while every epoch still sees a new random grouping and order."""
    batches = []
    for t, idx in examples_by_task(examples).items():
        perm = [idx[i] for i in rng.permutation(len(idx))]
        if length is not None:
            span = batch_size * BUCKET_BATCHES
            perm = [i for j in range(0, len(perm), span)
                    for i in sorted(perm[j:j + span], key=lambda i: (length(i), i))]
        batches += [(t, perm[j:j + batch_size]) for j in range(0, len(perm), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def train_adapter(model, tokenizer, train_examples: Sequence[Example],
                  val_examples: Sequence[Example], tcfg, max_length: int,
                  choice_mode: str = "auto",
                  progress: Progress | None = None, *,
                  eval_batch_size: int | None = None, validate_initial: bool = True,
                  loss_fn=None) -> TrainResult:
    """Fine-tune the trainable adapter weights (any adapter kind) of a PeftModel on examples of several
    tasks; return a TrainResult. The model is modified in place and ends holding the weights of
    the best epoch (lowest validation loss; the last epoch when there are no validation
    examples), in the train/eval mode it had before.

    ``tcfg`` is a ``config.TrainingConfig``: AdamW with ``weight_decay`` and a learning rate that
    warms up linearly to ``learning_rate`` over the first ``warmup_ratio`` of the optimizer steps
    and then decays to 0 at the last one (``schedule``: linear or cosine; or stays constant),
    gradients clipped to ``max_grad_norm``;
    ``epochs`` passes over the data in batches of ``batch_size`` examples (one task per batch),
    an optimizer step every ``grad_accumulation`` batches (the last, shorter group of an epoch
    is averaged over its own size); ``max_steps`` caps the number of optimizer steps (training
    stops after whichever of ``epochs`` / ``max_steps`` comes first; a partial last epoch is
    still validated). Dropout is active during training (``model.train()``); validation runs in
    eval mode after every epoch.

    ``progress(epoch, epochs, detail)``, if given, is called after every epoch's validation
    (before the best weights are restored at the end); ``detail`` gives the epoch's losses.
    ``loss_fn(model, batch, examples)`` replaces the multiple-choice log loss (the boosting
    modes' residual and sample-weighted losses, ``boosting``).
    """
    if not train_examples:
        raise ValueError("train_adapter: no training examples")
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("train_adapter: the model has no trainable parameters (was the adapter "
                         "loaded with is_trainable=False?)")
    device = model_device(model)
    scorer = ChoiceScorer(tokenizer, max_length, choice_mode)
    train_modes = _task_modes(scorer, train_examples)
    sizes = [scorer.padded_length(ex, train_modes[ex.task]) for ex in train_examples]
    eval_bs = eval_batch_size or max(tcfg.batch_size, 16)
    n_forward = forward_parameters(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def validate() -> tuple[dict, float | None]:
        if not val_examples:
            return {}, None
        res = summarize(val_examples, score_examples(model, scorer, val_examples, eval_bs))
        return res, res["average"]["loss"]

    history: list[dict] = []
    was_training = model.training
    theta_start = adapter_vector(model)
    t_start = time.perf_counter()
    rng = np.random.default_rng(tcfg.seed)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    count = _Counts()
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
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(
                tcfg, total_steps(train_examples, tcfg)))
            for epoch in range(1, tcfg.epochs + 1):
                t_epoch = time.perf_counter()
                model.train()
                batches = _epoch_batches(rng, train_examples, tcfg.batch_size,
                                         sizes.__getitem__)
                train_loss, epoch_steps = _train_epoch(
                    model, params, opt, sched, scorer, train_examples, train_modes, batches,
                    tcfg, device, loss_fn or choice_loss, epoch, count)
                val, vloss = validate()
                entry = {"epoch": epoch, "train_loss": train_loss, "steps": epoch_steps,
                         "seconds": time.perf_counter() - t_epoch, "val_loss": vloss, "val": val}
                history.append(entry)
                log.info("epoch %d: train loss %.4f, val loss %s", epoch, train_loss, vloss)
                if progress:
                    progress(epoch, tcfg.epochs,
                             f"epoch {epoch}: train loss {train_loss:.4f}, val loss "
                             + ("-" if vloss is None else f"{vloss:.4f}"))
                # keep the best epoch (validation loss; ties keep the earlier epoch)
                if vloss is None or best_loss is None or vloss < best_loss:
                    best_epoch, best_loss = epoch, vloss
                    best_snap = _snapshot(model) if val_examples else None
                if tcfg.max_steps is not None and count.steps >= tcfg.max_steps:
                    break
            last_epoch = history[-1]["epoch"]
            if best_snap is not None and best_epoch != last_epoch:
                _restore(model, best_snap)
    finally:
        model.train(was_training)
    wall = time.perf_counter() - t_start
    moved = float((adapter_vector(model) - theta_start).norm())
    full, own = base_norm(model), float(theta_start.norm())
    return TrainResult(
        best_epoch=best_epoch, history=history, wall_seconds=wall,
        n_steps=count.steps, tokens_seen=count.tokens,
        flops_estimate=6.0 * n_forward * count.tokens, peak_memory_bytes=_peak_memory(device),
        trainable_parameters=int(sum(p.numel() for p in params)), n_params_forward=n_forward,
        examples_seen=count.examples, best_val_loss=best_loss, device=str(device),
        config=dict(_config_dict(tcfg), max_length=max_length, choice_mode=choice_mode,
                    task_modes=train_modes),
        distance_moved=moved, relative_distance=moved / full if full > 0 else None,
        adapter_distance=moved / own if own > 0 else None)


@dataclass
class _Counts:
    """What a training run has done so far: optimizer steps, tokens and examples seen."""
    steps: int = 0
    tokens: int = 0
    examples: int = 0


def _train_epoch(model, params, opt, sched, scorer, examples, modes, batches, tcfg, device,
                 loss_fn, epoch: int, count: _Counts) -> tuple[float, int]:
    """One epoch of optimizer steps over ``batches`` (a step every ``grad_accumulation``
    batches, gradients averaged over the step's batches and clipped); stops at
    ``max_steps``. Returns (the epoch's mean training loss per example, its steps)."""
    acc = tcfg.grad_accumulation
    loss_sum, loss_n, epoch_steps = 0.0, 0, 0
    for g in range(0, len(batches), acc):
        check_stop()
        group = batches[g:g + acc]
        opt.zero_grad(set_to_none=True)
        for task, idx in group:
            exs = [examples[i] for i in idx]
            batch = scorer.encode(exs, mode=modes[task]).to(device)
            loss = loss_fn(model, batch, exs)
            (loss / len(group)).backward()
            lv = float(loss.detach())
            check_loss(lv, epoch, count.steps + 1, task, tcfg)
            loss_sum += lv * len(exs)
            loss_n += len(exs)
            count.tokens += int(batch.attention_mask.sum())
            count.examples += len(exs)
        if tcfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        opt.step()
        sched.step()
        check_weights(params, epoch, count.steps + 1, tcfg)
        count.steps += 1
        epoch_steps += 1
        if tcfg.max_steps is not None and count.steps >= tcfg.max_steps:
            break
    opt.zero_grad(set_to_none=True)
    return loss_sum / max(loss_n, 1), epoch_steps


def check_loss(lv: float, epoch: int, step: int, task: str, tcfg, who: str = "") -> None:
    """TrainingError when a batch's loss is not finite (``who``: the adapter, when several
    train at once)."""
    if not math.isfinite(lv):
        raise TrainingError(
            f"{who}training diverged: the loss is {lv} in epoch {epoch} (step {step}, task "
            f"{task!r}); lower training.learning_rate (now {tcfg.learning_rate}) or keep "
            "training.max_grad_norm")


def check_weights(params, epoch: int, step: int, tcfg, who: str = "") -> None:
    """TrainingError when an optimizer step left a weight that is not finite."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise TrainingError(
            f"{who}training diverged: adapter weights are not finite after step {step} "
            f"(epoch {epoch}); lower training.learning_rate (now {tcfg.learning_rate})")


def _config_dict(tcfg) -> dict:
    if hasattr(tcfg, "model_dump"):
        return tcfg.model_dump(mode="json")
    if hasattr(tcfg, "__dataclass_fields__"):
        return asdict(tcfg)
    return dict(vars(tcfg))


