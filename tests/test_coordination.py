"""Coordination across machines and the object store's failure modes (issue 31, items 1 and 4,
"Bad input"), against real servers: moto's S3-compatible server and Redis. The processes that
hold locks and claims are real subprocesses, killed with SIGKILL as a lost machine would be."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from deployments.servers import (BUCKET, aws_environment, redis_server,  # noqa: E402
                                 s3_server)

pytestmark = pytest.mark.integration  # servers and subprocesses (make test-fast skips)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as env, aws_environment(env):
        yield env


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _holder(code: str, env: dict | None = None) -> subprocess.Popen:
    """A Python subprocess that runs ``code``, prints READY and waits to be killed."""
    import os

    p = subprocess.Popen([sys.executable, "-c", code + "\nprint('READY', flush=True)\n"
                          "import time\ntime.sleep(600)\n"], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, **(env or {})))
    line = p.stdout.readline()
    assert line.strip() == "READY", p.stderr.read()
    return p


# -- the object store's failure modes ---------------------------------------------------------

def test_a_missing_bucket_is_named_before_anything_runs(s3):
    """Bad input: a run directory in a bucket that does not exist fails at the claim — before
    any stage runs — naming the URL (and the bucket is not created behind the user's back)."""
    import fsspec

    from ensemble_core.rundir import RunDir, RunDirError

    with pytest.raises(RunDirError, match=r"run directory s3://no-such-bucket/run is not "
                                          r"writable: .*bucket does not exist"):
        RunDir("s3://no-such-bucket/run").claim({"name": "x"})
    assert not fsspec.filesystem("s3").exists("no-such-bucket")


def test_wrong_credentials_are_named_before_anything_runs(tmp_path):
    """Bad input: credentials the store refuses fail at the claim, naming the URL."""
    from ensemble_core.rundir import RunDir, RunDirError

    with s3_server(tmp_path, buckets=(), auth=True) as env, aws_environment(env):
        with pytest.raises(RunDirError, match=r"run directory s3://any-bucket/run is not "
                                              r"writable: .*(Access Key|denied|Forbidden)"):
            RunDir("s3://any-bucket/run").claim({"name": "x"})


def test_an_upload_cut_short_is_never_taken_as_done(s3, monkeypatch):
    """"A worker killed mid-upload leaves nothing that a later run takes as done": an adapter
    rewritten on the object store whose upload stops after its first file leaves no weights
    there — neither the new (never uploaded) nor the old (deleted first) — so the record of
    the old adapter, which pins the old weights' sha256, is no longer served, and fetching
    it fails naming the file."""
    import fsspec

    from ensemble_core.records import AdapterRecord
    from ensemble_core.rundir import RunDir, RunDirError

    rd = RunDir(f"s3://{BUCKET}/upload/run")
    url = rd.adapter("group-0")

    def write(out: Path, weights: bytes):
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text('{"r": 4}')
        (out / "adapter_model.safetensors").write_bytes(weights)

    with rd.writing_dir(url) as out:
        write(out, b"old weights")
    old = AdapterRecord("group-0", ["rte"], rd.relative(url),
                        hashlib.sha256(b"old weights").hexdigest())
    assert old.verified(rd.url)

    fs, _ = fsspec.core.url_to_fs(url)  # the instance writing_dir uses (fsspec caches it)
    real = fs.put_file
    calls = []

    def dies_after_the_first(lpath, rpath, *a, **k):
        if calls:
            raise ConnectionError("the worker was lost")
        calls.append(rpath)
        return real(lpath, rpath, *a, **k)

    monkeypatch.setattr(fs, "put_file", dies_after_the_first)
    with pytest.raises(ConnectionError):
        with rd.writing_dir(url) as out:
            write(out, b"new weights")
    monkeypatch.setattr(fs, "put_file", real)
    assert calls and not calls[0].endswith(".safetensors")  # the weights come last
    assert not fs.exists(f"{BUCKET}/upload/run/adapters/group-0/adapter_model.safetensors")
    assert not old.verified(rd.url)
    with pytest.raises(RunDirError, match="adapter_model.safetensors: missing"):
        rd.fetch(old.path, old.pins)


def test_a_fetched_copy_is_checked_against_its_pins(s3, tmp_path, monkeypatch):
    """Adapters of a remote run directory are read through the local cache, one download per
    content: a file that differs from the sha256 the record pins is an error naming it, and
    nothing of it is left in the cache."""
    from ensemble_core.rundir import RunDir, RunDirError

    monkeypatch.setenv("ENSEMBLE_LORA_CACHE", str(tmp_path / "cache"))
    rd = RunDir(f"s3://{BUCKET}/fetch/run")
    with rd.writing_dir(rd.adapter("a")) as out:
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"w")
    pins = {"adapter_model.safetensors": hashlib.sha256(b"w").hexdigest()}
    got = rd.fetch("adapters/a", pins)
    assert (got / "adapter_model.safetensors").read_bytes() == b"w"
    assert rd.fetch("adapters/a", pins) == got  # once per content
    with pytest.raises(RunDirError, match=r"adapters/a/adapter_model.safetensors: its content "
                                          r"differs"):
        rd.fetch("adapters/a", {"adapter_model.safetensors": "0" * 64})
    assert sorted(p.name for p in (tmp_path / "cache" / "fetched").iterdir()) == [got.name]


# -- Redis: the run claim and the cache locks across machines ----------------------------------

def test_an_unreachable_redis_is_named(tmp_path):
    from ensemble_core.coordination import CoordinationError, client

    with pytest.raises(CoordinationError, match=r"cannot reach the Redis server "
                                                r"redis://:\*\*\*@127.0.0.1:9/0"):
        client("redis://:secret@127.0.0.1:9/0")


def test_a_lock_of_a_killed_worker_frees_itself_and_a_live_one_is_kept(redis_url):
    """Prefect takes cache locks with no hold timeout; in Redis each is a lease renewed while
    its process lives: a live holder keeps it past many leases, a holder killed with SIGKILL
    (a lost machine) frees it a lease later, and a waiter then gets it."""
    from tasks.locking import LeasedRedisLockManager

    env = {"ENSEMBLE_LORA_LEASE_S": "1"}
    holder = _holder(f"""
from tasks.locking import LeasedRedisLockManager
m = LeasedRedisLockManager({redis_url!r}, 's3://b/run')
assert m.acquire_lock('train-k', holder='worker-1')
""", env)
    import os
    os.environ["ENSEMBLE_LORA_LEASE_S"] = "1"
    try:
        mine = LeasedRedisLockManager(redis_url, "s3://b/run")
        other_dir = LeasedRedisLockManager(redis_url, "s3://b/other-run")
        time.sleep(3.5)  # three leases: the holder renews it
        assert mine.is_locked("train-k")
        assert not other_dir.is_locked("train-k")  # one name space per run directory
        assert not mine.acquire_lock("train-k", holder="worker-2", acquire_timeout=0.5)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        t0 = time.monotonic()
        assert mine.acquire_lock("train-k", holder="worker-2", acquire_timeout=10)
        assert time.monotonic() - t0 < 3
        time.sleep(2.5)  # this process renews its own lease
        assert mine.is_lock_holder("train-k", "worker-2")
        mine.release_lock("train-k", holder="worker-2")
        assert not mine.is_locked("train-k")
    finally:
        os.environ.pop("ENSEMBLE_LORA_LEASE_S", None)
        holder.kill()


def test_the_run_claim_holds_across_machines(redis_url, tmp_path):
    """The run claim in Redis: while a process (another machine, as far as Redis can tell)
    holds a directory with one config, a claim with another config is refused, naming what
    differs; once that process is killed its hold expires and the claim succeeds."""
    from ensemble_core.rundir import RunDir, RunDirError

    url = str(tmp_path / "run")
    ident = {"name": "tiny"}
    env = {"ENSEMBLE_LORA_LEASE_S": "1"}
    holder = _holder(f"""
from ensemble_core.rundir import RunDir
RunDir({url!r}).claim({ident!r}, {{"training": {{"epochs": 1}}}}, redis_url={redis_url!r})
""", env)
    try:
        with pytest.raises(RunDirError, match=r"in use by another run with a different config "
                                              r"\(pid \d+ on host .*\): training.epochs: 1 vs 2"):
            RunDir(url).claim(ident, {"training": {"epochs": 2}}, redis_url=redis_url)
        RunDir(url).claim(ident, {"training": {"epochs": 1}}, redis_url=redis_url)  # shared
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        time.sleep(1.5)
        RunDir(url).claim(ident, {"training": {"epochs": 2}}, redis_url=redis_url)
    finally:
        holder.kill()
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == ident
    assert not (tmp_path / "run" / ".prefect" / "holders").exists()  # Redis, not files
