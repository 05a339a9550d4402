"""Experiment tracking: training curves and evaluation metrics sent to W&B or TensorBoard, beside the files.

`LOGGER` picks the tracker: `none`, `wandb` or `tensorboard`. Each SAE is a tracker run of its own (a
sweep's SAEs are runs of one group, named by the training run's folder), so the tools' run tables,
overlaid curves and parallel-coordinate plots compare SAEs as they compare any runs, and an SAE's
evaluation is a run of the same name and group. Neither package is a requirement: each is imported
only when chosen, and `check_tracker` (called by the step configs' validation) names the install
command before any work starts. Under torchrun only rank 0 tracks.

W&B runs offline unless WANDB_MODE says otherwise: a training box may have no network, and nothing
leaves the machine unless the user asks; `wandb sync` uploads an offline run later.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from fastsae.common import distributed
from fastsae.common.errors import UserError

TRACKERS = ("none", "wandb", "tensorboard")  # each but none is also the package it needs
DEFAULT_PROJECT = "fastsae"
SETTINGS = ("tracker", "tracker_project", "tracker_dir")  # the config fields: where a run is logged, not what it computes
WANDB_DEFAULT_MODE = "offline"  # when WANDB_MODE is unset
LOGIN_TIMEOUT_SECONDS = 30  # an online W&B run without a login asks at the terminal this long at most, never forever
TENSORBOARD_FOLDER = "tensorboard"

# The settings every tracked step declares: its config's fields `tracker`, `tracker_project` and `tracker_dir`, whose
# constants are LOGGER, LOGGER_PROJECT and LOGGER_DIR (a field `logger` would read as a logging.Logger).
TRACKER_HELP = "experiment tracker: none, wandb (offline unless WANDB_MODE is set) or tensorboard"
PROJECT_HELP = "W&B project of the tracker runs (one per SAE; the training run's folder names their group)"
DIR_HELP = "where the tracker's files go, as <LOGGER_DIR>/<run>/<SAE name>/; empty: each SAE's own folder"


class TrackerSettings(Protocol):
    tracker: str  # LOGGER
    tracker_project: str  # LOGGER_PROJECT
    tracker_dir: str  # LOGGER_DIR


def check_tracker(tracker: str) -> None:
    """A known tracker whose package is installed, or one UserError naming the fix; imports nothing."""
    if tracker not in TRACKERS:
        raise UserError(f"LOGGER must be {', '.join(TRACKERS[:-1])} or {TRACKERS[-1]}; got {tracker!r}.")
    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise _missing_package(tracker)


def _missing_package(tracker: str) -> UserError:
    return UserError(f"LOGGER = {tracker} needs the {tracker} package: pip install {tracker} (or set LOGGER = none).")


def _import(tracker: str) -> ModuleType:
    try:
        return importlib.import_module(tracker)
    except ImportError:
        raise _missing_package(tracker) from None


def section(name: str, row: Mapping[str, float]) -> dict[str, float]:
    """A history row's values as `name/key`; its `step` is the x-axis, not a value."""
    return {f"{name}/{key}": value for key, value in row.items() if key != "step"}


class Tracker(ABC):
    """One tracker run: an SAE's training or a checkpoint's evaluation. As a context manager it finishes
    on leaving, marked failed if the block raised."""

    @abstractmethod
    def log(self, values: Mapping[str, float], step: int) -> None:
        """Scalars at a training step (steps only grow within a run)."""

    @abstractmethod
    def log_summary(self, values: Mapping[str, float]) -> None:
        """The run's final numbers."""

    @abstractmethod
    def finish(self, failed: bool = False) -> None:
        """Write everything out and close the run."""

    def log_resumed(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """The (step, values) a resumed training logged before the step it resumed from, which this run lacks."""
        for step, values in rows:
            self.log(values, step)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(failed=exc_type is not None)


class NoTracker(Tracker):
    """LOGGER = none, and every rank but 0 under torchrun."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_summary(self, values: Mapping[str, float]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    """A W&B run; its offline files are `<folder>/wandb/offline-run-*/`. Each session is a new run (an offline run
    cannot be resumed), so a resumed training logs its earlier steps again: the run that finishes holds the whole curve."""

    def __init__(self, folder: Path, project: str, group: str | None, name: str, job_type: str, config: dict[str, Any]) -> None:
        wandb = _import("wandb")
        folder.mkdir(parents=True, exist_ok=True)
        # A WANDB_MODE the user set is W&B's to apply (with its own fallbacks, such as turning off after a login timeout).
        mode = None if os.environ.get("WANDB_MODE") else WANDB_DEFAULT_MODE
        wandb.setup(wandb.Settings(login_timeout=LOGIN_TIMEOUT_SECONDS))  # W&B's login reads the process-wide settings
        try:
            self.run = wandb.init(
                project=project,
                group=group,
                name=name,
                job_type=job_type,
                config=config,
                dir=folder,
                mode=mode,
                reinit="create_new",  # a sweep's SAEs are runs open side by side
            )
        except wandb.errors.Error as error:
            raise UserError(f"W&B could not start a run: {error} To log offline instead, unset WANDB_MODE.") from None

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_summary(self, values: Mapping[str, float]) -> None:
        self.run.summary.update(dict(values))

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardTracker(Tracker):
    """Event files in `<folder>/tensorboard/<job type>/`: `tensorboard --logdir` on the run folder shows each SAE's
    training and evaluation as runs. A training resumed at step s continues the same curves, and what an earlier
    session logged after s (before a crash) is hidden; a fresh run or evaluation hides all of an earlier one's."""

    def __init__(self, folder: Path, job_type: str, config: dict[str, Any], start_step: int) -> None:
        _import("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        purge_step = start_step + 1 if start_step else 0  # TensorBoard hides earlier events at this step and later ones
        self.writer = SummaryWriter(folder / TENSORBOARD_FOLDER / job_type, purge_step=purge_step)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")
        self.last_step = start_step

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.last_step = step

    def log_resumed(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Nothing: the earlier session's event files, in the same folder, hold those steps."""

    def log_summary(self, values: Mapping[str, float]) -> None:
        """TensorBoard has no summary: the values are scalars at the last step logged."""
        self.log(values, self.last_step)

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


def tracker_folder(settings: TrackerSettings, sae_folder: Path) -> Path:
    """Where an SAE's tracker files go: its own folder, or the same <run>/<SAE name> under LOGGER_DIR."""
    return Path(settings.tracker_dir) / sae_folder.parent.name / sae_folder.name if settings.tracker_dir else sae_folder


def start_tracker(
    settings: TrackerSettings, sae_folder: Path, name: str, job_type: str, config: dict[str, Any], start_step: int = 0
) -> Tracker:
    """A tracker run for the SAE `name` in `sae_folder` (its training run's folder is the group); `job_type` is
    "train" or "evaluate", `config` the step's settings, `start_step` where a resumed training picks up."""
    if settings.tracker == "none" or not distributed.current().is_main:
        return NoTracker()
    folder = tracker_folder(settings, sae_folder)
    if settings.tracker == "wandb":
        return WandbTracker(folder, settings.tracker_project, sae_folder.parent.name or None, name, job_type, config)
    return TensorBoardTracker(folder, job_type, config, start_step)
