"""Step 3: explain the features — statistics, top windows, labels, logit lens, LLM explanations and scores.

Everything but the explanations needs no LLM. A first pass over the store gives every feature's
statistics; a second, over the chosen features only, their activating windows (fastsae/interpret/windows.py).
With an API key, SCORING picks any of: detection and fuzzing (delphi's scores, fastsae/interpret/scorers.py:
one request for the explanation, then the held-out examples EXAMPLES_PER_PROMPT to a request) and
the FAST paper's rubric (one request for a 1-5 rating and a name). With no key those columns stay
empty and the run says why. dashboard.html is written beside the CSV (`dashboard_path`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastsae.common.atomic_files import scratch_folder, write_atomically
from fastsae.common.config import setting
from fastsae.common.default_paths import DEFAULT_CHECKPOINT, DEFAULT_INTERPRETATIONS
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.common.stage import Estimate, Output, PlanFacts, Stage, seconds_for
from fastsae.core.formats.sources import results_folder
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.trained_sae import open_trained_sae
from fastsae.evaluate.sparse_probing import SPARSE_PROBING_FILE, read_probe_choices
from fastsae.interpret.dashboard import dashboard_data, write_dashboard
from fastsae.interpret.explanations import (
    RubricSummary,
    explanation_messages,
    parse_explanation,
    parse_rubric,
    rubric_messages,
    rubric_summary,
)
from fastsae.interpret.features import FeatureStatistics, collect_feature_statistics, label_association, logit_lens, unembedding_matrix
from fastsae.interpret.llm import API_KEY_VARIABLES, CachedChatClient, Messages, api_key, base_url
from fastsae.interpret.sampling import sample_windows
from fastsae.interpret.scorers import (
    SCORERS,
    ClassifierResult,
    ScoringExample,
    balanced_accuracy,
    classifier_prompts,
    example_texts,
    score_answers,
    scoring_order,
)
from fastsae.interpret.windows import (
    FeatureWindows,
    Window,
    WindowGrid,
    collect_windows,
    non_activating_windows,
    read_windows,
    token_list,
)
from fastsae.lm.lora import LORA_HOOK_POINT
from fastsae.lm.models import cache_dir, load_model, load_tokenizer, resolve_model
from fastsae.store.activation_store import ActivationStore

logger = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.html"  # written beside interpretations.csv
SCORINGS = (*SCORERS, "fast-rubric")
OLD_SCORINGS = {"both": "detection,fast-rubric"}  # SCORING before fuzzing came: still read, with a note
ANSWER_TOKENS = 300  # the most an answer may take (explanations, verdict lists and ratings are far shorter)
EXPLANATION_TOKENS = 20  # about how long an explanation runs, for the cost estimate of the scoring prompts


@dataclass(frozen=True)
class FeatureChoice:
    """FEATURES, parsed: a rule (all, frequency, label, random) with its count, or an explicit list."""

    rule: str  # all, frequency, label, random or list
    count: int = 0  # N of frequency:N, label:N and random:N
    listed: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> FeatureChoice:
        """FEATURES read, or one UserError: a count below 1, an empty list or a negative feature would pick nothing."""
        usage = "use all, frequency:N, label:N, random:N (N at least 1) or a list like 3,17,42"
        try:
            if spec == "all":
                return cls("all")
            rule, _, count = spec.partition(":")
            if rule in ("frequency", "label", "random"):
                choice = cls(rule, int(count))
            else:
                parts = spec.split(",")  # each a feature, so "3,,5" (a number lost) is refused, not read as 3,5
                choice = cls("list", listed=tuple(int(part) for part in parts) if any(part.strip() for part in parts) else ())
        except ValueError:
            raise UserError(f"FEATURES {spec!r} is not understood: {usage}.") from None
        if choice.rule != "list" and choice.count < 1:
            raise UserError(f"FEATURES {spec!r} picks no feature: {usage}.")
        if choice.rule == "list" and (not choice.listed or min(choice.listed) < 0):
            raise UserError(f"FEATURES {spec!r} lists {'a negative feature' if choice.listed else 'no feature'}: {usage}.")
        return choice

    def check_exists(self, m: int) -> None:
        """Refuse a listed feature the SAE lacks: checked when the SAE is opened, not after the pass over the store."""
        bad = [feature for feature in self.listed if feature >= m]
        if bad:
            raise UserError(f"feature {bad[0]} does not exist: this SAE has features 0..{m - 1}. Fix FEATURES.")

    def at_most(self, m: int | None) -> int:
        """How many features it picks at most from an SAE of `m` features (unknown m: the count asked for)."""
        if self.rule == "list":
            return len(self.listed)
        if self.rule == "all":
            return m or 0
        return min(self.count, m) if m is not None else self.count


@dataclass
class InterpretConfig:
    checkpoint: str = setting(
        DEFAULT_CHECKPOINT,
        "SAE checkpoint (ours; or, with --store, HypotheSAEs', a SAELens, sparsify or dictionary_learning folder, "
        "or saelens:RELEASE/SAE_ID)",
    )
    store: str = setting("", "activation store; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model whose tokenizer and unembedding to use; empty: the store's model")
    features: str = setting(
        "frequency:100",
        "which features: all, frequency:N (most frequent), label:N (highest label AUROC), random:N (a seeded sample of the live ones), or a list like 3,17,42",
    )
    top_contexts: int = setting(5, "strongest activating windows per feature in the CSV (one per window, so never two cuts of one passage)")
    window_tokens: int = setting(
        32, "tokens per window: each example is cut into windows this long, as delphi cuts its contexts (example_ctx_len)"
    )
    logit_lens_tokens: int = setting(8, "tokens listed as most promoted / suppressed by each feature's decoder direction")
    interpretations_path: str = setting(DEFAULT_INTERPRETATIONS, "where the CSV goes")
    explain: bool = setting(True, "ask an LLM (OpenAI-compatible API; key from OPENAI_API_KEY) to explain and score each feature")
    scoring: str = setting(
        "detection,fuzzing,fast-rubric",
        "any of detection and fuzzing (delphi's scores of an explanation on held-out windows) and fast-rubric (the FAST paper's "
        "1-5 rating of the top windows, and a name), comma-separated",
    )
    explanation_model: str = setting("gpt-4.1", "chat model for explanations and scoring")
    explain_examples: int = setting(
        40, "activating windows the LLM sees to explain a feature; from the quantiles, a multiple of N_QUANTILES (delphi: 40)"
    )
    explain_from: str = setting(
        "quantiles", "where the explainer's windows come from: quantiles (evenly from each activation quantile, delphi's default) or top"
    )
    score_examples: int = setting(
        50,
        "held-out activating windows from the quantiles (a multiple of N_QUANTILES), never shown to the explainer, and as many "
        "non-activating ones, per scorer (delphi: 50)",
    )
    n_quantiles: int = setting(10, "activation quantiles the windows are sampled from and the accuracy is reported by (delphi: 10)")
    min_windows: int = setting(
        200, "activating windows a feature needs to be explained and scored; rarer ones are reported as too rare (delphi: 200)"
    )
    examples_per_prompt: int = setting(5, "examples per detection / fuzzing request (delphi: 5)")
    rubric_contexts: int = setting(5, "top windows the LLM rates with the FAST rubric (the paper shows 5)")
    llm_concurrency: int = setting(4, "requests in flight at once")
    llm_cache_dir: str = setting("", "where LLM answers are cached; empty: <FASTSAE_CACHE>/llm")
    seed: int = setting(0, "seed for sampling windows and shuffling the scoring examples")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        FeatureChoice.parse(self.features)  # a typo fails here, not after the pass over the store
        if self.scoring in OLD_SCORINGS:
            logger.info(
                "SCORING %r is read as %r (write that, or add fuzzing: %r).", self.scoring, OLD_SCORINGS[self.scoring], ",".join(SCORINGS)
            )
        unknown = [name for name in self.scorings if name not in SCORINGS]
        if unknown or not self.scorings:
            raise UserError(
                f"SCORING {self.scoring!r} is not understood: name any of {', '.join(SCORINGS)}, comma-separated, e.g. {','.join(SCORINGS)!r}."
            )
        if self.explain_from not in ("quantiles", "top"):
            raise UserError(f"EXPLAIN_FROM {self.explain_from!r} is not understood: use quantiles or top.")
        at_least = {
            1: (
                "window_tokens",
                "explain_examples",
                "score_examples",
                "n_quantiles",
                "examples_per_prompt",
                "rubric_contexts",
                "llm_concurrency",
            ),
            0: ("top_contexts", "logit_lens_tokens", "min_windows", "seed"),
        }
        for least, names in at_least.items():
            for name in names:
                if getattr(self, name) < least:
                    raise UserError(f"{name.upper()} must be at least {least}, not {getattr(self, name)}.")
        for name in ("score_examples", "explain_examples") if self.explain_from == "quantiles" else ("score_examples",):
            self._check_divides(name)

    def _check_divides(self, name: str) -> None:
        """delphi's sampling takes count // N_QUANTILES windows from each quantile: any other count would silently shrink."""
        count, n = getattr(self, name), self.n_quantiles
        if count % n:
            fits = " or ".join(str(multiple) for multiple in (count // n * n, count // n * n + n) if multiple)
            raise UserError(
                f"{name.upper()}={count} is not a multiple of N_QUANTILES={n}: delphi's sampling takes {name.upper()} // N_QUANTILES "
                f"windows from each quantile, so {count // n * n} would be used. Set {name.upper()} to {fits}, or change N_QUANTILES."
            )

    @property
    def scorings(self) -> list[str]:
        """The chosen scorings, in SCORINGS' order."""
        chosen = {part.strip() for part in OLD_SCORINGS.get(self.scoring, self.scoring).split(",") if part.strip()}
        return [name for name in SCORINGS if name in chosen] + sorted(chosen - set(SCORINGS))

    @property
    def classifiers(self) -> list[str]:
        """The chosen delphi scorers (each needs an explanation first)."""
        return [name for name in self.scorings if name in SCORERS]

    @property
    def rubric(self) -> bool:
        return "fast-rubric" in self.scorings


@dataclass
class LLMCost:
    """Requests and prompt tokens (about 4 characters a token) an LLM round will take."""

    requests: int
    tokens: int

    def describe(self) -> str:
        return f"{self.requests:,} requests, about {self.tokens:,} prompt tokens"


def _tokens(requests: list[Messages]) -> int:
    return sum(len(message["content"]) for messages in requests for message in messages) // 4


def estimate_llm_cost(config: InterpretConfig, n_features: int) -> LLMCost:
    """Before any window is read: the most the LLM step can cost for `n_features` (features too rare to score cost less)."""
    window = Window(0, 0, ["word"] * config.window_tokens, [1.0] * config.window_tokens)  # ~1 token a token
    per_feature: list[Messages] = []
    if config.classifiers:
        per_feature.append(explanation_messages([window] * config.explain_examples))
        examples = [ScoringExample(window, 0)] * (2 * config.score_examples)
        for scorer in config.classifiers:
            texts = example_texts(scorer, examples)
            per_feature += classifier_prompts(
                scorer, "word " * EXPLANATION_TOKENS, texts, list(range(len(texts))), config.examples_per_prompt
            )
    if config.rubric:
        per_feature.append(rubric_messages([window] * config.rubric_contexts))
    return LLMCost(n_features * len(per_feature), n_features * _tokens(per_feature))


SAE_FINGERPRINT_COLUMN = "sae_fingerprint"  # the SAE the file was written for (SparseAutoencoder.fingerprint)
INTERPRETATION_COLUMNS = {
    "feature",
    "frequency",
    "top_tokens",
    "top_label",
    "top_label_auroc",
    "explanation",
    "detection_score",
    "fuzzing_score",
}


def read_interpretations(path: str, sae: SparseAutoencoder) -> pd.DataFrame | None:
    """interpret_sae.py's CSV, checked to describe `sae`; None (and a log line) when there is none."""
    if not path or not Path(path).is_file():
        logger.info("No interpretations file at %r: features go without explanations (interpret_sae.py writes them).", path)
        return None
    table = pd.read_csv(path)
    missing = INTERPRETATION_COLUMNS - set(table.columns)
    if missing:
        raise UserError(
            f"{path} lacks the columns {sorted(missing)}: it is not an interpretations.csv from this interpret_sae.py (one from before "
            "delphi's detection and fuzzing scores has a single `score` column). Rerun interpret_sae.py, "
            "or pass --interpretations with another file."
        )
    written_for = set(table[SAE_FINGERPRINT_COLUMN].dropna()) if SAE_FINGERPRINT_COLUMN in table else set()
    if written_for and written_for != {sae.fingerprint()}:
        raise UserError(
            f"{path} was written for another SAE ({SAE_FINGERPRINT_COLUMN} {', '.join(sorted(written_for))}; this one's is "
            f"{sae.fingerprint()}), perhaps another of a sweep. Pass the --interpretations written for this checkpoint "
            "(interpret_sae.py's INTERPRETATIONS_PATH), or --interpretations ''."
        )
    m = sae.spec.m
    out_of_range = table["feature"][(table["feature"] < 0) | (table["feature"] >= m)]
    if len(out_of_range):
        raise UserError(
            f"{path} describes feature {int(out_of_range.iloc[0])}, but this SAE has features 0..{m - 1}: the file belongs to another SAE. "
            "Pass the --interpretations written for this checkpoint (interpret_sae.py's INTERPRETATIONS_PATH), or --interpretations ''."
        )
    return table


def select_features(spec: str, statistics: FeatureStatistics, labels: pd.DataFrame, seed: int = 0) -> list[int]:
    """The features FEATURES picks: all, frequency:N, label:N, random:N (seeded by SEED), or an explicit comma-separated list."""
    choice = FeatureChoice.parse(spec)
    m = len(statistics.frequency)
    alive = np.flatnonzero(statistics.frequency > 0)
    if choice.rule in ("frequency", "label", "random") and not len(alive):  # else a CSV with no row, or a crash
        raise UserError(
            f"FEATURES {spec!r} picks no feature: none of this SAE's {m} features fires on the store. Check that CHECKPOINT and "
            "STORE belong together, or set FEATURES to all or a list to write the dead features' rows."
        )
    if choice.rule == "all":
        return list(range(m))
    if choice.rule == "frequency":
        return [int(f) for f in alive[np.argsort(-statistics.frequency[alive], kind="stable")][: choice.count]]
    if choice.rule == "label":
        ranked = alive[np.isfinite(labels["top_label_auroc"].to_numpy(dtype=float)[alive])]
        if len(ranked) < choice.count:
            logger.info("FEATURES %s: only %d live features have a label AUROC (fire on a labelled example).", spec, len(ranked))
        if not len(ranked):
            raise UserError(
                f"FEATURES {spec!r} picks no feature: no live feature fires on a labelled example. Use frequency:N or random:N."
            )
        scores = labels["top_label_auroc"].to_numpy(dtype=float)[ranked]
        return [int(f) for f in ranked[np.argsort(-scores, kind="stable")][: choice.count]]
    if choice.rule == "random":  # an unbiased sample, as the FAST paper rates: the most frequent features are not typical
        return sorted(int(f) for f in np.random.default_rng(seed).permutation(alive)[: choice.count])
    choice.check_exists(m)
    listed = list(dict.fromkeys(choice.listed))  # one row per feature, in the order first listed
    if len(listed) < len(choice.listed):
        logger.info("FEATURES lists %d features more than once: each gets one row.", len(choice.listed) - len(listed))
    return listed


@dataclass
class FeatureExamples:
    """What the LLM sees of one feature: the explainer's windows, and the scorers' examples, non-activating first."""

    explain: list[Window]
    scoring: list[ScoringExample]


def feature_examples(
    store: ActivationStore,
    sae,
    tokenizer,
    grid: WindowGrid,
    windows: FeatureWindows,
    feature: int,
    config: InterpretConfig,
    include_special: bool,
) -> FeatureExamples:
    """The explainer's windows and the held-out ones (from the activation quantiles), and random non-activating windows."""
    rng = np.random.default_rng([config.seed, feature])
    sample = sample_windows(windows, config.explain_examples, config.score_examples, config.n_quantiles, config.explain_from == "top", rng)
    explain = read_windows(store, sae, feature, tokenizer, grid, grid.index_of(sample.explain), include_special)
    held_out = read_windows(store, sae, feature, tokenizer, grid, grid.index_of(sample.score), include_special)
    silent = non_activating_windows(store, sae, feature, tokenizer, grid, config.score_examples, rng, include_special)
    activating = [ScoringExample(window, int(quantile)) for window, quantile in zip(held_out, sample.score_quantiles)]
    return FeatureExamples(explain, [ScoringExample(window, None) for window in silent] + activating)


def interpretation_rows(
    statistics: FeatureStatistics,
    labels: pd.DataFrame,
    windows: dict[int, FeatureWindows],
    top_windows: dict[int, list[Window]],
    promoted: np.ndarray | None,
    suppressed: np.ndarray | None,
    tokenizer,
    config: InterpretConfig,
) -> list[dict[str, Any]]:
    """One CSV row per feature; the logit-lens columns stay empty where the logit lens does not apply (`promoted` is None)."""

    def decoded(token_ids: np.ndarray | None, row_index: int) -> str:
        return "" if token_ids is None else token_list(tokenizer.decode([int(t)]) for t in token_ids[row_index])

    rows = []
    for row_index, (feature, all_top) in enumerate(top_windows.items()):
        top = all_top[: config.top_contexts]
        count = windows[feature].count
        rows.append(
            {
                "feature": feature,
                "frequency": float(statistics.frequency[feature]),
                "mean_activation": float(statistics.mean_activation[feature]),
                "max_activation": float(statistics.max_activation[feature]),
                "activating_windows": count,
                "top_tokens": token_list(dict.fromkeys(window.tokens[window.peak] for window in top)),
                "logit_lens_promoted": decoded(promoted, row_index),
                "logit_lens_suppressed": decoded(suppressed, row_index),
                "top_label": labels.loc[feature, "top_label"],
                "top_label_auroc": float(labels.loc[feature, "top_label_auroc"]),
                "explanation": "",
                **{column: "" if column.endswith("_quantile_accuracy") else np.nan for column in classifier_columns()},
                "fast_rubric_rating": None,
                "fast_rubric_name": "",
                "scoring_note": ""
                if count >= config.min_windows
                else f"too rare to score: {count} activating windows, MIN_WINDOWS is {config.min_windows}",
                "top_contexts": "\n".join(f"[{window.activation:.2f}] {window.marked_text()}" for window in top),
            }
        )
    return rows


def classifier_columns() -> list[str]:
    """Per delphi scorer: its score, its accuracy per activation quantile (a JSON list, strongest first) and on non-activating windows."""
    return [f"{scorer}_{column}" for scorer in SCORERS for column in ("score", "quantile_accuracy", "non_activating_accuracy")]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _fill_scores(row: dict[str, Any], scorer: str, result: ClassifierResult) -> None:
    row[f"{scorer}_score"] = result.score
    row[f"{scorer}_quantile_accuracy"] = json.dumps([_rounded(accuracy) for accuracy in result.quantile_accuracy])
    row[f"{scorer}_non_activating_accuracy"] = np.nan if result.non_activating_accuracy is None else result.non_activating_accuracy
    if math.isnan(result.score):
        logger.warning("%s: no readable answer for feature %d, its score is left empty.", scorer, row["feature"])


def _drop_unexplainable(rows: list[dict[str, Any]], examples: dict[int, FeatureExamples], config: InterpretConfig) -> None:
    """Leave unexplained, and say so, a feature whose sample shows the explainer no window: with MIN_WINDOWS below
    N_QUANTILES (or 0) its windows fill no quantile, and the LLM would guess an explanation from nothing, then be scored."""
    unexplainable = [row for row in rows if row["feature"] in examples and not examples[row["feature"]].explain]
    for row in unexplainable:
        del examples[row["feature"]]
        row["scoring_note"] = (
            f"too rare to explain: its {row['activating_windows']} activating windows fill none of the N_QUANTILES="
            f"{config.n_quantiles} quantiles the explainer's windows are drawn from"
            if config.explain_from == "quantiles"
            else "too rare to explain: no activating window"
        )
    if unexplainable:
        logger.warning(
            "%d features have too few activating windows to show the explainer any (their scoring_note says why): not explained or scored.",
            len(unexplainable),
        )


def _note_short_classes(rows: list[dict[str, Any]], examples: dict[int, FeatureExamples], wanted: int) -> None:
    """Say in the CSV where a scorer gets fewer windows of a class than SCORE_EXAMPLES: a feature that fires in nearly every
    window leaves few non-activating ones, and with none its score is at most 0.5 (a class with no verdicts counts 0)."""
    for row in rows:
        scoring = examples.get(row["feature"], FeatureExamples([], [])).scoring
        activating = sum(example.activating for example in scoring)
        if row["feature"] in examples and min(activating, len(scoring) - activating) < wanted:
            row["scoring_note"] = (
                f"scored on {activating} activating and {len(scoring) - activating} non-activating windows, not {wanted} of each; "
                "a class with none counts 0"
            )


def explain_features(
    rows: list[dict[str, Any]], top_windows: dict[int, list[Window]], examples: dict[int, FeatureExamples], config: InterpretConfig
) -> tuple[RubricSummary | None, dict[int, dict[str, ClassifierResult]]]:
    """Fill each row's LLM columns for SCORING; returns the rubric's rating distribution (when it ran) and each feature's scorer results.

    First round: one explaining request per feature in `examples` and one rubric request per feature with
    windows (independent of the explanation). Second round: the detection and fuzzing prompts.
    """
    client = CachedChatClient(config.explanation_model, Path(config.llm_cache_dir or cache_dir() / "llm"), config.llm_concurrency)
    explained = list(examples) if config.classifiers else []
    explain_requests = [explanation_messages(examples[feature].explain) for feature in explained]
    # A feature that never fired has no windows to rate: it is not asked (nor counted as unreadable).
    rubric_rows = [row for row in rows if top_windows[row["feature"]]] if config.rubric else []
    rubric_requests = [rubric_messages(top_windows[row["feature"]][: config.rubric_contexts]) for row in rubric_rows]
    # Each scorer's texts and order are fixed before the explanation is known; only the explanation goes in later.
    plans = {}
    for feature in explained:
        order = scoring_order(len(examples[feature].scoring), f"{config.seed}:{feature}")
        for scorer in config.classifiers:
            plans[feature, scorer] = (example_texts(scorer, examples[feature].scoring), order)
    estimate = {  # the scoring prompts as they will be, with a stand-in for the explanation
        scorer: [
            prompt
            for (_, kind), (texts, order) in plans.items()
            if kind == scorer
            for prompt in classifier_prompts(scorer, "word " * EXPLANATION_TOKENS, texts, order, config.examples_per_prompt)
        ]
        for scorer in SCORERS
    }
    first_round = explain_requests + rubric_requests
    cached = sum(client.cached(messages, ANSWER_TOKENS) is not None for messages in first_round)
    logger.info(
        "LLM: %d explaining + %d detection + %d fuzzing + %d FAST-rubric requests to %s, about %s prompt tokens (%d explaining/rubric answers already cached)",
        len(explain_requests),
        len(estimate["detection"]),
        len(estimate["fuzzing"]),
        len(rubric_requests),
        config.explanation_model,
        f"{_tokens(first_round + estimate['detection'] + estimate['fuzzing']):,}",
        cached,
    )
    answers = client.complete_all(first_round, ANSWER_TOKENS, whole=True)
    explanations = dict(zip(explained, map(parse_explanation, answers[: len(explain_requests)])))
    for feature in [feature for feature, explanation in explanations.items() if not explanation]:
        logger.warning(
            "No readable explanation for feature %d (an empty or cut answer): it is not scored, its columns are left empty.", feature
        )
    scoring_requests, spans = [], []
    for (feature, scorer), (texts, order) in plans.items():
        if not explanations[feature]:
            continue
        prompts = classifier_prompts(scorer, explanations[feature], texts, order, config.examples_per_prompt)
        spans.append((feature, scorer, order, len(scoring_requests), len(prompts)))
        scoring_requests += prompts
    scoring_answers = client.complete_all(scoring_requests, ANSWER_TOKENS)
    row_of = {row["feature"]: row for row in rows}
    results: dict[int, dict[str, ClassifierResult]] = {feature: {} for feature in explained if explanations[feature]}
    for feature, scorer, order, first, count in spans:
        result = score_answers(
            examples[feature].scoring, order, config.examples_per_prompt, scoring_answers[first : first + count], config.n_quantiles
        )
        results[feature][scorer] = result
        row_of[feature]["explanation"] = explanations[feature]
        _fill_scores(row_of[feature], scorer, result)
    for scorer in config.classifiers:
        _log_headline(scorer, [(examples[feature].scoring, result[scorer]) for feature, result in results.items()])
    summary = None
    if config.rubric:
        for row, answer in zip(rubric_rows, answers[len(explain_requests) :]):
            row["fast_rubric_rating"], row["fast_rubric_name"] = parse_rubric(answer)
            if row["fast_rubric_rating"] is None:  # counted as missing in the summary, never guessed
                logger.warning("FAST rubric: no 1-5 rating in the answer for feature %d, left empty: %r", row["feature"], answer[:200])
        summary = rubric_summary(row["fast_rubric_rating"] for row in rubric_rows)
        logger.info("FAST rubric: %s", summary.describe())
    logger.info("LLM: %d requests sent, the rest served from the cache", client.requests_sent)
    return summary, results


def _log_headline(scorer: str, scored: list[tuple[list[ScoringExample], ClassifierResult]]) -> None:
    """The run's numbers for one scorer: the mean of the features' scores, and delphi's headline (balanced accuracy over all examples pooled)."""
    scores = [result.score for _, result in scored if not math.isnan(result.score)]
    if not scores:
        logger.info("%s: no feature scored", scorer)
        return
    verdicts = [verdict for examples, result in scored for verdict in result.verdicts]
    truth = [example.activating for examples, _ in scored for example in examples]
    logger.info(
        "%s: mean score %.3f over %d features; balanced accuracy over all %d examples pooled (delphi's headline) %.3f",
        scorer,
        float(np.mean(scores)),
        len(scores),
        len(truth),
        balanced_accuracy(verdicts, truth),
    )


def interpret_sae(config: InterpretConfig) -> Path:
    """Statistics over the whole store, windows of the chosen features, then one CSV row per chosen feature."""
    trained = open_trained_sae(config.checkpoint)
    FeatureChoice.parse(config.features).check_exists(trained.sae.spec.m)
    store = trained.open_store(config.store)
    model_name = config.model_name or store.manifest.model_name
    if not model_name:
        raise UserError(f"the store at {store.folder} does not name its model. Pass --model-name (its tokenizer decodes the contexts).")
    device = resolve_device(config.device)
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    if store.manifest.hook_point == LORA_HOOK_POINT:
        # Decoder directions live in the adapter's concatenated bottleneck space (d is not the hidden size), not the residual stream.
        logger.info(
            "Logit lens skipped: this is a LoRA-bottleneck store, whose directions do not meet the unembedding; its columns stay empty."
        )
        unembedding = None
    else:
        unembedding = unembedding_matrix(load_model(source, torch.float32, "cpu")).to(device)
    sae = trained.sae.to(device)
    include_special = trained.info.trained_with_special_tokens
    labels = store_labels(store, config.features)
    probe_choices = read_probe_choices(trained)  # before the passes: one of other weights is refused at once
    with scratch_folder(config.interpretations_path) as scratch:  # example-level maxima live on disk
        statistics = collect_feature_statistics(store, sae, include_special=include_special, example_max_file=scratch / "example_max.npy")
        return _interpret_with(statistics, labels, probe_choices, store, sae, tokenizer, unembedding, include_special, config)


def store_labels(store: ActivationStore, features: str) -> list[str | None]:
    """Each example's label (None where it has none); FEATURES label:N is refused here, before the pass over the store,
    unless the examples carry two labels or more (with fewer, no feature has a label AUROC to rank by)."""
    labels = [record.get("label") for record in store.example_records()]
    distinct = {label for label in labels if label is not None}
    if FeatureChoice.parse(features).rule == "label" and len(distinct) < 2:
        raise UserError(
            f"FEATURES {features!r} ranks features by how well they pick out a label, but the examples of the store at {store.folder} "
            f"carry {len(distinct)} distinct label{'' if len(distinct) == 1 else 's'}: it takes two or more. Use frequency:N or random:N, "
            "or extract a dataset with a label field (extract_activations.py's LABEL_FIELD)."
        )
    return labels


def _interpret_with(
    statistics: FeatureStatistics,
    example_labels: list[str | None],
    probe_choices: dict[int, list[dict[str, Any]]],
    store: ActivationStore,
    sae,
    tokenizer,
    unembedding: torch.Tensor | None,
    include_special: bool,
    config: InterpretConfig,
) -> Path:
    """Everything after the statistics: labels, chosen features, their windows, logit lens, LLM, CSV and dashboard."""
    labels = label_association(statistics.example_max, example_labels)
    features = select_features(config.features, statistics, labels, config.seed)
    grid = (
        WindowGrid(store.doc_offsets, config.window_tokens)
        if include_special
        else WindowGrid.after_leading_template(store, config.window_tokens)
    )
    shown = max(config.top_contexts, config.rubric_contexts, config.explain_examples if config.explain_from == "top" else 0)
    windows = collect_windows(store, sae, features, grid, shown, include_special, seed=config.seed)
    top_windows = {f: read_windows(store, sae, f, tokenizer, grid, grid.index_of(windows[f].top_peaks), include_special) for f in features}
    promoted, suppressed = (
        logit_lens(sae.W_dec.detach()[features], unembedding, k=config.logit_lens_tokens) if unembedding is not None else (None, None)
    )
    rows = interpretation_rows(statistics, labels, windows, top_windows, promoted, suppressed, tokenizer, config)
    rubric, results, examples, llm_error = None, {}, {}, None
    if not config.explain:
        logger.info("EXPLAIN is off: the explanation, score and FAST-rubric columns are left empty.")
    elif api_key() is None:
        local = (
            f" A server at OPENAI_BASE_URL ({base_url()}) that needs no key takes any value, e.g. OPENAI_API_KEY=none."
            if base_url()
            else ""
        )
        logger.warning(
            "No API key (%s): the explanation, score and FAST-rubric columns are left empty.%s", " / ".join(API_KEY_VARIABLES), local
        )
    else:
        scored = [f for f in features if windows[f].count >= config.min_windows] if config.classifiers else []
        if config.classifiers and len(scored) < len(features):
            logger.info(
                "%d of %d features have fewer than MIN_WINDOWS=%d activating windows: too rare to explain and score.",
                len(features) - len(scored),
                len(features),
                config.min_windows,
            )
        examples = {
            f: feature_examples(store, sae, tokenizer, grid, windows[f], f, config, include_special)
            for f in tqdm(scored, desc="sampling windows", unit="feature")
        }
        _drop_unexplainable(rows, examples, config)
        try:
            rubric, results = explain_features(rows, top_windows, examples, config)
        except UserError as error:  # the statistics and windows are worth keeping: written below, then the error
            llm_error = error
        else:
            _note_short_classes(rows, examples, config.score_examples)
    path = Path(config.interpretations_path)
    table = pd.DataFrame(rows).astype({"fast_rubric_rating": "Int64"} if rows else {})  # whole numbers; empty where missing
    table[SAE_FINGERPRINT_COLUMN] = sae.fingerprint()  # so that analyze_texts and export_sae never attach it to another SAE
    write_atomically(path, lambda partial: table.to_csv(partial, index=False))
    title = f"{sae.spec.name} on {store.manifest.model} {store.hook_name}"
    scored = {f: (examples[f].scoring, results[f]) for f in results}
    page = dashboard_data(title, rows, top_windows, statistics, rubric, scored, config.n_quantiles, probe_choices)
    dashboard = write_dashboard(dashboard_path(path), page)
    logger.info("Wrote %d features to %s and %s", len(rows), path, dashboard)
    if llm_error is not None:
        raise UserError(f"{llm_error} {path} and {dashboard} were written without the LLM's columns; rerun for them.")
    return path


def dashboard_path(interpretations: Path) -> Path:
    """The dashboard beside a CSV: dashboard.html for the default interpretations.csv, `<name>_dashboard.html` for any
    other, so that the CSVs of several SAEs in one folder (a sweep's) each keep their own."""
    name = DASHBOARD_FILE if interpretations.name == Path(DEFAULT_INTERPRETATIONS).name else f"{interpretations.stem}_{DASHBOARD_FILE}"
    return interpretations.with_name(name)


class InterpretStage(Stage):
    """Step 3 in the pipeline: a checkpoint and its store → interpretations.csv and dashboard.html beside it."""

    name = "interpret"
    script = "interpret_sae.py"
    input_constant = "CHECKPOINT"
    upstream = "train"
    config_class = InterpretConfig

    def run(self, config: InterpretConfig) -> Path:
        return interpret_sae(config)

    def outputs(self, config: InterpretConfig, facts: PlanFacts) -> list[Output]:
        interpretations = Path(config.interpretations_path)
        return [Output(interpretations), Output(dashboard_path(interpretations))]

    def optional_inputs(self, config: InterpretConfig) -> list[Path]:
        """Sparse probing's results beside the checkpoint: the dashboard shows which probes chose each feature."""
        return [results_folder(config.checkpoint) / SPARSE_PROBING_FILE]

    def fingerprint_facts(self, config: InterpretConfig) -> dict[str, Any]:
        """Whether the LLM columns get filled (a key is set; never the key) and from which endpoint: the first key set after
        an offline run re-runs this step. None offline, so that an offline run's record from before this hook stays current."""
        if not config.explain or api_key() is None:
            return {}
        return {"explanations": True, "endpoint": base_url()}

    def explained_features(self, config: InterpretConfig, facts: PlanFacts) -> int:
        """How many features the LLM will be asked about (0 when explanations are skipped)."""
        if not config.explain or api_key() is None:
            return 0
        planned = facts.output_facts("train", self.input_path(config))
        return FeatureChoice.parse(config.features).at_most(planned["m"] if planned else None)

    def checks(self, config: InterpretConfig, facts: PlanFacts) -> list[tuple[str, str]]:
        if not config.explain:
            return [("API key", "EXPLAIN is off in interpret_sae.py: explanations are skipped")]
        if api_key() is None:
            return [("API key", f"no key ({' / '.join(API_KEY_VARIABLES)}): explanations and scores are skipped; set one to get them")]
        features = self.explained_features(config, facts)
        base = base_url() or "the OpenAI API"
        cost = estimate_llm_cost(config, features).describe()
        return [("API key", f"key set; {features} features ({config.scoring}): at most {cost} to {base}")]

    def estimate(self, config: InterpretConfig, facts: PlanFacts) -> Estimate:
        corpus, calibration = facts.corpus, facts.calibration
        if corpus is None or calibration is None:
            return Estimate()
        features = self.explained_features(config, facts)
        note = f"+ {features} features ({config.scoring}): at most {estimate_llm_cost(config, features).describe()}"
        return Estimate(
            examples=len(corpus.lengths),
            tokens=corpus.n_tokens,
            seconds=seconds_for(calibration.load_seconds, corpus.n_tokens, calibration.encode_tokens_per_second),
            note=note if features else "explanations skipped",
        )

    def key_figures(self, config: InterpretConfig, outputs: list[Output]) -> list[tuple[str, str]]:
        csv_path = outputs[0].path
        if not csv_path.is_file():
            return []
        rows = pd.read_csv(csv_path)
        explained = rows["explanation"].dropna()
        ratings = rows["fast_rubric_rating"].dropna().astype(int)
        figures = []
        if len(explained):
            means = [(name, rows[f"{name}_score"].dropna()) for name in ("detection", "fuzzing")]
            mean = "".join(f", mean {name} {scores.mean():.3f} ({len(scores)} scored)" for name, scores in means if len(scores))
            figures.append(("explained features", f"{len(explained)} of {len(rows)}{mean}"))
        elif not len(ratings):
            figures.append(("explained features", f"0 of {len(rows)} (explanations skipped)"))
        if len(ratings):
            figures.append(("FAST rubric, rated 4-5", f"{(ratings >= 4).mean():.1%} of {len(ratings)} rated features"))
        return figures


STAGE = InterpretStage()
