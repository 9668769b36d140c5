"""`ensemble-lora` command line: each subcommand starts a flow and prints a summary table.

Exit code 0 on success; on an error, non-zero with a one-line reason.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def _cmd_gradients(args) -> int:
    from .gradient_features import gradient_features

    res = gradient_features(args.config, overrides=args.set)
    rows = []
    for name, rec in res["tasks"].items():
        f = rec["files"]
        rows.append([name, f["train"]["examples"], f["validation"]["examples"],
                     f["train"]["rows"] + f["validation"]["rows"], f["train"]["path"]])
    print(_table(["task", "train", "validation", "rows", "features"], rows))
    if "linearity" in res:
        lin = res["linearity"]
        print(f"\nFirst-order check on {lin['task']} ({lin['examples']} validation examples):")
        print(_table(["relative distance", "relative error", "error / change"],
                     [[f"{100 * r['relative_distance']:.2f}%", f"{100 * r['relative_error']:.3g}%",
                       f"{100 * r['error_vs_change']:.3g}%"] for r in lin["results"]]))
    return 0


def _cmd_affinity(args) -> int:
    from .affinity import run_affinity

    res = run_affinity(args.config, overrides=args.set)
    print(f"{len(res['subsets'])} subsets fitted; affinity: {res['affinity']['path']}")
    print(_table(["group", "tasks"], [[f"group-{k}", ", ".join(g)]
                                      for k, g in enumerate(res["group_tasks"])]))
    return 0


def _cmd_run(args) -> int:
    from ensemble_core.report import ACCURACY_HEADERS, accuracy_rows

    from .pipeline import ensemble_lora

    res = ensemble_lora(args.config, overrides=args.set)
    m = res["metrics"]
    print("\nTest accuracy (%):")
    print(_table(ACCURACY_HEADERS, accuracy_rows(m)))
    c = m["compute"]
    print(f"\nGroups: " + "; ".join(f"group-{k}: {', '.join(g)}"
                                    for k, g in enumerate(res["groups"])))
    print(f"Compute: ensemble pipeline {c['ensemble_pipeline_s']:.0f} s vs one adapter "
          f"{c['baseline_s']:.0f} s (ratio {c['ratio']:.2f}x); peak memory "
          f"{c['peak_memory_bytes'] / 2**30:.2f} GiB")
    print(f"Run directory: {res['run_dir']} (report: {res['report']})")
    return 0


def _cmd_predict(args) -> int:
    import json

    from ensemble_core.ensemble import EnsembleModel
    from ensemble_core.storage import atomic_write_bytes

    model = EnsembleModel.from_pretrained(args.run_dir)
    with open(args.input, encoding="utf-8") as f:
        records = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.input} line {n}: not valid JSON ({e.msg})") from None
    preds = model.predict(args.task, records, batch_size=args.batch_size)
    out = "".join(json.dumps(p) + "\n" for p in preds)
    if args.output == "-":
        print(out, end="")
    else:
        atomic_write_bytes(args.output, out.encode())
        print(f"{len(preds)} predictions for task {args.task} written to {args.output}")
    return 0


def _cmd_check(args) -> int:
    from .affinity import check_estimates_flow

    res = check_estimates_flow(args.config, overrides=args.set, r=args.r)
    print(_table(["subset", "task", "est. loss", "true loss", "est. acc", "true acc", "rel. err"],
                 [["+".join(x["subset"]), x["task"], x["estimated_loss"], x["true_loss"],
                   x["estimated_accuracy"], x["true_accuracy"],
                   f"{100 * x['relative_error']:.1f}%"] for x in res["rows"]]))
    s = res["summary"]
    print(f"\n{s['pairs']} (subset, task) pairs: mean relative error of the loss "
          f"{100 * s['mean_relative_error']:.2f}%, Spearman {s['spearman']:.2f}; "
          f"fine-tuning {s['true_finetune_s']:.0f} s vs estimation {s['surrogate_fit_s']:.2f} s "
          f"({s['compute_ratio_fits_only']:.0f}x; {s['compute_ratio_with_gradients']:.1f}x with "
          f"the amortized gradient features)")
    return 0


COMMANDS = {
    "gradients": (_cmd_gradients, "stage 1: projected gradient features (Parquet)"),
    "affinity": (_cmd_affinity, "stage 2: subset regressions, task affinity, SDP groups"),
    "run": (_cmd_run, "the whole pipeline: features, groups, adapters, boosting, evaluation"),
    "check-estimates": (_cmd_check, "Table 3: real fine-tuning on r subsets vs the estimates"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemble-lora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file (path or fsspec URL)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. training.epochs=3")
    sub.choices["check-estimates"].add_argument(
        "--r", type=int, default=3, help="number of sampled subsets to fine-tune for real")
    sp = sub.add_parser("predict", help="predict with a trained ensemble: jsonl in, jsonl out")
    sp.add_argument("run_dir", help="a finished run directory (with ensemble.json)")
    sp.add_argument("--task", required=True, help="task name as in the run's config")
    sp.add_argument("--input", required=True, help="jsonl file of raw records")
    sp.add_argument("--output", default="-", help="jsonl file to write (default stdout)")
    sp.add_argument("--batch-size", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:  # the per-model "Loading weights" bars drown the pipeline's own progress
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass
    try:
        handler = _cmd_predict if args.command == "predict" else COMMANDS[args.command][0]
        return handler(args)
    except KeyboardInterrupt:
        print("ensemble-lora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, naming what failed
        if os.environ.get("ENSEMBLE_LORA_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"ensemble-lora: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
