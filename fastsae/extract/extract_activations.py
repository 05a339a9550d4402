"""Step 1: run each example through the model on its own and store the activations at chosen hooks.

FAST extraction: every example is its own sequence (no token attends to
another example), so its activations are what the model computes for that
example alone. For speed, examples share forward batches under a token
budget: packed end to end in rows, each confined to itself by its position
ids (fastsae/extract/packed_batches.py), where the model supports that, else
grouped by length into right-padded rows (padding never reaches the store).
One forward pass feeds every requested layer, and the pass stops after the
deepest one: no later blocks, no final norm, no LM head. What a pass reads is
a "capture": the hooks at LAYERS (one store each), or a LoRA adapter's
bottlenecks (fastsae/lm/lora.py, one store); batching, storing and resuming
are shared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsae.common import distributed
from fastsae.common.config import setting
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.common.stage import Estimate, Output, PlanFacts, Stage, seconds_for
from fastsae.extract.packed_batches import packed_batch, packed_row_batches, packed_row_tokens
from fastsae.lm.data import Dataset, load_dataset
from fastsae.lm.hook_points import HOOK_POINTS, HookTarget, ResidualCapture, check_layer_range, hook_name
from fastsae.lm.lora import LORA_HOOK_POINT, LORA_MODULE_TYPES, adapter_fingerprint, lora_capture, lora_hook_name
from fastsae.lm.models import (
    EMBEDDED_MODEL,
    ModelSource,
    hub_revision,
    learned_position_limit,
    load_model,
    load_model_config,
    load_tokenizer,
    model_files_fingerprint,
    resolve_model,
)
from fastsae.lm.tokenization import CHAT_TEMPLATE_CHOICES, TokenizedExample, tokenize_examples
from fastsae.store.activation_store import (
    STORAGE_DTYPES,
    ActivationStore,
    ActivationStoreWriter,
    StoreError,
    bytes_per_token,
    check_free_disk,
    plan_shards,
    writing_lock,
)
from fastsae.store.manifest import MANIFEST, DatasetRecord, StoreManifest

logger = logging.getLogger(__name__)

PACKING_CHOICES = ("sequential", "block")
BATCHING_CHOICES = ("auto", "packed", "padded")
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Where ATTENTION = auto tries flex attention first for packed rows: on an H200 (8B-sized model, one 32,768-token row
# a batch) it ran 1.25x sdpa's packed rows (benchmarks/RESULTS.md); on the 2-core CPU sdpa was 1.10x faster (bench_extract.py).
FLEX_ATTENTION_DEVICES = ("cuda",)
# Flex attention compiles a kernel at its first call (11 s for SmolLM2 on the 2-core CPU; on a GPU not yet timed, tens of
# seconds expected), and once more when batch shapes vary. At the H200's 69.9k (sdpa) and 87.6k (flex) tokens/s an
# 8B-sized model saves 2.9 µs a token, so compiling pays for itself only past millions of tokens: auto takes flex
# attention for extractions at least this large.
FLEX_ATTENTION_MIN_TOKENS = 10_000_000
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


GPU_BATCH_TOKENS = 32768  # H100, 8B model: 52% of the FLOP ceiling vs 25% at 8192
CPU_BATCH_TOKENS = 8192  # 2-core CPU, SmolLM2: 20% faster than 32768


@dataclass
class ExtractConfig:
    runs_under_torchrun: ClassVar[bool] = True  # its work splits across torchrun's processes (docs/multi_gpu.md)
    model_name: str = setting(EMBEDDED_MODEL, "model: the embedded default, a local folder, a .gguf file, or a hub id")
    dataset: str = setting(
        "data/cognitive_actions.jsonl",
        "JSONL (or a .json array of objects), CSV or Parquet file, or a folder saved with datasets' save_to_disk",
    )
    text_field: str = setting("auto", "field holding the text; auto picks text, content, prompt or messages (chat)")
    response_field: str = setting("", "optional field with an assistant response (becomes the assistant turn)")
    label_field: str = setting("auto", "field with a label kept per example for later steps; auto picks label; empty for none")
    chat_template: str = setting("auto", "auto: use the model's chat template when it has one; none: plain text")
    layers: list[int] = setting([12], "decoder blocks to read (0-based); layer L is the output of block L (ignored for HOOK_POINT = lora)")
    hook_point: str = setting("resid_post", "resid_post (block output), mlp_out, attn_out, or lora (a LoRA adapter's rank-r bottlenecks)")
    lora_adapter: str = setting("", "PEFT LoRA adapter folder (adapter_config.json + weights) for HOOK_POINT = lora")
    lora_modules: list[str] = setting(
        list(LORA_MODULE_TYPES), "adapted module types whose lora_A outputs are stored, over all adapted layers, in this order"
    )
    max_length: int = setting(512, "examples longer than this many tokens are truncated (and counted)")
    packing: str = setting(
        "sequential", "sequential: each example alone (FAST); block: concatenate and cut into BLOCK_SIZE blocks (the baseline)"
    )
    block_size: int = setting(128, "tokens per block when PACKING = block")
    batch_tokens: int = setting(
        0,
        "tokens per forward batch, padding included; 0: 32768 on a GPU, 8192 on the CPU (each measured fastest there); lower it if memory runs out",
    )
    batching: str = setting(
        "auto",
        "how examples share a batch: packed (end to end in rows, no padding, attention confined to each example), "
        "padded (rows padded to the batch's longest example), or auto: packed where a check shows the model keeps packed examples apart",
    )
    row_tokens: int = setting(
        0,
        "tokens per packed row, at most BATCH_TOKENS; 0: the width that needs the fewest FLOPs (the whole batch with flash or flex attention)",
    )
    attention: str = setting(
        "auto",
        "attention kernel: auto (flex_attention for packed rows of 10M tokens or more on a GPU, which computes only each example's "
        "own query-key pairs; else the model's own), sdpa, eager, flex_attention, flash_attention_2 or flash_attention_3",
    )
    storage_dtype: str = setting("float16", "dtype on disk: float16, bfloat16 or float32")
    compute_dtype: str = setting("auto", "model dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    output_dir: str = setting("activations", "stores go to OUTPUT_DIR/<model>/<hook>/")
    shard_mb: float = setting(256.0, "size of one shard file of activations, in MiB")
    max_examples: int = setting(
        0, "use only the first N usable examples (0: all); the rows after the N-th are not read, nor counted as skipped"
    )
    overwrite: bool = setting(
        False,
        "start afresh, replacing any store in the folder (without it, a rerun with the same settings resumes, one with others is refused)",
    )

    def __post_init__(self) -> None:
        choices = {
            "chat_template": CHAT_TEMPLATE_CHOICES,
            "hook_point": (*HOOK_POINTS, LORA_HOOK_POINT),
            "packing": PACKING_CHOICES,
            "batching": BATCHING_CHOICES,
            "attention": ATTENTION_CHOICES,
            "storage_dtype": tuple(STORAGE_DTYPES),
            "compute_dtype": COMPUTE_DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name.upper()} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if not self.layers:
            raise UserError("LAYERS is empty: name at least one layer, e.g. --layers 12.")
        if self.hook_point == LORA_HOOK_POINT:
            if not self.lora_adapter:
                raise UserError("HOOK_POINT = lora needs LORA_ADAPTER: a PEFT adapter folder, e.g. --lora-adapter path/to/adapter.")
            if not self.lora_modules or len(set(self.lora_modules)) < len(self.lora_modules):
                raise UserError(
                    f"LORA_MODULES must name each module type once, e.g. --lora-modules q_proj v_proj; got {self.lora_modules!r}."
                )
        positive = {"max_length": self.max_length, "block_size": self.block_size, "shard_mb": self.shard_mb}
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name.upper()} must be positive; got {value}.")
        if self.max_examples < 0:
            raise UserError(f"MAX_EXAMPLES must be positive, or 0 for every example; got {self.max_examples}.")
        if self.batch_tokens < 0:
            raise UserError(f"BATCH_TOKENS must be positive, or 0 for the device's default; got {self.batch_tokens}.")
        if self.batch_tokens and self.batch_tokens < self.max_length:
            raise UserError(
                f"BATCH_TOKENS ({self.batch_tokens}) must be at least MAX_LENGTH ({self.max_length}) so the longest example fits a batch."
            )
        if self.row_tokens < 0:
            raise UserError(f"ROW_TOKENS must be positive, or 0 to size packed rows for the model; got {self.row_tokens}.")
        if self.row_tokens and self.row_tokens < self.max_length:
            raise UserError(
                f"ROW_TOKENS ({self.row_tokens}) must be at least MAX_LENGTH ({self.max_length}) so the longest example fits a row."
            )
        self.layers = sorted(set(self.layers))

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_batch_tokens(self) -> int:
        """A GPU needs big batches to fill its matrix units (benchmarks/bench_gpu.py); on a CPU smaller ones run faster."""
        chosen = self.batch_tokens or (GPU_BATCH_TOKENS if self.resolved_device().startswith("cuda") else CPU_BATCH_TOKENS)
        return max(chosen, self.max_length)

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return STORAGE_DTYPES[self.compute_dtype]


class Capture(Protocol):
    """What one forward pass reads: (B, T, d) activations for each store in `targets`, under the same keys.

    Padded rows come with an attention mask; packed rows with none, and position ids that restart at each example.
    """

    d: int
    targets: dict[Hashable, HookTarget]

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict[Hashable, torch.Tensor]: ...


def open_capture(model: torch.nn.Module, config: ExtractConfig) -> AbstractContextManager[Capture]:
    """The hooks at LAYERS (one store each), or a LoRA adapter's bottlenecks (one store; the adapter is attached meanwhile)."""
    if config.hook_point == LORA_HOOK_POINT:
        return lora_capture(model, config.lora_adapter, config.lora_modules)
    return nullcontext(ResidualCapture(model, config.layers, config.hook_point))


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, so each padded batch (n × its longest) stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted longest first, so the batch's padded width is its first member's length.
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def padded_batch(sequences: list[np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded input ids and attention mask, T the longest sequence."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def pad_token_id(tokenizer) -> int:
    """What fills a batch's padding: the tokenizer's pad token, else 0 (the attention mask hides it either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class ForwardBatch(NamedTuple):
    """One forward pass's inputs: row r holds the sequences `rows[r]` end to end from its first column."""

    rows: list[list[int]]  # padded batches hold one sequence per row
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), 0 on padding; None for packed rows
    position_ids: torch.Tensor | None  # (B, T), restarting at 0 at each sequence of a packed row; None for padded rows


def forward_batches(sequences: list[np.ndarray], batch_tokens: int, pad_token_id: int, row_tokens: int | None) -> Iterator[ForwardBatch]:
    """Length batches of padded rows, or given `row_tokens`, of rows packed up to that many tokens (fastsae/extract/packed_batches.py)."""
    lengths = [len(sequence) for sequence in sequences]
    if row_tokens is None:
        for batch in length_batches(lengths, batch_tokens):
            input_ids, attention_mask = padded_batch([sequences[index] for index in batch], pad_token_id)
            yield ForwardBatch([[index] for index in batch], input_ids, attention_mask, None)
    else:
        for rows in packed_row_batches(lengths, batch_tokens, row_tokens):
            input_ids, position_ids = packed_batch([[sequences[index] for index in row] for row in rows], pad_token_id)
            yield ForwardBatch(rows, input_ids, None, position_ids)


def iter_example_activations(
    capture: Capture,
    sequences: list[np.ndarray],
    batch_tokens: int,
    pad_token_id: int,
    device: torch.device,
    row_tokens: int | None = None,
) -> Iterator[tuple[list[int], dict[Hashable, list[torch.Tensor]]]]:
    """Per forward batch: the indices of its sequences and, per store, each sequence's (len, d) activations.

    `row_tokens` packs the sequences into rows of up to that many tokens (see `choose_batching`); None pads length batches.
    """
    for batch in forward_batches(sequences, batch_tokens, pad_token_id, row_tokens):
        masks = [None if tensor is None else tensor.to(device) for tensor in (batch.attention_mask, batch.position_ids)]
        captured = capture(batch.input_ids.to(device), *masks)
        row_lengths = [[len(sequences[index]) for index in row] for row in batch.rows]
        pieces = {
            key: [piece for row, lengths in enumerate(row_lengths) for piece in values[row, : sum(lengths)].split(lengths)]
            for key, values in captured.items()
        }
        yield [index for row in batch.rows for index in row], pieces


# Packing may move an example's activations by rounding only (other kernels, shapes and summation
# orders): a mean per-token relative difference of ~1e-7 in float32 and ~1e-3 in bfloat16 (SmolLM2,
# layers 12 and 25), but ~3e-2 in bfloat16 for a random Llama-3.1-8B on an H200, with flex attention
# as with sdpa (benchmarks/RESULTS.md). An example that sees the one packed before it moves by ~6e-3
# (a tiny random BLOOM in float32, the test's) to ~0.3 (SmolLM2, and a tiny random Llama). Under a causal
# mask, even a leaking one, the example that starts a row sees nothing else: how far it moves is the
# packed computation's own rounding on this model and device. So the check allows the example packed
# behind it a few times that, and at least the floors below.
PACKING_TOLERANCE_FLOAT32 = 1e-4
PACKING_TOLERANCE_16_BIT = 1e-2
PACKING_ROUNDING_FACTOR = 10


def packing_differences(
    capture: Capture, pair: list[np.ndarray], n_rows: int, pad_token_id: int, device: torch.device
) -> tuple[float, float]:
    """How far packing moves activations from running each sequence alone, with `pair` laid end to end in each of
    `n_rows` rows of one batch: the largest, over stores, mean per-token relative difference ||packed - alone|| / ||alone||,
    for the sequence that starts each row and for the one packed behind it."""
    sequences = pair * n_rows
    lengths = [len(sequence) for sequence in sequences]
    pair_tokens = sum(lengths[:2])

    def activations(batch_tokens: int, row_tokens: int | None) -> dict[tuple[int, Hashable], torch.Tensor]:
        found = {}
        for indices, per_store in iter_example_activations(capture, sequences, batch_tokens, pad_token_id, device, row_tokens):
            for position, index in enumerate(indices):
                found.update({(index, key): pieces[position].float() for key, pieces in per_store.items()})
        return found

    alone = activations(max(lengths), None)  # a budget of the longest sequence gives each sequence a batch of its own
    packed = activations(n_rows * pair_tokens, pair_tokens)
    starts_row = {row[0] for rows in packed_row_batches(lengths, n_rows * pair_tokens, pair_tokens) for row in rows}
    moved = {
        item: float(((packed[item] - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)).mean())
        for item, expected in alone.items()
    }
    first = max(value for (index, _), value in moved.items() if index in starts_row)
    behind = max(value for (index, _), value in moved.items() if index not in starts_row)
    return first, behind


class PackingCheck(NamedTuple):
    """What `check_packing` found for packed rows of `row_tokens` under the model's current attention kernel."""

    row_tokens: int
    rounding: float  # how far the example starting a row moved: this model's and device's own rounding
    difference: float  # how far the example packed behind it moved
    tolerance: float

    @property
    def keeps_examples_apart(self) -> bool:
        return self.difference <= self.tolerance


def check_packing(
    model: torch.nn.Module, capture: Capture, config: ExtractConfig, sequences: list[np.ndarray], pad_token_id: int
) -> PackingCheck:
    """Pack two of the sequences into a row, at the width extraction would use, and compare with running them alone."""
    batch_tokens = config.resolved_batch_tokens()
    lengths = [len(sequence) for sequence in sequences]
    row_tokens = min(batch_tokens, config.row_tokens) if config.row_tokens else packed_row_tokens(model, lengths, batch_tokens)
    # The check packs as many rows into its batch as extraction will (two stand for several): flash attention keeps
    # packed examples apart only in a batch of one row.
    n_rows = min(2, batch_tokens // row_tokens)
    parameter = next(model.parameters())
    rounding, difference = packing_differences(capture, (sequences * 2)[:2], n_rows, pad_token_id, parameter.device)
    floor = PACKING_TOLERANCE_FLOAT32 if parameter.dtype == torch.float32 else PACKING_TOLERANCE_16_BIT
    return PackingCheck(row_tokens, rounding, difference, max(floor, PACKING_ROUNDING_FACTOR * rounding))


class Batching(NamedTuple):
    """How a run's forward passes share examples: packed rows of `row_tokens` (None: padded length batches), under `attention`."""

    row_tokens: int | None
    attention: str


def switch_attention(model: torch.nn.Module, attention: str) -> None:
    """Run `model` under the attention kernel `attention`; ValueError or ImportError where it cannot."""
    if model.config._attn_implementation == attention:
        return  # models outside transformers' attention interface warn at every call, even one that changes nothing
    model.set_attn_implementation(attention)
    # Models outside transformers' attention interface (BLOOM, ...) keep their own kernel, with only a warning.
    if model.config._attn_implementation != attention:
        raise ValueError(f"it keeps {model.config._attn_implementation} attention")


def set_attention(model: torch.nn.Module, attention: str) -> None:
    """`switch_attention`, or stop with what to set instead."""
    try:
        switch_attention(model, attention)
    except (ValueError, ImportError) as error:
        raise UserError(f"ATTENTION = {attention} cannot run {type(model).__name__} here ({error}). Set ATTENTION = auto.") from None


def try_flex_attention(
    model: torch.nn.Module, capture: Capture, config: ExtractConfig, sequences: list[np.ndarray], pad_token_id: int
) -> PackingCheck | None:
    """The packing check under flex attention, or None, logged, where the extraction is too small to pay for compiling it
    or this model or machine cannot run it."""
    n_tokens = sum(len(sequence) for sequence in sequences)
    if n_tokens < FLEX_ATTENTION_MIN_TOKENS:
        logger.info(
            "Attention: not flex_attention: %d tokens are too few to pay for compiling it (FLEX_ATTENTION_MIN_TOKENS = %d).",
            n_tokens,
            FLEX_ATTENTION_MIN_TOKENS,
        )
        return None
    try:
        switch_attention(model, "flex_attention")
        return check_packing(model, capture, config, sequences, pad_token_id)
    # Flex attention compiles a kernel at its first call: models without support, and machines without a compiler
    # or Triton, fail in ways that have no common exception type.
    except Exception as error:
        logger.warning(
            "Attention: flex_attention cannot run %s here (%s: %s); packed rows get the model's own kernel, slower on a GPU.",
            type(model).__name__,
            type(error).__name__,
            error,
        )
        return None


def describe_check(model: torch.nn.Module, attention: str, check: PackingCheck) -> str:
    verdict = "keeps them apart" if check.keeps_examples_apart else "lets the examples packed in one row see each other"
    return (
        f"{type(model).__name__} under the {attention} kernel {verdict}: packed behind another, an example's activations "
        f"moved by {check.difference:.0e}, relative; at the start of a row, by {check.rounding:.0e}"
    )


def choose_batching(
    model: torch.nn.Module, capture: Capture, config: ExtractConfig, sequences: list[np.ndarray], pad_token_id: int
) -> Batching:
    """What BATCHING and ATTENTION come to for this model, with the model switched to that attention kernel.

    auto and packed first check that packing two of the sequences into a row leaves their activations as they are
    alone (`check_packing`): a model that builds its own attention mask, or ignores position ids, would let the
    examples of a row see each other. Where it does, auto falls back to padded batches and logs why, and packed
    refuses. ATTENTION = auto tries flex attention first for packed rows of a large extraction on a GPU
    (FLEX_ATTENTION_DEVICES, FLEX_ATTENTION_MIN_TOKENS), and the model's own kernel where flex cannot run or fails the check.
    """
    if config.attention != "auto":
        set_attention(model, config.attention)
    own = model.config._attn_implementation
    if config.batching == "padded":
        return Batching(None, own)
    if config.attention == "auto" and own != "flex_attention" and next(model.parameters()).device.type in FLEX_ATTENTION_DEVICES:
        check = try_flex_attention(model, capture, config, sequences, pad_token_id)
        if check is not None and check.keeps_examples_apart:
            logger.info(
                "Batching: packed rows of up to %d tokens, no padding between examples (%s).",
                check.row_tokens,
                describe_check(model, "flex_attention", check),
            )
            return Batching(check.row_tokens, "flex_attention")
        if check is not None:
            logger.info("Attention: not flex_attention, because %s.", describe_check(model, "flex_attention", check))
        switch_attention(model, own)
    check = check_packing(model, capture, config, sequences, pad_token_id)
    if check.keeps_examples_apart:
        logger.info(
            "Batching: packed rows of up to %d tokens, no padding between examples (%s).",
            check.row_tokens,
            describe_check(model, own, check),
        )
        return Batching(check.row_tokens, own)
    if config.batching == "packed":
        raise UserError(f"BATCHING = packed, but {describe_check(model, own, check)}. Set BATCHING = auto or padded.")
    logger.info("Batching: padded length batches, because %s.", describe_check(model, own, check))
    return Batching(None, own)


@dataclass
class PackedSequences:
    """What goes through the model: FAST examples one by one, or fixed-size blocks of concatenated examples."""

    sequences: list[np.ndarray]
    special_masks: list[np.ndarray]
    records: list[dict]


def pack_sequences(tokenized: list[TokenizedExample], dataset: Dataset, packing: str, block_size: int) -> PackedSequences:
    """Sequential keeps each example whole; block concatenates all and cuts every `block_size` tokens."""
    sources = [{"row": example.row, "source": example.source, "label": example.label} for example in dataset.examples]
    if packing == "sequential":
        return PackedSequences([item.token_ids for item in tokenized], [item.special_mask for item in tokenized], sources)
    stream = np.concatenate([item.token_ids for item in tokenized])
    special = np.concatenate([item.special_mask for item in tokenized])
    owner = np.repeat(np.arange(len(tokenized)), [len(item.token_ids) for item in tokenized])
    starts = range(0, len(stream), block_size)
    records = [
        {"block": index, "rows": [sources[i]["row"] for i in np.unique(owner[start : start + block_size])]}
        for index, start in enumerate(starts)
    ]
    return PackedSequences(
        [stream[start : start + block_size] for start in starts], [special[start : start + block_size] for start in starts], records
    )


def check_positions(model: torch.nn.Module, lengths: list[int], config: ExtractConfig) -> None:
    """Refuse sequences longer than a learned position table (they would index past its end), warn past a rotary model's
    trained context. Only sequences that are longer count: MAX_LENGTH is a cap, harmless above the limit when none reaches it."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(lengths, default=0)
    if not limit or longest <= limit:
        return
    n_longer = sum(length > limit for length in lengths)
    constant, value = ("BLOCK_SIZE", config.block_size) if config.packing == "block" else ("MAX_LENGTH", config.max_length)
    fix = f"Set {constant} to {limit} or less (--{constant.lower().replace('_', '-')} {limit})"
    if learned_position_limit(model) is not None:
        raise UserError(
            f"{constant} = {value} lets sequences run past the {limit} positions {type(model).__name__} has learned embeddings "
            f"for ({n_longer} of {len(lengths)} do; the longest has {longest} tokens). {fix}."
        )
    logger.warning(
        "%s = %d lets sequences run past the %d positions %s was trained on (max_position_embeddings; %d of %d do, the longest "
        "has %d tokens): their later tokens' activations come from positions it never saw. %s to keep to its context.",
        constant,
        value,
        limit,
        type(model).__name__,
        n_longer,
        len(lengths),
        longest,
        fix,
    )


def store_names(config: ExtractConfig) -> list[str]:
    """The hook names of the stores `config` writes, in LAYERS order (one for a LoRA adapter), known before a model loads."""
    if config.hook_point == LORA_HOOK_POINT:
        return [lora_hook_name(config.lora_modules)]
    return [hook_name(layer, config.hook_point) for layer in config.layers]


def store_folder(config: ExtractConfig, model_slug: str, hook: str) -> Path:
    suffix = "" if config.packing == "sequential" else f"-block{config.block_size}"
    return Path(config.output_dir) / model_slug / (hook + suffix)


def starts_with_bos(sequences: list[np.ndarray], bos_token_id: int | None) -> bool:
    """Whether every sequence opens with the tokenizer's BOS token (False for a tokenizer without one)."""
    return bos_token_id is not None and all(len(sequence) and sequence[0] == bos_token_id for sequence in sequences)


def write_activation_stores(
    model: torch.nn.Module, tokenizer, dataset: Dataset, config: ExtractConfig, model_slug: str, model_fields: dict | None = None
) -> list[Path]:
    """Extract `dataset` through an already loaded `model` into one store per layer (or one LoRA store); resumes where stores exist.

    The model comes back with the attention kernel it came with, whichever one extraction ran.
    """
    own_attention = model.config._attn_implementation
    try:
        with open_capture(model, config) as capture, ExitStack() as locks:
            folders = {key: store_folder(config, model_slug, target.name) for key, target in capture.targets.items()}
            # One job writes a store at a time: under torchrun its rank 0 holds the locks, and a refusal reaches every rank.
            distributed.on_main_then_shared(lambda: [locks.enter_context(writing_lock(folder)) for folder in folders.values()])
            return _write_stores(capture, folders, model, tokenizer, dataset, config, model_slug, model_fields)
    finally:
        switch_attention(model, own_attention)


def _write_stores(
    capture: Capture,
    folders: dict[Hashable, Path],
    model: torch.nn.Module,
    tokenizer,
    dataset: Dataset,
    config: ExtractConfig,
    model_slug: str,
    model_fields: dict | None,
) -> list[Path]:
    tokenized = tokenize_examples(tokenizer, dataset.examples, config.chat_template, config.max_length)
    packed = pack_sequences(tokenized, dataset, config.packing, config.block_size)
    lengths = [len(sequence) for sequence in packed.sequences]
    check_positions(model, lengths, config)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    d = capture.d
    storage_dtype = STORAGE_DTYPES[config.storage_dtype]
    itemsize = torch.zeros(1, dtype=storage_dtype).element_size()
    shards = plan_shards(lengths, max(1, int(config.shard_mb * 2**20 / (d * itemsize))))
    compute_dtype = next(model.parameters()).dtype
    batching = choose_batching(model, capture, config, packed.sequences, pad_token_id(tokenizer))

    # What decides whether a rerun resumes the store. Not here: BATCH_TOKENS, BATCHING, ROW_TOKENS, ATTENTION and DEVICE,
    # which change only how examples share a forward pass, not what any example's activations are (beyond float
    # rounding, which the equivalence tests bound), so a store begun one way resumes another. The manifest's
    # `extraction` records the batching path of the run that finished the store.
    common_settings = {
        "model": model_slug,
        **(model_fields or {}),
        "dataset_fingerprint": dataset.fingerprint(),
        "text_field": dataset.text_field,
        "response_field": config.response_field,
        "chat_template": config.chat_template,
        "max_length": config.max_length,
        "packing": config.packing,
        "block_size": config.block_size if config.packing == "block" else None,
        "storage_dtype": config.storage_dtype,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "shard_mb": config.shard_mb,
        "max_examples": config.max_examples,
    }
    n_truncated = sum(item.truncated for item in tokenized)
    n_unlocated_messages = sum(item.unlocated_messages for item in tokenized)

    def open_writers(overwrite: bool, check_disk: bool) -> dict[Hashable, ActivationStoreWriter]:
        if check_disk:
            missing_tokens = sum(shard.n_tokens for folder in folders.values() for shard in shards if not (folder / shard.name).is_dir())
            check_free_disk(Path(config.output_dir), missing_tokens * bytes_per_token(d, config.storage_dtype))
        return {
            key: ActivationStoreWriter(
                folders[key],
                settings={**common_settings, **target.identity},
                manifest_fields={
                    "model": model_slug,
                    **(model_fields or {}),
                    "hook_name": target.name,
                    **target.fields,
                    "d": d,
                    "dtype": config.storage_dtype,
                    "packing": config.packing,
                    "dataset": DatasetRecord(
                        path=dataset.path,
                        fingerprint=dataset.fingerprint(),
                        text_field=dataset.text_field,
                        label_field=dataset.label_field,
                        n_rows=dataset.n_rows,
                        n_examples=len(dataset.examples),
                        n_skipped=dataset.skipped.total,
                        skipped=dict(dataset.skipped.counts),
                        n_truncated=n_truncated,
                        n_unlocated_messages=n_unlocated_messages,
                    ),
                    "extraction": {  # the path taken
                        **asdict(config),
                        # resolved: reading texts through the SAE later (tools/reader.py) attaches it from another folder
                        "lora_adapter": str(Path(config.lora_adapter).expanduser().resolve()) if config.lora_adapter else "",
                        "batching": "padded" if batching.row_tokens is None else "packed",
                        "attention": batching.attention,
                        # what `auto` came to: texts read through the SAE later run in it on any device (tools/reader.py)
                        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                        # SAELens' prepend_bos (saelens_export.py): its contexts start with BOS as these sequences do
                        "sequences_start_with_bos": starts_with_bos(packed.sequences, tokenizer.bos_token_id),
                    },
                    "n_special_tokens": int(sum(mask.sum() for mask in packed.special_masks)),
                },
                shards=shards,
                doc_offsets=doc_offsets,
                example_records=packed.records,
                overwrite=overwrite,
            )
            for key, target in capture.targets.items()
        }

    # Under torchrun, rank 0 prepares the folders (replacing them under OVERWRITE, and reporting a refusal, the free-disk
    # check's included, to every rank: a user error only another rank met would print nowhere, as rank 0 alone prints);
    # the others attach once it has, never replacing what it prepared, and every rank then sees the same pending shards.
    ranks = distributed.current()
    writers = distributed.on_main_then_shared(lambda: open_writers(config.overwrite, check_disk=True))
    if not ranks.is_main:
        writers = open_writers(overwrite=False, check_disk=False)
    distributed.barrier()
    pending = sorted(set().union(*(writer.pending_shards() for writer in writers.values())))
    mine = [
        pending[index]
        for index in distributed.shares_by_tokens([shards[index].n_tokens for index in pending], ranks.world_size)[ranks.rank]
    ]
    if not pending:
        logger.info("All %d shards already extracted; nothing to do.", len(shards))
    elif len(pending) < len(shards):
        logger.info(
            "Resuming: %d of %d shards are on disk from an earlier run; extracting the other %d.",
            len(shards) - len(pending),
            len(shards),
            len(pending),
        )
    if mine:
        _extract_shards(
            capture, next(model.parameters()).device, tokenizer, packed, shards, mine, writers, config, storage_dtype, batching.row_tokens
        )
    distributed.barrier()  # every rank's shards are on disk
    if ranks.is_main:
        for writer in writers.values():
            if not writer.is_complete:
                writer.finish(completed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extracted_by_ranks=ranks.world_size)
    distributed.barrier()  # no rank returns before the manifests say complete
    skipped = f", skipped {dataset.skipped.total} rows ({dataset.skipped.describe()})" if dataset.skipped.total else ""
    logger.info(
        "Stored %d examples, %d tokens (d=%d, %s) per store%s%s%s:\n  %s",
        len(packed.sequences),
        int(doc_offsets[-1]),
        d,
        config.storage_dtype,
        skipped,
        f", truncated {n_truncated}" if n_truncated else "",
        f", {n_unlocated_messages} chat messages not found in the rendered template (marked special)" if n_unlocated_messages else "",
        "\n  ".join(str(folder) for folder in folders.values()),
    )
    return list(folders.values())


def _extract_shards(
    capture: Capture,
    device: torch.device,
    tokenizer,
    packed: PackedSequences,
    shards,
    pending: list[int],
    writers: dict,
    config: ExtractConfig,
    storage_dtype: torch.dtype,
    row_tokens: int | None,
) -> None:
    """Run the pending shards' examples through the model; a shard is written to disk while the next one computes."""
    pad_id = pad_token_id(tokenizer)
    total_examples = sum(shards[index].n_examples for index in pending)
    started = time.perf_counter()
    tokens_done = 0
    ranks = distributed.current()
    description = f"extracting (rank 0's share of {ranks.world_size})" if ranks.is_distributed else "extracting"
    with (
        tqdm(total=total_examples, desc=description, unit="ex", disable=not ranks.is_main) as progress,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsae-shard-writer") as disk,
    ):
        writing = None
        for shard_index in pending:
            shard = shards[shard_index]
            members = range(shard.first_example, shard.first_example + shard.n_examples)
            sequences = [packed.sequences[index] for index in members]
            local_offsets = np.concatenate([[0], np.cumsum([len(sequence) for sequence in sequences])])
            buffers = {key: torch.empty((shard.n_tokens, capture.d), dtype=storage_dtype) for key in writers}
            batches = iter_example_activations(capture, sequences, config.resolved_batch_tokens(), pad_id, device, row_tokens)
            for batch, per_store in batches:
                for key, pieces in per_store.items():
                    on_host = torch.cat(pieces).to(storage_dtype).cpu()  # one device-to-host copy per batch, not one per example
                    for local_index, piece in zip(batch, on_host.split([len(piece) for piece in pieces])):
                        buffers[key][local_offsets[local_index] : local_offsets[local_index + 1]] = piece
                tokens_done += sum(len(sequences[index]) for index in batch)
                progress.update(len(batch))
                progress.set_postfix(tok_per_s=f"{tokens_done / (time.perf_counter() - started):.0f}")
            if writing is not None:
                writing.result()  # at most one shard waits for the disk, and its errors surface here
            token_ids = np.concatenate(sequences)
            special_mask = np.concatenate([packed.special_masks[index] for index in members])
            writing = disk.submit(_write_shard, writers, shard_index, buffers, token_ids, special_mask)
        if writing is not None:
            writing.result()


def _write_shard(
    writers: dict, shard_index: int, buffers: dict[Hashable, torch.Tensor], token_ids: np.ndarray, special_mask: np.ndarray
) -> None:
    for key, writer in writers.items():
        if shard_index in writer.pending_shards():
            writer.write_shard(shard_index, buffers[key], token_ids, special_mask)


def extract_activations(config: ExtractConfig) -> list[Path]:
    """Load the model, tokenizer and dataset named by `config` and write the stores (under torchrun, each rank a share)."""
    distributed.init_from_environment()
    source = resolve_model(config.model_name)
    if config.hook_point != LORA_HOOK_POINT:  # before the weights load (minutes for a large model)
        check_layer_range(config.layers, int(load_model_config(source).num_hidden_layers))
    dataset = load_dataset(config.dataset, config.text_field, config.response_field, config.label_field, config.max_examples)
    logger.info("Loaded %d examples from %s (text field %r)", len(dataset.examples), dataset.path, dataset.text_field)
    tokenizer = load_tokenizer(source)
    device = config.resolved_device()
    model = load_model(source, config.resolved_compute_dtype(), device)
    return write_activation_stores(model, tokenizer, dataset, config, source.slug, manifest_model_fields(config.model_name, source))


def manifest_model_fields(model_name: str, source: ModelSource) -> dict[str, Any]:
    """What a store's manifest says of its model. A folder or GGUF file has no revision: its files' fingerprint ties the
    store (and its resume key) to the weights it was made from, so new weights saved under the same name are refused,
    not resumed. Hub stores' keys stay as they were."""
    revision = hub_revision(source.location) if source.kind == "hub" else None
    fields = {"model_name": model_name, "model_source": source.kind, "revision": revision}
    fingerprint = model_files_fingerprint(source)
    if fingerprint is not None:
        fields["model_files_fingerprint"] = fingerprint
    return fields


class ExtractStage(Stage):
    """Step 1 in the pipeline: texts → one activation store per hook."""

    name = "extract"
    script = "extract_activations.py"
    input_constant = "DATASET"
    upstream = None
    config_class = ExtractConfig
    # How examples share forward passes, and where they run: not what the store holds, which is why a store's resume
    # key leaves them out too (`_write_stores`).
    unfingerprinted = Stage.unfingerprinted | {"batch_tokens", "batching", "row_tokens", "attention", "device"}

    def run(self, config: ExtractConfig) -> list[Path]:
        return extract_activations(config)

    def fingerprint_facts(self, config: ExtractConfig) -> dict[str, Any]:
        """A model folder's or GGUF file's files' fingerprint, and a LoRA adapter's: new weights saved under the same name
        re-run the step. Nothing for a Hub model, whose revision names its weights, so its fingerprint stays as it was."""
        facts = {}
        if (fingerprint := model_files_fingerprint(resolve_model(config.model_name))) is not None:
            facts["model_files"] = fingerprint
        if config.hook_point == LORA_HOOK_POINT:
            facts["lora_adapter"] = adapter_fingerprint(config.lora_adapter)
        return facts

    def outputs(self, config: ExtractConfig, facts: PlanFacts) -> list[Output]:
        return [
            Output(store_folder(config, facts.model_slug, hook), {"model": facts.model_slug, "hook_name": hook})
            for hook in store_names(config)
        ]

    def outputs_complete(self, outputs: list[Output]) -> bool:
        """A store counts once its manifest says every shard is on disk and it opens: a shard deleted or damaged since
        (seen from the files' headers and sizes, no data read) makes the step run again, which rewrites that shard."""
        for output in outputs:
            manifest = StoreManifest.read(output.path / MANIFEST)
            if manifest is None or not manifest.is_complete:
                return False
            try:
                ActivationStore(output.path)
            except StoreError as error:
                logger.info("The store is not whole: %s", error)
                return False
        return True

    def estimate(self, config: ExtractConfig, facts: PlanFacts) -> Estimate:
        corpus, calibration = facts.corpus, facts.calibration
        if corpus is None or calibration is None:
            return Estimate(disk_folder=Path(config.output_dir))
        return Estimate(
            examples=len(corpus.lengths),
            tokens=corpus.n_tokens,
            seconds=seconds_for(calibration.load_seconds, corpus.n_tokens, calibration.cut_tokens_per_second),
            disk_bytes=corpus.n_tokens * len(config.layers) * bytes_per_token(facts.d, config.storage_dtype),
            disk_folder=Path(config.output_dir),
        )

    def key_figures(self, config: ExtractConfig, outputs: list[Output]) -> list[tuple[str, str]]:
        manifests = [StoreManifest.read(output.path / MANIFEST) for output in outputs]
        return [
            (f"tokens ({manifest.hook_name})", f"{manifest.n_tokens:,} in {manifest.n_examples:,} examples")
            for manifest in manifests
            if manifest is not None and manifest.is_complete
        ]


STAGE = ExtractStage()
