"""The stage-1 benchmark runs end to end (tiny model, one round): it must not rot between the
sessions that have the hardware to measure with it."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration  # Prefect server, subprocesses (make test-fast skips)


def test_gradient_bench_runs_on_the_tiny_model(data_root, cache_dir):
    env = dict(os.environ, ENSEMBLE_LORA_DATA=str(data_root),
               ENSEMBLE_LORA_CACHE=str(cache_dir), TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gradients.py"), "--model", "tiny-llama",
         "--tasks", "cb,copa", "--repeats", "1", "--loop-examples", "2"],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "cb (token mode" in out and "copa (sequence mode" in out
    for label in ("ratio ours / plain step", "ratio ours / choice step",
                  "ratio ours / per-example loop", "ratio scoring / choice step"):
        ratios = re.findall(re.escape(label) + r"\s+([0-9.]+)x.*work ratio ([0-9.]+)x", out)
        assert len(ratios) == 2 and all(float(a) > 0 and float(b) > 0 for a, b in ratios), out
    assert out.count("GFLOP/s") >= 11  # every method of both tasks reports its FLOP rate
