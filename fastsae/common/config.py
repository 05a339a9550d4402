"""Step configuration: UPPER_CASE constants in a script, overridable on the command line.

Every step has one dataclass whose fields carry a `help` text. A script sets
its defaults as constants at its top (`LAYERS = [12]`); `parse_step_config`
builds the dataclass from those constants, lets any of them be overridden
(`--layers 6 12`), and `--help` lists them all with their current values.
Validation lives in each dataclass's `__post_init__`, so a bad value from
either place gets the same message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastsae.common.errors import UserError

Config = TypeVar("Config")


def setting(default: Any, help: str, name: str = "", split_commas: bool = True) -> Any:
    """A config field with its help text (lists get a fresh copy per instance).

    `name` replaces the field's own name in the script constant and the flag, for a
    setting whose natural name is a Python keyword (`name="from"`: FROM and --from).
    `split_commas=False` keeps commas inside a list item (free text such as prompts).
    """
    metadata = {"help": help, "name": name, "split_commas": split_commas}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def public_name(field: dataclasses.Field) -> str:
    """What the user writes: the constant is its upper case, the flag `--` plus its dashed form."""
    return field.metadata.get("name") or field.name


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _argument_options(annotation: Any, split_commas: bool = True) -> dict[str, Any]:
    """argparse options for one field type: scalars, bools, and lists (space- or comma-separated)."""
    if annotation is bool:
        return {"type": _parse_bool, "metavar": "{true,false}", "nargs": "?", "const": True}  # a bare --flag means true
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return {"type": _comma_list(item_type) if split_commas else item_type, "nargs": "+", "metavar": item_type.__name__.upper()}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": annotation.__name__.upper()}
    raise TypeError(f"unsupported config field type {annotation!r}")


def _comma_list(item_type: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [item_type(part) for part in text.split(",") if part.strip()]

    parse.__name__ = item_type.__name__
    return parse


KINDS = {int: "a whole number", float: "a number", str: "text", bool: "True or False"}  # what a scalar constant must be


def _constant_value(constant: str, value: Any, annotation: Any, split_commas: bool = True) -> Any:
    """A script constant converted as the command line converts it (`"25"` is 25.0); one for a list field may also be
    written `12` or `"6,12"`.

    argparse converts only a string default, so a value of the wrong type (`EPOCHS = [2]`, `M = 3.7`, `OVERWRITE = "no"`)
    would otherwise reach the step as it is, and fail far from the script with a traceback, or be cut to another value."""
    is_list = typing.get_origin(annotation) is list
    item_type = typing.get_args(annotation)[0] if is_list else annotation
    try:
        if not is_list:
            return _typed(value, item_type)
        if isinstance(value, list):
            return [_typed(item, item_type) for item in value]
        return _comma_list(item_type)(value) if isinstance(value, str) and split_commas else [_typed(value, item_type)]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        example = f"[{item_type(1)!r}]" if is_list else repr(item_type(1))
        kind = f"a list of {item_type.__name__}" if is_list else KINDS[item_type]
        raise UserError(f"{constant} must be {kind}, e.g. {constant} = {example}; got {value!r}.") from None


def _typed(item: Any, item_type: type) -> Any:
    """`item` as `item_type`; ValueError where that would change what it is (a bool or a fraction as a number, a dict as text)."""
    if item_type is bool:
        if isinstance(item, bool):
            return item
        if isinstance(item, str):
            return _parse_bool(item)
        raise ValueError(f"{item!r} is not a bool")
    if item_type is str:
        fits = isinstance(item, (str, os.PathLike))
    else:
        number = isinstance(item, (int, float)) and not isinstance(item, bool)
        fits = isinstance(item, str) or (number and (item_type is float or float(item).is_integer()))
    if not fits:
        raise ValueError(f"{item!r} is not a {item_type.__name__}")
    return item_type(item)


def _constant_line(script: Path, constant: str) -> int | None:
    """The line of `script` that sets `constant` (the last such line, which wins); None when it cannot be read or found."""
    try:
        tree = ast.parse(script.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    lines = [
        node.lineno
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id == constant
    ]
    return lines[-1] if lines else None


def _flatten(values: list) -> list:
    return [item for group in values for item in group]


def check_constant_names(config_class: type, script_constants: dict[str, Any]) -> None:
    """Refuse an UPPER_CASE constant that is no setting: a mistyped name would otherwise leave its default in force."""
    settings = [public_name(field).upper() for field in dataclasses.fields(config_class)]
    unknown = [name for name in script_constants if name.isupper() and not name.startswith("_") and name not in settings]
    if not unknown:
        return
    script = Path(script_constants.get("__file__") or "the script").name
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, settings, n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise UserError(
        f"{script} sets {', '.join(described)}, which {'is' if len(unknown) == 1 else 'are'} not among its settings, "
        "so the value would be ignored. Fix the name (`--help` lists the settings), "
        "or write a constant of your own in lower case."
    )


def parse_step_config(
    config_class: type[Config],
    script_constants: dict[str, Any],
    description: str,
    argv: Sequence[str] | None = None,
) -> Config:
    """Build `config_class` from a script's UPPER_CASE constants and command-line overrides."""
    check_constant_names(config_class, script_constants)
    hints = typing.get_type_hints(config_class)
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        constant = public_name(field).upper()
        if constant in script_constants:
            try:
                defaults[field.name] = _constant_value(
                    constant, script_constants[constant], hints[field.name], field.metadata.get("split_commas", True)
                )
            except UserError as error:
                raise UserError(f"{_where(script_constants, constant)}{error}") from None
        elif field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        else:
            defaults[field.name] = field.default_factory()

    parser = argparse.ArgumentParser(
        description=description,
        epilog="Each option overrides the UPPER_CASE constant of the same name at the top of the script.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(config_class):
        options = _argument_options(hints[field.name], field.metadata.get("split_commas", True))
        parser.add_argument(
            "--" + public_name(field).replace("_", "-"),
            dest=field.name,
            default=defaults[field.name],
            help=field.metadata.get("help", "").replace("%", "%%"),  # argparse %-formats help texts
            **options,
        )
    args = vars(parser.parse_args(argv))
    for field in dataclasses.fields(config_class):
        value = args[field.name]
        if typing.get_origin(hints[field.name]) is list and value and isinstance(value[0], list):
            args[field.name] = _flatten(value)  # from the command line: one list per argument
    return config_class(**args)


def _where(script_constants: dict[str, Any], constant: str) -> str:
    """`train_sae.py, line 27: `, where the script sets `constant`, to start a message about its value; empty when unknown."""
    if not script_constants.get("__file__"):
        return ""
    script = Path(script_constants["__file__"])
    line = _constant_line(script, constant)
    return f"{script}, line {line}: " if line else f"{script}: "


def config_fingerprint(values: dict[str, Any]) -> str:
    """A short stable hash of settings, used to tell whether existing outputs match a rerun."""
    encoded = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def run_step(
    config_class: type[Config],
    script_constants: dict[str, Any],
    step: Callable[[Config], Any],
    description: str,
    argv: Sequence[str] | None = None,
) -> None:
    """Entry point shared by the step scripts: parse, run, and turn user errors into one clear line.

    Under torchrun one rank prints it: every rank checks the same settings and files (or is told rank 0's finding),
    and a Ctrl-C stops them all, so each would print the same line; a user error only one rank meets is its own.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(config_class, "runs_under_torchrun", False):
            script = Path(script_constants.get("__file__") or "this step").name
            raise UserError(
                f"{script} runs in one process: start it with python, not torchrun (each process would do the whole step "
                "and write the same files). extract_activations.py and train_sae.py split their work across processes."
            )
        config = parse_step_config(config_class, script_constants, description, argv)
        step(config)
    except UserError as error:
        _report(f"error: {error}")
        sys.exit(2)
    except KeyboardInterrupt:
        _report("interrupted: completed work is kept; rerun the same command to resume.")
        sys.exit(130)


def _report(line: str) -> None:
    """Printed once under torchrun, by the first rank to end with it. A plain run reads no torch here: run_pipeline.py
    imports this module to report missing packages."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from fastsae.common import distributed

        if not distributed.first_to_report():
            return
    print(line, file=sys.stderr)
