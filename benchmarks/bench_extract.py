"""Extraction speed: the original one-example-at-a-time full forward vs fastsae's padded length batches and packed rows.

    python benchmarks/bench_extract.py [--layer 12] [--examples 330] [--baseline-examples 0] [--batch-tokens 8192]
                                       [--row-tokens 0] [--dtypes float32 bfloat16] [--repeats 2] [--threads 0]
                                       [--attentions sdpa flex_attention]

Runs the same examples of the default dataset through SmolLM2-135M-Instruct
(packed rows under each attention kernel of `--attentions`) and prints, per
method, tokens/s, wall and CPU seconds, the share of the batches' tokens that
are padding (for packed rows: the filler at their ends),
the speed-up over the baseline, and the mean and largest per-token relative
difference ||a - b|| / ||b|| from the baseline's activations
(`hidden_states[layer + 1]`). The baseline is slow, so `--baseline-examples`
can time it, and compare against it, on the first N examples only (speed-ups
are ratios of tokens/s). Each batched method is timed `--repeats` times,
interleaved, and its fastest run is kept: other processes on a shared machine
slow some runs, never speed one up; CPU seconds (this process's) are less
swayed by them than wall seconds. The load average before and after is
printed with the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastsae.extract.extract_activations import forward_batches, iter_example_activations
from fastsae.extract.packed_batches import packed_row_tokens
from fastsae.lm.data import load_dataset
from fastsae.lm.hook_points import ResidualCapture
from fastsae.lm.models import EMBEDDED_MODEL, load_model, load_tokenizer, resolve_model
from fastsae.lm.tokenization import tokenize_examples


def one_at_a_time(model, sequences: list[np.ndarray], layer: int) -> list[torch.Tensor]:
    """How the original scripts did it: each example alone, the whole model, all hidden states."""
    outputs = []
    with torch.inference_mode():
        for sequence in sequences:
            input_ids = torch.from_numpy(sequence.astype(np.int64))[None]
            outputs.append(model(input_ids, output_hidden_states=True).hidden_states[layer + 1][0].float())
    return outputs


def batched(
    model, sequences: list[np.ndarray], layer: int, batch_tokens: int, pad_token_id: int, row_tokens: int | None
) -> list[torch.Tensor]:
    """fastsae's capture loop: padded length batches (`row_tokens` None) or packed rows, cut short after `layer`."""
    outputs: list[torch.Tensor | None] = [None] * len(sequences)
    capture = ResidualCapture(model, [layer], "resid_post")
    for batch, per_layer in iter_example_activations(capture, sequences, batch_tokens, pad_token_id, model.device, row_tokens):
        for index, activations in zip(batch, per_layer[layer]):
            outputs[index] = activations.float()
    return outputs


def padding_fraction(sequences: list[np.ndarray], batch_tokens: int, pad_token_id: int, row_tokens: int | None) -> float:
    """Share of the forward batches' tokens that belong to no example."""
    slots = sum(batch.input_ids.numel() for batch in forward_batches(sequences, batch_tokens, pad_token_id, row_tokens))
    return 1 - sum(len(sequence) for sequence in sequences) / slots


def relative_differences(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and max over tokens of ||a_t - e_t|| / ||e_t||."""
    per_token = torch.cat([(a - e).norm(dim=-1) / e.norm(dim=-1) for a, e in zip(actual, expected)])
    return float(per_token.mean()), float(per_token.max())


def timed(function, *args):
    """The result, wall seconds and CPU seconds of `function(*args)`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--examples", type=int, default=330)
    parser.add_argument("--baseline-examples", type=int, default=0, help="time the baseline on the first N examples; 0: all")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--row-tokens", type=int, default=0, help="packed row width; 0: as extraction chooses it (fewest FLOPs)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each batched method; the fastest is kept")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: its default (one per core)")
    parser.add_argument(
        "--attentions",
        nargs="+",
        default=["sdpa", "flex_attention"],
        help="attention kernels to time packed rows under (padded rows: sdpa)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    source = resolve_model(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(source)
    dataset = load_dataset(Path(__file__).resolve().parents[1] / "data" / "cognitive_actions.jsonl", max_examples=args.examples)
    sequences = [item.token_ids for item in tokenize_examples(tokenizer, dataset.examples, "auto", 512)]
    n_tokens = sum(len(sequence) for sequence in sequences)
    pad_id = tokenizer.pad_token_id
    model = load_model(source, torch.float32, "cpu")
    models = {dtype: model if dtype == "float32" else copy.deepcopy(model).to(torch.bfloat16) for dtype in args.dtypes}

    def packed_rows(attention: str) -> tuple[str, int]:
        model.set_attn_implementation(attention)  # the width that needs the fewest FLOPs depends on the kernel
        row_tokens = args.row_tokens or packed_row_tokens(model, [len(sequence) for sequence in sequences], args.batch_tokens)
        return f"packed rows of {row_tokens}, {attention}", row_tokens

    paths = [("padded length batches, sdpa", None, "sdpa")] + [(*packed_rows(attention), attention) for attention in args.attentions]
    methods = {
        f"fastsae: {path}, stop after the layer ({dtype})": (models[dtype], rows, attention)
        for dtype in models
        for path, rows, attention in paths
    }

    def run(name: str, method_sequences: list[np.ndarray]):
        method_model, rows, attention = methods[name]
        method_model.set_attn_implementation(attention)
        return timed(batched, method_model, method_sequences, args.layer, args.batch_tokens, pad_id, rows)

    # Warm up each path on all examples once, so one-off costs (allocation; flex attention compiling for each new
    # shape) do not land on a timed run.
    for name in methods:
        run(name, sequences)
    model.set_attn_implementation("sdpa")
    one_at_a_time(model, sequences[:2], args.layer)

    baseline_sequences = sequences[: args.baseline_examples or len(sequences)]
    reference, baseline_seconds, baseline_cpu = timed(one_at_a_time, model, baseline_sequences, args.layer)
    baseline_rate = sum(len(sequence) for sequence in baseline_sequences) / baseline_seconds
    outputs, seconds = {}, dict.fromkeys(methods, (float("inf"), 0.0))
    for _ in range(args.repeats):
        for name in methods:
            outputs[name], *elapsed = run(name, sequences)
            seconds[name] = min(seconds[name], tuple(elapsed))

    baseline_name = f"one at a time, full forward, output_hidden_states (float32){'*' if len(baseline_sequences) < len(sequences) else ''}"
    rows_printed = [(baseline_name, baseline_rate, baseline_seconds, baseline_cpu, 0.0, (0.0, 0.0))]
    for name, (_, rows, _) in methods.items():
        padding = padding_fraction(sequences, args.batch_tokens, pad_id, rows)
        differences = relative_differences(outputs[name][: len(reference)], reference)
        rows_printed.append((name, n_tokens / seconds[name][0], *seconds[name], padding, differences))
    print(
        f"\nSmolLM2-135M-Instruct, layer {args.layer}, {len(sequences)} examples, {n_tokens} tokens, "
        f"BATCH_TOKENS {args.batch_tokens}, {torch.get_num_threads()} CPU threads, fastest of {args.repeats} runs per batched method\n"
        f"load average (1, 5, 15 min): {' '.join(f'{value:.2f}' for value in load_before)} before, "
        f"{' '.join(f'{value:.2f}' for value in os.getloadavg())} after\n"
    )
    header = ["method", "tokens/s", "wall s", "CPU s", "padding", "speed-up", "mean rel. diff", "max rel. diff"]
    print("| " + " | ".join(header) + " |\n|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, rate, wall, cpu, padding, (mean_difference, max_difference) in rows_printed:
        cells = [name, f"{rate:,.0f}", f"{wall:.1f}", f"{cpu:.1f}", f"{padding:.1%}", f"{rate / baseline_rate:.2f}×"]
        print("| " + " | ".join([*cells, f"{mean_difference:.2e}", f"{max_difference:.2e}"]) + " |")
    if len(baseline_sequences) < len(sequences):
        print(f"\n* timed on the first {len(baseline_sequences)} examples; the differences are over their tokens")


if __name__ == "__main__":
    main()
