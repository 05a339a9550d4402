"""Named places in a decoder-only transformer whose outputs we read (and later steps replace).

`layer=L` always means decoder block L (0-based), as in SAELens'
`blocks.L.hook_resid_post`; in Hugging Face terms the residual stream after
block L is `hidden_states[L + 1]` (entry 0 is the embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

from fastsae.errors import UserError

HOOK_POINTS = ("resid_post", "mlp_out", "attn_out")


def hook_name(layer: int, hook_point: str) -> str:
    """SAELens-style name, e.g. `blocks.12.hook_resid_post`."""
    return f"blocks.{layer}.hook_{hook_point}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (`model.model.layers` for Llama-family models)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserError(f"could not find the decoder blocks of {type(model).__name__}; only decoder-only transformers are supported.")


def check_layers(model: nn.Module, layers: list[int]) -> None:
    n_layers = len(decoder_layers(model))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: this model has {n_layers} blocks, so LAYERS must be in 0..{n_layers - 1}.")


def hooked_module(model: nn.Module, layer: int, hook_point: str) -> nn.Module:
    """The module whose forward output is the activation at (`layer`, `hook_point`)."""
    block = decoder_layers(model)[layer]
    if hook_point == "resid_post":
        return block
    submodule_names = {"mlp_out": ("mlp", "feed_forward"), "attn_out": ("self_attn", "attention", "attn")}
    if hook_point not in submodule_names:
        raise UserError(f"unknown hook point {hook_point!r}: choose one of {', '.join(HOOK_POINTS)}.")
    for name in submodule_names[hook_point]:
        if hasattr(block, name):
            return getattr(block, name)
    raise UserError(f"block {layer} of {type(model).__name__} has no {hook_point} submodule; use HOOK_POINT = 'resid_post'.")


def output_tensor(output) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output
