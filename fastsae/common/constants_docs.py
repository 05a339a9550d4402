"""The tables of each step's constants in docs/, generated from the config dataclasses so they cannot drift.

A docs page marks where a table goes with `<!-- constants:TrainConfig -->` … `<!-- /constants -->`;
`python -m fastsae.common.constants_docs` rewrites every marked table from the fields' defaults and
`setting(...)` help texts, and `--check` only reports stale ones. tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastsae.common.config import public_name
from fastsae.common.markdown import table

# Where each step's config class lives; imported only when a page asks for its table.
CONFIG_MODULES = {
    "ExtractConfig": "fastsae.extract.extract_activations",
    "TrainConfig": "fastsae.train.train_sae",
    "EvalConfig": "fastsae.evaluate.evaluate_sae",
    "AbsorptionSettings": "fastsae.evaluate.absorption",
    "InterpretConfig": "fastsae.interpret.interpret_sae",
    "AnalyzeConfig": "fastsae.tools.analyze_texts",
    "SteerConfig": "fastsae.tools.steer_model",
    "ExportConfig": "fastsae.export.export_sae",
    "PipelineConfig": "fastsae.pipeline.run_pipeline",
}
DOCS = Path(__file__).resolve().parents[2] / "docs"
COMMAND = "python -m fastsae.common.constants_docs"
MARKED_TABLE = re.compile(r"(?P<open><!-- constants:(?P<name>\w+) -->\n)(?P<table>.*?)(?P<close><!-- /constants -->)", re.DOTALL)


def config_class(name: str) -> type:
    if name not in CONFIG_MODULES:
        raise KeyError(f"no config class {name!r}; known: {', '.join(CONFIG_MODULES)}")
    return getattr(importlib.import_module(CONFIG_MODULES[name]), name)


def format_default(value: Any) -> str:
    """The default as a script would write it; an empty string or list reads as the word `empty`."""
    if value in ("", []):
        return "empty"
    if isinstance(value, list):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    return f"`{value}`"


def constants_table(config: type) -> str:
    """One row per field: its script constant (as `parse_step_config` names it), its default and its help text."""
    rows = []
    for field in dataclasses.fields(config):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        rows.append([f"`{public_name(field).upper()}`", format_default(default), field.metadata["help"]])
    return table(["constant", "default", "what it does"], rows)


def render(text: str) -> str:
    """`text` with every marked table replaced by the one the config class gives now."""

    def current(match: re.Match) -> str:
        return match["open"] + constants_table(config_class(match["name"])) + "\n" + match["close"]

    return MARKED_TABLE.sub(current, text)


def marked_classes(text: str) -> list[str]:
    return [match["name"] for match in MARKED_TABLE.finditer(text)]


def stale_pages(docs: Path = DOCS) -> list[Path]:
    """The pages whose marked tables differ from what `render` gives."""
    return [page for page in sorted(docs.glob("*.md")) if render(page.read_text()) != page.read_text()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=DOCS, help="folder of the Markdown pages")
    parser.add_argument("--check", action="store_true", help="only list stale pages; exit 1 if there are any")
    args = parser.parse_args(argv)
    stale = stale_pages(args.docs)
    for page in stale:
        if args.check:
            print(f"stale constants table in {page}: run {COMMAND}")
        else:
            page.write_text(render(page.read_text()))
            print(f"rewrote {page}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
