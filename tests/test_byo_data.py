"""Bring your own data: headerless csv/tsv files with named columns, label maps and numeric
thresholds, predictions in the task's own labels, hf:// files (through a registered in-memory
fsspec protocol: the hub is not reachable here), and the narrow filter of third-party
messages; bad input names the file, line, field or value."""
from __future__ import annotations

import json
import logging
import warnings

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from ensemble_core.data import DataError, TaskConfig, choice_labels, load_task
from ensemble_core.ensemble import task_entry

TOPICS = "3\tWall St. Bears Claw Back\tShort-sellers see green.\n" \
         "4\tNew chip\tA faster processor.\n1\tPeace talks\tLeaders met.\n" \
         "2\tFinals\tThe team won the cup.\n1\tElection\tVotes were counted.\n"
SCORES = "a man plays\ta man is playing\t4.2\nit rains\tthe sun shines\t0.4\n" \
         "cats sleep\tcats are asleep\t2.5\na dog runs\ta car drives\t1.0\n"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _topics(tmp_path, **over):
    f = _write(tmp_path, "topics.tsv", TOPICS)
    cfg = dict(name="ag", files={"train": f, "validation": f}, header=False,
               columns=["topic", "title", "text"], template="{title}. {text}\nTopic:",
               label_field="topic", choices=[" world", " sports", " business", " tech"],
               label_map={"1": 0, "2": " sports", "3": 2, "4": 3})
    cfg.update(over)
    return TaskConfig(**cfg)


def test_headerless_file_with_columns_and_a_label_map(tmp_path):
    td = load_task(_topics(tmp_path), "")
    train = td.splits["train"]
    assert [e.label for e in train] == [2, 3, 0, 1, 0]
    assert train[0].prompt == "Wall St. Bears Claw Back. Short-sellers see green.\nTopic:"
    assert choice_labels(td.config) == ["1", "2", "3", "4"]
    assert td.provenance["config"]["label_map"] == {"1": 0, "2": " sports", "3": 2, "4": 3}
    # several raw values may map to one choice
    two = load_task(_topics(tmp_path, choices=[" world", " other"],
                            label_map={"1": 0, "2": 1, "3": 1, "4": 1}), "")
    assert [e.label for e in two.splits["train"]] == [1, 1, 0, 1, 0]
    # a header row named anew by columns (header: true) is skipped
    f = _write(tmp_path, "named.tsv", "t\ta\tb\n" + TOPICS)
    renamed = load_task(_topics(tmp_path, files={"train": f, "validation": f}, header=True), "")
    assert len(renamed.splits["train"]) == 5


def test_headerless_file_errors_name_file_line_and_value(tmp_path):
    bad = _write(tmp_path, "bad.tsv", TOPICS + "2\tonly two fields\n")
    with pytest.raises(DataError, match=r"bad.tsv line 6: 2 fields, columns names 3"):
        load_task(_topics(tmp_path, files={"train": bad, "validation": bad}), "")
    other = _write(tmp_path, "five.tsv", TOPICS.replace("4\tNew", "5\tNew"))
    with pytest.raises(DataError, match=r"five.tsv line 2: field 'topic' has label value "
                                         r"'5', maps nowhere"):
        load_task(_topics(tmp_path, files={"train": other, "validation": other}), "")
    with pytest.raises(DataError, match="header: false needs columns"):
        load_task(_topics(tmp_path, columns=None), "")
    with pytest.raises(DataError, match="label_map maps to ' science', which is no choice"):
        load_task(_topics(tmp_path, label_map={"1": " science"}), "")


def _scores(tmp_path, **over):
    f = _write(tmp_path, "sts.tsv", SCORES)
    cfg = dict(name="sts", files={"train": f, "validation": f}, header=False,
               columns=["a", "b", "score"], template="{a} / {b}\nSame meaning?",
               label_field="score", choices=[" no", " yes"], label_thresholds=[2.5])
    cfg.update(over)
    return TaskConfig(**cfg)


def test_numeric_labels_through_thresholds(tmp_path):
    td = load_task(_scores(tmp_path), "")
    assert [e.label for e in td.splits["train"]] == [1, 0, 1, 0]  # 2.5 itself is "yes"
    assert choice_labels(td.config) == ["< 2.5", ">= 2.5"]
    three = load_task(_scores(tmp_path, choices=[" low", " mid", " high"],
                              label_thresholds=[1.0, 3.0]), "")
    assert [e.label for e in three.splits["train"]] == [2, 0, 1, 1]
    assert choice_labels(three.config) == ["< 1", "[1, 3)", ">= 3"]
    text = _write(tmp_path, "nan.tsv", SCORES.replace("0.4", "n/a"))
    with pytest.raises(DataError, match=r"nan.tsv line 2: field 'score' has label value 'n/a', "
                                        r"which is not a number"):
        load_task(_scores(tmp_path, files={"train": text, "validation": text}), "")
    with pytest.raises(DataError, match="2 label_thresholds make 3 choices, but choices has 2"):
        load_task(_scores(tmp_path, label_thresholds=[1.0, 2.0]), "")
    with pytest.raises(DataError, match="ascending"):
        load_task(_scores(tmp_path, choices=[" a", " b", " c"], label_thresholds=[3.0, 1.0]),
                  "")
    with pytest.raises(DataError, match="at most one of label_map and label_thresholds"):
        load_task(_scores(tmp_path, label_map={"1": 0}), "")


def test_predictions_carry_the_tasks_own_labels(tmp_path):
    from ensemble_core.data import resolve_task
    entry = task_entry(_topics(tmp_path), 0, [1.0])
    assert entry["labels"] == ["1", "2", "3", "4"]
    assert task_entry(_scores(tmp_path), 0, [1.0])["labels"] == ["< 2.5", ">= 2.5"]
    rte = task_entry(resolve_task(TaskConfig(name="rte", builtin="superglue/rte")), 0, [1.0])
    assert rte["labels"] == ["entailment", "not_entailment"]


class _HubLike(MemoryFileSystem):
    """An in-memory stand-in registered as the hf:// protocol (the real one is
    huggingface_hub's HfFileSystem, which fsspec finds the same way)."""
    protocol = ("hf",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("hf://"):] if path.startswith("hf://") else path
        return "/" + path.lstrip("/")


def test_hf_urls_go_through_fsspec(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fsspec.register_implementation("hf", _HubLike, clobber=True)
    try:
        fs = _HubLike()
        for split, rows in (("train", 6), ("validation", 4)):
            table = pa.table({"sentence": [f"text {i}" for i in range(rows)],
                              "label": [i % 2 for i in range(rows)]})
            with fs.open(f"/datasets/org/sst2/{split}.parquet", "wb") as f:
                pq.write_table(table, f)
        cfg = TaskConfig(name="sst", files={"train": "hf://datasets/org/sst2/train.parquet",
                                            "validation": "hf://datasets/org/sst2/validation.parquet"},
                         template="{sentence}\nPositive?", choices=[" no", " yes"])
        td = load_task(cfg, "")
        assert [e.label for e in td.splits["train"]] == [0, 1, 0, 1, 0, 1]
        assert "hf://datasets/org/sst2/train.parquet" in td.provenance["files"]
    finally:
        fsspec.register_implementation("hf", "huggingface_hub.HfFileSystem", clobber=True)


def test_only_the_named_third_party_messages_are_filtered(caplog):
    from ensemble_core import quiet

    quiet.install()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet._INSTALLED = False
        quiet.install()  # catch_warnings reset the filters: install them again inside
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed",
                               FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                               "x.py", 1, module="mypackage")  # another module: shown
        warnings.warn_explicit("something else", FutureWarning, "m.py", 1,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in seen] == ["`is_gradient_checkpointing` is deprecated",
                                              "something else"]
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    assert json.dumps({"ok": True})


@pytest.mark.integration  # a Prefect server, the whole pipeline
def test_pipeline_on_a_headerless_file_with_a_threshold_label(tmp_path, data_root, cache_dir,
                                                             capsys):
    """End to end on the tiny model: a headerless TSV whose label is a similarity score cut at
    2.5, beside a builtin task; predictions come back in the task's own labels."""
    import random

    import yaml
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import main

    rng = random.Random(0)
    lines = []
    for i in range(40):
        score = rng.uniform(0, 5)
        lines.append(f"sentence {i} about a cat\tsentence {i} about a "
                     f"{'cat' if score >= 2.5 else 'car'}\t{score:.2f}")
    f = tmp_path / "sts.tsv"
    f.write_text("\n".join(lines) + "\n")
    config = {
        "name": "byo", "data_root": str(data_root), "output_dir": str(tmp_path / "run"),
        "cache_dir": str(cache_dir), "model": {"name": "tiny-llama", "max_length": 96},
        "adapter": {"r": 4, "alpha": 8, "init": "false"},
        "tasks": [
            {"name": "sts", "files": {"train": str(f)}, "header": False,
             "columns": ["a", "b", "score"], "template": "{a} / {b}\nSame?",
             "label_field": "score", "choices": [" no", " yes"], "label_thresholds": [2.5],
             "carve": {"validation": {"from": "train", "n": 8}, "test": {"from": "train",
                                                                        "n": 8}}},
            {"name": "rte", "builtin": "superglue/rte",
             "max_examples": {"train": 8, "validation": 6, "test": 8}},
            {"name": "cb", "builtin": "superglue/cb",
             "max_examples": {"train": 8, "validation": 6, "test": 8}}],
        "estimation": {"projection_dim": 16, "batch_size": 8, "n_subsets": 3,
                       "subset_size": 2},
        "clustering": {"n_groups": 2}, "training": {"epochs": 1, "batch_size": 8}}
    cfg = tmp_path / "byo.yaml"
    cfg.write_text(yaml.safe_dump(config))
    with prefect_test_harness(server_startup_timeout=120):
        assert main(["run", str(cfg)]) == 0
    assert "| sts " in capsys.readouterr().out
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"a": "a cat sleeps", "b": "a cat naps"}) + "\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(tmp_path / "run"), "--task", "sts", "--input", str(records),
                 "--output", str(out), "--set", f"cache_dir={cache_dir}"]) == 0
    [pred] = [json.loads(x) for x in out.read_text().splitlines()]
    assert pred["label"] in ("< 2.5", ">= 2.5") and set(pred["probabilities"]) == {
        "< 2.5", ">= 2.5"}
    manifest = json.loads((tmp_path / "run" / "gradients" / "sts" / "manifest.json").read_text())
    assert manifest["data"]["config"]["label_thresholds"] == [2.5]
