"""The saved ensemble as an HTTP endpoint (``ensemble-lora serve RUN_DIR``; issue 14, item 5).

One process loads the run's ensemble once (``EnsembleModel.from_pretrained``: the base model
once, every member adapter under its own name) and answers

* ``POST /predict`` ``{"task": ..., "records": [{...}, ...]}``: per record the label in the
  task's own values, the choice index, its continuation and the probabilities
  (``EnsembleModel.predict``), with the version that answered;
* ``GET /health``: the loaded version, its tasks, when it was loaded, and how many requests
  and model batches were served.

Requests arriving together are batched: a request's records are checked and formatted at once
(an unknown task is a 404, a record missing a template field a 422, each with the reason, and
the request fails alone), then the records of all waiting requests of one task go through the
model as one batch on the single model thread, and each request gets its own predictions back.

The version is the run directory's current version (``ensemble_core/versions.py``), or, for a
run without versions, the sha256 of its ``ensemble.json`` (its first 16 hex digits). A watcher
thread checks every ``reload_s`` seconds; when it changed (a newer version promoted, a
rollback), the new ensemble is loaded beside the old one, which keeps answering until the
swap. A version that fails to load is reported by ``/health`` and the old one stays.

FastAPI and uvicorn come with Prefect but are not needed by the rest of the library: they are
imported here only.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from .rundir import RunDir

log = logging.getLogger(__name__)

MAX_BATCH = 64  # records of one task that go through the model together
BATCH_WAIT_S = 0.005  # how long a batch waits for more requests once one has arrived


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the endpoint (``ensemble-lora serve --set ...``): a body of
    at most ``max_body_bytes`` (413 otherwise, refused before it is read whole), at most
    ``max_records`` records and ``max_field_chars`` characters in any one field (422), and at
    most ``max_pending_records`` records waiting for the model over all requests (503: busy).
    Together they bound the memory a request, and all of them at once, can take."""
    max_body_bytes: int = 4 << 20
    max_records: int = 1024
    max_field_chars: int = 32_768
    max_pending_records: int = 8192

    def __post_init__(self):
        for k, v in self.__dict__.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"serve: {k} must be a positive integer, got {v!r}")


MAX_RECORDS = Limits.max_records


class RequestTooLarge(ValueError):
    """A request over one of the :class:`Limits` (the message names the limit)."""


class Busy(RuntimeError):
    """More records are waiting for the model than ``Limits.max_pending_records``."""


def ensemble_version(run_dir) -> str:
    """The version a run directory serves: its current version's id (ensemble_core/versions.py),
    or, for a run without versions, the sha256 of its ``ensemble.json`` (16 hex)."""
    from .storage import read_bytes
    from .versions import current

    vid = current(run_dir)
    if vid is not None:
        return vid
    return hashlib.sha256(read_bytes(RunDir(str(run_dir)).ensemble)).hexdigest()[:16]


@dataclass
class Loaded:
    model: Any  # EnsembleModel
    version: str
    loaded_at: str


@dataclass
class _Pending:
    task: str
    examples: list
    future: asyncio.Future
    loaded: Loaded


@dataclass
class ServingStats:
    requests: int = 0
    records: int = 0
    batches: int = 0
    reloads: int = 0
    errors: dict = field(default_factory=dict)


class EnsembleService:
    """The loaded ensemble, its reloading and the batching of requests (no HTTP here)."""

    def __init__(self, run_dir, cache_dir=None, *, device: str | None = None,
                 batch_size: int = 16, reload_s: float = 2.0, max_batch: int = MAX_BATCH,
                 batch_wait_s: float = BATCH_WAIT_S, check_fingerprint: bool = True,
                 trust_remote_code: bool = False, limits: Limits | None = None):
        self.run_dir = str(run_dir)
        self.load_args = dict(cache_dir=cache_dir, device=device,
                              check_fingerprint=check_fingerprint,
                              trust_remote_code=trust_remote_code)
        self.batch_size, self.reload_s = int(batch_size), float(reload_s)
        self.max_batch, self.batch_wait_s = int(max_batch), float(batch_wait_s)
        self.limits = limits or Limits()
        self.stats = ServingStats()
        self._pending = 0  # records accepted and not yet answered
        self.reload_error: str | None = None
        self._failed_version: str | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="ensemble-model")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.current = self._load()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._watcher: threading.Thread | None = None

    # -- loading and reloading ---------------------------------------------------------------
    def _load(self) -> Loaded:
        from .ensemble import EnsembleModel
        from .versions import current

        named = current(self.run_dir)
        version = named or ensemble_version(self.run_dir)
        model = EnsembleModel.from_pretrained(self.run_dir, version=named, **self.load_args)
        return Loaded(model, version, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def check_for_new_version(self) -> bool:
        """Load the run directory's ensemble if its version changed; True when swapped."""
        try:
            version = ensemble_version(self.run_dir)
        except Exception as e:  # mid-rename or removed: try again next time
            log.debug("ensemble.json not readable now: %s", e)
            return False
        if version == self.current.version or version == self._failed_version:
            return False
        try:
            fresh = self._load()
        except Exception as e:
            self._failed_version = version
            self.reload_error = f"version {version} could not be loaded: {e}"
            log.warning("serve: %s; still serving %s", self.reload_error, self.current.version)
            return False
        old = self.current
        with self._lock:
            self.current = fresh
            self.stats.reloads += 1
            self.reload_error, self._failed_version = None, None
        log.info("serve: now serving version %s (was %s)", version, old.version)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_s):
            self.check_for_new_version()

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, task: str, records: list) -> tuple[Loaded, list]:
        """The version that will answer and the records as examples; raises RequestTooLarge
        (too many records, a field too long), EnsembleError (unknown task) or DataError (a
        record that does not fit the task's template)."""
        lim = self.limits
        if len(records) > lim.max_records:
            raise RequestTooLarge(f"{len(records)} records in one request; the limit is "
                                  f"{lim.max_records} (max_records)")
        for i, rec in enumerate(records):
            for name, value in rec.items():
                if isinstance(value, str) and len(value) > lim.max_field_chars:
                    raise RequestTooLarge(
                        f"record {i}: field {str(name)[:100]!r} has {len(value)} characters; "
                        f"the limit is {lim.max_field_chars} (max_field_chars)")
        loaded = self.current
        return loaded, loaded.model.examples(task, records)

    async def predict(self, task: str, records: list) -> tuple[str, list[dict]]:
        loaded, examples = self.prepare(task, records)
        self.stats.requests += 1
        if not examples:
            return loaded.version, []
        if self._pending + len(examples) > self.limits.max_pending_records:
            raise Busy(f"{self._pending} records are waiting for the model; the limit is "
                       f"{self.limits.max_pending_records} (max_pending_records): retry later")
        self.stats.records += len(examples)
        self._pending += len(examples)
        try:
            fut = asyncio.get_running_loop().create_future()
            await self._queue.put(_Pending(task, examples, fut, loaded))
            return loaded.version, await fut
        finally:
            self._pending -= len(examples)

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            waiting = [first]
            deadline = loop.time() + self.batch_wait_s
            while sum(len(p.examples) for p in waiting) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    waiting.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple[str, str], list[_Pending]] = {}
            for p in waiting:  # one model batch per (version, task)
                groups.setdefault((p.loaded.version, p.task), []).append(p)
            for (_, task), pend in groups.items():
                examples = [ex for p in pend for ex in p.examples]
                self.stats.batches += 1
                try:
                    preds = await loop.run_in_executor(
                        self._model_thread, pend[0].loaded.model.predict, task, examples,
                        self.batch_size)
                except Exception as e:  # not the request's fault: it was checked in prepare
                    log.exception("serve: prediction failed for task %s", task)
                    for p in pend:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                at = 0
                for p in pend:
                    if not p.future.done():
                        p.future.set_result(preds[at:at + len(p.examples)])
                    at += len(p.examples)

    def problem(self) -> str | None:
        """Why the endpoint is not what the run directory says it should serve, or None: the
        current version (or the loaded one) is gone from the run directory."""
        from .versions import VersionError, current, version_dir

        from .storage import exists, join

        try:
            vid = current(self.run_dir)
            if vid is None:
                return None
            d = version_dir(self.run_dir, vid)
            if not exists(join(d, "ensemble.json")) or not exists(join(d, "version.json")):
                return f"the current version {vid} is incomplete: {d} lacks its files"
        except (VersionError, OSError) as e:
            return f"the current version cannot be read: {e}"
        return None

    def health(self) -> dict:
        cur = self.current
        problem = self.problem()
        return {"status": "ok" if problem is None else "error", "problem": problem,
                "version": cur.version, "run_dir": self.run_dir,
                "tasks": cur.model.tasks, "loaded_at": cur.loaded_at,
                "reload_error": self.reload_error,
                "served": {"requests": self.stats.requests, "records": self.stats.records,
                           "batches": self.stats.batches, "reloads": self.stats.reloads}}

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batches())
        if self.reload_s > 0:
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="ensemble-watch")
            self._watcher.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)


class PredictRequest(BaseModel):
    """The body of ``POST /predict`` (the number of records and the fields' lengths are
    checked against the service's :class:`Limits`)."""
    task: str = Field(min_length=1, max_length=200)
    records: list[dict[str, Any]]


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 as soon as its
    declared length (or what has arrived of it) says so, and is never held whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(send, self.limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _too_large(send, self.limit)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    import json

    body = json.dumps({"detail": f"the request body is larger than {limit} bytes "
                                 "(max_body_bytes)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(service: EnsembleService):
    """The FastAPI application of ``service``, its request bodies bounded by
    ``service.limits.max_body_bytes``."""
    from contextlib import asynccontextmanager

    from fastapi import Body, FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from .data import DataError
    from .ensemble import EnsembleError

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="EnsembleLoRA", lifespan=lifespan,
                  description="Predictions of a trained EnsembleLoRA ensemble")
    app.add_middleware(_BodyLimit, limit=service.limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # what was wrong and where, never the input itself (it can be megabytes)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                  for e in exc.errors()[:10]]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.get("/health")
    async def health():
        body = service.health()  # 503 when the version it should serve is gone
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.post("/predict")
    async def predict(req: PredictRequest = Body(...)) -> dict:
        try:
            version, preds = await service.predict(req.task, req.records)
        except RequestTooLarge as e:  # too many records, a field too long
            raise HTTPException(status_code=422, detail=str(e)) from None
        except EnsembleError as e:  # an unknown task
            raise HTTPException(status_code=404, detail=str(e)) from None
        except DataError as e:  # a record that does not fit the task
            raise HTTPException(status_code=422, detail=str(e)) from None
        except Busy as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        return {"task": req.task, "version": version, "predictions": preds}

    return app


def serve(run_dir, host: str = "127.0.0.1", port: int = 8000, **service_args) -> None:
    """Load the ensemble of ``run_dir`` and serve it until interrupted (``uvicorn``)."""
    import uvicorn

    service = EnsembleService(run_dir, **service_args)
    log.info("serving %s version %s on http://%s:%d", run_dir, service.current.version, host,
             port)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")

