"""Benchmark of the CPU stages (stages 2-3), measured side by side in one run.

1. SDP clustering (cvxpy) solve time on planted affinities for n = 10, 50, 100, 200 tasks
   (3 planted groups + noise, m given: one solve with Tr X = m). Each size runs in a child process
   and is stopped when it exceeds --limit seconds.
2. Subset regressions: k = 200 distinct subsets of size 4 (of C(10, 4) = 210) over n = 10
   tasks, d = 400, with 1 and with 2 worker processes, on real stage-1 gradient files (SmolLM2-135M on 10 SuperGLUE/GLUE tasks,
   32 train + 16 validation examples each; computed once and kept under --out) or, with
   --synthetic, on synthetic tables (64 train + 32 val examples per task, 2 choices).

    python bench/estimation.py [--limit 600] [--sizes 10,50,100,200] [--k 200] [--auto]
                               [--solver CLARABEL|SCS] [--skip-subsets] [--synthetic]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import cvxpy  # noqa: F401  (imported up front so solve times exclude the import)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ensemble_core.clustering import SDPClustering, labels_to_groups, solve_sdp, round_solution  # noqa: E402
from ensemble_core.features import FeatureTable  # noqa: E402
from ensemble_core.sampling import sample_subsets  # noqa: E402
from ensemble_core.surrogate import fit_subset  # noqa: E402


# ---- subset regressions in worker processes -------------------------------------------------
# (The pipeline fans the subsets out as Prefect tasks; here plain processes measure the fits.)
_WORKER_TABLES = None


def _init_worker(tables) -> None:
    global _WORKER_TABLES
    _WORKER_TABLES = tables


def _estimate(subset, tables, kw) -> dict:
    out = fit_subset([tables[i][0] for i in subset], [tables[i][1] for i in subset], **kw)
    return {"subset": list(subset), "per_task": out["tasks"], "fit": out["fit"]}


def _worker_estimate(args) -> dict:
    subset, kw = args
    return _estimate(subset, _WORKER_TABLES, kw)


def run_subsets(tables, subsets, n_workers: int = 1, **kw) -> list[dict]:
    """fit_subset on every subset, in this process or in ``n_workers`` processes (tables sent
    once per worker)."""
    import math
    from concurrent.futures import ProcessPoolExecutor

    if n_workers == 1:
        return [_estimate(s, tables, kw) for s in subsets]
    chunk = max(1, math.ceil(len(subsets) / (4 * n_workers)))
    with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker,
                             initargs=(tables,)) as pool:
        return list(pool.map(_worker_estimate, [(s, kw) for s in subsets], chunksize=chunk))


# ---- SDP ------------------------------------------------------------------------------------
def planted_affinity(n: int, m: int = 3, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % m
    labels = labels[rng.permutation(n)]
    T = np.where(labels[:, None] == labels[None, :], 1.0, 0.0) + noise * rng.standard_normal((n, n))
    return T, labels


def _sdp_child(n: int, auto: bool, solver, queue) -> None:
    T, labels = planted_affinity(n)
    t0 = time.perf_counter()
    X, _, status, solver = solve_sdp(T, m=3, solver=solver)
    solve_s = time.perf_counter() - t0
    ok = labels_to_groups(round_solution(X, m=3, affinity=T)) == labels_to_groups(labels)
    out = {"solve_s": solve_s, "status": status, "solver": solver, "recovered": ok}
    if auto:
        t0 = time.perf_counter()
        est = SDPClustering(m_selection="trace", solver=solver).fit(T)
        out["auto_s"] = time.perf_counter() - t0
        out["auto_m"] = est.m_
        out["auto_solves"] = len(est.selection_["lams"]) + 1
    queue.put(out)


def bench_sdp(sizes, limit: float, auto: bool, solver=None) -> None:
    print(f"== SDP clustering (cvxpy, solver {solver or 'auto'}; planted 3 groups, m given; "
          f"limit {limit:.0f} s per size)")
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    for n in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_sdp_child, args=(n, auto and n <= 100, solver, queue))
        t0 = time.perf_counter()
        proc.start()
        proc.join(limit)
        wall = time.perf_counter() - t0
        if proc.is_alive():
            proc.terminate()
            proc.join()
            print(f"  n={n:4d}: STOPPED after {wall:.1f} s (exceeds --limit {limit:.0f} s)")
            continue
        if queue.empty():
            why = (" — killed by signal 9, most likely out of memory"
                   if proc.exitcode == -9 else "")
            print(f"  n={n:4d}: FAILED (exit code {proc.exitcode}{why}) after {wall:.1f} s")
            continue
        r = queue.get()
        line = (f"  n={n:4d}: solve {r['solve_s']:8.2f} s  solver={r['solver']:<8s} "
                f"status={r['status']:<18s} planted groups recovered={r['recovered']}")
        if "auto_s" in r:
            line += (f"\n          automatic m (trace sweep, {r['auto_solves']} solves): "
                     f"{r['auto_s']:.2f} s, m={r['auto_m']}")
        print(line, flush=True)


# ---- subset regressions ---------------------------------------------------------------------
def synthetic_table(task: str, split: str, n_examples: int, d: int, x_task: np.ndarray,
                    rng: np.random.Generator) -> FeatureTable:
    """Two-choice examples whose gold follows the linearized model with a task direction."""
    rows = 2 * n_examples
    grad = (rng.standard_normal((rows, d)) / np.sqrt(d)).astype(np.float32)
    output = (0.5 * rng.standard_normal(rows)).astype(np.float32)
    z = (output + grad @ x_task).reshape(n_examples, 2)
    p1 = 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1]))
    gold = (rng.random(n_examples) < p1).astype(np.int64)
    choice = np.tile(np.arange(2, dtype=np.int32), n_examples)
    is_gold = choice == np.repeat(gold, 2)
    eid = np.repeat(np.array([f"{task}-{split}-{i}" for i in range(n_examples)], dtype=object), 2)
    return FeatureTable(task, split, eid, choice, is_gold, output, grad)


def synthetic_tasks(n_tasks: int, d: int, n_train: int, n_val: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.standard_normal((3, d))
    tables = []
    for i in range(n_tasks):
        x_task = centers[i % 3] + 1.0 * rng.standard_normal(d)
        tables.append((synthetic_table(f"task{i}", "train", n_train, d, x_task, rng),
                       synthetic_table(f"task{i}", "val", n_val, d, x_task, rng)))
    return tables


REAL_TASKS = ["superglue/boolq", "superglue/cb", "superglue/copa", "superglue/rte",
              "superglue/wic", "superglue/wsc", "superglue/multirc", "glue/sst2", "glue/mrpc",
              "glue/cola"]


def real_tables(model: str, d: int, data_root: str, out_dir: str, n_train: int, n_val: int):
    """Stage 1 on 10 real tasks (library path, no Prefect): the real gradient files the subset
    regressions read. Files already written under out_dir are reused."""
    from ensemble_core import runtime, stages
    from ensemble_core.config import parse_config
    from ensemble_core.features import read_features
    from ensemble_core.records import FeaturesRecord
    from ensemble_core.run import Run
    from ensemble_core.surrogate import norm_bound

    cfg = parse_config({
        "name": "bench-estimation", "data_root": data_root, "output_dir": out_dir,
        "model": {"name": model, "max_length": 160},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "estimation": {"projection_dim": d, "batch_size": 8},
        "tasks": [{"name": b.split("/")[1], "builtin": b,
                   "max_examples": {"train": n_train, "validation": n_val}} for b in REAL_TASKS]})
    tables = []
    t0 = time.perf_counter()
    run = Run.open(cfg)
    for name in run.task_names:
        kept = run.dir.features_manifest(name) + ".record.json"  # this bench's own note
        if run.dir.exists(kept):
            rec = FeaturesRecord.from_json(run.dir.read_json(kept))
        else:
            rec = stages.gradient_features(run, name)
            run.dir.write_json(kept, rec.to_json())
        tables.append((read_features(rec.train.url(run.dir.url)),
                       read_features(rec.validation.url(run.dir.url))))
    print(f"   (stage 1 features of {len(tables)} real tasks ready in "
          f"{time.perf_counter() - t0:.0f} s: {model}, d = {d}, {n_train} train + {n_val} "
          f"validation examples per task)")
    runtime.release_models()
    # the pipeline's default bound on the solution (estimation.max_adapter_distance = 1.0)
    e = cfg.estimation
    return tables, norm_bound(e.max_norm, e.max_adapter_distance, rec.projection)


def bench_subsets(k: int, n_tasks: int = 10, size: int = 4, d: int = 400, tables=None,
                  max_norm=None) -> None:
    import math
    real = tables is not None
    tables = tables if real else synthetic_tasks(n_tasks, d, 64, 32)
    distinct = min(k, math.comb(n_tasks, size))
    subsets = sample_subsets(n_tasks, distinct, size, seed=0)
    note = ""
    if distinct < k:  # only C(10,3) = 120 distinct triples exist: repeat some to reach k
        rng = np.random.default_rng(1)
        subsets += [subsets[i] for i in rng.integers(0, distinct, k - distinct)]
        note = f" ({distinct} distinct + {k - distinct} repeats: C({n_tasks},{size})={distinct})"
    what = ("real gradient files (Parquet) of SuperGLUE/GLUE tasks" if real
            else "synthetic tasks, 64 train + 32 val examples/task, 2 choices")
    print(f"== subset regressions: k={k} subsets of size {size}{note}, n={n_tasks} tasks, d={d}, "
          f"{what}")
    variants = {"l2 = 1e-3": {}}
    if max_norm is not None:
        variants[f"l2 = 1e-3, |x| <= {max_norm:.3g} (the pipeline's default bound)"] = \
            {"max_norm": max_norm}
    for label, kw in variants.items():
        print(f"  surrogate: {label}")
        times, results = {}, {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            results[workers] = run_subsets(tables, subsets, n_workers=workers, l2=1e-3, **kw)
            times[workers] = time.perf_counter() - t0
            its = [r["fit"]["n_iter"] for r in results[workers]]
            conv = sum(r["fit"]["converged"] for r in results[workers])
            print(f"  {workers} worker(s): {times[workers]:7.2f} s  ({1e3 * times[workers] / k:.1f}"
                  f" ms/subset; L-BFGS iterations median {int(np.median(its))}, "
                  f"converged {conv}/{k})", flush=True)
        same = all(a["per_task"] == b["per_task"] for a, b in zip(results[1], results[2]))
        print(f"  speed-up 2 workers vs 1: {times[1] / times[2]:.2f}x  (cpu count "
              f"{os.cpu_count()}); identical results: {same}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=float, default=600.0, help="seconds per SDP size")
    ap.add_argument("--sizes", default="10,50,100,200")
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--solver", default=None, help="force a cvxpy solver (default: auto order)")
    ap.add_argument("--skip-subsets", action="store_true", help="only the SDP part")
    ap.add_argument("--synthetic", action="store_true",
                    help="synthetic gradient tables instead of real stage-1 files")
    ap.add_argument("--model", default="smollm2-135m", help="model for the real gradient files")
    ap.add_argument("--data-root", default=os.environ.get(
        "ENSEMBLE_LORA_DATA", os.path.join(os.path.dirname(os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))), "shared", "data")))
    ap.add_argument("--out", default="runs", help="where the real gradient files are kept")
    ap.add_argument("--auto", action="store_true",
                    help="also time automatic m selection (trace sweep) for n <= 100")
    args = ap.parse_args(argv)
    bench_sdp([int(s) for s in args.sizes.split(",")], args.limit, args.auto, args.solver)
    if not args.skip_subsets:
        tables, max_norm = (None, None) if args.synthetic else real_tables(
            args.model, 400, args.data_root, os.path.abspath(args.out) + "/{name}", 32, 16)
        bench_subsets(args.k, tables=tables, max_norm=max_norm)


if __name__ == "__main__":
    main()
