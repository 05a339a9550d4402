"""A model's forward pass split at the hooked block: the part before it runs once, the rest once per variant.

Evaluation needs the next-token distribution of the model three ways (clean, with the SAE's
reconstruction in place of the hook's output, and with that output zero-ablated), and the blocks
before the hook are the same in all three. `SplitModel.reference` runs the whole model once and
keeps the input of the hooked block and the final hidden state (the LM head's input); every variant
then re-enters at the hooked block, with the earlier blocks swapped for stand-ins that hand over the
kept input, so they cost nothing. The LM head runs on the counted positions only, in chunks, so no
(batch × length × vocabulary) tensor is ever whole.

Some models change the logits after their LM head (Gemma's soft cap, Cohere's `logit_scale`, Granite's
`logits_scaling`). Those known ones are applied here, and the first clean pass checks one example's
log-probabilities against the model's own forward, so that a model with another such step is refused rather
than given wrong losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from fastsae.common.errors import UserError
from fastsae.lm.hook_points import decoder_layers, hook_site

# Replaces the hook's output (B, T, d) given it and the (B, T) positions to change.
Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOGIT_ROWS = 2048  # positions per LM-head chunk
# Largest difference, in nats, allowed between our log-probabilities and the model's own forward's: float32 agrees to
# rounding; bf16 and fp16 logits round to about 0.1 at magnitudes near 30, while a missed logit scale moves them by nats.
LOG_PROB_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_LOG_PROB_TOLERANCE = 0.5


class ModelBatch(NamedTuple):
    """Examples as rows, right-padded."""

    input_ids: torch.Tensor  # (B, T) int64
    attention: torch.Tensor  # (B, T) int64, 1 on real tokens


class ReferenceState(NamedTuple):
    """What the clean pass leaves for the variants (on the model's device, in its dtype)."""

    block_input: torch.Tensor  # (B, T, d) the hooked block's input
    final_hidden: torch.Tensor  # (B, T, d) the LM head's input


class _HandOver(nn.Module):
    """Stands in for a block before the hooked one: returns the kept input of the hooked block."""

    def __init__(self, block_input: torch.Tensor, returns_tuple: bool, attention_type: str | None) -> None:
        super().__init__()
        self.block_input, self.returns_tuple = block_input, returns_tuple
        if attention_type is not None:  # models with mixed attention read it off each block
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (self.block_input,) if self.returns_tuple else self.block_input


class SplitModel:
    """One model, hooked at (`layer`, `hook_point`), run from the hooked block on."""

    def __init__(self, model: nn.Module, layer: int, hook_point: str) -> None:
        self.model, self.layer = model, layer
        self.blocks = decoder_layers(model)
        self.site = hook_site(model, layer, hook_point)
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # Cohere multiplies the LM head's output by `logit_scale`, Granite divides it by `logits_scaling`.
        self.logit_multiplier = (getattr(model.config, "logit_scale", None) or 1.0) / (getattr(model.config, "logits_scaling", None) or 1.0)
        self.block_returns_tuple = False
        self.logits_checked = False

    def _last_hidden(self, batch: ModelBatch) -> torch.Tensor:
        return self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention, use_cache=False).last_hidden_state

    @torch.no_grad()
    def reference(self, batch: ModelBatch) -> ReferenceState:
        """The clean pass, keeping the hooked block's input and the LM head's input."""
        kept: dict[str, torch.Tensor] = {}

        def keep_input(module, args, kwargs):
            kept["block_input"] = args[0] if args else kwargs["hidden_states"]

        def note_output_type(module, args, output):
            self.block_returns_tuple = isinstance(output, tuple)

        block = self.blocks[self.layer]
        handles = [block.register_forward_pre_hook(keep_input, with_kwargs=True), block.register_forward_hook(note_output_type)]
        try:
            final_hidden = self._last_hidden(batch)
        finally:
            for handle in handles:
                handle.remove()
        if not self.logits_checked:
            self.check_logits(batch)
        return ReferenceState(kept["block_input"], final_hidden)

    @torch.no_grad()
    def check_logits(self, batch: ModelBatch) -> None:
        """Refuse a model whose own forward computes other logits from its last hidden state than `log_probs` does."""
        ids = batch.input_ids[:1, : int(batch.attention[0].sum())]
        theirs = self.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
        ours = self.log_probs(self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0])
        gap = float((theirs - ours).abs().max())
        dtype = next(self.model.parameters()).dtype
        if gap > LOG_PROB_TOLERANCE.get(dtype, HALF_LOG_PROB_TOLERANCE):
            raise UserError(
                f"{type(self.model).__name__} turns its last hidden state into logits in a way fastsae does not reproduce: "
                f"its next-token log-probabilities differ from those its own forward gives by up to {gap:.3g} nats, so the "
                "losses and KL of the core evaluation would be wrong. Leave core out of EVALS for this model, or open an "
                "issue naming the model."
            )
        self.logits_checked = True

    @contextmanager
    def _entering_at_hooked_block(self, block_input: torch.Tensor) -> Iterator[None]:
        originals = [self.blocks[index] for index in range(self.layer)]
        for index, block in enumerate(originals):
            self.blocks[index] = _HandOver(block_input, self.block_returns_tuple, getattr(block, "attention_type", None))
        try:
            yield
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block

    @torch.no_grad()
    def variant(self, batch: ModelBatch, block_input: torch.Tensor, replace: Replacement, positions: torch.Tensor) -> torch.Tensor:
        """The LM head's input when `replace` changes the hook's output at `positions`; the earlier blocks are not run."""

        handle = self.site.replace(lambda hidden: replace(hidden, positions))
        try:
            with self._entering_at_hooked_block(block_input):
                return self._last_hidden(batch)
        finally:
            handle.remove()

    @torch.no_grad()
    def log_probs(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Float32 log-probabilities of the next token for (N, d) rows of LM-head input (callers chunk N by LOGIT_ROWS)."""
        logits = self.head(final_hidden).float() * self.logit_multiplier
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.log_softmax(-1)
