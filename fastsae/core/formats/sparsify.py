"""A sparsify SAE folder (`cfg.json` + `sae.safetensors`, as `SparseCoder.save_to_disk` writes it) as our SAE.

sparsify (sparse_coder.py, fused_encoder.py) computes pre = ReLU(encoder(x − b_dec)), keeps the k
largest, and decodes x̂ = f W_dec + b_dec: our Top-K SAE, weight for weight. Its options that change
that forward are refused: the `groupmax` activation, a `skip_connection` (x̂ gains W_skip x),
`transcode` (it predicts another module's output from this one's input), and `multi_topk`, whose
forward returns a 4k-sparse reconstruction beside the k-sparse code.

A training run writes one folder per hookpoint, named by the hookpoint, beside the run's
`config.json` (which names the model). Hookpoints are module paths inside the model's base model:
`layers.L` is block L, so its output is our resid_post at layer L; `layers.L.mlp` is mlp_out and
`layers.L.self_attn` attn_out (GPT-2's `h.L`, and the other submodule names fastsae hooks, too). sparsify
reads those modules' own outputs, which fastsae's mlp_out and attn_out are not where a block normalises
them before adding them to the residual stream (Gemma 2, OLMo 2, ...: `hook_points.RESIDUAL_WRITERS`); loading the
model for such an SAE logs a warning (`TrainedSAE.load_model`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE
from fastsae.core.formats.weights import SAEWeights, read_json_config, read_safetensors
from fastsae.core.sae import SAESpec
from fastsae.core.sae_info import SPARSIFY_FORMAT, SAEInfo
from fastsae.lm.hook_points import HOOK_SUBMODULES

logger = logging.getLogger(__name__)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"  # the training run's settings, in the folder above the hookpoints
SAVE_AGAIN = "Save the SAE again with sparsify (SparseCoder.save_to_disk), or download it again."
SPARSIFY_DEFAULT_K = 32  # SparseCoderConfig's k (sparsify/config.py), which SparseCoder.load_from_disk gives a cfg.json without k
_HOOKPOINT = re.compile(r"(?:layers|h)\.(\d+)(?:\.(\w+))?")
_SUBMODULE_HOOKS = {name: hook_point for hook_point, names in HOOK_SUBMODULES.items() for name in names}
# Options of sparsify's SparseCoderConfig that change its forward, and why each cannot be loaded.
_REFUSED = {
    "skip_connection": "adds a linear skip connection (W_skip x) to its reconstruction",
    "transcode": "is a transcoder: it predicts another module's output, not its own input",
    "multi_topk": "was trained with Multi-TopK, and its forward returns a 4k-sparse reconstruction",
}


def is_sparsify_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def sparsify_hook(hookpoint: str, source: str) -> tuple[str, int]:
    """(hook point, layer) of a sparsify hookpoint, the folder's name."""
    match = _HOOKPOINT.fullmatch(hookpoint)
    if match is None or (match[2] is not None and match[2] not in _SUBMODULE_HOOKS):
        raise UserError(
            f"{source} was trained on the hookpoint {hookpoint!r}, which fastsae does not extract. It reads layers.L "
            "(the residual stream after block L), layers.L.mlp and layers.L.self_attn; use an SAE trained on one of those."
        )
    return ("resid_post" if match[2] is None else _SUBMODULE_HOOKS[match[2]]), int(match[1])


def load_sparsify_folder(folder: Path) -> LoadedSAE:
    """The SAE in a hookpoint folder; the model comes from the run's config.json above it, when there is one."""
    cfg = read_json_config(folder / CONFIG_FILE, SAVE_AGAIN)
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{folder}: this sparsify SAE uses the {cfg['activation']!r} activation; fastsae runs its topk SAEs only.")
    refused = [reason for option, reason in _REFUSED.items() if cfg.get(option)]
    if refused:
        raise UserError(f"{folder}: this sparsify SAE {refused[0]}, which fastsae's SAE cannot compute exactly, so it is not loaded.")
    tensors = read_safetensors(folder / WEIGHTS_FILE, SAVE_AGAIN)
    weights = SAEWeights.of(
        str(folder), W_enc=tensors["encoder.weight"], b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"]
    )
    hook_point, layer = sparsify_hook(folder.name, str(folder))
    run_config = folder.parent / RUN_CONFIG_FILE
    model_name = read_json_config(run_config, SAVE_AGAIN).get("model") if run_config.is_file() else None
    if "k" not in cfg:
        logger.warning("%s: cfg.json gives no k; sparsify loads it with its default k=%d, and so does fastsae.", folder, SPARSIFY_DEFAULT_K)
    spec = SAESpec("topk", d=weights.d, m=weights.m, k=int(cfg.get("k", SPARSIFY_DEFAULT_K)))
    return LoadedSAE(weights.to_sae(spec), SAEInfo.foreign(spec, SPARSIFY_FORMAT, model_name, hook_point, layer))
