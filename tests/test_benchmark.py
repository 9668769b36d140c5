"""The benchmark command's code path on the tiny model under a real Prefect server: the
pipeline once per seed, each in its own run directory, then the table with mean ± std, the
majority-class rates and the paired difference with its bootstrap interval."""
import json

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.cli import main

from capture_utils import prefect_console_follows_capsys  # noqa: F401 (autouse)
from conftest import REPO

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)


def test_benchmark_over_two_seeds(tmp_path, data_root, cache_dir, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", str(REPO / "configs" / "tiny.yaml"), "--seed-list", "0,1",
            "--set", f"output_dir={out}", "--set", f"data_root={data_root}",
            "--set", f"cache_dir={cache_dir}", "--set", "evaluation.baselines=[per-task]"]
    with prefect_test_harness(server_startup_timeout=120):
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over 2 seeds (0, 1)" in printed and "majority class" in printed
    res = json.loads((out / "benchmark.json").read_text())
    assert res["seeds"] == [0, 1]
    for s in (0, 1):
        metrics = json.loads((out / f"seed-{s}" / "metrics.json").read_text())
        run = json.loads((out / f"seed-{s}" / "run.json").read_text())
        assert run["seed"] == s
        assert set(metrics["tasks"]) == {"rte", "cb", "copa", "wic"}
    summary = res["summary"]  # the JSON's keys are sorted; "methods" keeps the table's order
    assert res["methods"] == ["single", "per-task", "group_adapter", "group", "ensemble"]
    assert set(summary) == set(res["methods"])
    seeds_acc = [json.loads((out / f"seed-{s}" / "metrics.json").read_text())["average"]
                 ["ensemble_accuracy"] for s in (0, 1)]
    assert summary["ensemble"]["average"][0] == pytest.approx(sum(seeds_acc) / 2)
    ci = res["ensemble_minus_single"]
    assert ci["low"] <= ci["difference"] <= ci["high"]
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert "Ensemble − single adapter" in (out / "benchmark.md").read_text()
