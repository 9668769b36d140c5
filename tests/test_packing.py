"""Stage 1 over several small datasets in one task run (issue 32, ``runner.feature_runs``):
each task's features are exactly those of computing it alone, a task whose inputs did not
change is read back however the tasks are packed, and a file not as written is recomputed."""
from __future__ import annotations

import hashlib
import json
import os

from ensemble_core import algorithm2, stages
from ensemble_core.config import parse_config
from ensemble_core.run import Run

from conftest import tiny_config


def _files(run, tasks):
    return {(t, s): run.dir.features(t, s) for t in tasks for s in ("train", "validation")}


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_packed_features_equal_alone_and_read_back(data_root, tmp_path, cache_dir):
    raw = tiny_config(data_root, tmp_path / "alone", cache_dir=str(cache_dir))
    tasks = [t["name"] for t in raw["tasks"]]
    alone_run = Run.open(parse_config(dict(raw, runner={"feature_runs": 0})))
    alone = algorithm2.gradient_features(alone_run).features
    packed_raw = dict(raw, output_dir=str(tmp_path / "packed"), runner={"feature_runs": 2})
    run = Run.open(parse_config(packed_raw))
    calls = []

    class Counting(algorithm2.Runner):
        def map(self, fn, args):
            calls.append((fn.stage.name, [a[0] for a in args]))
            return super().map(fn, args)

    packed = algorithm2.gradient_features(run, Counting(run)).features
    # three tasks in at most two task runs, consecutive, each computed as alone
    assert calls == [("gradients-pack", [tasks[:2], tasks[2:]])]
    for (t, s), f in _files(run, tasks).items():
        assert _digest(f) == _digest(alone_run.dir.features(t, s)), (t, s)
    assert {t: r.key() for t, r in packed.items()} == {t: r.key() for t, r in alone.items()}

    # packed otherwise (one run of all three): every task read back, no file written
    files = _files(run, tasks) | {(t, "manifest"): run.dir.features_manifest(t) for t in tasks}
    mtimes = {k: os.stat(f).st_mtime_ns for k, f in files.items()}
    again = stages.gradient_features_pack(run, tasks)
    assert {r.task: r for r in again.records} == packed  # seconds and FLOPs too
    assert {k: os.stat(f).st_mtime_ns for k, f in files.items()} == mtimes

    # a feature file changed, or a manifest one byte longer: that task alone is recomputed
    victim = run.dir.features("cb", "validation")
    data = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(data[:-10])
    man = run.dir.features_manifest("copa")
    with open(man, "ab") as f:
        f.write(b" ")
    fixed = stages.gradient_features_pack(run, tasks)
    now = {k: os.stat(f).st_mtime_ns for k, f in files.items()}
    assert sorted(k for k in files if now[k] != mtimes[k]) == [
        ("cb", "manifest"), ("cb", "train"), ("cb", "validation"),
        ("copa", "manifest"), ("copa", "train"), ("copa", "validation")]
    assert open(victim, "rb").read() == data
    assert {r.task: r.key() for r in fixed.records} == {t: r.key() for t, r in packed.items()}

    # another config value the features depend on: a different key, nothing read back
    other = json.loads(json.dumps(packed_raw))
    other["estimation"]["projection_seed"] = 7
    moved = stages.gradient_features_pack(Run(parse_config(other)), tasks[:1])
    assert moved.records[0].train.sha256 != packed[tasks[0]].train.sha256
