"""SAEs from other libraries: each is saved by its library's own code with random weights, opened by fastsae, and
must give the library's own feature activations and reconstructions; then evaluation and interpretation run on each.
Pretrained SAELens SAEs come from a Hugging Face cache written here (no network), checked against SAELens' own loader."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import hf_hub_download
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import hypothesaes_module, interpret_without_llm
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.core.formats.saelens import saelens_hook, saelens_model_hub_id
from fastsae.core.formats.saelens_pretrained import CONVERTER_FILES, REFUSED, PretrainedSAE
from fastsae.core.formats.sources import load_any_sae, results_folder
from fastsae.core.formats.sparsify import sparsify_hook
from fastsae.core.trained_sae import open_trained_sae
from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae, store_metrics, validation_examples
from fastsae.export.export_sae import ExportConfig, export_sae
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit
from fastsae.train.train_sae import validate

D, M, K, LAYER = 64, 96, 8, 2  # the tiny store: d=64 at the output of block 2
Reference = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (feature activations, reconstruction), the library's own


class ForeignSAE(NamedTuple):
    checkpoint: str  # what CHECKPOINT is set to
    reference: Reference
    source_format: str
    model_name: str | None
    hook: tuple[str | None, int | None]  # (hook point, layer) it must report


@pytest.fixture(scope="module")
def sample(tiny_store) -> torch.Tensor:
    """Real activations: 600 tokens to set thresholds on, and to compare forwards on."""
    return ActivationStore(tiny_store).activations(0, 600).float()


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, biases included, so a missed bias or transpose shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def quantile_thresholds(pre: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Per feature (or over all, for a 1-d `pre`), about the q-quantile of the pre-activations on the sample, so about
    30% of tokens fire. Nudged off the data: tokens repeat in the store, and a threshold equal to a pre-activation
    would make the comparison hang on the last bit of rounding."""
    return (torch.quantile(pre, q, dim=0) + 1e-3 * pre.std(0)).clamp_min(1e-3)


def encode_decode(sae) -> Reference:
    """The reference forward of a library SAE with encode and decode methods (SAELens', dictionary_learning's)."""

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = sae.encode(x)
            return features, sae.decode(features)

    return reference


def same_forward(loaded, reference: Reference, x: torch.Tensor) -> None:
    features, reconstruction = reference(x)
    assert (features > 0).any(1).all() and (features == 0).any(), "a test SAE must fire on some features, not all"
    with torch.no_grad():
        ours = loaded.sae.encode(x)
        torch.testing.assert_close(ours, features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.sae.decode(ours), reconstruction, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.sae(x), reconstruction, rtol=1e-5, atol=1e-5)


# --- SAELens ------------------------------------------------------------------------------------------


def saelens_metadata(hook_name: str = f"blocks.{LAYER}.hook_resid_post"):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(model_name="tiny-llama", hook_name=hook_name)


def make_saelens(folder: Path, architecture: str, sample: torch.Tensor, **options) -> ForeignSAE:
    """A SAELens SAE of `architecture`, saved with save_model; the reference is SAELens' own inference SAE."""
    import sae_lens

    cfg = {"d_in": D, "d_sae": M, "metadata": saelens_metadata(), **options}
    if architecture in ("batchtopk", "matryoshka_batchtopk"):  # training saves; SAELens' inference form of them is a JumpReLU SAE
        sae_class, config_class = {
            "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig),
            "matryoshka_batchtopk": (sae_lens.MatryoshkaBatchTopKTrainingSAE, sae_lens.MatryoshkaBatchTopKTrainingSAEConfig),
        }[architecture]
        sae = sae_class(config_class(k=K, **cfg))
        randomize_(sae)
        with torch.no_grad():
            sae.topk_threshold.fill_(float(quantile_thresholds(sae.encode_with_hidden_pre(sample)[1].relu().flatten(), 0.9)))
        sae.save_model(folder)
        sae.save_inference_model(folder.with_name(folder.name + "-inference"))
        reference_sae = sae_lens.SAE.load_from_disk(folder.with_name(folder.name + "-inference"))
    else:
        classes = {
            "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
            "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
            "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        }
        sae_class, config_class = classes[architecture]
        sae = sae_class(config_class(**cfg, **({"k": K} if architecture == "topk" else {})))
        randomize_(sae)
        if architecture == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(quantile_thresholds(sample @ sae.W_enc + sae.b_enc))
        sae.save_model(folder)
        reference_sae = sae_lens.SAE.load_from_disk(folder)
    return ForeignSAE(str(folder), encode_decode(reference_sae), "saelens", "tiny-llama", ("resid_post", LAYER))


SAELENS_CASES = {
    "standard": ("standard", {}),
    "topk": ("topk", {}),
    "topk, rescaled by decoder norms": ("topk", {"rescale_acts_by_decoder_norm": True}),
    "jumprelu, encoder reads x": ("jumprelu", {"apply_b_dec_to_input": False}),
    "batchtopk (a training save)": ("batchtopk", {}),
    "matryoshka_batchtopk (a training save)": ("matryoshka_batchtopk", {"matryoshka_widths": [M // 4, M]}),
    "gated": ("gated", {}),
    "gated, encoder reads x": ("gated", {"apply_b_dec_to_input": False}),
}


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_saelens_saes_give_saelens_features_and_reconstructions(case, sample, tmp_path):
    architecture, options = SAELENS_CASES[case]
    made = make_saelens(tmp_path / "sae", architecture, sample[:300], **options)
    loaded = load_any_sae(made.checkpoint)
    same_forward(loaded, made.reference, sample[300:])
    assert loaded.sae.spec.prefixes == tuple(options.get("matryoshka_widths", ()))
    assert (loaded.info.source_format, loaded.info.model_name) == ("saelens", "tiny-llama")
    assert (loaded.info.hook_point, loaded.info.layer, loaded.info.hook_name) == ("resid_post", LAYER, f"blocks.{LAYER}.hook_resid_post")


SCALED_SAELENS = {  # SAELens' SAE and config classes, and their options
    "standard": ("StandardSAE", "StandardSAEConfig", {}),
    "topk, rescaled by decoder norms": ("TopKSAE", "TopKSAEConfig", {"k": K, "rescale_acts_by_decoder_norm": True}),
    "batchtopk, rescaled by decoder norms (a training save)": (
        "BatchTopKTrainingSAE",
        "BatchTopKTrainingSAEConfig",
        {"k": K, "rescale_acts_by_decoder_norm": True},
    ),
}


@pytest.mark.parametrize("case", SCALED_SAELENS)
def test_a_constant_input_scale_is_folded_as_saelens_folds_it(case, sample, tmp_path):
    """SAELens' training checkpoint keeps the scale in activation_scaler.json; the reference is SAELens' own fold of it,
    which its trainer and from_pretrained apply, after which a rescaled SAE reports features in the folded decoder's units."""
    import sae_lens
    from sae_lens.training.activation_scaler import ActivationScaler

    sae_class, config_class, options = SCALED_SAELENS[case]
    scale = 0.37
    config = getattr(sae_lens, config_class)(
        d_in=D, d_sae=M, normalize_activations="expected_average_only_in", metadata=saelens_metadata(), **options
    )
    sae = getattr(sae_lens, sae_class)(config)
    randomize_(sae)
    if hasattr(sae, "topk_threshold"):
        with torch.no_grad():
            pre = sae.encode_with_hidden_pre(sample * scale)[1].relu().flatten()
            sae.topk_threshold.fill_(float(quantile_thresholds(pre, 0.9)))
    folder = tmp_path / "scaled"
    sae.save_model(folder)
    with pytest.raises(UserError, match="no factor is recorded"):
        load_any_sae(folder)
    ActivationScaler(scaling_factor=scale).save(str(folder / "activation_scaler.json"))
    sae.fold_activation_norm_scaling_factor(scale)
    if hasattr(sae, "save_inference_model"):  # SAELens runs a training save as the SAE it saves for inference
        sae.save_inference_model(tmp_path / "inference")
        sae = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    same_forward(load_any_sae(folder), encode_decode(sae), sample)


def test_a_per_token_normalisation_is_refused(tmp_path):
    import sae_lens

    per_token = sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=D, d_sae=M, normalize_activations="layer_norm", metadata=saelens_metadata())
    )
    per_token.save_model(tmp_path / "layer-norm")
    with pytest.raises(UserError, match="normalises each token at run time .* not loaded"):
        load_any_sae(tmp_path / "layer-norm")


def test_a_saelens_topk_sae_without_k_loads_with_saelens_default_k(sample, tmp_path, caplog):
    import sae_lens

    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=4 * M, k=K, metadata=saelens_metadata()))
    randomize_(sae)
    sae.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del cfg["k"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    theirs = SAE.load_from_disk(tmp_path / "sae")
    with caplog.at_level("WARNING"):
        loaded = load_any_sae(tmp_path / "sae")
    assert loaded.sae.spec.k == theirs.cfg.k == sae_lens.TopKSAEConfig.k
    assert f"gives no k; SAELens loads it with its default k={theirs.cfg.k}" in caplog.text
    same_forward(loaded, encode_decode(theirs), sample)


def test_saelens_hook_names_map_to_ours_and_others_are_refused(tmp_path):
    assert saelens_hook("blocks.12.hook_resid_post", "x") == ("resid_post", 12)
    assert saelens_hook("blocks.3.hook_mlp_out", "x") == ("mlp_out", 3)
    assert saelens_hook("blocks.3.hook_attn_out", "x") == ("attn_out", 3)
    assert saelens_hook("blocks.5.hook_resid_pre", "x") == ("resid_post", 4)  # the input of block 5 is the output of block 4
    assert saelens_hook(None, "x") == (None, None)
    for unsupported in ("blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.attn.hook_z", "hook_embed"):
        with pytest.raises(UserError, match="does not extract. It reads blocks.L.hook_resid_post"):
            saelens_hook(unsupported, "x")


SAELENS_MODEL_NAMES = {  # cfg.json's model_name -> (the model_name fastsae records, its hub_model_id)
    "gpt2-small": ("gpt2", "gpt2"),  # TransformerLens' name for a Hub model
    "gemma-2-9b-it": ("google/gemma-2-9b-it", "google/gemma-2-9b-it"),
    "gpt2": ("gpt2", "gpt2"),  # TransformerLens' name and the Hub id
    "google/gemma-2-2b": ("google/gemma-2-2b", "google/gemma-2-2b"),  # a Hub id, as TransformerLens' official names are
    "tiny-llama": ("tiny-llama", None),  # a name TransformerLens does not know: kept, and not taken for a Hub id
}


@pytest.mark.parametrize("cfg_model_name", SAELENS_MODEL_NAMES)
def test_a_saelens_sae_records_its_model_by_the_hub_id_that_loads_it(cfg_model_name, tmp_path):
    """SAELens names the model as TransformerLens does (gpt2-small), which is no Hub id: evaluate, steer and the model card
    need the Hub id, which TransformerLens' own table gives."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(model_name=cfg_model_name, hook_name=f"blocks.{LAYER}.hook_resid_post")
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=M, metadata=metadata)).save_model(tmp_path / "sae")
    info = load_any_sae(tmp_path / "sae").info
    assert (info.model_name, info.hub_model_id) == SAELENS_MODEL_NAMES[cfg_model_name]


def test_model_names_that_cannot_be_transformer_lens_names_are_not_looked_up(tmp_path, monkeypatch, caplog):
    assert saelens_model_hub_id(str(tmp_path)) is None  # a local folder: no Hub id
    assert saelens_model_hub_id("embedded:smollm2-135m-instruct") is None
    # An org/name is a Hub id already: TransformerLens, whose import takes seconds, is not asked about it.
    lookup = "from fastsae.core.formats.saelens import saelens_model_hub_id as hub_id; print(hub_id('google/gemma-2-2b'))"
    run = subprocess.run(
        [sys.executable, "-c", f"import sys; {lookup}; print('transformer_lens' in sys.modules)"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.stdout.split() == ["google/gemma-2-2b", "False"], run.stderr
    for module in ("transformer_lens", "transformer_lens.loading_from_pretrained"):  # importing them fails as if not installed
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level("INFO"):
        assert saelens_model_hub_id("gpt2-small") is None
    assert "'gpt2-small', the model a SAELens SAE names, is kept as written: transformer_lens is not installed" in caplog.text


def saelens_5_folder(folder: Path, **changes) -> Path:
    """A SAE folder as SAELens before 6 saved it: a flat cfg.json (SAEConfig.to_dict, no sae_lens_version, activation_fn_str
    and activation_fn_kwargs) with random weights. A change to None drops that key."""
    cfg = {
        "architecture": "standard", "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", "model_name": "tiny-llama",
        "hook_name": f"blocks.{LAYER}.hook_resid_post", "hook_layer": LAYER, "hook_head_index": None, "activation_fn_str": "relu",
        "activation_fn_kwargs": {}, "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
        "prepend_bos": True, "dataset_path": "data", "normalize_activations": "none", "sae_lens_training_version": "5.10.0",
    }  # fmt: skip
    cfg = {key: value for key, value in {**cfg, **changes}.items() if value is not None}
    generator = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (D, M), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
    folder.mkdir()
    save_file({name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


SAELENS_5_CASES = {
    "Top-K as SAELens 5 saved it: architecture standard, activation_fn_str topk": (
        {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}, "topk", K
    ),
    "k from activation_fn_kwargs over a top-level k": (
        {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "k": 3 * K}, "topk", K
    ),
    "SAELens 3 names and defaults": (
        {"hook_name": None, "hook_point": f"blocks.{LAYER}.hook_resid_post", "apply_b_dec_to_input": None, "normalize_activations": False},
        "relu", 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SAELENS_5_CASES)
def test_saelens_5_files_load_as_saelens_6_loads_them(case, sample, tmp_path):
    changes, architecture, k = SAELENS_5_CASES[case]
    folder = saelens_5_folder(tmp_path / "sae", **changes)
    loaded = load_any_sae(folder)
    same_forward(loaded, encode_decode(SAE.load_from_disk(folder)), sample)
    assert (loaded.sae.spec.architecture, loaded.sae.spec.k) == (architecture, k)
    assert (loaded.info.model_name, loaded.info.hook_point, loaded.info.layer) == ("tiny-llama", "resid_post", LAYER)


def test_saelens_5_files_fastsae_cannot_run_as_written_are_refused(tmp_path):
    """A topk activation without its k: SAELens 5 refused it, SAELens 6 runs it as a ReLU SAE; one head of a hook: not ours."""
    no_k = saelens_5_folder(tmp_path / "no-k", activation_fn_str="topk")
    assert SAE.load_from_disk(no_k).cfg.architecture() == "standard"
    with pytest.raises(UserError, match=r"uses the topk activation but its cfg.json gives no k .* Add its k to cfg.json"):
        load_any_sae(no_k)
    empty_kwargs = saelens_5_folder(tmp_path / "empty-kwargs", architecture="topk", activation_fn_str="topk", k=K)
    with pytest.raises(KeyError):
        SAE.load_from_disk(empty_kwargs)
    with pytest.raises(UserError, match="gives no k in activation_fn_kwargs"):
        load_any_sae(empty_kwargs)
    one_head = saelens_5_folder(tmp_path / "one-head", hook_point_head_index=3)
    with pytest.raises(UserError, match=r"reads one attention head \(hook_head_index 3\)"):
        load_any_sae(one_head)


def test_saelens_saes_fastsae_cannot_run_are_refused(tmp_path):
    import sae_lens

    absolute = sae_lens.AbsTopKSAE(sae_lens.AbsTopKSAEConfig(d_in=D, d_sae=M, k=K, metadata=saelens_metadata()))
    absolute.save_model(tmp_path / "abstopk")
    with pytest.raises(UserError, match="SAELens 'abstopk' SAE, whose forward fastsae cannot run exactly"):
        load_any_sae(tmp_path / "abstopk")
    hook_z = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=M, metadata=saelens_metadata("blocks.2.attn.hook_z")))
    hook_z.save_model(tmp_path / "hook-z")
    with pytest.raises(UserError, match=r"trained on 'blocks.2.attn.hook_z', which fastsae does not extract"):
        load_any_sae(tmp_path / "hook-z")


# --- sparsify -----------------------------------------------------------------------------------------


def make_sparsify(run: Path, sample: torch.Tensor, model_name: str, hookpoint: str = f"layers.{LAYER}", **options) -> ForeignSAE:
    """A sparsify hookpoint folder from save_to_disk, under a run folder with the run's config.json, as its trainer writes them."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    config = SparseCoderConfig(num_latents=M, k=K, **options)
    coder = SparseCoder(D, config)
    randomize_(coder)
    coder.save_to_disk(run / hookpoint)
    RunConfig(sae=config, model=model_name, hookpoints=[hookpoint]).save_json(run / "config.json")
    reference = sparsify_reference(SparseCoder.load_from_disk(run / hookpoint))
    return ForeignSAE(str(run / hookpoint), reference, "sparsify", model_name, ("resid_post", LAYER))


def sparsify_reference(coder) -> Reference:
    """The forward of a sparsify SparseCoder, its top-k code scattered to all M features."""

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            top_acts, top_indices, _ = coder.encode(x)
            return torch.zeros(len(x), M).scatter_(1, top_indices, top_acts), coder.decode(top_acts, top_indices)

    return reference


def test_sparsify_saes_give_sparsify_features_and_reconstructions(sample, tmp_path, tiny_model_folder):
    made = make_sparsify(tmp_path / "run", sample, str(tiny_model_folder))
    loaded = load_any_sae(made.checkpoint)
    same_forward(loaded, made.reference, sample)
    assert (loaded.info.source_format, loaded.info.model_name) == ("sparsify", str(tiny_model_folder))
    assert (loaded.info.hook_point, loaded.info.layer) == ("resid_post", LAYER)


def test_fvu_on_a_batch_equals_sparsify_forward_and_hypothesaes_normalized_mse(sample, tmp_path):
    """Training's per-step FVU and validation's FVU (here on one batch) are sparsify's and HypotheSAEs' training loss:
    Σ‖x − x̂‖² / Σ‖x − mean(x)‖²."""
    from sparsify import SparseCoder

    made = make_sparsify(tmp_path / "run", sample, "m")
    with torch.no_grad():
        theirs = SparseCoder.load_from_disk(made.checkpoint)(sample).fvu.item()
    sae = load_any_sae(made.checkpoint).sae
    with torch.no_grad():
        normalized_mse = hypothesaes_module().SparseAutoencoder._normalized_mse(sae(sample), sample).item()
    assert normalized_mse == pytest.approx(theirs, rel=1e-5)
    assert sae.training_step(sample, None, 0.0, 0.0).fvu.item() == pytest.approx(theirs, rel=1e-5)
    assert validate(sae, sample, batch_size=len(sample)).metrics["fvu"] == pytest.approx(theirs, rel=1e-5)


def test_eval_fvu_of_held_out_examples_equals_sparsify_forward_on_their_tokens(tiny_store, sample, tmp_path):
    """eval.json's `reconstruction` … `fvu` over all tokens of some examples is sparsify's FVU on those tokens as one batch."""
    from sparsify import SparseCoder

    made = make_sparsify(tmp_path / "run", sample, "m")
    store = ActivationStore(tiny_store)
    examples = list(range(3, 40, 3))
    x = torch.cat([store.example(index).activations for index in examples]).float()
    with torch.no_grad():
        theirs = SparseCoder.load_from_disk(made.checkpoint)(x).fvu.item()
    ours = store_metrics(store, examples, load_any_sae(made.checkpoint).sae, include_special=True)["reconstruction"]["all"]
    assert (ours["tokens"], ours["fvu"]) == (len(x), pytest.approx(theirs, rel=1e-5))


def test_a_sparsify_sae_without_k_loads_with_sparsify_default_k(sample, tmp_path, caplog):
    from sparsify import SparseCoder, SparseCoderConfig

    made = make_sparsify(tmp_path / "run", sample, "m")
    cfg_file = Path(made.checkpoint) / "cfg.json"
    cfg_file.write_text(json.dumps({key: value for key, value in json.loads(cfg_file.read_text()).items() if key != "k"}))
    theirs = SparseCoder.load_from_disk(made.checkpoint)
    with caplog.at_level("WARNING"):
        loaded = load_any_sae(made.checkpoint)
    assert loaded.sae.spec.k == theirs.cfg.k == SparseCoderConfig.k
    assert f"gives no k; sparsify loads it with its default k={theirs.cfg.k}" in caplog.text
    same_forward(loaded, sparsify_reference(theirs), sample)


def test_a_sparsify_sublayer_sae_on_a_post_norm_model_gets_a_warning(sample, tmp_path, tiny_model_folder, smollm2_tokenizer, caplog):
    """sparsify's layers.L.mlp is the MLP's own output; on Gemma 2, fastsae's mlp_out reads the post-norm after it."""
    gemma = tmp_path / "tiny-gemma2"
    config = AutoConfig.for_model(
        "gemma2", vocab_size=len(smollm2_tokenizer), hidden_size=D, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, pad_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(gemma)
    smollm2_tokenizer.save_pretrained(gemma)
    for model_folder, warned in ((gemma, True), (tiny_model_folder, False)):
        made = make_sparsify(tmp_path / f"run-on-{model_folder.name}", sample, str(model_folder), f"layers.{LAYER}.mlp")
        caplog.clear()
        open_trained_sae(made.checkpoint).load_model(dtype=torch.float32, device="cpu")
        message = f"fastsae's mlp_out on Gemma2ForCausalLM reads block {LAYER}'s post_feedforward_layernorm"
        assert (message in caplog.text) == warned and ("sparsify SAE of a sublayer" in caplog.text) == warned


def test_sparsify_hookpoints_map_to_ours_and_a_run_folder_lists_its_saes(sample, tmp_path):
    assert sparsify_hook("layers.12", "x") == ("resid_post", 12)
    assert sparsify_hook("layers.12.mlp", "x") == ("mlp_out", 12)
    assert sparsify_hook("layers.12.self_attn", "x") == ("attn_out", 12)
    assert sparsify_hook("h.3.attn", "x") == ("attn_out", 3)  # GPT-2's names
    with pytest.raises(UserError, match="hookpoint 'embed_tokens', which fastsae does not extract"):
        sparsify_hook("embed_tokens", "x")
    run = tmp_path / "run"
    make_sparsify(run, sample, "m", "layers.1")
    make_sparsify(run, sample, "m", "layers.3.mlp")
    with pytest.raises(UserError, match=r"is not one SAE but holds 2 \(layers.1, layers.3.mlp\): name one, e.g. .*run/layers.1"):
        load_any_sae(run)
    assert load_any_sae(run / "layers.3.mlp").info.hook_name == "blocks.3.hook_mlp_out"
    assert load_any_sae(run / "layers.1" / "sae.safetensors").info.layer == 1  # a file of the folder stands for it


@pytest.mark.parametrize(
    ("option", "message"),
    [({"multi_topk": True}, "Multi-TopK"), ({"skip_connection": True}, "skip connection"), ({"transcode": True}, "transcoder")],
)
def test_sparsify_options_that_change_the_forward_are_refused(option, message, sample, tmp_path):
    made = make_sparsify(tmp_path / "run", sample, "m", **option)
    with pytest.raises(UserError, match=f"{message}.* not loaded"):
        load_any_sae(made.checkpoint)


# --- dictionary_learning ------------------------------------------------------------------------------


def dictionary_learning_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """dictionary_learning's dictionary.py and trainers, imported without the package's __init__, which imports
    nnsight (its activation buffer) at module level; these modules themselves need only torch and einops."""
    if "dictionary_learning" not in sys.modules:
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(importlib.util.find_spec("dictionary_learning").submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    return importlib.import_module("dictionary_learning.dictionary"), importlib.import_module("dictionary_learning.trainers")


DICTIONARY_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder")


def make_dictionary_learning(folder: Path, dict_class: str, sample: torch.Tensor, lm_name: str) -> ForeignSAE:
    """A dictionary saved as dictionary_learning's trainSAE saves it: config.json of {"trainer": trainer.config, "buffer": ...},
    then ae.pt, the state_dict on the CPU. The reference is the class its utils.load_dictionary picks, loaded the same way."""
    dictionary, trainers = dictionary_learning_modules()
    common = {"steps": 10_000, "activation_dim": D, "dict_size": M, "layer": LAYER, "lm_name": lm_name, "device": "cpu"}
    common["submodule_name"] = f"resid_post_layer_{LAYER}"
    trainer = {
        "AutoEncoder": lambda: trainers.StandardTrainer(**common),
        "AutoEncoderTopK": lambda: trainers.TopKTrainer(k=K, **common),
        "BatchTopKSAE": lambda: trainers.BatchTopKTrainer(k=K, **common),
        "MatryoshkaBatchTopKSAE": lambda: importlib.import_module(
            "dictionary_learning.trainers.matryoshka_batch_top_k"
        ).MatryoshkaBatchTopKTrainer(k=K, group_fractions=[0.25, 0.75], **common),
        "JumpReluAutoEncoder": lambda: trainers.JumpReluTrainer(**common),
        "GatedAutoEncoder": lambda: trainers.GatedSAETrainer(**common),
    }[dict_class]()
    ae = trainer.ae
    randomize_(ae)
    with torch.no_grad():
        if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            active = ae.encode(sample, use_threshold=False)
            ae.threshold.fill_(float(quantile_thresholds(active[active > 0], 0.5)))
        elif dict_class == "JumpReluAutoEncoder":
            ae.threshold.copy_(quantile_thresholds(sample @ ae.W_enc + ae.b_enc))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config, "buffer": {"d_submodule": D, "ctx_len": 128}}, indent=4))
    torch.save({key: value.cpu() for key, value in ae.state_dict().items()}, folder / "ae.pt")
    loaders = {
        "AutoEncoder": lambda path: dictionary.AutoEncoder.from_pretrained(path),  # normalises the decoder, as load_dictionary does
        "AutoEncoderTopK": lambda path: trainers.top_k.AutoEncoderTopK.from_pretrained(path, k=K),
        "BatchTopKSAE": lambda path: trainers.BatchTopKSAE.from_pretrained(path, k=K),
        "MatryoshkaBatchTopKSAE": lambda path: importlib.import_module(
            "dictionary_learning.trainers.matryoshka_batch_top_k"
        ).MatryoshkaBatchTopKSAE.from_pretrained(path, k=K),
        "JumpReluAutoEncoder": lambda path: dictionary.JumpReluAutoEncoder.from_pretrained(path),
        "GatedAutoEncoder": lambda path: dictionary.GatedAutoEncoder.from_pretrained(path),
    }
    reference_ae = loaders[dict_class](folder / "ae.pt")
    return ForeignSAE(str(folder), encode_decode(reference_ae), "dictionary_learning", lm_name, ("resid_post", LAYER))


@pytest.mark.parametrize("dict_class", DICTIONARY_CLASSES)
def test_dictionary_learning_saes_give_their_features_and_reconstructions(dict_class, sample, tmp_path):
    made = make_dictionary_learning(tmp_path / "trainer_0", dict_class, sample[:300], "EleutherAI/pythia-70m-deduped")
    loaded = load_any_sae(made.checkpoint)
    same_forward(loaded, made.reference, sample[300:])
    assert (loaded.info.source_format, loaded.info.model_name) == ("dictionary_learning", "EleutherAI/pythia-70m-deduped")
    assert (loaded.info.hook_point, loaded.info.layer) == ("resid_post", LAYER)
    assert load_any_sae(Path(made.checkpoint) / "ae.pt").info.spec == loaded.info.spec  # ae.pt stands for its folder


def test_a_dictionary_without_a_known_submodule_keeps_its_layer_and_asks_for_the_hook(sample, tmp_path):
    made = make_dictionary_learning(tmp_path / "trainer_0", "AutoEncoderTopK", sample, "m")
    config_path = Path(made.checkpoint) / "config.json"
    config = json.loads(config_path.read_text())
    config["trainer"]["submodule_name"] = None
    config_path.write_text(json.dumps(config))
    info = load_any_sae(made.checkpoint).info
    assert (info.hook_point, info.layer, info.hook_name) == (None, LAYER, None)
    from fastsae.tools.steer_model import SteerConfig, steer_model

    with pytest.raises(UserError, match="does not record the hook it was trained on \\(a dictionary_learning SAE\\)"):
        steer_model(SteerConfig(checkpoint=made.checkpoint))


# --- HypotheSAEs ------------------------------------------------------------------------------------------


def make_hypothesaes(path: Path) -> ForeignSAE:
    torch.manual_seed(0)
    theirs = hypothesaes_module().SparseAutoencoder(D, M, K, device="cpu")
    randomize_(theirs)
    theirs.save(str(path))
    theirs.eval()

    def reference(x):
        with torch.no_grad():
            reconstruction, info = theirs(x)
            return info["activations"], reconstruction

    return ForeignSAE(str(path), reference, "hypothesaes", None, (None, None))


def test_hypothesaes_checkpoints_give_hypothesaes_features_and_reconstructions(sample, tmp_path):
    made = make_hypothesaes(tmp_path / f"SAE_M={M}_K={K}.pt")
    loaded = load_any_sae(made.checkpoint)
    same_forward(loaded, made.reference, sample)
    assert loaded.info.source_format == "hypothesaes" and loaded.info.hook_point is None


def test_an_unevaluated_saelens_folder_exports_with_its_own_sparsity(sample, tmp_path):
    """Without an eval.json, the export took SAELens' sparsity.safetensors from fastsae's training export only: a SAELens
    folder's own, beside its weights, was dropped."""
    made = make_saelens(tmp_path / "sae", "topk", sample)
    sparsity = {"sparsity": torch.linspace(-6.0, -1.0, M)}
    save_file(sparsity, Path(made.checkpoint) / "sparsity.safetensors")
    folder = export_sae(ExportConfig(checkpoint=made.checkpoint, output=str(tmp_path / "export"), interpretations=""))
    hook_name = load_any_sae(made.checkpoint).info.hook_name
    torch.testing.assert_close(load_file(folder / hook_name / "sparsity.safetensors")["sparsity"], sparsity["sparsity"])


def test_the_saes_of_one_folder_keep_their_own_results(tiny_store, tmp_path):
    """HypotheSAEs saves a sweep's SAEs side by side in one folder: each gets its own eval.json, where the second's
    overwrote the first's beside them. Our own layout (the .pt in a folder of its name) keeps its results beside it."""
    first, second = (make_hypothesaes(tmp_path / "sweep" / f"SAE_M={M}_K={k}.pt").checkpoint for k in (K, K + 2))
    config = EvalConfig(checkpoint=[first, second], store=str(tiny_store), model_metrics=False, max_examples=12, device="cpu")
    evaluate_sae(config)
    assert {results_folder(first), results_folder(second)} == {tmp_path / "sweep" / Path(path).stem for path in (first, second)}
    recorded = [json.loads((results_folder(path) / "eval.json").read_text())["checkpoint"] for path in (first, second)]
    assert recorded == [first, second]
    assert results_folder(tmp_path / "SAE_M=4_K=2" / "SAE_M=4_K=2.pt") == tmp_path / "SAE_M=4_K=2"


# --- evaluation and interpretation on each format ---------------------------------------------------------


FORMATS: dict[str, Callable[[Path, torch.Tensor, Path], ForeignSAE]] = {
    "saelens": lambda folder, sample, model: make_saelens(folder / "sae", "topk", sample, rescale_acts_by_decoder_norm=True),
    "sparsify": lambda folder, sample, model: make_sparsify(folder / "run", sample, str(model)),
    "dictionary_learning": lambda folder, sample, model: make_dictionary_learning(
        folder / "trainer_0", "JumpReluAutoEncoder", sample, str(model)
    ),
    "hypothesaes": lambda folder, sample, model: make_hypothesaes(folder / f"SAE_M={M}_K={K}.pt"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_evaluate_and_interpret_run_on_each_format(name, sample, tiny_store, tiny_model_folder, tmp_path):
    made = FORMATS[name](tmp_path, sample, tiny_model_folder)
    with pytest.raises(UserError, match=r"does not say which activation store .* Pass --store"):
        evaluate_sae(EvalConfig(checkpoint=[made.checkpoint], model_metrics=False))
    (results,) = evaluate_sae(
        EvalConfig(
            checkpoint=[made.checkpoint],
            store=str(tiny_store),
            model_name=str(tiny_model_folder),
            validation_fraction=0.1,
            seed=0,
            max_examples=12,
            model_tokens=300,
            device="cpu",
        )
    )
    written = json.loads((results_folder(made.checkpoint) / "eval.json").read_text())
    # FVU on the held-out content tokens, by hand, with the library's own forward.
    store = ActivationStore(tiny_store)
    parts = [store.example(index) for index in validation_examples(ExampleSplit.of_store(store, 0.1, 0))[:12]]
    x = torch.cat([part.activations for part in parts]).float()
    content = x[~torch.from_numpy(np.concatenate([part.special_mask for part in parts]))]
    _, reconstruction = made.reference(content)
    fvu = float((content - reconstruction).pow(2).sum() / (content - content.mean(0)).pow(2).sum())
    assert written["reconstruction"]["content"]["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert written["reconstruction"]["content"]["tokens"] == len(content)
    core = written["saebench_core"]["eval_result_metrics"]
    assert np.isfinite(core["model_performance_preservation"]["ce_loss_score"]) and core["sparsity"]["l0"] > 0
    csv = interpret_without_llm(made.checkpoint, tiny_model_folder, tmp_path / "interpretations.csv", "frequency:5", store=str(tiny_store))
    table = pd.read_csv(csv)
    assert len(table) == 5 and (table["frequency"] > 0).all() and (tmp_path / "dashboard.html").is_file()
    assert_exports_as_it_runs(made, csv, content)


def assert_exports_as_it_runs(made: ForeignSAE, interpretations: Path, x: torch.Tensor) -> None:
    """The export writes the SAE as one of our checkpoints and as SAELens' folder, both computing the library's features,
    and claims nothing of a training fastsae did not do; an SAE whose files do not record its hook is refused, since the
    export is named after it."""
    info = load_any_sae(made.checkpoint).info
    config = ExportConfig(checkpoint=str(made.checkpoint), interpretations=str(interpretations))
    if info.hook_name is None:
        with pytest.raises(UserError, match="does not record the hook"):
            export_sae(config)
        return
    folder = export_sae(config)
    features, _ = made.reference(x)
    exported = load_sae(folder / f"{info.spec.name}.pt")
    assert exported.info.source_format == info.source_format  # the provenance travels with the weights
    saelens = SAE.load_from_disk(folder / info.hook_name)
    with torch.no_grad():
        torch.testing.assert_close(exported.sae.encode(x), features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saelens.encode(x), features, rtol=1e-5, atol=1e-5)
    assert (folder / "eval.json").is_file() and (folder / "interpretations.csv").is_file()
    card = (folder / "README.md").read_text()
    assert f"saved by {info.source_format} and exported with fastsae" in card and "the FAST way" not in card
    assert "| special tokens in training | unknown (not trained by fastsae) |" in card
    metadata = json.loads((folder / info.hook_name / "cfg.json").read_text())["metadata"]
    assert (metadata["exclude_special_tokens"], metadata["prepend_bos"]) == (None, None)


def test_the_card_of_an_sae_whose_files_name_no_model_prints_no_none(sample, tmp_path):
    """A sparsify hookpoint folder copied without its run's config.json records its hook but no model, and no store."""
    made = make_sparsify(tmp_path / "run", sample, "m")
    (tmp_path / "run" / "config.json").unlink()
    assert load_any_sae(made.checkpoint).info.model_label is None
    folder = export_sae(ExportConfig(checkpoint=made.checkpoint, output=str(tmp_path / "export"), interpretations=""))
    card = (folder / "README.md").read_text()
    assert "None" not in card and f"# SAE_M={M}_K={K}: a topk SAE, `blocks.{LAYER}.hook_resid_post`" in card
    assert f"| activation width d | {D} |" in card  # the SAE's own width, which no store manifest records here


# --- pretrained SAELens SAEs from the Hugging Face cache ----------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline: huggingface_hub reads these settings at each call."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    return cache


def cached_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` at `main` in the cache's own layout (models--org--name/snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


def test_a_pretrained_saelens_sae_loads_from_the_cache_as_saelens_loads_it(
    hub_cache, sample, tiny_store, tiny_model_folder, tmp_path, monkeypatch
):
    import sae_lens

    # gpt2-small-res-jb's blocks.3.hook_resid_pre is the output of block 2, the tiny store's hook.
    release, sae_id = "gpt2-small-res-jb", "blocks.3.hook_resid_pre"
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=M, metadata=saelens_metadata(sae_id)))
    randomize_(sae)
    sae.save_model(cached_snapshot(hub_cache, "jbloom/GPT2-Small-SAEs-Reformatted") / sae_id)
    theirs = sae_lens.SAE.from_pretrained(release, sae_id)  # SAELens' own registry lookup and download, from this cache
    reference_name = f"saelens:{release}/{sae_id}"
    loaded = load_any_sae(reference_name)
    same_forward(loaded, encode_decode(theirs), sample)
    assert (loaded.info.model_name, loaded.info.hook_point, loaded.info.layer) == ("gpt2", "resid_post", 2)  # the registry's Hub link
    assert loaded.info.hub_model_id == "gpt2"  # the model card's base_model
    monkeypatch.chdir(tmp_path)
    evaluate_sae(
        EvalConfig(checkpoint=[reference_name], store=str(tiny_store), model_metrics=False, validation_fraction=0.1, max_examples=5)
    )
    assert (tmp_path / "checkpoints" / "saelens" / release / sae_id / "eval.json").is_file()


PRETRAINED_M = 2 * D  # Llama Scope R1's config.json gives the width as a whole multiple of d (expansion_factor)
NORM_IN = 7.0  # Llama Scope's dataset_average_activation_norm, by which SAELens rescales its threshold


def as_linear_layers(tensors: dict[str, torch.Tensor], encoder: str, decoder: str) -> dict[str, torch.Tensor]:
    """SAELens' tensors as the state of two torch.nn.Linear layers: weight (out, in) and bias."""
    return {
        f"{encoder}.weight": tensors["W_enc"].T.contiguous(),
        f"{encoder}.bias": tensors["b_enc"],
        f"{decoder}.weight": tensors["W_dec"].T.contiguous(),
        f"{decoder}.bias": tensors["b_dec"],
    }


def write_gemma_scope(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True)
    renamed = {name.replace("W_", "w_"): tensor.numpy() for name, tensor in tensors.items()}
    np.savez(path / "params.npz", **renamed)


def write_gemma_scope_2(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """params.safetensors, and the config.json SAELens' converter reads (fastsae takes the hook from the path)."""
    path.mkdir(parents=True)
    save_file({name.replace("W_", "w_"): tensor.contiguous() for name, tensor in tensors.items()}, path / "params.safetensors")
    config = {"architecture": "jump_relu", "model_name": "gemma-3-4b-it", "hf_hook_point_in": "model.layers.17.output"}
    (path / "config.json").write_text(json.dumps(config))


def shapes_in_the_cache(repo_id: str, filename: str) -> dict[str, list[int]]:
    """What SAELens' get_safetensors_tensor_shapes asks the Hub over HTTP, read from the cached file's header instead."""
    with safe_open(hf_hub_download(repo_id, filename), "pt") as file:
        return {name: list(file.get_slice(name).get_shape()) for name in file.keys()}


def write_llama_scope(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """hyperparams.json with one threshold for all features, in the units of activations normalised to norm √d."""
    (path / "checkpoints").mkdir(parents=True)
    hook = f"blocks.{LAYER}.hook_resid_post"
    hyperparams = {
        "d_model": D,
        "d_sae": PRETRAINED_M,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "jump_relu_threshold": float(tensors["threshold"]) * NORM_IN / D**0.5,
        "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN},
    }
    (path / "hyperparams.json").write_text(json.dumps(hyperparams))
    save_file(as_linear_layers(tensors, "encoder", "decoder"), path / "checkpoints" / "final.safetensors")


def write_llama_scope_r1_distill(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True)
    config = {"d_model": D, "expansion_factor": PRETRAINED_M // D, "hook_point_in": f"blocks.{LAYER}.hook_resid_post"}
    (path / "config.json").write_text(json.dumps(config))
    weights = {**as_linear_layers(tensors, "encoder", "decoder"), "log_jumprelu_threshold": tensors["threshold"].log()}
    save_file(weights, path / "sae_weights.safetensors")


def write_qwen_scope(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One torch file per layer, its matrices (out, in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "W_enc": tensors["W_enc"].T.contiguous(), "W_dec": tensors["W_dec"].T.contiguous()}, path)


def write_linear_layers(encoder: str, decoder: str) -> Callable[[Path, dict[str, torch.Tensor]], None]:
    """One torch file holding the two linear layers' state (DeepSeek R1's and Goodfire's SAEs, under their names)."""

    def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(as_linear_layers(tensors, encoder, decoder), path)

    return write


class PretrainedCase(NamedTuple):
    reference: str  # RELEASE/SAE_ID
    write: Callable[[Path, dict[str, torch.Tensor]], None]  # writes SAELens' tensors at the SAE's path, in the release's format
    threshold: str | None  # JumpReLU's: "per feature" or "one for all"
    model_name: str
    hook_name: str


# Each encoder reads x, not x − b_dec, as SAELens' converters for these releases say.
PRETRAINED_CASES = {
    "gemma_2": PretrainedCase(
        "gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical",
        write_gemma_scope,
        "per feature",
        "google/gemma-2-2b",
        "blocks.12.hook_resid_post",
    ),
    "gemma_3": PretrainedCase(
        "gemma-scope-2-4b-it-res/layer_17_width_16k_l0_big",
        write_gemma_scope_2,
        "per feature",
        "google/gemma-3-4b-it",
        "blocks.17.hook_resid_post",
    ),
    "llama_scope": PretrainedCase(
        f"llama_scope_lxr_8x/l{LAYER}r_8x", write_llama_scope, "one for all", "meta-llama/Llama-3.1-8B", f"blocks.{LAYER}.hook_resid_post"
    ),
    "llama_scope_r1_distill": PretrainedCase(
        f"llama_scope_r1_distill/l{LAYER}r_800m_slimpajama",
        write_llama_scope_r1_distill,
        "per feature",
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        f"blocks.{LAYER}.hook_resid_post",
    ),
    "qwen_scope": PretrainedCase(
        f"qwen-scope-3-1.7b-base-w32k-l50/layer{LAYER}", write_qwen_scope, None, "Qwen/Qwen3-1.7B-Base", f"blocks.{LAYER}.hook_resid_post"
    ),
    "deepseek_r1": PretrainedCase(
        "deepseek-r1-distill-llama-8b-qresearch/blocks.19.hook_resid_post",
        write_linear_layers("encoder", "decoder"),
        None,
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "blocks.19.hook_resid_post",
    ),
    "goodfire": PretrainedCase(
        "goodfire-llama-3.1-8b-instruct/layer_19",
        write_linear_layers("encoder_linear", "decoder_linear"),
        None,
        "meta-llama/Llama-3.1-8B-Instruct",
        "blocks.19.hook_resid_post",
    ),
}


@pytest.mark.parametrize("converter", PRETRAINED_CASES)
def test_pretrained_releases_in_other_formats_load_as_saelens_converts_them(converter, hub_cache, sample, monkeypatch):
    """Files in the release's own format, in the cache; SAE.from_pretrained reads them with SAELens' converter."""
    import sae_lens.saes.sae
    from sae_lens.loading import pretrained_sae_loaders
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides, get_norm_scaling_factor, get_repo_id_and_folder_name

    case = PRETRAINED_CASES[converter]
    release, sae_id = case.reference.split("/", 1)
    generator = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (D, PRETRAINED_M), "b_enc": (PRETRAINED_M,), "W_dec": (PRETRAINED_M, D), "b_dec": (D,)}
    tensors = {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}
    if case.threshold:  # on the activations the SAE was trained on: scaled by the registry's factor, b_dec not subtracted
        pre = sample * (get_norm_scaling_factor(release, sae_id) or 1.0) @ tensors["W_enc"] + tensors["b_enc"]
        tensors["threshold"] = quantile_thresholds(pre if case.threshold == "per feature" else pre.flatten())
    repo_id, path = get_repo_id_and_folder_name(release, sae_id)
    case.write(cached_snapshot(hub_cache, repo_id) / path, tensors)
    # Some converters take d and the width from the real model (Qwen Scope's from the repo's name): for SAELens' SAE to
    # hold the tiny test tensors, the registry's overrides, which its converters apply last, state the tiny sizes.
    monkeypatch.setattr(
        sae_lens.saes.sae, "get_config_overrides", lambda *names: {**get_config_overrides(*names), "d_in": D, "d_sae": PRETRAINED_M}
    )
    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", shapes_in_the_cache)  # gemma_3's HTTP request
    theirs = sae_lens.SAE.from_pretrained(release, sae_id)
    loaded = load_any_sae(f"saelens:{case.reference}")
    same_forward(loaded, encode_decode(theirs), sample)
    assert (loaded.info.source_format, loaded.info.model_name, loaded.info.hook_name) == ("saelens", case.model_name, case.hook_name)


def test_a_dictionary_learning_release_loads_as_saelens_loads_it(hub_cache, sample):
    """SAELens' dictionary_learning_1 releases are ae.pt + config.json; with no submodule_name, SAELens reads the
    residual stream after the trainer's layer, and so does fastsae."""
    import sae_lens

    release = "sae_bench_gemma-2-2b_topk_width-2pow12_date-1109"
    sae_id = "blocks.12.hook_resid_post__trainer_0"
    folder = cached_snapshot(hub_cache, "canrager/saebench_gemma-2-2b_width-2pow12_date-1109") / (
        "gemma-2-2b_topk_width-2pow12_date-1109/resid_post_layer_12/trainer_0"
    )
    made = make_dictionary_learning(folder, "AutoEncoderTopK", sample, "google/gemma-2-2b")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"].update(layer=12, submodule_name=None)
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_any_sae(f"saelens:{release}/{sae_id}")
    same_forward(loaded, made.reference, sample)
    assert (loaded.info.model_name, loaded.info.hook_name) == ("google/gemma-2-2b", "blocks.12.hook_resid_post")
    same_forward(loaded, encode_decode(sae_lens.SAE.from_pretrained(release, sae_id)), sample)


def test_a_store_at_another_hook_is_used_with_a_warning(sample, tiny_store, tmp_path, caplog):
    from fastsae.core.trained_sae import open_trained_sae

    made = make_sparsify(tmp_path / "run", sample, "m", f"layers.{LAYER}.mlp")
    with caplog.at_level("WARNING"):
        open_trained_sae(made.checkpoint).open_store(tiny_store)
    assert f"trained on blocks.{LAYER}.hook_mlp_out, but the store" in caplog.text


def test_a_release_that_names_its_model_as_transformer_lens_does_gives_its_hub_id():
    """Releases whose registry entry links no model page name it as TransformerLens does; the files need not be fetched."""
    for reference, hub_id in (
        ("saelens:gpt2-small-resid-post-v5-32k/blocks.0.hook_resid_post", "gpt2"),
        ("saelens:mistral-7b-res-wg/blocks.8.hook_resid_pre", "mistralai/Mistral-7B-v0.1"),
        ("saelens:gemma-scope-9b-it-res-canonical/layer_9/width_16k/canonical", "google/gemma-2-9b-it"),
    ):
        assert PretrainedSAE.parse(reference).model_name == hub_id


def test_offline_without_the_files_says_what_to_fetch_in_one_line(hub_cache):
    with pytest.raises(UserError) as caught:
        load_any_sae("saelens:gpt2-small-res-jb/blocks.3.hook_resid_pre")
    message = str(caught.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and str(hub_cache) in message
    assert (
        "hf download jbloom/GPT2-Small-SAEs-Reformatted blocks.3.hook_resid_pre/cfg.json blocks.3.hook_resid_pre/sae_weights.safetensors"
        in message
    )
    assert "or copy its cfg.json + sae_weights.safetensors into a folder and set CHECKPOINT to that folder" in message


def test_without_a_connection_the_error_comes_at_once_and_names_a_local_folder(hub_cache, monkeypatch, caplog):
    """One request, not huggingface_hub's retries (about 20 s when nothing answers); a release in a format fastsae reads
    only through SAELens' converter gets the SAELens call that saves it as a folder."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing listens, so every connection is refused at once
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", nowhere)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", nowhere + "/{repo_id}/resolve/{revision}/{filename}")
    for reference, local_folder in (
        ("saelens:gpt2-small-res-jb/blocks.3.hook_resid_pre", "or copy its cfg.json + sae_weights.safetensors into a folder"),
        (
            "saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical",
            "SAE.from_pretrained('gemma-scope-2b-pt-res-canonical', 'layer_12/width_16k/canonical').save_model('my_sae')",
        ),
    ):
        caplog.clear()
        with caplog.at_level("WARNING"), pytest.raises(UserError, match="and could not be downloaded") as caught:
            load_any_sae(reference)
        assert "Retrying" not in caplog.text
        assert local_folder in str(caught.value) and "set CHECKPOINT to that folder" in str(caught.value)


def test_names_the_registry_lacks_get_clear_errors(hub_cache, monkeypatch):
    with pytest.raises(UserError, match="write saelens:RELEASE/SAE_ID"):
        load_any_sae("saelens:gpt2-small-res-jb")
    with pytest.raises(UserError, match="not a release in SAELens' registry .*did you mean gpt2-small-res-jb"):
        load_any_sae("saelens:gpt2-small-res-jbb/blocks.3.hook_resid_pre")
    with pytest.raises(UserError, match="has no SAE 'blocks.99.hook_resid_pre'; its ids include"):
        load_any_sae("saelens:gpt2-small-res-jb/blocks.99.hook_resid_pre")
    transcoder = "saelens:gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76"
    with pytest.raises(UserError, match="'gemma_2_transcoder' converter, and its models are transcoders"):
        load_any_sae(transcoder)
    with pytest.raises(UserError, match="'gemma_3' converter, and its models are transcoders"):
        load_any_sae("saelens:gemma-scope-2-4b-pt-transcoders/transcoder/layer_17_width_16k_l0_big")
    monkeypatch.delitem(REFUSED, "gemma_2_transcoder")  # as a converter of a newer sae-lens would be
    with pytest.raises(UserError, match=r"'gemma_2_transcoder' converter, which fastsae does not know.*save_model\('my_sae'\)"):
        load_any_sae(transcoder)


def test_every_converter_of_the_registry_is_read_or_refused_with_its_reason_and_in_the_docs():
    """A sae-lens upgrade that brings a new conversion function fails here until this module reads it or says why not."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    converters = {release.conversion_func or "sae_lens" for release in get_pretrained_saes_directory().values()}
    assert converters - set(CONVERTER_FILES) - set(REFUSED) == set()
    docs = (Path(__file__).parents[1] / "docs" / "use_other_saes.md").read_text()
    assert [name for name in [*CONVERTER_FILES, *REFUSED] if f"`{name}`" not in docs] == []


def truncate(path: Path) -> None:
    """A download or copy cut short: the first half of the file."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_tensor(name: str) -> Callable[[Path], None]:
    """A save that lost one tensor."""

    def drop(path: Path) -> None:
        tensors = load_file(path)
        del tensors[name]
        save_file(tensors, path)

    return drop


DAMAGED_FILES = {
    "saelens weights truncated": (
        "saelens",
        "sae_weights.safetensors",
        truncate,
        r"sae_weights.safetensors is damaged or incomplete \(SafetensorError",
    ),
    "saelens cfg.json truncated": ("saelens", "cfg.json", truncate, r"cfg.json is damaged or incomplete \(JSONDecodeError"),
    "saelens weights without W_enc": (
        "saelens",
        "sae_weights.safetensors",
        drop_tensor("W_enc"),
        r"sae_weights.safetensors has no 'W_enc' \(it holds W_dec, b_dec, b_enc\)",
    ),
    "sparsify weights truncated": ("sparsify", "sae.safetensors", truncate, r"sae.safetensors is damaged or incomplete \(SafetensorError"),
    "sparsify cfg.json truncated": ("sparsify", "cfg.json", truncate, r"cfg.json is damaged or incomplete \(JSONDecodeError"),
    "dictionary_learning ae.pt truncated": ("dictionary_learning", "ae.pt", truncate, r"ae.pt is damaged or incomplete"),
    "dictionary_learning config.json truncated": (
        "dictionary_learning",
        "config.json",
        truncate,
        r"config.json is damaged or incomplete \(JSONDecodeError",
    ),
}
SAVE_AGAIN = {
    "saelens": "Save the SAE again with SAELens",
    "sparsify": "Save the SAE again with sparsify",
    "dictionary_learning": "Save the dictionary again with dictionary_learning",
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_damaged_file_is_one_error_naming_it_and_how_to_replace_it(case, sample, tmp_path):
    library, name, damage, problem = DAMAGED_FILES[case]
    made = {
        "saelens": lambda: make_saelens(tmp_path / "sae", "topk", sample),
        "sparsify": lambda: make_sparsify(tmp_path / "run", sample, "m"),
        "dictionary_learning": lambda: make_dictionary_learning(tmp_path / "dictionary", "AutoEncoderTopK", sample, "m"),
    }[library]()
    damage(Path(made.checkpoint) / name)
    with pytest.raises(UserError, match=problem) as caught:
        load_any_sae(made.checkpoint)
    assert str(Path(made.checkpoint) / name) in str(caught.value) and SAVE_AGAIN[library] in str(caught.value)


def test_a_damaged_download_says_how_to_download_it_again(hub_cache, sample):
    import sae_lens

    sae_id = "blocks.3.hook_resid_pre"
    folder = cached_snapshot(hub_cache, "jbloom/GPT2-Small-SAEs-Reformatted") / sae_id
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=M, metadata=saelens_metadata(sae_id))).save_model(folder)
    truncate(folder / "sae_weights.safetensors")
    command = f"hf download jbloom/GPT2-Small-SAEs-Reformatted {sae_id}/cfg.json {sae_id}/sae_weights.safetensors --force-download"
    with pytest.raises(UserError, match=r"sae_weights.safetensors is damaged or incomplete .*Fetch it again") as caught:
        load_any_sae(f"saelens:gpt2-small-res-jb/{sae_id}")
    assert command in str(caught.value)


def test_a_folder_of_something_else_names_what_checkpoint_takes(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="holds no SAE fastsae reads. CHECKPOINT takes a fastsae or HypotheSAEs .pt checkpoint"):
        load_any_sae(tmp_path)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_any_sae(tmp_path / "missing.pt")
    (tmp_path / "SAE_M=8_K=2.pt").write_bytes(b"")  # a training run's folder: the checkpoint is the file inside
    with pytest.raises(UserError, match=r"is not one SAE but holds 1 \(SAE_M=8_K=2.pt\): name one"):
        load_any_sae(tmp_path)
