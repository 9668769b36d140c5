"""Synthetic datasets with a planted grouping (issue 32): many small tasks whose best grouping
is known, to measure how the pipeline scales with the number of tasks and whether it finds the
grouping.

Every example is a short sentence of filler words with cluster key words in it. With the
default ``rule="one-of"`` it holds exactly one of the C key words (uniformly), and a task of
cluster c answers "yes" when that word is c's: the tasks of a cluster share one labelling rule
and help each other, while two tasks of different clusters give opposite answers on every
sentence holding either one's key word (2/C of them) — they conflict, which is the structure
the paper's affinity is meant to see (tasks that transfer positively grouped together, those
that interfere kept apart). With ``rule="key"`` each key word appears independently (probability
1/2) and a task of cluster c answers "yes" when c's word is in the sentence: tasks of different
clusters are unrelated rather than conflicting (a weaker signal: on the tiny random model the
affinity does not separate them, ARI near 0 at n = 8, where one-of finds the planted groups).

``write_tasks`` writes each task's train/validation/test splits as JSONL files under a
directory and returns the ``tasks`` entries of a run config that read them (``files``,
``template``, ``label_field``, ``choices``): the pipeline reads them like any user's data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["KEYS", "FILLER", "planted_clusters", "make_examples", "write_tasks"]

# single, common English words: one token each in most tokenizers
KEYS = ("red", "blue", "green", "gold", "black", "white", "pink", "gray", "brown", "orange",
        "north", "south", "east", "west", "winter", "summer", "spring", "river", "stone",
        "cloud")
FILLER = ("the", "a", "man", "saw", "big", "house", "near", "old", "tree", "and", "dog", "ran",
          "to", "small", "car", "in", "city", "with", "friend", "book")


def planted_clusters(n: int, n_clusters: int) -> list[int]:
    """The planted cluster of each of ``n`` tasks: as equal as can be, in task order."""
    if not 1 <= n_clusters <= min(n, len(KEYS)):
        raise ValueError(f"n_clusters must be 1..{min(n, len(KEYS))}, got {n_clusters}")
    return [i * n_clusters // n for i in range(n)]


def make_examples(cluster: int, n_clusters: int, count: int, seed,
                  rule: str = "one-of", length: int = 6) -> list[dict]:
    """``count`` records {"text", "label"} of a task of ``cluster`` (see the module
    docstring); seeded, so a task's data is the same on every machine."""
    if rule not in ("one-of", "key"):
        raise ValueError(f"rule must be 'one-of' or 'key', got {rule!r}")
    if not 0 <= cluster < n_clusters <= len(KEYS):
        raise ValueError(f"cluster {cluster} of {n_clusters} (at most {len(KEYS)})")
    rng = np.random.default_rng(seed)
    keys = KEYS[:n_clusters]
    out = []
    for _ in range(count):
        if rule == "one-of":
            present = np.zeros(n_clusters, bool)
            present[int(rng.integers(0, n_clusters))] = True
        else:
            present = rng.random(n_clusters) < 0.5
        words = list(rng.choice(FILLER, size=length))
        for k, here in zip(keys, present):
            if here:
                words.insert(int(rng.integers(0, len(words) + 1)), k)
        out.append({"text": " ".join(words), "label": int(present[cluster])})
    return out


def write_tasks(root, n: int, n_clusters: int, *, sizes: dict | None = None, seed: int = 0,
                rule: str = "one-of", prefix: str = "task") -> tuple[list[dict], list[int]]:
    """Write ``n`` tasks (``<prefix>-<i>``, splits of ``sizes`` examples; default train 24,
    validation 12, test 12) under ``root``; returns (the run config's ``tasks`` entries, the
    planted cluster of each task)."""
    sizes = sizes or {"train": 24, "validation": 12, "test": 12}
    clusters = planted_clusters(n, n_clusters)
    root = Path(root)
    entries = []
    width = len(str(n - 1))
    for i, c in enumerate(clusters):
        name = f"{prefix}-{i:0{width}d}"
        files = {}
        for k, (split, count) in enumerate(sizes.items()):
            path = root / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            recs = make_examples(c, n_clusters, count, seed=[seed, i, k], rule=rule)
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            files[split] = str(path)
        entries.append({"name": name, "files": files, "template": "{text}\nYes or no?\nAnswer:",
                        "label_field": "label", "choices": [" no", " yes"],
                        "label_values": [0, 1]})
    return entries, clusters


def adjusted_rand(a: Sequence[int], b: Sequence[int]) -> float:
    """The adjusted Rand index of two labellings of the same items (Hubert and Arabie)."""
    from math import comb

    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} labels against {len(b)}")
    pairs: dict = {}
    for x, y in zip(a, b):
        pairs[(x, y)] = pairs.get((x, y), 0) + 1
    rows: dict = {}
    cols: dict = {}
    for (x, y), c in pairs.items():
        rows[x] = rows.get(x, 0) + c
        cols[y] = cols.get(y, 0) + c
    index = sum(comb(c, 2) for c in pairs.values())
    sa, sb = sum(comb(c, 2) for c in rows.values()), sum(comb(c, 2) for c in cols.values())
    expected = sa * sb / comb(len(a), 2) if len(a) > 1 else 0.0
    top = (sa + sb) / 2
    if top == expected:  # both labellings trivial (one cluster, or every item alone)
        return 1.0 if sorted(rows.values()) == sorted(cols.values()) else 0.0
    return float((index - expected) / (top - expected))
