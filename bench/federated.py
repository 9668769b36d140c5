"""Stages 2–3 at the paper's federated scale (issue 32, item 3): n = 500 tasks, k = 2,000
subsets of size 10, m = 10, 20, 30 groups — on synthetic stage-1 features, no model.

The paper's federated setting (§4: one task per speaking role of a play, Llama-3-1B with
QLoRA) samples 2,000 subsets of 10 out of 500 tasks: at most 90,000 of the 124,750 task pairs
share a subset, so the run sets ``estimation.min_pair_coverage: 0`` and the affinity treats an
uncovered pair as neutral (T_ij = T_ii, ``affinity.task_affinity``).

Features: each task has ``--train`` train and ``--val`` validation examples of two choices;
choice 1's unit projection u ~ N(0, I_D) (choice 0 is the reference, its g̃ = 0), and the gold
choice is 1 when u·w_c + noise > 0, w_c the planted cluster's random direction (C = m_true
clusters, default 20): the tasks of a cluster share the labelling, different clusters' are
unrelated. The files are written as stage 1 writes them (Parquet, ``features.write_features``)
with their FeaturesRecords, then the real stage functions run on a run directory:
``save_subset_plan``, ``fit_subsets`` over the plan's batches (in ``--workers`` processes, as
the flow runs them concurrently), and ``affinity_and_groups`` for each m (SDP, Appendix A.1).

It prints the time of each stage, the peak RSS, the groups' adjusted Rand index against the
planted clusters, and a last line

  federated n=<n> k=<k> s=<s>: stage 2 <s> s, stage 3 <s> s (m=10), <s> s (m=20), <s> s (m=30)

Usage:  python bench/federated.py [--n 500] [--k 2000] [--size 10] [--m 10,20,30]
                                  [--clusters 20] [--workers 2] [--stability-draws 0]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _config(root: Path, a, tasks) -> dict:
    return {"name": "federated", "data_root": str(root / "data"),
            "output_dir": str(root / "run"), "model": {"name": "tiny-llama"}, "tasks": tasks,
            "estimation": {"projection_dim": a.d, "n_subsets": a.k, "subset_size": a.size,
                           "min_pair_coverage": 0, "max_adapter_distance": None,
                           "subsets_per_task_run": a.per_run},
            "clustering": {"n_groups": 2, "stability_draws": a.stability_draws}}


def _features(run, a, clusters) -> dict:
    """Synthetic stage-1 features of every task (see the module docstring), written as stage
    1 writes them; returns their FeaturesRecords."""
    from ensemble_core.features import FeatureTable, write_features
    from ensemble_core.records import FeaturesRecord, FileRef, ProjectionInfo, SplitFeatures

    rng = np.random.default_rng(a.seed)
    planted = rng.normal(size=(max(clusters) + 1, a.d))
    info = ProjectionInfo(p=100_000, d=a.d, seed=0, block_rows=32768, theta_norm=1.0,
                          full_norm=100.0)
    out = {}
    for t, c in zip(run.task_names, clusters):
        files = {}
        for split, count in (("train", a.train), ("validation", a.val)):
            u = rng.normal(size=(count, a.d)).astype(np.float32)
            gold = (u @ planted[c] / math.sqrt(a.d) + 0.3 * rng.normal(size=count)) > 0
            unit = np.zeros((2 * count, a.d), np.float32)
            unit[1::2] = u
            table = FeatureTable.from_unit(
                t, split, np.repeat([f"{t}-{i}" for i in range(count)], 2).astype(object),
                np.tile([0, 1], count).astype(np.int32),
                np.stack([~gold, gold], 1).reshape(-1), np.zeros(2 * count, np.float32), unit)
            url = run.dir.features(t, split)
            files[split] = SplitFeatures(run.dir.relative(url), write_features(url, table),
                                         2 * count, count)
        man = run.dir.write_json(run.dir.features_manifest(t), {"task": t, "synthetic": True})
        out[t] = FeaturesRecord(t, man, files["train"], files["validation"], info, 0.0)
    return out


def _fit_batch(cfg: dict, features: dict, batch: int, subsets: list, tasks: list) -> dict:
    from ensemble_core import stages
    from ensemble_core.config import parse_config
    from ensemble_core.records import FeaturesRecord
    from ensemble_core.run import Run

    feats = {t: FeaturesRecord.from_json(r) for t, r in features.items()}
    return stages.fit_subsets(Run(parse_config(cfg)), feats, batch, subsets, tasks).to_json()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10)
    ap.add_argument("--m", default="10,20,30")
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument("--d", type=int, default=400)  # estimation.projection_dim's default
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-run", type=int, default=50)  # estimation.subsets_per_task_run
    ap.add_argument("--stability-draws", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ensemble-lora-federated"))
    a = ap.parse_args(argv)

    from ensemble_core import stages
    from ensemble_core.config import parse_config
    from ensemble_core.records import SubsetBatch
    from ensemble_core.run import Run
    from ensemble_core.synthetic import adjusted_rand, write_tasks

    root = Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    # the tasks' data files (tiny: stage 2–3 read only the features)
    tasks, clusters = write_tasks(root / "data", a.n, a.clusters,
                                  sizes={"train": 2, "validation": 2, "test": 2})
    cfg = _config(root, a, tasks)
    run = Run.open(parse_config(cfg))
    t0 = time.perf_counter()
    features = _features(run, a, clusters)
    t_feat = time.perf_counter() - t0
    print(f"n={a.n}: synthetic features of {a.n} tasks ({a.train} train, {a.val} validation "
          f"examples, d={a.d}) written in {t_feat:.1f} s", flush=True)

    t0 = time.perf_counter()
    plan = stages.save_subset_plan(run, run.task_names)
    t_plan = time.perf_counter() - t0
    feats = {t: r.to_json() for t, r in features.items()}
    with ProcessPoolExecutor(a.workers) as pool:
        jobs = [pool.submit(_fit_batch, cfg, feats, i, [list(s) for s in b], run.task_names)
                for i, b in enumerate(plan.batches)]
        done = [SubsetBatch.from_json(j.result()) for j in jobs]
    t2 = time.perf_counter() - t0
    results = [r for b in done for r in b.results]
    pairs = np.zeros((a.n, a.n), bool)
    for r in results:
        pairs[np.ix_(r.subset, r.subset)] = True
    covered = (pairs.sum() - a.n) // 2
    print(f"stage 2: {len(results)} subsets of {a.size} in {len(plan.batches)} task runs, "
          f"{a.workers} processes: {t2:.1f} s (the plan {t_plan:.1f} s); pairs covered "
          f"{covered} of {math.comb(a.n, 2)}", flush=True)

    times = {}
    for m in [int(x) for x in a.m.split(",")]:
        c = json.loads(json.dumps(cfg))
        c["clustering"]["n_groups"] = m
        t0 = time.perf_counter()
        rec = stages.affinity_and_groups(Run(parse_config(c)), results, run.task_names)
        times[m] = time.perf_counter() - t0
        found = {t: g for g, members in enumerate(rec.group_tasks) for t in members}
        ari = adjusted_rand(clusters, [found[t] for t in run.task_names])
        print(f"stage 3, m={m}: {times[m]:.1f} s, ARI {ari:.2f} against the {a.clusters} "
              f"planted clusters", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB (this process)", flush=True)
    print(f"federated n={a.n} k={len(results)} s={a.size}: stage 2 {t2:.1f} s, stage 3 "
          + ", ".join(f"{s:.1f} s (m={m})" for m, s in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
