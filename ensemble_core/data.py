"""Benchmark and user datasets as multiple-choice examples.

Every task, builtin or user-defined, becomes a list of :class:`Example` per split:
a ``prompt`` the model reads and ``choices``, the continuations appended to it, one per
answer choice; ``label`` is the index of the gold continuation.  Classification tasks use
a verbalizer (e.g. label ``entailment`` <-> continuation ``" yes"``), tasks such as COPA
use per-example candidates (``choice1`` / ``choice2``).

Data layout (see the data README): SuperGLUE in the FewGLUE_32dev layout (``train.jsonl``
with 32 examples, ``dev32.jsonl`` with 32 and ``val.jsonl``, the full official validation
set, which serves as our test split), GLUE as the official tsv files (``train.tsv``, and
``dev.tsv`` as test split since GLUE test labels are not public; validation is carved out
of train).  The data location is always a parameter (``data_root``: a directory or any
fsspec URL); nothing here assumes where it lives.

Determinism: carving and capping use ``numpy.random.default_rng(seed)`` permutations, so
the same config yields the same splits in every process (no Python ``hash()`` involved).
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import posixpath
import re
import string
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import fsspec
import numpy as np
from pydantic import ConfigDict, Field

from .registry import NoCoercion

from .storage import positive_env

__all__ = [
    "DataError", "Example", "CarveSpec", "TaskConfig", "TaskData", "SPLITS",
    "builtin_tasks", "resolve_task", "load_task", "read_records", "format_record",
    "preprocess_records",
]

SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Any problem with a task config or its data; the message names the task, the file
    URL, the line number and/or the field at fault, as applicable."""


# --------------------------------------------------------------------------- data types

@dataclass(frozen=True)
class Example:
    task: str
    split: str  # "train" | "validation" | "test"
    example_id: str  # stable, unique within (task, split)
    prompt: str  # text the model reads
    choices: tuple[str, ...]  # continuations appended to the prompt, one per answer choice
    label: int  # index of the gold choice in `choices`

    def __post_init__(self):
        if len(self.choices) < 2:
            raise DataError(f"task {self.task!r}: example {self.example_id!r} has "
                            f"{len(self.choices)} choice(s), at least 2 are needed")
        if not 0 <= self.label < len(self.choices):
            raise DataError(f"task {self.task!r}: example {self.example_id!r} has label "
                            f"{self.label}, outside 0..{len(self.choices) - 1}")


class CarveSpec(NoCoercion):
    """Take ``n`` examples out of split ``from`` (they are removed from it)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    from_: str = Field(alias="from")
    n: int = Field(ge=1)


class TaskConfig(NoCoercion):
    """One task of a run.  With ``builtin`` set, the builtin's defaults fill every field the
    user did not set explicitly (an explicitly set field replaces the builtin's value as a
    whole, dicts included).  Serialize unresolved configs with ``exclude_unset=True`` (or
    resolve first), otherwise generic defaults would count as explicit overrides."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)  # unique task name in a run
    builtin: str | None = None  # e.g. "superglue/rte"
    files: dict[str, str] = {}  # split -> path or URL (relative: against data_root)
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"  # auto: by extension
    template: str | None = None  # str.format template over the record fields
    label_field: str = "label"
    choices: list[str] | None = None  # verbalizer continuations; choice i <-> label_values[i]
    label_values: list[Any] | None = None  # raw label values in choice order
    choice_fields: list[str] | None = None  # per-example candidates instead of verbalizers
    choice_template: str = " {choice}"  # how a per-example candidate becomes a continuation
    id_field: str | None = None  # default: line number (row number for parquet)
    # csv/tsv: the field names, for a file without a header row (header: false), or to rename
    # the header's (header: true: its first row is skipped)
    columns: list[str] | None = None
    header: bool | None = None  # default: true, false when columns are given
    # raw label value -> choice (its index, its label_values entry, or its continuation);
    # several values may map to one choice; values not listed are an error
    label_map: dict[str, int | str] | None = None
    # a numeric label becomes choice k = the number of thresholds <= it (ascending; e.g.
    # [2.5]: below 2.5 -> choice 0, from 2.5 on -> choice 1)
    label_thresholds: list[float] | None = None
    max_examples: dict[str, int] = {}  # per-split caps, seeded subsample, original order kept
    carve: dict[str, CarveSpec] = {}  # split -> where to carve it from
    seed: int = Field(0, ge=0, le=2**32 - 1)


@dataclass
class TaskData:
    config: TaskConfig  # fully resolved (builtin defaults applied)
    splits: dict[str, list[Example]]  # "train", "validation", "test" (test may be empty)
    provenance: dict = field(default_factory=dict)  # JSON-able, see load_task


# --------------------------------------------------------------------------- reading files

@dataclass
class _Record:
    number: int  # 1-based line number (csv/tsv/jsonl) or row number (parquet)
    data: dict


@dataclass
class _File:
    url: str
    sha256: str
    unit: str  # "line" or "row": what `_Record.number` counts
    records: list[_Record]

    def where(self, rec: _Record) -> str:
        return f"{self.url} {self.unit} {rec.number}"


def _detect_format(url: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"{url}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        return fmt
    path = url.split("?", 1)[0].lower()
    if path.endswith(".gz"):
        path = path[:-3]
    ext = posixpath.splitext(path)[1]
    if ext not in _EXTENSIONS:
        raise DataError(f"{url}: cannot tell the format from extension {ext!r}; use one of "
                        f"{', '.join(sorted(_EXTENSIONS))} or set format to one of "
                        f"{', '.join(FORMATS)}")
    return _EXTENSIONS[ext]


MAX_FORMAT_NUMBER = 1000  # a template's {field:999999999} would build a huge string
MAX_DATA_BYTES_ENV = "ENSEMBLE_LORA_MAX_DATA_BYTES"
DEFAULT_MAX_DATA_BYTES = 1 << 30  # 1 GiB read, and 1 GiB after decompression


def max_data_bytes() -> int:
    value = positive_env(MAX_DATA_BYTES_ENV, DEFAULT_MAX_DATA_BYTES, "bytes", DataError)
    return int(value) if math.isfinite(value) else sys.maxsize


def _read_bytes(url: str) -> bytes:
    """A data file's bytes (gunzipped for ``.gz``): a regular file only (not a device, FIFO or
    directory), at most ``ENSEMBLE_LORA_MAX_DATA_BYTES`` read and as many after
    decompression, so a bad path or a gzip bomb fails at once naming the file."""
    limit = max_data_bytes()
    too_big = (f"is larger than {limit} bytes (the limit for a data file; set "
               f"{MAX_DATA_BYTES_ENV} to raise it)")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise DataError(f"cannot open {url}: {e}") from None
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise DataError(f"file not found: {url}") from e
    except OSError as e:
        raise DataError(f"cannot read {url}: {e}") from e
    kind = info.get("type")
    if kind not in ("file", None):
        raise DataError(f"{url}: not a regular file ({kind}); a data file must be one")
    size = info.get("size")
    if isinstance(size, int) and size > limit:
        raise DataError(f"{url} {too_big}")
    try:
        with fs.open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError as e:
        raise DataError(f"file not found: {url}") from e
    except OSError as e:
        raise DataError(f"cannot read {url}: {e}") from e
    if len(raw) > limit:
        raise DataError(f"{url} {too_big}")
    if url.split("?", 1)[0].lower().endswith(".gz"):
        import zlib

        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as g:
                raw = g.read(limit + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{url}: not a valid gzip file ({e})") from None
        if len(raw) > limit:
            raise DataError(f"{url} decompresses to more than {limit} bytes (the limit for "
                            f"a data file; set {MAX_DATA_BYTES_ENV} to raise it)")
    return raw


def _decode(raw: bytes, url: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # drops a leading BOM (MRPC's header has one)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{url} line {line}: not valid UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from e


def _parse_jsonl(text: str, url: str) -> list[_Record]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{url} line {number}: malformed JSON at column {e.colno} "
                            f"({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{url} line {number}: expected a JSON object, got "
                            f"{type(obj).__name__}")
        records.append(_Record(number, obj))
    return records


def _parse_delimited(text: str, url: str, delimiter: str,
                     fieldnames: tuple[str, ...] | None = None,
                     skip_header: bool = False) -> list[_Record]:
    """csv: standard quoting.  tsv: quoting disabled (csv.QUOTE_NONE) because the GLUE
    files contain unbalanced quote characters inside the text.  Without `fieldnames`
    the first row is the header; with them and `skip_header`, the first row is skipped."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long passages
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    records = []
    header = list(fieldnames) if fieldnames is not None else None
    if header is not None:
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise DataError(f"{url}: duplicate column name(s) {dup}")
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if skip_header:
                skip_header = False
                continue
            if header is None:
                header = [h.strip() for h in row]
                dup = sorted({h for h in header if header.count(h) > 1})
                if dup:
                    raise DataError(f"{url} line {reader.line_num}: duplicate column(s) "
                                    f"{dup} in header")
                continue
            if len(row) != len(header):
                names = "the header has" if fieldnames is None else "columns names"
                raise DataError(f"{url} line {reader.line_num}: {len(row)} fields, {names} "
                                f"{len(header)} ({header})")
            records.append(_Record(reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{url} line {reader.line_num}: {e}") from e
    return records


def _parse_parquet(raw: bytes, url: str) -> list[_Record]:
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except Exception as e:  # pyarrow raises several types for broken files
        raise DataError(f"{url}: cannot read as parquet: {e}") from e
    return [_Record(i, row) for i, row in enumerate(rows, start=1)]


def _read_file(url: str, fmt: str = "auto",
               fieldnames: tuple[str, ...] | None = None, skip_header: bool = False) -> _File:
    fmt = _detect_format(url, fmt)
    raw = _read_bytes(url)
    digest = hashlib.sha256(raw).hexdigest()
    if fmt == "parquet":
        return _File(url, digest, "row", _parse_parquet(raw, url))
    text = _decode(raw, url)
    if fmt == "jsonl":
        records = _parse_jsonl(text, url)
    else:
        records = _parse_delimited(text, url, "\t" if fmt == "tsv" else ",", fieldnames,
                                   skip_header)
    return _File(url, digest, "line", records)


def read_records(url: str, fmt: str = "auto") -> list[dict]:
    """Records of one csv/tsv (header row, UTF-8 with or without BOM), jsonl or parquet file
    at a local path or fsspec URL.  Errors name the file and, where known, the line."""
    return [r.data for r in _read_file(url, fmt).records]


# --------------------------------------------------------------------------- builtins
# Each preprocess reshapes the records of one file in place of the generic path; it keeps
# the line number of the source record so errors still point into the file.

def _flatten_multirc(records: list[_Record]) -> list[_Record]:
    # MultiRC: one line = one passage with several questions, each with several candidate
    # answers judged true/false independently -> one binary example per answer.
    out = []
    for rec in records:
        p = rec.data
        try:
            passage = p["passage"]
            for q in passage["questions"]:
                for a in q["answers"]:
                    out.append(_Record(rec.number, {
                        "id": f"{p['idx']}-{q['idx']}-{a['idx']}",
                        "paragraph": passage["text"], "question": q["question"],
                        "answer": a["text"], "label": a.get("label"),
                    }))
        except (KeyError, TypeError) as e:
            raise DataError(f"line {rec.number}: MultiRC record lacks field {e} "
                            f"(available: {sorted(p)})") from e
    return out


def _flatten_wsc(records: list[_Record]) -> list[_Record]:
    # WSC: the noun phrase (span1) and the pronoun (span2) sit in a nested "target" object.
    out = []
    for rec in records:
        target = rec.data.get("target")
        if not isinstance(target, dict):
            raise DataError(f"line {rec.number}: WSC record lacks field 'target' "
                            f"(available: {sorted(rec.data)})")
        out.append(_Record(rec.number, {**rec.data, **target}))
    return out


def _lower_first(sentence: str) -> str:
    first = sentence.split(" ", 1)[0]
    if first == "I" or first.startswith("I'"):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def _copa_connective(records: list[_Record]) -> list[_Record]:
    # COPA: "premise because <cause>" / "premise so <effect>"; the candidate sentences
    # continue the premise, so its final period goes and theirs start in lower case.
    connective = {"cause": "because", "effect": "so"}
    out = []
    for rec in records:
        d = dict(rec.data)
        for key in ("premise", "question", "choice1", "choice2"):
            if key not in d:
                raise DataError(f"line {rec.number}: COPA record lacks field {key!r} "
                                f"(available: {sorted(d)})")
        if d["question"] not in connective:
            raise DataError(f"line {rec.number}: COPA field 'question' is "
                            f"{d['question']!r}, expected 'cause' or 'effect'")
        d["premise_stem"] = d["premise"].strip().rstrip(".")
        d["connective"] = connective[d["question"]]
        d["choice1"] = _lower_first(d["choice1"].strip())
        d["choice2"] = _lower_first(d["choice2"].strip())
        out.append(_Record(rec.number, d))
    return out


@dataclass(frozen=True)
class _Builtin:
    defaults: dict
    preprocess: Callable[[list[_Record]], list[_Record]] | None = None
    fieldnames: tuple[str, ...] | None = None  # for headerless files


def _superglue(task: str, **defaults) -> dict:
    # FewGLUE_32dev layout: 32 train, 32 dev32 (our validation), full official val (test).
    return {"files": {"train": f"superglue/{task}/train.jsonl",
                      "validation": f"superglue/{task}/dev32.jsonl",
                      "test": f"superglue/{task}/val.jsonl"},
            "id_field": "idx", **defaults}


def _glue(task: str, **defaults) -> dict:
    # GLUE test labels are not public: dev.tsv is the test split, validation is carved
    # (seeded) out of train.
    return {"files": {"train": f"glue/{task}/train.tsv", "test": f"glue/{task}/dev.tsv"},
            "carve": {"validation": {"from": "train", "n": 200}}, **defaults}


_YES_NO = [" no", " yes"]  # choice 0 <-> false/0, choice 1 <-> true/1

_BUILTINS: dict[str, _Builtin] = {
    "superglue/boolq": _Builtin(_superglue(
        "BoolQ", template="{passage}\nQuestion: {question}?\nAnswer:",
        choices=_YES_NO, label_values=[False, True])),
    "superglue/cb": _Builtin(_superglue(
        "CB", template="{premise}\nQuestion: {hypothesis}? Yes, no, or maybe?\nAnswer:",
        choices=[" yes", " no", " maybe"],
        label_values=["entailment", "contradiction", "neutral"])),
    "superglue/copa": _Builtin(_superglue(
        "COPA", template="{premise_stem} {connective}",
        choice_fields=["choice1", "choice2"], choice_template=" {choice}"),
        preprocess=_copa_connective),
    "superglue/multirc": _Builtin(_superglue(
        "MultiRC", template="{paragraph}\nQuestion: {question}\nCandidate answer: {answer}\n"
                            "Is the candidate answer correct?\nAnswer:",
        choices=_YES_NO, label_values=[0, 1], id_field="id"),
        preprocess=_flatten_multirc),
    "superglue/rte": _Builtin(_superglue(
        "RTE", template="{premise}\nQuestion: {hypothesis} Yes or no?\nAnswer:",
        choices=[" yes", " no"], label_values=["entailment", "not_entailment"])),
    "superglue/wic": _Builtin(_superglue(
        "WiC", template="Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the "
                        "word \"{word}\" used with the same meaning in both sentences?\nAnswer:",
        choices=_YES_NO, label_values=[False, True])),
    "superglue/wsc": _Builtin(_superglue(
        "WSC", template="{text}\nQuestion: In the passage above, does the pronoun "
                        "\"{span2_text}\" refer to \"{span1_text}\"?\nAnswer:",
        choices=_YES_NO, label_values=[False, True]),
        preprocess=_flatten_wsc),
    "glue/cola": _Builtin(_glue(
        "CoLA", template="{sentence}\nQuestion: Is this sentence grammatically "
                         "acceptable?\nAnswer:",
        choices=_YES_NO, label_values=[0, 1]),
        fieldnames=("source", "label", "original_label", "sentence")),
    "glue/sst2": _Builtin(_glue(
        "SST-2", template="{sentence}\nQuestion: Is this review positive or negative?\n"
                          "Answer:",
        choices=[" negative", " positive"], label_values=[0, 1])),
    "glue/mrpc": _Builtin(_glue(
        "MRPC", template="Sentence 1: {#1 String}\nSentence 2: {#2 String}\nQuestion: Do "
                         "both sentences mean the same thing?\nAnswer:",
        label_field="Quality", choices=_YES_NO, label_values=[0, 1])),
    "glue/rte": _Builtin(_glue(
        "RTE", template="{sentence1}\nQuestion: {sentence2} Yes or no?\nAnswer:",
        choices=[" yes", " no"], label_values=["entailment", "not_entailment"],
        id_field="index")),
    "glue/wnli": _Builtin(_glue(
        "WNLI", template="{sentence1}\nQuestion: {sentence2} Yes or no?\nAnswer:",
        choices=_YES_NO, label_values=[0, 1], id_field="index")),  # 1 = entailment
}


def builtin_tasks() -> list[str]:
    return sorted(_BUILTINS)


def _builtin(name: str) -> _Builtin:
    if name not in _BUILTINS:
        raise DataError(f"unknown builtin {name!r}; known builtins: "
                        f"{', '.join(builtin_tasks())}")
    return _BUILTINS[name]


def resolve_task(cfg: TaskConfig) -> TaskConfig:
    """Apply builtin defaults: every field the user set explicitly (and not to None)
    overrides the builtin's value."""
    if cfg.builtin is None:
        return cfg
    try:
        spec = _builtin(cfg.builtin)
    except DataError as e:
        raise DataError(f"task {cfg.name!r}: {e}") from None
    user = {k: v for k, v in cfg.model_dump(by_alias=True).items()
            if k in cfg.model_fields_set and v is not None}
    return TaskConfig.model_validate({**spec.defaults, **user})


# --------------------------------------------------------------------------- labels

def _label_key(value: Any) -> tuple | None:
    """Canonical form for matching raw label values: 1, 1.0 and "1" match; "true"/"True"
    and True match; other strings match after stripping whitespace."""
    if isinstance(value, (bool, np.bool_)):
        return ("bool", bool(value))
    if isinstance(value, (int, np.integer)):
        return ("int", int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return ("int", int(value))
    if isinstance(value, str):
        s = value.strip()
        if s.lower() in ("true", "false"):
            return ("bool", s.lower() == "true")
        try:
            return ("int", int(s))
        except ValueError:
            return ("str", s)
    if value is None:
        return None
    return ("other", repr(value))


def _choice_index(cfg: TaskConfig, target, n_choices: int) -> int:
    """A label_map target: a choice index, a label_values entry or a continuation."""
    if isinstance(target, int) and not isinstance(target, bool):
        if 0 <= target < n_choices:
            return target
    else:
        if cfg.label_values is not None:
            keys = [_label_key(v) for v in cfg.label_values]
            if _label_key(target) in keys:
                return keys.index(_label_key(target))
        if cfg.choices is not None and target in cfg.choices:
            return cfg.choices.index(target)
    raise DataError(f"task {cfg.name!r}: label_map maps to {target!r}, which is no choice "
                    f"(indices 0..{n_choices - 1}"
                    + (f", label_values {cfg.label_values}" if cfg.label_values else "")
                    + (f", choices {cfg.choices}" if cfg.choices else "") + ")")


def choice_labels(cfg: TaskConfig) -> list:
    """What each choice is called in the task's own labels (predictions report it): its
    label_values entry; with a label_map, the first raw value that maps to it; with
    thresholds, its range (or its label_values entry, which then names the ranges); else its
    index."""
    n = len(cfg.choices if cfg.choices is not None else cfg.choice_fields)
    if cfg.label_thresholds is not None:
        if cfg.label_values is not None:  # the ranges' own names
            return list(cfg.label_values)
        th = cfg.label_thresholds
        return [f"< {th[0]:g}"] + [f"[{a:g}, {b:g})" for a, b in zip(th, th[1:])] \
            + [f">= {th[-1]:g}"]
    if cfg.label_map is not None:
        first: dict[int, Any] = {}
        for raw, target in cfg.label_map.items():
            first.setdefault(_choice_index(cfg, target, n), raw)
        return [first.get(k, cfg.label_values[k] if cfg.label_values else k) for k in range(n)]
    if cfg.label_values is not None:
        return list(cfg.label_values)
    return list(range(n))


def _brief(value, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, cut to ``limit`` characters (an error
    names the file, line and field; it does not copy the file's contents)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"


def _threshold_label(cfg: TaskConfig, raw, where: str) -> int:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field {cfg.label_field!r} has label value {_brief(raw)}, which "
                        f"is not a number (label_thresholds {cfg.label_thresholds})") from None
    if x != x:
        raise DataError(f"{where}: field {cfg.label_field!r} has label value {_brief(raw)} (NaN)")
    return bisect.bisect_right(cfg.label_thresholds, x)


def _label_map(cfg: TaskConfig, n_choices: int) -> dict[tuple, int]:
    if cfg.label_map is not None:
        mapping = {}
        for raw, target in cfg.label_map.items():
            key = _label_key(raw)
            if key is None or key in mapping:
                raise DataError(f"task {cfg.name!r}: label_map key {raw!r} is "
                                f"{'null' if key is None else 'given twice'}")
            mapping[key] = _choice_index(cfg, target, n_choices)
        return mapping
    if cfg.label_values is None:
        # Default [0, 1, ..., C-1]; with two choices also false/true.
        mapping = {("int", i): i for i in range(n_choices)}
        if n_choices == 2:
            mapping.update({("bool", False): 0, ("bool", True): 1})
        return mapping
    if len(cfg.label_values) != n_choices:
        raise DataError(f"task {cfg.name!r}: label_values has {len(cfg.label_values)} "
                        f"entries but there are {n_choices} choices")
    mapping = {}
    for i, v in enumerate(cfg.label_values):
        key = _label_key(v)
        if key is None or key in mapping:
            raise DataError(f"task {cfg.name!r}: label_values entry {v!r} is "
                            f"{'null' if key is None else 'a duplicate'}")
        mapping[key] = i
    return mapping


# --------------------------------------------------------------------------- loading

def _check_config(cfg: TaskConfig) -> None:
    name = cfg.name
    for what, keys in (("files", cfg.files), ("max_examples", cfg.max_examples),
                       ("carve", cfg.carve)):
        bad = sorted(set(keys) - set(SPLITS))
        if bad:
            raise DataError(f"task {name!r}: {what} has unknown split(s) {bad}; "
                            f"splits are {list(SPLITS)}")
    for split, spec in cfg.carve.items():
        if spec.from_ not in SPLITS:
            raise DataError(f"task {name!r}: carve[{split!r}] comes from unknown split "
                            f"{spec.from_!r}; splits are {list(SPLITS)}")
        if spec.from_ == split:
            raise DataError(f"task {name!r}: carve[{split!r}] cannot come from itself")
        if split in cfg.files:
            raise DataError(f"task {name!r}: split {split!r} is both read from "
                            f"{cfg.files[split]!r} and carved from {spec.from_!r}")
    for split, cap in cfg.max_examples.items():
        if cap < 1:
            raise DataError(f"task {name!r}: max_examples[{split!r}] = {cap}, must be >= 1")
    if not cfg.files:
        raise DataError(f"task {name!r}: no files given (set `files` or `builtin`)")
    if cfg.template is None:
        raise DataError(f"task {name!r}: no template given")
    if (cfg.choices is None) == (cfg.choice_fields is None):
        raise DataError(f"task {name!r}: set exactly one of `choices` (verbalizers) and "
                        f"`choice_fields` (per-example candidates)")
    options = cfg.choices if cfg.choices is not None else cfg.choice_fields
    what = "choices" if cfg.choices is not None else "choice_fields"
    if len(options) < 2:
        raise DataError(f"task {name!r}: {what} has {len(options)} entr"
                        f"{'y' if len(options) == 1 else 'ies'}, at least 2 are needed")
    if len(set(options)) != len(options):
        raise DataError(f"task {name!r}: {what} has duplicate entries {options}")
    if cfg.header is False and not cfg.columns:
        raise DataError(f"task {name!r}: header: false needs columns (the field names of the "
                        f"file's columns)")
    if cfg.columns is not None and cfg.format in ("jsonl", "parquet"):
        raise DataError(f"task {name!r}: columns name the fields of csv/tsv files, not "
                        f"{cfg.format}")
    if cfg.label_map is not None and cfg.label_thresholds is not None:
        raise DataError(f"task {name!r}: set at most one of label_map and label_thresholds")
    if cfg.label_thresholds is not None:
        th = cfg.label_thresholds
        if not th or any(b <= a for a, b in zip(th, th[1:])):
            raise DataError(f"task {name!r}: label_thresholds must be a non-empty ascending "
                            f"list, got {th}")
        if cfg.choices is not None and len(th) + 1 != len(cfg.choices):
            raise DataError(f"task {name!r}: {len(th)} label_thresholds make {len(th) + 1} "
                            f"choices, but choices has {len(cfg.choices)}")
        if cfg.label_values is not None and len(cfg.label_values) != len(th) + 1:
            raise DataError(f"task {name!r}: with label_thresholds, label_values names the "
                            f"{len(th) + 1} ranges the thresholds make (predictions report "
                            f"them); it has {len(cfg.label_values)} entries")
    for tmpl in (cfg.template, cfg.choice_template):
        try:
            parts = list(string.Formatter().parse(tmpl))
        except ValueError as e:
            raise DataError(f"task {name!r}: bad template {tmpl!r}: {e}") from e
        for _, fld, spec, _ in parts:
            if fld is None:
                continue
            if not fld or fld.isdigit() or "." in fld or "[" in fld:
                # no {x.attr}, {x[0]}, {0}: a record's fields by name only
                raise DataError(f"task {name!r}: template field {{{fld}}}: a template names "
                                "record fields only (no positional fields, attributes or "
                                "indexing)")
            if spec and any(int(n) > MAX_FORMAT_NUMBER for n in re.findall(r"\d+", spec)):
                raise DataError(f"task {name!r}: template field {{{fld}:{spec}}}: a format "
                                f"width or precision above {MAX_FORMAT_NUMBER}")


def _resolve_url(path: str, data_root: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(data_root.rstrip("/"), path) if data_root else path


def fill_template(template: str, values, what: str, where: str) -> str:
    """``template`` filled from a record's fields; a missing field or a bad format is a
    DataError that names ``where`` (file and line, or task and record) and the field.

    A field the template names must hold text: null, a list, an object or a boolean is an error
    (it would become "None" or a Python repr in the prompt). A number is text only where the
    template formats it on purpose, with a format spec (``{score:.1f}``, ``{year:d}``)."""
    for _, name, spec, _ in _template_fields(template):
        if name is None or name not in values:
            continue
        value = values[name]
        if isinstance(value, str):
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) \
            and not isinstance(value, (bool, np.bool_))
        if number and spec:
            continue
        kind = "null" if value is None else type(value).__name__
        hint = (f" (a number is allowed where the {what} formats it, e.g. {{{name}:g}})"
                if number else "")
        raise DataError(f"{where}: field {name!r} is {kind}, not text; the {what} puts it in "
                        f"the prompt{hint}")
    try:
        return template.format(**values)
    except KeyError as e:
        raise DataError(f"{where}: {what} names field {e.args[0]!r}, which the record "
                        f"lacks (available fields: {sorted(values)})") from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise DataError(f"{where}: cannot fill {what} {template!r}: {e}") from None


def _template_fields(template: str) -> list:
    """The (literal, field name, format spec, conversion) parts of a template (cached)."""
    hit = _FIELDS.get(template)
    if hit is None:
        try:
            hit = list(string.Formatter().parse(template))
        except ValueError:
            hit = []  # a malformed template: format() below names the error
        if len(_FIELDS) < 10_000:
            _FIELDS[template] = hit
    return hit


_FIELDS: dict[str, list] = {}


def format_record(template: str, choices, choice_fields, choice_template: str, record,
                  where: str) -> tuple[str, tuple[str, ...]]:
    """A record's prompt and answer choices, as training and prediction format them: the
    template filled from its fields, and the verbalizers (``choices``) or its per-example
    candidates (``choice_fields``, each through ``choice_template``). Errors name ``where``
    (file and line, or task and record) and the field."""
    prompt = fill_template(template, record, "template", where)
    if choices is not None:
        return prompt, tuple(choices)
    out = []
    for f in choice_fields:
        if f not in record:
            raise DataError(f"{where}: choice_fields names field {f!r}, which the record lacks "
                            f"(available fields: {sorted(record)})")
        out.append(fill_template(choice_template, {**record, "choice": record[f]},
                                 "choice_template", where))
    return prompt, tuple(out)


def preprocess_records(builtin: str | None, records: list[dict]) -> list[dict]:
    """A builtin task's record preprocessing (e.g. COPA's connective, MultiRC's flattening)
    applied to raw records in the dataset's own format; records are numbered from 1 in its
    errors ("line <n>: ...")."""
    spec = _BUILTINS.get(builtin) if builtin else None
    if spec is None or spec.preprocess is None:
        return records
    return [r.data for r in spec.preprocess([_Record(i, dict(r)) for i, r in enumerate(records)])]


def _examples(cfg: TaskConfig, split: str, file: _File) -> list[Example]:
    n_choices = len(cfg.choices if cfg.choices is not None else cfg.choice_fields)
    labels = _label_map(cfg, n_choices)
    allowed = cfg.label_values if cfg.label_values is not None else list(range(n_choices))
    out: list[Example] = []
    first_seen: dict[str, int] = {}
    for rec in file.records:
        where = file.where(rec)
        data = rec.data
        prompt, choices = format_record(cfg.template, cfg.choices, cfg.choice_fields,
                                        cfg.choice_template, data, where)
        if cfg.label_field not in data:
            raise DataError(f"{where}: label_field {cfg.label_field!r} is not in the record "
                            f"(available fields: {sorted(data)})")
        raw = data[cfg.label_field]
        if cfg.label_thresholds is not None:
            label = _threshold_label(cfg, raw, where)
        else:
            label = labels.get(_label_key(raw))
        if label is None:
            what = ("maps nowhere (label_map keys: "
                    f"{sorted(map(str, cfg.label_map))})" if cfg.label_map is not None
                    else f"not one of the label values {allowed}")
            raise DataError(f"{where}: field {cfg.label_field!r} has label value {_brief(raw)}, "
                            f"{what}")
        if cfg.id_field is None:
            example_id = str(rec.number)
        elif cfg.id_field not in data:
            raise DataError(f"{where}: id_field {cfg.id_field!r} is not in the record "
                            f"(available fields: {sorted(data)})")
        else:
            example_id = str(data[cfg.id_field])
        if example_id in first_seen:
            raise DataError(f"{where}: duplicate example id {example_id!r} in split "
                            f"{split!r} (first at {file.unit} {first_seen[example_id]})")
        first_seen[example_id] = rec.number
        out.append(Example(cfg.name, split, example_id, prompt, choices, label))
    return out


def _seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """k of range(n), chosen by a seeded permutation, returned in original order."""
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])


def load_task(cfg: TaskConfig, data_root: str) -> TaskData:
    """Read, carve and cap one task.

    Order: every split with a file is read (its examples keep file order), then carved
    splits are taken out of their source split (in train, validation, test order), then
    `max_examples` caps are applied.  Train and validation must end up non-empty.

    provenance = {"task", "builtin", "seed", "data_root", "config": resolved config,
                  "files": {url: sha256},
                  "splits": {split: {"source": url | "carved from <split>", "n": count}},
                  "carved": {split: {"from", "n", "ids"}},
                  "capped": {split: {"max", "from_n", "kept_ids"}}}
    """
    cfg = resolve_task(cfg)
    try:
        return _load(cfg, data_root)
    except DataError as e:
        if str(e).startswith(f"task {cfg.name!r}"):
            raise
        raise DataError(f"task {cfg.name!r}: {e}") from e


def _load(cfg: TaskConfig, data_root: str) -> TaskData:
    _check_config(cfg)
    spec = _BUILTINS.get(cfg.builtin) if cfg.builtin else None
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    prov: dict[str, Any] = {
        "task": cfg.name, "builtin": cfg.builtin, "seed": cfg.seed, "data_root": data_root,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "files": {}, "splits": {}, "carved": {}, "capped": {},
    }
    for split in SPLITS:
        if split not in cfg.files:
            continue
        url = _resolve_url(cfg.files[split], data_root)
        try:
            fieldnames = tuple(cfg.columns) if cfg.columns else (spec.fieldnames if spec
                                                                 else None)
            skip = bool(cfg.columns) and cfg.header is True
            file = _read_file(url, cfg.format, fieldnames, skip)
            if spec and spec.preprocess:
                try:
                    file.records = spec.preprocess(file.records)
                except DataError as e:  # preprocess errors name the line, add the file
                    raise DataError(f"{url} {e}") from e
            splits[split] = _examples(cfg, split, file)
        except DataError as e:
            raise DataError(f"task {cfg.name!r}: split {split!r}: {e}") from e
        prov["files"][url] = file.sha256
        prov["splits"][split] = {"source": url, "n": len(splits[split])}

    for split in SPLITS:  # carving, in canonical order
        if split not in cfg.carve:
            continue
        src, n = cfg.carve[split].from_, cfg.carve[split].n
        pool = splits[src]
        if n > len(pool):
            raise DataError(f"task {cfg.name!r}: carve[{split!r}] wants {n} examples from "
                            f"split {src!r}, which has {len(pool)}")
        take = set(_seeded_subset(len(pool), n, cfg.seed))
        splits[split] = [dataclasses.replace(ex, split=split)
                         for i, ex in enumerate(pool) if i in take]
        splits[src] = [ex for i, ex in enumerate(pool) if i not in take]
        prov["carved"][split] = {"from": src, "n": n,
                                 "ids": [ex.example_id for ex in splits[split]]}
        prov["splits"][split] = {"source": f"carved from {src}", "n": n}
        prov["splits"][src]["n"] = len(splits[src])

    for split in SPLITS:  # caps
        cap = cfg.max_examples.get(split)
        if cap is None or len(splits[split]) <= cap:
            continue
        keep = _seeded_subset(len(splits[split]), cap, cfg.seed)
        before = len(splits[split])
        splits[split] = [splits[split][i] for i in keep]
        prov["capped"][split] = {"max": cap, "from_n": before,
                                 "kept_ids": [ex.example_id for ex in splits[split]]}
        prov["splits"][split]["n"] = cap

    for split in ("train", "validation"):
        if not splits[split]:
            source = prov["splits"].get(split, {}).get("source", "no file and no carve")
            raise DataError(f"task {cfg.name!r}: split {split!r} is empty ({source})")
    return TaskData(config=cfg, splits=splits, provenance=prov)
