"""The extension points' registries (issue 30): an adapter kind, a clustering method and a
baseline defined here, outside the library, run through the tiny pipeline with no library file
changed; the config's allowed values come from the registries; and Algorithm 2 runs in this
process without Prefect, giving the Prefect pipeline's outputs."""
from __future__ import annotations

import json
import warnings
from typing import Literal

import numpy as np
import pytest
from pydantic import Field

from ensemble_core.adapter_kinds import (ADAPTER_KINDS, AdapterConfig, AdapterKind, WeightShape,
                                         register_adapter_kind)
from ensemble_core.baselines import BASELINES, Baseline, register_baseline
from ensemble_core.clustering import (CLUSTERING_METHODS, ClusteringConfig, ClusteringMethod,
                                      register_clustering_method)
from ensemble_core.config import ConfigError, load_config, parse_config
from ensemble_core.registry import RegistryError

from conftest import REPO


# -- the toys: each is what a new method's one file in the library would hold ------------------

class RsLoraConfig(AdapterConfig):
    kind: Literal["toy-rslora"] = "toy-rslora"
    target_modules: list[str] = ["q_proj", "v_proj"]
    r: int = Field(4, ge=1)
    alpha: float = 8.0


class ToyRsLora(AdapterKind):
    """Rank-stabilised LoRA (scale α/√r instead of α/r), built by PEFT's LoraConfig."""
    name = "toy-rslora"
    label = "rsLoRA"
    config = RsLoraConfig
    weights = (WeightShape(".lora_A.", "in", "input"), WeightShape(".lora_B.", "out", "output"))

    def peft_config(self, cfg):
        from peft import LoraConfig

        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), init_lora_weights=False,
                          use_rslora=True, bias="none", task_type="CAUSAL_LM")

    def describe(self, cfg):
        return f"r = {cfg.r}, rank-stabilised"


class SortedConfig(ClusteringConfig):
    method: Literal["toy-sorted"] = "toy-sorted"
    descending: bool = True


class ToySorted(ClusteringMethod):
    """m contiguous groups of the tasks sorted by their mean affinity to the others."""
    name = "toy-sorted"
    config = SortedConfig
    needs_m = True

    def group(self, T, m, cfg, seed):
        order = np.argsort(-T.mean(axis=1) if cfg.descending else T.mean(axis=1), kind="stable")
        return [sorted(int(i) for i in part) for part in np.array_split(order, m)], \
            {"method": self.name, "order": order.tolist()}


class ToyPairs(Baseline):
    """One adapter per consecutive pair of tasks (in config order)."""
    name = "toy-pairs"
    label = "one adapter per pair of tasks"

    def plan(self, run, groups, features):
        t = run.task_names
        return {f"pair-{k}": t[i:i + 2] for k, i in enumerate(range(0, len(t), 2))}


@pytest.fixture
def toys():
    entries = [(ADAPTER_KINDS, register_adapter_kind, ToyRsLora),
               (CLUSTERING_METHODS, register_clustering_method, ToySorted),
               (BASELINES, register_baseline, ToyPairs)]
    for _, register, entry in entries:
        register(entry)
    yield
    for registry, _, entry in entries:
        registry.unregister(entry.name)


TOY_SET = ["adapter.kind=toy-rslora", "clustering.method=toy-sorted",
           "evaluation.baselines=[toy-pairs]"]


# -- the config's allowed values come from the registries ------------------------------------

def test_unknown_names_are_errors_that_list_what_is_registered(toys):
    for key, value, listed in (("adapter.kind", "dora", "bottleneck, lora, toy-rslora"),
                               ("clustering.method", "kmeans", "sdp, spectral, toy-sorted"),
                               ("boosting.mode", "xgb", "adaboost, exact, first-order")):
        with pytest.raises(ConfigError, match=rf"'{key}': '{value}' is not a registered") as e:
            parse_config({"tasks": [{"name": "rte", "builtin": "superglue/rte"}],
                          **_nested(key, value)})
        assert listed in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=r"'evaluation.baselines.0': 'nope'.*registered: "
                                          r"gradient-groups, mtl-ft, per-task, random-groups, "
                                          r"toy-pairs"):
        parse_config({"tasks": [{"name": "rte", "builtin": "superglue/rte"}],
                      "evaluation": {"baselines": ["nope"]}})


def _nested(key: str, value) -> dict:
    head, tail = key.split(".")
    return {head: {tail: value}}


def test_per_kind_fields_come_from_the_kind(toys):
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), TOY_SET + ["adapter.r=2"])
    assert type(cfg.adapter) is RsLoraConfig and cfg.adapter.r == 2
    assert cfg.model_dump(mode="json")["adapter"] == {
        "kind": "toy-rslora", "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "r": 2,
        "alpha": 8.0}
    assert type(cfg.clustering) is SortedConfig and cfg.clustering.descending
    with pytest.raises(ConfigError, match=r"'adapter.r': Input should be greater than or equal "
                                          r"to 1"):
        load_config(str(REPO / "configs" / "tiny.yaml"), TOY_SET + ["adapter.r=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'adapter.rank'"):
        load_config(str(REPO / "configs" / "tiny.yaml"), TOY_SET + ["adapter.rank=3"])
    with pytest.raises(ConfigError, match=r"'clustering.n_groups': clustering.method "
                                          r"toy-sorted needs a number of groups"):
        load_config(str(REPO / "configs" / "tiny.yaml"), TOY_SET + ["clustering.n_groups=auto"])
    # a field only another kind has (tiny.yaml's LoRA `init`) is dropped with a warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_config(str(REPO / "configs" / "tiny.yaml"), ["adapter.kind=bottleneck"])
    assert any("alpha, init, r" in str(w.message) for w in seen)


def test_an_entry_must_say_what_the_code_needs_of_it():
    class NoWeightsConfig(RsLoraConfig):
        kind: Literal["toy-no-weights"] = "toy-no-weights"

    class NoWeights(ToyRsLora):
        name = "toy-no-weights"
        config = NoWeightsConfig
        weights = ()

    with pytest.raises(RegistryError, match="`weights` must list the weights it owns"):
        register_adapter_kind(NoWeights)
    with pytest.raises(RegistryError, match="its config's `kind` field must default to "
                                            "'toy-other'"):
        register_adapter_kind(type("Other", (ToyRsLora,), {"name": "toy-other"}))
    with pytest.raises(RegistryError, match="already registered"):
        register_adapter_kind(type("Lora2", (ToyRsLora,), {"name": "lora"}))
    with pytest.raises(RegistryError, match="'single' is taken"):
        register_baseline(type("Single", (ToyPairs,), {"name": "single"}))
    assert "toy-no-weights" not in ADAPTER_KINDS and "toy-other" not in ADAPTER_KINDS


# -- the tiny pipeline with the toys, through Prefect and in this process ----------------------

@pytest.mark.integration
def test_toy_methods_run_through_the_pipeline_and_algorithm2_runs_without_prefect(
        toys, tmp_path, data_root, cache_dir):
    """The pipeline flow (a real Prefect server) and ``algorithm2.pipeline`` (this process, no
    Prefect) on the tiny config with the toy adapter kind, clustering method and baseline: both
    finish, use the toys, and write the same ensemble, groups and metrics."""
    from prefect.testing.utilities import prefect_test_harness

    from ensemble_core import algorithm2
    from ensemble_core.run import Run
    from flows.pipeline import ensemble_lora

    common = TOY_SET + [f"data_root={data_root}", f"cache_dir={cache_dir}"]
    with prefect_test_harness(server_startup_timeout=120):
        res = ensemble_lora(str(REPO / "configs" / "tiny.yaml"),
                            common + [f"output_dir={tmp_path / 'prefect'}"])
    plain = algorithm2.pipeline(Run.open(load_config(
        str(REPO / "configs" / "tiny.yaml"), common + [f"output_dir={tmp_path / 'plain'}"])))
    for out in (tmp_path / "prefect", tmp_path / "plain"):
        groups = json.loads((out / "groups.json").read_text())
        assert groups["method"] == "toy-sorted" and groups["n_groups"] == 2
        adapter = json.loads((out / "adapters" / "group-0" / "adapter_config.json").read_text())
        assert adapter["use_rslora"] is True and adapter["r"] == 4
        base = json.loads((out / "baselines.json").read_text())["results"]
        assert set(base) == {"single", "toy-pairs"}
        assert base["toy-pairs"]["answers"] == {"rte": "pair-0", "cb": "pair-0",
                                                "copa": "pair-1", "wic": "pair-1"}
        assert "one adapter per pair of tasks" in (out / "report.md").read_text()
    for name in ("ensemble.json", "groups.json", "predictions.json", "baselines.json"):
        a = json.loads((tmp_path / "prefect" / name).read_text())
        b = json.loads((tmp_path / "plain" / name).read_text())
        if name == "baselines.json":
            for r in (*a["results"].values(), *b["results"].values()):
                r.pop("wall_s"), r.pop("peak_memory_bytes")
        assert a == b, name
    assert res.metrics.tasks == plain.metrics.tasks
    assert res.version == plain.version  # the same ensemble.json, so the same version id
