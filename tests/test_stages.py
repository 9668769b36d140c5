"""The run layer: what each stage declares it depends on (and may read), the run directory's
layout and its guard against paths that leave it, the typed records, the choice math."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydantic import BaseModel

from ensemble_core import stages
from ensemble_core.choices import Choices, flatten
from ensemble_core.config import RunConfig, parse_config
from ensemble_core.records import (FeaturesRecord, FileRef, GroupEnsemble, Member,
                                   ProjectionInfo, SplitFeatures)
from ensemble_core.run import LOCATION_FIELDS, Run, StageInputError
from ensemble_core.rundir import RunDir, RunDirError

from conftest import REPO, tiny_config


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_config_field_is_declared_by_a_stage_or_the_planning():
    """A new config option must say what it changes: a stage whose result depends on it (its
    cache key then covers it), the planning of the stages' arguments, or nothing (where things
    are). Otherwise a changed value could be served a stale cache."""
    declared = set(stages.PLANNING)
    for spec in stages.STAGES.values():
        declared |= set(spec.config) | set(spec.uses)
    uncovered = [p for p in _leaves(RunConfig)
                 if p.split(".")[0] not in LOCATION_FIELDS
                 and not any(p == d or p.startswith(d + ".") for d in declared)]
    assert not uncovered, f"config fields no stage declares: {uncovered}"
    assert [s.number for s in stages.STAGES.values()] == sorted(
        s.number for s in stages.STAGES.values())  # declared in stage order
    assert {s.number for s in stages.STAGES.values()} == {1, 2, 3, 4, 5, 6}


@pytest.fixture
def run(tmp_path):
    return Run(parse_config(tiny_config("/nowhere", tmp_path / "run")))


def test_a_stage_sees_only_what_it_declared(run):
    view = run.for_stage("subsets", ("estimation.l2", "estimation.max_norm"), [])
    assert view.cfg.estimation.l2 == run.cfg.estimation.l2
    assert view.cfg.run_dir == run.cfg.run_dir  # where things are: readable everywhere
    with pytest.raises(StageInputError, match="reads config field 'estimation.metric'"):
        view.cfg.estimation.metric
    with pytest.raises(StageInputError, match="reads config field 'training'"):
        view.cfg.training
    with pytest.raises(StageInputError, match="data of task 'rte'"):
        view.task_data("rte")
    whole = run.for_stage("train", ("training",), ["rte"])
    assert whole.cfg.training is run.cfg.training  # a declared section is the real object
    with pytest.raises(AttributeError):
        view.cfg.estimation.l2 = 1.0
    # a derived value (a property) is computed through the view: it needs its fields declared
    with pytest.raises(StageInputError, match="'estimation.projection_dim'"):
        view.cfg.estimation.stored_dim
    dims = run.for_stage("g", ("estimation.projection_dim",), [])
    assert dims.cfg.estimation.stored_dim == 32


def _subset_inputs(cfg) -> dict:
    return stages.fit_subsets.stage.inputs(Run(cfg), features={}, batch=0, subsets=[],
                                           tasks=[])


def test_cache_inputs_follow_the_declaration(run):
    base = _subset_inputs(run.cfg)
    assert base["config"] == {"estimation.l2": run.cfg.estimation.l2,
                              "estimation.max_norm": None,
                              "estimation.max_adapter_distance": 1.0,
                              "estimation.fit_dim": None, "estimation.projection_dim": 32}
    changed = run.cfg.model_copy(deep=True)
    changed.estimation.l2 = 0.5
    assert _subset_inputs(changed)["config"] != base["config"]
    other = run.cfg.model_copy(deep=True)
    other.training.epochs = 7  # stage 2 does not depend on training
    assert _subset_inputs(other) == base


def test_cache_inputs_use_the_records_content_keys(run):
    info = ProjectionInfo(100, 10, 0, 32, 1.5)
    rec = FeaturesRecord("rte", FileRef("m", "s0"), SplitFeatures("a", "s1", 4, 2),
                         SplitFeatures("b", "s2", 4, 2), info, seconds=3.0)
    slower = dataclasses.replace(rec, seconds=9.0)  # a timing is not content
    key = lambda r: stages.fit_subsets.stage.inputs(  # noqa: E731
        run, features={"rte": r, "cb": r}, batch=1, subsets=[[0]], tasks=["rte", "cb"])
    assert key(rec) == key(slower)
    assert list(key(rec)["args"]["features"]) == ["rte"]  # only the tasks the batch uses
    other = dataclasses.replace(rec, train=SplitFeatures("a", "s9", 4, 2))
    assert key(other) != key(rec)


def test_run_directory_layout_and_guard(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    assert rd.features("rte", "train") == f"{rd.url}/gradients/rte/train.parquet"
    assert rd.adapter("group-0") == f"{rd.url}/adapters/group-0"
    assert rd.relative(rd.adapter("group-0")) == "adapters/group-0"
    assert rd.resolve("adapters/group-0") == rd.adapter("group-0")
    for bad in ["/etc/passwd", "~/x", "../x", "adapters/../../x", "s3://b/x", "", "."]:
        with pytest.raises(RunDirError):
            rd.resolve(bad)
    for name in ["../x", "a/b", "", ".hidden", "x y"]:
        with pytest.raises(RunDirError, match="cannot be a file name"):
            rd.features(name, "train")
    with pytest.raises(RunDirError, match="is not a local path"):
        RunDir("memory://bucket/run").local("memory://bucket/run/adapters/x")


def test_claim_refuses_another_identity(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    ident = {"name": "a", "model": {"name": "tiny-llama"}, "adapter": {"r": 4}, "seed": 0}
    assert rd.claim(ident) == ident
    assert rd.claim(ident) == ident
    with pytest.raises(RunDirError, match=r"belongs to another run \(different seed\)"):
        rd.claim(dict(ident, seed=1))


def test_records_round_trip_through_json():
    g = GroupEnsemble("group-0", ["rte", "cb"], [Member("group-0", 1.0),
                                                Member("theta-star", -1.0)])
    assert GroupEnsemble.from_json(g.to_json()) == g
    assert GroupEnsemble.from_json(g) is g
    info = ProjectionInfo(460800, 400, 0, 32768, 2.5, 2000.0)
    assert info.norm_for_adapter_distance(1.0) == 1.0 * 2.5 / (460800 / 400) ** 0.5
    assert info.adapter_distance(info.norm_for_adapter_distance(1.0)) == pytest.approx(1.0)
    assert info.relative_distance(info.norm_for_adapter_distance(1.0)) == pytest.approx(2.5 / 2000)
    assert ProjectionInfo.from_json(info.to_json()) == info
    with pytest.raises(ValueError, match="not a valid GroupEnsemble record"):
        GroupEnsemble.from_json({"name": "g", "tasks": ["rte"]})


def _loop(z, n, gold):
    """Per example, by hand: softmax, log loss, argmax (the independent reference)."""
    out, i = [], 0
    for c, g in zip(n, gold):
        v = np.asarray(z[i:i + c], np.float64)
        p = np.exp(v - v.max()) / np.exp(v - v.max()).sum()
        out.append((p, -np.log(p[g]), int(np.argmax(v))))
        i += c
    return out


def test_choice_math_equals_a_per_example_loop():
    rng = np.random.default_rng(0)
    n = rng.integers(2, 5, size=50)
    gold = [int(rng.integers(0, c)) for c in n]
    z = rng.standard_normal(int(n.sum())) * 5
    z[:2] = [1.0, 1.0]  # a tie: the first choice wins
    layout = Choices(n, gold)
    ref = _loop(z, n, gold)
    np.testing.assert_allclose(layout.softmax(z), np.concatenate([p for p, _, _ in ref]),
                               rtol=1e-13)
    np.testing.assert_allclose(layout.losses(z), [loss for _, loss, _ in ref], rtol=1e-12,
                               atol=1e-14)
    assert layout.argmax(z).tolist() == [a for _, _, a in ref]
    r = layout.residuals(z)
    onehot = np.zeros_like(z)
    onehot[layout.gold_rows] = 1.0
    np.testing.assert_allclose(r, onehot - layout.softmax(z), atol=1e-15)
    flat, again = flatten(layout.split(z), gold)
    assert np.array_equal(flat, z) and np.array_equal(again.gold_rows, layout.gold_rows)
    with pytest.raises(ValueError, match="gold index 3 outside 0..1"):
        Choices([2], [3])


def test_estimation_sample_is_seeded_recorded_and_bounded(data_root, cache_dir, tmp_path):
    """estimation.max_examples: stage 1 (and so the surrogate) uses a seeded sample of each
    task's split, recorded in the manifest; fine-tuning still sees every example."""
    from ensemble_core.storage import read_json

    raw = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    raw["estimation"] = dict(raw["estimation"], max_examples={"train": 5})
    run = Run.open(parse_config(raw))
    full = run.task_data("cb").splits["train"]
    sample = stages.estimation_examples(run, "cb", "train")
    assert len(sample) == 5 and len(full) == 8
    assert [e.example_id for e in sample] == [e.example_id for e in full if e in sample]
    assert sample == stages.estimation_examples(run, "cb", "train")  # seeded
    other = dict(raw, seed=1)
    assert stages.estimation_examples(Run(parse_config(other)), "cb", "train") != sample
    assert stages.estimation_examples(run, "cb", "validation") == \
        run.task_data("cb").splits["validation"]  # no cap on validation
    rec = stages.gradient_features(run, "cb")
    assert rec.train.examples == 5 and rec.train.rows == 15 and rec.validation.examples == 6
    man = read_json(rec.manifest.url(run.dir.url))
    assert man["estimation_sample"]["train"]["ids"] == [e.example_id for e in sample]
    assert man["estimation_sample"]["train"]["from_n"] == 8 and "validation" not in \
        man["estimation_sample"]
    raw["estimation"]["max_examples"] = {"train": 9}
    with pytest.raises(ValueError, match=r"estimation.max_examples.train = 9, but task 'rte' "
                                         r"has only 8 train examples"):
        stages.estimation_examples(Run(parse_config(raw)), "rte", "train")


def _with_tasks(names, **estimation):
    from conftest import tiny_config

    cfg = tiny_config("/nowhere", "/tmp/nowhere")
    cfg["tasks"] = [{"name": n, "builtin": "superglue/rte"} for n in names]
    cfg["estimation"] = {**cfg["estimation"], "n_subsets": 10, "subset_size": 2,
                         "min_pair_coverage": 1, "subsets_per_task_run": 2, **estimation}
    return parse_config(cfg)


def _covered(cfg, batches) -> bool:
    import itertools

    subsets = [set(s) for b in batches for s in b]
    return all(any({i, j} <= s for s in subsets)
               for i, j in itertools.combinations(range(len(cfg.tasks)), 2))


def test_a_subset_plan_is_extended_not_redrawn():
    """Issue 14, item 1: adding a task keeps every subset in its batch and adds only subsets
    that cover the new task's pairs; removing a task drops its subsets (and covers what they
    covered); other sampling settings draw a new plan."""
    four = _with_tasks(["a", "b", "c", "d"])
    first = stages.plan_batches(four)
    assert first == stages.subset_batches(four, stages.plan_subsets(four))  # a fresh directory
    plan = stages.subset_plan(four, first)
    assert stages.plan_batches(four, plan) == first  # the same tasks: the same plan

    five = _with_tasks(["a", "b", "c", "d", "e"])
    grown = stages.plan_batches(five, plan)
    named = stages.subset_plan(five, grown)["batches"]
    assert named[:len(first)] == plan["batches"]  # every old subset, in its old batch
    added = [s for b in named[len(first):] for s in b]
    assert added and all("e" in s for s in added) and len(added) == 4  # e's 4 pairs, once each
    assert _covered(five, grown)

    three = _with_tasks(["a", "b", "d"])
    shrunk = stages.subset_plan(three, stages.plan_batches(three, plan))["batches"]
    assert all("c" not in s for b in shrunk for s in b)
    assert _covered(three, stages.plan_batches(three, plan))

    other = _with_tasks(["a", "b", "c", "d", "e"], subset_size=3)
    assert stages.plan_batches(other, plan) == stages.subset_batches(other,
                                                                      stages.plan_subsets(other))


def test_stage1_seconds_count_work_not_waiting(data_root, cache_dir, tmp_path):
    """Stage 1's tasks run concurrently and take turns on the device; the compute ratio sums
    their seconds (stages.compute_summary), so a task's seconds must not include the time it
    waited for another task's turn: together they cannot exceed the wall time they took."""
    import threading
    import time

    raw = tiny_config(data_root, tmp_path / "run", cache_dir=str(cache_dir))
    run = Run.open(parse_config(raw))
    stages.gradient_features(run, "rte")  # loads the model: not part of the timed turns
    records, start = {}, threading.Barrier(3)

    def one(task):
        start.wait()
        records[task] = stages.gradient_features(run, task)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("rte", "cb", "copa")]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r.seconds for r in records.values())
    assert 0 < total <= wall * 1.05 + 0.05, (total, wall)


def test_the_compute_ratio_counts_the_member_scoring():
    """Issue 33, item 3: the ratio to one adapter the paper's way (stage 1, fits, group
    adapters, boosting) and with the member scoring before the weights (fit phase only: the
    test scoring is evaluation, which one adapter needs too), in seconds and FLOPs."""
    from ensemble_core.records import (AdapterRecord, AdaptersResult, BoostRecord,
                                       FeaturesRecord, ScoresRecord, SplitFeatures, TrainResult)

    def train(s, flops):
        return TrainResult(best_epoch=1, history=[], wall_seconds=s, n_steps=1, tokens_seen=1,
                           flops_estimate=flops, peak_memory_bytes=1, trainable_parameters=1)

    f = FileRef("/x", "0" * 64)
    split = SplitFeatures("/x", "0" * 64, 1, 1)
    feats = {t: FeaturesRecord(t, f, split, split, ProjectionInfo(10, 2, 0, 1, 1.0), seconds=3.0,
                               flops=30.0) for t in ("a", "b")}
    groups = {"group-0": AdapterRecord("group-0", ["a"], "/g0", "0", train(10.0, 100.0)),
              "group-1": AdapterRecord("group-1", ["b"], "/g1", "0", train(12.0, 120.0))}
    adapters = AdaptersResult(groups, AdapterRecord("all-tasks", ["a", "b"], "/s", "0",
                                                    train(20.0, 200.0)),
                              AdapterRecord("theta-star", [], "/t", "0"))
    boost = [BoostRecord(adapters.single, "group-0", 1, 0.1, 1.0, 0.9, None, None, 0.0, True,
                         2.0)]
    scores = {"g/a": ScoresRecord("group-0", f, 4.0, "fit", "a", flops=40.0),
              "g/a:test": ScoresRecord("group-0", f, 50.0, "test", "a", flops=500.0)}
    c = stages.compute_summary(feats, 1.0, adapters, boost, scores)
    assert c.ratio == pytest.approx((6 + 1 + 22 + 2) / 20)
    assert c.ratio_with_scoring == pytest.approx((6 + 1 + 22 + 2 + 4) / 20)
    assert c.flops_ratio == pytest.approx((60 + 220) / 200)
    assert c.flops_ratio_with_scoring == pytest.approx((60 + 220 + 40) / 200)


def test_a_stage_code_version_covers_the_code_it_runs_only():
    """Issue 31, item 3: a stage's cache key holds the version of its module and of every
    library module it imports, transitively — stage 1 reaches the gradient code, not the
    report (tests/test_object_storage.py edits a copy of the repository and reruns it)."""
    from ensemble_core.runtime import _code_graph, _reachable, code_version

    graph = _code_graph()
    s1 = _reachable(graph, "ensemble_core.stages.stage1_features")
    assert {"ensemble_core.gradients", "ensemble_core.projection", "ensemble_core.models",
            "ensemble_core.stages.declaration"} <= s1
    assert "ensemble_core.report" not in s1 and "ensemble_core.versions" not in s1
    assert "ensemble_core.stages" not in s1  # the package's __init__ re-exports every stage
    assert "ensemble_core.report" in _reachable(graph, "ensemble_core.stages.stage6_evaluation")
    assert code_version("ensemble_core.stages.stage1_features") != code_version()


def test_scoring_flops_do_not_depend_on_the_members_loaded_before(data_root, cache_dir):
    """The scoring FLOPs count the base model's parameters, not the member adapters a
    process happened to have loaded into its scoring model (that made metrics.json differ
    between a run in one process and one over several workers)."""
    from ensemble_core.config import load_config
    from ensemble_core.models import load_model
    from ensemble_core.stages.stage5_boosting import _base_parameters

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [f"data_root={data_root}"])
    model = load_model(cfg, cache_dir).model
    before = _base_parameters(model)
    model.add_adapter("another-member", model.peft_config["default"])
    assert _base_parameters(model) == before
