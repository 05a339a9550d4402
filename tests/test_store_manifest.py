"""The typed store manifest: its JSON round trip and old manifests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastsae.common.errors import UserError
from fastsae.store.activation_store import ActivationStore, ActivationStoreWriter
from fastsae.store.manifest import STORE_FORMAT_VERSION, DatasetRecord, ShardPlan, StoreManifest


def test_round_trip_through_json_is_exact(tiny_store):
    manifest = ActivationStore(tiny_store).manifest
    assert StoreManifest.from_json(manifest.to_json()) == manifest
    assert StoreManifest.from_json((tiny_store / "manifest.json").read_text()) == manifest


def test_round_trip_of_every_field():
    manifest = StoreManifest(
        status="complete",
        model="tiny",
        model_name="org/tiny",
        model_source="hub",
        revision="abc",
        model_files_fingerprint="0123456789abcdef",
        hook_name="lora.v_proj",
        hook_point="lora",
        layer=None,
        lora={"r": 2, "modules": ["v_proj"]},
        d=4,
        dtype="bfloat16",
        packing="sequential",
        dataset=DatasetRecord("data.jsonl", "f00d", "text", "label", 5, 4, 1, {"empty text": 1}, 2),
        extraction={"max_length": 16, "layers": [1]},
        n_special_tokens=3,
        n_examples=4,
        n_tokens=10,
        shards=(ShardPlan("shard_00000", 0, 4, 0, 10),),
        settings={"model": "tiny"},
        completed_at="2026-01-01T00:00:00+0000",
        extracted_by_ranks=2,
    )
    assert StoreManifest.from_json(manifest.to_json()) == manifest


def test_an_old_manifest_without_later_fields_loads_with_defaults(tiny_store):
    record = json.loads((tiny_store / "manifest.json").read_text())
    for later in ("model_source", "revision", "model_files_fingerprint", "n_special_tokens", "completed_at", "extracted_by_ranks", "lora"):
        record.pop(later, None)
    del record["dataset"]["n_truncated"]
    record["added_by_a_newer_version"] = True
    manifest = StoreManifest.from_dict(record)
    assert manifest.format_version == 1 and manifest.is_complete
    assert manifest.model_source is None and manifest.extracted_by_ranks is None and manifest.dataset.n_truncated is None
    assert manifest.shards == ActivationStore(tiny_store).manifest.shards


def test_a_damaged_or_newer_manifest_is_refused_with_its_fix_and_replaced_by_overwrite(tiny_store, tmp_path):
    """A manifest cut short, or one from a newer format whose shards carry a field this version lacks, raised a JSON or
    TypeError traceback (and the newer one, had it loaded, would be read by this version's rules)."""
    record = json.loads((tiny_store / "manifest.json").read_text())
    newer = {**record, "format_version": STORE_FORMAT_VERSION + 1, "shards": [{**shard, "checksum": "f00d"} for shard in record["shards"]]}
    cases = {
        "cut short": ((tiny_store / "manifest.json").read_text()[:500], r"manifest\.json is damaged.*--overwrite, or restore"),
        "not an object": ("[]", r"manifest\.json is not a store manifest \(it holds a JSON list\)"),
        "newer": (json.dumps(newer), rf"written by a newer fastsae \(store format {STORE_FORMAT_VERSION + 1}; .*Update fastsae"),
    }
    for name, (text, message) in cases.items():
        folder = shutil.copytree(tiny_store, tmp_path / name)
        (folder / "manifest.json").write_text(text)
        with pytest.raises(UserError, match=message):
            ActivationStore(folder)
        header = dict(shards=[ShardPlan("shard_00000", 0, 1, 0, 2)], doc_offsets=np.array([0, 2]), example_records=[{"row": 0}])
        with pytest.raises(UserError, match=message):  # a rerun of the extraction into it
            ActivationStoreWriter(folder, {"model": "tiny"}, {"d": 4, "dtype": "float32"}, **header)
        ActivationStoreWriter(folder, {"model": "tiny"}, {"d": 4, "dtype": "float32"}, **header, overwrite=True)
        assert StoreManifest.read(folder / "manifest.json").format_version == STORE_FORMAT_VERSION
