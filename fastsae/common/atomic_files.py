"""Files and folders that appear whole or not at all: written under a `.partial` name, then renamed.

A crash or Ctrl-C mid-write must never leave half a checkpoint, manifest, page or figure that a
rerun would trust. The `.partial` sits beside the target, so it is on the same filesystem
and the rename (`os.replace`) is atomic; on a failed write it is removed and the old file
stays as it was. The `.partial` name is fixed, so a write a kill cut short is replaced by the next
one, never left beside it (a checkpoint's can take gigabytes); a file that several writers may
write at once (the LLM answer cache: two runs sharing it) takes a writer's own name instead
(`private_partial`), or the later rename would find the shared one gone. A step's own temporary
files go in a `<name>.scratch` folder beside its output (`scratch_folder`), which a rerun clears
if a kill left it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastsae.common.errors import UserError


def check_output_files(settings: dict[str, str]) -> None:
    """Refuse, before any work, an output setting that names a folder, or one file named by two settings: the write
    would fail only after the work that fills it, or one output would silently replace the other."""
    for name, path in settings.items():
        if Path(path).is_dir():
            raise UserError(f"{name} = {path} is a folder: set it to the path of a file (one inside that folder will do).")
    by_file: dict[Path, list[str]] = {}
    for name, path in settings.items():
        by_file.setdefault(Path(path).resolve(), []).append(name)
    for path, names in by_file.items():
        if len(names) > 1:
            raise UserError(
                f"{' and '.join(names)} name the same file, {path}: one output would replace the other. Give each its own file."
            )


def partial_path(path: Path, private: bool = False) -> Path:
    """Where `path` is written before it is renamed into place; `private`: a name no other thread or process uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial" if private else f"{path.name}.partial")


def write_atomically(path: str | Path, write: Callable[[Path], Any], private_partial: bool = False) -> Path:
    """Call `write(temp_path)` (e.g. `lambda p: torch.save(obj, p)`), then rename the result over `path`; its folder is
    made when missing, so an output path in a new folder never fails after the work that fills it. `private_partial`
    for a file that other writers may write at the same time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path, private_partial)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8; a crash never leaves half a page."""
    return write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | Path, payload: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write `payload` as JSON (`indent` and `default` as in `json.dumps`)."""
    return write_text_atomically(path, json.dumps(payload, indent=indent, default=default))


def write_figure_atomically(path: str | Path, figure: Any, dpi: int) -> Path:
    """Save a matplotlib `figure` in the format its name's suffix says (the `.partial` name would hide it from matplotlib)."""
    return write_atomically(path, lambda partial: figure.savefig(partial, dpi=dpi, format=Path(path).suffix.removeprefix(".")))


def replace_folder_atomically(folder: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Call `fill(temp_folder)` on a fresh empty folder, then swap it in for `folder`, replaced whole.

    On any failure the temp folder is removed and `folder` is left as it was. The swap
    itself is a delete then a rename: a crash between the two leaves no `folder` at all,
    never a mix of old and new files.
    """
    folder = Path(folder)
    partial = partial_path(folder)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        fill(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


@contextmanager
def scratch_folder(beside: str | Path) -> Iterator[Path]:
    """A fresh `<name>.scratch` folder beside `beside` for a step's temporary files, removed when the step ends.

    Beside the output rather than in /tmp: the files can be large (examples × features) where /tmp is often small,
    and one left by a killed run sits where its rerun finds and clears it.
    """
    beside = Path(beside)
    folder = beside.with_name(beside.name + ".scratch")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
