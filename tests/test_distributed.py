"""torchrun across processes (gloo on the CPU): extraction and training give what one process gives, and resume."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsae.common.distributed import shares_by_tokens
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.extract.extract_activations import ExtractConfig, extract_activations
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit, TokenSource
from fastsae.train.train_sae import TRAINING_STATE, TrainConfig, TrainingRun, train_saes, validate
from fastsae.train.training_report import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
SHARD_MB = 0.25  # the tiny store (15.7k tokens, d=64) in 8 shards, so two ranks share them
TRAINING = dict(sweep=["topk:128:4"], batch_size=256, epochs=10.0, learning_rate=1e-3, eval_every=20, log_every=5, buffer_tokens=4096)


def torchrun(
    script: str, *arguments: str, processes: int = 2, expect_failure: bool = False, launcher: Path | None = None
) -> subprocess.CompletedProcess:
    """`torchrun script arguments`; with a `launcher`, torchrun starts `launcher python script arguments` in each rank."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={processes}",
        "--standalone",
        *(["--no-python", str(launcher), sys.executable] if launcher else []),
        str(REPO / script),
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert (result.returncode != 0) == expect_failure, result.stderr[-3000:]
    return result


def extraction_arguments(model_folder: Path, output: Path) -> list[str]:
    return ["--model-name", str(model_folder), "--layers", "2", "--output-dir", str(output), "--shard-mb", str(SHARD_MB)]


@pytest.fixture(scope="module")
def one_process_store(tiny_model_folder, tmp_path_factory) -> Path:
    config = ExtractConfig(model_name=str(tiny_model_folder), layers=[2], output_dir=str(tmp_path_factory.mktemp("one")), shard_mb=SHARD_MB)
    (folder,) = extract_activations(config)
    return folder


def assert_same_store(folder: Path, reference: Path) -> None:
    """Same examples, tokens, masks and activations, in the same order; the manifests differ only in provenance."""
    ours, theirs = ActivationStore(folder), ActivationStore(reference)
    assert len(ours.shards) == len(theirs.shards) == 8
    np.testing.assert_array_equal(ours.doc_offsets, theirs.doc_offsets)
    np.testing.assert_array_equal(ours.token_ids(0, ours.n_tokens), theirs.token_ids(0, theirs.n_tokens))
    np.testing.assert_array_equal(ours.special_mask(0, ours.n_tokens), theirs.special_mask(0, theirs.n_tokens))
    # float32 compute in other batch compositions, stored as float16: equal up to one float16 step
    torch.testing.assert_close(ours.activations(0, ours.n_tokens), theirs.activations(0, theirs.n_tokens), rtol=1e-3, atol=1e-3)
    assert ours.example_records() == theirs.example_records()
    provenance = {"completed_at": None, "extracted_by_ranks": None, "extraction": {}}
    assert replace(ours.manifest, **provenance) == replace(theirs.manifest, **provenance)
    where_and_how = {key: ours.manifest.extraction[key] for key in ("output_dir", "overwrite")}
    assert ours.manifest.extraction == {**theirs.manifest.extraction, **where_and_how}


def sorted_rows(tokens: torch.Tensor) -> list[bytes]:
    return sorted(row.tobytes() for row in tokens.numpy())


def test_shares_by_tokens_balance_the_ranks_and_cover_every_item():
    counts = [100] * 9 + [37, 5]
    shares = shares_by_tokens(counts, 4)
    assert sorted(index for share in shares for index in share) == list(range(len(counts)))
    loads = [sum(counts[index] for index in share) for share in shares]
    assert max(loads) - min(loads) <= max(counts)
    assert all(share == sorted(share) for share in shares)
    assert shares_by_tokens([5, 5], 3)[2] == []  # more ranks than items: the last rank idles


def test_training_parts_are_disjoint_and_cover_the_store(tiny_store):
    store = ActivationStore(tiny_store)
    split = ExampleSplit.by_example(store.n_examples, 0.1, 0)
    whole = TokenSource(store, split, validation=False, include_special=False)
    parts = [TokenSource(store, split, validation=False, include_special=False, part=(rank, 3)) for rank in range(3)]
    ranges = [part.part_range for part in parts]
    assert ranges[0][0] == 0 and ranges[-1][1] == store.n_tokens
    assert all(ranges[rank][1] == ranges[rank + 1][0] for rank in range(2))
    streamed = [torch.cat(list(part.epoch(np.random.default_rng(rank)))) for rank, part in enumerate(parts)]
    everything = torch.cat(list(whole.epoch(np.random.default_rng(0))))
    assert sum(len(tokens) for tokens in streamed) == len(everything) == whole.count_tokens()
    assert sorted_rows(torch.cat(streamed)) == sorted_rows(everything)


def test_gathering_rows_across_shards_reads_the_right_ones(one_process_store):
    store = ActivationStore(one_process_store)
    rows = np.sort(np.random.default_rng(0).choice(store.n_tokens, 3000, replace=False))
    assert len(np.unique(np.searchsorted([shard.first_token for shard in store.shards], rows, side="right"))) == 8
    assert torch.equal(store.gather(rows), store.activations(0, store.n_tokens)[torch.from_numpy(rows)])


def test_torchrun_extraction_equals_one_process_and_resumes_per_rank(tiny_model_folder, one_process_store, tmp_path):
    torchrun("extract_activations.py", *extraction_arguments(tiny_model_folder, tmp_path))
    (folder,) = [path.parent for path in tmp_path.rglob("manifest.json")]
    assert_same_store(folder, one_process_store)
    assert json.loads((folder / "manifest.json").read_text())["extracted_by_ranks"] == 2

    # What a kill leaves: the manifest in progress, some shards missing, one half-written.
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "status": "in_progress"}))
    for name in ("shard_00001", "shard_00002", "shard_00006"):
        os.rename(folder / name, folder / f"{name}.partial")
    for name in ("shard_00001", "shard_00002"):
        (folder / f"{name}.partial" / "activations.npy").write_bytes(b"half")
    kept = {path.name: path.stat().st_mtime_ns for path in folder.glob("shard_*") if not path.name.endswith(".partial")}
    torchrun("extract_activations.py", *extraction_arguments(tiny_model_folder, tmp_path))
    assert {
        path.name: path.stat().st_mtime_ns for path in folder.glob("shard_*") if path.name in kept
    } == kept  # only the missing shards ran
    assert not list(folder.glob("*.partial"))
    assert_same_store(folder, one_process_store)


def _extract_on_two_ranks(rank: int, port: int, model_folder: str, output: str) -> None:
    """One rank of the OVERWRITE test: rank 1 creates files with its own umask, so they show which rank made a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    os.umask(0o022 if rank == 0 else 0o077)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        extract_activations(ExtractConfig(model_name=model_folder, layers=[2], output_dir=output, shard_mb=SHARD_MB, overwrite=True))
    finally:
        dist.destroy_process_group()


def test_under_overwrite_only_rank_0_replaces_the_store(tiny_model_folder, one_process_store, tmp_path):
    """The other ranks attach to the folder rank 0 prepared: replacing it again, each of them, made three ranks or more race."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for run in ("into an empty folder", "over the complete store"):
        mp.spawn(_extract_on_two_ranks, args=(port, str(tiny_model_folder), str(tmp_path)), nprocs=2)
        (folder,) = [path.parent for path in tmp_path.rglob("manifest.json")]
        made_by_rank_0 = {
            path.name: path.stat().st_mode & 0o777 for path in (folder, folder / "doc_offsets.npy", folder / "examples.jsonl")
        }
        assert made_by_rank_0 == {folder.name: 0o755, "doc_offsets.npy": 0o644, "examples.jsonl": 0o644}, run
        assert_same_store(folder, one_process_store)


def training_arguments(store: Path, output: Path, settings: dict) -> list[str]:
    arguments = ["--store", str(store), "--output-dir", str(output)]
    for name, value in settings.items():
        arguments += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return arguments


def test_torchrun_training_matches_one_process(one_process_store, tmp_path):
    torchrun("train_sae.py", *training_arguments(one_process_store, tmp_path / "two", TRAINING))
    (two,) = [json.loads(path.read_text()) for path in (tmp_path / "two").rglob("metrics.json")]
    (one,) = train_saes(TrainConfig(store=str(one_process_store), output_dir=str(tmp_path / "one"), **TRAINING))
    assert two["steps"] == one["steps"] and two["tokens_trained"] == one["tokens_trained"]
    assert two["final"]["n_tokens"] == one["final"]["n_tokens"]  # the ranks' validation shares add up to the whole set
    assert abs(two["final"]["fvu"] - one["final"]["fvu"]) < 0.03, (two["final"], one["final"])
    assert two["final"]["fvu"] < 0.6 and two["final"]["l0"] == pytest.approx(4.0)
    sae = load_sae(two["checkpoint"]).sae
    assert sae.spec.m == 128 and sae.spec.k == 4
    # Each rank replayed its own batches: one process cannot resume them (docs/multi_gpu.md), and says how to.
    with pytest.raises(UserError, match=r"holds a run of 2 process\(es\), and this one has 1.*--nproc-per-node 2"):
        train_saes(TrainConfig(store=str(one_process_store), output_dir=str(tmp_path / "two"), **TRAINING))


def test_torchrun_validation_scores_the_saved_sae(one_process_store, tmp_path):
    """metrics.json's final validation is the saved BatchTopK SAE's, threshold included, as one process scores it."""
    settings = {**TRAINING, "sweep": ["batchtopk:128:4"]}
    torchrun("train_sae.py", *training_arguments(one_process_store, tmp_path, settings))
    run = TrainingRun(TrainConfig(store=str(one_process_store), output_dir=str(tmp_path), **settings))
    (trainer,) = [run.new_trainer(spec) for spec in run.specs]
    trainer.restore(torch.load(trainer.folder / TRAINING_STATE, weights_only=True))
    assert float(trainer.sae.threshold) > 0
    saved = json.loads((trainer.folder / METRICS_FILE).read_text())["final"]
    assert saved == pytest.approx(validate(trainer.sae, run.validation_tokens, run.config.batch_size).metrics, rel=1e-6)


def test_torchrun_prints_each_message_once(tiny_model_folder, one_process_store, tmp_path):
    """Rank 0 alone prints warnings, progress bars and errors: every rank reads the same data and settings."""
    shorter = ["--max-length", "16"]  # truncates examples (a warning) and differs from the store's settings (an error)
    output = one_process_store.parents[1]
    done = torchrun("extract_activations.py", *extraction_arguments(tiny_model_folder, output), *shorter, expect_failure=True)
    assert done.stderr.count("Loading weights: 100%") == 1
    assert done.stderr.count("Truncated ") == 1
    assert done.stderr.count("already holds a store made with different settings") == 1


def test_a_user_error_only_one_rank_meets_is_printed_once(tiny_model_folder, tmp_path):
    """Rank 1 starts in a folder without the relative DATASET (a machine without the shared disk). Its one line is
    printed, once; rank 0 alone printed, so it was lost and torchrun said only that rank 1 exited with code 2."""
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    shutil.copy(REPO / "data" / "cognitive_actions.jsonl", tmp_path / "rank0" / "texts.jsonl")
    launcher = tmp_path / "in_own_folder.sh"
    launcher.write_text(f'#!/bin/sh\ncd "{tmp_path}/rank$RANK" && exec "$@"\n')
    launcher.chmod(0o755)
    arguments = [*extraction_arguments(tiny_model_folder, tmp_path / "stores"), "--dataset", "texts.jsonl"]
    done = torchrun("extract_activations.py", *arguments, launcher=launcher, expect_failure=True)
    assert done.stderr.count("error: dataset not found: texts.jsonl.") == 1, done.stderr[-3000:]


class _StopsAtStep(TrainingRun):
    """A run whose rank 0 gets Ctrl-C after `stop_after` steps (the other rank does not: they must agree)."""

    def __init__(self, config: TrainConfig, stop_after: int) -> None:
        super().__init__(config)
        self.stop_after, self.steps_taken = stop_after, 0

    def train_step(self, trainer, x, factor) -> None:
        super().train_step(trainer, x, factor)
        self.steps_taken += 1
        if self.steps_taken == self.stop_after and self.ranks.is_main:
            self.stop_requested = True


def _train_on_two_ranks(rank: int, port: int, store: str, output: str) -> None:
    """One rank of the in-sync and resume test: an uninterrupted run, and a run stopped and resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name in ("whole", "resumed"):
            config = TrainConfig(store=store, output_dir=f"{output}/{name}", **TRAINING)
            stopped_at = None
            if name == "resumed":
                with pytest.raises(KeyboardInterrupt):
                    _StopsAtStep(config, stop_after=33).run()
                stopped_at = torch.load(next(Path(output, name).rglob("training_state.pt")), weights_only=True)["step"]
            run = TrainingRun(config)
            run.run()
            (trainer,) = run.trainers
            state = {
                "sae": trainer.sae.state_dict(),
                "tokens_since_fired": trainer.tokens_since_fired,
                "history": trainer.history,
                "validation": trainer.validation,
                "stopped_at": stopped_at,
            }
            torch.save(state, f"{output}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_stay_in_step_and_a_stopped_run_resumes_to_the_same_sae(one_process_store, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_on_two_ranks, args=(port, str(one_process_store), str(tmp_path)), nprocs=2)
    states = {
        (name, rank): torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True) for name in ("whole", "resumed") for rank in (0, 1)
    }
    for name in ("whole", "resumed"):  # DDP keeps the ranks' SAEs and dead-feature counters identical
        for key, value in states[name, 0]["sae"].items():
            assert torch.equal(value, states[name, 1]["sae"][key]), key
        assert torch.equal(states[name, 0]["tokens_since_fired"], states[name, 1]["tokens_since_fired"])
    # Rank 1 got no signal: both ranks stopped at the first log step after 33, and saved there.
    assert states["resumed", 0]["stopped_at"] == states["resumed", 1]["stopped_at"] == 35
    whole, resumed = states["whole", 0], states["resumed", 0]
    for key, value in whole["sae"].items():
        assert torch.equal(value, resumed["sae"][key]), key
    assert resumed["history"] == whole["history"] and resumed["validation"] == whole["validation"]
