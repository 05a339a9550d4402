"""SAEBench's core metrics of SAEs on held-out examples, with the model's clean and zero-ablated passes shared.

The clean and zero-ablated cross-entropies depend only on the model and the tokens, so
`ReferencePasses` computes them once per store (and split, budget and batching), saves them in the
store folder, and every SAE after that (a sweep, a retrained SAE, a rerun) pays only for its own
spliced pass, which re-enters the model at the hooked block (`fastsae/lm/split_forward.py`).

Which held-out examples: a seeded shuffle of the training run's validation examples, taken whole
until `token_budget` tokens (SAEBench's default is 20,480), then grouped by length into batches of
`batch_size_prompts` examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsae.common.atomic_files import write_atomically
from fastsae.core.sae import SparseAutoencoder
from fastsae.evaluate.saebench_core import LossSums, SparsityVarianceSums
from fastsae.lm.split_forward import LOGIT_ROWS, ModelBatch, SplitModel
from fastsae.store.activation_store import ActivationStore

logger = logging.getLogger(__name__)

CACHE_FOLDER = "evaluation_cache"
# Saved reference passes kept per store, the most recently used: each holds two hidden states per budgeted token
# (hundreds of MB for an 8B model), and another model, split or budget makes a new one.
KEPT_REFERENCE_PASSES = 3
CACHE_FORMAT = 1


def budgeted_examples(lengths: np.ndarray, examples: list[int], token_budget: int, seed: int) -> list[int]:
    """Whole examples, in a seeded random order, until `token_budget` tokens (0: all); at least one."""
    order = np.random.default_rng(seed).permutation(len(examples))
    if not token_budget:
        return [examples[i] for i in order]
    chosen, tokens = [], 0
    for i in order:
        if chosen and tokens + lengths[examples[i]] > token_budget:
            break
        chosen.append(examples[i])
        tokens += int(lengths[examples[i]])
    return chosen


def length_grouped(examples: list[int], lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches of `batch_size` examples of similar length (little padding); the order is deterministic."""
    ordered = sorted(examples, key=lambda index: (-int(lengths[index]), index))
    return [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]


@dataclass
class CountedPositions:
    """Which positions of a batch each metric counts: SAEBench skips those whose input token is BOS, EOS or pad."""

    scored: torch.Tensor  # (B, T) real tokens whose input is not ignored: KL, sparsity and variance
    next_token: torch.Tensor  # (B, T) of those, the ones with a next token in the example: cross-entropy
    replaced: torch.Tensor  # (B, T) where the SAE's reconstruction replaces the hook's output

    @classmethod
    def of(cls, batch: ModelBatch, ignored: set[int], exclude_ignored_from_reconstruction: bool) -> CountedPositions:
        real = batch.attention.bool()
        not_ignored = ~torch.isin(batch.input_ids, torch.tensor(sorted(ignored), dtype=torch.long, device=batch.input_ids.device))
        scored = real & not_ignored
        has_next = torch.zeros_like(real)
        has_next[:, :-1] = real[:, 1:]
        return cls(scored, scored & has_next, scored if exclude_ignored_from_reconstruction else real)


def _model_batch(store: ActivationStore, examples: list[int], pad_id: int) -> ModelBatch:
    spans = [(int(store.doc_offsets[index]), int(store.doc_offsets[index + 1])) for index in examples]
    width = max(stop - start for start, stop in spans)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (start, stop) in enumerate(spans):
        input_ids[row, : stop - start] = torch.from_numpy(store.token_ids(start, stop).astype(np.int64))
        attention[row, : stop - start] = 1
    return ModelBatch(input_ids, attention)


def _next_token_losses(
    split: SplitModel, batch: ModelBatch, positions: CountedPositions, final_hidden: torch.Tensor, clean_rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(B, T) cross-entropy at `next_token` positions, KL(clean ‖ this) at `scored` ones, and this pass's rows at `scored`.

    With `clean_rows` None this is the clean pass itself (no KL).
    """
    rows = final_hidden[positions.scored]
    targets = torch.zeros_like(batch.input_ids)
    targets[:, :-1] = batch.input_ids[:, 1:]
    row_targets = targets[positions.scored]
    ce_rows = torch.empty(len(rows), device=rows.device)
    kl_rows = torch.empty(len(rows), device=rows.device) if clean_rows is not None else None
    for start in range(0, len(rows), LOGIT_ROWS):
        chunk = slice(start, start + LOGIT_ROWS)
        log_probs = split.log_probs(rows[chunk])
        ce_rows[chunk] = -log_probs.gather(1, row_targets[chunk, None])[:, 0]
        if clean_rows is not None:
            clean = split.log_probs(clean_rows[chunk])
            kl_rows[chunk] = (clean.exp() * (clean - log_probs)).sum(-1)
    ce = torch.zeros(batch.input_ids.shape, device=rows.device)
    ce[positions.scored] = ce_rows
    ce = ce * positions.next_token
    kl = None
    if kl_rows is not None:
        kl = torch.zeros(batch.input_ids.shape, device=rows.device)
        kl[positions.scored] = kl_rows
    return ce, kl, rows


class ReferencePasses:
    """The clean and zero-ablated passes over the chosen held-out batches, computed once and kept on disk."""

    def __init__(
        self, split: SplitModel, store: ActivationStore, batches: list[list[int]], ignored: set[int], pad_id: int, cache_key: dict[str, Any]
    ) -> None:
        self.split, self.store, self.batches = split, store, batches
        self.ignored, self.pad_id = ignored, pad_id
        self.key = cache_key
        self.path = store.folder / CACHE_FOLDER / f"{_digest(cache_key)}.pt"
        self.entries: list[dict[str, torch.Tensor]] = []
        self.reused = False

    def load_or_compute(self, reuse: bool) -> None:
        """The saved passes when they were made for the same key (and `reuse`), else `compute` and save them."""
        device = next(self.split.model.parameters()).device
        if reuse and self.path.exists():
            payload = torch.load(self.path, map_location=device, weights_only=True)
            if payload.get("key") == json.dumps(self.key, sort_keys=True):
                self.entries, self.reused = payload["entries"], True
                self.path.touch()  # used now: the last to be pruned
                logger.info("Reusing the clean and zero-ablated passes saved in %s", self.path)
                return
        self.compute()
        self._save()

    def compute(self) -> None:
        """Run the clean and zero-ablated passes over every batch (nothing is saved)."""
        device = next(self.split.model.parameters()).device
        self.entries = [self._compute(batch, device) for batch in tqdm(self.batches, desc="model: clean and zero-ablated", unit="batch")]

    def _compute(self, examples: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        batch = ModelBatch(*(tensor.to(device) for tensor in _model_batch(self.store, examples, self.pad_id)))
        positions = CountedPositions.of(batch, self.ignored, exclude_ignored_from_reconstruction=False)  # zero-ablation is everywhere
        state = self.split.reference(batch)
        ce_clean, _, clean_rows = _next_token_losses(self.split, batch, positions, state.final_hidden, None)
        zero_hidden = self.split.variant(batch, state.block_input, lambda hidden, where: torch.zeros_like(hidden), positions.replaced)
        ce_zero, kl_zero, _ = _next_token_losses(self.split, batch, positions, zero_hidden, clean_rows)
        return {
            "input_ids": batch.input_ids, "attention": batch.attention, "block_input": state.block_input,
            "clean_rows": clean_rows, "ce_clean": ce_clean, "ce_zero": ce_zero, "kl_zero": kl_zero,
        }  # fmt: skip

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cpu_entries = [{name: tensor.cpu() for name, tensor in entry.items()} for entry in self.entries]
        payload = {"key": json.dumps(self.key, sort_keys=True), "entries": cpu_entries}
        write_atomically(self.path, lambda partial: torch.save(payload, partial))
        saved = sorted(self.path.parent.glob("*.pt"), key=lambda path: path.stat().st_mtime_ns, reverse=True)
        for stale in saved[KEPT_REFERENCE_PASSES:]:
            stale.unlink(missing_ok=True)
            logger.info("Removed %s: the store's %d most recently used reference passes are kept.", stale, KEPT_REFERENCE_PASSES)

    @torch.no_grad()
    def evaluate(
        self, sae: SparseAutoencoder, exclude_ignored_from_reconstruction: bool, desc: str
    ) -> tuple[LossSums, SparsityVarianceSums]:
        """The SAE spliced in (where its input token is not ignored, if asked): SAEBench's loss and sparsity/variance sums."""
        losses, sparsity_variance = LossSums(), SparsityVarianceSums(sae.spec.m)
        splice = _SAESplice(sae)
        for examples, entry in tqdm(list(zip(self.batches, self.entries)), desc=desc, unit="batch"):
            batch = ModelBatch(entry["input_ids"], entry["attention"])
            positions = CountedPositions.of(batch, self.ignored, exclude_ignored_from_reconstruction)
            final_hidden = self.split.variant(batch, entry["block_input"], splice, positions.replaced)
            ce_sae, kl_sae, _ = _next_token_losses(self.split, batch, positions, final_hidden, entry["clean_rows"])
            scored_among_replaced = positions.scored[positions.replaced]
            rows_of_batch = torch.arange(len(examples), device=batch.input_ids.device)[:, None].expand_as(positions.scored)
            sparsity_variance.add_batch(
                splice.x[scored_among_replaced],
                splice.x_hat[scored_among_replaced],
                splice.codes[scored_among_replaced],
                rows_of_batch[positions.scored],
            )
            for row in range(len(examples)):
                next_token, scored = positions.next_token[row], positions.scored[row]
                losses.add_example(
                    {
                        "ce_loss_without_sae": entry["ce_clean"][row][next_token],
                        "ce_loss_with_sae": ce_sae[row][next_token],
                        "ce_loss_with_ablation": entry["ce_zero"][row][next_token],
                    },
                    {"kl_div_with_sae": kl_sae[row][scored], "kl_div_with_ablation": entry["kl_zero"][row][scored]},
                )
        return losses, sparsity_variance


class _SAESplice:
    """Replaces the hook's output by the SAE's reconstruction, keeping the last batch's input, codes and output."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        self.sae = sae

    def __call__(self, hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        self.x = hidden[where].float()
        self.codes = self.sae.encode(self.x)
        self.x_hat = self.sae.decode(self.codes)
        replaced = hidden.clone()
        replaced[where] = self.x_hat.to(hidden.dtype)
        return replaced


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """Changes when any weight changes (a fine-tune, another checkpoint): each parameter's sum and norm.

    Accumulated in float64 inside the reductions, so no float64 copy of an 8B model's embedding is made.
    """
    summary = (
        torch.stack(
            [torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)]) for p in model.parameters()]
        )
        .cpu()
        .numpy()
    )
    return hashlib.sha256(np.array2string(summary, precision=10, threshold=10**9).encode()).hexdigest()[:16]


def store_fingerprint(store: ActivationStore) -> dict[str, Any]:
    manifest = store.manifest
    return {
        "folder": str(Path(store.folder).resolve()),
        "n_tokens": manifest.n_tokens,
        "dataset": manifest.dataset.fingerprint,
        "hook": store.hook_name,
        "extraction": manifest.extraction,
    }
