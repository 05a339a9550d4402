"""One way for every post-training step (evaluate, interpret, analyze, steer, export) to open a trained SAE.

`open_trained_sae` reads the checkpoint, whatever made it (fastsae/core/formats/sources.py: ours,
HypotheSAEs', SAELens', sparsify's, dictionary_learning's, or a pretrained SAELens SAE); the store it
was trained on and the model its activations came from open on demand, with one clear error each
when the checkpoint does not record them and the user did not name them (only our checkpoints
record a store; a HypotheSAEs checkpoint records no model either).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsae.common.errors import UserError
from fastsae.core.formats.sources import load_any_sae, results_folder
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.sae_info import SPARSIFY_FORMAT, SAEInfo
from fastsae.lm.hook_points import HOOK_SUBMODULES, sublayer_reader
from fastsae.lm.models import ModelSource, load_model, load_tokenizer, resolve_model
from fastsae.store.activation_store import ActivationStore, StoreError

logger = logging.getLogger(__name__)

# In each JSON the steps write about an SAE (eval.json, sparse_probing.json, absorption.json): the weights it describes.
SAE_FINGERPRINT_KEY = "sae_fingerprint"


@dataclass(frozen=True)
class LanguageModel:
    """A loaded model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource


@dataclass(frozen=True)
class TrainedSAE:
    """A trained SAE (on raw activations) with its recorded origin."""

    checkpoint: Path  # as the user named it (a file, a folder, or saelens:RELEASE/SAE_ID)
    sae: SparseAutoencoder
    info: SAEInfo
    results_folder: Path  # where the steps write their files about it (eval.json, ...)

    def open_store(self, store: str | Path = "") -> ActivationStore:
        """`store` when given, else the store it was trained on; its activations must have the SAE's width."""
        path = store or self.info.store
        if not path:
            raise UserError(
                f"{self.checkpoint} does not say which activation store it was trained on ({self.info.source_description}). "
                "Pass --store: a store extracted at its model and hook."
            )
        try:
            opened = ActivationStore(path)
        except StoreError as error:
            if store:
                raise
            raise StoreError(
                f"{error} It is the store {self.checkpoint} records it was trained on: if it has moved, pass --store with its new place."
            ) from None
        if opened.d != self.sae.spec.d:
            raise UserError(
                f"the SAE in {self.checkpoint} takes d={self.sae.spec.d} but the store at {opened.folder} has d={opened.d}: "
                "they come from different models or hooks. Pass the matching --store."
            )
        # A warning, not an error: reading a base model's SAE on its chat model's activations is a study of its own.
        if self.info.model and opened.manifest.model and opened.manifest.model != self.info.model:
            logger.warning(
                "%s was trained on %s's activations, but the store at %s holds %s's: its features are read on another model. "
                "Pass the --store extracted from %s unless that is what you mean.",
                self.checkpoint,
                self.info.model,
                opened.folder,
                opened.manifest.model,
                self.info.model,
            )
        if self.info.hook_name and opened.hook_name and opened.hook_name != self.info.hook_name:
            logger.warning(
                "%s was trained on %s, but the store at %s holds %s: its features are read where they were not learned.",
                self.checkpoint,
                self.info.hook_name,
                opened.folder,
                opened.hook_name,
            )
        return opened

    def read_result(self, name: str) -> dict[str, Any] | None:
        """The JSON `name` a step wrote about this SAE in its results folder; None when there is none. One written about
        other weights (the SAE retrained, or trained further since) is refused: its numbers would be published, or shown,
        as this SAE's. A file from before the fingerprint was recorded is taken as it is."""
        path = self.results_folder / name
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except ValueError:  # the steps write it whole, so edited by hand or copied in part
            raise UserError(f"{path} is not readable JSON: rerun evaluate_sae.py on {self.checkpoint}, or delete {path.name}.") from None
        written_for, ours = record.get(SAE_FINGERPRINT_KEY), self.sae.fingerprint()
        if written_for is not None and written_for != ours:
            raise UserError(
                f"{path} describes other weights than those in {self.checkpoint} (SAE fingerprint {written_for}, the checkpoint's "
                f"{ours}): the SAE was retrained or trained further since. Rerun evaluate_sae.py on it, or delete {path.name}."
            )
        return record

    def hook(self, hook_point: str = "", layer: int | None = None) -> tuple[str | None, int | None]:
        """(hook point, layer) it reads: the recorded ones, else those given (empty / None or below 0: not given).

        A given one that contradicts the record is refused: the SAE was trained at one hook only.
        """
        recorded = {"hook_point": self.info.hook_point, "layer": self.info.layer}
        given = {"hook_point": hook_point or None, "layer": layer if layer is not None and layer >= 0 else None}
        for name, value in given.items():
            if value is not None and recorded[name] is not None and value != recorded[name]:
                raise UserError(
                    f"{self.checkpoint} was trained at {name} {recorded[name]!r}, not {value!r}: leave {name.upper()} unset for it."
                )
        chosen = {name: given[name] if recorded[name] is None else recorded[name] for name in recorded}
        return chosen["hook_point"], chosen["layer"]

    def model_name(self, given: str = "") -> str:
        """`given` when set (a moved copy of the model, say), else the model the checkpoint records."""
        name = given or self.info.model_name
        if not name:
            raise UserError(
                f"{self.checkpoint} does not name the model its activations came from ({self.info.source_description}). Pass --model-name."
            )
        return name

    def load_model(self, given: str = "", *, dtype: torch.dtype, device: str) -> LanguageModel:
        """The model (see `model_name`) on `device`, with its tokenizer; a warning when it is not the one recorded, which
        only a moved copy of the same weights may replace (a fine-tune of the same shape loads, and steers, without error)."""
        recorded = self.info.model_name
        if given and recorded and given != recorded:
            logger.warning("Loading model %s; %s was trained on %s. They must be the same weights.", given, self.checkpoint, recorded)
        source = resolve_model(self.model_name(given))
        model = load_model(source, dtype, device)
        if self.info.source_format == SPARSIFY_FORMAT and self.info.hook_point in HOOK_SUBMODULES:
            reader = sublayer_reader(model, self.info.layer, self.info.hook_point)
            if reader is not None:
                logger.warning(
                    "%s is a sparsify SAE of a sublayer's own output, but fastsae's %s on %s reads block %d's %s, what the block "
                    "adds to its residual stream: the activations it meets here (stores, evaluation) are not those it was trained on.",
                    self.checkpoint,
                    self.info.hook_point,
                    type(model).__name__,
                    self.info.layer,
                    reader,
                )
        return LanguageModel(model, load_tokenizer(source), source)


def open_trained_sae(checkpoint: str | Path, device: str = "cpu") -> TrainedSAE:
    """The SAE `checkpoint` names (see fastsae/core/formats/sources.py) on `device`, with its `SAEInfo`."""
    loaded = load_any_sae(checkpoint, device)
    if loaded.info.training_finished is False:
        logger.warning(
            "%s was saved before its training finished, at step %d (Ctrl-C or CHECKPOINT_EVERY): what is read from it "
            "describes the SAE at that step. Rerun train_sae.py with the same settings to finish it.",
            checkpoint,
            loaded.info.step,
        )
    return TrainedSAE(Path(checkpoint), loaded.sae, loaded.info, results_folder(checkpoint))
