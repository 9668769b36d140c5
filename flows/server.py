"""The command line's temporary Prefect server, which never outlives the command.

Without ``PREFECT_API_URL`` Prefect starts a temporary server of its own (a uvicorn
subprocess) for the first flow run. That process is stopped when the command exits normally,
but not when the command is killed (SIGKILL, the OOM killer): the server is then left running
with its SQLite database open (issue 17, item 8). The command line starts the same server
itself instead (:func:`temporary_server`), as a child that ends when its parent does: the
kernel sends it SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``) and, everywhere, it
watches its parent and exits when it is gone.

A ``PREFECT_API_URL`` that is set (a server of your own, Prefect Cloud, a test harness) is used
as it is; nothing is started.

``python -m flows.server PORT PARENT_PID`` is the child.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from ensemble_core.storage import positive_env

STARTUP_ENV = "ENSEMBLE_LORA_SERVER_STARTUP_S"
DEFAULT_STARTUP_S = 180.0  # a loaded 2-core machine needed more than Prefect's 20 s


class ServerError(RuntimeError):
    pass


def startup_timeout() -> float:
    return positive_env(STARTUP_ENV, DEFAULT_STARTUP_S, "seconds")


def _api_url_set() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def temporary_server(log_path: str | None = None):
    """A Prefect server for the body (its API URL), stopped afterwards; the configured
    ``PREFECT_API_URL`` instead when one is set (yields None then)."""
    if _api_url_set():
        yield None
        return
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    timeout = startup_timeout()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           # as Prefect's own temporary server: no UI, the ephemeral database set-up
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    deadline = time.monotonic() + timeout
    proc, url = None, None
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        for _attempt in range(3):  # a port taken between choosing and binding: another
            port = _free_port()
            url = f"http://127.0.0.1:{port}/api"
            proc = subprocess.Popen([sys.executable, "-m", "flows.server", str(port),
                                     str(os.getpid())], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log,
                                    # not in the terminal's process group: Ctrl-C stops the
                                    # command, which then stops the server after its last logs
                                    start_new_session=True)
            while proc.poll() is None and not _healthy(url):
                if time.monotonic() > deadline:
                    _stop(proc)
                    raise ServerError(
                        f"the temporary Prefect server did not start within {timeout:.0f} s "
                        f"(a busy machine? set {STARTUP_ENV} to wait longer, or PREFECT_API_URL "
                        "to use a running server)")
                time.sleep(0.25)
            if proc.poll() is None:
                break
        else:
            raise ServerError(f"the temporary Prefect server exited at start-up (exit "
                              f"{proc.returncode}); set PREFECT_API_URL to use a running server")
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if proc is not None:
            _drain()  # the runs' last logs and events go to this server, not into the void
            _stop(proc)
        if log is not subprocess.DEVNULL:
            log.close()


def _drain(timeout: float = 10.0) -> None:
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout, at_exit=False)
        EventsWorker.drain_all(timeout=timeout, at_exit=False)
    except Exception:
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------- the child

def _die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends: SIGTERM from the kernel (Linux), and a watcher
    thread everywhere (a parent that is gone leaves this process to another parent)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown
        time.sleep(10)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(argv: list[str]) -> None:
    port, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    main(sys.argv[1:])
