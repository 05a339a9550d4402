"""What a CHECKPOINT names, and the reader for it: the one place every post-training step's SAE is opened from.

- a `.pt` file: ours, or HypotheSAEs' (`load_sae`), or a dictionary_learning `ae.pt`;
- a folder: SAELens' (cfg.json + sae_weights.safetensors), sparsify's (cfg.json + sae.safetensors,
  one hookpoint) or dictionary_learning's (ae.pt + config.json); a file of one of these stands for its folder;
- `saelens:RELEASE/SAE_ID`: a pretrained SAE from SAELens' registry.
A folder that holds some of these (a sparsify run, a dictionary_learning sweep, our run folder) gets an error listing them;
one SAE's folder as train_sae.py writes it (`SAE_M=…_K=…/SAE_M=…_K=….pt` beside its `saelens/` export) stands for its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import LoadedSAE, load_sae
from fastsae.core.formats import dictionary_learning, saelens, saelens_pretrained, sparsify

# (is this folder one of the library's SAEs, reader, the files that make it one)
FOLDER_FORMATS: tuple[tuple[Callable[[Path], bool], Callable[[Path], LoadedSAE], tuple[str, ...]], ...] = (
    (saelens.is_saelens_folder, saelens.load_saelens_folder, (saelens.CONFIG_FILE, saelens.WEIGHTS_FILE)),
    (sparsify.is_sparsify_folder, sparsify.load_sparsify_folder, (sparsify.CONFIG_FILE, sparsify.WEIGHTS_FILE)),
    (
        dictionary_learning.is_dictionary_learning_folder,
        dictionary_learning.load_dictionary_learning_folder,
        (dictionary_learning.WEIGHTS_FILE, dictionary_learning.CONFIG_FILE),
    ),
)
FOLDER_FILES = {name for _, _, files in FOLDER_FORMATS for name in files}
READABLE = (
    "a fastsae or HypotheSAEs .pt checkpoint, a SAELens folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint "
    "folder (cfg.json + sae.safetensors), a dictionary_learning folder (ae.pt + config.json), or saelens:RELEASE/SAE_ID"
)


def _folder_reader(folder: Path) -> Callable[[Path], LoadedSAE] | None:
    return next((reader for is_format, reader, _ in FOLDER_FORMATS if is_format(folder)), None)


def _sae_folder(path: Path) -> Path | None:
    """The SAE folder `path` names: itself, or the folder of one of its files."""
    if path.is_dir():
        return path
    if path.name in FOLDER_FILES and _folder_reader(path.parent):
        return path.parent
    return None


def load_any_sae(checkpoint: str | Path, device: str = "cpu") -> LoadedSAE:
    """The SAE `checkpoint` names, on `device`, taking raw activations, with its `SAEInfo`."""
    if saelens_pretrained.is_pretrained_reference(str(checkpoint)):
        loaded = saelens_pretrained.load_pretrained(str(checkpoint))
    elif (folder := _sae_folder(Path(checkpoint))) is not None:
        loaded = _load_folder(folder)
    else:
        return load_sae(checkpoint, device)
    return LoadedSAE(loaded.sae.to(device), loaded.info)


def _load_folder(folder: Path) -> LoadedSAE:
    reader = _folder_reader(folder)
    if reader is not None:
        return reader(folder)
    own = folder / f"{folder.name}.pt"  # a fastsae training folder: its checkpoint, beside the SAELens export of the same SAE
    if own.is_file():
        return load_sae(own)
    inside = sorted(
        child.name
        for child in folder.iterdir()
        if (child.is_dir() and _folder_reader(child)) or (child.is_file() and child.suffix == ".pt")
    )
    if inside:
        shown = ", ".join(inside[:8]) + (f" and {len(inside) - 8} more" if len(inside) > 8 else "")
        raise UserError(f"{folder} is not one SAE but holds {len(inside)} ({shown}): name one, e.g. {folder / inside[0]}.")
    raise UserError(f"{folder} holds no SAE fastsae reads. CHECKPOINT takes {READABLE}.")


def results_folder(checkpoint: str | Path) -> Path:
    """Where the steps write their files about this SAE (eval.json, ...): inside an SAE folder; under checkpoints/saelens/
    for a pretrained SAE, whose files live in the Hugging Face cache; beside a .pt file in its own folder, as train_sae.py
    writes one (`SAE_M=…_K=…/SAE_M=…_K=….pt`), else in a folder named after it, since a folder of several .pt files (a
    HypotheSAEs sweep) would give them all one eval.json, each SAE's overwriting the last's."""
    if saelens_pretrained.is_pretrained_reference(str(checkpoint)):
        return saelens_pretrained.results_folder(str(checkpoint))
    path = Path(checkpoint)
    folder = _sae_folder(path)
    if folder is not None:
        return folder
    return path.parent if path.parent.name == path.stem else path.parent / path.stem
