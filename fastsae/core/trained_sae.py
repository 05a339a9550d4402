"""One way for every post-training step (evaluate, interpret, analyze, steer, export) to open a trained SAE.

`open_trained_sae` reads the checkpoint; the store it was trained on and the model its activations
came from open on demand, with one clear error each when the checkpoint does not record them and
the user did not name them (a HypotheSAEs checkpoint records neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.sae_info import SAEInfo
from fastsae.lm.models import ModelSource, load_model, load_tokenizer, resolve_model
from fastsae.store.activation_store import ActivationStore


@dataclass(frozen=True)
class LanguageModel:
    """A loaded model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource


@dataclass(frozen=True)
class TrainedSAE:
    """A trained SAE (on raw activations) with its recorded origin."""

    checkpoint: Path
    sae: SparseAutoencoder
    info: SAEInfo

    def open_store(self, store: str | Path = "") -> ActivationStore:
        """`store` when given, else the store it was trained on; its activations must have the SAE's width."""
        path = store or self.info.store
        if not path:
            raise UserError(
                f"{self.checkpoint} does not say which activation store it was trained on (a HypotheSAEs checkpoint?). Pass --store."
            )
        opened = ActivationStore(path)
        if opened.d != self.sae.spec.d:
            raise UserError(
                f"the SAE in {self.checkpoint} takes d={self.sae.spec.d} but the store at {opened.folder} has d={opened.d}: "
                "they come from different models or hooks. Pass the matching --store."
            )
        return opened

    def model_name(self, given: str = "") -> str:
        """`given` when set (a moved copy of the model, say), else the model the checkpoint records."""
        name = given or self.info.model_name
        if not name:
            raise UserError(
                f"{self.checkpoint} does not name the model its activations came from (a HypotheSAEs checkpoint?). Pass --model-name."
            )
        return name

    def load_model(self, given: str = "", *, dtype: torch.dtype, device: str) -> LanguageModel:
        """The model (see `model_name`) on `device`, with its tokenizer."""
        source = resolve_model(self.model_name(given))
        return LanguageModel(load_model(source, dtype, device), load_tokenizer(source), source)


def open_trained_sae(checkpoint: str | Path, device: str = "cpu") -> TrainedSAE:
    """The SAE of `checkpoint` (ours or HypotheSAEs') on `device`, with its `SAEInfo`."""
    loaded = load_sae(checkpoint, device)
    return TrainedSAE(Path(checkpoint), loaded.sae, loaded.info)
