"""Stage 4: group adapters — one adapter per group (Algorithm 2), the single adapter on all
tasks, the baselines' adapters, and θ* saved as an adapter (a boosting member)."""
from __future__ import annotations

from typing import Sequence

from ..records import AdapterRecord, AdapterRecords
from ..run import Run
from ..rundir import THETA_STAR
from ..runtime import cache_path, on_device
from .declaration import MODEL, stage

__all__ = ["train_group", "train_groups", "save_theta_star", "adapter_record"]


def adapter_record(run: Run, name: str, tasks, train=None) -> AdapterRecord:
    """The record of the adapter ``name`` as saved in the run directory."""
    from ..storage import file_sha256

    return AdapterRecord(name, list(tasks), run.dir.relative(run.dir.adapter(name)),
                         file_sha256(run.dir.adapter_weights(name)), train)


@stage(4, "train", config=MODEL + ("training",), reads=lambda name, tasks, start=None: tasks,
       returns=AdapterRecord)
@on_device
def train_group(run: Run, name: str, tasks: Sequence[str], start: AdapterRecord | None = None,
                progress=None) -> AdapterRecord:
    """Fine-tune one adapter on the union of the given tasks (a group, or all tasks: the
    single-adapter baseline; the baselines' adapters), from θ* or, with ``start``, from that
    adapter's weights (MTL-FT's second phase)."""
    from ..adapters import load_weights, save_adapter
    from ..models import load_model
    from ..training import train_adapter

    cfg = run.cfg
    lm = load_model(cfg, cache_path(cfg))  # a fresh θ*: training changes it
    if start is not None:
        load_weights(lm.model, run.dir.fetch(start.path, start.pins))
    # an epoch-0 validation only for a start other than θ* (MTL-FT's second phase): at θ*
    # every adapter scores what the base model scores (stage 5 scores θ* on every task's
    # validation split when it is a boosting member); the best epoch is chosen among the
    # trained epochs either way
    result = train_adapter(lm.model, lm.tokenizer, run.examples(tasks, "train"),
                           run.examples(tasks, "validation"), cfg.training, cfg.model.max_length,
                           cfg.model.choice_mode, progress=progress,
                           validate_initial=start is not None)
    with run.dir.writing_dir(run.dir.adapter(name)) as out:
        save_adapter(lm.model, out, result, base_fingerprint=lm.fingerprint["base"])
    return adapter_record(run, name, tasks, result.summary())


@stage(4, "train-together", config=MODEL + ("training",),
       reads=lambda plans: [t for _, tasks in plans for t in tasks], returns=AdapterRecords)
@on_device
def train_groups(run: Run, plans: Sequence[tuple[str, Sequence[str]]]) -> AdapterRecords:
    """``training.one_pass``: the adapters of ``plans`` ((name, tasks) each: the groups, the
    single adapter, the baselines' that start from θ*) trained together from θ*, each step's
    batches of all of them in one forward and backward pass over the base
    (``members.train_adapters``; docs/design.md, "All members in one pass"). Each adapter is
    trained as :func:`train_group` trains it alone — its own batches, optimizer, schedule and
    best epoch — and saved the same way; the weights equal to fp32 rounding."""
    import torch

    from ..adapter_kinds import adapter_kind
    from ..adapters import save_adapter
    from ..members import adapter_parameters, train_adapters
    from ..models import load_model

    cfg = run.cfg
    lm = load_model(cfg, cache_path(cfg))  # a fresh θ* ("default"), copied into each adapter
    theta = [p.detach().clone() for p in adapter_parameters(lm.model, "default")]
    names = {}
    for k, (name, _) in enumerate(plans):
        names[name] = f"train-{k}"  # PEFT adapter names (a run's names may hold dots)
        lm.model.add_adapter(names[name], adapter_kind(cfg.adapter).peft_config(cfg.adapter))
        with torch.no_grad():
            for p, v in zip(adapter_parameters(lm.model, names[name]), theta, strict=True):
                p.copy_(v)
    results = train_adapters(
        lm.model, lm.tokenizer,
        {names[n]: (run.examples(tasks, "train"), run.examples(tasks, "validation"))
         for n, tasks in plans}, cfg.training, cfg.model.max_length, cfg.model.choice_mode,
        validate_initial=False)
    out = []
    for name, tasks in plans:
        with run.dir.writing_dir(run.dir.adapter(name)) as d:
            save_adapter(lm.model, d, results[names[name]], adapter_name=names[name],
                         base_fingerprint=lm.fingerprint["base"])
        out.append(adapter_record(run, name, tasks, results[names[name]].summary()))
    return AdapterRecords(out)


@stage(4, "theta-star", config=MODEL, returns=AdapterRecord)
@on_device
def save_theta_star(run: Run) -> AdapterRecord:
    """The fresh adapter θ* as a PEFT adapter: boosting members use it to add a boosting
    adapter's change h_k − h0 (with the standard B = 0 init it is exactly the base model)."""
    from ..adapters import save_adapter
    from ..models import load_model

    lm = load_model(run.cfg, cache_path(run.cfg))
    with run.dir.writing_dir(run.dir.adapter(THETA_STAR)) as out:
        save_adapter(lm.model, out, None, base_fingerprint=lm.fingerprint["base"])
    return adapter_record(run, THETA_STAR, [])
