"""Our detection and fuzzing scores beside eai-delphi's own scorers, and oracle answerers, through a real local HTTP server.

delphi's scorer modules are loaded from the installed eai-delphi wheel and run unchanged. Only its package
`__init__` files are skipped: they import vLLM (an offline client), sentence-transformers and faiss (other
scorers and constructors), which the detection and fuzzing scorers never use. Its own OpenRouter client (httpx)
sends its prompts to the same local server as ours.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import EXPLANATION, chat_server, classifier_prompt_content
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.interpret.interpret_sae import InterpretConfig, feature_examples
from fastsae.interpret.llm import CachedChatClient
from fastsae.interpret.scorers import (
    SCORERS,
    ScoringExample,
    balanced_accuracy,
    classifier_prompts,
    example_texts,
    score_answers,
    scoring_order,
)
from fastsae.interpret.windows import WindowGrid, collect_windows
from fastsae.store.activation_store import ActivationStore

DELPHI_SEED = 42  # delphi's classifier scorers shuffle with random.Random(42)
PER_PROMPT = 5  # delphi's num_examples_per_scorer_prompt


@pytest.fixture(scope="module")
def delphi() -> types.SimpleNamespace:
    """delphi's own modules, from the installed wheel, with its heavy package __init__ files left out (see the module docstring)."""
    root = Path(importlib.util.find_spec("delphi").submodule_search_locations[0])
    for package in ("clients", "latents", "scorers"):
        module = types.ModuleType(f"delphi.{package}")
        module.__path__ = [str(root / package)]
        sys.modules.setdefault(module.__name__, module)
    latents = importlib.import_module("delphi.latents.latents")
    for name in ("ActivatingExample", "NonActivatingExample", "LatentRecord", "Latent", "Example"):  # what its __init__ re-exports
        setattr(sys.modules["delphi.latents"], name, getattr(latents, name))
    return types.SimpleNamespace(
        latents=latents,
        detection=importlib.import_module("delphi.scorers.classifier.detection"),
        fuzz=importlib.import_module("delphi.scorers.classifier.fuzz"),
        openrouter=importlib.import_module("delphi.clients.openrouter"),
        analysis=importlib.import_module("delphi.log.result_analysis"),
        version=importlib.import_module("delphi").__version__,
    )


@pytest.fixture(scope="module")
def examples(tiny_store, smollm2_tokenizer) -> dict[int, list[ScoringExample]]:
    """Three features' scoring examples from the tiny store, sampled as interpret_sae samples them (non-activating first):
    50 activating windows from the quantiles and 50 non-activating ones each."""
    store = ActivationStore(tiny_store)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("topk", store.d, 64, 4)).eval()
    sae.initialize_input_bias_(store.activations(0, 2000).float(), "median")
    grid = WindowGrid.after_leading_template(store, 32)
    windows = collect_windows(store, sae, list(range(64)), grid, top_n=5)
    # Three features with delphi's 200 activating windows, that leave 50 non-activating ones of the 334 windows to draw.
    features = [feature for feature in windows if 200 <= windows[feature].count <= len(grid) - 70][:3]
    config = InterpretConfig(checkpoint="unused", device="cpu")
    examples = {
        feature: feature_examples(store, sae, smollm2_tokenizer, grid, windows[feature], feature, config, False).scoring
        for feature in features
    }
    assert [(len(scoring), sum(example.activating for example in scoring)) for scoring in examples.values()] == [(100, 50)] * 3
    return examples


def hashed_answer(messages: list[dict]) -> str:
    """A verdict per example from a hash of the explanation and the example's text, in one of several formats (some unreadable)."""
    explanation, texts = classifier_prompt_content(messages)
    verdicts = [hashlib.sha256(f"{explanation}|{text}".encode()).digest()[0] % 2 for text in texts]
    style = hashlib.sha256("|".join(texts).encode()).digest()[0] % 6
    if len(texts) < PER_PROMPT:  # a feature's last, shorter prompt: one entry per example, or PER_PROMPT entries
        return json.dumps(verdicts + [0] * (PER_PROMPT - len(texts)) * (style % 2))
    return [
        json.dumps(verdicts),
        f"Here they are: {verdicts} and that is all",
        json.dumps([bool(verdict) for verdict in verdicts]),  # true/false: read as verdicts
        json.dumps(verdicts[:-1]),  # one short: unreadable
        "[" + ",\n".join(map(str, verdicts)) + "]",  # split over lines: unreadable
        "I cannot tell.",
    ][style]


def delphi_record(delphi, examples: list[ScoringExample], explanation: str):
    """The same windows as delphi's LatentRecord: held-out activating windows (`test`) and non-activating ones."""
    test, not_active = [], []
    for example in examples:
        window = example.window
        tokens = torch.zeros(len(window.tokens), dtype=torch.long)  # token ids: delphi's scorers read str_tokens only
        if example.activating:
            activations = torch.tensor(window.activations, dtype=torch.float32)
            test.append(delphi.latents.ActivatingExample(tokens, activations, str_tokens=window.tokens, quantile=example.quantile))
        else:  # delphi's random non-activating windows carry integer zeros as activations
            not_active.append(
                delphi.latents.NonActivatingExample(tokens, torch.zeros_like(tokens), str_tokens=window.tokens, distance=-1.0)
            )
    return delphi.latents.LatentRecord(delphi.latents.Latent("layer", 0), test=test, not_active=not_active, explanation=explanation)


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("missing", [0, 3], ids=["50 non-activating", "47: a shorter last prompt"])
def test_our_scores_equal_delphis_on_the_same_explanation_and_examples(delphi, examples, scorer, missing, monkeypatch, tmp_path):
    """With fewer non-activating windows than asked (a feature firing nearly everywhere), the last prompt has fewer
    examples than EXAMPLES_PER_PROMPT, and delphi reads its answer only when it has EXAMPLES_PER_PROMPT entries."""
    assert delphi.version == "0.1.3"
    delphi_class = delphi.detection.DetectionScorer if scorer == "detection" else delphi.fuzz.FuzzingScorer
    with chat_server(monkeypatch) as server:
        server.answerer = hashed_answer
        client = CachedChatClient("gpt-4.1", tmp_path / "cache", concurrency=4)
        for scoring in examples.values():
            scoring = scoring[missing:]  # non-activating first
            server.requests.clear()
            theirs = delphi_class(
                delphi.openrouter.OpenRouter("gpt-4.1", "sk-test", base_url=server.base_url + "/chat/completions"),
                n_examples_shown=PER_PROMPT,
            )
            outputs = asyncio.run(theirs(delphi_record(delphi, scoring, EXPLANATION))).score  # sends its prompts one by one, in order
            their_prompts = [request["messages"] for request in server.requests]

            order = scoring_order(len(scoring), DELPHI_SEED)
            prompts = classifier_prompts(scorer, EXPLANATION, example_texts(scorer, scoring), order, PER_PROMPT)
            ours = score_answers(scoring, order, PER_PROMPT, client.complete_all(prompts), n_quantiles=10)

            # The same content: the explanation and the example texts (marks included), in the same prompts and order.
            assert [classifier_prompt_content(prompt) for prompt in their_prompts] == [
                classifier_prompt_content(prompt) for prompt in prompts
            ]
            # The same verdicts on the same examples, unreadable answers left out alike, and the same score.
            assert [output.prediction for output in outputs] == [ours.verdicts[index] for index in order]
            assert [output.activating for output in outputs] == [scoring[index].activating for index in order]
            table = pd.DataFrame(
                [{"prediction": o.prediction, "activating": o.activating, "quantile": o.distance, "correct": o.correct} for o in outputs]
            )
            assert table["prediction"].isna().any() and table["prediction"].notna().sum() > 20  # some answers unreadable, most read
            theirs_score = delphi.analysis.compute_classification_metrics(delphi.analysis.compute_confusion(table))["accuracy"]
            assert ours.score == pytest.approx(theirs_score, abs=1e-12)
            by_quantile = table[table["activating"] & table["correct"].notna()].groupby("quantile")["correct"].mean()
            assert [ours.quantile_accuracy[int(q)] for q in by_quantile.index] == pytest.approx(by_quantile.tolist())


def test_balanced_accuracy_counts_a_missing_class_as_zero_as_delphi_does(delphi):
    cases = [
        ([True, True, False], [True, True, True]),  # no non-activating examples: their rate counts 0
        ([False, False], [False, False]),
        ([True, None, False, True], [True, False, False, True]),  # an unread verdict is left out
        ([None, True, False], [True, True, False]),
    ]
    for verdicts, truth in cases:
        table = pd.DataFrame({"prediction": verdicts, "activating": truth})
        expected = delphi.analysis.compute_classification_metrics(delphi.analysis.compute_confusion(table))["accuracy"]
        assert balanced_accuracy(verdicts, truth) == pytest.approx(expected)
    assert balanced_accuracy([True, True, False], [True, True, True]) == pytest.approx(1 / 3)  # hit rate 2/3, and 0 for the missing class


def oracle(truth: dict[str, bool]):
    return lambda messages: json.dumps([int(truth[text]) for text in classifier_prompt_content(messages)[1]])


def seeded_random(messages: list[dict]) -> str:
    texts = classifier_prompt_content(messages)[1]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256("|".join(texts).encode()).digest()[:8], "little"))
    return json.dumps(rng.integers(0, 2, len(texts)).tolist())


def always_yes(messages: list[dict]) -> str:
    return json.dumps([1] * len(classifier_prompt_content(messages)[1]))


@pytest.mark.parametrize("scorer", SCORERS)
def test_oracle_random_and_always_yes_answerers(examples, scorer, monkeypatch, tmp_path):
    scores: dict[str, list[float]] = {"oracle": [], "random": [], "always yes": []}
    with chat_server(monkeypatch) as server:
        for feature, scoring in examples.items():
            texts = example_texts(scorer, scoring)
            truth = dict(zip(texts, (example.activating for example in scoring)))
            assert len(truth) == len(set(texts)) and sum(truth.values()) == 50  # every text tells its class
            order = scoring_order(len(scoring), feature)
            prompts = classifier_prompts(scorer, EXPLANATION, texts, order, PER_PROMPT)
            for name, answerer in (("oracle", oracle(truth)), ("random", seeded_random), ("always yes", always_yes)):
                server.answerer = answerer
                client = CachedChatClient("gpt-4.1", tmp_path / name, concurrency=4)  # each answerer its own cache
                result = score_answers(scoring, order, PER_PROMPT, client.complete_all(prompts), n_quantiles=10)
                scores[name].append(result.score)
                if name == "oracle":
                    assert result.quantile_accuracy == [1.0] * 10 and result.non_activating_accuracy == 1.0
    assert scores["oracle"] == [1.0] * len(examples)
    assert scores["always yes"] == [0.5] * len(examples)
    assert abs(np.mean(scores["random"]) - 0.5) < 0.1 and all(abs(score - 0.5) < 0.2 for score in scores["random"])  # SE ≈ 0.05 a feature
