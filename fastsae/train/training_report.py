"""What a training run leaves beside each checkpoint: metrics.json, training_curves.png, and the printed comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from fastsae.common.atomic_files import write_figure_atomically, write_json_atomically

METRICS_FILE = "metrics.json"  # beside each checkpoint: the training history and the final validation metrics
CURVES_FILE = "training_curves.png"
SAELENS_EXPORT_FOLDER = "saelens"  # beside each checkpoint, with EXPORT_SAELENS: the SAE in SAELens' layout
CURVES = (("loss", "training loss"), ("fvu", "FVU"), ("l0", "L0 (active features per token)"), ("dead_fraction", "dead fraction"))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_json_atomically(path, metrics)


def read_final_metrics(path: Path) -> dict[str, Any]:
    """The final validation metrics a `write_metrics` file holds; empty when there is no file or no validation."""
    final = json.loads(path.read_text())["final"] if path.is_file() else {}
    if "dead_fraction" in final:  # written before never_fired_fraction had its own name: the same number
        final["never_fired_fraction"] = final.pop("dead_fraction")
    return final


def plot_training_curves(path: Path, title: str, history: list[dict[str, float]], validation: list[dict[str, float]]) -> None:
    """Four panels against training tokens; validation FVU is drawn over the training FVU."""
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    tokens = [row["tokens"] for row in history]
    for axis, (key, label) in zip(axes, CURVES):
        axis.plot(tokens, [row[key] for row in history], label="train", linewidth=1.2)
        if key == "fvu" and validation:
            axis.plot([row["tokens"] for row in validation], [row["fvu"] for row in validation], "o-", label="validation", markersize=3)
            axis.legend()
        if key in ("loss", "fvu"):
            axis.set_yscale("log")
        axis.set_xlabel("training tokens")
        axis.xaxis.set_major_formatter(EngFormatter())
        axis.set_title(label)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    write_figure_atomically(path, figure, dpi=110)
    plt.close(figure)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of every SAE's final validation metrics, one row each."""
    header = "| SAE | val FVU | explained var. | L0 | never fired | dense | tokens | stopped |"
    lines = [header, "|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|"]
    for row in rows:
        final = row["final"]
        if not final:  # VALIDATION_FRACTION = 0: nothing held out to measure on
            lines.append(f"| {row['name']} | n/a | n/a | n/a | n/a | n/a | {row['tokens_trained']:,} | {row['stopped']} |")
            continue
        lines.append(
            f"| {row['name']} | {final['fvu']:.4f} | {final['explained_variance']:.4f} | {final['l0']:.1f} "
            f"| {final['never_fired_fraction']:.1%} | {final['dense_fraction']:.1%} | {row['tokens_trained']:,} | {row['stopped']} |"
        )
    return "\n".join(lines)
