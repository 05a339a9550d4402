"""A SAELens SAE folder (`cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes it) as our SAE.

SAELens' forward (sae_lens/saes/*.py) is: x' = x − b_dec·apply_b_dec_to_input, pre = x' W_enc + b_enc,
then per architecture
- standard: ReLU(pre);
- topk: the k largest of pre, ReLU'd (with rescale_acts_by_decoder_norm: of pre × ‖W_dec row‖,
  decoded as f / ‖W_dec row‖);
- jumprelu: ReLU(pre) where pre > threshold;
- batchtopk and matryoshka_batchtopk (training saves; SAELens runs them as a JumpReLU with every
  threshold at `topk_threshold`): ReLU(pre) where it exceeds that threshold, the Matryoshka widths
  kept as our prefixes;
- gated: ReLU(x' (W_enc ⊙ e^r_mag) + b_mag) where x' W_enc + b_gate > 0, which is a JumpReLU SAE
  (`SAEWeights.gated`);
and x̂ = f W_dec + b_dec. Each maps onto ours by the folds of `weights.py`, so the features and
reconstructions are SAELens' own. An SAE trained on normalised activations is folded back to raw
ones when the normalisation is a constant scale (`expected_average_only_in`, whose factor SAELens
keeps in a training checkpoint's `activation_scaler.json` or in its registry); a per-token
normalisation (`layer_norm`, `constant_norm_rescale`) cannot be folded and is refused.

A cfg.json from before SAELens 6 (no sae_lens_version, or an older one) is read as SAELens 6 reads it
(`handle_pre_6_0_config` in sae_lens/loading/pretrained_sae_loaders.py): its old key names are renamed,
its boolean normalize_activations becomes a name, and `activation_fn_str: "topk"` with
`activation_fn_kwargs: {"k": k}` makes it a Top-K SAE, whatever its `architecture` says.

Hook names are TransformerLens': `blocks.L.hook_resid_post` (our resid_post at layer L, the output
of block L), `blocks.L.hook_mlp_out`, `blocks.L.hook_attn_out` (what block L's MLP and attention add to
the residual stream, after Gemma 2's post-norms too: our mlp_out and attn_out), and `blocks.L.hook_resid_pre`,
the input of block L, which is the output of block L − 1. Model names are TransformerLens' too (gpt2-small): the SAE
records the Hub id they stand for (`saelens_model_hub_id`), which is what the steps load.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE
from fastsae.core.formats.weights import SAEWeights, read_json_config, read_safetensors
from fastsae.core.sae import SAESpec
from fastsae.core.sae_info import SAELENS_FORMAT, SAEInfo
from fastsae.lm.models import is_hub_id

logger = logging.getLogger(__name__)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ACTIVATION_SCALER_FILE = "activation_scaler.json"  # a SAELens training checkpoint's normalisation factor
SAVE_AGAIN = "Save the SAE again with SAELens (sae.save_model(folder)), or download it again."
SAELENS_DEFAULT_K = 100  # TopKSAEConfig's k (sae_lens/saes/topk_sae.py), which SAELens loads a topk cfg.json without k with
SAELENS_6 = Version("6.0.0-rc.0")  # SAELens reads a cfg.json recording an older sae_lens_version, or none, as a legacy file
LEGACY_KEYS = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}  # -> SAELens 6's
SAELENS_ARCHITECTURES = {  # SAELens' -> ours
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka_batchtopk": "batchtopk",
    "gated": "jumprelu",
}
SUPPORTED_HOOKS = (
    "blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.hook_attn_out, "
    "and blocks.L.hook_resid_pre for L ≥ 1 (the output of block L − 1)"
)
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out|resid_pre)")


def is_saelens_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def saelens_hook(name: str | None, source: str) -> tuple[str | None, int | None]:
    """(hook point, layer) of a SAELens hook name; (None, None) when the SAE records none."""
    if name is None:
        return None, None
    match = _HOOK.fullmatch(name)
    if match is None or (match[2] == "resid_pre" and int(match[1]) == 0):
        raise UserError(
            f"{source} was trained on {name!r}, which fastsae does not extract. It reads {SUPPORTED_HOOKS}; "
            "use an SAE trained on one of those."
        )
    layer, point = int(match[1]), match[2]
    return ("resid_post", layer - 1) if point == "resid_pre" else (point, layer)


def saelens_model_hub_id(name: str) -> str | None:
    """The Hub id of the model a SAELens SAE names; None where that is unknown (a local path, a name TransformerLens does
    not know). SAELens records TransformerLens' name for its model, not always the Hub id (gpt2-small is gpt2, gemma-2-2b
    is google/gemma-2-2b), so TransformerLens' own table translates it. Only a name without a slash is looked up, as an
    `org/name` is a Hub id already and importing TransformerLens takes seconds; a name that is both (gpt2) is its own."""
    if not is_hub_id(name):
        return None
    if "/" in name:
        return name
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    except ImportError:
        logger.info("%r, the model a SAELens SAE names, is kept as written: transformer_lens is not installed to translate it.", name)
        return None
    try:
        return get_official_model_name(name)
    except ValueError:  # not one of TransformerLens' models or aliases
        logger.info("%r, the model a SAELens SAE names, is kept as written: TransformerLens does not know it.", name)
        return None


def load_saelens_folder(folder: Path) -> LoadedSAE:
    """The SAE in `folder`, on raw activations, with the model and hook its cfg.json names."""
    cfg = read_json_config(folder / CONFIG_FILE, SAVE_AGAIN)
    scaler = folder / ACTIVATION_SCALER_FILE
    scale = read_json_config(scaler, SAVE_AGAIN).get("scaling_factor") if scaler.is_file() else None
    return saelens_sae(cfg, read_safetensors(folder / WEIGHTS_FILE, SAVE_AGAIN), str(folder), activation_scale=scale)


def saelens_sae(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    source: str,
    *,
    activation_scale: float | None = None,
    model_name: str | None = None,
) -> LoadedSAE:
    """Our SAE from SAELens' config and tensors. `activation_scale` is the constant that normalised the training
    activations (when cfg.json says they were); `model_name` replaces the model cfg.json names. Either is recorded as its
    Hub id where `saelens_model_hub_id` knows it, so the steps load the model, else as written."""
    recorded = _settings(cfg, source)
    architecture = recorded.get("architecture")
    if architecture not in SAELENS_ARCHITECTURES:
        raise UserError(
            f"{source} is a SAELens {architecture!r} SAE, whose forward fastsae cannot run exactly. "
            f"It reads SAELens' {', '.join(SAELENS_ARCHITECTURES)} SAEs."
        )
    _refuse_what_cannot_be_folded(recorded, source)
    weights = _weights(tensors, architecture, source)
    if not recorded.get("apply_b_dec_to_input", True):
        weights = weights.with_input_bias_folded()
    if recorded.get("normalize_activations") == "expected_average_only_in":
        if not activation_scale:
            raise UserError(
                f"{source} was trained on activations scaled by a constant (normalize_activations: expected_average_only_in) "
                f"but no factor is recorded with it ({ACTIVATION_SCALER_FILE}, or the registry's norm_scaling_factor). "
                "Fold it in SAELens, sae.fold_activation_norm_scaling_factor(factor), then sae.save_model(folder), and load that folder."
            )
        weights = weights.with_input_scale_folded(activation_scale)
    # After the scale, as SAELens folds it into the raw weights and rescales by the scaled decoder's norms at run time:
    # the other order would report a rescaled SAE's features, and compare BatchTopK's threshold, in units 1/scale apart.
    if recorded.get("rescale_acts_by_decoder_norm"):
        weights = weights.with_decoder_norms_folded()
    ours = SAELENS_ARCHITECTURES[architecture]
    k = _k(recorded, source, weights.m) if ours in ("topk", "batchtopk") else 0
    widths = tuple(recorded.get("matryoshka_widths") or ()) if architecture == "matryoshka_batchtopk" else ()
    spec = SAESpec(ours, d=weights.d, m=weights.m, k=k, prefixes=widths if len(widths) > 1 else ())
    hook_point, layer = saelens_hook(recorded.get("hook_name"), source)
    _warn_about_processed_models(recorded, source)
    named = model_name or recorded.get("model_name")
    hub_id = saelens_model_hub_id(named) if named else None
    info = SAEInfo.foreign(spec, SAELENS_FORMAT, hub_id or named, hook_point, layer, model_source="hub" if hub_id else None)
    return LoadedSAE(weights.to_sae(spec), info)


def _settings(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """cfg.json's settings, flat (SAELens ≥ 6 nests the origin under "metadata"), as SAELens 6 reads them: a legacy file
    converted as handle_pre_6_0_config converts it, so an old Top-K SAE is not run as a ReLU one."""
    recorded = {**cfg, **(cfg.get("metadata") or {})}
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        if version and Version(str(version)) >= SAELENS_6:
            return recorded
    except InvalidVersion:
        raise UserError(f"{source}: cfg.json records sae_lens_version {version!r}, which is not a version. {SAVE_AGAIN}") from None
    legacy = {LEGACY_KEYS.get(key, key): value for key, value in recorded.items()}
    legacy["architecture"] = legacy.get("architecture") or "standard"
    if isinstance(legacy.get("normalize_activations"), bool):
        legacy["normalize_activations"] = "expected_average_only_in" if legacy["normalize_activations"] else "none"
    says_topk = legacy.get("activation_fn") == "topk" or legacy["architecture"] == "topk"
    k = (legacy.get("activation_fn_kwargs") or {}).get("k")
    if says_topk and k is not None:
        legacy["architecture"], legacy["k"] = "topk", k
    elif says_topk and ("activation_fn_kwargs" in legacy or legacy["architecture"] != "topk"):
        raise UserError(
            f"{source}: this SAELens SAE from before SAELens 6 uses the topk activation but its cfg.json gives no k in "
            "activation_fn_kwargs, which SAELens required (SAELens 6 runs such a file as a ReLU SAE or fails), so it is not loaded. "
            'Add its k to cfg.json, "activation_fn_kwargs": {"k": K}.'
        )
    return legacy


def _k(recorded: dict[str, Any], source: str, m: int) -> int:
    """cfg.json's k, else SAELens' default, as SAELens loads the file; at most M."""
    k = recorded.get("k")
    if k is None:
        logger.warning("%s: cfg.json gives no k; SAELens loads it with its default k=%d, and so does fastsae.", source, SAELENS_DEFAULT_K)
        k = SAELENS_DEFAULT_K
    return min(max(1, round(k)), m)


def _refuse_what_cannot_be_folded(recorded: dict[str, Any], source: str) -> None:
    """One message for each SAELens option whose forward our SAE cannot compute."""
    normalisation = recorded.get("normalize_activations") or "none"
    problem = None
    if normalisation in ("layer_norm", "constant_norm_rescale"):
        problem = f"normalises each token at run time (normalize_activations: {normalisation}), which no weights can fold in"
    elif normalisation == "covariance_whitening":
        problem = (
            "whitens its inputs (a training checkpoint: SAELens folds the whitening in at the end of training). "
            "Load the final save, or fold it in SAELens with sae.fold_activation_whitening(...) and save_model"
        )
    elif normalisation not in ("none", "expected_average_only_in"):
        problem = f"normalises its inputs in a way fastsae does not know ({normalisation!r})"
    elif recorded.get("hook_head_index") is not None:
        problem = f"reads one attention head (hook_head_index {recorded['hook_head_index']}), not a whole hook"
    elif recorded.get("finetuning_scaling_factor"):
        problem = "rescales its features by a fine-tuned vector (finetuning_scaling_factor), an option of old SAELens versions"
    elif recorded.get("activation_fn") not in (None, "relu", "topk"):
        problem = f"uses the activation {recorded['activation_fn']!r}"
    if problem:
        raise UserError(f"{source}: this SAELens SAE {problem}: fastsae's SAE cannot compute it exactly, so it is not loaded.")


def _weights(tensors: dict[str, torch.Tensor], architecture: str, source: str) -> SAEWeights:
    """SAELens' tensors (W_enc is (d, M)) in our layout; a gated SAE as the JumpReLU SAE it equals."""
    if architecture == "gated":
        return SAEWeights.gated(
            source, tensors["W_enc"].T, tensors["r_mag"], tensors["b_gate"], tensors["b_mag"], tensors["W_dec"], tensors["b_dec"]
        )
    return SAEWeights.of(
        source, tensors["W_enc"].T, tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], _threshold(tensors, architecture)
    )


def _threshold(tensors: dict[str, torch.Tensor], architecture: str) -> torch.Tensor | None:
    """JumpReLU's thresholds (SAELens before 6 stored log thresholds) or a BatchTopK training save's one threshold."""
    if architecture == "jumprelu":
        return tensors["log_threshold"].exp() if "log_threshold" in tensors else tensors["threshold"]
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        return tensors["topk_threshold"]
    return None


def _warn_about_processed_models(recorded: dict[str, Any], source: str) -> None:
    """TransformerLens' center_writing_weights changes the residual stream the SAE was trained on; fastsae reads the model's own."""
    processing = recorded.get("model_from_pretrained_kwargs") or {}
    if processing.get("center_writing_weights"):
        logger.warning(
            "%s was trained on TransformerLens' processed model (center_writing_weights), whose residual stream has each "
            "token's mean over d removed; fastsae reads the model's own activations, so reconstructions will be worse.",
            source,
        )
