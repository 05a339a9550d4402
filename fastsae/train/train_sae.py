"""Step 2: train one SAE, or a sweep of them on the same batches, streamed from the activation store.

One pass over the data serves a whole sweep: each batch is read and mixed
once and every SAE takes a step on it. Under `torchrun` each rank streams its
own part of the store into its own buffer and takes BATCH_SIZE / ranks tokens
of each step; DistributedDataParallel averages the gradients, the dead-feature
counts and metrics are summed over ranks, and rank 0 alone writes. Activations are multiplied by a scale
that makes their mean squared norm d: dictionary_learning's unit mean squared norm times √d (SAELens'
`expected_average_only_in` makes the mean norm √d instead); the checkpoint folds it back in. Each SAE gets its own folder with its
checkpoint, `metrics.json`, `training_curves.png` and `training_state.pt`
(everything a resumed run needs).
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, NoReturn

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastsae.common import distributed, tracking
from fastsae.common.atomic_files import write_atomically
from fastsae.common.config import config_fingerprint, setting
from fastsae.common.default_paths import DEFAULT_STORE
from fastsae.common.devices import cpu_has_bfloat16_instructions, resolve_device
from fastsae.common.errors import UserError
from fastsae.common.stage import Estimate, Output, PlanFacts, Stage, file_identities
from fastsae.core.checkpoint import save_checkpoint
from fastsae.core.sae import ARCHITECTURES, JUMPRELU_BANDWIDTH, JUMPRELU_INITIAL_THRESHOLD, SAESpec, SparseAutoencoder
from fastsae.core.sae_info import SAEInfo, spec_to_dict
from fastsae.core.saelens_export import export_saelens
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import DEFAULT_VALIDATION_FRACTION, ExampleSplit, TokenSource, mixed_batches
from fastsae.store.manifest import MANIFEST, StoreManifest
from fastsae.train.training_report import (
    CURVES_FILE,
    METRICS_FILE,
    SAELENS_EXPORT_FOLDER,
    comparison_table,
    plot_training_curves,
    read_final_metrics,
    write_metrics,
)

logger = logging.getLogger(__name__)

SCALE_SAMPLE_TOKENS = 65536
VALIDATION_MAX_TOKENS = 131072
DENSE_FEATURE_FREQUENCY = 0.1
MAX_DEAD_AFTER_TOKENS = 10_000_000
# aux-K learns which features are dead every this many steps (one host sync): a constant, not LOG_EVERY, which would make
# a display setting, one left out of the resume key, change the SAE.
DEAD_CHECK_EVERY = 20
TRAINING_STATE = "training_state.pt"


@dataclass
class TrainConfig:
    runs_under_torchrun: ClassVar[bool] = True  # its work splits across torchrun's processes (docs/multi_gpu.md)
    store: str = setting(DEFAULT_STORE, "activation store folder written by extract_activations.py")
    architecture: str = setting("topk", "topk, batchtopk, relu (L1 penalty) or jumprelu")
    m: int = setting(256, "number of features (dictionary size)")
    k: int = setting(8, "active features per token (topk, batchtopk)")
    matryoshka_prefixes: list[int] = setting([], "Matryoshka prefix lengths ending at M, e.g. 64 256; empty for none")
    sweep: list[str] = setting(
        [],
        "several SAEs trained on the same batches: ARCH:M:K or ARCH:M:K:P1-P2 (Matryoshka); replaces ARCHITECTURE, M, K and MATRYOSHKA_PREFIXES",
    )
    aux_k: int = setting(-1, "dead features in the aux-K loss; -1: 2K; 0: off")
    aux_coefficient: float = setting(1 / 32, "weight of the aux-K loss")
    dead_after_tokens: int = setting(
        0, "a feature is dead after this many training tokens without firing; 0: a tenth of the run (at most 10M)"
    )
    l1_coefficient: float = setting(
        1e-3, "L1 penalty for relu SAEs: loss = FVU + L1_COEFFICIENT × Σ activations per token (SAELens' λ over the batch variance)"
    )
    l0_coefficient: float = setting(
        1e-3,
        "L0 penalty for jumprelu SAEs: loss = FVU + L0_COEFFICIENT × L0, both scale-free; thresholds move about LEARNING_RATE per step",
    )
    jumprelu_initial_threshold: float = setting(
        JUMPRELU_INITIAL_THRESHOLD,
        "where jumprelu thresholds start, in the JumpReLU paper's units (activations at unit mean squared norm; ×√d in training's E‖x‖²=d)",
    )
    jumprelu_bandwidth: float = setting(
        JUMPRELU_BANDWIDTH, "width of the straight-through window around each jumprelu threshold, in the same units (the paper's 0.001)"
    )
    batch_size: int = setting(1024, "tokens per training batch (of all ranks together under torchrun)")
    learning_rate: float = setting(
        2e-3, "Adam learning rate after warm-up (best of 5e-4..4e-3 on the default data; try lower for long runs)"
    )
    warmup_fraction: float = setting(0.05, "fraction of the steps spent warming the learning rate up from 0")
    decay_fraction: float = setting(0.2, "fraction of the steps, at the end, over which the learning rate decays to 0")
    gradient_clip: float = setting(1.0, "maximum gradient norm; 0: no clipping")
    epochs: float = setting(50.0, "passes over the training tokens (ignored when MAX_TOKENS is set)")
    max_tokens: int = setting(0, "training budget in tokens; 0: use EPOCHS")
    validation_fraction: float = setting(
        DEFAULT_VALIDATION_FRACTION, "fraction of examples held out for validation (split by example; by text in a block store)"
    )
    include_special_tokens: bool = setting(False, "also train on special/template tokens (BOS, chat markers)")
    input_bias_init: str = setting("median", "start the decoder bias at the data's median or mean, or at zero (as SAELens does)")
    eval_every: int = setting(50, "validate every N steps")
    patience: int = setting(
        10,
        "stop an SAE after this many validations without a better objective (FVU, plus the L1 or L0 penalty of relu and jumprelu); 0: never",
    )
    checkpoint_every: int = setting(1000, "save checkpoints and training state every N steps")
    log_every: int = setting(20, "update the progress bar and history every N steps")
    buffer_tokens: int = setting(131072, "mixing-buffer size in tokens (memory is bounded by this, not the store)")
    seed: int = setting(0, "seed for the split, initialisation and batch order")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    precision: str = setting(
        "auto",
        "auto (bfloat16 autocast on a GPU or on a CPU with AMX/AVX512-BF16, float32 otherwise), float32 or bfloat16; "
        "weights, losses and Adam state stay float32",
    )
    compile: bool = setting(False, "torch.compile the SAE's training step (for GPUs; slower on CPU)")
    output_dir: str = setting("checkpoints", "runs go to OUTPUT_DIR/RUN_NAME/<SAE name>/")
    run_name: str = setting("", "run folder name; empty: <model>_<hook>")
    tracker: str = setting("none", tracking.TRACKER_HELP, name="logger")
    tracker_project: str = setting(tracking.DEFAULT_PROJECT, tracking.PROJECT_HELP, name="logger_project")
    tracker_dir: str = setting("", tracking.DIR_HELP, name="logger_dir")
    export_saelens: bool = setting(True, "also write the SAE in SAELens' layout (cfg.json, safetensors) to <SAE folder>/saelens/")
    overwrite: bool = setting(False, "start over even if a run with other settings exists in the folder")

    def __post_init__(self) -> None:
        for name in ("jumprelu_initial_threshold", "jumprelu_bandwidth", "learning_rate"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.upper()} must be positive; got {getattr(self, name)}.")
        not_negative = (
            "aux_coefficient",
            "dead_after_tokens",
            "l1_coefficient",
            "l0_coefficient",
            "warmup_fraction",
            "decay_fraction",
            "gradient_clip",
            "epochs",
            "max_tokens",
            "patience",
            "seed",
        )
        for name in not_negative:
            if getattr(self, name) < 0:
                raise UserError(f"{name.upper()} must be at least 0; got {getattr(self, name)}.")
        if self.aux_k < -1:
            raise UserError(f"AUX_K must be -1 (2K), 0 (off) or a number of dead features; got {self.aux_k}.")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise UserError(f"PRECISION must be auto, float32 or bfloat16; got {self.precision!r}.")
        if self.input_bias_init not in ("median", "mean", "zero"):
            raise UserError(f"INPUT_BIAS_INIT must be median, mean or zero; got {self.input_bias_init!r}.")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(f"VALIDATION_FRACTION must be in [0, 1); got {self.validation_fraction}.")
        for name in ("batch_size", "eval_every", "checkpoint_every", "log_every", "buffer_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.upper()} must be positive; got {getattr(self, name)}.")
        if self.max_tokens <= 0 and self.epochs <= 0:
            raise UserError("set a budget: EPOCHS > 0 or MAX_TOKENS > 0.")
        if not 0 <= self.warmup_fraction + self.decay_fraction <= 1:
            raise UserError("WARMUP_FRACTION + DECAY_FRACTION must be between 0 and 1.")
        tracking.check_tracker(self.tracker)

    def specs(self, d: int) -> list[SAESpec]:
        """The SAEs this run trains: the sweep's, or the one given by ARCHITECTURE, M, K."""
        entries = self.sweep or [
            f"{self.architecture}:{self.m}:{self.k}"
            + (":" + "-".join(map(str, self.matryoshka_prefixes)) if self.matryoshka_prefixes else "")
        ]
        specs = [self._parse_sweep_entry(entry, d) for entry in entries]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise UserError(f"the sweep names the same SAE twice: {names}.")
        return specs

    def _parse_sweep_entry(self, entry: str, d: int) -> SAESpec:
        parts = entry.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ARCHITECTURES:
            raise UserError(
                f"sweep entry {entry!r} should look like topk:256:8 or topk:256:8:64-256 (architectures: {', '.join(ARCHITECTURES)})."
            )
        try:
            m, k = int(parts[1]), int(parts[2])
            prefixes = tuple(int(p) for p in parts[3].split("-")) if len(parts) == 4 else ()
        except ValueError:
            raise UserError(f"sweep entry {entry!r}: M, K and prefixes must be integers.") from None
        aux_k = (2 * k if self.aux_k < 0 else self.aux_k) if parts[0] in ("topk", "batchtopk") else 0
        return SAESpec(parts[0], d, m, k, prefixes, min(aux_k, m))

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def uses_bfloat16(self) -> bool:
        """PRECISION, or for `auto` whether the device multiplies bf16 in hardware: there it trains faster to the same FVU."""
        if self.precision != "auto":
            return self.precision == "bfloat16"
        return self.resolved_device().startswith("cuda") or cpu_has_bfloat16_instructions()


def learning_rate_factor(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up from 0, flat, then linear decay to 0 over the last `decay_fraction` of the steps."""
    warmup = max(1, int(total_steps * warmup_fraction))
    decay_start = total_steps - int(total_steps * decay_fraction)
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0


def training_steps(config: TrainConfig, n_train_tokens: int) -> int:
    """Steps of BATCH_SIZE tokens in the budget: MAX_TOKENS, or EPOCHS passes over the training tokens.

    A budget under one batch is refused: rounded up to one step, it trained tokens the user did not ask for.
    """
    budget = config.max_tokens or int(config.epochs * n_train_tokens)
    if budget < config.batch_size:
        asked = (
            f"MAX_TOKENS = {config.max_tokens}" if config.max_tokens else f"EPOCHS = {config.epochs} of {n_train_tokens:,} training tokens"
        )
        raise UserError(
            f"{asked} is a budget of {budget:,} tokens, less than one batch of {config.batch_size}: it trains no step. "
            f"Raise {'MAX_TOKENS' if config.max_tokens else 'EPOCHS'} or lower BATCH_SIZE."
        )
    return budget // config.batch_size


def run_folder(config: TrainConfig, model: str, hook_name: str) -> Path:
    """Where a run's SAE folders go: OUTPUT_DIR/RUN_NAME, by default OUTPUT_DIR/<model>_<hook>."""
    return Path(config.output_dir) / (config.run_name or f"{model}_{hook_name}")


def checkpoint_path(folder: Path, spec: SAESpec) -> Path:
    """An SAE's checkpoint inside its run folder: <run>/<SAE name>/<SAE name>.pt."""
    return folder / spec.name / f"{spec.name}.pt"


class Validation(NamedTuple):
    metrics: dict[str, float]  # fvu, explained_variance, l0, l1, never_fired_fraction, dense_fraction, n_tokens (+ matryoshka_fvu)
    feature_frequency: torch.Tensor  # (M,) fraction of tokens each feature fires on


@torch.no_grad()
def validate(sae: SparseAutoencoder, tokens: torch.Tensor, batch_size: int) -> Validation:
    """FVU, explained variance, L0, L1 and the never-fired and dense fractions of `sae` on (already scaled) tokens; for a
    Matryoshka SAE also `matryoshka_fvu`, the mean of its prefixes' FVUs (the full one last), which training minimises.

    Under torchrun each rank passes its share of the validation tokens and the sums are added
    over ranks, so every rank gets the metrics of the whole validation set. Every rank first takes rank 0's
    buffers: each moves its BatchTopK threshold after DDP's broadcast of rank 0's, so the ranks' shares were
    encoded with different thresholds, and the metrics described no SAE that was saved (the checkpoint is rank 0's).
    """
    for buffer in sae.buffers():
        distributed.broadcast_from_main_(buffer)
    sae.eval()
    d = tokens.shape[1]
    squared_error = torch.zeros((), dtype=torch.float64, device=tokens.device)
    fire_counts = torch.zeros(sae.spec.m, dtype=torch.float64, device=tokens.device)
    active_total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    activation_total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    prefixes = sae.spec.prefixes[:-1]
    prefix_squared_errors = torch.zeros(len(prefixes), dtype=torch.float64, device=tokens.device)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        codes = sae.encode(batch)
        squared_error += (sae.decode(codes) - batch).double().pow(2).sum()
        for index, prefix in enumerate(prefixes):
            prefix_squared_errors[index] += (sae.decode(codes, prefix) - batch).double().pow(2).sum()
        active = codes > 0
        fire_counts += active.sum(0)
        active_total += active.sum()
        activation_total += codes.double().sum()
    sae.train()
    counts = torch.stack(
        [
            squared_error,
            active_total,
            activation_total,
            tokens.double().pow(2).sum(),
            torch.tensor(len(tokens), dtype=torch.float64, device=tokens.device),
        ]
    )
    totals = distributed.all_reduce_sum_(torch.cat([counts, prefix_squared_errors, tokens.double().sum(0), fire_counts]))
    counts, prefix_squared_errors, token_sum, fire_counts = totals.split([5, len(prefixes), d, sae.spec.m])
    squared_error, active_total, activation_total, square_sum, n_tokens = counts.tolist()
    variance = square_sum - float(token_sum.pow(2).sum()) / n_tokens  # Σ‖x − mean‖², from sums that add over ranks
    fvu = squared_error / variance
    frequency = fire_counts / n_tokens
    metrics = {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": active_total / n_tokens,
        "l1": activation_total / n_tokens,  # per token, the sum of the feature activations (relu's penalty)
        # Not "dead": the history's dead_fraction counts features silent for DEAD_AFTER_TOKENS training tokens (aux-K's).
        "never_fired_fraction": float((fire_counts == 0).double().mean()),
        "dense_fraction": float((frequency > DENSE_FEATURE_FREQUENCY).double().mean()),
        "n_tokens": int(n_tokens),
    }
    if sae.spec.prefixes:  # every prefix's FVU has the same denominator, so their mean is the mean error over it
        metrics["matryoshka_fvu"] = (float(prefix_squared_errors.sum()) + squared_error) / (len(prefixes) + 1) / variance
    return Validation(metrics, frequency.float().cpu())


# The sparsity penalty of each penalised architecture: the coefficient setting, and the validation metric it weighs.
SPARSITY_PENALTIES = {"relu": ("l1_coefficient", "l1"), "jumprelu": ("l0_coefficient", "l0")}


def sparsity_coefficient(config: TrainConfig, architecture: str) -> float:
    """The weight of the sparsity penalty in the loss; 0 for Top-K SAEs, whose K sets the sparsity."""
    return getattr(config, SPARSITY_PENALTIES[architecture][0]) if architecture in SPARSITY_PENALTIES else 0.0


def validation_objective(config: TrainConfig, spec: SAESpec, metrics: dict[str, float]) -> float:
    """What training minimises, on the validation tokens and without aux-K: FVU (a Matryoshka SAE's mean over its
    prefixes) plus the sparsity penalty.

    Early stopping watches this, not FVU alone: a relu or jumprelu SAE trades reconstruction for sparsity
    as it trains, so its FVU rises by design while its objective still falls; a Matryoshka SAE gives up
    some full-width FVU for its short prefixes.
    """
    architecture = spec.architecture
    penalty = metrics[SPARSITY_PENALTIES[architecture][1]] if architecture in SPARSITY_PENALTIES else 0.0
    reconstruction = metrics["matryoshka_fvu"] if spec.prefixes else metrics["fvu"]
    return reconstruction + sparsity_coefficient(config, architecture) * penalty


# Settings that shape only some SAEs of a sweep. They stay out of the others' resume keys: changing the L0 coefficient
# retrains the JumpReLU SAEs and resumes the rest. AUX_K is in the spec, resolved (-1 becomes 2K), so never in the key.
SETTING_APPLIES = {
    "l1_coefficient": lambda spec: spec.architecture == "relu",
    "l0_coefficient": lambda spec: spec.architecture == "jumprelu",
    "jumprelu_initial_threshold": lambda spec: spec.architecture == "jumprelu",
    "jumprelu_bandwidth": lambda spec: spec.architecture == "jumprelu",
    "aux_coefficient": lambda spec: spec.aux_k > 0,
    "aux_k": lambda spec: False,
}


def settings_it_ignores(spec: SAESpec) -> set[str]:
    """The settings that cannot change this SAE, and so do not decide whether its saved state resumes."""
    return {name for name, applies in SETTING_APPLIES.items() if not applies(spec)}


class _TrainingStepModule(nn.Module):
    """The SAE's training step as a module's forward: DistributedDataParallel averages the gradients of what its forward ran."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, dead_features: torch.Tensor | None, aux_coefficient: float, sparsity_coefficient: float):
        return self.sae.training_step(x, dead_features, aux_coefficient, sparsity_coefficient)


@dataclass
class SAETrainer:
    """One SAE of the run with its optimiser, counters, history and tracker run."""

    spec: SAESpec
    folder: Path
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    tokens_since_fired: torch.Tensor  # (M,) on the device
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    best_objective: float = math.inf  # the lowest `validation_objective` so far
    validations_without_improvement: int = 0
    stopped: str = ""  # why it stopped early, or "" while training
    stopped_at: int | None = None  # the step it stopped at: its steps, tokens and checkpoint end there, not at the run's end
    saved_step: int = 0  # the step its training state was resumed from; until the run reaches it, it neither trains nor saves
    any_dead: bool = False  # refreshed every DEAD_CHECK_EVERY steps, so the hot loop needs no host sync
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # device-side running sums between log steps
    training_step: Any = None  # sae.training_step, or its torch.compile'd version
    tracker: tracking.Tracker = field(default_factory=tracking.NoTracker)  # started by TrainingRun.run

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.folder.parent, self.spec)

    def steps_trained(self, run_step: int) -> int:
        """Its own step count: where it stopped early, else the run's `run_step`."""
        return run_step if self.stopped_at is None else self.stopped_at

    def trains_at(self, step: int) -> bool:
        """Whether it takes `step`: not once stopped early, nor before the step its resumed state was saved at."""
        return not self.stopped and step >= self.saved_step

    def logged_rows(self) -> list[tuple[int, dict[str, float]]]:
        """(step, values) of everything its history and validations sent to the tracker, in step order."""
        rows: dict[int, dict[str, float]] = {}
        for name, table in (("train", self.history), ("validation", self.validation)):
            for row in table:
                rows.setdefault(int(row["step"]), {}).update(tracking.section(name, row))
        return sorted(rows.items())

    def state(self, step: int, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "settings": settings,
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "history": self.history,
            "validation": self.validation,
            "best_objective": self.best_objective,
            "validations_without_improvement": self.validations_without_improvement,
            "stopped": self.stopped,
            "stopped_at": self.stopped_at,
            "any_dead": self.any_dead,
            "sums": dict(self.sums),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.history = list(state["history"])
        self.validation = list(state["validation"])
        self.best_objective = float(state.get("best_objective", state.get("best_fvu")))  # best_fvu: states saved before the penalty counted
        self.validations_without_improvement = int(state["validations_without_improvement"])
        self.stopped = state["stopped"]
        self.stopped_at = state.get("stopped_at")  # absent from states saved before it was kept: such a state counts as training on
        self.any_dead = bool(state["any_dead"])
        self.sums = dict(state["sums"])


class TrainingRun:
    """Everything one `train_sae.py` run does, in the order it happens."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.store = ActivationStore(config.store)
        self.d = self.store.d
        self.specs = config.specs(self.d)
        self.device = config.resolved_device()
        self.ranks = distributed.current()
        if config.batch_size % self.ranks.world_size:
            raise UserError(
                f"BATCH_SIZE ({config.batch_size}) is the batch of all {self.ranks.world_size} ranks together and must divide evenly among them."
            )
        self.rank_batch_size = config.batch_size // self.ranks.world_size
        split = ExampleSplit.of_store(self.store, config.validation_fraction, config.seed)
        self.train_source = TokenSource(
            self.store,
            split,
            validation=False,
            include_special=config.include_special_tokens,
            part=(self.ranks.rank, self.ranks.world_size),
        )
        validation_source = TokenSource(self.store, split, validation=True, include_special=config.include_special_tokens)
        if split.held_out_texts is not None:
            logger.info(
                "Block store: %d blocks hold out %d texts for validation; %d blocks that hold a held-out and a training text are left out of both sides.",
                int(split.is_validation.sum()),
                split.held_out_texts,
                int((~split.is_validation & ~split.is_training).sum()),
            )
        self.n_train_tokens = self.train_source.count_tokens()
        rank_tokens = self._tokens_of_each_rank()
        self._check_two_batches(int(rank_tokens.min()), int(rank_tokens.argmin()))
        self.total_steps = training_steps(config, self.n_train_tokens)
        budget = self.total_steps * config.batch_size
        self.dead_after_tokens = config.dead_after_tokens or min(MAX_DEAD_AFTER_TOKENS, max(config.batch_size, budget // 10))
        # At most the rank's own tokens: a larger buffer would hold some of them twice, and a batch could repeat a token.
        self.buffer_tokens = max(2 * self.rank_batch_size, min(config.buffer_tokens, int(rank_tokens[self.ranks.rank])))
        sample = self.train_source.all_tokens(SCALE_SAMPLE_TOKENS, seed=config.seed)  # the same on every rank
        # Scale so that E‖x‖² = d (dictionary_learning's E‖x‖² = 1, times √d; SAELens' expected_average_only_in makes
        # E‖x‖ = √d): one learning rate and one set of coefficients fit every model and layer.
        self.scale = math.sqrt(self.d / float(sample.double().pow(2).sum(1).mean()))
        self.bias_sample = sample * self.scale
        # Capped, its chunks come in a seeded order: a store sorted by source or label is validated on all of it, not its start.
        validation_tokens = validation_source.all_tokens(VALIDATION_MAX_TOKENS, seed=config.seed)
        self.n_validation_tokens = len(validation_tokens)
        share = slice(
            self.n_validation_tokens * self.ranks.rank // self.ranks.world_size,
            self.n_validation_tokens * (self.ranks.rank + 1) // self.ranks.world_size,
        )
        self.validation_tokens = (validation_tokens[share] * self.scale).to(self.device)  # this rank's share
        self.run_folder = run_folder(config, self.store.manifest.model, self.store.hook_name)
        self.settings_by_name = {spec.name: self._settings(spec) for spec in self.specs}
        self.stop_requested = False

    def _tokens_of_each_rank(self) -> torch.Tensor:
        """(ranks,) the training tokens in each rank's part of the store, known to every rank so that all refuse together."""
        counts = torch.zeros(self.ranks.world_size, dtype=torch.long)
        counts[self.ranks.rank] = self.train_source.count_part_tokens()
        return distributed.all_reduce_sum_(counts)

    def _check_two_batches(self, fewest: int, rank: int) -> None:
        """The mixing buffer holds at least two of a rank's batches, and no more tokens than the rank streams."""
        if fewest >= 2 * self.rank_batch_size:
            return
        which = f"rank {rank}'s part of the store has" if self.ranks.is_distributed else "the store has"
        batches = f"its batches of {self.rank_batch_size}" if self.ranks.is_distributed else f"batches of {self.config.batch_size}"
        raise UserError(
            f"{which} {fewest} training tokens, fewer than two {batches}: the mixing buffer holds two, and with fewer "
            "tokens it would repeat some within a batch. Lower BATCH_SIZE or extract more examples."
        )

    def _settings(self, spec: SAESpec) -> dict[str, Any]:
        """What makes a resumed run the same run: the SAE, the data, and the optimisation settings that shape it."""
        varying = {
            "device",
            "overwrite",
            "checkpoint_every",
            "log_every",
            "output_dir",
            "run_name",
            *tracking.SETTINGS,
            "export_saelens",
            "compile",
            "sweep",
            "architecture",
            "m",
            "k",
            "matryoshka_prefixes",
        }
        fixed = {key: value for key, value in asdict(self.config).items() if key not in varying | settings_it_ignores(spec)}
        ranks = {"ranks": self.ranks.world_size} if self.ranks.is_distributed else {}  # each rank replays its own batches
        return {
            "spec": spec_to_dict(spec),
            "store": str(self.store.folder),
            "store_settings": config_fingerprint(self.store.manifest.settings),
            **fixed,
            **ranks,
        }

    def new_trainer(self, spec: SAESpec) -> SAETrainer:
        """A fresh SAE for `spec` with its optimizer and counters, wrapped for DDP and torch.compile as configured.

        Public so a benchmark can time `train_step` alone, without the batch pipeline.
        """
        torch.manual_seed(self.config.seed)
        sae = SparseAutoencoder(spec, self.config.jumprelu_initial_threshold, self.config.jumprelu_bandwidth)
        sae.initialize_input_bias_(self.bias_sample, self.config.input_bias_init)
        sae = sae.to(self.device).train()
        optimizer = torch.optim.Adam(sae.parameters(), lr=self.config.learning_rate, fused=True)  # one kernel for all parameters
        since_fired = torch.zeros(spec.m, dtype=torch.long, device=self.device)
        step = sae.training_step
        if self.ranks.is_distributed:
            device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            step = DistributedDataParallel(_TrainingStepModule(sae), device_ids=device_ids)
        step = torch.compile(step) if self.config.compile else step
        return SAETrainer(spec, self.run_folder / spec.name, sae, optimizer, since_fired, training_step=step)

    def _resume_or_start(self, trainer: SAETrainer) -> int:
        """Load a matching training state, refuse a different one (unless --overwrite), or start at step 0.

        --overwrite deletes the state it replaces: a run that starts over and is killed before its first save must not
        leave the other settings' state behind, or the rerun of the same command (the pipeline resumes without
        --overwrite) would be refused. It deletes the replaced SAE's other outputs too: until the new run finished, its
        metrics.json, curves and SAELens export sat beside the new checkpoint and described the old SAE.
        """
        path = trainer.folder / TRAINING_STATE
        if self.config.overwrite:
            if self.ranks.is_main:
                for replaced in (path, trainer.checkpoint_path, trainer.folder / METRICS_FILE, trainer.folder / CURVES_FILE):
                    replaced.unlink(missing_ok=True)
                shutil.rmtree(trainer.folder / SAELENS_EXPORT_FOLDER, ignore_errors=True)
            return 0
        if not path.exists():
            return 0
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:
            raise UserError(f"{path} is damaged ({type(error).__name__}). Delete it, or pass --overwrite to start over.") from None
        expected = self.settings_by_name[trainer.spec.name]
        ignored = settings_it_ignores(trainer.spec)  # states saved before they left its key still hold them
        saved = {key: value for key, value in state.get("settings", {}).items() if key not in ignored}
        saved_ranks, ranks = saved.get("ranks", 1), expected.get("ranks", 1)
        if saved_ranks != ranks:
            raise UserError(
                f"{trainer.folder} holds a run of {saved_ranks} process(es), and this one has {ranks}: each process replays its "
                f"own batch order, so resume it with {saved_ranks} (torchrun --nproc-per-node {saved_ranks}; python for one), "
                "pass --overwrite to start over, or set RUN_NAME to train beside it."
            )
        differences = [key for key in sorted(set(saved) | set(expected)) if saved.get(key) != expected.get(key)]
        if differences == ["store"]:  # the same contents (store_settings) at another path: the store moved, or is named otherwise
            logger.info(
                "Resuming %s on the store at %s, which it began at %s: the same store's settings.",
                trainer.spec.name,
                expected["store"],
                saved["store"],
            )
        elif differences:
            raise UserError(
                f"{trainer.folder} holds a run with other settings (different: {', '.join(differences)}). "
                "Pass --overwrite to start over, or set RUN_NAME to train beside it."
            )
        trainer.restore(state)
        trainer.saved_step = int(state["step"])
        return trainer.saved_step

    def run(self) -> list[dict[str, Any]]:
        """Train every SAE; each one's tracker run (LOGGER) finishes however training ends, marked failed if it raised."""
        with ExitStack() as trackers:
            return self._train(trackers)

    def _train(self, trackers: ExitStack) -> list[dict[str, Any]]:
        config = self.config
        self.trainers = trainers = [self.new_trainer(spec) for spec in self.specs]
        saved_steps = [self._resume_or_start(trainer) for trainer in trainers]
        # An SAE that stopped early was saved at its own step. The others resume at the earliest step one was saved at: a
        # crash between two SAEs' saves leaves some a save ahead, and those wait for the replayed batches to reach them.
        start_step = min((step for trainer, step in zip(trainers, saved_steps) if trainer.stopped_at is None), default=max(saved_steps))
        for trainer in trainers:
            if self._finished_before(trainer):
                continue  # its tracker run is complete: a new one would hold nothing but the summary again
            tracker = tracking.start_tracker(
                config, trainer.folder, trainer.spec.name, "train", self._tracker_config(trainer.spec), max(start_step, trainer.saved_step)
            )
            trainer.tracker = trackers.enter_context(tracker)
            trainer.tracker.log_resumed(trainer.logged_rows())
        logger.info(
            "Training %d SAE(s) on %s: %d training tokens, %d steps of %d (%s%s), validation %d tokens%s",
            len(trainers),
            self.store.folder,
            self.n_train_tokens,
            self.total_steps,
            config.batch_size,
            self.device,
            f", {self.rank_batch_size} on each of {self.ranks.world_size} ranks" if self.ranks.is_distributed else "",
            self.n_validation_tokens,
            f", resuming at step {start_step}" if start_step else "",
        )
        stream_seed = config.seed * self.ranks.world_size + self.ranks.rank  # each rank its own batch order; one rank: SEED
        batches = mixed_batches(self.train_source, self.buffer_tokens, self.rank_batch_size, stream_seed, self.device)
        for _ in range(start_step):  # replay the seeded batch order up to where the run stopped
            next(batches)
        in_main_thread = threading.current_thread() is threading.main_thread()  # only there can signal handlers be set
        previous_handlers = (
            {number: signal.signal(number, self._request_stop) for number in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
        )
        started, completed = time.perf_counter(), start_step
        try:
            with tqdm(total=self.total_steps, initial=start_step, desc="training", unit="step", disable=not self.ranks.is_main) as progress:
                for step in range(start_step, self.total_steps):
                    if self._stop_agreed(step):  # checked between steps, so what is saved is a whole step
                        raise KeyboardInterrupt
                    if all(trainer.stopped for trainer in trainers):
                        break
                    active = [trainer for trainer in trainers if trainer.trains_at(step)]
                    x = next(batches).float() * self.scale
                    factor = learning_rate_factor(step, self.total_steps, config.warmup_fraction, config.decay_fraction)
                    for trainer in active:
                        self.train_step(trainer, x, factor)
                    if (step + 1) % config.log_every == 0 or step + 1 == self.total_steps:
                        for trainer in active:
                            self._log(trainer, step + 1, factor * config.learning_rate)
                        if active:
                            progress.set_postfix(self._postfix(active[0], step + 1 - start_step, started))
                    if (step + 1) % DEAD_CHECK_EVERY == 0:
                        for trainer in active:
                            trainer.any_dead = bool((trainer.tokens_since_fired > self.dead_after_tokens).any())
                    if (step + 1) % config.eval_every == 0:
                        for trainer in active:
                            self._validate(trainer, step + 1)
                    stopped_now = [trainer for trainer in active if trainer.stopped]
                    for trainer in stopped_now:
                        trainer.stopped_at = step + 1
                    if (step + 1) % config.checkpoint_every == 0:
                        self._save_all(trainers, step + 1)
                    elif stopped_now:
                        self._save_all(stopped_now, step + 1)  # its one save after training: its weights no longer change
                    progress.update(1)
                    completed = step + 1
        except KeyboardInterrupt:
            self._save_all(trainers, completed)
            logger.warning("Interrupted after step %d: checkpoints and training state saved in %s", completed, self.run_folder)
            raise
        finally:
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
        seconds = time.perf_counter() - started
        return [self._finish(trainer, completed, seconds, start_step) for trainer in trainers]

    def _settings_of(self, spec: SAESpec) -> dict[str, Any]:
        """The settings, with the SAE's own architecture and sizes where a sweep's entry replaces them: else the tracker's
        run table and the checkpoint's settings (a model card's table) would give every SAE the unused defaults."""
        own = {"architecture": spec.architecture, "m": spec.m, "k": spec.k, "matryoshka_prefixes": list(spec.prefixes), "aux_k": spec.aux_k}
        return {**asdict(self.config), **own}

    def _tracker_config(self, spec: SAESpec) -> dict[str, Any]:
        """The SAE's settings, and its spec as `sae`."""
        return {**self._settings_of(spec), "sae": spec_to_dict(spec)}

    def _finished_before(self, trainer: SAETrainer) -> bool:
        """Whether an earlier session finished this SAE: its state is at its end, and metrics.json (written after the
        tracker's summary) is there."""
        at_end = trainer.stopped_at is not None or trainer.saved_step >= self.total_steps
        return at_end and (trainer.folder / METRICS_FILE).exists()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.config.uses_bfloat16())

    def _request_stop(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: finish the current step, save, then exit."""
        self.stop_requested = True

    def _stop_agreed(self, step: int) -> bool:
        """Whether to stop before `step`. A signal reaches torchrun's ranks at different steps, so they agree at log steps."""
        if not self.ranks.is_distributed:
            return self.stop_requested
        if step % self.config.log_every:
            return False
        requested = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(distributed.all_reduce_sum_(requested).item() > 0)

    def _average_sums_over_ranks(self, trainer: SAETrainer) -> None:
        """Make each rank's running sums (loss, FVU, ...) the mean over ranks, before they are logged or saved."""
        names = [name for name in trainer.sums if name != "steps"]  # every rank took the same steps
        if not self.ranks.is_distributed or not names:
            return
        stacked = torch.stack([torch.as_tensor(trainer.sums[name], dtype=torch.float32, device=self.device) for name in names])
        distributed.all_reduce_sum_(stacked).div_(self.ranks.world_size)
        trainer.sums.update(zip(names, stacked.unbind()))

    def train_step(self, trainer: SAETrainer, x: torch.Tensor, factor: float) -> None:
        """One optimiser step of one SAE on batch `x`, at the learning rate times `factor` (the schedule).

        No host sync: losses add up on the device until `_log`. Public so tests can hook each
        step (stop or corrupt a run at a chosen step) and benchmarks can time it.
        """
        config = self.config
        for group in trainer.optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        dead = trainer.tokens_since_fired > self.dead_after_tokens if trainer.any_dead else None
        with self._autocast():
            output = trainer.training_step(x, dead, config.aux_coefficient, sparsity_coefficient(config, trainer.spec.architecture))
        trainer.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        trainer.sae.remove_parallel_gradient_()
        if config.gradient_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainer.sae.parameters(), config.gradient_clip)
        trainer.optimizer.step()
        trainer.sae.enforce_constraints_()
        fire_counts = distributed.all_reduce_sum_(output.fire_counts)  # a feature is alive if it fired on any rank
        trainer.tokens_since_fired = torch.where(fire_counts > 0, 0, trainer.tokens_since_fired + config.batch_size)
        for name, value in (("loss", output.loss.detach()), ("fvu", output.fvu), ("l0", output.l0), ("aux_loss", output.aux_loss)):
            trainer.sums[name] = trainer.sums.get(name, 0) + value
        trainer.sums["steps"] = trainer.sums.get("steps", 0) + 1

    def _log(self, trainer: SAETrainer, step: int, learning_rate: float) -> None:
        """A host sync, at log steps only: averages since the last log step go to the history."""
        self._average_sums_over_ranks(trainer)
        steps = trainer.sums.pop("steps")
        row = {name: float(total) / steps for name, total in trainer.sums.items()}
        trainer.sums.clear()
        dead = trainer.tokens_since_fired > self.dead_after_tokens
        row.update(step=step, tokens=step * self.config.batch_size, dead_fraction=float(dead.float().mean()), learning_rate=learning_rate)
        if not math.isfinite(row["loss"]):
            self._diverged(trainer, f"the loss became {row['loss']}", step)
        trainer.history.append(row)
        trainer.tracker.log(tracking.section("train", row), step)

    def _diverged(self, trainer: SAETrainer, what: str, step: int) -> NoReturn:
        """Stop the run on a diverged SAE, naming its last checkpoint: every save checks the weights first, so that one is finite."""
        kept = (
            f"the last good checkpoint is {trainer.checkpoint_path}" if trainer.checkpoint_path.exists() else "no checkpoint was saved yet"
        )
        raise UserError(
            f"{trainer.spec.name}: {what} by step {step}; {kept}. Lower LEARNING_RATE, or check the store for inf/NaN activations."
        )

    def _validate(self, trainer: SAETrainer, step: int) -> None:
        if not self.n_validation_tokens:
            return
        # In the training precision: with bfloat16 on a GPU the float32 products cost a fifth of the loop
        # (benchmarks/RESULTS.md). Sums stay float64, and the final validation is float32.
        with self._autocast():
            metrics = validate(trainer.sae, self.validation_tokens, self.config.batch_size).metrics
        objective = validation_objective(self.config, trainer.spec, metrics)
        if not math.isfinite(objective):  # a diverged SAE, not one that stopped improving: early stopping must not report it as done
            self._diverged(trainer, f"the validation objective became {objective}", step)
        trainer.validation.append(
            {"step": step, "tokens": step * self.config.batch_size, "fvu": metrics["fvu"], "l0": metrics["l0"], "objective": objective}
        )
        trainer.tracker.log(tracking.section("validation", trainer.validation[-1]), step)
        if objective < trainer.best_objective - 1e-6:
            trainer.best_objective, trainer.validations_without_improvement = objective, 0
        else:
            trainer.validations_without_improvement += 1
            if self.config.patience and trainer.validations_without_improvement >= self.config.patience:
                trainer.stopped = f"early stop at step {step}"
                logger.info(
                    "%s: the validation objective has not improved for %d validations; stopping it", trainer.spec.name, self.config.patience
                )

    def _postfix(self, trainer: SAETrainer, steps_this_session: int, started: float) -> dict[str, str]:
        last = trainer.history[-1]
        tokens_per_second = steps_this_session * self.config.batch_size / max(time.perf_counter() - started, 1e-9)
        return {
            "tok/s": f"{tokens_per_second:.0f}",
            "loss": f"{last['loss']:.4f}",
            "fvu": f"{last['fvu']:.4f}",
            "L0": f"{last['l0']:.1f}",
            "dead": f"{last['dead_fraction']:.1%}",
        }

    def _info(self, trainer: SAETrainer, step: int) -> SAEInfo:
        manifest = self.store.manifest
        return SAEInfo(
            spec=trainer.spec,
            activation_scale=float(self.scale),
            model=manifest.model,
            model_name=manifest.model_name,
            model_source=manifest.model_source,
            hook_name=manifest.hook_name,
            hook_point=manifest.hook_point,
            layer=manifest.layer,
            store=str(self.store.folder),
            store_manifest=manifest,
            training=self._settings_of(trainer.spec),
            step=step,
            tokens_trained=step * self.config.batch_size,
            training_finished=trainer.stopped_at is not None or step >= self.total_steps,
        )

    def _save_all(self, trainers: list[SAETrainer], step: int) -> None:
        """Rank 0 writes; under torchrun every rank calls this, to agree on the running sums first.

        An SAE that stopped early was saved at the step it stopped, and is not saved again under a later step.
        Saves come between log steps too (CHECKPOINT_EVERY, a stop request), so the weights are checked here,
        one host sync per save, before anything is written: a diverged run stops with every SAE's files at
        its last good save. DistributedDataParallel keeps the weights equal on every rank, so all ranks agree.
        """
        trainers = [trainer for trainer in trainers if trainer.steps_trained(step) == step and step >= trainer.saved_step]
        finite = [torch.stack([parameter.isfinite().all() for parameter in trainer.sae.parameters()]).all() for trainer in trainers]
        for trainer, is_finite in zip(trainers, torch.stack(finite).tolist() if finite else []):
            if not is_finite:
                self._diverged(trainer, "the weights became NaN or inf", step)
        for trainer in trainers:
            self._average_sums_over_ranks(trainer)
            if not self.ranks.is_main:
                continue
            save_checkpoint(trainer.checkpoint_path, trainer.sae, self._dead_after_steps(), self._info(trainer, step))
            state = trainer.state(step, self.settings_by_name[trainer.spec.name])
            write_atomically(trainer.folder / TRAINING_STATE, lambda partial, state=state: torch.save(state, partial))
        distributed.barrier()  # no rank moves on (or exits) before rank 0's files are complete

    def _dead_after_steps(self) -> int:
        return max(1, self.dead_after_tokens // self.config.batch_size)

    def _finish(self, trainer: SAETrainer, run_step: int, seconds: float, start_step: int) -> dict[str, Any]:
        self._save_all([trainer], run_step)
        step = trainer.steps_trained(run_step)
        final, frequency = {}, None
        if self.n_validation_tokens:
            final, frequency = validate(trainer.sae, self.validation_tokens, self.config.batch_size)
        if self.config.export_saelens and self.ranks.is_main:
            export_saelens(trainer.checkpoint_path, trainer.folder / SAELENS_EXPORT_FOLDER, frequency)
        result = {
            "name": trainer.spec.name,
            "spec": spec_to_dict(trainer.spec),
            "checkpoint": str(trainer.checkpoint_path),
            "final": final,
            "tokens_trained": step * self.config.batch_size,
            "steps": step,
            "stopped": trainer.stopped or "budget reached",
            "activation_scale": self.scale,
            "dead_after_tokens": self.dead_after_tokens,
            "seconds_this_session": seconds,
            "tokens_per_second_this_session": (run_step - start_step) * self.config.batch_size / max(seconds, 1e-9),
            "history": trainer.history,
            "validation": trainer.validation,
        }
        trainer.tracker.log_summary({**tracking.section("final", final), "steps": step, "tokens_trained": result["tokens_trained"]})
        if self.ranks.is_main:
            write_metrics(trainer.folder / METRICS_FILE, result)
            plot_training_curves(
                trainer.folder / CURVES_FILE, f"{trainer.spec.name} — {self.store.hook_name}", trainer.history, trainer.validation
            )
        return result


def train_saes(config: TrainConfig) -> list[dict[str, Any]]:
    """Train every SAE of `config`, print their comparison, and return each one's final metrics (also in its metrics.json).

    Under torchrun every rank trains its share and returns the same results; rank 0 prints them.
    """
    ranks = distributed.init_from_environment()
    results = TrainingRun(config).run()
    if ranks.is_main:
        print("\n" + comparison_table(results))
    return results


class TrainStage(Stage):
    """Step 2 in the pipeline: an activation store → one SAE checkpoint per spec."""

    name = "train"
    script = "train_sae.py"
    input_constant = "STORE"
    upstream = "extract"
    config_class = TrainConfig
    unfingerprinted = Stage.unfingerprinted | set(tracking.SETTINGS)  # where it logs, not what it writes

    def run(self, config: TrainConfig) -> list[dict[str, Any]]:
        return train_saes(config)

    def input_identity(self, config: TrainConfig) -> list[list] | None:
        """The store's manifest: it is rewritten whenever the store is (a store is whole once it is written)."""
        return file_identities([Path(config.store) / MANIFEST])

    def outputs(self, config: TrainConfig, facts: PlanFacts) -> list[Output]:
        """Named by the store's model and hook: the planned store's, else the existing store's manifest; none when neither is known."""
        store = Path(config.store)
        origin = facts.output_facts("extract", store)
        if origin is None:
            manifest = StoreManifest.read(store / MANIFEST)
            if manifest is None:
                return []
            origin = {"model": manifest.model, "hook_name": manifest.hook_name}
        folder = run_folder(config, origin["model"], origin["hook_name"])
        return [Output(checkpoint_path(folder, spec), {"m": spec.m}) for spec in config.specs(facts.d)]

    def estimate(self, config: TrainConfig, facts: PlanFacts) -> Estimate:
        corpus, calibration = facts.corpus, facts.calibration
        if corpus is None or calibration is None:
            return Estimate()
        in_training = ExampleSplit.by_text(len(corpus.lengths), config.validation_fraction, config.seed, corpus.block_rows).is_training
        n_train_tokens = int((corpus.lengths if config.include_special_tokens else corpus.content)[in_training].sum())
        if n_train_tokens < 2 * config.batch_size:  # training refuses it, naming the store's size (a budget is beside the point)
            note = f"{n_train_tokens:,} training tokens, fewer than two batches of {config.batch_size}: training will refuse them"
            return Estimate(examples=int(in_training.sum()), tokens=0, seconds=0.0, note=note)
        steps = training_steps(config, n_train_tokens)
        return Estimate(
            examples=int(in_training.sum()),
            tokens=steps * config.batch_size,
            seconds=steps * calibration.sae_step_seconds if calibration.sae_step_seconds is not None else None,
            note=f"{steps} steps; an upper bound (early stopping may end sooner)",
        )

    def key_figures(self, config: TrainConfig, outputs: list[Output]) -> list[tuple[str, str]]:
        figures = []
        for output in outputs:
            final = read_final_metrics(output.path.parent / METRICS_FILE)
            if final:
                values = f"{final['fvu']:.4f} / {final['l0']:.1f} / {final['never_fired_fraction']:.1%}"
                figures.append((f"{output.path.stem}: validation FVU / L0 / never fired", values))
        return figures


STAGE = TrainStage()
