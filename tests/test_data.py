"""Tests for ensemble_core.data: builtins on the real benchmark files, determinism, the
generic (user-defined) path in every format, and every bad-input case."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

from ensemble_core.data import (
    DataError, Example, TaskConfig, TaskData, builtin_tasks, load_task,
    read_records, resolve_task,
)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = os.environ.get("ENSEMBLE_LORA_DATA",
                           str(Path(__file__).resolve().parents[2] / "shared" / "data"))

needs_data = pytest.mark.skipif(
    "://" not in DATA_ROOT and not Path(DATA_ROOT, "superglue").is_dir(),
    reason=f"benchmark data not found at {DATA_ROOT} (set ENSEMBLE_LORA_DATA)")


@pytest.fixture(scope="module")
def builtins() -> dict[str, TaskData]:
    return {b: load_task(TaskConfig(name=b, builtin=b), DATA_ROOT) for b in builtin_tasks()}


# --------------------------------------------------------------------------- builtins

SUPERGLUE_TEST_SIZES = {"boolq": 3270, "cb": 56, "copa": 100, "multirc": 4848, "rte": 277,
                        "wic": 638, "wsc": 104}
# train.tsv rows (header excluded) and dev.tsv rows (our test split)
GLUE_SIZES = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668 - 1, 408),
              "rte": (2490, 277), "wnli": (635, 71)}


def test_registry():
    assert builtin_tasks() == sorted(
        [f"superglue/{t}" for t in SUPERGLUE_TEST_SIZES] + [f"glue/{t}" for t in GLUE_SIZES])


@needs_data
@pytest.mark.parametrize("name", builtin_tasks())
def test_builtin_loads(builtins, name):
    data = builtins[name]
    assert set(data.splits) == {"train", "validation", "test"}
    assert data.config.builtin == name and data.config.template  # resolved
    for split, examples in data.splits.items():
        assert examples, (name, split)
        ids = [ex.example_id for ex in examples]
        assert len(set(ids)) == len(ids)
        for ex in examples:
            assert ex.task == name and ex.split == split
            assert len(ex.choices) >= 2 and 0 <= ex.label < len(ex.choices)
            assert ex.prompt.strip()
    labels = Counter(ex.label for ex in data.splits["train"])
    if name == "superglue/wsc":
        # FewGLUE's 32 WSC training examples are all positive (label true).
        assert set(labels) == {1}
    else:
        n_choices = len(data.splits["train"][0].choices)
        assert set(labels) == set(range(n_choices)), labels
    json.dumps(data.provenance)


@needs_data
@pytest.mark.parametrize("task", sorted(SUPERGLUE_TEST_SIZES))
def test_superglue_counts(builtins, task):
    data = builtins[f"superglue/{task}"]
    n = {s: len(v) for s, v in data.splits.items()}
    if task == "multirc":
        # one example per candidate answer of 32 / 32 / 83 passages
        assert n == {"train": 154, "validation": 167, "test": 4848}
    else:
        assert n == {"train": 32, "validation": 32, "test": SUPERGLUE_TEST_SIZES[task]}
    assert data.provenance["carved"] == {}


@needs_data
@pytest.mark.parametrize("task", sorted(GLUE_SIZES))
def test_glue_counts_and_carving(builtins, task):
    data = builtins[f"glue/{task}"]
    n_train_file, n_dev = GLUE_SIZES[task]
    assert len(data.splits["validation"]) == 200
    assert len(data.splits["train"]) == n_train_file - 200
    assert len(data.splits["test"]) == n_dev
    carved = data.provenance["carved"]["validation"]
    assert carved["from"] == "train" and carved["n"] == 200
    assert carved["ids"] == [ex.example_id for ex in data.splits["validation"]]
    train_ids = {ex.example_id for ex in data.splits["train"]}
    assert not train_ids & set(carved["ids"])


@needs_data
def test_builtin_prompts_contain_the_text(builtins):
    boolq = read_records(f"{DATA_ROOT}/superglue/BoolQ/train.jsonl")[0]
    ex = builtins["superglue/boolq"].splits["train"][0]
    assert boolq["passage"] in ex.prompt and boolq["question"] in ex.prompt
    assert ex.example_id == str(boolq["idx"]) and ex.label == int(boolq["label"])

    cb = builtins["superglue/cb"]
    assert [ex.label for ex in cb.splits["train"]] == [
        ["entailment", "contradiction", "neutral"].index(r["label"])
        for r in read_records(f"{DATA_ROOT}/superglue/CB/train.jsonl")]

    wsc = builtins["superglue/wsc"].splits["train"][0]
    assert '"it" refer to "Tina"' in wsc.prompt

    # COPA: connective from the question field, candidates are the continuations
    copa = read_records(f"{DATA_ROOT}/superglue/COPA/train.jsonl")
    for rec, ex in zip(copa, builtins["superglue/copa"].splits["train"]):
        assert ex.prompt.endswith(" because" if rec["question"] == "cause" else " so")
        assert ex.prompt.startswith(rec["premise"].rstrip("."))
        assert ex.choices[0].lower() == " " + rec["choice1"].lower()
        assert ex.label == rec["label"]

    mrc = builtins["superglue/multirc"].splits["train"]
    assert mrc[0].example_id.count("-") == 2
    assert "Candidate answer: " in mrc[0].prompt

    # MRPC: header with a BOM, quote characters inside the text (tsv read unquoted)
    mrpc = read_records(f"{DATA_ROOT}/glue/MRPC/dev.tsv")
    assert list(mrpc[0])[0] == "Quality" and len(mrpc) == 408
    test = builtins["glue/mrpc"].splits["test"]
    assert mrpc[0]["#1 String"] in test[0].prompt and mrpc[0]["#2 String"] in test[0].prompt
    assert any('"' in ex.prompt for ex in test)

    cola = builtins["glue/cola"].splits["test"][0]
    assert cola.prompt.startswith("The sailors rode the breeze clear of the rocks.")
    assert cola.example_id == "1"  # headerless: line 1 is an example


@needs_data
def test_builtin_override_and_bigger_train_from_val():
    # BoolQ: carve a larger training set out of the official validation set (val.jsonl).
    cfg = TaskConfig(name="boolq-big", builtin="superglue/boolq",
                     files={"validation": "superglue/BoolQ/dev32.jsonl",
                            "test": "superglue/BoolQ/val.jsonl"},
                     carve={"train": {"from": "test", "n": 500}}, seed=3)
    data = load_task(cfg, DATA_ROOT)
    assert len(data.splits["train"]) == 500 and len(data.splits["test"]) == 3270 - 500
    assert data.config.template == resolve_task(TaskConfig(name="x", builtin="superglue/boolq")).template


# --------------------------------------------------------------------------- determinism

@needs_data
def test_determinism_and_provenance():
    cfg = TaskConfig(name="rte", builtin="glue/rte", max_examples={"train": 100}, seed=7)
    a, b = load_task(cfg, DATA_ROOT), load_task(cfg, DATA_ROOT)
    assert a.splits == b.splits and a.provenance == b.provenance
    prov = a.provenance
    assert prov["seed"] == 7
    assert prov["carved"]["validation"]["ids"] == [e.example_id for e in a.splits["validation"]]
    assert prov["capped"]["train"]["kept_ids"] == [e.example_id for e in a.splits["train"]]
    assert prov["capped"]["train"]["from_n"] == 2290
    # caps keep the original order
    assert [int(e.example_id) for e in a.splits["train"]] == sorted(
        int(e.example_id) for e in a.splits["train"])
    url = f"{DATA_ROOT}/glue/RTE/train.tsv"
    assert prov["splits"]["train"]["source"] == url
    assert prov["files"][url] == hashlib.sha256(Path(url).read_bytes()).hexdigest()
    json.dumps(prov)
    other = load_task(cfg.model_copy(update={"seed": 8}), DATA_ROOT)
    assert other.provenance["carved"]["validation"]["ids"] != prov["carved"]["validation"]["ids"]


@needs_data
@pytest.mark.integration  # a subprocess
def test_identical_across_processes():
    code = ("import sys, json; from ensemble_core.data import *; "
            "d = load_task(TaskConfig(name='w', builtin='glue/wnli', seed=5), sys.argv[1]); "
            "print(json.dumps(d.provenance['carved']))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, DATA_ROOT], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    here = load_task(TaskConfig(name="w", builtin="glue/wnli", seed=5), DATA_ROOT)
    assert json.loads(out) == here.provenance["carved"]


# --------------------------------------------------------------------------- user tasks

ROWS = [
    {"id": f"r{i}", "text": f'sample {i}, with "quotes"', "label": ["neg", "pos"][i % 2]}
    for i in range(12)
]


def _user_cfg(path, **kw) -> TaskConfig:
    base = dict(name="mine", files={"train": str(path)}, template="Review: {text}\nSentiment:",
                choices=[" bad", " good"], label_values=["neg", "pos"],
                carve={"validation": {"from": "train", "n": 4}})
    return TaskConfig(**{**base, **kw})


def _check_user(data: TaskData):
    assert len(data.splits["train"]) == 8 and len(data.splits["validation"]) == 4
    assert data.splits["test"] == []
    by_id = {ex.example_id: ex for s in ("train", "validation") for ex in data.splits[s]}
    assert set(by_id) == {r["id"] for r in ROWS}
    for r in ROWS:
        ex = by_id[r["id"]]
        assert ex.prompt == f"Review: {r['text']}\nSentiment:"
        assert ex.choices == (" bad", " good") and ex.label == ["neg", "pos"].index(r["label"])


def test_user_csv_with_bom(tmp_path):
    import csv
    path = tmp_path / "data.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    assert list(read_records(str(path))[0]) == ["id", "text", "label"]
    _check_user(load_task(_user_cfg(path, id_field="id"), str(tmp_path)))


def test_user_tsv_relative_to_root(tmp_path):
    lines = ["id\ttext\tlabel"] + [f"{r['id']}\t{r['text']}\t{r['label']}" for r in ROWS]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = load_task(_user_cfg("sub/data.tsv", id_field="id"), str(tmp_path))
    _check_user(data)
    assert data.provenance["splits"]["train"]["source"] == f"{tmp_path}/sub/data.tsv"


def test_user_jsonl_default_ids(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    data = load_task(_user_cfg(path), str(tmp_path))
    ids = sorted(int(ex.example_id) for s in data.splits.values() for ex in s)
    assert ids == list(range(1, 13))  # line numbers


def test_user_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    _check_user(load_task(_user_cfg(path, id_field="id"), str(tmp_path)))


def test_user_memory_url_and_explicit_format():
    root = "memory://ensemble-lora-test"
    with fsspec.open(f"{root}/reviews.txt", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = _user_cfg("reviews.txt", format="jsonl", id_field="id")
    _check_user(load_task(cfg, root))


def test_user_choice_fields_and_default_labels(tmp_path):
    rows = [{"q": f"question {i}", "a": f"opt A{i}", "b": f"opt B{i}", "label": i % 2,
             "gold": bool(i % 2)} for i in range(6)]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = TaskConfig(name="mc", files={"train": str(path), "validation": str(path)},
                     template="{q}\nAnswer:", choice_fields=["a", "b"],
                     choice_template=" {choice}.")
    data = load_task(cfg, "")
    ex = data.splits["train"][3]
    assert ex.choices == (" opt A3.", " opt B3.") and ex.label == 1
    # booleans are accepted for two choices by default; caps keep the original order
    cfg = cfg.model_copy(update={"label_field": "gold", "max_examples": {"train": 3}})
    data = load_task(cfg, "")
    assert [ex.label for ex in data.splits["train"]] == [
        int(rows[int(i) - 1]["gold"]) for i in data.provenance["capped"]["train"]["kept_ids"]]
    assert len(data.splits["train"]) == 3 and len(data.splits["validation"]) == 6


def test_unknown_key_is_rejected():
    with pytest.raises(pydantic.ValidationError, match="templat"):
        TaskConfig(name="x", templat="{a}")
    with pytest.raises(pydantic.ValidationError, match="size"):
        TaskConfig(name="x", carve={"validation": {"from": "train", "size": 3}})


def test_example_checks():
    with pytest.raises(DataError, match="at least 2"):
        Example("t", "train", "1", "p", (" a",), 0)
    with pytest.raises(DataError, match="label 2"):
        Example("t", "train", "1", "p", (" a", " b"), 2)


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def _raises(cfg, root, *patterns):
    with pytest.raises(DataError) as info:
        load_task(cfg, str(root))
    msg = str(info.value)
    assert f"task {cfg.name!r}" in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


def test_missing_file(tmp_path):
    _raises(_user_cfg("nope/absent.jsonl"), tmp_path, "file not found", "absent.jsonl")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"text": "x", label: 1}\n')
    _raises(_user_cfg(path), tmp_path, "bad.jsonl line 3", "malformed JSON")
    with pytest.raises(DataError, match="bad.jsonl line 3"):
        read_records(str(path))


def test_template_field_missing(jsonl, tmp_path):
    msg = _raises(_user_cfg(jsonl, template="{txt}:"), tmp_path, "'txt'", "good.jsonl line 1")
    assert "available fields: ['id', 'label', 'text']" in msg


def test_label_field_missing(jsonl, tmp_path):
    _raises(_user_cfg(jsonl, label_field="sentiment"), tmp_path, "'sentiment'",
            "available fields")


def test_choice_field_missing(jsonl, tmp_path):
    _raises(_user_cfg(jsonl, choices=None, choice_fields=["text", "other"]), tmp_path,
            "'other'", "good.jsonl line 1")


def test_label_value_outside(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("text,label\na,0\nb,1\nc,2\n")
    cfg = TaskConfig(name="lab", files={"train": str(path)}, template="{text}",
                     choices=[" x", " y"])
    _raises(cfg, tmp_path, "labels.csv line 4", "'2'", "[0, 1]")


def test_empty_task_and_empty_split(tmp_path, jsonl):
    _raises(TaskConfig(name="void", template="{a}", choices=[" a", " b"]), tmp_path,
            "no files")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    _raises(_user_cfg(empty, carve={}, files={"train": str(jsonl), "validation": str(empty)}),
            tmp_path, "'validation' is empty", "empty.csv")
    _raises(_user_cfg(jsonl, carve={}), tmp_path, "'validation' is empty")


def test_duplicate_task_names(jsonl):
    from ensemble_core.config import ConfigError, parse_config

    cfg = _user_cfg(jsonl).model_dump(exclude_unset=True)
    with pytest.raises(ConfigError, match=r"duplicate task name.*'mine'"):
        parse_config({"tasks": [cfg, cfg]})
    two = parse_config({"tasks": [cfg, dict(cfg, name="two")]})
    assert [t.name for t in two.tasks] == ["mine", "two"]


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("text\tlabel\nok\tneg\ncaf\u00e9\tpos\n".encode("latin-1"))
    _raises(_user_cfg(path), tmp_path, "latin1.tsv line 3", "UTF-8")


def test_unknown_builtin():
    msg = _raises(TaskConfig(name="b", builtin="superglue/rtee"), "", "'superglue/rtee'")
    assert "superglue/rte" in msg.split("known builtins:")[1]


def test_fewer_than_two_choices(jsonl, tmp_path):
    _raises(_user_cfg(jsonl, choices=[" good"], label_values=["pos"]), tmp_path,
            "choices has 1 entry")
    _raises(_user_cfg(jsonl, choices=None, label_values=None, choice_fields=["text"]),
            tmp_path, "choice_fields has 1 entry")


def test_duplicate_example_ids(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = ROWS[:3] + [dict(ROWS[4], id="r1")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _raises(_user_cfg(path, id_field="id", carve={}, files={"train": str(path)}), tmp_path,
            "duplicate example id 'r1'", "dup.jsonl line 4", "line 2")


def test_other_config_errors(jsonl, tmp_path):
    _raises(_user_cfg(jsonl, label_values=["neg", "pos", "meh"]), tmp_path, "label_values")
    _raises(_user_cfg(jsonl, carve={"validation": {"from": "train", "n": 99}}), tmp_path,
            "wants 99")
    _raises(_user_cfg(jsonl, files={"train": str(jsonl), "dev": str(jsonl)}), tmp_path,
            "'dev'")
    _raises(_user_cfg(jsonl, template=None), tmp_path, "no template")
    _raises(_user_cfg(tmp_path / "data.xlsx"), tmp_path, "'.xlsx'")
    bad_tsv = tmp_path / "ragged.tsv"
    bad_tsv.write_text("text\tlabel\na\tneg\nb\tpos\textra\n")
    _raises(_user_cfg(bad_tsv), tmp_path, "ragged.tsv line 3", "3 fields")


def test_text_fields_must_be_text(tmp_path):
    """Issue 36, item 6: a field a template puts in the prompt that is null, a number, a
    boolean, a list or an object is an error naming the file, line and field (it used to become
    "None", "5" or a Python repr in the prompt); a number the template formats on purpose
    (a format spec) is text."""
    rows = [dict(ROWS[0]), dict(ROWS[1], text=None)]
    path = tmp_path / "nulls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _raises(_user_cfg(path, carve={}, files={"train": str(path), "validation": str(path)}),
            tmp_path, "nulls.jsonl line 2", "field 'text' is null, not text")
    for bad, kind in ((5, "int"), (True, "bool"), (["a"], "list"), ({"a": 1}, "dict")):
        path.write_text(json.dumps(dict(ROWS[0], text=bad)) + "\n")
        _raises(_user_cfg(path, carve={}, files={"train": str(path), "validation": str(path)}),
                tmp_path, "nulls.jsonl line 1", f"field 'text' is {kind}, not text")
    path.write_text("".join(json.dumps(dict(r, score=2.5 + i)) + "\n"
                            for i, r in enumerate(ROWS)))
    data = load_task(_user_cfg(path, template="{text} ({score:.1f})", carve={},
                               files={"train": str(path), "validation": str(path)}),
                     str(tmp_path))
    assert data.splits["train"][0].prompt.endswith("(2.5)")


def test_label_values_name_the_threshold_ranges(tmp_path):
    """Issue 36, item 7: with label_thresholds, label_values names the ranges (predictions
    report them), and must have one entry per range."""
    from ensemble_core.data import choice_labels

    cfg = _user_cfg("x.jsonl", label_thresholds=[2.5], label_values=["low", "high"])
    assert choice_labels(cfg) == ["low", "high"]
    assert choice_labels(_user_cfg("x.jsonl", label_thresholds=[2.5],
                                   label_values=None)) == ["< 2.5", ">= 2.5"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(dict(r, label=i)) + "\n" for i, r in enumerate(ROWS)))
    _raises(_user_cfg(path, label_thresholds=[2.5], label_values=["a", "b", "c"]), tmp_path,
            "label_values names the 2 ranges", "it has 3 entries")
