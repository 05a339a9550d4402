"""SAEBench's own core evaluation, run on an in-memory model, SAE and token batches: the reference our evaluation is checked against.

Everything that computes a number is SAEBench's (sae-bench 0.6.0, `sae_bench/evals/core/main.py`), SAELens' (6.54: the SAE
classes) or TransformerLens' (the Llama and Gemma conversions and forward pass); this module only wires them together offline:

- `hooked_transformer_from_hf` builds a `HookedTransformer` from an in-memory Hugging Face Llama (or Gemma 2 or 3) with
  TransformerLens' own config and weight conversion and no processing (no LayerNorm folding, no centering), as SAEBench
  loads its models (`from_pretrained_no_processing`). `HookedTransformer.from_pretrained(..., hf_model=...)` cannot do it
  offline: it wants an official model name and reads that model's config from the Hub, or for a Gemma takes that model's
  shapes from the name.
- `saelens_sae` builds a SAELens SAE from weights in SAELens' layout.
- `TokenBatches` stands in for SAELens' `ActivationsStore`: it hands out the given batches in order, and nothing else.
- `saebench_core_reference` runs what SAEBench's `multiple_evals` runs for a custom SAE object: `load_and_format_sae`,
  `run_evals` (which calls `get_downstream_reconstruction_metrics` and `get_sparsity_and_variance_metrics`, then the
  weight-based feature metrics), `calculate_misc_metrics`, `replace_nans_with_negative_one` and `save_single_eval_result`.

SAELens 6.54's `ActivationsStore.reset_input_dataset()` rewinds `iterable_dataset`, which `get_batch_tokens` does not read
(it reads `iterable_sequences`), so in a real SAEBench run the sparsity/variance pass takes the batches *after* the
reconstruction ones. `TokenBatches` keeps that behaviour: the reconstruction pass reads `batches`, the sparsity/variance
pass reads `sparsity_batches` (by default the same batches again).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import sae_bench.evals.core.main as saebench_core
import sae_bench.sae_bench_utils.general_utils as saebench_general_utils
import torch
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_lens import SAE
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

SAEBENCH_VERSION = version("sae-bench")
# SAEBench's names for the SAELens architectures; "relu" is our name for SAELens' "standard".
SAELENS_ARCHITECTURES = {"standard": "standard", "relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
# The official model whose TransformerLens settings a Gemma of each architecture is built with (`_gemma_config`).
GEMMA_SETTINGS = {"Gemma2ForCausalLM": "google/gemma-2-2b", "Gemma3ForCausalLM": "google/gemma-3-270m"}


def saebench_ignore_tokens(tokenizer) -> set[int]:
    """The token ids SAEBench's `multiple_evals` leaves out of every average: the tokenizer's pad, eos and bos ids."""
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    if None in ids:  # SAEBench would pass None on and crash comparing tokens with it
        raise ValueError(f"the tokenizer lacks a pad, eos or bos token: {ids}")
    return ids


def hooked_transformer_from_hf(hf_model) -> HookedTransformer:
    """A TransformerLens `HookedTransformer` with the weights of an in-memory Hugging Face Llama, Gemma 2 or Gemma 3 (text),
    unprocessed, from TransformerLens' own config and weight conversion.

    No tokenizer is attached: the SAEBench functions pass token ids and never read `model.tokenizer`, and with a
    *left*-padding tokenizer attached TransformerLens would mask leading pad-id tokens, which Hugging Face's forward given
    no attention mask does not (SmolLM2's tokenizer pads right, so attaching it would change nothing).
    """
    architecture = type(hf_model).__name__
    if architecture == "LlamaForCausalLM":
        cfg = _llama_config(hf_model)
        state_dict = convert_llama_weights(hf_model, cfg)
    elif architecture in GEMMA_SETTINGS:
        cfg = _gemma_config(hf_model, GEMMA_SETTINGS[architecture])
        state_dict = convert_gemma_weights(hf_model, cfg)
    else:
        raise ValueError(f"only Llama, Gemma 2 and Gemma 3 models are converted here, got {architecture}")
    model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def _llama_config(hf_model) -> HookedTransformerConfig:
    """TransformerLens' `get_pretrained_model_config` (its `LlamaForCausalLM` branch), fed a config.json written to a
    temporary folder."""
    hf_config = copy.deepcopy(hf_model.config)
    hf_config.architectures = [type(hf_model).__name__]  # a config built in memory has none; TransformerLens reads it
    with tempfile.TemporaryDirectory(prefix="hf-config-") as folder:
        # TransformerLens picks its conversion branch by substrings of the path ("llama", "gemma"), and a path holding
        # "llama" takes a branch that never reads the config: keep them out of it.
        if any(name in folder.lower() for name in ("llama", "gemma")):
            raise RuntimeError(f"the temporary folder {folder} names a model family; set TMPDIR to another folder")
        hf_config.save_pretrained(folder)
        cfg = tl_loading.get_pretrained_model_config(
            folder, hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu", dtype=hf_model.dtype
        )
    cfg.tokenizer_name = None  # otherwise the constructor loads a tokenizer from the (deleted) folder
    return cfg


def _gemma_config(hf_model, official_name: str) -> HookedTransformerConfig:
    """TransformerLens' settings for `official_name`, with `hf_model`'s shapes and layer types.

    TransformerLens reads a Gemma's settings off its official name, never off a config, so a tiny Gemma takes those of
    the named model; its other settings (query_pre_attn_scalar = head_dim, softcaps, rope bases) must match them.
    """
    hf_config = hf_model.config
    settings = tl_loading.convert_hf_model_config(official_name)  # the name's branch, which reads nothing from the Hub
    settings.update(
        d_model=hf_config.hidden_size,
        d_head=hf_config.head_dim,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.max_position_embeddings,
        window_size=hf_config.sliding_window,
        attn_types=["local" if kind == "sliding_attention" else "global" for kind in hf_config.layer_types],
        tokenizer_name=None,
        device="cpu",
        dtype=hf_model.dtype,
    )
    return HookedTransformerConfig.from_dict(settings)


def saelens_sae(
    sae_weights: dict[str, torch.Tensor],
    architecture: str,
    k: int | None,
    hook_name: str,
    model_name: str,
    context_size: int,
    apply_b_dec_to_input: bool = True,
) -> SAE:
    """A SAELens SAE from weights in SAELens' layout (`W_enc` [d, M], `b_enc` [M], `W_dec` [M, d], `b_dec` [d],
    `threshold` [M] for jumprelu), float32 on the CPU, no activation normalisation."""
    d_in, d_sae = sae_weights["W_enc"].shape
    cfg: dict[str, Any] = {
        "architecture": SAELENS_ARCHITECTURES[architecture],
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "context_size": context_size, "prepend_bos": False},
    }
    if cfg["architecture"] == "topk":
        if k is None:
            raise ValueError("a topk SAE needs k")
        cfg["k"] = k
    sae = SAE.from_dict(cfg)
    sae.load_state_dict({name: tensor.detach().to(torch.float32) for name, tensor in sae_weights.items()}, strict=True)
    return sae.eval()


class TokenBatches:
    """The part of SAELens' `ActivationsStore` that SAEBench's core evaluation touches, over batches given in advance.

    `get_batch_tokens(n)` returns the next batch (which must have n rows); `reset_input_dataset()` does not rewind it,
    as the real store's does not (see the module docstring); `context_size` is the batches' length."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        shapes = {tuple(batch.shape) for batch in batches}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"batches must all have one (prompts, context) shape, got {shapes}")
        self.batches = list(batches)
        self.store_batch_size_prompts, self.context_size = next(iter(shapes))
        self.next_batch = 0

    def get_batch_tokens(
        self, batch_size: int | None = None, raise_at_epoch_end: bool = False, move_to_model_device: bool = True
    ) -> torch.Tensor:
        if self.next_batch == len(self.batches):
            raise RuntimeError("SAEBench asked for more token batches than were given")
        batch = self.batches[self.next_batch]
        if (batch_size or self.store_batch_size_prompts) != batch.shape[0]:
            raise RuntimeError(f"SAEBench asked for {batch_size} prompts, the next batch has {batch.shape[0]}")
        self.next_batch += 1
        return batch.long()

    def reset_input_dataset(self) -> None:
        pass

    @property
    def exhausted(self) -> bool:
        return self.next_batch == len(self.batches)


class SAEBenchCoreReference(NamedTuple):
    """What SAEBench computes for one SAE.

    metrics: `eval_result_metrics` before NaNs become -1: groups `model_behavior_preservation`,
        `model_performance_preservation`, `reconstruction_quality`, `shrinkage`, `sparsity`, `token_stats`, `misc_metrics`.
    feature_metrics: per-feature lists (`feature_density`, `consistent_activation_heuristic`, `encoder_bias`,
        `encoder_norm`, `encoder_decoder_cosine_sim`, `max_encoder_cosine_sim`, `max_decoder_cosine_sim`), NaNs kept.
    eval_output: the `CoreEvalOutput` JSON SAEBench's `save_single_eval_result` writes, parsed.
    max_logit_difference: the largest |TransformerLens − Hugging Face| logit over every batch given.
    per_token_losses: when asked for, SAEBench's `get_recons_loss` on each reconstruction batch, unmasked: the
        cross-entropies (prompts, context − 1) and KL divergences (prompts, context) its means are taken over.
    """

    metrics: dict[str, dict[str, float]]
    feature_metrics: dict[str, list[float]]
    eval_output: dict[str, Any]
    max_logit_difference: float
    per_token_losses: list[dict[str, torch.Tensor]] | None = None

    @property
    def flat(self) -> dict[str, float]:
        """Every scalar metric under its SAEBench name (`ce_loss_score`, `l0`, `frac_alive`, ...)."""
        return {name: value for group in self.metrics.values() for name, value in group.items()}


@torch.no_grad()
def max_logit_difference(hf_model, hooked_model: HookedTransformer, batches: Sequence[torch.Tensor]) -> float:
    return max((hooked_model(batch) - hf_model(batch).logits).abs().max().item() for batch in batches)


def saebench_core_reference(
    hf_model,
    layer: int,
    sae_weights: dict[str, torch.Tensor],
    architecture: str,
    k: int | None,
    batches: Sequence[torch.Tensor],
    ignore_tokens: set[int],
    sparsity_batches: Sequence[torch.Tensor] | None = None,
    model_name: str = "tiny-llama",
    logits_atol: float = 1e-4,
    apply_b_dec_to_input: bool = True,
    exclude_special_tokens_from_reconstruction: bool = False,
    per_token_losses: bool = False,
) -> SAEBenchCoreReference:
    """SAEBench's core metrics for an SAE on `blocks.{layer}.hook_resid_post` of `hf_model`, over the given token batches.

    batches: (prompts, context) token ids, all one shape, fed to the model as they are (TransformerLens prepends no BOS
        to token ids); the reconstruction pass (CE, KL) reads them in order.
    sparsity_batches: what the sparsity/variance pass reads (l0, l1, norms, explained variance, mse, cossim, feature
        density); the same batches when None.
    ignore_tokens: ids left out of every average (SAEBench passes the tokenizer's pad, eos and bos: `saebench_ignore_tokens`).
    exclude_special_tokens_from_reconstruction: SAEBench's option; its default False replaces the activation at every
        position, ignored ones included; True keeps the model's own at the positions of `ignore_tokens`.
    per_token_losses: also return `get_recons_loss`'s per-position values for each reconstruction batch (three more
        forward passes a batch).
    Runs SAEBench's defaults otherwise: every metric group on, featurewise statistics on.
    """
    sparsity_batches = list(batches if sparsity_batches is None else sparsity_batches)
    hooked_model = hooked_transformer_from_hf(hf_model)
    distinct_batches = list({id(batch): batch for batch in [*batches, *sparsity_batches]}.values())
    logit_difference = max_logit_difference(hf_model, hooked_model, distinct_batches)
    if not logit_difference <= logits_atol:
        raise AssertionError(f"TransformerLens' logits differ from Hugging Face's by {logit_difference:.3g} > {logits_atol}")

    store = TokenBatches([*batches, *sparsity_batches])
    sae = saelens_sae(sae_weights, architecture, k, f"blocks.{layer}.hook_resid_post", model_name, store.context_size, apply_b_dec_to_input)
    sae_id, sae, _ = saebench_general_utils.load_and_format_sae("fastsae", sae, "cpu")  # as multiple_evals does for an SAE object
    eval_config = CoreEvalConfig(
        model_name=model_name,
        llm_dtype="float32",
        batch_size_prompts=store.store_batch_size_prompts,
        n_eval_reconstruction_batches=len(batches),
        n_eval_sparsity_variance_batches=len(sparsity_batches),
        dataset="token batches given to saebench_core_reference",
        context_size=store.context_size,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=exclude_special_tokens_from_reconstruction,
    )
    metrics, feature_metrics = saebench_core.run_evals(sae, store, hooked_model, eval_config, ignore_tokens=set(ignore_tokens))
    if not store.exhausted:
        raise AssertionError(f"SAEBench read {store.next_batch} of the {len(store.batches)} token batches")
    metrics["misc_metrics"] = saebench_core.calculate_misc_metrics(feature_metrics)
    losses = None
    if per_token_losses:
        losses = [
            saebench_core.get_recons_loss(
                sae, hooked_model, batch.long(), store, True, True, set(ignore_tokens), exclude_special_tokens_from_reconstruction
            )
            for batch in batches
        ]

    result = {"unique_id": f"fastsae_{sae_id}", "sae_set": "fastsae", "sae_id": sae_id, "eval_cfg": eval_config, "metrics": metrics}
    result["feature_metrics"] = feature_metrics
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "core.json"
        # The commit hash SAEBench records is `git rev-parse HEAD` in the working directory (whatever repository that
        # is); the package version says more here.
        saebench_core.save_single_eval_result(
            saebench_core.replace_nans_with_negative_one(result),
            saebench_core.get_eval_uuid(),
            saebench_core.get_sae_lens_version(),
            f"sae-bench=={SAEBENCH_VERSION}",
            str(path),
            sae,
        )
        eval_output = json.loads(path.read_text())
    return SAEBenchCoreReference(metrics, feature_metrics, eval_output, logit_difference, losses)
