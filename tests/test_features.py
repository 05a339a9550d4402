"""Feature statistics from the streaming pass equal a brute-force computation over the whole store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastsae.core.sae import SparseAutoencoder
from fastsae.interpret.features import collect_feature_statistics, label_association, logit_lens, unembedding_matrix
from fastsae.store.activation_store import ActivationStore


def brute_force_codes(store: ActivationStore, sae: SparseAutoencoder) -> torch.Tensor:
    with torch.no_grad():
        codes = sae.encode(store.activations(0, store.n_tokens).float())
    codes[torch.from_numpy(store.special_mask(0, store.n_tokens))] = 0
    return codes


def test_streaming_statistics_equal_brute_force(store_and_sae):
    store, sae = store_and_sae
    stats = collect_feature_statistics(store, sae, chunk_tokens=1000)  # odd chunks: merges cross shard and chunk ends
    codes = brute_force_codes(store, sae)
    content = int((~store.special_mask(0, store.n_tokens)).sum())
    assert stats.n_tokens == content
    np.testing.assert_allclose(stats.frequency, ((codes > 0).sum(0) / content).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.max_activation, codes.max(0).values.numpy(), rtol=1e-6)
    assert stats.histogram.sum() == int((codes > 1e-3).sum())  # every firing activation above the first edge is binned once
    for example in (0, 5, store.n_examples - 1):
        start, stop = store.doc_offsets[example], store.doc_offsets[example + 1]
        np.testing.assert_allclose(stats.example_max[example], codes[start:stop].max(0).values.numpy(), rtol=1e-6)


def test_label_auroc_equals_pairwise_comparison():
    rng = np.random.default_rng(0)
    labels = ["a"] * 30 + ["b"] * 20 + [None] * 5
    example_max = rng.random((55, 4))
    example_max[:30, 2] += 0.8  # feature 2 fires more on label a
    example_max[:10, 3] = 0.0  # ties at zero
    table = label_association(example_max, labels)
    assert table.loc[2, "top_label"] == "a" and table.loc[2, "top_label_auroc"] > 0.9
    values = example_max[:50]
    names = np.array(labels[:50])
    for feature in range(4):
        label = table.loc[feature, "top_label"]
        positive, negative = values[names == label, feature], values[names != label, feature]
        pairwise = ((positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])).mean()
        assert table.loc[feature, "top_label_auroc"] == pytest.approx(pairwise)


def test_no_label_is_named_where_no_label_can_be_told_apart():
    """One label for every example gave -inf; a feature silent on every labelled example tied all labels at 0.5 and named
    the alphabetically first."""
    rng = np.random.default_rng(0)
    example_max = rng.random((12, 3))
    example_max[:, 1] = 0.0  # never fires
    one_label = label_association(example_max, ["b"] * 10 + [None] * 2)
    assert one_label["top_label"].isna().all() and one_label["top_label_auroc"].isna().all()
    two_labels = label_association(example_max, ["b", "a"] * 5 + [None] * 2)
    assert pd.isna(two_labels.loc[1, "top_label"]) and np.isnan(two_labels.loc[1, "top_label_auroc"])
    assert two_labels.loc[[0, 2], "top_label"].isin(["a", "b"]).all() and two_labels.loc[[0, 2], "top_label_auroc"].between(0.5, 1).all()


def test_logit_lens_equals_the_full_product():
    torch.manual_seed(0)
    directions, unembedding = torch.randn(50, 16), torch.randn(300, 16)
    promoted, suppressed = logit_lens(directions, unembedding, k=5, chunk=7)
    logits = directions @ unembedding.T
    np.testing.assert_array_equal(promoted, logits.topk(5, dim=1).indices.numpy())
    np.testing.assert_array_equal(suppressed, (-logits).topk(5, dim=1).indices.numpy())


def test_example_maxima_can_live_on_disk(store_and_sae, tmp_path):
    store, sae = store_and_sae
    in_memory = collect_feature_statistics(store, sae)
    on_disk = collect_feature_statistics(store, sae, example_max_file=tmp_path / "example_max.npy")
    assert isinstance(on_disk.example_max, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk.example_max), in_memory.example_max)
    labels = ["a" if index % 3 else "b" for index in range(store.n_examples)]
    chunked = label_association(on_disk.example_max, labels, feature_chunk=10)
    whole = label_association(in_memory.example_max, labels)
    assert chunked.equals(whole)


@pytest.mark.parametrize(("model_type", "gain_of"), [("llama", lambda weight: weight), ("gemma2", lambda weight: 1 + weight)])
def test_the_unembedding_folds_in_the_final_norms_own_gain(model_type, gain_of):
    """Gemma's RMSNorm multiplies by 1 + weight, Llama's by weight: the fold takes what the layer does, not its parameter."""
    shapes = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shapes, pad_token_id=0)).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(32) * 2 - 0.5)
    expected = model.lm_head.weight * gain_of(model.model.norm.weight)
    assert torch.allclose(unembedding_matrix(model), expected.detach(), rtol=1e-5, atol=1e-6)
