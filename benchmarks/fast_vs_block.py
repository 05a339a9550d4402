"""FAST (each example its own sequence) vs block packing: the FAST paper's comparison on our default model and data.

    python benchmarks/fast_vs_block.py [--tokens 200000] [--block-size 128] [--m 256] [--k 8] [--layer 12]
                                       [--jumprelu-threshold 0.001] [--l0-coefficient 1e-3] [--work-dir DIR]
                                       [--rubric-features 50] [--llm-model gpt-4.1]

1. Extracts the default dataset through the embedded SmolLM2-135M-Instruct at one layer twice:
   sequentially (FAST) and in BLOCK_SIZE-token blocks of concatenated examples. The block store is
   built only from the training examples of the sequential store's split, so neither SAE ever sees
   the text it is evaluated on.
2. Trains a Top-K and a JumpReLU SAE on each store (one sweep per store: same batches for both
   architectures), for the same number of tokens, on all tokens (special/template ones included:
   the paper's block baseline has no notion of them), with the same seed and validation fraction.
3. Evaluates all four SAEs on the same held-out *sequential* examples: FAST token MSE and MSE_st
   (raw and log2), FVU, L0, and SAEBench's ce_loss_score and the relative loss increase with the SAE
   spliced into the model at every token (the clean and zero-ablated passes computed once for all four).
4. With an LLM endpoint (OPENAI_API_KEY, and OPENAI_BASE_URL for a local server), the FAST paper's
   interpretability score: each SAE's RUBRIC_FEATURES randomly sampled live features, their top-5
   contexts taken from the sequential store, rated 1-5 by the LLM (fastsae/interpret/explanations.py); a
   second table gives the rating distribution and the share rated 4-5 per SAE. Without a key this
   part is skipped and the notes say so.

JumpReLU's sparsity: thresholds start near zero (fastsae's default, the JumpReLU paper's 0.001 on
activations at unit mean squared norm) and Adam moves each by about the learning rate per step, so
in a run this short the L0 coefficient acts only as far as ~200 steps let them travel.
--jumprelu-threshold and --l0-coefficient set TrainConfig.jumprelu_initial_threshold and l0_coefficient.

Progress goes to stderr; stdout gets the Markdown table(s) and notes. Everything is written to a
temporary folder (or --work-dir, kept) so ./activations and ./checkpoints are left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastsae.core.checkpoint import load_sae
from fastsae.evaluate.evaluate_sae import store_metrics, validation_examples
from fastsae.evaluate.model_metrics import ReferencePasses, length_grouped
from fastsae.evaluate.saebench_core import BATCH_SIZE_PROMPTS, ignored_token_ids
from fastsae.extract.extract_activations import ExtractConfig, manifest_model_fields, pad_token_id, write_activation_stores
from fastsae.interpret.explanations import RUBRIC, RubricSummary, rubric_summary
from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae
from fastsae.interpret.llm import API_KEY_VARIABLES, api_key
from fastsae.lm.data import Dataset, load_dataset
from fastsae.lm.models import EMBEDDED_MODEL, load_model, load_tokenizer, resolve_model
from fastsae.lm.split_forward import SplitModel
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit
from fastsae.train.train_sae import TrainConfig, TrainingRun

logger = logging.getLogger("fast_vs_block")

DATASET = Path(__file__).resolve().parents[1] / "data" / "cognitive_actions.jsonl"
VALIDATION_FRACTION = 0.1
SEED = 0
ARCHITECTURE_LABELS = {"topk": "Top-K", "jumprelu": "JumpReLU"}
PACKING_LABELS = {"sequential": "FAST", "block": "block"}
PAPER_NOTE = (
    "The paper's own figures (Qwen2.5-7B-Instruct), log2 MSE_st: FAST 0.6468 vs 5.1985 and 1.5093 for its two "
    "block-packed baselines (lower is better)."
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens per SAE (the same for both packings)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block of the block-packed store")
    parser.add_argument("--m", type=int, default=256, help="features per SAE")
    parser.add_argument("--k", type=int, default=8, help="active features per token of the Top-K SAE")
    parser.add_argument("--layer", type=int, default=12, help="decoder block whose output (resid_post) is read")
    parser.add_argument("--l0-coefficient", type=float, default=1e-3, help="L0 penalty of the JumpReLU SAE (fastsae's default)")
    parser.add_argument(
        "--jumprelu-threshold",
        type=float,
        default=TrainConfig.jumprelu_initial_threshold,
        help="where JumpReLU thresholds start, on activations at unit mean squared norm (fastsae's default)",
    )
    parser.add_argument("--work-dir", default="", help="keep stores and checkpoints here (default: a temporary folder, deleted)")
    parser.add_argument(
        "--rubric-features", type=int, default=50, help="live features per SAE, sampled at random, that the LLM rates (needs a key)"
    )
    parser.add_argument("--llm-model", default=InterpretConfig.explanation_model, help="chat model that rates them")
    return parser.parse_args()


# --- extraction -----------------------------------------------------------------------------------


def extract(model, tokenizer, source, dataset: Dataset, packing: str, args: argparse.Namespace, work: Path) -> ActivationStore:
    config = ExtractConfig(
        dataset=str(DATASET), layers=[args.layer], packing=packing, block_size=args.block_size, output_dir=str(work / "activations")
    )
    logger.info("Extracting %d examples (%s packing)", len(dataset.examples), packing)
    model_fields = manifest_model_fields(EMBEDDED_MODEL, source)
    (folder,) = write_activation_stores(model, tokenizer, dataset, config, source.slug, model_fields)
    return ActivationStore(folder)


def training_part(dataset: Dataset, sequential: ActivationStore, held_out: list[int]) -> Dataset:
    """The dataset without the sequential store's held-out examples (matched by dataset row)."""
    records = sequential.example_records()
    held_out_rows = {records[index]["row"] for index in held_out}
    kept = [example for example in dataset.examples if example.row not in held_out_rows]
    assert len(kept) == len(dataset.examples) - len(held_out), "store records and dataset rows disagree"
    return dataclasses.replace(dataset, examples=kept)


# --- training -------------------------------------------------------------------------------------


def train(store: ActivationStore, packing: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, str], int]:
    """Top-K and JumpReLU trained on the same batches of `store`; their checkpoints by architecture, and the training tokens."""
    config = TrainConfig(
        store=str(store.folder),
        sweep=[f"topk:{args.m}:{args.k}", f"jumprelu:{args.m}:0"],
        l0_coefficient=args.l0_coefficient,
        jumprelu_initial_threshold=args.jumprelu_threshold,
        max_tokens=args.tokens,
        include_special_tokens=True,
        validation_fraction=VALIDATION_FRACTION,
        seed=SEED,
        device="cpu",
        output_dir=str(work / "checkpoints"),
        run_name=packing,
        export_saelens=False,
    )
    run = TrainingRun(config)
    results = run.run()
    return {result["spec"]["architecture"]: result["checkpoint"] for result in results}, run.n_train_tokens


# --- evaluation -----------------------------------------------------------------------------------


def reference_passes(model, tokenizer, store: ActivationStore, examples: list[int]) -> ReferencePasses:
    """The clean and zero-ablated passes over the held-out sequential examples, shared by every SAE."""
    split = SplitModel(model, int(store.manifest.layer), store.manifest.hook_point)
    batches = length_grouped(examples, np.diff(store.doc_offsets), BATCH_SIZE_PROMPTS)
    passes = ReferencePasses(split, store, batches, ignored_token_ids(tokenizer), pad_token_id(tokenizer), {})
    passes.compute()
    return passes


def evaluate(checkpoint: str, passes: ReferencePasses, examples: list[int]) -> dict[str, float]:
    """The table's metrics for one SAE on the held-out sequential examples, spliced in at every token."""
    sae = load_sae(checkpoint).sae
    on_store = store_metrics(passes.store, examples, sae, include_special=True)
    losses, _ = passes.evaluate(sae, exclude_ignored_from_reconstruction=False, desc=f"model: {Path(checkpoint).stem}")
    with_model = losses.metrics()["model_performance_preservation"]
    return {
        "mse_raw": on_store["fast_token_mse"]["raw"],
        "mse_log2": on_store["fast_token_mse"]["log2"],
        "mse_st_raw": on_store["fast_token_mse_special"]["raw"],
        "mse_st_log2": on_store["fast_token_mse_special"]["log2"],
        "fvu": on_store["reconstruction"]["all"]["fvu"],
        "fvu_content": on_store["reconstruction"]["content"]["fvu"],
        "ce_loss_score": with_model["ce_loss_score"],
        "relative_loss_increase": (with_model["ce_loss_with_sae"] - with_model["ce_loss_without_sae"]) / with_model["ce_loss_without_sae"],
        "l0": on_store["sparsity"]["l0_mean"],
    }


# --- FAST rubric (needs an LLM endpoint) ----------------------------------------------------------


def rubric(checkpoint: str, store: ActivationStore, label: str, args: argparse.Namespace, work: Path) -> RubricSummary:
    """The FAST rubric's ratings of a random sample of one SAE's live features, contexts read off the sequential store."""
    folder = work / "interpret" / label.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    config = InterpretConfig(
        checkpoint=checkpoint,
        store=str(store.folder),
        features=f"random:{args.rubric_features}",
        interpretations_path=str(folder / "interpretations.csv"),
        scoring="fast-rubric",
        explanation_model=args.llm_model,
        seed=SEED,
        device="cpu",
    )
    ratings = pd.read_csv(interpret_sae(config))["fast_rubric_rating"]
    return rubric_summary(None if pd.isna(rating) else int(rating) for rating in ratings)  # every sampled feature is live, so was asked


# --- report ---------------------------------------------------------------------------------------


def markdown_table(rows: dict[tuple[str, str], dict[str, float]]) -> str:
    columns = [
        ("FAST token MSE", "mse_raw", ".4f"),
        ("log2 MSE", "mse_log2", ".4f"),
        ("MSE_st", "mse_st_raw", ".4f"),
        ("log2 MSE_st", "mse_st_log2", ".4f"),
        ("FVU (all tokens)", "fvu", ".4f"),
        ("FVU (content)", "fvu_content", ".4f"),
        ("ce_loss_score (SAEBench)", "ce_loss_score", ".4f"),
        ("relative loss increase", "relative_loss_increase", ".4f"),
        ("L0 (mean)", "l0", ".2f"),
    ]
    lines = ["| SAE | " + " | ".join(title for title, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for (architecture, packing), values in rows.items():
        label = f"{ARCHITECTURE_LABELS[architecture]} {PACKING_LABELS[packing]}"
        lines.append(f"| {label} | " + " | ".join(format(values[key], spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


def rubric_table(summaries: dict[tuple[str, str], RubricSummary]) -> str:
    lines = [
        "| SAE | rated | " + " | ".join(f"rating {rating}" for rating in RUBRIC) + " | unreadable | rated 4–5 |",
        "|---|" + "---:|" * (len(RUBRIC) + 3),
    ]
    for (architecture, packing), summary in summaries.items():
        counts = " | ".join(str(summary.counts[rating]) for rating in RUBRIC)
        share = "–" if summary.high_share is None else f"{summary.high_share:.1%}"
        lines.append(
            f"| {ARCHITECTURE_LABELS[architecture]} {PACKING_LABELS[packing]} | {summary.rated} | {counts} | {summary.missing} | {share} |"
        )
    return "\n".join(lines)


def first_token_share(store: ActivationStore) -> float:
    """Fraction of the store's Σ‖x‖² that sits on the first token of its sequences (the attention sink)."""
    squared = store.activations(0, store.n_tokens).float().pow(2).sum(1)
    return float(squared[torch.from_numpy(store.doc_offsets[:-1])].sum() / squared.sum())


def notes(args, stores: dict[str, ActivationStore], held_out: list[int], train_tokens: dict[str, int], rated: bool, seconds: float) -> str:
    sequential, block = stores["sequential"], stores["block"]
    block_split = ExampleSplit.of_store(block, VALIDATION_FRACTION, SEED).record(SEED)
    held_out_tokens = sum(int(sequential.doc_offsets[i + 1] - sequential.doc_offsets[i]) for i in held_out)
    held_out_special = sum(int(sequential.example(i).special_mask.sum()) for i in held_out)
    lines = [
        f"SmolLM2-135M-Instruct (embedded, float32, CPU), blocks.{args.layer}.hook_resid_post, d={sequential.d}; "
        f"dataset {DATASET.name}, chat template.",
        f"- FAST store: {sequential.n_examples} examples, each its own sequence, {sequential.n_tokens} tokens. "
        f"Held out for evaluation: the {len(held_out)} validation examples of its split (fraction {VALIDATION_FRACTION}, seed {SEED}), "
        f"{held_out_tokens} tokens of which {held_out_special} special/template.",
        f"- Block store: only the other {sequential.n_examples - len(held_out)} (training) examples, concatenated and cut into "
        f"{block.n_examples} blocks of {args.block_size} tokens ({block.n_tokens} tokens); no block contains held-out text.",
        f"- Training: Top-K (M={args.m}, K={args.k}) and JumpReLU (M={args.m}, L0 coefficient {args.l0_coefficient:g}, "
        f"thresholds starting at {args.jumprelu_threshold:g}) per store, trained together on the same batches, {args.tokens} tokens each "
        f"(batch 1024), on all tokens including special ones, seed {SEED}. Each run holds out texts for its own validation "
        f"(FAST: {VALIDATION_FRACTION:.0%} of its examples; block: the {block_split['held_out_texts']} texts of "
        f"{VALIDATION_FRACTION:.0%} of its blocks, validating on the {block_split['held_out_examples']} blocks that hold only "
        f"them and leaving out the {block_split['left_out_examples']} that also hold training text), so the FAST SAEs draw "
        f"from {train_tokens['sequential']} distinct tokens and the block SAEs from {train_tokens['block']}.",
        "- Evaluation: all four SAEs on the same held-out sequential examples, each example alone, as a FAST model sees it. "
        "MSE is the paper's Eq. 7 on raw activations (mean over examples of the mean per-token squared error, / d); "
        "MSE_st the same over special/template tokens only. ce_loss_score is SAEBench's (CE at positions whose input "
        "is not BOS/EOS/pad; the SAE's reconstruction, or zeros, replacing the layer's output at every token); relative "
        "loss increase = (CE with the SAE − CE clean) / CE clean on the same positions.",
        f"- The first token of every sequence is an attention sink with a huge norm: it holds "
        f"{first_token_share(sequential):.1%} of Σ‖x‖² in the FAST store (where it is always the chat template's first "
        f"token) and {first_token_share(block):.1%} in the block store (where it is whatever token starts the block). "
        "It dominates FVU over all tokens, the activation scale used in training, and MSE_st; FVU (content) leaves it out.",
        f"- FAST rubric: {args.llm_model} rated {args.rubric_features} randomly sampled live features of each SAE (seed {SEED}) from "
        "their top-5 contexts in the sequential store, 1 (no pattern) to 5 (no deviations); the headline is the share rated 4–5."
        if rated
        else f"- FAST rubric skipped: no API key ({' / '.join(API_KEY_VARIABLES)}; OPENAI_BASE_URL for a local server).",
        f"- {PAPER_NOTE}",
        f"- Run time: {seconds:.0f} s on {torch.get_num_threads()} CPU threads (torch {torch.__version__}).",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fast_vs_block_") as temporary:
        work = Path(args.work_dir or temporary)
        source = resolve_model(EMBEDDED_MODEL)
        tokenizer = load_tokenizer(source)
        model = load_model(source, torch.float32, "cpu")
        dataset = load_dataset(DATASET)

        sequential = extract(model, tokenizer, source, dataset, "sequential", args, work)
        held_out = validation_examples(ExampleSplit.of_store(sequential, VALIDATION_FRACTION, SEED))
        block = extract(model, tokenizer, source, training_part(dataset, sequential, held_out), "block", args, work)
        stores = {"sequential": sequential, "block": block}

        checkpoints, train_tokens = {}, {}
        for packing, store in stores.items():
            logger.info("Training on the %s store", packing)
            checkpoints[packing], train_tokens[packing] = train(store, packing, args, work)

        rows = {}
        passes = reference_passes(model, tokenizer, sequential, held_out)
        for architecture in ARCHITECTURE_LABELS:
            for packing in stores:
                logger.info("Evaluating %s trained on the %s store", architecture, packing)
                rows[architecture, packing] = evaluate(checkpoints[packing][architecture], passes, held_out)

        summaries = {}
        for architecture, packing in rows if api_key() is not None else []:
            label = f"{ARCHITECTURE_LABELS[architecture]} {PACKING_LABELS[packing]}"
            logger.info("FAST rubric for %s", label)
            summaries[architecture, packing] = rubric(checkpoints[packing][architecture], sequential, label, args, work)

        print(markdown_table(rows))
        print()
        if summaries:
            print(rubric_table(summaries))
            print()
        print(notes(args, stores, held_out, train_tokens, bool(summaries), time.perf_counter() - started))


if __name__ == "__main__":
    main()
