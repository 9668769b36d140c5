"""Batch inference as a flow (and the `batch-predict` deployment of prefect.yaml): a
csv/tsv/jsonl/parquet file at any fsspec URL scored with a run directory's current version,
predictions written beside it (``ensemble_core.ensemble.predict_file``)."""
from __future__ import annotations

from prefect import flow, get_run_logger

from ensemble_core.ensemble import predict_file
from tasks.common import ProgressReporter


@flow(name="batch_predict", log_prints=True)
def batch_predict(run_dir: str, task: str, input: str, output: str | None = None,
                  version: str | None = None, batch_size: int = 16) -> dict:
    """Predict every record of ``input`` for ``task`` with the run's current version (or
    ``version``); jsonl to ``output`` (default ``<input>.predictions.jsonl``)."""
    progress = ProgressReporter(f"predict[{task}]", artifact_key=f"predict-{task.lower()}")
    res = predict_file(run_dir, task, input, output, version=version, batch_size=batch_size,
                       progress=progress)
    progress.finish()
    get_run_logger().info("%d predictions of version %s written to %s", res["records"],
                          res["version"], res["output"])
    return res
