"""Many datasets in one run (issue 32): synthetic tasks with a planted grouping
(``ensemble_core/synthetic.py``), the whole pipeline on the tiny model, for a list of n.

For each n (default 10, 50, 200) with C = max(2, n // 10) planted clusters (and
clustering.n_groups = C), n tasks of 64 train, 12 validation and 12 test examples are written
as JSONL files (``rule="code"``, see ``config`` below), then the pipeline runs twice, each in
its own process, on the same files:

  prefect   the ``ensemble_lora`` flow on a Prefect server (a temporary local one:
            prefect_test_harness), every stage a task run
  plain     ``algorithm2.pipeline`` in the process, no Prefect: the stage functions alone

It prints each stage group's wall time (the flow's subflows), the number of task runs the
flow created, the orchestration overhead (the share of the flow's wall time in which no task
run was running: flows starting, task runs created and scheduled, results stored; the plain
run's wall time beside it, though the flow runs some tasks concurrently and can be faster),
each process's peak RSS, and the adjusted Rand index of the groups found against the planted
clusters. Stage 2 samples subsets of 4, three times as many as covering every pair once takes
(every pair at least once; the paper's federated setting, 2,000 subsets of 10 for 500 tasks
with most pairs never together, is ``bench/federated.py``). The last line for each n reads
exactly

  scale n=<n>: wall <s> s, overhead <pct>%, task runs <count>, ARI <ari>

Usage:  python bench/scale.py [--n 10,50,200] [--out DIR (default: a temporary directory)]
                              [--boosting-steps 1] [--paper-subsets] [--stability-draws K]
                              [--modes plain,prefect]

``--paper-subsets`` samples as the paper's federated setting (4n subsets of 10: 2,000 for
500 tasks, most pairs never together, ``min_pair_coverage: 0``), for the stretch run at
n = 500.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# the generator and the settings under which the planted grouping is visible through the
# tiny random model (BENCHMARKS.md, "Many datasets": what was tried): the "code" rule (a
# cluster's answer is its Walsh code's bit of the sentence's key word), the key word alone
# (filler words drown it in the random model's features), 64 train examples a task, gradient
# features of d = 128, the surrogate allowed 10 × ‖θ*‖, and subsets of 4 covering every pair
# three times on average (every pair at least once), in task runs of at least ceil(k / n)
# subsets (stage 2's task runs ≤ n)
SIZES = {"train": 64, "validation": 12, "test": 12}
SUBSET_SIZE, COVERAGE = 4, 3


def config(n: int, root: Path, steps: int, paper: bool = False,
           stability: int | None = None) -> tuple[dict, list[int]]:
    import yaml

    from ensemble_core.synthetic import write_tasks

    clusters_n = max(2, n // 10)
    tasks, clusters = write_tasks(root / "data", n, clusters_n, rule="code", length=0,
                                  sizes=SIZES)
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    size = min(SUBSET_SIZE, n)
    cfg.update(name=f"scale-{n}", data_root=str(root / "data"), output_dir=str(root / "run"),
               tasks=tasks)
    k = COVERAGE * math.ceil(math.comb(n, 2) / math.comb(size, 2))
    cfg["estimation"].update(n_subsets=k, subset_size=size,
                             projection_dim=128, max_adapter_distance=10.0,
                             subsets_per_task_run=max(10, math.ceil(k / n)))
    if paper:  # the paper's federated sampling: 2,000 subsets of 10 for 500 tasks (4n)
        k = 4 * n
        cfg["estimation"].update(n_subsets=k, subset_size=min(10, n), min_pair_coverage=0,
                                 subsets_per_task_run=max(10, math.ceil(k / n)))
    if stability is not None:
        cfg["clustering"]["stability_draws"] = stability
    cfg["clustering"]["n_groups"] = clusters_n
    cfg["boosting"]["steps"] = steps
    cache = os.environ.get("ENSEMBLE_LORA_CACHE")
    if cache:
        cfg["cache_dir"] = cache
    return cfg, clusters


def _flow_runs(client, root_id):
    """The flow run and all its subflow runs (recursively)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    runs, frontier = [client.read_flow_run(root_id)], [root_id]
    while frontier:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)),
            sort=FlowRunSort.START_TIME_ASC, limit=200)
        frontier = [c.id for c in children]
        runs += children
    return runs


def _task_runs(client, flow_ids) -> list:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.sorting import TaskRunSort

    out, offset = [], 0
    while True:
        page = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=flow_ids)),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=offset)
        out += page
        if len(page) < 200:
            return out
        offset += 200


def child(mode: str, cfg_file: Path, result_file: Path) -> None:
    cfg = json.loads(cfg_file.read_text())
    t0 = time.perf_counter()
    res: dict = {}
    if mode == "plain":
        from ensemble_core.algorithm2 import pipeline
        from ensemble_core.config import parse_config
        from ensemble_core.run import Run

        t0 = time.perf_counter()
        pipeline(Run.open(parse_config(cfg)))
    else:
        from prefect.client.orchestration import get_client
        from prefect.events.worker import EventsWorker
        from prefect.testing.utilities import prefect_test_harness

        from flows.pipeline import ensemble_lora

        with prefect_test_harness(server_startup_timeout=120):
            t0 = time.perf_counter()
            state = ensemble_lora(cfg, return_state=True)
            wall = time.perf_counter() - t0
            if not state.is_completed():
                raise SystemExit(f"the flow ended {state}")
            EventsWorker.drain_all(timeout=120, at_exit=False)
            time.sleep(2)
            with get_client(sync_client=True) as client:
                flows = _flow_runs(client, state.state_details.flow_run_id)
                wrappers = {f.parent_task_run_id for f in flows}
                runs = [t for t in _task_runs(client, [f.id for f in flows])
                        if t.id not in wrappers]
                res["stages"] = {_flow_name(client, f):
                                 f.total_run_time.total_seconds() for f in flows[1:]}
                root = flows[0]
                root_s = (root.end_time - root.start_time).total_seconds()
                busy = _union([(t.start_time, t.end_time) for t in runs
                               if t.start_time and t.end_time])
            res["task_runs"] = len(runs)
            res["wall"] = wall
            # the share of the flow's wall time in which no task run was running: flows and
            # subflows starting, task runs created, scheduled and their results stored
            res["overhead"] = max(0.0, 1 - busy / root_s)
            res["flow_s"] = root_s
    res.setdefault("wall", time.perf_counter() - t0)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    groups = json.loads((Path(cfg["output_dir"]) / "groups.json").read_text())["groups"]
    res["groups"] = [g["tasks"] for g in groups]
    result_file.write_text(json.dumps(res))


def _union(intervals) -> float:
    """Seconds covered by at least one of the (start, end) intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += (b - a).total_seconds()
            end = b
        elif b > end:
            total += (b - end).total_seconds()
            end = b
    return total


def _flow_name(client, flow_run) -> str:
    return client.read_flow(flow_run.flow_id).name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="10,50,200")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ensemble-lora-scale"))
    ap.add_argument("--boosting-steps", type=int, default=1)
    ap.add_argument("--paper-subsets", action="store_true",
                    help="the paper's federated sampling: 4n subsets of 10, pairs not covered")
    ap.add_argument("--stability-draws", type=int, default=None,
                    help="clustering.stability_draws (default: the config's, 20)")
    ap.add_argument("--modes", default="plain,prefect")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CONFIG", "RESULT"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], Path(a.child[1]), Path(a.child[2]))
        return 0
    from ensemble_core.synthetic import adjusted_rand

    lines = []
    for n in [int(x) for x in a.n.split(",")]:
        root = Path(a.out) / f"n{n}"
        res = {}
        for mode in a.modes.split(","):
            d = root / mode
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            cfg, clusters = config(n, d, a.boosting_steps, a.paper_subsets, a.stability_draws)
            (d / "config.json").write_text(json.dumps(cfg))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", mode,
                                   str(d / "config.json"), str(d / "result.json")],
                                  cwd=REPO, stdout=open(d / "log.txt", "w"),
                                  stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                print(f"scale n={n}: the {mode} run failed; see {d / 'log.txt'}", flush=True)
                return 1
            res[mode] = json.loads((d / "result.json").read_text())
            res[mode]["process_s"] = time.perf_counter() - t0
            found = {t: k for k, g in enumerate(res[mode]["groups"]) for t in g}
            res[mode]["ari"] = adjusted_rand(clusters,
                                             [found[t["name"]] for t in cfg["tasks"]])
        p, q = res["prefect"], res.get("plain")
        overhead = p["overhead"]
        m = cfg["clustering"]["n_groups"]
        plain = (f"plain {q['wall']:.1f} s (peak RSS {q['peak_rss_gib']:.2f} GiB, ARI "
                 f"{q['ari']:.2f}); " if q else "")
        print(f"n={n}, m={m}, subsets {cfg['estimation']['n_subsets']} of "
              f"{cfg['estimation']['subset_size']}: {plain}Prefect "
              f"{p['wall']:.1f} s (peak RSS {p['peak_rss_gib']:.2f} GiB); task runs "
              f"{p['task_runs']} (3(n + m) = {3 * (n + m)})", flush=True)
        for name, sec in p.get("stages", {}).items():
            print(f"  stage group {name:<22} {sec:8.1f} s", flush=True)
        (root / "result.json").write_text(json.dumps(res, indent=1))
        line = (f"scale n={n}: wall {p['wall']:.1f} s, overhead {100 * overhead:.1f}%, "
                f"task runs {p['task_runs']}, ARI {p['ari']:.2f}")
        lines.append(line)
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
