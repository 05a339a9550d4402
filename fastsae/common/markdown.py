"""GitHub-flavoured Markdown tables (what GitHub and the Hub render), with cells escaped so text from data
or a model can neither break a row (`|`, newlines) nor become HTML (`<`)."""

from __future__ import annotations

import html
import json
import math
from typing import Any


def cell(value: Any, line_breaks: bool = False) -> str:
    """One table cell. Newlines become `<br>` with `line_breaks`, else spaces; a missing value shows as —."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    text = html.escape(text.replace("\r", ""), quote=False).replace("|", "\\|")
    text = text.replace("\n", "<br>") if line_breaks else " ".join(text.split())
    return text or " "


def table(header: list[Any], rows: list[list[Any]], line_breaks: bool = False) -> str:
    lines = ["| " + " | ".join(cell(name) for name in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value, line_breaks) for value in row) + " |" for row in rows]
    return "\n".join(lines)
