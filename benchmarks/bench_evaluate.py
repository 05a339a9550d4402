"""Evaluation's cost per SAE: before (three whole-model forwards per SAE) and now (shared passes), side by side.

    python benchmarks/bench_evaluate.py [--sweep 3] [--epochs 2]

On SmolLM2 and the default data (the default store is extracted first if absent), a sweep of
`--sweep` Top-K SAEs is trained into a scratch folder, then each is evaluated:

- **before**: `fastsae/evaluate.py` as it was before the shared passes (commit BEFORE's whole
  package, unpacked from git history into a scratch folder and run in a subprocess, so the old
  code is not kept twice; the time is taken inside the subprocess, around the evaluation alone): per SAE, the model clean, with the SAE
  spliced in and zero-ablated, each through every block, on every held-out token;
- **now, first SAE**: no saved passes: one clean forward, the zero-ablated and the SAE's pass from
  the hooked block on, saved in the store folder;
- **now, each further SAE**: the saved passes are loaded; only the SAE's pass runs;
- **now, the sweep in one call**: every SAE in one `evaluate_sae` call, from no saved passes.

Then the token budget: the default texts four times over (each copy numbered, so no example repeats)
make a store whose held-out split (VALIDATION_FRACTION 0.8) has ~50k tokens; it is evaluated with
the default budget (MODEL_TOKENS = 20,480), and a split cut to about the budget's size is evaluated
with no budget. Every row includes loading the model and the store metrics, as a user's run does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae
from fastsae.evaluate.model_metrics import CACHE_FOLDER
from fastsae.extract.extract_activations import ExtractConfig, extract_activations
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, train_saes

REPO = Path(__file__).resolve().parents[1]

BEFORE = "af2074a"  # the last commit with three whole-model forwards per SAE
SWEEP = ("topk:256:8", "topk:256:16", "topk:512:8", "topk:512:16")


BEFORE_RUN = """
import sys, time, contextlib, io
sys.path.insert(0, sys.argv[2])  # the old package, ahead of the checkout's own
from fastsae.evaluate import EvalConfig, evaluate_sae
started = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    evaluate_sae(EvalConfig(checkpoint=sys.argv[1], device="cpu"))
print(time.perf_counter() - started)
"""


def before_package(folder: Path) -> Path:
    """The whole `fastsae` package at commit BEFORE, unpacked into `folder` (its modules import each other by their old paths)."""
    archive = subprocess.run(["git", "archive", BEFORE, "fastsae"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def evaluate_before(package: Path, checkpoint: str) -> float:
    """Seconds the evaluation at commit BEFORE takes on `checkpoint`, timed inside a subprocess that imports the old package."""
    result = subprocess.run(
        [sys.executable, "-c", BEFORE_RUN, checkpoint, str(package)], cwd=REPO, check=True, capture_output=True, text=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def timed(call) -> float:
    """Wall seconds of `call()`, its printed report swallowed (progress bars still show on stderr)."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        call()
    return time.perf_counter() - started


def forget_saved_passes(store: Path) -> None:
    shutil.rmtree(store / CACHE_FOLDER, ignore_errors=True)


def default_store() -> Path:
    config = ExtractConfig()
    with contextlib.redirect_stdout(io.StringIO()):
        (folder,) = extract_activations(config)
    return Path(folder)


def train_sweep(store: Path, folder: Path, sweep: tuple[str, ...], epochs: float, validation_fraction: float = 0.1) -> list[str]:
    config = TrainConfig(
        store=str(store), output_dir=str(folder), sweep=list(sweep), epochs=epochs, validation_fraction=validation_fraction
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return [result["checkpoint"] for result in train_saes(config)]


def numbered_copies(folder: Path, copies: int) -> Path:
    """The default dataset `copies` times, each copy's texts prefixed with its number (no example repeats)."""
    rows = [json.loads(line) for line in (REPO / "data" / "cognitive_actions.jsonl").read_text().splitlines() if line.strip()]
    path = folder / "copies.jsonl"
    with path.open("w") as out:
        for copy in range(copies):
            for row in rows:
                out.write(json.dumps({**row, "text": f"({copy + 1}) {row['text']}"}) + "\n")
    return path


def held_out_tokens(checkpoint: str) -> tuple[int, int]:
    """(held-out tokens, tokens the model metrics ran on) from the eval.json just written."""
    saved = json.loads((Path(checkpoint).parent / "eval.json").read_text())
    return saved["reconstruction"]["all"]["tokens"], saved.get("model_tokens", {}).get("tokens", saved["reconstruction"]["all"]["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=int, default=3, help=f"SAEs in the sweep, 2 to {len(SWEEP)} (the table times each further SAE)")
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs of each SAE")
    args = parser.parse_args()
    if not 2 <= args.sweep <= len(SWEEP):  # checked first: with one SAE there is no further one, and the table's ratio divided by 0
        parser.error(f"--sweep must be 2 to {len(SWEEP)}; got {args.sweep}")
    os.chdir(REPO)
    store = default_store()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastsae-bench-evaluate-") as scratch:
        scratch = Path(scratch)
        package = before_package(scratch)
        checkpoints = train_sweep(store, scratch / "runs", SWEEP[: args.sweep], args.epochs)
        per_sae_before = [evaluate_before(package, checkpoint) for checkpoint in checkpoints]
        tokens, model_tokens = held_out_tokens(checkpoints[0])
        rows.append(
            (
                "before: three whole-model forwards per SAE",
                tokens,
                tokens,
                per_sae_before[0],
                sum(per_sae_before[1:]) / max(len(per_sae_before) - 1, 1),
                sum(per_sae_before),
            )
        )
        forget_saved_passes(store)
        first = timed(lambda: evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], device="cpu")))
        further = [timed(lambda c=c: evaluate_sae(EvalConfig(checkpoint=[c], device="cpu"))) for c in checkpoints[1:]]
        forget_saved_passes(store)
        sweep = timed(lambda: evaluate_sae(EvalConfig(checkpoint=checkpoints, device="cpu")))
        _, model_tokens = held_out_tokens(checkpoints[0])
        rows.append(("now: shared passes, saved per store", tokens, model_tokens, first, sum(further) / max(len(further), 1), sweep))

        big_store_folder = scratch / "stores"
        dataset = numbered_copies(scratch, 4)
        with contextlib.redirect_stdout(io.StringIO()):
            (big_store,) = extract_activations(ExtractConfig(dataset=str(dataset), output_dir=str(big_store_folder)))
        big_store = Path(big_store)
        (big_checkpoint,) = train_sweep(big_store, scratch / "big-runs", SWEEP[:1], 1.0, validation_fraction=0.8)
        budget_rows = []
        for label, fraction, budget in (
            ("default budget on the 50k-token split", 0.8, 20_480),
            ("a split of about the budget's size, no budget", 0.33, 0),
        ):
            forget_saved_passes(big_store)
            seconds = timed(
                lambda f=fraction, b=budget: evaluate_sae(
                    EvalConfig(checkpoint=[big_checkpoint], validation_fraction=f, model_tokens=b, device="cpu")
                )
            )
            budget_rows.append((label, *held_out_tokens(big_checkpoint), seconds))
        n_big = ActivationStore(big_store).n_tokens

    print(
        f"\nSmolLM2-135M-Instruct layer 12, default data, {len(checkpoints)} Top-K SAEs ({', '.join(SWEEP[: args.sweep])}), {os.cpu_count()} CPUs, torch {torch.__version__}\n"
    )
    print("| method | held-out tokens | model tokens | first SAE (s) | each further SAE (s) | all SAEs (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, tokens, model_tokens, first, further, total in rows:
        print(f"| {label} | {tokens:,} | {model_tokens:,} | {first:.1f} | {further:.1f} | {total:.1f} |")
    (_, _, _, before_first, before_further, _), (_, _, _, now_first, now_further, _) = rows
    print(
        f"\nEach further SAE: {now_further / before_further:.0%} of before's per-SAE time; the first SAE: {now_first / before_first:.0%}."
    )
    print(f"\nThe token budget, on the default texts four times over ({n_big:,} tokens), one SAE, no saved passes:\n")
    print("| run | held-out tokens | model tokens | time (s) |")
    print("|---|---:|---:|---:|")
    for label, tokens, model_tokens, seconds in budget_rows:
        print(f"| {label} | {tokens:,} | {model_tokens:,} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
