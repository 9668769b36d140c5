"""The six stages of a run, in order, as plain functions (no Prefect; docs/design.md).

    1. gradient features     gradient_features, linearity            (gpu)
    2. subset regressions    plan_subsets, fit_subsets               (cpu)
    3. affinity and groups   affinity_and_groups                     (cpu)
    4. group adapters        train_group, save_theta_star            (gpu)
    5. boosting and weights  score_member, boost_group, fit_weights  (gpu; weights on cpu)
    6. evaluation            evaluate, finish                        (cpu)

Each stage function takes the :class:`run.Run` and the records of the stages before it, writes
its files through the run directory (``rundir.RunDir``) and returns a record (``records``).

Each stage also says what its result depends on (:func:`stage`): the config fields it reads,
the tasks whose data it reads, and which of its arguments identify its inputs.
``Stage.inputs(run, ...)`` gives exactly that as JSON — the Prefect layer makes its cache keys
from it (tasks/common.py) — and the stage function sees only what it declared: reading any
other config field or task is an error (``run.ConfigView``), so a cache cannot miss an input.
"""
from __future__ import annotations

import functools
import inspect
import os
import socket
import time
from dataclasses import dataclass, replace
from math import comb
from typing import Callable, Sequence

import numpy as np

from .records import (AdapterRecord, AdaptersResult, Averages, BaselineResult, BaselinesRecord,
                      BoostRecord, Compute, EnsembleRecord,
                      EvaluationRecord, FeaturesRecord, FileRef, GroupEnsemble, GroupsRecord,
                      LinearityPoint, LinearityRecord, Metrics, ProjectionInfo,
                      ScoresRecord, SplitFeatures, SubsetBatch, SubsetEstimate, SurrogateFit,
                      TaskEstimate, TaskMetrics)
from .run import Run, dotted
from .rundir import GRADIENT_SPLITS, THETA_STAR
from .runtime import (DEVICE_LOCK, cache_path, code_version, feature_table, on_device,
                      projector, release_memory, theta_star_model)

__all__ = ["Stage", "stage", "STAGES", "PLANNING", "estimation_examples", "gradient_features",
           "linearity", "plan_subsets", "subset_batches", "plan_batches", "subset_plan",
           "previous_plan",
           "fit_subsets", "affinity_and_groups",
           "train_group", "save_theta_star", "score_plans", "test_plans", "by_task", "scores_key", "score_member",
           "scores_of", "read_scores", "boost_group",
           "fit_weights", "compute_summary", "evaluate", "baseline_plan", "evaluate_baselines",
           "finish"]


# -------------------------------------------------------------------------------------------
# What a stage depends on
# -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """A stage's declaration: its number (1–6), a short name (cache keys, task names), the
    config fields its result depends on, the fields it reads that do not change its result
    (``uses``), and which tasks' data it reads (``reads(**args)``; None: none)."""
    number: int
    name: str
    config: tuple[str, ...]
    uses: tuple[str, ...] = ()
    reads: Callable[..., Sequence[str]] | None = None
    key_args: Callable[..., dict] | None = None  # the arguments that identify the inputs

    def inputs(self, run: Run, **args) -> dict:
        """Everything the stage's result depends on, as JSON: the declared config fields,
        the data fingerprints of the tasks it reads, and the content keys of its arguments
        (records contribute ``Record.key()``)."""
        args = {k: v for k, v in args.items() if k != "progress"}
        tasks = sorted(set(self.reads(**args))) if self.reads else []
        chosen = self.key_args(**args) if self.key_args else args
        return {"stage": f"{self.number}:{self.name}", "code": code_version(),
                "run_dir": run.dir.url,
                "config": {path: dotted(run.cfg, path) for path in self.config},
                "data": {t: run.data_fingerprint(t) for t in tasks},
                "args": _key_of(chosen)}


def _key_of(obj):
    if hasattr(obj, "key") and callable(obj.key):
        return obj.key()
    if isinstance(obj, dict):
        return {str(k): _key_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_key_of(v) for v in obj]
    return obj


STAGES: dict[str, Stage] = {}


def stage(number: int, name: str, config: Sequence[str], uses: Sequence[str] = (),
          reads: Callable | None = None, key_args: Callable | None = None):
    """Declare a stage function (see :class:`Stage`). The function is called with the run as
    the stage may see it (``Run.for_stage``); ``fn.stage`` is the declaration."""
    spec = Stage(number, name, tuple(config), tuple(uses), reads, key_args)
    STAGES[name] = spec

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run_stage(run: Run, *a, **k):
            bound = sig.bind(run, *a, **k)
            args = {n: v for n, v in bound.arguments.items() if n not in ("run", "progress")}
            tasks = spec.reads(**args) if spec.reads else ()
            view = run.for_stage(name, spec.config + spec.uses, tasks)
            return fn(view, *a, **k)

        run_stage.stage = spec
        return run_stage
    return wrap


# Config fields read outside the stage functions, by the code that decides what the stages are
# given (plan_subsets, subset_batches, score_plans, the flows): their effect reaches the cache
# keys through the stages' arguments (the subsets, the plans, the steps taken).
PLANNING = ("seed", "estimation.n_subsets", "estimation.subset_size",
            "estimation.min_pair_coverage", "estimation.subsets_per_task_run",
            "estimation.linearity_check", "boosting.steps", "evaluation.baselines",
            "evaluation.promote_tolerance")

MODEL = ("model", "adapter", "seed")
PROJECTION = ("estimation.projection_dim", "estimation.projection_seed",
              "estimation.projection_block_rows")


# -------------------------------------------------------------------------------------------
# Stage 1: gradient features (the first-order approximation at θ*)
# -------------------------------------------------------------------------------------------

def estimation_examples(run: Run, task: str, split: str):
    """The examples of a task's split that stage 1 and the surrogate use: all of them, or a
    seeded sample of ``estimation.max_examples[split]`` (original order kept), so the gradient
    pass does not grow with the training set. Fine-tuning uses every example."""
    import hashlib

    examples = run.task_data(task).splits[split]
    cap = run.cfg.estimation.max_examples.get(split)
    if cap is None:
        return examples
    if cap > len(examples):
        raise ValueError(f"estimation.max_examples.{split} = {cap}, but task {task!r} has only "
                         f"{len(examples)} {split} examples; lower it to at most "
                         f"{len(examples)}")
    digest = hashlib.sha256(f"estimation/{run.cfg.seed}/{task}/{split}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    keep = sorted(int(i) for i in rng.permutation(len(examples))[:cap])
    return [examples[i] for i in keep]


def scored_examples(run: Run, task: str, split: str):
    """The examples stage 5 scores a member on: for "train" the examples stage 1 computed
    features of (:func:`estimation_examples`, which boosting reads), else the whole split."""
    return (estimation_examples(run, task, split) if split == "train"
            else run.task_data(task).splits[split])


def _adapter_words(a) -> str:
    size = (f"reduction factor {a.reduction_factor}" if a.kind == "bottleneck" else f"r = {a.r}")
    return f"adapter {a.kind} {size} on {', '.join(a.target_modules)}"


def _stage1_projector(run: Run, lm):
    e, a = run.cfg.estimation, run.cfg.adapter
    p = sum(q.numel() for q in lm.model.parameters() if q.requires_grad)
    d = e.stored_dim
    if d > p:  # name the config key, not only the projector's d and p
        raise ValueError(f"estimation.projection_dim = {d} (d) is larger than the "
                         f"number of adapter parameters p = {p} (model {run.cfg.model.name!r}, "
                         f"{_adapter_words(a)}); choose d <= {p}")
    return projector(p, d, e.projection_seed, e.projection_block_rows, e.projection_cache_gb,
                     lm.device)


@stage(1, "gradients", config=MODEL + PROJECTION + ("estimation.batch_size",
                                                     "estimation.max_examples"),
       uses=("estimation.projection_cache_gb",), reads=lambda task: [task])
def gradient_features(run: Run, task: str, progress=None) -> FeaturesRecord:
    """Outputs h_c(s) and the projected gradients of the score differences
    g̃ = Pᵀ∇(h_c(s) − h_0(s)) at θ* of one task's train and validation examples (or their
    estimation sample) as Parquet (``features``), and the task's manifest."""
    from .features import FEATURES_FORMAT, GRAD_MEANING, write_features
    from .gradients import extract_features
    from .models import adapter_vector
    from .scoring import ChoiceScorer

    cfg, td = run.cfg, run.task_data(task)
    lm = theta_star_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    with DEVICE_LOCK:
        # timed from here: the tasks of stage 1 run concurrently and take turns on the device,
        # and the compute ratio (stage 6) sums their seconds, so waiting is not work
        t_start = time.perf_counter()
        proj = _stage1_projector(run, lm)
        files, timings, sample = {}, {}, {}
        for split in GRADIENT_SPLITS:
            t0 = time.perf_counter()
            tim: dict = {}
            examples = estimation_examples(run, task, split)
            if len(examples) < len(td.splits[split]):
                sample[split] = {"max": cfg.estimation.max_examples[split],
                                 "from_n": len(td.splits[split]),
                                 "ids": [e.example_id for e in examples]}
            table = extract_features(lm.model, scorer, examples, proj, task=task,
                                     split=split, batch_size=cfg.estimation.batch_size,
                                     timings=tim, progress=progress)
            url = run.dir.features(task, split)
            files[split] = SplitFeatures(url, write_features(url, table), int(len(table.choice)),
                                         table.n_examples)
            timings[split] = dict(tim, total_s=time.perf_counter() - t0)
        theta_norm = float(adapter_vector(lm.model).norm())
        seconds = time.perf_counter() - t_start
    info = ProjectionInfo(proj.p, proj.d, proj.seed, proj.block_rows, theta_norm)
    manifest = {
        "task": task, "seed": info.seed, "d": info.d, "p": info.p, "theta_norm": theta_norm,
        "dims": cfg.estimation.dims, "format": FEATURES_FORMAT.decode(),
        "grad": GRAD_MEANING.decode(), "reference_choice": 0,
        "projection": proj.fingerprint(), "model": lm.fingerprint,
        "template": td.config.template, "choices": td.config.choices,
        "choice_mode": scorer.mode_for(td.splits["train"]),
        "tokenizer": {"class": type(lm.tokenizer).__name__, "vocab_size": len(lm.tokenizer),
                      "max_length": cfg.model.max_length, "padding_side": "right",
                      "truncation": "left (keeps BOS and the end of the prompt)"},
        "data": td.provenance, "estimation_sample": sample,
        "files": {s: {"path": f.path, "sha256": f.sha256, "rows": f.rows,
                      "examples": f.examples} for s, f in files.items()},
        "timings": timings, "code_version": code_version(),
    }
    # written last: its presence marks the task complete
    man = run.dir.write_json(run.dir.features_manifest(task), manifest)
    release_memory()
    return FeaturesRecord(task, man, files["train"], files["validation"], info, seconds=seconds)


@stage(1, "linearity", config=MODEL + PROJECTION + ("estimation.batch_size",
                                                     "estimation.linearity_examples"),
       uses=("estimation.projection_cache_gb",), reads=lambda task: [task])
def linearity(run: Run, task: str) -> LinearityRecord:
    """The first-order check (the paper's Table 5 / Figure 2) on the first examples of one
    task's validation split (``checks.linearity_check``)."""
    from .checks import linearity_check
    from .scoring import ChoiceScorer

    cfg = run.cfg
    lm = theta_star_model(cfg)
    scorer = ChoiceScorer(lm.tokenizer, cfg.model.max_length, cfg.model.choice_mode)
    examples = run.task_data(task).splits["validation"][:cfg.estimation.linearity_examples]
    with DEVICE_LOCK:
        rows = linearity_check(lm.model, scorer, examples, _stage1_projector(run, lm),
                               batch_size=cfg.estimation.batch_size)
    result = {"task": task, "examples": len(examples), "results": rows}
    ref = run.dir.write_json(run.dir.linearity, result)
    return LinearityRecord(task, len(examples), [LinearityPoint(**r) for r in rows], ref)


# -------------------------------------------------------------------------------------------
# Stage 2: subset regressions (the surrogates whose results eq. (1) averages)
# -------------------------------------------------------------------------------------------

def plan_subsets(cfg) -> list[tuple[int, ...]]:
    """The k sampled task subsets S (seeded; every pair covered min_pair_coverage times), as
    indices into the config's task list."""
    from .sampling import sample_subsets

    e, n = cfg.estimation, len(cfg.tasks)
    if n < 2:
        raise ValueError(f"stage 2 needs at least two tasks, the config has {n}")
    if e.subset_size > n:
        raise ValueError(f"estimation.subset_size = {e.subset_size} is larger than the number "
                         f"of tasks ({n})")
    k = min(e.n_subsets, comb(n, e.subset_size))
    return sample_subsets(n, k, e.subset_size, e.min_pair_coverage, seed=cfg.seed)


def subset_batches(cfg, subsets) -> list[list[tuple[int, ...]]]:
    """The subsets cut into the batches of one task run each."""
    b = cfg.estimation.subsets_per_task_run
    return [list(subsets[i:i + b]) for i in range(0, len(subsets), b)]


def _plan_params(cfg) -> dict:
    e = cfg.estimation
    return {"seed": cfg.seed, "n_subsets": e.n_subsets, "subset_size": e.subset_size,
            "min_pair_coverage": e.min_pair_coverage,
            "subsets_per_task_run": e.subsets_per_task_run}


def plan_batches(cfg, previous: dict | None = None) -> list[list[tuple[int, ...]]]:
    """The subsets of stage 2 in their batches (one task run each), as indices into the
    config's tasks. Without ``previous`` (a plan of this run directory, :func:`subset_plan`)
    or when its sampling settings differ: :func:`plan_subsets`, cut into batches. Otherwise
    the plan is extended, not redrawn (issue 14, item 1): every previous subset whose tasks
    are all still configured stays in its batch (so its cached fit is reused), the subsets of
    removed tasks are dropped, and only the subsets that bring every pair of the new task set
    back to ``min_pair_coverage`` are added, in new batches (``sampling.extend_subsets``)."""
    from .sampling import extend_subsets

    names = [t.name for t in cfg.tasks]
    if not previous or previous.get("params") != _plan_params(cfg):
        return subset_batches(cfg, plan_subsets(cfg))
    if len(names) < 2 or cfg.estimation.subset_size > len(names):
        plan_subsets(cfg)  # raises, naming the setting
    index = {t: i for i, t in enumerate(names)}
    batches = [[tuple(sorted(index[t] for t in sub)) for sub in batch
                if all(t in index for t in sub)] for batch in previous["batches"]]
    batches = [b for b in batches if b]
    kept = [sub for b in batches for sub in b]
    added = extend_subsets(len(names), kept, cfg.estimation.subset_size,
                           cfg.estimation.min_pair_coverage, seed=cfg.seed)
    return batches + subset_batches(cfg, added)


def previous_plan(rundir) -> dict | None:
    """The run directory's stored subset plan (``estimation/plan.json``), or None: what
    :func:`plan_batches` extends."""
    return rundir.read_json(rundir.subset_plan) if rundir.exists(rundir.subset_plan) else None


def subset_plan(cfg, batches) -> dict:
    """The stored form of a plan (``estimation/plan.json``): the sampling settings, the tasks,
    and every batch's subsets by task name."""
    names = [t.name for t in cfg.tasks]
    return {"params": _plan_params(cfg), "tasks": names,
            "batches": [[[names[i] for i in sub] for sub in b] for b in batches]}


def _used(features: dict, subsets, names) -> dict:
    """The features of the tasks in ``subsets`` (indices into ``names``)."""
    return {t: features[t] for t in sorted({names[i] for s in subsets for i in s})}


@stage(2, "subsets", config=("estimation.l2", "estimation.max_norm",
                             "estimation.max_relative_distance", "estimation.fit_dim",
                             "estimation.projection_dim"),
       key_args=lambda features, batch, subsets, tasks: {
           "features": _used(features, subsets, tasks), "batch": batch,
           "subsets": [[tasks[i] for i in s] for s in subsets]})
def fit_subsets(run: Run, features: dict[str, FeaturesRecord], batch: int,
                subsets: Sequence[Sequence[int]], tasks: Sequence[str]) -> SubsetBatch:
    """For each subset S of the batch (indices into ``tasks``), the first-order surrogate
    fitted on S's train rows and f̂_i(S) on each i ∈ S's validation rows."""
    from .surrogate import fit_subset, norm_bound

    t0 = time.perf_counter()
    e = run.cfg.estimation
    d = e.surrogate_dim
    tables = {}
    for t, rec in _used(features, subsets, tasks).items():
        tables[t] = (feature_table(rec.train.path, rec.train.sha256, d),
                     feature_table(rec.validation.path, rec.validation.sha256, d))
        if tables[t][1].n_examples == 0:
            raise ValueError(f"task {t} has no validation rows")
    info = features[tasks[subsets[0][0]]].projection.at_dim(d)
    bound = norm_bound(e.max_norm, e.max_relative_distance, info)
    results = []
    for s in subsets:
        names = [tasks[i] for i in s]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"subset {list(s)} must be distinct task indices")
        out = fit_subset([tables[n][0] for n in names], [tables[n][1] for n in names],
                         l2=e.l2, max_norm=bound)
        fit = out["fit"]
        results.append(SubsetEstimate(
            [int(i) for i in s], names, {n: TaskEstimate(**out["tasks"][n]) for n in names},
            SurrogateFit(**fit, relative_distance=info.relative_distance(fit["norm"]))))
    url = run.dir.subsets(batch)
    ref = run.dir.write_json(url, {"batch": batch, "results": [r.to_json() for r in results]})
    worker = f"{socket.gethostname()}:{os.getpid()}"  # provenance: which process fitted these
    return SubsetBatch(batch, ref, results, worker, time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------
# Stage 3: affinity and groups (eq. 1; Appendix A.1)
# -------------------------------------------------------------------------------------------

@stage(3, "groups", config=("estimation.metric", "clustering", "seed"),
       key_args=lambda results, tasks, previous=None: {
           "results": [(r.tasks, r.per_task) for r in results], "tasks": tasks,
           "previous": previous})
def affinity_and_groups(run: Run, results: Sequence[SubsetEstimate],
                        tasks: Sequence[str], previous: list[list[str]] | None = None
                        ) -> GroupsRecord:
    """Task affinity T (eq. 1) from the subset results, then groups by the SDP relaxation
    (Appendix A.1) or the spectral baseline; affinity.json and groups.json.

    With ``clustering.incremental`` and the ``previous`` groups of this run directory (task
    names), the previous groups are kept (less removed tasks) and each new task joins the
    group of highest affinity (``clustering.join_by_affinity``), unless that partition's SDP
    objective is more than ``clustering.regroup_below`` (a fraction) below the fresh SDP's
    (``clustering.partition_objective``); groups.json says which was used and both
    objectives."""
    from .affinity import task_affinity
    from .clustering import (SDPClustering, SpectralClustering, groups_to_json,
                             join_by_affinity, partition_objective)

    t0 = time.perf_counter()
    aff = task_affinity([(r.subset, r.per_task) for r in results], list(tasks),
                        metric=run.cfg.estimation.metric)
    c = run.cfg.clustering
    m = None if c.n_groups == "auto" else int(c.n_groups)
    if c.method == "spectral":
        if m is None:
            raise ValueError("clustering.method = spectral needs clustering.n_groups")
        est = SpectralClustering(m, seed=run.cfg.seed).fit(aff.matrix)
        info = {"method": "spectral"}
    else:
        est = SDPClustering(m=m, lam=c.lam, c=c.threshold_c, m_selection=c.m_selection,
                            max_groups=c.max_groups, solver=c.solver).fit(aff.matrix)
        info = {"method": "sdp", "status": est.status_, "solver": est.solver_,
                "objective": float(est.objective_), "selection": est.selection_,
                "X": est.X_.tolist()}
    chosen = [list(g) for g in est.groups_]
    if c.incremental and previous:
        index = {t: i for i, t in enumerate(tasks)}
        kept = [[index[t] for t in g if t in index] for g in previous]
        kept = [g for g in kept if g]
        placed = {i for g in kept for i in g}
        new = [i for i in range(len(tasks)) if i not in placed]
        if kept and (m is None or len(kept) == m):
            inc = join_by_affinity(aff.matrix, kept, new)
            fresh_obj = partition_objective(aff.matrix, chosen)
            inc_obj = partition_objective(aff.matrix, inc)
            use = inc_obj >= fresh_obj - c.regroup_below * abs(fresh_obj)
            info["incremental"] = {
                "used": "incremental" if use else "fresh",
                "joined": [tasks[i] for i in new],
                # the partition the incremental policy proposed, whether used or not
                "incremental_groups": [[tasks[i] for i in g] for g in inc],
                "incremental_objective": inc_obj, "fresh_objective": fresh_obj,
                "regroup_below": c.regroup_below}
            if use:
                chosen = inc
    groups = groups_to_json(chosen, list(tasks))
    groups.update(info)
    aff_ref = run.dir.write_bytes(run.dir.affinity, aff.to_json().encode())
    groups_ref = run.dir.write_json(run.dir.groups, groups)
    return GroupsRecord(aff_ref, groups_ref, [g["tasks"] for g in groups["groups"]],
                        time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------
# Stage 4: group adapters (Algorithm 2: one adapter per group)
# -------------------------------------------------------------------------------------------

def _adapter_record(run: Run, name: str, tasks, train=None) -> AdapterRecord:
    from .storage import file_sha256

    return AdapterRecord(name, list(tasks), run.dir.adapter(name),
                         file_sha256(run.dir.adapter_weights(name)), train)


@stage(4, "train", config=MODEL + ("training",), reads=lambda name, tasks, start=None: tasks)
@on_device
def train_group(run: Run, name: str, tasks: Sequence[str], start: AdapterRecord | None = None,
                progress=None) -> AdapterRecord:
    """Fine-tune one adapter on the union of the given tasks (a group, or all tasks: the
    single-adapter baseline; the baselines' adapters), from θ* or, with ``start``, from that
    adapter's weights (MTL-FT's second phase)."""
    from .adapters import load_weights, save_adapter
    from .models import load_model
    from .training import train_adapter

    cfg = run.cfg
    lm = load_model(cfg, cache_path(cfg))  # a fresh θ*: training changes it
    if start is not None:
        load_weights(lm.model, run.dir.local(start.path))
    # an epoch-0 validation only for a start other than θ* (MTL-FT's second phase): at θ*
    # every adapter scores what the base model scores (stage 5 scores θ* on every task's
    # validation split when it is a boosting member); the best epoch is chosen among the
    # trained epochs either way
    result = train_adapter(lm.model, lm.tokenizer, run.examples(tasks, "train"),
                           run.examples(tasks, "validation"), cfg.training, cfg.model.max_length,
                           cfg.model.choice_mode, progress=progress,
                           validate_initial=start is not None)
    save_adapter(lm.model, run.dir.local(run.dir.adapter(name)), result,
                 base_fingerprint=lm.fingerprint["base"])
    return _adapter_record(run, name, tasks, result.summary())


@stage(4, "theta-star", config=MODEL)
@on_device
def save_theta_star(run: Run) -> AdapterRecord:
    """The fresh adapter θ* as a PEFT adapter: boosting members use it to add a boosting
    adapter's change h_k − h0 (with the standard B = 0 init it is exactly the base model)."""
    from .adapters import save_adapter
    from .models import load_model

    lm = load_model(run.cfg, cache_path(run.cfg))
    save_adapter(lm.model, run.dir.local(run.dir.adapter(THETA_STAR)), None,
                 base_fingerprint=lm.fingerprint["base"])
    return _adapter_record(run, THETA_STAR, [])


# -------------------------------------------------------------------------------------------
# Stage 5: boosting and weights (Algorithm 2; Appendix A.2)
# -------------------------------------------------------------------------------------------

def score_plans(tasks: Sequence[str], groups: Sequence[GroupEnsemble], boosting_steps: int,
                mode: str = "first-order") -> dict[str, dict[str, list[str]]]:
    """Which member is scored on which split of which tasks before the weights — only what a
    later step reads: a group adapter on its own train sample (boosting) and every task's
    validation examples (weights); θ* (a member of every boosted group) on validation, and on
    train when boosting takes several steps (AdaBoost's members do not include θ*). The test
    split comes after the weights (:func:`test_plans`)."""
    plans = {g.name: {"train": list(g.tasks), "validation": list(tasks)} for g in groups}
    if boosting_steps > 0 and mode != "adaboost":
        plans[THETA_STAR] = {"validation": list(tasks)}
        if boosting_steps > 1:
            plans[THETA_STAR]["train"] = list(tasks)
    return plans


def boost_score_plan(tasks: Sequence[str], group: GroupEnsemble) -> dict[str, list[str]]:
    """What a boosting adapter is scored on before the weights: its group's train sample (the
    next step) and every task's validation examples."""
    return {"train": list(group.tasks), "validation": list(tasks)}


def test_plans(ensemble: EnsembleRecord, single: str) -> dict[str, dict[str, list[str]]]:
    """Which member is scored on which tasks' test split: the single adapter on every task;
    each member of group g on the tasks whose ensemble gives g a nonzero weight, and on its own
    tasks (the "group adapter" column) — no other test example is read."""
    plans: dict[str, set] = {single: set(ensemble.weights)}
    for k, g in enumerate(ensemble.groups):
        tasks = {t for t, w in ensemble.weights.items() if w[k] > 0} | set(g.tasks)
        for m in g.members:
            plans.setdefault(m.name, set()).update(tasks)
    order = list(ensemble.weights)
    return {name: {"test": [t for t in order if t in ts]} for name, ts in plans.items()}


def by_task(plan: dict[str, list[str]]) -> dict[str, list[str]]:
    """A scoring plan (split -> tasks) as task -> splits, in the plan's order: stage 5 scores a
    member one task at a time, so adding a task to a run scores only the new task with the
    members that did not change (BENCHMARKS.md, "Adding a seventh task")."""
    out: dict[str, list[str]] = {}
    for split, tasks in plan.items():
        for t in tasks:
            out.setdefault(t, []).append(split)
    return out


def scores_key(member: str, task: str, phase: str = "fit") -> str:
    """The key of one member's scores on one task in the flows' dict of score records."""
    return f"{member}/{task}" if phase == "fit" else f"{member}/{task}:{phase}"


@stage(5, "scores", config=("model", "estimation.batch_size", "seed", "estimation.max_examples"),
       reads=lambda adapter, task, splits, phase="fit": [task])
@on_device(release=False)
def score_member(run: Run, adapter: AdapterRecord, task: str, splits: Sequence[str],
                 phase: str = "fit") -> ScoresRecord:
    """Scores h_c(s) of one member adapter on ``splits`` of one task:
    scores/<member>/<task>.json (<task>.test.json for the test phase),
    ``{"scores": {task: {split: [[h_c of example 0], ...]}}}``. "train" means the examples
    stage 1 computed features of (``estimation_examples``), which is what boosting reads.
    Which member is scored where: :func:`score_plans`, :func:`test_plans`, :func:`by_task`."""
    from .runtime import member_model
    from .scoring import predict_scores

    t0 = time.perf_counter()
    cfg = run.cfg
    model, tok = member_model(cfg, run.dir.local(adapter.path), adapter.name, adapter.sha256)
    out: dict = {}
    for split in splits:
        scores = predict_scores(model, tok, scored_examples(run, task, split),
                                cfg.model.max_length, cfg.estimation.batch_size,
                                cfg.model.choice_mode)
        out[split] = [s.astype(float).tolist() for s in scores]
    ref = run.dir.write_json(run.dir.scores(adapter.name, phase, task),
                             {"adapter": adapter.name, "adapter_sha256": adapter.sha256,
                              "phase": phase, "task": task, "scores": {task: out}})
    return ScoresRecord(adapter.name, ref, time.perf_counter() - t0, phase, task)


def scores_of(scores: dict[str, ScoresRecord], names,
              tasks: Sequence[str] | None = None) -> dict[str, ScoresRecord]:
    """The score records (any phase) of the given members, on ``tasks`` only if given, in a
    stable order."""
    names = set(names)
    return {k: r for k, r in sorted(scores.items())
            if r.name in names and (tasks is None or r.task in tasks)}


def read_scores(records: dict[str, ScoresRecord]) -> dict:
    """member -> task -> split -> score vectors, from the members' score files (every phase
    of a member merged)."""
    from .storage import read_json

    out: dict = {}
    for r in records.values():
        for task, splits in read_json(r.file.path)["scores"].items():
            out.setdefault(r.name, {}).setdefault(task, {}).update(splits)
    return out


def group_losses(run: Run, groups: Sequence[GroupEnsemble], features: dict[str, FeaturesRecord],
                 scores: dict[str, ScoresRecord]) -> dict[str, float]:
    """The exact training loss of every group's current ensemble."""
    from .boosting import group_train_loss

    member = read_scores(scores)
    return {g.name: group_train_loss(member, g, [feature_table(features[t].train.path,
                                                               features[t].train.sha256)
                                                 for t in g.tasks]) for g in groups}


@stage(5, "boost", config=MODEL + ("boosting.eta", "boosting.mode", "estimation.l2",
                                   "estimation.batch_size", "estimation.fit_dim",
                                   "estimation.projection_dim", "estimation.max_examples",
                                   "training"),
       reads=lambda group, features, scores, step: group.tasks,
       key_args=lambda group, features, scores, step: {
           "group": group, "features": {t: features[t] for t in group.tasks},
           # only the group's own tasks: a task added elsewhere leaves the step cached
           "scores": scores_of(scores, [m.name for m in group.members], group.tasks),
           "step": step})
@on_device
def boost_group(run: Run, group: GroupEnsemble, features: dict[str, FeaturesRecord],
                scores: dict[str, ScoresRecord], step: int) -> BoostRecord:
    """One boosting step on ``group`` in ``boosting.mode`` (``boosting``): the boosting
    adapter group-<k>-boost-<step> — restored from the residual fit (first-order) or
    fine-tuned from θ* (exact, adaboost) — saved as a PEFT adapter."""
    from .adapters import save_adapter
    from .boosting import adaboost_step, boost_step, exact_boost_step, group_scores
    from .choices import flatten
    from .models import load_model
    from .projection import GaussianProjector
    from .scoring import predict_scores
    from .training import train_adapter

    t0 = time.perf_counter()
    cfg = run.cfg
    d = cfg.estimation.surrogate_dim
    tables = [feature_table(features[t].train.path, features[t].train.sha256, d)
              for t in group.tasks]
    member = read_scores(scores_of(scores, [m.name for m in group.members], group.tasks))
    h_cur, _ = flatten([s for t in group.tasks for s in group_scores(member, group, t, "train")])
    lm = load_model(cfg, cache_path(cfg))
    train = [e for t in group.tasks for e in estimation_examples(run, t, "train")]

    def score_train(model):
        return np.concatenate(predict_scores(model, lm.tokenizer, train, cfg.model.max_length,
                                             cfg.estimation.batch_size, cfg.model.choice_mode))

    name = f"{group.name}-boost-{step}"

    def save(model) -> AdapterRecord:
        save_adapter(model, run.dir.local(run.dir.adapter(name)), None,
                     base_fingerprint=lm.fingerprint["base"])
        return _adapter_record(run, name, group.tasks)

    def train_on_sample(model, loss_fn):  # exact / adaboost: the sample the scores exist for
        return train_adapter(model, lm.tokenizer, train, [], cfg.training, cfg.model.max_length,
                             cfg.model.choice_mode, validate_initial=False, loss_fn=loss_fn)

    mode = cfg.boosting.mode
    if mode == "exact":
        rec = exact_boost_step(group, step, lm.model, score_train, save, train_on_sample, tables,
                               h_cur, cfg.boosting.eta, THETA_STAR)
    elif mode == "adaboost":
        flat = {m.name: flatten([s for t in group.tasks for s in member[m.name][t]["train"]])[0]
                for m in group.members}
        rec = adaboost_step(group, step, lm.model, score_train, save, train_on_sample, tables,
                            flat, cfg.boosting.eta)
    else:  # first-order: only this mode restores θ* + η·P x̂, so only it needs P
        info = features[group.tasks[0]].projection.at_dim(d)
        proj = GaussianProjector(info.p, info.d, seed=info.seed, block_rows=info.block_rows,
                                 cache_bytes=0)  # one expand: each block is used once
        rec = boost_step(group, step, lm.model, score_train, save, tables, h_cur,
                         cfg.estimation.l2, cfg.boosting.eta, proj, THETA_STAR)
    return replace(rec, seconds=time.perf_counter() - t0)  # the whole stage, loading included


def write_boosting(run: Run, steps: Sequence[BoostRecord]) -> FileRef:
    """boosting.json: the boosting steps taken (accepted or not)."""
    return run.dir.write_json(run.dir.boosting, {"steps": [
        dict(_flat_boost(b)) for b in steps]})


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
    from .adapters import read_base_fingerprint

    return read_base_fingerprint(run.dir.local(run.dir.adapter(adapter)))


def _members(groups, scores, *extra) -> dict:
    return scores_of(scores, [m.name for g in groups for m in g.members] + list(extra))


@stage(5, "weights", config=("model", "boosting.eta"),
       reads=lambda groups, scores: [t for g in groups for t in g.tasks],
       key_args=lambda groups, scores: {"groups": groups, "scores": _members(groups, scores)})
def fit_weights(run: Run, groups: Sequence[GroupEnsemble],
                scores: dict[str, ScoresRecord]) -> EnsembleRecord:
    """Per task, nonnegative weights summing to one over the m group ensembles, fitted on the
    task's validation examples from its own group (``ensemble.fit_ensemble_weights``);
    ensemble.json."""
    from .boosting import group_scores
    from .ensemble import (combine_probabilities, ensemble_log_loss, fit_ensemble_weights,
                           probabilities, task_entry, write_ensemble_json)
    from .storage import file_sha256

    member = read_scores(scores)
    group_of = {t: k for k, g in enumerate(groups) for t in g.tasks}
    entries, weights, validation = {}, {}, {}
    for t in run.task_names:
        val_gold = [e.label for e in run.task_data(t).splits["validation"]]
        val_probs = [probabilities(group_scores(member, g, t, "validation")) for g in groups]
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
                                 # what EnsembleModel checks before loading it
                                 "sha256": file_sha256(run.dir.adapter_weights(m.name))}
                                for m in g.members]} for g in groups]
    cfg = run.cfg
    sha = write_ensemble_json(run.dir.ensemble, base_model=cfg.model, tasks=entries,
                              groups=spec_groups, max_length=cfg.model.max_length,
                              choice_mode=cfg.model.choice_mode,
                              base_fingerprint=_base_fingerprint(run, groups[0].name),
                              eta=cfg.boosting.eta, validation=validation)
    return EnsembleRecord(FileRef(run.dir.ensemble, sha), list(groups), weights)


# -------------------------------------------------------------------------------------------
# Stage 6: evaluation
# -------------------------------------------------------------------------------------------

def compute_summary(features: dict[str, FeaturesRecord], estimation_s: float,
                    adapters: AdaptersResult, boosting: Sequence[BoostRecord]) -> Compute:
    """Wall seconds per part, from the records (so a resumed run reports the original work).
    The compute ratio is (stage 1 + stages 2–3 + group adapters + boosting) / baseline
    training (the paper's Table 4 compares the same)."""
    groups = list(adapters.groups.values())
    base = adapters.single.train
    s1 = sum(f.seconds for f in features.values())
    groups_s = sum(a.train.wall_seconds for a in groups)
    boost_s = sum(b.seconds for b in boosting)
    ensemble_s = s1 + estimation_s + groups_s + boost_s
    return Compute(gradients_s=s1, estimation_s=estimation_s, group_adapters_s=groups_s,
                   boosting_s=boost_s, ensemble_pipeline_s=ensemble_s,
                   baseline_s=base.wall_seconds, ratio=ensemble_s / max(base.wall_seconds, 1e-9),
                   baseline_flops=base.flops_estimate,
                   group_flops=sum(a.train.flops_estimate for a in groups),
                   peak_memory_bytes=max(a.train.peak_memory_bytes
                                         for a in [*groups, adapters.single]))


@stage(6, "evaluation", config=("seed",),
       reads=lambda ensemble, scores, baseline, compute: [t for g in ensemble.groups
                                                           for t in g.tasks],
       key_args=lambda ensemble, scores, baseline, compute: {
           "ensemble": ensemble, "scores": _members(ensemble.groups, scores, baseline),
           "baseline": baseline, "compute": compute})
def evaluate(run: Run, ensemble: EnsembleRecord, scores: dict[str, ScoresRecord],
             baseline: str, compute: Compute) -> EvaluationRecord:
    """Test accuracy of the ensemble, of each task's own group ensemble and of the
    single-adapter baseline; metrics.json."""
    from .benchmark import paired_bootstrap
    from .boosting import group_scores
    from .choices import flatten
    from .ensemble import combine_probabilities, probabilities

    member = read_scores(scores)
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
        chosen = {"single": probabilities(member[baseline][t]["test"]),
                  "group": probs[group_of[t]], "ensemble": combined}
        predictions[t] = {"gold": gold}
        acc = {}
        for method, p in chosen.items():
            z, layout = flatten(p, gold)
            predictions[t][method] = layout.argmax(z).tolist()
            acc[method] = float(np.mean(layout.correct(z)))
        counts = np.bincount(gold)
        per_task[t] = TaskMetrics(len(test), group_of[t], list(w), acc["single"], acc["group"],
                                  acc["ensemble"], float(counts.max() / counts.sum()))
    correct = {m: [{t: (np.asarray(predictions[t][m]) == np.asarray(predictions[t]["gold"]))
                    .astype(np.float64) for t in per_task}] for m in ("ensemble", "single")}
    d, lo, hi = paired_bootstrap(correct["ensemble"], correct["single"], seed=run.cfg.seed)
    avg = Averages(**{k: float(np.mean([getattr(v, k) for v in per_task.values()]))
                      for k in ("baseline_accuracy", "group_accuracy", "ensemble_accuracy",
                                "majority")}, difference=d, difference_low=lo,
                   difference_high=hi)
    metrics = Metrics(per_task, avg, compute, len(groups), [list(g.tasks) for g in groups])
    ref = run.dir.write_json(run.dir.metrics, metrics.to_json())
    preds = run.dir.write_json(run.dir.predictions, predictions)
    return EvaluationRecord(ref, metrics, preds)


def baseline_plan(run: Run, groups: GroupsRecord, features: dict[str, FeaturesRecord]
                  ) -> dict[str, dict[str, list[str]]]:
    """The adapters of the baselines that ``evaluation.baselines`` asks for: method ->
    adapter name -> the tasks it is trained on and answers (``baselines``). The random grouping
    takes the SDP's group sizes (seeded by the run's seed), the gradient grouping as many
    groups; MTL-FT's adapters start from the single adapter (stage 4 trains them after it)."""
    from .baselines import gradient_grouping, random_grouping

    cfg, tasks = run.cfg, run.task_names
    plan: dict[str, dict[str, list[str]]] = {}
    for method in cfg.evaluation.baselines:
        if method == "per-task":
            plan[method] = {f"task-{t}": [t] for t in tasks}
        elif method == "mtl-ft":
            plan[method] = {f"mtl-{t}": [t] for t in tasks}
        elif method == "random-groups":
            sizes = [len(g) for g in groups.group_tasks]
            plan[method] = {f"random-{k}": g for k, g in enumerate(
                random_grouping(tasks, sizes, cfg.seed))}
        elif method == "gradient-groups":
            d = cfg.estimation.surrogate_dim
            tables = {t: feature_table(features[t].train.path, features[t].train.sha256, d)
                      for t in tasks}
            plan[method] = {f"gradient-{k}": g for k, g in enumerate(
                gradient_grouping(tables, len(groups.group_tasks), cfg.clustering.solver))}
    return plan


@stage(6, "baselines", config=(), reads=lambda plan, adapters, scores: [
    t for members in plan.values() for ts in members.values() for t in ts])
def evaluate_baselines(run: Run, plan: dict[str, dict[str, list[str]]],
                       adapters: AdaptersResult, scores: dict[str, ScoresRecord]
                       ) -> BaselinesRecord:
    """Test accuracy and compute of each baseline of ``plan`` (``baseline_plan``) and of the
    single adapter; baselines.json (with each method's test predictions)."""
    from .choices import flatten
    from .ensemble import probabilities

    member = read_scores(scores)
    methods = {"single": {adapters.single.name: list(run.task_names)}, **plan}
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
        spent = deployed + ([adapters.single.train] if method == "mtl-ft" else [])  # + phase 1
        results[method] = BaselineResult(
            method, answers, accuracy, float(np.mean(list(accuracy.values()))),
            flops=float(sum(r.flops_estimate for r in spent)),
            wall_s=float(sum(r.wall_seconds for r in spent)),
            peak_memory_bytes=max(r.peak_memory_bytes for r in spent),
            adapter_parameters=int(sum(r.trainable_parameters for r in deployed)))
    ref = run.dir.write_json(run.dir.baselines, {
        "results": {k: v.to_json() for k, v in results.items()}, "predictions": predictions})
    return BaselinesRecord(ref, results)


def finish(run: Run, features: dict[str, FeaturesRecord], groups: GroupsRecord,
           adapters: AdaptersResult, boosting: Sequence[BoostRecord],
           ensemble: EnsembleRecord, evaluation: EvaluationRecord,
           linearity: LinearityRecord | None, config: dict,
           baselines: BaselinesRecord | None = None):
    """The report (report.md, affinity.png) and the run's manifest.json: every output with
    its sha256, the resolved config and the code version. Returns (``report.Report``, the
    manifest's FileRef)."""
    from .affinity import Affinity
    from .report import write_report

    affinity = Affinity.from_json(run.dir.read_text(groups.affinity.path))
    report = write_report(run.dir, run.cfg.name, evaluation.metrics, affinity,
                          run.dir.read_json(groups.groups.path), boosting, linearity,
                          None if baselines is None else baselines.results)
    files = {}
    for rec in features.values():
        for split in GRADIENT_SPLITS:
            f = rec.split(split)
            files[run.dir.relative(f.path)] = f.sha256
    files[run.dir.relative(groups.affinity.path)] = groups.affinity.sha256
    files[run.dir.relative(groups.groups.path)] = groups.groups.sha256
    for a in [*adapters.all().values(), *(b.adapter for b in boosting)]:
        files[run.dir.relative(run.dir.adapter_weights(a.name))] = a.sha256
    for ref in [ensemble.file, evaluation.file, evaluation.predictions,
                *([baselines.file] if baselines is not None else [])]:
        files[run.dir.relative(ref.path)] = ref.sha256
    files[run.dir.relative(report.file.path)] = report.file.sha256
    # the manifest vouches for the files as they are: a file changed since its record was
    # made (another run writing this directory) is an error, not a wrong manifest
    changed = [rel for rel, sha in files.items()
               if not FileRef(run.dir.resolve(rel), sha).verified()]
    if changed:
        raise RuntimeError(
            f"{len(changed)} output(s) of run directory {run.dir.url} changed while this run "
            f"finished ({', '.join(changed[:3])}{' …' if len(changed) > 3 else ''}); another "
            "run wrote this directory: run again (the changed stages are recomputed)")
    manifest = run.dir.write_json(run.dir.manifest, {
        "name": run.cfg.name, "config_sha256": run.cfg.fingerprint(), "config": config,
        "code_version": code_version(), "files": files})
    return report, manifest
