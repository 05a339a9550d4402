"""The activation store's `manifest.json` as a typed, versioned record.

Every module reads a store's manifest (and a checkpoint's copy of it) through `StoreManifest`,
so the field names and the defaults for what an older manifest lacks live here, in one place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastsae.common.atomic_files import write_text_atomically
from fastsae.common.errors import UserError

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # its file name in the store folder
CHECKPOINT_FIELDS = ("model", "hook_name", "d", "dtype", "n_tokens", "n_examples", "packing", "dataset", "extraction")


def _known_fields(record_type: type, record: dict[str, Any]) -> dict[str, Any]:
    known = {item.name for item in dataclasses.fields(record_type)}
    return {key: value for key, value in record.items() if key in known}


@dataclass(frozen=True)
class ShardPlan:
    """Which examples and tokens one shard holds."""

    name: str
    first_example: int
    n_examples: int
    first_token: int
    n_tokens: int


@dataclass(frozen=True)
class DatasetRecord:
    """Where the store's texts came from and what loading them skipped or truncated (None: not recorded)."""

    path: str | None = None
    fingerprint: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    n_rows: int | None = None
    n_examples: int | None = None
    n_skipped: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    n_truncated: int | None = None
    n_unlocated_messages: int | None = None  # chat messages the template hid or rewrote: their tokens are marked special


@dataclass(frozen=True)
class StoreManifest:
    """What, how and how much one store holds.

    Every field has a default, which is what a manifest written by an earlier version (or a
    checkpoint's partial copy, see `checkpoint_copy`) reads as when it lacks that field.
    `extraction` stays the ExtractConfig's `asdict`, and `settings` the dict whose equality
    decides whether a rerun resumes the store; `lora` is the adapter's description (LoRA stores only).
    """

    format_version: int = STORE_FORMAT_VERSION
    status: str = "in_progress"  # "complete" once every shard is on disk
    model: str | None = None  # the model's slug, as in the store's folder name
    model_name: str | None = None
    model_source: str | None = None  # embedded, gguf, folder or hub: whether model_name is a Hub id
    revision: str | None = None  # a Hub model's commit
    model_files_fingerprint: str | None = None  # a local folder's or GGUF file's (fastsae.lm.models.model_files_fingerprint)
    hook_name: str | None = None
    hook_point: str | None = None
    layer: int | None = None  # None for a LoRA store, which spans every adapted layer
    lora: dict[str, Any] | None = None
    d: int | None = None
    dtype: str | None = None
    packing: str | None = None
    dataset: DatasetRecord = field(default_factory=DatasetRecord)
    extraction: dict[str, Any] = field(default_factory=dict)
    n_special_tokens: int | None = None
    n_examples: int | None = None
    n_tokens: int | None = None
    shards: tuple[ShardPlan, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    completed_at: str | None = None
    extracted_by_ranks: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StoreManifest:
        """Missing fields take their defaults; fields this version does not know are dropped."""
        values = _known_fields(cls, record)
        values["dataset"] = DatasetRecord(**_known_fields(DatasetRecord, values.get("dataset") or {}))
        values["shards"] = tuple(ShardPlan(**shard) for shard in values.get("shards", ()))
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> StoreManifest:
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: Path) -> StoreManifest | None:
        """The manifest at `path`, or None where there is none yet.

        A file cut short or edited by hand, or one from a newer fastsae (whose fields this one would misread), is refused
        with the fix, not a JSON or TypeError traceback.
        """
        if not path.exists():
            return None
        fix = "Re-extract the store with --overwrite, or restore the file from a copy."
        try:
            record = json.loads(path.read_text())
        except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UserError(f"{path} is damaged ({error}). {fix}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} is not a store manifest (it holds a JSON {type(record).__name__}). {fix}")
        version = record.get("format_version")
        if isinstance(version, int) and version > STORE_FORMAT_VERSION:
            raise UserError(
                f"{path} was written by a newer fastsae (store format {version!r}; this one reads {STORE_FORMAT_VERSION}). "
                "Update fastsae, or re-extract the store with --overwrite."
            )
        try:
            return cls.from_dict(record)
        except (TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{path} does not hold the fields of a store manifest ({error}). {fix}") from None

    def write(self, path: Path) -> None:
        """Atomically, so a crash never leaves half a manifest."""
        write_text_atomically(path, self.to_json())

    def checkpoint_copy(self) -> dict[str, Any]:
        """The part a checkpoint embeds (its `store_manifest`): what was stored, without shards or settings."""
        record = self.to_dict()
        return {key: record[key] for key in CHECKPOINT_FIELDS}

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"
