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

from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from .data import Example
from .runtime import check_stop
from .scoring import (SCORING_TOKENS, ChoiceScorer, EncodedBatch, _eval_batches,
                      choice_outputs, model_device)

__all__ = ["BASE", "routed", "repeat_batch", "score_members", "score_members_apart"]

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


def repeat_batch(batch: EncodedBatch, copies: int) -> EncodedBatch:
    """``batch`` stacked ``copies`` times along the sequences: copy k's sequences follow copy
    k-1's, and its output rows (``choice_outputs``) come after copy k-1's rows."""
    if copies == 1:
        return batch
    n_seq, n_rows = batch.input_ids.shape[0], batch.n_rows

    def stack(t):
        return None if t is None else t.repeat((copies,) + (1,) * (t.dim() - 1))

    def offset(t, step):  # indices into the sequences (or rows), shifted per copy
        if t is None:
            return None
        return torch.cat([t + k * step for k in range(copies)])

    return EncodedBatch(
        batch.mode, stack(batch.input_ids), stack(batch.attention_mask),
        n_choices=list(batch.n_choices) * copies, truncated=batch.truncated * copies,
        row_seq=offset(batch.row_seq, n_seq), row_slot=stack(batch.row_slot),
        last_pos=stack(batch.last_pos), row_token=stack(batch.row_token),
        position_ids=stack(batch.position_ids), segment=stack(batch.segment),
        tgt_seq=offset(batch.tgt_seq, n_seq), tgt_src=stack(batch.tgt_src),
        tgt_token=stack(batch.tgt_token), tgt_row=offset(batch.tgt_row, n_rows))


def score_members(model, scorer: ChoiceScorer, examples: Sequence[Example],
                  adapters: Sequence[str], batch_size: int, counts: dict | None = None,
                  max_tokens: int = SCORING_TOKENS) -> dict[str, list[np.ndarray]]:
    """h_c(s) of every example under each of ``adapters`` (names of adapters loaded in the
    PeftModel ``model``; :data:`BASE` for the base model alone), in input order — what
    ``scoring.score_examples`` gives with each adapter active, from one forward pass per batch
    for all of them. A batch holds at most ``batch_size`` examples and, over all its copies,
    ``max_tokens`` padded tokens (the memory of one member-by-member batch).
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
            for idx, mode in _eval_batches(scorer, examples, batch_size,
                                           max(1, max_tokens // M)):
                check_stop()
                one = scorer.encode([examples[i] for i in idx], mode=mode)
                batch = repeat_batch(one, M).to(device)
                if counts is not None:
                    counts["tokens"] = counts.get("tokens", 0) + int(batch.attention_mask.sum())
                n_seq = one.input_ids.shape[0]
                with routed(model, [a for a in adapters for _ in range(n_seq)]):
                    scores = choice_outputs(model, batch).float().cpu().numpy()
                offs = np.concatenate([[0], np.cumsum(batch.n_choices)])
                for k, a in enumerate(adapters):
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
