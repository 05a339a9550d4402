"""Read new texts through a trained SAE (fastsae/tools/reader.py) and report what fires on each.

For each text: its TOP_N features by pooled activation, printed with their explanation, firing
tokens and top label when interpret_sae.py's `interpretations.csv` is there. Files: a CSV with
one row per text (the pooled activation of every feature that is in some text's top N), a PNG
heatmap of texts × those features, and one self-contained HTML page that shows, per text, the
chosen feature's activation on each token, drawn by the dashboard's token heatmap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastsae.common.atomic_files import check_output_files, write_atomically, write_figure_atomically
from fastsae.common.config import setting
from fastsae.common.default_paths import DEFAULT_CHECKPOINT, DEFAULT_INTERPRETATIONS
from fastsae.common.errors import UserError
from fastsae.core.sae import SparseAutoencoder
from fastsae.interpret.dashboard import write_page
from fastsae.interpret.interpret_sae import read_interpretations
from fastsae.lm.data import Example, load_dataset
from fastsae.lm.tokenization import example_label
from fastsae.tools.reader import SAEReader, TextFeatures, check_pooling

logger = logging.getLogger(__name__)

HEATMAP_MAX_TEXTS = 60  # rows of the PNG; the CSV and the HTML page hold every text
HEATMAP_MAX_FEATURES = 40  # columns of the PNG: the features with the largest pooled activation
REPORTED_COLUMNS = ["explanation", "top_tokens", "top_label", "top_label_auroc"]  # from interpretations.csv


@dataclass
class AnalyzeConfig:
    checkpoint: str = setting(
        DEFAULT_CHECKPOINT,
        "SAE checkpoint (ours, HypotheSAEs', another library's: docs/use_other_saes.md); "
        "MODEL_NAME, HOOK_POINT and LAYER when it does not record them",
    )
    texts_file: str = setting("", "JSONL (or a .json array), CSV or Parquet file (or a saved HF dataset) of texts; empty: use TEXTS")
    texts: list[str] = setting([], "texts to read when TEXTS_FILE is empty (on the command line commas split items: prefer --texts-file)")
    text_field: str = setting("auto", "field of TEXTS_FILE holding the text; auto picks text, content, prompt or messages (chat)")
    response_field: str = setting("", "optional field of TEXTS_FILE with an assistant response, as in extraction")
    max_texts: int = setting(0, "read only the first N texts of TEXTS_FILE (0: all)")
    pooling: str = setting("max", "how a text's tokens are pooled into one value per feature: max or mean")
    top_n: int = setting(10, "features reported per text, by pooled activation")
    interpretations: str = setting(
        DEFAULT_INTERPRETATIONS, "interpret_sae.py's CSV for this SAE (explanations, labels); skipped when missing"
    )
    csv_path: str = setting("text_features.csv", "one row per text: pooled activations of the reported features")
    heatmap_path: str = setting("text_features.png", "PNG heatmap of texts × reported features")
    html_path: str = setting("text_features.html", "self-contained page of per-token heatmaps")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    model_name: str = setting("", "model, when the checkpoint does not name it (or to point at a moved copy); empty: the checkpoint's")
    hook_point: str = setting(
        "", "hook point, only for a checkpoint that does not record it (HypotheSAEs', some others): resid_post, mlp_out or attn_out"
    )
    layer: int = setting(-1, "layer, only for a checkpoint that does not record it (HypotheSAEs', some others); -1: the checkpoint's")

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        if self.top_n <= 0:
            raise UserError(f"TOP_N must be positive; got {self.top_n}.")
        if self.max_texts < 0:
            raise UserError(f"MAX_TEXTS must be positive, or 0 for every text; got {self.max_texts}.")
        if not self.texts_file and not self.texts:
            raise UserError("no texts: set TEXTS_FILE to a JSONL/CSV file, or TEXTS to a list of strings.")
        blank = [index for index, text in enumerate(self.texts) if not text.strip()]
        if blank and not self.texts_file:  # read, it gives the template's (or a lone space's) features; TEXTS_FILE skips such rows
            raise UserError(f"TEXTS[{blank[0]}] is empty: write the text to read, or remove it.")
        check_output_files({"CSV_PATH": self.csv_path, "HEATMAP_PATH": self.heatmap_path, "HTML_PATH": self.html_path})


def load_texts(config: AnalyzeConfig) -> list[Example]:
    """TEXTS_FILE through the dataset loader (bad rows skipped and counted), else the inline TEXTS."""
    if config.texts_file:
        dataset = load_dataset(config.texts_file, config.text_field, config.response_field, "", config.max_texts, path_setting="TEXTS_FILE")
        return dataset.examples
    return [Example(row=index, source=f"text {index}", text=text) for index, text in enumerate(config.texts)]


def interpretations_by_feature(path: str, sae: SparseAutoencoder) -> dict[int, dict[str, Any]]:
    """Per feature, the columns the report shows from interpret_sae.py's CSV (empty strings where blank); {} without a file."""
    table = read_interpretations(path, sae)
    if table is None:
        return {}
    shown = table.set_index("feature")[REPORTED_COLUMNS].astype(object)
    return {int(feature): row.to_dict() for feature, row in shown.where(shown.notna(), "").iterrows()}


def top_features(readings: list[TextFeatures], top_n: int) -> list[list[int]]:
    """Each text's features with a positive pooled activation, strongest first, at most `top_n`."""
    chosen = []
    for reading in readings:
        values, indices = reading.pooled.topk(min(top_n, len(reading.pooled)))
        chosen.append([int(index) for value, index in zip(values, indices) if value > 0])
    return chosen


def describe(feature: int, interpretations: dict[int, dict[str, Any]]) -> str:
    """One line about a feature from interpretations.csv ('' when it has no row)."""
    info = interpretations.get(feature)
    if not info:
        return ""
    parts = [str(info["explanation"])] if info.get("explanation") else []
    if info.get("top_tokens"):
        parts.append(f"tokens: {info['top_tokens']}")
    if info.get("top_label"):
        auroc = info.get("top_label_auroc")
        parts.append(f"label: {info['top_label']}" + (f" (AUROC {float(auroc):.2f})" if auroc not in ("", None) else ""))
    return "; ".join(parts)


def report_text(
    examples: list[Example], readings: list[TextFeatures], chosen: list[list[int]], interpretations: dict[int, dict[str, Any]], pooling: str
) -> str:
    """The printed report: per text, its top features with their pooled activation and what they are."""
    lines = []
    for index, (example, reading, features) in enumerate(zip(examples, readings, chosen)):
        snippet = " ".join(example_label(example).split())
        snippet = snippet if len(snippet) <= 100 else snippet[:97] + "..."
        truncated = ", truncated" if reading.truncated else ""
        lines.append(
            f"\n[{index}] {snippet}\n    {len(reading.token_ids)} tokens ({int(reading.pooled_mask.sum())} pooled by {pooling}{truncated})"
        )
        if not features:
            lines.append("    no feature fires")
        for feature in features:
            about = describe(feature, interpretations)
            lines.append(f"    feature {feature:>6}  {float(reading.pooled[feature]):9.3f}" + (f"  {about}" if about else ""))
    return "\n".join(lines)


def feature_table(examples: list[Example], readings: list[TextFeatures], chosen: list[list[int]]) -> pd.DataFrame:
    """One row per text: its text, token count, top features, and the pooled activation of every reported feature."""
    pooled = np.stack([reading.pooled.numpy() for reading in readings])
    union = sorted({feature for features in chosen for feature in features})
    union = [union[column] for column in np.argsort(-pooled[:, union].max(0, initial=0), kind="stable")]  # strongest first
    table = pd.DataFrame(
        {
            "text": [example_label(example) for example in examples],
            "tokens": [len(reading.token_ids) for reading in readings],
            "pooled_tokens": [int(reading.pooled_mask.sum()) for reading in readings],
            "top_features": [" ".join(map(str, features)) for features in chosen],
        }
    )
    return pd.concat([table, pd.DataFrame(pooled[:, union], columns=[f"feature_{feature}" for feature in union])], axis=1)


def plot_text_heatmap(path: Path, table: pd.DataFrame, title: str) -> None:
    """Texts × features, pooled activations; the most active features and the first texts when there are many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [column for column in table.columns if column.startswith("feature_")][:HEATMAP_MAX_FEATURES]
    rows = table.head(HEATMAP_MAX_TEXTS)
    values = rows[columns].to_numpy(dtype=float) if columns else np.zeros((len(rows), 1))
    figure, axis = plt.subplots(figsize=(min(4 + 0.35 * values.shape[1], 20), min(2 + 0.3 * len(rows), 24)))
    image = axis.imshow(values, aspect="auto", cmap="Oranges", vmin=0)
    axis.set_xticks(range(len(columns)), [column.removeprefix("feature_") for column in columns], rotation=90, fontsize=7)
    labels = [f"{index}: {' '.join(text.split())[:40]}" for index, text in zip(rows.index, rows["text"])]
    axis.set_yticks(range(len(rows)), labels, fontsize=7)
    axis.set_xlabel("feature")
    shown = f" (first {len(rows)} of {len(table)} texts)" if len(rows) < len(table) else ""
    axis.set_title(title + shown, fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.03)
    figure.tight_layout()
    write_figure_atomically(path, figure, dpi=110)
    plt.close(figure)


def page_data(
    title: str,
    examples: list[Example],
    readings: list[TextFeatures],
    chosen: list[list[int]],
    interpretations: dict[int, dict[str, Any]],
    pooling: str,
) -> dict[str, Any]:
    """The HTML page's JSON: per text, the pooled tokens and each reported feature's activation on them."""
    union = sorted({feature for features in chosen for feature in features})
    texts = []
    for example, reading, features in zip(examples, readings, chosen):
        shown = np.flatnonzero(reading.pooled_mask)
        dense = reading.token_features.index_select(1, torch.tensor(features, dtype=torch.long)).to_dense()[shown]
        texts.append(
            {
                "text": example_label(example),
                "truncated": reading.truncated,
                "tokens": [reading.tokens[position] for position in shown],
                "features": [
                    {
                        "feature": feature,
                        "pooled": round(float(reading.pooled[feature]), 4),
                        "activations": [round(float(a), 4) for a in dense[:, column]],
                    }
                    for column, feature in enumerate(features)
                ],
            }
        )
    return {
        "title": title,
        "pooling": pooling,
        "about": {str(feature): describe(feature, interpretations) for feature in union},
        "texts": texts,
    }


def analyze_texts(config: AnalyzeConfig) -> Path:
    """Read the texts, print each one's top features, and write the CSV, PNG and HTML page."""
    examples = load_texts(config)
    reader = SAEReader.load(config.checkpoint, config.device, config.model_name, config.hook_point, config.layer)
    interpretations = interpretations_by_feature(config.interpretations, reader.sae)
    logger.info(
        "Reading %d texts through %s (%s, layer %s)",
        len(examples),
        reader.sae.spec.name,
        reader.extraction.hook_point,
        reader.extraction.layers,
    )
    readings = reader.read(examples, config.pooling)
    chosen = top_features(readings, config.top_n)
    print(report_text(examples, readings, chosen, interpretations, config.pooling))
    title = f"{reader.sae.spec.name} on {reader.extraction.model_name} {reader.extraction.hook_point} {reader.extraction.layers} — {config.pooling} over tokens"
    table = feature_table(examples, readings, chosen)
    csv_path = Path(config.csv_path)
    write_atomically(csv_path, lambda partial: table.to_csv(partial, index=False))
    plot_text_heatmap(Path(config.heatmap_path), table, title)
    write_page(Path(config.html_path), "texts.html", page_data(title, examples, readings, chosen, interpretations, config.pooling))
    logger.info("Wrote %s, %s and %s", csv_path, config.heatmap_path, config.html_path)
    return csv_path
