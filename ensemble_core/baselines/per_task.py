"""``per-task``: one adapter per task, fine-tuned from θ* on that task alone."""
from __future__ import annotations

from . import Baseline, register_baseline


@register_baseline
class PerTask(Baseline):
    name = "per-task"
    label = "one adapter per task"

    def plan(self, run, groups, features):
        return {f"task-{t}": [t] for t in run.task_names}
