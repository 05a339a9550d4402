"""One self-contained dashboard.html: a sortable, filterable feature list and, per feature, its
explanation, delphi's detection and fuzzing scores with their accuracy per activation quantile,
FAST-rubric rating and name, density, activation histogram, logit-lens tokens, the labels whose
sparse probes chose it (when evaluation's sparse_probing.json is beside the checkpoint), top windows as a
token heatmap (hover shows each activation), and the held-out windows the scorers saw with the
LLM's verdict on each; above the list, the rubric's rating distribution and 4-5 share when it ran.
No network; opens from file://.

All data travels as one JSON document inside <script type="application/json">, with <, > and &
escaped as \\u003c, \\u003e and \\u0026, so no text can close the script element. The page puts
every piece of text into the DOM with textContent, never as HTML. The token heatmap, its styles
and the JSON-in-script helper are shared with the text reader's page (fastsae/tools/analyze_texts.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastsae.common.atomic_files import write_text_atomically
from fastsae.interpret.explanations import RubricSummary
from fastsae.interpret.features import HISTOGRAM_EDGES, FeatureStatistics
from fastsae.interpret.scorers import SCORERS, ClassifierResult, ScoringExample
from fastsae.interpret.windows import Window
from fastsae.templates import read_template


def json_for_script(payload: Any) -> str:
    """JSON that cannot close its <script> element: <, > and & become \\u escapes (still valid JSON)."""
    return json.dumps(payload, allow_nan=False).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _window(window: Window) -> dict[str, Any]:
    return {
        "tokens": window.tokens,
        "activations": [round(a, 4) for a in window.activations],
        "focus": window.peak,
        "activation": round(window.activation, 4),
    }


def _held_out(examples: list[ScoringExample], results: dict[str, ClassifierResult]) -> list[dict[str, Any]]:
    """The scorers' examples with the quantile of each activating one and each scorer's verdict (true: "yes")."""
    return [
        {
            **_window(example.window),
            "quantile": example.quantile,
            "verdicts": {scorer: result.verdicts[index] for scorer, result in results.items()},
        }
        for index, example in enumerate(examples)
    ]


def dashboard_data(
    title: str,
    rows: list[dict[str, Any]],
    top_windows: dict[int, list[Window]],
    statistics: FeatureStatistics,
    rubric: RubricSummary | None = None,
    scored: dict[int, tuple[list[ScoringExample], dict[str, ClassifierResult]]] | None = None,
    n_quantiles: int = 10,
    probe_choices: dict[int, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The page's JSON: one entry per CSV row plus its histogram, top windows and scored examples; `rubric` is None when
    the rubric did not run. `probe_choices` (from evaluation's sparse_probing.json): per feature, the labels' probes
    that chose it."""
    scored, probe_choices = scored or {}, probe_choices or {}
    features = []
    for row in rows:
        feature = int(row["feature"])
        quantiles = {
            scorer: json.loads(row[f"{scorer}_quantile_accuracy"]) if row.get(f"{scorer}_quantile_accuracy") else None for scorer in SCORERS
        }
        features.append(
            {
                **{key: _finite(value) for key, value in row.items() if key != "top_contexts" and not key.endswith("_quantile_accuracy")},
                "quantile_accuracy": quantiles,
                "histogram": statistics.histogram[feature].tolist(),
                "contexts": [_window(window) for window in top_windows[feature]],
                "held_out": _held_out(*scored[feature]) if feature in scored else [],
                "probes": sorted(probe_choices.get(feature, []), key=lambda choice: choice["rank"]),
            }
        )
    return {
        "title": title,
        "histogram_edges": HISTOGRAM_EDGES.tolist(),
        "features": features,
        "rubric": rubric.as_dict() if rubric else None,
        "scorers": list(SCORERS),
        "n_quantiles": n_quantiles,
    }


def write_page(path: Path, template: str, data: dict[str, Any]) -> Path:
    """Fill `template` (a file in fastsae/templates) with the shared token heatmap's CSS and JS and the page's data; write it atomically."""
    page = (
        read_template(template)
        .replace("__HEATMAP_CSS__", read_template("token_heatmap.css"))
        .replace("__HEATMAP_JS__", read_template("token_heatmap.js"))
        .replace("__DATA__", json_for_script(data))
    )
    return write_text_atomically(path, page)


def write_dashboard(path: Path, data: dict[str, Any]) -> Path:
    return write_page(path, "dashboard.html", data)
