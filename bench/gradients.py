"""Stage-1 throughput, measured side by side on the same real batch:

  ours      batched per-example gradients (hooks) + projection to d   (ensemble_core.gradients)
  train     a plain batched training step: forward with full logits + CE on the answer token,
            backward of the summed loss (what one fine-tuning step costs)
  loop      the per-example autograd loop (one example, one choice, one backward at a time)

Prints examples/second of each, the ratios ours/train and ours/loop, and the projection's share
of our time. Usage:  python bench/gradients.py [--model smollm2-135m] [--task rte] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_core.config import parse_config  # noqa: E402
from ensemble_core.data import load_task  # noqa: E402
from ensemble_core.gradients import batched_gradients, reference_gradients  # noqa: E402
from ensemble_core.models import ChoiceScorer, gold_rows, load_model  # noqa: E402
from ensemble_core.projection import GaussianProjector  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="rte,copa")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--d", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop-examples", type=int, default=4,
                    help="examples timed in the per-example loop (it is slow); scaled per example")
    ap.add_argument("--data-root", default=os.environ.get(
        "ENSEMBLE_LORA_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    args = ap.parse_args()

    tasks = args.tasks.split(",")
    cfg = parse_config({
        "data_root": args.data_root, "output_dir": "/tmp/bench",
        "model": {"name": args.model, "max_length": args.max_length},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "tasks": [{"name": t, "builtin": f"superglue/{t}"} for t in tasks]})
    lm = load_model(cfg)
    model = lm.model
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    projector = GaussianProjector(p, args.d, seed=0)
    for k in range(projector.n_blocks):
        projector.block(k)  # P generated once and cached, as in a real extraction
    params = [q for q in model.parameters() if q.requires_grad]
    scorer = ChoiceScorer(lm.tokenizer, args.max_length)
    causal_lm = model.get_base_model()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
          f"torch {torch.__version__}, device {lm.device}")
    print(f"model {args.model}: {lm.fingerprint['base']['n_parameters'] / 1e6:.1f}M parameters, "
          f"LoRA r=8 on q_proj,v_proj: p = {p}, d = {args.d}, batch {args.batch}")
    for task in tasks:
        td = load_task(cfg.task(task), cfg.data_root)
        examples = td.splits["train"][:args.batch]
        batch = scorer.encode(examples)
        n_tok = int(batch.attention_mask.sum())
        gold = gold_rows(examples)

        proj_time = {}

        def ours():
            _, G = batched_gradients(model, batch)
            t0 = time.perf_counter()
            projector.project(G)
            proj_time["s"] = time.perf_counter() - t0

        def train_step():
            # a plain training step: full logits, cross-entropy of the gold continuation
            model.zero_grad(set_to_none=True)
            if batch.mode == "token":
                logits = causal_lm(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits
                last = logits[torch.arange(len(examples)), batch.last_pos]
                gold_tok = batch.row_token[gold]
                loss = torch.nn.functional.cross_entropy(last, gold_tok, reduction="sum")
            else:
                seq = gold  # the gold continuation's sequence of each example
                ids, mask, cont = batch.input_ids[seq], batch.attention_mask[seq], batch.cont_mask[seq]
                logits = causal_lm(input_ids=ids, attention_mask=mask).logits
                labels = torch.where(cont, ids, torch.full_like(ids, -100))
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum")
            loss.backward()

        loop_ex = examples[:args.loop_examples]

        def loop():
            reference_gradients(model, scorer, loop_ex, mode=batch.mode)

        t_ours = timed(ours, args.repeats)
        t_train = timed(train_step, args.repeats)
        t_loop = timed(loop, 1) * len(examples) / len(loop_ex)
        n = len(examples)
        print(f"\n{task} ({batch.mode} mode, {n} examples, {sum(batch.n_choices)} rows, "
              f"{n_tok} tokens, max length {batch.input_ids.shape[1]}):")
        print(f"  ours (gradients + projection) {n / t_ours:8.2f} examples/s")
        print(f"  plain training step           {n / t_train:8.2f} examples/s")
        print(f"  per-example autograd loop     {n / t_loop:8.2f} examples/s")
        print(f"  ratio ours / training step    {t_train / t_ours:8.2f}x   (target >= 0.8)")
        print(f"  ratio ours / per-example loop {t_loop / t_ours:8.2f}x   (target >= 5)")
        print(f"  projection share of our time  {100 * proj_time['s'] / t_ours:7.1f}%")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
