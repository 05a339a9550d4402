"""The activation store: fixed-size shards of a flat (tokens, d) array, memory-mapped on read.

Layout of one store folder (`activations/<model>/<hook>/`):

    manifest.json          what, how and how much (a StoreManifest); `status` is "complete" when done
    doc_offsets.npy        (n_examples + 1,) int64: example i is tokens [off[i], off[i+1])
    examples.jsonl         per example: source row of the dataset and its label, if any (a block: the rows it holds)
    shard_00000/           one folder per shard, renamed from `.partial` when complete
        activations.npy    (n, d) float16 / float32, or bfloat16 bits stored as uint16
        token_ids.npy      (n,) int32
        special_mask.npy   (n,) bool: special and chat-template tokens

Shards hold whole examples and are planned before extraction starts, so a
rerun knows exactly which shards are missing and an interrupted run resumes
into the same store as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from filelock import FileLock, Timeout

from fastsae.common.atomic_files import replace_folder_atomically
from fastsae.common.errors import UserError
from fastsae.store.manifest import MANIFEST, STORE_FORMAT_VERSION, ShardPlan, StoreManifest

logger = logging.getLogger(__name__)

DOC_OFFSETS = "doc_offsets.npy"
EXAMPLES = "examples.jsonl"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DISK_MARGIN_BYTES = 256 * 2**20
LOCK_PROBE_SECONDS = 1.0  # how long a probe of a store's writing lock, and an extraction taking it, wait for the other
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; over the user's quota
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only disk; a folder this user may not write
REEXTRACT = "Re-extract the store with --overwrite, or restore the file from a copy."  # the fix for a damaged store-wide file
NPY_LOAD_ERRORS = (OSError, ValueError, EOFError)  # what np.load raises for a file deleted, cut short or not .npy


class StoreError(UserError):
    """The store is missing, incomplete, or does not match its manifest."""


class DamagedShardError(StoreError):
    """A shard whose files do not hold what the manifest planned. `problem` says what is wrong without the fix, for the
    rerun that rewrites the shard to log."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"{problem}. Rerun extract_activations.py with the same settings: it rewrites the shard. Or restore it from a copy."
        )
        self.problem = problem


def load_store_array(path: Path, fix: str) -> np.ndarray:
    """`np.load`, or a StoreError naming the file and `fix`: a file deleted or cut short (a copy that stopped early) must
    not surface as numpy's traceback."""
    try:
        return np.load(path)
    except NPY_LOAD_ERRORS as error:
        raise StoreError(f"{path} is damaged or missing ({error or type(error).__name__}). {fix}") from None


def open_shard(store: Path, shard: ShardPlan, d: int, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """The shard's arrays, memory-mapped; a DamagedShardError where its files do not hold what the manifest planned: a
    file missing, cut short or grown (a copy that stopped early, a crash before the data reached the disk), or of another
    shape or dtype. From headers and file sizes alone: no data is read."""
    folder = store / shard.name
    if not folder.is_dir():
        raise DamagedShardError(f"{store} is missing {shard.name}")
    expected = {
        "activations": ((shard.n_tokens, d), to_storage_array(torch.zeros(1, dtype=dtype)).dtype),
        "token_ids": ((shard.n_tokens,), np.dtype(np.int32)),
        "special_mask": ((shard.n_tokens,), np.dtype(bool)),
    }
    arrays = {}
    for name, (shape, array_dtype) in expected.items():
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except NPY_LOAD_ERRORS as error:
            raise DamagedShardError(f"{path} is damaged or missing ({error or type(error).__name__})") from None
        if (array.shape, array.dtype) != (shape, array_dtype):
            raise DamagedShardError(f"{path} holds {array.dtype} {array.shape}, not the {array_dtype} {shape} its manifest plans")
        if (size := path.stat().st_size) != array.offset + array.nbytes:
            raise DamagedShardError(f"{path} is damaged: {size} bytes, where its header makes {array.offset + array.nbytes}")
        arrays[name] = array
    return arrays


class StoreChunk(NamedTuple):
    """A contiguous run of tokens read from the store."""

    start: int  # index of the first token in the store
    activations: torch.Tensor  # (n, d) in the storage dtype
    token_ids: np.ndarray  # (n,) int32
    special_mask: np.ndarray  # (n,) bool


def plan_shards(lengths: list[int], shard_tokens: int) -> list[ShardPlan]:
    """Cut consecutive examples into shards of at most `shard_tokens` tokens (at least one example each)."""
    shards: list[ShardPlan] = []
    first_example = first_token = tokens = 0
    for index, length in enumerate(lengths):
        if tokens and tokens + length > shard_tokens:
            shards.append(ShardPlan(f"shard_{len(shards):05d}", first_example, index - first_example, first_token, tokens))
            first_example, first_token, tokens = index, first_token + tokens, 0
        tokens += length
    if tokens:
        shards.append(ShardPlan(f"shard_{len(shards):05d}", first_example, len(lengths) - first_example, first_token, tokens))
    return shards


def to_storage_array(values: torch.Tensor) -> np.ndarray:
    """numpy has no bfloat16: such tensors are saved as their raw uint16 bits."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def from_storage_array(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def save_array(path: Path, values: np.ndarray) -> None:
    """`np.save` through Python's file writes: numpy's own report a full disk as "N requested and M written", without the
    errno that tells a full disk from any other failure."""
    values = np.ascontiguousarray(values)
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(values))
        handle.write(values.data)


def _write_json_lines(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def bytes_per_token(d: int, storage_dtype: str) -> int:
    """Disk bytes one token takes in one store: its activations, an int32 token id and a bool mask."""
    return d * torch.zeros(1, dtype=STORAGE_DTYPES[storage_dtype]).element_size() + 4 + 1


def free_disk_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or its nearest existing parent)."""
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def format_bytes(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    power = 0
    while count >= 1024 and power < len(units) - 1:
        count, power = count / 1024, power + 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


def check_free_disk(folder: Path, needed_bytes: int) -> None:
    free = free_disk_bytes(folder)
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise UserError(
            f"not enough disk space at {folder}: the store needs about {format_bytes(needed_bytes)} "
            f"(plus {DISK_MARGIN_BYTES / 2**20:.0f} MiB margin) and {format_bytes(free)} is free. "
            "Free some space, set OUTPUT_DIR to another disk, or lower MAX_EXAMPLES / MAX_LENGTH."
        )


@contextmanager
def unwritable_folder_stops_with_its_fix(folder: Path) -> Iterator[None]:
    """A store folder on a read-only disk, or one this user may not write, stops extraction with one line naming it, not
    an OSError traceback from wherever the first write happened to be."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE_ERRNOS:
            raise
        raise UserError(
            f"cannot write the store at {folder}: {error.strerror} ({error.filename}). "
            "Set OUTPUT_DIR to a folder you can write to, or make this one writable."
        ) from None


@contextmanager
def writing_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>.lock`, beside the store, while one extraction writes it: a second one into the same folder (the same
    command started again while the first runs, or one with --overwrite) is refused, where it would delete the first's
    `.partial` shards as they are written, or interleave shards of other settings with them. An OS file lock (filelock's,
    flock on Unix): the system drops it when its process ends, however it ends, so a crash leaves no stale lock.
    (Beside, not inside: --overwrite replaces the folder.)"""
    lock_path = writing_lock_path(folder)
    lock = FileLock(lock_path, timeout=LOCK_PROBE_SECONDS)  # a reader's probe (`is_being_written`) holds it for an instant
    try:
        with unwritable_folder_stops_with_its_fix(folder):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
    except Timeout:
        raise UserError(
            f"another extraction is writing {folder} (it holds {lock_path}). Let it finish, or stop it first; or set OUTPUT_DIR to another folder."
        ) from None
    try:
        yield
    finally:
        lock.release()


def writing_lock_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.lock")


def is_being_written(folder: Path) -> bool:
    """Whether an extraction holds `folder`'s writing lock now. Probed by taking the lock for an instant, waiting a
    moment first, so that two readers' probes, or a probe and a starting extraction, never take each other for one."""
    lock_path = writing_lock_path(folder)
    if not lock_path.exists():
        return False
    try:
        with FileLock(lock_path, timeout=LOCK_PROBE_SECONDS):
            return False
    except Timeout:
        return True
    except OSError:  # a lock file this user cannot open: no extraction of theirs is writing
        return False


def _settings_differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in keys if old.get(key) != new.get(key))


class ActivationStoreWriter:
    """Writes one store; resumes an interrupted one made with the same settings.

    `settings` holds everything that determines the store's contents; a store
    in the folder made with other settings is refused unless `overwrite`.
    `manifest_fields` are StoreManifest fields; the writer adds the counts, shards and settings.
    """

    def __init__(
        self,
        folder: Path,
        settings: dict[str, Any],
        manifest_fields: dict[str, Any],
        shards: list[ShardPlan],
        doc_offsets: np.ndarray,
        example_records: list[dict[str, Any]],
        overwrite: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.shards = shards
        self.manifest = StoreManifest(
            **manifest_fields, n_examples=len(doc_offsets) - 1, n_tokens=int(doc_offsets[-1]), shards=tuple(shards), settings=settings
        )
        if self._resumes(settings, overwrite):
            return
        # A new store appears whole, with its offsets, examples and manifest, or not at all: a crash while they are written
        # leaves no folder that a rerun would refuse as "not empty and holds no store manifest".
        with self._write_errors_stop_with_their_fix():
            replace_folder_atomically(self.folder, lambda partial: self._write_header(partial, doc_offsets, example_records))

    def _resumes(self, settings: dict[str, Any], overwrite: bool) -> bool:
        """Whether the folder holds this store begun with the same settings (its leftovers are cleared); refuses any other
        folder's contents unless `overwrite`, which replaces them unread (a damaged or newer manifest included)."""
        if overwrite:
            return False
        existing = StoreManifest.read(self.folder / MANIFEST)
        if existing is not None:
            if existing.settings == settings:
                self.manifest = replace(self.manifest, status=existing.status)
                for leftover in self.folder.glob("*.partial"):  # what a crash left half-written
                    if leftover.is_dir():
                        shutil.rmtree(leftover)
                    else:
                        leftover.unlink()
                self._remove_damaged_shards()
                return True
            raise UserError(
                f"{self.folder} already holds a store made with different settings "
                f"({_settings_differences(existing.settings, settings)}). "
                "Pass --overwrite to replace it, or set OUTPUT_DIR to another folder."
            )
        if self.folder.exists() and any(self.folder.iterdir()):
            raise UserError(
                f"{self.folder} is not empty and holds no store manifest. Pass --overwrite to replace it, or choose another OUTPUT_DIR."
            )
        return False

    def _remove_damaged_shards(self) -> None:
        """Shards whose files no longer match their plan (cut short since, or by a crash before their data reached the
        disk) are removed, so that the rerun rewrites them rather than reporting the store whole."""
        for shard in self.shards:
            if not (self.folder / shard.name).is_dir():
                continue
            try:
                open_shard(self.folder, shard, self.manifest.d, STORAGE_DTYPES[self.manifest.dtype])
            except DamagedShardError as error:
                logger.warning("Rewriting %s: %s.", shard.name, error.problem)
                shutil.rmtree(self.folder / shard.name)

    def _write_header(self, folder: Path, doc_offsets: np.ndarray, example_records: list[dict[str, Any]]) -> None:
        save_array(folder / DOC_OFFSETS, doc_offsets.astype(np.int64))
        _write_json_lines(folder / EXAMPLES, example_records)
        self.manifest.write(folder / MANIFEST)

    @property
    def is_complete(self) -> bool:
        return self.manifest.is_complete

    def pending_shards(self) -> list[int]:
        return [index for index, shard in enumerate(self.shards) if not (self.folder / shard.name).is_dir()]

    def write_shard(self, index: int, activations: torch.Tensor, token_ids: np.ndarray, special_mask: np.ndarray) -> None:
        """Write all of a shard's arrays into a `.partial` folder, then rename it: all or nothing."""
        shard = self.shards[index]
        if activations.shape[0] != shard.n_tokens:
            raise ValueError(f"{shard.name} expects {shard.n_tokens} tokens, got {activations.shape[0]}")

        def fill(partial: Path) -> None:
            save_array(partial / "activations.npy", to_storage_array(activations))
            save_array(partial / "token_ids.npy", token_ids.astype(np.int32))
            save_array(partial / "special_mask.npy", special_mask.astype(bool))

        with self._write_errors_stop_with_their_fix():
            replace_folder_atomically(self.folder / shard.name, fill)

    @contextmanager
    def _write_errors_stop_with_their_fix(self) -> Iterator[None]:
        """A disk that fills up mid-extraction (another job's files, a quota) stops it with what is still needed, and a
        folder that cannot be written with where to write instead, not an OSError traceback. The half-written shard is
        gone by then (its `.partial` removed), the whole ones stay."""
        try:
            with unwritable_folder_stops_with_its_fix(self.folder):
                yield
        except OSError as error:
            if error.errno not in DISK_FULL_ERRNOS:
                raise
            pending = self.pending_shards()
            needed = sum(self.shards[index].n_tokens for index in pending) * bytes_per_token(self.manifest.d, self.manifest.dtype)
            raise UserError(
                f"the disk holding {self.folder} is full ({error.strerror}): the store still needs about {format_bytes(needed)} "
                f"for its {len(pending)} unwritten shards (a rerun checks for {DISK_MARGIN_BYTES / 2**20:.0f} MiB more), and "
                f"{format_bytes(free_disk_bytes(self.folder))} is free. Free some space and rerun the same command: it keeps "
                f"the {len(self.shards) - len(pending)} shards written and resumes. Or set OUTPUT_DIR to a disk with room."
            ) from None

    def finish(self, completed_at: str, extracted_by_ranks: int) -> None:
        """Mark the store complete, recording when and by how many processes it was extracted."""
        missing = self.pending_shards()
        if missing:
            raise RuntimeError(f"cannot finish {self.folder}: {len(missing)} shards are missing")
        self.manifest = replace(self.manifest, status="complete", completed_at=completed_at, extracted_by_ranks=extracted_by_ranks)
        with self._write_errors_stop_with_their_fix():
            self.manifest.write(self.folder / MANIFEST)


class ActivationStore:
    """Read-only, memory-mapped view of a complete store. Nothing loads the whole store into RAM.

    It opens only when its manifest says complete and every file matches the manifest; else it names the fix (wait for
    the extraction writing it, resume, rewrite a shard). Readers take no lock: a writer never changes a file in place
    (it writes a new one and renames it over), so a store once open reads as it was when opened, even while a rerun
    with --overwrite replaces it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self._open()
        except StoreError:
            # Half a store, or none, while an extraction writes it is no damage: say to wait, not to rerun it.
            if is_being_written(self.folder):
                raise StoreError(
                    f"an extraction is writing the store at {self.folder} now (it holds {writing_lock_path(self.folder)}). "
                    "Wait for it to finish, then rerun."
                ) from None
            raise

    def _open(self) -> None:
        """Read the manifest and check it, the offsets and every shard against each other: a store that opens is whole."""
        manifest = StoreManifest.read(self.folder / MANIFEST)
        if manifest is None:
            raise StoreError(f"no activation store at {self.folder} (no {MANIFEST}). Run extract_activations.py first.")
        self.manifest = manifest
        if manifest.format_version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"{self.folder} has store format {manifest.format_version}, this fastsae reads {STORE_FORMAT_VERSION}. Re-extract it."
            )
        if not manifest.is_complete:
            raise StoreError(
                f"the store at {self.folder} is incomplete (an interrupted extraction). Rerun extract_activations.py with the same settings to resume it."
            )
        if manifest.dtype not in STORAGE_DTYPES:
            raise StoreError(
                f"{self.folder / MANIFEST} names the dtype {manifest.dtype!r}, not one of {', '.join(STORAGE_DTYPES)}. {REEXTRACT}"
            )
        self.shards = list(manifest.shards)
        self.dtype = STORAGE_DTYPES[manifest.dtype]
        self.d = int(manifest.d)
        self.doc_offsets = load_store_array(self.folder / DOC_OFFSETS, REEXTRACT)
        try:  # mapped now, read when asked: the records of the store that opened, even after --overwrite replaced it
            self._examples = np.memmap(self.folder / EXAMPLES, dtype=np.uint8, mode="r")
        except NPY_LOAD_ERRORS as error:  # ValueError: an empty file, which cannot be mapped
            raise StoreError(f"{self.folder / EXAMPLES} is damaged or missing ({error}). {REEXTRACT}") from None
        self._shard_starts = np.array([shard.first_token for shard in self.shards] + [self.n_tokens], dtype=np.int64)
        self._verify_tiling()
        self._arrays = [open_shard(self.folder, shard, self.d, self.dtype) for shard in self.shards]

    def _verify_tiling(self) -> None:
        """Check the example offsets and the manifest's shard list against its counts: the shards tile the store, each
        starting at an example's first token. (Each shard's files are checked against its plan by `open_shard`.)"""
        offsets = self.doc_offsets
        if (
            offsets.ndim != 1
            or len(offsets) != self.n_examples + 1
            or offsets[0] != 0
            or offsets[-1] != self.n_tokens
            or (np.diff(offsets) < 0).any()
        ):
            raise StoreError(f"{self.folder / DOC_OFFSETS} does not match the manifest's counts. {REEXTRACT}")
        first_example = first_token = 0
        for shard in self.shards:  # each shard starts where the one before ended, at an example's first token
            starts = (shard.first_example, shard.first_token)
            if starts != (first_example, first_token) or first_example >= self.n_examples or offsets[first_example] != first_token:
                raise StoreError(f"the shard list in {self.folder / MANIFEST} does not match the store at {shard.name}. {REEXTRACT}")
            first_example, first_token = first_example + shard.n_examples, first_token + shard.n_tokens
        if (first_example, first_token) != (self.n_examples, self.n_tokens):
            raise StoreError(
                f"the shards in {self.folder / MANIFEST} hold {first_token} tokens of {first_example} examples, not the "
                f"{self.n_tokens} of {self.n_examples} it counts. {REEXTRACT}"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.manifest.n_tokens)

    @property
    def n_examples(self) -> int:
        return int(self.manifest.n_examples)

    @property
    def hook_name(self) -> str:
        return self.manifest.hook_name

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the store's {self.n_tokens} tokens")
        shard_index = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pieces = []
        position = start
        while position < stop:
            shard_start = int(self._shard_starts[shard_index])
            shard_stop = int(self._shard_starts[shard_index + 1])
            take_stop = min(stop, shard_stop)
            pieces.append(self._arrays[shard_index][name][position - shard_start : take_stop - shard_start])
            position = take_stop
            shard_index += 1
        if not pieces:
            return np.array(self._arrays[0][name][:0])
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def activations(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as an (n, d) tensor in the storage dtype."""
        return from_storage_array(self._read("activations", start, stop), self.dtype)

    def gather(self, rows: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
        """The activations of store rows `rows` (ascending) as an (n, d) tensor in the storage dtype.

        One copy, from the memory map straight into the result (pinned, for an asynchronous copy to a
        GPU, when asked); numpy's `take` releases the GIL, so several threads can read at once.
        """
        result = torch.empty((len(rows), self.d), dtype=self.dtype, pin_memory=pin_memory)
        target = to_storage_array(result)  # a numpy view of the tensor's memory
        shard_of_row = np.searchsorted(self._shard_starts, rows, side="right") - 1
        for shard_index in np.unique(shard_of_row):
            members = np.flatnonzero(shard_of_row == shard_index)
            local_rows = rows[members] - self._shard_starts[shard_index]
            np.take(self._arrays[shard_index]["activations"], local_rows, axis=0, out=target[members[0] : members[-1] + 1])
        return result

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        return self._read("token_ids", start, stop)

    def special_mask(self, start: int, stop: int) -> np.ndarray:
        return self._read("special_mask", start, stop)

    def chunk(self, start: int, stop: int) -> StoreChunk:
        return StoreChunk(start, self.activations(start, stop), self.token_ids(start, stop), self.special_mask(start, stop))

    def example(self, index: int) -> StoreChunk:
        """All tokens of example `index` (its activations, token ids and special mask)."""
        if not 0 <= index < self.n_examples:
            raise IndexError(f"example {index} is outside the store's {self.n_examples} examples")
        return self.chunk(int(self.doc_offsets[index]), int(self.doc_offsets[index + 1]))

    def example_groups(self, examples: Iterable[int], max_tokens: int) -> list[list[int]]:
        """Consecutive runs of `examples` of at most `max_tokens` tokens (at least one example each): read and encoded
        a run at a time, not an example at a time."""
        groups: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index in examples:
            length = int(self.doc_offsets[index + 1] - self.doc_offsets[index])
            if current and tokens + length > max_tokens:
                groups.append(current)
                current, tokens = [], 0
            current.append(int(index))
            tokens += length
        return groups + [current] if current else groups

    def iter_chunks(self, chunk_tokens: int, start: int = 0, stop: int | None = None) -> Iterator[StoreChunk]:
        """Consecutive chunks of at most `chunk_tokens` tokens, in store order."""
        stop = self.n_tokens if stop is None else stop
        for chunk_start in range(start, stop, chunk_tokens):
            yield self.chunk(chunk_start, min(chunk_start + chunk_tokens, stop))

    def example_records(self) -> list[dict[str, Any]]:
        """Per example: where it came from in the dataset, and its label if the dataset had one."""
        path = self.folder / EXAMPLES
        try:
            records = [json.loads(line) for line in self._examples.tobytes().splitlines()]
        except ValueError as error:
            raise StoreError(f"{path} is damaged ({error}). {REEXTRACT}") from None
        if len(records) != self.n_examples:  # cut short at a line's end: the labels of the last examples would be missing
            raise StoreError(f"{path} holds {len(records)} examples, the store {self.n_examples}: it is damaged. {REEXTRACT}")
        return records

    def block_rows(self) -> list[list[int]] | None:
        """Per block of a block store, the dataset rows (texts) it holds tokens of, as extraction recorded them; None for a
        FAST store, whose every example is one text. The train/validation split keeps each text on one side with them."""
        if self.manifest.packing != "block":
            return None
        records = self.example_records()
        if not all(record.get("rows") for record in records):
            raise StoreError(f"{self.folder / EXAMPLES} does not name the dataset rows of every block. {REEXTRACT}")
        return [record["rows"] for record in records]

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.folder)!r}: {self.n_examples} examples, {self.n_tokens} tokens, d={self.d}, {self.manifest.dtype})"
        )
