"""The typed store manifest: its JSON round trip, old manifests, and that no module reads it by key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fastsae
from fastsae.store import ActivationStore
from fastsae.store_manifest import DatasetRecord, ShardPlan, StoreManifest

MANIFEST_MODULE = "store_manifest.py"
READ_BY_KEY = re.compile(r"""manifest\s*\[|manifest\.get\(|\[["']store_manifest["']\]\s*\[|\.get\(["']store_manifest["'][^)]*\)\s*[\[.]""")


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
    for later in ("model_source", "revision", "n_special_tokens", "completed_at", "extracted_by_ranks", "lora"):
        record.pop(later, None)
    del record["dataset"]["n_truncated"]
    record["added_by_a_newer_version"] = True
    manifest = StoreManifest.from_dict(record)
    assert manifest.format_version == 1 and manifest.is_complete
    assert manifest.model_source is None and manifest.extracted_by_ranks is None and manifest.dataset.n_truncated is None
    assert manifest.shards == ActivationStore(tiny_store).manifest.shards


def test_a_checkpoint_without_a_store_manifest_reads_as_defaults():
    assert StoreManifest.from_checkpoint({}) == StoreManifest()


def test_no_module_but_the_manifests_own_reads_it_by_key():
    package = Path(fastsae.__file__).parent
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != MANIFEST_MODULE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if READ_BY_KEY.search(line)
    ]
    assert not offenders, "read the manifest through StoreManifest's attributes:\n" + "\n".join(offenders)


def test_the_key_pattern_catches_what_it_should():
    for line in ('manifest["d"]', 'manifest.get("d")', 'metadata["store_manifest"]["d"]', 'metadata.get("store_manifest", {}).get("d")'):
        assert READ_BY_KEY.search(line), line
    assert not READ_BY_KEY.search("StoreManifest.from_checkpoint(metadata).extraction")
