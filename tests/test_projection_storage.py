"""Projection determinism across processes; Parquet schema, round trip and atomic writes."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ensemble_core.features import FeatureTable, feature_schema, read_features, write_features
from ensemble_core.projection import GaussianProjector
from ensemble_core.storage import (read_json, remove_stale_temporaries, temporary_name,
                                   write_json)

_CHILD = """
import hashlib, sys, torch
sys.path.insert(0, {root!r})
from ensemble_core.projection import GaussianProjector
torch.set_num_threads({threads})
pr = GaussianProjector(70001, 40, seed=7, block_rows=30000, cache_bytes=0)
g = torch.arange(3 * 70001, dtype=torch.float32).reshape(3, -1).sin()
h = hashlib.sha256()
for k in range(pr.n_blocks):
    h.update(pr.block(k).numpy().tobytes())
h.update(pr.project(g).numpy().tobytes())
h.update(pr.expand(torch.linspace(-1, 1, 40)).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.integration  # subprocesses
def test_projection_identical_across_processes():
    import ensemble_core, os
    root = os.path.dirname(os.path.dirname(ensemble_core.__file__))
    # two processes, with 1 and 2 BLAS threads (a float32 matmul's bits depend on the count)
    outs = {subprocess.run([sys.executable, "-c", _CHILD.format(root=root, threads=t)],
                           capture_output=True, text=True, check=True).stdout.strip()
            for t in (1, 2)}
    assert len(outs) == 1
    # ... and equal to this process, with a different cache setting
    pr = GaussianProjector(70001, 40, seed=7, block_rows=30000)
    import hashlib
    h = hashlib.sha256()
    for k in range(pr.n_blocks):
        h.update(pr.block(k).numpy().tobytes())
    g = torch.arange(3 * 70001, dtype=torch.float32).reshape(3, -1).sin()
    h.update(pr.project(g).numpy().tobytes())
    h.update(pr.expand(torch.linspace(-1, 1, 40)).numpy().tobytes())
    assert outs == {h.hexdigest()}


def test_projection_statistics_and_expand():
    pr = GaussianProjector(20000, 50, seed=1, block_rows=4096)
    Z = torch.cat([pr.block(k) for k in range(pr.n_blocks)])  # unit normals
    assert Z.shape == (20000, 50)
    assert abs(float(Z.var()) - 1) < 2e-2 and abs(float(Z.mean())) < 1e-2
    P = Z / 50 ** 0.5  # N(0, 1/d)
    g = torch.randn(3, 20000)
    assert torch.allclose(pr.project(g), g @ P, rtol=1e-4, atol=1e-4)
    x = torch.randn(50)
    assert torch.allclose(pr.expand(x), P @ x, rtol=1e-4, atol=1e-4)
    assert torch.equal(pr.project(g), pr.project_unit(g) * np.float32(1 / 50 ** 0.5))
    # different seeds differ; JL: inner products preserved in expectation
    assert not torch.equal(GaussianProjector(20000, 50, seed=2).block(0), pr.block(0))


def test_a_smaller_d_is_the_first_columns_of_the_same_projection():
    """One stage-1 pass at the largest d serves every smaller d': the d' projection built
    directly has the same Z columns, and features derived from the stored unit projection at
    d' are the same bits as a direct projection at d' (estimation.projection_dim as a list)."""
    g = torch.randn(4, 20000)
    big = GaussianProjector(20000, 80, seed=3, block_rows=3000)
    for d in (20, 40, 80):
        small = GaussianProjector(20000, d, seed=3, block_rows=3000)
        assert torch.equal(small.block(2), big.block(2)[:, :d])
        assert small.block(0).shape == (3000, d)
        unit = big.project_unit(g).numpy()
        table = FeatureTable.from_unit("t", "train", np.array(["a", "a", "b", "b"], object),
                                       np.array([0, 1, 0, 1], np.int32),
                                       np.array([True, False, False, True]),
                                       np.zeros(4, np.float32), unit, d)
        assert np.array_equal(table.grad, small.project(g).numpy()), d
        assert np.array_equal(table.at_dim(20).grad,
                              GaussianProjector(20000, 20, seed=3, block_rows=3000)
                              .project(g).numpy())
        assert torch.equal(big.at_dim(d).block(1), small.block(1))


def test_projection_rejects_d_larger_than_p():
    with pytest.raises(ValueError, match="d=500 is larger than .* p=400"):
        GaussianProjector(400, 500)


def _table(n=5, d=8, task="t", split="train"):
    rng = np.random.default_rng(0)
    n_choices = [2, 3, 2, 2, 3][:n]
    rows = sum(n_choices)
    return FeatureTable.from_unit(
        task, split, np.array([f"e{i}" for i, c in enumerate(n_choices) for _ in range(c)], object),
        np.concatenate([np.arange(c) for c in n_choices]).astype(np.int32),
        np.concatenate([np.arange(c) == (i % c) for i, c in enumerate(n_choices)]),
        rng.standard_normal(rows).astype(np.float32),
        rng.standard_normal((rows, d)).astype(np.float32))


def test_parquet_schema_and_round_trip(tmp_path):
    t = _table()
    url = str(tmp_path / "f" / "train.parquet")
    write_features(url, t)
    schema = pq.read_schema(url)
    assert schema.field("grad").type == pa.list_(pa.float32(), 8)
    for name, typ in [("task", pa.string()), ("split", pa.string()), ("example_id", pa.string()),
                      ("choice", pa.int32()), ("is_gold", pa.bool_()), ("output", pa.float32())]:
        assert schema.field(name).type == typ
    assert schema.metadata[b"ensemble_lora"] == b"projected-gradient-features/v2"
    back = read_features(url)
    assert back.task == "t" and back.split == "train"
    np.testing.assert_array_equal(back.grad, t.grad)
    np.testing.assert_array_equal(back.unit, t.unit)
    np.testing.assert_array_equal(read_features(url, dim=3).grad, t.at_dim(3).grad)
    with pytest.raises(ValueError, match="projection dimension 9 was not computed"):
        read_features(url, dim=9)
    np.testing.assert_array_equal(back.output, t.output)
    np.testing.assert_array_equal(back.is_gold, t.is_gold)
    assert list(back.example_id) == list(t.example_id)
    assert back.n_choices.tolist() == [2, 3, 2, 2, 3]
    # column selection: no gradients read
    light = read_features(url, columns=["output"])
    assert light.grad.shape == (len(t.choice), 0)
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["train.parquet"]  # no temporaries


def test_round_trip_through_fsspec_memory():
    t = _table()
    write_features("memory://bucket/run/x.parquet", t)
    np.testing.assert_array_equal(read_features("memory://bucket/run/x.parquet").grad, t.grad)
    write_json("memory://bucket/run/m.json", {"a": 1})
    assert read_json("memory://bucket/run/m.json") == {"a": 1}


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import fsspec.implementations.local as local
    url = tmp_path / "x.parquet"

    def crash(self, *a, **k):  # the process dies between writing and renaming
        raise OSError("disk full")
    monkeypatch.setattr(local.LocalFileSystem, "mv", crash)
    with pytest.raises(OSError, match="disk full"):
        write_features(str(url), _table())
    monkeypatch.undo()
    assert not url.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary was removed too


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    import os
    import time

    pid = os.fork()  # a process that has exited: its pid names no process now
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    mine = tmp_path / Path(temporary_name(str(tmp_path / "a.json"))).name  # a live writer
    theirs = Path(str(mine).replace(f"-{os.getpid()}-", f"-{pid}-"))  # a killed one
    young, old = tmp_path / "b.json.tmp-0123abcd", tmp_path / "c.json.tmp-4567ef01"
    adapter = tmp_path / "adapters" / f".group-0.tmp-{theirs.name.split('.tmp-')[1]}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"partial")
    for p in (mine, theirs, young, old):
        p.write_bytes(b"partial")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))  # an old-style name (no writer) left a long time ago
    assert remove_stale_temporaries(str(tmp_path)) == 3  # theirs, old, the adapter directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapters", mine.name,
                                                                 young.name])
    assert list((tmp_path / "adapters").iterdir()) == []


def test_a_features_file_of_the_old_format_is_refused(tmp_path):
    t = _table()
    old = pa.Table.from_arrays(
        [pa.array(["t"] * 12), pa.array(["train"] * 12), pa.array(["e"] * 12),
         pa.array(t.choice), pa.array(t.is_gold), pa.array(t.output),
         pa.FixedSizeListArray.from_arrays(pa.array(t.unit.reshape(-1)), 8)],
        schema=feature_schema(8).with_metadata(
            {b"ensemble_lora": b"projected-gradient-features/v1"}))
    url = tmp_path / "train.parquet"
    pq.write_table(old, url)
    with pytest.raises(ValueError, match=r"train.parquet: features file of format "
                                         r"'projected-gradient-features/v1'.*recompute"):
        read_features(str(url))


def test_feature_table_checks_gold_rows():
    t = _table()
    with pytest.raises(ValueError, match="gold choices"):
        FeatureTable("t", "train", t.example_id, t.choice, np.zeros_like(t.is_gold), t.output, t.grad)


def test_project_accepts_column_chunks_and_a_small_cache():
    g = torch.randn(3, 20000)
    full = GaussianProjector(20000, 50, seed=1, block_rows=4096)
    # chunks that straddle P's row blocks, and a cache holding only 2 of its 5 blocks
    small = GaussianProjector(20000, 50, seed=1, block_rows=4096, cache_bytes=2 * 4096 * 50 * 8)
    chunks = list(torch.split(g, [100, 5000, 1, 8899, 6000], dim=1))
    assert torch.allclose(small.project(chunks), full.project(g), rtol=1e-6, atol=1e-7)
    assert len(small._cache) == 2
    with pytest.raises(ValueError, match="19999 entries, projector expects p=20000"):
        full.project(chunks[1:] + [torch.zeros(3, 99)])


def test_all_zero_chunks_are_skipped_exactly():
    """LoRA's B = 0 init makes every A matrix's gradient exactly zero at θ*: those chunks cost
    no product, and the result is the same bits as projecting the whole gradient."""
    g = torch.randn(3, 20000)
    g[:, :8192] = 0  # the first two of P's five 4096-row blocks meet only zeros
    pr = GaussianProjector(20000, 50, seed=1, block_rows=4096)
    ref = GaussianProjector(20000, 50, seed=1, block_rows=4096).project(g)
    assert torch.equal(pr.project([g[:, :8192], g[:, 8192:]]), ref)
    assert sorted(pr._cache) == [2, 3, 4]  # blocks 0 and 1 were never generated
    assert torch.equal(pr.project([torch.zeros(3, 20000)]), torch.zeros(3, 50))


def test_projection_cache_budget_from_the_config(tmp_path, data_root):
    """estimation.projection_cache_gb sets the projector's cache; the features do not change."""
    from conftest import tiny_config
    from ensemble_core import runtime, stages
    from ensemble_core.config import parse_config
    from ensemble_core.projection import available_memory
    from ensemble_core.run import Run

    def projector(gb):
        d = tiny_config(data_root, tmp_path)
        d["estimation"] = dict(d["estimation"], projection_block_rows=4096)
        if gb != "default":
            d["estimation"]["projection_cache_gb"] = gb
        cfg = parse_config(d)
        e = cfg.estimation
        return cfg, runtime.projector(20000, e.stored_dim, e.projection_seed,
                                      e.projection_block_rows, e.projection_cache_gb, "cpu")

    cfg_default, default = projector("default")
    cfg_none, none = projector(0)
    cfg_some, some = projector(2 * 4096 * 32 * 8 / 2**30)  # two of the five blocks
    assert none.cache_bytes == 0 and some.cache_bytes == 2 * 4096 * 32 * 8
    assert abs(default.cache_bytes - available_memory(torch.device("cpu")) // 4) < 2**28
    g = torch.randn(3, 20000)
    ref = default.project(g)
    assert torch.equal(none.project(g), ref) and torch.equal(some.project(g), ref)
    assert len(none._cache) == 0 and len(some._cache) == 2 and len(default._cache) == 5
    # a budget is not part of what the features depend on: stage 1 stays cached across it
    inputs = [stages.gradient_features.stage.inputs(Run(c), task="rte")
              for c in (cfg_default, cfg_none, cfg_some)]
    assert inputs[0] == inputs[1] == inputs[2]


def test_blocks_drawn_on_threads_are_the_blocks_drawn_one_by_one(monkeypatch):
    """P's blocks are drawn on several threads when all that one product needs fits in the
    cache, and streamed one by one on the calling thread when not; same bits either way."""
    import threading
    g = torch.randn(3, 20000)
    drawn_on: list[int] = []
    generate = GaussianProjector._generate

    def spy(self, k):
        drawn_on.append(threading.get_ident())
        return generate(self, k)

    monkeypatch.setattr(GaussianProjector, "_generate", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = GaussianProjector(20000, 50, seed=3, block_rows=4096)
        ref, ref_x = one.project(g), one.expand(torch.ones(2, 50))
        assert set(drawn_on) == {threading.get_ident()}
        torch.set_num_threads(2)
        drawn_on.clear()
        two = GaussianProjector(20000, 50, seed=3, block_rows=4096)
        assert torch.equal(two.project(g), ref) and torch.equal(two.expand(torch.ones(2, 50)), ref_x)
        assert len(drawn_on) == 5 and threading.get_ident() not in drawn_on
        drawn_on.clear()  # a cache of two of the five blocks: streamed on the calling thread
        small = GaussianProjector(20000, 50, seed=3, block_rows=4096, cache_bytes=2 * 4096 * 50 * 8)
        assert torch.equal(small.project(g), ref)
        assert set(drawn_on) == {threading.get_ident()} and len(small._cache) == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one.block(k), two.block(k)) for k in range(5))
    assert one.block(1).is_contiguous() and one.block(1).shape == (4096, 50)
