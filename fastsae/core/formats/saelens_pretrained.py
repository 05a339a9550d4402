"""A pretrained SAE named by its SAELens release and id: `saelens:RELEASE/SAE_ID`.

SAELens' `SAE.from_pretrained(release, sae_id)` looks the pair up in its registry,
`sae_lens/pretrained_saes.yaml` (repo id, the SAE's path in it, the conversion function that reads
its files, the model), and downloads the files with huggingface_hub. We read the same registry, from
the installed sae-lens as a file, and fetch the same files the same way: from the local Hugging Face
cache when they are there, else from the Hub, else one error saying what to fetch.

Then the release's conversion function decides who reads the files:
- `sae_lens` (cfg.json + sae_weights.safetensors) and `dictionary_learning_1` (ae.pt + config.json)
  are formats fastsae reads in any folder, so its own readers take them;
- the others in `CONVERTER_FILES` (Gemma Scope, Llama Scope, Qwen Scope, ...) each have a layout and
  quirks of their own (Llama Scope's threshold rescaled by √d over the dataset's mean norm, Qwen
  Scope's k read off the repo's name): SAELens' own converter for the release reads them, so they
  stay SAELens' to get right, and fastsae folds its config and tensors as it folds any SAELens SAE.
  sae-lens is installed anyway (its registry is the index), but importing it brings TransformerLens
  (seconds), so only these releases pay for it: the registry is read as a plain file, and a
  misspelt name or a refused release fails before any import or download;
- `gemma_3` (Gemma Scope 2) is read here, as its converter reads it, because that converter asks
  the Hub for the tensors' shapes over HTTP even when the files are cached, so it cannot run offline;
- `REFUSED` says why fastsae cannot run the rest; a converter of a newer sae-lens that this module
  does not know is refused with the recipe that converts it with SAELens.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE
from fastsae.core.formats import dictionary_learning, saelens
from fastsae.core.formats.weights import SavedTensors, read_json_config, read_safetensors

PREFIX = "saelens:"
EXAMPLE = "saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"
REGISTRY_FILE = "pretrained_saes.yaml"
# The files each conversion function fastsae reads needs, "{path}" standing for the SAE's path in its repo.
CONVERTER_FILES = {
    "sae_lens": ("{path}/" + saelens.CONFIG_FILE, "{path}/" + saelens.WEIGHTS_FILE),
    "dictionary_learning_1": ("{path}/" + dictionary_learning.WEIGHTS_FILE, "{path}/" + dictionary_learning.CONFIG_FILE),
    "gemma_2": ("{path}/params.npz",),
    "gemma_3": ("{path}/params.safetensors",),
    "llama_scope": ("{path}/hyperparams.json", "{path}/checkpoints/final.safetensors"),
    "llama_scope_r1_distill": ("{path}/config.json", "{path}/sae_weights.safetensors"),
    "qwen_scope": ("{path}",),  # these three store each SAE as one file, which the path names
    "deepseek_r1": ("{path}",),
    "goodfire": ("{path}",),
}
TRANSCODERS = "its models are transcoders, which read one hook and write another, not SAEs"
# Conversion functions of SAELens' registry whose SAEs fastsae's SAE cannot compute, and why.
REFUSED = {
    "connor_rob_hook_z": "its SAEs read the attention heads' outputs before their projection (hook_z), which fastsae does not extract",
    "gemma_2_transcoder": TRANSCODERS,
    "mwhanna_transcoder": TRANSCODERS,
    "mntss_clt_layer_transcoder": TRANSCODERS,
    "temporal": "its SAEs attend over the text's earlier tokens, while fastsae's SAE reads one token at a time",
}
# A Gemma Scope 2 SAE's path names its hook and layer; the release's other paths (transcoder/, ...) hold transcoders.
GEMMA_SCOPE_2_SAE = re.compile(r"(resid_post|mlp_out|attn_out)(?:_all)?/layer_(\d+)_")
GEMMA_SCOPE_2_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}  # as SAELens names them
HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+(?:/[\w.-]+)?)/?")  # a model's page: its Hub id


def is_pretrained_reference(reference: str) -> bool:
    return reference.startswith(PREFIX)


@dataclass(frozen=True)
class PretrainedSAE:
    """One SAE of SAELens' registry: where its files are and what reads them."""

    release: str
    sae_id: str
    repo_id: str
    path: str  # the SAE's folder inside the repo, or its file
    converter: str
    model_name: str  # the Hub id: the registry's link, else its model (TransformerLens' name) translated; as written if unknown
    norm_scaling_factor: float | None
    config_overrides: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [name.format(path=self.path) for name in CONVERTER_FILES[self.converter]]

    @property
    def download_command(self) -> str:
        """The command that puts its files in the Hugging Face cache (with --force-download: again, whole)."""
        return f"hf download {self.repo_id} {' '.join(self.files)}"

    @property
    def local_folder(self) -> str:
        """How to use it without this machine reaching the Hub: a folder of its files where fastsae reads their format,
        else the SAELens folder its own loader saves where the Hub is reachable."""
        if self.converter in ("sae_lens", "dictionary_learning_1"):
            names = " + ".join(Path(name).name for name in self.files)
            return f"or copy its {names} into a folder and set CHECKPOINT to that folder"
        return (
            f"or, where the Hub is reachable, save it with SAELens, {_save_model_recipe(self.release, self.sae_id)}, "
            "and set CHECKPOINT to that folder"
        )

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
        path = saes[sae_id]["path"]
        refusal = REFUSED.get(converter) or (TRANSCODERS if converter == "gemma_3" and not GEMMA_SCOPE_2_SAE.match(path) else None)
        if refusal:
            raise UserError(f"{reference}: SAELens reads release {release!r} with its {converter!r} converter, and {refusal}.")
        if converter not in CONVERTER_FILES:
            raise UserError(
                f"{reference}: SAELens reads release {release!r} with its {converter!r} converter, which fastsae does not know "
                f"(it reads {', '.join(CONVERTER_FILES)}). Convert it with SAELens, {_save_model_recipe(release, sae_id)}, "
                "and set CHECKPOINT to that folder."
            )
        link = HUB_URL.fullmatch((entry.get("links") or {}).get("model") or "")
        hub_id = link[1] if link else saelens.saelens_model_hub_id(entry["model"])  # SAELens requires every release's model
        return cls(
            release=release,
            sae_id=sae_id,
            repo_id=entry["repo_id"],
            path=path,
            converter=converter,
            model_name=hub_id or entry["model"],
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
    paths = _fetch(pretrained, reference)
    fix = f"Fetch it again: `{pretrained.download_command} --force-download`."
    if pretrained.converter == "dictionary_learning_1":
        return dictionary_learning.load_dictionary_learning_folder(paths[0].parent, unnamed_hook_point="resid_post", fix=fix)
    if pretrained.converter == "sae_lens":
        cfg, tensors = read_json_config(paths[0], fix), read_safetensors(paths[1], fix)
        # SAELens applies the registry's overrides over the file's config; nested with the origin, they win over it here too.
        cfg = {**cfg, "metadata": {**(cfg.get("metadata") or {}), **pretrained.config_overrides}}
    elif pretrained.converter == "gemma_3":
        cfg, tensors = _gemma_scope_2(pretrained.path, read_safetensors(paths[0], fix))
    else:
        cfg, tensors = _convert_with_saelens(pretrained, reference)
    return saelens.saelens_sae(cfg, tensors, reference, activation_scale=pretrained.norm_scaling_factor, model_name=pretrained.model_name)


def _fetch(pretrained: PretrainedSAE, reference: str) -> list[Path]:
    """The local copies of the SAE's files: the cache's, else a download; one error line saying what to fetch."""
    from huggingface_hub import constants, hf_hub_download

    def download(local_files_only: bool) -> list[Path]:
        return [Path(hf_hub_download(pretrained.repo_id, name, local_files_only=local_files_only)) for name in pretrained.files]

    try:
        return download(local_files_only=True)
    except OSError:  # not (all) in the cache: huggingface_hub's LocalEntryNotFoundError
        pass
    missing = f"{reference} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    fetch = f"fetch it with `{pretrained.download_command}`"
    if constants.is_offline_mode():
        raise UserError(
            f"{missing} and HF_HUB_OFFLINE is set: {fetch} where the Hub is reachable, into this cache, {pretrained.local_folder}."
        )
    problem = _hub_problem(pretrained)
    if problem is None:
        try:
            return download(local_files_only=False)
        except OSError as error:  # the connection dropped, or the Hub refused a file that the first one's answer did not
            problem = _first_line(error)
    raise UserError(f"{missing} and could not be downloaded ({problem}): {fetch}, into this cache, {pretrained.local_folder}.")


def _hub_problem(pretrained: PretrainedSAE) -> str | None:
    """Why the Hub does not serve the SAE's first file, or None. One request without retries: with no connection,
    huggingface_hub's downloads retry for about 20 s before they fail."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(pretrained.repo_id, pretrained.files[0]))
    except Exception as error:  # httpx's connection errors, or the Hub's answer: no such repo or file, a gated repo
        return _first_line(error)
    return None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _save_model_recipe(release: str, sae_id: str) -> str:
    """The SAELens call that saves a registry SAE as a folder fastsae opens."""
    return f"SAE.from_pretrained({release!r}, {sae_id!r}).save_model('my_sae')"


def _convert_with_saelens(pretrained: PretrainedSAE, reference: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens' config and tensors for the SAE, from the release's own SAELens converter, called as SAE.from_pretrained
    calls it. `_fetch` has put its files in the cache, where the converter's downloads find them."""
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS, handle_config_defaulting

    convert = NAMED_PRETRAINED_SAE_LOADERS[pretrained.converter]
    overrides = {**pretrained.config_overrides, "device": "cpu", "dtype": "float32"}
    try:
        cfg, tensors, _ = convert(repo_id=pretrained.repo_id, folder_name=pretrained.path, device="cpu", cfg_overrides=overrides)
    except (KeyError, ValueError) as error:  # a file without the tensors or fields the converter expects
        raise UserError(
            f"{reference}: SAELens' {pretrained.converter!r} converter cannot read its files ({type(error).__name__}: {error}); "
            f"if the download was cut short, fetch them again with `{pretrained.download_command} --force-download`."
        ) from None
    return handle_config_defaulting(cfg), tensors


def _gemma_scope_2(path: str, params: SavedTensors) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens' config and tensors for a Gemma Scope 2 SAE (params.safetensors), as its gemma_3 converter makes them:
    a JumpReLU SAE whose encoder reads x, at the hook its path names. Not by calling that converter, which asks the Hub
    for the tensors' shapes over HTTP, so it cannot run from the cache offline."""
    kind, layer = GEMMA_SCOPE_2_SAE.match(path).groups()
    renamed = {("W_" + name[2:] if name.startswith("w_") else name): tensor for name, tensor in params.items()}
    tensors = SavedTensors(renamed, params.path, params.fix)
    cfg = {"architecture": "jumprelu", "apply_b_dec_to_input": False, "hook_name": f"blocks.{layer}.{GEMMA_SCOPE_2_HOOKS[kind]}"}
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
