"""What one process shares between the stages it runs: loaded models, projectors, feature
tables, the device lock, and the code version that is part of every cache key.

A worker process may run many task runs (threads of one flow run, or a Dask worker): the base
model with θ* is loaded once per setting, a features file is read once, and P's blocks are
generated once. None of this changes a result; it is state of the process, not of the run.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

from . import __version__

_LOCK = threading.Lock()
# Model work in one process runs one at a time: it shares a device, seeds the global torch RNG
# (adapter init, dropout) and installs hooks, so interleaving threads would be neither fast nor
# reproducible. Parallelism across devices comes from several worker processes.
DEVICE_LOCK = threading.RLock()

_STOP = threading.Event()


class StopRequested(Exception):
    """The process was asked to stop (SIGTERM, SIGINT, a Prefect cancellation): the work in
    progress ends at its next step (a batch, a block, a subset) and writes nothing more; what
    it had not yet renamed into place is removed with its temporary directory."""


def request_stop() -> None:
    """Ask every model loop of this process to stop at its next step (:func:`check_stop`)."""
    _STOP.set()


def clear_stop() -> None:
    """A new run starts in this process: forget an earlier stop request."""
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def check_stop() -> None:
    """Raise :class:`StopRequested` if the process was asked to stop; the long loops (training
    steps, scoring and gradient batches, projection blocks, subset fits) call it each step."""
    if _STOP.is_set():
        raise StopRequested("the run was asked to stop (a signal or a cancellation)")


_MODELS: dict = {}
_PROJECTORS: dict = {}
_TABLES: dict = {}
_SCORERS: dict = {}


def code_version(module: str | None = None) -> str:
    """Package version + a hash of the code: of the whole library (``module`` None), or of the
    code ``module`` (a dotted name under ``ensemble_core``, e.g. a stage's module) runs —
    itself and every library module it imports, transitively, wherever in the file the import
    is. Each file counts as its syntax tree without docstrings, so an edit of a docstring, a
    comment or the layout changes no version. A stage's cache key holds its module's version
    (``stages.declaration.Stage.inputs``): a change to report.py leaves stage 1 cached, a
    change to the gradient code does not (docs/design.md, "Caching")."""
    with _CODE_GRAPH_LOCK:  # ast.parse is not safe in several threads at once (CPython 3.11)
        graph = _code_graph()
    names = sorted(graph) if module is None else sorted(_reachable(graph, module))
    h = hashlib.sha256(__version__.encode())
    for name in names:
        h.update(name.encode())
        h.update(graph[name][1].encode())
    return h.hexdigest()[:16]


_CODE_GRAPH_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _code_graph() -> dict[str, tuple[frozenset, str]]:
    """Module name -> (the library modules it imports, the digest of its docstring-free
    syntax tree), for every module of ensemble_core (read once per process)."""
    import ast

    root = Path(__file__).parent
    files = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        files[".".join(["ensemble_core", *parts])] = (f, f.name == "__init__.py")
    graph = {}
    for name, (f, is_pkg) in files.items():
        tree = ast.parse(f.read_text())
        package = name if is_pkg else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in files)
        for node in ast.walk(tree):  # docstrings are not code
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
        digest = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
        graph[name] = (frozenset(deps - {name}), digest)
    return graph


def _reachable(graph: dict, module: str) -> set[str]:
    """``module`` and every library module it imports, transitively (a package's
    ``__init__`` counts where a module imports the package, not merely for being inside it:
    ``stages/__init__`` re-exports every stage, which no stage runs)."""
    todo = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        todo.extend(graph[name][0])
    return seen


def cache_path(cfg) -> Path | None:
    return Path(cfg.cache_dir) if cfg.cache_dir else None


def theta_star_model(cfg):
    """The base model with a fresh adapter θ* (``models.load_model``), loaded once per process
    and setting (model, adapter, seed). Callers hold :data:`DEVICE_LOCK` while using it."""
    from .models import load_model

    key = (cfg.model.model_dump_json(), cfg.adapter.model_dump_json(), cfg.seed)
    with DEVICE_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(cfg, cache_path(cfg))
        return _MODELS[key]


def member_model(cfg, adapter_dir, name: str, sha256: str):
    """The base model, loaded once per process and model setting, with the adapter saved at
    ``adapter_dir`` loaded (once; under a name made of ``name`` and its sha256) and active, in
    eval mode, and the tokenizer: stage 5 scores its members by swapping adapters on one base
    model. Callers hold :data:`DEVICE_LOCK` while using it."""
    from .adapters import load_adapter
    from .models import load_base

    key = (cfg.model.model_dump_json(), str(cfg.cache_dir))
    with DEVICE_LOCK:
        entry = _SCORERS.get(key)
        if entry is None:
            base, tok, fp = load_base(cfg.model, cache_path(cfg))
            entry = _SCORERS[key] = {"model": base, "tokenizer": tok, "fingerprint": fp,
                                     "loaded": {}}
        adapter = f"{name}-{sha256[:12]}".replace(".", "_")
        if adapter not in entry["loaded"]:
            entry["model"] = load_adapter(entry["model"], adapter_dir, adapter_name=adapter,
                                          base_fingerprint=entry["fingerprint"])
            entry["loaded"][adapter] = True
        model = entry["model"]
        model.set_adapter(adapter)
        model.eval()
        return model, entry["tokenizer"]


def members_model(cfg, adapters):
    """The base model (``member_model``) with every adapter of ``adapters`` — (directory,
    name, sha256) each — loaded, the tokenizer, and name -> the adapter's name in the model
    (stage 5 scores them together: ``members.score_members``). Callers hold
    :data:`DEVICE_LOCK`."""
    names, model, tok = {}, None, None
    for adapter_dir, name, sha256 in adapters:
        model, tok = member_model(cfg, adapter_dir, name, sha256)
        names[name] = model.active_adapter
    return model, tok, names


def projector(p: int, d: int, seed: int, block_rows: int, cache_gb: float | None, device):
    """One :class:`projection.GaussianProjector` (and its cache of P's blocks) per process and
    setting, shared by the tasks of stage 1."""
    from .projection import GaussianProjector

    cache = None if cache_gb is None else int(cache_gb * 2**30)
    key = (p, d, seed, block_rows, str(device), cache)
    with _LOCK:
        if key not in _PROJECTORS:
            _PROJECTORS[key] = GaussianProjector(p, d, seed=seed, block_rows=block_rows,
                                                 cache_bytes=cache, device=device)
        return _PROJECTORS[key]


def feature_table(path: str, sha256: str, dim: int | None = None):
    """A features file with its features at projection dimension ``dim`` (default: all it
    stores), read once per process (keyed by path and content hash): a worker that handles
    many subsets does not re-read what it already holds."""
    from .features import read_features

    with _LOCK:
        full = _TABLES.get((path, sha256, None))
    if full is None:
        full = read_features(path)
        with _LOCK:
            _TABLES[(path, sha256, None)] = full
    if dim is None or dim == full.d:
        return full
    with _LOCK:
        hit = _TABLES.get((path, sha256, dim))
    if hit is None:
        hit = full.at_dim(dim)
        with _LOCK:
            _TABLES[(path, sha256, dim)] = hit
    return hit


def release_models() -> None:
    """Drop the process's θ* models, projection blocks and scoring models (at the end of
    stage 1, and of stages 5–6)."""
    with DEVICE_LOCK, _LOCK:
        _MODELS.clear()
        _PROJECTORS.clear()
        _SCORERS.clear()
    release_memory()


def release_memory() -> None:
    """Give freed memory back after a model stage: without it glibc keeps each worker thread's
    arena at its peak (a training step's activations) and a long run's resident size only
    grows; on CUDA, empty the caching allocator."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def on_device(fn=None, *, release: bool = True):
    """Run a model-using function under the process's device lock, releasing memory after
    (``release``). Forward-only scoring passes ``release=False``: its batches are small and
    alike, so the arenas do not grow, and a release (a full garbage collection and a heap
    trim, about 0.3 s with a model loaded) would cost more than the scoring of a small task;
    the stage-5 flow releases once at its end (``release_models``)."""
    if fn is None:
        return functools.partial(on_device, release=release)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        with DEVICE_LOCK:
            try:
                return fn(*a, **k)
            finally:
                if release:
                    release_memory()
    return wrapper
