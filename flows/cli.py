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
        return f"{v:.4g}"
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


COMMANDS = {
    "gradients": (_cmd_gradients, "stage 1: projected gradient features (Parquet)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemble-lora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file (path or fsspec URL)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. training.epochs=3")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command][0](args)
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
