"""A dictionary_learning save (`ae.pt` + `config.json`, as its `trainSAE` writes them) as our SAE.

`ae.pt` is the dictionary's state_dict; `config.json` holds `{"trainer": trainer.config, ...}`, whose
`dict_class` says which class the weights belong to, beside `activation_dim`, `dict_size`, `k`,
`layer`, `lm_name` and `submodule_name`. The forwards (dictionary.py, trainers/*.py), as its
`utils.load_dictionary` loads them:
- AutoEncoder: ReLU(encoder(x − bias)), x̂ = decoder(f) + bias; loaded with its decoder columns
  normalised to unit length (the norms moved into the encoder), as `from_pretrained` does;
- AutoEncoderTopK: the k largest of ReLU(encoder(x − b_dec)); x̂ = decoder(f) + b_dec;
- BatchTopKSAE and MatryoshkaBatchTopKSAE: ReLU(encoder(x − b_dec)) where it exceeds the learned
  `threshold` (their inference path);
- JumpReluAutoEncoder: ReLU(pre) where pre = x W_enc + b_enc exceeds `threshold`: its encoder reads
  x, not x − b_dec (`apply_b_dec_to_input` is False and not saved), so b_dec is folded into b_enc.
- GatedAutoEncoder: ReLU(e^r_mag ⊙ encoder(x − decoder_bias) + mag_bias) where encoder(x − decoder_bias)
  + gate_bias > 0, which is a JumpReLU SAE (`SAEWeights.gated`); x̂ = decoder(f) + decoder_bias.
`trainSAE(normalize_activations=True)` scales the biases back before saving, so `ae.pt` already
takes raw activations.

`submodule_name` is free text; the names of dictionary_learning's demos, `resid_post_layer_L`,
`mlp_out_layer_L` and `attn_out_layer_L`, give the hook. Otherwise only the layer is known and the
steps that need the hook ask for it.
"""

from __future__ import annotations

import logging
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE
from fastsae.core.formats.weights import SAEWeights, read_json_config, read_torch_tensors
from fastsae.core.sae import SAESpec
from fastsae.core.sae_info import DICTIONARY_LEARNING_FORMAT, SAEInfo
from fastsae.lm.hook_points import HOOK_POINTS

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
SAVE_AGAIN = "Save the dictionary again with dictionary_learning (its trainSAE writes ae.pt and config.json), or download it again."
_SUBMODULE = re.compile(rf"({'|'.join(HOOK_POINTS)})_layer_(\d+)")
DICT_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder")


def is_dictionary_learning_folder(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def load_dictionary_learning_folder(folder: Path, unnamed_hook_point: str | None = None, fix: str = SAVE_AGAIN) -> LoadedSAE:
    """The dictionary in `folder`, on raw activations. `unnamed_hook_point` is the hook to assume when its
    submodule_name says none (SAELens' registry does, for the releases it converts); `fix` is how to replace a damaged file."""
    trainer = read_json_config(folder / CONFIG_FILE, fix).get("trainer")
    if not isinstance(trainer, dict):
        raise UserError(f"{folder / CONFIG_FILE} is not a dictionary_learning config (it needs a 'trainer' block).")
    dict_class = trainer.get("dict_class")
    if dict_class not in DICT_CLASSES:
        raise UserError(
            f"{folder} holds a dictionary_learning {dict_class!r}, whose forward fastsae cannot run exactly. "
            f"It reads {', '.join(DICT_CLASSES)}."
        )
    state = read_torch_tensors(folder / WEIGHTS_FILE, fix)
    weights = _weights(state, dict_class, str(folder / WEIGHTS_FILE))
    k = int(trainer.get("k") or state.get("k", 0))
    if dict_class == "AutoEncoder":
        spec = SAESpec("relu", weights.d, weights.m, 0)
    elif dict_class == "AutoEncoderTopK":
        spec = SAESpec("topk", weights.d, weights.m, k)
    elif dict_class in ("JumpReluAutoEncoder", "GatedAutoEncoder"):
        spec = SAESpec("jumprelu", weights.d, weights.m, 0)
    else:  # BatchTopK, with Matryoshka's groups as prefixes (at inference every group is active)
        groups = [int(size) for size in state.get("group_sizes", [])]
        spec = SAESpec("batchtopk", weights.d, weights.m, k, prefixes=tuple(accumulate(groups)) if len(groups) > 1 else ())
    hook_point, layer = _hook(trainer, unnamed_hook_point, folder)
    info = SAEInfo.foreign(spec, DICTIONARY_LEARNING_FORMAT, trainer.get("lm_name"), hook_point, layer)
    return LoadedSAE(weights.to_sae(spec), info)


def _weights(state: dict[str, torch.Tensor], dict_class: str, source: str) -> SAEWeights:
    """The state_dict's tensors in our layout, folded so that our forward is the class's."""
    if dict_class == "GatedAutoEncoder":  # nn.Linear encoder (M, d) without bias, decoder (d, M)
        return SAEWeights.gated(
            source,
            state["encoder.weight"],
            state["r_mag"],
            state["gate_bias"],
            state["mag_bias"],
            state["decoder.weight"].T,
            state["decoder_bias"],
        )
    if dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):  # nn.Parameters: W_enc (d, M), W_dec (M, d)
        weights = SAEWeights.of(source, state["W_enc"].T, state["b_enc"], state["W_dec"], state["b_dec"], state["threshold"])
        return weights.with_input_bias_folded() if dict_class == "JumpReluAutoEncoder" else weights
    # nn.Linear encoder (M, d) and decoder (d, M); AutoEncoder calls its input bias `bias`
    b_dec = state["bias"] if dict_class == "AutoEncoder" else state["b_dec"]
    threshold = state["threshold"] if dict_class == "BatchTopKSAE" else None
    weights = SAEWeights.of(source, state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T, b_dec, threshold)
    return weights.with_decoder_norms_folded() if dict_class == "AutoEncoder" else weights


def _hook(trainer: dict[str, Any], unnamed_hook_point: str | None, folder: Path) -> tuple[str | None, int | None]:
    """(hook point, layer) from the trainer's submodule_name and layer."""
    layer = trainer.get("layer")
    name = trainer.get("submodule_name")
    match = _SUBMODULE.fullmatch(name or "")
    if match:
        if layer is not None and int(match[2]) != int(layer):
            raise UserError(f"{folder / CONFIG_FILE} contradicts itself: submodule_name {name!r} but layer {layer}.")
        return match[1], int(match[2])
    if name:
        logger.info("%s: submodule_name %r does not say which hook it is; the steps that need the hook ask for it.", folder, name)
    return (unnamed_hook_point if not name else None), (None if layer is None else int(layer))
