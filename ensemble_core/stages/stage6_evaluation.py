"""Stage 6: evaluation — test accuracy of the ensemble, its groups and the single adapter
(metrics.json), the baselines (baselines.json), the report and manifest, and the published
version."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..records import (AdaptersResult, Averages, BaselinePlan, BaselineResult, BaselinesRecord,
                       BoostRecord, Compute, EnsembleRecord, EvaluationRecord, FeaturesRecord,
                       FileRef, GroupsRecord, LinearityRecord, Metrics, ReportRecord,
                       ScoresRecord, TaskMetrics, VersionRecord)
from ..run import Run
from ..rundir import GRADIENT_SPLITS
from ..runtime import code_version
from .declaration import stage
from .stage5_boosting import _members, read_scores

__all__ = ["evaluate", "evaluate_baselines", "finish", "publish_version"]


@stage(6, "evaluation", config=("seed",),
       reads=lambda ensemble, scores, baseline, compute: [t for g in ensemble.groups
                                                           for t in g.tasks],
       key_args=lambda ensemble, scores, baseline, compute: {
           "ensemble": ensemble, "scores": _members(ensemble.groups, scores, baseline),
           "baseline": baseline, "compute": compute}, returns=EvaluationRecord)
def evaluate(run: Run, ensemble: EnsembleRecord, scores: dict[str, ScoresRecord],
             baseline: str, compute: Compute) -> EvaluationRecord:
    """Test accuracy of the ensemble, of each task's own group ensemble (with its boosting
    members), of its group adapter alone and of the single-adapter baseline; metrics.json."""
    from ..comparison import paired_bootstrap
    from ..boosting import group_scores
    from ..choices import flatten
    from ..ensemble import combine_probabilities, probabilities

    member = read_scores(scores, run.dir)
    groups = ensemble.groups
    group_of = {t: k for k, g in enumerate(groups) for t in g.tasks}
    per_task, predictions = {}, {}
    for t in run.task_names:
        test = run.task_data(t).splits["test"]
        gold = [e.label for e in test]
        w = ensemble.weights[t]
        used = [k for k in range(len(groups)) if w[k] > 0]  # test_plans scored these
        probs = {k: probabilities(group_scores(member, groups[k], t, "test"))
                 for k in sorted({*used, group_of[t]})}
        combined = combine_probabilities([probs[k] for k in used], [w[k] for k in used])
        own = groups[group_of[t]]
        # the group's adapter alone, without its boosting members: what the grouping
        # baselines are (like for like)
        chosen = {"single": probabilities(member[baseline][t]["test"]),
                  "group": probs[group_of[t]], "ensemble": combined,
                  "group_adapter": probabilities(member[own.members[0].name][t]["test"])}
        predictions[t] = {"gold": gold}
        acc = {}
        for method, p in chosen.items():
            z, layout = flatten(p, gold)
            predictions[t][method] = layout.argmax(z).tolist()
            acc[method] = float(np.mean(layout.correct(z)))
        counts = np.bincount(gold)
        per_task[t] = TaskMetrics(len(test), group_of[t], list(w), acc["single"], acc["group"],
                                  acc["ensemble"], float(counts.max() / counts.sum()),
                                  acc["group_adapter"])
    correct = {m: [{t: (np.asarray(predictions[t][m]) == np.asarray(predictions[t]["gold"]))
                    .astype(np.float64) for t in per_task}] for m in ("ensemble", "single")}
    d, lo, hi = paired_bootstrap(correct["ensemble"], correct["single"], seed=run.cfg.seed)
    avg = Averages(**{k: float(np.mean([getattr(v, k) for v in per_task.values()]))
                      for k in ("baseline_accuracy", "group_accuracy", "ensemble_accuracy",
                                "majority", "group_adapter_accuracy")}, difference=d,
                   difference_low=lo, difference_high=hi)
    metrics = Metrics(per_task, avg, compute, len(groups), [list(g.tasks) for g in groups])
    ref = run.dir.write_json(run.dir.metrics, metrics.to_json())
    preds = run.dir.write_json(run.dir.predictions, predictions)
    return EvaluationRecord(ref, metrics, preds)


@stage(6, "baselines", config=(), reads=lambda plan, adapters, scores: [
    t for members in plan.plans.values() for ts in members.values() for t in ts],
    returns=BaselinesRecord)
def evaluate_baselines(run: Run, plan: BaselinePlan, adapters: AdaptersResult,
                       scores: dict[str, ScoresRecord]) -> BaselinesRecord:
    """Test accuracy and compute of each baseline of ``plan`` (``plan_baselines``) and of the
    single adapter; baselines.json (with each method's test predictions)."""
    from ..baselines import SINGLE
    from ..choices import flatten
    from ..ensemble import probabilities

    member = read_scores(scores, run.dir)
    methods = {SINGLE: {adapters.single.name: list(run.task_names)}, **plan.plans}
    results, predictions = {}, {}
    for method, members in methods.items():
        answers = {t: name for name, ts in members.items() for t in ts}
        accuracy, predictions[method] = {}, {}
        for t, name in answers.items():
            gold = [e.label for e in run.task_data(t).splits["test"]]
            z, layout = flatten(probabilities(member[name][t]["test"]), gold)
            accuracy[t] = float(np.mean(layout.correct(z)))
            predictions[method][t] = layout.argmax(z).tolist()
        deployed = [adapters.all()[n].train for n in members]  # the adapters that answer
        # + the single adapter's training, for methods that start from it (MTL-FT's phase 1)
        spent = deployed + ([adapters.single.train] if method in plan.after_single else [])
        results[method] = BaselineResult(
            method, answers, accuracy, float(np.mean(list(accuracy.values()))),
            flops=float(sum(r.flops_estimate for r in spent)),
            wall_s=float(sum(r.wall_seconds for r in spent)),
            peak_memory_bytes=max(r.peak_memory_bytes for r in spent),
            adapter_parameters=int(sum(r.trainable_parameters for r in deployed)))
    ref = run.dir.write_json(run.dir.baselines, {
        "results": {k: v.to_json() for k, v in results.items()}, "predictions": predictions})
    return BaselinesRecord(ref, results)


def _finish_key(features, groups, adapters, boosting, ensemble, evaluation, linearity, config,
                config_sha256, baselines=None) -> dict:
    """What the report and manifest depend on: the records, and the config less where things
    are (``run.LOCATION_FIELDS``: a run directory copied elsewhere is served its report from
    the cache; the manifest names the config the run was computed with)."""
    from ..run import LOCATION_FIELDS

    return {"records": [features, groups, adapters, boosting, ensemble, evaluation, linearity,
                        baselines],
            "config": {k: v for k, v in config.items() if k not in LOCATION_FIELDS}}


@stage(6, "finish", config=(), key_args=_finish_key, returns=ReportRecord)
def finish(run: Run, features: dict[str, FeaturesRecord], groups: GroupsRecord,
           adapters: AdaptersResult, boosting: Sequence[BoostRecord],
           ensemble: EnsembleRecord, evaluation: EvaluationRecord,
           linearity: LinearityRecord | None, config: dict, config_sha256: str,
           baselines: BaselinesRecord | None = None) -> ReportRecord:
    """The report (report.md, affinity.png) and the run's manifest.json: every output with
    its sha256, the resolved ``config`` (its JSON form and the full config's fingerprint) and
    the code version."""
    from ..affinity import Affinity
    from ..report import inline_heatmap, write_report

    affinity = Affinity.from_json(run.dir.read_text(run.dir.at(groups.affinity.path)))
    report = write_report(run.dir, run.cfg.name, evaluation.metrics, affinity,
                          run.dir.read_json(run.dir.at(groups.groups.path)), boosting, linearity,
                          None if baselines is None else baselines.results, adapters)
    files = {}
    for rec in features.values():
        for split in GRADIENT_SPLITS:
            f = rec.split(split)
            files[f.path] = f.sha256
    files[groups.affinity.path] = groups.affinity.sha256
    files[groups.groups.path] = groups.groups.sha256
    for a in [*adapters.all().values(), *(b.adapter for b in boosting)]:
        files[run.dir.relative(run.dir.adapter_weights(a.name))] = a.sha256
    for ref in [ensemble.file, evaluation.file, evaluation.predictions,
                *([baselines.file] if baselines is not None else [])]:
        files[ref.path] = ref.sha256
    files[report.file.path] = report.file.sha256
    # the manifest vouches for the files as they are: a file changed since its record was
    # made (another run writing this directory) is an error, not a wrong manifest
    changed = [rel for rel, sha in files.items()
               if not FileRef(rel, sha).verified(run.dir.url)]
    if changed:
        raise RuntimeError(
            f"{len(changed)} output(s) of run directory {run.dir.url} changed while this run "
            f"finished ({', '.join(changed[:3])}{' …' if len(changed) > 3 else ''}); another "
            "run wrote this directory: run again (the changed stages are recomputed)")
    manifest = run.dir.write_json(run.dir.manifest, {
        "name": run.cfg.name, "config_sha256": config_sha256, "config": config,
        "code_version": code_version(), "files": files})
    return ReportRecord(report.file, report.heatmap, manifest, inline_heatmap(report, run.dir))


@stage(6, "publish", config=("evaluation.promote_tolerance",),
       key_args=lambda ensemble, config: {"ensemble": ensemble.file}, returns=VersionRecord)
def publish_version(run: Run, ensemble: EnsembleRecord, config: dict) -> VersionRecord:
    """The run's ensemble published as an immutable version (``versions.publish``), current
    unless worse on validation than the current one by more than
    ``evaluation.promote_tolerance``; an ensemble already published is not published again."""
    from .. import versions

    info = versions.publish(run.dir.url, config, tolerance=run.cfg.evaluation.promote_tolerance)
    return VersionRecord(info["version"], bool(info["promoted"]), info["promotion"],
                         versions.ensemble_ref(run.dir.url, info["version"]))
