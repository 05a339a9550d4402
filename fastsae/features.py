"""Per-feature statistics from one streaming pass over the store: what each SAE feature fires on.

For every feature: firing frequency, mean (over firing tokens) and max activation, a histogram
of its activations, its top-N activating tokens (kept with a chunked top-k merge, so memory is
bounded by M × N, not by the store), one random token per histogram bin (weaker activations, for
scoring explanations), and each example's max activation (the text-level view
HypotheSAEs uses). With labels per example: the label each feature fires on most, by AUROC of
the example-level activation. Logit lens: the tokens a decoder direction most promotes and
suppresses through the unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastsae.sae import SparseAutoencoder
from fastsae.store import ActivationStore

HISTOGRAM_EDGES = torch.logspace(-3, 4, 57)  # activations from 0.001 to 10,000, 8 bins a decade


@dataclass
class FeatureStatistics:
    """Everything the interpretation step reads about the features; arrays are indexed by feature."""

    n_tokens: int
    frequency: np.ndarray  # (M,) fraction of tokens the feature fires on
    mean_activation: np.ndarray  # (M,) over the tokens it fires on (0 if it never fires)
    max_activation: np.ndarray  # (M,)
    histogram: np.ndarray  # (M, len(HISTOGRAM_EDGES) - 1) counts of firing activations per log bin
    top_values: np.ndarray  # (M, N) largest activations, descending (0 where fewer than N tokens fired)
    top_tokens: np.ndarray  # (M, N) store index of the token of each top value (-1 where none)
    example_max: np.ndarray  # (n_examples, M) each example's max activation of each feature (may be memory-mapped)
    bin_samples: np.ndarray  # (M, bins) one token drawn at random from each histogram bin (-1 where the bin is empty)

    def samples_across_quantiles(self, feature: int, count: int, exclude: set[int]) -> list[int]:
        """Up to `count` store tokens spread over the feature's activation range, weak to strong, not in `exclude`.

        Scoring on these, not only on the top activations, tests whether the explanation covers the whole feature.
        """
        candidates = [int(token) for token in self.bin_samples[feature] if token >= 0 and int(token) not in exclude]
        if len(candidates) <= count:
            return candidates
        picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
        return [candidates[index] for index in picks]



@torch.no_grad()
def collect_feature_statistics(
    store: ActivationStore,
    sae: SparseAutoencoder,
    top_n: int = 20,
    chunk_tokens: int = 4096,
    include_special: bool = False,
    example_max_file: Path | None = None,
) -> FeatureStatistics:
    """One pass over the store; `sae` applies to raw store activations (as `load_sae` returns it).

    The (examples × M) example-level maxima grow with the store: give `example_max_file` to keep
    them memory-mapped on disk instead of in RAM. Everything else is bounded by M × (N + bins).
    """
    device = next(sae.parameters()).device
    m = sae.spec.m
    fire_counts = torch.zeros(m, dtype=torch.float64, device=device)
    activation_sums = torch.zeros(m, dtype=torch.float64, device=device)
    maxima = torch.zeros(m, device=device)
    histogram = torch.zeros(m, len(HISTOGRAM_EDGES) - 1, dtype=torch.long, device=device)
    edges = HISTOGRAM_EDGES.to(device)
    top_values = torch.zeros(m, top_n, device=device)
    top_tokens = torch.full((m, top_n), -1, dtype=torch.long, device=device)
    shape = (store.n_examples, m)
    if example_max_file is None:
        example_max = np.zeros(shape, dtype=np.float32)
    else:
        example_max = np.lib.format.open_memmap(example_max_file, mode="w+", dtype=np.float32, shape=shape)
    # Reservoir of one per (feature, bin): keep the entry with the highest random priority; the
    # priority's low 32 bits carry the token index, so one scatter_reduce(amax) does the draw.
    bin_priority = torch.full((m * histogram.shape[1],), -1, dtype=torch.long, device=device)
    draw = torch.Generator(device=device).manual_seed(0)
    counted = 0
    for chunk in tqdm(store.iter_chunks(chunk_tokens), total=-(-store.n_tokens // chunk_tokens), desc="feature statistics", unit="chunk"):
        codes = sae.encode(chunk.activations.float().to(device))
        if not include_special:
            codes[torch.from_numpy(chunk.special_mask).to(device)] = 0
            counted += int((~chunk.special_mask).sum())
        else:
            counted += len(codes)
        active = codes > 0
        fire_counts += active.sum(0)
        activation_sums += codes.sum(0)
        maxima = torch.maximum(maxima, codes.max(0).values)
        bins = torch.bucketize(codes, edges) - 1  # bin of each activation; below the first edge → -1
        in_range = active & (bins >= 0) & (bins < histogram.shape[1])
        feature_ids = torch.arange(m, device=device).expand_as(codes)
        cells = (feature_ids * histogram.shape[1] + bins)[in_range]
        histogram.view(-1).index_add_(0, cells, torch.ones_like(cells))
        tokens = torch.arange(chunk.start, chunk.start + len(codes), device=device)[:, None].expand_as(codes)[in_range]
        keys = torch.randint(0, 2**30, (len(cells),), generator=draw, device=device)
        bin_priority.scatter_reduce_(0, cells, (keys << 32) | tokens, reduce="amax")
        # Chunked top-k merge: the kept N and this chunk's tokens compete, per feature.
        positions = torch.arange(chunk.start, chunk.start + len(codes), device=device).expand(m, -1)
        candidates = torch.cat([top_values, codes.T], 1)
        merged = candidates.topk(top_n, dim=1)
        top_values = merged.values
        top_tokens = torch.cat([top_tokens, positions], 1).gather(1, merged.indices)
        token_example = np.searchsorted(store.doc_offsets, np.arange(chunk.start, chunk.start + len(codes)), side="right") - 1
        # The chunk's examples are consecutive: reduce into a small block, then merge it into their rows.
        first, last = int(token_example[0]), int(token_example[-1])
        local_ids = torch.from_numpy(token_example - first).to(device)[:, None].expand_as(codes)
        block = torch.zeros(last - first + 1, m, device=device).scatter_reduce_(0, local_ids, codes, reduce="amax")
        example_max[first : last + 1] = np.maximum(example_max[first : last + 1], block.cpu().numpy())
    top_tokens[top_values <= 0] = -1
    frequency = fire_counts / max(counted, 1)
    return FeatureStatistics(
        n_tokens=counted,
        frequency=frequency.cpu().numpy(),
        mean_activation=(activation_sums / fire_counts.clamp_min(1)).cpu().numpy(),
        max_activation=maxima.cpu().numpy(),
        histogram=histogram.cpu().numpy(),
        top_values=top_values.cpu().numpy(),
        top_tokens=top_tokens.cpu().numpy(),
        example_max=example_max,
        bin_samples=torch.where(bin_priority >= 0, bin_priority & (2**32 - 1), -1).view(m, -1).cpu().numpy(),
    )


def label_association(example_max: np.ndarray, labels: list[str | None], feature_chunk: int = 512) -> pd.DataFrame:
    """Per feature: the label whose examples it fires on most, by AUROC of the example-level max activation.

    AUROC of a label = P(a random example with the label activates the feature more than one without),
    ties counting half; computed from average ranks (the Mann-Whitney statistic).
    """
    m = example_max.shape[1]
    labelled = np.flatnonzero([label is not None for label in labels])
    best_label = np.full(m, None, dtype=object)
    best_auroc = np.full(m, np.nan if len(labelled) < 2 else -np.inf)
    if len(labelled) < 2:
        return pd.DataFrame({"top_label": best_label, "top_label_auroc": best_auroc})
    names = np.array([labels[index] for index in labelled])
    for start in range(0, m, feature_chunk):  # a block of features at a time: memory-mapped maxima stay on disk
        columns = slice(start, min(start + feature_chunk, m))
        ranks = pd.DataFrame(np.asarray(example_max[labelled, columns])).rank(axis=0, method="average").to_numpy()
        for label in sorted(set(names)):
            positive = names == label
            n_positive, n_negative = int(positive.sum()), int((~positive).sum())
            if not n_positive or not n_negative:
                continue
            auroc = (ranks[positive].sum(0) - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
            better = auroc > best_auroc[columns]
            best_label[columns][better], best_auroc[columns][better] = label, auroc[better]
    return pd.DataFrame({"top_label": best_label, "top_label_auroc": best_auroc})


@torch.no_grad()
def logit_lens(decoder_directions: torch.Tensor, unembedding: torch.Tensor, k: int = 10, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(M, k) token ids each feature's decoder direction most promotes, and most suppresses, through W_U."""
    promoted, suppressed = [], []
    directions = decoder_directions.float()
    weights = unembedding.float()
    for start in range(0, len(directions), chunk):
        logits = directions[start : start + chunk] @ weights.T
        promoted.append(logits.topk(k, dim=1).indices)
        suppressed.append((-logits).topk(k, dim=1).indices)
    return torch.cat(promoted).numpy(), torch.cat(suppressed).numpy()


@dataclass
class TokenContext:
    """A window of tokens around one activation of a feature, with the feature's activation on each token."""

    example: int
    position: int  # of the firing token, within the example
    activation: float
    tokens: list[str]  # decoded tokens of the window
    activations: list[float]  # the feature's activation on each token of the window
    focus: int  # index of the firing token within `tokens`

    def marked_text(self) -> str:
        """The window as text with the firing token in «guillemets» (prompts and the CSV)."""
        return "".join(f"«{token}»" if index == self.focus else token for index, token in enumerate(self.tokens))


@torch.no_grad()
def contexts_at(store: ActivationStore, sae: SparseAutoencoder, feature: int, tokenizer, tokens: list[int], window: int = 12) -> list[TokenContext]:
    """Each store token in `tokens` with ±`window` tokens of its example (from the store; no model run)."""
    device = next(sae.parameters()).device
    contexts = []
    for token in tokens:
        example = int(np.searchsorted(store.doc_offsets, token, side="right")) - 1
        position = int(token - store.doc_offsets[example])
        stored = store.example(example)
        start, stop = max(0, position - window), min(len(stored.token_ids), position + window + 1)
        codes = sae.encode(stored.activations[start:stop].float().to(device))[:, feature].cpu()
        texts = [tokenizer.decode([int(token_id)]) for token_id in stored.token_ids[start:stop]]
        contexts.append(TokenContext(example, position, float(codes[position - start]), texts, codes.tolist(), position - start))
    return contexts


def top_contexts(
    store: ActivationStore, sae: SparseAutoencoder, statistics: FeatureStatistics, feature: int, tokenizer, window: int = 12, limit: int = 5
) -> list[TokenContext]:
    """Up to `limit` of a feature's top activations, strongest first, each in its window of tokens."""
    tokens = [int(token) for token, value in zip(statistics.top_tokens[feature], statistics.top_values[feature]) if token >= 0 and value > 0]
    return contexts_at(store, sae, feature, tokenizer, tokens[:limit], window)


def non_activating_contexts(
    store: ActivationStore, statistics: FeatureStatistics, feature: int, tokenizer, window: int, count: int, seed: int
) -> list[str]:
    """Text windows from examples where the feature never fires (a seeded sample), for contrast."""
    silent = np.flatnonzero(statistics.example_max[:, feature] == 0)
    rng = np.random.default_rng([seed, feature])
    texts = []
    for example in rng.permutation(silent)[:count]:
        stored = store.example(int(example))
        content = np.flatnonzero(~stored.special_mask)
        centre = int(rng.choice(content)) if len(content) else len(stored.token_ids) // 2
        start, stop = max(0, centre - window), min(len(stored.token_ids), centre + window + 1)
        texts.append(tokenizer.decode([int(token) for token in stored.token_ids[start:stop]]))
    return texts
