"""Named places in a decoder-only transformer whose outputs we read (and later steps replace).

`layer=L` always means decoder block L (0-based), as in SAELens'
`blocks.L.hook_resid_post`; in Hugging Face terms the residual stream after
block L is `hidden_states[L + 1]` (entry 0 is the embeddings).
`ResidualCapture` reads several layers in one forward pass, which
`forward_until` cuts short after the last module needed.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastsae.common.errors import UserError

HOOK_POINTS = ("resid_post", "mlp_out", "attn_out")
# The block's submodule whose output is each hook point other than resid_post (the block itself), by the names models use.
HOOK_SUBMODULES = {"mlp_out": ("mlp", "feed_forward"), "attn_out": ("self_attn", "attention", "attn")}


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
    if hook_point not in HOOK_SUBMODULES:
        raise UserError(f"unknown hook point {hook_point!r}: choose one of {', '.join(HOOK_POINTS)}.")
    for name in HOOK_SUBMODULES[hook_point]:
        if hasattr(block, name):
            return getattr(block, name)
    raise UserError(f"block {layer} of {type(model).__name__} has no {hook_point} submodule; use HOOK_POINT = 'resid_post'.")


class _StopForward(Exception):
    """Raised by the hook on the last needed module to end the forward pass there."""


def forward_until(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    last_module: nn.Module,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Run the model on a batch but stop once `last_module` has run: no later blocks, no final norm, no LM head.

    Padded rows come with an `attention_mask`; packed rows (fastsae/extract/packed_batches.py) with none, and
    `position_ids` that restart at each example instead. Hooks that read activations must be registered before
    calling this, so they run before the stop.
    """

    def stop(module, inputs, output):
        raise _StopForward

    handle = last_module.register_forward_hook(stop)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


def output_tensor(output) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


def with_output_tensor(output, hidden: torch.Tensor):
    """`output` with its hidden state replaced by `hidden`: what a forward hook returns to change it."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass(frozen=True)
class HookTarget:
    """One place a capture reads, which becomes one store.

    `fields` go into the store's manifest; `identity` joins its settings, so a rerun resumes
    only a store read from the same place.
    """

    name: str  # e.g. blocks.12.hook_resid_post
    fields: dict[str, Any]
    identity: dict[str, Any]


class ResidualCapture:
    """The hooked module's output at each requested layer, from one forward pass cut short after the deepest."""

    def __init__(self, model: nn.Module, layers: list[int], hook_point: str) -> None:
        check_layers(model, layers)
        self.model, self.layers = model, layers
        self.modules = {layer: hooked_module(model, layer, hook_point) for layer in layers}
        self.d = model.config.hidden_size
        self.targets = {
            layer: HookTarget(
                hook_name(layer, hook_point), {"hook_point": hook_point, "layer": layer}, {"hook_point": hook_point, "layer": layer}
            )
            for layer in layers
        }

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict[Hashable, torch.Tensor]:
        """(B, T, d) activations per layer."""
        captured: dict[Hashable, torch.Tensor] = {}

        def make_hook(layer: int):
            def hook(module, inputs, output) -> None:
                captured[layer] = output_tensor(output)

            return hook

        handles = [module.register_forward_hook(make_hook(layer)) for layer, module in self.modules.items()]
        try:
            forward_until(self.model, input_ids, attention_mask, self.modules[max(self.layers)], position_ids)
        finally:
            for handle in handles:
                handle.remove()
        return captured
