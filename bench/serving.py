"""The HTTP endpoint against one `ensemble-lora predict` call per request (issue 14), side by
side on the same run directory and records:

  serve     `ensemble-lora serve RUN_DIR` started once (a real process on a local port), then
            N requests of R records each, C at a time, through a real HTTP client (httpx)
  predict   `ensemble-lora predict RUN_DIR --task T --input FILE` once per request (a new
            process: imports, the base model and every adapter loaded each time), M requests

Prints requests/second and records/second of each, the p50/p95 request latency, and the
endpoint's batches (how many model batches served the N requests), and writes the figures as
JSON (--out).

Usage:  python bench/serving.py RUN_DIR --task sst2 --records FILE.jsonl
                                [--requests 64] [--concurrency 8] [--per-request 1]
                                [--predict-calls 3] [--out serving.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_serve(run_dir, task, batches, concurrency) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(run_dir),
                             "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t_start = time.perf_counter()
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            time.sleep(0.2)
        startup = time.perf_counter() - t_start
        # one warm-up request (first-call allocations), not counted
        httpx.post(f"{url}/predict", json={"task": task, "records": batches[0]}, timeout=600)
        before = httpx.get(f"{url}/health", timeout=10).json()["served"]
        latencies: list[float] = []

        async def go():
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                async def one(recs):
                    async with sem:
                        t0 = time.perf_counter()
                        r = await client.post("/predict", json={"task": task, "records": recs})
                        r.raise_for_status()
                        latencies.append(time.perf_counter() - t0)
                await asyncio.gather(*(one(b) for b in batches))

        t0 = time.perf_counter()
        asyncio.run(go())
        wall = time.perf_counter() - t0
        after = httpx.get(f"{url}/health", timeout=10).json()["served"]
    finally:
        proc.terminate()
        proc.wait(30)
    n_rec = sum(len(b) for b in batches)
    return {"requests": len(batches), "records": n_rec, "wall_s": wall,
            "requests_per_s": len(batches) / wall, "records_per_s": n_rec / wall,
            "p50_s": _pct(latencies, 50), "p95_s": _pct(latencies, 95),
            "model_batches": after["batches"] - before["batches"], "startup_s": startup}


def bench_predict(run_dir, task, batches) -> dict:
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, recs in enumerate(batches):
            f = Path(tmp) / f"r{i}.jsonl"
            f.write_text("".join(json.dumps(r) + "\n" for r in recs))
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "flows.cli", "predict", str(run_dir),
                                  "--task", task, "--input", str(f)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            walls.append(time.perf_counter() - t0)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
    n_rec = sum(len(b) for b in batches)
    return {"requests": len(batches), "records": n_rec, "wall_s": sum(walls),
            "requests_per_s": len(batches) / sum(walls), "records_per_s": n_rec / sum(walls),
            "p50_s": _pct(walls, 50), "p95_s": _pct(walls, 95)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--task", required=True)
    p.add_argument("--records", required=True, help="jsonl of raw records of the task")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--per-request", type=int, default=1)
    p.add_argument("--predict-calls", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = [json.loads(x) for x in Path(a.records).read_text().splitlines() if x.strip()]
    k = a.per_request
    batches = [[pool[(i * k + j) % len(pool)] for j in range(k)] for i in range(a.requests)]
    serve = bench_serve(a.run_dir, a.task, batches, a.concurrency)
    predict = bench_predict(a.run_dir, a.task, batches[:a.predict_calls])
    rows = [("serve", serve), ("predict per request", predict)]
    print(f"{a.requests} requests of {k} record(s), {a.concurrency} at a time; predict: "
          f"{a.predict_calls} calls")
    print(f"{'':22s}{'req/s':>9s}{'records/s':>11s}{'p50 s':>9s}{'p95 s':>9s}")
    for name, r in rows:
        print(f"{name:22s}{r['requests_per_s']:9.2f}{r['records_per_s']:11.2f}"
              f"{r['p50_s']:9.3f}{r['p95_s']:9.3f}")
    print(f"serve: {serve['model_batches']} model batches for {a.requests} requests; started "
          f"in {serve['startup_s']:.1f} s; throughput {serve['requests_per_s'] / predict['requests_per_s']:.1f}x "
          "one predict call per request")
    if a.out:
        Path(a.out).write_text(json.dumps({"serve": serve, "predict": predict,
                                           "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
