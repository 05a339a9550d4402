"""Write an SAE in SAELens' v6 on-disk layout, for `sae_lens.SAE.load_from_disk`.

    cfg.json                  architecture, sizes, and a nested `metadata` (model, hook, dataset, ...)
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold for jumprelu)
    sparsity.safetensors      sparsity = log10(feature frequency + 1e-10)

SAELens does not apply our activation scale at run time, so the weights are
written with it folded in (they take raw activations). Architectures map as
topk → topk, relu → standard, jumprelu → jumprelu, and batchtopk → jumprelu
with every threshold equal to the learned batch threshold: the same function
at inference. Matryoshka SAEs export as their base architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fastsae import __version__
from fastsae.common.atomic_files import replace_folder_atomically
from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.sae_info import SAEInfo

SAELENS_FORMAT_VERSION = "6.0.0"  # cfg.json layout we write; below 6.0 SAELens reads a legacy flat config
SAELENS_ARCHITECTURE = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}


def _metadata(info: SAEInfo) -> dict[str, Any]:
    """SAELens' metadata; how the tokens were made is known only for an SAE fastsae trained, and None (unknown) for another's."""
    manifest, extraction, ours = info.store_manifest, info.extraction, info.trained_by_fastsae
    return {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "exported_by": f"fastsae {__version__}",
        # A Hub id where there is one (what SAELens users load the model with), not our "embedded:..." name.
        "model_name": info.hub_model_id or info.model_label,
        "hook_name": info.hook_name,
        "hook_head_index": None,
        "context_size": extraction.get("max_length"),
        # Whether the SAE saw contexts that open with BOS, as a SAELens ActivationsStore built from its cfg will prepend
        # it. None where that is unknown: another library's SAE, or a store extracted before fastsae recorded it.
        "prepend_bos": extraction.get("sequences_start_with_bos") if ours else None,
        "dataset_path": manifest.dataset.path,
        "packing": manifest.packing,
        "chat_template": extraction.get("chat_template"),
        "exclude_special_tokens": not info.trained_with_special_tokens if ours else None,
    }


def saelens_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """SAELens' tensors for `sae` (which takes raw activations): W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold."""
    spec = sae.spec
    with torch.no_grad():
        weights = {
            "W_enc": sae.W_enc.T.contiguous().float().cpu(),
            "b_enc": sae.b_enc.float().cpu().clone(),
            "W_dec": sae.W_dec.float().cpu().clone(),
            "b_dec": sae.b_dec.float().cpu().clone(),
        }
        if spec.architecture == "jumprelu":
            weights["threshold"] = sae.jumprelu_threshold.detach().float().cpu().clone()
        elif spec.architecture == "batchtopk":
            weights["threshold"] = sae.threshold.clamp_min(0).float().cpu().expand(spec.m).clone()
    return weights


def saelens_config(info: SAEInfo) -> dict[str, Any]:
    """SAELens' cfg.json for the SAE `info` describes (weights as `saelens_weights` writes them)."""
    spec = info.spec
    architecture = SAELENS_ARCHITECTURE[spec.architecture]
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": spec.d,
        "d_sae": spec.m,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": _metadata(info),
    }
    if architecture == "topk":
        cfg.update(k=spec.k, rescale_acts_by_decoder_norm=False)
    return cfg


def export_saelens(checkpoint: str | Path, folder: str | Path, feature_frequency: torch.Tensor | None = None) -> Path:
    """Export the checkpoint to `folder` (replaced whole, via a temp folder); returns the folder."""
    loaded = load_sae(checkpoint)
    return write_saelens_folder(loaded.sae, loaded.info, folder, feature_frequency)


def write_saelens_folder(sae: SparseAutoencoder, info: SAEInfo, folder: str | Path, feature_frequency: torch.Tensor | None = None) -> Path:
    """Write `sae` (on raw activations) in SAELens' layout to `folder` (replaced whole, via a temp folder); returns the folder."""
    weights, cfg = saelens_weights(sae), saelens_config(info)
    folder = Path(folder)

    def fill(partial: Path) -> None:
        (partial / "cfg.json").write_text(json.dumps(cfg, indent=2))
        save_file(weights, partial / "sae_weights.safetensors")
        if feature_frequency is not None:
            save_file({"sparsity": torch.log10(feature_frequency.float().cpu() + 1e-10)}, partial / "sparsity.safetensors")

    return replace_folder_atomically(folder, fill)
