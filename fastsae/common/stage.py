"""The one interface every pipeline step implements, so that the runner only links, decides, runs and reports.

A stage names the script whose constants configure it, the constant that names its input and the
stage that writes that input. It says which files it will write (each file name is defined once,
in the stage's own module), when they are complete, what running it will cost (from counts of the
data and speeds measured on this machine), and which figures its outputs are worth a line in the
summary for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the runner imports this module before it has checked that numpy is installed
    import numpy as np


@dataclass(frozen=True)
class Output:
    """A file or folder a stage writes, with the facts a downstream stage names its own outputs by."""

    path: Path
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. a store's model and hook, a checkpoint's feature count


@dataclass
class Corpus:
    """Tokens per sequence as extraction will see them, and a few real sequences to time."""

    lengths: np.ndarray  # (n,) tokens per example (per block with PACKING = block)
    content: np.ndarray  # (n,) of those, the ones that are not special/template tokens
    sample: list[np.ndarray]  # token ids of a few sequences of about the median length
    block_rows: list[list[int]] | None = None  # per block, the dataset rows it holds (PACKING = block): the split keeps texts whole

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Calibration:
    """Speeds measured on this machine; None where that part was not needed (or could not be measured)."""

    load_seconds: float | None = None  # loading the model
    cut_tokens_per_second: float | None = None  # forward stopped after the deepest layer, as extraction runs
    full_tokens_per_second: float | None = None  # the whole model with its LM head, as evaluation runs
    sae_step_seconds: float | None = None  # one training step of every SAE of the run, at BATCH_SIZE
    encode_tokens_per_second: float | None = None  # SAE encoding, as evaluation and interpretation run
    seconds: float = 0.0  # the calibration itself


@dataclass
class PlanFacts:
    """What the runner knows when a stage names its outputs and estimates its cost."""

    model_slug: str
    configs: dict[str, Any]  # every stage's config by stage name (training's split is evaluation's default)
    d: int = 0  # the model's width; 0 until the model is checked, which extraction's outputs do not wait for
    n_layers: int = 0
    vocab_size: int = 0  # the model's vocabulary (its config's), known with d
    outputs: dict[str, list[Output]] = field(default_factory=dict)  # the outputs named so far, by stage name
    corpus: Corpus | None = None  # None until the data or a store can be counted
    calibration: Calibration | None = None

    def output_facts(self, stage: str, path: Path) -> dict[str, Any] | None:
        """The facts of `stage`'s output at `path`; None when that stage does not write it."""
        return next((output.facts for output in self.outputs.get(stage, []) if same_path(output.path, path)), None)


@dataclass
class Estimate:
    """A stage's cost, for the plan; None where it cannot be known yet."""

    examples: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    disk_bytes: int | None = None  # what it will write, checked against the free space of `disk_folder`
    disk_folder: Path | None = None
    note: str = ""


def same_path(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def file_identities(paths: list[Path]) -> list[list] | None:
    """Each existing file's path, size and modification time; None when none exists."""
    identities = [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in paths if path.is_file()]
    return identities or None


def seconds_for(load: float | None, tokens: int, tokens_per_second: float | None) -> float | None:
    """Loading plus `tokens` at a measured speed; None when the speed was not measured."""
    if tokens_per_second is None:
        return None
    return (load or 0.0) + tokens / tokens_per_second


class Stage(ABC):
    """One step of the pipeline. Subclasses set the class attributes and implement `run` and `outputs`."""

    name: ClassVar[str]
    script: ClassVar[str]  # the script at the repository root whose constants configure it
    input_constant: ClassVar[str]  # the constant naming what it reads
    upstream: ClassVar[str | None]  # the stage whose output it reads when the constants chain
    config_class: ClassVar[type]  # the dataclass its script's constants fill
    # Settings that change how it runs or where it reports, not what it writes: changing them does not rerun it.
    unfingerprinted: ClassVar[frozenset[str]] = frozenset({"overwrite"})

    @abstractmethod
    def run(self, config: Any) -> Any:
        """Do the step with `config` (its script's constants)."""

    @abstractmethod
    def outputs(self, config: Any, facts: PlanFacts) -> list[Output]:
        """What it will write with `config`."""

    def input_paths(self, config: Any) -> list[Path]:
        """What its input constant names: one path, or a list (evaluation's sweep of checkpoints)."""
        value = getattr(config, self.input_constant.lower())
        return [Path(path) for path in (value if isinstance(value, list) else [value])]

    def input_path(self, config: Any) -> Path:
        """What it reads; for a list the first, which decides the chain."""
        return self.input_paths(config)[0]

    def input_identity(self, config: Any) -> list[list] | None:
        """What its input files are on disk now (`file_identities`), recorded when it finishes: a rerun that finds them
        changed knows they were rewritten outside the pipeline (a step run by hand with other flags), which its
        fingerprint of settings cannot see. A stage whose input is a folder names the file that changes with it."""
        return file_identities(self.input_paths(config))

    def optional_inputs(self, config: Any) -> list[Path]:
        """Files it also reads when they exist, besides its input (another stage's outputs): the stage that writes one is
        part of its fingerprint, so that re-running that stage re-runs it."""
        return []

    def fingerprint_facts(self, config: Any) -> dict[str, Any]:
        """What besides `config` decides what it writes (an environment variable, say: a fact about a secret, never the
        secret), for its fingerprint, so that a change re-runs it."""
        return {}

    def outputs_complete(self, outputs: list[Output]) -> bool:
        """Whether every output is on disk and whole."""
        return all(output.path.exists() for output in outputs)

    def checks(self, config: Any, facts: PlanFacts) -> list[tuple[str, str]]:
        """(name, result) lines for the checks before the plan; raise UserError for a problem that must stop the run."""
        return []

    def estimate(self, config: Any, facts: PlanFacts) -> Estimate:
        """Its cost with `config`, from `facts.corpus` and `facts.calibration`."""
        return Estimate()

    def key_figures(self, config: Any, outputs: list[Output]) -> list[tuple[str, str]]:
        """(name, value) lines for the summary, read off its outputs."""
        return []
