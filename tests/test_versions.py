"""Versions of a run's ensemble (ensemble_core/versions.py; issue 14, item 3): published
immutably, promoted only when not worse on validation, rolled back, loaded by
EnsembleModel, followed by the endpoint; a run without versions still loads."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ensemble_core import versions
from ensemble_core.ensemble import EnsembleModel
from ensemble_core.serving import EnsembleService

from ensemble_utils import build_tiny_ensemble, write_ensemble


def _validation(rte, cb=0.5, copa=0.5):
    return {t: {"n": 8, "accuracy": a, "log_loss": 0.69}
            for t, a in (("rte", rte), ("cb", cb), ("copa", copa))}


@pytest.fixture
def run(tmp_path, data_root, cache_dir):
    run_dir = tmp_path / "run"
    built = build_tiny_ensemble(run_dir, data_root, cache_dir)
    return dict(built, run_dir=run_dir, cache_dir=cache_dir)


def _ensemble(run, rte_weights, rte_accuracy):
    write_ensemble(run["run_dir"], run["cfg"], run["fingerprint"],
                   dict(run["weights"], rte=(0, rte_weights)), _validation(rte_accuracy))


def test_publish_promote_keep_and_roll_back(run):
    run_dir = run["run_dir"]
    assert versions.current(run_dir) is None
    assert EnsembleModel.from_pretrained(run_dir, run["cache_dir"]).version is None  # no versions

    _ensemble(run, [0.7, 0.3], 0.75)
    v1 = versions.publish(run_dir, {"name": "tiny"}, tolerance=0.02)
    assert v1["promoted"] and v1["promotion"] == "first version"
    assert versions.current(run_dir) == v1["version"]
    assert versions.publish(run_dir, tolerance=0.02) == v1  # the same ensemble: nothing new
    vdir = run_dir / "versions" / v1["version"]
    for f in ("ensemble.json", "config.json", "version.json",
              "adapters/group-0/adapter_model.safetensors",
              "adapters/group-1/adapter_config.json"):
        assert (vdir / f).is_file(), f

    _ensemble(run, [0.2, 0.8], 0.70)  # 5 points worse on rte: kept out
    v2 = versions.publish(run_dir, tolerance=0.02)
    assert not v2["promoted"] and "rte: 0.7500 -> 0.7000" in v2["promotion"]
    assert versions.current(run_dir) == v1["version"]

    _ensemble(run, [0.05, 0.95], 0.74)  # 1 point worse: within the tolerance
    v3 = versions.publish(run_dir, tolerance=0.02)
    assert v3["promoted"] and versions.current(run_dir) == v3["version"]
    assert [v["version"] for v in versions.list_versions(run_dir)] == \
        [v1["version"], v2["version"], v3["version"]]

    assert versions.rollback(run_dir) == v1["version"]
    assert versions.current(run_dir) == v1["version"]
    versions.promote(run_dir, v2["version"])  # by hand, whatever its metrics
    assert versions.current(run_dir) == v2["version"]
    with pytest.raises(versions.VersionError, match="no version v0009-00000000"):
        versions.promote(run_dir, "v0009-00000000")


def test_versions_load_their_own_weights_and_stay_immutable(run):
    run_dir, cache = run["run_dir"], run["cache_dir"]
    _ensemble(run, [0.7, 0.3], 0.75)
    v1 = versions.publish(run_dir)["version"]
    _ensemble(run, [0.05, 0.95], 0.80)
    v2 = versions.publish(run_dir)["version"]
    # a retrained adapter is renamed into place in the run directory: the versions keep theirs
    weights = run_dir / "adapters" / "group-0" / "adapter_model.safetensors"
    kept = (run_dir / "versions" / v1 / "adapters/group-0/adapter_model.safetensors").read_bytes()
    tmp = weights.with_name("new.tmp")
    tmp.write_bytes(b"retrained")
    os.replace(tmp, weights)
    assert (run_dir / "versions" / v1 / "adapters/group-0/adapter_model.safetensors"
            ).read_bytes() == kept

    examples = run["data"]["rte"].splits["validation"]
    current = EnsembleModel.from_pretrained(run_dir, cache)
    first = EnsembleModel.from_pretrained(run_dir, cache, version=v1)
    assert current.version == v2 and first.version == v1
    p2 = np.array([list(p["probabilities"].values()) for p in current.predict("rte", examples)])
    p1 = np.array([list(p["probabilities"].values()) for p in first.predict("rte", examples)])
    assert not np.allclose(p1, p2)  # other weights for rte
    assert json.loads((run_dir / "versions" / v1 / "ensemble.json").read_text()
                      )["tasks"]["rte"]["weights"] == [0.7, 0.3]


def test_the_endpoint_follows_a_rollback(run):
    run_dir = run["run_dir"]
    _ensemble(run, [0.7, 0.3], 0.75)
    v1 = versions.publish(run_dir)["version"]
    _ensemble(run, [0.05, 0.95], 0.80)
    v2 = versions.publish(run_dir)["version"]
    service = EnsembleService(run_dir, run["cache_dir"], reload_s=0)
    assert service.current.version == v2
    assert not service.check_for_new_version()
    versions.rollback(run_dir)
    assert service.check_for_new_version() and service.current.version == v1
    assert service.current.model.weights("rte").tolist() == [0.7, 0.3]


def test_a_version_owns_its_files_and_pins_them(run):
    """Issue 36, items 3-4: a published version shares no inode with the run directory (a
    working copy damaged in place leaves it intact), and every file it reads is pinned and
    found without following a link out of it: an adapter_config.json edited in the version, or
    an adapter directory replaced by a link to one outside, is refused naming the file."""
    import shutil

    run_dir, cache = run["run_dir"], run["cache_dir"]
    _ensemble(run, [0.7, 0.3], 0.75)
    vid = versions.publish(run_dir)["version"]
    vdir = run_dir / "versions" / vid
    work = run_dir / "adapters" / "group-0" / "adapter_model.safetensors"
    mine = vdir / "adapters" / "group-0" / "adapter_model.safetensors"
    assert os.stat(work).st_ino != os.stat(mine).st_ino
    kept = mine.read_bytes()
    with open(work, "r+b") as f:  # damaged in place: same inode
        f.seek(200)
        f.write(b"\x00" * 64)
    assert mine.read_bytes() == kept
    info = json.loads((vdir / "version.json").read_text())
    assert {"ensemble.json", "adapters/group-0/adapter_config.json",
            "adapters/group-0/adapter_model.safetensors"} <= set(info["files"])
    EnsembleModel.from_pretrained(run_dir, cache)  # the version is intact

    cfg = vdir / "adapters" / "group-0" / "adapter_config.json"
    original = cfg.read_text()
    cfg.write_text(original.replace('"lora_alpha": 8', '"lora_alpha": 800'))
    with pytest.raises(ValueError, match=r"adapter_config.json: changed since version"):
        EnsembleModel.from_pretrained(run_dir, cache)
    cfg.write_text(original)

    outside = run_dir.parent / "elsewhere"
    shutil.copytree(vdir / "adapters" / "group-1", outside)
    shutil.rmtree(vdir / "adapters" / "group-1")
    os.symlink(outside, vdir / "adapters" / "group-1")
    with pytest.raises(ValueError, match=r"group-1.* leads out of .* through a link"):
        EnsembleModel.from_pretrained(run_dir, cache)


def test_versions_and_health_tell_the_truth_when_the_current_version_is_missing(run, capsys):
    """Issue 36, item 9: with the current version's directory deleted, `ensemble-lora
    versions` says so and exits 1, and the endpoint's /health reports an error."""
    import shutil

    from flows.cli import main

    run_dir, cache = run["run_dir"], run["cache_dir"]
    _ensemble(run, [0.7, 0.3], 0.75)
    vid = versions.publish(run_dir)["version"]
    service = EnsembleService(run_dir, cache, reload_s=0)
    assert service.health()["status"] == "ok"
    shutil.rmtree(run_dir / "versions" / vid)
    assert main(["versions", str(run_dir)]) == 1
    assert f"the current version {vid} is missing" in capsys.readouterr().err
    health = service.health()
    assert health["status"] == "error" and vid in health["problem"]
