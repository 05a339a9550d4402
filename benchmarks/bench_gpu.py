"""GPU throughput at Llama-3.1-8B scale: extraction and SAE training against their ceilings.

    python benchmarks/bench_gpu.py [--examples 2000] [--baseline-examples 150] [--train-tokens 40000000]

Needs a CUDA GPU with ~40 GB free; nothing is downloaded. It

1. builds a randomly initialised model with Llama-3.1-8B's configuration in bfloat16 (weights
   drawn on the GPU: throughput does not depend on their values), and texts whose chat-templated
   lengths spread over 50–512 tokens (mean ≈ 187, as in the FAST paper's data), tokenized with
   the SmolLM2 tokenizer (its ids are valid for Llama-3's larger vocabulary);
2. extracts layer 12 three ways: the original way (each example alone, the whole model,
   `output_hidden_states`), fastsae's capture loop alone (length batches, forward stopped after
   block 12, activations left on the GPU), and fastsae's full extraction into a store on disk;
   compared with the FLOP ceiling of the blocks actually run, 2 × (parameters of blocks 0–12) per
   token, at the bf16 matmul rate measured on this GPU;
3. trains a Top-K SAE (d=4096, M=32768, K=64, bfloat16 autocast) on that store with
   `train_sae.py`'s code, and HypotheSAEs' own `fit` on the same tokens held on the GPU; compared
   with the matmul ceiling of the encoder's forward pass, the one dense matmul of our step.

The tokenizer comes from `--tokenizer` (a folder with tokenizer.json, e.g. the fastsae model
cache of SmolLM2) and HypotheSAEs' sae.py from `--hypothesaes-sae` or the installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastsae.extract.extract_activations import ExtractConfig, iter_example_activations, write_activation_stores
from fastsae.lm.data import load_dataset
from fastsae.lm.hook_points import ResidualCapture
from fastsae.lm.tokenization import tokenize_examples
from fastsae.store import batches
from fastsae.train.train_sae import TrainConfig, TrainingRun

ROOT = Path(__file__).resolve().parents[1]

LAYER = 12
SEED = 0
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


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args, **kwargs):
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


def random_llama(model_config: dict, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_config)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def write_texts(path: Path, n: int, tokenizer) -> None:
    """`n` chat-templated texts whose token counts follow a log-normal clipped to 50–512 (mean ≈ 187)."""
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


def capture_only(model, sequences: list[np.ndarray], batch_tokens: int, pad_token_id: int) -> None:
    for _ in iter_example_activations(ResidualCapture(model, [LAYER], "resid_post"), sequences, batch_tokens, pad_token_id, model.device):
        pass


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bench_extraction(args, work: Path, tokenizer) -> tuple[Path, list[list[str]], dict]:
    model = random_llama(args.model_config, args.device)
    block_parameters = sum(p.numel() for block in model.model.layers[: LAYER + 1] for p in block.parameters())
    flops_per_token = 2 * block_parameters
    rate = matmul_rate(*(3 * [min(8192, 8 * args.model_config["hidden_size"])]), args.device)
    ceiling = rate / flops_per_token

    data = work / "texts.jsonl"
    write_texts(data, args.examples, tokenizer)
    dataset = load_dataset(data)
    sequences = [item.token_ids for item in tokenize_examples(tokenizer, dataset.examples, "auto", 512)]
    n_tokens = sum(map(len, sequences))
    pad = tokenizer.pad_token_id or 0
    baseline = sequences[: args.baseline_examples]
    baseline_tokens = sum(map(len, baseline))

    one_at_a_time(model, baseline[:3])  # warm-up: kernels, allocator
    capture_only(model, sequences[:64], args.batch_tokens, pad)
    _, baseline_seconds = timed(one_at_a_time, model, baseline)
    rows, results = [], {"n_examples": len(sequences), "n_tokens": n_tokens, "mean_tokens": n_tokens / len(sequences)}
    baseline_rate = baseline_tokens / baseline_seconds

    def row(name: str, tokens_per_second: float) -> list[str]:
        return [
            name,
            f"{tokens_per_second:,.0f}",
            f"{tokens_per_second / baseline_rate:.1f}×",
            f"{tokens_per_second / ceiling:.1%}",
            f"{7000 * 187 / tokens_per_second / 60:.2f} min",
        ]

    rows.append(row(f"one at a time, full model, output_hidden_states ({len(baseline)} examples)", baseline_rate))
    for batch_tokens in sorted({8192, 16384, args.batch_tokens}):
        _, seconds = timed(capture_only, model, sequences, batch_tokens, pad)
        rows.append(row(f"fastsae capture loop, BATCH_TOKENS={batch_tokens} (activations stay on GPU)", n_tokens / seconds))
        results[f"capture_{batch_tokens}"] = n_tokens / seconds
    config = ExtractConfig(
        dataset=str(data),
        layers=[LAYER],
        batch_tokens=args.batch_tokens,
        device=args.device,
        output_dir=str(work / "activations"),
        chat_template="auto",
    )
    folders, seconds = timed(write_activation_stores, model, tokenizer, dataset, config, "random-Llama-3.1-8B")
    rows.append(row(f"fastsae extraction into the store (float16 on disk), BATCH_TOKENS={args.batch_tokens}", n_tokens / seconds))
    results.update(
        extract_store=n_tokens / seconds,
        baseline=baseline_rate,
        ceiling=ceiling,
        bf16_matmul_tflops=rate / 1e12,
        block_parameters=block_parameters,
    )
    del model
    torch.cuda.empty_cache()
    return folders[0], rows, results


def load_hypothesaes_module(path: str):
    if not path:
        path = str(Path(importlib.util.find_spec("hypothesaes").submodule_search_locations[0]) / "sae.py")
    spec = importlib.util.spec_from_file_location("hypothesaes_sae", path)  # its __init__ imports heavy packages
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_only(args, store: Path, work: Path, batch_size: int) -> tuple[float, str]:
    """Tokens/s of train_sae.py's step with the data already on the GPU: the loop's compute-only bound, and its kernel profile."""
    config = TrainConfig(
        store=str(store),
        m=args.m,
        k=args.k,
        batch_size=batch_size,
        precision="bfloat16",
        device=args.device,
        output_dir=str(work / "step"),
        overwrite=True,
    )
    run = TrainingRun(config)
    trainer = run.new_trainer(run.specs[0])
    x = (run.train_source.all_tokens(batch_size) * run.scale).to(args.device)
    for _ in range(5):
        run.train_step(trainer, x, 1.0)
    _, seconds = timed(lambda: [run.train_step(trainer, x, 1.0) for _ in range(args.steps)])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(10):
            run.train_step(trainer, x, 1.0)
        synchronize()
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    return args.steps * len(x) / seconds, profiler.key_averages().table(sort_by=sort, row_limit=25)


def train_rate(args, store: Path, work: Path, batch_size: int, **overrides) -> tuple[float, float]:
    """train_sae.py's whole loop (store → mixing buffer → steps), as its own tokens/s counter measures it; and the final FVU."""
    config = TrainConfig(
        store=str(store),
        m=args.m,
        k=args.k,
        batch_size=batch_size,
        max_tokens=args.train_tokens,
        precision="bfloat16",
        device=args.device,
        output_dir=str(work / "checkpoints"),
        overwrite=True,
        seed=SEED,
        **overrides,
    )
    result = TrainingRun(config).run()[0]
    return result["tokens_per_second_this_session"], result["final"]["fvu"]


def bench_training(args, store: Path, work: Path) -> tuple[list[list[str]], dict]:
    d = args.model_config["hidden_size"]
    ceiling = matmul_rate(args.batch_sizes[0], d, args.m, args.device) / (2 * d * args.m)
    rows, results = [], {"encoder_ceiling_tokens_per_s": ceiling}
    profiles = []
    for batch_size in args.batch_sizes:
        rate, profile = step_only(args, store, work, batch_size)
        profiles.append(f"batch {batch_size}\n{profile}")
        rows.append(
            [f"fastsae training step alone, batch {batch_size} (one batch kept on the GPU)", f"{rate:,.0f}", f"{rate / ceiling:.1%}", "—"]
        )
        results[f"step_only_{batch_size}"] = rate
        rate, fvu = train_rate(args, store, work, batch_size, eval_every=10**9)
        rows.append(
            [f"fastsae train_sae.py loop, batch {batch_size}, validation off", f"{rate:,.0f}", f"{rate / ceiling:.1%}", f"{fvu:.3f}"]
        )
        results[f"loop_{batch_size}"] = rate
    default_readers = batches.GPU_STORE_READERS
    for readers in args.store_readers:  # the same loop with other numbers of store-reader threads
        batches.GPU_STORE_READERS = readers
        rate, fvu = train_rate(args, store, work, args.batch_sizes[0], eval_every=10**9)
        rows.append(
            [
                f"fastsae train_sae.py loop, batch {args.batch_sizes[0]}, validation off, {readers} store reader(s)",
                f"{rate:,.0f}",
                f"{rate / ceiling:.1%}",
                f"{fvu:.3f}",
            ]
        )
        results[f"loop_{args.batch_sizes[0]}_readers_{readers}"] = rate
    batches.GPU_STORE_READERS = default_readers
    rate, fvu = train_rate(args, store, work, args.batch_sizes[0])
    rows.append(
        [
            f"fastsae train_sae.py defaults, batch {args.batch_sizes[0]} (validation every 50 steps)",
            f"{rate:,.0f}",
            f"{rate / ceiling:.1%}",
            f"{fvu:.3f}",
        ]
    )
    results["defaults"] = rate
    if args.profile:
        Path(args.profile).write_text("\n\n".join(profiles))

    run = TrainingRun(TrainConfig(store=str(store), m=args.m, k=args.k, device="cpu", output_dir=str(work / "unused")))
    train_x = (run.train_source.all_tokens(args.hypothesaes_tokens) * run.scale).to(args.device)
    module = load_hypothesaes_module(args.hypothesaes_sae)
    torch.manual_seed(SEED)
    sae = module.SparseAutoencoder(d, args.m, args.k, device=args.device)
    _, seconds = timed(sae.fit, train_x, X_val=None, batch_size=args.batch_sizes[0], n_epochs=1, show_progress=False)
    rate = len(train_x) / seconds
    rows.append(
        [
            f"HypotheSAEs fit, batch {args.batch_sizes[0]} (float32, its own loop; {len(train_x):,} tokens on the GPU)",
            f"{rate:,.0f}",
            f"{rate / ceiling:.1%}",
            "—",
        ]
    )
    results["hypothesaes"] = rate
    return rows, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--baseline-examples", type=int, default=150)
    parser.add_argument("--batch-tokens", type=int, default=32768, help="BATCH_TOKENS of the store row (extract_activations.py's default)")
    parser.add_argument("--m", type=int, default=32768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 16384], help="SAE training batch sizes to compare")
    parser.add_argument("--train-tokens", type=int, default=10_000_000)
    parser.add_argument(
        "--store-readers",
        type=int,
        nargs="*",
        default=[1, 2],
        help="also time the loop with these numbers of store-reader threads (the default is GPU_STORE_READERS)",
    )
    parser.add_argument("--hypothesaes-tokens", type=int, default=2_000_000)
    parser.add_argument("--tokenizer", default="", help="folder with tokenizer.json; default: the fastsae cache of SmolLM2")
    parser.add_argument("--hypothesaes-sae", default="", help="path of HypotheSAEs' sae.py; default: the installed package's")
    parser.add_argument("--json", default="", help="also write the numbers here")
    parser.add_argument("--profile", default="", help="write the training step's kernel profile here")
    parser.add_argument("--steps", type=int, default=50, help="timed steps of the step-alone row")
    parser.add_argument("--smoke", action="store_true", help="check the script itself on the CPU with a tiny model and tiny sizes")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    args.device, args.model_config = "cuda", LLAMA_31_8B
    if args.smoke:
        args.device, args.model_config = (
            "cpu",
            {
                **LLAMA_31_8B,
                "vocab_size": 49152,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 14,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        )
        args.examples, args.baseline_examples, args.m, args.k, args.batch_sizes = 40, 5, 256, 8, [256, 512]
        args.train_tokens, args.hypothesaes_tokens = 20_000, 4096
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on the CPU).")
    tokenizer_folder = args.tokenizer
    if not tokenizer_folder:
        from fastsae.lm.models import EMBEDDED_MODEL, load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(EMBEDDED_MODEL))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        store, extraction_rows, results["extraction"] = bench_extraction(args, work, tokenizer)
        r = results["extraction"]
        print(
            f"\n## Extraction: random Llama-3.1-8B config, bfloat16, layer {LAYER}, {r['n_examples']} examples, {r['n_tokens']:,} tokens (mean {r['mean_tokens']:.0f}), {results['gpu']}\n"
        )
        print(markdown_table(["method", "tokens/s", "vs one at a time", "of FLOP ceiling", "7K × 187 tokens"], extraction_rows))
        print(
            f"\nFLOP ceiling: {r['bf16_matmul_tflops']:.0f} TFLOP/s (8192³ bf16 matmul, measured) / (2 × {r['block_parameters'] / 1e9:.2f}B parameters of blocks 0–{LAYER}) = {r['ceiling']:,.0f} tokens/s"
        )
        sys.stdout.flush()
        training_rows, results["training"] = bench_training(args, store, work)
        d = args.model_config["hidden_size"]
        print(f"\n## Training: Top-K d={d}, M={args.m}, K={args.k}, bfloat16 autocast, {args.train_tokens:,} tokens per loop row\n")
        print(markdown_table(["method", "tokens/s", "of encoder matmul ceiling", "val FVU"], training_rows))
        print(
            f"\nEncoder matmul ceiling: ({args.batch_sizes[0]}×{d})@({d}×{args.m}) in bf16 = {results['training']['encoder_ceiling_tokens_per_s']:,.0f} tokens/s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
