"""The run report: Markdown with the accuracy table, the groups, compute, and an affinity heatmap."""
from __future__ import annotations

import io

import numpy as np

from .affinity import Affinity
from .storage import atomic_write_bytes, join


def accuracy_rows(metrics: dict) -> list[list]:
    rows = []
    for t, m in metrics["tasks"].items():
        rows.append([t, m["n_test"], f"group-{m['group']}", 100 * m["baseline_accuracy"],
                     100 * m["group_accuracy"], 100 * m["ensemble_accuracy"]])
    a = metrics["average"]
    rows.append(["average", sum(m["n_test"] for m in metrics["tasks"].values()), "",
                 100 * a["baseline_accuracy"], 100 * a["group_accuracy"],
                 100 * a["ensemble_accuracy"]])
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


def write_report(run_dir: str, name: str, metrics: dict, aff: Affinity, groups: dict,
                 boosting: list[dict], linearity: dict | None) -> dict:
    png_sha = atomic_write_bytes(join(run_dir, "affinity.png"), heatmap_png(aff))
    c = metrics["compute"]
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
            [[b["step"], b["group"], f"{b['train_loss_before']:.4f}",
              f"{b['train_loss_after']:.4f}", b["accepted"]] for b in boosting]))
    else:
        lines.append("No boosting steps.")
    lines += ["", "## Compute", "", markdown_table(["part", "seconds"], [
        [k, f"{v:.1f}"] for k, v in c.items() if k.endswith("_s")]),
        "", f"Ensemble pipeline / single-adapter baseline compute: "
            f"**{c.get('ratio', float('nan')):.2f}×** (stages 1–2, group adapters and boosting, "
            f"against the baseline's fine-tuning; wall time on this machine)."]
    if linearity:
        lines += ["", "## First-order check", "", markdown_table(
            ["relative distance", "relative error"],
            [[f"{100 * r['relative_distance']:.2f}%", f"{100 * r['relative_error']:.4f}%"]
             for r in linearity["results"]])]
    text = "\n".join(lines) + "\n"
    sha = atomic_write_bytes(join(run_dir, "report.md"), text.encode())
    return {"path": join(run_dir, "report.md"), "sha256": sha, "markdown": text,
            "heatmap": {"path": join(run_dir, "affinity.png"), "sha256": png_sha}}
