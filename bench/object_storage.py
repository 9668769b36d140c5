"""The pipeline with its run directory on an S3-compatible object store against a local run
directory, same config, same machine, side by side: wall time per stage group (issue 31).

    python bench/object_storage.py configs/tiny.yaml [--repeat 2] [--set key=value ...]

Each repetition runs `ensemble-lora run` twice from scratch, once with output_dir on a local
disk and once on s3:// (moto's server mode on 127.0.0.1, started here: what is measured is
the cost of going through the S3 protocol — one request per file, uploads of adapters from a
temporary directory, downloads into the local cache — not a network's latency), alternating
which goes first. The stage groups' wall times are read from the run's log (the subflows'
start and finish), the total is the command's wall time including its temporary Prefect
server. Prints a table and, last, one line with the total ratio.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.servers import BUCKET, s3_server  # noqa: E402

GROUPS = ["gradient_features", "affinity", "group_adapters", "boosting_and_weights", "report"]
_BEGIN = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*Beginning subflow run '([^']+)' for flow "
                    r"'([^']+)'")
_END = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) .*Flow run '([^']+)' - Finished in state")


def _t(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%H:%M:%S.%f")


def stage_times(log: str) -> dict[str, float]:
    """flow name -> seconds from its subflow's start to its finish, from a run's log."""
    begun, out = {}, {}
    for line in log.splitlines():
        if (m := _BEGIN.match(line)):
            begun[m.group(2)] = (m.group(3), _t(m.group(1)))
        elif (m := _END.match(line)) and m.group(2) in begun:
            flow, t0 = begun.pop(m.group(2))
            dt = _t(m.group(1)) - t0
            out[flow] = (dt + timedelta(days=1) if dt.total_seconds() < 0 else dt).total_seconds()
    return out


def run_once(config: str, output_dir: str, overrides: list[str], env: dict) -> dict:
    args = [sys.executable, "-m", "flows.cli", "run", config, "--set",
            f"output_dir={output_dir}"]
    for o in overrides:
        args += ["--set", o]
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{output_dir}: exit {r.returncode}\n{r.stderr[-4000:]}")
    times = stage_times(r.stdout + r.stderr)
    return dict(times, total=wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-object-storage-"))
    results: dict[str, list[dict]] = {"local": [], "s3": []}
    with s3_server(tmp) as aws:
        env = dict(os.environ, **aws, PYTHONUNBUFFERED="1")
        for k in range(args.repeat):
            order = ["local", "s3"] if k % 2 == 0 else ["s3", "local"]
            for where in order:
                tag = uuid.uuid4().hex[:8]
                out = str(tmp / f"run-{tag}") if where == "local" \
                    else f"s3://{BUCKET}/run-{tag}"
                results[where].append(run_once(args.config, out, args.set, env))
                print(f"  repetition {k + 1}, {where}: {results[where][-1]['total']:.1f} s",
                      flush=True)
    rows = []
    for name in GROUPS + ["total"]:
        a = [r.get(name) for r in results["local"] if r.get(name) is not None]
        b = [r.get(name) for r in results["s3"] if r.get(name) is not None]
        if a and b:
            la, sb = statistics.median(a), statistics.median(b)
            rows.append((name, la, sb, sb / la if la else float("nan")))
    print(f"\n{args.config}, median of {args.repeat}; seconds")
    print(f"{'stage group':24} {'local':>9} {'s3://':>9} {'s3 / local':>11}")
    for name, la, sb, ratio in rows:
        print(f"{name:24} {la:9.1f} {sb:9.1f} {ratio:10.2f}x")
    total = rows[-1]
    print(f"object storage: {Path(args.config).stem} total {total[3]:.2f}x of local "
          f"({total[2]:.1f} s on s3:// vs {total[1]:.1f} s local)")


if __name__ == "__main__":
    main()
