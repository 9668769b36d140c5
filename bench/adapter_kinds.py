"""Adapter kinds and boosting modes side by side (issue 13; BENCHMARKS.md), read from finished
run directories of one config run with different ``adapter.kind`` / ``model.quantization`` /
``boosting.mode`` (nothing is recomputed here):

    python bench/adapter_kinds.py LoRA=runs/demo Adapter=runs/demo-bottleneck ...
    python bench/adapter_kinds.py --boosting first-order=snap/fo exact=snap/exact ...
    python bench/adapter_kinds.py --linearity configs/demo.yaml --set adapter.reduction_factor=64

Per run: trainable parameters, the linearization error at 0.05–0.25% relative distance (the
stage-1 check, docs/design.md "Checks"; the paper's Figure 2), the relative distance
‖θ − θ*‖/‖θ*‖ fine-tuning moved the single adapter and the group adapters (the paper's Table
2), baseline / ensemble / majority test accuracy, compute and peak memory (metrics.json). With
``--boosting``: each run's boosting steps (training loss before → after, accepted) and the
ensemble's test accuracy. A directory needs metrics.json (and boosting.json for --boosting);
the adapter figures need adapters/ and gradients/linearity.json. ``--linearity CONFIG`` computes the
linearity check of all four base methods at θ* on every task of CONFIG (the one figure that
needs no training run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def _vector(adapter_dir: Path) -> torch.Tensor:
    w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return torch.cat([w[k].float().reshape(-1) for k in sorted(w)])


def relative_distances(run: Path) -> dict[str, float]:
    """‖θ − θ*‖/‖θ*‖ of every trained adapter of a run (not θ*, not boosting adapters)."""
    theta0 = _vector(run / "adapters" / "theta-star")
    out = {}
    for d in sorted((run / "adapters").iterdir()):
        if d.name == "theta-star" or "-boost-" in d.name or not (d / "training.json").exists():
            continue
        out[d.name] = float((_vector(d) - theta0).norm() / theta0.norm())
    return out


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def kinds_table(runs: dict[str, Path]) -> str:
    rows = ["| run | trainable params | linearization error (max over 0.05–0.25%) | "
            "distance moved: single / groups (mean) | baseline | ensemble | majority | "
            "ensemble pipeline / one adapter (s) | ratio | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        avg, comp = m["average"], m["compute"]
        lin_file = next((f for f in (run / "gradients" / "linearity.json",
                                     run / "linearity.json") if f.exists()), None)
        lin = json.loads(lin_file.read_text()) if lin_file else None
        err = max(r["relative_error"] for r in lin["results"]) if lin else None
        dist = relative_distances(run) if (run / "adapters").is_dir() else {}
        groups = [v for k, v in dist.items() if k.startswith("group-")]
        train = json.loads((run / "adapters" / "all-tasks" / "training.json").read_text())
        rows.append(
            f"| {label} | {train['trainable_parameters']:,} | {_pct(err, 3)}% | "
            f"{_pct(dist.get('all-tasks'))}% / "
            f"{_pct(sum(groups) / len(groups) if groups else None)}% | "
            f"{_pct(avg['baseline_accuracy'])} | {_pct(avg['ensemble_accuracy'])} | "
            f"{_pct(avg['majority'])} | {comp['ensemble_pipeline_s']:.0f} / "
            f"{comp['baseline_s']:.0f} | {comp['ratio']:.2f}× | "
            f"{comp['peak_memory_bytes'] / 2 ** 30:.2f} GiB |")
    return "\n".join(rows)


def boosting_table(runs: dict[str, Path]) -> str:
    rows = ["| mode | group | train loss before → after | accepted | ensemble test accuracy | "
            "ensemble − baseline [95% CI] |", "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        avg = m["average"]
        for s in json.loads((run / "boosting.json").read_text())["steps"]:
            rows.append(
                f"| {label} | {s['group']} | {s['train_loss_before']:.4f} → "
                f"{s['train_loss_after']:.4f} | {'yes' if s['accepted'] else 'no'} | "
                f"{_pct(avg['ensemble_accuracy'])} | {100 * avg['difference']:+.1f} "
                f"[{100 * avg['difference_low']:+.1f}, {100 * avg['difference_high']:+.1f}] |")
    return "\n".join(rows)


KINDS = {"LoRA": ("lora", "none"), "QLoRA": ("lora", "nf4"), "Adapter": ("bottleneck", "none"),
         "QAdapter": ("bottleneck", "nf4")}


def linearity_table(config: str, overrides: list[str], d: int = 200) -> str:
    """The stage-1 linearity check (``checks.linearity_check``) of the four base methods at θ*
    on the first ``estimation.linearity_examples`` validation examples of every task of
    ``config``: the largest relative error over the distances 0.05–0.25%, per task."""
    import time

    from ensemble_core.checks import linearity_check
    from ensemble_core.config import load_config
    from ensemble_core.data import load_task
    from ensemble_core.models import load_model
    from ensemble_core.projection import GaussianProjector
    from ensemble_core.scoring import ChoiceScorer

    base = load_config(config, overrides)
    rows, header = [], None
    for label, (kind, quant) in KINDS.items():
        adapter = base.adapter.model_dump()
        if kind == "bottleneck":
            adapter = {k: v for k, v in adapter.items() if k != "target_modules"}
        cfg = base.model_copy(update={
            "adapter": type(base.adapter).model_validate(dict(adapter, kind=kind)),
            "model": base.model.model_copy(update={"quantization": quant})})
        t0 = time.perf_counter()
        lm = load_model(cfg, cfg.cache_dir)
        scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
        p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
        errs = {}
        for task in cfg.tasks:
            examples = load_task(task, cfg.data_root).splits["validation"][
                :cfg.estimation.linearity_examples]
            res = linearity_check(lm.model, scorer, examples, GaussianProjector(p, d, seed=0),
                                  batch_size=cfg.estimation.batch_size)
            errs[task.name] = max(r["relative_error"] for r in res)
        if header is None:
            header = list(errs)
            rows += ["| method | adapter parameters | " + " | ".join(header) + " | max | s |",
                     "|---|---|" + "---|" * (len(header) + 2)]
        rows.append(f"| {label} | {p:,} | " + " | ".join(f"{100 * errs[t]:.3f}%" for t in header)
                    + f" | {100 * max(errs.values()):.3f}% | {time.perf_counter() - t0:.0f} |")
        del lm
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="LABEL=RUN_DIR")
    p.add_argument("--boosting", action="store_true", help="the boosting-modes table")
    p.add_argument("--linearity", metavar="CONFIG",
                   help="the linearity check of LoRA, QLoRA, Adapter, QAdapter at θ* on "
                        "CONFIG's tasks (computed)")
    p.add_argument("--set", action="append", default=[], help="config overrides (--linearity)")
    args = p.parse_args(argv)
    if args.linearity:
        print(linearity_table(args.linearity, args.set))
        return
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            p.error(f"{item!r}: expected LABEL=RUN_DIR with an existing directory")
        runs[label] = Path(path)
    print(boosting_table(runs) if args.boosting else kinds_table(runs))


if __name__ == "__main__":
    main()
