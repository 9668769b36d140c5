"""Running EnsembleLoRA as a Prefect service (see README.md here).

``deploy()`` is ``prefect deploy`` with a shim for Prefect 3.8.8's client (used by
setup.sh). ``local_server()`` starts a real ``prefect server start`` on a free 127.0.0.1 port
with its own PREFECT_HOME (so its database and settings touch nothing else) and yields the
environment that points Prefect processes at it; the deployment test and
``docs/make_screenshot.sh`` use it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: str | Path, port: int) -> dict[str, str]:
    """The environment of a process that talks to the local server (CLI, worker, flow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(Path(home) / "profiles.toml"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def start(cmd: list[str], env: dict, log: Path, cwd: str | Path | None = None) -> subprocess.Popen:
    """A subprocess in its own process group (stopped with :func:`stop`), output to ``log``."""
    out = open(log, "ab")
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(*procs: subprocess.Popen, timeout: float = 20) -> None:
    """Stops processes started by :func:`start` and everything they started (their groups):
    SIGTERM to every group at once, then one shared wait of ``timeout`` seconds, then SIGKILL to
    what is left (so stopping n processes waits once, not n times)."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        live = [p for p in procs if p.poll() is None]
        if not live:
            return
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def wait_healthy(api_url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy at {api_url} after {timeout:.0f} s")


@contextmanager
def local_server(home: str | Path | None = None, timeout: float = 180):
    """A real Prefect server on 127.0.0.1 for the duration of the block; yields its env."""
    own = home is None
    home = Path(home or tempfile.mkdtemp(prefix="prefect-home-"))
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = server_env(home, port)
    proc = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 env, home / "server.log")
    try:
        wait_healthy(env["PREFECT_API_URL"], proc, timeout)
        yield env
    finally:
        stop(proc)
        if own:
            shutil.rmtree(home, ignore_errors=True)


def run_cli(args: list[str], env: dict, cwd: str | Path = REPO, timeout: float = 300) -> str:
    """Runs a ``prefect`` CLI command against the server in ``env``; its output, or an error
    carrying the output."""
    r = subprocess.run(["prefect", "--no-prompt", *args], env=env, cwd=cwd, timeout=timeout,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout}")
    return r.stdout


def deploy(*args: str) -> None:
    """``prefect --no-prompt deploy *args`` (run from the repository root, beside prefect.yaml),
    with one compatibility shim.

    Prefect 3.8.8's client lists a work pool's workers with ``"offset": null, "limit": null``
    in the request body, which ``prefect deploy`` does after creating each deployment (to print
    "start a worker" hints). Prefect 3.8.8's server, as the lock installs it, rejects that null with
    422 Unprocessable Entity (the same with FastAPI 0.139.2 to 0.154), so a plain ``prefect deploy --all`` stops with an error after the
    first deployment. The shim sends the server's defaults (0 and the server's page size)
    instead; against a server that accepts the nulls it changes nothing.
    """
    from prefect.cli import app
    from prefect.client.orchestration import PrefectClient

    listing = PrefectClient.read_workers_for_work_pool

    async def read_workers_for_work_pool(self, work_pool_name, worker_filter=None,
                                         offset=None, limit=None):
        return await listing(self, work_pool_name, worker_filter,
                             0 if offset is None else offset, 200 if limit is None else limit)

    PrefectClient.read_workers_for_work_pool = read_workers_for_work_pool
    sys.argv = ["prefect", "--no-prompt", "deploy", *args]
    app()
