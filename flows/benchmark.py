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
from .affinity import run_affinity
from .pipeline import ensemble_lora

NAMES = {"group_adapter": "our groups, own group's adapter (no boosting: like the grouping "
                          "baselines)",
         "group": "our groups, own group's ensemble (with boosting)",
         "ensemble": "ensemble (groups, boosting, weights)"}
OURS = ("single", "group_adapter", "group", "ensemble")


@flow(name="benchmark", log_prints=True)
def benchmark_flow(config, overrides: list[str] | None = None,
                   seeds: list[int] | None = None, projection_draws: int = 2) -> dict:
    """The pipeline for each seed (``seed`` and ``training.seed``), then the benchmark table;
    and how stable the groups are: between the seeds, and between ``projection_draws`` other
    draws of the projection P (stages 1–3 at the first seed with another
    ``estimation.projection_seed``, each in ``projection-<p>/``)."""
    cfg = resolve_config(config, overrides)
    log = get_run_logger()
    seeds = list(seeds or [0, 1, 2])
    parent = RunDir(cfg.run_dir)
    accuracies, single, ensemble, majority, compute = [], [], [], None, {}
    groupings: list = []
    for s in seeds:
        res = ensemble_lora(cfg, overrides=[f"seed={s}", f"training.seed={s}",
                                            f"output_dir={parent.seed_run(s)}"])
        run_dir = RunDir(res.run_dir)
        preds = read_json(run_dir.predictions)
        acc = {m: {t: float(v.mean()) for t, v in bench.correct(preds, m).items()}
               for m in OURS if m in next(iter(preds.values()))}
        groupings.append(res.groups)
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
    order = ["single", *[m for m in accuracies[0] if m not in OURS],
             *[m for m in OURS[1:] if m in accuracies[0]]]
    draws = []
    for p in range(1, projection_draws + 1):  # other draws of P, the first seed's settings
        res = run_affinity(cfg, overrides=[
            f"seed={seeds[0]}", f"training.seed={seeds[0]}", f"estimation.projection_seed={p}",
            f"output_dir={parent.url}/projection-{p}"])
        draws.append(res.groups.group_tasks)
    stability = {"between seeds": bench.pairwise_ari(groupings),
                 f"seed {seeds[0]} against other projection draws":
                     [bench.adjusted_rand_index(groupings[0], g) for g in draws]}
    summary = bench.summarize_seeds([{m: a[m] for m in order} for a in accuracies])
    ci = bench.paired_bootstrap(ensemble, single, seed=cfg.seed)
    cost = {m: {"flops": sum(r.flops for r in rs) / len(rs),
                "wall_s": sum(r.wall_s for r in rs) / len(rs),
                "peak_memory_bytes": max(r.peak_memory_bytes for r in rs),
                "adapter_parameters": rs[0].adapter_parameters} for m, rs in compute.items()}
    names = {m: NAMES.get(m) or baseline_label(m) for m in order}
    text = bench.benchmark_markdown(summary, majority, names, ci, seeds, cost or None,
                                    stability)
    md = parent.write_bytes(parent.benchmark_md, text.encode())
    png = parent.write_bytes(parent.benchmark_png, bench.benchmark_png(summary, majority, names))
    out = {"seeds": seeds, "methods": order, "summary": summary, "majority": majority,
           "ensemble_minus_single": {"difference": ci[0], "low": ci[1], "high": ci[2]},
           "compute": cost, "runs": [parent.seed_run(s) for s in seeds],
           "groups": groupings, "projection_draws": draws, "stability": stability,
           "markdown": md.path, "chart": png.path}  # relative to the parent directory
    parent.write_json(parent.benchmark_json, out)
    try:
        create_markdown_artifact(text, key=artifact_key(cfg.name, "benchmark"),
                                 description="EnsembleLoRA benchmark over seeds")
    except Exception as e:  # artifacts are a convenience
        log.warning("could not create the benchmark artifact: %s", e)
    return out
