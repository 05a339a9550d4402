"""The default one-command run: `python run_pipeline.py --yes` in a fresh directory, timed.

    python benchmarks/bench_pipeline.py

Copies the scripts and the default dataset into a temporary directory (the model cache is warmed
first, so the GGUF's one-off dequantisation is not counted), then times, each as a new process:
the checks, calibration and plan alone (`--plan-only`), the full default run (`--yes`), and a
rerun where every step is current. Prints the wall times, then each step's estimate (from the
calibration) against the time it took, read from pipeline_state.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastsae.interpret.llm import API_KEY_VARIABLES
from fastsae.lm.models import EMBEDDED_MODEL, model_folder, resolve_model
from fastsae.pipeline.run_pipeline import STATE_FILE, STEP_NAMES

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = ("extract_activations.py", "train_sae.py", "evaluate_sae.py", "interpret_sae.py", "run_pipeline.py")


def timed_run(folder: Path, *argv: str) -> tuple[float, str]:
    """Wall seconds of `python run_pipeline.py ARGV` in `folder` (Python's start-up and imports included), and what it printed."""
    environment = {key: value for key, value in os.environ.items() if key not in API_KEY_VARIABLES}
    environment["PYTHONPATH"] = str(REPO)
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "run_pipeline.py", *argv], cwd=folder, env=environment, check=True, capture_output=True, text=True
    )
    return time.perf_counter() - started, finished.stdout


def main() -> None:
    model_folder(resolve_model(EMBEDDED_MODEL))  # warm the dequantised-model cache
    with tempfile.TemporaryDirectory(prefix="fastsae-bench-pipeline-") as scratch:
        folder = Path(scratch)
        for script in SCRIPTS:
            shutil.copy(REPO / script, folder / script)
        shutil.copytree(REPO / "data", folder / "data")
        plan_seconds, plan = timed_run(folder, "--plan-only")
        run_seconds, _ = timed_run(folder, "--yes")
        rerun_seconds, _ = timed_run(folder, "--yes")
        steps = json.loads((folder / STATE_FILE).read_text())["steps"]

    print(
        f"\nSmolLM2-135M-Instruct, default scripts and data, {os.cpu_count()} CPUs, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}\n"
    )
    print(f"| {'run':<58} | {'seconds':>7} |")
    print(f"|{'-' * 60}|{'-' * 9}|")
    for name, seconds in (
        ("checks, calibration and plan (`--plan-only`)", plan_seconds),
        ("  of which the calibration", float(re.search(r"calibration took ([0-9.]+) s", plan).group(1))),
        ("default run, fresh directory (`--yes`)", run_seconds),
        ("rerun, every step current (`--yes`)", rerun_seconds),
    ):
        print(f"| {name:<58} | {seconds:>7.1f} |")
    print(f"\n| {'step':<10} | {'estimate (s)':>12} | {'took (s)':>8} |")
    print(f"|{'-' * 12}|{'-' * 14}|{'-' * 10}|")
    for name in STEP_NAMES:
        estimate = steps[name].get("estimated_seconds")
        print(f"| {name:<10} | {'n/a' if estimate is None else f'{estimate:.1f}':>12} | {steps[name]['seconds']:>8.1f} |")


if __name__ == "__main__":
    main()
