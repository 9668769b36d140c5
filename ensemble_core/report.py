"""Stage 6, the run report: Markdown with the accuracy table, the groups, boosting, compute, the
first-order check and the affinity heatmap (report.md, affinity.png)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .affinity import Affinity
from .baselines import baseline_label
from .records import FileRef, Metrics


def accuracy_rows(metrics: Metrics) -> list[list]:
    rows = []
    for t, m in metrics.tasks.items():
        rows.append([t, m.n_test, f"group-{m.group}", 100 * m.majority,
                     100 * m.baseline_accuracy, 100 * m.group_accuracy,
                     100 * m.ensemble_accuracy])
    a = metrics.average
    rows.append(["average", sum(m.n_test for m in metrics.tasks.values()), "", 100 * a.majority,
                 100 * a.baseline_accuracy, 100 * a.group_accuracy, 100 * a.ensemble_accuracy])
    return rows


ACCURACY_HEADERS = ["task", "test examples", "group", "majority class %",
                    "baseline (one adapter) %", "group adapter %", "ensemble %"]


def difference_line(metrics: Metrics) -> str:
    """The ensemble − single adapter difference of the average accuracy with its CI."""
    a = metrics.average
    return (f"Ensemble − one adapter: {100 * a.difference:+.1f} points on average (95% CI "
            f"{100 * a.difference_low:+.1f} to {100 * a.difference_high:+.1f}, paired bootstrap "
            f"over the test examples)")


def markdown_table(headers, rows) -> str:
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def heatmap_png(aff: Affinity) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = aff.n_tasks
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=110)
    im = ax.imshow(aff.matrix, cmap="viridis")
    ax.set_xticks(range(n), aff.names, rotation=45, ha="right")
    ax.set_yticks(range(n), aff.names)
    ax.set_title(f"task affinity T (eq. 1, {'−loss' if aff.metric == 'loss' else 'accuracy'})")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass(frozen=True)
class Report:
    file: FileRef  # report.md
    heatmap: FileRef  # affinity.png
    markdown: str


def inline_heatmap(report: Report) -> str:
    """The report's Markdown with the affinity heatmap inlined (a data URI): the Prefect UI
    cannot resolve the report's relative image path."""
    import base64

    from .storage import read_bytes

    try:
        png = base64.b64encode(read_bytes(report.heatmap.path)).decode()
    except Exception:
        return report.markdown
    return report.markdown.replace("](affinity.png)", f"](data:image/png;base64,{png})")


def baseline_rows(metrics: Metrics, baselines: dict) -> tuple[list[str], list[list]]:
    """The baselines beside the ensemble: test accuracy per task and on average, training
    compute (FLOPs, wall seconds), peak memory and adapter parameters."""
    tasks = list(metrics.tasks)
    headers = ["method", *tasks, "average", "train FLOPs", "train s", "peak GiB", "adapter params"]
    rows = []
    for method, r in baselines.items():
        rows.append([baseline_label(method), *[100 * r.accuracy[t] for t in tasks],
                     100 * r.average, f"{r.flops:.3g}", f"{r.wall_s:.0f}",
                     f"{r.peak_memory_bytes / 2**30:.2f}", r.adapter_parameters])
    c = metrics.compute
    rows.append(["ensemble (groups, boosting, weights)",
                 *[100 * metrics.tasks[t].ensemble_accuracy for t in tasks],
                 100 * metrics.average.ensemble_accuracy, f"{c.group_flops:.3g}",
                 f"{c.ensemble_pipeline_s:.0f}", f"{c.peak_memory_bytes / 2**30:.2f}", ""])
    return headers, rows


def write_report(run_dir, name: str, metrics: Metrics, aff: Affinity, groups: dict,
                 boosting: list, linearity, baselines: dict | None = None) -> Report:
    """Write report.md and affinity.png into the run directory (a ``rundir.RunDir``);
    ``boosting`` are ``records.BoostRecord``s, ``linearity`` a ``records.LinearityRecord`` or
    None, ``baselines`` the ``records.BaselineResult``s of the paper's baselines, if any."""
    png = run_dir.write_bytes(run_dir.affinity_png, heatmap_png(aff))
    c = metrics.compute.to_json()
    lines = [f"# EnsembleLoRA run `{name}`", "",
             "## Test accuracy", "", markdown_table(ACCURACY_HEADERS, accuracy_rows(metrics)), "",
             difference_line(metrics) + ".", "", "## Groups", ""]
    for g in groups["groups"]:
        lines.append(f"- group-{g['id']}: {', '.join(g['tasks'])}")
    lines += ["", "## Task affinity", "", "![task affinity](affinity.png)", "",
              markdown_table(["i \\ j"] + aff.names,
                             [[a] + [float(v) for v in row] for a, row in
                              zip(aff.names, np.round(aff.matrix, 3))]).replace(".0 |", " |"),
              "", "## Boosting", ""]
    if boosting:
        lines.append(markdown_table(
            ["step", "group", "train loss before", "train loss after", "accepted"],
            [[b.step, b.group, f"{b.train_loss_before:.4f}", f"{b.train_loss_after:.4f}",
              b.accepted] for b in boosting]))
    else:
        lines.append("No boosting steps.")
    if baselines:
        lines += ["", "## Baselines", "", markdown_table(*baseline_rows(metrics, baselines)),
                  "", "Compute of the ensemble row: its group adapters' training FLOPs and the "
                      "whole ensemble pipeline's wall time (stages 1–5)."]
    lines += ["", "## Compute", "", markdown_table(["part", "seconds"], [
        [k, f"{v:.1f}"] for k, v in c.items() if k.endswith("_s")]),
        "", f"Ensemble pipeline / single-adapter baseline compute: "
            f"**{c['ratio']:.2f}×** (stages 1–3, the group adapters of stage 4 and the boosting "
            f"of stage 5, against the baseline's fine-tuning; wall time on this machine)."]
    if linearity:
        lines += ["", "## First-order check", "", markdown_table(
            ["relative distance", "relative error"],
            [[f"{100 * r.relative_distance:.2f}%", f"{100 * r.relative_error:.4f}%"]
             for r in linearity.results])]
    text = "\n".join(lines) + "\n"
    return Report(run_dir.write_bytes(run_dir.report, text.encode()), png, text)
