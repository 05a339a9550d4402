"""Extraction speed: the original one-example-at-a-time full forward vs fastsae's batched, cut-short pass.

    python benchmarks/bench_extract.py [--layer 12] [--examples 330] [--batch-tokens 8192]

Runs the same examples of the default dataset through SmolLM2-135M-Instruct
three ways and prints tokens/s, the speed-up over the baseline, and the mean
and largest per-token relative difference ||a - b|| / ||b|| from the
baseline's activations (`hidden_states[layer + 1]`).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from fastsae.extract.extract_activations import iter_example_activations
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


def batched(model, sequences: list[np.ndarray], layer: int, batch_tokens: int, pad_token_id: int) -> list[torch.Tensor]:
    outputs: list[torch.Tensor | None] = [None] * len(sequences)
    capture = ResidualCapture(model, [layer], "resid_post")
    for batch, per_layer in iter_example_activations(capture, sequences, batch_tokens, pad_token_id, model.device):
        for index, activations in zip(batch, per_layer[layer]):
            outputs[index] = activations.float()
    return outputs


def relative_differences(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and max over tokens of ||a_t - e_t|| / ||e_t||."""
    per_token = torch.cat([(a - e).norm(dim=-1) / e.norm(dim=-1) for a, e in zip(actual, expected)])
    return float(per_token.mean()), float(per_token.max())


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--examples", type=int, default=330)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()

    source = resolve_model(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(source)
    dataset = load_dataset(Path(__file__).resolve().parents[1] / "data" / "cognitive_actions.jsonl", max_examples=args.examples)
    sequences = [item.token_ids for item in tokenize_examples(tokenizer, dataset.examples, "auto", 512)]
    n_tokens = sum(len(sequence) for sequence in sequences)
    model = load_model(source, torch.float32, "cpu")
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

    # Warm up each path once so one-off allocation costs do not land on the first row.
    one_at_a_time(model, sequences[:2], args.layer)
    batched(model, sequences[:8], args.layer, args.batch_tokens, tokenizer.pad_token_id)
    batched(model_bf16, sequences[:8], args.layer, args.batch_tokens, tokenizer.pad_token_id)

    reference, baseline_seconds = timed(one_at_a_time, model, sequences, args.layer)
    ours, ours_seconds = timed(batched, model, sequences, args.layer, args.batch_tokens, tokenizer.pad_token_id)
    ours_bf16, bf16_seconds = timed(batched, model_bf16, sequences, args.layer, args.batch_tokens, tokenizer.pad_token_id)

    rows = [
        ("one at a time, full forward, output_hidden_states (float32)", baseline_seconds, (0.0, 0.0)),
        ("fastsae: length batches, stop after the layer (float32)", ours_seconds, relative_differences(ours, reference)),
        ("fastsae: length batches, stop after the layer (bfloat16)", bf16_seconds, relative_differences(ours_bf16, reference)),
    ]
    print(
        f"\nSmolLM2-135M-Instruct, layer {args.layer}, {len(sequences)} examples, {n_tokens} tokens, {torch.get_num_threads()} CPU threads\n"
    )
    print(f"| {'method':<62} | {'tokens/s':>9} | {'speed-up':>8} | {'mean rel. diff':>14} | {'max rel. diff':>13} |")
    print(f"|{'-' * 64}|{'-' * 11}|{'-' * 10}|{'-' * 16}|{'-' * 15}|")
    for name, seconds, (mean_difference, max_difference) in rows:
        print(
            f"| {name:<62} | {n_tokens / seconds:>9.0f} | {baseline_seconds / seconds:>7.2f}× | {mean_difference:>14.2e} | {max_difference:>13.2e} |"
        )


if __name__ == "__main__":
    main()
