"""Every member in one pass over the base (ensemble_core/members.py; issue 34, item 1): the
scores equal member-by-member scoring (the reference: one ``score_examples`` pass per adapter
with that adapter active) on the tiny random Llama, in token and sequence mode, for LoRA and
the bottleneck kind, the base model alone as a member."""
from __future__ import annotations

import json

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


def test_stage5_scores_members_together_and_reads_back_what_did_not_change(
        data_root, tmp_path, cache_dir):
    """stages.score_members (one task run per task, issue 34): the scores of a task's members
    in one pass equal scoring them one by one (bit for bit on a CPU: each member's batches are
    its own); a member whose inputs did not change is read back, not written again; changing
    one member's plan rewrites that member's file only."""
    import json
    import os

    from ensemble_core import stages
    from ensemble_core.run import Run

    raw = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    raw["training"] = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2}
    run = Run.open(parse_config(raw))
    adapter = stages.train_group(run, "group-0", ["rte", "copa"])
    theta = stages.save_theta_star(run)
    plan = {t: {"group-0": ["train", "validation"], "theta-star": ["validation"]}
            for t in ("rte", "copa")}
    files = {f"{m}/{t}": run.dir.scores(m, "fit", t) for t in plan for m in plan[t]}

    def read():
        return {k: json.loads(open(f).read())["scores"] for k, f in files.items()}

    apart = stages.score_members(run, [adapter, theta], plan)  # auto: one by one on a CPU
    stored = read()
    for f in files.values():
        os.remove(f)
    raw1 = json.loads(json.dumps(raw))
    raw1["estimation"]["one_pass"] = True
    one_run = Run(parse_config(raw1))
    together = stages.score_members(one_run, [adapter, theta], plan)
    assert read() == stored  # bit for bit
    key = lambda recs: {k: r.key() for k, r in recs.items()}  # noqa: E731  (not seconds)
    assert key(together.records) == key(apart.records)
    # nothing changed: every file read back, none written
    mtimes = {k: os.stat(f).st_mtime_ns for k, f in files.items()}
    again = stages.score_members(one_run, [adapter, theta], plan)
    assert again.records == together.records
    assert {k: os.stat(f).st_mtime_ns for k, f in files.items()} == mtimes
    # theta-star now also on rte's train sample: only its rte file is written again
    plan["rte"]["theta-star"] = ["train", "validation"]
    changed = stages.score_members(one_run, [adapter, theta], plan)
    now = {k: os.stat(f).st_mtime_ns for k, f in files.items()}
    assert [k for k in files if now[k] != mtimes[k]] == ["theta-star/rte"]
    assert set(json.loads(open(files["theta-star/rte"]).read())["scores"]["rte"]) == \
        {"train", "validation"}
    assert changed.records["theta-star/rte"] != together.records["theta-star/rte"]
    # a file that is not what the stage wrote is computed again (not trusted): cut short, or
    # one space longer (the same JSON, other bytes)
    for tamper in (lambda b: b[:20], lambda b: b + b" "):
        data = open(files["group-0/copa"], "rb").read()
        with open(files["group-0/copa"], "wb") as f:
            f.write(tamper(data))
        fixed = stages.score_members(one_run, [adapter, theta], plan)
        assert fixed.records["group-0/copa"].key() == together.records["group-0/copa"].key()
        assert open(files["group-0/copa"], "rb").read() == data


def test_stage4_trains_the_groups_together_as_alone(data_root, tmp_path, cache_dir):
    """training.one_pass (stages.train_groups, issue 34 item 2): the group adapters and the
    single adapter trained together from θ* in one task run are saved as ordinary adapters
    whose weights equal those trained one by one (stages.train_group), with the same best
    epoch and steps."""
    from safetensors.torch import load_file

    from ensemble_core import stages
    from ensemble_core.run import Run

    raw = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    raw["training"] = {"epochs": 2, "batch_size": 4, "learning_rate": 2e-2, "seed": 1}
    plans = [("group-0", ["rte", "cb"]), ("group-1", ["copa"]),
             ("all-tasks", ["rte", "cb", "copa"])]
    run = Run.open(parse_config(raw))
    alone = {name: stages.train_group(run, name, tasks) for name, tasks in plans}
    weights = {name: load_file(str(run.dir.adapter_weights(name))) for name, _ in plans}
    raw1 = json.loads(json.dumps(raw))
    raw1["training"]["one_pass"] = True
    together = stages.train_groups(Run(parse_config(raw1)), plans).records
    assert [r.name for r in together] == [n for n, _ in plans]
    for rec in together:
        w = load_file(str(run.dir.adapter_weights(rec.name)))
        assert sorted(w) == sorted(weights[rec.name])
        for k in w:
            torch.testing.assert_close(w[k], weights[rec.name][k], rtol=1e-4, atol=2e-5)
        a, b = rec.train, alone[rec.name].train
        assert (a.best_epoch, a.n_steps, a.tokens_seen) == (b.best_epoch, b.n_steps,
                                                             b.tokens_seen)
        assert rec.tasks == alone[rec.name].tasks
