"""What a checkpoint records about its SAE besides the weights, as one typed, versioned record.

A checkpoint's `fastsae` block is read and written only through `SAEInfo`, so its field names
and the defaults for what an older or foreign checkpoint lacks live here, in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from fastsae.core.sae import SAESpec
from fastsae.lm import hook_points
from fastsae.lm.models import hub_model_id
from fastsae.store.batches import DEFAULT_VALIDATION_FRACTION
from fastsae.store.manifest import StoreManifest

CHECKPOINT_FORMAT_VERSION = 1
FASTSAE_FORMAT = "fastsae"
HYPOTHESAES_FORMAT = "hypothesaes"
SAELENS_FORMAT = "saelens"
SPARSIFY_FORMAT = "sparsify"
DICTIONARY_LEARNING_FORMAT = "dictionary_learning"
# What each library's files say about where the SAE's activations came from, for the messages that ask for the rest.
SOURCE_RECORDS = {
    FASTSAE_FORMAT: "a fastsae checkpoint",
    HYPOTHESAES_FORMAT: "a HypotheSAEs checkpoint, which records only its shape",
    SAELENS_FORMAT: "a SAELens SAE",
    SPARSIFY_FORMAT: "a sparsify SAE, which records its model only in its run's config.json",
    DICTIONARY_LEARNING_FORMAT: "a dictionary_learning SAE",
}


def spec_to_dict(spec: SAESpec) -> dict[str, Any]:
    """The spec as plain JSON values (prefixes as a list)."""
    return {**asdict(spec), "prefixes": list(spec.prefixes)}


def spec_from_dict(record: dict[str, Any]) -> SAESpec:
    return SAESpec(**{**record, "prefixes": tuple(record.get("prefixes", ()))})


@dataclass(frozen=True)
class SAEInfo:
    """The SAE's shape, where its activations came from, and how it was trained.

    `source_format` is the provenance: `fastsae` for our checkpoints, `hypothesaes` for one that
    HypotheSAEs wrote (which records its shape only, so every origin field is None), `saelens`,
    `sparsify` or `dictionary_learning` for an SAE another library saved (fastsae/core/formats/):
    those fill the model, hook and layer when their files record them, and nothing of a store.
    `activation_scale` is the normalisation: training multiplied activations by it, and the saved
    weights have it folded in, so the SAE applies to raw activations.
    """

    spec: SAESpec
    source_format: str = FASTSAE_FORMAT
    format_version: int = CHECKPOINT_FORMAT_VERSION
    activation_scale: float = 1.0
    model: str | None = None  # the model's slug, as in the store's folder name
    model_name: str | None = None  # what loads it: a Hub id, a folder, a GGUF file or the embedded default
    model_source: str | None = None  # embedded, gguf, folder or hub: whether model_name is a Hub id
    hook_name: str | None = None  # SAELens-style name, e.g. blocks.12.hook_resid_post
    hook_point: str | None = None  # resid_post, mlp_out, attn_out or lora
    layer: int | None = None
    store: str | None = None  # the activation store it was trained on
    store_manifest: StoreManifest = field(default_factory=StoreManifest)  # the part of the store's manifest a checkpoint keeps
    training: dict[str, Any] = field(default_factory=dict)  # train_sae.py's settings, as recorded
    step: int | None = None
    tokens_trained: int | None = None
    training_finished: bool | None = None  # False: saved mid-run (Ctrl-C, CHECKPOINT_EVERY); None: not recorded

    @property
    def source_description(self) -> str:
        """What kind of file this came from, for messages that ask the user for what it does not record."""
        return SOURCE_RECORDS.get(self.source_format, self.source_format)

    @property
    def model_label(self) -> str | None:
        """The model's name for people: the loadable name, else the slug."""
        return self.model_name or self.model

    @property
    def hub_model_id(self) -> str | None:
        """Its model's Hugging Face Hub id; None for the embedded default, a GGUF file or a local folder."""
        return hub_model_id(self.model_name, self.model_source)

    @property
    def trained_by_fastsae(self) -> bool:
        """Whether fastsae trained it: only then are how it was trained (the FAST way, special tokens) known, not assumed."""
        return self.source_format == FASTSAE_FORMAT

    @property
    def trained_with_special_tokens(self) -> bool:
        """Whether training also saw special/template tokens; False when unrecorded, as train_sae.py's default is."""
        return bool(self.training.get("include_special_tokens", False))

    @property
    def validation_fraction(self) -> float:
        return float(self.training.get("validation_fraction", DEFAULT_VALIDATION_FRACTION))

    @property
    def seed(self) -> int:
        return int(self.training.get("seed", 0))

    @property
    def activation_dtype(self) -> str | None:
        """The dtype the store kept its activations in."""
        return self.store_manifest.dtype

    @property
    def extraction(self) -> dict[str, Any]:
        """The extraction settings that made its store (empty when unrecorded)."""
        return self.store_manifest.extraction

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's `fastsae` block: plain Python values only, as `torch.load(weights_only=True)` requires."""
        record = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return {**record, "spec": spec_to_dict(self.spec), "store_manifest": self.store_manifest.checkpoint_copy()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SAEInfo:
        """Missing fields take their defaults; fields this version does not know are dropped."""
        known = {item.name for item in dataclasses.fields(cls)}
        values = {key: value for key, value in record.items() if key in known}
        values["spec"] = spec_from_dict(record["spec"])
        values["store_manifest"] = StoreManifest.from_dict(record.get("store_manifest") or {})
        return cls(**values)

    @classmethod
    def foreign(
        cls,
        spec: SAESpec,
        source_format: str,
        model_name: str | None,
        hook_point: str | None,
        layer: int | None,
        model_source: str | None = None,
    ) -> SAEInfo:
        """An SAE another library saved: its shape and whatever of its origin its files record (None where they do not);
        `model_source` "hub" where `model_name` is known to be a Hub id."""
        name = hook_points.hook_name(layer, hook_point) if hook_point is not None and layer is not None else None
        return cls(
            spec=spec,
            source_format=source_format,
            model_name=model_name,
            model_source=model_source,
            hook_name=name,
            hook_point=hook_point,
            layer=layer,
        )

    @classmethod
    def from_hypothesaes_config(cls, config: dict[str, Any]) -> SAEInfo:
        """A HypotheSAEs checkpoint's `config` (its constructor's keys): the shape, and nothing of its origin."""
        spec = SAESpec(
            architecture="batchtopk" if config.get("use_batch_topk") else "topk",
            d=int(config["input_dim"]),
            m=int(config["m_total_neurons"]),
            k=int(config["k_active_neurons"]),
            prefixes=tuple(config.get("prefix_lengths") or ()),
            aux_k=int(config.get("aux_k") or 0),
        )
        return cls(spec=spec, source_format=HYPOTHESAES_FORMAT)
