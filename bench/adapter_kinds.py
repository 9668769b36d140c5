"""Adapter kinds and boosting modes side by side (issue 13; BENCHMARKS.md), read from finished
run directories of one config run with different ``adapter.kind`` / ``model.quantization`` /
``boosting.mode`` (nothing is recomputed here):

    python bench/adapter_kinds.py LoRA=runs/demo Adapter=runs/demo-bottleneck ...
    python bench/adapter_kinds.py --boosting first-order=snap/fo exact=snap/exact ...

Per run: trainable parameters, the linearization error at 0.05–0.25% relative distance (the
stage-1 check, docs/design.md "Checks"; the paper's Figure 2), the relative distance
‖θ − θ*‖/‖θ*‖ fine-tuning moved the single adapter and the group adapters (the paper's Table
2), baseline / ensemble / majority test accuracy, compute and peak memory (metrics.json). With
``--boosting``: each run's boosting steps (training loss before → after, accepted) and the
ensemble's test accuracy. A directory needs metrics.json (and boosting.json for --boosting);
the adapter figures need adapters/ and linearity.json.
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
        lin = json.loads((run / "linearity.json").read_text()) \
            if (run / "linearity.json").exists() else None
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    p.add_argument("--boosting", action="store_true", help="the boosting-modes table")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            p.error(f"{item!r}: expected LABEL=RUN_DIR with an existing directory")
        runs[label] = Path(path)
    print(boosting_table(runs) if args.boosting else kinds_table(runs))


if __name__ == "__main__":
    main()
