"""The `ensemble-lora` command line: exit codes, one-line errors that carry the failing task's own
message, `--set` overrides on every subcommand, the summary tables, and `predict` on a finished
run."""
from __future__ import annotations

import json
import math

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.cli import error_reason, main

from capture_utils import prefect_console_follows_capsys  # noqa: F401 (autouse)
from conftest import REPO

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)

CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def base(data_root, cache_dir):
    return ["--set", f"data_root={data_root}", "--set", f"cache_dir={cache_dir}"]


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("ensemble-lora:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("ensemble-lora: error: ")
    return lines[0]


def test_usage_errors_and_help_return_exit_codes(capsys):
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["--help"]) == 0
    assert "gradients" in capsys.readouterr().out


def test_gradients_with_overrides_prints_summary(prefect_server, base, tmp_path, capsys):
    rc = main(["gradients", CONFIG, *base, "--set", f"output_dir={tmp_path / 'run'}",
               "--set", "tasks.0.max_examples.train=4", "--set", "tasks.1.max_examples.train=6",
               "--set", "estimation.projection_dim=16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:6]] == ["task", "train", "validation",
                                                             "rows", "features"]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in lines[2:6]}
    assert set(rows) == {"rte", "cb", "copa", "wic"}
    assert rows["rte"][:3] == ["4", "8", str(2 * 4 + 2 * 8)]  # 2 choices per example
    assert rows["cb"][:3] == ["6", "8", str(3 * 6 + 3 * 8)]  # 3 choices
    assert rows["rte"][3].startswith(str(tmp_path / "run" / "gradients" / "rte"))
    assert "First-order check on rte" in out
    manifest = json.loads((tmp_path / "run" / "gradients" / "rte" / "manifest.json").read_text())
    assert manifest["d"] == 16


@pytest.mark.parametrize("command", ["gradients", "affinity", "run"])
def test_set_overrides_are_validated_for_every_config_command(command, base, tmp_path, capsys):
    rc = main([command, CONFIG, *base, "--set", f"output_dir={tmp_path}",
               "--set", "training.epochz=3"])
    assert rc == 1
    assert "unknown key 'training.epochz'" in _error_line(capsys.readouterr().err)
    rc = main([command, CONFIG, *base, "--set", "clustering.n_groups=9"])
    assert rc == 1
    assert "clustering.n_groups = 9" in _error_line(capsys.readouterr().err)


def test_failure_inside_a_task_reports_the_tasks_message(prefect_server, base, tmp_path,
                                                         capsys):
    """d > p is only found inside stage 1's task: the one line is that task's ValueError, not
    Prefect's 'Flow run encountered an exception'."""
    rc = main(["run", CONFIG, *base, "--set", f"output_dir={tmp_path / 'run'}",
               "--set", "estimation.projection_dim=100000"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 1
    assert "estimation.projection_dim = 100000 (d) is larger than the number of adapter " \
           "parameters p = " in line
    assert "encountered an exception" not in line
    assert not list((tmp_path / "run").rglob("manifest.json"))


def test_error_reason_unwraps_prefect_messages():
    wrapped = ValueError("Flow run encountered an exception: DataError: task 'rte': bad label")
    assert error_reason(wrapped) == "task 'rte': bad label"
    nested = RuntimeError("stage affinity (flow run x, 1) ended Failed: Flow run encountered an "
                          "exception: ValueError: d > p")
    assert error_reason(nested) == "stage affinity (flow run x, 1) ended Failed: d > p"
    assert error_reason(KeyError("")) == "''"
    assert error_reason(ValueError()) == "ValueError"
    assert error_reason(ValueError("first line\nsecond line")) == "first line"


@pytest.fixture(scope="module")
def finished_run(prefect_server, data_root, cache_dir, tmp_path_factory):
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", CONFIG, "--set", f"data_root={data_root}", "--set",
                   f"cache_dir={cache_dir}", "--set", f"output_dir={run_dir}"])
    assert rc == 0
    return run_dir, out.getvalue()


def test_run_prints_accuracy_table(finished_run):
    run_dir, out = finished_run
    assert "Test accuracy (%):" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task in ("rte", "cb", "copa", "wic", "average"):
        assert any(ln.startswith(f"| {task} ") for ln in out.splitlines()), (task, out)
    assert f"Run directory: {run_dir}" in out
    assert metrics["n_groups"] == 2 and "Groups: group-0: " in out


def test_predict_on_a_finished_run(finished_run, data_root, cache_dir, tmp_path, capsys):
    finished_run = finished_run[0]
    src = f"{data_root}/superglue/RTE/val.jsonl"
    with open(src, encoding="utf-8") as f:
        first5 = [next(f) for _ in range(5)]
    x = tmp_path / "x.jsonl"
    x.write_text("".join(first5), encoding="utf-8")
    y = tmp_path / "y.jsonl"
    rc = main(["predict", str(finished_run), "--task", "rte", "--input", str(x), "--output",
               str(y), "--set", f"cache_dir={cache_dir}", "--set", "device=cpu",
               "--set", "batch_size=2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "5 predictions for task rte" in out
    preds = [json.loads(ln) for ln in y.read_text().splitlines()]
    assert len(preds) == 5
    for p in preds:
        # RTE's own labels (label_values), the choice index and its continuation
        assert p["label"] in ("entailment", "not_entailment") and p["choice"] in (0, 1)
        assert p["continuation"] == [" yes", " no"][p["choice"]]
        assert p["label"] == ["entailment", "not_entailment"][p["choice"]]
        assert sorted(p["probabilities"]) == ["entailment", "not_entailment"]
        assert math.isclose(sum(p["probabilities"].values()), 1.0, abs_tol=1e-9)
        assert p["probabilities"][p["label"]] == max(p["probabilities"].values())


def test_predict_errors_are_one_line(finished_run, tmp_path, capsys):
    finished_run = finished_run[0]
    x = tmp_path / "x.jsonl"
    x.write_text('{"premise": "a", "hypothesis": "b"}\n')
    assert main(["predict", str(finished_run), "--task", "rte", "--input", str(x),
                 "--set", "colour=blue"]) == 1
    assert "predict: unknown --set key 'colour'" in _error_line(capsys.readouterr().err)
    assert main(["predict", str(finished_run), "--task", "nosuch", "--input", str(x)]) == 1
    assert "nosuch" in _error_line(capsys.readouterr().err)
    assert main(["predict", str(tmp_path / "missing-run"), "--task", "rte", "--input",
                 str(x)]) == 1
    assert "ensemble.json" in _error_line(capsys.readouterr().err)
    x.write_text("{not json\n")
    assert main(["predict", str(finished_run), "--task", "rte", "--input", str(x)]) == 1
    assert "line 1: not valid JSON" in _error_line(capsys.readouterr().err)
