"""Sampling the k task subsets S whose surrogates estimate the task affinity (stage 2;
docs/design.md, "Stage 2").

Eq. (1) averages f̂_i(S) over the sampled subsets S that contain both i and j, so every pair of
tasks must appear together in at least one subset (``min_pair_coverage``). The sampler

1. covers pairs greedily: start a subset from a least-covered pair, then add the tasks that
   cover the most still-uncovered pairs (ties broken by the seeded generator);
2. fills the remaining subsets uniformly at random, without duplicates.

Everything is driven by ``numpy.random.default_rng(seed)``, so the result is identical across
processes and machines for the same arguments.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

__all__ = ["sample_subsets", "extend_subsets", "pair_counts"]


def pair_counts(subsets: Iterable[Sequence[int]], n: int) -> np.ndarray:
    """[n, n] int matrix: entry (i, j) = number of subsets containing both i and j;
    the diagonal counts the subsets containing i."""
    counts = np.zeros((n, n), dtype=np.int64)
    for s in subsets:
        idx = np.asarray(list(s), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"subset {tuple(s)} has a task index outside 0..{n - 1}")
        counts[np.ix_(idx, idx)] += 1
    return counts


def _check_args(n_tasks: int, k: int, size: int, min_pair_coverage: int) -> None:
    if n_tasks < 2:
        raise ValueError(f"need at least 2 tasks to sample subsets, got n_tasks={n_tasks}")
    if size < 2:
        raise ValueError(f"subset size must be >= 2 (pairs must co-occur), got size={size}")
    if size > n_tasks:
        raise ValueError(f"subset size {size} exceeds the number of tasks {n_tasks}")
    if k < 0 or min_pair_coverage < 0:
        raise ValueError(f"k and min_pair_coverage must be >= 0, got k={k}, "
                         f"min_pair_coverage={min_pair_coverage}")
    total = math.comb(n_tasks, size)
    if k > total:
        raise ValueError(f"cannot draw k={k} distinct subsets: only C({n_tasks},{size})={total} "
                         "exist")
    pairs_needed = min_pair_coverage * math.comb(n_tasks, 2)
    pairs_given = k * math.comb(size, 2)
    if pairs_given < pairs_needed:
        raise ValueError(f"k={k} subsets of size {size} cover at most {pairs_given} task pairs, "
                         f"but min_pair_coverage={min_pair_coverage} over C({n_tasks},2) pairs "
                         f"needs {pairs_needed}")
    # (a pair lies in at most C(n-2, size-2) distinct subsets; that bound is implied by the two
    # above, since C(n,size)·C(size,2) = C(n,2)·C(n-2,size-2))


def _greedy_cover(n: int, size: int, cover: int, budget: int, rng: np.random.Generator,
                  taken: set, counts: np.ndarray | None = None) -> list[tuple[int, ...]]:
    """Greedy pair covering: each new subset starts at a least-covered pair and grows by the task
    that reduces the remaining deficit the most (random tie-breaking). ``counts``: the pair
    counts of subsets already chosen (``pair_counts``), none by default."""
    counts = np.zeros((n, n), dtype=np.int64) if counts is None else counts.copy()
    out: list[tuple[int, ...]] = []
    iu = np.triu_indices(n, 1)
    while True:
        deficit = np.maximum(cover - counts, 0)
        np.fill_diagonal(deficit, 0)
        if not deficit.any():
            return out
        if len(out) >= budget:
            left = int((deficit[iu] > 0).sum())
            raise ValueError(f"greedy pair covering used all k={budget} subsets of size {size} "
                             f"over {n} tasks and still has {left} pairs below "
                             f"min_pair_coverage={cover}; increase k")
        # least-covered pair among the deficient ones, random tie-breaking
        pc = counts[iu]
        cand = np.flatnonzero(pc == pc[deficit[iu] > 0].min())
        cand = cand[deficit[iu][cand] > 0]
        pick = int(cand[rng.integers(len(cand))])
        subset = None
        for _attempt in range(64):
            members = [int(iu[0][pick]), int(iu[1][pick])]
            while len(members) < size:
                gain = deficit[:, members].sum(axis=1).astype(np.float64)
                gain[members] = -np.inf
                # tie-break: prefer tasks with less total coverage, then random
                load = counts.sum(axis=1).astype(np.float64)
                noise = rng.random(n)
                order = np.lexsort((noise, load, -gain))
                if _attempt:
                    # on a duplicate, randomize among all positive-gain (or any) candidates
                    ok = np.flatnonzero(gain > 0) if np.any(gain > 0) \
                        else np.flatnonzero(np.isfinite(gain))
                    members.append(int(ok[rng.integers(len(ok))]))
                else:
                    members.append(int(order[0]))
            cand_subset = tuple(sorted(members))
            if cand_subset not in taken:
                subset = cand_subset
                break
        if subset is None:  # the greedy choices are all taken: the best unused subset
            subset = _best_unused(n, size, deficit, taken, rng)
        if subset is None:
            raise ValueError(f"greedy pair covering could not find a new distinct subset of "
                             f"size {size} over {n} tasks after {len(out)} subsets "
                             f"(k={budget}, min_pair_coverage={cover})")
        taken.add(subset)
        out.append(subset)
        idx = np.asarray(subset)
        counts[np.ix_(idx, idx)] += 1


EXHAUSTIVE_LIMIT = 500_000  # subsets searched when the greedy choices are all taken


def _best_unused(n: int, size: int, deficit: np.ndarray, taken: set,
                 rng: np.random.Generator) -> tuple[int, ...] | None:
    """The unused subset covering the most deficient pairs (ties: seeded random), or None when
    no unused subset covers one (or there are too many subsets to search). The greedy growth
    can end on taken subsets only (e.g. 7 tasks, size 3, every pair twice: the last pairs lie in
    few unused subsets)."""
    if math.comb(n, size) > EXHAUSTIVE_LIMIT:
        return None
    best, gain = [], 0
    for sub in itertools.combinations(range(n), size):
        if sub in taken:
            continue
        idx = np.asarray(sub)
        g = int(np.triu(deficit[np.ix_(idx, idx)], 1).sum())
        if g > gain:
            best, gain = [sub], g
        elif g == gain and g > 0:
            best.append(sub)
    return best[int(rng.integers(len(best)))] if best else None


def _fill_random(n: int, size: int, n_more: int, rng: np.random.Generator,
                 taken: set) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    total = math.comb(n, size)
    misses = 0
    while len(out) < n_more:
        if misses > 1000 or total - len(taken) <= 4 * (n_more - len(out)):
            # the space is nearly exhausted: draw from the explicit list of unused subsets
            rest = [s for s in itertools.combinations(range(n), size) if s not in taken]
            pick = rng.choice(len(rest), size=n_more - len(out), replace=False)
            out.extend(rest[int(i)] for i in pick)
            taken.update(out)
            return out
        s = tuple(sorted(int(v) for v in rng.choice(n, size=size, replace=False)))
        if s in taken:
            misses += 1
            continue
        taken.add(s)
        out.append(s)
    return out


def sample_subsets(n_tasks: int, k: int, size: int, min_pair_coverage: int = 1,
                   seed: int = 0) -> list[tuple[int, ...]]:
    """k distinct subsets (each a sorted tuple of ``size`` task indices) such that every pair of
    tasks co-occurs in at least ``min_pair_coverage`` subsets. Deterministic given ``seed``.

    The pair-covering subsets come first, then the random fill, in generation order.
    Raises ValueError (with the numbers) when the request is impossible or the greedy covering
    runs out of budget.
    """
    n_tasks, k, size, cover = int(n_tasks), int(k), int(size), int(min_pair_coverage)
    _check_args(n_tasks, k, size, cover)
    rng = np.random.default_rng(seed)
    taken: set = set()
    subsets = _greedy_cover(n_tasks, size, cover, k, rng, taken)
    subsets += _fill_random(n_tasks, size, k - len(subsets), rng, taken)
    return subsets


def extend_subsets(n_tasks: int, kept: Sequence[Sequence[int]], size: int,
                   min_pair_coverage: int = 1, seed: int = 0) -> list[tuple[int, ...]]:
    """The subsets to add to ``kept`` so that every pair of the ``n_tasks`` tasks co-occurs in
    at least ``min_pair_coverage`` subsets again — after tasks were added (their pairs are
    uncovered) or removed (the subsets that held them were dropped) — by the same greedy
    covering; nothing else is added, and ``kept`` is not changed. Deterministic given
    ``seed`` and the arguments."""
    n_tasks, size, cover = int(n_tasks), int(size), int(min_pair_coverage)
    if size < 2 or size > n_tasks:
        raise ValueError(f"subset size {size} must be between 2 and the number of tasks "
                         f"{n_tasks}")
    kept = [tuple(sorted(int(i) for i in s)) for s in kept]
    rng = np.random.default_rng([int(seed), n_tasks, len(kept)])
    budget = math.comb(n_tasks, size) - len(set(kept))
    return _greedy_cover(n_tasks, size, cover, budget, rng, set(kept),
                         pair_counts(kept, n_tasks))
