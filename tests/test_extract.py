"""Extraction on a tiny random Llama: equal to running each example alone, resumable, and strict about bad input."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import FAMILY_SHAPES, TEXTS, TINY_LAYERS, make_tiny_llama, run_until_killed, write_jsonl
from fastsae.common.errors import UserError
from fastsae.extract import extract_activations as extract_module
from fastsae.extract.extract_activations import (
    CPU_BATCH_TOKENS,
    GPU_BATCH_TOKENS,
    ExtractConfig,
    extract_activations,
    forward_batches,
    length_batches,
    write_activation_stores,
)
from fastsae.extract.packed_batches import pack_rows, packed_row_tokens, packed_tokens
from fastsae.lm.data import load_dataset
from fastsae.lm.hook_points import hooked_module, output_tensor
from fastsae.lm.tokenization import tokenize_examples
from fastsae.store.activation_store import ActivationStore, StoreError
from fastsae.train.train_sae import TrainConfig, TrainingRun

REPO = Path(__file__).resolve().parents[1]


def extract(model, tokenizer, texts_file: Path, output_dir: Path, **overrides) -> list[Path]:
    settings = dict(dataset=str(texts_file), output_dir=str(output_dir), storage_dtype="float32", batch_tokens=600, shard_mb=0.02)
    settings.update(overrides)
    config = ExtractConfig(**settings)
    dataset = load_dataset(config.dataset, max_examples=config.max_examples)
    return write_activation_stores(model, tokenizer, dataset, config, "tiny")


def alone(model, token_ids: np.ndarray, layer: int, hook_point: str) -> torch.Tensor:
    """The reference: one example, full forward, no padding, no early stop."""
    input_ids = torch.from_numpy(token_ids.astype(np.int64))[None]
    if hook_point == "resid_post":
        with torch.no_grad():
            return model(input_ids, output_hidden_states=True).hidden_states[layer + 1][0]
    seen = {}

    def record(module, inputs, output) -> None:
        seen["x"] = output_tensor(output)

    handle = hooked_module(model, layer, hook_point).register_forward_hook(record)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.remove()
    return seen["x"][0]


def max_relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest per-token relative error ||a_t - e_t|| / ||e_t||: strict for small tokens and huge ones alike."""
    actual, expected = actual.float(), expected.float()
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def store_arrays(folder: Path) -> dict[str, np.ndarray]:
    store = ActivationStore(folder)
    chunk = store.chunk(0, store.n_tokens)
    return {
        "activations": chunk.activations.numpy(),
        "token_ids": chunk.token_ids,
        "special_mask": chunk.special_mask,
        "offsets": store.doc_offsets,
    }


# Packed rows of 512 tokens hold every example of a shard (at most 81 tokens here) in one row.
BATCHINGS = {"padded": {"batching": "padded"}, "packed": {"batching": "packed", "row_tokens": 512}}


@pytest.mark.parametrize("batching", list(BATCHINGS))
@pytest.mark.parametrize("hook_point", ["resid_post", "mlp_out", "attn_out"])
def test_batched_extraction_equals_each_example_alone(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, hook_point, batching):
    folders = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[0, 2], hook_point=hook_point, **BATCHINGS[batching])
    assert [folder.name for folder in folders] == [f"blocks.0.hook_{hook_point}", f"blocks.2.hook_{hook_point}"]
    for layer, folder in zip([0, 2], folders):
        store = ActivationStore(folder)
        assert store.manifest.extraction["batching"] == batching
        assert store.n_examples == 8 and len(store.shards) > 1  # several shards and batches are exercised
        assert max(shard.n_examples for shard in store.shards) > 1  # so a packed row holds several examples
        lengths = np.diff(store.doc_offsets)
        assert len(set(lengths.tolist())) > 4  # examples of different lengths share batches
        for index in range(store.n_examples):
            example = store.example(index)
            expected = alone(tiny_llama, example.token_ids, layer, hook_point)
            assert example.activations.shape == expected.shape
            assert max_relative_difference(example.activations, expected) < 1e-4


def test_store_records_tokens_labels_and_template_mask(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    store = ActivationStore(folder)
    records = store.example_records()
    assert [record["label"] for record in records][:2] == ["planning", "reconsidering"]
    example = store.example(1)
    content = example.token_ids[~example.special_mask]
    assert smollm2_tokenizer.decode(content) == "Maybe I was wrong about her."
    assert example.special_mask[0]  # <|im_start|> is kept in the store, marked special
    assert store.manifest.hook_name == "blocks.1.hook_resid_post" and store.manifest.d == 64
    assert store.manifest.n_special_tokens == int(sum(store.example(i).special_mask.sum() for i in range(store.n_examples)))


def test_store_reads_across_shards_and_in_chunks(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    store = ActivationStore(folder)
    boundary = store.shards[1].first_token
    spanning = store.activations(boundary - 3, boundary + 3)
    expected = torch.cat([store.activations(boundary - 3, boundary), store.activations(boundary, boundary + 3)])
    assert torch.equal(spanning, expected)
    every_example = torch.cat([store.example(i).activations for i in range(store.n_examples)])
    chunks = list(store.iter_chunks(37))
    assert [chunk.start for chunk in chunks] == list(range(0, store.n_tokens, 37))
    assert torch.equal(torch.cat([chunk.activations for chunk in chunks]), every_example)
    with pytest.raises(IndexError):
        store.activations(0, store.n_tokens + 1)


@pytest.mark.parametrize("resumed_with", ["padded", "packed"])
def test_interrupted_run_resumes_to_the_same_store(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, resumed_with, caplog):
    """Interrupted with padded batches, resumed either way: the batching path is not a setting that refuses a resume."""
    (reference,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "uninterrupted", layers=[1], batching="padded")

    calls = {"n": 0}

    def crash_after_three_batches(module, inputs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")

    handle = tiny_llama.model.layers[0].register_forward_pre_hook(crash_after_three_batches)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "interrupted", layers=[1], batching="padded")
    finally:
        handle.remove()
    folder = tmp_path / "interrupted" / "tiny" / "blocks.1.hook_resid_post"
    written = sorted(path.name for path in folder.glob("shard_*"))
    assert written and len(written) < len(ActivationStore(reference).shards)
    assert not list(folder.glob("*.partial"))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(folder)

    with caplog.at_level(logging.INFO):
        extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "interrupted", layers=[1], **BATCHINGS[resumed_with])
    n_shards = len(ActivationStore(reference).shards)
    assert (
        f"Resuming: {len(written)} of {n_shards} shards are on disk from an earlier run; extracting the other {n_shards - len(written)}."
        in caplog.text
    )
    assert ActivationStore(folder).manifest.extraction["batching"] == resumed_with
    resumed, uninterrupted = store_arrays(folder), store_arrays(reference)
    for name in ("token_ids", "special_mask", "offsets"):
        assert np.array_equal(resumed[name], uninterrupted[name]), name
    if resumed_with == "padded":
        assert np.array_equal(resumed["activations"], uninterrupted["activations"])
    else:
        assert max_relative_difference(torch.from_numpy(resumed["activations"]), torch.from_numpy(uninterrupted["activations"])) < 1e-4


def test_a_run_killed_while_it_starts_the_store_resumes(tiny_model_folder, texts_file, tmp_path):
    """Killed after the store's first file and before its manifest, the rerun of the same command used to refuse the folder
    as "not empty and holds no store manifest"."""
    args = ["--model-name", str(tiny_model_folder), "--dataset", str(texts_file), "--output-dir", str(tmp_path / "out"), "--layers", "1"]
    run_until_killed(
        "import runpy, sys\n"
        "from fastsae.store import activation_store\n"
        "activation_store._write_json_lines = lambda path, records: kill_here()  # examples.jsonl, after doc_offsets.npy\n"
        f"sys.argv = ['extract_activations.py', *{args!r}]\n"
        f"runpy.run_path({str(REPO / 'extract_activations.py')!r}, run_name='__main__')\n",
        cwd=tmp_path,
    )
    done = run_script(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "out" / "tiny-llama" / "blocks.1.hook_resid_post"
    assert ActivationStore(folder).n_examples == 8 and not list(folder.parent.glob("*.partial"))


def test_rerun_with_other_settings_is_refused_unless_overwrite(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    with pytest.raises(UserError, match=r"different settings.*max_length.*--overwrite"):
        extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1], max_length=16)
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1], max_length=16, overwrite=True)
    store = ActivationStore(folder)
    assert np.diff(store.doc_offsets).max() == 16
    assert store.manifest.dataset.n_truncated == int((np.diff(store.doc_offsets) == 16).sum())


def test_the_manifest_counts_chat_messages_the_template_hides(tiny_llama, smollm2_tokenizer, tmp_path):
    """Their tokens are marked special and so left out of training: a reader of the store should not need the log to know."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (  # drops system messages
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    )
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan my morning."}]
    rows = [{"messages": chat}, {"messages": chat[1:]}, {"messages": chat}]
    (folder,) = extract(tiny_llama, tokenizer, write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out", layers=[1])
    assert ActivationStore(folder).manifest.dataset.n_unlocated_messages == 2
    (plain,) = extract(tiny_llama, tokenizer, write_jsonl(tmp_path / "plain.jsonl", rows[1:2]), tmp_path / "plain", layers=[1])
    assert ActivationStore(plain).manifest.dataset.n_unlocated_messages == 0


def test_new_weights_saved_into_a_model_folder_are_not_taken_for_the_stored_ones(
    tiny_model_folder, smollm2_tokenizer, texts_file, tmp_path
):
    model_folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model_folder, model_folder)
    config = ExtractConfig(model_name=str(model_folder), dataset=str(texts_file), layers=[1], output_dir=str(tmp_path / "out"))
    (folder,) = extract_activations(config)
    manifest_written = (folder / "manifest.json").stat().st_mtime_ns
    assert (
        extract_activations(config) == [folder] and (folder / "manifest.json").stat().st_mtime_ns == manifest_written
    )  # unchanged files: current

    retrained = make_tiny_llama(len(smollm2_tokenizer), seed=1)
    retrained.save_pretrained(model_folder)
    with pytest.raises(UserError, match=rf"{folder}.*different settings.*model_files_fingerprint.*--overwrite"):
        extract_activations(config)
    (folder,) = extract_activations(replace(config, overwrite=True))
    example = ActivationStore(folder).example(0)
    assert max_relative_difference(example.activations, alone(retrained, example.token_ids, 1, "resid_post")) < 1e-2  # float16 on disk


def test_sequences_past_a_learned_position_table_are_refused_and_past_a_rotary_context_warned(
    tiny_llama, smollm2_tokenizer, tmp_path, caplog
):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    short = {"text": "Ok."}
    texts = write_jsonl(tmp_path / "texts.jsonl", [short, {"text": " ".join(["word"] * 50)}])
    plain = dict(layers=[1], chat_template="none")
    with pytest.raises(UserError, match=r"MAX_LENGTH = 64 .* 32 positions GPT2LMHeadModel .*1 of 2 do.*Set MAX_LENGTH to 32 or less"):
        extract(gpt2, smollm2_tokenizer, texts, tmp_path / "too-long", max_length=64, **plain)
    assert not list((tmp_path / "too-long").rglob("manifest.json"))
    with pytest.raises(UserError, match=r"BLOCK_SIZE = 48 .* 32 positions.*Set BLOCK_SIZE to 32 or less"):
        extract(gpt2, smollm2_tokenizer, texts, tmp_path / "blocks", packing="block", block_size=48, **plain)
    (folder,) = extract(gpt2, smollm2_tokenizer, texts, tmp_path / "truncated", max_length=32, **plain)
    assert np.diff(ActivationStore(folder).doc_offsets).max() == 32
    # MAX_LENGTH is a cap: above the table, but with no example that long, nothing runs past it.
    extract(gpt2, smollm2_tokenizer, write_jsonl(tmp_path / "short.jsonl", [short]), tmp_path / "short", max_length=64, **plain)

    tiny_llama.config.max_position_embeddings = 32  # rotary: a longer sequence runs, at positions it was not trained on
    try:
        (folder,) = extract(tiny_llama, smollm2_tokenizer, texts, tmp_path / "rotary", max_length=64, **plain)
    finally:
        tiny_llama.config.max_position_embeddings = 1024
    assert np.diff(ActivationStore(folder).doc_offsets).max() > 32
    assert "MAX_LENGTH = 64 lets sequences run past the 32 positions LlamaForCausalLM was trained on" in caplog.text


def test_disk_check_refuses_before_writing(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, monkeypatch):
    monkeypatch.setattr("fastsae.store.activation_store.free_disk_bytes", lambda folder: 10 * 2**20)
    with pytest.raises(UserError, match="not enough disk space"):
        extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    assert not any(tmp_path.rglob("*.npy"))


# Run in a user and mount namespace of its own (no root needed), on a 4 MiB tmpfs that another file fills once the first
# shard is on it. The tiny disk stands for a large one: its margin is set to 0 so the check before the run passes.
FULL_DISK_RUN = """
import os, shutil, subprocess, sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import make_tiny_llama
from test_extract import extract, store_arrays
from fastsae.common.errors import UserError
from fastsae.lm.models import EMBEDDED_MODEL, load_tokenizer, resolve_model
from fastsae.store import activation_store

disk, texts, reference = {disk!r}, {texts!r}, {reference!r}
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", disk], check=True)
activation_store.DISK_MARGIN_BYTES = 0
tokenizer = load_tokenizer(resolve_model(EMBEDDED_MODEL))
model = make_tiny_llama(len(tokenizer))
store = os.path.join(disk, "tiny", "blocks.1.hook_resid_post")

def fill_the_disk(module, inputs):
    if os.path.isdir(os.path.join(store, "shard_00000")) and not os.path.exists(os.path.join(disk, "other")):
        with open(os.path.join(disk, "other"), "wb") as other:
            os.posix_fallocate(other.fileno(), 0, shutil.disk_usage(disk).free - 4096)

hook = model.model.layers[0].register_forward_pre_hook(fill_the_disk)
try:
    extract(model, tokenizer, texts, disk, layers=[1])
except UserError as error:
    print(error)
hook.remove()
assert not [name for name in os.listdir(store) if name.endswith(".partial")], os.listdir(store)
os.remove(os.path.join(disk, "other"))
extract(model, tokenizer, texts, disk, layers=[1])
(whole,) = extract(model, tokenizer, texts, reference, layers=[1])
for name, values in store_arrays(store).items():
    assert np.array_equal(values, store_arrays(whole)[name]), name
"""


def own_mount_namespace() -> list[str]:
    """The command prefix that runs a command in a user and mount namespace of its own, where it may mount a disk without
    root; the test is skipped where there are none."""
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run([*namespace, "true"], capture_output=True).returncode:
        pytest.skip("no user and mount namespaces here to mount a small disk in")
    return namespace


def test_a_store_on_a_read_only_disk_is_refused_in_one_line(tiny_model_folder, texts_file, tmp_path):
    """It stopped with an OSError traceback from the first mkdir. (On a read-only mount, as root cannot be kept out of a
    folder by its permissions; EACCES, a folder of another user's, takes the same path.)"""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = ["--model-name", str(tiny_model_folder), "--dataset", str(texts_file), "--output-dir", str(disk), "--layers", "1"]
    script = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(disk))} && {shlex.join([sys.executable, str(REPO / 'extract_activations.py'), *args])}"
    done = subprocess.run(
        [*own_mount_namespace(), "sh", "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(
        rf"error: cannot write the store at {disk}/tiny-llama/blocks\.1\.hook_resid_post: Read-only file system \(\S+\)\. "
        r"Set OUTPUT_DIR to a folder you can write to, or make this one writable\.",
        done.stderr,
    ), done.stderr


def test_a_disk_that_fills_up_mid_extraction_stops_with_the_space_needed_and_the_rerun_resumes(texts_file, tmp_path):
    """A real full disk (ENOSPC): numpy reported it as "N requested and M written", a traceback with no errno to tell a
    full disk by."""
    (tmp_path / "disk").mkdir()
    code = FULL_DISK_RUN.format(
        tests=str(REPO / "tests"), disk=str(tmp_path / "disk"), texts=str(texts_file), reference=str(tmp_path / "ref")
    )
    done = subprocess.run(
        [*own_mount_namespace(), sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"the disk holding \S+/blocks\.1\.hook_resid_post is full \(No space left on device\): the store still needs about "
        r"[\d.]+ KiB for its \d+ unwritten shards .* is free\. Free some space and rerun the same command: it keeps the [1-9]\d* "
        r"shards written and resumes\. Or set OUTPUT_DIR to a disk with room\.\n",
        done.stdout,
    ), done.stdout


# An extraction that pauses once its first shard is on disk, until the test lets it go on.
PAUSED_RUN = """
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import make_tiny_llama
from test_extract import extract
from fastsae.lm.models import EMBEDDED_MODEL, load_tokenizer, resolve_model

output, texts, paused, go = {output!r}, {texts!r}, {paused!r}, {go!r}
tokenizer = load_tokenizer(resolve_model(EMBEDDED_MODEL))
model = make_tiny_llama(len(tokenizer))

def pause(module, inputs):
    if os.path.isdir(os.path.join(output, "tiny", "blocks.1.hook_resid_post", "shard_00000")) and not os.path.exists(go):
        open(paused, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)

model.model.layers[0].register_forward_pre_hook(pause)
extract(model, tokenizer, texts, output, layers=[1])
"""


@contextmanager
def extraction_paused_after_its_first_shard(output: Path, texts_file: Path, tmp_path: Path) -> Iterator[None]:
    """An extraction in another process into `output` (layer 1 of the tiny Llama, as `extract` writes it), held after
    its first shard until the block ends; then it finishes, and must succeed."""
    paused, go = tmp_path / "paused", tmp_path / "go"
    code = PAUSED_RUN.format(tests=str(REPO / "tests"), output=str(output), texts=str(texts_file), paused=str(paused), go=str(go))
    running = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert running.poll() is None and time.monotonic() < deadline, (
                running.stderr.read() if running.poll() is not None else "no pause"
            )
            time.sleep(0.05)
        yield
    finally:
        go.touch()
        _, errors = running.communicate(timeout=300)
    assert running.returncode == 0, errors


def test_a_second_extraction_into_a_store_being_written_is_refused(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    """Two processes shared each shard's one `.partial` name, so one deleted the other's half-written shard (a
    FileNotFoundError), and one with --overwrite deleted the running one's store, which went on writing its shards into
    the new one: a mix of two extractions' shards, unnoticed where their shapes agree."""
    output = tmp_path / "out"
    with extraction_paused_after_its_first_shard(output, texts_file, tmp_path):
        for overwrite in (False, True):
            with pytest.raises(UserError, match=r"another extraction is writing \S+/blocks\.1\.hook_resid_post .*Let it finish"):
                extract(tiny_llama, smollm2_tokenizer, texts_file, output, layers=[1], overwrite=overwrite)
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, output, layers=[1])  # once it is done, the store is there
    (reference,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "reference", layers=[1])
    for name, values in store_arrays(reference).items():
        assert np.array_equal(store_arrays(folder)[name], values), name


def test_training_on_a_store_an_extraction_is_writing_is_refused_with_wait_not_rerun(texts_file, tmp_path):
    """Training opened the half-written store as an interrupted one, and its message said to rerun the extraction,
    which the running one's lock refuses. Only a consistent store opens: the whole one, once the extraction is done."""
    output = tmp_path / "out"
    folder = output / "tiny" / "blocks.1.hook_resid_post"
    config = TrainConfig(store=str(folder), output_dir=str(tmp_path / "checkpoints"), m=32, k=4, batch_size=16, epochs=1.0)
    with extraction_paused_after_its_first_shard(output, texts_file, tmp_path):
        with pytest.raises(StoreError, match=r"an extraction is writing the store at \S+ now .*Wait for it to finish, then rerun\.$"):
            TrainingRun(config)
    assert TrainingRun(config).store.n_examples == 8


def test_a_store_whose_extraction_was_killed_names_the_rerun(tiny_model_folder, texts_file, tmp_path):
    """Once the process that held the lock is gone, the half store is an interrupted one: resume it."""
    args = ["--model-name", str(tiny_model_folder), "--dataset", str(texts_file), "--output-dir", str(tmp_path / "out"), "--layers", "1"]
    run_until_killed(
        "import runpy, sys\n"
        "from fastsae.store.activation_store import ActivationStoreWriter\n"
        "ActivationStoreWriter.write_shard = lambda *args: kill_here()\n"
        f"sys.argv = ['extract_activations.py', *{args!r}, '--shard-mb', '0.02']\n"
        f"runpy.run_path({str(REPO / 'extract_activations.py')!r}, run_name='__main__')\n",
        cwd=tmp_path,
    )
    with pytest.raises(StoreError, match=r"incomplete \(an interrupted extraction\)\. Rerun extract_activations\.py"):
        ActivationStore(tmp_path / "out" / "tiny-llama" / "blocks.1.hook_resid_post")


def test_a_store_once_open_reads_as_it_was_while_a_rerun_with_overwrite_replaces_it(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    """Readers take no lock, so nothing they read may change under them. The shards did not, but the labels were read
    from the folder when asked for: a reader got the new store's labels beside the old store's activations."""
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    opened, before = ActivationStore(folder), store_arrays(folder)
    labels = [record["label"] for record in opened.example_records()]
    relabelled = write_jsonl(tmp_path / "relabelled.jsonl", [{"text": text, "label": "other"} for text in TEXTS])
    extract(tiny_llama, smollm2_tokenizer, relabelled, tmp_path, layers=[1], max_length=16, overwrite=True)
    assert [record["label"] for record in ActivationStore(folder).example_records()] == ["other"] * len(TEXTS)
    assert [record["label"] for record in opened.example_records()] == labels
    chunk = opened.chunk(0, opened.n_tokens)
    assert np.array_equal(chunk.activations.numpy(), before["activations"]) and np.array_equal(chunk.token_ids, before["token_ids"])


def test_layer_out_of_range_names_the_valid_range(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    with pytest.raises(UserError, match=rf"0\.\.{TINY_LAYERS - 1}"):
        extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[TINY_LAYERS])
    assert not list(tmp_path.rglob("manifest.json"))


def test_block_packing_concatenates_and_cuts(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    (sequential,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    (blocks,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1], packing="block", block_size=32)
    assert blocks.name == "blocks.1.hook_resid_post-block32"
    fast, packed = ActivationStore(sequential), ActivationStore(blocks)
    assert packed.n_tokens == fast.n_tokens
    assert np.array_equal(packed.token_ids(0, packed.n_tokens), fast.token_ids(0, fast.n_tokens))
    assert set(np.diff(packed.doc_offsets)[:-1].tolist()) == {32}
    block = packed.example(1)
    assert max_relative_difference(block.activations, alone(tiny_llama, block.token_ids, 1, "resid_post")) < 1e-4
    # Across a document boundary inside a block, the activations differ from FAST ones: that is the point.
    assert not torch.allclose(packed.activations(32, 64), fast.activations(32, 64), atol=1e-3)


# Families the packing check lets pack (learned positions, a parallel block, soft-capped eager attention) and families it
# sends to padded batches, because their rows' examples would see each other: OPT, MPT (ALiBi), GPT-OSS, and hybrids whose
# convolution, state-space or recurrent layers carry state along a row. (BLOOM has its own test, below.)
PACKING_FAMILIES = {
    "gpt2": ("packed", dict(n_embd=64, n_layer=3, n_head=4)),
    "falcon": ("packed", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)),
    "gemma2": ("packed", dict(FAMILY_SHAPES, query_pre_attn_scalar=16)),
    "opt": ("padded", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64)),
    "mpt": ("padded", dict(d_model=64, n_layers=3, n_heads=4)),
    "gpt_oss": ("padded", dict(FAMILY_SHAPES, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 3)),
    "lfm2": ("padded", dict(FAMILY_SHAPES, layer_types=["conv", "full_attention", "conv"])),
    "jamba": (
        "padded",
        dict(FAMILY_SHAPES, num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, mamba_d_state=4),
    ),
    "recurrent_gemma": ("padded", dict(FAMILY_SHAPES, lru_width=64, block_types=["recurrent", "attention", "recurrent"])),
}


@pytest.mark.parametrize("model_type", PACKING_FAMILIES)
def test_auto_batching_gives_every_example_of_each_family_its_activations_alone(model_type, smollm2_tokenizer, texts_file, tmp_path):
    """The packing check decides per model, so its verdict is held to the reference in every family whose attention
    or mixing layers differ: packed where the model keeps the examples of a row apart, padded where it would not."""
    batching, shapes = PACKING_FAMILIES[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **dict(shapes, vocab_size=len(smollm2_tokenizer), pad_token_id=0))
    model = AutoModelForCausalLM.from_config(config).eval()
    (folder,) = extract(model, smollm2_tokenizer, texts_file, tmp_path, layers=[1], row_tokens=600)  # every example in one row
    store = ActivationStore(folder)
    assert store.manifest.extraction["batching"] == batching
    for index in range(store.n_examples):
        example = store.example(index)
        assert max_relative_difference(example.activations, alone(model, example.token_ids, 1, "resid_post")) < 1e-4


def test_auto_falls_back_to_padded_batches_where_packed_examples_would_see_each_other(smollm2_tokenizer, texts_file, tmp_path, caplog):
    """BLOOM builds its own causal mask (with ALiBi) and ignores position ids: packed examples would attend to each other."""
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, n_layer=3, n_head=4)).eval()
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        (folder,) = extract(bloom, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    assert "padded length batches, because BloomForCausalLM under the eager kernel lets the examples packed in one row see" in caplog.text
    assert "flex_attention" not in caplog.text  # on a CPU, auto keeps the model's own kernel
    store = ActivationStore(folder)
    assert store.manifest.extraction["batching"] == "padded"
    for index in range(store.n_examples):
        example = store.example(index)
        assert max_relative_difference(example.activations, alone(bloom, example.token_ids, 1, "resid_post")) < 1e-4
    with pytest.raises(UserError, match="BATCHING = packed, but BloomForCausalLM"):
        extract(bloom, smollm2_tokenizer, texts_file, tmp_path / "forced", layers=[1], batching="packed")


def test_the_packing_check_measures_against_the_rows_own_rounding(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, monkeypatch, caplog):
    """With no fixed floor, a Llama still packs (the example behind another moves by rounding, as the one starting the
    row does, ~1e-8 in float32) and BLOOM still falls back: what decides is the comparison within the packed batch."""
    monkeypatch.setattr(extract_module, "PACKING_TOLERANCE_FLOAT32", 0.0)
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, n_layer=3, n_head=4)).eval()
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        (llama_store,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "llama", layers=[1])
        (bloom_store,) = extract(bloom, smollm2_tokenizer, texts_file, tmp_path / "bloom", layers=[1])
    assert ActivationStore(llama_store).manifest.extraction["batching"] == "packed"
    assert ActivationStore(bloom_store).manifest.extraction["batching"] == "padded"
    assert "keeps them apart: packed behind another" in caplog.text and "see each other: packed behind another" in caplog.text


def test_auto_attention_packs_under_flex_attention_where_the_device_calls_for_it(
    tiny_llama, smollm2_tokenizer, texts_file, tmp_path, monkeypatch, caplog
):
    """The GPU rule (flex attention first for packed rows of a large extraction) run on the CPU: one row as wide as the
    batch, every example as it is alone, and the model handed back with its own kernel. BLOOM cannot run flex attention
    and falls back."""
    monkeypatch.setattr(extract_module, "FLEX_ATTENTION_DEVICES", ("cpu",))
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):  # 8 texts: too few to pay for compiling it
        (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "small", layers=[1])
    assert "not flex_attention: 307 tokens are too few to pay for compiling it" in caplog.text
    assert ActivationStore(folder).manifest.extraction["attention"] == "sdpa"
    monkeypatch.setattr(extract_module, "FLEX_ATTENTION_MIN_TOKENS", 0)
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "llama", layers=[1])
    assert (
        "Batching: packed rows of up to 600 tokens, no padding between examples (LlamaForCausalLM under the flex_attention kernel"
        in caplog.text
    )
    assert tiny_llama.config._attn_implementation == "sdpa"
    store = ActivationStore(folder)
    assert store.manifest.extraction["attention"] == "flex_attention" and store.manifest.extraction["batching"] == "packed"
    for index in range(store.n_examples):
        example = store.example(index)
        assert max_relative_difference(example.activations, alone(tiny_llama, example.token_ids, 1, "resid_post")) < 1e-4

    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, n_layer=3, n_head=4)).eval()
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        (folder,) = extract(bloom, smollm2_tokenizer, texts_file, tmp_path / "bloom", layers=[1])
    assert (
        "flex_attention cannot run BloomForCausalLM here (ValueError: it keeps eager attention); packed rows get the model's" in caplog.text
    )
    assert ActivationStore(folder).manifest.extraction["attention"] == "eager"
    with pytest.raises(UserError, match="ATTENTION = flex_attention cannot run BloomForCausalLM here .*Set ATTENTION = auto"):
        extract(bloom, smollm2_tokenizer, texts_file, tmp_path / "forced", layers=[1], attention="flex_attention")


def test_attention_named_by_the_user_runs_and_is_recorded(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1], attention="eager")
    store = ActivationStore(folder)
    assert store.manifest.extraction["attention"] == "eager" and store.manifest.extraction["batching"] == "packed"
    assert tiny_llama.config._attn_implementation == "sdpa"
    example = store.example(5)
    assert max_relative_difference(example.activations, alone(tiny_llama, example.token_ids, 1, "resid_post")) < 1e-4


@pytest.mark.parametrize("row_tokens", [0, 600])  # sized for the model (several rows a batch), or as wide as the batch (one)
def test_auto_packs_rows_for_llama(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, caplog, row_tokens):
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1], row_tokens=row_tokens)
    assert f"Batching: packed rows of up to {row_tokens or 50} tokens" in caplog.text
    store = ActivationStore(folder)
    assert store.manifest.extraction["batching"] == "packed" and "batching" not in store.manifest.settings
    assert store.manifest.extraction["attention"] == "sdpa" and "attention" not in store.manifest.settings
    example = store.example(3)
    assert max_relative_difference(example.activations, alone(tiny_llama, example.token_ids, 1, "resid_post")) < 1e-4


def test_packed_rows_hold_every_example_once_within_their_width_and_budget():
    lengths = [5, 50, 17, 17, 3, 49, 1, 30, 30, 30, 64, 2]
    rows = pack_rows(lengths, row_tokens=64)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in row) <= 64 for row in rows)
    assert len(rows) == 5  # 298 tokens: best-fit decreasing needs the fewest 64-token rows here
    sequences = [np.arange(100, 100 + length) for length in lengths]
    batches = list(forward_batches(sequences, batch_tokens=150, pad_token_id=7, row_tokens=64))
    assert sorted(index for batch in batches for row in batch.rows for index in row) == list(range(len(lengths)))
    for batch in batches:
        assert batch.attention_mask is None and batch.input_ids.numel() <= 150
        for row_index, row in enumerate(batch.rows):
            start = 0
            for index in row:  # each example end to end, its positions restarting at 0
                assert torch.equal(batch.input_ids[row_index, start : start + lengths[index]], torch.from_numpy(sequences[index]))
                assert torch.equal(batch.position_ids[row_index, start : start + lengths[index]], torch.arange(lengths[index]))
                start += lengths[index]
            tail = batch.input_ids.shape[1] - start  # the filler at the row's end is an example of its own
            assert torch.equal(batch.input_ids[row_index, start:], torch.full((tail,), 7))
            assert torch.equal(batch.position_ids[row_index, start:], torch.arange(tail))
    with pytest.raises(ValueError, match="does not fit a row of 64"):
        pack_rows([65], row_tokens=64)


def test_rows_as_wide_as_the_batch_go_one_to_a_batch():
    """What flash attention needs: it keeps packed examples apart only in a batch of one row."""
    lengths = np.random.default_rng(0).integers(1, 61, size=300).tolist()
    sequences = [np.zeros(length, dtype=np.int64) for length in lengths]
    batches = list(forward_batches(sequences, batch_tokens=100, pad_token_id=0, row_tokens=100))
    assert [len(batch.rows) for batch in batches] == [1] * len(batches)
    assert len(batches) < len(lengths) / 2  # rows are full, two or more examples each


def test_packed_row_width_trades_filler_against_dense_attention(smollm2_model, smollm2_tokenizer):
    dataset = load_dataset(ExtractConfig().dataset)
    lengths = [len(item.token_ids) for item in tokenize_examples(smollm2_tokenizer, dataset.examples, "auto", 512)]
    assert max(lengths) == 61
    # SmolLM2's attention is dear next to its small matmuls (d=576): narrow rows, 1.5 × the longest example,
    # with 4.2% filler (length batches of 8192 tokens: 10.5% padding).
    width = packed_row_tokens(smollm2_model, lengths, batch_tokens=8192)
    assert width == 91 and 1 - sum(lengths) / packed_tokens(lengths, 8192, width) < 0.05
    tiny = make_tiny_llama(len(smollm2_tokenizer))  # d=64, so attention is dearer still: rows of the longest example
    assert packed_row_tokens(tiny, lengths, batch_tokens=8192) == 61
    tiny.config._attn_implementation = "flash_attention_2"  # attention inside each example only: no filler at all
    assert packed_row_tokens(tiny, lengths, batch_tokens=8192) == 8192


def test_length_batches_stay_within_budget():
    lengths = [5, 50, 17, 17, 3, 49, 1, 30, 30, 30]
    batches = length_batches(lengths, batch_tokens=100)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[index] for index in batch) <= 100
    assert len(batches) <= 5


def test_batch_budget_defaults_by_device_and_always_fits_the_longest_example(monkeypatch):
    assert ExtractConfig(device="cpu").resolved_batch_tokens() == CPU_BATCH_TOKENS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the device's name is read here
    assert ExtractConfig(device="cuda").resolved_batch_tokens() == GPU_BATCH_TOKENS
    monkeypatch.undo()
    assert ExtractConfig(device="cpu", max_length=20000).resolved_batch_tokens() == 20000
    assert ExtractConfig(device="cpu", batch_tokens=1000).resolved_batch_tokens() == 1000
    with pytest.raises(UserError, match="at least MAX_LENGTH"):
        ExtractConfig(batch_tokens=100, max_length=512)
    with pytest.raises(UserError, match="BATCH_TOKENS must be positive, or 0"):
        ExtractConfig(batch_tokens=-1)
    with pytest.raises(UserError, match="ROW_TOKENS .* must be at least MAX_LENGTH"):
        ExtractConfig(row_tokens=100, max_length=512)
    with pytest.raises(UserError, match="ROW_TOKENS must be positive, or 0"):
        ExtractConfig(row_tokens=-1)
    with pytest.raises(UserError, match="MAX_EXAMPLES must be positive, or 0 for every example; got -3"):
        ExtractConfig(max_examples=-3)  # it kept the first example alone
    with pytest.raises(UserError, match="BATCHING must be one of auto, packed, padded"):
        ExtractConfig(batching="pack")
    with pytest.raises(UserError, match="ATTENTION must be one of auto, sdpa, eager, flex_attention"):
        ExtractConfig(attention="flash")


def test_damaged_store_gets_a_clear_error(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    np.save(folder / "shard_00001" / "token_ids.npy", np.zeros(3, dtype=np.int32))
    with pytest.raises(StoreError, match=r"shard_00001/token_ids\.npy holds int32 \(3,\), not the int32 \(\d+,\) its manifest plans"):
        ActivationStore(folder)
    for path in (folder / "shard_00001").iterdir():
        path.unlink()
    (folder / "shard_00001").rmdir()
    with pytest.raises(StoreError, match=r"missing shard_00001\. Rerun extract_activations\.py with the same settings"):
        ActivationStore(folder)


def cut_short(path: Path, size: int | None = None) -> None:
    """What a copy that stopped early (a full disk, a lost connection) leaves: the file's first `size` bytes, half by default."""
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2 if size is None else size)


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_store_damaged_after_it_was_written_names_the_file_and_the_fix(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    """Checked when the store opens, from file headers and sizes alone: these raised numpy's EOFError, ValueError or
    FileNotFoundError, or (a shard left out of the manifest) opened and read past the shards' end."""
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "out", layers=[1])
    damages = {
        "empty shard file": (
            lambda copy: cut_short(copy / "shard_00001" / "activations.npy", 0),
            r"shard_00001/activations\.npy is damaged",
        ),
        "offsets deleted": (lambda copy: (copy / "doc_offsets.npy").unlink(), r"doc_offsets\.npy is damaged or missing.*--overwrite"),
        "offsets cut short": (lambda copy: cut_short(copy / "doc_offsets.npy"), r"doc_offsets\.npy is damaged or missing.*--overwrite"),
        # Its tokens still counted: reading them ran past the shard before.
        "a shard left out": (
            lambda copy: edit_manifest(copy, lambda manifest: manifest["shards"].pop()),
            r"shards in .*manifest\.json hold \d+ tokens of 7 examples, not the \d+ of 8",
        ),
        "a dtype edited": (lambda copy: edit_manifest(copy, lambda manifest: manifest.update(dtype="float8")), "names the dtype 'float8'"),
    }
    for name, (damage, message) in damages.items():
        copy = shutil.copytree(folder, tmp_path / name)
        damage(copy)
        with pytest.raises(StoreError, match=message):
            ActivationStore(copy)

    copy = shutil.copytree(folder, tmp_path / "examples cut short")
    cut_short(copy / "examples.jsonl", (copy / "examples.jsonl").read_text().index("\n") + 1)  # one whole line is left
    with pytest.raises(StoreError, match=r"examples\.jsonl holds 1 examples, the store 8: it is damaged"):
        ActivationStore(copy).example_records()  # the labels interpretation reads: they would have been the first example's alone


def grow(path: Path) -> None:
    """Stray bytes after a file's data: what a copy onto the wrong file, or a disk's fault, can leave."""
    with path.open("ab") as handle:
        handle.write(b"\0" * 8)


def test_a_shard_damaged_on_disk_is_named_and_the_rerun_rewrites_it(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, caplog):
    """A shard grown by stray bytes opened as whole; one cut short was refused, but the rerun its message named found
    the shard's folder, reported every shard extracted, and left the store as it was. Each file's size and header are
    checked against the manifest's plan (no data read, no checksum), and the rerun rewrites the shard that fails."""
    (folder,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
    original = store_arrays(folder)
    damages = {
        "grown": (grow, r"activations\.npy is damaged: \d+ bytes, where its header makes \d+"),
        "cut short": (cut_short, r"activations\.npy is damaged or missing \(mmap length"),
        "another dtype": (
            lambda path: np.save(path, np.load(path).astype(np.float64)),
            r"activations\.npy holds float64 .* not the float32",
        ),
    }
    for name, (damage, message) in damages.items():
        damage(folder / "shard_00001" / "activations.npy")
        with pytest.raises(StoreError, match=message + r".*\. Rerun extract_activations\.py with the same settings: it rewrites the shard"):
            ActivationStore(folder)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, layers=[1])
        assert "Rewriting shard_00001: " in caplog.text, name
        for key, values in store_arrays(folder).items():
            assert np.array_equal(values, original[key]), (name, key)


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "extract_activations.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_script_runs_on_a_model_folder_and_reports_bad_input(tiny_model_folder, texts_file, tmp_path):
    common = ["--dataset", str(texts_file), "--output-dir", str(tmp_path / "out")]
    done = run_script("--model-name", str(tiny_model_folder), "--layers", "1", "3", *common)
    assert done.returncode == 0, done.stderr
    for layer in (1, 3):
        assert ActivationStore(tmp_path / "out" / "tiny-llama" / f"blocks.{layer}.hook_resid_post").n_examples == 8

    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    missing_dataset = tmp_path / "nowhere.jsonl"
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"text": ""}, {"text": 3}])
    cases = [
        (["--model-name", str(tiny_model_folder), "--layers", "4", *common], "layer 4 is out of range"),
        (["--model-name", str(tmp_path / "no" / "such" / "model"), *common], "model not found"),
        (["--model-name", str(not_gguf), *common], "is not a GGUF file"),
        (["--model-name", str(tiny_model_folder), "--layers", "1", "--dataset", str(missing_dataset)], "dataset not found"),
        (["--model-name", str(tiny_model_folder), "--layers", "1", "--dataset", str(all_bad)], "no usable rows"),
        (["--model-name", str(tiny_model_folder), "--packing", "packed", *common], "PACKING must be one of"),
    ]
    # A layer out of range is refused from the model's config, before its weights load (minutes for a large model).
    no_weights = shutil.copytree(tiny_model_folder, tmp_path / "no-weights")
    for weights in no_weights.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    cases.append((["--model-name", str(no_weights), "--layers", "4", *common], "layer 4 is out of range"))
    cases.append((["--model-name", str(no_weights), "--layers", "1", *common], "the weights of model"))
    for args, message in cases:
        failed = run_script(*args)
        assert failed.returncode == 2, (args, failed.stderr)
        assert message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


def test_the_store_records_whether_its_sequences_open_with_bos(tiny_llama, smollm2_tokenizer, texts_file, tmp_path):
    """What an export tells SAELens as prepend_bos: SmolLM2's chat template opens with <|im_start|>, its BOS; its
    tokenizer adds none to plain text."""
    (chat,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "chat", layers=[1])
    (plain,) = extract(tiny_llama, smollm2_tokenizer, texts_file, tmp_path / "plain", layers=[1], chat_template="none")
    assert ActivationStore(chat).manifest.extraction["sequences_start_with_bos"] is True
    assert ActivationStore(plain).manifest.extraction["sequences_start_with_bos"] is False


def test_the_pipeline_counts_a_store_whole_only_while_its_shards_are(tiny_store, tmp_path):
    """A store whose manifest said complete counted as current after a shard was deleted: the pipeline skipped extraction
    and training failed on the missing shard. Now extraction runs again, and the rerun rewrites the shard."""
    from fastsae.common.stage import Output
    from fastsae.extract.extract_activations import ExtractStage

    copy = shutil.copytree(tiny_store, tmp_path / "store")
    assert ExtractStage().outputs_complete([Output(copy)])
    shutil.rmtree(copy / "shard_00000")
    assert not ExtractStage().outputs_complete([Output(copy)])
