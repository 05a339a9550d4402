"""LLM explanations, delphi's detection and fuzzing scores and FAST-rubric ratings against a real HTTP server on 127.0.0.1
speaking the chat-completions API, through the real openai client."""

from __future__ import annotations

import json
import logging
import re
import time

import pandas as pd
import pytest

from conftest import EXPLANATION, chat_server, classifier_prompt_content
from fastsae.common.errors import UserError
from fastsae.interpret.explanations import parse_rubric, rubric_summary
from fastsae.interpret.interpret_sae import InterpretConfig, estimate_llm_cost, interpret_sae
from fastsae.interpret.llm import CachedChatClient
from fastsae.interpret.scorers import balanced_accuracy, read_verdicts

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server(monkeypatch):
    with chat_server(monkeypatch) as running:
        yield running


def config_for(checkpoint, model_folder, tmp_path, **overrides) -> InterpretConfig:
    settings = dict(
        checkpoint=checkpoint,
        model_name=str(model_folder),
        features="frequency:3",
        interpretations_path=str(tmp_path / "interpretations.csv"),
        llm_cache_dir=str(tmp_path / "llm-cache"),
        explain_examples=10,
        score_examples=10,
        n_quantiles=5,
        min_windows=20,
        device="cpu",
    )
    settings.update(overrides)
    return InterpretConfig(**settings)


def test_explanations_and_scores_land_in_the_csv_and_a_rerun_is_served_from_the_cache(
    server, checkpoint, tiny_model_folder, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="fastsae.interpret.interpret_sae")
    config = config_for(checkpoint, tiny_model_folder, tmp_path, scoring="detection")
    path = interpret_sae(config)
    table = pd.read_csv(path)
    assert list(table["explanation"]) == [EXPLANATION] * 3
    assert list(table["detection_score"]) == [0.5] * 3  # "yes" to all: every activating window found, every other one wrong
    assert (table["detection_non_activating_accuracy"] == 0).all() and table["fuzzing_score"].isna().all()
    assert all(json.loads(accuracies) == [1.0] * 5 for accuracies in table["detection_quantile_accuracy"])
    # Per feature: one explaining request, then its 10 held-out and 10 non-activating windows, 5 to a request.
    assert len(server.requests) == 3 * (1 + 4) == estimate_llm_cost(config, 3).requests
    assert all(request["model"] == "gpt-4.1" for request in server.requests)
    assert "LLM: 3 explaining + 12 detection + 0 fuzzing + 0 FAST-rubric requests to gpt-4.1, about" in caplog.text  # before any answer
    explaining = [
        request["messages"][-1]["content"] for request in server.requests if "Text examples:" not in request["messages"][-1]["content"]
    ]
    assert len(explaining) == 3 and all("«" in prompt and "\n10. [" in prompt and "\n11. [" not in prompt for prompt in explaining)
    assert "sk-test-not-a-real-key" not in path.read_text()

    interpret_sae(config)
    assert len(server.requests) == 15  # nothing new was sent
    for file in (tmp_path / "llm-cache").rglob("*.json"):
        assert "sk-test" not in file.read_text()

    with chat_server(monkeypatch) as other_endpoint:  # the same model name at another server: not its answers
        interpret_sae(config)
    assert len(other_endpoint.requests) == 15 and len(server.requests) == 15


def test_a_rate_limit_is_retried(server, checkpoint, tiny_model_folder, tmp_path):
    server.statuses = [429, 503]
    path = interpret_sae(
        config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", llm_concurrency=1, scoring="detection")
    )
    assert pd.read_csv(path)["explanation"].tolist() == [EXPLANATION]
    assert len(server.requests) == 2 + 1 + 4  # two refusals, then the explanation and its four scoring requests


def test_a_rejected_key_stops_with_a_clear_message(server, checkpoint, tiny_model_folder, tmp_path):
    server.statuses = [401]
    with pytest.raises(UserError, match=r"rejected the key \(401\)"):
        interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", llm_concurrency=1))
    assert len(server.requests) == 1  # no retry on a bad key


@pytest.mark.parametrize("status", [404, 400])
def test_a_refused_request_stops_with_the_status_and_the_fix_and_keeps_the_statistics(
    server, checkpoint, tiny_model_folder, tmp_path, status
):
    """A wrong EXPLANATION_MODEL (404) or a bad request (400) is not retried: one clear line, and the CSV and dashboard
    are written without the LLM's columns."""
    server.statuses = [status]
    config = config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:2", llm_concurrency=1)
    with pytest.raises(
        UserError, match=rf"refused a request for EXPLANATION_MODEL 'gpt-4.1' \(Error code: {status} - simulated {status}\)"
    ) as error:
        interpret_sae(config)
    assert "OPENAI_BASE_URL" in str(error.value) and "without the LLM's columns" in str(error.value)
    assert len(server.requests) == 1
    table = pd.read_csv(config.interpretations_path)
    assert len(table) == 2 and table["explanation"].isna().all() and table["top_contexts"].str.contains("«").all()
    assert (tmp_path / "dashboard.html").is_file()


def test_an_unreachable_endpoint_stops_with_a_clear_message(monkeypatch, tmp_path):
    with chat_server(monkeypatch) as closed:
        pass  # shut down: its port now refuses connections
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache", max_retries=0)
    with pytest.raises(UserError, match=rf"could not reach the endpoint {closed.base_url}/ \(Connection error\., after 0 retries\)"):
        client.complete(HELLO)


@pytest.mark.parametrize(
    ("status", "retry_after", "message"),
    [
        (429, True, r"still refused requests after 1 retries \(Error code: 429 - simulated 429\): a rate limit, or the account's quota"),
        (429, False, r"still refused requests after 1 retries .* Lower LLM_CONCURRENCY or check the quota"),
        (500, True, r"still failed after 1 retries \(Error code: 500 - simulated 500\): the server is down or overloaded"),
        (502, False, r"still failed after 1 retries \(Error code: 502 - simulated 502\)"),
        (503, True, r"still failed after 1 retries \(Error code: 503 - simulated 503\)"),
    ],
)
def test_a_rate_limit_or_server_error_that_outlasts_the_retries_says_so(server, tmp_path, status, retry_after, message):
    """Not the wrong-model advice of a 404: a 429 is a rate limit or a spent quota, a 5xx a server down."""
    server.statuses, server.retry_after = [status] * 2, retry_after
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache", max_retries=1)
    with pytest.raises(UserError, match=message) as error:
        client.complete(HELLO)
    assert "EXPLANATION_MODEL" not in str(error.value) and "answers already received are cached" in str(error.value)
    assert len(server.requests) == 2  # the request and its one retry, then no more
    assert client.complete(HELLO) == f'"{EXPLANATION}"'  # the endpoint is back: nothing was cached meanwhile


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"id": "chatcmpl-test", "choices": [{"mess'),  # cut short
        ("text/html", b"<html><body>Welcome to nginx!</body></html>"),  # OPENAI_BASE_URL names a web page
        ("application/json", b"[]"),
    ],
)
def test_a_reply_that_is_no_chat_completion_stops_with_a_clear_message(server, tmp_path, content_type, body):
    server.bodies = [(content_type, body)]
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache")
    with pytest.raises(UserError, match=r"answered with something other than a chat completion .* OPENAI_BASE_URL is the API's address"):
        client.complete(HELLO)
    assert len(server.requests) == 1 and not list((tmp_path / "llm-cache").rglob("*.json"))
    assert client.complete(HELLO) == f'"{EXPLANATION}"'


def test_an_error_sent_in_a_200_reply_is_logged_with_the_servers_words(server, tmp_path, caplog):
    """Proxies (LiteLLM, OpenRouter) can send an upstream failure as a 200 reply with `error` and no choices: the answer is
    unreadable, and the log says what the server said, where it said only that no explanation was readable."""
    error = {"error": {"message": "upstream model overloaded", "code": 502}}
    server.bodies = [("application/json", json.dumps(error).encode())]
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache")
    assert client.complete(HELLO) == "" and not list((tmp_path / "llm-cache").rglob("*.json"))
    assert "answered with no choices but an error: upstream model overloaded" in caplog.text
    assert client.complete(HELLO) == f'"{EXPLANATION}"'


@pytest.mark.parametrize("damage", [b"", b'{"model": "gpt-4.1", "answ', b"\xff\xfe", b'{"answer": null}', b"[]"])
def test_a_damaged_cache_file_is_asked_again_and_rewritten(server, tmp_path, caplog, damage):
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache")
    assert client.complete(HELLO) == f'"{EXPLANATION}"'
    [file] = (tmp_path / "llm-cache").rglob("*.json")
    file.write_bytes(damage)
    assert client.cached(HELLO, 300) is None and "is damaged: its request is asked again" in caplog.text
    assert client.complete(HELLO) == f'"{EXPLANATION}"' and len(server.requests) == 2
    assert json.loads(file.read_text())["answer"] == f'"{EXPLANATION}"'  # rewritten: the next run reads it
    assert client.complete(HELLO) == f'"{EXPLANATION}"' and len(server.requests) == 2


def test_a_request_made_twice_in_one_round_is_sent_once(server, tmp_path):
    def slow_echo(messages: list[dict]) -> str:
        time.sleep(0.2)  # every copy is in flight before the first answer is cached
        return messages[-1]["content"].upper()

    server.answerer = slow_echo
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache", concurrency=4)
    other = [{"role": "user", "content": "bye"}]
    assert client.complete_all([HELLO, HELLO, other, HELLO, HELLO]) == ["HELLO", "HELLO", "BYE", "HELLO", "HELLO"]
    assert sorted(request["messages"][-1]["content"] for request in server.requests) == ["bye", "hello"]
    assert client.requests_sent == 2


def test_a_reply_without_choices_is_an_unreadable_answer_and_not_cached(server, checkpoint, tiny_model_folder, tmp_path, caplog):
    server.answerer = lambda messages: None  # "choices": [] for the explanations; the rubric prompts are answered
    config = config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:2", scoring="detection,fast-rubric")
    table = pd.read_csv(interpret_sae(config))
    assert table["explanation"].isna().all() and table["detection_score"].isna().all()  # not scored on an empty explanation
    assert list(table["fast_rubric_rating"]) == [4, 4]
    assert "No readable explanation for feature" in caplog.text
    assert len(server.requests) == 2 + 2  # two explaining and two rubric requests, no scoring request

    server.answerer = None  # the endpoint answers now: the rerun asks again for the explanations only
    table = pd.read_csv(interpret_sae(config))
    assert list(table["explanation"]) == [EXPLANATION] * 2 and table["detection_score"].notna().all()
    assert len(server.requests) == 4 + 2 + 2 * 4


def test_an_explanation_cut_at_max_tokens_is_not_used_nor_cached(server, checkpoint, tiny_model_folder, tmp_path, caplog):
    """A thinking model's reasoning can fill the 300 tokens: the cut text was taken, cached, and scored as the explanation."""
    server.finish_reason = "length"
    config = config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:2", scoring="detection")
    table = pd.read_csv(interpret_sae(config))
    assert table["explanation"].isna().all() and table["detection_score"].isna().all()
    assert "stopped at its limit of 300 tokens before it ended" in caplog.text and len(server.requests) == 2
    client = CachedChatClient("gpt-4.1", tmp_path / "scoring-cache")
    assert client.complete(HELLO) == f'"{EXPLANATION}"'  # a verdict list is read cut, as delphi reads it, and cached
    server.finish_reason = "stop"
    table = pd.read_csv(interpret_sae(config))  # the rerun asks again: the cut answers were not cached
    assert list(table["explanation"]) == [EXPLANATION] * 2 and table["detection_score"].notna().all()


def test_no_key_leaves_the_columns_empty(monkeypatch, checkpoint, tiny_model_folder, tmp_path, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_KEY_SAE", raising=False)
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path))
    table = pd.read_csv(path, keep_default_na=False)
    assert all(
        (table[column] == "").all()
        for column in ("explanation", "detection_score", "fuzzing_score", "fast_rubric_rating", "fast_rubric_name")
    )
    assert "No API key" in caplog.text and "needs no key" not in caplog.text
    # With OPENAI_BASE_URL set (a local server, which may need no key), the warning says that any value will do.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path))
    assert "(http://127.0.0.1:8000/v1) that needs no key takes any value, e.g. OPENAI_API_KEY=none" in caplog.text


def test_verdict_reading_and_balanced_accuracy():
    # delphi's reading: the first [...] on one line, as JSON, one entry per example, each read as true or false.
    assert read_verdicts("Sure! [1, 0, 1]", 3) == [True, False, True]
    assert read_verdicts("[2, 0, true] then [0, 0, 1]", 3) == [True, False, True]
    assert read_verdicts("[1, 0] then [0, 0, 1]", 3) is None  # only the first list counts
    assert read_verdicts("[1,\n0,\n1]", 3) is None and read_verdicts("no list here", 2) is None and read_verdicts("[1, 0, x]", 3) is None
    assert balanced_accuracy([True, True, False, False], [True, True, False, False]) == 1.0
    assert balanced_accuracy([True, False, True, True], [True, True, False, False]) == pytest.approx(0.25)
    assert balanced_accuracy([True, True], [True, True]) == 0.5  # no non-activating example: its rate counts 0, as in delphi


def test_scoring_names_and_too_rare_features(server, checkpoint, tiny_model_folder, tmp_path, caplog):
    with pytest.raises(UserError, match="SCORING 'detection,rubric' is not understood: name any of detection, fuzzing, fast-rubric"):
        config_for(checkpoint, tiny_model_folder, tmp_path, scoring="detection,rubric")
    assert config_for(checkpoint, tiny_model_folder, tmp_path, scoring="both").scorings == ["detection", "fast-rubric"]  # the old name
    caplog.set_level(logging.INFO, logger="fastsae.interpret.interpret_sae")
    path = interpret_sae(
        config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:2", scoring="detection,fast-rubric", min_windows=10_000)
    )
    table = pd.read_csv(path, keep_default_na=False)
    assert len(server.requests) == 2  # the rubric only: no feature has 10,000 activating windows to be explained and scored
    assert all(
        note.startswith("too rare to score: ") and note.endswith(" activating windows, MIN_WINDOWS is 10000")
        for note in table["scoring_note"]
    )
    assert (table["explanation"] == "").all() and (table["detection_score"] == "").all() and (table["fast_rubric_rating"] != "").all()
    assert "2 of 2 features have fewer than MIN_WINDOWS=10000 activating windows" in caplog.text
    # 150 windows of each class asked for, where the store has fewer: scored all the same, and said so.
    path = interpret_sae(
        config_for(
            checkpoint, tiny_model_folder, tmp_path, features="frequency:1", scoring="detection", score_examples=150, examples_per_prompt=50
        )
    )
    (note,) = pd.read_csv(path)["scoring_note"]
    assert note.startswith("scored on ") and note.endswith(" non-activating windows, not 150 of each; a class with none counts 0")


@pytest.mark.parametrize(
    ("scoring", "requests_per_feature", "filled", "empty"),
    [
        ("fuzzing", 5, ["explanation", "fuzzing_score"], ["detection_score", "fast_rubric_rating", "fast_rubric_name"]),
        ("fast-rubric", 1, ["fast_rubric_rating", "fast_rubric_name"], ["explanation", "detection_score", "fuzzing_score"]),
        (
            "detection,fuzzing,fast-rubric",
            10,
            ["explanation", "detection_score", "fuzzing_score", "fast_rubric_rating", "fast_rubric_name"],
            [],
        ),
    ],
)
def test_each_scoring_fills_its_columns(server, checkpoint, tiny_model_folder, tmp_path, scoring, requests_per_feature, filled, empty):
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:2", scoring=scoring))
    table = pd.read_csv(path, keep_default_na=False)
    assert len(server.requests) == 2 * requests_per_feature
    assert all((table[column] != "").all() for column in filled) and all((table[column] == "").all() for column in empty)
    if "fast_rubric_rating" in filled:
        assert list(table["fast_rubric_rating"]) == [4, 4] and list(table["fast_rubric_name"]) == ["modal would"] * 2


def test_the_rubric_prompt_shows_the_top_five_contexts_numbered_and_marked_and_reruns_are_cached(
    server, checkpoint, tiny_model_folder, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="fastsae.interpret.interpret_sae")
    config = config_for(checkpoint, tiny_model_folder, tmp_path, scoring="fast-rubric")
    table = pd.read_csv(interpret_sae(config))
    prompts = [request["messages"][-1]["content"] for request in server.requests]
    assert len(prompts) == 3 and all("RATING: <a whole number from 1 to 5>" in prompt and "NAME:" in prompt for prompt in prompts)
    # Each prompt lists one feature's top 5 contexts as the CSV has them (strongest first), numbered, each with its
    # activation in brackets and its strongest token «marked»; not the explainer's 10.
    for contexts in table["top_contexts"]:
        split = contexts.split("\n")  # one line per window
        assert len(split) == 5 and all(context.count("«") == 1 for context in split)
        numbered = "\n".join(f"{number}. {context}" for number, context in enumerate(split, 1))
        assert sum(numbered in prompt for prompt in prompts) == 1
    assert not any("\n6. [" in prompt for prompt in prompts)
    assert "100.0% of 3 rated features rated 4-5" in caplog.text

    interpret_sae(config)
    assert len(server.requests) == 3  # a rerun is served from the cache
    interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, scoring="detection,fast-rubric"))
    assert len(server.requests) == 3 + 3 * (1 + 4)  # adding detection asks only for explanations and scores: the ratings are cached


def test_messy_and_unreadable_rubric_answers(server, checkpoint, tiny_model_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastsae.interpret.interpret_sae")
    server.rubric_answers = [
        '**Rating:** 5/5\n**Name:** "past tense verbs"',
        "Sure.\nrating = 2\nname - a loose theme of plans",
        "I cannot rate this.",
    ]
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, scoring="fast-rubric"))
    table = pd.read_csv(path, keep_default_na=False)
    assert sorted(zip(table["fast_rubric_rating"].astype(str), table["fast_rubric_name"])) == [
        ("", ""),
        ("2", "a loose theme of plans"),
        ("5", "past tense verbs"),
    ]
    assert re.search(r"no 1-5 rating in the answer for feature \d+, left empty: 'I cannot rate this.'", caplog.text)
    assert "50.0% of 2 rated features rated 4-5 (ratings 1: 0, 2: 1, 3: 0, 4: 0, 5: 1; unreadable answers: 1)" in caplog.text


def test_rubric_parsing_and_summary():
    assert parse_rubric("RATING: 4\nNAME: the modal 'would'") == (4, "the modal 'would'")
    assert parse_rubric("Looking at the excerpts...\n\n**RATING**: 3 out of 5\n**NAME**: `negation`\n\nThanks") == (3, "negation")
    assert parse_rubric("- rating = 1\n- name: 'none'") == (1, "none")
    assert parse_rubric("RATING: 5") == (5, "")
    assert parse_rubric("Rating (1-5): 4\nName: lists") == (4, "lists")  # the scale in brackets is not the rating
    for unreadable in ("RATING: 7\nNAME: x", "RATING: 3.5", "RATING: <a whole number from 1 to 5>", "It is a 4.", ""):
        assert parse_rubric(unreadable)[0] is None
    summary = rubric_summary([5, 4, None, 1, 4])
    assert summary.counts == {1: 1, 2: 0, 3: 0, 4: 2, 5: 1} and summary.rated == 4 and summary.missing == 1
    assert summary.high_share == 0.75 and rubric_summary([None]).high_share is None


@pytest.mark.parametrize(
    ("answer", "explanation"),
    [
        ('The word "would"', 'The word "would"'),  # was 'The word "would'
        ('"would" as a modal verb', '"would" as a modal verb'),  # was 'would" as a modal verb'
        ('  "the modal verb would"\n', "the modal verb would"),  # a phrase quoted whole loses its quotes
    ],
)
def test_an_explanation_keeps_the_quotes_of_a_quoted_word(server, checkpoint, tiny_model_folder, tmp_path, answer, explanation):
    """The explainer's answer lost every leading and trailing '"': a quoted word at either end kept only one of its quotes,
    in the CSV and in the explanation the scorers judged by."""

    def answer_with(messages: list[dict]) -> str:
        if "\n\nText examples:\n\n" in messages[-1]["content"]:
            return json.dumps([1] * len(classifier_prompt_content(messages)[1]))
        return answer

    server.answerer = answer_with
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", scoring="detection"))
    assert pd.read_csv(path)["explanation"].tolist() == [explanation]
    scoring = [request["messages"] for request in server.requests if "\n\nText examples:\n\n" in request["messages"][-1]["content"]]
    assert scoring and all(classifier_prompt_content(messages)[0] == explanation for messages in scoring)


@pytest.mark.parametrize("whole", [True, False])
def test_a_reasoning_model_that_spent_the_limit_thinking_says_so(server, tmp_path, caplog, whole):
    """A server that returns a thinking model's reasoning apart (vLLM's reasoning parser) sends no content when the
    reasoning fills max_tokens: every answer was empty, and the run said only that no answer could be read."""
    cut = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4.1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "reasoning_content": "Let me think."}, "finish_reason": "length"}
        ],
    }
    server.bodies = [("application/json", json.dumps(cut).encode())]
    client = CachedChatClient("gpt-4.1", tmp_path / "llm-cache")
    assert client.complete(HELLO, whole=whole) == ""
    assert "stopped at its limit of 300 tokens" in caplog.text and "thinking model" in caplog.text
    assert not list((tmp_path / "llm-cache").rglob("*.json"))  # a rerun asks again


@pytest.mark.parametrize("opening", ["<think>\n", ""])  # DeepSeek-R1's template opens the block in the prompt
def test_a_thinking_models_reasoning_is_not_taken_for_its_explanation_or_rating(server, checkpoint, tiny_model_folder, tmp_path, opening):
    """A thinking model served without a reasoning parser sends its reasoning in the content, before </think>: the whole
    of it became the explanation (in the CSV and the scorers' prompts), and a rating it weighed there became the rating."""

    def answer_with(messages: list[dict]) -> str:
        if "\n\nText examples:\n\n" in messages[-1]["content"]:
            return json.dumps([1] * len(classifier_prompt_content(messages)[1]))
        return f"{opening}Every marked token is 'would'. Name: modal.\n</think>\n\nThe modal verb would"

    server.answerer = answer_with
    server.rubric_answers = [f"{opening}Mostly consistent.\nRATING: 2?\nNAME: none\n</think>\n\nRATING: 5\nNAME: modal would"]
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", scoring="detection,fast-rubric"))
    table = pd.read_csv(path)
    assert table["explanation"].tolist() == ["The modal verb would"]
    assert table["fast_rubric_rating"].tolist() == [5] and table["fast_rubric_name"].tolist() == ["modal would"]
    scoring = [request["messages"] for request in server.requests if "\n\nText examples:\n\n" in request["messages"][-1]["content"]]
    assert all(classifier_prompt_content(messages)[0] == "The modal verb would" for messages in scoring)


@pytest.mark.parametrize(
    ("dead", "settings"),
    [
        (False, {"n_quantiles": 1000, "explain_examples": 1000, "score_examples": 1000}),  # every feature: < 1,000 windows
        (True, {"min_windows": 0, "features": "0"}),  # a listed feature that never fires
    ],
)
def test_a_feature_whose_windows_fill_no_quantile_is_not_explained_from_nothing(
    server, checkpoint, dead_checkpoint, tiny_model_folder, tmp_path, dead, settings
):
    """MIN_WINDOWS lowered below N_QUANTILES (or to 0) let a feature with fewer windows than quantiles through: each
    quantile held none, so the explainer was asked about a feature from no window, and its guess was scored."""
    settings = {"features": "frequency:1", "min_windows": 1, "scoring": "detection,fuzzing", **settings}
    path = interpret_sae(config_for(dead_checkpoint if dead else checkpoint, tiny_model_folder, tmp_path, **settings))
    (row,) = pd.read_csv(path, keep_default_na=False).to_dict("records")
    assert server.requests == [] and row["explanation"] == "" and row["detection_score"] == ""
    assert row["scoring_note"] == (
        f"too rare to explain: its {row['activating_windows']} activating windows fill none of the "
        f"N_QUANTILES={settings.get('n_quantiles', 5)} quantiles the explainer's windows are drawn from"
    )
