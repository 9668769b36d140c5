"""The paper's ablations and this project's variants on one config, over seeds (issue 33):

    python bench/ablations.py configs/demo.yaml --seeds 0,1,2 --out runs/ablations \\
        --study weights --study boosting --study m --study b

Each (study, setting, seed) is one `ensemble-lora run` of the config with the setting's
`--set` overrides, `seed` and `training.seed`, into one run directory per seed
(`<out>/seed-<s>`), so every setting reuses what the others computed (stage 1 once per seed;
the weights variants recompute only the weights and the test scoring they need). After each
run its metrics.json, groups.json and ensemble.json are copied to `<out>/results/`, and the
tables are printed at the end (and written to `<out>/ablations.md`, `<out>/ablations.json`):
per setting, the average test accuracy of the ensemble, of one adapter on all tasks, of each
task's own group (with its boosting members, and without), the majority class, the ensemble's
worst shortfall against its own group on any task, and the mean over seeds with a 95% interval
(t, over seeds).

Studies (settings are `--set` overrides):
  weights   the ensemble weights: per task without a guard (the former default), per task with
            the cross-fitted guard, one weight per group (the paper's Algorithm 2)
  boosting  first-order (ours) and the paper's target (boosting.mode: paper)
  m         the number of groups, 2..6 (the paper's ablation; clustering.n_groups)
  b         boosting steps, 1..4 (the paper's ablation)
  precision the base model's forward passes in float32 and in bfloat16 (model.dtype; issue
            34: its effect on the groups, weights and test accuracy before anyone uses it)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

STUDIES = {
    "weights": {"per-task, no guard": ["weights.form=per-task", "weights.guard=none"],
                "per-task, cross-fit guard": ["weights.form=per-task",
                                              "weights.guard=cross-fit"],
                "one weight per group (the paper's)": ["weights.form=per-group"]},
    "boosting": {"first-order (ours)": ["boosting.mode=first-order"],
                 "the paper's target": ["boosting.mode=paper"]},
    "m": {f"m = {m}": [f"clustering.n_groups={m}"] for m in range(2, 7)},
    "b": {f"b = {b}": [f"boosting.steps={b}"] for b in range(1, 5)},
    "precision": {"float32": ["model.dtype=float32"], "bfloat16": ["model.dtype=bfloat16"]},
}


def run_one(config: str, out: Path, seed: int, overrides: list[str], extra: list[str],
            log: Path) -> float:
    args = [sys.executable, "-m", "flows.cli", "run", config, "--set", f"seed={seed}",
            "--set", f"training.seed={seed}", "--set", f"output_dir={out}"]
    for o in [*extra, *overrides]:
        args += ["--set", o]
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(args)}\n".encode())
        f.flush()
        code = subprocess.call(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"run failed (exit {code}): {' '.join(args)}; see {log}")
    return time.perf_counter() - t0


def summarize(metrics_file: Path, groups_file: Path, ensemble_file: Path) -> dict:
    metrics = json.loads(metrics_file.read_text())
    groups = json.loads(groups_file.read_text())
    ens = json.loads(ensemble_file.read_text())
    tasks = metrics["tasks"]
    short = {t: m["ensemble_accuracy"] - m["group_accuracy"] for t, m in tasks.items()}
    # issue 33's goal: no task more than 2 points below its own group's adapter (no boosting)
    below = {t: m["ensemble_accuracy"] - m["group_adapter_accuracy"] for t, m in tasks.items()
             if m.get("group_adapter_accuracy") is not None}
    a = metrics["average"]
    return {"ensemble": a["ensemble_accuracy"], "single": a["baseline_accuracy"],
            "group": a["group_accuracy"], "group_adapter": a.get("group_adapter_accuracy"),
            "majority": a["majority"], "difference": a["difference"],
            "ci": [a["difference_low"], a["difference_high"]],
            "worst_shortfall": min(short.values()), "worst_task": min(short, key=short.get),
            "worst_vs_adapter": min(below.values()) if below else None,
            "worst_vs_adapter_task": min(below, key=below.get) if below else None,
            "groups": [g["tasks"] for g in groups["groups"]],
            "stability": groups.get("stability"), "compute": metrics["compute"],
            "weights": {t: v["weights"] for t, v in ens["tasks"].items()},
            "per_task": {t: {k: m.get(k) for k in ("ensemble_accuracy", "group_accuracy",
                                                   "group_adapter_accuracy",
                                                   "baseline_accuracy", "majority")}
                         for t, m in tasks.items()}}


def _tag(study: str, setting: str, seed) -> str:
    return f"{study}-{setting}-seed{seed}".replace(" ", "_").replace("/", "_")


def resummarize(out: Path, results: dict) -> None:
    """Recompute every stored summary from the copies in ``<out>/results`` (so tables gain
    columns added after a run), keeping each run's measured seconds."""
    for study, settings in results.items():
        for setting, by_seed in settings.items():
            for seed, res in by_seed.items():
                files = [out / "results" / f"{_tag(study, setting, seed)}-{f}"
                         for f in ("metrics.json", "groups.json", "ensemble.json")]
                if all(f.exists() for f in files):
                    by_seed[seed] = dict(summarize(*files), seconds=res.get("seconds"))


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of a 95% t interval over seeds."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1)
                                  / np.sqrt(len(v)))


def table(results: dict, study: str) -> str:
    """One row per setting: means over seeds with a 95% t half-width; the paired differences
    (per seed, then over seeds) against one adapter and against each task's own group adapter
    (no boosting); the worst task over all seeds against its own group adapter."""
    rows = [("| setting | seeds | ensemble | one adapter | own group (boosted) | own group "
             "adapter | majority | ensemble − one adapter | ensemble − own group adapter | "
             "worst task: ensemble − own group adapter |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    order = [k for k in STUDIES.get(study, {}) if k in results[study]]
    order += [k for k in results[study] if k not in order]

    def cell(values, signed=False):
        m, h = mean_ci(values)
        text = f"{100 * m:+.1f}" if signed else f"{100 * m:.1f}"
        return f"{text} ± {100 * h:.1f}" if not np.isnan(h) else text

    for setting in order:
        by_seed = results[study][setting]
        runs = list(by_seed.values())
        cells = [str(len(runs))]
        cells += [cell([r[k] for r in runs])
                  for k in ("ensemble", "single", "group", "group_adapter", "majority")]
        cells.append(cell([r["difference"] for r in runs], signed=True))
        cells.append(cell([r["ensemble"] - r["group_adapter"] for r in runs
                           if r.get("group_adapter") is not None], signed=True))
        worst = [r for r in runs if r.get("worst_vs_adapter") is not None]
        if worst:
            w = min(worst, key=lambda r: r["worst_vs_adapter"])
            cells.append(f"{100 * w['worst_vs_adapter']:+.1f} ({w['worst_vs_adapter_task']})")
        else:
            cells.append("—")
        rows.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    p.add_argument("--study", action="append", choices=sorted(STUDIES), required=True)
    p.add_argument("--set", action="append", default=[], help="overrides for every run")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the tables of the results stored in --out")
    args = p.parse_args()
    out = Path(args.out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    store = out / "ablations.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    seeds = [] if args.report else [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # seed by seed: the cache of one run directory serves its settings
        run = out / f"seed-{seed}"
        for study in args.study:
            for setting, overrides in STUDIES[study].items():
                if str(seed) in results.get(study, {}).get(setting, {}):
                    continue
                secs = run_one(args.config, run, seed, overrides, args.set, out / "runs.log")
                res = dict(summarize(run / "metrics.json", run / "groups.json",
                                     run / "ensemble.json"), seconds=secs)
                tag = _tag(study, setting, seed)
                for f in ("metrics.json", "groups.json", "ensemble.json"):
                    shutil.copy(run / f, out / "results" / f"{tag}-{f}")
                results.setdefault(study, {}).setdefault(setting, {})[str(seed)] = res
                store.write_text(json.dumps(results, indent=1))
                print(f"{study} / {setting} / seed {seed}: ensemble "
                      f"{100 * res['ensemble']:.1f}, one adapter {100 * res['single']:.1f}, "
                      f"own group {100 * res['group']:.1f} ({secs:.0f} s)", flush=True)
    resummarize(out, results)
    text = "\n\n".join(f"### {study}\n\n{table(results, study)}" for study in args.study)
    (out / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
