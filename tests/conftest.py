"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama, dataset files, and a local chat-completions server."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from fastsae.lm.models import EMBEDDED_MODEL, load_tokenizer, resolve_model
from fastsae.train.train_sae import TrainConfig, TrainingRun

TINY_LAYERS = 4


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's own tokenizer (with its chat template), from the dequantised cache."""
    return load_tokenizer(resolve_model(EMBEDDED_MODEL))


# Config settings shared by the tiny random models of other families' tests (Llama's shapes; each family adds its own).
FAMILY_SHAPES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,  # some families' default pad id is beyond this vocabulary
)


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_llama_with_blocks(folder: Path, tokenizer, n_blocks: int) -> Path:
    """A tiny Llama cut to its first `n_blocks` blocks, saved with the tokenizer: a model that lacks a deeper hook."""
    model = make_tiny_llama(len(tokenizer))
    model.config.num_hidden_layers = n_blocks
    model.model.layers = model.model.layers[:n_blocks]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A real GGUF file of a tiny random Llama (4 blocks, d=64, float32 tensors) with a byte-level tokenizer of 261 tokens
    and a chat template, as llama.cpp lays one out: transformers reads its config, tokenizer and weights in about a second,
    where SmolLM2's GGUF takes ~20 s to dequantise."""
    d, feed_forward, heads, kv_heads = 64, 128, 4, 2
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he"]
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(1024)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(d // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)
    generator = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:  # shapes in numpy's order (out, in); a norm's weight is ones
        values = np.ones(shape) if name.endswith("norm.weight") else 0.02 * generator.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))

    add("token_embd.weight", len(tokens), d)  # no output.weight: the head is tied to the embedding, as in SmolLM2
    add("output_norm.weight", d)
    for block in range(TINY_LAYERS):
        for name, shape in [
            ("attn_norm", (d,)),
            ("attn_q", (d, d)),
            ("attn_k", (d * kv_heads // heads, d)),
            ("attn_v", (d * kv_heads // heads, d)),
            ("attn_output", (d, d)),
            ("ffn_norm", (d,)),
            ("ffn_gate", (feed_forward, d)),
            ("ffn_up", (feed_forward, d)),
            ("ffn_down", (d, feed_forward)),
        ]:
            add(f"blk.{block}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama(smollm2_tokenizer):
    """A randomly initialised 4-block Llama (d=64) that shares SmolLM2's vocabulary."""
    return make_tiny_llama(len(smollm2_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tiny_llama, smollm2_tokenizer) -> Path:
    """The tiny Llama and SmolLM2's tokenizer saved as a normal Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


TEXTS = [
    "I had planned to take the train, but the bus is cheaper.",
    "Maybe I was wrong about her.",
    "Looking back, I should have checked the numbers twice before sending the report to my manager.",
    "Ok.",
    "Before I commit to this, let me compare the two offers side by side: salary, commute, and the team.",
    "I doubt the forecast; it said sun yesterday too.",
    "Tomorrow I will start with the hardest task.",
    "Why do I assume the meeting has to be an hour long?",
]


REPO = Path(__file__).resolve().parents[1]


def run_until_killed(code: str, cwd: Path) -> None:
    """Run `code` in a fresh Python in `cwd`, where it ends at a call to `kill_here()`: a SIGKILL, as from the OOM killer or a
    lost machine, which no handler sees and no `finally` cleans up after."""
    prelude = "import os, signal\n\ndef kill_here():\n    os.kill(os.getpid(), signal.SIGKILL)\n\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


class InterruptedRun(TrainingRun):
    """A run that receives a stop request (as from Ctrl-C or SIGTERM) after `stop_after` steps."""

    def __init__(self, config: TrainConfig, stop_after: int) -> None:
        super().__init__(config)
        self.steps_taken, self.stop_after = 0, stop_after

    def train_step(self, trainer, x, factor) -> None:
        super().train_step(trainer, x, factor)
        self.steps_taken += 1
        if self.steps_taken == self.stop_after:
            self.stop_requested = True


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def texts_file(tmp_path) -> Path:
    labels = ["planning", "reconsidering", "recalling", "committing", "comparing_options", "doubting", "planning", "questioning_assumption"]
    return write_jsonl(tmp_path / "texts.jsonl", [{"text": text, "label": label} for text, label in zip(TEXTS, labels)])


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_llama, smollm2_tokenizer) -> Path:
    """The default dataset (330 examples, ~15.7k tokens) through the tiny Llama's block 2, d=64."""
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    config = ExtractConfig(layers=[2], output_dir=str(tmp_path_factory.mktemp("stores")))
    (folder,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    return folder


@pytest.fixture(scope="session")
def tiny_block_store(tmp_path_factory, tiny_llama, smollm2_tokenizer) -> Path:
    """`tiny_store`'s texts in PACKING = "block" blocks of 32 tokens: the texts (~48 tokens) straddle blocks."""
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    config = ExtractConfig(layers=[2], packing="block", block_size=32, output_dir=str(tmp_path_factory.mktemp("block-stores")))
    (folder,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    return folder


@pytest.fixture(scope="session")
def checkpoint(tiny_store, tmp_path_factory) -> str:
    """A Top-K SAE (M=64, K=4) trained on the tiny store: the SAE the interpret tests read."""
    from fastsae.train.train_sae import TrainConfig, train_saes

    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("interpret-runs")), m=64, k=4, batch_size=256, epochs=10.0
    )
    return train_saes(config)[0]["checkpoint"]


@pytest.fixture(scope="session")
def dead_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """That SAE with every encoder bias at -1e6: a real checkpoint none of whose features ever fires."""
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"]["neuron_bias"][:] = -1e6
    path = tmp_path_factory.mktemp("dead") / "SAE_M=64_K=4.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="session")
def smollm2_model():
    """The real SmolLM2-135M-Instruct in float32 on the CPU, loaded once (tests must leave no hook on it)."""
    from fastsae.lm.models import load_model

    return load_model(resolve_model(EMBEDDED_MODEL), torch.float32, "cpu")


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory, smollm2_tokenizer, smollm2_model) -> Path:
    """The default dataset through the real SmolLM2 at layer 12 (15.7k tokens, d=576), as the pipeline does by default."""
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    model = smollm2_model
    config = ExtractConfig(layers=[12], output_dir=str(tmp_path_factory.mktemp("smollm2-stores")))
    (folder,) = write_activation_stores(model, smollm2_tokenizer, load_dataset(config.dataset), config, "SmolLM2-135M-Instruct")
    return folder


@pytest.fixture(scope="module")
def store_and_sae(tiny_store):
    """The tiny store and an untrained Top-K SAE (M=96, K=6) started at the data's median: features to collect statistics of."""
    from fastsae.core.sae import SAESpec, SparseAutoencoder
    from fastsae.store.activation_store import ActivationStore

    store = ActivationStore(tiny_store)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("topk", store.d, 96, 6)).eval()
    sae.initialize_input_bias_(store.activations(0, 2000).float(), "median")
    return store, sae


def interpret_without_llm(checkpoint, model_folder: Path, csv_path: Path, features: str, **settings) -> Path:
    """interpret_sae.py's CSV as it is without an API key (statistics and contexts, no explanation or score), on the CPU."""
    from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae

    config = InterpretConfig(
        checkpoint=str(checkpoint),
        model_name=str(model_folder),
        features=features,
        interpretations_path=str(csv_path),
        explain=False,
        device="cpu",
        **settings,
    )
    return interpret_sae(config)


def hypothesaes_module():
    """HypotheSAEs' own sae.py, loaded by path (its package __init__ imports heavy extras)."""
    folder = importlib.util.find_spec("hypothesaes").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("hypothesaes_sae", Path(folder) / "sae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPLANATION = "the word 'would' in predictions"
RUBRIC_ANSWER = "RATING: 4\nNAME: modal would"


def classifier_prompt_content(messages: list[dict]) -> tuple[str, list[str]]:
    """(explanation, example texts) of a detection or fuzzing prompt, ours or delphi's: its last message reads
    "<...> explanation: E", a blank line, "Text examples:", a blank line, then "Example i: text" per example."""
    head, _, body = messages[-1]["content"].partition("\n\nText examples:\n\n")
    explanation = head.split("explanation: ", 1)[1]
    return explanation, re.split(r"\nExample \d+: ", "\n" + body.removesuffix("\n"))[1:]


class ChatCompletionsServer(ThreadingHTTPServer):
    """Answers /v1/chat/completions; `statuses` queues error codes to return before answering normally (with
    Retry-After: 0 while `retry_after` is set), `bodies` raw (content type, body) replies with status 200 to send then,
    `rubric_answers` the answers to FAST-rubric prompts (then RUBRIC_ANSWER); `answerer`, when set, answers every
    other request from its messages (None: a reply with no choices)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses: list[int] = []
        self.retry_after = True
        self.bodies: list[tuple[str, bytes]] = []
        self.rubric_answers: list[str] = []
        self.answerer: Callable[[list[dict]], str] | None = None
        self.finish_reason = "stop"  # "length": every answer says it stopped at max_tokens
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
            raw = self.server.bodies.pop(0) if status == 200 and self.server.bodies else None
            prompt = body["messages"][-1]["content"]
            rubric_answer = (
                (self.server.rubric_answers.pop(0) if self.server.rubric_answers else RUBRIC_ANSWER) if "RATING:" in prompt else None
            )
        if status != 200:
            error = {"error": {"message": f"simulated {status}", "type": "simulated", "code": status}}
            self._send(status, json.dumps(error).encode(), {"Retry-After": "0"} if self.server.retry_after else {})
            return
        if raw is not None:
            self._send(200, raw[1], {"Content-Type": raw[0]})
            return
        if rubric_answer is not None:
            content = rubric_answer
        elif self.server.answerer is not None:
            content = self.server.answerer(body["messages"])
        elif "\n\nText examples:\n\n" in prompt:
            count = len(classifier_prompt_content(body["messages"])[1])
            content = "Here you go: " + json.dumps([1] * count)  # says yes to every example
        else:
            content = f'"{EXPLANATION}"'
        reply = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": []
            if content is None
            else [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": self.server.finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        self._send(200, json.dumps(reply).encode(), {})

    def _send(self, status: int, data: bytes, headers: dict) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def chat_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatCompletionsServer]:
    """A real HTTP server on 127.0.0.1, with the API key and base URL pointing the openai client at it."""
    running = ChatCompletionsServer()
    threading.Thread(target=running.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()  # a quick shutdown
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("OPENAI_BASE_URL", running.base_url)
    try:
        yield running
    finally:
        running.shutdown()
        running.server_close()
