"""Step 3: explain the features — statistics, top contexts, labels and logit lens into interpretations.csv.

This first version writes everything that needs no LLM. The explanation and score columns are
present and empty; LLM explanations (any OpenAI-compatible API), their scoring and the HTML
dashboard are the next slice of this step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastsae.checkpoint import load_sae
from fastsae.config import setting
from fastsae.devices import resolve_device
from fastsae.errors import UserError
from fastsae.evaluate import DEFAULT_CHECKPOINT
from fastsae.features import FeatureStatistics, collect_feature_statistics, label_association, logit_lens, top_contexts
from fastsae.models import load_model, load_tokenizer, resolve_model
from fastsae.store import ActivationStore

logger = logging.getLogger(__name__)


@dataclass
class InterpretConfig:
    checkpoint: str = setting(DEFAULT_CHECKPOINT, "SAE checkpoint (ours, or HypotheSAEs' with --store and --model-name)")
    store: str = setting("", "activation store; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model whose tokenizer and unembedding to use; empty: the store's model")
    features: str = setting("frequency:100", "which features: all, frequency:N (most frequent), label:N (highest label AUROC), or a list like 3,17,42")
    top_contexts: int = setting(5, "top-activating contexts per feature in the CSV")
    context_window: int = setting(12, "tokens shown on each side of the firing token")
    logit_lens_tokens: int = setting(8, "tokens listed as most promoted / suppressed by each feature's decoder direction")
    interpretations_path: str = setting("interpretations.csv", "where the CSV goes")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")


def select_features(spec: str, statistics: FeatureStatistics, labels: pd.DataFrame) -> list[int]:
    """Parse FEATURES: all, frequency:N, label:N, or an explicit comma-separated list."""
    m = len(statistics.frequency)
    alive = np.flatnonzero(statistics.frequency > 0)
    try:
        if spec == "all":
            return list(range(m))
        if spec.startswith("frequency:"):
            count = int(spec.split(":", 1)[1])
            return [int(f) for f in alive[np.argsort(-statistics.frequency[alive], kind="stable")][:count]]
        if spec.startswith("label:"):
            count = int(spec.split(":", 1)[1])
            scores = labels["top_label_auroc"].to_numpy(dtype=float)[alive]
            return [int(f) for f in alive[np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")][:count]]
        chosen = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"FEATURES {spec!r} is not understood: use all, frequency:N, label:N or a list like 3,17,42.") from None
    bad = [feature for feature in chosen if not 0 <= feature < m]
    if bad:
        raise UserError(f"feature {bad[0]} does not exist: this SAE has features 0..{m - 1}.")
    return chosen


def _unembedding(model: torch.nn.Module) -> torch.Tensor:
    """W_U, with the final norm's gain folded in when the model has one (what a direction meets before the LM head)."""
    weights = model.get_output_embeddings().weight.detach().float()
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    gain = getattr(final_norm, "weight", None)
    return weights * gain.detach().float() if gain is not None else weights


def interpretation_rows(
    store: ActivationStore, sae, statistics: FeatureStatistics, labels: pd.DataFrame, features: list[int], tokenizer, unembedding, config: InterpretConfig
) -> list[dict[str, Any]]:
    directions = sae.W_dec.detach()[features]
    promoted, suppressed = logit_lens(directions, unembedding, k=config.logit_lens_tokens)
    rows = []
    for row_index, feature in enumerate(features):
        contexts = top_contexts(store, sae, statistics, feature, tokenizer, config.context_window, config.top_contexts)
        firing_tokens = list(dict.fromkeys(context.tokens[context.focus] for context in contexts))
        rows.append(
            {
                "feature": feature,
                "frequency": float(statistics.frequency[feature]),
                "mean_activation": float(statistics.mean_activation[feature]),
                "max_activation": float(statistics.max_activation[feature]),
                "top_tokens": " | ".join(firing_tokens),
                "logit_lens_promoted": " | ".join(tokenizer.decode([int(t)]) for t in promoted[row_index]),
                "logit_lens_suppressed": " | ".join(tokenizer.decode([int(t)]) for t in suppressed[row_index]),
                "top_label": labels.loc[feature, "top_label"],
                "top_label_auroc": float(labels.loc[feature, "top_label_auroc"]),
                "explanation": "",
                "score": np.nan,
                "top_contexts": "\n".join(f"[{context.activation:.2f}] {context.marked_text()}" for context in contexts),
            }
        )
    return rows


def interpret_sae(config: InterpretConfig) -> Path:
    """Statistics over the whole store, then one CSV row per chosen feature."""
    loaded = load_sae(config.checkpoint)
    store_path = config.store or loaded.metadata.get("store")
    if not store_path:
        raise UserError(f"{config.checkpoint} does not say which activation store it was trained on. Pass --store.")
    store = ActivationStore(store_path)
    if store.d != loaded.sae.spec.d:
        raise UserError(f"the SAE takes d={loaded.sae.spec.d} but the store at {store.folder} has d={store.d}. Pass the matching --store.")
    model_name = config.model_name or store.manifest.get("model_name")
    if not model_name:
        raise UserError(f"the store at {store.folder} does not name its model. Pass --model-name (its tokenizer decodes the contexts).")
    device = resolve_device(config.device)
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    unembedding = _unembedding(load_model(source, torch.float32, "cpu"))
    sae = loaded.sae.to(device)
    include_special = bool(loaded.metadata.get("training", {}).get("include_special_tokens", False))
    statistics = collect_feature_statistics(store, sae, top_n=max(config.top_contexts, 20), include_special=include_special)
    labels = label_association(statistics.example_max, [record.get("label") for record in store.example_records()])
    features = select_features(config.features, statistics, labels)
    rows = interpretation_rows(store, sae, statistics, labels, features, tokenizer, unembedding.to(device), config)
    path = Path(config.interpretations_path)
    partial = path.with_name(path.name + ".partial")
    pd.DataFrame(rows).to_csv(partial, index=False)
    partial.replace(path)
    logger.info(
        "Wrote %d features to %s. The explanation and score columns are empty: LLM explanations are not part of this version yet.",
        len(rows), path,
    )
    return path
