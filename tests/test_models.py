"""Which model a MODEL_NAME names, and the folder name its stores get."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
from gguf import GGUFWriter
from transformers import LlamaForCausalLM

from conftest import REPO, run_until_killed, write_tiny_gguf
from fastsae.common.errors import UserError
from fastsae.lm import models
from fastsae.lm.models import (
    CACHE_ENV_VAR,
    CACHE_RECORD_FILE,
    EMBEDDED_MODEL,
    ModelSource,
    embedded_gguf_path,
    load_tokenizer,
    model_folder,
    resolve_model,
)
from fastsae.store.activation_store import ActivationStore


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


def write_empty_gguf(path: Path) -> Path:
    """A well-formed GGUF file without tensors: what the readable-GGUF check reads, before the loaders replaced below."""
    writer = GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_interrupted_dequantisation_leaves_no_copy_of_the_weights(tiny_model_folder, tmp_path, monkeypatch):
    """Killed or Ctrl-C'd while the dequantised weights were saved, each attempt used to leave its temp folder in the cache
    for good: a float32 copy of the model (514 MB for SmolLM2, 32 GB for an 8B model)."""
    gguf = write_empty_gguf(tmp_path / "tiny.gguf")
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


def closed_port_url() -> str:
    """A local address where nothing listens: a request there is refused, as on a machine with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_a_hub_model_on_an_offline_machine_fails_fast_or_loads_from_the_hub_cache(tiny_model_folder, texts_file, tmp_path):
    """With no Hub to answer, transformers retried each file for 47 s and then printed a many-line message (not in the
    cache), or took ~3 min of retries to fall back to the cache (in it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache = tmp_path / "hub"
    shutil.copytree(tiny_model_folder, hub_cache / "models--org--tiny" / "snapshots" / commit)
    (hub_cache / "models--org--tiny" / "refs").mkdir()
    (hub_cache / "models--org--tiny" / "refs" / "main").write_text(commit)
    offline = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": closed_port_url(), "HF_HUB_CACHE": str(hub_cache)}

    def extract(model_name: str) -> subprocess.CompletedProcess:
        arguments = ["--model-name", model_name, "--dataset", str(texts_file), "--output-dir", str(tmp_path / "out"), "--layers", "1"]
        script = [sys.executable, str(REPO / "extract_activations.py"), *arguments]
        return subprocess.run(script, env=offline, capture_output=True, text=True, timeout=300)

    started = time.perf_counter()
    missing = extract("org/not-cached")
    assert missing.returncode == 2 and time.perf_counter() - started < 30, missing.stderr
    assert "this machine is offline" in missing.stderr and "set MODEL_NAME to a local copy" in missing.stderr
    assert "Traceback" not in missing.stderr and "Retrying" not in missing.stderr

    started = time.perf_counter()
    cached = extract("org/tiny")
    assert cached.returncode == 0 and time.perf_counter() - started < 60, cached.stderr
    store = ActivationStore(tmp_path / "out" / "org--tiny" / "blocks.1.hook_resid_post")
    assert store.n_examples == 8 and store.manifest.revision == commit  # the weights' commit: new ones upstream are not resumed


def test_a_cache_that_cannot_be_written_is_named_with_its_setting(tiny_model_folder, tmp_path, monkeypatch):
    """The OSError came out as 'could not load the tokenizer' (or the model), naming neither the cache nor FASTSAE_CACHE."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match=f"could not write the dequantised copy of tiny.gguf into the cache .* set {CACHE_ENV_VAR} to"):
        load_tokenizer(resolve_model(str(gguf)))


def test_a_gguf_cut_short_stops_with_one_line(tmp_path, monkeypatch):
    """The embedded GGUF's first 5 MB (its header whole, its tensors cut): transformers' reader failed with a reshape error."""
    cut = tmp_path / "cut.gguf"
    with embedded_gguf_path().open("rb") as whole:
        cut.write_bytes(whole.read(5_000_000))
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    with pytest.raises(UserError, match="cannot be read as a GGUF file .* cut short"):
        load_tokenizer(resolve_model(str(cut)))


def test_every_install_of_the_embedded_model_shares_one_dequantised_copy(tmp_path):
    """Its cache was keyed by the GGUF's path and time: each virtual environment (each CI run) dequantised its own
    copy again, 20 s and hundreds of MB each, and none was ever removed."""
    installed = resolve_model(EMBEDDED_MODEL)
    elsewhere = tmp_path / "another-venv" / Path(installed.location).name  # the same package installed elsewhere
    elsewhere.parent.mkdir()
    shutil.copy(installed.location, elsewhere)  # another path, another modification time
    assert model_folder(ModelSource(installed.name, "embedded", str(elsewhere))) == model_folder(installed)


def test_a_new_copy_of_a_gguf_removes_the_copies_of_its_earlier_versions_only(tmp_path, monkeypatch, caplog):
    """A GGUF rewritten in place, or the embedded package upgraded, got a new copy in the cache while the old one stayed
    for good: 23 stale copies of SmolLM2 (12 GB) on one machine. Another file's copies, and a copy an older fastsae left
    without a record of what it was made from, stay."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    gguf, elsewhere = tmp_path / "model.gguf", tmp_path / "elsewhere" / "model.gguf"
    elsewhere.parent.mkdir()
    first = Path(model_folder(resolve_model(str(write_tiny_gguf(gguf)))))
    other_file = Path(model_folder(resolve_model(str(write_tiny_gguf(elsewhere)))))
    unrecorded = first.with_name("model-0123456789ab")  # as older fastsae versions wrote them
    shutil.copytree(first, unrecorded, ignore=shutil.ignore_patterns(CACHE_RECORD_FILE))

    write_tiny_gguf(gguf, seed=1)  # new weights under the same name
    os.utime(gguf, ns=(time.time_ns(), first.stat().st_mtime_ns + 10**9))  # a later time even where the clock is coarse
    monkeypatch.setattr(models, "UNATTRIBUTED_COPIES_REPORT_BYTES", 0)  # a tiny copy is far below the 1 GiB it takes to be named
    with caplog.at_level(logging.INFO, logger="fastsae.lm.models"):
        second = Path(model_folder(resolve_model(str(gguf))))
    assert sorted(first.parent.iterdir()) == sorted([second, other_file, unrecorded])
    assert f"Removed 1 dequantised copy of earlier versions of {gguf} from the cache" in caplog.text
    assert "also holds 1 dequantised copy that older fastsae versions wrote" in caplog.text

    # The embedded model's copies are its package's, wherever it is installed: another version replaces them.
    def embedded_at(path: Path) -> Path:
        return Path(model_folder(ModelSource(EMBEDDED_MODEL, "embedded", str(path))))

    embedded = embedded_at(gguf)
    shutil.copy(gguf, elsewhere)  # the same weights elsewhere (another virtual environment)
    assert embedded_at(elsewhere) == embedded
    with elsewhere.open("ab") as grown:
        grown.write(bytes(32))  # another version of the package's file
    upgraded = embedded_at(elsewhere)
    assert sorted(first.parent.iterdir()) == sorted([second, other_file, unrecorded, upgraded])
