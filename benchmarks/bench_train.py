"""SAE training: fastsae (float32 and bfloat16) vs four peers, each trained by its own code on the same activations.

    pip install --no-deps -r benchmarks/requirements.txt   # once, after the project's requirements
    python benchmarks/bench_train.py [--tokens 324000] [--m 4608] [--k 32] [--batch-size 1024] [--lr 5e-4] [--methods ...]

Every method trains a Top-K SAE (d = 576, M features, K active) in float32 on the CPU, and
fastsae also under bfloat16 autocast (float32 weights, losses and Adam state), for the
same number of training tokens, in batches of the same size, on the training split of the
activation store (scaled so that E||x||^2 = d, as fastsae does). fastsae streams from the store
through its mixing buffer; the peers get the same tokens from memory, reshuffled every epoch
with a fixed seed. Each peer keeps its own optimiser, learning rate and schedule unless its
default cannot run at this budget (the notes say what was changed). Only the training loop is
timed. All SAEs are then evaluated the same way on the same validation tokens: FVU over all
tokens, L0 (active features per token) and the fraction of features that never fire.

The last columns compare tokens/s with sparsify's and with a dense ceiling: the measured
throughput of one (B x d) @ (d x M) matmul in the method's precision, i.e. the encoder's forward
pass alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peers import SparsifyTrainer, hypothesaes_module, quiet  # benchmarks/peers.py: a script's folder is on sys.path

from fastsae.common.devices import cpu_has_bfloat16_instructions
from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import feature_rows  # the CSR matrix behind the SAE's encoder gradient on the CPU
from fastsae.train.train_sae import TrainConfig, TrainingRun

ROOT = Path(__file__).resolve().parents[1]

STORE = "activations/SmolLM2-135M-Instruct/blocks.12.hook_resid_post"
SEED = 0
LAYER = 12

# x -> (reconstruction, (B, M) bool mask of the features that fired)
Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Result:
    method: str
    tokens: int  # training tokens actually seen
    seconds: float  # training loop only
    learning_rate: str
    reconstruct: Reconstruct
    precision: str = "float32"  # of the encoder matmul; weights are float32 in every method

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def version(package: str) -> str:
    return importlib.metadata.version(package)


def batches(x: torch.Tensor, steps: int, batch_size: int, seed: int = SEED) -> Iterator[torch.Tensor]:
    """`steps` batches of rows of x: one seeded permutation per epoch, batches running across epoch ends."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(x), generator=generator)])
        yield x[order[:batch_size]]
        order = order[batch_size:]


@torch.no_grad()
def evaluate(reconstruct: Reconstruct, val_x: torch.Tensor, m: int, batch_size: int) -> dict[str, float]:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens; L0; fraction never firing."""
    squared_error = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(m, dtype=torch.bool)
    active = 0
    for start in range(0, len(val_x), batch_size):
        x = val_x[start : start + batch_size]
        x_hat, mask = reconstruct(x)
        squared_error += (x_hat.double() - x.double()).pow(2).sum()
        fired |= mask.any(0)
        active += int(mask.sum())
    variance = (val_x.double() - val_x.double().mean(0)).pow(2).sum()
    return {"fvu": float(squared_error / variance), "l0": active / len(val_x), "dead": float((~fired).double().mean())}


def best_seconds(work: Callable[[], object], rounds: int = 5, repeats: int = 20) -> float:
    """Best mean time of one call of `work` over a few timed rounds, after a warm-up."""
    for _ in range(5):
        work()
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def encoder_ceiling_flops(batch_size: int, d: int, m: int, dtype: torch.dtype) -> float:
    """Best FLOP/s of torch.mm((B x d), (d x M)) in `dtype`."""
    a, b = torch.randn(batch_size, d, dtype=dtype), torch.randn(d, m, dtype=dtype)
    return 2 * batch_size * d * m / best_seconds(lambda: torch.mm(a, b))


def kernel_milliseconds(batch_size: int, d: int, m: int, k: int, dtype: torch.dtype) -> dict[str, float]:
    """The kernels of a sparse training step in `dtype`, on random data of the run's shapes: which of them gain from bf16."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch_size, d, generator=generator).to(dtype)
    weight = (torch.randn(m, d, generator=generator) / d**0.5).to(dtype)
    bias = torch.zeros(m, dtype=dtype)
    pre = F.linear(x, weight, bias)
    indices = pre.topk(k, dim=1, sorted=False).indices
    values = pre.gather(1, indices).relu()
    decoder, code = weight.clone().requires_grad_(), values.clone().requires_grad_()
    tokens = torch.arange(batch_size).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(torch.stack([indices.flatten(), tokens]), values.flatten(), (m, batch_size), check_invariants=False)

    def decoder_forward_backward() -> None:
        reconstruction = F.embedding_bag(indices, decoder, per_sample_weights=code, mode="sum")
        torch.autograd.grad(reconstruction, (decoder, code), x)

    kernels = {
        "encoder matmul (B x d) @ (d x M) + bias": lambda: F.linear(x, weight, bias),
        "Top-K of the (B x M) pre-activations": lambda: pre.topk(k, dim=1, sorted=False),
        "gathered decoder (embedding_bag), forward + backward": decoder_forward_backward,
        "sparse encoder gradient (M x B) @ (B x d), COO": lambda: torch.sparse.mm(coo, x),
        "sparse encoder gradient, CSR (fastsae's, on the CPU)": lambda: feature_rows(indices, values, m) @ x,
    }
    return {name: milliseconds_or_nan(work) for name, work in kernels.items()}


def kernel_row(name: str, float32_ms: float, bfloat16_ms: float) -> list[str]:
    if math.isnan(bfloat16_ms):
        return [name, f"{float32_ms:.2f}", "no kernel", "n/a"]
    return [name, f"{float32_ms:.2f}", f"{bfloat16_ms:.2f}", f"{float32_ms / bfloat16_ms:.2f}×"]


def milliseconds_or_nan(work: Callable[[], object]) -> float:
    """Best time of `work` in ms, or NaN where torch has no kernel for its dtype (CSR products in bf16 on the CPU)."""
    try:
        return 1e3 * best_seconds(work, repeats=10)
    except (NotImplementedError, RuntimeError):
        return math.nan


# --- the methods -------------------------------------------------------------------------


def train_fastsae(run: TrainingRun) -> Result:
    """Ours, exactly as train_sae.py runs it: streamed from the store, timed by TrainingRun itself; evaluated in float32."""
    with quiet():
        result = run.run()[0]
    sae = load_sae(result["checkpoint"]).sae  # the checkpoint works on raw activations: undo the scale
    scale = run.scale

    def reconstruct(x):
        codes = sae.encode(x / scale)
        return sae.decode(codes) * scale, codes > 0

    precision = run.config.precision
    return Result(
        f"fastsae (ours), {precision}",
        result["tokens_trained"],
        result["seconds_this_session"],
        f"{run.config.learning_rate:.2e}",
        reconstruct,
        precision,
    )


def train_hypothesaes(train_x: torch.Tensor, args) -> Result:
    """HypotheSAEs' own `fit`: whole epochs of a shuffling DataLoader, Adam at its default lr."""
    torch.manual_seed(SEED)
    sae = hypothesaes_module().SparseAutoencoder(train_x.shape[1], args.m, args.k, device="cpu")
    epochs = max(1, round(args.tokens / len(train_x)))
    learning_rate = 5e-4  # fit()'s default
    started = time.perf_counter()
    with quiet():
        sae.fit(train_x, X_val=None, batch_size=args.batch_size, learning_rate=learning_rate, n_epochs=epochs, show_progress=False)
    seconds = time.perf_counter() - started
    sae.eval()

    def reconstruct(x):
        x_hat, info = sae(x)
        return x_hat, info["activations"] > 0

    return Result(f"HypotheSAEs {version('hypothesaes')}", epochs * len(train_x), seconds, f"{learning_rate:.2e}", reconstruct)


def train_dictionary_learning(train_x: torch.Tensor, args) -> Result:
    """dictionary_learning's TopKTrainer, stepped as its trainSAE loop does (`trainer.update(step, x)`)."""
    with quiet():
        from dictionary_learning.trainers.top_k import TopKTrainer
    steps = args.tokens // args.batch_size
    trainer = TopKTrainer(
        steps=steps,
        activation_dim=train_x.shape[1],
        dict_size=args.m,
        k=args.k,
        layer=LAYER,
        lm_name="SmolLM2-135M-Instruct",
        warmup_steps=max(1, steps // 20),  # its default of 1000 must be < steps
        seed=SEED,
        device="cpu",
    )
    started = time.perf_counter()
    for step, x in enumerate(batches(train_x, steps, args.batch_size)):
        trainer.update(step, x)
    seconds = time.perf_counter() - started
    ae = trainer.ae.eval()

    def reconstruct(x):
        x_hat, codes = ae(x, output_features=True)
        return x_hat, codes > 0

    return Result(
        f"dictionary_learning {version('dictionary-learning')}", steps * args.batch_size, seconds, f"{trainer.lr:.2e}", reconstruct
    )


def train_saelens(train_x: torch.Tensor, args) -> Result:
    """SAELens' SAETrainer.fit() on a TopKTrainingSAE, fed by a plain iterator as its data provider."""
    with quiet():
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    steps = args.tokens // args.batch_size
    torch.manual_seed(SEED)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train_x.shape[1], d_sae=args.m, k=args.k, dtype="float32", device="cpu"))
    config = SAETrainerConfig(total_training_samples=steps * args.batch_size, train_batch_size_samples=args.batch_size, device="cpu")
    config.lr_end = config.lr / 10  # what LanguageModelSAERunnerConfig's post-init sets (only cosine schedules use it)
    trainer = SAETrainer(cfg=config, sae=sae, data_provider=batches(train_x, steps, args.batch_size))
    started = time.perf_counter()
    with quiet():
        trainer.fit()
    seconds = time.perf_counter() - started
    sae.eval()

    def reconstruct(x):
        codes = sae.encode(x)
        return sae.decode(codes), codes > 0

    return Result(f"SAELens {version('sae-lens')}", trainer.n_training_samples, seconds, f"{config.lr:.2e}", reconstruct)


def train_sparsify(train_x: torch.Tensor, args) -> Result:
    """sparsify's SparseCoder, stepped as its Trainer does (benchmarks/peers.py), on the CPU in float32."""
    trainer = SparsifyTrainer(train_x.shape[1], args.m, args.k, "cpu")
    steps = args.tokens // args.batch_size
    started = time.perf_counter()
    for x in batches(train_x, steps, args.batch_size):
        trainer.step(x)
    seconds = time.perf_counter() - started
    learning_rate = f"{trainer.learning_rate:.2e}"
    return Result(f"sparsify {version('eai-sparsify')}", steps * args.batch_size, seconds, learning_rate, trainer.reconstruct)


# --- the table -----------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = ["<"] + [">"] * (len(header) - 1)
    line = lambda cells: "| " + " | ".join(f"{cell:{a}{w}}" for cell, a, w in zip(cells, align, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2)) for a, w in zip(align, widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def notes(config: TrainConfig) -> str:
    return f"""\
Notes:
- fastsae: `TrainingRun.run()` with PRECISION float32, then bfloat16 (autocast: the encoder matmul in bf16; weights,
  losses, the sparse gradients and Adam in float32), and otherwise its defaults: Adam, linear warm-up over {config.warmup_fraction:.0%} of the steps, linear decay to 0
  over the last {config.decay_fraction:.0%}, grad-norm clip {config.gradient_clip:g}, b_dec at the data's {config.input_bias_init}, aux-K on features dead for a
  tenth of the run. It streams float16 activations from the store through its mixing buffer, and its tokens/s (measured by
  the run itself) includes that reading; the peers get the same tokens from memory.
- HypotheSAEs: `SparseAutoencoder.fit(X_val=None, batch_size, n_epochs=round(tokens / training tokens))`, lr 5e-4 (its
  default); whole epochs, so its token count can differ slightly; the timing includes fit's own setup (median b_dec, Adam).
- dictionary_learning: `TopKTrainer(...)` + `trainer.update(step, x)`, its lr default 2e-4 / sqrt(M / 2^14); its default
  warm-up of 1000 steps is longer than the run (it asserts warmup < steps), so warm-up is 5% of the steps; no decay (default).
- SAELens: `SAETrainer(SAETrainerConfig(...), TopKTrainingSAE, data_provider=iterator).fit()`, i.e. its own training loop;
  SAETrainerConfig defaults: Adam 3e-4, constant schedule, no warm-up, dead window 1000 steps; lr_end = lr / 10 as the LM
  runner sets it. TopKTrainingSAEConfig defaults (rescale_acts_by_decoder_norm, decoder_init_norm 0.1, zero b_dec).
- sparsify: its Trainer needs a model to hook, so this drives `SparseCoder.forward` with the Trainer's step logic: b_dec = batch
  mean at step 0, decoder renormalised before each forward, loss fvu + auxk_alpha * auxk (dead_mask only if auxk_alpha > 0),
  parallel decoder gradient removed, its default optimizer (signum: ScheduleFreeWrapper(SignSGD, momentum 0.95),
  lr 5e-3 / sqrt(M / 2^14)), evaluated in the optimizer's eval mode as its checkpoints are. It is not wrapped in
  `torch.set_float32_matmul_precision("high")` as `Trainer.fit` is, so that every method computes in float32.
- Aux-K at this budget: sparsify's is off by default (auxk_alpha 0); dictionary_learning's needs 10M tokens without firing and
  SAELens' 1000 steps, so neither switches on; HypotheSAEs' (256 steps) and ours (a tenth of the run) can.
- Encoder ceiling: the best of 5 rounds of 20 `torch.mm` (B x d) @ (d x M) after a warm-up, in float32 and in bfloat16, taken
  before and after the runs; last column = tokens/s x 2dM / that FLOP/s in the method's precision (a dense SAE needs about 6x
  these FLOPs per token for its forward and backward).
- Kernels: each kernel of a sparse training step alone, on random data of the run's shapes (K active per token, no aux-K),
  in float32 and with every input in bfloat16; the best of 5 rounds of 10 calls. fastsae's bfloat16 path runs in bf16
  only the kernels that gain."""


METHODS = ("fastsae-float32", "fastsae-bfloat16", "hypothesaes", "dictionary_learning", "saelens", "sparsify")


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=324_000, help="training tokens for every method")
    parser.add_argument("--m", type=int, default=4608, help="features")
    parser.add_argument("--k", type=int, default=32, help="active features per token")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per batch")
    parser.add_argument(
        "--lr", type=float, default=TrainConfig.__dataclass_fields__["learning_rate"].default, help="fastsae's learning rate"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="which methods to train (default: all)")
    args = parser.parse_args()

    if not (ROOT / STORE / "manifest.json").exists():
        sys.exit(f"no activation store at {STORE}: run `python extract_activations.py` first.")
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(
            store=str(ROOT / STORE),
            m=args.m,
            k=args.k,
            batch_size=args.batch_size,
            max_tokens=args.tokens,
            eval_every=10**9,
            checkpoint_every=10**9,
            output_dir=output_dir,
            learning_rate=args.lr,
            seed=SEED,
            device="cpu",
            overwrite=True,
        )
        config = TrainConfig(**settings, precision="float32", run_name="float32")
        run = TrainingRun(config)
        train_x = (run.train_source.all_tokens(10**9) * run.scale).contiguous()
        val_x = run.validation_tokens
        d = train_x.shape[1]
        precisions = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        print(f"encoder ceiling: timing {args.batch_size}x{d} @ {d}x{args.m} matmuls", file=sys.stderr)
        flops_before = {name: encoder_ceiling_flops(args.batch_size, d, args.m, dtype) for name, dtype in precisions.items()}
        kernels = {name: kernel_milliseconds(args.batch_size, d, args.m, args.k, dtype) for name, dtype in precisions.items()}

        trainers = {
            "fastsae-float32": lambda: train_fastsae(run),
            "fastsae-bfloat16": lambda: train_fastsae(TrainingRun(TrainConfig(**settings, precision="bfloat16", run_name="bfloat16"))),
            "hypothesaes": lambda: train_hypothesaes(train_x, args),
            "dictionary_learning": lambda: train_dictionary_learning(train_x, args),
            "saelens": lambda: train_saelens(train_x, args),
            "sparsify": lambda: train_sparsify(train_x, args),
        }
        measured = []
        for method in args.methods:
            result = trainers[method]()
            metrics = evaluate(result.reconstruct, val_x, args.m, args.batch_size)
            print(f"{result.method}: {result.tokens_per_second:.0f} tokens/s, {metrics}", file=sys.stderr)
            measured.append((result, metrics))
        # a drop from before hints that others used the cores
        flops_after = {name: encoder_ceiling_flops(args.batch_size, d, args.m, dtype) for name, dtype in precisions.items()}

    flops = {name: max(flops_before[name], flops_after[name]) for name in precisions}
    sparsify_speed = next((result.tokens_per_second for result, _ in measured if result.method.startswith("sparsify")), None)
    rows = [
        [
            result.method,
            f"{result.tokens_per_second:,.0f}",
            f"{result.tokens_per_second / sparsify_speed:.2f}×" if sparsify_speed else "n/a",
            f"{metrics['fvu']:.4f}",
            f"{metrics['l0']:.1f}",
            f"{metrics['dead']:.1%}",
            result.learning_rate,
            f"{result.tokens_per_second * 2 * d * args.m / flops[result.precision]:.1%}",
        ]
        for result, metrics in measured
    ]

    header = ["method", "tokens/s", "vs sparsify", "val FVU", "L0", "dead", "learning rate", "fraction of encoder ceiling"]
    print(markdown_table(header, rows))
    print()
    print(
        f"d={d}, M={args.m}, K={args.k}, batch {args.batch_size} tokens, CPU: {cpu_name()}, {torch.get_num_threads()} threads"
        f" (torch {torch.__version__}); bf16 instructions (AMX or AVX512-BF16): {'yes' if cpu_has_bfloat16_instructions() else 'no'},"
        f" so PRECISION=auto trains in {'bfloat16' if TrainConfig(**settings).uses_bfloat16() else 'float32'}"
    )
    print(
        f"training tokens: {args.tokens} per method (training split: {len(train_x)} tokens, so {args.tokens / len(train_x):.1f} epochs); validation tokens: {len(val_x)}"
    )
    for name in precisions:
        print(
            f"encoder ceiling, {name}: {flops[name] / 1e9:.1f} GFLOP/s = {flops[name] / (2 * d * args.m):,.0f} tokens/s for the encoder"
            f" forward alone (measured {flops_before[name] / 1e9:.1f} before the runs and {flops_after[name] / 1e9:.1f} after;"
            " a drop means the cores were shared)"
        )
    print()
    print(
        markdown_table(
            ["kernel (one batch)", "float32 ms", "bfloat16 ms", "bf16 speed-up"],
            [kernel_row(name, float32_ms, kernels["bfloat16"][name]) for name, float32_ms in kernels["float32"].items()],
        )
    )
    print()
    print(notes(config))


if __name__ == "__main__":
    main()
