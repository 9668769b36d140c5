"""Files of a run on any fsspec URL: Parquet features, JSON records, atomic writes.

Every file is written under a temporary name in the same directory and renamed when complete,
so a reader never sees a half-written file under its final name.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .features import FeatureTable

FEATURE_COLUMNS = ("task", "split", "example_id", "choice", "is_gold", "output", "grad")


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def fs_and_path(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def atomic_write_bytes(url: str, data: bytes) -> str:
    """Write bytes to url via a temporary sibling + rename; returns the sha256 of the content."""
    fs, path = fs_and_path(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise
    return hashlib.sha256(data).hexdigest()


def write_json(url: str, obj) -> str:
    return atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str):
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def file_sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_schema(d: int) -> pa.Schema:
    return pa.schema([
        ("task", pa.string()), ("split", pa.string()), ("example_id", pa.string()),
        ("choice", pa.int32()), ("is_gold", pa.bool_()), ("output", pa.float32()),
        ("grad", pa.list_(pa.float32(), d)),
    ], metadata={b"ensemble_lora": b"projected-gradient-features/v1"})


def features_to_arrow(t: FeatureTable) -> pa.Table:
    R, d = t.grad.shape
    grad = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(t.grad, dtype=np.float32).reshape(-1), pa.float32()), d)
    return pa.Table.from_arrays([
        pa.array([t.task] * R, pa.string()), pa.array([t.split] * R, pa.string()),
        pa.array([str(x) for x in t.example_id], pa.string()),
        pa.array(t.choice.astype(np.int32)), pa.array(t.is_gold.astype(bool)),
        pa.array(t.output.astype(np.float32)), grad,
    ], schema=feature_schema(d))


def write_features(url: str, t: FeatureTable) -> str:
    """One Parquet file per task and split; returns the content sha256."""
    sink = pa.BufferOutputStream()
    pq.write_table(features_to_arrow(t), sink, compression="zstd")
    return atomic_write_bytes(url, sink.getvalue().to_pybytes())


def read_features(url: str, columns: Iterable[str] | None = None) -> FeatureTable:
    """Read a features file back (column selection supported: output/grad can be skipped)."""
    cols = list(columns) if columns is not None else list(FEATURE_COLUMNS)
    need = {"task", "split", "example_id", "choice", "is_gold"}
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"features file not found: {url}")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=sorted(need | set(cols)))
    R = table.num_rows
    task = table.column("task")[0].as_py() if R else ""
    split = table.column("split")[0].as_py() if R else ""
    if "grad" in table.column_names:
        arr = table.column("grad").combine_chunks()
        d = arr.type.list_size
        grad = arr.values.to_numpy(zero_copy_only=False).reshape(R, d)
    else:
        grad = np.zeros((R, 0), np.float32)
    output = table.column("output").to_numpy() if "output" in table.column_names \
        else np.zeros(R, np.float32)
    return FeatureTable(task, split,
                        np.array(table.column("example_id").to_pylist(), dtype=object),
                        table.column("choice").to_numpy().astype(np.int32),
                        table.column("is_gold").to_numpy(zero_copy_only=False).astype(bool),
                        output.astype(np.float32), grad)


def remove_stale_temporaries(url_dir: str) -> int:
    """Delete leftovers of interrupted writes (``*.tmp-*``) under a directory."""
    fs, path = fs_and_path(url_dir)
    if not fs.exists(path):
        return 0
    n = 0
    for p in fs.find(path):
        if ".tmp-" in os.path.basename(p):
            fs.rm(p)
            n += 1
    return n
