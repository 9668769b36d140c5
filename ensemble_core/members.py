"""Several members of an ensemble in one pass over the base model (issue 34; docs/design.md,
"All members in one pass").

An ensemble's output for one example needs the output of every member adapter on it (h_g =
Σ scale · h_member, Algorithm 2's group ensembles; the weights over groups, Eq. 5). Scored
member by member, that is one forward pass over the frozen base per member. Here the examples
of a batch are encoded once, their sequences repeated once per member (member-major), and the
whole stack goes through the base in one forward: every adapter layer applies to each row only
that row's member (PEFT's mixed-adapter batches, ``adapter_names``: the base layer's product
for all rows, each adapter's low-rank product on its own rows). The outputs equal member-by-
member scoring to fp32 rounding (tests/test_members.py).

What this saves is the per-pass cost — one forward call per batch instead of one per member,
larger matrix products, one Python walk over the layers — not FLOPs: each member still sees
its own hidden states after the first adapted layer, so the base's work per example grows
with the number of members either way (BENCHMARKS.md, "All members in one pass").
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from .data import Example
from .runtime import check_stop
from .scoring import (SCORING_TOKENS, ChoiceScorer, EncodedBatch, _eval_batches,
                      choice_outputs, model_device, scores_loss)
from .training import check_loss, check_weights

__all__ = ["BASE", "routed", "concat_batches", "repeat_batch", "score_members",
           "score_members_apart", "train_adapters"]

BASE = "__base__"  # PEFT's name for rows that go through the base model alone


def _adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def routed(model, row_adapters: Sequence[str]):
    """Inside the block, every adapter layer of ``model`` (a PeftModel) applies to row i of its
    input only the adapter named ``row_adapters[i]`` (:data:`BASE`: none). The layers take
    the names as PEFT's ``adapter_names`` keyword (LoRA's and QLoRA's layers in PEFT; the
    bottleneck layer, ``bottleneck.BottleneckLayer``, in this package); the hooks that pass
    it are removed on the way out."""
    names = list(row_adapters)
    known = set(getattr(model, "peft_config", None) or ())
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapters {unknown} are not loaded in the model (it has "
                         f"{sorted(known)})")
    layers = _adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers to route rows through")

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def concat_batches(batches: Sequence[EncodedBatch]) -> EncodedBatch:
    """Encoded batches of one mode as one batch: their sequences stacked in order (right
    padded to the longest), their output rows (``choice_outputs``) in the same order."""
    if len({b.mode for b in batches}) != 1:
        raise ValueError("concat_batches: the batches are of different choice modes")
    if len(batches) == 1:
        return batches[0]
    T = max(b.input_ids.shape[1] for b in batches)

    def padded(t, value):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)

    def stacked(field, value=None):
        ts = [getattr(b, field) for b in batches]
        if ts[0] is None:
            return None
        return torch.cat([padded(t, value) if value is not None else t for t in ts])

    def shifted(field, size):  # indices into the sequences (or rows), shifted per batch
        ts = [getattr(b, field) for b in batches]
        if ts[0] is None:
            return None
        starts = np.concatenate([[0], np.cumsum([size(b) for b in batches])[:-1]])
        return torch.cat([t + int(o) for t, o in zip(ts, starts)])

    seqs = lambda b: b.input_ids.shape[0]  # noqa: E731
    rows = lambda b: b.n_rows  # noqa: E731
    first = batches[0]
    # the padding's token ids are never read: right padding, masked (attention_mask, segment)
    return EncodedBatch(
        first.mode, stacked("input_ids", 0), stacked("attention_mask", 0),
        n_choices=[n for b in batches for n in b.n_choices],
        truncated=sum(b.truncated for b in batches),
        row_seq=shifted("row_seq", seqs), row_slot=stacked("row_slot"),
        last_pos=stacked("last_pos"), row_token=stacked("row_token"),
        position_ids=stacked("position_ids", 0), segment=stacked("segment", -1),
        tgt_seq=shifted("tgt_seq", seqs), tgt_src=stacked("tgt_src"),
        tgt_token=stacked("tgt_token"), tgt_row=shifted("tgt_row", rows))


def repeat_batch(batch: EncodedBatch, copies: int) -> EncodedBatch:
    """``batch`` stacked ``copies`` times: copy k's sequences and output rows follow copy
    k-1's."""
    return concat_batches([batch] * copies)


STACK_TOKENS = 4 * SCORING_TOKENS  # padded tokens of one stacked forward with ``alone``


def score_members(model, scorer: ChoiceScorer, examples: Sequence[Example],
                  adapters: Sequence[str], batch_size: int, counts: dict | None = None,
                  max_tokens: int = SCORING_TOKENS, *, alone: bool = False
                  ) -> dict[str, list[np.ndarray]]:
    """h_c(s) of every example under each of ``adapters`` (names of adapters loaded in the
    PeftModel ``model``; :data:`BASE` for the base model alone), in input order — what
    ``scoring.score_examples`` gives with each adapter active, from one forward pass per batch
    for all of them. A forward holds at most what one member-by-member forward holds —
    ``batch_size`` sequences' worth of examples over all copies (at least one example) and
    ``max_tokens`` padded tokens — so its memory is that of one member's batch, and on hardware
    that is already busy at that size (a CPU: BENCHMARKS.md, "All members in one pass") the
    stacked forward is no slower per token; what it saves is the passes below that size (batch
    1 serving: M rows in one forward instead of M forwards of one row).

    ``alone=True`` keeps each member's batches those of scoring it alone (``batch_size``
    examples, ``max_tokens`` tokens each) and stacks as many members as fit
    :data:`STACK_TOKENS`: a member's scores then do not depend on which members it is scored
    with (stage 5 reads scores computed in different runs side by side; on a CPU they are
    bit-identical to member-by-member scoring).
    ``counts["tokens"]``, when given, grows by the non-padding tokens forwarded (every copy:
    the work is per member)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapters = list(dict.fromkeys(adapters))
    out = {a: [None] * len(examples) for a in adapters}
    if not examples or not adapters:
        return out
    device = model_device(model)
    M = len(adapters)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            per, tokens = ((batch_size, max_tokens) if alone else
                           (max(1, batch_size // M), max(1, max_tokens // M)))
            for idx, mode in _eval_batches(scorer, examples, per, tokens):
                check_stop()
                one = scorer.encode([examples[i] for i in idx], mode=mode)
                n_seq = one.input_ids.shape[0]
                size = one.input_ids.numel()
                step = max(1, STACK_TOKENS // max(size, 1)) if alone else M
                for c in range(0, M, step):  # members stacked per forward
                    chunk = adapters[c:c + step]
                    batch = repeat_batch(one, len(chunk)).to(device)
                    if counts is not None:
                        counts["tokens"] = (counts.get("tokens", 0)
                                            + int(batch.attention_mask.sum()))
                    with routed(model, [a for a in chunk for _ in range(n_seq)]):
                        scores = choice_outputs(model, batch).float().cpu().numpy()
                    offs = np.concatenate([[0], np.cumsum(batch.n_choices)])
                    for k, a in enumerate(chunk):
                        for j, i in enumerate(idx):
                            r = k * len(idx) + j
                            out[a][i] = scores[offs[r]:offs[r + 1]].copy()
    finally:
        model.train(was_training)
    return out


def score_members_apart(model, scorer: ChoiceScorer, examples: Sequence[Example],
                        adapters: Sequence[str], batch_size: int,
                        counts: dict | None = None) -> dict[str, list[np.ndarray]]:
    """The same scores member by member: one pass over the base per adapter (the reference
    :func:`score_members` is tested against, and the bench's other column)."""
    from .scoring import score_examples

    out = {}
    for a in dict.fromkeys(adapters):
        if a == BASE:
            with model.disable_adapter():
                out[a] = score_examples(model, scorer, examples, batch_size, counts)
        else:
            model.set_adapter(a, inference_mode=True)
            out[a] = score_examples(model, scorer, examples, batch_size, counts)
    return out


# ----------------------------------------------------------------------------------------------
# Training several adapters in one pass (issue 34, item 2)
# ----------------------------------------------------------------------------------------------

def adapter_parameters(model, name: str) -> list[torch.nn.Parameter]:
    """The weights of adapter ``name`` in a PeftModel (``lora_A.<name>.weight``, ...)."""
    return [p for n, p in model.named_parameters() if f".{name}." in n]


def train_adapters(model, tokenizer, plans: dict, tcfg, max_length: int,
                   choice_mode: str = "auto", *, eval_batch_size: int | None = None,
                   validate_initial: bool = True) -> dict:
    """Fine-tune several adapters of one PeftModel at once: ``plans`` maps an adapter's name to
    its (train examples, validation examples). Each adapter is trained exactly as
    ``training.train_adapter`` trains it alone — its own seeded batches, AdamW state, learning
    rate schedule, gradient clipping and best epoch (restored at the end) — but each optimizer
    step's batches of all adapters go through the base in one forward and one backward pass,
    every row routed to its own adapter (:func:`routed`). With the same batches the weights
    equal those of training one after another to fp32 rounding (tests/test_members.py); LoRA
    dropout draws other masks (equal only without dropout). Returns name -> TrainResult: the
    joint run's wall time shared out by tokens trained (so the adapters' times add up to it),
    its peak memory."""
    from .models import base_norm
    from .records import TrainResult
    from .training import (_config_dict, _epoch_batches, _peak_memory,
                           _task_modes, forward_parameters, lr_schedule, summarize,
                           total_steps)

    names = list(plans)
    if not names:
        raise ValueError("train_adapters: no adapters")
    for a in names:
        if not plans[a][0]:
            raise ValueError(f"train_adapters: adapter {a!r} has no training examples")
    device = model_device(model)
    scorer = ChoiceScorer(tokenizer, max_length, choice_mode)
    eval_bs = eval_batch_size or max(tcfg.batch_size, 16)
    params = {a: adapter_parameters(model, a) for a in names}
    for a in names:
        if not params[a]:
            raise ValueError(f"train_adapters: the model has no adapter {a!r}")
    grad_before = {id(p): p.requires_grad for p in model.parameters()}
    st = {}
    for a in names:
        train, val = plans[a]
        modes = _task_modes(scorer, train)
        sizes = [scorer.padded_length(ex, modes[ex.task]) for ex in train]
        opt = torch.optim.AdamW(params[a], lr=tcfg.learning_rate,
                                weight_decay=tcfg.weight_decay)
        st[a] = dict(train=list(train), val=list(val), modes=modes, sizes=sizes,
                     rng=np.random.default_rng(tcfg.seed), opt=opt,
                     sched=torch.optim.lr_scheduler.LambdaLR(
                         opt, lr_schedule(tcfg, total_steps(train, tcfg))),
                     history=[], steps=0, tokens=0, examples=0, best=(0, None, None),
                     start=torch.cat([p.detach().float().reshape(-1).cpu() for p in params[a]]),
                     done=False)

    def validate(a):
        val = st[a]["val"]
        if not val:
            return {}, None
        res = summarize(val, score_members(model, scorer, val, [a], eval_bs)[a])
        return res, res["average"]["loss"]

    def snapshot(a):
        return [p.detach().clone() for p in params[a]]

    was_training = model.training
    t_start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for a in names:
            for p in params[a]:
                p.requires_grad_(True)
        if validate_initial:
            for a in names:
                if st[a]["val"]:
                    val, vloss = validate(a)
                    st[a]["history"].append({"epoch": 0, "train_loss": None, "steps": 0,
                                             "seconds": 0.0, "val_loss": vloss, "val": val})
        acc = tcfg.grad_accumulation
        for epoch in range(1, tcfg.epochs + 1):
            live = [a for a in names if not st[a]["done"]]
            if not live:
                break
            t_epoch = time.perf_counter()
            model.train()
            steps_of = {}
            for a in live:
                s = st[a]
                batches = _epoch_batches(s["rng"], s["train"], tcfg.batch_size,
                                         s["sizes"].__getitem__)
                steps_of[a] = [batches[g:g + acc] for g in range(0, len(batches), acc)]
                s.update(loss_sum=0.0, loss_n=0, epoch_steps=0)
            for k in range(max(len(v) for v in steps_of.values())):
                check_stop()
                step = [a for a in live if k < len(steps_of[a]) and not _capped(st[a], tcfg)]
                if not step:
                    break
                for a in step:
                    st[a]["opt"].zero_grad(set_to_none=True)
                for j in range(acc):
                    _joint_backward(model, scorer, st, steps_of, step, k, j, device, epoch,
                                    tcfg)
                for a in step:
                    s = st[a]
                    if tcfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params[a], tcfg.max_grad_norm)
                    s["opt"].step()
                    s["sched"].step()
                    check_weights(params[a], epoch, s["steps"] + 1, tcfg, f"adapter {a}: ")
                    s["steps"] += 1
                    s["epoch_steps"] += 1
            for a in live:
                s = st[a]
                s["opt"].zero_grad(set_to_none=True)
                train_loss = s["loss_sum"] / max(s["loss_n"], 1)
                val, vloss = validate(a)
                s["history"].append({"epoch": epoch, "train_loss": train_loss,
                                     "steps": s["epoch_steps"],
                                     "seconds": time.perf_counter() - t_epoch,
                                     "val_loss": vloss, "val": val})
                best_epoch, best_loss, _ = s["best"]
                if vloss is None or best_loss is None or vloss < best_loss:
                    s["best"] = (epoch, vloss, snapshot(a) if s["val"] else None)
                if _capped(s, tcfg):
                    s["done"] = True
        for a in names:  # each adapter ends at its best epoch
            best_epoch, _, snap = st[a]["best"]
            if snap is not None and best_epoch != st[a]["history"][-1]["epoch"]:
                with torch.no_grad():
                    for p, v in zip(params[a], snap):
                        p.copy_(v)
    finally:
        for p in model.parameters():
            p.requires_grad_(grad_before[id(p)])
        model.train(was_training)
    wall = time.perf_counter() - t_start
    n_forward, full = forward_parameters(model), base_norm(model)
    all_tokens = max(sum(st[a]["tokens"] for a in names), 1)
    out = {}
    for a in names:
        s = st[a]
        theta = torch.cat([p.detach().float().reshape(-1).cpu() for p in params[a]])
        moved, own = float((theta - s["start"]).norm()), float(s["start"].norm())
        out[a] = TrainResult(
            # the joint wall time, each adapter its share by tokens (the shares add up to it)
            best_epoch=s["best"][0], history=s["history"],
            wall_seconds=wall * s["tokens"] / all_tokens,
            n_steps=s["steps"], tokens_seen=s["tokens"],
            flops_estimate=6.0 * n_forward * s["tokens"],
            peak_memory_bytes=_peak_memory(device),
            trainable_parameters=int(sum(p.numel() for p in params[a])),
            n_params_forward=n_forward, examples_seen=s["examples"], best_val_loss=s["best"][1],
            device=str(device),
            config=dict(_config_dict(tcfg), max_length=max_length, choice_mode=choice_mode,
                        task_modes=s["modes"], trained_with=names),
            distance_moved=moved, relative_distance=moved / full if full > 0 else None,
            adapter_distance=moved / own if own > 0 else None)
    return out


def _capped(s: dict, tcfg) -> bool:
    return tcfg.max_steps is not None and s["steps"] >= tcfg.max_steps


def _joint_backward(model, scorer, st, steps_of, step, k, j, device, epoch, tcfg) -> None:
    """The j-th batch of optimizer step k of every adapter in ``step``: one forward per choice
    mode over all of them (each row routed to its adapter), each adapter's mean loss divided by
    its step's number of batches (as ``training._train_epoch``), one backward."""
    parts = []  # (adapter, task, examples, encoded)
    for a in step:
        group = steps_of[a][k]
        if j < len(group):
            task, idx = group[j]
            exs = [st[a]["train"][i] for i in idx]
            parts.append((a, task, exs, scorer.encode(exs, mode=st[a]["modes"][task]),
                          len(group)))
    if not parts:
        return
    total = None
    for mode in dict.fromkeys(p[3].mode for p in parts):
        mine = [p for p in parts if p[3].mode == mode]
        batch = concat_batches([p[3] for p in mine]).to(device)
        rows = [a for a, _, _, enc, _ in mine for _ in range(enc.input_ids.shape[0])]
        with routed(model, rows):
            scores = choice_outputs(model, batch)
        at = 0
        for a, task, exs, enc, n_batches in mine:
            z = scores[at:at + enc.n_rows]
            at += enc.n_rows
            loss = scores_loss(z, enc.n_choices, exs)
            lv = float(loss.detach())
            check_loss(lv, epoch, st[a]["steps"] + 1, task, tcfg, f"adapter {a}: ")
            s = st[a]
            s["loss_sum"] += lv * len(exs)
            s["loss_n"] += len(exs)
            s["tokens"] += int(enc.attention_mask.sum())
            s["examples"] += len(exs)
            term = loss / n_batches
            total = term if total is None else total + term
    total.backward()
