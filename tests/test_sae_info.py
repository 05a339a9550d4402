"""The typed checkpoint record (SAEInfo): its round trip, foreign checkpoints, and that no module reads an artifact by key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastsae
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import hypothesaes_config, load_sae, raw_space_state, save_checkpoint
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.sae_info import HYPOTHESAES_FORMAT, SAEInfo
from fastsae.core.trained_sae import open_trained_sae
from fastsae.store.activation_store import ActivationStore
from fastsae.store.manifest import StoreManifest

# The modules that define the artifacts' formats; every other module uses their attributes.
ARTIFACT_MODULES = {"manifest.py", "sae_info.py", "checkpoint.py"}
READ_BY_KEY = re.compile(
    r"""manifest\s*\[|manifest\.get\("""
    r"""|(?<!field\.)metadata\s*\[|(?<!field\.)metadata\.get\("""
    r"""|\[["'](?:fastsae|store_manifest|training)["']\]|\.get\(["'](?:fastsae|store_manifest|training)["']"""
)


def tiny_sae(architecture: str = "topk") -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec(architecture, d=8, m=16, k=4, prefixes=(4, 16)))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
    return sae


def test_round_trip_of_every_field_through_a_checkpoint(tiny_store, tmp_path):
    manifest = ActivationStore(tiny_store).manifest
    info = SAEInfo(
        spec=SAESpec("topk", d=8, m=16, k=4, prefixes=(4, 16), aux_k=2),
        activation_scale=0.25,
        model="tiny",
        model_name="org/tiny",
        model_source="hub",
        hook_name="blocks.2.hook_resid_post",
        hook_point="resid_post",
        layer=2,
        store=str(tiny_store),
        store_manifest=StoreManifest.from_dict(manifest.checkpoint_copy()),
        training={"include_special_tokens": True, "validation_fraction": 0.2, "seed": 7, "learning_rate": 1e-3},
        step=12,
        tokens_trained=3072,
    )
    path = save_checkpoint(tmp_path / "sae.pt", tiny_sae(), 100, info)
    loaded = load_sae(path).info
    assert loaded == info
    assert loaded.trained_with_special_tokens and loaded.validation_fraction == 0.2 and loaded.seed == 7
    assert loaded.hub_model_id == "org/tiny" and loaded.activation_dtype == manifest.dtype
    assert SAEInfo.from_dict(loaded.to_dict()) == loaded


def test_an_old_or_sparse_record_reads_with_the_training_defaults():
    info = SAEInfo.from_dict({"spec": {"architecture": "relu", "d": 4, "m": 8, "k": 0, "prefixes": []}, "added_later": 1})
    assert info.spec == SAESpec("relu", 4, 8, 0)
    assert not info.trained_with_special_tokens and info.validation_fraction == 0.1 and info.seed == 0
    assert info.store_manifest == StoreManifest() and info.extraction == {} and info.hook_point is None


def test_a_hypothesaes_checkpoint_gives_its_shape_and_asks_for_its_origin(tmp_path):
    sae = tiny_sae("batchtopk")
    path = tmp_path / "SAE_M=16_K=4.pt"
    torch.save({"config": hypothesaes_config(sae.spec, 100), "state_dict": raw_space_state(sae, 1.0)}, path)
    trained = open_trained_sae(path)
    assert trained.info.source_format == HYPOTHESAES_FORMAT and trained.info.spec == sae.spec
    assert trained.info.model_name is None and trained.info.hook_point is None
    with pytest.raises(UserError, match="Pass --store"):
        trained.open_store()
    with pytest.raises(UserError, match="Pass --model-name"):
        trained.model_name()
    assert trained.model_name("org/named") == "org/named"


def test_a_store_of_another_width_is_refused(tiny_store, tmp_path):
    info = SAEInfo(spec=SAESpec("topk", d=8, m=16, k=4), store=str(tiny_store))
    path = save_checkpoint(tmp_path / "sae.pt", tiny_sae(), 100, info)
    with pytest.raises(UserError, match="d=8 but the store"):
        open_trained_sae(path).open_store()


def test_no_module_but_the_artifacts_own_reads_them_by_key():
    package = Path(fastsae.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name not in ARTIFACT_MODULES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if READ_BY_KEY.search(line)
    ]
    assert not offenders, "read the manifest and the SAE's record through StoreManifest's and SAEInfo's attributes:\n" + "\n".join(
        offenders
    )


def test_the_key_pattern_catches_what_it_should():
    for line in (
        'manifest["d"]',
        'manifest.get("d")',
        'metadata["store"]',
        'loaded.metadata.get("training", {})',
        'payload["fastsae"]',
        'record.get("store_manifest", {})',
        'settings["training"]',
    ):
        assert READ_BY_KEY.search(line), line
    for line in ('field.metadata.get("help", "")', "info.store_manifest.extraction", "info.training.items()"):
        assert not READ_BY_KEY.search(line), line
