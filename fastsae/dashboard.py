"""One self-contained dashboard.html: a sortable, filterable feature list and, per feature, its
explanation, delphi's detection and fuzzing scores with their accuracy per activation quantile,
FAST-rubric rating and name, density, activation histogram, logit-lens tokens, top windows as a
token heatmap (hover shows each activation), and the held-out windows the scorers saw with the
LLM's verdict on each; above the list, the rubric's rating distribution and 4-5 share when it ran.
No network; opens from file://.

All data travels as one JSON document inside <script type="application/json">, with <, > and &
escaped as \\u003c, \\u003e and \\u0026, so no text can close the script element. The page puts
every piece of text into the DOM with textContent, never as HTML. The token heatmap, its styles
and the JSON-in-script helper are shared with the text reader's page (fastsae/text_analysis.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastsae.atomic_files import write_text_atomically
from fastsae.explanations import RubricSummary
from fastsae.features import HISTOGRAM_EDGES, FeatureStatistics
from fastsae.scorers import SCORERS, ClassifierResult, ScoringExample
from fastsae.windows import Window


def json_for_script(payload: Any) -> str:
    """JSON that cannot close its <script> element: <, > and & become \\u escapes (still valid JSON)."""
    return json.dumps(payload, allow_nan=False).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _window(window: Window) -> dict[str, Any]:
    return {"tokens": window.tokens, "activations": [round(a, 4) for a in window.activations], "focus": window.peak, "activation": round(window.activation, 4)}


def _held_out(examples: list[ScoringExample], results: dict[str, ClassifierResult]) -> list[dict[str, Any]]:
    """The scorers' examples with the quantile of each activating one and each scorer's verdict (true: "yes")."""
    return [
        {**_window(example.window), "quantile": example.quantile, "verdicts": {scorer: result.verdicts[index] for scorer, result in results.items()}}
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
) -> dict[str, Any]:
    """The page's JSON: one entry per CSV row plus its histogram, top windows and scored examples; `rubric` is None when the rubric did not run."""
    scored = scored or {}
    features = []
    for row in rows:
        feature = int(row["feature"])
        quantiles = {scorer: json.loads(row[f"{scorer}_quantile_accuracy"]) if row.get(f"{scorer}_quantile_accuracy") else None for scorer in SCORERS}
        features.append(
            {
                **{key: _finite(value) for key, value in row.items() if key != "top_contexts" and not key.endswith("_quantile_accuracy")},
                "quantile_accuracy": quantiles,
                "histogram": statistics.histogram[feature].tolist(),
                "contexts": [_window(window) for window in top_windows[feature]],
                "held_out": _held_out(*scored[feature]) if feature in scored else [],
            }
        )
    return {
        "title": title, "histogram_edges": HISTOGRAM_EDGES.tolist(), "features": features, "rubric": rubric.as_dict() if rubric else None,
        "scorers": list(SCORERS), "n_quantiles": n_quantiles,
    }


def write_page(path: Path, template: str, data: dict[str, Any]) -> Path:
    """Fill a page's shared heatmap pieces and its data, then write it atomically."""
    page = template.replace("__HEATMAP_CSS__", TOKEN_HEATMAP_CSS).replace("__HEATMAP_JS__", TOKEN_HEATMAP_JS).replace("__DATA__", json_for_script(data))
    return write_text_atomically(path, page)


def write_dashboard(path: Path, data: dict[str, Any]) -> Path:
    return write_page(path, _PAGE, data)


# A line of tokens, each shaded by its activation relative to `peak` (hover: the value); text goes in with textContent.
TOKEN_HEATMAP_CSS = """.context{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:6px 0;padding:6px;border:1px solid #eee;border-radius:4px}
.token{border-radius:2px} .focus{outline:1px solid #c00}"""
TOKEN_HEATMAP_JS = """function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}
function tokenHeatmap(tokens, activations, peak, focus) {
  const line = element("div", null, "context");
  tokens.forEach((token, i) => {
    const span = element("span", token, "token" + (i === focus ? " focus" : ""));
    const a = activations[i];
    span.style.background = "rgba(255,120,0," + Math.min(1, Math.max(0, a) / peak).toFixed(3) + ")";
    span.title = "activation " + a.toFixed(3);
    line.appendChild(span);
  });
  return line;
}"""


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fastsae dashboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:420px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#controls{padding:8px;display:flex;gap:6px;flex-wrap:wrap;border-bottom:1px solid #ddd}
#list{overflow:auto;flex:1}
table{border-collapse:collapse;width:100%}
td,th{padding:4px 6px;border-bottom:1px solid #eee;text-align:left}
tr.feature{cursor:pointer} tr.feature:hover{background:#f3f6ff} tr.selected{background:#dde6ff}
#detail{flex:1;overflow:auto;padding:12px 20px}
__HEATMAP_CSS__
.muted{color:#777} h1{font-size:18px;margin:12px 0} .bar{fill:#4c72b0}
#rubric{padding:6px 8px;border-bottom:1px solid #ddd;font-size:12px} #rubric table{width:auto} #rubric td{padding:1px 4px;border:0}
.rating-bar{background:#4c72b0;height:10px}
table.quantiles{width:auto;font-size:12px} table.quantiles td,table.quantiles th{text-align:center;border:1px solid #eee}
.verdict{font-size:12px;margin:2px 6px 0 0;display:inline-block;padding:0 4px;border-radius:3px}
.right{background:#dff0d8} .wrong{background:#f8d7da} .unread{background:#eee}
.held-out{margin:10px 0 14px} .held-out .context{margin:2px 0}
</style></head><body>
<div id="side">
  <div id="controls">
    <input id="filter" placeholder="filter: explanation, label, tokens" size="28">
    <select id="label"><option value="">all labels</option></select>
    <select id="sort">
      <option value="frequency">sort: frequency</option><option value="detection_score">sort: detection</option>
      <option value="fuzzing_score">sort: fuzzing</option>
      <option value="top_label_auroc">sort: label AUROC</option><option value="fast_rubric_rating">sort: FAST rating</option>
      <option value="feature">sort: feature id</option>
    </select>
  </div>
  <div id="rubric" hidden></div>
  <div id="list"><table><thead><tr><th>feature</th><th>freq.</th><th>detection</th><th>fuzzing</th><th>rating</th><th>label (AUROC)</th></tr></thead><tbody id="rows"></tbody></table></div>
</div>
<div id="detail"><p class="muted">Choose a feature on the left.</p></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
document.title = "fastsae: " + data.title;
const $ = (id) => document.getElementById(id);
__HEATMAP_JS__
const fmt = (value, digits) => (value === null || value === undefined || value === "") ? "–" : Number(value).toFixed(digits);
for (const label of [...new Set(data.features.map((f) => f.top_label).filter(Boolean))].sort()) {
  const option = element("option", label); option.value = label; $("label").appendChild(option);
}
let selected = null;
function renderList() {
  const query = $("filter").value.toLowerCase(), label = $("label").value, key = $("sort").value;
  const shown = data.features.filter((f) => (!label || f.top_label === label) &&
    (!query || [f.explanation, f.fast_rubric_name, f.top_label, f.top_tokens].join(" ").toLowerCase().includes(query)));
  shown.sort((a, b) => key === "feature" ? a.feature - b.feature : (b[key] ?? -1) - (a[key] ?? -1));
  const body = $("rows"); body.replaceChildren();
  for (const f of shown) {
    const row = element("tr", null, "feature" + (f.feature === selected ? " selected" : ""));
    row.dataset.feature = f.feature;
    row.append(element("td", f.feature), element("td", (100 * f.frequency).toFixed(2) + "%"), element("td", fmt(f.detection_score, 2), "detection"),
               element("td", fmt(f.fuzzing_score, 2), "fuzzing"), element("td", fmt(f.fast_rubric_rating, 0), "rating"),
               element("td", f.top_label ? f.top_label + " (" + fmt(f.top_label_auroc, 2) + ")" : "–"));
    row.addEventListener("click", () => { selected = f.feature; renderList(); renderDetail(f); });
    body.appendChild(row);
  }
}
function renderRubric(rubric) {
  // The FAST rubric's distribution over the rated features: a bar and a count per rating, then the headline.
  const box = $("rubric"), table = element("table"), top = Math.max(1, ...rubric.counts);
  rubric.counts.forEach((count, i) => {
    const bar = element("div", null, "rating-bar"); bar.style.width = (100 * count / top) + "px";
    const cell = element("td"); cell.appendChild(bar);
    const row = element("tr"); row.dataset.rating = i + 1;
    row.append(element("td", "rating " + (i + 1)), cell, element("td", count, "count"));
    table.appendChild(row);
  });
  const share = rubric.high_share === null ? "–" : (100 * rubric.high_share).toFixed(1) + "%";
  box.append(element("b", "FAST rubric"), table, element("div", "rated 4–5: " + share + " of " + rubric.rated + " rated" +
    (rubric.missing ? "; unreadable answers: " + rubric.missing : ""), "headline"));
  box.hidden = false;
}
function histogram(f) {
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  const width = 420, height = 90, counts = f.histogram, top = Math.max(1, ...counts), w = width / counts.length;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  counts.forEach((count, i) => {
    const bar = document.createElementNS(ns, "rect"), h = (height - 4) * count / top;
    bar.setAttribute("x", i * w); bar.setAttribute("y", height - h); bar.setAttribute("width", Math.max(1, w - 1)); bar.setAttribute("height", h);
    bar.setAttribute("class", "bar");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = count + " activations in [" + data.histogram_edges[i].toPrecision(2) + ", " + data.histogram_edges[i + 1].toPrecision(2) + ")";
    bar.appendChild(tip); svg.appendChild(bar);
  });
  return svg;
}
function renderDetail(f) {
  const detail = $("detail"); detail.replaceChildren();
  detail.append(element("h1", "Feature " + f.feature), element("p", f.explanation || "No explanation (no LLM key was set, SCORING has neither detection nor fuzzing, or the feature is too rare).", "explanation"));
  if (f.scoring_note) detail.append(element("p", f.scoring_note, "muted note"));
  if (f.fast_rubric_rating !== null || f.fast_rubric_name) {
    detail.append(element("p", "FAST rubric: " + fmt(f.fast_rubric_rating, 0) + "/5 · " + (f.fast_rubric_name || "(no name)"), "rubric"));
  }
  detail.append(element("p", "detection " + fmt(f.detection_score, 2) + " · fuzzing " + fmt(f.fuzzing_score, 2) + " · frequency " +
    (100 * f.frequency).toFixed(3) + "% · " + f.activating_windows + " activating windows · max activation " +
    fmt(f.max_activation, 2) + " · label " + (f.top_label || "–") + " (AUROC " + fmt(f.top_label_auroc, 2) + ")", "muted"));
  if (f.held_out.length) detail.append(element("h3", "Accuracy per activation quantile"), quantileTable(f));
  detail.append(element("h3", "Activation histogram (log bins)"), histogram(f));
  detail.append(element("h3", "Logit lens"));
  if (f.logit_lens_promoted || f.logit_lens_suppressed) {
    detail.append(element("p", "promotes: " + f.logit_lens_promoted), element("p", "suppresses: " + f.logit_lens_suppressed));
  } else {
    detail.append(element("p", "Does not apply: this store's activations are not in the model's hidden space (e.g. LoRA bottlenecks).", "muted"));
  }
  detail.append(element("h3", "Top windows"));
  const peak = Math.max(1e-9, ...f.contexts.map((c) => c.activation));
  for (const context of f.contexts) detail.appendChild(tokenHeatmap(context.tokens, context.activations, peak, context.focus));
  if (f.held_out.length) {
    detail.append(element("h3", "Held-out windows the scorers saw (never shown to the explainer), with the LLM's verdicts"));
    const shown = [...f.held_out].sort((a, b) => (a.quantile ?? data.n_quantiles) - (b.quantile ?? data.n_quantiles));
    for (const example of shown) detail.appendChild(heldOut(example, peak));
  }
}
function quantileTable(f) {
  // One row per scorer that ran: its accuracy on the activating windows of each quantile (Q1 the strongest), then on the non-activating ones.
  const table = element("table", null, "quantiles"), head = element("tr");
  head.append(element("th", "scorer"));
  for (let q = 1; q <= data.n_quantiles; q++) head.append(element("th", "Q" + q + (q === 1 ? " (strongest)" : q === data.n_quantiles ? " (weakest)" : "")));
  head.append(element("th", "non-activating"));
  table.appendChild(head);
  for (const scorer of data.scorers) {
    if (!f.quantile_accuracy[scorer]) continue;
    const row = element("tr"); row.dataset.scorer = scorer;
    row.append(element("td", scorer), ...f.quantile_accuracy[scorer].map((a) => element("td", fmt(a, 2))), element("td", fmt(f[scorer + "_non_activating_accuracy"], 2)));
    table.appendChild(row);
  }
  return table;
}
function heldOut(example, peak) {
  // A window as the scorers saw it, what it is (its quantile, or non-activating) and each scorer's verdict, right or wrong.
  const box = element("div", null, "held-out");
  box.dataset.activating = example.quantile !== null;
  box.appendChild(tokenHeatmap(example.tokens, example.activations, peak, example.quantile === null ? -1 : example.focus));
  box.appendChild(element("span", example.quantile === null ? "non-activating" : "activating, Q" + (example.quantile + 1), "verdict kind"));
  for (const [scorer, verdict] of Object.entries(example.verdicts)) {
    const right = verdict === null ? "unread" : (verdict === (example.quantile !== null) ? "right" : "wrong");
    box.appendChild(element("span", scorer + ": " + (verdict === null ? "no answer" : verdict ? "yes" : "no"), "verdict " + right));
  }
  return box;
}
for (const id of ["filter", "label", "sort"]) $(id).addEventListener("input", renderList);
if (data.rubric) renderRubric(data.rubric);
renderList();
</script></body></html>
"""
