"""Every member in one pass over the base (ensemble_core/members.py; issue 34, item 1): the
scores equal member-by-member scoring (the reference: one ``score_examples`` pass per adapter
with that adapter active) on the tiny random Llama, in token and sequence mode, for LoRA and
the bottleneck kind, the base model alone as a member."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble_core.adapter_kinds import adapter_kind
from ensemble_core.config import parse_config
from ensemble_core.data import load_task
from ensemble_core.members import (BASE, repeat_batch, routed, score_members,
                                   score_members_apart)
from ensemble_core.models import load_model
from ensemble_core.scoring import ChoiceScorer, choice_outputs

from conftest import tiny_config


def _model(data_root, tmp_path, cache_dir, adapter=None):
    over = {} if adapter is None else {"adapter": adapter}
    cfg = parse_config(tiny_config(data_root, tmp_path, **over))
    lm = load_model(cfg, cache_dir)
    gen = torch.Generator().manual_seed(1)
    for k, name in enumerate(("a1", "a2")):
        lm.model.add_adapter(name, adapter_kind(cfg.adapter).peft_config(cfg.adapter))
    for n, p in lm.model.named_parameters():  # every adapter far from zero and from the others
        if any(f".{a}." in n for a in ("default", "a1", "a2")):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    examples = [ex for t in ("rte", "copa", "cb")
                for ex in load_task(cfg.task(t), data_root).splits["validation"]]
    return lm, ChoiceScorer(lm.tokenizer, 128), examples


def _check(lm, scorer, examples, adapters, batch_size=4):
    one = score_members(lm.model, scorer, examples, adapters, batch_size)
    apart = score_members_apart(lm.model, scorer, examples, adapters, batch_size)
    assert list(one) == list(dict.fromkeys(adapters))
    for a in one:
        assert len(one[a]) == len(examples)
        for x, y in zip(one[a], apart[a]):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    # the members differ, so routing a row to the wrong adapter could not pass
    for a, b in zip(list(one), list(one)[1:]):
        gap = max(float(np.abs(x - y).max()) for x, y in zip(apart[a], apart[b]))
        assert gap > 1e-3, (a, b, gap)
    return one


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_one_pass_equals_member_by_member(kind, data_root, tmp_path, cache_dir):
    adapter = None if kind == "lora" else {"kind": "bottleneck", "reduction_factor": 8}
    lm, scorer, examples = _model(data_root, tmp_path, cache_dir, adapter)
    modes = {scorer.mode_for([e for e in examples if e.task == t]) for t in ("rte", "copa")}
    assert modes == {"token", "sequence"}
    _check(lm, scorer, examples, ["default", "a1", BASE, "a2"])
    # one member alone, and a batch of one example (the served batch-1 case)
    _check(lm, scorer, examples[:1], ["a2", "default"], batch_size=1)


def test_repeat_batch_and_routing_by_hand(data_root, tmp_path, cache_dir):
    """Two copies of a batch, routed to two adapters, give each adapter's own outputs in
    member-major order; the hooks are gone afterwards (the active adapter is used again)."""
    lm, scorer, examples = _model(data_root, tmp_path, cache_dir)
    batch = scorer.encode(examples[-3:])  # cb: token mode
    twice = repeat_batch(batch, 2)
    n = batch.input_ids.shape[0]
    with torch.no_grad():
        with routed(lm.model, ["a1"] * n + ["a2"] * n):
            both = choice_outputs(lm.model, twice)
        lm.model.set_adapter("a1")
        ref1 = choice_outputs(lm.model, batch)
        lm.model.set_adapter("a2")
        ref2 = choice_outputs(lm.model, batch)
    torch.testing.assert_close(both, torch.cat([ref1, ref2]), rtol=0, atol=1e-5)
    assert not any(m._forward_pre_hooks for m in lm.model.modules())
    with pytest.raises(ValueError, match="not loaded"):
        with routed(lm.model, ["nope"]):
            pass


def test_one_pass_training_equals_sequential(data_root, tmp_path, cache_dir):
    """Three adapters of different data sizes (so one runs out of steps before the others),
    token and sequence tasks, gradient accumulation, validation and the best epoch: trained
    in one pass, each ends with the weights, losses and best epoch of training it alone
    (``training.train_adapter``) from the same start with the same batches."""
    from ensemble_core.members import adapter_parameters, train_adapters
    from ensemble_core.training import train_adapter

    lm, scorer, _ = _model(data_root, tmp_path, cache_dir)
    cfg = parse_config(tiny_config(data_root, tmp_path))
    data = {t: load_task(cfg.task(t), data_root) for t in ("rte", "cb", "copa")}
    split = lambda ts, s: [ex for t in ts for ex in data[t].splits[s]]  # noqa: E731
    plans = {"default": (split(["rte", "cb"], "train"), split(["rte", "cb"], "validation")),
             "a1": (split(["copa"], "train"), split(["copa"], "validation")),
             "a2": (split(["cb"], "train")[:5], [])}
    tcfg = cfg.training.model_copy(update={"learning_rate": 5e-2, "epochs": 3, "batch_size": 3,
                                           "grad_accumulation": 2, "seed": 3,
                                           "max_grad_norm": 0.5})
    start = {a: [p.detach().clone() for p in adapter_parameters(lm.model, a)] for a in plans}
    one = train_adapters(lm.model, lm.tokenizer, plans, tcfg, 128)
    together = {a: [p.detach().clone() for p in adapter_parameters(lm.model, a)] for a in plans}
    alone = {}
    for a, (train, val) in plans.items():
        with torch.no_grad():
            for p, v in zip(adapter_parameters(lm.model, a), start[a]):
                p.copy_(v)
        lm.model.set_adapter(a)  # the only trainable adapter
        alone[a] = train_adapter(lm.model, lm.tokenizer, train, val, tcfg, 128)
        for p, q, s in zip(adapter_parameters(lm.model, a), together[a], start[a]):
            assert float((p.detach() - s).abs().max()) > 1e-3  # it did move
            torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5)
        r1, r2 = one[a], alone[a]
        assert (r1.best_epoch, r1.n_steps, r1.tokens_seen, r1.examples_seen) == \
            (r2.best_epoch, r2.n_steps, r2.tokens_seen, r2.examples_seen)
        for h1, h2 in zip(r1.history, r2.history, strict=True):
            for k in ("train_loss", "val_loss"):
                assert (h1[k] is None) == (h2[k] is None)
                if h1[k] is not None:
                    assert h1[k] == pytest.approx(h2[k], rel=1e-5)
    assert one["a2"].n_steps < one["default"].n_steps
