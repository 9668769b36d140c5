"""`ensemble-lora` command line: each subcommand starts a flow and prints a summary table.

Exit code 0 on success; on an error, non-zero with one line on stderr,
``ensemble-lora: error: <reason>``, where the reason is the failing task's own message (not
Prefect's wrapper around it). Before a flow starts, the config, every task's data, the model
source and the output location are checked, so a bad input fails in seconds, before anything
is written to the run directory.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from .server import temporary_server


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


def preflight(cfg, stage2: bool = False) -> None:
    """Fail fast, naming the culprit, on what would otherwise fail inside a task: every task's
    data (files, format, fields, labels, splits), the model source, the stage-2 subset plan, and
    whether the output location can be written. Writes nothing but the (empty) run directory.
    When stages run on work pools (``runner.work_pools``), data, model and run directory are
    the workers' to reach, and only the config-level checks are made here."""
    from ensemble_core.run import Run
    from ensemble_core.rundir import RunDir
    from ensemble_core.stages import estimation_examples, plan_batches, previous_plan

    if not cfg.runner.work_pools:  # first: an unreachable store fails here, naming it
        check_writable(cfg.run_dir)
    if stage2:  # the plan stage 2 will use: the directory's own, extended, or a fresh one
        plan_batches(cfg, None if cfg.runner.work_pools else previous_plan(RunDir(cfg.run_dir)))
    if cfg.runner.work_pools:
        return
    run = Run(cfg)
    for name in run.task_names:  # every task's data, and its estimation sample
        for split in ("train", "validation"):
            estimation_examples(run, name, split)
    check_cache_dir(cfg.cache_dir)
    check_model_source(cfg.model, cfg.cache_dir)


def check_model_source(spec, cache_dir=None) -> None:
    """The model name resolves to something loadable, without loading or converting it
    (``models.model_source``); a GGUF file must start with the GGUF magic bytes."""
    from ensemble_core.models import ModelError, model_source

    kind, where = model_source(spec)
    if kind != "gguf":
        return
    try:
        with open(where, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"model {spec.name!r}: cannot read GGUF file {where}: {e}") from None
    if magic != b"GGUF":
        raise ModelError(f"model {spec.name!r}: {where} is not a GGUF file (it does not start "
                         f"with the GGUF magic bytes)")


def check_cache_dir(cache_dir: str | None) -> None:
    """The model cache (``cache_dir``, else ``ENSEMBLE_LORA_CACHE``, else
    ~/.cache/ensemble-lora) can be created and written, or a ConfigError naming it."""
    import tempfile
    from pathlib import Path

    from ensemble_core.config import ConfigError
    from ensemble_core.models import default_cache_dir

    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = "cache_dir" if cache_dir else ("ENSEMBLE_LORA_CACHE" if os.environ.get(
        "ENSEMBLE_LORA_CACHE") else "the default cache_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ConfigError(f"{key} {path} (the model cache) is not usable: {why}") from None


def check_writable(run_dir: str) -> None:
    """The run directory can be created and written (``storage.check_writable``), or a
    ConfigError naming it."""
    from ensemble_core.config import ConfigError
    from ensemble_core.storage import check_writable as check

    try:
        check(run_dir, "output_dir")
    except OSError as e:
        raise ConfigError(str(e)) from None


def _cmd_gradients(args) -> int:
    from .gradient_features import gradient_features

    cfg = _config(args)
    preflight(cfg)
    with temporary_server():
        res = gradient_features(args.config, overrides=args.set)
    rows = [[name, f.train.examples, f.validation.examples, f.train.rows + f.validation.rows,
             f.train.url(cfg.run_dir)] for name, f in res.features.items()]
    print(_table(["task", "train", "validation", "rows", "features"], rows))
    lin = res.linearity
    if lin is not None:
        print(f"\nFirst-order check on {lin.task} ({lin.examples} validation examples):")
        print(_table(["relative distance", "relative error", "error / change"],
                     [[f"{100 * r.relative_distance:.2f}%", f"{100 * r.relative_error:.3g}%",
                       f"{100 * r.error_vs_change:.3g}%"] for r in lin.results]))
    return 0


def _cmd_affinity(args) -> int:
    from .affinity import run_affinity

    cfg = _config(args)
    preflight(cfg, stage2=True)
    with temporary_server():
        res = run_affinity(args.config, overrides=args.set)
    print(f"{len(res.results)} subsets fitted; affinity: {res.groups.affinity.url(cfg.run_dir)}")
    print(_table(["group", "tasks"], [[f"group-{k}", ", ".join(g)]
                                      for k, g in enumerate(res.groups.group_tasks)]))
    return 0


def _cmd_run(args) -> int:
    from ensemble_core.report import ACCURACY_HEADERS, accuracy_rows, baseline_rows, difference_line

    from .pipeline import ensemble_lora

    preflight(_config(args), stage2=True)
    with temporary_server():
        res = ensemble_lora(args.config, overrides=args.set)
    print("\nTest accuracy (%):")
    print(_table(ACCURACY_HEADERS, accuracy_rows(res.metrics)))
    print(difference_line(res.metrics))
    if res.baselines:
        print("\nBaselines, test accuracy (%) and training compute:")
        print(_table(*baseline_rows(res.metrics, res.baselines)))
    c = res.metrics.compute
    print("\nGroups: " + "; ".join(f"group-{k}: {', '.join(g)}"
                                   for k, g in enumerate(res.groups)))
    print(f"Compute: ensemble pipeline {c.ensemble_pipeline_s:.0f} s vs one adapter "
          f"{c.baseline_s:.0f} s: {c.ratio:.2f}x in wall time, {c.flops_ratio:.2f}x in FLOPs "
          f"(the paper's accounting); with the member scoring {c.ratio_with_scoring:.2f}x and "
          f"{c.flops_ratio_with_scoring:.2f}x; peak memory "
          f"{c.peak_memory_bytes / 2**30:.2f} GiB")
    print(f"Run directory: {res.run_dir} (report: {res.report.url(res.run_dir)})")
    if res.version:
        print(f"Version {res.version}: " + ("now current" if res.promoted else
                                             "published, not promoted") + f" ({res.promotion})")
    return 0


def _config(args):
    from ensemble_core.config import load_config

    return load_config(args.config, args.set)


PREDICT_SETTINGS = {"device": str, "cache_dir": str, "batch_size": int}
# serve also takes the endpoint's limits (ensemble_core.serving.Limits)
SERVE_SETTINGS = dict(PREDICT_SETTINGS, max_body_bytes=int, max_records=int, max_field_chars=int,
                      max_pending_records=int)


def _predict_settings(items: list[str], known: dict = PREDICT_SETTINGS) -> dict:
    """``--set`` for predict and serve: the settings of loading and running the saved
    ensemble (and, for serve, the endpoint's limits)."""
    import yaml

    from ensemble_core.config import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = (x.strip() for x in item.split("=", 1))
        key = key.removeprefix("model.")
        command = "serve" if known is SERVE_SETTINGS else "predict"
        if key not in known:
            raise ConfigError(f"{command}: unknown --set key {key!r}; {command} takes "
                              f"{', '.join(sorted(known))}")
        value = yaml.safe_load(raw)
        if known[key] is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{command}: --set {key} needs an int, got {raw!r}")
        try:
            out[key] = known[key](value)
        except (TypeError, ValueError):
            raise ConfigError(f"{command}: --set {key} needs a {known[key].__name__}, "
                              f"got {raw!r}") from None
    return out


def _cmd_predict(args) -> int:
    import json

    from ensemble_core.ensemble import EnsembleModel
    from ensemble_core.storage import atomic_write_bytes

    settings = _predict_settings(args.set)
    batch_size = settings.pop("batch_size", args.batch_size)
    model = EnsembleModel.from_pretrained(args.run_dir, version=args.version, **settings)
    with open(args.input, encoding="utf-8") as f:
        records = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.input} line {n}: not valid JSON ({e.msg})") from None
    preds = model.predict(args.task, records, batch_size=batch_size)
    out = "".join(json.dumps(p) + "\n" for p in preds)
    if args.output == "-":
        print(out, end="")
    else:
        atomic_write_bytes(args.output, out.encode())
        print(f"{len(preds)} predictions for task {args.task} written to {args.output}")
    return 0


def _cmd_versions(args) -> int:
    from ensemble_core import versions

    if args.rollback:
        print(f"current version: {versions.rollback(args.run_dir)}")
    elif args.promote:
        versions.promote(args.run_dir, args.promote)
        print(f"current version: {args.promote}")
    rows = []
    for v in versions.list_versions(args.run_dir):
        val = v.get("validation") or {}
        acc = (sum(m["accuracy"] for m in val.values()) / len(val)) if val else None
        test = (v.get("test_average") or {}).get("ensemble_accuracy")
        rows.append(["*" if v["current"] else "", v["version"], v["created"],
                     "-" if acc is None else f"{100 * acc:.1f}",
                     "-" if test is None else f"{100 * test:.1f}",
                     "yes" if v["promoted"] else "no", v["promotion"]])
    current = versions.current(args.run_dir)
    listed = {r[1] for r in rows}
    if rows:
        print(_table(["", "version", "created", "validation acc. %", "test acc. %",
                      "promoted", "why"], rows))
    if current is not None and current not in listed:
        print(f"ensemble-lora: error: {args.run_dir}: the current version {current} is "
              f"missing (versions/{current} is gone); promote another (--promote) or roll back",
              file=sys.stderr)
        return 1
    if not rows:
        print(f"{args.run_dir}: no versions (a run from before versions, or not finished)")
    return 0


def _cmd_serve(args) -> int:
    from ensemble_core.serving import Limits, serve

    settings = _predict_settings(args.set, SERVE_SETTINGS)
    limits = Limits(**{k: settings.pop(k) for k in list(settings)
                       if k in Limits.__dataclass_fields__})
    serve(args.run_dir, host=args.host, port=args.port,
          batch_size=settings.pop("batch_size", args.batch_size), limits=limits, **settings)
    return 0


def _cmd_check(args) -> int:
    from .affinity import check_estimates_flow

    dims = [int(x) for x in args.d.split(",")] if args.d else None
    with temporary_server():
        res = check_estimates_flow(args.config, overrides=args.set, r=args.r, dims=dims,
                                   test_examples=args.test_examples)
    print(_table(["d", "subset", "task", "est. test acc", "true test acc", "rel. err (acc)",
                  "est. val loss", "true val loss", "rel. err (loss)"],
                 [[x.d, "+".join(x.subset), x.task, x.estimated_test_accuracy,
                   x.true_test_accuracy, f"{100 * (x.test_accuracy_relative_error or 0):.1f}%",
                   x.estimated_loss, x.true_loss, f"{100 * x.relative_error:.1f}%"]
                  for x in res.rows]))
    print()
    print(_table(["d", "pairs", "test acc. rel. error (the paper's)", "val loss rel. error",
                  "Spearman (val loss)", "speed-up, FLOPs (the paper's)",
                  "speed-up, wall (with stage 1)", "speed-up, wall (fits)"],
                 [[s.d, s.pairs, "-" if s.mean_test_accuracy_relative_error is None
                   else f"{100 * s.mean_test_accuracy_relative_error:.2f}%",
                   f"{100 * s.mean_relative_error:.2f}%",
                   "-" if s.spearman is None else f"{s.spearman:.2f}",
                   f"{s.flops_speedup:.0f}x", f"{s.compute_ratio_with_gradients:.1f}x",
                   f"{s.compute_ratio_fits_only:.0f}x"] for s in res.summaries]))
    return 0


def _cmd_benchmark(args) -> int:
    from .benchmark import benchmark_flow

    cfg = _config(args)
    preflight(cfg, stage2=True)
    seeds = list(range(args.seeds)) if args.seed_list is None else \
        [int(x) for x in args.seed_list.split(",")]
    from ensemble_core.storage import join, read_bytes

    with temporary_server():
        res = benchmark_flow(args.config, overrides=args.set, seeds=seeds,
                             projection_draws=args.projection_draws)
    markdown, chart = (join(cfg.run_dir, res[k]) for k in ("markdown", "chart"))
    print()
    print(read_bytes(markdown).decode("utf-8"))
    print(f"Benchmark: {markdown}, {chart}")
    return 0


COMMANDS = {
    "gradients": (_cmd_gradients, "stage 1: projected gradient features (Parquet)"),
    "affinity": (_cmd_affinity, "stage 2: subset regressions, task affinity, SDP groups"),
    "run": (_cmd_run, "the whole pipeline: features, groups, adapters, boosting, evaluation"),
    "check-estimates": (_cmd_check, "Table 3: real fine-tuning on r subsets vs the estimates"),
    "benchmark": (_cmd_benchmark, "the pipeline and baselines over seeds, with confidence "
                                  "intervals"),
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
        "--r", type=int, default=50, help="number of sampled subsets to fine-tune for real "
        "(default 50, the paper's; at most the k sampled)")
    sub.choices["check-estimates"].add_argument(
        "--test-examples", type=int, default=None, help="test examples a task the accuracies "
        "are measured on (default: all)")
    sub.choices["check-estimates"].add_argument(
        "--d", default=None, help="projection dimensions to check, e.g. 200,400,800 (default: "
        "every estimation.projection_dim)")
    sub.choices["benchmark"].add_argument("--seeds", type=int, default=3,
                                          help="seeds 0..N-1 (default 3)")
    sub.choices["benchmark"].add_argument("--seed-list", default=None,
                                          help="explicit seeds, e.g. 0,1,2")
    sub.choices["benchmark"].add_argument(
        "--projection-draws", type=int, default=2,
        help="other draws of the projection P (stages 1-3 only) for the groups' stability "
             "(default 2; 0: none)")
    sp = sub.add_parser("predict", help="predict with a trained ensemble: jsonl in, jsonl out")
    sp.add_argument("run_dir", help="a finished run directory (with ensemble.json)")
    sp.add_argument("--task", required=True, help="task name as in the run's config")
    sp.add_argument("--input", required=True, help="jsonl file of raw records")
    sp.add_argument("--output", default="-", help="jsonl file to write (default stdout)")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--version", default=None,
                    help="the version to use (default: the current one; ensemble-lora versions)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="loading settings: device=cpu, cache_dir=DIR, batch_size=N")
    sp = sub.add_parser("versions", help="list a run directory's versions; promote one or "
                                         "roll back")
    sp.add_argument("run_dir", help="a run directory")
    act = sp.add_mutually_exclusive_group()
    act.add_argument("--promote", metavar="VERSION", help="make VERSION current, whatever its "
                                                         "metrics")
    act.add_argument("--rollback", action="store_true",
                     help="make the version that was current before the current one current")
    sp = sub.add_parser("serve", help="serve a trained ensemble over HTTP: POST /predict, "
                                      "GET /health")
    sp.add_argument("run_dir", help="a finished run directory (with ensemble.json)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                        "127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="loading settings: device=cpu, cache_dir=DIR, batch_size=N; limits: "
                         "max_body_bytes (4 MiB), max_records (1024), max_field_chars "
                         "(32768), max_pending_records (8192)")
    return p


_PREFECT_WRAPPERS = re.compile(r"(Flow|Task) run encountered an exception:?\s*")
_EXC_NAME = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)"
                       r"(?:\(|: )")


def error_reason(exc: BaseException) -> str:
    """One line saying what went wrong: the original message of the task or flow that failed,
    without Prefect's "Flow run encountered an exception: ValueError: ..." wrapping."""
    from prefect.exceptions import PrefectException

    # a Prefect wrapper raised from the real error: report the real one
    while isinstance(exc, PrefectException) and exc.__cause__ is not None:
        exc = exc.__cause__
    msg = str(exc).strip()
    while True:  # "Flow run encountered an exception: ValueError: <message>" -> "<message>"
        m = _PREFECT_WRAPPERS.search(msg)
        if not m:
            break
        inner = msg[m.end():]
        name = _EXC_NAME.match(inner)
        if name and name.group(0).endswith(": "):
            inner = inner[name.end():].lstrip()
        msg = (msg[:m.start()] + inner).strip()
    if not msg:
        return type(exc).__name__
    return msg.splitlines()[0].strip()


_SIGNALLED: list[int] = []


def _on_signal(signum, frame) -> None:
    """SIGINT or SIGTERM: ask the run's model loops to stop at their next step (every thread:
    ``runtime.request_stop``) and unwind the main thread, whose flows end Crashed; a second
    signal while stopping ends the process at once."""
    from ensemble_core.runtime import request_stop

    if _SIGNALLED:
        os._exit(128 + signum)
    _SIGNALLED.append(signum)
    request_stop()
    raise KeyboardInterrupt


def _stop_on_signals() -> dict:
    """One SIGTERM (``kill``, a Prefect cancellation of the process) or one SIGINT (Ctrl-C)
    stops a command within seconds, training included. During a flow run Prefect's own SIGTERM
    handler comes first (it marks the run Crashed or Cancelled, then passes the signal on to
    this one). Returns the handlers it replaced (none outside the main thread)."""
    _SIGNALLED.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (argparse printed them) and --help
        return e.code if isinstance(e.code, int) else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the commands start their own temporary server, which ends with the command even when
    # it is killed (flows/server.py); should Prefect start one itself, it gets as long to
    # start up (its 20 s default is too little on a busy 2-core machine)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          os.environ.get("ENSEMBLE_LORA_SERVER_STARTUP_S", "180"))
    # the temporary server's telemetry write races the first flow run for its SQLite file
    # ("database is locked" traceback on the console, seen 2026-12-02); the Makefile already
    # turns it off, and a user who set it keeps their value
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:  # the per-model "Loading weights" bars drown the pipeline's own progress
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass
    previous = _stop_on_signals()
    try:
        handler = {"predict": _cmd_predict, "serve": _cmd_serve,
                   "versions": _cmd_versions}.get(args.command) \
            or COMMANDS[args.command][0]
        return handler(args)
    except Exception as e:  # one line, naming what failed
        if os.environ.get("ENSEMBLE_LORA_DEBUG"):
            raise
        print(f"ensemble-lora: error: {error_reason(e)}", file=sys.stderr)
        return 1
    except BaseException as e:  # Ctrl-C, SIGTERM (Prefect's TerminationSignal), a cancellation
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        signum = _SIGNALLED[0] if _SIGNALLED else getattr(e, "signal", signal.SIGINT)
        print(f"ensemble-lora: stopped by {signal.Signals(signum).name}; what finished is "
              "cached: run the same command to resume", file=sys.stderr)
        return 128 + int(signum)
    finally:
        for sig, old in previous.items():  # main() called in-process (tests) leaves no trace
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
