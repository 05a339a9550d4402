"""LoRA bottleneck capture: the rank-r outputs of a PEFT LoRA adapter's `lora_A` layers, per token.

A LoRA layer computes `W x + B A x · scaling`; `A x` (r numbers per adapted module) is the
adapter's own narrow code for the token. We attach the adapter to the base model with peft, hook
every `lora_A` of the chosen module types, and concatenate their outputs into one vector per
token, ordered by layer, then module type in the order asked for (a type that names several modules of
a block, as GPT-2's `attn.c_proj` and `mlp.c_proj` do, in the block's order), then rank index. In eval mode
LoRA dropout is the identity, so each piece is exactly `x @ A.T` for the module's input `x`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsae.common.errors import UserError
from fastsae.lm.hook_points import HookTarget, decoder_layers, forward_until

logger = logging.getLogger(__name__)

LORA_HOOK_POINT = "lora"
LORA_MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_NAME = "default"  # the name peft gives an adapter loaded without one
SAVED_KEY_PREFIX = "base_model.model."  # what peft's save_pretrained puts before the base model's module path


def lora_hook_name(module_types: list[str]) -> str:
    """The store's hook name: `lora.all` for the seven standard types in their usual order, else `lora.q_proj-v_proj`."""
    return f"{LORA_HOOK_POINT}.{'all' if tuple(module_types) == LORA_MODULE_TYPES else '-'.join(module_types)}"


def adapter_files(folder: str | Path) -> tuple[Path, Path]:
    """The adapter's config and weights files, or a clear error saying what the folder lacks."""
    folder = Path(folder).expanduser()
    hint = "LORA_ADAPTER takes a folder written by peft's save_pretrained (adapter_config.json and adapter_model.safetensors)."
    if not folder.is_dir():
        raise UserError(f"LoRA adapter folder not found: {folder}. {hint}")
    config_path = folder / ADAPTER_CONFIG
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not config_path.is_file() or not weights:
        raise UserError(
            f"{folder} is not a PEFT adapter folder (it lacks {ADAPTER_CONFIG if not config_path.is_file() else ' or '.join(ADAPTER_WEIGHTS)}). {hint}"
        )
    try:
        peft_type = json.loads(config_path.read_text()).get("peft_type")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{config_path} is not valid JSON. {hint}") from None
    if peft_type != "LORA":
        raise UserError(f"{folder} holds a {peft_type} adapter, not a LoRA one; only LoRA adapters have lora_A bottlenecks.")
    return config_path, weights[0]


def adapter_fingerprint(folder: str | Path) -> str:
    """A short hash of the adapter's config and weights: a store is tied to the exact adapter it was made with."""
    digest = hashlib.sha256()
    for path in adapter_files(folder):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _saved_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the saved tensors, keyed by their name in the file, without loading safetensors."""
    if weights_path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {key: tuple(value.shape) for key, value in torch.load(weights_path, map_location="cpu", weights_only=True).items()}


def _check_saved_module_fits(model: nn.Module, folder: str | Path, name: str, shape: tuple[int, ...]) -> None:
    """A weight the adapter saves whole (peft's modules_to_save: an embedding or head the fine-tune trained, or resized
    for added tokens) must have the model's shape; names that are no parameter of the model are peft's own (DoRA, ...)."""
    try:
        parameter = model.get_parameter(name)
    except AttributeError:
        return
    if tuple(parameter.shape) != shape:
        raise UserError(
            f"the LoRA adapter at {folder} saves its own {name} of shape {list(shape)}, but this model's is {list(parameter.shape)}: "
            "it was made for another base model, or for one whose vocabulary the fine-tune resized (added tokens). "
            "Set MODEL_NAME to the model it was trained on (resized, with its tokenizer)."
        )


def check_adapter_fits(model: nn.Module, folder: str | Path) -> None:
    """Refuse an adapter made for another base model before peft changes `model` (a failed load would leave it half-adapted)."""
    _, weights_path = adapter_files(folder)
    for key, shape in _saved_shapes(weights_path).items():
        name = key.removeprefix(SAVED_KEY_PREFIX)
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            _check_saved_module_fits(model, folder, name, shape)
            continue
        module_path, kind, _ = name.rsplit(".", 2)  # model.layers.0.self_attn.q_proj, lora_A, weight
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise UserError(
                f"the LoRA adapter at {folder} adapts {module_path}, which this model does not have: it was made for another base model. Check MODEL_NAME."
            ) from None
        if not isinstance(module, nn.Linear):
            continue  # peft checks other layer kinds itself
        expected = (shape[0], module.in_features) if kind == "lora_A" else (module.out_features, shape[1])
        if shape != expected:
            raise UserError(
                f"the LoRA adapter at {folder} does not fit this model: {module_path}.{kind} is {list(shape)} in the adapter "
                f"but the model's {module_path} needs {list(expected)}. It was made for another base model; check MODEL_NAME."
            )


class LoraBottleneckCapture:
    """Per token, the concatenated `lora_A` outputs of the chosen module types in every adapted layer.

    `dimensions[i]` names dimension i: its layer, module type, module path under the block and rank index.
    """

    def __init__(self, model: nn.Module, module_types: list[str], adapter_folder: str | Path) -> None:
        self.model = model
        self.module_types = list(module_types)
        self.adapter_folder = Path(adapter_folder).expanduser()
        # Keyed by layer and type, each type's modules in the block's order: a type can name several (GPT-2's c_proj).
        found: dict[tuple[int, str], list[tuple[str, nn.Module]]] = {}
        for layer, block in enumerate(decoder_layers(model)):
            for name, module in block.named_modules():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, nn.ModuleDict) and ADAPTER_NAME in lora_a:
                    found.setdefault((layer, name.rsplit(".", 1)[-1]), []).append((name, lora_a[ADAPTER_NAME]))
        adapted = {module_type for _, module_type in found}
        available = [t for t in LORA_MODULE_TYPES if t in adapted] + sorted(adapted - set(LORA_MODULE_TYPES))
        missing = [module_type for module_type in module_types if module_type not in available]
        if missing:
            raise UserError(
                f"the LoRA adapter at {adapter_folder} does not adapt {', '.join(missing)}; it adapts {', '.join(available) or 'nothing in the decoder blocks'}. "
                f"Set LORA_MODULES to some of those, e.g. --lora-modules {' '.join(available)}."
            )
        layers = sorted({layer for layer, _ in found})
        self.modules = [
            (layer, module_type, path, lora_a)
            for layer in layers
            for module_type in module_types
            for path, lora_a in found.get((layer, module_type), [])
        ]
        self.dimensions = [
            {"layer": layer, "module": module_type, "path": path, "rank_index": index}
            for layer, module_type, path, lora_a in self.modules
            for index in range(lora_a.out_features)
        ]
        self.d = len(self.dimensions)
        self.layers = layers
        self._last_block = decoder_layers(model)[layers[-1]]
        where = {"hook_point": LORA_HOOK_POINT, "layer": None}  # one store across all adapted layers
        description = self._description()
        self.targets = {
            LORA_HOOK_POINT: HookTarget(
                lora_hook_name(self.module_types),
                {**where, "lora": description},
                {**where, "lora_adapter_fingerprint": description["fingerprint"], "lora_modules": self.module_types},
            )
        }

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict[Hashable, torch.Tensor]:
        """{"lora": (B, T, d)} from one forward pass, cut short after the deepest adapted block."""
        pieces: list[torch.Tensor] = [torch.empty(0)] * len(self.modules)

        def make_hook(position: int):
            def hook(module, inputs, output) -> None:
                # MoE blocks run their shared expert on (B·T, d) rows; a module that sees only some tokens (a routed
                # expert) has no value at the others, so it cannot be stored per token.
                if output.shape[:-1].numel() != input_ids.numel():
                    _, module_type, path, _ = self.modules[position]
                    raise UserError(
                        f"the LoRA-adapted {path} sees only some of the tokens (a routed expert's layer), so its bottleneck "
                        f"has no value at the others: leave {module_type} out of LORA_MODULES."
                    )
                pieces[position] = output.reshape(*input_ids.shape, -1)

            return hook

        handles = [lora_a.register_forward_hook(make_hook(position)) for position, (*_, lora_a) in enumerate(self.modules)]
        try:
            forward_until(self.model, input_ids, attention_mask, self._last_block, position_ids)
        finally:
            for handle in handles:
                handle.remove()
        return {LORA_HOOK_POINT: torch.cat(pieces, dim=-1)}

    def _description(self) -> dict[str, Any]:
        """What the manifest records about the adapter and each stored dimension."""
        config = json.loads(adapter_files(self.adapter_folder)[0].read_text())
        return {
            "adapter": str(self.adapter_folder.resolve()),
            "fingerprint": adapter_fingerprint(self.adapter_folder),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "modules": self.module_types,
            "layers": self.layers,
            "dimensions": self.dimensions,
        }


def _restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back each module that is no longer in its place: peft's `unload` leaves the adapter's trained copy of a
    modules_to_save module (an embedding, a head) where the original was, so the base model would keep the fine-tune's."""
    for name, module in originals.items():  # parents before their children, so a restored parent brings its own back
        if name and model.get_submodule(name) is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)


@contextmanager
def lora_capture(model: nn.Module, adapter_folder: str | Path, module_types: list[str]) -> Iterator[LoraBottleneckCapture]:
    """Attach the adapter to `model` with peft and yield its bottleneck capture; on exit `model` is as it was."""
    from peft import PeftModel

    check_adapter_fits(model, adapter_folder)
    originals = dict(model.named_modules(remove_duplicate=False))
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x; the notice is not the user's to act on
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(
                model, str(Path(adapter_folder).expanduser()), adapter_name=ADAPTER_NAME, is_trainable=False
            )
    except (RuntimeError, ValueError) as error:  # peft puts its layers in before it loads their weights: take them out again
        _restore_modules(model, originals)
        raise UserError(
            f"peft could not attach the LoRA adapter at {adapter_folder}: {str(error).strip().splitlines()[-1].strip()} "
            "Check that its adapter_config.json is the one saved with its weights, and MODEL_NAME the model it was trained on."
        ) from None
    try:
        peft_model.eval()  # LoRA dropout off: the hooked outputs are exactly x @ A.T
        capture = LoraBottleneckCapture(model, module_types, adapter_folder)
        logger.info(
            "LoRA adapter %s: %d adapted modules over %d layers, d=%d", adapter_folder, len(capture.modules), len(capture.layers), capture.d
        )
        yield capture
    finally:
        peft_model.unload()  # remove the LoRA layers again, without merging them into the weights
        _restore_modules(model, originals)
