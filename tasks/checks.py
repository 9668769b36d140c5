"""The paper's checks as Prefect tasks (not stages of a run: nothing later reads them)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ensemble_core.run import Run

from .common import ProgressReporter


@task(name="check_estimates", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="check-estimates",
      persist_result=True, result_serializer="json")
def check_estimates(run: Run, features: dict, subsets: list, r: int,
                    dims: list[int] | None = None, test_examples: int | None = None) -> dict:
    """The paper's Table 3 (``checks.check_estimates``): r subsets fine-tuned for real against
    their first-order estimates; estimate_check.json."""
    from ensemble_core import checks

    progress = ProgressReporter("check-estimates")
    return checks.check_estimates(run, features, subsets, r, seed=run.cfg.seed,
                                  progress=progress, dims=dims,
                                  test_examples=test_examples).to_json()
