"""Hardening (issue 36), as an operator would meet it: two runs of one config at once under
different PREFECT_HOMEs, SIGTERM and Ctrl-C during training, versions that own their files,
everything a version reads pinned, and `versions` telling the truth. Each test starts real
processes (`python -m flows.cli`) as a user would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # subprocesses, Prefect servers (make test-fast skips)

CONFIG = str(REPO / "configs" / "tiny.yaml")


def _env(tmp: Path, cache_dir, home: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    e.update(PREFECT_HOME=str(tmp / home), ENSEMBLE_LORA_CACHE=str(cache_dir),
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             PREFECT_SERVER_ANALYTICS_ENABLED="false")
    e.pop("ENSEMBLE_LORA_DEBUG", None)
    return e


def _cli(args, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _common(data_root, cache_dir, out: Path) -> list[str]:
    return ["--set", f"data_root={data_root}", "--set", f"cache_dir={cache_dir}",
            "--set", f"output_dir={out}"]


def test_two_runs_of_one_config_under_different_prefect_homes_share_the_work(
        tmp_path, data_root, cache_dir):
    """Issue 36, item 5: two `ensemble-lora run`s of one config on one directory at once, each
    with its own PREFECT_HOME (and so its own temporary server and result storage): both
    finish, with the same metrics and ensemble — the cached results live in the run directory,
    which both can read, not in one home's storage."""
    out = tmp_path / "run"
    procs = [_cli(["run", CONFIG, *_common(data_root, cache_dir, out)],
                  _env(tmp_path, cache_dir, f"home-{k}"), tmp_path / f"run-{k}.log")
             for k in (0, 1)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"run-{k}.log").read_text(errors="replace") for k in (0, 1)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert not any("outside of the base path" in log for log in logs)
    assert all("Ensemble − one adapter" in log for log in logs)
    tables = [log[log.index("Test accuracy (%)"):log.index("Ensemble − one adapter")]
              for log in logs]
    assert tables[0] == tables[1]
    assert (out / ".prefect" / "results").is_dir()


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {pattern!r}: "
                                 f"{text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_signal_stops_a_run_during_training(sig, tmp_path, data_root, cache_dir):
    """Issue 36, item 2: one SIGTERM (a Prefect cancellation, `kill`) or one SIGINT (Ctrl-C)
    during stage-4 training ends `ensemble-lora run` within 30 s: the current step stops, the
    flow run ends Crashed or Cancelled, the process exits non-zero, and no adapter is left
    half-written (the next run computes it)."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = _cli(["run", CONFIG, *_common(data_root, cache_dir, out),
                 "--set", "training.epochs=400"], _env(tmp_path, cache_dir, "home"), log)
    try:
        _wait_for(r"train\[group-\d\] epoch \d+", log, proc)
        done_before = {p.parent.name for p in out.glob("adapters/*/training.json")}
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert took < 30, f"the run took {took:.0f} s to stop: {text[-2000:]}"
    assert code == 128 + sig, (code, text[-2000:])
    assert "stopped by " + ("SIGTERM" if sig == signal.SIGTERM else "SIGINT") in text, text[-2000:]
    assert "Finished in state Completed()" not in text.split("train[")[-1]
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers
    # 400 epochs an adapter: none finished after the signal (one trained before it may have)
    trained = {p.parent.name for p in out.glob("adapters/*/training.json")}
    assert trained == done_before, (trained, done_before)
    assert "StopRequested" in text
