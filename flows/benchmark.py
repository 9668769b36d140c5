"""The benchmark as a flow: the whole pipeline (with the configured baselines) once per seed,
each seed in its own run directory below the config's (reusing whatever each has cached), then
mean ± std over seeds and the paired difference ensemble − single adapter with its bootstrap CI
(ensemble_core/comparison.py): benchmark.md, benchmark.png, benchmark.json, and Prefect
artifacts."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ensemble_core import comparison as bench
from ensemble_core.baselines import baseline_label
from ensemble_core.rundir import RunDir
from ensemble_core.storage import read_json

from .common import artifact_key, resolve_config
from .pipeline import ensemble_lora

NAMES = {"group": "our groups, own group's adapter",
         "ensemble": "ensemble (groups, boosting, weights)"}


@flow(name="benchmark", log_prints=True)
def benchmark_flow(config, overrides: list[str] | None = None,
                   seeds: list[int] | None = None) -> dict:
    """The pipeline for each seed (``seed`` and ``training.seed``), then the benchmark table."""
    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    seeds = list(seeds or [0, 1, 2])
    parent = RunDir(cfg.run_dir)
    accuracies, single, ensemble, majority, compute = [], [], [], None, {}
    for s in seeds:
        res = ensemble_lora(cfg, overrides=[f"seed={s}", f"training.seed={s}",
                                            f"output_dir={parent.seed_run(s)}"])
        run_dir = RunDir(res.run_dir)
        preds = read_json(run_dir.predictions)
        acc = {m: {t: float(v.mean()) for t, v in bench.correct(preds, m).items()}
               for m in ("single", "group", "ensemble")}
        for method, r in res.baselines.items():
            if method != "single":
                acc[method] = dict(r.accuracy)
            compute.setdefault(method, []).append(r)
        accuracies.append(acc)
        single.append(bench.correct(preds, "single"))
        ensemble.append(bench.correct(preds, "ensemble"))
        majority = bench.majority_rates(preds)
        log.info("seed %d: average test accuracy single %.1f%%, ensemble %.1f%%", s,
                 100 * res.metrics.average.baseline_accuracy,
                 100 * res.metrics.average.ensemble_accuracy)
    order = ["single", *[m for m in accuracies[0] if m not in ("single", "group", "ensemble")],
             "group", "ensemble"]
    summary = bench.summarize_seeds([{m: a[m] for m in order} for a in accuracies])
    ci = bench.paired_bootstrap(ensemble, single, seed=cfg.seed)
    cost = {m: {"flops": sum(r.flops for r in rs) / len(rs),
                "wall_s": sum(r.wall_s for r in rs) / len(rs),
                "peak_memory_bytes": max(r.peak_memory_bytes for r in rs),
                "adapter_parameters": rs[0].adapter_parameters} for m, rs in compute.items()}
    names = {m: NAMES.get(m) or baseline_label(m) for m in order}
    text = bench.benchmark_markdown(summary, majority, names, ci, seeds, cost or None)
    md = parent.write_bytes(parent.benchmark_md, text.encode())
    png = parent.write_bytes(parent.benchmark_png, bench.benchmark_png(summary, majority, names))
    out = {"seeds": seeds, "methods": order, "summary": summary, "majority": majority,
           "ensemble_minus_single": {"difference": ci[0], "low": ci[1], "high": ci[2]},
           "compute": cost, "runs": [parent.seed_run(s) for s in seeds],
           "markdown": md.path, "chart": png.path}
    parent.write_json(parent.benchmark_json, out)
    try:
        create_markdown_artifact(text, key=artifact_key(cfg.name, "benchmark"),
                                 description="EnsembleLoRA benchmark over seeds")
    except Exception as e:  # artifacts are a convenience
        log.warning("could not create the benchmark artifact: %s", e)
    return out
