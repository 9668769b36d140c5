"""Stage 6, the run report: Markdown with the accuracy table, the groups, boosting, compute, the
first-order check and the affinity heatmap (report.md, affinity.png)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .affinity import Affinity
from .records import FileRef, Metrics


def accuracy_rows(metrics: Metrics) -> list[list]:
    rows = []
    for t, m in metrics.tasks.items():
        rows.append([t, m.n_test, f"group-{m.group}", 100 * m.baseline_accuracy,
                     100 * m.group_accuracy, 100 * m.ensemble_accuracy])
    a = metrics.average
    rows.append(["average", sum(m.n_test for m in metrics.tasks.values()), "",
                 100 * a.baseline_accuracy, 100 * a.group_accuracy, 100 * a.ensemble_accuracy])
    return rows


ACCURACY_HEADERS = ["task", "test examples", "group", "baseline (one adapter) %",
                    "group adapter %", "ensemble %"]


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


def write_report(run_dir, name: str, metrics: Metrics, aff: Affinity, groups: dict,
                 boosting: list, linearity) -> Report:
    """Write report.md and affinity.png into the run directory (a ``rundir.RunDir``);
    ``boosting`` are ``records.BoostRecord``s, ``linearity`` a ``records.LinearityRecord`` or
    None."""
    png = run_dir.write_bytes(run_dir.affinity_png, heatmap_png(aff))
    c = metrics.compute.to_json()
    lines = [f"# EnsembleLoRA run `{name}`", "",
             "## Test accuracy", "", markdown_table(ACCURACY_HEADERS, accuracy_rows(metrics)), "",
             "## Groups", ""]
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
