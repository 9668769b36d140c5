"""``random-groups``: the grouping's sizes with the tasks assigned at random (seeded by the
run's seed): is the affinity worth computing?"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import Baseline, register_baseline


def random_grouping(tasks: Sequence[str], sizes: Sequence[int], seed: int) -> list[list[str]]:
    """The tasks in a seeded random order, cut into groups of the given sizes."""
    if sum(sizes) != len(tasks):
        raise ValueError(f"group sizes {list(sizes)} do not add up to {len(tasks)} tasks")
    order = [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))]
    out, start = [], 0
    for n in sizes:
        out.append(order[start:start + n])
        start += n
    return out


@register_baseline
class RandomGroups(Baseline):
    name = "random-groups"
    label = "random groups (same sizes), own group's adapter"
    config = ("seed",)

    def plan(self, run, groups, features):
        sizes = [len(g) for g in groups]
        return {f"random-{k}": g for k, g in enumerate(
            random_grouping(run.task_names, sizes, run.cfg.seed))}
