"""SAEDashboard's interval groups of every feature, drawn in one pass over the store from where features fire.

A feature's range [0, its maximum] is cut into N_INTERVALS equal closed intervals (SAEDashboard's
`torch.linspace(0, max, n_quantiles + 1)`), and a window belongs to those that hold its activation: 0 where
the feature is silent, so the lowest interval also holds the silent windows, as SAEDashboard's holds the
silent tokens. From each interval, `size` windows are drawn uniformly without replacement, as SAEDashboard's
`random_range_indices` draws them: every (window, feature) pair in the interval gets a uniform random
priority, and the interval keeps the `size` highest.

A chunk's firing pairs are few next to its windows × M, and all the others are silent pairs of the lowest
interval. Those are never formed: of a feature's n silent windows in a chunk, only the `size` with the
highest priorities can ever be kept, and those are `size` of its silent windows drawn uniformly without
replacement, with the top `size` order statistics of n uniform priorities. So the work per chunk grows
with its firing pairs plus M × size, not with windows × M (benchmarks/bench_neuronpedia_intervals.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastsae.interpret.windows import ChunkWindows, WindowGrid

N_INTERVALS = 5  # SAEDashboard's NeuronpediaRunnerConfig.n_quantiles: the activation intervals examples are also drawn from


class IntervalGroup(NamedTuple):
    """One of a feature's activation intervals: its edges, the share of the store's windows in it, the windows drawn from it."""

    lower: float
    upper: float
    contains: float
    windows: np.ndarray  # indices into the window grid


class Draws(NamedTuple):
    """Candidate draws of an interval: (size, M) priorities and windows, priority -1 where a feature has none."""

    priority: np.ndarray
    window: np.ndarray

    @classmethod
    def none(cls, size: int, n_features: int) -> Draws:
        return cls(np.full((size, n_features), -1.0), np.full((size, n_features), -1))


def highest_per_feature(features: np.ndarray, windows: np.ndarray, priority: np.ndarray, size: int, n_features: int) -> Draws:
    """The `size` highest-priority (window, priority) pairs of each feature, from pairs listed in any order."""
    order = np.lexsort((-priority, features))
    features, windows, priority = features[order], windows[order], priority[order]
    rank = np.arange(len(features)) - np.searchsorted(features, features)  # place within the feature's run, best first
    kept = rank < size
    draws = Draws.none(size, n_features)
    draws.priority[rank[kept], features[kept]] = priority[kept]
    draws.window[rank[kept], features[kept]] = windows[kept]
    return draws


def distinct_ranks(rng: np.random.Generator, n: np.ndarray, size: int) -> np.ndarray:
    """(size, M): per column, min(size, n) distinct integers of [0, n) drawn uniformly, in random order, then -1.

    Robert Floyd's algorithm, one step for all columns at once: for j from n - size to n - 1, draw t in [0, j]
    and take t, or j if t is taken already.
    """
    wanted = np.minimum(n, size)
    ranks = np.full((size, len(n)), -1)
    for step in range(size):
        j = n - wanted + step  # only columns still wanting a draw use it
        active = step < wanted
        t = np.floor(rng.random(len(n)) * (j + 1)).astype(np.int64)
        taken = (ranks[:step] == t).any(0)
        ranks[step] = np.where(active, np.where(taken, j, t), -1)
    # Floyd's draws are a uniform set, not a uniform order: shuffle each column, keeping the -1s last.
    order = np.argsort(np.where(ranks >= 0, rng.random(ranks.shape), 2.0), axis=0)
    return np.take_along_axis(ranks, order, 0)


def nth_silent_window(firing: np.ndarray, features: np.ndarray, ranks: np.ndarray, n_windows: int) -> np.ndarray:
    """The `ranks`-th window (0-based, of the chunk's) where each of `features` is silent, given `firing`: the sorted
    keys feature × n_windows + window of the chunk's firing pairs. The answer w is where w = rank + (firing windows ≤ w)."""
    base = features.astype(np.int64) * n_windows
    firing_before = np.searchsorted(firing, base)
    window = ranks.copy()
    moving = np.arange(len(window))
    while len(moving):  # each round moves a window past the firing windows it newly covers, at most once per firing pair
        moved = ranks[moving] + np.searchsorted(firing, base[moving] + window[moving], side="right") - firing_before[moving]
        changed = moved != window[moving]
        window[moving] = moved
        moving = moving[changed]
    return window


def silent_draws(
    rng: np.random.Generator, features: np.ndarray, windows: np.ndarray, chunk_windows: range, size: int, n_features: int
) -> tuple[np.ndarray, Draws]:
    """Per feature, how many of the chunk's windows it is silent in, and `size` of them (all, if fewer) drawn uniformly
    without replacement, carrying the top order statistics of that many uniform priorities, highest first.

    `features` and `windows` are the chunk's firing pairs, one per (window, feature).
    """
    n_windows = len(chunk_windows)
    n_silent = n_windows - np.bincount(features, minlength=n_features)
    draws = Draws.none(size, n_features)
    ranks = distinct_ranks(rng, n_silent, size)
    rows, columns = np.nonzero(ranks >= 0)
    firing = np.sort(features.astype(np.int64) * n_windows + (windows - chunk_windows.start))
    draws.window[rows, columns] = nth_silent_window(firing, columns, ranks[rows, columns], n_windows) + chunk_windows.start
    # The largest of n uniforms is U^(1/n); given it, the next is it times U^(1/(n-1)), and so on.
    top = np.ones(n_features)
    for rank in range(size):
        remaining = n_silent - rank
        has = remaining > 0
        top = np.where(has, top * rng.random(n_features) ** (1.0 / np.maximum(remaining, 1)), top)
        draws.priority[rank] = np.where(has, top, -1.0)
    return n_silent, draws


class IntervalSample:
    """Every feature's interval counts and draws over every window of the store, from the chunks of one pass."""

    def __init__(self, maxima: np.ndarray, n_windows: int, size: int, seed: int) -> None:
        self.maxima = maxima.astype(np.float64)
        self.edges = self.maxima[:, None] * np.linspace(0.0, 1.0, N_INTERVALS + 1)  # (M, N_INTERVALS + 1)
        self.n_windows = n_windows
        self.size = size
        self.counts = np.zeros((N_INTERVALS, len(maxima)), dtype=np.int64)
        self.priority = np.full((N_INTERVALS, size, len(maxima)), -1.0)  # -1: no window kept there yet
        self.window = np.full((N_INTERVALS, size, len(maxima)), -1)
        self._rng = np.random.default_rng(seed)

    def add(self, chunk: ChunkWindows, grid: WindowGrid) -> None:
        """Count and draw from one chunk's windows: those with no (window, feature) pair in it are silent."""
        n_features = len(self.maxima)
        features, windows = chunk.slots, grid.index_of(chunk.peaks)
        # Capped at the maximum, which the statistics pass found in chunks of other sizes: their arithmetic may differ in
        # the last bit, and the strongest window must stay in the top interval.
        activation = np.minimum(chunk.values, self.maxima[features])
        for interval in range(N_INTERVALS):
            inside = (self.edges[features, interval] <= activation) & (activation <= self.edges[features, interval + 1])
            self.counts[interval] += np.bincount(features[inside], minlength=n_features)
            priority = self._rng.random(int(inside.sum()))
            candidates = [highest_per_feature(features[inside], windows[inside], priority, self.size, n_features)]
            if interval == 0:
                n_silent, silent = silent_draws(self._rng, features, windows, chunk.windows, self.size, n_features)
                self.counts[0] += n_silent
                candidates.append(silent)
            self._keep_highest(interval, candidates)

    def _keep_highest(self, interval: int, candidates: list[Draws]) -> None:
        """Merge candidate draws into the interval's kept ones: the `size` highest priorities of each feature."""
        columns = np.flatnonzero(np.any([(draws.priority >= 0).any(0) for draws in candidates], axis=0))  # features with candidates
        priority = np.concatenate([self.priority[interval][:, columns], *(draws.priority[:, columns] for draws in candidates)])
        window = np.concatenate([self.window[interval][:, columns], *(draws.window[:, columns] for draws in candidates)])
        keep = np.argpartition(-priority, self.size - 1, axis=0)[: self.size]
        self.priority[interval][:, columns] = np.take_along_axis(priority, keep, 0)
        self.window[interval][:, columns] = np.take_along_axis(window, keep, 0)

    def groups(self, feature: int) -> list[IntervalGroup]:
        """The feature's non-empty intervals, highest first as SAEDashboard lists them; none for a feature that never fires."""
        if self.maxima[feature] <= 0:
            return []
        return [
            IntervalGroup(
                float(self.edges[feature, interval]),
                float(self.edges[feature, interval + 1]),
                float(self.counts[interval, feature] / self.n_windows),
                self.window[interval, :, feature][self.priority[interval, :, feature] >= 0],
            )
            for interval in reversed(range(N_INTERVALS))
            if self.counts[interval, feature]
        ]
