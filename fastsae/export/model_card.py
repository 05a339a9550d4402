"""The README.md model card of an exported SAE: Hub front matter, then what a reader needs to trust and use it.

Everything on the card is read off the exported files: the checkpoint's `SAEInfo` (model, hook,
store manifest, training settings), eval.json (evaluate_sae.py) and interpretations.csv
(interpret_sae.py). A missing file is said so on the card, with the command that makes it.
Every table is GitHub-flavoured Markdown, which the Hub renders; cells from data or an LLM are
escaped so a `|` or a newline cannot break a row, and `<` cannot start HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from huggingface_hub import ModelCardData

from fastsae.common import markdown
from fastsae.core.sae_info import SAEInfo
from fastsae.evaluate.evaluate_sae import DENSITY_PLOT_FILE, EVAL_FILE, report_table
from fastsae.export.neuronpedia import NEURONPEDIA_FOLDER
from fastsae.train.training_report import CURVES_FILE, METRICS_FILE

EXPORT_TAG = "fastsae"  # also how an export folder is recognised as ours when it is replaced
CARD_TAGS = ["sparse-autoencoder", "sae", "saelens", EXPORT_TAG, "interpretability"]
TOP_FEATURES = 10
REPO_PLACEHOLDER = "YOUR_NAME/YOUR_REPO"
# Training settings that name folders on the machine that trained: the card, made to be published, gives their names only.
LOCAL_PATH_SETTINGS = {"store", "output_dir", "tracker_dir"}


class CardInputs(NamedTuple):
    """What the card is made from; `evaluation` and `interpretations` are None when their step has not run."""

    info: SAEInfo  # the checkpoint's record of the SAE
    checkpoint_name: str  # the checkpoint's .pt file (HypotheSAEs' format where it runs the SAE), in the folder root
    saelens_folder: str  # the SAELens subfolder (= SAELens' sae_id on the Hub)
    files: list[str]  # every file of the export, relative to its root
    evaluation: dict[str, Any] | None
    interpretations: pd.DataFrame | None
    repo_id: str  # where it is pushed; empty when not known yet


def front_matter(inputs: CardInputs) -> str:
    """YAML the Hub reads: SAELens as the library (its loader opens the subfolder), tags, and the base model when known."""
    data = ModelCardData(library_name="saelens", tags=CARD_TAGS + [inputs.info.spec.architecture], base_model=inputs.info.hub_model_id)
    return f"---\n{data.to_yaml()}\n---\n"


def _usage(inputs: CardInputs) -> str:
    repo = inputs.repo_id or REPO_PLACEHOLDER
    download = f'hf_hub_download("{repo}", "{inputs.checkpoint_name}")'
    # load_model leaves the SAE in training mode, where a BatchTopK SAE keeps the batch's top K·B instead of its threshold.
    hypothesaes = ["# HypotheSAEs", "from hypothesaes.sae import load_model", f"sae = load_model({download}).eval()", ""]
    return "\n".join(
        [
            "## Use it",
            "",
            "The weights take the hook's raw activations: the activation scale used in training is folded in.",
            "",
            "```python",
            "# SAELens",
            "from sae_lens import SAE",
            f'sae = SAE.from_pretrained("{repo}", "{inputs.saelens_folder}")  # or SAE.load_from_disk("{inputs.saelens_folder}") in a local copy',
            "",
            "from huggingface_hub import hf_hub_download",
            "",
            *(hypothesaes if inputs.info.spec.runs_in_hypothesaes else []),
            "# fastsae",
            "from fastsae.core.checkpoint import load_sae",
            f"sae = load_sae({download}).sae",
            "```",
        ]
    )


def _model_and_data(inputs: CardInputs) -> str:
    info = inputs.info
    manifest, extraction = info.store_manifest, info.extraction
    dataset = manifest.dataset
    if not info.trained_by_fastsae:
        special = "unknown (not trained by fastsae)"
    else:
        special = "included" if info.trained_with_special_tokens else "excluded (BOS and chat-template tokens)"
    rows = [
        ["model", info.model_label],
        ["base model on the Hub", info.hub_model_id],
        ["hook", info.hook_name],
        ["layer", info.layer],
        ["activation width d", info.spec.d],
        ["dataset", dataset.path],
        ["dataset fingerprint", dataset.fingerprint],
        ["examples", dataset.n_examples],
        ["tokens in the store", manifest.n_tokens],
        ["max length (tokens per example)", extraction.get("max_length")],
        ["chat template", extraction.get("chat_template")],
        ["packing", manifest.packing],
        ["store dtype", manifest.dtype],
        ["special tokens in training", special],
    ]
    return "## Model and data\n\n" + markdown.table(["", "value"], rows)


def _sae_and_training(inputs: CardInputs) -> str:
    info = inputs.info
    spec = info.spec
    rows = [
        ["architecture", spec.architecture],
        ["features (M, SAELens d_sae)", spec.m],
        ["active features per token (K)", spec.k if spec.architecture in ("topk", "batchtopk") else None],
        ["Matryoshka prefixes", list(spec.prefixes) or None],
        ["activation scale (folded into the weights)", f"{info.activation_scale:.6g}"],
        ["training steps", info.step],
        ["tokens trained", info.tokens_trained],
    ]
    settings = [[name, Path(value).name if name in LOCAL_PATH_SETTINGS and value else value] for name, value in info.training.items()]
    return "\n\n".join(
        [
            "## The SAE",
            markdown.table(["", "value"], rows),
            "### Training settings",
            "As in `train_sae.py`; each is that script's constant in lower case (folders by their name only).",
            markdown.table(["setting", "value"], settings),
        ]
    )


def _evaluation(inputs: CardInputs) -> str:
    if inputs.evaluation is None:
        return "## Evaluation\n\nNot evaluated: run `python evaluate_sae.py --checkpoint <the .pt>`, then export again."
    evaluation = inputs.evaluation
    intro = (
        f"From `evaluate_sae.py` on {evaluation['examples']} held-out examples (split from the training data with no text on both sides). "
        "FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² on raw activations. "
    )
    if evaluation.get("saebench_core"):
        intro += (
            "The SAEBench table is SAEBench's core evaluation as sae-bench 0.6.0 computes it (ce_loss_score = (CE_zero − CE_sae) / "
            "(CE_zero − CE_clean), the hook's output zero-ablated at every position), on a budget of held-out tokens; every number, "
            "with the per-feature density and SAEBench's own JSON block, is in `eval.json`."
        )
    else:
        intro += "Every number, with the per-feature density, is in `eval.json`."
    parts = ["## Evaluation", intro, report_table(evaluation)]
    if evaluation.get("model_metrics_skipped"):
        parts.append(f"Model metrics not measured: {markdown.cell(evaluation['model_metrics_skipped'])}.")
    elif not evaluation.get("saebench_core"):  # evaluated with MODEL_METRICS off
        parts.append(
            "Model metrics (SAEBench's core: ce_loss_score, KL) not measured: run `python evaluate_sae.py --checkpoint <the .pt>` "
            "with MODEL_METRICS on, then export again."
        )
    if DENSITY_PLOT_FILE in inputs.files:
        parts.append(f"![feature density]({DENSITY_PLOT_FILE})")
    return "\n\n".join(parts)


def _features(inputs: CardInputs) -> str:
    table = inputs.interpretations
    if table is None:
        return (
            "## Features\n\nNo interpretations: run `python interpret_sae.py --checkpoint <the .pt>` "
            "(with OPENAI_API_KEY set for explanations and scores), then export again."
        )
    scored = table[table["detection_score"].notna()]
    if len(scored):
        chosen = scored.sort_values(["detection_score", "frequency"], ascending=False, kind="stable").head(TOP_FEATURES)
        intro = (
            f"The {len(chosen)} best-scored of the {len(table)} features in `interpretations.csv`, by delphi's detection score. "
            "An LLM explained each from windows sampled across its activation quantiles; detection is the balanced accuracy "
            "with which the LLM, given only the explanation, told held-out activating windows from non-activating ones, and "
            "fuzzing the same for windows with their firing tokens marked, against windows with random tokens marked (0.5 is chance)."
        )
    else:
        chosen = table.sort_values("frequency", ascending=False, kind="stable").head(TOP_FEATURES)
        intro = (
            f"**No LLM scores**: `interpretations.csv` ({len(table)} features) was written without an API key "
            f"or with EXPLAIN off. Here are the {len(chosen)} most frequent features instead; rerun `interpret_sae.py` "
            "with OPENAI_API_KEY set, then export again, for explanations and scores."
        )
    rows = [
        [
            rank,
            int(row.feature),
            None if pd.isna(row.detection_score) else f"{row.detection_score:.3f}",
            None if pd.isna(row.fuzzing_score) else f"{row.fuzzing_score:.3f}",
            row.explanation,
            f"{row.frequency:.3g}",  # a rare feature's frequency, 3e-05, is not 0.0000
            row.top_tokens,
            None if pd.isna(row.top_label) or pd.isna(row.top_label_auroc) else f"{row.top_label} ({row.top_label_auroc:.2f})",
        ]
        for rank, row in enumerate(chosen.itertuples(index=False), 1)
    ]
    header = ["rank", "feature", "detection", "fuzzing", "explanation", "frequency", "top tokens", "top label (AUROC)"]
    return "\n\n".join(["## Features", intro, markdown.table(header, rows)])


def _files(inputs: CardInputs) -> str:
    meaning = {
        inputs.checkpoint_name: "HypotheSAEs checkpoint (`hypothesaes.sae.load_model`; `fastsae.core.checkpoint.load_sae`)"
        if inputs.info.spec.runs_in_hypothesaes
        else "fastsae checkpoint (`fastsae.core.checkpoint.load_sae`; HypotheSAEs has no such SAE)",
        f"{inputs.saelens_folder}/cfg.json": "SAELens config (`SAE.load_from_disk` on the folder)",
        f"{inputs.saelens_folder}/sae_weights.safetensors": "SAELens weights",
        f"{inputs.saelens_folder}/sparsity.safetensors": "SAELens feature sparsity: log10 of each feature's density",
        EVAL_FILE: "every evaluation metric, with the per-feature density",
        DENSITY_PLOT_FILE: "histogram of the features' log10 density",
        METRICS_FILE: "training history and final validation metrics",
        CURVES_FILE: "training curves",
        "interpretations.csv": "per feature: statistics, top tokens and windows, logit lens, label, explanation, detection and fuzzing scores",
        "README.md": "this card",
        f"{NEURONPEDIA_FOLDER}/": "Neuronpedia's upload files: every feature's top activating windows, logit lens and density in "
        "SAEDashboard's batch layout (`batch-*.json`), and the explanations (`explanations.json`)",
    }
    # The Neuronpedia files are one row: a folder of batches.
    names = dict.fromkeys(f"{NEURONPEDIA_FOLDER}/" if name.startswith(f"{NEURONPEDIA_FOLDER}/") else name for name in inputs.files)
    rows = [[f"`{name}`", meaning[name]] for name in names]
    return "## Files\n\n" + markdown.table(["file", "what it is"], rows)


def render_model_card(inputs: CardInputs) -> str:
    """The whole README.md."""
    info = inputs.info
    spec = info.spec
    on_model = f" on {info.model_label}" if info.model_label else ""  # another library's files may not name the model
    title = f"# {spec.name}: a {spec.architecture} SAE{on_model}, `{info.hook_name}`"
    trained = (
        "trained with fastsae the FAST way (each example its own sequence, never packed)"
        if info.trained_by_fastsae
        else f"saved by {info.source_format} and exported with fastsae, which does not know how it was trained"
    )
    summary = f"A sparse autoencoder with {spec.m} features over the {spec.d}-dimensional activations at `{info.hook_name}`, {trained}."
    sections = [
        title,
        summary,
        _usage(inputs),
        _model_and_data(inputs),
        _sae_and_training(inputs),
        _evaluation(inputs),
        _features(inputs),
        _files(inputs),
    ]
    return front_matter(inputs) + "\n" + "\n\n".join(sections) + "\n"
