"""Stage 5: boosting and weights — the members' scores, one boosting step of a group
(Algorithm 2; Appendix A.2; the step itself is the configured boosting mode's), boosting.json,
and the ensemble weights (ensemble.json). The loop that chooses a group, boosts and accepts is
``algorithm2``."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..records import (AdapterRecord, BoostRecord, EnsembleRecord, FeaturesRecord, FileRef,
                       GroupEnsemble, GroupLosses, ScoresRecord, TaskScores)
from ..run import Run
from ..rundir import THETA_STAR
from ..runtime import cache_path, feature_table, on_device
from ..storage import join
from .declaration import MODEL, stage
from .planning import scores_key, scores_of
from .stage1_features import estimation_examples, scored_examples
from .stage4_adapters import adapter_record

__all__ = ["score_members", "read_scores", "group_losses", "boost_group", "record_boosting",
           "fit_weights"]


def _scores_key(adapters, plan, phase="fit"):
    """What a scoring run's result depends on, per member: its adapter record and, per task,
    the splits it is scored on (the declared config and the tasks' data join it)."""
    return {"adapters": sorted((a for a in adapters), key=lambda a: a.name),
            "plan": {t: {m: list(s) for m, s in sorted(by_member.items())}
                     for t, by_member in plan.items()}, "phase": phase}


@stage(5, "scores", config=("model", "estimation.batch_size", "seed", "estimation.max_examples"),
       uses=("estimation.one_pass",),
       reads=lambda adapters, plan, phase="fit": list(plan), key_args=_scores_key,
       returns=TaskScores)
@on_device(release=False)
def score_members(run: Run, adapters: Sequence[AdapterRecord], plan: dict,
                  phase: str = "fit") -> TaskScores:
    """Scores h_c(s) of member adapters on tasks: ``plan`` is task -> member -> splits, each
    member's scores of one task in scores/<member>/<task>.json (<task>.test.json for the test
    phase), ``{"scores": {task: {split: [[h_c of example 0], ...]}}}``. "train" means the
    examples stage 1 computed features of (``estimation_examples``), which is what boosting
    reads. Which member is scored where: :func:`score_plans`, :func:`test_plans`,
    :func:`by_task`.

    The members of one task are scored together: each batch is encoded once and, with
    ``estimation.one_pass`` (``auto``: on a GPU), goes through the base once for all of them
    (``members.score_members``; each member's batches are those of scoring it alone, so its
    scores do not depend on which members it was scored with); otherwise one pass per member.
    A member's scores of a task already in the run directory under the same key (this
    stage's inputs for that member and task alone: config, data, adapter, splits) are read,
    not computed again, so adding a task or changing one member rescores only what changed."""
    from ..members import score_members as one_pass, score_members_apart
    from ..runtime import members_model
    from ..scoring import ChoiceScorer

    cfg = run.cfg
    by_name = {a.name: a for a in adapters}
    model, tok, names = members_model(cfg, [(run.dir.fetch(a.path, a.pins), a.name, a.sha256)
                                            for a in adapters])
    scorer = ChoiceScorer(tok, cfg.model.max_length, cfg.model.choice_mode)
    together = _one_pass(cfg.estimation.one_pass, model)
    per_base = _base_parameters(model)
    records: dict[str, ScoresRecord] = {}
    for task, by_member in plan.items():
        todo = {}
        for m, splits in by_member.items():
            key = _member_key(run, by_name[m], task, splits, phase)
            rec = _stored_scores(run, m, task, phase, key)
            if rec is None:
                todo[m] = (list(splits), key)
            else:
                records[scores_key(m, task, phase)] = rec
        if not todo:
            continue
        t0 = time.perf_counter()
        out: dict = {m: {} for m in todo}
        tokens = {m: 0 for m in todo}
        for split in dict.fromkeys(sp for splits, _ in todo.values() for sp in splits):
            members = [m for m, (splits, _) in todo.items() if split in splits]
            examples = scored_examples(run, task, split)
            counts: dict = {"tokens": 0}
            fn = one_pass if together else score_members_apart
            scores = fn(model, scorer, examples, [names[m] for m in members],
                        cfg.estimation.batch_size, counts, **({"alone": True} if together
                                                               else {}))
            for m in members:
                out[m][split] = [s.astype(float).tolist() for s in scores[names[m]]]
                tokens[m] += counts["tokens"] // len(members)
        seconds = (time.perf_counter() - t0) / len(todo)
        for m, (splits, key) in todo.items():
            flops = 2.0 * per_base * tokens[m]
            url = run.dir.scores(m, phase, task)
            # what it cost, beside the scores (their file stays the same bytes however long
            # the pass took): a run that reads the scores back reports the original work
            run.dir.write_json(url + ".cost", {"key": key, "seconds": seconds, "flops": flops})
            ref = run.dir.write_json(url, {"adapter": m, "adapter_sha256": by_name[m].sha256,
                                           "phase": phase, "task": task, "key": key,
                                           "scores": {task: {sp: out[m][sp] for sp in splits}}})
            records[scores_key(m, task, phase)] = ScoresRecord(m, ref, seconds, phase, task,
                                                               flops=flops)
    return TaskScores(records)


def _one_pass(setting: str, model) -> bool:
    """``estimation.one_pass``: ``auto`` scores the members of a batch in one pass on a GPU,
    where a pass over a small batch leaves the device idle; on a CPU the stacked forward does
    the same FLOPs no faster (BENCHMARKS.md, "All members in one pass")."""
    from ..scoring import model_device

    if setting == "auto":
        return model_device(model).type != "cpu"
    return bool(setting)


def _member_key(run: Run, adapter: AdapterRecord, task: str, splits, phase: str) -> str:
    """This stage's inputs for one member on one task (as if scored alone), hashed: what its
    scores file must carry to be read instead of computed."""
    import hashlib
    import json

    from .declaration import STAGES

    inputs = STAGES["scores"].inputs(run, adapters=[adapter],
                                     plan={task: {adapter.name: list(splits)}}, phase=phase)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _stored_scores(run: Run, member: str, task: str, phase: str, key: str):
    """The ScoresRecord of a scores file already written under ``key``, or None (missing,
    unreadable, or of other inputs)."""
    import hashlib
    import json

    from ..storage import read_bytes, read_keyed_json

    url = run.dir.scores(member, phase, task)
    # exactly the bytes this stage writes (a file changed in any way is computed again: its
    # sha256 is what later stages key on)
    found = read_keyed_json(url, key)
    if found is None:
        return None
    ref = FileRef(run.dir.relative(url), hashlib.sha256(found[1]).hexdigest())
    try:
        cost = json.loads(read_bytes(url + ".cost"))
        if not isinstance(cost, dict) or cost.get("key") != key:
            raise ValueError("another key")
        seconds, flops = float(cost["seconds"]), float(cost["flops"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds, flops = 0.0, 0.0  # the scores are sound; only their cost is unknown
    return ScoresRecord(member, ref, seconds, phase, task, flops=flops)


def _base_parameters(model) -> int:
    """The parameters a forward pass applies at every position (``training.forward_parameters``)
    of the base model alone (the scoring model holds every member's adapter)."""
    from ..training import forward_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = forward_parameters(base)
    # less every member adapter loaded into it so far (how many depends on which members this
    # process scored before: the count must not)
    names = set(getattr(model, "peft_config", None) or ())
    for name, p in base.named_parameters():
        if any(f".{a}." in name or name.endswith(f".{a}") for a in names):
            n -= p.numel()
    return n


def read_scores(records: dict[str, ScoresRecord], run_dir) -> dict:
    """member -> task -> split -> score vectors, from the members' score files (every phase
    of a member merged) in ``run_dir`` (a ``rundir.RunDir``)."""
    from ..storage import read_json

    out: dict = {}
    for r in records.values():
        for task, splits in read_json(run_dir.at(r.file.path))["scores"].items():
            out.setdefault(r.name, {}).setdefault(task, {}).update(splits)
    return out


@stage(5, "losses", config=(),
       key_args=lambda groups, features, scores: {
           "groups": groups, "features": {t: features[t] for g in groups for t in g.tasks},
           "scores": _members(groups, scores)}, returns=GroupLosses)
def group_losses(run: Run, groups: Sequence[GroupEnsemble], features: dict[str, FeaturesRecord],
                 scores: dict[str, ScoresRecord]) -> GroupLosses:
    """The exact training loss of every group's current ensemble: what a boosting step
    chooses its group by (Algorithm 2, ``boosting.choose_group``)."""
    from ..boosting import group_train_loss

    member = read_scores(scores, run.dir)
    return GroupLosses({g.name: group_train_loss(
        member, g, [feature_table(run.dir.at(features[t].train.path), features[t].train.sha256)
                    for t in g.tasks]) for g in groups})


@stage(5, "boost", config=MODEL + ("boosting.eta", "boosting.mode", "estimation.l2",
                                   "estimation.batch_size", "estimation.fit_dim",
                                   "estimation.projection_dim", "estimation.max_examples",
                                   "training"),
       reads=lambda group, features, scores, step: group.tasks,
       key_args=lambda group, features, scores, step: {
           "group": group, "features": {t: features[t] for t in group.tasks},
           # only the group's own tasks: a task added elsewhere leaves the step cached
           "scores": scores_of(scores, [m.name for m in group.members], group.tasks),
           "step": step}, returns=BoostRecord)
@on_device
def boost_group(run: Run, group: GroupEnsemble, features: dict[str, FeaturesRecord],
                scores: dict[str, ScoresRecord], step: int) -> BoostRecord:
    """One boosting step on ``group`` by ``boosting.mode`` (a registered boosting mode,
    ``boosting``): the boosting adapter group-<k>-boost-<step> — restored from the residual
    fit (first-order) or fine-tuned from θ* (exact, adaboost) — saved as a PEFT adapter."""
    from ..adapters import save_adapter
    from ..boosting import BoostContext, boosting_mode
    from ..models import load_model
    from ..scoring import predict_scores
    from ..training import train_adapter

    t0 = time.perf_counter()
    cfg = run.cfg
    d = cfg.estimation.surrogate_dim
    tables = [feature_table(run.dir.at(features[t].train.path), features[t].train.sha256, d)
              for t in group.tasks]
    member = read_scores(scores_of(scores, [m.name for m in group.members], group.tasks),
                         run.dir)
    lm = load_model(cfg, cache_path(cfg))
    train = [e for t in group.tasks for e in estimation_examples(run, t, "train")]

    def score_train(model):
        return np.concatenate(predict_scores(model, lm.tokenizer, train, cfg.model.max_length,
                                             cfg.estimation.batch_size, cfg.model.choice_mode))

    name = f"{group.name}-boost-{step}"

    def save(model) -> AdapterRecord:
        with run.dir.writing_dir(run.dir.adapter(name)) as out:
            save_adapter(model, out, None, base_fingerprint=lm.fingerprint["base"])
        return adapter_record(run, name, group.tasks)

    def train_on_sample(model, loss_fn):  # exact / adaboost: the sample the scores exist for
        return train_adapter(model, lm.tokenizer, train, [], cfg.training, cfg.model.max_length,
                             cfg.model.choice_mode, validate_initial=False, loss_fn=loss_fn)

    ctx = BoostContext(group, step, lm.model, tables, member, score_train, save,
                       train_on_sample, cfg.boosting.eta, cfg.estimation.l2,
                       features[group.tasks[0]].projection.at_dim(d), THETA_STAR)
    rec = boosting_mode(cfg.boosting.mode).step(ctx)
    return replace(rec, seconds=time.perf_counter() - t0)  # the whole stage, loading included


@stage(5, "boosting", config=(), key_args=lambda steps: {"steps": steps}, returns=FileRef)
def record_boosting(run: Run, steps: Sequence[BoostRecord]) -> FileRef:
    """boosting.json: the boosting steps taken (accepted or not)."""
    return run.dir.write_json(run.dir.boosting, {"steps": [_flat_boost(b) for b in steps]})


def _flat_boost(b: BoostRecord) -> dict:
    a = b.adapter
    return {"name": a.name, "tasks": a.tasks, "path": a.path, "sha256": a.sha256,
            "group": b.group, "step": b.step, "eta": b.eta,
            "train_loss_before": b.train_loss_before, "train_loss_after": b.train_loss_after,
            "train_loss_first_order": b.train_loss_first_order, "x_norm": b.x_norm,
            "relative_distance": b.relative_distance, "accepted": b.accepted,
            "seconds": b.seconds, "mode": b.mode, "alpha": b.alpha, "error": b.error,
            "members": [{"adapter": m.name, "scale": m.scale} for m in b.members]}


def _base_fingerprint(run: Run, adapter: str) -> dict:
    """The base model's fingerprint an adapter was saved with (its ``base_model.json``)."""
    from ..adapters import BASE_MODEL_FILE

    return run.dir.read_json(join(run.dir.adapter(adapter), BASE_MODEL_FILE))


def _members(groups, scores, *extra) -> dict:
    return scores_of(scores, [m.name for g in groups for m in g.members] + list(extra))

@stage(5, "weights", config=("model", "boosting.eta", "weights", "seed"),
       reads=lambda groups, scores: [t for g in groups for t in g.tasks],
       key_args=lambda groups, scores: {"groups": groups, "scores": _members(groups, scores)},
       returns=EnsembleRecord)
def fit_weights(run: Run, groups: Sequence[GroupEnsemble],
                scores: dict[str, ScoresRecord]) -> EnsembleRecord:
    """Nonnegative weights summing to one over the m group ensembles, fitted on validation
    examples (``weights``): per task from its own group, kept only if they beat the own group
    on held-out folds (``weights.guard: cross-fit``), or one simplex for all tasks
    (``weights.form: per-group``, the paper's Algorithm 2); ensemble.json."""
    from ..adapters import ADAPTER_CONFIG
    from ..boosting import group_scores
    from ..ensemble import (combine_probabilities, cross_fitted_weights, ensemble_log_loss,
                            fit_ensemble_weights, fit_group_weights, probabilities, task_entry,
                            write_ensemble_json)
    from ..storage import file_sha256, join

    member = read_scores(scores, run.dir)
    wc = run.cfg.weights
    group_of = {t: k for k, g in enumerate(groups) for t in g.tasks}
    gold = {t: [e.label for e in run.task_data(t).splits["validation"]] for t in run.task_names}
    probs = {t: [probabilities(group_scores(member, g, t, "validation")) for g in groups]
             for t in run.task_names}
    shared = fit_group_weights(probs, gold, len(groups)) if wc.form == "per-group" else None
    entries, weights, validation, fits = {}, {}, {}, {}
    for i, t in enumerate(run.task_names):
        val_gold, val_probs = gold[t], probs[t]
        if shared is not None:
            w = shared
        elif wc.guard == "cross-fit":
            w, fits[t] = cross_fitted_weights(val_probs, val_gold, group_of[t], wc.folds,
                                              seed=run.cfg.seed + i)
        else:
            w = fit_ensemble_weights(val_probs, val_gold, start=group_of[t])
        weights[t] = w.tolist()
        entries[t] = task_entry(run.cfg.task(t), group_of[t], w)
        # the ensemble's own validation metrics (what a new version is promoted on:
        # ensemble_core/versions.py), on the examples the weights were fitted on
        pred = [int(np.argmax(p)) for p in combine_probabilities(val_probs, w)]
        validation[t] = {"n": len(val_gold),
                         "accuracy": float(np.mean(np.equal(pred, val_gold))),
                         "log_loss": ensemble_log_loss(val_probs, val_gold, w)}
    spec_groups = [{"name": g.name, "tasks": list(g.tasks),
                    "members": [{"adapter": run.dir.relative(run.dir.adapter(m.name)),
                                 "scale": m.scale,
                                 # what EnsembleModel checks before loading it: the weights
                                 # and the PEFT config (scale, targets) they are read with
                                 "sha256": file_sha256(run.dir.adapter_weights(m.name)),
                                 "config_sha256": file_sha256(join(run.dir.adapter(m.name),
                                                                   ADAPTER_CONFIG))}
                                for m in g.members]} for g in groups]
    cfg = run.cfg
    sha = write_ensemble_json(run.dir.ensemble, base_model=cfg.model, tasks=entries,
                              groups=spec_groups, max_length=cfg.model.max_length,
                              choice_mode=cfg.model.choice_mode,
                              base_fingerprint=_base_fingerprint(run, groups[0].name),
                              eta=cfg.boosting.eta, validation=validation,
                              weights_fit={"form": cfg.weights.form, "guard": cfg.weights.guard,
                                           "tasks": fits})
    return EnsembleRecord(FileRef(run.dir.relative(run.dir.ensemble), sha), list(groups),
                          weights)
