"""Per-feature statistics from one streaming pass over the store: how often and how strongly each SAE feature fires.

For every feature: firing frequency, mean (over firing tokens) and max activation, a histogram
of its activations, and each example's max activation (the text-level view HypotheSAEs uses).
With labels per example: the label each feature fires on most, by AUROC of the example-level
activation. Logit lens: the tokens a decoder direction most promotes and suppresses through the
unembedding. The windows a feature fires in (its contexts, for the LLM and the CSV) come from a
second pass over the chosen features only: fastsae/interpret/windows.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastsae.core.sae import SparseAutoencoder
from fastsae.store.activation_store import ActivationStore

HISTOGRAM_EDGES = torch.logspace(-3, 4, 57)  # activations from 0.001 to 10,000, 8 bins a decade


@dataclass
class FeatureStatistics:
    """Everything the interpretation step reads about the features; arrays are indexed by feature."""

    n_tokens: int
    frequency: np.ndarray  # (M,) fraction of tokens the feature fires on
    mean_activation: np.ndarray  # (M,) over the tokens it fires on (0 if it never fires)
    max_activation: np.ndarray  # (M,)
    histogram: np.ndarray  # (M, len(HISTOGRAM_EDGES) - 1) counts of firing activations per log bin
    example_max: np.ndarray  # (n_examples, M) each example's max activation of each feature (may be memory-mapped)


@torch.no_grad()
def collect_feature_statistics(
    store: ActivationStore,
    sae: SparseAutoencoder,
    chunk_tokens: int = 4096,
    include_special: bool = False,
    example_max_file: Path | None = None,
) -> FeatureStatistics:
    """One pass over the store; `sae` applies to raw store activations (as `load_sae` returns it).

    The (examples × M) example-level maxima grow with the store: give `example_max_file` to keep
    them memory-mapped on disk instead of in RAM. Everything else is bounded by M × bins.
    """
    device = next(sae.parameters()).device
    m = sae.spec.m
    fire_counts = torch.zeros(m, dtype=torch.float64, device=device)
    activation_sums = torch.zeros(m, dtype=torch.float64, device=device)
    maxima = torch.zeros(m, device=device)
    histogram = torch.zeros(m, len(HISTOGRAM_EDGES) - 1, dtype=torch.long, device=device)
    edges = HISTOGRAM_EDGES.to(device)
    shape = (store.n_examples, m)
    if example_max_file is None:
        example_max = np.zeros(shape, dtype=np.float32)
    else:
        example_max = np.lib.format.open_memmap(example_max_file, mode="w+", dtype=np.float32, shape=shape)
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
        token_example = np.searchsorted(store.doc_offsets, np.arange(chunk.start, chunk.start + len(codes)), side="right") - 1
        # The chunk's examples are consecutive: reduce into a small block, then merge it into their rows.
        first, last = int(token_example[0]), int(token_example[-1])
        local_ids = torch.from_numpy(token_example - first).to(device)[:, None].expand_as(codes)
        block = torch.zeros(last - first + 1, m, device=device).scatter_reduce_(0, local_ids, codes, reduce="amax")
        example_max[first : last + 1] = np.maximum(example_max[first : last + 1], block.cpu().numpy())
    frequency = fire_counts / max(counted, 1)
    return FeatureStatistics(
        n_tokens=counted,
        frequency=frequency.cpu().numpy(),
        mean_activation=(activation_sums / fire_counts.clamp_min(1)).cpu().numpy(),
        max_activation=maxima.cpu().numpy(),
        histogram=histogram.cpu().numpy(),
        example_max=example_max,
    )


def label_association(example_max: np.ndarray, labels: list[str | None], feature_chunk: int = 512) -> pd.DataFrame:
    """Per feature: the label whose examples it fires on most, by AUROC of the example-level max activation.

    AUROC of a label = P(a random example with the label activates the feature more than one without),
    ties counting half; computed from average ranks (the Mann-Whitney statistic). No label and NaN where
    there is nothing to tell apart: fewer than two distinct labels (no label has examples on both sides),
    or a feature silent on every labelled example (every label would tie at 0.5).
    """
    m = example_max.shape[1]
    labelled = np.flatnonzero([label is not None for label in labels])
    best_label = np.full(m, None, dtype=object)
    best_auroc = np.full(m, np.nan)
    names = np.array([labels[index] for index in labelled])
    if len(set(names)) < 2:
        return pd.DataFrame({"top_label": best_label, "top_label_auroc": best_auroc})
    best_auroc[:] = -np.inf
    for start in range(0, m, feature_chunk):  # a block of features at a time: memory-mapped maxima stay on disk
        columns = slice(start, min(start + feature_chunk, m))
        values = np.asarray(example_max[labelled, columns])
        ranks = pd.DataFrame(values).rank(axis=0, method="average").to_numpy()
        for label in sorted(set(names)):
            positive = names == label
            n_positive, n_negative = int(positive.sum()), int((~positive).sum())
            auroc = (ranks[positive].sum(0) - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
            better = auroc > best_auroc[columns]
            best_label[columns][better], best_auroc[columns][better] = label, auroc[better]
        silent = ~(values > 0).any(0)
        best_label[columns][silent], best_auroc[columns][silent] = None, np.nan
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
    return torch.cat(promoted).cpu().numpy(), torch.cat(suppressed).cpu().numpy()


@torch.no_grad()
def unembedding_matrix(model: torch.nn.Module) -> torch.Tensor:
    """W_U, with the final norm's gain folded in when the model has one (what a direction meets before the LM head)."""
    weights = model.get_output_embeddings().weight.detach().float()
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    return weights if final_norm is None else weights * norm_gain(final_norm, weights.shape[1]).to(weights.device)


def norm_gain(norm: torch.nn.Module, d: int) -> torch.Tensor:
    """The per-dimension gain a normalisation layer applies, read off the layer itself rather than its `weight`.

    Gemma's RMSNorm multiplies by 1 + weight where Llama's multiplies by weight. A vector of ±c has mean 0 and
    root-mean-square c, so both an RMSNorm and a LayerNorm (of even width) turn it into ±1 times their gain,
    and half the difference of the layer at it and at its negative cancels a LayerNorm's bias.
    """
    like = next(norm.parameters(), torch.empty(0))
    signs = torch.ones(1, d, dtype=like.dtype, device=like.device)
    signs[:, 1::2] = -1
    scaled = 64 * signs  # so that the norm's epsilon vanishes; 64² still fits float16
    return ((norm(scaled) - norm(-scaled)) * signs / 2)[0].float()
