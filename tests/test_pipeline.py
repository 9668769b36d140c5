"""The whole pipeline on configs/tiny.yaml under a real Prefect server: outputs, manifest,
boosting, inference consistency; a second run is served entirely from the cache."""
import json

import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from ensemble_core.data import load_task
from ensemble_core.ensemble import EnsembleModel
from ensemble_core.storage import file_sha256
from flows.pipeline import ensemble_lora

from conftest import REPO
from prefect_utils import task_states

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root, cache_dir):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    overrides = [f"output_dir={out}", f"data_root={data_root}", f"cache_dir={cache_dir}",
                 "evaluation.baselines=[per-task, mtl-ft, random-groups, gradient-groups]"]
    with prefect_test_harness(server_startup_timeout=120):
        first = ensemble_lora(str(REPO / "configs" / "tiny.yaml"), overrides, return_state=True)
        states1 = task_states(first.state_details.flow_run_id)
        second = ensemble_lora(str(REPO / "configs" / "tiny.yaml"), overrides, return_state=True)
        states2 = task_states(second.state_details.flow_run_id)
    return out, first.result(), states1, second.result(), states2


def test_outputs_and_manifest(runs):
    out, res, states1, _, _ = runs
    for name in ["manifest.json", "metrics.json", "ensemble.json", "groups.json",
                 "affinity.json", "report.md", "affinity.png", "boosting.json", "predictions.json",
                 "baselines.json"]:
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, sha in manifest["files"].items():
        assert file_sha256(str(out / rel)) == sha, rel
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"rte", "cb", "copa", "wic"}
    for m in metrics["tasks"].values():
        assert 0 <= m["ensemble_accuracy"] <= 1 and abs(sum(m["weights"]) - 1) < 1e-6
        assert min(m["weights"]) >= 0
    assert metrics["compute"]["ratio"] > 0
    assert all(s == "Completed" for s in states1.values()), states1


def test_second_run_entirely_cached(runs):
    _, res1, states1, res2, states2 = runs
    assert set(states2) == set(states1)
    assert all(s == "Cached" for s in states2.values()), states2
    assert res2.metrics == res1.metrics


def test_the_run_publishes_one_version_and_a_cached_rerun_none(runs):
    """Issue 14, item 3: the finished run is published as the current version; the second,
    cached run has the same ensemble and publishes nothing new."""
    from ensemble_core import versions

    out, res1, _, res2, _ = runs
    assert res1.version and res1.promoted and res2.version == res1.version
    listed = versions.list_versions(out)
    assert [v["version"] for v in listed] == [res1.version] and listed[0]["current"]
    vdir = out / "versions" / res1.version
    assert (vdir / "ensemble.json").read_bytes() == (out / "ensemble.json").read_bytes()
    assert json.loads((vdir / "config.json").read_text())["name"] == "tiny"
    spec = json.loads((out / "ensemble.json").read_text())
    assert set(spec["validation"]) == {"rte", "cb", "copa", "wic"}
    assert EnsembleModel.from_pretrained(out).version == res1.version


def test_baselines_beside_the_ensemble(runs):
    out, res, _, _, _ = runs
    tasks = ["rte", "cb", "copa", "wic"]
    base = json.loads((out / "baselines.json").read_text())
    assert set(base["results"]) == {"single", "per-task", "mtl-ft", "random-groups",
                                    "gradient-groups"}
    assert set(res.baselines) == set(base["results"])
    groups = json.loads((out / "groups.json").read_text())["groups"]
    sizes = sorted(len(g["tasks"]) for g in groups)
    for method, r in base["results"].items():
        assert sorted(r["accuracy"]) == sorted(tasks), method
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["flops"] > 0 and r["wall_s"] > 0 and r["adapter_parameters"] > 0
        n_adapters = len(set(r["answers"].values()))
        assert n_adapters == {"single": 1, "per-task": 4, "mtl-ft": 4}.get(method, len(sizes))
    answers = list(base["results"]["random-groups"]["answers"].values())
    assert sorted(answers.count(a) for a in set(answers)) == sizes  # the SDP's group sizes
    # MTL-FT's phase 2 starts where the shared adapter ended: its initial validation loss on
    # its task is the shared adapter's (best epoch) validation loss on that task
    shared = json.loads((out / "adapters" / "all-tasks" / "training.json").read_text())
    best = next(h for h in shared["history"] if h["epoch"] == shared["best_epoch"])
    for t in tasks:
        mtl = json.loads((out / "adapters" / f"mtl-{t}" / "training.json").read_text())
        assert mtl["history"][0]["val"][t]["loss"] == pytest.approx(best["val"][t]["loss"],
                                                                     rel=1e-5), t
    assert base["results"]["mtl-ft"]["flops"] > base["results"]["single"]["flops"]
    preds = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for t in tasks:
        gold = preds[t]["gold"]
        acc = sum(p == g for p, g in zip(preds[t]["ensemble"], gold)) / len(gold)
        assert acc == pytest.approx(metrics["tasks"][t]["ensemble_accuracy"])
    assert "## Baselines" in (out / "report.md").read_text()


def test_boosting_lowered_the_chosen_groups_training_loss(runs):
    out = runs[0]
    steps = json.loads((out / "boosting.json").read_text())["steps"]
    assert steps, "tiny.yaml asks for one boosting step"
    first = steps[0]
    assert first["train_loss_after"] < first["train_loss_before"]
    assert (out / "adapters" / first["name"] / "adapter_model.safetensors").is_file()


def test_ensemble_model_reproduces_the_pipeline_evaluation(runs, data_root):
    out = runs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    model = EnsembleModel.from_pretrained(out)
    cfg_tasks = {t["name"]: t for t in json.loads((out / "manifest.json").read_text())
                 ["config"]["tasks"]}
    from ensemble_core.data import TaskConfig
    for task in ["rte", "copa"]:
        td = load_task(TaskConfig(**cfg_tasks[task]), data_root)
        preds = model.predict(task, td.splits["test"])
        acc = np.mean([p["choice"] == e.label for p, e in zip(preds, td.splits["test"])])
        assert acc == pytest.approx(metrics["tasks"][task]["ensemble_accuracy"], abs=1e-9)
        for p in preds:
            assert abs(sum(p["probabilities"].values()) - 1) < 1e-5


def test_run_directory_of_another_config_is_refused(runs, data_root):
    from ensemble_core.config import load_config
    from ensemble_core.run import Run
    from ensemble_core.rundir import RunDirError

    out = runs[0]
    same = load_config(str(REPO / "configs" / "tiny.yaml"),
                       [f"output_dir={out}", "training.epochs=2", "tasks.0.max_examples.train=8"])
    Run.open(same)  # other training/data settings: resumable, recomputed where needed
    other = load_config(str(REPO / "configs" / "tiny.yaml"),
                        [f"output_dir={out}", "adapter.r=8"])
    with pytest.raises(RunDirError, match=r"belongs to another run \(different adapter\)"):
        Run.open(other)


def test_rescoring_the_members_directly_gives_the_stored_scores(runs, data_root, cache_dir):
    """bench/rescore.py (BENCHMARKS.md's direct scoring figures) recomputes every score file of
    a finished run with the run's own settings: the same predicted choices and score
    differences, so its timings measure the pipeline's own forward work."""
    import subprocess
    import sys

    out = runs[0]
    n_files = len(list(out.glob("scores/*/*.json")))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rescore.py"), str(REPO / "configs" / "tiny.yaml"),
         "--set", f"output_dir={out}", "--set", f"data_root={data_root}",
         "--set", f"cache_dir={cache_dir}", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["files"] == n_files > 0
    assert res["agree"] == res["examples"] > 0
    assert res["max_change"] <= 1e-5, res
