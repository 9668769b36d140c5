"""Stage 5, weights: combining the m group ensembles per task (Algorithm 2, last step;
docs/design.md, "Stage 5"), and the saved ensemble as a predictor.

Two levels, as in the paper:

* **Group ensemble (boosting), in score space.** Group g's output for example s and choice c is
  ``h_g,c(s) = Σ_members scale · h_member,c(s)`` (``boosting.group_scores``): the group adapter
  with scale 1, and for each accepted boosting step the boosting adapter θ* + η·P x̂ with scale
  +1 and θ* with scale −1, so the group adds the step's change h_k − h0 (η is inside the
  boosting adapter, in parameter space). Scores are raw verbalizer logits in token mode and
  summed continuation log-probabilities in sequence mode; the group's probabilities are the
  softmax over the example's choices of that sum.
* **Weights over groups, in probability space.** For task i, ``p(s) = Σ_k w_ik p_k(s)`` with
  ``w_i`` on the simplex, fitted on task i's validation examples to minimize the mean log loss
  of the combined probability of the gold choice (a convex problem), starting from the one-hot
  on task i's own group.

``ensemble.json`` (written by ``write_ensemble_json``, read by ``EnsembleModel``)::

    {"base_model": {...ModelConfig dict...}, "base_fingerprint": {...},
     "max_length": 256, "choice_mode": "auto", "eta": 0.1,
     "tasks": {"rte": {"group": 0, "weights": [w_0, ..., w_{m-1}],
                       "template": "...", "choices": [" yes", " no"],
                       "labels": ["entailment", "not_entailment"],  # each choice's label
                       # optional: "choice_fields", "choice_template", "builtin",
                       #           "choice_mode", "label_values"
                       }},
     "groups": [{"name": "group-0", "tasks": ["rte", ...],
                 "members": [{"adapter": "adapters/group-0", "scale": 1.0},
                             {"adapter": "adapters/group-0-boost-1", "scale": 1.0},
                             {"adapter": "adapters/theta-star", "scale": -1.0}]}]}

Adapter paths are relative to the run directory and must stay inside it; each is an ordinary
PEFT adapter directory (``adapters.save_adapter``). ``eta`` is recorded for reference: the
scales already account for it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .adapters import ADAPTER_WEIGHTS, load_adapter
from .boosting import combine_scores
from .choices import flatten
from .data import DataError, Example
from .rundir import RunDir, RunDirError
from .scoring import ChoiceScorer, predict_scores

log = logging.getLogger(__name__)

__all__ = [
    "EnsembleError", "probabilities", "combine_probabilities",
    "ensemble_log_loss", "fit_ensemble_weights", "cross_fitted_weights", "fit_group_weights",
    "validate_ensemble_spec",
    "task_entry", "write_ensemble_json", "read_ensemble_json", "records_to_examples",
    "EnsembleModel",
]

class EnsembleError(ValueError):
    """A malformed ensemble specification or an ensemble that cannot be used; the message names
    the field, task or adapter at fault."""


# ----------------------------------------------------------------------------------------------
# Combining outputs
# ----------------------------------------------------------------------------------------------

def probabilities(scores_per_example: Sequence) -> list[np.ndarray]:
    """Softmax over each example's choices (``choices.Choices``), one vector per example."""
    if not len(scores_per_example):
        return []
    z, layout = flatten(scores_per_example)
    return layout.split(layout.softmax(z))


def combine_probabilities(member_probs: Sequence[Sequence[np.ndarray]],
                          weights: Sequence[float]) -> list[np.ndarray]:
    """Probability-space mixture: per example, ``Σ_k w_k · member_probs[k][i]``."""
    return combine_scores(member_probs, weights)


def _gold_matrix(member_probs: Sequence[Sequence[np.ndarray]], gold: Sequence[int]) -> np.ndarray:
    """A[i, k] = p_k(gold_i | s_i), validated."""
    m = len(member_probs)
    if m == 0:
        raise ValueError("no ensemble members")
    n = len(gold)
    A = np.empty((n, m), dtype=np.float64)
    for k, probs in enumerate(member_probs):
        if len(probs) != n:
            raise ValueError(f"member {k} has probabilities for {len(probs)} examples, gold has "
                             f"{n} (member_probs is indexed [member][example])")
        for i, (p, g) in enumerate(zip(probs, gold)):
            p = np.asarray(p, dtype=np.float64)
            if not 0 <= g < len(p):
                raise ValueError(f"example {i}: gold index {g} outside 0..{len(p) - 1}")
            if np.any(p < -1e-9) or abs(p.sum() - 1.0) > 1e-4:
                raise ValueError(f"member {k}, example {i}: not a probability vector ({p})")
            A[i, k] = p[g]
    return A


def ensemble_log_loss(member_probs: Sequence[Sequence[np.ndarray]], gold: Sequence[int],
                      weights: Sequence[float], eps: float = 1e-12) -> float:
    """Mean over examples of ``-log Σ_k w_k p_k(gold)``."""
    A = _gold_matrix(member_probs, gold)
    return float(-np.mean(np.log(np.maximum(A @ np.asarray(weights, np.float64), eps))))


def fit_ensemble_weights(member_probs: Sequence[Sequence[np.ndarray]], gold: Sequence[int],
                         start: int, *, method: str = "slsqp", max_iter: int = 500,
                         tol: float = 1e-10, eps: float = 1e-12) -> np.ndarray:
    """Weights w on the simplex (w >= 0, Σ w = 1) over m members minimizing
    ``L(w) = -1/n Σ_i log Σ_k w_k p_k(gold_i | s_i)`` (Algorithm 2, last step).

    ``member_probs[k][i]`` is member k's probability vector over example i's choices (softmax of
    its scores); ``gold[i]`` the gold index; ``start`` the member to start from (the task's own
    group): the optimization starts at that one-hot, and the result is never worse than it.
    L is convex (−log of a linear function), so any local minimum is global.

    ``method``: ``"slsqp"`` (scipy, with the analytic gradient) or ``"eg"`` (exponentiated
    gradient, started from the one-hot smoothed by 1e-3 since multiplicative updates cannot
    leave a face of the simplex). Without validation examples the one-hot is returned.
    """
    m = len(member_probs)
    if m == 0:
        raise ValueError("fit_ensemble_weights: no members")
    if not 0 <= start < m:
        raise ValueError(f"fit_ensemble_weights: start {start} outside 0..{m - 1}")
    w0 = np.zeros(m)
    w0[start] = 1.0
    if m == 1 or len(gold) == 0:
        return w0
    A = _gold_matrix(member_probs, gold)
    n = A.shape[0]

    def loss(w):
        return float(-np.mean(np.log(np.maximum(A @ w, eps))))

    def grad(w):
        return -(A / np.maximum(A @ w, eps)[:, None]).sum(0) / n

    if method == "slsqp":
        from scipy.optimize import minimize

        res = minimize(loss, w0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                     "jac": lambda w: np.ones_like(w)}],
                       options={"maxiter": max_iter, "ftol": tol})
        w = res.x
        if not res.success:
            log.info("SLSQP did not converge (%s); using its last iterate", res.message)
    elif method == "eg":
        w = 0.999 * w0 + 0.001 / m
        lr = 1.0
        prev = loss(w)
        for _ in range(max_iter):
            g = grad(w)
            cand = w * np.exp(-lr * (g - g.min()))
            cand /= cand.sum()
            cur = loss(cand)
            if cur > prev + 1e-15:  # backtrack
                lr *= 0.5
                if lr < 1e-8:
                    break
                continue
            w, done = cand, prev - cur < tol
            prev = cur
            if done:
                break
    else:
        raise ValueError(f"fit_ensemble_weights: unknown method {method!r} (slsqp | eg)")
    w = np.clip(np.nan_to_num(np.asarray(w, np.float64), nan=0.0), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else w0
    w[w < 1e-12] = 0.0
    w /= w.sum()
    return w if loss(w) <= loss(w0) + 1e-12 else w0


def cross_fitted_weights(member_probs: Sequence[Sequence[np.ndarray]], gold: Sequence[int],
                         start: int, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The weights of :func:`fit_ensemble_weights`, kept only if they predict examples they
    were not fitted on better than the task's own group alone: the validation examples are cut
    into ``folds`` seeded folds, weights are fitted on all but one and scored (log loss) on it,
    and the held-out losses summed over the folds are compared with the own group's (the
    one-hot on ``start``). The fitted weights win only with a lower held-out loss; otherwise
    the one-hot is returned. A handful of validation examples can make any mixture look good
    in-sample (a member that is pure noise included); held out, it does not.

    Returns (weights, a JSON-able record: the held-out losses and which won)."""
    m, n = len(member_probs), len(gold)
    onehot = np.zeros(m)
    onehot[start] = 1.0
    fitted = fit_ensemble_weights(member_probs, gold, start)
    k = min(folds, n)
    if m == 1 or k < 2 or np.array_equal(fitted, onehot):
        return fitted, {"folds": k, "kept": "fitted" if m > 1 else "one group"}
    order = np.random.default_rng(seed).permutation(n)
    held_fit = held_own = 0.0
    for f in range(k):
        out = order[f::k]
        keep = np.setdiff1d(order, out)
        w = fit_ensemble_weights([[p[i] for i in keep] for p in member_probs],
                                 [gold[i] for i in keep], start)
        part = [[p[i] for i in out] for p in member_probs]
        g = [gold[i] for i in out]
        held_fit += ensemble_log_loss(part, g, w) * len(out)
        held_own += ensemble_log_loss(part, g, onehot) * len(out)
    win = held_fit < held_own
    return (fitted if win else onehot), {
        "folds": k, "held_out_loss_fitted": held_fit / n, "held_out_loss_own": held_own / n,
        "kept": "fitted" if win else "own group"}


def fit_group_weights(member_probs: Mapping[str, Sequence[Sequence[np.ndarray]]],
                      gold: Mapping[str, Sequence[int]], m: int) -> np.ndarray:
    """One weight per group for all tasks, as the paper's Algorithm 2 returns: w on the
    simplex minimizing the mean over every task's validation examples of −log Σ_k w_k p_k.
    ``member_probs[task][k]`` are group k's probability vectors on the task's examples. Starts
    from uniform weights (no task's own group is everyone's)."""
    from scipy.optimize import minimize

    rows = np.concatenate([_gold_matrix(member_probs[t], gold[t]) for t in member_probs
                           if len(gold[t])], axis=0)
    if rows.shape[0] == 0 or m == 1:
        return np.full(m, 1.0 / m)
    n = rows.shape[0]
    loss = lambda w: float(-np.mean(np.log(np.maximum(rows @ w, 1e-12))))  # noqa: E731
    grad = lambda w: -(rows / np.maximum(rows @ w, 1e-12)[:, None]).sum(0) / n  # noqa: E731
    res = minimize(loss, np.full(m, 1.0 / m), jac=grad, method="SLSQP",
                   bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0,
                                 "jac": lambda w: np.ones_like(w)}],
                   options={"maxiter": 500, "ftol": 1e-10})
    w = np.clip(np.nan_to_num(res.x, nan=0.0), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)
    w[w < 1e-12] = 0.0
    return w / w.sum()


# ----------------------------------------------------------------------------------------------
# ensemble.json
# ----------------------------------------------------------------------------------------------

def validate_ensemble_spec(spec: Mapping) -> None:
    """Raise EnsembleError naming the field at fault unless ``spec`` follows the schema."""
    if not isinstance(spec, Mapping):
        raise EnsembleError("ensemble spec: expected a JSON object")
    for key in ("base_model", "max_length", "tasks", "groups"):
        if key not in spec:
            raise EnsembleError(f"ensemble spec: missing field {key!r}")
    groups = spec["groups"]
    if not isinstance(groups, list) or not groups:
        raise EnsembleError("ensemble spec: 'groups' must be a non-empty list")
    m = len(groups)
    for g, grp in enumerate(groups):
        members = grp.get("members") if isinstance(grp, Mapping) else None
        if not isinstance(members, list) or not members:
            raise EnsembleError(f"ensemble spec: groups[{g}].members must be a non-empty list")
        for j, mem in enumerate(members):
            if not isinstance(mem, Mapping) or not isinstance(mem.get("adapter"), str):
                raise EnsembleError(f"ensemble spec: groups[{g}].members[{j}].adapter must be a "
                                    "path")
            for key, what in (("sha256", "weights"), ("config_sha256", "config")):
                sha = mem.get(key)
                if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
                    raise EnsembleError(f"ensemble spec: groups[{g}].members[{j}].{key} must "
                                        f"be the 64 hex digits of the adapter {what}' sha256")
            if not isinstance(mem.get("scale", 1.0), (int, float)):
                raise EnsembleError(f"ensemble spec: groups[{g}].members[{j}].scale must be a "
                                    "number")
    tasks = spec["tasks"]
    if not isinstance(tasks, Mapping) or not tasks:
        raise EnsembleError("ensemble spec: 'tasks' must be a non-empty mapping")
    for name, t in tasks.items():
        where = f"ensemble spec: tasks.{name}"
        if not isinstance(t, Mapping):
            raise EnsembleError(f"{where}: expected an object")
        for key in ("group", "weights", "template"):
            if key not in t:
                raise EnsembleError(f"{where}: missing field {key!r}")
        if not isinstance(t["group"], int) or not 0 <= t["group"] < m:
            raise EnsembleError(f"{where}.group = {t['group']!r}, expected 0..{m - 1}")
        w = t["weights"]
        if (not isinstance(w, list) or len(w) != m
                or any(not isinstance(x, (int, float)) for x in w)):
            raise EnsembleError(f"{where}.weights must be a list of {m} numbers (one per group), "
                                f"got {w!r}")
        if min(w) < -1e-9 or abs(sum(w) - 1.0) > 1e-6:
            raise EnsembleError(f"{where}.weights must be nonnegative and sum to one, got {w}")
        has_choices = t.get("choices") is not None
        has_fields = t.get("choice_fields") is not None
        if has_choices == has_fields:
            raise EnsembleError(f"{where}: set exactly one of 'choices' and 'choice_fields'")


def task_entry(task_config, group: int, weights: Sequence[float],
               choice_mode: str | None = None) -> dict:
    """The ``tasks`` entry of one task from its (builtin or user) TaskConfig: group, weights and
    everything needed to format raw records like training did."""
    from .data import resolve_task

    cfg = resolve_task(task_config)
    entry: dict[str, Any] = {"group": int(group), "weights": [float(x) for x in weights],
                             "template": cfg.template}
    if cfg.choices is not None:
        entry["choices"] = list(cfg.choices)
    else:
        entry["choice_fields"] = list(cfg.choice_fields)
        entry["choice_template"] = cfg.choice_template
    if cfg.builtin:
        entry["builtin"] = cfg.builtin
    if cfg.label_values is not None:
        entry["label_values"] = list(cfg.label_values)
    from .data import choice_labels
    entry["labels"] = choice_labels(cfg)  # each choice in the task's own labels
    if choice_mode is not None:
        entry["choice_mode"] = choice_mode
    return entry


def write_ensemble_json(path, *, base_model, tasks: Mapping[str, Mapping],
                        groups: Sequence[Mapping], max_length: int, choice_mode: str = "auto",
                        base_fingerprint: dict | None = None, eta: float | None = None,
                        **extra) -> str:
    """Validate and write ``ensemble.json`` (a local path or fsspec URL) through a temporary
    file renamed into place; returns the content sha256. ``base_model`` is a ModelConfig or
    its dict; ``extra`` fields (e.g. metrics) are stored as given."""
    from .storage import atomic_write_bytes

    if hasattr(base_model, "model_dump"):
        base_model = base_model.model_dump(mode="json")
    spec = {"base_model": dict(base_model), "base_fingerprint": base_fingerprint,
            "max_length": int(max_length), "choice_mode": choice_mode,
            "tasks": {k: dict(v) for k, v in tasks.items()},
            "groups": [dict(g) for g in groups], **extra}
    if eta is not None:
        spec["eta"] = float(eta)
    validate_ensemble_spec(spec)
    data = json.dumps(spec, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(str(path), data.encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def read_ensemble_json(path) -> dict:
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as f:
            spec = json.loads(f.read())
    except FileNotFoundError:
        raise EnsembleError(f"ensemble file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise EnsembleError(f"{path}: not valid JSON ({e})") from None
    try:
        validate_ensemble_spec(spec)
    except EnsembleError as e:
        raise EnsembleError(f"{path}: {e}") from None
    return spec


# ----------------------------------------------------------------------------------------------
# Raw records -> examples
# ----------------------------------------------------------------------------------------------

def _preprocess_builtin(builtin: str | None, records: list[dict], task: str) -> list[dict]:
    """A builtin task's record preprocessing (``data.preprocess_records``), its errors counted
    in records."""
    from .data import preprocess_records

    try:
        return preprocess_records(builtin, records)
    except DataError as e:  # builtin messages start "line <number>: "; ours count records
        msg = str(e)
        msg = "record " + msg[len("line "):] if msg.startswith("line ") else msg
        raise DataError(f"task {task!r}: {msg}") from None


def records_to_examples(task: str, entry: Mapping, records: Sequence[Mapping]) -> list[Example]:
    """Format raw records (dicts) with a task's template and choices, as in training
    (``data.format_record``). The label is a placeholder (0): predictions do not need it."""
    from .data import format_record

    recs = _preprocess_builtin(entry.get("builtin"), [dict(r) for r in records], task)
    out = []
    for i, rec in enumerate(recs):
        if not isinstance(rec, Mapping):
            raise DataError(f"task {task!r}: record {i} is a {type(rec).__name__}, expected a "
                            "mapping of field names to values")
        prompt, choices = format_record(entry["template"], entry.get("choices"),
                                        entry.get("choice_fields"),
                                        entry.get("choice_template", " {choice}"), rec,
                                        f"task {task!r}: record {i}")
        out.append(Example(task, "predict", str(i), prompt, choices, 0))
    return out


# ----------------------------------------------------------------------------------------------
# The ensemble as a predictor
# ----------------------------------------------------------------------------------------------

def _adapter_name(path: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).name) or "adapter"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _member_paths(rd: RunDir, spec: dict) -> dict[str, Path]:
    """The member adapters ensemble.json names (each once, in order) -> the local directory
    PEFT loads it from, each checked: inside the run directory (no link out of it), a PEFT
    adapter, and its weights and config the ones the ensemble was fitted with (their sha256,
    where ensemble.json pins them). A run directory at a URL is read through the local cache,
    one download per content (``RunDir.fetch``)."""
    from .adapters import ADAPTER_CONFIG
    from .rundir import inside
    from .storage import file_sha256

    paths: dict[str, Path] = {}
    for g, grp in enumerate(spec["groups"]):
        where = f"groups[{g}] ({grp.get('name', g)})"
        for mem in grp["members"]:
            if mem["adapter"] in paths:
                continue
            pins = {name: mem[key] for key, name in (("sha256", ADAPTER_WEIGHTS),
                                                      ("config_sha256", ADAPTER_CONFIG))
                    if mem.get(key) is not None}
            try:
                if rd.is_local:
                    p = rd.local(rd.resolve(mem["adapter"]))
                    if p.exists():
                        for f in (p, p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS):
                            inside(f, rd.local(rd.url))
                else:
                    p = rd.fetch(mem["adapter"], pins)
            except RunDirError as e:
                raise EnsembleError(f"{rd.ensemble}: {where}: {e}") from None
            if not (p / ADAPTER_CONFIG).is_file():
                raise EnsembleError(f"{where}: adapter {mem['adapter']!r} not found at {p}")
            for name, sha in pins.items():  # the files the ensemble was fitted with
                f = p / name
                found = file_sha256(str(f)) if f.is_file() else None
                if found != sha:
                    raise EnsembleError(
                        f"{rd.ensemble}: {where}: adapter {mem['adapter']!r}: {f} "
                        + ("is missing" if found is None else "has changed since the "
                           "ensemble was fitted (sha256 differs)"))
            paths[mem["adapter"]] = p
    return paths


def _check_base(rd: RunDir, mcfg, expected: dict, cache_dir) -> None:
    """The base model's name and weights digest, as ``models.load_base`` records them, from
    the materialized files, against those the ensemble was trained on."""
    from .models import materialize_base, weights_digest

    src, _ = materialize_base(mcfg, cache_dir)
    found = {"name": mcfg.name, "weights_sha256": weights_digest(src)}
    diff = [k for k in found if expected.get(k) is not None and found[k] is not None
            and found[k] != expected[k]]
    if diff:
        raise EnsembleError(
            f"{rd.ensemble}: the base model {mcfg.name!r} differs from the one the ensemble was "
            f"trained on: " + ", ".join(f"{k} {found[k]!r} vs {expected[k]!r}" for k in diff))


class EnsembleModel:
    """The output of a run: one base model, every adapter of every group ensemble loaded under
    its own name in a single PeftModel, and per-task weights over the groups.

    ``predict(task, items)`` computes, for every group g with a nonzero weight for the task,
    ``h_g = Σ_members scale · h_member`` (score space), ``p_g = softmax(h_g)`` over each
    example's choices, and ``p = Σ_g w_g p_g``.
    """

    def __init__(self, model, tokenizer, spec: dict, run_dir,
                 adapter_names: dict[str, str]):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.run_dir = RunDir(str(run_dir))
        self.adapter_names = adapter_names  # adapter path (as in the spec) -> PEFT adapter name
        self.version: str | None = None  # the version loaded (None: a run without versions)
        # score every member of the groups a task uses in one forward pass per batch
        # (ensemble_core/members.py); False: one pass per member (the same outputs, to fp32
        # rounding)
        self.one_pass = True

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, run_dir, cache_dir=None, *, device: str | None = None,
                        check_fingerprint: bool = True, trust_remote_code: bool = False,
                        version: str | None = None) -> "EnsembleModel":
        """Read ``run_dir/ensemble.json``, load the base model once (``models.load_base``) and
        every adapter under a distinct name. ``run_dir`` is a local path or any fsspec URL
        (adapters of a remote run are read through the local cache: ``RunDir.fetch``); every
        adapter path must lie inside the run directory.

        The run's files are data, not authority: whether a model's own code may run
        (``trust_remote_code``) is the caller's to say (default: no), whatever ensemble.json
        says, and the base model's fingerprint recorded there is checked before the model is
        loaded (a missing fingerprint is an error unless ``check_fingerprint=False``).

        A run directory with versions (``ensemble_core/versions.py``) loads its current
        version, or ``version`` when named; one without loads its own ensemble.json."""
        from .config import ModelConfig
        from .models import load_base
        from .versions import resolve

        from .versions import VersionError, check_files

        vid, where = resolve(run_dir, version)
        rd = RunDir(where)
        if vid is not None:  # every file the version pins, before any is read
            try:
                check_files(where)
            except VersionError as e:
                raise EnsembleError(str(e)) from None
        spec = read_ensemble_json(rd.ensemble)
        try:
            mcfg = ModelConfig.model_validate(spec["base_model"])
        except Exception as e:
            raise EnsembleError(f"{rd.ensemble}: base_model: {e}") from None
        mcfg.trust_remote_code = bool(trust_remote_code)
        if device is not None:
            mcfg.device = device
        paths = _member_paths(rd, spec)
        expected = spec.get("base_fingerprint")
        if check_fingerprint and not expected:
            raise EnsembleError(f"{rd.ensemble}: no base_fingerprint: the base model cannot be "
                                "checked (load with check_fingerprint=False to accept that)")
        if check_fingerprint:  # before any of the model's files is loaded
            _check_base(rd, mcfg, expected, cache_dir)
        base, tok, record = load_base(mcfg, cache_dir)
        fp = record if check_fingerprint else None
        taken: set[str] = set()
        names = {p: _adapter_name(p, taken) for p in paths}
        model = None
        for p, local in paths.items():
            target = base if model is None else model
            model = load_adapter(target, local, adapter_name=names[p], base_fingerprint=fp)
        model.eval()
        out = cls(model, tok, spec, rd.url, names)
        out.version = vid
        return out

    # -- introspection --------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.spec["tasks"])

    @property
    def groups(self) -> list[dict]:
        return self.spec["groups"]

    def weights(self, task: str) -> np.ndarray:
        return np.asarray(self._task(task)["weights"], dtype=np.float64)

    def _task(self, task: str) -> dict:
        try:
            return self.spec["tasks"][task]
        except KeyError:
            raise EnsembleError(f"unknown task {task!r}; the ensemble knows "
                                f"{sorted(self.spec['tasks'])}") from None

    # -- prediction -----------------------------------------------------------------------
    def examples(self, task: str, items: Sequence) -> list[Example]:
        """Example objects as given; raw records formatted with the task's template."""
        entry = self._task(task)
        items = list(items)
        if all(isinstance(x, Example) for x in items):
            return items
        if any(isinstance(x, Example) for x in items):
            raise EnsembleError(f"task {task!r}: pass either Example objects or raw records, "
                                "not a mix")
        return records_to_examples(task, entry, items)

    def _mode(self, task: str) -> str:
        return self._task(task).get("choice_mode") or self.spec.get("choice_mode") or "auto"

    @torch.no_grad()
    def member_scores(self, task: str, examples: Sequence[Example], adapter: str,
                      batch_size: int = 16) -> list[np.ndarray]:
        """h_c(s) of one member adapter (its path as in ensemble.json) for every example."""
        self.model.set_adapter(self.adapter_names[adapter], inference_mode=True)
        return predict_scores(self.model, self.tokenizer, examples, self.spec["max_length"],
                              batch_size, self._mode(task))

    def group_probabilities(self, task: str, examples: Sequence[Example], batch_size: int = 16,
                            groups: Sequence[int] | None = None) -> dict[int, list[np.ndarray]]:
        """p_g per example for the given groups (default: all): softmax of the group
        ensemble's score-space sum ``Σ scale · h_member``."""
        from .members import score_members

        groups = list(range(len(self.groups)) if groups is None else groups)
        paths = list(dict.fromkeys(m["adapter"] for g in groups
                                   for m in self.groups[g]["members"]))
        if self.one_pass:  # every member in one pass over the base (ensemble_core/members.py)
            scorer = ChoiceScorer(self.tokenizer, self.spec["max_length"], self._mode(task))
            by_name = score_members(self.model, scorer, examples,
                                    [self.adapter_names[p] for p in paths], batch_size)
            cache = {p: by_name[self.adapter_names[p]] for p in paths}
        else:
            cache = {p: self.member_scores(task, examples, p, batch_size) for p in paths}
        out = {}
        for g in groups:
            members = self.groups[g]["members"]
            out[g] = probabilities(combine_scores([cache[m["adapter"]] for m in members],
                                                  [float(m.get("scale", 1.0)) for m in members]))
        return out

    def predict_proba(self, task: str, items: Sequence, batch_size: int = 16
                      ) -> list[np.ndarray]:
        examples = self.examples(task, items)
        if not examples:
            return []
        w = self.weights(task)
        used = [g for g in range(len(w)) if w[g] > 0]
        probs = self.group_probabilities(task, examples, batch_size, used)
        return combine_probabilities([probs[g] for g in used], [w[g] for g in used])

    def labels(self, task: str, n_choices: int) -> list:
        """Each choice in the task's own labels: its label_values entry, the first raw value
        its label_map maps to it, its threshold range (``data.choice_labels``), or its index."""
        entry = self._task(task)
        labels = entry.get("labels") or entry.get("label_values")
        return list(labels) if labels and len(labels) == n_choices else list(range(n_choices))

    def predict(self, task: str, items: Sequence, batch_size: int = 16) -> list[dict]:
        """One dict per example: ``label`` (the most probable choice in the task's own labels,
        :meth:`labels`), ``choice`` (its index), ``continuation`` (its text) and
        ``probabilities`` (per choice, keyed by label, as strings: JSON object keys)."""
        examples = self.examples(task, items)
        probs = self.predict_proba(task, examples, batch_size)
        out = []
        for ex, p in zip(examples, probs):
            k = int(np.argmax(p))
            labels = self.labels(task, len(ex.choices))
            out.append({"label": labels[k], "choice": k, "continuation": ex.choices[k],
                        "probabilities": {str(lab): float(x) for lab, x in zip(labels, p)}})
        return out


def predict_file(run_dir, task: str, input_url: str, output_url: str | None = None, *,
                 version: str | None = None, fmt: str = "auto", batch_size: int = 16,
                 chunk: int = 256, cache_dir=None, device: str | None = None,
                 progress=None) -> dict:
    """Batch inference: every record of a csv/tsv/jsonl/parquet file at any fsspec URL
    (``data.read_records``) predicted with the run's current version (or ``version``), written
    as jsonl beside it (``<input>.predictions.jsonl``, or ``output_url``) through a temporary
    file renamed into place. One line per record: its row number (``index``, from 0) and
    :meth:`EnsembleModel.predict`'s fields. Returns ``{"output", "records", "version"}``."""
    from .data import read_records
    from .storage import atomic_write_bytes

    records = read_records(input_url, fmt)
    model = EnsembleModel.from_pretrained(run_dir, cache_dir, device=device, version=version)
    model.examples(task, records)  # every record checked (task, template fields) before work
    out_url = output_url or f"{input_url}.predictions.jsonl"
    lines = []
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        for i, p in enumerate(model.predict(task, part, batch_size=batch_size)):
            lines.append(json.dumps({"index": start + i, **p}) + "\n")
        if progress is not None:
            progress(min(start + chunk, len(records)), len(records), task)
    atomic_write_bytes(out_url, "".join(lines).encode())
    return {"output": out_url, "records": len(records), "version": model.version}
