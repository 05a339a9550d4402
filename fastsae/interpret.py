"""Step 3: explain the features — statistics, top contexts, labels, logit lens and LLM explanations.

Everything but the explanations needs no LLM. With an API key, each chosen feature is scored by
SCORING (see fastsae/explanations.py): detection (one request for its explanation, one for its
detection score), the FAST paper's rubric (one request for a 1-5 rating and a name), or both; with
no key, those columns stay empty and the run says why. dashboard.html is written beside the CSV.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastsae.checkpoint import load_sae
from fastsae.config import setting
from fastsae.dashboard import dashboard_data, write_dashboard
from fastsae.devices import resolve_device
from fastsae.errors import UserError
from fastsae.evaluate import DEFAULT_CHECKPOINT
from fastsae.explanations import (
    RubricSummary,
    balanced_accuracy,
    explanation_messages,
    parse_labels,
    parse_rubric,
    rubric_messages,
    rubric_summary,
    scoring_messages,
)
from fastsae.features import (
    FeatureStatistics,
    TokenContext,
    collect_feature_statistics,
    contexts_at,
    label_association,
    logit_lens,
    non_activating_contexts,
    top_contexts,
)
from fastsae.llm import API_KEY_VARIABLES, CachedChatClient, api_key
from fastsae.lora import LORA_HOOK_POINT
from fastsae.models import cache_dir, load_model, load_tokenizer, resolve_model
from fastsae.store import ActivationStore

logger = logging.getLogger(__name__)

# LLM requests per feature for each SCORING: detection explains, then scores; the rubric is one request.
REQUESTS_PER_FEATURE = {"detection": 2, "fast-rubric": 1, "both": 3}


@dataclass
class InterpretConfig:
    checkpoint: str = setting(DEFAULT_CHECKPOINT, "SAE checkpoint (ours, or HypotheSAEs' with --store and --model-name)")
    store: str = setting("", "activation store; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model whose tokenizer and unembedding to use; empty: the store's model")
    features: str = setting("frequency:100", "which features: all, frequency:N (most frequent), label:N (highest label AUROC), random:N (a seeded sample of the live ones), or a list like 3,17,42")
    top_contexts: int = setting(5, "top-activating contexts per feature in the CSV")
    context_window: int = setting(12, "tokens shown on each side of the firing token")
    logit_lens_tokens: int = setting(8, "tokens listed as most promoted / suppressed by each feature's decoder direction")
    interpretations_path: str = setting("interpretations.csv", "where the CSV goes")
    explain: bool = setting(True, "ask an LLM (OpenAI-compatible API; key from OPENAI_API_KEY) to explain and score each feature")
    scoring: str = setting(
        "both",
        "detection (explain, then label held-out excerpts: balanced accuracy), fast-rubric (the FAST paper's 1-5 rating of the "
        "top contexts, and a name), or both",
    )
    explanation_model: str = setting("gpt-4.1", "chat model for explanations and scoring")
    explain_contexts: int = setting(10, "top-activating contexts shown to the LLM to explain a feature")
    score_contexts: int = setting(5, "held-out activating contexts, sampled across the activation range (and as many non-activating), to score on")
    rubric_contexts: int = setting(5, "top-activating contexts the LLM rates with the FAST rubric (the paper shows 5)")
    llm_concurrency: int = setting(4, "requests in flight at once")
    llm_cache_dir: str = setting("", "where LLM answers are cached; empty: <FASTSAE_CACHE>/llm")
    seed: int = setting(0, "seed for sampling non-activating contexts and shuffling the scoring excerpts")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.scoring not in REQUESTS_PER_FEATURE:
            raise UserError(f"SCORING {self.scoring!r} is not one of {', '.join(REQUESTS_PER_FEATURE)}.")

    @property
    def detection(self) -> bool:
        return self.scoring in ("detection", "both")

    @property
    def rubric(self) -> bool:
        return self.scoring in ("fast-rubric", "both")


INTERPRETATION_COLUMNS = {"feature", "frequency", "top_tokens", "top_label", "top_label_auroc", "explanation", "score"}


def read_interpretations(path: str, m: int) -> pd.DataFrame | None:
    """interpret_sae.py's CSV, checked to describe an SAE of `m` features; None (and a log line) when there is none."""
    if not path or not Path(path).is_file():
        logger.info("No interpretations file at %r: features go without explanations (interpret_sae.py writes them).", path)
        return None
    table = pd.read_csv(path)
    missing = INTERPRETATION_COLUMNS - set(table.columns)
    if missing:
        raise UserError(f"{path} lacks the columns {sorted(missing)}: it is not an interpretations.csv from interpret_sae.py. Pass --interpretations with one.")
    out_of_range = table["feature"][(table["feature"] < 0) | (table["feature"] >= m)]
    if len(out_of_range):
        raise UserError(
            f"{path} describes feature {int(out_of_range.iloc[0])}, but this SAE has features 0..{m - 1}: the file belongs to another SAE. "
            "Pass the --interpretations written for this checkpoint (interpret_sae.py's INTERPRETATIONS_PATH), or --interpretations ''."
        )
    return table


def select_features(spec: str, statistics: FeatureStatistics, labels: pd.DataFrame, seed: int = 0) -> list[int]:
    """Parse FEATURES: all, frequency:N, label:N, random:N (seeded by SEED), or an explicit comma-separated list."""
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
        if spec.startswith("random:"):  # an unbiased sample, as the FAST paper rates: the most frequent features are not typical
            count = int(spec.split(":", 1)[1])
            return sorted(int(f) for f in np.random.default_rng(seed).permutation(alive)[:count])
        chosen = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"FEATURES {spec!r} is not understood: use all, frequency:N, label:N, random:N or a list like 3,17,42.") from None
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
    statistics: FeatureStatistics,
    labels: pd.DataFrame,
    contexts_by_feature: dict[int, list[TokenContext]],
    promoted: np.ndarray | None,
    suppressed: np.ndarray | None,
    tokenizer,
    config: InterpretConfig,
) -> list[dict[str, Any]]:
    """One CSV row per feature; the logit-lens columns stay empty where the logit lens does not apply (`promoted` is None)."""

    def decoded(token_ids: np.ndarray | None, row_index: int) -> str:
        return "" if token_ids is None else " | ".join(tokenizer.decode([int(t)]) for t in token_ids[row_index])

    rows = []
    for row_index, (feature, all_contexts) in enumerate(contexts_by_feature.items()):
        contexts = all_contexts[: config.top_contexts]
        firing_tokens = list(dict.fromkeys(context.tokens[context.focus] for context in contexts))
        rows.append(
            {
                "feature": feature,
                "frequency": float(statistics.frequency[feature]),
                "mean_activation": float(statistics.mean_activation[feature]),
                "max_activation": float(statistics.max_activation[feature]),
                "top_tokens": " | ".join(firing_tokens),
                "logit_lens_promoted": decoded(promoted, row_index),
                "logit_lens_suppressed": decoded(suppressed, row_index),
                "top_label": labels.loc[feature, "top_label"],
                "top_label_auroc": float(labels.loc[feature, "top_label_auroc"]),
                "explanation": "",
                "score": np.nan,
                "fast_rubric_rating": None,
                "fast_rubric_name": "",
                "top_contexts": "\n".join(f"[{context.activation:.2f}] {context.marked_text()}" for context in contexts),
            }
        )
    return rows


def explain_features(
    rows: list[dict[str, Any]],
    contexts_by_feature: dict[int, list[TokenContext]],
    store: ActivationStore,
    sae,
    statistics: FeatureStatistics,
    tokenizer,
    config: InterpretConfig,
) -> RubricSummary | None:
    """Fill each row's LLM columns for SCORING; returns the rubric's rating distribution when it ran.

    Detection: one explaining request per feature, then one scoring request. Rubric: one request per
    feature, independent of the explanation, so it goes out with the explaining round.
    """
    client = CachedChatClient(config.explanation_model, Path(config.llm_cache_dir or cache_dir() / "llm"), config.llm_concurrency)
    explain_requests, scoring_sets = [], []
    for feature in list(contexts_by_feature) if config.detection else []:
        shown = contexts_by_feature[feature][: config.explain_contexts]
        # Held out for scoring: activations spread over the feature's range (weak ones too), never the ones shown.
        shown_tokens = {int(store.doc_offsets[context.example]) + context.position for context in shown}
        sampled = statistics.samples_across_quantiles(feature, config.score_contexts, shown_tokens)
        held_out = contexts_at(store, sae, feature, tokenizer, sampled, config.context_window)
        silent = non_activating_contexts(store, statistics, feature, tokenizer, config.context_window, config.explain_contexts // 2 + len(held_out), config.seed)
        explain_requests.append(explanation_messages(shown, silent[: config.explain_contexts // 2]))
        excerpts = [("".join(context.tokens), 1) for context in held_out] + [(text, 0) for text in silent[config.explain_contexts // 2 :]]
        order = np.random.default_rng([config.seed, feature]).permutation(len(excerpts))
        scoring_sets.append([excerpts[index] for index in order])
    # A feature that never fired has no contexts to rate: it is not asked (nor counted as unreadable).
    rubric_rows = [row for row in rows if contexts_by_feature[row["feature"]]] if config.rubric else []
    rubric_requests = [rubric_messages(contexts_by_feature[row["feature"]][: config.rubric_contexts]) for row in rubric_rows]
    first_round = explain_requests + rubric_requests
    cached = sum(client.cached(messages, 300) is not None for messages in first_round)

    def characters(requests: list) -> int:
        return sum(len(message["content"]) for messages in requests for message in messages)

    logger.info(  # a scoring prompt is about as long as its explaining one; ~4 characters a token
        "LLM: %d explaining + %d scoring + %d FAST-rubric requests to %s (about %d prompt tokens; %d explaining/rubric answers already cached)",
        len(explain_requests), len(scoring_sets), len(rubric_requests), config.explanation_model,
        (2 * characters(explain_requests) + characters(rubric_requests)) // 4, cached,
    )
    answers = client.complete_all(first_round)
    explanations = [answer.strip().strip('"') for answer in answers[: len(explain_requests)]]
    if config.detection:
        scoring_requests = [scoring_messages(explanation, [text for text, _ in excerpts]) for explanation, excerpts in zip(explanations, scoring_sets)]
        for row, explanation, excerpts, answer in zip(rows, explanations, scoring_sets, client.complete_all(scoring_requests)):
            row["explanation"] = explanation
            labels = parse_labels(answer, len(excerpts))
            truth = [is_activating for _, is_activating in excerpts]
            row["score"] = balanced_accuracy(labels, truth) if labels is not None and 1 in truth else np.nan
    summary = None
    if config.rubric:
        for row, answer in zip(rubric_rows, answers[len(explain_requests) :]):
            row["fast_rubric_rating"], row["fast_rubric_name"] = parse_rubric(answer)
            if row["fast_rubric_rating"] is None:  # counted as missing in the summary, never guessed
                logger.warning("FAST rubric: no 1-5 rating in the answer for feature %d, left empty: %r", row["feature"], answer[:200])
        summary = rubric_summary(row["fast_rubric_rating"] for row in rubric_rows)
        logger.info("FAST rubric: %s", summary.describe())
    logger.info("LLM: %d requests sent, the rest served from the cache", client.requests_sent)
    return summary


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
    if store.manifest.get("hook_point") == LORA_HOOK_POINT:
        # Decoder directions live in the adapter's concatenated bottleneck space (d is not the hidden size), not the residual stream.
        logger.info("Logit lens skipped: this is a LoRA-bottleneck store, whose directions do not meet the unembedding; its columns stay empty.")
        unembedding = None
    else:
        unembedding = _unembedding(load_model(source, torch.float32, "cpu")).to(device)
    sae = loaded.sae.to(device)
    include_special = bool(loaded.metadata.get("training", {}).get("include_special_tokens", False))
    contexts_needed = max(config.top_contexts, config.explain_contexts, config.rubric_contexts)
    with tempfile.TemporaryDirectory(prefix="fastsae-interpret-") as scratch:  # example-level maxima live on disk
        statistics = collect_feature_statistics(
            store, sae, top_n=contexts_needed, include_special=include_special, example_max_file=Path(scratch) / "example_max.npy"
        )
        return _interpret_with(statistics, store, sae, tokenizer, unembedding, config)


def _interpret_with(statistics: FeatureStatistics, store: ActivationStore, sae, tokenizer, unembedding: torch.Tensor | None, config: InterpretConfig) -> Path:
    """Everything after the pass over the store: labels, chosen features, contexts, logit lens, LLM, CSV and dashboard."""
    labels = label_association(statistics.example_max, [record.get("label") for record in store.example_records()])
    features = select_features(config.features, statistics, labels, config.seed)
    contexts_by_feature = {f: top_contexts(store, sae, statistics, f, tokenizer, config.context_window, statistics.top_values.shape[1]) for f in features}
    promoted, suppressed = logit_lens(sae.W_dec.detach()[features], unembedding, k=config.logit_lens_tokens) if unembedding is not None else (None, None)
    rows = interpretation_rows(statistics, labels, contexts_by_feature, promoted, suppressed, tokenizer, config)
    rubric = None
    if not config.explain:
        logger.info("EXPLAIN is off: the explanation, score and FAST-rubric columns are left empty.")
    elif api_key() is None:
        logger.warning("No API key (%s): the explanation, score and FAST-rubric columns are left empty.", " / ".join(API_KEY_VARIABLES))
    else:
        rubric = explain_features(rows, contexts_by_feature, store, sae, statistics, tokenizer, config)
    path = Path(config.interpretations_path)
    partial = path.with_name(path.name + ".partial")
    pd.DataFrame(rows).astype({"fast_rubric_rating": "Int64"} if rows else {}).to_csv(partial, index=False)  # whole numbers; empty where missing
    partial.replace(path)
    title = f"{sae.spec.name} on {store.manifest['model']} {store.hook_name}"
    dashboard = write_dashboard(path.with_name("dashboard.html"), dashboard_data(title, rows, contexts_by_feature, statistics, rubric))
    logger.info("Wrote %d features to %s and %s", len(rows), path, dashboard)
    return path
