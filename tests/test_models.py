"""Which model a MODEL_NAME names, and the folder name its stores get."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
from transformers import LlamaForCausalLM

from conftest import REPO, run_until_killed
from fastsae.common.errors import UserError
from fastsae.lm.models import CACHE_ENV_VAR, EMBEDDED_MODEL, load_tokenizer, model_folder, resolve_model


def test_gguf_store_names_keep_the_version_and_quantisation(tmp_path):
    names = ["Llama-3.1-8B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct-Q8_0.gguf", "model.Q4_1.GGUF"]
    for name in names:
        (tmp_path / name).write_bytes(b"GGUF" + bytes(60))  # resolve_model reads only the magic number
    slugs = [resolve_model(str(tmp_path / name)).slug for name in names]
    assert slugs == ["Llama-3.1-8B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct-Q8_0", "model.Q4_1"]


def test_the_embedded_model_keeps_its_store_name():
    assert resolve_model(EMBEDDED_MODEL).slug == "SmolLM2-135M-Instruct"  # DEFAULT_STORE and existing stores use it


def load_tiny_as_gguf(set_attribute: Callable, tiny_folder: Path, after_weights_saved: Callable[[], None]) -> None:
    """transformers' loaders, replaced so that a GGUF file loads as the tiny Llama (as a dequantised GGUF model comes back);
    `after_weights_saved` runs once its weights are in the cache's temp folder."""
    load_tokenizer = transformers.AutoTokenizer.from_pretrained

    def load_model(*args, **kwargs) -> LlamaForCausalLM:
        model = LlamaForCausalLM.from_pretrained(tiny_folder)
        model.config.quantization_config = {}
        save = model.save_pretrained

        def save_then(path, **settings) -> None:
            save(path, **settings)
            after_weights_saved()

        model.save_pretrained = save_then
        return model

    set_attribute(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    set_attribute(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: load_tokenizer(tiny_folder))


def test_an_interrupted_dequantisation_leaves_no_copy_of_the_weights(tiny_model_folder, tmp_path, monkeypatch):
    """Killed or Ctrl-C'd while the dequantised weights were saved, each attempt used to leave its temp folder in the cache
    for good: a float32 copy of the model (514 MB for SmolLM2, 32 GB for an 8B model)."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    run_until_killed(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_models import load_tiny_as_gguf\n"
        "from fastsae.lm.models import model_folder, resolve_model\n"
        f"load_tiny_as_gguf(setattr, {str(tiny_model_folder)!r}, kill_here)\n"
        f"model_folder(resolve_model({str(gguf)!r}))\n",
        cwd=tmp_path,
    )
    assert len(list((cache / "dequantized").glob("*.partial-*"))) == 1

    def control_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    load_tiny_as_gguf(monkeypatch.setattr, tiny_model_folder, control_c)
    with pytest.raises(KeyboardInterrupt):
        model_folder(resolve_model(str(gguf)))
    assert not list((cache / "dequantized").iterdir())
    load_tiny_as_gguf(monkeypatch.setattr, tiny_model_folder, lambda: None)
    folder = Path(model_folder(resolve_model(str(gguf))))
    assert (folder / "config.json").is_file() and [path.name for path in (cache / "dequantized").iterdir()] == [folder.name]


def test_an_unknown_embedded_name_names_the_embedded_model():
    """`embedded:smollm2` was taken for a Hub id and failed on the Hub's repo-name rules, naming no valid choice."""
    with pytest.raises(UserError, match=f"the one embedded model is '{EMBEDDED_MODEL}'"):
        resolve_model("embedded:smollm2")


def test_a_model_folder_without_a_tokenizer_stops_with_one_line(tiny_model_folder, tmp_path):
    """transformers' own error is a ValueError about converting slow tokenizers, which the scripts showed as a traceback."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for path in tiny_model_folder.iterdir():
        if not path.name.startswith(("tokenizer", "chat_template")):
            (folder / path.name).symlink_to(path)
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_tokenizer(resolve_model(str(folder)))
