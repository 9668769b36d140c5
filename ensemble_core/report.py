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
    # 0.6 inch a task up to 14 inches: a figure that grew with n took 5.6 GB to draw at
    # n = 200 and would not fit at 500 (issue 32, BENCHMARKS.md "Many datasets")
    side = min(0.6 * n, 14.0)
    fig, ax = plt.subplots(figsize=(1.0 + side, 0.8 + side), dpi=110)
    im = ax.imshow(aff.matrix, cmap="viridis")
    step = max(1, -(-n // 40))  # at most 40 task names an axis
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [aff.names[i] for i in ticks], rotation=45, ha="right",
                  fontsize=10 if step == 1 else 7)
    ax.set_yticks(ticks, [aff.names[i] for i in ticks], fontsize=10 if step == 1 else 7)
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


def inline_heatmap(report: Report, run_dir) -> str:
    """The report's Markdown with the affinity heatmap inlined (a data URI): the Prefect UI
    cannot resolve the report's relative image path."""
    import base64

    from .storage import read_bytes

    try:
        png = base64.b64encode(read_bytes(run_dir.at(report.heatmap.path))).decode()
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
                 boosting: list, linearity, baselines: dict | None = None,
                 adapters=None) -> Report:
    """Write report.md and affinity.png into the run directory (a ``rundir.RunDir``);
    ``boosting`` are ``records.BoostRecord``s, ``linearity`` a ``records.LinearityRecord`` or
    None, ``baselines`` the ``records.BaselineResult``s of the paper's baselines, if any,
    ``adapters`` the ``records.AdaptersResult`` (how far each moved; the check there)."""
    png = run_dir.write_bytes(run_dir.affinity_png, heatmap_png(aff))
    lines = [f"# EnsembleLoRA run `{name}`", "",
             "## Test accuracy", "", markdown_table(ACCURACY_HEADERS, accuracy_rows(metrics)), "",
             difference_line(metrics) + ".", ""]
    a = metrics.average
    if a.group_adapter_accuracy is not None:
        lines += [f"The group adapters alone, without their boosting members: "
                  f"{100 * a.group_adapter_accuracy:.1f}% on average (what the grouping "
                  "baselines are compared with: like for like).", ""]
    lines += ["## Groups", ""]
    for g in groups["groups"]:
        lines.append(f"- group-{g['id']}: {', '.join(g['tasks'])}")
    lines += ["", stability_line(groups.get("stability"))]
    lines += ["", "## Task affinity", "", "![task affinity](affinity.png)", "",
              "T_ij − T_ii: how much task j helps task i beyond i's average (eq. 1 with "
              f"f̂ = {'−loss' if aff.metric == 'loss' else 'accuracy'}; the SDP reads only this "
              "row-centred part), ×1000:", "",
              markdown_table(["i \\ j"] + aff.names,
                             [[r] + [float(v) for v in row] for r, row in
                              zip(aff.names, 1000 * centred_rows(aff.matrix))]),
              "", "## Boosting", ""]
    if boosting:
        lines.append(markdown_table(
            ["step", "group", "mode", "train loss before", "train loss after",
             "relative distance", "accepted"],
            [[b.step, b.group, b.mode, f"{b.train_loss_before:.4f}",
              f"{b.train_loss_after:.4f}", f"{100 * b.relative_distance:.4f}%", b.accepted]
             for b in boosting]))
    else:
        lines.append("No boosting steps.")
    if baselines:
        lines += ["", "## Baselines", "", markdown_table(*baseline_rows(metrics, baselines)),
                  "", "Compute of the ensemble row: its group adapters' training FLOPs and the "
                      "whole ensemble pipeline's wall time (stages 1–5)."]
    lines += ["", "## Compute", "", *compute_lines(metrics.compute)]
    if adapters is not None:
        lines += ["", "## How far the adapters moved", "",
                  "The paper's relative distance ‖θ − θ*‖/‖θ*_Full‖ (§2.2, Table 2: over the "
                  "whole pretrained model's norm) and the same move over the adapter's own "
                  "norm ‖θ*‖:", "", markdown_table(
                      ["adapter", "relative distance", "over the adapter's norm"],
                      [[k, f"{100 * t.relative_distance:.4f}%",
                        f"{100 * t.adapter_distance:.1f}%"]
                       for k, t in ((k, r.train) for k, r in
                                    [*adapters.groups.items(),
                                     (adapters.single.name, adapters.single)])
                       if t is not None and t.relative_distance is not None])]
    for title, lin in (("First-order check (the paper's Table 5 / Figure 2)", linearity),
                       ("First-order check at the distances the adapters moved",
                        getattr(adapters, "linearity", None))):
        if lin:
            lines += ["", f"## {title}", "", markdown_table(
                ["relative distance", "over the adapter's norm", "relative error of the margins"],
                [[f"{100 * r.relative_distance:.4f}%",
                  "-" if r.adapter_distance is None else f"{100 * r.adapter_distance:.1f}%",
                  f"{100 * r.relative_error:.4f}%"] for r in lin.results])]
    text = "\n".join(lines) + "\n"
    return Report(run_dir.write_bytes(run_dir.report, text.encode()), png, text)


def centred_rows(T) -> np.ndarray:
    """T_ij − T_ii: each row of the affinity less its diagonal (what the SDP reads)."""
    T = np.asarray(T, np.float64)
    return T - np.diag(T)[:, None]


def stability_line(stability: dict | None) -> str:
    """groups.json's stability as a sentence."""
    if not stability:
        return "Stability: not measured (clustering.stability_draws: 0)."
    if not stability.get("draws"):
        return f"Stability: not measured: {stability.get('reason', 'no usable resample')}."
    return (f"Stability: the same groups found again in {100 * stability['same_groups']:.0f}% "
            f"of {stability['draws']} bootstrap resamples of the subset estimates (mean "
            f"adjusted Rand index {stability['mean_ari']:.2f}, lowest "
            f"{stability['min_ari']:.2f}; 1 = the same groups, about 0 = chance).")


def compute_lines(c) -> list[str]:
    """The compute section: seconds per part, and the ratio to one adapter both ways."""
    parts = [["stage 1: gradient features", c.gradients_s, c.gradients_flops],
             ["stages 2–3: subset fits, groups", c.estimation_s, None],
             ["stage 4: group adapters", c.group_adapters_s, c.group_flops],
             ["stage 5: boosting", c.boosting_s, None],
             ["stage 5: member scoring before the weights", c.scoring_s, c.scoring_flops],
             ["one adapter on all tasks (the baseline)", c.baseline_s, c.baseline_flops]]
    return [markdown_table(["part", "seconds", "FLOPs"],
                           [[p, f"{s:.1f}", "-" if f is None else f"{f:.3g}"]
                            for p, s, f in parts]), "",
            f"Ensemble / one adapter, the paper's accounting (Table 4: stage 1, the fits, the "
            f"group adapters and boosting): **{c.ratio:.2f}×** in wall time, "
            f"**{c.flops_ratio:.2f}×** in FLOPs. With the member scoring the weights and the "
            f"boosting choice read (one adapter needs none): {c.ratio_with_scoring:.2f}× in "
            f"wall time, {c.flops_ratio_with_scoring:.2f}× in FLOPs."]
