"""A pretrained SAE named by its SAELens release and id: `saelens:RELEASE/SAE_ID`.

SAELens' `SAE.from_pretrained(release, sae_id)` looks the pair up in its registry,
`sae_lens/pretrained_saes.yaml` (repo id, the SAE's folder in it, the converter that reads its files,
the model), and downloads the files with huggingface_hub. We read the same registry, from the
installed sae-lens without importing it, and fetch the same files the same way: from the local
Hugging Face cache when they are there, else from the Hub, else one error saying what to fetch.

Converters read here: `sae_lens` (the registry's default: cfg.json and sae_weights.safetensors),
`gemma_2` (Gemma Scope's params.npz: JumpReLU SAEs whose encoder reads x, with the hook in the
repo's and folder's names) and `dictionary_learning_1` (ae.pt and config.json, at the residual
stream of the trainer's layer, as SAELens reads them). For the others, SAELens itself converts:
`SAE.from_pretrained(release, sae_id).save_model(folder)` writes a folder fastsae opens.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE
from fastsae.core.formats import dictionary_learning, saelens

PREFIX = "saelens:"
EXAMPLE = "saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"
REGISTRY_FILE = "pretrained_saes.yaml"
GEMMA_SCOPE_FILE = "params.npz"
CONVERTER_FILES = {
    "sae_lens": (saelens.CONFIG_FILE, saelens.WEIGHTS_FILE),
    "gemma_2": (GEMMA_SCOPE_FILE,),
    "dictionary_learning_1": (dictionary_learning.WEIGHTS_FILE, dictionary_learning.CONFIG_FILE),
}
# The hook of a Gemma Scope SAE, by its repo's name (google/gemma-scope-2b-pt-res, ...), as SAELens' gemma_2 loader reads it.
GEMMA_SCOPE_HOOKS = (("res", "hook_resid_post"), ("mlp", "hook_mlp_out"), ("att", "attn.hook_z"))
HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+(?:/[\w.-]+)?)/?")  # a model's page: its Hub id


def is_pretrained_reference(reference: str) -> bool:
    return reference.startswith(PREFIX)


@dataclass(frozen=True)
class PretrainedSAE:
    """One SAE of SAELens' registry: where its files are and what reads them."""

    release: str
    sae_id: str
    repo_id: str
    folder: str  # the SAE's folder inside the repo
    converter: str
    model_name: str | None  # the Hub id when the registry links the model there, else SAELens' (TransformerLens') name
    norm_scaling_factor: float | None
    config_overrides: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [f"{self.folder}/{name}" for name in CONVERTER_FILES[self.converter]]

    @classmethod
    def parse(cls, reference: str) -> PretrainedSAE:
        """The registry's entry for `saelens:RELEASE/SAE_ID`, with one clear error for a name it does not have."""
        release, _, sae_id = reference.removeprefix(PREFIX).partition("/")
        if not release or not sae_id:
            raise UserError(f"{reference!r} does not name a pretrained SAE: write saelens:RELEASE/SAE_ID, e.g. {EXAMPLE}.")
        registry = _registry()
        if release not in registry:
            close = difflib.get_close_matches(release, registry, n=3)
            raise UserError(
                f"{release!r} is not a release in SAELens' registry ({_registry_path()})"
                + (
                    f"; did you mean {', '.join(close)}?"
                    if close
                    else ". Its releases are listed at https://decoderesearch.github.io/SAELens/"
                )
            )
        entry = registry[release]
        saes = {sae["id"]: sae for sae in entry["saes"]}
        if sae_id not in saes:
            close = difflib.get_close_matches(sae_id, saes, n=3) or list(saes)[:3]
            raise UserError(f"SAELens' release {release!r} has no SAE {sae_id!r}; its ids include {', '.join(close)}.")
        converter = entry.get("conversion_func") or "sae_lens"
        if converter not in CONVERTER_FILES:
            raise UserError(
                f"{reference}: SAELens converts release {release!r} with its {converter!r} loader, which fastsae does not read "
                f"(it reads {', '.join(CONVERTER_FILES)}). Convert it with SAELens, "
                f"SAE.from_pretrained({release!r}, {sae_id!r}).save_model('my_sae'), and set CHECKPOINT to that folder."
            )
        link = HUB_URL.fullmatch((entry.get("links") or {}).get("model") or "")
        return cls(
            release=release,
            sae_id=sae_id,
            repo_id=entry["repo_id"],
            folder=saes[sae_id]["path"],
            converter=converter,
            model_name=link[1] if link else entry.get("model"),
            norm_scaling_factor=saes[sae_id].get("norm_scaling_factor"),
            config_overrides=entry.get("config_overrides") or {},
        )


def results_folder(reference: str) -> Path:
    """Where the steps write what they make of a pretrained SAE (eval.json, ...): not the Hugging Face cache."""
    release, _, sae_id = reference.removeprefix(PREFIX).partition("/")
    return Path("checkpoints") / "saelens" / release / sae_id


def load_pretrained(reference: str) -> LoadedSAE:
    """The SAE `saelens:RELEASE/SAE_ID` names, from the local Hugging Face cache or the Hub."""
    pretrained = PretrainedSAE.parse(reference)
    folder = _fetch(pretrained, reference)
    if pretrained.converter == "dictionary_learning_1":
        return dictionary_learning.load_dictionary_learning_folder(folder, unnamed_hook_point="resid_post")
    if pretrained.converter == "gemma_2":
        cfg, tensors = _gemma_scope(pretrained, folder / GEMMA_SCOPE_FILE, reference)
    else:
        cfg, tensors = json.loads((folder / saelens.CONFIG_FILE).read_text()), load_file(folder / saelens.WEIGHTS_FILE)
    # SAELens applies the registry's overrides over the file's config; nested with the origin, they win over it here too.
    cfg = {**cfg, "metadata": {**(cfg.get("metadata") or {}), **pretrained.config_overrides}}
    return saelens.saelens_sae(cfg, tensors, reference, activation_scale=pretrained.norm_scaling_factor, model_name=pretrained.model_name)


def _fetch(pretrained: PretrainedSAE, reference: str) -> Path:
    """The local folder holding the SAE's files: the cache's copy, else a download; one error line saying what to fetch."""
    from huggingface_hub import constants, hf_hub_download

    def download(local_files_only: bool) -> list[Path]:
        return [Path(hf_hub_download(pretrained.repo_id, name, local_files_only=local_files_only)) for name in pretrained.files]

    try:
        paths = download(local_files_only=True)
    except OSError:  # not (all) in the cache: huggingface_hub's LocalEntryNotFoundError
        fetch = f"`hf download {pretrained.repo_id} {' '.join(pretrained.files)}`"
        missing = f"{reference} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.is_offline_mode():
            raise UserError(
                f"{missing} and HF_HUB_OFFLINE is set: fetch it with {fetch} where the Hub is reachable, into this cache."
            ) from None
        try:
            paths = download(local_files_only=False)
        except OSError as error:  # no connection, no such repo or file, or a gated repo
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{missing} and could not be downloaded ({reason}): fetch it with {fetch}, into this cache.") from None
    return paths[0].parent


def _gemma_scope(pretrained: PretrainedSAE, params: Path, reference: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens' config and tensors for a Gemma Scope params.npz, as its gemma_2 loader makes them."""
    with np.load(params) as arrays:
        tensors = {("W_" + key[2:] if key.startswith("w_") else key): torch.from_numpy(arrays[key]) for key in arrays.files}
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise UserError(
            f"{reference}: this Gemma Scope SAE rescales its features by a fine-tuned vector, which fastsae's SAE cannot compute."
        )
    layer = re.search(r"layer_(\d+)", pretrained.folder)
    hook = next((hook for kind, hook in GEMMA_SCOPE_HOOKS if kind in pretrained.repo_id), None)
    hook_name = "hook_embed" if "embedding" in pretrained.folder else f"blocks.{layer[1]}.{hook}" if layer and hook else None
    cfg = {"architecture": "jumprelu", "apply_b_dec_to_input": False, "normalize_activations": "none", "hook_name": hook_name}
    return cfg, tensors


@cache
def _registry() -> dict[str, Any]:
    return yaml.load(_registry_path().read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _registry_path() -> Path:
    """sae-lens' pretrained_saes.yaml, found without importing sae_lens (which imports TransformerLens)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("pretrained SAEs are found through SAELens' registry: pip install sae-lens (fastsae only reads its file).")
    path = Path(spec.submodule_search_locations[0]) / REGISTRY_FILE
    if not path.is_file():
        raise UserError(f"sae-lens {importlib.metadata.version('sae-lens')} has no {REGISTRY_FILE}: install a sae-lens that has one.")
    return path
