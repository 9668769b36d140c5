"""What the stages hand each other: small typed records (docs/design.md, "Records").

A record names files (path + sha256) and carries the few numbers a later stage needs; arrays
stay in the files. Every record is a frozen dataclass with ``to_json()`` / ``from_json()``
(validated, nested records included), which is how records travel through Prefect (JSON
results, never pickles) and how they are compared. ``key()`` is the part of a record that
identifies its content, which is what a later stage's cache key is made of (``stages``).

The stages, in the one numbering used everywhere (README, flows, prefect.yaml, the report):

1. gradient features    -> :class:`FeaturesRecord` per task, :class:`LinearityRecord`
2. subset regressions   -> :class:`SubsetBatch` (of :class:`SubsetEstimate`)
3. affinity and groups  -> :class:`GroupsRecord`
4. group adapters       -> :class:`AdapterRecord` per group (and the baseline, θ*)
5. boosting and weights -> :class:`ScoresRecord` per member and task, :class:`BoostRecord` per step,
                           :class:`EnsembleRecord`
6. evaluation           -> :class:`EvaluationRecord` (:class:`Metrics`)
"""
from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Callable

__all__ = [
    "Progress", "Record", "FileRef", "ProjectionInfo", "SplitFeatures", "FeaturesRecord",
    "FeaturesPack",
    "LinearityPoint", "LinearityRecord", "TaskEstimate", "SurrogateFit", "SubsetEstimate",
    "SubsetPlan", "SubsetBatch", "GroupsRecord", "BaselinePlan", "TrainResult", "AdapterRecord",
    "ScoresRecord", "TaskScores", "AdapterRecords", "Member", "GroupLosses", "FinishResult",
    "GroupEnsemble", "BoostRecord", "EnsembleRecord", "TaskMetrics", "Averages", "Compute",
    "Metrics", "EvaluationRecord", "BaselineResult", "BaselinesRecord", "ReportRecord",
    "VersionRecord", "FeaturesResult",
    "GroupingResult", "AdaptersResult",
    "EnsembleResult", "PipelineResult", "EstimateCheckRow", "EstimateCheckSummary",
    "EstimateCheck",
]

# progress(done, total, detail): the one shape of progress callback in the library
Progress = Callable[[int, int, str], None]


@lru_cache(maxsize=None)
def _adapter(cls):
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


class Record:
    """JSON both ways for a dataclass record."""

    def to_json(self) -> dict:
        return _adapter(type(self)).dump_python(self, mode="json")

    @classmethod
    def from_json(cls, data):
        """The record from its JSON form (or the record itself), validated."""
        if isinstance(data, cls):
            return data
        from pydantic import ValidationError

        try:
            return _adapter(cls).validate_python(data)
        except ValidationError as e:
            raise ValueError(f"not a valid {cls.__name__} record: {e}") from None

    def key(self):
        """The content identity of the record (cache keys). Default: all of it."""
        return self.to_json()

    def files(self) -> list["FileRef"]:
        """Every file the record names, nested records included (each with the sha256 it was
        written with)."""
        out: list[FileRef] = []
        _collect_files(self, out)
        return out

    def unverified(self, base: str | None = None) -> list[str]:
        """The files the record names that are missing or changed since they were written
        (a cached record is served only when this is empty: tasks/common.py); their paths
        are relative to ``base``, the run directory."""
        return [f.path for f in dict.fromkeys(self.files()) if not f.verified(base)]

    def verified(self, base: str | None = None) -> bool:
        return not self.unverified(base)


def _collect_files(obj, out: list) -> None:
    if isinstance(obj, FileRef):
        out.append(FileRef(obj.path, obj.sha256))
    elif isinstance(obj, Record):
        own = type(obj).files
        if own is not Record.files:  # a record that says itself which files it names
            out.extend(obj.files())
            return
        for f in dataclasses.fields(obj):
            _collect_files(getattr(obj, f.name), out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_files(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_files(v, out)


# ---------------------------------------------------------------------------------- files

@dataclasses.dataclass(frozen=True)
class FileRef(Record):
    """A file of the run directory — its path relative to the run directory, so a record is
    the same wherever the directory is (another mount, a copy on s3://) — and the sha256 of
    its content when it was written."""
    path: str
    sha256: str

    def url(self, base: str | None = None) -> str:
        """Where the file is, for a run directory at ``base`` (an absolute path or URL in a
        record is returned as it is)."""
        from .storage import join

        if base is None or "://" in self.path or self.path.startswith("/"):
            return self.path
        return join(base, self.path)

    def verified(self, base: str | None = None) -> bool:
        """The file is there with the content it was written with."""
        from .storage import file_sha256

        try:
            return file_sha256(self.url(base)) == self.sha256
        except (FileNotFoundError, OSError):
            return False

    def key(self):
        return self.sha256


# ---------------------------------------------------------------------------------- stage 1

@dataclasses.dataclass(frozen=True)
class ProjectionInfo(Record):
    """The projection of stage 1: P is p × d with N(0, 1/d) entries, generated from ``seed``
    in blocks of ``block_rows`` rows (``projection.GaussianProjector``), taken at the adapter θ*
    of norm ``theta_norm``, on a pretrained model of norm ``full_norm`` (‖θ*_Full‖, the whole
    base model's parameters: ``models.base_norm``)."""
    p: int
    d: int
    seed: int
    block_rows: int
    theta_norm: float
    full_norm: float = 0.0

    def at_dim(self, d: int) -> "ProjectionInfo":
        """The projection at d ≤ self.d (the first d columns of the same Z, ``projection``)."""
        if not 0 < d <= self.d:
            raise ValueError(f"projection dimension {d} was not computed (stage 1 computed "
                             f"d <= {self.d})")
        return dataclasses.replace(self, d=int(d))

    def moved(self, x_norm: float) -> float:
        """‖P x‖ ≈ sqrt(p/d)·‖x‖ (E‖P x‖² = (p/d)‖x‖²)."""
        return x_norm * (self.p / self.d) ** 0.5

    def relative_distance(self, x_norm: float) -> float:
        """The paper's relative distance of θ* + P x: ‖P x‖/‖θ*_Full‖ (§2.2, Table 2: over the
        norm of the entire pretrained model); 0 when that norm is not known."""
        return self.moved(x_norm) / self.full_norm if self.full_norm > 0 else 0.0

    def adapter_distance(self, x_norm: float) -> float:
        """‖P x‖/‖θ*‖: the distance over the adapter's own norm at θ* (not the paper's
        measure; the unit of the surrogate's bound ``estimation.max_adapter_distance``)."""
        return self.moved(x_norm) / max(self.theta_norm, 1e-30)

    def norm_for_adapter_distance(self, r: float) -> float:
        """The ‖x‖ at which ‖P x‖ ≈ r·‖θ*‖ (the surrogate's bound)."""
        return r * self.theta_norm / (self.p / self.d) ** 0.5


@dataclasses.dataclass(frozen=True)
class SplitFeatures(FileRef):
    """One Parquet file of stage-1 features (``features.FeatureTable``)."""
    rows: int
    examples: int


@dataclasses.dataclass(frozen=True)
class FeaturesRecord(Record):
    """Stage 1 for one task: its train and validation features and its manifest."""
    task: str
    manifest: FileRef
    train: SplitFeatures
    validation: SplitFeatures
    projection: ProjectionInfo
    seconds: float  # wall time of the task's gradient pass (both splits)
    flops: float = 0.0  # its work, counted as training's (TrainResult.flops_estimate)

    def split(self, name: str) -> SplitFeatures:
        if name not in ("train", "validation"):
            raise KeyError(f"stage-1 features have train and validation splits, not {name!r}")
        return getattr(self, name)

    def files(self) -> list[FileRef]:
        return [FileRef(f.path, f.sha256) for f in (self.manifest, self.train, self.validation)]

    def key(self):
        return {"task": self.task, "train": self.train.sha256,
                "validation": self.validation.sha256, "projection": self.projection.to_json()}


@dataclasses.dataclass(frozen=True)
class FeaturesPack(Record):
    """Stage 1 for several tasks in one task run (``stages.gradient_features_pack``)."""
    records: list[FeaturesRecord]


@dataclasses.dataclass(frozen=True)
class LinearityPoint(Record):
    relative_distance: float  # ‖P x‖/‖θ*_Full‖, the paper's (Table 5, Figure 2)
    relative_error: float
    error_vs_change: float
    n_rows: int
    adapter_distance: float | None = None  # ‖P x‖/‖θ*‖


@dataclasses.dataclass(frozen=True)
class LinearityRecord(Record):
    """The first-order check (Table 5 / Figure 2) on one task's first validation examples."""
    task: str
    examples: int
    results: list[LinearityPoint]
    file: FileRef


# ---------------------------------------------------------------------------------- stage 2

@dataclasses.dataclass(frozen=True)
class TaskEstimate(Record):
    """f̂_i(S): the surrogate fitted on S, evaluated on task i's validation examples."""
    loss: float
    accuracy: float
    n_examples: int


@dataclasses.dataclass(frozen=True)
class SurrogateFit(Record):
    norm: float  # ‖x̂‖
    l2: float  # the effective λ (raised when the norm bound holds)
    n_iter: int
    converged: bool
    train_loss: float
    n_train_examples: int
    relative_distance: float  # ‖P x̂‖/‖θ*_Full‖, the paper's (Table 2)
    n_train_rows: int = 0  # rows of the fit's design (its FLOPs: n_iter · 4 · rows · d)
    adapter_distance: float = 0.0  # ‖P x̂‖/‖θ*‖, over the adapter's own norm


@dataclasses.dataclass(frozen=True)
class SubsetEstimate(Record):
    """One sampled subset S: its tasks (indices into the run's task list, and names) and
    f̂_i(S) for every i ∈ S, keyed by task name."""
    subset: list[int]
    tasks: list[str]
    per_task: dict[str, TaskEstimate]
    fit: SurrogateFit


@dataclasses.dataclass(frozen=True)
class SubsetPlan(Record):
    """Stage 2's plan (estimation/plan.json): the subsets in their batches, as indices into
    the config's tasks."""
    file: FileRef
    batches: list[list[list[int]]]


@dataclasses.dataclass(frozen=True)
class SubsetBatch(Record):
    """Stage 2 for a batch of subsets (one task run)."""
    batch: int
    file: FileRef
    results: list[SubsetEstimate]
    worker: str  # host:pid of the process that fitted them
    seconds: float

    def key(self):
        return [r.key() for r in self.results]


# ---------------------------------------------------------------------------------- stage 3

@dataclasses.dataclass(frozen=True)
class GroupsRecord(Record):
    """Stage 3: the task affinity (eq. 1) and the groups."""
    affinity: FileRef
    groups: FileRef
    group_tasks: list[list[str]]
    seconds: float


@dataclasses.dataclass(frozen=True)
class BaselinePlan(Record):
    """The adapters of the configured baselines (``stages.plan_baselines``): method -> adapter
    name -> its tasks; ``after_single``: the methods whose adapters start from the single
    adapter's weights (trained after it)."""
    plans: dict[str, dict[str, list[str]]]
    after_single: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------- stage 4

@dataclasses.dataclass
class TrainResult(Record):
    """What one ``training.train_adapter`` call did (training.json beside an adapter; an
    AdapterRecord carries it without ``history``).

    ``history`` has one entry per epoch: ``{"epoch", "train_loss", "steps", "seconds",
    "val_loss", "val": evaluate(...)}``; entry 0 (when validated) is the adapter before training
    (``train_loss`` None). ``val_loss`` is the selection criterion: the unweighted mean over
    tasks of each task's mean validation loss. ``best_epoch`` is chosen among epochs >= 1.

    ``flops_estimate`` = 6 · n_params_forward · tokens_seen: the usual forward (2N) + backward
    (4N) floating-point operations per token, N = parameters applied at every position (all weights,
    LoRA included, except the input embedding table, a lookup, and the output head, which
    ``choice_outputs`` applies to a few rows or positions only). With frozen base weights the
    backward pass skips their weight gradients, so the true cost is nearer 4N per token: the
    estimate is an upper bound of the usual kind.
    ``tokens_seen`` counts non-padding input tokens of training batches (in sequence mode, one
    sequence per answer choice); validation forwards are not counted.

    ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on the training device when it
    is a GPU (reset at the start of training), else the process's peak resident set size
    (``getrusage``), which covers the whole process lifetime, not only this call.
    """
    best_epoch: int
    history: list[dict]
    wall_seconds: float
    n_steps: int
    tokens_seen: int
    flops_estimate: float
    peak_memory_bytes: int
    trainable_parameters: int
    n_params_forward: int = 0
    examples_seen: int = 0
    best_val_loss: float | None = None
    device: str = "cpu"
    # the TrainingConfig used, with max_length and the choice modes
    config: dict = dataclasses.field(default_factory=dict)
    # how far the adapter moved from where training started: ‖θ − θ_0‖, over ‖θ*_Full‖ (the
    # paper's relative distance, Table 2) and over the adapter's own norm ‖θ_0‖
    distance_moved: float | None = None
    relative_distance: float | None = None
    adapter_distance: float | None = None

    def to_json(self) -> dict:
        from .storage import jsonable

        return jsonable(dataclasses.asdict(self))  # NaN and inf as null

    @classmethod
    def from_json(cls, data) -> "TrainResult":
        if isinstance(data, cls):
            return data
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})  # newer fields ignored

    def summary(self) -> "TrainResult":
        """The same without the per-epoch history."""
        return dataclasses.replace(self, history=[])


@dataclasses.dataclass(frozen=True)
class AdapterRecord(Record):
    """A PEFT adapter directory of the run (a group adapter, the baseline, θ*, a boosting
    adapter) and the sha256 of its weights."""
    name: str
    tasks: list[str]
    path: str
    sha256: str
    train: TrainResult | None = None  # trained adapters, without the history

    def key(self):
        return {"name": self.name, "sha256": self.sha256}

    def files(self) -> list[FileRef]:
        """The adapter's weights (what ``sha256`` is the digest of)."""
        from .storage import join

        return [FileRef(join(self.path, "adapter_model.safetensors"), self.sha256)]

    @property
    def pins(self) -> dict[str, str]:
        """The files of the adapter's directory this record pins (``RunDir.fetch``)."""
        return {"adapter_model.safetensors": self.sha256}


# ---------------------------------------------------------------------------------- stage 5

@dataclasses.dataclass(frozen=True)
class ScoresRecord(Record):
    """One member adapter's scores h_c(s) on the splits of one task that a later step reads:
    before the weights (``phase`` "fit": boosting's train sample, every task's validation) or
    after them (``phase`` "test": the test split of the tasks whose ensemble it is part of)."""
    name: str
    file: FileRef
    seconds: float
    phase: str = "fit"
    task: str = ""  # stage 5 scores one task at a time (stages.score_members)
    flops: float = 0.0  # forward FLOPs: 2N a non-padding token (records.TrainResult)

    def key(self):
        return {"name": self.name, "phase": self.phase, "task": self.task,
                "sha256": self.file.sha256}


@dataclasses.dataclass(frozen=True)
class AdapterRecords(Record):
    """Adapters trained together (``stages.train_groups``), in the order asked for."""
    records: list[AdapterRecord]


@dataclasses.dataclass(frozen=True)
class TaskScores(Record):
    """The scores of one stage-5 scoring run (``stages.score_members``): one ScoresRecord per
    member and task, keyed by ``stages.scores_key``."""
    records: dict[str, ScoresRecord]


@dataclasses.dataclass(frozen=True)
class Member(Record):
    """A member of a group ensemble: its scores enter the group's sum with ``scale``."""
    name: str
    scale: float


@dataclasses.dataclass(frozen=True)
class GroupEnsemble(Record):
    """Group g's ensemble: h_g = Σ_members scale · h_member (score space, ``boosting``)."""
    name: str
    tasks: list[str]
    members: list[Member]


@dataclasses.dataclass(frozen=True)
class BoostRecord(Record):
    """One boosting step (Algorithm 2): the restored adapter and the exact training loss of
    the chosen group's ensemble before and after adding it."""
    adapter: AdapterRecord
    group: str
    step: int
    eta: float
    train_loss_before: float
    train_loss_after: float
    train_loss_first_order: float | None  # first-order mode only (the linear model's loss)
    x_norm: float | None  # first-order mode only
    relative_distance: float  # ‖θ − θ*‖/‖θ*_Full‖, the paper's (Table 2)
    accepted: bool
    seconds: float
    mode: str = "first-order"  # boosting.mode
    # the chosen group's members if the step is accepted (boosting.py: +η·(h_k − h0) as two
    # members, or AdaBoost's α-weighted members)
    members: list[Member] = dataclasses.field(default_factory=list)
    alpha: float | None = None  # adaboost: the new member's α = log((1 − err)/err)
    error: float | None = None  # adaboost: its weighted training error err
    adapter_distance: float | None = None  # ‖θ − θ*‖/‖θ*‖, over the adapter's own norm


@dataclasses.dataclass(frozen=True)
class GroupLosses(Record):
    """The exact training loss of every group's current ensemble (group name -> loss), which
    a boosting step chooses its group by (Algorithm 2)."""
    losses: dict[str, float]


@dataclasses.dataclass(frozen=True)
class EnsembleRecord(Record):
    """ensemble.json: the group ensembles and every task's weights over them."""
    file: FileRef
    groups: list[GroupEnsemble]
    weights: dict[str, list[float]]


# ---------------------------------------------------------------------------------- stage 6

@dataclasses.dataclass(frozen=True)
class TaskMetrics(Record):
    n_test: int
    group: int
    weights: list[float]
    baseline_accuracy: float
    group_accuracy: float
    ensemble_accuracy: float
    majority: float  # the test split's majority-class rate
    # the task's group adapter alone, without boosting members (group_accuracy has them)
    group_adapter_accuracy: float | None = None


@dataclasses.dataclass(frozen=True)
class Averages(Record):
    baseline_accuracy: float
    group_accuracy: float
    ensemble_accuracy: float
    majority: float
    # ensemble − single adapter, average accuracy, with its 95% paired bootstrap interval over
    # the test examples (comparison.paired_bootstrap)
    difference: float
    difference_low: float
    difference_high: float
    group_adapter_accuracy: float | None = None


@dataclasses.dataclass(frozen=True)
class Compute(Record):
    """What the ensemble costs against one adapter on all tasks, two ways (``stages.planning.
    compute_summary``). The paper's accounting (Table 4, "+8–9%"): stage 1, the subset fits,
    the group adapters and boosting, over the baseline's training — ``ratio`` (wall time) and
    ``flops_ratio``. With what the ensemble needs besides, which one adapter does not: the
    member scoring before the weights (the boosting group choice and the weights read it) —
    ``ratio_with_scoring`` and ``flops_ratio_with_scoring``. FLOPs are counted as training
    counts them (``TrainResult.flops_estimate``: 2N a token forward, 4N a token backward);
    the subset fits and a first-order boosting step are counted in seconds only (a few
    d-dimensional solves and one forward pass over a group's train sample)."""
    gradients_s: float
    estimation_s: float
    group_adapters_s: float
    boosting_s: float
    ensemble_pipeline_s: float
    baseline_s: float
    ratio: float
    baseline_flops: float
    group_flops: float
    peak_memory_bytes: int
    scoring_s: float = 0.0  # the members' scoring before the weights
    gradients_flops: float = 0.0
    scoring_flops: float = 0.0
    flops_ratio: float = 0.0
    ratio_with_scoring: float = 0.0
    flops_ratio_with_scoring: float = 0.0

    def __post_init__(self):
        if not math.isfinite(self.ratio):
            raise ValueError(f"compute ratio is {self.ratio}")


@dataclasses.dataclass(frozen=True)
class Metrics(Record):
    """metrics.json."""
    tasks: dict[str, TaskMetrics]
    average: Averages
    compute: Compute
    n_groups: int
    groups: list[list[str]]


@dataclasses.dataclass(frozen=True)
class EvaluationRecord(Record):
    file: FileRef
    metrics: Metrics
    predictions: FileRef  # predictions.json: per task, gold and each method's predicted choice


@dataclasses.dataclass(frozen=True)
class BaselineResult(Record):
    """One of the paper's baselines (``baselines``): which adapter answers which task, its test
    accuracy, and what it cost."""
    method: str
    answers: dict[str, str]  # task -> adapter name
    accuracy: dict[str, float]  # task -> test accuracy
    average: float
    flops: float  # training FLOPs (TrainResult.flops_estimate), summed over its adapters
    wall_s: float  # training wall time, summed
    peak_memory_bytes: int
    adapter_parameters: int  # trainable parameters of all its adapters


@dataclasses.dataclass(frozen=True)
class BaselinesRecord(Record):
    """baselines.json."""
    file: FileRef
    results: dict[str, BaselineResult]


@dataclasses.dataclass(frozen=True)
class ReportRecord(Record):
    """The run's report (report.md, affinity.png) and manifest.json (``stages.finish``);
    ``markdown`` is the report with the heatmap inlined (for the Prefect artifact)."""
    report: FileRef
    heatmap: FileRef
    manifest: FileRef
    markdown: str


@dataclasses.dataclass(frozen=True)
class VersionRecord(Record):
    """A published version of the run's ensemble (``versions.publish``): its id, whether it
    became current and why, and its ensemble.json."""
    version: str
    promoted: bool
    promotion: str
    ensemble: FileRef


# ---------------------------------------------------------------------------- flow results
# What each flow of flows/ returns (and a stage deployment hands back as JSON).

@dataclasses.dataclass(frozen=True)
class FeaturesResult(Record):
    """Stage 1 for every task, and the first-order check."""
    features: dict[str, FeaturesRecord]
    linearity: LinearityRecord | None = None


@dataclasses.dataclass(frozen=True)
class GroupingResult(Record):
    """Stages 2–3: the subset batches and the groups."""
    batches: list[SubsetBatch]
    groups: GroupsRecord

    @property
    def results(self) -> list[SubsetEstimate]:
        return [r for b in self.batches for r in b.results]

    @property
    def seconds(self) -> float:
        """Wall time of stages 2–3 (the subset fits and the clustering)."""
        return sum(b.seconds for b in self.batches) + self.groups.seconds

    @property
    def workers(self) -> list[str]:
        return sorted({b.worker for b in self.batches})


@dataclasses.dataclass(frozen=True)
class AdaptersResult(Record):
    """Stage 4: the group adapters (by name), the single-adapter baseline, θ*, and the adapters
    of the other baselines (``baselines``), by name."""
    groups: dict[str, AdapterRecord]
    single: AdapterRecord
    theta_star: AdapterRecord
    baselines: dict[str, AdapterRecord] = dataclasses.field(default_factory=dict)
    # the first-order check at the distances the trained adapters moved (the paper's units)
    linearity: LinearityRecord | None = None
    plan: BaselinePlan | None = None  # the baselines' plan the adapters were trained for

    def all(self) -> dict[str, AdapterRecord]:
        return {**self.groups, self.single.name: self.single,
                self.theta_star.name: self.theta_star, **self.baselines}


@dataclasses.dataclass(frozen=True)
class EnsembleResult(Record):
    """Stages 5–6: the boosting steps, the ensemble, its evaluation, and the baselines'."""
    boosting: list[BoostRecord]
    ensemble: EnsembleRecord
    evaluation: EvaluationRecord
    baselines: BaselinesRecord | None = None


@dataclasses.dataclass(frozen=True)
class FinishResult(Record):
    """The report and manifest, and the version published."""
    report: ReportRecord
    version: VersionRecord


@dataclasses.dataclass(frozen=True)
class PipelineResult(Record):
    """The whole pipeline."""
    run_dir: str
    metrics: Metrics
    groups: list[list[str]]
    report: FileRef
    manifest: FileRef
    baselines: dict[str, BaselineResult] = dataclasses.field(default_factory=dict)
    version: str | None = None  # the version published (ensemble_core/versions.py)
    promoted: bool | None = None  # whether it became the current version
    promotion: str = ""  # why (or why not)


# ---------------------------------------------------------------------------------- checks

@dataclasses.dataclass(frozen=True)
class EstimateCheckRow(Record):
    """One (subset, task) pair of the Table 3 check at projection dimension d: the estimate
    against real fine-tuning."""
    d: int
    subset: list[str]
    task: str
    estimated_loss: float
    true_loss: float
    estimated_accuracy: float  # on the validation examples
    true_accuracy: float
    relative_error: float  # of the validation loss
    # the paper's Table 3 measure: test accuracy, the surrogate's against the fine-tuned's
    estimated_test_accuracy: float | None = None
    true_test_accuracy: float | None = None
    test_accuracy_relative_error: float | None = None


@dataclasses.dataclass(frozen=True)
class EstimateCheckSummary(Record):
    d: int
    pairs: int
    subsets: int
    mean_relative_error: float  # of the validation loss
    spearman: float | None  # of the validation losses, estimated against true
    accuracy_abs_error: float  # of the validation accuracy
    true_finetune_s: float
    surrogate_fit_s: float
    estimation_with_amortized_gradients_s: float
    compute_ratio_fits_only: float
    compute_ratio_with_gradients: float
    k_subsets: int
    stage1_s: float
    # the paper's measures: the mean relative error of test accuracy, and the speed-up in
    # FLOPs (fine-tuning the r subsets against their share of stage 1 and the fits)
    mean_test_accuracy_relative_error: float | None = None
    true_finetune_flops: float = 0.0
    estimation_flops: float = 0.0
    flops_speedup: float = 0.0


@dataclasses.dataclass(frozen=True)
class EstimateCheck(Record):
    """estimate_check.json (the paper's Table 3): one summary per projection dimension."""
    file: FileRef
    summaries: list[EstimateCheckSummary]
    rows: list[EstimateCheckRow]

    def summary(self, d: int | None = None) -> EstimateCheckSummary:
        """The summary at d (default: the only one, or the largest d)."""
        if d is None:
            return max(self.summaries, key=lambda s: s.d)
        for s in self.summaries:
            if s.d == d:
                return s
        raise KeyError(f"the check ran at d = {[s.d for s in self.summaries]}, not {d}")
