"""Read texts through a trained SAE: each token's feature activations, and a pooled vector per text.

A text must reach the SAE the way its training data did, or its features mean nothing. Our
checkpoints carry their store's manifest, whose `extraction` block is the ExtractConfig that
made the store; the reader rebuilds it for the checkpoint's one layer and then calls
extraction's own code: `tokenize_examples` (the same chat-template decision, special-token mask
and MAX_LENGTH truncation), `open_capture` (the same hook, or LoRA bottlenecks) and
`choose_batching` and `iter_example_activations` (each text its own sequence, packed into rows
where the model keeps them apart, else batched by length). The activations are
then rounded to the store's dtype, because that is what training saw. The checkpoint has the
activation scale folded into its weights, so raw activations go straight into the SAE. A text
that is in the store therefore gets the features computed from its stored activations (a test
checks it).

Pooling (max or mean over a text's tokens) counts the token kinds the SAE was trained on:
content tokens only unless training included BOS and chat-template tokens, whose activations
have norms far from a content token's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.trained_sae import TrainedSAE, open_trained_sae
from fastsae.extract.extract_activations import ExtractConfig, choose_batching, iter_example_activations, open_capture, pad_token_id
from fastsae.lm.data import Example
from fastsae.lm.hook_points import HOOK_POINTS
from fastsae.lm.lora import LORA_HOOK_POINT
from fastsae.lm.models import learned_position_limit
from fastsae.lm.tokenization import TokenizedExample, token_texts, tokenize_examples
from fastsae.store.activation_store import STORAGE_DTYPES

logger = logging.getLogger(__name__)

POOLINGS = ("max", "mean")


@dataclass
class TextFeatures:
    """One text read through the SAE."""

    token_ids: np.ndarray  # (T,) what the model saw: template included, truncated to MAX_LENGTH
    tokens: list[str]  # the text each token adds (`token_texts`)
    special_mask: np.ndarray  # (T,) bool: BOS and chat-template tokens
    pooled_mask: np.ndarray  # (T,) bool: the tokens pooling counts (the kinds the SAE was trained on)
    token_features: torch.Tensor  # (T, M) sparse COO, float32, CPU: each token's feature activations (.to_dense() for a dense view)
    pooled: torch.Tensor  # (M,) float32: max or mean of token_features over pooled_mask
    truncated: bool


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise UserError(f"POOLING must be one of {', '.join(POOLINGS)}; got {pooling!r}.")


def pool(token_features: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(M,) max or mean of dense (T, M) features over the tokens in `mask`; zeros when it selects none."""
    check_pooling(pooling)
    chosen = token_features[mask]
    if not len(chosen):
        return token_features.new_zeros(token_features.shape[1])
    return chosen.amax(0) if pooling == "max" else chosen.mean(0)


def _as_example(index: int, text: str | Example) -> Example:
    if isinstance(text, Example):
        return text
    if not isinstance(text, str) or not text.strip():
        raise UserError(
            f"text {index} is {'empty' if isinstance(text, str) else type(text).__name__}: every text must be a non-empty string."
        )
    return Example(row=index, source=f"text {index}", text=text)


class SAEReader:
    """A trained SAE with the model and the extraction settings that feed it; see the module docstring."""

    def __init__(self, sae: SparseAutoencoder, model: torch.nn.Module, tokenizer, extraction: ExtractConfig, include_special: bool) -> None:
        self.sae, self.model, self.tokenizer, self.extraction, self.include_special = sae, model, tokenizer, extraction, include_special
        self.device = next(model.parameters()).device
        self.sae.to(self.device)
        with open_capture(model, extraction) as capture:
            if capture.d != sae.spec.d:
                raise UserError(
                    f"the SAE takes d={sae.spec.d} but {extraction.model_name} gives d={capture.d} at {extraction.hook_point} "
                    f"layer {extraction.layers[0]}: set the model, hook and layer the SAE was trained on."
                )

    @classmethod
    def load(cls, checkpoint: str, device: str = "auto", model_name: str = "", hook_point: str = "", layer: int | None = None) -> SAEReader:
        """Open a checkpoint (ours, or HypotheSAEs' given the model, hook point and layer) and load its model.

        `model_name` also points at a moved copy of the checkpoint's model; `hook_point` and
        `layer` are only needed when the checkpoint does not record them.
        """
        trained = open_trained_sae(checkpoint)
        device = resolve_device(device)
        extraction = extraction_settings(trained, model_name, hook_point, layer, device)
        language_model = trained.load_model(extraction.model_name, dtype=extraction.resolved_compute_dtype(), device=device)
        return cls(trained.sae, language_model.model, language_model.tokenizer, extraction, trained.info.trained_with_special_tokens)

    @torch.no_grad()
    def encode(self, activations: torch.Tensor) -> torch.Tensor:
        """(n, M) feature activations of raw (n, d) activations at the SAE's hook."""
        return self.sae.encode(activations.to(self.device, torch.float32))

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, d) reconstructions of (n, M) feature activations, in raw activation units."""
        return self.sae.decode(features.to(self.device, torch.float32))

    def tokenize(self, texts: Sequence[str | Example]) -> list[TokenizedExample]:
        """Token ids and special-token masks exactly as extraction made them for this checkpoint."""
        examples = [_as_example(index, text) for index, text in enumerate(texts)]
        # A learned position table (GPT-2's) has no row past its limit, and extraction never read past it either.
        max_length = min(self.extraction.max_length, learned_position_limit(self.model) or self.extraction.max_length)
        return tokenize_examples(self.tokenizer, examples, self.extraction.chat_template, max_length)

    def _batches(self, tokenized: list[TokenizedExample]) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Per forward batch: its text indices and each text's (T, d) float32 activations, rounded to the store's dtype."""
        storage_dtype = STORAGE_DTYPES[self.extraction.storage_dtype]
        sequences = [item.token_ids for item in tokenized]
        if not sequences:
            return
        pad_id = pad_token_id(self.tokenizer)
        with (
            open_capture(self.model, self.extraction) as capture,
            tqdm(total=len(sequences), desc="reading", unit="text", leave=False) as progress,
        ):
            row_tokens = choose_batching(self.model, capture, self.extraction, sequences, pad_id).row_tokens
            batches = iter_example_activations(capture, sequences, self.extraction.resolved_batch_tokens(), pad_id, self.device, row_tokens)
            for batch, per_store in batches:
                (pieces,) = per_store.values()
                progress.update(len(batch))
                yield (
                    batch,
                    [piece.to(storage_dtype).to(torch.float32, copy=True) for piece in pieces],
                )  # a copy: ordinary tensors, not inference-mode ones

    def activations(self, texts: Sequence[str | Example]) -> list[torch.Tensor]:
        """Each text's raw (T, d) activations at the SAE's hook, on the CPU: what the store would hold for it."""
        result: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for batch, pieces in self._batches(self.tokenize(texts)):
            for index, piece in zip(batch, pieces):
                result[index] = piece.cpu()
        return result

    def read(self, texts: Sequence[str | Example], pooling: str = "max") -> list[TextFeatures]:
        """Per-token and pooled feature activations of each text, in the order given."""
        check_pooling(pooling)  # before the model runs
        tokenized = self.tokenize(texts)
        result: list[TextFeatures | None] = [None] * len(texts)
        for batch, pieces in self._batches(tokenized):
            for index, piece in zip(batch, pieces):
                token_features = self.encode(piece)  # one text at a time: memory stays at T × M, not a whole batch's
                item = tokenized[index]
                pooled_mask = np.ones_like(item.special_mask) if self.include_special else ~item.special_mask
                if not pooled_mask.any():
                    logger.warning(
                        "Text %d has no content tokens within MAX_LENGTH=%d: its pooled features are zero.",
                        index,
                        self.extraction.max_length,
                    )
                result[index] = TextFeatures(
                    token_ids=item.token_ids,
                    tokens=token_texts(self.tokenizer, item.token_ids.tolist()),
                    special_mask=item.special_mask,
                    pooled_mask=pooled_mask,
                    token_features=token_features.cpu().to_sparse(),
                    pooled=pool(token_features, torch.from_numpy(pooled_mask).to(token_features.device), pooling).cpu(),
                    truncated=item.truncated,
                )
        return result


def extraction_settings(trained: TrainedSAE, model_name: str, hook_point: str, layer: int | None, device: str) -> ExtractConfig:
    """The ExtractConfig that made the checkpoint's store, narrowed to its one layer and moved to `device`.

    A checkpoint without our metadata (HypotheSAEs') takes the model, hook point and layer from
    the caller and extraction's defaults for the rest (chat template auto, MAX_LENGTH 512).
    """
    info, checkpoint = trained.info, trained.checkpoint
    recorded_model = info.model_name
    chosen_point, chosen_layer = trained.hook(hook_point, layer)
    model = model_name or recorded_model
    is_lora = chosen_point == LORA_HOOK_POINT
    if not model or chosen_point is None or (chosen_layer is None and not is_lora):
        raise UserError(
            f"{checkpoint} does not record the model, hook point and layer its activations came from ({info.source_description}). "
            f"Name them: MODEL_NAME, HOOK_POINT ({', '.join(HOOK_POINTS)}) and LAYER in analyze_texts.py, "
            "or SAEReader.load(checkpoint, model_name=..., hook_point='resid_post', layer=12)."
        )
    known = {field.name for field in dataclasses.fields(ExtractConfig)}
    recorded_extraction = {key: value for key, value in info.extraction.items() if key in known}
    if not recorded_extraction:
        logger.info(
            "%s records no extraction settings: reading with extraction's defaults (chat template auto, MAX_LENGTH 512).", checkpoint
        )
    if recorded_extraction.get("packing", "sequential") != "sequential":
        logger.warning("This SAE was trained on packed blocks of text; each text is read here as its own sequence.")
    layers = recorded_extraction.get("layers", []) if is_lora else [chosen_layer]
    # How texts share forward batches is chosen afresh for this device, as extraction chose it for its own: the store
    # records the path its run took, which changes activations by rounding only.
    batching = {"device": device, "batching": "auto", "attention": "auto"}
    return ExtractConfig(**{**recorded_extraction, "model_name": model, "hook_point": chosen_point, "layers": layers, **batching})
