"""The model output h_c(s) for every answer choice: encoding examples, scoring, the loss.

The output for example s and choice c is either the next-token logit of a single-token verbalizer
(``token`` mode: one sequence per example, all choices read at the last prompt position) or the
summed log-probability of a multi-token continuation (``sequence`` mode: an example's choices
packed into one sequence, or one sequence per (example, choice)). Stage 1 differentiates these
outputs (``gradients``), training minimizes their multiple-choice log loss (``training``), and
every later stage reads them forward-only (:func:`predict_scores`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .choices import segment_log_softmax
from .data import Example
from .models import ModelError
from .runtime import check_stop


@dataclass
class EncodedBatch:
    """A padded batch. Rows of the output are (example, choice) pairs in example order.

    Token mode has one sequence per example. In ``sequence`` mode a sequence is *packed* by
    default: the prompt, then every choice's continuation, each continuation positioned right
    after the prompt (``position_ids``) and seeing only the prompt and itself (``segment``: a
    block attention mask). One forward pass then scores all choices, and the prompt is computed
    once instead of once per choice; the outputs equal those of separate prompt + continuation
    sequences (the test oracle, :func:`gradients.reference_gradients`, computes them that way).
    Unpacked (``pack=False``), each choice has its own sequence: the same code reads it.
    """
    mode: str  # "token" | "sequence"
    input_ids: torch.Tensor  # [N, T] sequences, right padded
    attention_mask: torch.Tensor  # [N, T] 1 = real token
    n_choices: list[int] | None = None  # per example
    truncated: int = 0  # examples whose prompt was cut from the left to fit max_length
    row_seq: torch.Tensor | None = None  # [R] the sequence each output row is read from
    row_slot: torch.Tensor | None = None  # [R] the row's index among its sequence's rows
    # token mode: read the logits of row_token at position last_pos of sequence row_seq
    last_pos: torch.Tensor | None = None  # [N]
    row_token: torch.Tensor | None = None  # [R] verbalizer token id of each output row
    # sequence mode: every continuation token k is predicted by the hidden state at
    # (tgt_seq[k], tgt_src[k]) and adds its log-probability to output row tgt_row[k]
    position_ids: torch.Tensor | None = None  # [N, T]
    segment: torch.Tensor | None = None  # [N, T] 0 prompt, c + 1 continuation c, -1 padding
    tgt_seq: torch.Tensor | None = None  # [K]
    tgt_src: torch.Tensor | None = None  # [K]
    tgt_token: torch.Tensor | None = None  # [K]
    tgt_row: torch.Tensor | None = None  # [K]

    @property
    def n_rows(self) -> int:
        return sum(self.n_choices)

    def to(self, device) -> "EncodedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return EncodedBatch(**moved)


class ChoiceScorer:
    """Turns examples into model inputs and computes h_c(s) for every answer choice."""

    def __init__(self, tokenizer, max_length: int = 256, mode: str = "auto"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mode = mode
        self._cache: dict[str, list[int]] = {}

    def token_ids(self, text: str) -> list[int]:
        """The tokens of ``text`` without special tokens (cached per scorer)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    @property
    def adds_bos(self) -> bool:
        """Whether prompts start with BOS: the tokenizer's own convention."""
        return (self.tokenizer.bos_token_id is not None
                and getattr(self.tokenizer, "add_bos_token", True) is not False)

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.token_ids(text)
        return [self.tokenizer.bos_token_id] + ids if self.adds_bos else ids

    def mode_for(self, examples: Sequence[Example]) -> str:
        """``token`` when every choice is a single token, else ``sequence``."""
        if self.mode != "auto":
            return self.mode
        single = all(len(self.token_ids(c)) == 1 for ex in examples for c in ex.choices)
        return "token" if single else "sequence"

    def _fit(self, prompt: list[int], room: int) -> tuple[list[int], bool]:
        if len(prompt) <= room:
            return prompt, False
        keep = 1 if self.adds_bos else 0
        if room < keep + 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for the prompt")
        # keep the BOS and the end of the prompt (where the question and "Answer:" are)
        return prompt[:keep] + prompt[len(prompt) - room + keep:], True

    def prompt_for(self, ex: Example, mode: str) -> tuple[list[int], bool]:
        """The example's prompt tokens as :meth:`encode` feeds them — cut from the left to
        leave room for the longest choice in sequence mode — and whether they were cut."""
        room = self.max_length
        if mode == "sequence":
            room -= max(len(self.token_ids(c)) for c in ex.choices)
        return self._fit(self._prompt_ids(ex.prompt), room)

    def padded_length(self, ex: Example, mode: str) -> int:
        """Tokens of the longest sequence of one example as :meth:`encode` builds it (packed
        in sequence mode): what a batch of such examples is padded to."""
        prompt = len(self.prompt_for(ex, mode)[0])
        if mode == "token":
            return prompt
        return prompt + sum(len(self.token_ids(c)) for c in ex.choices)

    def sequence_costs(self, examples: Sequence[Example]) -> tuple[int, int]:
        """Token counts (padded) of a sequence-mode batch: (packed, one sequence per choice)."""
        packed, single, rows = 0, 0, 0
        for ex in examples:
            conts = [len(self.token_ids(c)) for c in ex.choices]
            prompt = len(self.prompt_for(ex, "sequence")[0])
            packed = max(packed, prompt + sum(conts))
            single = max(single, prompt + max(conts))
            rows += len(conts)
        return packed * len(examples), single * rows

    def encode(self, examples: Sequence[Example], mode: str | None = None,
               pack: bool = True) -> EncodedBatch:
        """Model inputs of a batch. In sequence mode ``pack`` puts all choices of an example
        into one sequence (the default: fewer tokens); ``pack=False`` gives each choice its own
        prompt + continuation sequence (a single backward pass yields every row's gradient,
        see :func:`gradients.extract_features`). Outputs are the same either way."""
        mode = mode or self.mode_for(examples)
        pad = self.tokenizer.pad_token_id
        seqs, truncated, n_choices = [], 0, []
        if mode == "token":
            last, row_seq, row_tok = [], [], []
            for i, ex in enumerate(examples):
                toks = [self.token_ids(c) for c in ex.choices]
                if any(len(t) != 1 for t in toks):
                    raise ValueError(f"task {ex.task}: example {ex.example_id} has a choice that "
                                     "is not a single token; use sequence mode")
                ids, cut = self.prompt_for(ex, mode)
                truncated += cut
                seqs.append(ids)
                last.append(len(ids) - 1)
                row_seq += [i] * len(toks)
                row_tok += [t[0] for t in toks]
                n_choices.append(len(toks))
            ids, mask = _pad(seqs, pad)
            slot = [j for n in n_choices for j in range(n)]
            return EncodedBatch("token", ids, mask, last_pos=torch.tensor(last),
                                row_token=torch.tensor(row_tok), n_choices=n_choices,
                                truncated=truncated, row_seq=torch.tensor(row_seq),
                                row_slot=torch.tensor(slot))
        pos, segs, row_seq, row_slot = [], [], [], []
        tgt_seq, tgt_src, tgt_tok, tgt_row = [], [], [], []
        row = 0
        for ex in examples:
            conts = [self.token_ids(c) for c in ex.choices]
            if not all(conts):
                raise ValueError(f"task {ex.task}: example {ex.example_id} has an empty choice")
            prompt, cut = self.prompt_for(ex, mode)
            if not prompt:
                raise ValueError(f"task {ex.task}: example {ex.example_id} has an empty prompt "
                                 "and the tokenizer adds no BOS: nothing predicts the first "
                                 "token of a choice")
            truncated += cut
            n_choices.append(len(conts))
            L = len(prompt)
            for group in ([conts] if pack else [[c] for c in conts]):
                ids, p, sg = list(prompt), list(range(L)), [0] * L
                for c, cont in enumerate(group):
                    start = len(ids)
                    ids += cont
                    p += range(L, L + len(cont))
                    sg += [c + 1] * len(cont)
                    for t, tok in enumerate(cont):
                        tgt_seq.append(len(seqs))
                        tgt_src.append(L - 1 if t == 0 else start + t - 1)
                        tgt_tok.append(tok)
                        tgt_row.append(row)
                    row_seq.append(len(seqs))
                    row_slot.append(c)
                    row += 1
                seqs.append(ids)
                pos.append(p)
                segs.append(sg)
        ids, mask = _pad(seqs, pad)
        position_ids, _ = _pad(pos, 0)
        segment, _ = _pad(segs, -1)
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return EncodedBatch("sequence", ids, mask, n_choices=n_choices, truncated=truncated,
                            row_seq=t(row_seq), row_slot=t(row_slot),
                            position_ids=position_ids, segment=segment, tgt_seq=t(tgt_seq),
                            tgt_src=t(tgt_src), tgt_token=t(tgt_tok), tgt_row=t(tgt_row))


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: real tokens never attend to pads
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def backbone_and_head(model):
    """(decoder backbone returning final hidden states, output embedding weight, bias)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm.config, "final_logit_softcapping", None):
        raise ModelError("models with final logit soft-capping are not supported")
    head = causal_lm.get_output_embeddings()
    return causal_lm.base_model, head.weight, getattr(head, "bias", None)


def packed_attention_mask(segment: torch.Tensor, implementation: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """[N, 1, T, T] mask of a packed batch: causal, and a continuation sees the prompt and
    itself only. Padding positions see only themselves (no empty attention row: no NaN)."""
    T = segment.shape[1]
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":  # additive
        zero = torch.zeros((), dtype=dtype, device=segment.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ModelError(f"sequence-mode scoring packs an example's choices into one sequence with a "
                     f"block attention mask, which the {implementation!r} attention "
                     "implementation does not take; use 'sdpa' (the default) or 'eager'")


def choice_outputs(model, batch: EncodedBatch) -> torch.Tensor:
    """h_c(s) for every (example, choice) row: [R] float32, differentiable w.r.t. the adapter.

    Only the rows of the output embedding that are needed are multiplied (token mode), or the
    positions predicting a continuation token (sequence mode): the full [T, vocab] logits are
    never formed.
    """
    backbone, W, b = backbone_and_head(model)
    if batch.mode == "token":
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
        h = hidden[batch.row_seq, batch.last_pos[batch.row_seq]]  # [R, H]
        w = W[batch.row_token].to(h.dtype)  # [R, H]
        out = (h * w).sum(-1)
        if b is not None:
            out = out + b[batch.row_token]
        return out.float()
    # sequence mode: log p(continuation token | prompt, earlier tokens of that continuation),
    # summed per continuation, all continuations of an example in one packed sequence
    config = backbone.config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False \
            and int(batch.position_ids.max()) >= window:
        raise ModelError(f"a packed sequence reaches position {int(batch.position_ids.max())}, "
                         f"beyond the model's sliding attention window ({window}), which the "
                         "block mask does not apply; lower model.max_length below it")
    mask = packed_attention_mask(batch.segment, getattr(config, "_attn_implementation", "eager"),
                                 backbone.get_input_embeddings().weight.dtype)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=mask,
                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
    h = hidden[batch.tgt_seq, batch.tgt_src]  # [K, H]
    logits = torch.nn.functional.linear(h, W.to(h.dtype), b).float()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.tgt_token.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(batch.n_rows, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, batch.tgt_row, logp)


def gold_rows(examples: Sequence[Example]) -> torch.Tensor:
    offs, rows = 0, []
    for ex in examples:
        rows.append(offs + ex.label)
        offs += len(ex.choices)
    return torch.tensor(rows)


def choice_loss(model, batch: EncodedBatch, examples: Sequence[Example]) -> torch.Tensor:
    """Mean cross-entropy over examples of the softmax over each example's choices."""
    return scores_loss(choice_outputs(model, batch), batch.n_choices, examples)


def scores_loss(scores: torch.Tensor, n_choices, examples: Sequence[Example]) -> torch.Tensor:
    """:func:`choice_loss` of given row scores (``n_choices`` per example)."""
    logp = segment_log_softmax(scores, n_choices)
    return -logp[gold_rows(examples).to(logp.device)].mean()


# ----------------------------------------------------------------------------------------------
# Forward-only scoring
# ----------------------------------------------------------------------------------------------

def examples_by_task(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Indices of the examples of each task, tasks in first-seen order."""
    out: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault(ex.task, []).append(i)
    return out


SCORING_TOKENS = 8192  # padded tokens per forward-only batch (at most batch_size examples)


def _eval_batches(scorer: ChoiceScorer, examples: Sequence[Example], batch_size: int,
                  max_tokens: int = SCORING_TOKENS):
    """(indices, mode) batches of one task each, the task's examples in order of token length
    (little padding), at most ``batch_size`` examples and ``max_tokens`` padded tokens."""
    for t, idx in examples_by_task(examples).items():
        mode = scorer.mode_for([examples[i] for i in idx])
        size = {i: scorer.padded_length(examples[i], mode) for i in idx}
        idx = sorted(idx, key=lambda i: (size[i], i))
        batch: list[int] = []
        for i in idx:
            if batch and (len(batch) >= batch_size or (len(batch) + 1) * size[i] > max_tokens):
                yield batch, mode
                batch = []
            batch.append(i)
        if batch:
            yield batch, mode


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def score_examples(model, scorer: ChoiceScorer, examples: Sequence[Example],
                   batch_size: int, counts: dict | None = None) -> list[np.ndarray]:
    """h_c(s) for every example (float32 numpy vector over its choices), in input order, in
    eval mode without gradients; the mode is decided per task on all of that task's examples.
    ``counts["tokens"]``, when given, grows by the non-padding tokens forwarded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray | None] = [None] * len(examples)
    if not examples:
        return []
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx, mode in _eval_batches(scorer, examples, batch_size):
                check_stop()
                batch = scorer.encode([examples[i] for i in idx], mode=mode).to(device)
                if counts is not None:
                    counts["tokens"] = counts.get("tokens", 0) + int(batch.attention_mask.sum())
                scores = choice_outputs(model, batch).float().cpu().numpy()
                offs = np.concatenate([[0], np.cumsum(batch.n_choices)])
                for k, i in enumerate(idx):
                    out[i] = scores[offs[k]:offs[k + 1]].copy()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def predict_scores(model, tokenizer, examples: Sequence[Example], max_length: int,
                   batch_size: int = 16, choice_mode: str = "auto",
                   counts: dict | None = None) -> list[np.ndarray]:
    """Per example, the vector of h_c(s) over its choices (float32), in input order.

    h_c are raw verbalizer logits in ``token`` mode and summed continuation log-probabilities
    in ``sequence`` mode; either way the choice probabilities are the softmax over each
    example's own choices (``choices``)."""
    return score_examples(model, ChoiceScorer(tokenizer, max_length, choice_mode), examples,
                          batch_size, counts)


@torch.no_grad()
def score_rows(model, scorer: ChoiceScorer, examples: Sequence[Example], batch_size: int = 32,
               mode: str | None = None) -> torch.Tensor:
    """h_c(s) of every row [R], the examples batched in the given order with one mode (the
    first-order check compares two such passes batch for batch)."""
    mode = mode or scorer.mode_for(examples)
    res = []
    for b in range(0, len(examples), batch_size):
        check_stop()
        batch = scorer.encode(examples[b:b + batch_size], mode=mode).to(model_device(model))
        res.append(choice_outputs(model, batch).float().cpu())
    return torch.cat(res)
