"""The paper's baselines, beside the ensemble in one run (docs/design.md, "Baselines"), behind
one registry: ``evaluation.baselines`` names them.

Each is a set of adapters and, for every task, the adapter that answers it. The single adapter
on all tasks (stage 4's ``all-tasks``; the paper's main comparison) is always trained; the
others are entries of :data:`BASELINES`, one module each:

* ``per-task`` (``per_task.py``): one adapter per task, fine-tuned from θ* on that task alone
  (the n-adapter reference the paper's ensemble of m ≪ n adapters is measured against);
* ``mtl-ft`` (``mtl_ft.py``): multitask learning, then fine-tuning: the single adapter,
  fine-tuned further on each task, starting from the shared weights (the paper's Table 4);
* ``random-groups`` (``random_groups.py``): the grouping's sizes with the tasks assigned at
  random (seeded): is the affinity worth computing?
* ``gradient-groups`` (``gradient_groups.py``): tasks grouped by the cosine similarity of their
  mean loss gradients at θ* (the paper's Table 7), into as many groups as the grouping found.

An entry (:class:`Baseline`) carries its ``label`` (reports), the config fields its plan reads
(``config``: part of the plan's cache key), whether its adapters start from the single
adapter's weights (``starts_from_single``: trained after it, and its training counted in the
baseline's compute), and ``plan(run, groups, features)``: adapter name -> the tasks it is
trained on and answers. The groupings are compared through each task's own group adapter,
like the ensemble's "group adapter" column, so that only the grouping differs.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

from ..registry import Registry, RegistryError

__all__ = ["Baseline", "BASELINES", "SINGLE", "SINGLE_LABEL", "register_baseline",
           "baseline", "baseline_label", "random_grouping", "task_gradient",
           "gradient_similarity", "gradient_grouping"]

SINGLE = "single"  # the method name of the one adapter on all tasks (always trained)
SINGLE_LABEL = "one adapter on all tasks"


class Baseline:
    """A baseline method (see the package docstring)."""
    name: ClassVar[str]
    label: ClassVar[str]
    config: ClassVar[tuple[str, ...]] = ()
    starts_from_single: ClassVar[bool] = False

    def plan(self, run, groups: Sequence[Sequence[str]],
             features: Mapping) -> dict[str, list[str]]:
        """Adapter name -> its tasks. ``groups`` are the run's groups (task names),
        ``features`` stage 1's records by task (``records.FeaturesRecord``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<baseline {self.name!r}>"


def _check_entry(entry: Baseline) -> None:
    if entry.name == SINGLE:
        raise RegistryError(f"baseline name {SINGLE!r} is taken: the single adapter on all "
                            "tasks is always trained")
    if not isinstance(getattr(entry, "label", None), str):
        raise RegistryError(f"baseline {entry.name!r} needs a `label` (how reports name it)")


BASELINES: Registry[Baseline] = Registry("baseline", "evaluation.baselines", _check_entry)


def register_baseline(entry, *, replace: bool = False):
    """Register a baseline (an instance or a subclass, which is instantiated). Usable as a
    class decorator."""
    BASELINES.register(entry() if isinstance(entry, type) else entry, replace=replace)
    return entry


def baseline(name: str) -> Baseline:
    return BASELINES.get(name)


def baseline_label(name: str) -> str:
    """How reports name a method (``single`` or a registered baseline)."""
    if name == SINGLE:
        return SINGLE_LABEL
    return BASELINES.get(name).label if name in BASELINES else name


from . import gradient_groups, mtl_ft, per_task, random_groups  # noqa: E402,F401  (builtins register)
from .gradient_groups import gradient_grouping, gradient_similarity, task_gradient  # noqa: E402
from .random_groups import random_grouping  # noqa: E402
