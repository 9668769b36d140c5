"""Scale-out (issue 31), with real servers and real processes: the run directory on an
S3-compatible object store (moto's server mode), the cache keyed by content (a directory copied
to another URL is served from its cache), cache keys that follow the code a stage runs (a
docstring edit recomputes nothing), and the whole pipeline through deployments whose workers
share nothing but the servers — a Prefect server, the object store and Redis — each with its
own working directory, HOME, PREFECT_HOME, model cache and temporary directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from deployments import free_port, local_server, start, stop  # noqa: E402
from deployments.servers import (BUCKET, aws_environment, redis_server,  # noqa: E402
                                 s3_server)
from prefect_utils import trigger_deployment, wait_for_flow_run  # noqa: E402

pytestmark = pytest.mark.integration  # servers and subprocesses (make test-fast skips)

TINY = str(REPO / "configs" / "tiny.yaml")
TASK_DIRS = ("RTE", "CB", "COPA", "WiC")  # what configs/tiny.yaml reads


def _env(tmp: Path, name: str, cache_dir, extra: dict | None = None) -> dict:
    """A process environment of its own: HOME, PREFECT_HOME, TMPDIR, model cache."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("PREFECT_", "AWS_", "ENSEMBLE_LORA_"))}
    home = tmp / name
    for d in ("home", "prefect", "tmp"):
        (home / d).mkdir(parents=True, exist_ok=True)
    e.update(HOME=str(home / "home"), PREFECT_HOME=str(home / "prefect"),
             TMPDIR=str(home / "tmp"), ENSEMBLE_LORA_CACHE=str(cache_dir),
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
             PREFECT_SERVER_ANALYTICS_ENABLED="false")
    e.update(extra or {})
    return e


def _cli(args, env, log: Path, timeout=900) -> str:
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                       stdout=open(log, "wb"), stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(errors="replace")
    assert r.returncode == 0, text[-5000:]
    return text


def _states(log: str) -> dict[str, str]:
    """task-run name -> final state, from a run's log ("Task run 'x' - Finished in state
    Cached(...)")."""
    import re

    return dict(re.findall(r"Task run '([^']+)' - Finished in state (\w+)", log))


def _upload_data(data_root: str, url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    for d in TASK_DIRS:
        fs.put(str(Path(data_root) / "superglue" / d), f"{path}/superglue/{d}", recursive=True)


def _s3_tree(url: str) -> dict[str, bytes]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}


def _local_tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _without_timings(obj):
    """metrics.json with every wall time, throughput and memory figure left out."""
    timing = ("_s", "seconds", "per_s", "memory", "ratio", "wall", "speedup")
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if not any(t in k for t in timing)}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _same_results(local: dict[str, bytes], remote: dict[str, bytes]) -> None:
    """metrics.json (less timings), groups.json, ensemble.json and every adapter's bytes."""
    for name in ("groups.json", "ensemble.json"):
        assert json.loads(remote[name]) == json.loads(local[name]), name
    assert _without_timings(json.loads(remote["metrics.json"])) == \
        _without_timings(json.loads(local["metrics.json"]))
    adapters = sorted(k for k in local if k.startswith("adapters/")
                      and not k.endswith("training.json"))
    assert adapters and sorted(k for k in remote if k.startswith("adapters/")
                               and not k.endswith("training.json")) == adapters
    for k in adapters:
        assert remote[k] == local[k], k


# -- a local run, the reference ---------------------------------------------------------------

@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data_root, cache_dir):
    """configs/tiny.yaml run once in a single process on a local directory."""
    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "run"
    log = _cli(["run", TINY, "--set", f"data_root={data_root}", "--set", f"output_dir={out}"],
               _env(tmp, "cli", cache_dir), tmp / "run.log")
    return out, log


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3")
    with s3_server(tmp) as env, aws_environment(env):
        yield env


def test_a_copied_run_directory_is_served_from_its_cache(local_run, s3, tmp_path, cache_dir,
                                                         data_root):
    """Item 2: records name files relative to the run directory and cache keys hold content,
    not where the directory is: a finished local run copied to another local path, and to
    s3://, runs again there with every task served from the cache — and gives the same
    results."""
    import fsspec

    src, _ = local_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(src, moved)
    url = f"s3://{BUCKET}/copied/run"
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(str(src), path, recursive=True)  # .prefect (the cache) included
    for where in (str(moved), url):
        log = _cli(["run", TINY, "--set", f"data_root={data_root}", "--set",
                    f"output_dir={where}"], _env(tmp_path, "cli", cache_dir, s3),
                   tmp_path / "again.log")
        states = _states(log)
        assert states and set(states.values()) == {"Cached"}, \
            {k: v for k, v in states.items() if v != "Cached"}
    _same_results(_local_tree(src), _s3_tree(url))


def test_a_docstring_edit_leaves_stage_one_cached(tmp_path, data_root, cache_dir):
    """Item 3: a stage's cache key holds the version of the code it runs, docstrings aside: a
    release that edits a docstring of report.py recomputes no stage-1 task; an edit of the
    gradient code recomputes them."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    out = tmp_path / "run"
    env = _env(tmp_path, "cli", cache_dir)

    def gradients(name):
        r = subprocess.run([sys.executable, "-m", "flows.cli", "gradients", TINY, "--set",
                            f"data_root={data_root}", "--set", f"output_dir={out}"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        states = _states(r.stdout + r.stderr)
        return {k: v for k, v in states.items() if k.startswith("gradients[")}

    first = gradients("first")
    assert set(first.values()) == {"Completed"} and len(first) == 4
    report = repo / "ensemble_core" / "report.py"
    text = report.read_text()
    start = text.index('"""') + 3
    report.write_text(text[:start] + "Edited in a release: wording only. " + text[start:])
    assert set(gradients("docstring").values()) == {"Cached"}
    grads = repo / "ensemble_core" / "gradients.py"
    grads.write_text(grads.read_text() + "\n\n_RELEASE_NOTE = 1  # code, not a docstring\n")
    assert set(gradients("code").values()) == {"Completed"}


# -- several machines: deployments whose workers share nothing but the servers ---------------

def _worker(tmp: Path, pool: str, env: dict, n: int) -> subprocess.Popen:
    wenv = _env(tmp, f"worker-{pool}-{n}", tmp / f"worker-{pool}-{n}" / "models", env)
    return start(["prefect", "worker", "start", "--pool", pool, "--type", "process",
                  "--name", f"{pool}-{n}"], wenv, tmp / f"worker-{pool}-{n}.log",
                 cwd=tmp / f"worker-{pool}-{n}")


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def test_workers_that_share_nothing_but_the_servers(tmp_path, local_run, cache_dir, data_root):
    """The whole of issue 31's "Done when": configs/tiny.yaml with output_dir=s3://... (and
    its data on s3:// too) runs end to end through the deployments, stages on a gpu and a cpu
    worker that share nothing but a Prefect server, the object store and Redis; a gpu worker
    killed with SIGKILL during stage 4 and started again finishes the run with stages 1–3
    served from the cache; metrics (less timings), groups, ensemble and every adapter's bytes
    equal the single-process local run's; `ensemble-lora predict` and the HTTP endpoint serve
    the s3:// run's current version."""
    from ensemble_core.ensemble import EnsembleModel
    from ensemble_core.versions import current

    with local_server(tmp_path / "server") as server, s3_server(tmp_path) as aws, \
            redis_server(tmp_path) as redis_url, aws_environment(aws):
        # what every process shares: the servers' addresses (and the AWS credentials)
        shared = {k: v for k, v in server.items() if k.startswith("PREFECT_")
                  and k not in ("PREFECT_HOME", "PREFECT_PROFILES_PATH")}
        shared.update(aws, ENSEMBLE_LORA_LEASE_S="4")
        # the one-time setup of deployments/README.md's recipe: pools, limit, deployments,
        # and the result storage the stage runs hand their records back through
        setup = subprocess.run(["bash", "deployments/setup.sh"], cwd=REPO, text=True,
                               env=_env(tmp_path, "setup", tmp_path / "setup-models",
                                        dict(shared,
                                             RESULTS_URL=f"s3://{BUCKET}/prefect-results",
                                             GPU_SLOTS="4")),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        assert setup.returncode == 0, setup.stdout[-4000:]
        shared["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = \
            "remote-file-system/ensemble-lora-results"
        env = _env(tmp_path, "cli", tmp_path / "cli-models", shared)
        _upload_data(data_root, f"s3://{BUCKET}/data")
        url = f"s3://{BUCKET}/runs/tiny"
        params = {"config": TINY, "overrides": [
            f"output_dir={url}", f"data_root=s3://{BUCKET}/data",
            'runner.work_pools={"gpu": "gpu", "cpu": "cpu"}', f"runner.redis_url={redis_url}"]}
        workers = {"cpu": _worker(tmp_path, "cpu", shared, 0),
                   "gpu": _worker(tmp_path, "gpu", shared, 0)}
        logs = list(tmp_path.glob("worker-*.log"))
        try:
            first = trigger_deployment(env, "ensemble_lora/ensemble-lora", params, tmp_path)
            # stage 4 has begun when its first adapter is in the bucket: kill the gpu worker
            # (and the flow runs it started) there
            import fsspec
            fs, path = fsspec.core.url_to_fs(url)
            deadline = time.monotonic() + 600
            while not fs.exists(f"{path}/adapters/theta-star/adapter_model.safetensors"):
                assert time.monotonic() < deadline, "\n".join(
                    p.read_text(errors="replace")[-3000:] for p in logs)
                time.sleep(0.5)
            _kill_tree(workers["gpu"])
            workers["gpu"] = _worker(tmp_path, "gpu", shared, 1)
            logs = list(tmp_path.glob("worker-*.log"))
            second = trigger_deployment(env, "ensemble_lora/ensemble-lora", params, tmp_path)
            wait_for_flow_run(env, second, 900, logs)
        finally:
            stop(*workers.values())
        assert first != second
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from prefect_utils import task_states
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            states = task_states(second)
        print("second run after the kill:", states)
        for name, state in states.items():  # stages 1-3 of the second run: the cache
            if name.startswith(("gradients[", "subsets[", "subset-plan", "affinity-and-groups",
                                "linearity[")):
                assert state == "Cached", (name, states)
        assert any(v == "Completed" for k, v in states.items() if k.startswith("train[")) or \
            any(v == "Completed" for k, v in states.items() if k.startswith("scores-"))
        local_dir, _ = local_run
        _same_results(_local_tree(local_dir), _s3_tree(url))

        # predict and serve the s3:// run's current version
        vid = current(url)
        assert vid is not None
        lines = (Path(data_root) / "superglue" / "RTE" / "val.jsonl").read_text().splitlines()
        records = tmp_path / "rte.jsonl"
        records.write_text("\n".join(lines[:6]) + "\n")
        expected = EnsembleModel.from_pretrained(local_dir).predict(
            "rte", [json.loads(x) for x in lines[:6]])
        expected = json.loads(json.dumps(expected))
        cli_env = _env(tmp_path, "predict", tmp_path / "predict-models", aws)
        r = subprocess.run([sys.executable, "-m", "flows.cli", "predict", url, "--task", "rte",
                            "--input", str(records)], cwd=REPO, env=cli_env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        got = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        assert got == expected
        port = free_port()
        serve = start([sys.executable, "-m", "flows.cli", "serve", url, "--port", str(port)],
                      _env(tmp_path, "serve", tmp_path / "serve-models", aws),
                      tmp_path / "serve.log", cwd=REPO)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    health = json.loads(urllib.request.urlopen(base + "/health").read())
                    break
                except OSError:
                    assert serve.poll() is None and time.monotonic() < deadline, \
                        (tmp_path / "serve.log").read_text()[-3000:]
                    time.sleep(0.5)
            assert health["version"] == vid and health["status"] == "ok"
            req = urllib.request.Request(
                base + "/predict", method="POST",
                data=json.dumps({"task": "rte",
                                 "records": [json.loads(x) for x in lines[:6]]}).encode(),
                headers={"Content-Type": "application/json"})
            body = json.loads(urllib.request.urlopen(req).read())
            assert body["predictions"] == expected
        finally:
            stop(serve)
