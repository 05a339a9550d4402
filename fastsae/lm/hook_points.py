"""Named places in a decoder-only transformer whose outputs we read (and later steps replace).

`layer=L` always means decoder block L (0-based), as in SAELens'
`blocks.L.hook_resid_post`; in Hugging Face terms the residual stream after
block L is `hidden_states[L + 1]` (entry 0 is the embeddings). `mlp_out` and
`attn_out` at layer L are what block L's MLP and attention add to that residual
stream, as in TransformerLens (after the post-norms of Gemma 2 and 3, OLMo 2, ...),
so in a plain residual block resid_post(L) = resid_post(L - 1) + attn_out(L) + mlp_out(L).
Blocks that scale a sublayer's output before the add (Granite's `residual_multiplier`) are read after the
scaling, so the identity holds for them too: a `HookSite` is a module's output times that constant, and every
reader and replacer goes through it. `ResidualCapture` reads several layers in one forward pass, which
`forward_until` cuts short after the last module needed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fastsae.common.errors import UserError

HOOK_POINTS = ("resid_post", "mlp_out", "attn_out")
# The block's sublayer behind each hook point other than resid_post (the block itself), by the names models use.
HOOK_SUBMODULES = {"mlp_out": ("mlp", "feed_forward", "ffn"), "attn_out": ("self_attn", "attention", "attn", "self_attention")}
# mlp_out and attn_out read what the block adds to its residual stream, as TransformerLens' hook_mlp_out and
# hook_attn_out do: the sublayer's own output, except in the blocks below, where other modules output it. Each entry
# names those modules by their paths under the block; a block that has both modules of an entry uses it, first entry first.
RESIDUAL_WRITERS = (
    # Sandwich norms, which normalise the sublayer's output before the add. GLM-4's and HyperCLOVA X's
    # post_attention_layernorm is their MLP's input norm, as in Llama, so their own names come first.
    {"attn_out": "post_self_attn_layernorm", "mlp_out": "post_mlp_layernorm"},  # GLM-4
    {"attn_out": "post_norm1", "mlp_out": "post_norm2"},  # HyperCLOVA X
    {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},  # Gemma 2-4, OLMo 2-3, EXAONE 4
    {"attn_out": "post_attention_layernorm", "mlp_out": "post_mlp_layernorm"},  # AFMoE
    {"attn_out": "post_operator_norm", "mlp_out": "post_ffn_norm"},  # LFM3
    # BLOOM's sublayers return the residual stream with their share added, which their output projections write.
    # (Falcon's sublayers have the same paths and return what these projections write.)
    {"attn_out": "self_attention.dense", "mlp_out": "mlp.dense_4h_to_h"},
    {"attn_out": "attn", "mlp_out": "ffn.down_proj"},  # MPT's MLP, likewise; its attention returns its share
)
# Block attributes holding the constant by which some blocks multiply each sublayer's output before adding it to the
# residual stream: residual_multiplier (Granite, GraniteMoe and its variants, HyperCLOVA X), residual_scale (MiniCPM3's
# scale_depth / sqrt(num_hidden_layers)). mlp_out and attn_out read the product, the add's operand.
RESIDUAL_MULTIPLIERS = ("residual_multiplier", "residual_scale")


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
    check_layer_range(layers, len(decoder_layers(model)))


def check_layer_range(layers: list[int], n_layers: int) -> None:
    """Refuse a layer the model does not have; from its config alone, so before its weights load."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: this model has {n_layers} blocks, so LAYERS must be in 0..{n_layers - 1}.")


def hooked_module(model: nn.Module, layer: int, hook_point: str) -> nn.Module:
    """The module whose forward output is the activation at (`layer`, `hook_point`): block `layer` itself for
    resid_post; for mlp_out and attn_out, the module that outputs what the block adds to its residual stream."""
    block = decoder_layers(model)[layer]
    if hook_point == "resid_post":
        return block
    if hook_point not in HOOK_SUBMODULES:
        raise UserError(f"unknown hook point {hook_point!r}: choose one of {', '.join(HOOK_POINTS)}.")
    if getattr(model.config, "do_layer_norm_before", True) is False:
        # Post-LN blocks (OPT-350m) normalise the residual stream after each add: the next add builds on the norm's
        # output, so no module outputs a share that resid_post(L - 1) plus the shares make resid_post(L).
        raise UserError(
            f"{type(model).__name__} normalises its residual stream after each sublayer adds to it (do_layer_norm_before = False), "
            f"so no module outputs what its {hook_point} adds; use HOOK_POINT = 'resid_post'."
        )
    sublayers = [module for name in HOOK_SUBMODULES[hook_point] if (module := _submodule(block, name)) is not None]
    if not sublayers:  # also a hybrid model's block whose mixer is not attention
        raise UserError(f"block {layer} of {type(model).__name__} has no {hook_point} submodule; use HOOK_POINT = 'resid_post'.")
    for writers in RESIDUAL_WRITERS:
        modules = {point: _submodule(block, path) for point, path in writers.items()}
        if None not in modules.values():
            return modules[hook_point]
    return sublayers[0]


def sublayer_reader(model: nn.Module, layer: int, hook_point: str) -> str | None:
    """None where `hook_point` at `layer` reads its sublayer's own output (as sparsify's `layers.L.mlp` and SAELens'
    hooks on plain blocks do); else what it reads instead: the path, under the block, of the module it reads after it
    (a post-norm, ...), and the block's residual multiplier where it scales that module's output."""
    block = decoder_layers(model)[layer]
    site = hook_site(model, layer, hook_point)
    path = next(path for path, candidate in block.named_modules() if candidate is site.module)
    if site.multiplier != 1:
        return f"{path} (times its residual multiplier {site.multiplier:g})"
    if any(_submodule(block, name) is site.module for name in HOOK_SUBMODULES[hook_point]):
        return None
    return path


def residual_multiplier(block: nn.Module) -> float:
    """The constant `block` multiplies each sublayer's output by before adding it (see RESIDUAL_MULTIPLIERS); 1 if none."""
    for name in RESIDUAL_MULTIPLIERS:
        value = getattr(block, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1.0


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    """The module at the dotted `path` under `block`, or None: hybrid models set a missing sublayer to None."""
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


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
class HookSite:
    """Where the activation at one (layer, hook point) is: `module`'s output times `multiplier`, the constant the block
    scales that output by before adding it to its residual stream (1 but in blocks with a residual multiplier).

    Reading and replacing both go through here, so what a replacement puts in place of an activation is what the
    residual stream then receives, as the activation itself was.
    """

    module: nn.Module
    multiplier: float = 1.0

    def read(self, output) -> torch.Tensor:
        """The activation in `module`'s forward `output`, as a new tensor: some blocks add into a sublayer's output in
        place once it is returned (Falcon's parallel MLP)."""
        hidden = output_tensor(output)
        if hidden.dim() != 3:  # Llama 4's MoE MLP: the block reshapes it before the add, and nothing here knows (B, T)
            raise UserError(
                f"{type(self.module).__name__} outputs its share of the residual stream as rows of shape {list(hidden.shape)}, "
                "not (batch, tokens, d), so it cannot be read or replaced per token; use HOOK_POINT = 'resid_post'."
            )
        return hidden * self.multiplier if self.multiplier != 1 else hidden.clone()

    def replace(self, change: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
        """Hook `module` so that each forward's activation h becomes `change(h)`; remove the handle to stop."""

        def hook(module, inputs, output):
            return with_output_tensor(output, change(self.read(output)) / self.multiplier)

        return self.module.register_forward_hook(hook)


def hook_site(model: nn.Module, layer: int, hook_point: str) -> HookSite:
    """The `HookSite` of (`layer`, `hook_point`): `hooked_module`'s output, scaled as the block scales it."""
    module = hooked_module(model, layer, hook_point)
    if hook_point == "resid_post":
        return HookSite(module)
    return HookSite(module, residual_multiplier(decoder_layers(model)[layer]))


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
    """The activation (see `HookSite`) at each requested layer, from one forward pass cut short after the deepest."""

    def __init__(self, model: nn.Module, layers: list[int], hook_point: str) -> None:
        check_layers(model, layers)
        self.model, self.layers = model, layers
        self.sites = {layer: hook_site(model, layer, hook_point) for layer in layers}
        self.d = model.config.hidden_size
        self.targets = {}
        for layer, site in self.sites.items():
            point = {"hook_point": hook_point, "layer": layer}
            # A multiplier joins the identity, so a store read before it was applied is not resumed or reused as this one.
            scaled = {"residual_multiplier": site.multiplier} if site.multiplier != 1 else {}
            self.targets[layer] = HookTarget(hook_name(layer, hook_point), point, {**point, **scaled})

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict[Hashable, torch.Tensor]:
        """(B, T, d) activations per layer."""
        captured: dict[Hashable, torch.Tensor] = {}

        def make_hook(site: HookSite, layer: int):
            def hook(module, inputs, output) -> None:
                captured[layer] = site.read(output)

            return hook

        handles = [site.module.register_forward_hook(make_hook(site, layer)) for layer, site in self.sites.items()]
        try:
            forward_until(self.model, input_ids, attention_mask, self.sites[max(self.layers)].module, position_ids)
        finally:
            for handle in handles:
                handle.remove()
        return captured
