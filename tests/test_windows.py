"""Activating windows from the streaming pass equal a brute-force cut of the whole store, and delphi's quantile
sampling spreads the explainer's and the scorers' windows evenly over a feature's activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.interpret.explanations import numbered_windows
from fastsae.interpret.sampling import quantile_of_each, sample_windows
from fastsae.interpret.windows import (
    Window,
    WindowGrid,
    WindowReservoir,
    collect_windows,
    non_activating_windows,
    read_windows,
    token_list,
)
from fastsae.lm.data import load_dataset
from fastsae.store.activation_store import ActivationStore

M, W, TOP = 96, 32, 7  # M: the features of conftest's store_and_sae


def window_maxima(store: ActivationStore, sae: SparseAutoencoder, grid: WindowGrid) -> torch.Tensor:
    """(windows, M) each window's maximum, from codes of the whole store with special tokens zeroed."""
    with torch.no_grad():
        codes = sae.encode(store.activations(0, store.n_tokens).float())
    codes[torch.from_numpy(store.special_mask(0, store.n_tokens))] = 0
    ids = torch.from_numpy(grid.index_of(np.arange(store.n_tokens)))[:, None].expand_as(codes)
    return torch.zeros(len(grid), M).scatter_reduce_(0, ids, codes, reduce="amax"), codes


def test_windows_cut_each_example_from_its_first_token():
    grid = WindowGrid(np.array([0, 5, 5, 70, 102]), W)  # a 5-token example, an empty one, 65 tokens, exactly 32
    assert grid.starts.tolist() == [0, 5, 37, 69, 70]
    assert [grid.span(window) for window in range(len(grid))] == [(0, 0, 5), (2, 5, 37), (2, 37, 69), (2, 69, 70), (3, 70, 102)]


def test_windows_can_start_after_the_leading_chat_template(store_and_sae):
    store, _ = store_and_sae
    grid = WindowGrid.after_leading_template(store, W)
    mask = store.special_mask(0, store.n_tokens)
    firsts = [start + int(np.argmin(mask[start:stop])) for start, stop in zip(store.doc_offsets[:-1], store.doc_offsets[1:])]
    assert mask[: firsts[0]].all() and firsts[0] > 0  # the default data is chat-templated
    window_examples = np.searchsorted(store.doc_offsets, grid.starts, side="right") - 1
    first_windows = np.unique(window_examples, return_index=True)[1]
    assert grid.starts[first_windows].tolist() == firsts


def test_every_window_after_the_leading_template_holds_a_content_token(store_and_sae):
    """An example's closing <|im_end|> and newline, cut off on their own, were a window: shown and drawn as silent."""
    store, _ = store_and_sae
    mask = store.special_mask(0, store.n_tokens)
    grid = WindowGrid.after_leading_template(store, W)
    spans = [grid.span(window) for window in range(len(grid))]
    assert all(not mask[start:stop].all() for _, start, stop in spans)
    content = np.flatnonzero(~mask)
    starts, stops = np.array([span[1:] for span in spans]).T
    windows = grid.index_of(content)
    assert ((starts[windows] <= content) & (content < stops[windows])).all()  # every content token is still in its window
    firsts = np.array([start + int(np.argmin(mask[start:stop])) for start, stop in zip(store.doc_offsets[:-1], store.doc_offsets[1:])])
    every = WindowGrid(store.doc_offsets, W, firsts)
    assert len(every) > len(grid)  # the store has template-only windows to leave out


def test_streamed_windows_equal_brute_force(store_and_sae):
    store, sae = store_and_sae
    grid = WindowGrid(store.doc_offsets, W)
    maxima, codes = window_maxima(store, sae, grid)
    features = [int(f) for f in torch.argsort((maxima > 0).sum(0), descending=True)[::9]]
    exact = collect_windows(store, sae, features, grid, TOP, chunk_tokens=1000)  # odd chunks: they end on window starts
    sampled = collect_windows(store, sae, features, grid, TOP, chunk_tokens=1000, reservoir=11)
    for feature in features:
        column = maxima[:, feature]
        fired = column[column > 0].numpy()
        windows = exact[feature]
        assert windows.count == len(fired) == sampled[feature].count
        np.testing.assert_array_equal(windows.values, np.sort(fired)[::-1])  # every window once, strongest first
        np.testing.assert_array_equal(windows.top_values, np.sort(fired)[::-1][:TOP])
        np.testing.assert_array_equal(sampled[feature].top_values, windows.top_values)  # the top survives the small reservoir
        assert len(sampled[feature].values) == min(11, len(fired)) and set(sampled[feature].peaks) <= set(windows.peaks)
        peaks = windows.peaks
        np.testing.assert_array_equal(codes[peaks, feature].numpy(), windows.values)  # each peak is its window's maximum
        assert len(set(grid.index_of(peaks).tolist())) == len(peaks)  # one entry per window


def test_windows_read_back_with_their_activations(store_and_sae, smollm2_tokenizer):
    store, sae = store_and_sae
    grid = WindowGrid(store.doc_offsets, W)
    feature = 3
    found = collect_windows(store, sae, [feature], grid, TOP)[feature]
    top = read_windows(store, sae, feature, smollm2_tokenizer, grid, grid.index_of(found.top_peaks))
    assert [window.activation for window in top] == pytest.approx(found.top_values.tolist(), rel=1e-5)
    spans = [(window.example, window.start) for window in top]
    assert len(set(spans)) == len(top) and all(window.start % W == 0 and len(window.tokens) <= W for window in top)
    for window, peak in zip(top, found.top_peaks):
        assert store.doc_offsets[window.example] + window.start + window.peak == peak
        assert window.marked_text().count("«") == 1 and f"«{window.tokens[window.peak]}»" in window.marked_text()
    silent = non_activating_windows(store, sae, feature, smollm2_tokenizer, grid, 20, np.random.default_rng(0))
    assert len(silent) == 20 and all(window.activation == 0 for window in silent)
    assert len({(window.example, window.start) for window in silent}) == 20


def test_each_token_shows_the_text_it_adds_whole_characters_and_leading_spaces(tiny_llama, smollm2_tokenizer, tmp_path):
    """SmolLM2's byte-level tokens split 日, é's neighbours and emoji over several tokens; each decoded alone is "\ufffd",
    so a window of Japanese read as "���本���"."""
    texts = ["I would fly to 日本語 🙂 tomorrow, naïve as that is.", "東京 or ✓ café: « quotes » & <tags>"]
    dataset = write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in texts])
    config = ExtractConfig(dataset=str(dataset), layers=[1], output_dir=str(tmp_path / "stores"))
    (folder,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    store = ActivationStore(folder)
    sae = SparseAutoencoder(SAESpec("topk", store.d, 8, 2)).eval()
    grid = WindowGrid(store.doc_offsets, 4096)  # one window a whole example: no character cut at a window's edge
    windows = read_windows(store, sae, 0, smollm2_tokenizer, grid, range(len(grid)), include_special=True)
    for window, text in zip(windows, texts):
        ids = store.token_ids(*grid.span(window.example)[1:]).tolist()
        assert len(window.tokens) == len(ids)  # still one text per token, so activations line up
        assert window.text() == smollm2_tokenizer.decode(ids) and text in window.text() and "\ufffd" not in window.text()
    tokens = windows[0].tokens
    assert " would" in tokens and " 日" in tokens and "語" in tokens and " 🙂" in tokens  # each completes its character


def split_at_marks(marked: str) -> list[str]:
    """The text before, inside and after the unescaped « » marks; a backslash escapes the character after it."""
    pieces, piece, chars = [], "", iter(marked)
    for char in chars:
        if char == "\\":
            piece += char + next(chars)
        elif char in "«»":
            pieces, piece = [*pieces, piece], ""
        else:
            piece += char
    return [*pieces, piece]


def test_a_marked_window_is_one_unambiguous_line():
    """A decoded token holding a line break split a window over lines; one holding « or » could not be told from the mark."""
    tokens = ["Dear", " «Bob»", ",\n\n", "see", " C:\\new", "»", "\r\u2028"]
    window = Window(0, 0, tokens, [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    marked = window.marked_text()
    assert marked == "Dear \\«Bob\\»,\\n\\nsee C:\\\\new«\\»»\\r\\u2028"
    assert len(marked.splitlines()) == 1
    assert split_at_marks(marked) == ["Dear \\«Bob\\»,\\n\\nsee C:\\\\new", "\\»", "\\r\\u2028"]  # the peak, escaped, alone
    assert numbered_windows([window, window]).splitlines() == [f"1. [2.00] {marked}", f"2. [2.00] {marked}"]


def lognormal_windows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A simulated feature: `count` window activations, log-normal, and a stand-in peak token for each."""
    values = np.random.default_rng(seed).lognormal(0.0, 1.5, count).astype(np.float32)
    return values, np.arange(count, dtype=np.int64)


def true_quantile(values: np.ndarray, peaks: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Quantile (0 = the strongest tenth) of each chosen window among all of them."""
    order = np.argsort(-values, kind="stable")
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values))
    return quantile_of_each(len(values), 10)[rank[np.searchsorted(peaks, chosen)]]


def test_samples_fall_evenly_across_the_quantiles_of_a_lognormal_feature():
    values, peaks = lognormal_windows(5_000)
    reservoir = WindowReservoir([0], size=100_000, top_n=40)
    reservoir.add(np.zeros(len(values), dtype=np.int64), values, peaks)
    (windows,) = reservoir.result()
    rng = np.random.default_rng(0)
    sample = sample_windows(windows, 40, 50, 10, explain_from_top=False, rng=rng)
    assert np.bincount(true_quantile(values, peaks, sample.explain), minlength=10).tolist() == [4] * 10
    assert np.bincount(true_quantile(values, peaks, sample.score), minlength=10).tolist() == [5] * 10
    assert (true_quantile(values, peaks, sample.score) == sample.score_quantiles).all()
    assert not set(sample.explain) & set(sample.score)  # never scored on what the explainer saw
    top = sample_windows(windows, 40, 50, 10, explain_from_top=True, rng=rng)
    assert set(top.explain) == set(np.argsort(-values)[:40]) and not set(top.explain) & set(top.score)

    # Streamed through a reservoir of 1,000 out of 50,000 (in pieces, so it is compacted along the way), the scored
    # windows still fall close to evenly across the feature's true quantiles, and the top stays exact.
    values, peaks = lognormal_windows(50_000, seed=1)
    reservoir = WindowReservoir([0], size=1_000, top_n=40, flush=3_000)
    for piece in np.array_split(np.random.default_rng(2).permutation(len(values)), 25):
        reservoir.add(np.zeros(len(piece), dtype=np.int64), values[piece], peaks[piece])
    (windows,) = reservoir.result()
    assert windows.count == 50_000 and len(windows.values) == 1_000
    np.testing.assert_array_equal(windows.top_values, np.sort(values)[::-1][:40])
    counts = np.bincount(true_quantile(values, peaks, sample_windows(windows, 40, 50, 10, False, rng).score), minlength=10)
    assert counts.sum() == 50 and counts.min() >= 3 and counts.max() <= 7, counts


def test_a_token_list_cell_is_one_line_whatever_its_tokens():
    """top_tokens and the logit-lens columns: SmolLM2's newline tokens split the cell across lines."""
    assert token_list(["\n", " would", "\n\n", "«"]) == "\\n |  would | \\n\\n | \\«"
    assert "\n" not in token_list(["a\r\nb", "\u2028"])
    cell = token_list([" | ", "a|b", "c"])
    assert cell == " \\|  | a\\|b | c"
    assert cell.split(" | ") == [" \\| ", "a\\|b", "c"]  # every "|" of a token is escaped, so " | " only separates


def test_a_features_sampled_windows_do_not_depend_on_the_other_features_chosen(store_and_sae):
    """A feature with more activating windows than the reservoir keeps was sampled with random numbers drawn for every
    chosen feature in turn: adding features (frequency:100, then 200) changed its sample, so its explainer and scorer
    windows, and every cached LLM answer about it was asked and paid for again."""
    store, sae = store_and_sae
    grid = WindowGrid(store.doc_offsets, W)
    maxima, _ = window_maxima(store, sae, grid)
    busiest = [int(f) for f in torch.argsort((maxima > 0).sum(0), descending=True)[:12]]
    alone = collect_windows(store, sae, busiest[:1], grid, TOP, chunk_tokens=1000, reservoir=11)[busiest[0]]
    among = collect_windows(store, sae, busiest, grid, TOP, chunk_tokens=1000, reservoir=11)[busiest[0]]
    assert alone.count > 11 and len(alone.peaks) == 11
    np.testing.assert_array_equal(alone.peaks, among.peaks)
    other_seed = collect_windows(store, sae, busiest[:1], grid, TOP, chunk_tokens=1000, seed=1, reservoir=11)[busiest[0]]
    assert set(other_seed.peaks) != set(alone.peaks)  # still a random sample, which SEED draws
