"""Synthetic datasets with a planted grouping (issue 32): many small tasks whose best grouping
is known, to measure how the pipeline scales with the number of tasks and whether it finds the
grouping.

Every example is a short sentence of filler words (``length`` of them, possibly none) with
cluster key words in it; three rules say which and how a task of cluster c answers:

* ``"code"`` (what ``bench/scale.py`` uses): the sentence holds one of K key words
  (uniformly; K the smallest power of two with 2(K − 1) ≥ C), and the answer is bit ``key`` of
  cluster c's Walsh code (``code_label``): the K − 1 codes and their complements, so every
  task answers "yes" to half the key words, the tasks of a cluster share one rule and help
  each other, and two clusters disagree on half the key words or on all of them — they
  conflict, which is the structure the paper's affinity is meant to see (tasks that transfer
  positively grouped together, those that interfere kept apart), with balanced labels
  however many clusters there are.
* ``"one-of"``: exactly one of the C key words, and the answer is "yes" when it is c's: two
  clusters conflict only on the 2/C of sentences holding either's word, and "no" is the
  answer to (C − 1)/C of them (a weak signal when C is large).
* ``"key"``: each key word independently (probability 1/2), "yes" when c's is there: tasks of
  different clusters are unrelated rather than conflicting (on the tiny random model the
  affinity does not separate them).

The key words are single tokens of the tiny model's tokenizer (``models.build_tiny_tokenizer``;
common English words, single tokens in most tokenizers): a word split into several byte
tokens shares them with other words, which the tiny random model's features cannot tell
apart.

``write_tasks`` writes each task's train/validation/test splits as JSONL files under a
directory and returns the ``tasks`` entries of a run config that read them (``files``,
``template``, ``label_field``, ``choices``): the pipeline reads them like any user's data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["KEYS", "FILLER", "planted_clusters", "code_label", "make_examples",
           "write_tasks", "adjusted_rand"]

# single tokens of the tiny model's tokenizer (its word list; not the answers' " yes"/" no"
# nor the template's words), common English words
KEYS = ("true", "false", "good", "bad", "cause", "effect", "same", "different", "positive",
        "negative", "correct", "incorrect", "maybe", "because", "question", "passage", "premise",
        "hypothesis", "sentence", "word", "neutral", "equivalent", "paraphrase", "acceptable",
        "entailment", "contradiction", "grammatical", "unacceptable", "what", "which", "who",
        "this")
FILLER = ("the", "a", "man", "saw", "big", "house", "near", "old", "tree", "and", "dog", "ran",
          "to", "small", "car", "in", "city", "with", "friend", "book")


def planted_clusters(n: int, n_clusters: int) -> list[int]:
    """The planted cluster of each of ``n`` tasks: as equal as can be, in task order."""
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be 1..{n}, got {n_clusters}")
    return [i * n_clusters // n for i in range(n)]


def _code_keys(n_clusters: int) -> int:
    """How many key words the "code" rule uses: the smallest power of two K with 2(K − 1) ≥
    ``n_clusters`` (K − 1 Walsh codes and their complements)."""
    k = 2
    while 2 * (k - 1) < n_clusters:
        k *= 2
    if k > len(KEYS):
        raise ValueError(f"rule 'code' takes at most {2 * (len(KEYS) - 1)} clusters, got "
                         f"{n_clusters}")
    return k


def code_label(cluster: int, key: int, n_keys: int) -> int:
    """The "code" rule's answer of a task of ``cluster`` to a sentence holding key word
    ``key``: bit ``key`` of the Walsh code (cluster mod (K − 1)) + 1, complemented for the
    clusters from K − 1 on."""
    row = cluster % (n_keys - 1) + 1
    return (bin(row & key).count("1") + cluster // (n_keys - 1)) % 2


def make_examples(cluster: int, n_clusters: int, count: int, seed,
                  rule: str = "one-of", length: int = 6) -> list[dict]:
    """``count`` records {"text", "label"} of a task of ``cluster`` (see the module
    docstring); seeded, so a task's data is the same on every machine."""
    if rule not in ("one-of", "key", "code"):
        raise ValueError(f"rule must be 'one-of', 'key' or 'code', got {rule!r}")
    most = 2 * (len(KEYS) - 1) if rule == "code" else len(KEYS)
    if not 0 <= cluster < n_clusters <= most:
        raise ValueError(f"cluster {cluster} of {n_clusters} (rule {rule!r}: at most {most})")
    rng = np.random.default_rng(seed)
    keys = KEYS[:n_clusters]
    out = []
    if rule == "code":
        n_keys = _code_keys(n_clusters)
        for _ in range(count):
            key = int(rng.integers(0, n_keys))
            words = list(rng.choice(FILLER, size=length))
            words.insert(int(rng.integers(0, len(words) + 1)), KEYS[key])
            out.append({"text": " ".join(words), "label": code_label(cluster, key, n_keys)})
        return out
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
                rule: str = "one-of", length: int = 6, prefix: str = "task"
                ) -> tuple[list[dict], list[int]]:
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
            recs = make_examples(c, n_clusters, count, seed=[seed, i, k], rule=rule,
                                 length=length)
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
