"""GPU throughput at Llama-3.1-8B scale: extraction (padded and packed) against its FLOP ceiling, and SAE training
beside sparsify and HypotheSAEs on the same GPU.

    python benchmarks/bench_gpu.py [--examples 2000] [--ms 32768 131072] [--ks 32 64 128] [--out FOLDER]
    python benchmarks/bench_gpu.py --smoke          # checks the script itself on the CPU, tiny sizes

Needs a CUDA GPU with ~60 GB free; nothing is downloaded. It

1. builds a randomly initialised model with Llama-3.1-8B's configuration in bfloat16 (throughput does not depend on
   the weights' values), and texts whose chat-templated lengths spread over 50–512 tokens (mean ≈ 171), tokenized
   with the SmolLM2 tokenizer (its ids are valid for Llama-3's larger vocabulary);
2. extracts layer 12: the original way (each example alone, the whole model, `output_hidden_states`), fastsae's
   capture loop with padded length batches and with packed rows (sdpa; flex attention last, if it runs, and once more
   with the blocks' MLPs and norms torch.compile'd), and fastsae's extraction into a store on disk with BATCHING and
   ATTENTION = auto, at each BATCH_TOKENS, and once as auto decides for 10M+ tokens (flex attention, compiling
   included); against the FLOP ceiling of the blocks run,
   2 × (parameters of blocks 0–12) per token at the bf16 matmul rate measured on this GPU;
3. trains Top-K SAEs (d=4096, each M and K asked for) with the same batches already on the GPU, three ways:
   fastsae's training step under bfloat16 autocast, sparsify's SparseCoder stepped as its Trainer steps it (its own
   bf16 autocast and Triton sparse decoder, TF32 matmuls as `Trainer.fit` sets them; benchmarks/peers.py), and
   HypotheSAEs' own `fit` (float32, as it ships). Tokens/s and the peak GPU memory each method adds to the data.
   One row runs train_sae.py's whole loop (store → mixing buffer → steps) to show what the loop keeps of its step.

Every table is printed as soon as it is measured, and the numbers go to FOLDER/bench_gpu.json as they come, so a
run cut short keeps what it measured. The tokenizer comes from `--tokenizer` (a folder with tokenizer.json) or the
fastsae cache of SmolLM2; HypotheSAEs' sae.py from `--hypothesaes-sae` or the installed package.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peers import SEED, SparsifyTrainer, hypothesaes_module, quiet  # benchmarks/peers.py: a script's folder is on sys.path

from fastsae.core import sae as sae_module
from fastsae.extract import extract_activations as extract_module
from fastsae.extract.extract_activations import (
    ExtractConfig,
    iter_example_activations,
    length_batches,
    packing_differences,
    write_activation_stores,
)
from fastsae.extract.packed_batches import packed_row_tokens, packed_tokens
from fastsae.lm.data import load_dataset
from fastsae.lm.hook_points import ResidualCapture, decoder_layers
from fastsae.lm.tokenization import tokenize_examples
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, TrainingRun

ROOT = Path(__file__).resolve().parents[1]

LAYER = 12
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_LLAMA = {  # --smoke: the same code paths at sizes a CPU runs in seconds
    **LLAMA_31_8B,
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 14,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Callable, *args, **kwargs):
    """Result and wall seconds, with the GPU's queued work included."""
    synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize()
    return result, time.perf_counter() - started


def matmul_rate(m: int, k: int, n: int, device: str, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """Median FLOP/s of (m×k)@(k×n) on random data (never zeros: they run faster than real data)."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [timed(torch.mm, a, b)[1] for _ in range(repeats)]
    return 2 * m * k * n / float(np.median(times))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


class Report:
    """Tables printed as they are measured, and every number written to the JSON file after each row."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.numbers = path, {}

    def record(self, section: str, key: str, value) -> None:
        self.numbers.setdefault(section, {})[key] = value
        if self.path:
            self.path.write_text(json.dumps(self.numbers, indent=2))

    def print(self, *lines: str) -> None:
        print(*lines, sep="\n", flush=True)


def random_llama(model_config: dict, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_config)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def write_texts(path: Path, n: int, tokenizer) -> None:
    """`n` chat-templated texts whose token counts follow a log-normal clipped to 50–512."""
    rng = np.random.default_rng(SEED)
    words = [word for word in Path(ROOT / "data" / "cognitive_actions.jsonl").read_text().split() if word.isalpha()]
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True))
    targets = np.clip(rng.lognormal(mean=5.1, sigma=0.45, size=n), 50, 512).astype(int)
    with path.open("w") as file:
        for target in targets:
            n_words = max(1, int((target - overhead) / 1.25))
            file.write(json.dumps({"text": " ".join(rng.choice(words, size=n_words))}) + "\n")


def one_at_a_time(model, sequences: list[np.ndarray]) -> None:
    """The original scripts' way: each example alone through the whole model, all hidden states kept."""
    with torch.inference_mode():
        for sequence in sequences:
            input_ids = torch.from_numpy(sequence.astype(np.int64))[None].to(model.device)
            model(input_ids, output_hidden_states=True).hidden_states[LAYER + 1].to("cpu")


def capture_loop(model, sequences: list[np.ndarray], batch_tokens: int, pad_token_id: int, row_tokens: int | None) -> None:
    """fastsae's extraction loop with the activations left on the device: padded length batches, or packed rows."""
    capture = ResidualCapture(model, [LAYER], "resid_post")
    for _ in iter_example_activations(capture, sequences, batch_tokens, pad_token_id, model.device, row_tokens):
        pass


def batch_tokens_run(sequences: list[np.ndarray], batch_tokens: int, row_tokens: int | None) -> int:
    """Tokens the forward batches hold, padding included: what the GPU computes."""
    lengths = [len(sequence) for sequence in sequences]
    if row_tokens is None:
        return sum(len(batch) * max(lengths[index] for index in batch) for batch in length_batches(lengths, batch_tokens))
    return packed_tokens(lengths, batch_tokens, row_tokens)


class Extraction:
    """The model, the texts and the ceiling that every extraction row shares."""

    def __init__(self, args, work: Path, tokenizer, report: Report) -> None:
        self.args, self.work, self.tokenizer, self.report = args, work, tokenizer, report
        self.model = random_llama(args.model_config, args.device)
        block_parameters = sum(p.numel() for block in self.model.model.layers[: LAYER + 1] for p in block.parameters())
        size = min(8192, 8 * args.model_config["hidden_size"])
        rate = matmul_rate(size, size, size, args.device)
        self.ceiling = rate / (2 * block_parameters)
        self.data = work / "texts.jsonl"
        write_texts(self.data, args.examples, tokenizer)
        self.dataset = load_dataset(self.data)
        self.sequences = [item.token_ids for item in tokenize_examples(tokenizer, self.dataset.examples, "auto", 512)]
        self.n_tokens = sum(map(len, self.sequences))
        self.pad = tokenizer.pad_token_id or 0
        self.rows: list[list[str]] = []
        for key, value in dict(
            n_examples=len(self.sequences),
            n_tokens=self.n_tokens,
            bf16_matmul_tflops=rate / 1e12,
            block_parameters=block_parameters,
            ceiling_tokens_per_s=self.ceiling,
        ).items():
            report.record("extraction", key, value)
        baseline = self.sequences[: args.baseline_examples]
        one_at_a_time(self.model, baseline[:3])  # warm-up: kernels, allocator
        capture_loop(self.model, self.sequences[:64], args.batch_tokens[0], self.pad, None)
        _, seconds = timed(one_at_a_time, self.model, baseline)
        self.baseline_rate = sum(map(len, baseline)) / seconds
        self.row(f"one at a time, full model, output_hidden_states ({len(baseline)} examples)", self.baseline_rate, 0, "—", "baseline")

    def row(self, name: str, tokens_per_second: float, padding: float | None, versus_alone: str, key: str) -> None:
        self.rows.append(
            [
                name,
                f"{tokens_per_second:,.0f}",
                f"{tokens_per_second / self.baseline_rate:.1f}×" if self.rows else "1.0×",
                f"{tokens_per_second / self.ceiling:.1%}",
                f"{padding:.1%}" if padding is not None else "—",
                versus_alone,
            ]
        )
        self.report.record("extraction", key, tokens_per_second)

    def capture_row(self, batch_tokens: int, packed: bool, attention: str) -> None:
        row_tokens = packed_row_tokens(self.model, [len(s) for s in self.sequences], batch_tokens) if packed else None
        key = f"capture_{'packed' if packed else 'padded'}_{attention}_{batch_tokens}"

        def first_calls() -> str:
            """The packing check's view (the example starting a row: rounding; the one behind it), then a warm-up: where
            flex attention compiles, so their time is what extraction pays once before its first batch."""
            capture_loop(self.model, self.sequences[:64], batch_tokens, self.pad, row_tokens)
            if not packed:
                return "—"
            capture = ResidualCapture(self.model, [LAYER], "resid_post")
            n_rows = min(2, batch_tokens // row_tokens)
            return "{:.1e} / {:.1e}".format(*packing_differences(capture, self.sequences[:2], n_rows, self.pad, self.model.device))

        moved, first_seconds = timed(first_calls)
        self.report.record("extraction", f"first_calls_seconds_{key}", first_seconds)
        _, seconds = timed(capture_loop, self.model, self.sequences, batch_tokens, self.pad, row_tokens)
        padding = 1 - self.n_tokens / batch_tokens_run(self.sequences, batch_tokens, row_tokens)
        layout = f"packed rows of {row_tokens:,}" if packed else "padded length batches"
        self.row(
            f"capture loop, {layout}, BATCH_TOKENS={batch_tokens:,}, {attention} (activations stay on the GPU; "
            f"first calls, untimed: {first_seconds:.1f} s)",
            self.n_tokens / seconds,
            padding,
            moved,
            key,
        )

    def store_row(self, batch_tokens: int, as_if_large: bool = False) -> Path:
        """extract_activations.py's own path into a store; `as_if_large`: ATTENTION = auto as it decides for an extraction
        of FLEX_ATTENTION_MIN_TOKENS or more, so flex attention's compilation is in the row's time."""
        config = ExtractConfig(
            dataset=str(self.data),
            layers=[LAYER],
            batch_tokens=batch_tokens,
            device=self.args.device,
            output_dir=str(self.work / f"activations_{batch_tokens}{'_as_if_large' if as_if_large else ''}"),
            chat_template="auto",
            batching="auto",
            attention="auto",
        )
        threshold = extract_module.FLEX_ATTENTION_MIN_TOKENS
        extract_module.FLEX_ATTENTION_MIN_TOKENS = 0 if as_if_large else threshold
        try:
            folders, seconds = timed(write_activation_stores, self.model, self.tokenizer, self.dataset, config, "random-Llama-3.1-8B")
        finally:
            extract_module.FLEX_ATTENTION_MIN_TOKENS = threshold
        extraction = ActivationStore(folders[0]).manifest.extraction
        self.row(
            f"extraction into the store (float16 on disk), BATCH_TOKENS={config.batch_tokens:,}, "
            f"BATCHING and ATTENTION = auto{' as for 10M+ tokens' if as_if_large else ''} → "
            f"{extraction['batching']}, {extraction['attention']}"
            + (" (its compilation included)" if extraction["attention"] == "flex_attention" else ""),
            self.n_tokens / seconds,
            None,
            "—",
            f"store_{batch_tokens}{'_as_if_large' if as_if_large else ''}",
        )
        return folders[0]

    def print_table(self) -> None:
        r = self.report.numbers["extraction"]
        self.report.print(
            f"\n## Extraction: random Llama-3.1-8B config, bfloat16, layer {LAYER}, {r['n_examples']} examples, "
            f"{r['n_tokens']:,} tokens (mean {r['n_tokens'] / r['n_examples']:.0f}), {self.report.numbers['gpu']}\n",
            markdown_table(
                ["method", "tokens/s", "vs one at a time", "of FLOP ceiling", "padding", "packed vs alone: first / behind"], self.rows
            ),
            f"\nFLOP ceiling: {r['bf16_matmul_tflops']:.0f} TFLOP/s (bf16 matmul, measured) / (2 × {r['block_parameters'] / 1e9:.2f}B "
            f"parameters of blocks 0–{LAYER}) = {r['ceiling_tokens_per_s']:,.0f} tokens/s. 'packed vs alone': the mean per-token "
            "relative difference from each example run alone, for the example starting a row / the one packed behind it (what BATCHING = auto checks).",
        )


def peak_memory(work: Callable[[], float]) -> tuple[float, float]:
    """`work()`'s result and the peak GPU memory (GiB) it allocated on top of what was held before it."""
    gc.collect()
    if not torch.cuda.is_available():
        return work(), float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    result = work()
    synchronize()
    return result, (torch.cuda.max_memory_allocated() - held) / 2**30


def steps_per_second(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor], steps: int) -> float:
    for x in batches[:3]:  # warm-up: kernels, Triton's autotuning, the allocator
        step(x)
    _, seconds = timed(lambda: [step(batches[i % len(batches)]) for i in range(steps)])
    return steps / seconds


class Training:
    """One set of GPU batches from the store, and each method's steps on them."""

    def __init__(self, args, store: Path, work: Path, report: Report) -> None:
        self.args, self.store, self.work, self.report = args, store, work, report
        self.rows: list[list[str]] = []
        run = TrainingRun(self.config(args.ms[0], args.ks[0], device="cpu"))
        tokens = run.train_source.all_tokens(args.data_batches * args.batch_size) * run.scale
        self.batches = list(tokens.to(args.device, torch.bfloat16).split(args.batch_size))  # the store's bytes, scaled
        if len(self.batches[-1]) < args.batch_size:
            self.batches.pop()
        self.d = tokens.shape[1]

    def config(self, m: int, k: int, **overrides) -> TrainConfig:
        settings = dict(
            store=str(self.store),
            m=m,
            k=k,
            batch_size=self.args.batch_size,
            precision="bfloat16",
            device=self.args.device,
            output_dir=str(self.work / "checkpoints"),
            overwrite=True,
            seed=SEED,
        )
        return TrainConfig(**{**settings, **overrides})

    def fastsae(self, m: int, k: int, kernels: str = "auto") -> float:
        """train_sae.py's step on float32 batches, as its loop hands them over; `kernels` forces dense products or gathers."""
        run = TrainingRun(self.config(m, k))
        trainer = run.new_trainer(run.specs[0])
        sae_module.DENSE_KERNELS = {"auto": None, "dense": True, "gathers": False}[kernels]
        try:
            return steps_per_second(lambda x: run.train_step(trainer, x.float(), 1.0), self.batches, self.args.steps)
        finally:
            sae_module.DENSE_KERNELS = None

    def sparsify(self, m: int, k: int) -> float:
        """sparsify's step on the model's bfloat16 activations, as its Trainer's hooks receive them."""
        trainer = SparsifyTrainer(self.d, m, k, self.args.device)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # as sparsify's Trainer.fit sets it
        try:
            return steps_per_second(trainer.step, self.batches, self.args.steps)
        finally:
            torch.set_float32_matmul_precision(previous)

    def hypothesaes(self, m: int, k: int) -> float:
        """HypotheSAEs' own `fit` (float32): steps per second from the difference of a short and a longer fit, so its
        setup (the median b_dec, the optimiser) cancels."""
        module = hypothesaes_module(self.args.hypothesaes_sae)
        short, long = 2, 2 + self.args.hypothesaes_steps

        def fit(n_batches: int) -> float:
            torch.manual_seed(SEED)
            sae = module.SparseAutoencoder(self.d, m, k, device=self.args.device)
            x = torch.cat(self.batches[:n_batches]).float()
            with quiet():
                return timed(sae.fit, x, X_val=None, batch_size=self.args.batch_size, n_epochs=1, show_progress=False)[1]

        fit(short)  # warm-up
        return (long - short) / (fit(long) - fit(short))

    def row(self, name: str, m: int, k: int, steps_per_s: float, gib: float, sparsify_rate: float | None) -> None:
        tokens_per_s = steps_per_s * self.args.batch_size
        versus = f"{tokens_per_s / sparsify_rate:.2f}×" if sparsify_rate else "—"
        self.rows.append([name, f"{m:,}", str(k), f"{tokens_per_s:,.0f}", versus, f"{gib:.2f}"])
        self.report.record("training", f"{name}_M{m}_K{k}", {"tokens_per_s": tokens_per_s, "peak_gib": gib})

    def grid(self) -> None:
        methods = [("sparsify", self.sparsify)] + [
            (f"fastsae ({kernels})", functools.partial(self.fastsae, kernels=kernels)) for kernels in self.args.fastsae_kernels
        ]
        if not self.args.skip_hypothesaes:
            methods.append(("HypotheSAEs", self.hypothesaes))
        for m in self.args.ms:
            for k in self.args.ks:
                sparsify_rate = None
                for name, method in methods:
                    try:
                        rate, gib = peak_memory(functools.partial(method, m, k))
                    except Exception as error:  # one method failing (e.g. out of memory) leaves the others' rows
                        self.rows.append([name, f"{m:,}", str(k), f"failed: {type(error).__name__}: {str(error)[:120]}", "—", "—"])
                        continue
                    self.row(name, m, k, rate, gib, sparsify_rate)
                    if name == "sparsify":
                        sparsify_rate = rate * self.args.batch_size
                print(f"M={m} K={k} done", file=sys.stderr, flush=True)

    def loop_row(self) -> None:
        """train_sae.py's whole loop at the first M and the second K (64 by default): what the loop keeps of its step."""
        m, k = self.args.ms[0], self.args.ks[min(1, len(self.args.ks) - 1)]
        with quiet():
            result = TrainingRun(self.config(m, k, max_tokens=self.args.loop_tokens, eval_every=10**9)).run()[0]
        self.rows.append(
            [
                f"fastsae train_sae.py loop (store → mixing buffer → steps), validation off, {self.args.loop_tokens:,} tokens",
                f"{m:,}",
                str(k),
                f"{result['tokens_per_second_this_session']:,.0f}",
                "—",
                "—",
            ]
        )
        self.report.record("training", f"loop_M{m}_K{k}", result["tokens_per_second_this_session"])

    def print_table(self) -> None:
        a = self.args
        self.report.print(
            f"\n## Training: Top-K, d={self.d}, batch {a.batch_size:,} tokens, {a.steps} timed steps after 3 warm-up steps "
            f"({len(self.batches)} distinct batches on the GPU), {self.report.numbers['gpu']}\n",
            markdown_table(["method", "M", "K", "tokens/s", "vs sparsify", "peak GiB"], self.rows),
            "\nfastsae: bfloat16 autocast (float32 weights and Adam). sparsify: its SparseCoder in float32 under its own bfloat16 "
            "autocast, Triton decoder, TF32. HypotheSAEs: float32, its `fit` loop (steps/s from two fits' difference). "
            "'peak GiB': the most GPU memory the method held at once beyond the shared batches.",
        )

    def profile(self, path: Path) -> None:
        """Kernel tables of our step and sparsify's at the largest M, K=64 or the first K: where the time goes."""
        m, k = self.args.ms[-1], 64 if 64 in self.args.ks else self.args.ks[0]
        run = TrainingRun(self.config(m, k))
        trainer = run.new_trainer(run.specs[0])
        sparsify = SparsifyTrainer(self.d, m, k, self.args.device)
        steps = {"fastsae": lambda x: run.train_step(trainer, x.float(), 1.0), "sparsify": sparsify.step}
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.args.device == "cuda" else [])
        sort = "cuda_time_total" if self.args.device == "cuda" else "cpu_time_total"
        tables = []
        for name, step in steps.items():
            for x in self.batches[:3]:
                step(x)
            with torch.profiler.profile(activities=activities) as profiler:
                for x in self.batches[:10]:
                    step(x)
                synchronize()
            tables.append(
                f"{name}, M={m}, K={k}, batch {self.args.batch_size}, 10 steps\n"
                + profiler.key_averages().table(sort_by=sort, row_limit=20)
            )
        path.write_text("\n\n".join(tables))


def flex_attention_rows(extraction: Extraction, batch_tokens: list[int], compiled: bool) -> None:
    """Packed rows under flex attention, which computes only the query-key pairs inside each example; then, at the
    largest budget, with the blocks' MLPs and norms torch.compile'd, which fuses the elementwise work around the matmuls
    (SiLU and the gate product over 14,336 columns, the RMSNorms)."""
    try:
        extraction.model.set_attn_implementation("flex_attention")
        for tokens in batch_tokens:
            extraction.capture_row(tokens, packed=True, attention="flex_attention")
        if compiled:
            for layer in decoder_layers(extraction.model)[: LAYER + 1]:
                for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                    module.compile(dynamic=True)
            extraction.capture_row(max(batch_tokens), packed=True, attention="flex_attention, MLPs and norms compiled")
    except Exception as error:  # the row says why flex attention could not run here
        extraction.rows.append(
            [f"capture loop, packed rows, flex_attention: failed ({type(error).__name__}: {str(error)[:160]})"] + ["—"] * 5
        )
    finally:
        extraction.model.set_attn_implementation("sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--baseline-examples", type=int, default=60)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[32768, 65536], help="BATCH_TOKENS of the capture rows")
    parser.add_argument("--ms", type=int, nargs="+", default=[32768, 131072], help="SAE widths M")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128], help="active features K")
    parser.add_argument("--batch-size", type=int, default=16384, help="SAE training batch in tokens, the same for every method")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and setting")
    parser.add_argument("--data-batches", type=int, default=16, help="distinct batches held on the GPU and cycled")
    parser.add_argument("--hypothesaes-steps", type=int, default=4, help="extra steps of HypotheSAEs' longer fit")
    parser.add_argument("--skip-hypothesaes", action="store_true")
    parser.add_argument("--skip-training", action="store_true", help="extraction rows only")
    parser.add_argument(
        "--fastsae-kernels",
        nargs="+",
        choices=["auto", "dense", "gathers"],
        default=["auto"],
        help="fastsae rows: its own choice, or dense products / gathers forced (fastsae.core.sae.DENSE_KERNELS)",
    )
    parser.add_argument("--loop-tokens", type=int, default=3_000_000, help="tokens of the train_sae.py loop row (0: no row)")
    parser.add_argument("--no-flex", action="store_true", help="leave out the flex-attention rows")
    parser.add_argument("--no-compile", action="store_true", help="leave out the row with the blocks' MLPs and norms compiled")
    parser.add_argument("--tokenizer", default="", help="folder with tokenizer.json; default: the fastsae cache of SmolLM2")
    parser.add_argument("--hypothesaes-sae", default="", help="path of HypotheSAEs' sae.py; default: the installed package's")
    parser.add_argument("--out", default="", help="folder for bench_gpu.json and the kernel profiles")
    parser.add_argument("--smoke", action="store_true", help="check the script itself on the CPU with a tiny model and tiny sizes")
    args = parser.parse_args()

    args.device, args.model_config = "cuda", LLAMA_31_8B
    if args.smoke:
        args.device, args.model_config = "cpu", TINY_LLAMA
        args.examples, args.baseline_examples, args.batch_tokens = 40, 5, [1024, 2048]
        args.ms, args.ks, args.batch_size, args.steps, args.data_batches, args.loop_tokens = [256, 512], [8, 16], 256, 3, 4, 4096
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on the CPU).")
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from fastsae.lm.models import EMBEDDED_MODEL, load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(EMBEDDED_MODEL))
    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "bench_gpu.json" if out else None)
    report.numbers.update(gpu=torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)", torch=torch.__version__)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        extraction = Extraction(args, work, tokenizer, report)
        for batch_tokens in args.batch_tokens:
            extraction.capture_row(batch_tokens, packed=False, attention="sdpa")
            extraction.capture_row(batch_tokens, packed=True, attention="sdpa")
        store = [extraction.store_row(batch_tokens) for batch_tokens in args.batch_tokens][0]
        extraction.store_row(args.batch_tokens[0], as_if_large=True)
        extraction.print_table()

        if not args.skip_training:
            training = Training(args, store, work, report)
            training.grid()
            if args.loop_tokens:
                training.loop_row()
            training.print_table()
            if out:
                training.profile(out / "training_profile.txt")
            del training
            gc.collect()

        if not args.no_flex:
            flex_attention_rows(extraction, args.batch_tokens, compiled=not args.no_compile)
            extraction.print_table()


if __name__ == "__main__":
    main()
