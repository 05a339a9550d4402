"""LoRA-adapter activations: stored lora_A outputs equal x @ A.T by hand, are named per dimension, and train, evaluate and interpret."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY_LAYERS, make_tiny_llama
from fastsae.common.errors import UserError
from fastsae.common.stage import Output
from fastsae.evaluate.evaluate_sae import STAGE as EVALUATE_STAGE
from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae
from fastsae.extract.extract_activations import STAGE as EXTRACT_STAGE
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae
from fastsae.lm.data import load_dataset
from fastsae.lm.hook_points import decoder_layers
from fastsae.lm.lora import LORA_MODULE_TYPES, adapter_fingerprint, lora_capture
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, train_saes
from test_extract import max_relative_difference

REPO = Path(__file__).resolve().parents[1]
# peft's get_peft_model (used here only to make an adapter) calls an API transformers has deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
R = 2
ALPHA = 4
CHOSEN = ["v_proj", "q_proj", "down_proj"]  # a subset, not in the usual order: the store follows this order


def save_random_adapter(folder: Path, vocab_size: int, target_modules: list[str]) -> Path:
    """A LoRA adapter on the tiny Llama with random nonzero A and B (peft starts B at zero, which would hide mistakes)."""
    model = get_peft_model(make_tiny_llama(vocab_size), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.5, target_modules=target_modules))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return folder


def has_lora_layers(model: nn.Module) -> bool:
    return any(hasattr(module, "lora_A") for module in model.modules())


@pytest.fixture(scope="module")
def vocab_size(smollm2_tokenizer) -> int:
    return len(smollm2_tokenizer)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, vocab_size) -> Path:
    return save_random_adapter(tmp_path_factory.mktemp("adapters") / "random-lora", vocab_size, list(LORA_MODULE_TYPES))


@pytest.fixture(scope="module")
def base_model(vocab_size) -> LlamaForCausalLM:
    """A fresh copy of the tiny Llama (the session one stays untouched)."""
    return make_tiny_llama(vocab_size)


def extract_lora(model, tokenizer, output_dir: Path, **overrides) -> Path:
    settings = dict(
        hook_point="lora", output_dir=str(output_dir), storage_dtype="float32", batch_tokens=1024, shard_mb=0.05, max_examples=120
    )
    settings.update(overrides)
    config = ExtractConfig(**settings)
    (folder,) = write_activation_stores(model, tokenizer, load_dataset(config.dataset, max_examples=config.max_examples), config, "tiny")
    return folder


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, base_model, smollm2_tokenizer, adapter) -> Path:
    return extract_lora(  # 512-token rows hold several examples each
        base_model,
        smollm2_tokenizer,
        tmp_path_factory.mktemp("lora-stores"),
        lora_adapter=str(adapter),
        lora_modules=CHOSEN,
        row_tokens=512,
    )


def bottlenecks_by_hand(vocab_size: int, adapter: Path, token_ids: np.ndarray) -> torch.Tensor:
    """The reference without peft: merge W + (alpha/r)·B·A into a fresh tiny Llama, run the example alone, and apply A to each module's input."""
    model = make_tiny_llama(vocab_size)
    weights = {key.removeprefix("base_model.model."): value for key, value in load_file(adapter / "adapter_model.safetensors").items()}
    inputs = {}
    with torch.no_grad():
        for key, a in weights.items():
            if key.endswith(".lora_A.weight"):
                path = key.removesuffix(".lora_A.weight")
                model.get_submodule(path).weight += ALPHA / R * weights[path + ".lora_B.weight"] @ a
                model.get_submodule(path).register_forward_pre_hook(lambda module, args, path=path: inputs.__setitem__(path, args[0][0]))
        model(torch.from_numpy(token_ids.astype(np.int64))[None])
    parts = []
    for layer in range(TINY_LAYERS):
        for module_type in CHOSEN:
            (path,) = [p for p in inputs if p.startswith(f"model.layers.{layer}.") and p.endswith("." + module_type)]
            parts.append(inputs[path] @ weights[path + ".lora_A.weight"].T)
    return torch.cat(parts, dim=-1)


def test_batched_lora_store_equals_x_times_a_by_hand_for_each_example_alone(lora_store, adapter, vocab_size):
    store = ActivationStore(lora_store)
    assert store.d == TINY_LAYERS * len(CHOSEN) * R and store.manifest.extraction["batching"] == "packed"
    assert len(store.shards) > 1 and len(set(np.diff(store.doc_offsets).tolist())) > 10  # several shards, mixed lengths per batch
    for index in np.linspace(0, store.n_examples - 1, 8).round().astype(int):
        example = store.example(int(index))
        expected = bottlenecks_by_hand(vocab_size, adapter, example.token_ids)
        assert example.activations.shape == expected.shape
        assert max_relative_difference(example.activations, expected) < 1e-4


def test_lora_manifest_names_every_dimension(lora_store, adapter, base_model):
    store = ActivationStore(lora_store)
    assert lora_store.name == "lora.v_proj-q_proj-down_proj" and store.hook_name == lora_store.name
    lora = store.manifest.lora
    assert lora["fingerprint"] == adapter_fingerprint(adapter) and lora["r"] == R and lora["modules"] == CHOSEN
    assert lora["layers"] == list(range(TINY_LAYERS))
    expected = [
        {"layer": layer, "module": module, "path": f"{'mlp' if module == 'down_proj' else 'self_attn'}.{module}", "rank_index": i}
        for layer in range(TINY_LAYERS)
        for module in CHOSEN
        for i in range(R)
    ]
    assert lora["dimensions"] == expected and len(expected) == store.d
    assert store.manifest.hook_point == "lora" and store.manifest.layer is None
    assert not has_lora_layers(base_model)  # the adapter is taken off the model again after extraction


def test_an_adapter_named_relative_to_the_working_folder_is_recorded_where_it_is(
    base_model, smollm2_tokenizer, adapter, tmp_path, monkeypatch
):
    """The store recorded LORA_ADAPTER as typed: reading texts through its SAE from another folder (analyze_texts.py,
    which has no LORA_ADAPTER setting) failed with "LoRA adapter folder not found"."""
    dataset = str(Path(ExtractConfig().dataset).resolve())
    monkeypatch.chdir(adapter.parent)
    folder = extract_lora(
        base_model, smollm2_tokenizer, tmp_path / "out", dataset=dataset, lora_adapter=adapter.name, lora_modules=CHOSEN, max_examples=4
    )
    assert ActivationStore(folder).manifest.extraction["lora_adapter"] == str(adapter.resolve())


def test_bad_adapters_and_module_types_get_clear_errors(base_model, smollm2_tokenizer, adapter, tmp_path, vocab_size):
    with pytest.raises(UserError, match="needs LORA_ADAPTER"):
        ExtractConfig(hook_point="lora")
    cases = [
        ({"lora_adapter": str(tmp_path / "nowhere")}, "LoRA adapter folder not found"),
        ({"lora_adapter": str(tmp_path)}, "not a PEFT adapter folder"),
        (
            {"lora_adapter": str(adapter), "lora_modules": ["q_proj", "qkv_proj"]},
            "does not adapt qkv_proj; it adapts q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            extract_lora(base_model, smollm2_tokenizer, tmp_path / "out", **overrides)
    only_attention = save_random_adapter(tmp_path / "qv", vocab_size, ["q_proj", "v_proj"])
    with pytest.raises(UserError, match="does not adapt gate_proj, up_proj; it adapts q_proj, v_proj"):
        extract_lora(
            base_model,
            smollm2_tokenizer,
            tmp_path / "out",
            lora_adapter=str(only_attention),
            lora_modules=["q_proj", "gate_proj", "up_proj"],
        )
    # Other base models: a narrower one (shapes differ) and a shallower one (the adapter's deeper layers are missing).
    other_bases = [
        (
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_LAYERS),
            r"does not fit this model: model\.layers\.0\.\S+ is \[2, 128\] in the adapter but .* needs \[2, 64\]",
        ),
        (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2), r"adapts model\.layers\.2\.\S+, which this model does not have"),
    ]
    for shape, message in other_bases:
        other = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, num_attention_heads=4, num_key_value_heads=2, **shape)).eval()
        with pytest.raises(UserError, match=message):
            extract_lora(other, smollm2_tokenizer, tmp_path / "out", lora_adapter=str(adapter))
        assert not has_lora_layers(other)
    # A config that does not match its weights (another rank): peft fails after putting its layers in, which come out again.
    mismatched = shutil.copytree(only_attention, tmp_path / "mismatched")
    config = json.loads((mismatched / "adapter_config.json").read_text())
    (mismatched / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * R}))
    with pytest.raises(
        UserError, match=r"peft could not attach the LoRA adapter at .*size mismatch.* adapter_config\.json is the one saved"
    ):
        extract_lora(base_model, smollm2_tokenizer, tmp_path / "out", lora_adapter=str(mismatched), lora_modules=["q_proj"])
    assert not has_lora_layers(base_model)
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_sae_trains_evaluates_and_interprets_on_a_lora_store(lora_store, tiny_model_folder, tmp_path, caplog):
    config = TrainConfig(store=str(lora_store), output_dir=str(tmp_path / "runs"), m=32, k=4, batch_size=256, epochs=4.0)
    (result,) = train_saes(config)
    checkpoint = Path(result["checkpoint"])
    with caplog.at_level(logging.INFO):
        (results,) = evaluate_sae(EvalConfig(checkpoint=str(checkpoint), device="cpu"))
    assert "saebench_core" not in results and "LoRA store" in results["model_metrics_skipped"]
    assert any("Model metrics skipped" in record.message for record in caplog.records)
    saved = json.loads((checkpoint.parent / "eval.json").read_text())
    assert 0 < saved["reconstruction"]["all"]["fvu"] < 1 and saved["sparsity"]["l0_mean"] == pytest.approx(4, abs=0.5)
    # The pipeline's summary gives the recorded reason, not "MODEL_METRICS off" (it was on).
    figures = dict(EVALUATE_STAGE.key_figures(EvalConfig(checkpoint=str(checkpoint)), [Output(checkpoint.parent / "eval.json")]))
    assert figures["SAEBench ce_loss_score (loss recovered)"] == f"not measured: {saved['model_metrics_skipped']}"

    with caplog.at_level(logging.INFO):
        path = interpret_sae(
            InterpretConfig(
                checkpoint=str(checkpoint),
                model_name=str(tiny_model_folder),
                features="frequency:5",
                interpretations_path=str(tmp_path / "interpretations.csv"),
                device="cpu",
                explain=False,
            )
        )
    assert any("Logit lens skipped" in record.message for record in caplog.records)
    table = pd.read_csv(path, keep_default_na=False)
    assert len(table) == 5
    assert (table["logit_lens_promoted"] == "").all() and (table["logit_lens_suppressed"] == "").all()
    assert all("«" in contexts for contexts in table["top_contexts"]) and (table["top_label"] != "").all()
    assert (tmp_path / "dashboard.html").exists()


def test_script_extracts_all_adapter_types_by_default(tiny_model_folder, adapter, texts_file, tmp_path):
    args = [
        "--model-name",
        str(tiny_model_folder),
        "--dataset",
        str(texts_file),
        "--output-dir",
        str(tmp_path),
        "--hook-point",
        "lora",
        "--lora-adapter",
        str(adapter),
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "extract_activations.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    store = ActivationStore(tmp_path / "tiny-llama" / "lora.all")
    assert store.d == TINY_LAYERS * len(LORA_MODULE_TYPES) * R and store.n_examples == 8


def test_new_adapter_weights_change_extractions_pipeline_fingerprint(tiny_model_folder, vocab_size, tmp_path):
    """The pipeline re-runs extraction when the adapter's weights change under the same folder (the store refuses to resume)."""
    folder = save_random_adapter(tmp_path / "adapter", vocab_size, ["q_proj"])
    config = ExtractConfig(model_name=str(tiny_model_folder), hook_point="lora", lora_adapter=str(folder), lora_modules=["q_proj"])
    before = EXTRACT_STAGE.fingerprint_facts(config)
    assert EXTRACT_STAGE.fingerprint_facts(config) == before
    save_random_adapter(folder, vocab_size, ["q_proj", "v_proj"])
    assert EXTRACT_STAGE.fingerprint_facts(config)["lora_adapter"] != before["lora_adapter"]


# Families whose adapted modules the Llama adapter above does not cover: GPT-2's attention and MLP both have a c_proj,
# and Qwen2-MoE runs its shared expert (down_proj) on (B·T, d) rows.
OTHER_FAMILIES = {
    "gpt2": (dict(n_embd=64, n_layer=3, n_head=4), ["c_attn", "c_proj"]),
    "qwen2_moe": (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        ["q_proj", "down_proj"],
    ),
}


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_every_adapted_module_is_stored_as_x_times_a_in_other_families(model_type, tmp_path):
    shapes, module_types = OTHER_FAMILIES[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=128, **shapes)).eval()
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=module_types))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_A" in name:
                parameter.normal_()
    adapted.save_pretrained(tmp_path)
    weights = {key.removeprefix("base_model.model."): value for key, value in load_file(tmp_path / "adapter_model.safetensors").items()}
    paths = [key.removesuffix(".lora_A.weight") for key in weights if key.endswith(".lora_A.weight")]
    inputs = {}
    handles = [
        model.get_submodule(path).register_forward_pre_hook(lambda module, args, path=path: inputs.__setitem__(path, args[0]))
        for path in paths
    ]
    tokens = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    blocks = next(name for name, module in model.named_modules() if module is decoder_layers(model))  # transformer.h, model.layers
    with lora_capture(model, tmp_path, module_types) as capture:
        stored = capture(tokens, torch.ones_like(tokens))["lora"]
        assert stored.shape == (*tokens.shape, len(paths) * R) == (*tokens.shape, capture.d)
        order = [f"{blocks}.{dimension['layer']}.{dimension['path']}" for dimension in capture.dimensions[::R]]
    assert sorted(order) == sorted(paths)  # every adapted module, once
    expected = torch.cat([(inputs[path] @ weights[path + ".lora_A.weight"].T).reshape(*tokens.shape, R) for path in order], dim=-1)
    assert max_relative_difference(stored, expected) < 1e-5


def test_an_adapter_that_saves_whole_modules_leaves_the_base_model_as_it_was_or_is_refused_when_they_do_not_fit(tmp_path):
    """peft's unload left the adapter's trained copy of a modules_to_save embedding in the base model, which kept the
    fine-tune's embeddings after the capture; one resized for added tokens failed in peft with a size-mismatch traceback
    and left the model half-adapted."""
    vocab_size = 300
    fine_tune = get_peft_model(
        make_tiny_llama(vocab_size), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    with torch.no_grad():
        fine_tune.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(3)  # the fine-tune's own embeddings
    fine_tune.save_pretrained(tmp_path / "trained-embeddings")
    base = make_tiny_llama(vocab_size)
    embeddings, weights_before = base.model.embed_tokens, base.model.embed_tokens.weight.clone()
    tokens = torch.randint(3, vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with lora_capture(base, tmp_path / "trained-embeddings", ["q_proj"]) as capture:
        capture(tokens, torch.ones_like(tokens))
    assert base.model.embed_tokens is embeddings and torch.equal(base.model.embed_tokens.weight, weights_before)
    assert not has_lora_layers(base)

    resized = make_tiny_llama(vocab_size)
    resized.resize_token_embeddings(vocab_size + 8, mean_resizing=False)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    get_peft_model(resized, config).save_pretrained(tmp_path / "added-tokens")
    with pytest.raises(UserError, match=r"saves its own \S+ of shape \[308, 64\], but this model's is \[300, 64\].*resized"):
        with lora_capture(base, tmp_path / "added-tokens", ["q_proj"]):
            pass
    assert not has_lora_layers(base) and base.model.embed_tokens is embeddings
