"""A feature's activating windows, cut as delphi cuts them, from one streaming pass over the chosen features.

Each example is cut into consecutive windows of WINDOW_TOKENS tokens from its first token (the
last one shorter; a window never runs into the next example); when special tokens are not counted,
from its first content token, and a window of special tokens only is left out. A window activates a feature when
the feature fires anywhere in it, and its activation is its maximum there. delphi (eai-delphi
0.1.3, `latents/constructors.py` with its default `center_examples=True`) cuts its token stream
into the same fixed windows of `example_ctx_len` = 32 tokens: its docstring speaks of centring,
its default code path does not. One window per region is what keeps a feature's top contexts
from being overlapping cuts of one passage.

The pass keeps, per chosen feature, the exact number of its activating windows (delphi scores a
feature only when it has `min_examples` of them), its exact strongest windows, and a uniform
random sample of at most RESERVOIR windows from which the activation quantiles are read. Memory
is bounded by features × (RESERVOIR + top), never by the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsae.core.sae import SparseAutoencoder
from fastsae.lm.tokenization import token_texts
from fastsae.store.activation_store import ActivationStore

RESERVOIR = 10_000  # windows sampled per feature for its quantiles; exact below this many


class WindowGrid:
    """Where every window of the store starts: each example cut into `window_tokens`-token pieces from its first token,
    or from `first_tokens` (a store token per example) when given; tokens before that belong to no window."""

    def __init__(self, doc_offsets: np.ndarray, window_tokens: int, first_tokens: np.ndarray | None = None) -> None:
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        firsts = offsets[:-1] if first_tokens is None else np.asarray(first_tokens, dtype=np.int64)
        per_example = -(-(offsets[1:] - firsts) // window_tokens)
        within = np.arange(per_example.sum()) - np.repeat(np.cumsum(per_example) - per_example, per_example)
        self.window_tokens = window_tokens
        self.doc_offsets = offsets
        self.starts = np.repeat(firsts, per_example) + within * window_tokens  # ascending store token indices

    @classmethod
    def after_leading_template(cls, store: ActivationStore, window_tokens: int, chunk_tokens: int = 1 << 22) -> WindowGrid:
        """Windows that start at each example's first content token, so a chat template's opening (system prompt,
        role markers: special tokens, which no feature is counted on) does not fill the first window of every example;
        and only windows that hold a content token, so an example's closing template (`<|im_end|>` and its newline)
        is never a window of its own, to be shown or drawn as a window where a feature is silent."""
        offsets = np.asarray(store.doc_offsets, dtype=np.int64)
        firsts = offsets[1:].copy()  # no content token: the example gets no window
        for content in cls._content_tokens(store, chunk_tokens):
            examples, first = np.unique(np.searchsorted(offsets, content, side="right") - 1, return_index=True)
            firsts[examples] = np.minimum(firsts[examples], content[first])
        grid = cls(offsets, window_tokens, firsts)
        with_content = np.zeros(len(grid), dtype=bool)
        for content in cls._content_tokens(
            store, chunk_tokens
        ):  # each content token lies in a window: no token precedes its example's first
            with_content[grid.index_of(content)] = True
        grid.starts = grid.starts[with_content]  # a left-out window's special tokens never fire: no window needs them
        return grid

    @staticmethod
    def _content_tokens(store: ActivationStore, chunk_tokens: int) -> Iterator[np.ndarray]:
        """The store indices of its content (not special) tokens, a chunk at a time."""
        for start in range(0, store.n_tokens, chunk_tokens):
            yield start + np.flatnonzero(~store.special_mask(start, min(start + chunk_tokens, store.n_tokens)))

    def __len__(self) -> int:
        return len(self.starts)

    def index_of(self, tokens: np.ndarray) -> np.ndarray:
        """The window each store token lies in (-1, or the previous example's last window, for a token before any window)."""
        return np.searchsorted(self.starts, tokens, side="right") - 1

    def span(self, window: int) -> tuple[int, int, int]:
        """(example, first token, end token) of a window, in store token indices."""
        start = int(self.starts[window])
        example = int(np.searchsorted(self.doc_offsets, start, side="right")) - 1
        return example, start, min(start + self.window_tokens, int(self.doc_offsets[example + 1]))


@dataclass
class FeatureWindows:
    """One feature's activating windows: how many, the strongest, and a uniform sample, each by the store token of its maximum."""

    count: int  # activating windows in the whole store (exact)
    values: np.ndarray  # (n,) activations of the sampled windows, descending: all of them when count <= RESERVOIR
    peaks: np.ndarray  # (n,) store token index of each sampled window's maximum
    top_values: np.ndarray  # (top_n,) the strongest windows' activations, descending (exact)
    top_peaks: np.ndarray  # (top_n,) store token index of each one's maximum


def _rank_in_slot(slots: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Each entry's rank within its slot when ordered by `keys` (the last the most significant, as in np.lexsort)."""
    order = np.lexsort((*keys, slots))
    sorted_slots = slots[order]
    ranks = np.empty(len(slots), dtype=np.int64)
    ranks[order] = np.arange(len(slots)) - np.searchsorted(sorted_slots, sorted_slots, side="left")
    return ranks


def _mixed(keys: np.ndarray) -> np.ndarray:
    """splitmix64's step: 64-bit keys to 64 well-mixed bits each (numpy's unsigned arithmetic wraps, as the hash wants)."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def window_priority(seed: int, features: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """A random number in [0, 1) per (feature, window): a hash of the seed, the feature and the window's peak token, so a
    feature's sample is the same whichever other features share the pass, and so are its LLM prompts (cached answers)."""
    bits = _mixed(_mixed(_mixed(np.full(len(features), seed)) ^ features.astype(np.uint64)) ^ peaks.astype(np.uint64))
    return (bits >> np.uint64(11)) * 2.0**-53  # the top 53 bits, as a float64 takes them


class WindowReservoir:
    """Per feature: the exact count, the `top_n` strongest windows and a uniform sample of `size`, from windows added in any order.

    The sample keeps the `size` windows with the highest random priority (`window_priority`): a window outranked by `size`
    others can never come back, nor can one outranked by `top_n` stronger ones, so every `flush` entries
    the rest are dropped and memory stays at most features × (size + top_n) + flush. Windows are added by slot, a
    feature's position in `features`.
    """

    def __init__(self, features: Sequence[int], size: int, top_n: int, seed: int = 0, flush: int = 1 << 22) -> None:
        self.size, self.top_n, self.flush, self.seed = size, top_n, flush, seed
        self.features = np.asarray(features, dtype=np.int64)
        self.counts = np.zeros(len(self.features), dtype=np.int64)
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._pending = 0

    def add(self, slots: np.ndarray, values: np.ndarray, peaks: np.ndarray) -> None:
        self.counts += np.bincount(slots, minlength=len(self.counts))
        priority = window_priority(self.seed, self.features[slots], peaks)
        self._parts.append((slots.astype(np.int64), values.astype(np.float32), peaks.astype(np.int64), priority))
        self._pending += len(slots)
        if self._pending > self.flush:
            self._compact()

    def _compact(self) -> tuple[np.ndarray, ...]:
        slots, values, peaks, priority = (
            (np.concatenate(column) for column in zip(*self._parts)) if self._parts else (np.zeros(0, np.int64),) * 4
        )
        in_sample = _rank_in_slot(slots, -priority) < self.size
        keep = in_sample | (_rank_in_slot(slots, peaks, -values) < self.top_n)
        kept = (slots[keep], values[keep], peaks[keep], priority[keep])
        self._parts, self._pending = [kept], 0
        return (*kept, in_sample[keep])

    def result(self) -> list[FeatureWindows]:
        slots, values, peaks, _, in_sample = self._compact()
        strongest_first = np.lexsort((peaks, -values, slots))
        slots, values, peaks, in_sample = (
            slots[strongest_first],
            values[strongest_first],
            peaks[strongest_first],
            in_sample[strongest_first],
        )
        bounds = np.searchsorted(slots, np.arange(len(self.counts) + 1))
        windows = []
        for slot, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
            sample = slice(first, last)
            chosen = in_sample[sample]
            top = slice(first, min(last, first + self.top_n))
            windows.append(FeatureWindows(int(self.counts[slot]), values[sample][chosen], peaks[sample][chosen], values[top], peaks[top]))
        return windows


class ChunkWindows(NamedTuple):
    """One chunk's share of the pass: its windows, and each (window, feature) pair where the feature fires."""

    windows: range  # the grid's windows that start in the chunk: each window of the store is in exactly one chunk
    slots: np.ndarray  # (pairs,) the pair's feature, as a position in `features`
    values: np.ndarray  # (pairs,) the window's activation: the feature's maximum in it
    peaks: np.ndarray  # (pairs,) store token index of that maximum


@torch.no_grad()
def iter_window_activations(
    store: ActivationStore,
    sae: SparseAutoencoder,
    features: Sequence[int],
    grid: WindowGrid,
    include_special: bool = False,
    chunk_tokens: int = 4096,
) -> Iterator[ChunkWindows]:
    """One pass over the store for `features` only, a chunk at a time: where each feature fires in each window."""
    device = next(sae.parameters()).device
    columns = torch.tensor(list(features), dtype=torch.long, device=device)
    width = len(features)
    # Chunks end where a window starts, so no window is split between two chunks.
    cuts = grid.starts[np.searchsorted(grid.starts, np.arange(chunk_tokens, store.n_tokens, chunk_tokens), side="right") - 1]
    bounds = np.unique(np.concatenate([[0], cuts, [store.n_tokens]]))
    for start, stop in tqdm(zip(bounds[:-1].tolist(), bounds[1:].tolist()), total=len(bounds) - 1, desc="activating windows", unit="chunk"):
        windows = range(*np.searchsorted(grid.starts, [start, stop]).tolist())
        chunk = store.chunk(start, stop)
        codes = sae.encode(chunk.activations.float().to(device))[:, columns]
        if not include_special:
            codes[torch.from_numpy(chunk.special_mask).to(device)] = 0
        rows, slots = torch.nonzero(codes > 0, as_tuple=True)
        if not len(rows):
            yield ChunkWindows(windows, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
            continue
        token_window = grid.index_of(np.arange(start, stop))
        token_window -= token_window[0]
        cell_windows = torch.from_numpy(token_window).to(device)[rows]
        # Positive floats order like their bit patterns: a key of (activation bits, row) per firing token lets one
        # scatter-amax per (window, feature) find the window's maximum and the row it is on.
        keys = (codes[rows, slots].contiguous().view(torch.int32).long() << 32) | rows
        best = torch.full((int(token_window[-1] + 1) * width,), -1, dtype=torch.long, device=device)
        best.scatter_reduce_(0, cell_windows * width + slots, keys, reduce="amax")
        cells = torch.nonzero(best >= 0).squeeze(1)
        best = best[cells]
        values = (best >> 32).to(torch.int32).view(torch.float32)
        yield ChunkWindows(windows, (cells % width).cpu().numpy(), values.cpu().numpy(), start + (best & 0xFFFFFFFF).cpu().numpy())


def collect_windows(
    store: ActivationStore,
    sae: SparseAutoencoder,
    features: Sequence[int],
    grid: WindowGrid,
    top_n: int,
    include_special: bool = False,
    chunk_tokens: int = 4096,
    seed: int = 0,
    reservoir: int = RESERVOIR,
) -> dict[int, FeatureWindows]:
    """One pass over the store for `features` only: each one's activating windows (see the module docstring)."""
    kept = WindowReservoir(features, reservoir, top_n, seed)
    for chunk in iter_window_activations(store, sae, features, grid, include_special, chunk_tokens):
        kept.add(chunk.slots, chunk.values, chunk.peaks)
    return dict(zip(features, kept.result()))


@dataclass
class Window:
    """One window of an example, decoded token by token, with the feature's activation on each token."""

    example: int
    start: int  # position of its first token within the example
    tokens: list[str]
    activations: list[float]

    @property
    def activation(self) -> float:
        """The window's maximum: its activation, as delphi ranks windows."""
        return max(self.activations, default=0.0)

    @property
    def peak(self) -> int:
        """Index of the strongest token within the window (the first, on ties)."""
        return int(np.argmax(self.activations)) if self.activations else 0

    def text(self) -> str:
        return "".join(self.tokens)

    def marked_text(self) -> str:
        """The window on one line with its strongest token in «guillemets» (our prompts and the CSV): each token is
        `escaped_token`, so a line break in the text cannot split a window and a guillemet in it cannot pass for the mark."""
        return "".join(
            f"«{escaped_token(token)}»" if index == self.peak else escaped_token(token) for index, token in enumerate(self.tokens)
        )


LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # every character str.splitlines breaks a line at
# A backslash doubled, « and » after a backslash, and each line break as its Python escape (\n, \r, \u2028, ...).
TOKEN_ESCAPES = str.maketrans(
    {**{char: "\\" + char for char in "\\«»"}, **{char: char.encode("unicode_escape").decode() for char in LINE_BREAKS}}
)


def escaped_token(token: str) -> str:
    """A token as marked_text writes it (TOKEN_ESCAPES): an unescaped « or » is always the mark, and a window always one line."""
    return token.translate(TOKEN_ESCAPES)


def token_list(tokens: Iterable[str]) -> str:
    """Tokens as one line for a CSV cell ("a | b"), each escaped as marked_text escapes it, and its "|" as "\\|".

    So a line-break token cannot split the cell, and a token such as " | " cannot pass for the separator.
    """
    return " | ".join(escaped_token(token).replace("|", "\\|") for token in tokens)


@torch.no_grad()
def read_windows(
    store: ActivationStore,
    sae: SparseAutoencoder,
    feature: int,
    tokenizer,
    grid: WindowGrid,
    windows: Sequence[int],
    include_special: bool = False,
) -> list[Window]:
    """Windows `windows` (indices into `grid`) from the store, with `feature`'s activations, in one encode (no model run)."""
    if not len(windows):
        return []
    spans = [grid.span(int(window)) for window in windows]
    chunks = [store.chunk(start, stop) for _, start, stop in spans]
    device = next(sae.parameters()).device
    codes = sae.encode(torch.cat([chunk.activations for chunk in chunks]).float().to(device))[:, feature]
    if not include_special:
        codes[torch.from_numpy(np.concatenate([chunk.special_mask for chunk in chunks])).to(device)] = 0
    per_window = codes.cpu().split([len(chunk.token_ids) for chunk in chunks])
    return [
        Window(example, start - int(store.doc_offsets[example]), token_texts(tokenizer, chunk.token_ids.tolist()), values.tolist())
        for (example, start, _), chunk, values in zip(spans, chunks, per_window)
    ]


def non_activating_windows(
    store: ActivationStore,
    sae: SparseAutoencoder,
    feature: int,
    tokenizer,
    grid: WindowGrid,
    count: int,
    rng: np.random.Generator,
    include_special: bool = False,
) -> list[Window]:
    """`count` windows drawn at random from those where the feature never fires (delphi's random non-activating windows).

    Candidates are drawn uniformly without replacement and kept when the feature is silent on every
    token and the window holds a content token (not only chat-template ones); fewer come back only when
    the store has fewer such windows.
    """
    found: list[Window] = []
    candidates = rng.permutation(len(grid))
    batch = max(2 * count, 64)
    for first in range(0, len(candidates), batch):
        drawn = candidates[first : first + batch]
        content = [not store.special_mask(*grid.span(int(window))[1:]).all() for window in drawn]
        windows = read_windows(store, sae, feature, tokenizer, grid, drawn[np.flatnonzero(content)], include_special)
        found += [window for window in windows if window.activation <= 0]
        if len(found) >= count:
            return found[:count]
    return found
