"""SAEBench's own first-letter absorption evaluation beside fastsae's, on the default model and SAE, on the same words.

    python benchmarks/absorption_vs_saebench.py [--checkpoint PATH] [--words 3000]

- **fastsae**: `run_absorption` on the checkpoint, as `evaluate_sae.py --evals absorption` runs it (its model, Hugging
  Face, float32, run to the SAE's block), with `MAX_WORDS = --words`.
- **SAEBench**: sae-bench 0.6.0's `run_eval` through TransformerLens (all blocks, float32), driven as
  `tests/test_absorption.py` drives it (`tests/saebench_absorption_reference.py`): its vocabulary is the same sampled
  words, its random draws get the same seed. Its model is the same Hugging Face model (SmolLM2 dequantised from the
  embedded GGUF, through fastsae's cache) converted by TransformerLens, unprocessed. It gets the SAE with the decoder
  rows' norms folded into the encoder, as its loader folds a pretrained SAE's: its absorption reads decoder rows as
  unit directions.

SAEBench measures absorption only when at least 20 letters have a probe F1 above 0.6; on SmolLM2 that takes about 3,000
words (at 1,000 it fails). Prints one table (per letter and overall: probe F1, main latents, absorption fraction,
full-absorption rate, each as fastsae / SAEBench), the largest differences, and each side's wall time. On the shared
2-core development CPU it took 47 minutes, two thirds of it SAEBench's (all 30 blocks on every prompt; results in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastsae.common.markdown import table
from fastsae.core.saelens_export import saelens_weights
from fastsae.core.trained_sae import TrainedSAE, open_trained_sae
from fastsae.evaluate.absorption import AbsorptionSettings, run_absorption, task_vocabulary
from fastsae.evaluate.spelling_task import LETTERS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # SAEBench's runner, shared with tests/test_absorption.py
from saebench_absorption_reference import saebench_absorption_reference  # noqa: E402

DEFAULT_CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
COMPARED = {  # the numbers compared per letter: their name in both sides' results -> the column's label
    "f1_probe": "probe F1",
    "split_feats": "main latents",
    "mean_absorption_fraction": "absorption fraction",
    "full_absorption_rate": "full-absorption rate",
}


def unit_decoder_weights(trained: TrainedSAE) -> dict[str, torch.Tensor]:
    """The SAE in SAELens' layout with each decoder row's norm folded into its encoder column (SAELens' `fold_W_dec_norm`).

    Exact for Top-K only when every row has the same norm (the ranking of latents is then unchanged), as in our
    checkpoints; SAELens refuses to fold a Top-K SAE for that reason."""
    weights = saelens_weights(trained.sae)
    norms = weights["W_dec"].norm(dim=1)
    if not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4):
        sys.exit(f"{trained.checkpoint}'s decoder rows have norms {norms.min():.4f} to {norms.max():.4f}: folding them would change Top-K.")
    return weights | {"W_enc": weights["W_enc"] * norms, "b_enc": weights["b_enc"] * norms, "W_dec": weights["W_dec"] / norms[:, None]}


def fastsae_letters(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """fastsae's numbers per letter from `absorption.json`'s content (absorption only where measured)."""
    return {letter["first_letter"]: {name: letter.get(name) for name in COMPARED} for letter in result["letters"]}


def saebench_letters(output: dict[str, Any], k_sparse) -> dict[str, dict[str, Any]]:
    """SAEBench's numbers per letter: probe F1 and main latents from its k-sparse probing table, absorption from its output
    (only for the letters it counts, and none when its gate stopped it)."""
    letters: dict[str, dict[str, Any]] = {letter: {} for letter in LETTERS}
    for row in k_sparse.to_dict("records"):
        letters[row["letter"]] = {"f1_probe": row["f1_probe"], "split_feats": [int(latent) for latent in row["split_feats"]]}
    for detail in output.get("eval_result_details", []):
        letters[detail["first_letter"]] |= {name: detail[name] for name in ("mean_absorption_fraction", "full_absorption_rate")}
    return letters


def overall(output: dict[str, Any], letters: dict[str, dict[str, Any]], f1_letters: list[str]) -> dict[str, Any]:
    """The overall row: the probe's mean F1 over `f1_letters`, and the means of an `AbsorptionEvalOutput` (when measured)."""
    block = output.get("eval_result_metrics", {}).get("mean", {})
    return {
        "f1_probe": sum(letters[letter]["f1_probe"] for letter in f1_letters) / len(f1_letters),
        "split_feats": block.get("mean_num_split_features"),
        "mean_absorption_fraction": block.get("mean_absorption_fraction_score"),
        "full_absorption_rate": block.get("mean_full_absorption_score"),
    }


def shown(value: Any) -> str:
    """A cell: a number to 3 decimals, a list of latents, or — where a side has no value."""
    if value is None:
        return "—"
    if isinstance(value, list):
        return " ".join(str(latent) for latent in value) or "none"
    return f"{value:.3f}"


def differences(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Per quantity: the letters where both sides have it, those that differ, and the largest difference."""
    rows = []
    for name, label in COMPARED.items():
        both = [letter for letter in LETTERS if ours[letter].get(name) is not None and theirs[letter].get(name) is not None]
        if name == "split_feats":
            differ = [letter for letter in both if ours[letter][name] != theirs[letter][name]]
            largest = ", ".join(f"{letter}: {shown(ours[letter][name])} / {shown(theirs[letter][name])}" for letter in differ) or "—"
        else:
            gaps = {letter: abs(ours[letter][name] - theirs[letter][name]) for letter in both}
            differ = [letter for letter, gap in gaps.items() if gap > 1e-6]
            worst = max(gaps, key=gaps.get, default=None)
            largest = f"{gaps[worst]:.2e} ({worst})" if worst else "—"
        rows.append([label, len(both), len(differ), largest])
    return rows


def comparison(result: dict[str, Any], output: dict[str, Any], k_sparse) -> str:
    """Markdown: one row per letter and an overall row (each cell fastsae / SAEBench), then the differences."""
    ours, theirs = fastsae_letters(result), saebench_letters(output, k_sparse)
    counted_ours = {letter["first_letter"] for letter in result["letters"] if letter["counted"]}
    counted_theirs = {letter for letter, row in theirs.items() if row.get("f1_probe", 0) > result["probe"]["min_GT_probe_f1"]}
    rows = []
    for letter in LETTERS:
        cells = [f"{shown(ours[letter].get(name))} / {shown(theirs[letter].get(name))}" for name in COMPARED]
        rows.append([letter, *cells, f"{'yes' if letter in counted_ours else 'no'} / {'yes' if letter in counted_theirs else 'no'}"])
    f1_letters = [letter for letter in LETTERS if ours[letter]["f1_probe"] is not None]  # SAEBench scores a letter without held-out words 0
    totals = overall(result["saebench_absorption"] or {}, ours, f1_letters), overall(output, theirs, f1_letters)
    cells = [f"{shown(totals[0][name])} / {shown(totals[1][name])}" for name in COMPARED]
    rows.append(["**overall**", *cells, f"{len(counted_ours)} / {len(counted_theirs)}"])
    header = ["letter", *(f"{label} (fastsae / SAEBench)" for label in COMPARED.values()), "counted"]
    gaps = table(["per letter", "letters with both", "letters that differ", "largest difference (letter)"], differences(ours, theirs))
    return "\n\n".join([table(header, rows), gaps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a Top-K SAE checkpoint of fastsae's (default: the pipeline's)")
    parser.add_argument("--words", type=int, default=3000, help="words sampled for the spelling task, the same for both sides")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"{args.checkpoint} not found: make the default one with `python run_pipeline.py --yes`, or pass --checkpoint.")
    trained = open_trained_sae(args.checkpoint)
    if trained.info.spec.architecture != "topk" or trained.info.hook_point != "resid_post":
        sys.exit(
            f"{args.checkpoint} is a {trained.info.spec.architecture} SAE at {trained.info.hook_point}: the SAEBench side takes Top-K at resid_post."
        )
    settings = AbsorptionSettings(max_words=args.words)
    load_before = os.getloadavg()[0]

    started = time.perf_counter()
    result = run_absorption(trained, "cpu", settings)
    fastsae_seconds = time.perf_counter() - started
    untrained = [letter["first_letter"] for letter in result["letters"] if not letter["train_words"]]
    if untrained:  # SAEBench's k-sparse probing looks up a probe for every letter and has none for these (a KeyError)
        sys.exit(f"no training word starts with {', '.join(untrained)}: SAEBench's code needs one for every letter. Raise --words.")

    started = time.perf_counter()
    language_model = trained.load_model(dtype=torch.float32, device="cpu")
    words, _ = task_vocabulary(language_model.tokenizer, settings, "cpu")  # the words run_absorption sampled
    output, k_sparse = saebench_absorption_reference(
        language_model.model,
        language_model.tokenizer,
        trained.info.layer,
        unit_decoder_weights(trained),
        trained.info.spec.k,
        [word.text for word in words],
        settings.random_seed,
        settings.min_GT_probe_f1,
        settings.min_feats_for_eval,
    )
    saebench_seconds = time.perf_counter() - started

    vocabulary = result["vocabulary"]
    print(f"\n{trained.checkpoint.name} on {result['model_name']} {result['hook_name']}: {vocabulary['sampled']:,} words sampled")
    print(f"({vocabulary['train_words']:,} train the probes, {vocabulary['test_words']:,} held out), seed {settings.random_seed}")
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {load}\n")
    print(f"fastsae: {result['statement']}")
    print("SAEBench: " + ("measured" if output else "its gate stopped it (too few letters with probe F1 above 0.6)") + "\n")
    print(comparison(result, output, k_sparse))
    print("\n" + table(["side", "wall time (s)"], [["fastsae", f"{fastsae_seconds:.0f}"], ["SAEBench", f"{saebench_seconds:.0f}"]]))


if __name__ == "__main__":
    main()
