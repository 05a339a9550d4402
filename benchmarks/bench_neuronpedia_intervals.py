"""Neuronpedia export's interval draws (SAEDashboard's interval groups): time per 4,096-token chunk of the store.

    python benchmarks/bench_neuronpedia_intervals.py [--ms 4608 32768 131072] [--k 32] [--chunks 6]

`IntervalSample.add` sees, per chunk, the (window, feature) pairs where a feature fires (32-token windows,
WINDOW_TOKENS). The pairs are synthetic: each token fires K features drawn from a Zipf-like frequency
profile, as trained SAEs' features are, and a window's pair holds its strongest activation. The table gives
milliseconds per chunk and what that comes to over a store of 10M tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastsae.export.interval_groups import IntervalSample
from fastsae.export.neuronpedia import INTERVAL_EXAMPLES, WINDOW_TOKENS
from fastsae.interpret.windows import ChunkWindows, WindowGrid

CHUNK_TOKENS = 4096


def synthetic_chunks(m: int, k: int, n_chunks: int, seed: int) -> tuple[WindowGrid, list[ChunkWindows], np.ndarray]:
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, m + 1) ** 0.8
    frequency /= frequency.sum()
    n_tokens = n_chunks * CHUNK_TOKENS
    grid = WindowGrid(np.arange(0, n_tokens + 1, 256), WINDOW_TOKENS)  # examples of 256 tokens
    chunks, maxima = [], np.zeros(m)
    for chunk in range(n_chunks):
        first = chunk * CHUNK_TOKENS
        tokens = np.repeat(np.arange(first, first + CHUNK_TOKENS), k)
        features = rng.choice(m, size=len(tokens), p=frequency)
        values = rng.exponential(1.0, size=len(tokens)).astype(np.float32)
        windows = grid.index_of(tokens)
        key = windows.astype(np.int64) * m + features
        order = np.lexsort((-values, key))  # the strongest token of each (window, feature) pair first
        _, first_of_pair = np.unique(key[order], return_index=True)
        pairs = order[first_of_pair]
        window_range = range(int(grid.index_of(np.array([first]))[0]), int(grid.index_of(np.array([first + CHUNK_TOKENS - 1]))[0]) + 1)
        chunks.append(ChunkWindows(window_range, features[pairs], values[pairs], tokens[pairs]))
        np.maximum.at(maxima, features[pairs], values[pairs])
    return grid, chunks, maxima


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", type=int, nargs="+", default=[4608, 32768, 131072])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=6)
    args = parser.parse_args()
    print("| M | pairs per chunk | ms per 4,096-token chunk | hours for 10M tokens |\n|---:|---:|---:|---:|")
    for m in args.ms:
        grid, chunks, maxima = synthetic_chunks(m, args.k, args.chunks, seed=0)
        sample = IntervalSample(maxima, len(grid), INTERVAL_EXAMPLES, seed=0)
        sample.add(chunks[0], grid)  # warm-up
        started = time.perf_counter()
        for chunk in chunks[1:]:
            sample.add(chunk, grid)
        seconds = (time.perf_counter() - started) / (len(chunks) - 1)
        pairs = np.mean([len(chunk.slots) for chunk in chunks])
        print(f"| {m:,} | {pairs:,.0f} | {seconds * 1000:,.0f} | {seconds * 10e6 / CHUNK_TOKENS / 3600:.2f} |", flush=True)


if __name__ == "__main__":
    main()
