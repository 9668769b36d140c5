"""``mtl-ft``: multitask learning, then fine-tuning (the paper's Table 4): the single adapter on
all tasks, fine-tuned further on each task from the shared weights."""
from __future__ import annotations

from . import Baseline, register_baseline


@register_baseline
class MTLFT(Baseline):
    name = "mtl-ft"
    label = "MTL-FT (shared adapter, then per task)"
    starts_from_single = True  # phase 2 starts from the single adapter; phase 1 is its cost

    def plan(self, run, groups, features):
        return {f"mtl-{t}": [t] for t in run.task_names}
