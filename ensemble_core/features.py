"""The stage-1 gradient features: in memory (:class:`FeatureTable`) and on disk (Parquet).

One row per (example, answer choice), rows of one example contiguous and in choice order:

    task, split, example_id, choice, is_gold, output h_c(s) at θ*, grad g̃_c(s) = Pᵀ ∇h_c(s) (d floats)

This is the only contract between stage 1 (gradients) and the stages that read features
(stage 2's surrogate, stage 5's boosting); docs/design.md, "Stage 1", describes the file.
Files are versioned (the schema's ``ensemble_lora`` metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .choices import Choices
from .storage import atomic_write_bytes, fs_and_path

FEATURE_COLUMNS = ("task", "split", "example_id", "choice", "is_gold", "output", "grad")
FEATURES_FORMAT = b"projected-gradient-features/v1"


@dataclass(frozen=True)
class FeatureTable:
    task: str
    split: str
    example_id: np.ndarray  # [R] str (object)
    choice: np.ndarray  # [R] int32, 0..C_i-1 within an example
    is_gold: np.ndarray  # [R] bool, exactly one True per example
    output: np.ndarray  # [R] float32, h_c(s) at θ*
    grad: np.ndarray  # [R, d] float32, projected gradient
    offsets: np.ndarray = field(default=None)  # [n_examples + 1] row offsets, derived

    def __post_init__(self):
        r = len(self.choice)
        for name in ("example_id", "is_gold", "output"):
            if len(getattr(self, name)) != r:
                raise ValueError(f"FeatureTable {self.task}/{self.split}: column {name} has "
                                 f"{len(getattr(self, name))} rows, expected {r}")
        if self.grad.ndim != 2 or self.grad.shape[0] != r:
            raise ValueError(f"FeatureTable {self.task}/{self.split}: grad has shape "
                             f"{self.grad.shape}, expected ({r}, d)")
        if self.offsets is None:
            starts = np.flatnonzero(np.asarray(self.choice) == 0)
            object.__setattr__(self, "offsets", np.append(starts, r).astype(np.int64))
        gold_per_example = np.add.reduceat(self.is_gold.astype(np.int64), self.offsets[:-1]) \
            if r else np.zeros(0, np.int64)
        if r and not np.all(gold_per_example == 1):
            bad = int(np.flatnonzero(gold_per_example != 1)[0])
            raise ValueError(f"FeatureTable {self.task}/{self.split}: example "
                             f"{self.example_id[self.offsets[bad]]!r} has {gold_per_example[bad]} "
                             "gold choices, expected exactly 1")

    @property
    def d(self) -> int:
        return int(self.grad.shape[1])

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_choices(self) -> np.ndarray:
        """[n_examples] number of answer choices of each example."""
        return np.diff(self.offsets)

    @property
    def gold_index(self) -> np.ndarray:
        """[n_examples] index (within the example) of the gold choice."""
        return self.choice[self.is_gold].astype(np.int64)

    @property
    def example_index(self) -> np.ndarray:
        """[R] example number of each row (0..n_examples-1)."""
        return np.repeat(np.arange(self.n_examples), self.n_choices)

    @property
    def choices(self) -> Choices:
        """The rows' ragged layout with the gold choices (choices.Choices)."""
        return Choices.from_offsets(self.offsets, np.flatnonzero(self.is_gold))

    def select_examples(self, idx: np.ndarray) -> "FeatureTable":
        idx = np.asarray(idx, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) \
            if len(idx) else np.zeros(0, np.int64)
        return FeatureTable(self.task, self.split, self.example_id[rows], self.choice[rows],
                            self.is_gold[rows], self.output[rows], self.grad[rows])


def feature_schema(d: int) -> pa.Schema:
    return pa.schema([
        ("task", pa.string()), ("split", pa.string()), ("example_id", pa.string()),
        ("choice", pa.int32()), ("is_gold", pa.bool_()), ("output", pa.float32()),
        ("grad", pa.list_(pa.float32(), d)),
    ], metadata={b"ensemble_lora": FEATURES_FORMAT})


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
