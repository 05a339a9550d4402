"""SAEDashboard's interval draws, made from firing pairs only: each a uniform draw without replacement from its interval."""

from __future__ import annotations

import numpy as np

from fastsae.export.interval_groups import N_INTERVALS, IntervalSample
from fastsae.interpret.windows import ChunkWindows, WindowGrid

WINDOW_TOKENS, CHUNK_WINDOWS, N_CHUNKS, SIZE, SEEDS = 4, 12, 3, 5, 3000
N_WINDOWS = CHUNK_WINDOWS * N_CHUNKS


def activations() -> np.ndarray:
    """(windows, 2) window activations: feature 0 fires in 5 windows; feature 1 in all but 6, so most draws skip firing windows."""
    values = np.zeros((N_WINDOWS, 2))
    values[[1, 5, 13, 20, 30], 0] = [0.1, 0.9, 1.0, 0.15, 0.5]
    silent_for_1 = [0, 11, 12, 23, 24, 35]  # one at each edge of each chunk
    values[np.setdiff1d(np.arange(N_WINDOWS), silent_for_1), 1] = np.linspace(0.01, 2.0, N_WINDOWS - len(silent_for_1))
    return values


def draw(values: np.ndarray, seed: int) -> IntervalSample:
    grid = WindowGrid(np.array([0, N_WINDOWS * WINDOW_TOKENS]), WINDOW_TOKENS)
    sample = IntervalSample(values.max(0), N_WINDOWS, SIZE, seed)
    for chunk in range(N_CHUNKS):
        windows = range(chunk * CHUNK_WINDOWS, (chunk + 1) * CHUNK_WINDOWS)
        window_ids, features = np.nonzero(values[windows.start : windows.stop])
        window_ids += windows.start
        sample.add(ChunkWindows(windows, features, values[window_ids, features].astype(np.float32), window_ids * WINDOW_TOKENS), grid)
    return sample


def test_each_interval_is_drawn_uniformly_without_replacement_and_counted_exactly():
    values = activations()
    edges = values.max(0)[:, None] * np.linspace(0, 1, N_INTERVALS + 1)
    members = {
        (feature, interval): set(
            np.flatnonzero((edges[feature, interval] <= values[:, feature]) & (values[:, feature] <= edges[feature, interval + 1]))
        )
        for feature in range(2)
        for interval in range(N_INTERVALS)
    }
    assert len(members[0, 0]) == 33 and len(members[1, 0]) > 6  # silent windows and the weakest firing ones
    tally = {key: np.zeros(N_WINDOWS) for key in members}
    for seed in range(SEEDS):
        sample = draw(values, seed)
        for feature in range(2):
            groups = sample.groups(feature)
            for group in groups:
                interval = int(round(group.lower / edges[feature, 1]))
                drawn = group.windows.tolist()
                assert len(set(drawn)) == len(drawn) == min(SIZE, len(members[feature, interval]))
                assert set(drawn) <= members[feature, interval]
                assert group.contains == len(members[feature, interval]) / N_WINDOWS
                tally[feature, interval][drawn] += 1
            assert len(groups) == sum(bool(members[feature, interval]) for interval in range(N_INTERVALS))
    for (feature, interval), window_set in members.items():
        if not window_set:
            continue
        expected = min(SIZE, len(window_set)) / len(window_set)
        frequency = tally[feature, interval][sorted(window_set)] / SEEDS
        spread = np.sqrt(expected * (1 - expected) / SEEDS)
        assert np.abs(frequency - expected).max() <= 4.5 * spread + 1e-12, (feature, interval, frequency, expected)
