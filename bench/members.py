"""Every member in one pass over the base against member by member (issue 34), side by side in
one process on the demo's model and data (configs/demo.yaml: SmolLM2-135M-Instruct, its six
tasks' test examples, max_length 48):

  scoring   stage 5's work: the demo's five members (three group adapters, the boosting
            adapter and θ*) on N test examples of every task, ``members.score_members`` (one
            forward per batch for all five; stage 5's way, ``alone``: each member its own
            batches; and the served ensemble's, the stacked forward no larger than one
            member's batch) against ``members.score_members_apart`` (one pass per member),
            at the demo's ``estimation.batch_size``
  serving   ``EnsembleModel.predict`` at batch 1 (latency, median over R requests) and at batch
            32 (records/second): the demo-shaped ensemble (3 groups, group 0 boosted: five
            members, every task weighting all three groups) in one pass and member by member,
            against an ensemble of one adapter
  training  the demo's three groups (their tasks, train sizes and training config, epochs
            capped by --epochs) trained one after another (``training.train_adapter``) against
            all three in one pass (``training.train_adapters``): wall time at equal FLOPs (the
            same batches), peak RSS of each, and the largest weight difference between them

The adapters have random weights (each far from the others: the work is the same as trained
ones'). ``--dtype bfloat16`` runs every column in bf16 (model.dtype); ``--precision`` adds
the members scored in fp32 and in bf16 side by side (time, predicted choice agreement, the
largest score difference). The last line reads

  members: scoring <r>x, serving <r>x, training <r>x

(one pass / member by member for scoring; the served ensemble's batch-1 latency / one
adapter's; one-pass / sequential training), so a script can read it.

Usage:  python bench/members.py [--examples 24] [--requests 24] [--epochs 1] [--out m.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ensemble_core.config import load_config  # noqa: E402
from ensemble_core.data import load_task  # noqa: E402
from ensemble_core.ensemble import EnsembleModel, task_entry  # noqa: E402
from ensemble_core.members import score_members, score_members_apart  # noqa: E402
from ensemble_core.models import load_model  # noqa: E402
from ensemble_core.scoring import ChoiceScorer  # noqa: E402

MEMBERS = ("group-0", "group-1", "group-2", "group-0-boost-1", "default")  # default: θ*


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def setup(config: str, dtype: str | None):
    over = [f"model.dtype={dtype}"] if dtype else []
    cfg = load_config(config, over)
    if not cfg.cache_dir:
        cfg.cache_dir = os.environ.get("ENSEMBLE_LORA_CACHE",
                                       str(Path.home() / ".cache" / "ensemble-lora"))
    lm = load_model(cfg, Path(cfg.cache_dir))
    from ensemble_core.adapter_kinds import adapter_kind

    for name in MEMBERS[:-1]:
        lm.model.add_adapter(name, adapter_kind(cfg.adapter).peft_config(cfg.adapter))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every member its own random weights (B = 0 would make them equal)
        for n, p in lm.model.named_parameters():
            if any(f".{a}." in n for a in MEMBERS):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    data = {t.name: load_task(t, cfg.data_root) for t in cfg.tasks}
    return cfg, lm, data


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_scoring(cfg, lm, data, n: int, repeats: int) -> dict:
    examples = [ex for t in data for ex in data[t].splits["test"][:n]]
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    bs = cfg.estimation.batch_size
    apart_s, apart = _timed(lambda: score_members_apart(lm.model, scorer, examples, MEMBERS,
                                                        bs), repeats)
    # stage 5's one pass: each member keeps its own batches, the members stacked
    one_s, one = _timed(lambda: score_members(lm.model, scorer, examples, MEMBERS, bs,
                                              alone=True), repeats)
    # the served ensemble's: the stacked forward no larger than one member's batch
    small_s, _ = _timed(lambda: score_members(lm.model, scorer, examples, MEMBERS, bs),
                        repeats)
    diff = max(float(np.abs(x - y).max()) for m in MEMBERS for x, y in zip(one[m], apart[m]))
    return {"examples": len(examples), "members": len(MEMBERS), "batch_size": bs,
            "member_by_member_s": apart_s, "one_pass_s": one_s, "ratio": one_s / apart_s,
            "one_pass_serving_batches_s": small_s, "ratio_serving_batches": small_s / apart_s,
            "max_abs_difference": diff}


def _ensemble(cfg, lm, spec_groups, weights):
    tasks = {t.name: task_entry(t, 0, weights) for t in cfg.tasks}
    spec = {"tasks": tasks, "groups": spec_groups, "max_length": cfg.model.max_length,
            "choice_mode": cfg.model.choice_mode}
    names = {m["adapter"]: m["adapter"] for g in spec_groups for m in g["members"]}
    return EnsembleModel(lm.model, lm.tokenizer, spec, REPO, names)


def bench_serving(cfg, lm, data, requests: int) -> dict:
    grp = lambda name, members: {"name": name, "tasks": [],  # noqa: E731
                                 "members": [{"adapter": a, "scale": s} for a, s in members]}
    ens = _ensemble(cfg, lm, [grp("group-0", [("group-0", 1.0), ("group-0-boost-1", 1.0),
                                              ("default", -1.0)]),
                              grp("group-1", [("group-1", 1.0)]),
                              grp("group-2", [("group-2", 1.0)])], [0.5, 0.3, 0.2])
    one = _ensemble(cfg, lm, [grp("group-0", [("group-0", 1.0)])], [1.0])
    tasks = list(data)
    reqs = [(tasks[i % len(tasks)], data[tasks[i % len(tasks)]].splits["test"][i // len(tasks)])
            for i in range(requests)]
    big = {t: data[t].splits["test"][:32] for t in tasks}

    def latency(em, one_pass=True):
        em.one_pass = one_pass
        em.predict(*reqs[0][:1], [reqs[0][1]])  # warm-up
        lat = []
        for task, ex in reqs:
            t0 = time.perf_counter()
            em.predict(task, [ex])
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in tasks:
            em.predict(t, big[t], batch_size=32)
        rate = sum(len(v) for v in big.values()) / (time.perf_counter() - t0)
        return {"p50_ms": 1e3 * statistics.median(lat),
                "p95_ms": 1e3 * float(np.percentile(lat, 95)), "batch32_records_per_s": rate}

    out = {"one_adapter": latency(one), "ensemble_one_pass": latency(ens),
           "ensemble_member_by_member": latency(ens, one_pass=False), "requests": requests,
           "members": 5}
    out["ratio"] = out["ensemble_one_pass"]["p50_ms"] / out["one_adapter"]["p50_ms"]
    out["ratio_member_by_member"] = (out["ensemble_member_by_member"]["p50_ms"]
                                     / out["one_adapter"]["p50_ms"])
    return out


def bench_precision(cfg, lm, data, n: int) -> dict:
    """The five members scored member by member in fp32 and in bf16 (the same weights, the
    base loaded with model.dtype bfloat16): seconds, how often the predicted choice agrees,
    and the largest score difference."""
    from ensemble_core.adapter_kinds import adapter_kind

    bcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    blm = load_model(bcfg, Path(cfg.cache_dir))
    for name in MEMBERS[:-1]:
        blm.model.add_adapter(name, adapter_kind(cfg.adapter).peft_config(cfg.adapter))
    src = dict(lm.model.named_parameters())
    with torch.no_grad():
        for k, p in blm.model.named_parameters():
            if any(f".{a}." in k for a in MEMBERS):
                p.copy_(src[k].to(p.dtype))
    examples = [ex for t in data for ex in data[t].splits["test"][:n]]
    out = {}
    for label, model, tok in (("float32", lm.model, lm.tokenizer),
                              ("bfloat16", blm.model, blm.tokenizer)):
        scorer = ChoiceScorer(tok, cfg.model.max_length, cfg.model.choice_mode)
        sec, scores = _timed(lambda: score_members_apart(model, scorer, examples, MEMBERS,
                                                         cfg.estimation.batch_size), 1)
        out[label] = {"seconds": sec, "scores": scores}
    f, b = out["float32"]["scores"], out["bfloat16"]["scores"]
    agree = [int(np.argmax(x) == np.argmax(y)) for m in MEMBERS for x, y in zip(f[m], b[m])]
    diff = max(float(np.abs(x - y).max()) for m in MEMBERS for x, y in zip(f[m], b[m]))
    del blm
    return {"examples": len(examples), "float32_s": out["float32"]["seconds"],
            "bfloat16_s": out["bfloat16"]["seconds"],
            "ratio": out["bfloat16"]["seconds"] / out["float32"]["seconds"],
            "prediction_agreement": float(np.mean(agree)), "max_abs_difference": diff}


GROUPS = {"group-0": ("sst2", "cola"), "group-1": ("mrpc", "rte", "boolq"),
          "group-2": ("wic",)}  # a grouping of the demo's tasks (three groups, as it finds)


class _PeakRSS:
    """The largest resident set size of this process while the block runs (sampled)."""

    def __enter__(self):
        import threading

        import psutil

        proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, proc.memory_info().rss)
        self.peak = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_training(cfg, lm, data, epochs: int) -> dict:
    from ensemble_core.members import adapter_parameters, train_adapters
    from ensemble_core.training import train_adapter

    tcfg = cfg.training.model_copy(update={"epochs": epochs})
    plans = {g: ([ex for t in ts for ex in data[t].splits["train"]],
                 [ex for t in ts for ex in data[t].splits["validation"]])
             for g, ts in GROUPS.items()}
    start = {g: [p.detach().clone() for p in adapter_parameters(lm.model, g)] for g in plans}

    def reset():
        with torch.no_grad():
            for g in plans:
                for p, v in zip(adapter_parameters(lm.model, g), start[g]):
                    p.copy_(v)

    out = {"epochs": epochs, "groups": {g: len(v[0]) for g, v in plans.items()}}
    reset()
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        seq = {}
        for g, (train, val) in plans.items():
            lm.model.set_adapter(g)
            seq[g] = train_adapter(lm.model, lm.tokenizer, train, val, tcfg,
                                   cfg.model.max_length, cfg.model.choice_mode)
        sec = time.perf_counter() - t0
    alone = {g: [p.detach().clone() for p in adapter_parameters(lm.model, g)] for g in plans}
    out["sequential"] = {"seconds": sec, "tokens": sum(r.tokens_seen for r in seq.values()),
                         "peak_rss_gib": mem.peak / 2**30}
    reset()
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        one = train_adapters(lm.model, lm.tokenizer, plans, tcfg, cfg.model.max_length,
                             cfg.model.choice_mode)
        sec = time.perf_counter() - t0
    out["one_pass"] = {"seconds": sec, "tokens": sum(r.tokens_seen for r in one.values()),
                       "peak_rss_gib": mem.peak / 2**30}
    out["max_weight_difference"] = max(
        float((p.detach() - q).abs().max()) for g in plans
        for p, q in zip(adapter_parameters(lm.model, g), alone[g]))
    out["ratio"] = out["one_pass"]["seconds"] / out["sequential"]["seconds"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--examples", type=int, default=24, help="test examples per task (scoring)")
    ap.add_argument("--requests", type=int, default=24, help="batch-1 requests (serving)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (training column)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--precision", action="store_true",
                    help="also score in bf16 against fp32 (where the CPU or GPU has bf16)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg, lm, data = setup(a.config, a.dtype)
    print(f"model {cfg.model.name} ({cfg.model.dtype}), {torch.get_num_threads()} threads; "
          f"members {', '.join(MEMBERS)}", flush=True)
    res = {"dtype": cfg.model.dtype, "threads": torch.get_num_threads()}
    s = res["scoring"] = bench_scoring(cfg, lm, data, a.examples, a.repeats)
    print(f"scoring  {s['examples']} examples x {s['members']} members: member by member "
          f"{s['member_by_member_s']:.2f} s, one pass {s['one_pass_s']:.2f} s "
          f"({s['ratio']:.2f}x; max |difference| {s['max_abs_difference']:.1e}); one pass in "
          f"the served ensemble's batches {s['one_pass_serving_batches_s']:.2f} s "
          f"({s['ratio_serving_batches']:.2f}x)", flush=True)
    v = res["serving"] = bench_serving(cfg, lm, data, a.requests)
    for k in ("one_adapter", "ensemble_one_pass", "ensemble_member_by_member"):
        print(f"serving  {k:<26} batch 1: p50 {v[k]['p50_ms']:.1f} ms, p95 "
              f"{v[k]['p95_ms']:.1f} ms; batch 32: {v[k]['batch32_records_per_s']:.1f} "
              "records/s", flush=True)
    t = None
    if not a.skip_training:
        t = res["training"] = bench_training(cfg, lm, data, a.epochs)
        for k in ("sequential", "one_pass"):
            print(f"training {k:<10} {t[k]['seconds']:.1f} s, {t[k]['tokens']} tokens, peak "
                  f"RSS {t[k]['peak_rss_gib']:.2f} GiB", flush=True)
        print(f"training one pass / sequential {t['ratio']:.2f}x; largest weight difference "
              f"{t['max_weight_difference']:.1e}", flush=True)
    if a.precision:
        pr = res["precision"] = bench_precision(cfg, lm, data, a.examples)
        print(f"precision {pr['examples']} examples x 5 members, member by member: fp32 "
              f"{pr['float32_s']:.1f} s, bf16 {pr['bfloat16_s']:.1f} s ({pr['ratio']:.2f}x); "
              f"predicted choice agrees on {100 * pr['prediction_agreement']:.1f}%, max "
              f"|score difference| {pr['max_abs_difference']:.3f}", flush=True)
    res["peak_rss_gib"] = _rss_gib()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    tr = "n/a" if t is None else f"{t['ratio']:.2f}"
    print(f"members: scoring {s['ratio']:.2f}x, serving {v['ratio']:.2f}x, training {tr}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
