"""Stage 1: outputs h_c(s) and the gradients of the score differences ∇_X (h_c(s) − h_0(s)) at
θ* (docs/design.md, "Stage 1": the gradients of the paper's first-order approximation; only the
differences of an example's scores reach a softmax over its choices).

Fast path: one batched forward (one sequence per example; in sequence mode the example's choices
may be packed into it, see :class:`scoring.EncodedBatch`), then one backward per choice slot
j ≥ 1, of h_j − h_0 for every example at once — one backward for a binary task. With one
sequence per choice (unpacked), a single backward of all rows. Per-sequence gradients of every
trainable ``nn.Linear`` (the LoRA A and B matrices) are formed inside the backward pass from
the layer's saved input x and its output gradient δ: ∇W = Σ_t δ_tᵀ x_t per sequence — the
standard per-sample-gradient identity for a linear map — and never via one backward per example.

Reference: :func:`reference_gradients`, a plain autograd loop (one example, one choice, one
backward at a time, each choice its own unpacked sequence, per-choice gradients), kept as the
test oracle.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from .data import Example
from .features import FeatureTable
from .models import trainable_parameters
from .projection import GaussianProjector
from .records import Progress
from .runtime import check_stop
from .scoring import ChoiceScorer, EncodedBatch, backbone_and_head, choice_outputs, model_device


class GradientError(ValueError):
    pass


class PerSampleLinearGrads:
    """Hooks that turn each backward pass into per-sequence gradients of the trainable Linears.

    Usage::

        with PerSampleLinearGrads(model) as psg:
            out = choice_outputs(model, batch)            # forward: inputs saved
            psg.backward(out[rows].sum(), retain=True)    # one backward
            parts = psg.collect_parts()                   # [N sequences, numel] each
    """

    def __init__(self, model):
        self.model = model
        self.params = trainable_parameters(model)
        owner = {}
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                owner[id(m.weight)] = (m, "weight")
                if m.bias is not None:
                    owner[id(m.bias)] = (m, "bias")
        self.slots = []
        for name, p in self.params:
            if id(p) not in owner:
                raise GradientError(f"trainable parameter {name} is not the weight or bias of an "
                                    "nn.Linear; the fast path supports adapters made of "
                                    "nn.Linear layers (LoRA, the bottleneck adapter) only — "
                                    "use reference_gradients")
            self.slots.append(owner[id(p)])
        self.modules = list(dict.fromkeys(m for m, _ in self.slots))
        self.p = sum(p.numel() for _, p in self.params)
        self._handles = []
        self._x: dict[int, torch.Tensor] = {}
        self._g: dict[tuple[int, str], torch.Tensor] = {}

    def __enter__(self):
        for m in self.modules:
            self._handles.append(m.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._x.clear()
        self._g.clear()

    def _forward_hook(self, module, inputs, output):
        x = inputs[0].detach()
        self._x[id(module)] = x.reshape(x.shape[0], -1, x.shape[-1])
        if output.requires_grad:
            output.register_hook(lambda gy, m=module: self._on_grad(m, gy))

    def _on_grad(self, module, gy):
        x = self._x[id(module)]
        if gy is None:  # autograd passes None for an all-zero (undefined) gradient
            gy = x.new_zeros(*x.shape[:2], module.weight.shape[0])
        gy = gy.reshape(gy.shape[0], -1, gy.shape[-1])
        if module.weight.requires_grad:  # Σ_t δ_t x_tᵀ per sequence, in fp32
            self._g[(id(module), "weight")] = torch.einsum(
                "nto,nti->noi", gy.float(), x.float()).reshape(gy.shape[0], -1)
        if module.bias is not None and module.bias.requires_grad:
            self._g[(id(module), "bias")] = gy.float().sum(1)

    def backward(self, scalar: torch.Tensor, retain: bool) -> None:
        self._g.clear()
        torch.autograd.grad(scalar, [p for _, p in self.params], retain_graph=retain,
                            allow_unused=True)

    def collect_parts(self) -> list[torch.Tensor]:
        """Per-sequence gradients of the last backward, one [N, numel] chunk per trainable
        parameter in named_parameters order (their concatenation is the [N, p] gradient)."""
        parts = []
        for (m, kind), (name, _) in zip(self.slots, self.params):
            g = self._g.get((id(m), kind))
            if g is None:
                raise GradientError(f"no gradient reached {name}")
            parts.append(g)
        return parts


def _choice_rows(batch: EncodedBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(example of each row, row of each example's first choice) of a batch."""
    n = torch.as_tensor(batch.n_choices, device=device)
    example = torch.repeat_interleave(torch.arange(len(n), device=device), n)
    first = torch.cumsum(n, 0) - n
    return example, first


def batched_gradients(model, batch: EncodedBatch,
                      project: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs h_c [R] of every row of one batch and the per-example gradients of the score
    differences h_c − h_0 against each example's first choice: [R, p], or [R, d] when
    ``project`` (e.g. :meth:`GaussianProjector.project_unit`) is given — applied to each
    backward's gradient chunks as they come, so the [R, p] matrix is never assembled. The rows
    of first choices are zero.

    One sequence per example (token mode, packed choices): one backward per choice slot j ≥ 1,
    of Σ_examples (h_j − h_0) — C − 1 backwards, one for a binary task; each sequence's
    per-sample gradient is then its example's ∇(h_j − h_0). One sequence per choice (unpacked
    sequence mode): a single backward of all rows, each row's gradient from its own sequence,
    and the differences taken after the projection (it is linear)."""
    finish = project if project is not None else (lambda parts: torch.cat(parts, dim=1))
    with PerSampleLinearGrads(model) as psg:
        out = choice_outputs(model, batch)
        R = out.shape[0]
        row_seq = batch.row_seq.to(out.device)
        example, first = _choice_rows(batch, out.device)
        n_seq = batch.input_ids.shape[0]

        def rows_of(seqs, parts):  # per-sequence gradients -> the given rows' sequences
            if len(seqs) < n_seq or not torch.equal(seqs, torch.arange(n_seq, device=seqs.device)):
                return [g.index_select(0, seqs.to(g.device)) for g in parts]
            return parts

        if n_seq == R:  # one sequence per choice
            psg.backward(out.sum(), retain=False)
            G = finish(rows_of(row_seq, psg.collect_parts()))  # [R, ·] per row
            return out.detach(), G - G[first.to(G.device)][example.to(G.device)]
        D = None
        slots = max(batch.n_choices)
        slot = torch.arange(R, device=out.device) - first[example]
        for j in range(1, slots):
            rows = torch.nonzero(slot == j, as_tuple=True)[0]
            psg.backward((out[rows] - out[first[example[rows]]]).sum(), retain=j < slots - 1)
            Dj = finish(rows_of(row_seq[rows], psg.collect_parts()))  # [rows of slot j, ·]
            if D is None:
                D = torch.zeros(R, Dj.shape[1], dtype=Dj.dtype, device=Dj.device)
            D[rows.to(D.device)] = Dj
        return out.detach(), D


def reference_gradients(model, scorer: ChoiceScorer, examples: Sequence[Example],
                        mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain autograd loop, the test oracle: one example, one choice, one backward at a time.
    Outputs [R], grads [R, p].

    Independent of the fast path's encoding: each choice is scored on its own plain sequence
    (the prompt, truncated as :meth:`ChoiceScorer.encode` does, then the continuation) through
    the model's standard causal attention — no packing, no padding, no block mask."""
    params = [p for _, p in trainable_parameters(model)]
    mode = mode or scorer.mode_for(examples)
    backbone, W, b = backbone_and_head(model)
    device = model_device(model)
    outs, grads = [], []
    for ex in examples:
        conts = [scorer.token_ids(c) for c in ex.choices]
        prompt, _ = scorer.prompt_for(ex, mode)
        if mode == "token":  # one forward, then one backward per choice
            hidden = backbone(input_ids=torch.tensor([prompt], device=device),
                              use_cache=False).last_hidden_state[0, -1].float()
            for c, cont in enumerate(conts):
                out = hidden @ W[cont[0]].float() + (0 if b is None else b[cont[0]].float())
                g = torch.autograd.grad(out, params, retain_graph=c < len(conts) - 1)
                grads.append(torch.cat([x.reshape(-1).float() for x in g]))
                outs.append(out.detach().reshape(1))
            continue
        for cont in conts:  # the plain sequence prompt + continuation, one per choice
            ids = prompt + cont
            hidden = backbone(input_ids=torch.tensor([ids], device=device),
                              use_cache=False).last_hidden_state[0]
            h = hidden[len(prompt) - 1:len(ids) - 1]  # the positions predicting the continuation
            logp = torch.log_softmax(torch.nn.functional.linear(h, W.to(h.dtype), b).float(), -1)
            out = logp[torch.arange(len(cont)), torch.tensor(cont)].sum()
            g = torch.autograd.grad(out, params)
            grads.append(torch.cat([x.reshape(-1).float() for x in g]))
            outs.append(out.detach().reshape(1))
    return torch.cat(outs), torch.stack(grads)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract_features(model, scorer: ChoiceScorer, examples: Sequence[Example],
                     projector: GaussianProjector, *, task: str, split: str,
                     batch_size: int = 16, progress: Progress | None = None,
                     timings: dict | None = None) -> FeatureTable:
    """Projected gradient features of a task split: the Parquet rows of stage 1, with the
    unit projections Zᵀ∇(h_c − h_0) the file stores (``features``) and the features at the
    projector's d.

    Examples are batched by token length (less padding); rows come back in the input order.
    In sequence mode a batch is packed when its token counts say that is cheaper: packed, one
    forward and C − 1 backwards over the packed tokens; unpacked, one forward and one backward
    over a sequence per choice (a backward costs about two forwards). ``timings`` gets the
    seconds and the work: tokens forwarded and tokens backpropagated (``backward_tokens``).
    """
    if not examples:
        raise GradientError(f"task {task}: split {split} has no examples")
    mode = scorer.mode_for(examples)
    lengths = [len(scorer.token_ids(ex.prompt)) + max(len(scorer.token_ids(c)) for c in ex.choices)
               for ex in examples]
    order = np.argsort(lengths, kind="stable")
    n_rows = [len(ex.choices) for ex in examples]
    row_start = np.concatenate([[0], np.cumsum(n_rows)])
    R = int(row_start[-1])
    output = np.empty(R, np.float32)
    grad = np.empty((R, projector.d), np.float32)
    t_grad = 0.0
    device = model_device(model)
    proj_s = [0.0]

    def timed_project(parts):
        _sync(device)
        t = time.perf_counter()
        res = projector.project_unit(parts)
        _sync(device)
        proj_s[0] += time.perf_counter() - t
        return res

    done = 0
    work = {"tokens": 0, "backward_tokens": 0}
    for b in range(0, len(order), batch_size):
        check_stop()
        idx = order[b:b + batch_size]
        chunk = [examples[i] for i in idx]
        pack = True
        if mode == "sequence":
            packed, single = scorer.sequence_costs(chunk)
            pack = packed * (1 + 2 * (max(len(e.choices) for e in chunk) - 1)) < 3 * single
        batch = scorer.encode(chunk, mode=mode, pack=pack).to(device)
        # the work of this batch: one forward, and one backward per choice slot c >= 1 (one
        # backward in all when every choice has its own sequence)
        passes = 1 if (mode == "sequence" and not pack) else \
            max(len(e.choices) for e in chunk) - 1
        tokens = int(batch.attention_mask.sum())
        work["tokens"] += tokens
        work["backward_tokens"] += tokens * passes
        t0 = time.perf_counter()
        out, Gp = batched_gradients(model, batch, project=timed_project)
        _sync(device)
        t_grad += time.perf_counter() - t0
        dst = np.concatenate([np.arange(row_start[i], row_start[i + 1]) for i in idx])
        out_np, g_np = out.float().cpu().numpy(), Gp.cpu().numpy()
        if not (np.isfinite(out_np).all() and np.isfinite(g_np).all()):
            bad_row = int(np.flatnonzero(~(np.isfinite(out_np) & np.isfinite(g_np).all(1)))[0])
            ex = examples[idx[np.searchsorted(np.cumsum([n_rows[i] for i in idx]), bad_row,
                                              side="right")]]
            raise GradientError(f"task {task}: non-finite output or gradient for example "
                                f"{ex.example_id} ({split}); check the model dtype and inputs")
        output[dst], grad[dst] = out_np, g_np
        done += len(idx)
        if progress:
            progress(done, len(examples), split)
    if timings is not None:
        timings.update(gradient_s=t_grad - proj_s[0], projection_s=proj_s[0], mode=mode,
                       **work)
    choice = np.concatenate([np.arange(n) for n in n_rows]).astype(np.int32)
    is_gold = np.concatenate([np.arange(len(ex.choices)) == ex.label for ex in examples])
    example_id = np.array([ex.example_id for ex in examples for _ in ex.choices], dtype=object)
    return FeatureTable.from_unit(task, split, example_id, choice, is_gold, output, grad,
                                  projector.d)
