"""Training batches from the activation store: split by text (no text on both sides), special tokens out, shuffled through a mixing buffer.

The store is read in large sequential chunks (in a shuffled chunk order each
epoch), tokens of validation examples and — by default — special/template
tokens are dropped, and the rest pass through a fixed-size mixing buffer as
the FAST paper describes: fill it with many examples' tokens, shuffle, hand
out half as batches, refill that half, repeat. Memory is bounded by the
buffer, never by the store. Everything is seeded, so the batch sequence is a
pure function of the settings: a resumed run replays it exactly.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue

import numpy as np
import torch

from fastsae.common.errors import UserError
from fastsae.store.activation_store import ActivationStore

DEFAULT_VALIDATION_FRACTION = 0.1  # train.py's default; evaluate.py's too, for checkpoints that do not record theirs

READ_CHUNK_TOKENS = 16384
GPU_STORE_READERS = 4  # threads copying store chunks into pinned memory while a GPU trains (one was the loop's bottleneck)


@dataclass(frozen=True)
class ExampleSplit:
    """Which examples train and which validate; never the same text in both.

    In a FAST store an example is one text, so splitting examples splits texts. A block store's blocks are cut from the
    texts laid end to end, so a text can span two blocks: `by_text` holds out whole texts there, and leaves out (from
    both sides) the few blocks that hold tokens of a held-out and a training text.
    """

    is_validation: np.ndarray  # (n_examples,) bool
    is_training: np.ndarray  # (n_examples,) bool: the rest, but for a block store's blocks that hold held-out and training text
    held_out_texts: int | None = None  # for a split of a block store's blocks, how many texts it holds out

    @classmethod
    def by_example(cls, n_examples: int, validation_fraction: float, seed: int) -> ExampleSplit:
        if n_examples < 2 and validation_fraction > 0:
            raise UserError(
                f"the store has {n_examples} example(s): it cannot be split into training and validation. "
                "Extract more examples, or set VALIDATION_FRACTION = 0 to train on all of them without validation."
            )
        n_validation = int(round(n_examples * validation_fraction))
        n_validation = min(max(n_validation, 1 if validation_fraction > 0 else 0), n_examples - 1)
        chosen = np.random.default_rng(seed).permutation(n_examples)[:n_validation]
        is_validation = np.zeros(n_examples, dtype=bool)
        is_validation[chosen] = True
        return cls(is_validation, ~is_validation)

    @classmethod
    def by_text(cls, n_examples: int, validation_fraction: float, seed: int, block_rows: list[list[int]] | None = None) -> ExampleSplit:
        """The split training, evaluation and sparse probing use: no text has tokens on both sides.

        A FAST store (`block_rows` None) is split `by_example`. A block store's `block_rows` name, per block, the dataset
        rows (texts) it holds tokens of. The blocks `by_example` would hold out choose the held-out texts: every text
        with a token in one of them. Validation is then every block that holds only held-out texts (those chosen, and any
        other that lies inside a held-out text), training every block that holds none, and the blocks between, which
        hold a held-out text's first or last tokens beside a training text's, are left out of both. Held-out texts come
        in runs (a block's worth), so few blocks are left out: at most two per chosen block.
        """
        chosen = cls.by_example(n_examples, validation_fraction, seed)
        if block_rows is None:
            return chosen
        rows = np.concatenate([np.asarray(block, dtype=np.int64) for block in block_rows])
        first_row_of_block = np.cumsum([0] + [len(block) for block in block_rows[:-1]])
        block_of_row = np.repeat(np.arange(n_examples), [len(block) for block in block_rows])
        held_out_texts = np.unique(rows[chosen.is_validation[block_of_row]])
        row_held_out = np.isin(rows, held_out_texts)
        return cls(
            np.logical_and.reduceat(row_held_out, first_row_of_block),
            ~np.logical_or.reduceat(row_held_out, first_row_of_block),
            len(held_out_texts),
        )

    @classmethod
    def of_store(cls, store: ActivationStore, validation_fraction: float, seed: int) -> ExampleSplit:
        """`by_text` of the store's examples."""
        return cls.by_text(store.n_examples, validation_fraction, seed, store.block_rows())

    def record(self, seed: int) -> dict[str, int]:
        """What identifies the split in an output file: `by_text` draws it again from the store, `seed` and the fraction.
        A FAST store's held-out examples are the first `held_out_examples` of a permutation of `examples` seeded with
        `seed`; a block store's split adds the texts it holds out, and how many blocks it leaves out of both sides."""
        record = {"seed": seed, "examples": len(self.is_validation), "held_out_examples": int(self.is_validation.sum())}
        if self.held_out_texts is None:
            return record
        left_out = int((~self.is_validation & ~self.is_training).sum())
        return record | {"held_out_texts": self.held_out_texts, "left_out_examples": left_out}

    def token_mask(self, store: ActivationStore, start: int, stop: int, validation: bool) -> np.ndarray:
        """For tokens [start, stop): whether each belongs to the requested side of the split."""
        examples = np.searchsorted(store.doc_offsets, np.arange(start, stop), side="right") - 1
        return (self.is_validation if validation else self.is_training)[examples]


class TokenSource:
    """Raw store activations of one side of the split, in (seeded) chunk order.

    Under torchrun each rank streams its own part of the store: `part` = (rank, ranks) takes
    the rank-th of `ranks` equal, contiguous token ranges, so the parts are disjoint and cover it.
    """

    def __init__(
        self, store: ActivationStore, split: ExampleSplit, validation: bool, include_special: bool, part: tuple[int, int] = (0, 1)
    ) -> None:
        self.store = store
        self.split = split
        self.validation = validation
        self.include_special = include_special
        rank, ranks = part
        self.part_range = (store.n_tokens * rank // ranks, store.n_tokens * (rank + 1) // ranks)

    def _kept(self, start: int, stop: int) -> np.ndarray:
        """For store rows [start, stop): whether each is on this side of the split and, by default, not special."""
        keep = self.split.token_mask(self.store, start, stop, self.validation)
        if not self.include_special:
            keep &= ~self.store.special_mask(start, stop)
        return keep

    def chunk(self, start: int, stop: int, pin_memory: bool = False) -> torch.Tensor:
        """The kept tokens of store rows [start, stop), in the store's dtype (half the bytes of float32 to move)."""
        return self.store.gather(start + np.flatnonzero(self._kept(start, stop)), pin_memory)

    def count_tokens(self) -> int:
        """Kept tokens in the whole store (every part)."""
        return self._count_kept(0, self.store.n_tokens)

    def count_part_tokens(self) -> int:
        """Kept tokens in this source's part of the store: what one of its epochs streams."""
        return self._count_kept(*self.part_range)

    def _count_kept(self, start: int, stop: int) -> int:
        return sum(int(self._kept(row, min(row + READ_CHUNK_TOKENS, stop)).sum()) for row in range(start, stop, READ_CHUNK_TOKENS))

    def epoch(self, generator: np.random.Generator, pin_memory: bool = False, readers: int = 0) -> Iterator[torch.Tensor]:
        """One pass over this source's part of the store, its read chunks in a seeded random order.

        With `readers` > 0, that many threads read chunks ahead at once; they still come out in order.
        """
        part_start, part_stop = self.part_range
        starts = generator.permutation(np.arange(part_start, part_stop, READ_CHUNK_TOKENS))
        ranges = [(int(start), min(int(start) + READ_CHUNK_TOKENS, part_stop)) for start in starts]
        chunks = (
            self._threaded_reads(ranges, pin_memory, readers)
            if readers
            else (self.chunk(start, stop, pin_memory) for start, stop in ranges)
        )
        yield from (tokens for tokens in chunks if len(tokens))

    def _threaded_reads(self, ranges: list[tuple[int, int]], pin_memory: bool, readers: int) -> Iterator[torch.Tensor]:
        """`chunk` of each range, read by `readers` threads up to 2 × readers ahead, handed out in order."""
        with ThreadPoolExecutor(readers, thread_name_prefix="fastsae-store-reader") as pool:
            reads: deque[Future] = deque()
            for start, stop in ranges:
                reads.append(pool.submit(self.chunk, start, stop, pin_memory))
                if len(reads) > 2 * readers:
                    yield reads.popleft().result()
            while reads:
                yield reads.popleft().result()

    def all_tokens(self, limit: int, seed: int | None = None) -> torch.Tensor:
        """The first `limit` tokens of the whole store (every part), as float32: for validation and statistics. With a
        `seed`, its read chunks are taken in a seeded random order instead, so that a sample of a store sorted by source,
        label or length describes all of it, not its first rows."""
        pieces, total = [], 0
        starts = np.arange(0, self.store.n_tokens, READ_CHUNK_TOKENS)
        for start in starts if seed is None else np.random.default_rng(seed).permutation(starts):
            start = int(start)
            if total >= limit:
                break
            piece = self.chunk(start, min(start + READ_CHUNK_TOKENS, self.store.n_tokens))
            pieces.append(piece[: limit - total])
            total += len(pieces[-1])
        return torch.cat(pieces).float() if pieces else torch.empty(0, self.store.d)


def mixed_batches(
    source: TokenSource, buffer_tokens: int, batch_size: int, seed: int, device: str = "cpu", readers: int | None = None
) -> Iterator[torch.Tensor]:
    """Endless (B, d) batches on `device`, in the store's dtype: epochs of the source shuffled through a buffer.

    The buffer lives on `device`, so shuffling, handing out batches and compacting the kept half are
    device copies; only the store's own bytes cross from the host, once each. On a GPU, `readers`
    threads (default GPU_STORE_READERS) read the next chunks straight into pinned memory meanwhile; on
    the CPU, which also computes the step, chunks are read when needed. The shuffle is drawn on the CPU
    from a seeded generator and chunks arrive in order, so the batches are the same on every device.
    """
    if buffer_tokens < 2 * batch_size:
        raise UserError(f"BUFFER_TOKENS ({buffer_tokens}) must be at least twice BATCH_SIZE ({batch_size}).")
    chunk_order = np.random.default_rng(seed)
    shuffle = torch.Generator().manual_seed(seed)
    on_gpu = device.startswith("cuda")
    readers = (GPU_STORE_READERS if on_gpu else 0) if readers is None else readers

    def chunks() -> Iterator[torch.Tensor]:
        while True:
            produced = False
            for tokens in source.epoch(chunk_order, pin_memory=on_gpu, readers=readers):
                produced = True
                yield tokens
            if not produced:
                raise UserError("no training tokens left after the split and the special-token filter. Extract more examples.")

    incoming = read_ahead(chunks()) if readers else chunks()
    pending = torch.empty(0, source.store.d, dtype=source.store.dtype)
    buffer = torch.empty(
        buffer_tokens, source.store.d, dtype=source.store.dtype, device=device
    )  # filled in place: no copies of the whole buffer
    filled = 0
    while True:
        while filled < buffer_tokens:  # refill the half that was handed out
            if not len(pending):
                pending = next(incoming)
            take = min(buffer_tokens - filled, len(pending))
            buffer[filled : filled + take].copy_(pending[:take], non_blocking=True)
            pending, filled = pending[take:], filled + take
        order = torch.randperm(filled, generator=shuffle).to(device)
        n_out = (filled // 2) // batch_size * batch_size
        for offset in range(0, n_out, batch_size):
            yield buffer[order[offset : offset + batch_size]]  # indexing copies: later refills cannot touch it
        kept = order[n_out:]
        buffer[: len(kept)] = buffer[kept]
        filled = len(kept)


def read_ahead(tensors: Iterator[torch.Tensor], depth: int = 4) -> Iterator[torch.Tensor]:
    """Run `tensors` on a background thread, up to `depth` items ahead, while the caller (the GPU) works."""
    queue: Queue = Queue(maxsize=depth)
    finished = object()

    def produce() -> None:
        try:
            for tensor in tensors:
                queue.put(tensor)
        except BaseException as error:  # hand the error to the consumer instead of dying silently
            queue.put(error)
        queue.put(finished)

    threading.Thread(target=produce, daemon=True, name="fastsae-prefetch").start()
    while (item := queue.get()) is not finished:
        if isinstance(item, BaseException):
            raise item
        yield item
