"""Servers for trying several machines on one (the tests of tests/test_object_storage.py and
tests/test_coordination.py, bench/object_storage.py), each a subprocess on 127.0.0.1 started
and stopped by a context manager: an S3-compatible object store (moto's server mode) and
Redis. Nothing is mocked in-process: the code reaches them over HTTP and TCP."""
from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import free_port, start, stop

BUCKET = "ensemble-lora-test"


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables a process needs to reach the object store."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(tmp: Path, buckets=(BUCKET,), timeout: float = 60, auth: bool = False):
    """moto's S3-compatible server on a free port, with ``buckets`` created; yields the AWS
    environment to reach it (merge it into a subprocess's env, or ``os.environ``). With
    ``auth``, the server checks credentials (and knows none: every request is refused)."""
    exe = shutil.which("moto_server")
    assert exe, "moto_server not found: install the test requirements (make install)"
    port = free_port()
    env = dict(os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {}))
    proc = start([exe, "-H", "127.0.0.1", "-p", str(port)], env, tmp / f"moto-{port}.log")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answers (refusing: auth)
                break
            except OSError:
                assert proc.poll() is None, (tmp / f"moto-{port}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        env = s3_env(endpoint)
        import boto3  # noqa: E402

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        for b in buckets:
            s3.create_bucket(Bucket=b)
        yield env
    finally:
        stop(proc)


@contextmanager
def redis_server(tmp: Path, timeout: float = 30):
    """A Redis server (Debian's redis-server, installed by make install) on a free port, no
    persistence; yields its URL."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server not found: install it (make install)"
    port = free_port()
    d = tmp / "redis"
    d.mkdir(parents=True, exist_ok=True)
    proc = start([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", str(d)], dict(os.environ), tmp / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, (tmp / "redis.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        yield url
    finally:
        stop(proc)


@contextmanager
def aws_environment(env: dict):
    """``env`` (the AWS variables) in this process's environment for the block, with every
    cached S3 file-system instance dropped on the way in and out (an instance keeps the
    endpoint and credentials it was made with)."""
    import s3fs

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
