"""What run_pipeline.py checks and measures before it runs anything.

Checks end in one line for the plan, or in a `UserError` that names the fix: the model (local,
a GGUF to dequantise once, or a download), the device and dtype, free disk against the store's
size (each stage adds its own checks, such as interpretation's API key). Estimates come from the data and this machine, not from
constants: token counts from the model's tokenizer (or an existing store), and speeds from a short
calibration — a forward pass of a few real examples, and a few SAE training steps at the
configured size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastsae.common.errors import UserError
from fastsae.common.stage import Calibration, Corpus
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.extract.extract_activations import ExtractConfig, check_positions, pack_sequences, padded_batch
from fastsae.lm.data import Dataset
from fastsae.lm.hook_points import ResidualCapture, check_layer_range
from fastsae.lm.models import ModelSource, load_model, load_model_config, model_availability, resolve_model
from fastsae.lm.tokenization import tokenize_examples
from fastsae.store.activation_store import DISK_MARGIN_BYTES, ActivationStore, check_free_disk, format_bytes, free_disk_bytes

logger = logging.getLogger(__name__)

CALIBRATION_EXAMPLES = 8  # real examples of about the median length, timed through the model
CALIBRATION_SAE_STEPS = 5  # timed SAE training steps and encodings (after as many for warm-up)


def _median_picks(lengths: np.ndarray) -> np.ndarray:
    """Indices of the examples around the median length: typical sequences, batched with little padding as extraction batches them."""
    order = np.argsort(lengths, kind="stable")
    start = max(0, min(len(order) // 2 - CALIBRATION_EXAMPLES // 2, len(order) - CALIBRATION_EXAMPLES))
    return order[start : start + CALIBRATION_EXAMPLES]


def corpus_from_dataset(tokenizer, dataset: Dataset, config: ExtractConfig) -> Corpus:
    """Tokenize the dataset the way extraction will (template, truncation, packing): cheap next to a forward pass."""
    tokenized = tokenize_examples(tokenizer, dataset.examples, config.chat_template, config.max_length)
    packed = pack_sequences(tokenized, dataset, config.packing, config.block_size)
    lengths = np.array([len(sequence) for sequence in packed.sequences])
    content = np.array([int((~mask).sum()) for mask in packed.special_masks])
    block_rows = [record["rows"] for record in packed.records] if config.packing == "block" else None
    return Corpus(lengths, content, [packed.sequences[index] for index in _median_picks(lengths)], block_rows)


def corpus_from_store(store: ActivationStore) -> Corpus:
    """The same counts read off an existing store (its token ids and special masks, not its activations)."""
    offsets = store.doc_offsets
    lengths = np.diff(offsets)
    content = np.add.reduceat((~store.special_mask(0, store.n_tokens)).astype(np.int64), offsets[:-1])  # no example is empty
    sample = [store.token_ids(int(offsets[index]), int(offsets[index + 1])) for index in _median_picks(lengths)]
    return Corpus(lengths, content, sample, store.block_rows())


@dataclass
class ModelCheck:
    """The model the pipeline uses: where it comes from and the sizes the plan needs."""

    source: ModelSource
    availability: str  # local, dequantise or download (see fastsae.lm.models.model_availability)
    d: int
    n_layers: int
    vocab_size: int
    dequantises: bool  # whether the checks may write a GGUF's dequantised copy (a run needs it) or only read the GGUF (a plan alone)

    @property
    def can_calibrate(self) -> bool:
        """Whether the model can be timed without a download, or, for a plan alone, without dequantising it into the cache."""
        return self.availability == "local" or (self.availability == "dequantise" and self.dequantises)

    def describe(self) -> str:
        how = {
            "local": "available offline",
            "dequantise": "GGUF, dequantised into the cache once (about 15 s for SmolLM2)"
            if self.dequantises
            else "GGUF, not in the cache yet: a run dequantises it once (about 15 s for SmolLM2); a plan alone writes nothing, "
            "so the steps that run the model get no time estimate",
            "download": "not in the local cache: the weights will be downloaded from the Hugging Face hub",
        }[self.availability]
        return f"{self.source.name} ({self.source.kind}; {self.n_layers} blocks, d={self.d}): {how}"


def check_model(name: str, layers: list[int], dequantise: bool) -> ModelCheck:
    """Resolve the model and read its config (no weights): a missing model or a layer out of range stops here. With
    `dequantise` False (a plan alone) a GGUF not in the cache yet is read as it is, and the cache is left unwritten."""
    source = resolve_model(name)
    availability = model_availability(source)
    try:
        model_config = load_model_config(source, dequantise)
    except OSError as error:
        raise UserError(
            f"could not read the config of model {name}: it is not local and the hub could not provide it (no internet?). "
            f"Connect, or set MODEL_NAME to a local folder or .gguf file. Details: {error}"
        ) from None
    n_layers = int(model_config.num_hidden_layers)
    check_layer_range(layers, n_layers)
    return ModelCheck(source, availability, int(model_config.hidden_size), n_layers, int(model_config.vocab_size), dequantise)


def describe_device(device: str, compute_dtype: torch.dtype, training_bfloat16: bool) -> str:
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        where = "cpu" if torch.cuda.is_available() else "cpu (no CUDA GPU found)"
    training = "bfloat16 autocast, float32 weights" if training_bfloat16 else "float32"
    return f"{where}; model in {str(compute_dtype).removeprefix('torch.')}, SAE training in {training}"


def check_disk(folder: Path, needed_bytes: int) -> str:
    """Refuses (UserError) when the store would not fit; otherwise says how much it takes of what is free."""
    check_free_disk(folder, needed_bytes)
    return f"the store needs about {format_bytes(needed_bytes)} (+{DISK_MARGIN_BYTES // 2**20} MiB margin); {format_bytes(free_disk_bytes(folder))} free at {folder}"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(function, device: str) -> float:
    _synchronize(device)
    started = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - started


def calibrate_model(
    calibration: Calibration,
    source: ModelSource,
    config: ExtractConfig,
    corpus: Corpus,
    layers: list[int],
    hook_point: str,
    pad_token_id: int,
) -> None:
    """Load the model and time the sample through it in one padded batch, cut short after the deepest layer and in full.

    The corpus's lengths are checked against the model's positions first, as extraction checks them, so that a sample
    past a learned position table gets extraction's message rather than an index error from inside the model."""
    device, sample = config.resolved_device(), corpus.sample
    started = time.perf_counter()
    model = load_model(source, config.resolved_compute_dtype(), device)
    calibration.load_seconds = time.perf_counter() - started
    check_positions(model, corpus.lengths.tolist(), config)

    capture = ResidualCapture(model, layers, hook_point)

    def cut(sequences: list[np.ndarray]) -> None:
        input_ids, attention_mask = padded_batch(sequences, pad_token_id)
        capture(input_ids.to(device), attention_mask.to(device))

    def full(sequences: list[np.ndarray]) -> None:
        input_ids, attention_mask = padded_batch(sequences, pad_token_id)
        with torch.inference_mode():
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits.float().log_softmax(-1)

    cut(sample[:2]), full(sample[:2])  # warm-up: one-off allocations stay out of the timing
    tokens = sum(len(sequence) for sequence in sample)
    calibration.cut_tokens_per_second = tokens / _timed(lambda: cut(sample), device)
    calibration.full_tokens_per_second = tokens / _timed(lambda: full(sample), device)


def _time_sae(spec: SAESpec, x: torch.Tensor, device: str, bfloat16: bool, aux_coefficient: float) -> tuple[float, float]:
    """Seconds per training step (Adam, backward, decoder renormalised) and per encoding of the batch `x`."""
    sae = SparseAutoencoder(spec).to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def steps(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bfloat16):
                output = sae.training_step(x, None, aux_coefficient, 0.0)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            sae.enforce_constraints_()

    def encodes() -> None:
        with torch.no_grad():
            for _ in range(CALIBRATION_SAE_STEPS):
                sae.encode(x)

    steps(CALIBRATION_SAE_STEPS)  # warm-up: Adam's state and the allocator settle
    return _timed(lambda: steps(CALIBRATION_SAE_STEPS), device) / CALIBRATION_SAE_STEPS, _timed(encodes, device) / CALIBRATION_SAE_STEPS


def calibrate_sae(
    calibration: Calibration, specs: list[SAESpec], batch_size: int, device: str, bfloat16: bool, aux_coefficient: float
) -> None:
    """Time every SAE of the run on one random batch: training steps, and encoding as the later steps do."""
    x = torch.randn(batch_size, specs[0].d, device=device)
    timings = [_time_sae(spec, x, device, bfloat16, aux_coefficient) for spec in specs]
    calibration.sae_step_seconds = sum(step for step, _ in timings)
    calibration.encode_tokens_per_second = batch_size / sum(encode for _, encode in timings)
