"""Comparing methods over seeds, for ``ensemble-lora benchmark`` (flows/benchmark.py; the
pipeline and the baselines for several seeds, measured like a paper would; docs/design.md,
"Benchmark"): mean ± standard deviation over seeds per task and on average,
the majority-class rate beside every accuracy, and the paired difference ensemble − single
adapter with a 95% bootstrap confidence interval over test examples and seeds.

The bootstrap (:func:`paired_bootstrap`): one draw resamples the seeds with replacement, and
within each drawn seed the test examples of every task with replacement; its statistic is the
mean over the drawn seeds of the mean over tasks of the per-example difference (1 if only the
ensemble is right, −1 if only the single adapter is, 0 otherwise) — the difference of the
average accuracies. The interval is the draws' 2.5th and 97.5th percentiles.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "correct", "summarize_seeds", "benchmark_markdown",
           "benchmark_png", "majority_rates"]


def correct(predictions: Mapping, method: str) -> dict[str, np.ndarray]:
    """task -> [n_test] 1/0: whether ``method``'s prediction is the gold choice
    (predictions.json / baselines.json's "predictions")."""
    out = {}
    for task, p in predictions.items():
        gold = np.asarray(p["gold"])
        out[task] = (np.asarray(p[method]) == gold).astype(np.float64)
    return out


def paired_bootstrap(a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]],
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95
                     ) -> tuple[float, float, float]:
    """(difference, low, high) of the average accuracy of ``a`` minus ``b`` (per seed: task ->
    per-example correctness, paired: the same test examples), with the bootstrap interval of
    the module docstring."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} seeds")
    tasks = sorted(a[0])
    diffs = []
    for sa, sb in zip(a, b):
        if sorted(sa) != tasks or sorted(sb) != tasks:
            raise ValueError("paired_bootstrap: every seed needs the same tasks on both sides")
        d = {}
        for t in tasks:
            if len(sa[t]) != len(sb[t]):
                raise ValueError(f"paired_bootstrap: task {t!r} has {len(sa[t])} and "
                                 f"{len(sb[t])} test examples")
            d[t] = np.asarray(sa[t], np.float64) - np.asarray(sb[t], np.float64)
        diffs.append(d)
    point = float(np.mean([np.mean([d[t].mean() for t in tasks]) for d in diffs]))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for k in range(n_boot):
        seeds = rng.integers(0, len(diffs), len(diffs))
        per_seed = []
        for s in seeds:
            d = diffs[s]
            per_seed.append(np.mean([d[t][rng.integers(0, len(d[t]), len(d[t]))].mean()
                                     for t in tasks]))
        stats[k] = np.mean(per_seed)
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return point, float(lo), float(hi)


def adjusted_rand_index(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]]) -> float:
    """The adjusted Rand index (Hubert and Arabie, 1985) between two groupings of the same
    tasks (lists of groups of task names): 1 for the same partition, about 0 for partitions as
    alike as chance makes them. Two partitions that put every task alone, or all together,
    agree completely: 1."""
    from math import comb

    label_a = {t: k for k, g in enumerate(a) for t in g}
    label_b = {t: k for k, g in enumerate(b) for t in g}
    if set(label_a) != set(label_b):
        raise ValueError(f"the groupings cover different tasks: {sorted(set(label_a) ^ set(label_b))}")
    n = len(label_a)
    table: dict[tuple[int, int], int] = {}
    for t in label_a:
        key = (label_a[t], label_b[t])
        table[key] = table.get(key, 0) + 1
    rows = [sum(v for (i, _), v in table.items() if i == k) for k in range(len(a))]
    cols = [sum(v for (_, j), v in table.items() if j == k) for k in range(len(b))]
    index = sum(comb(v, 2) for v in table.values())
    sum_a, sum_b = sum(comb(v, 2) for v in rows), sum(comb(v, 2) for v in cols)
    expected = sum_a * sum_b / comb(n, 2) if n > 1 else 0.0
    best = (sum_a + sum_b) / 2
    if best == expected:
        return 1.0
    return float((index - expected) / (best - expected))


def majority_rates(predictions: Mapping) -> dict[str, float]:
    """task -> the test split's majority-class rate (the accuracy of always answering the most
    frequent gold choice)."""
    out = {}
    for task, p in predictions.items():
        counts = np.bincount(np.asarray(p["gold"]))
        out[task] = float(counts.max() / counts.sum())
    return out


def summarize_seeds(accuracies: Sequence[Mapping[str, Mapping[str, float]]]
                    ) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> task (and "average") -> (mean, standard deviation over seeds) from one
    {method: {task: accuracy}} per seed."""
    methods = list(accuracies[0])
    out = {}
    for m in methods:
        tasks = list(accuracies[0][m])
        per = {t: [acc[m][t] for acc in accuracies] for t in tasks}
        per["average"] = [float(np.mean([acc[m][t] for t in tasks])) for acc in accuracies]
        out[m] = {t: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                  for t, v in per.items()}
    return out


def benchmark_markdown(summary: Mapping, majority: Mapping[str, float], names: Mapping[str, str],
                       ci: tuple[float, float, float], seeds: Sequence[int],
                       compute: Mapping[str, Mapping[str, float]] | None = None,
                       stability: Mapping | None = None) -> str:
    """The benchmark table: mean ± std (percent) per task and on average, majority rates,
    the paired difference with its CI, and (optionally) compute per method."""
    methods = list(summary)
    tasks = [t for t in summary[methods[0]] if t != "average"]
    head = ["method", *tasks, "average"]
    seed_list = ", ".join(map(str, seeds))
    lines = [f"Test accuracy (%), mean ± std over {len(seeds)} seeds ({seed_list}):",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [f"{100 * summary[m][t][0]:.1f} ± {100 * summary[m][t][1]:.1f}"
                 for t in [*tasks, "average"]]
        lines.append(f"| {names.get(m, m)} | " + " | ".join(cells) + " |")
    maj = [f"{100 * majority[t]:.1f}" for t in tasks]
    lines.append("| majority class | " + " | ".join(maj)
                 + f" | {100 * float(np.mean([majority[t] for t in tasks])):.1f} |")
    d, lo, hi = ci
    lines += ["", f"Ensemble − single adapter, average test accuracy: **{100 * d:+.1f} points** "
                  f"(95% CI {100 * lo:+.1f} to {100 * hi:+.1f}; paired bootstrap over test "
                  f"examples and seeds)."]
    if compute:
        lines += ["", "| method | train FLOPs | wall s | peak GiB | adapter parameters |",
                  "|---|---|---|---|---|"]
        for m, c in compute.items():
            lines.append(f"| {names.get(m, m)} | {c['flops']:.3g} | {c['wall_s']:.0f} | "
                         f"{c['peak_memory_bytes'] / 2**30:.2f} | "
                         f"{c.get('adapter_parameters', '')} |")
    if stability:
        lines += ["", "Group stability (adjusted Rand index between groupings: 1 = the same "
                      "groups, about 0 = as alike as chance):", "",
                  "| groupings compared | pairs | mean ARI | lowest |", "|---|---|---|---|"]
        for what, aris in stability.items():
            if aris:
                lines.append(f"| {what} | {len(aris)} | {float(np.mean(aris)):.2f} | "
                             f"{float(np.min(aris)):.2f} |")
    return "\n".join(lines) + "\n"


def pairwise_ari(groupings: Sequence[Sequence[Sequence[str]]]) -> list[float]:
    """The adjusted Rand index of every pair of ``groupings``."""
    return [adjusted_rand_index(a, b) for i, a in enumerate(groupings)
            for b in groupings[i + 1:]]


def benchmark_png(summary: Mapping, majority: Mapping[str, float], names: Mapping[str, str]
                  ) -> bytes:
    """A grouped bar chart: mean test accuracy per task and method (std as error bars), the
    majority-class rate as a line per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    tasks = [t for t in summary[methods[0]] if t != "average"] + ["average"]
    x = np.arange(len(tasks))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 4.2), dpi=110)
    for k, m in enumerate(methods):
        means = [100 * summary[m][t][0] for t in tasks]
        stds = [100 * summary[m][t][1] for t in tasks]
        ax.bar(x - 0.4 + width * (k + 0.5), means, width, yerr=stds, label=names.get(m, m),
               capsize=2)
    maj = [100 * majority[t] for t in tasks[:-1]]
    maj.append(float(np.mean(maj)))
    for i, v in enumerate(maj):
        ax.hlines(v, i - 0.42, i + 0.42, colors="black", linestyles="dashed",
                  label="majority class" if i == 0 else None)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, min(maj) - 25), 100)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
