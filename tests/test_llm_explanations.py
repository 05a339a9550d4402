"""LLM explanations against a real HTTP server on 127.0.0.1 speaking the chat-completions API, through the real openai client."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from fastsae.errors import UserError
from fastsae.explanations import balanced_accuracy, parse_labels
from fastsae.interpret import InterpretConfig, interpret_sae
from fastsae.train import TrainConfig, train_saes

EXPLANATION = "the word 'would' in predictions"


class ChatCompletionsServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions; `statuses` queues error codes to return before answering normally."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses: list[int] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
            status = self.server.statuses.pop(0) if self.server.statuses else 200
        if status != 200:
            self._send(status, {"error": {"message": f"simulated {status}", "type": "simulated", "code": status}}, {"Retry-After": "0"})
            return
        prompt = body["messages"][-1]["content"]
        if "JSON list of" in prompt:
            count = int(prompt.split("JSON list of ")[1].split(" ")[0])
            content = "Here you go: " + json.dumps([1] * count)  # says every excerpt fires
        else:
            content = f'"{EXPLANATION}"'
        reply = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        self._send(200, reply, {})

    def _send(self, status: int, payload: dict, headers: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server(monkeypatch):
    running = ChatCompletionsServer()
    thread = threading.Thread(target=running.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
    yield running
    running.shutdown()
    running.server_close()


@pytest.fixture(scope="module")
def checkpoint(tiny_store, tmp_path_factory):
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("llm-runs")), m=64, k=4, batch_size=256, epochs=10.0)
    return train_saes(config)[0]["checkpoint"]


def config_for(checkpoint, model_folder, tmp_path, **overrides) -> InterpretConfig:
    settings = dict(
        checkpoint=checkpoint, model_name=str(model_folder), features="frequency:3", interpretations_path=str(tmp_path / "interpretations.csv"),
        llm_cache_dir=str(tmp_path / "llm-cache"), explain_contexts=6, score_contexts=3, device="cpu",
    )
    settings.update(overrides)
    return InterpretConfig(**settings)


def test_explanations_and_scores_land_in_the_csv_and_a_rerun_is_served_from_the_cache(server, checkpoint, tiny_model_folder, tmp_path):
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path))
    table = pd.read_csv(path)
    assert list(table["explanation"]) == [EXPLANATION] * 3
    assert list(table["score"]) == [0.5] * 3  # "all fire": every activating excerpt found, every other one wrong
    assert len(server.requests) == 6 and all(request["model"] == "gpt-4.1" for request in server.requests)
    explaining = server.requests[0]["messages"][-1]["content"]
    assert "«" in explaining and "1. [" in explaining
    assert "sk-test-not-a-real-key" not in path.read_text()

    interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path))
    assert len(server.requests) == 6  # nothing new was sent
    for file in (tmp_path / "llm-cache").rglob("*.json"):
        assert "sk-test" not in file.read_text()


def test_a_rate_limit_is_retried(server, checkpoint, tiny_model_folder, tmp_path):
    server.statuses = [429, 503]
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", llm_concurrency=1))
    assert pd.read_csv(path)["explanation"].tolist() == [EXPLANATION]
    assert len(server.requests) == 4  # two refusals, then the explanation and its score


def test_a_rejected_key_stops_with_a_clear_message(server, checkpoint, tiny_model_folder, tmp_path):
    server.statuses = [401]
    with pytest.raises(UserError, match=r"rejected the key \(401\)"):
        interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path, features="frequency:1", llm_concurrency=1))
    assert len(server.requests) == 1  # no retry on a bad key


def test_no_key_leaves_the_columns_empty(monkeypatch, checkpoint, tiny_model_folder, tmp_path, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_KEY_SAE", raising=False)
    path = interpret_sae(config_for(checkpoint, tiny_model_folder, tmp_path))
    table = pd.read_csv(path, keep_default_na=False)
    assert (table["explanation"] == "").all() and (table["score"] == "").all()
    assert "No API key" in caplog.text


def test_label_parsing_and_balanced_accuracy():
    assert parse_labels("Sure! [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("[2, 0, 1] then [0, 0, 1]", 3) == [0, 0, 1]
    assert parse_labels("no list here", 2) is None
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert balanced_accuracy([1, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(0.25)
