"""The stage-1 gradient features: in memory (:class:`FeatureTable`) and on disk (Parquet).

One row per (example, answer choice), rows of one example contiguous and in choice order:

    task, split, example_id, choice, is_gold, output h_c(s) at θ*,
    grad g̃_c(s) = Pᵀ∇(h_c(s) − h_0(s))   (d floats; zero for the reference choice c = 0)

Only differences of an example's scores matter to everything that reads the features — a
softmax over the choices is unchanged when the same vector is added to every g̃_c of one
example (docs/design.md, "Stage 1") — so the gradient of each score *difference* against the
example's first choice is what stage 1 computes: C − 1 backward passes per example, one for a
binary task.

On disk (format ``projected-gradient-features/v2``, in the schema's ``ensemble_lora``
metadata) the ``grad`` column holds the *unit* projection Zᵀ∇(h_c − h_0), Z the seeded p × D
standard-normal matrix of ``projection`` at the largest D computed; the features at any
d ≤ D are its first d columns times 1/√d (:func:`read_features` ``dim``), an exact N(0, 1/d)
projection with the same bits as a stage 1 run at d. This is the only contract between stage 1
and the stages that read features (stage 2's surrogate, stage 5's boosting).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .choices import Choices
from .storage import atomic_write_bytes, fs_and_path

FEATURE_COLUMNS = ("task", "split", "example_id", "choice", "is_gold", "output", "grad")
FEATURES_FORMAT = b"projected-gradient-features/v2"
GRAD_MEANING = (b"Z^T grad(h_c - h_0): unit-normal projection (Z: p x D, seeded) of the "
                b"gradient of the choice's score minus the first choice's (zero for c = 0); "
                b"the features at d <= D are the first d columns / sqrt(d)")


class FeatureFormatError(ValueError):
    """A features file of another format (an older version of the project, or not ours)."""


def unit_scale(d: int) -> np.float32:
    """1/√d in float32: the features at d are float32(Zᵀg)[:, :d] · unit_scale(d)."""
    return np.float32(1.0 / math.sqrt(d))


@dataclass(frozen=True)
class FeatureTable:
    task: str
    split: str
    example_id: np.ndarray  # [R] str (object)
    choice: np.ndarray  # [R] int32, 0..C_i-1 within an example
    is_gold: np.ndarray  # [R] bool, exactly one True per example
    output: np.ndarray  # [R] float32, h_c(s) at θ*
    grad: np.ndarray  # [R, d] float32, the features Pᵀ∇(h_c − h_0) at d
    offsets: np.ndarray = field(default=None)  # [n_examples + 1] row offsets, derived
    unit: np.ndarray | None = None  # [R, D ≥ d] Zᵀ∇(h_c − h_0), as the file stores it

    def __post_init__(self):
        r = len(self.choice)
        for name in ("example_id", "is_gold", "output"):
            if len(getattr(self, name)) != r:
                raise ValueError(f"FeatureTable {self.task}/{self.split}: column {name} has "
                                 f"{len(getattr(self, name))} rows, expected {r}")
        if self.grad.ndim != 2 or self.grad.shape[0] != r:
            raise ValueError(f"FeatureTable {self.task}/{self.split}: grad has shape "
                             f"{self.grad.shape}, expected ({r}, d)")
        if self.unit is not None and (self.unit.ndim != 2 or self.unit.shape[0] != r
                                      or self.unit.shape[1] < self.grad.shape[1]):
            raise ValueError(f"FeatureTable {self.task}/{self.split}: unit projections of shape "
                             f"{self.unit.shape} for features of shape {self.grad.shape}")
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

    @classmethod
    def from_unit(cls, task, split, example_id, choice, is_gold, output, unit: np.ndarray,
                  d: int | None = None) -> "FeatureTable":
        """A table from unit projections Zᵀ∇(h_c − h_0), with the features at d (default all
        of unit's columns)."""
        unit = np.ascontiguousarray(unit, dtype=np.float32)
        d = unit.shape[1] if d is None else int(d)
        if not 0 < d <= unit.shape[1]:
            raise ValueError(f"FeatureTable {task}/{split}: d = {d} is not one of the computed "
                             f"projection dimensions 1..{unit.shape[1]}")
        return cls(task, split, example_id, choice, is_gold, output,
                   unit[:, :d] * unit_scale(d), unit=unit)

    @property
    def d(self) -> int:
        return int(self.grad.shape[1])

    def at_dim(self, d: int) -> "FeatureTable":
        """The same rows with the features at projection dimension d (≤ the stored D)."""
        if self.unit is None:
            raise ValueError(f"FeatureTable {self.task}/{self.split} has no unit projections "
                             "(it was not read from a features file)")
        return FeatureTable.from_unit(self.task, self.split, self.example_id, self.choice,
                                      self.is_gold, self.output, self.unit, d)

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
                            self.is_gold[rows], self.output[rows], self.grad[rows],
                            unit=None if self.unit is None else self.unit[rows])


def feature_schema(d: int) -> pa.Schema:
    return pa.schema([
        ("task", pa.string()), ("split", pa.string()), ("example_id", pa.string()),
        ("choice", pa.int32()), ("is_gold", pa.bool_()), ("output", pa.float32()),
        ("grad", pa.list_(pa.float32(), d)),
    ], metadata={b"ensemble_lora": FEATURES_FORMAT, b"grad": GRAD_MEANING})


def features_to_arrow(t: FeatureTable) -> pa.Table:
    if t.unit is None:
        raise ValueError(f"FeatureTable {t.task}/{t.split}: only a table with its unit "
                         "projections (FeatureTable.from_unit) can be written")
    R, d = t.unit.shape
    grad = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(t.unit, dtype=np.float32).reshape(-1), pa.float32()), d)
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


def read_features(url: str, columns: Iterable[str] | None = None,
                  dim: int | None = None) -> FeatureTable:
    """Read a features file back, with the features at projection dimension ``dim`` (default:
    all stored columns). Column selection is supported (output/grad can be skipped). A file of
    another format is a :class:`FeatureFormatError` that says to recompute it."""
    cols = list(columns) if columns is not None else list(FEATURE_COLUMNS)
    need = {"task", "split", "example_id", "choice", "is_gold"}
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"features file not found: {url}")
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        meta = pf.schema_arrow.metadata or {}
        fmt = meta.get(b"ensemble_lora")
        if fmt != FEATURES_FORMAT:
            what = fmt.decode(errors="replace") if fmt else "no ensemble_lora format"
            raise FeatureFormatError(
                f"{url}: features file of format {what!r}, this version reads "
                f"{FEATURES_FORMAT.decode()!r} (gradients of score differences); delete the "
                f"run's gradients/ directory (or choose another output_dir) to recompute it")
        table = pf.read(columns=sorted(need | set(cols)))
    R = table.num_rows
    task = table.column("task")[0].as_py() if R else ""
    split = table.column("split")[0].as_py() if R else ""
    output = table.column("output").to_numpy() if "output" in table.column_names \
        else np.zeros(R, np.float32)
    args = (task, split, np.array(table.column("example_id").to_pylist(), dtype=object),
            table.column("choice").to_numpy().astype(np.int32),
            table.column("is_gold").to_numpy(zero_copy_only=False).astype(bool),
            output.astype(np.float32))
    if "grad" not in table.column_names:
        return FeatureTable(*args, np.zeros((R, 0), np.float32))
    arr = table.column("grad").combine_chunks()
    unit = arr.values.to_numpy(zero_copy_only=False).reshape(R, arr.type.list_size)
    if dim is not None and not 0 < dim <= unit.shape[1]:
        raise ValueError(f"{url}: projection dimension {dim} was not computed (the file holds "
                         f"d <= {unit.shape[1]})")
    return FeatureTable.from_unit(*args, unit, dim)
