"""Run configuration: one YAML file validated by pydantic.

Unknown keys and wrong types are errors that name the key path (``model.quantization``,
``tasks.2.template``, …). ``--set key=value`` overrides use the same dotted paths.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (AfterValidator, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from .adapter_kinds import AdapterConfig, validate_adapter
from .baselines import BASELINES
from .boosting import BOOSTING_MODES
from .clustering import ClusteringConfig, validate_clustering
from .data import TaskConfig
from .registry import StrictModel


class ConfigError(ValueError):
    pass


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds: non-negative, 32 bits here
DIM_MAX = 1 << 20  # a projection dimension (d ≤ p is checked against the model in stage 1)
MAX_EXAMPLES = 10 ** 8

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_task_name(name: str) -> None:
    """A task name is a directory name in the run directory: letters, digits, '_', '.', '-',
    starting with a letter or digit, at most 64 characters."""
    if not isinstance(name, str) or not TASK_NAME.match(name) or ".." in name:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ValueError(f"task name {shown} is not allowed: use letters, digits, '_', '.' and "
                         f"'-' (starting with a letter or digit, no '..', at most 64 "
                         f"characters)")


MAX_YAML_NODES = 100_000  # a config has hundreds; an alias bomb expands to billions


def _expanded_size(node, memo: dict) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (aliases are shared
    nodes in the composed graph, so this is counted once per node, not once per use)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0
        children = node.value if isinstance(node.value, list) else []
        total = 1
        for c in children:
            for n in (c if isinstance(c, tuple) else (c,)):
                total += _expanded_size(n, memo)
                if total > MAX_YAML_NODES:
                    break
        memo[key] = total
    return memo[key]


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a mapping with a key twice is an error (YAML would keep the last)
    and a document that expands to more than MAX_YAML_NODES nodes is refused before it is
    built (a file of a few hundred bytes can name 10**9 strings through nested aliases)."""

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"the YAML expands to more than {MAX_YAML_NODES} values through "
                              "aliases (*name): not a config (an alias bomb?)")
        return node

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue
            if key in keys:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears "
                                  "twice in one mapping")
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str):
    """A YAML document read strictly (:class:`_StrictLoader`); errors name ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"config file {source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {source}: nested too deeply") from None


_Strict = StrictModel


class ModelConfig(_Strict):
    name: str = "tiny-llama"  # tiny-llama | smollm2-135m | path/to/file.gguf | local dir | hub id
    gguf_file: str | None = None  # a GGUF file inside the directory ``name``
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "nf4"] = "none"  # nf4 = QLoRA (bitsandbytes)
    device: str = "auto"
    max_length: int = Field(256, ge=8, le=1 << 20)
    choice_mode: Literal["auto", "token", "sequence"] = "auto"
    trust_remote_code: bool = False
    # tiny-llama only
    tiny_hidden_size: int = Field(64, ge=8, le=1 << 16)
    tiny_layers: int = Field(2, ge=1, le=1024)
    tiny_seed: int = Field(0, ge=0, le=SEED_MAX)


class EstimationConfig(_Strict):
    """Stage 1 (projected gradients) and stage 2 (subset regressions)."""
    # d, or several: stage 1 computes the largest, and the features at every listed d' come
    # from that one pass (the first d' columns of the same projection; features.py)
    projection_dim: int | list[int] = 400
    # the d' of stage 2 and boosting: one of projection_dim (default: the largest)
    fit_dim: int | None = None
    # per split ("train", "validation"): stage 1 and the surrogate use a seeded sample of this
    # many examples of each task (all when unset); fine-tuning uses every example
    max_examples: dict[str, int] = {}
    projection_seed: int = Field(0, ge=0, le=SEED_MAX)
    projection_block_rows: int = Field(32768, ge=1, le=1 << 24)
    # memory for caching P's float64 blocks, in GiB; None: a quarter of the device's free memory
    # (P whole for SmolLM2-135M: 1.5 GB); 0: regenerate every block at each use (slower, no
    # memory). The features do not depend on it.
    projection_cache_gb: float | None = Field(None, ge=0.0)
    batch_size: int = Field(16, ge=1, le=1 << 16)
    # stage 5: a batch of every member of a task in one forward over the base (true), one
    # forward per member (false), or in one on a GPU only (auto; on a CPU it is no faster:
    # BENCHMARKS.md, "All members in one pass"). The scores are the same either way.
    one_pass: bool | Literal["auto"] = "auto"
    linearity_check: bool = True
    linearity_examples: int = Field(16, ge=1, le=100_000)
    # stage 2
    n_subsets: int = Field(60, ge=1, le=1_000_000)  # k
    subset_size: int = Field(3, ge=2, le=10_000)  # s
    min_pair_coverage: int = Field(1, ge=0, le=10_000)
    l2: float = Field(1e-3, ge=0.0)  # λ
    max_norm: float | None = Field(None, gt=0.0)  # a bound on ‖x‖ (absolute)
    # Bound the surrogate's solution: ‖P x̂‖ ≤ this × ‖θ*‖, the adapter's own norm at θ* — not
    # the paper's relative distance, which divides by the whole pretrained model's norm
    # (ProjectionInfo.relative_distance; on SmolLM2-135M with LoRA r 8 on q, v, 1.0 here is
    # about 0.6% of ‖θ*_Full‖). Without a bound, a subset with fewer train examples than d is
    # interpolated far outside the first-order regime (SmolLM2 demo: ‖P x̂‖ ≈ 15–23 ‖θ*‖, train
    # loss 0.05, useless estimates). Real fine-tuning moved the adapter 0.13–0.27 ‖θ*‖ there,
    # but the surrogate moves inside a random d-dimensional subspace and needs more distance
    # for the same effect; against the demo's real fine-tuned groups the mean relative error
    # of validation loss was 76% unbounded, 58% at 0.2 and 31% at 1.0. None = no bound (only
    # max_norm and l2). (Called max_relative_distance before; that key is still read.)
    max_adapter_distance: float | None = Field(1.0, gt=0.0)
    metric: Literal["loss", "accuracy"] = "loss"
    subsets_per_task_run: int = Field(10, ge=1, le=1_000_000)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "max_relative_distance" in data:
            if "max_adapter_distance" in data:
                raise ValueError("estimation.max_relative_distance is the old name of "
                                 "max_adapter_distance: set one of them")
            import warnings

            warnings.warn("estimation.max_relative_distance is now max_adapter_distance (it "
                          "is relative to the adapter's norm, not the paper's distance)",
                          stacklevel=2)
            data = dict(data)
            data["max_adapter_distance"] = data.pop("max_relative_distance")
        return data

    @field_validator("projection_dim")
    @classmethod
    def _dims(cls, v):
        dims = [v] if isinstance(v, int) else list(v)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                           for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"projection_dim must be a positive integer or a list of distinct "
                             f"positive integers, got {v!r}")
        if max(dims) > DIM_MAX:
            raise ValueError(f"projection_dim {max(dims)} is larger than {DIM_MAX}")
        return v

    @field_validator("max_examples")
    @classmethod
    def _caps(cls, v):
        bad = sorted(set(v) - {"train", "validation"})
        if bad:
            raise ValueError(f"max_examples has split(s) {bad}; stage 1 reads 'train' and "
                             "'validation'")
        for split, n in v.items():
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXAMPLES:
                raise ValueError(f"max_examples.{split} = {n!r}, must be an integer from 1 to "
                                 f"{MAX_EXAMPLES}")
        return v

    @model_validator(mode="after")
    def _fit_dim_listed(self):
        if self.fit_dim is not None and self.fit_dim not in self.dims:
            raise ValueError(f"estimation.fit_dim = {self.fit_dim} is not one of the computed "
                             f"projection dimensions (estimation.projection_dim = {self.dims})")
        return self

    @property
    def dims(self) -> list[int]:
        """The projection dimensions the features are available at, ascending."""
        return sorted([self.projection_dim] if isinstance(self.projection_dim, int)
                      else self.projection_dim)

    @property
    def stored_dim(self) -> int:
        """What stage 1 computes: the largest listed d."""
        return self.dims[-1]

    @property
    def surrogate_dim(self) -> int:
        """The d' of stage 2 and boosting."""
        return self.fit_dim if self.fit_dim is not None else self.stored_dim


class TrainingConfig(_Strict):
    learning_rate: float = Field(5e-4, gt=0.0)  # the peak learning rate (after warm-up)
    epochs: int = Field(2, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=1 << 16)
    grad_accumulation: int = Field(1, ge=1, le=1 << 16)
    weight_decay: float = Field(0.0, ge=0.0)
    max_steps: int | None = Field(None, ge=1, le=10 ** 9)
    # the learning rate rises linearly over the first warmup_ratio of the optimizer steps, then
    # follows `schedule` down to 0 at the last step ("constant": stays at learning_rate)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0.0)  # gradient clipping (None: none)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # stage 4: train the group adapters, the single adapter and the baselines' (those that
    # start from θ*) together, one forward and backward over the base per step for all of
    # them (docs/design.md, "All members in one pass"); each as it would be trained alone
    one_pass: bool = False


class BoostingConfig(_Strict):
    steps: int = Field(1, ge=0, le=1000)  # b
    eta: float = Field(0.1, gt=0.0)  # η
    # how a boosting adapter is fitted to the residuals (a registered boosting mode,
    # ensemble_core/boosting/): "first-order" (ridge regression on the projected gradients,
    # restored as θ* + η·P x̂; docs/design.md, "Stage 5"), "exact" (the adapter fine-tuned on
    # the residuals, squared error, added with scale η) or "adaboost" (AdaBoost.M1: sample
    # weights from the members' errors, α = log((1 − err)/err)); exact and adaboost train with
    # `training`
    mode: str = "first-order"

    @field_validator("mode")
    @classmethod
    def _registered(cls, v):
        if v not in BOOSTING_MODES:
            raise ValueError(f"{v!r} is not a registered boosting mode; registered: "
                             f"{', '.join(BOOSTING_MODES.names())}")
        return v


class WeightsConfig(_Strict):
    """How the ensemble weights over the m group ensembles are fitted (stage 5; docs/design.md,
    "Stage 5"): ``form`` per-task (a simplex per task, on its validation examples, from its
    own group) or per-group (one simplex for all tasks, the paper's Algorithm 2); ``guard``
    cross-fit (a task's fitted weights kept only if they beat its own group alone on held-out
    folds of its validation examples: ensemble.cross_fitted_weights) or none."""
    form: Literal["per-task", "per-group"] = "per-task"
    guard: Literal["cross-fit", "none"] = "cross-fit"
    folds: int = Field(5, ge=2, le=1000)


def _registered_baseline(name: str) -> str:
    if name not in BASELINES:
        raise ValueError(f"{name!r} is not a registered baseline; registered: "
                         f"{', '.join(BASELINES.names())}")
    return name


class EvaluationConfig(_Strict):
    # the paper's baselines trained and evaluated beside the ensemble (registered in
    # ensemble_core/baselines/; the single adapter on all tasks always is): per-task, mtl-ft,
    # random-groups, gradient-groups
    baselines: list[Annotated[str, AfterValidator(_registered_baseline)]] = []
    # a finished run's ensemble becomes the current version unless its validation accuracy on
    # some task is lower than the current version's by more than this (ensemble_core/versions.py)
    promote_tolerance: float = Field(0.02, ge=0.0, le=1.0)

    @field_validator("baselines")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"baselines lists a method twice: {v}")
        return v


class RunnerConfig(_Strict):
    kind: Literal["local", "dask"] = "local"
    address: str | None = None  # a Dask scheduler address; None = a local cluster
    n_workers: int = Field(2, ge=1, le=4096)
    work_pools: dict[str, str] = {}  # stage kind ("gpu", "cpu") -> Prefect work pool name
    # the Redis server that coordinates the run across machines (the run claim and the cache
    # locks: ensemble_core/coordination.py); None: ENSEMBLE_LORA_REDIS_URL, else files in a
    # local run directory (one machine)
    redis_url: str | None = None
    # stage 5 scores each phase (before the weights, each boosting adapter, the test split) in
    # at most this many task runs, the tasks split evenly in order: more spread the scoring
    # over more GPU workers, fewer cost less orchestration with many tasks (BENCHMARKS.md,
    # "Many datasets"). What is computed does not depend on it.
    scoring_runs: int = Field(4, ge=1, le=100_000)
    # stage 1 computes the features in at most this many task runs, the tasks split evenly in
    # order (several small datasets in one run: issue 32); 0: one task run per task. What is
    # computed does not depend on it, and a task's features are read back, not recomputed,
    # when the packing changes (tasks added or removed).
    feature_runs: int = Field(8, ge=0, le=100_000)


class RunConfig(_Strict):
    name: str = "ensemble-lora"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    data_root: str = "../shared/data"  # any fsspec URL; relative paths are relative to the config
    output_dir: str = "runs/{name}"  # any fsspec URL
    cache_dir: str | None = None  # model cache (default ~/.cache/ensemble-lora)
    model: ModelConfig = ModelConfig()
    # a registered adapter kind's section (ensemble_core/adapter_kinds/): `kind` selects it
    adapter: SerializeAsAny[AdapterConfig] = Field(default_factory=lambda: validate_adapter({}))
    tasks: list[TaskConfig]
    estimation: EstimationConfig = EstimationConfig()
    # a registered clustering method's section (ensemble_core/clustering/): `method` selects it
    clustering: SerializeAsAny[ClusteringConfig] = Field(
        default_factory=lambda: validate_clustering({}))
    training: TrainingConfig = TrainingConfig()
    boosting: BoostingConfig = BoostingConfig()
    weights: WeightsConfig = WeightsConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    runner: RunnerConfig = RunnerConfig()

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_kind(cls, v):
        return validate_adapter(v)

    @field_validator("clustering", mode="before")
    @classmethod
    def _clustering_method(cls, v):
        return validate_clustering(v)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks):
        if not tasks:
            raise ValueError("at least one task is required")
        seen: dict[str, str] = {}
        for t in tasks:
            check_task_name(t.name)
            key = t.name.lower()  # one directory per task, also on case-insensitive storage
            if key in seen:
                raise ValueError(f"duplicate task name {t.name!r}" + (
                    f" (the same as {seen[key]!r} but for case)" if seen[key] != t.name else ""))
            seen[key] = t.name
        return tasks

    @model_validator(mode="after")
    def _cross_checks(self):
        n = len(self.tasks)
        try:
            self.output_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"output_dir {self.output_dir!r}: {{name}} is its only "
                             f"placeholder ({type(e).__name__}: {e})") from None
        if isinstance(self.clustering.n_groups, int) and self.clustering.n_groups < 1:
            raise ValueError(f"clustering.n_groups = {self.clustering.n_groups}: the number of "
                             "groups must be at least 1 (or auto)")
        if isinstance(self.clustering.n_groups, int) and self.clustering.n_groups > n:
            raise ValueError(f"clustering.n_groups = {self.clustering.n_groups} is larger than "
                             f"the number of tasks ({n})")
        return self

    @property
    def run_dir(self) -> str:
        return self.output_dir.format(name=self.name)

    def fingerprint(self, *sections: str) -> str:
        """Content hash of the whole config, or of some of its sections."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r}; tasks are {[t.name for t in self.tasks]}")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{path}'")
        elif e["type"] == "value_error":  # our validators' messages name what is wrong
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(msg if not e["loc"] else f"'{path}': {msg}")
        else:
            got = repr(e.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            lines.append(f"'{path}': {e['msg']} (got {got})")
    return f"invalid config {source}: " + "; ".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = data
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def parse_config(data: dict, source: str = "<dict>", overrides: list[str] | None = None,
                 base_dir: str | None = None) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    data = json.loads(json.dumps(data))  # a private copy
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    if base_dir is not None:  # relative local paths are relative to the config file
        for attr in ("data_root", "output_dir"):
            val = getattr(cfg, attr)
            if "://" not in val and not Path(val).is_absolute():
                setattr(cfg, attr, str((Path(base_dir) / val).resolve()))
    return cfg


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} characters")
    try:
        data = load_yaml(text, path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    base = str(Path(path).parent) if "://" not in path else None
    return parse_config(data, source=path, overrides=overrides, base_dir=base)
