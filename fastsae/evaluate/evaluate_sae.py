"""Step 2b: metrics of trained SAEs on the held-out examples of their training run.

EVALS chooses what runs: `core` (this module: eval.json), `sparse_probing` (k-sparse probes on the data's labels,
`fastsae/evaluate/sparse_probing.py`), `absorption` (first-letter feature absorption, `fastsae/evaluate/absorption.py`). The core
metrics are two families, under different names because they are defined differently:

- **SAEBench's core metrics** (`saebench_core` in eval.json, in SAEBench's own output format; see
  `fastsae/evaluate/saebench_core.py` for the definitions): ce_loss_score, kl_div_score, its explained_variance,
  mse, cossim, l2_ratio, relative_reconstruction_bias, l0, l1, ... computed from the model's own
  activations on a budget of held-out tokens (SAEBench's default 20,480), with 95% bootstrap intervals
  for the numbers derived from the cross-entropy and KL. The model runs up to the hooked block once;
  clean and zero-ablated passes are computed once per store and reused (`fastsae/evaluate/model_metrics.py`).
- **Ours**, from the stored activations of every held-out example (x: raw activation of a token,
  x̂: the SAE's reconstruction, d: width):
  - FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: mean over the evaluated tokens), by token kind (content tokens
    are what the SAE trains on by default); mse_per_dimension = mean over tokens and dimensions of
    (x − x̂)²; cosine = mean over tokens of cos(x, x̂).
  - FAST token MSE (the FAST paper, Eq. 7) = mean over examples of [mean over the example's tokens
    of ‖x − x̂‖²], divided by d; raw activations. MSE_st is the same over special/template tokens only.
    The paper prints log2 of both, so both are reported raw and log2.
  - L0 = active features per token; L1 = Σ activations per token; density of a feature = the
    fraction of tokens it fires on; never fired = fires on none of them; dense = fires on more than 10%; all on
    the token kinds the SAE was trained on.
  - Decoder geometry: for each decoder row, its maximum cosine similarity to any other row.

Note what these are not: 1 − FVU is explained variance, not loss recovered; a mean decoder
cosine similarity is not feature absorption.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastsae import __version__
from fastsae.common import tracking
from fastsae.common.atomic_files import write_figure_atomically, write_json_atomically
from fastsae.common.config import setting
from fastsae.common.default_paths import DEFAULT_CHECKPOINT
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.common.stage import Estimate, Output, PlanFacts, Stage, seconds_for
from fastsae.core.formats.sources import results_folder
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.saelens_export import saelens_config
from fastsae.core.trained_sae import SAE_FINGERPRINT_KEY, TrainedSAE, open_trained_sae
from fastsae.evaluate.absorption import (
    ABSORPTION_FILE,
    CPU_MAX_WORDS,
    AbsorptionSettings,
    AbsorptionSweep,
    AbsorptionWork,
    absorption_table,
    write_absorption,
)
from fastsae.evaluate.model_metrics import ReferencePasses, budgeted_examples, length_grouped, model_fingerprint, store_fingerprint
from fastsae.evaluate.saebench_core import (
    BATCH_SIZE_PROMPTS,
    DEFAULT_TOKEN_BUDGET,
    SAEBENCH_VERSION,
    core_output,
    ignored_token_ids,
    max_cosine_to_another,
)
from fastsae.evaluate.sparse_probing import (
    CONTEXT_LENGTH,
    K_VALUES,
    PROBE_TEST_EXAMPLES,
    PROBE_TRAIN_EXAMPLES,
    SPARSE_PROBING_FILE,
    run_sparse_probing,
)
from fastsae.extract.extract_activations import pad_token_id
from fastsae.lm.hook_points import check_layers
from fastsae.lm.lora import LORA_HOOK_POINT
from fastsae.lm.models import load_model, load_tokenizer, resolve_model
from fastsae.lm.split_forward import SplitModel
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"  # beside the checkpoint: every metric, SAEBench's block, the per-feature density
DENSITY_PLOT_FILE = "feature_density.png"
# The evaluations EVALS chooses from, and the files each writes beside the checkpoint.
EVALS = ("core", "sparse_probing", "absorption")
EVAL_FILES = {
    "core": (EVAL_FILE, DENSITY_PLOT_FILE),
    "sparse_probing": (SPARSE_PROBING_FILE,),  # and sparse_probing.png, unless it was skipped (data without labels)
    "absorption": (ABSORPTION_FILE,),
}
DENSE_FREQUENCY = 0.1
RULE_OF_THUMB = "fastsae's rule of thumb (SAEBench reports this number without a pass mark)"
# (metric, test, threshold, what it means, where the threshold comes from)
HEALTH_CHECKS = (
    (
        "ce_loss_score",
        ">=",
        0.9,
        "with the SAE spliced in, the model keeps at least 90% of the loss that zero-ablation loses (SAEBench's definition)",
        RULE_OF_THUMB,
    ),
    ("l0_mean", "between", (5.0, 200.0), "sparse, but not trivially so", RULE_OF_THUMB),
    ("never_fired_fraction", "<=", 0.1, "at most 10% of features never fire", RULE_OF_THUMB),
    ("dense_fraction", "<=", 0.01, "at most 1% of features fire on more than 10% of tokens", RULE_OF_THUMB),
)
# The SAEBench numbers derived from the cross-entropy and KL, which get a 95% interval.
INTERVAL_METRICS = (
    "ce_loss_score",
    "kl_div_score",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "kl_div_with_sae",
    "kl_div_with_ablation",
)


@dataclass
class EvalConfig:
    checkpoint: list[str] = setting(
        [DEFAULT_CHECKPOINT],
        "SAE checkpoints (ours, HypotheSAEs', or a SAELens, sparsify or dictionary_learning folder, or saelens:RELEASE/SAE_ID); "
        "several (a sweep on one store) share the model's passes",
        split_commas=False,
    )
    store: str = setting("", "activation store; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model for the SAEBench metrics; empty: the store's model")
    validation_fraction: float = setting(-1.0, "fraction of examples held out; -1: the training run's")
    seed: int = setting(-1, "seed of the example split; -1: the training run's")
    max_examples: int = setting(0, "our store metrics on at most N held-out examples (0: all)")
    model_metrics: bool = setting(True, "load the model for SAEBench's core metrics (ce_loss_score, KL, variance, shrinkage, ...)")
    model_tokens: int = setting(
        DEFAULT_TOKEN_BUDGET, "held-out tokens the model metrics run on, whole examples (SAEBench's default 20,480; 0: all)"
    )
    batch_size_prompts: int = setting(
        BATCH_SIZE_PROMPTS,
        "examples per model batch (SAEBench's batch_size_prompts: its mse, explained_variance and relative_reconstruction_bias depend on it)",
    )
    exclude_special_tokens_from_reconstruction: str = setting(
        "auto",
        "SAEBench's option (its default: false): keep the hook's output at BOS/EOS/pad positions. auto: true for an SAE trained without special tokens",
    )
    reuse_model_passes: bool = setting(
        True, "reuse the clean and zero-ablated passes saved in the store folder when model, store and split match"
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    evals: list[str] = setting(
        ["core"],
        "which evaluations: core (eval.json: SAEBench's core metrics and ours), sparse_probing (k-sparse probes on the "
        "dataset's labels: sparse_probing.json), absorption (SAEBench's first-letter feature absorption: absorption.json)",
    )
    probing_k: list[int] = setting(K_VALUES, "sparse probing: how many SAE features each probe reads (SAEBench's k_values)")
    probing_train_examples: int = setting(
        PROBE_TRAIN_EXAMPLES,
        "sparse probing: training examples per one-vs-rest task, at most N/2 per label (SAEBench's probe_train_set_size; 0: all)",
    )
    probing_test_examples: int = setting(
        PROBE_TEST_EXAMPLES,
        "sparse probing: held-out examples per one-vs-rest task, at most N/2 per label (SAEBench's probe_test_set_size; 0: all)",
    )
    probing_context_length: int = setting(
        CONTEXT_LENGTH,
        "sparse probing: each example is pooled over its first N positions, special tokens counted (SAEBench's context_length; 0: the whole example)",
    )
    absorption_words: int = setting(
        -1,
        "absorption: words sampled from the vocabulary for the spelling task; 0: all (SAEBench); "
        f"-1: all on a GPU, {CPU_MAX_WORDS} on the CPU (small models may then spell too weakly to measure: say so)",
    )
    tracker: str = setting("none", tracking.TRACKER_HELP, name="logger")
    tracker_project: str = setting(tracking.DEFAULT_PROJECT, tracking.PROJECT_HELP, name="logger_project")
    tracker_dir: str = setting("", tracking.DIR_HELP, name="logger_dir")

    def __post_init__(self) -> None:
        unknown = [name for name in self.evals if name not in EVALS]
        if unknown or not self.evals:
            hints = [
                f" Did you mean {close[0]} (not {name!r})?"
                for name in unknown
                if (close := difflib.get_close_matches(name.lower(), EVALS, 1))
            ]
            raise UserError(f"EVALS takes one or more of {', '.join(EVALS)}; got {self.evals!r}.{''.join(hints)}")
        if self.absorption_words < -1:
            raise UserError(f"ABSORPTION_WORDS must be -1 (by device), 0 (all) or positive; got {self.absorption_words}.")
        sizes = (self.probing_train_examples, self.probing_test_examples)
        if self.probing_context_length < 0:
            raise UserError(f"PROBING_CONTEXT_LENGTH must be 0 (the whole example) or positive; got {self.probing_context_length}.")
        if not self.probing_k or min(self.probing_k) < 1 or any(size < 0 or size == 1 for size in sizes):
            raise UserError(
                f"PROBING_K must list numbers of at least 1, and PROBING_TRAIN_EXAMPLES / PROBING_TEST_EXAMPLES be 0 (all) or at "
                f"least 2 (half of each task's examples come from its label); "
                f"got {self.probing_k}, {self.probing_train_examples} and {self.probing_test_examples}."
            )
        if isinstance(self.checkpoint, str | Path):  # one checkpoint given from Python
            self.checkpoint = [str(self.checkpoint)]
        if len(set(self.checkpoint)) < len(self.checkpoint):  # each would be evaluated, and listed in the sweep's table, twice
            logger.info(
                "CHECKPOINT lists %d checkpoints more than once: each is evaluated once.", len(self.checkpoint) - len(set(self.checkpoint))
            )
            self.checkpoint = list(dict.fromkeys(self.checkpoint))
        if not self.checkpoint:
            raise UserError("CHECKPOINT is empty: name at least one SAE checkpoint, e.g. --checkpoint checkpoints/.../SAE_M=256_K=8.pt.")
        if self.exclude_special_tokens_from_reconstruction not in ("auto", "true", "false"):
            raise UserError(
                f"EXCLUDE_SPECIAL_TOKENS_FROM_RECONSTRUCTION must be auto, true or false; got {self.exclude_special_tokens_from_reconstruction!r}."
            )
        if self.validation_fraction != -1 and not 0 < self.validation_fraction < 1:
            raise UserError(
                f"VALIDATION_FRACTION must be -1 (the training run's split) or between 0 and 1, e.g. 0.1; got {self.validation_fraction}."
            )
        if self.seed < -1:
            raise UserError(f"SEED must be -1 (the training run's) or at least 0; got {self.seed}.")
        if self.max_examples < 0:
            raise UserError(f"MAX_EXAMPLES must be at least 0 (0: every held-out example); got {self.max_examples}.")
        if self.batch_size_prompts < 1 or self.model_tokens < 0:
            raise UserError(
                f"BATCH_SIZE_PROMPTS must be at least 1 and MODEL_TOKENS at least 0; got {self.batch_size_prompts} and {self.model_tokens}."
            )
        tracking.check_tracker(self.tracker)


# Below this share of the tokens' squared norm, their spread Σ‖x − x̄‖² is rounding noise, not a variance to explain.
MIN_RELATIVE_SPREAD = 1e-6


class ReconstructionSums:
    """Running sums for our reconstruction metrics over one kind of token."""

    def __init__(self, d: int) -> None:
        self.tokens = 0
        self.squared_error = 0.0
        self.cosine = 0.0
        self.total = torch.zeros(d, dtype=torch.float64)
        self.squared_norm = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        if not len(x):
            return
        x, x_hat = x.double(), x_hat.double()
        self.tokens += len(x)
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.cosine += float(F.cosine_similarity(x, x_hat, dim=1).sum())
        self.total += x.sum(0)
        self.squared_norm += float(x.pow(2).sum())

    def metrics(self) -> dict[str, float | int | None]:
        """FVU is None when the tokens have (almost) no spread around their mean: one token, or only BOS, whose activation
        is the same in every example; a ratio to that spread would be a division by zero or rounding noise."""
        if not self.tokens:
            return {"tokens": 0}
        d = len(self.total)
        variance = self.squared_norm - float(self.total.pow(2).sum()) / self.tokens  # Σ‖x − x̄‖²
        return {
            "tokens": self.tokens,
            "fvu": self.squared_error / variance if variance > MIN_RELATIVE_SPREAD * self.squared_norm else None,
            "mse_per_dimension": self.squared_error / (self.tokens * d),
            "cosine": self.cosine / self.tokens,
        }


def fast_token_mse(per_example: list[float], d: int) -> dict[str, float | None]:
    """The FAST paper's Eq. 7 (and its log2, which is what the paper prints)."""
    if not per_example:
        return {"raw": None, "log2": None}
    raw = float(np.mean(per_example)) / d
    return {"raw": raw, "log2": math.log2(raw) if raw > 0 else None}  # a perfect reconstruction has no log2 (JSON has no -inf)


def validation_examples(split: ExampleSplit) -> list[int]:
    """The held-out examples of a training run's split (`ExampleSplit.of_store`, as training made it)."""
    if not split.is_validation.any():
        raise UserError(
            "no validation examples: the split has VALIDATION_FRACTION = 0. Pass --validation-fraction 0.1 (examples the SAE may have seen count then)."
        )
    return np.flatnonzero(split.is_validation).tolist()


STORE_CHUNK_TOKENS = 4096  # held-out tokens encoded together in the store pass


@torch.no_grad()
def store_metrics(store: ActivationStore, examples: list[int], sae: SparseAutoencoder, include_special: bool) -> dict[str, Any]:
    """Our reconstruction, FAST MSE and sparsity metrics from one pass over the held-out examples in the store."""
    sums = {"all": ReconstructionSums(store.d), "content": ReconstructionSums(store.d), "special": ReconstructionSums(store.d)}
    fast_all, fast_special = [], []
    fire_counts = torch.zeros(sae.spec.m, dtype=torch.float64)
    l0_per_token, l1_total, sparsity_tokens = [], 0.0, 0
    chunks = store.example_groups(examples, STORE_CHUNK_TOKENS)
    for chunk in tqdm(chunks, desc="evaluating (store)", unit="chunk"):
        parts = [store.example(index) for index in chunk]
        x = torch.cat([part.activations for part in parts]).float()
        special = torch.from_numpy(np.concatenate([part.special_mask for part in parts]))
        example_of_token = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(part.special_mask) for part in parts]))
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        sums["all"].add(x, x_hat)
        sums["content"].add(x[~special], x_hat[~special])
        sums["special"].add(x[special], x_hat[special])
        token_errors = (x - x_hat).double().pow(2).sum(1)
        fast_all += _per_example_means(token_errors, example_of_token, torch.ones_like(special), len(parts))
        fast_special += _per_example_means(token_errors, example_of_token, special, len(parts))
        trained_on = torch.ones_like(special) if include_special else ~special
        active = codes[trained_on] > 0
        fire_counts += active.sum(0)
        l0_per_token.append(active.sum(1).numpy())
        l1_total += float(codes[trained_on].sum())
        sparsity_tokens += int(trained_on.sum())
    l0 = np.concatenate(l0_per_token) if l0_per_token else np.zeros(0)
    density = (fire_counts / max(sparsity_tokens, 1)).numpy()
    # No held-out token of the kinds the SAE was trained on (a short split of template-only examples): its sparsity is
    # not measured here, rather than an L0 of 0 and every feature dead.
    measured = sparsity_tokens > 0
    return {
        "reconstruction": {kind: total.metrics() for kind, total in sums.items()},
        "fast_token_mse": fast_token_mse(fast_all, store.d),
        "fast_token_mse_special": fast_token_mse(fast_special, store.d),
        "sparsity": {
            "tokens": sparsity_tokens,
            "l0_mean": float(l0.mean()) if measured else None,
            "l0_percentiles": {str(p): float(np.percentile(l0, p)) for p in (10, 50, 90)} if measured else {},
            "l1_mean": l1_total / sparsity_tokens if measured else None,
            "never_fired_fraction": float((fire_counts == 0).double().mean()) if measured else None,
            "dense_fraction": float((density > DENSE_FREQUENCY).mean()) if measured else None,
        },
        "feature_density": density.tolist(),
    }


def _per_example_means(values: torch.Tensor, example_of_token: torch.Tensor, counted: torch.Tensor, n_examples: int) -> list[float]:
    """Each example's mean of `values` over its `counted` tokens, for the examples that have any."""
    totals = torch.zeros(n_examples, dtype=torch.float64).index_add_(0, example_of_token[counted], values[counted])
    counts = torch.zeros(n_examples, dtype=torch.float64).index_add_(
        0, example_of_token[counted], torch.ones(int(counted.sum()), dtype=torch.float64)
    )
    return (totals[counts > 0] / counts[counts > 0]).tolist()


def decoder_max_cosine(sae: SparseAutoencoder) -> dict[str, float]:
    """Distribution of each decoder row's maximum cosine similarity to any other row."""
    values = max_cosine_to_another(sae.W_dec.detach().cpu()).numpy()
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def health_table(values: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for metric, test, threshold, meaning, source in HEALTH_CHECKS:
        value = values.get(metric)
        if value is None:
            verdict = "not measured"
        elif test == ">=":
            verdict = "pass" if value >= threshold else "fail"
        elif test == "<=":
            verdict = "pass" if value <= threshold else "fail"
        else:
            verdict = "pass" if threshold[0] <= value <= threshold[1] else "fail"
        rows.append(
            {
                "metric": metric,
                "value": value,
                "test": test,
                "threshold": threshold,
                "verdict": verdict,
                "meaning": meaning,
                "source": source,
            }
        )
    return rows


def plot_feature_density(path: Path, density: list[float], title: str, tokens: int | None = None) -> None:
    """A histogram of log10 density; `tokens` 0 says that no token was counted (nothing is dead then, nor alive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(density)
    figure, axis = plt.subplots(figsize=(6, 3.6))
    alive = values[values > 0]
    axis.hist(np.log10(alive), bins=50, color="#4c72b0") if len(alive) else None
    axis.set_xlabel("log10 feature density (fraction of tokens it fires on)")
    axis.set_ylabel("features")
    counted = f"{int((values == 0).sum())} of {len(values)} features never fire (not shown)" if tokens != 0 else "no token counted"
    axis.set_title(f"{title}\n{counted}")
    figure.tight_layout()
    write_figure_atomically(path, figure, dpi=110)
    plt.close(figure)


def _number(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def saebench_table(results: dict[str, Any]) -> list[str]:
    """SAEBench's core metrics, each with its 95% interval where it comes from the cross-entropy or KL."""
    block, intervals = results["saebench_core"], results.get("saebench_core_intervals_95", {})
    lines = [
        f"SAEBench core metrics (sae-bench {SAEBENCH_VERSION} definitions), {results['model_tokens']['tokens']:,} held-out tokens:",
        "",
        "| group | metric | value | 95% interval |",
        "|---|---|---|---|",
    ]
    for group, metrics in block["eval_result_metrics"].items():
        for name, value in metrics.items():
            interval = intervals.get(name)
            shown = f"{value:,}" if isinstance(value, int) else _number(value)
            lines.append(f"| {group} | {name} | {shown} | {f'{interval[0]:.4f} – {interval[1]:.4f}' if interval else ''} |")
    return lines


def report_table(results: dict[str, Any]) -> str:
    """The printed summary: our metrics, SAEBench's, then the health checks."""
    rec, fast, sparsity = results["reconstruction"], results["fast_token_mse"], results["sparsity"]
    fast_special = results["fast_token_mse_special"]
    lines = [
        "| metric (ours) | all tokens | content | special |",
        "|---|---|---|---|",
        *(
            f"| {label} | " + " | ".join(_number(rec[kind].get(key)) for kind in ("all", "content", "special")) + " |"
            for label, key in (("FVU", "fvu"), ("MSE per dimension", "mse_per_dimension"), ("cosine(x, x̂)", "cosine"))
        ),
        "",
        "| metric (ours) | value |",
        "|---|---|",
        f"| FAST token MSE, raw / log2 | {_number(fast['raw'])} / {_number(fast['log2'])} |",
        f"| FAST MSE_st (special tokens), raw / log2 | {_number(fast_special['raw'])} / {_number(fast_special['log2'])} |",
        f"| L0 (mean; p10 / p50 / p90) | {_number(sparsity['l0_mean'], 2)}; "
        + (" / ".join(f"{v:.0f}" for v in sparsity["l0_percentiles"].values()) or "n/a")
        + " |",
        f"| L1 (mean) | {_number(sparsity['l1_mean'], 3)} |",
        f"| never-fired / dense features | {_percent(sparsity['never_fired_fraction'])} / {_percent(sparsity['dense_fraction'])} |",
        f"| decoder rows' max cosine to another row (mean / p90 / max) | {results['decoder_max_cosine']['mean']:.3f} / {results['decoder_max_cosine']['p90']:.3f} / {results['decoder_max_cosine']['max']:.3f} |",
    ]
    if results.get("saebench_core"):
        lines += ["", *saebench_table(results)]
    lines += ["", "| health check | value | threshold | verdict | threshold's source |", "|---|---|---|---|---|"]
    for row in results["health"]:
        threshold = (
            f"{row['threshold'][0]:g}–{row['threshold'][1]:g}" if row["test"] == "between" else f"{row['test']} {row['threshold']:g}"
        )
        lines.append(f"| {row['metric']} | {_number(row['value'], 3)} | {threshold} | {row['verdict']} | {row['source']} |")
    return "\n".join(lines)


@dataclass
class _Evaluand:
    """One checkpoint to evaluate, with what its evaluation depends on."""

    trained: TrainedSAE
    store: ActivationStore
    fraction: float
    seed: int

    def excludes_special_tokens(self, setting: str) -> bool:
        """SAEBench's `exclude_special_tokens_from_reconstruction` for this SAE: `auto` follows what it was trained on."""
        return not self.trained.info.trained_with_special_tokens if setting == "auto" else setting == "true"

    @property
    def path(self) -> Path:
        return self.trained.checkpoint

    @functools.cached_property
    def split(self) -> ExampleSplit:
        """The training run's split, drawn once: the core metrics record it and sparse probing reads it."""
        return ExampleSplit.of_store(self.store, self.fraction, self.seed)

    @property
    def sae(self) -> SparseAutoencoder:
        return self.trained.sae


def _evaluand(path: Path, config: EvalConfig) -> _Evaluand:
    trained = open_trained_sae(path)
    info = trained.info
    store = trained.open_store(config.store)
    _refuse_another_hook(trained, store)
    fraction = config.validation_fraction if config.validation_fraction >= 0 else info.validation_fraction
    seed = config.seed if config.seed >= 0 else info.seed
    return _Evaluand(trained, store, fraction, seed)


def _refuse_another_hook(trained: TrainedSAE, store: ActivationStore) -> None:
    """An SAE is evaluated where it was trained: its files land beside it as its own metrics (export publishes them), and
    a store of another hook would make them numbers of an SAE read where it learned nothing. (Another model's store of the
    same hook stays allowed, with open_store's warning: a base model's SAE read on its chat model is a study of its own.)"""
    recorded = trained.info.hook_name
    if recorded and store.hook_name and store.hook_name != recorded:
        raise UserError(
            f"{trained.checkpoint} was trained at {recorded}, but the store at {store.folder} holds {store.hook_name}: its "
            f"metrics there would be written beside it as its own. Pass a --store extracted at {recorded}, or leave STORE empty "
            "for the one it was trained on."
        )


class Tokenizers:
    """Each model's tokenizer, loaded once per evaluate_sae call: the core metrics and sparse probing both read its BOS,
    EOS and padding ids (SAEBench's `ignore_tokens`)."""

    def __init__(self, model_name_setting: str) -> None:
        self.model_name_setting = model_name_setting
        self.loaded: dict[str, Any] = {}

    def model_name(self, store: ActivationStore, fix: str) -> str:
        """MODEL_NAME, else the model the store records; `fix` ends the message when there is neither."""
        name = self.model_name_setting or store.manifest.model_name
        if not name:
            raise UserError(f"the store at {store.folder} does not name its model. {fix}")
        return name

    def __call__(self, name: str):
        if name not in self.loaded:
            self.loaded[name] = load_tokenizer(resolve_model(name))
        return self.loaded[name]

    def ignored_ids(self, store: ActivationStore) -> set[int]:
        """The ids sparse probing leaves out of its means, as the core metrics do."""
        fix = "Pass --model-name: sparse probing pools over every token but the BOS, EOS and padding tokens its tokenizer names."
        return ignored_token_ids(self(self.model_name(store, fix)))


class _ModelMetrics:
    """The model, loaded once, and the reference passes per (store, split), shared by every SAE of a sweep."""

    def __init__(self, config: EvalConfig, tokenizers: Tokenizers) -> None:
        self.config, self.tokenizers = config, tokenizers
        self.device = resolve_device(config.device)
        self.dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.models: dict[str, tuple[torch.nn.Module, Any, str]] = {}
        self.references: dict[tuple, ReferencePasses] = {}

    def _model(self, name: str) -> tuple[torch.nn.Module, Any, str]:
        if name not in self.models:
            model = load_model(resolve_model(name), self.dtype, self.device)
            self.models[name] = (model, self.tokenizers(name), model_fingerprint(model))
        return self.models[name]

    def reference(self, evaluand: _Evaluand, examples: list[int]) -> ReferencePasses:
        store, config = evaluand.store, self.config
        model_name = self.tokenizers.model_name(store, "Pass --model-name, or --model-metrics false.")
        key = (str(store.folder), evaluand.fraction, evaluand.seed, model_name)
        if key not in self.references:
            model, tokenizer, fingerprint = self._model(model_name)
            layer = int(store.manifest.layer)
            check_layers(model, [layer])
            lengths = np.diff(store.doc_offsets)
            chosen = budgeted_examples(lengths, examples, config.model_tokens, evaluand.seed)
            batches = length_grouped(chosen, lengths, config.batch_size_prompts)
            ignored = ignored_token_ids(tokenizer)
            cache_key = {
                "format": 1, "model": model_name, "weights": fingerprint, "dtype": str(self.dtype), "device": torch.device(self.device).type,
                "store": store_fingerprint(store), "batches": batches, "ignored": sorted(ignored),
                "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            }  # fmt: skip
            split = SplitModel(model, layer, store.manifest.hook_point)
            reference = ReferencePasses(split, store, batches, ignored, pad_token_id(tokenizer), cache_key)
            reference.load_or_compute(config.reuse_model_passes)
            self.references[key] = reference
        return self.references[key]

    def evaluate(self, evaluand: _Evaluand, examples: list[int]) -> dict[str, Any]:
        reference = self.reference(evaluand, examples)
        sae = evaluand.sae.to(self.device)
        exclude = evaluand.excludes_special_tokens(self.config.exclude_special_tokens_from_reconstruction)
        losses, sparsity_variance = reference.evaluate(sae, exclude, desc=f"model: {evaluand.path.stem} spliced in")
        if not losses.next_token_predictions:
            raise UserError(
                f"the held-out examples of {reference.store.folder} have no next-token prediction to score (every input token is "
                "BOS/EOS/padding, or examples are one token long). Extract longer examples, or pass --model-metrics false."
            )
        offsets = reference.store.doc_offsets
        lengths = [int(offsets[i + 1] - offsets[i]) for batch in reference.batches for i in batch]
        tokens = sum(lengths)
        eval_config = {
            "model_name": self.config.model_name or reference.store.manifest.model_name, "llm_dtype": str(self.dtype).removeprefix("torch."),
            "batch_size_prompts": self.config.batch_size_prompts, "n_eval_reconstruction_batches": len(reference.batches),
            "n_eval_sparsity_variance_batches": len(reference.batches), "dataset": reference.store.manifest.dataset.path or "",
            "context_size": max(lengths),
            "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True, "compute_sparsity_metrics": True, "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": exclude, "verbose": False,
        }  # fmt: skip
        block = core_output(
            losses,
            sparsity_variance,
            sae.cpu(),
            eval_config,
            tokens,
            evaluand.path.stem,
            saelens_config(evaluand.trained.info),
            __version__,
        )
        intervals = losses.intervals()
        return {
            "saebench_core": block,
            "saebench_core_intervals_95": {name: intervals[name] for name in INTERVAL_METRICS},
            "model_tokens": {"examples": sum(map(len, reference.batches)), "tokens": tokens, "reused_reference_passes": reference.reused},
        }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _headline(results: dict[str, Any]) -> dict[str, float]:
    values = dict(results["sparsity"])
    if results.get("saebench_core"):
        values["ce_loss_score"] = results["saebench_core"]["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"]
    return values


def tracked_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers a tracker run gets, named by where eval.json holds them (SAEBench's and ours are defined differently)."""
    metrics = {
        "reconstruction/content/fvu": results["reconstruction"]["content"].get("fvu"),
        **{f"sparsity/{name}": results["sparsity"][name] for name in ("l0_mean", "never_fired_fraction", "dense_fraction")},
    }
    if results.get("saebench_core"):
        groups = results["saebench_core"]["eval_result_metrics"]
        metrics |= {
            "saebench_core/ce_loss_score": groups["model_performance_preservation"]["ce_loss_score"],
            "saebench_core/kl_div_score": groups["model_behavior_preservation"]["kl_div_score"],
            "saebench_core/explained_variance": groups["reconstruction_quality"]["explained_variance"],
            "saebench_core/l0": groups["sparsity"]["l0"],
        }
    return {name: value for name, value in metrics.items() if value is not None}


def _sweep_row_names(checkpoints: list[str]) -> list[str]:
    """Each checkpoint as its path below the folder they all share: a file's stem alone repeats across runs (every
    run's SAE_M=256_K=8.pt), and cuts a folder SAE's name at its dot (sparsify's layers.6 and layers.7 are both layers)."""
    try:
        common = os.path.commonpath(checkpoints)
    except ValueError:  # absolute and relative paths mixed
        return checkpoints
    return [path if path == common else os.path.relpath(path, common) for path in checkpoints]


def sweep_table(all_results: list[dict[str, Any]]) -> str:
    lines = ["| checkpoint | FVU (content) | L0 | never fired | ce_loss_score | kl_div_score |", "|---|---|---|---|---|---|"]
    names = _sweep_row_names([results["checkpoint"] for results in all_results])
    for name, results in zip(names, all_results):
        core = (results.get("saebench_core") or {}).get("eval_result_metrics", {})
        ce, kl = (
            core.get("model_performance_preservation", {}).get("ce_loss_score"),
            core.get("model_behavior_preservation", {}).get("kl_div_score"),
        )
        lines.append(
            f"| {name} | {_number(results['reconstruction']['content'].get('fvu'))} | {_number(results['sparsity']['l0_mean'], 1)} | "
            f"{_percent(results['sparsity']['never_fired_fraction'])} | {_number(ce)} | {_number(kl)} |"
        )
    return "\n".join(lines)


def core_metrics(evaluand: _Evaluand, examples: list[int], config: EvalConfig, model_metrics: _ModelMetrics | None) -> dict[str, Any]:
    """The core evaluation of one checkpoint (ours and SAEBench's core metrics); writes eval.json and feature_density.png."""
    store, sae, info = evaluand.store, evaluand.sae, evaluand.trained.info
    store_examples = examples[: config.max_examples] if config.max_examples else examples
    logger.info("Evaluating %s on %d held-out examples of %s", evaluand.path.name, len(store_examples), store.folder)
    settings = {**asdict(config), "checkpoint": str(evaluand.path)}  # this SAE's, not the sweep's list
    results: dict[str, Any] = {
        "checkpoint": str(evaluand.path),
        SAE_FINGERPRINT_KEY: sae.fingerprint(),  # export and interpret refuse an eval.json of other weights
        # A checkpoint saved mid-run describes the SAE at its step; the finished run later replaces the file.
        "checkpoint_state": {"step": info.step, "tokens_trained": info.tokens_trained, "training_finished": info.training_finished},
        "store": str(store.folder),
        "hook_name": store.hook_name,
        # The held-out examples, resolved (VALIDATION_FRACTION and SEED of -1 mean the training run's).
        "split": {"validation_fraction": evaluand.fraction, **evaluand.split.record(evaluand.seed)},
        "examples": len(store_examples),
        "settings": settings,
    }
    results.update(store_metrics(store, store_examples, sae, evaluand.trained.info.trained_with_special_tokens))
    results["decoder_max_cosine"] = decoder_max_cosine(sae)
    if model_metrics is not None and store.manifest.hook_point == LORA_HOOK_POINT:
        results["model_metrics_skipped"] = (
            "a LoRA store concatenates the adapter's bottlenecks across all its layers, so there is no single hook to splice "
            "the reconstruction into: SAEBench's model metrics (ce_loss_score, KL, ...) do not apply"
        )
        logger.info("Model metrics skipped: %s. The store metrics above still apply.", results["model_metrics_skipped"])
    elif model_metrics is not None:
        results.update(model_metrics.evaluate(evaluand, examples))
    results["health"] = health_table(_headline(results))
    density = results.pop("feature_density")
    folder = evaluand.trained.results_folder  # beside a .pt checkpoint; inside an SAE folder; checkpoints/saelens/ for a pretrained one
    folder.mkdir(parents=True, exist_ok=True)
    plot_feature_density(folder / DENSITY_PLOT_FILE, density, f"{sae.spec.name} — {store.hook_name}", results["sparsity"]["tokens"])
    write_json_atomically(folder / EVAL_FILE, {**results, "feature_density": density})
    with tracking.start_tracker(config, folder, evaluand.path.stem, "evaluate", settings) as tracker:
        tracker.log_summary(tracked_metrics(results))
    print(f"\n{evaluand.path}\n\n" + report_table(results))
    return results


def evaluate_sae(config: EvalConfig) -> list[dict[str, Any]]:
    """Run the evaluations EVALS names on each checkpoint's held-out examples; each writes its files beside the checkpoint.
    The checkpoints of a sweep share what does not depend on the SAE: the model's reference passes per store and split,
    and absorption's spelling pass per model and hook.

    Returns one dict per checkpoint: the core results (when `core` ran) and, under its name, each other evaluation's."""
    evaluands = [_evaluand(Path(path), config) for path in config.checkpoint]
    tokenizers = Tokenizers(config.model_name)
    model_metrics = _ModelMetrics(config, tokenizers) if config.model_metrics and "core" in config.evals else None
    absorption = (
        AbsorptionSweep(config.device, AbsorptionSettings(max_words=config.absorption_words), config.model_name)
        if "absorption" in config.evals
        else None
    )
    if absorption is not None:
        for evaluand in evaluands:
            absorption.check(evaluand.trained)
    all_results = []
    for evaluand in evaluands:
        examples = validation_examples(evaluand.split)
        results = core_metrics(evaluand, examples, config, model_metrics) if "core" in config.evals else {"checkpoint": str(evaluand.path)}
        if "sparse_probing" in config.evals:
            results["sparse_probing"] = run_sparse_probing(
                evaluand.trained,
                evaluand.store,
                evaluand.split,
                evaluand.seed,
                tokenizers.ignored_ids(evaluand.store),
                config.probing_k,
                config.probing_train_examples,
                config.probing_test_examples,
                config.probing_context_length,
            )
        if absorption is not None:
            results["absorption"] = absorption.evaluate(evaluand.trained)
            write_absorption(evaluand.trained.results_folder, results["absorption"])
            print(f"\n{evaluand.path}: first-letter absorption\n\n" + absorption_table(results["absorption"]))
        all_results.append(results)
    core_results = [results for results in all_results if "reconstruction" in results]
    if len(core_results) > 1:
        print("\n" + sweep_table(core_results))
    return all_results


class EvaluateStage(Stage):
    """Step 2b in the pipeline: each checkpoint (+ its store and model) → the files of the evaluations EVALS names beside it."""

    name = "evaluate"
    script = "evaluate_sae.py"
    input_constant = "CHECKPOINT"
    upstream = "train"
    config_class = EvalConfig
    unfingerprinted = Stage.unfingerprinted | set(tracking.SETTINGS)  # where it logs, not what it writes

    def run(self, config: EvalConfig) -> list[dict[str, Any]]:
        return evaluate_sae(config)

    def outputs(self, config: EvalConfig, facts: PlanFacts) -> list[Output]:
        """The files of each evaluation EVALS names, beside each checkpoint."""
        return [Output(results_folder(checkpoint) / name) for checkpoint in config.checkpoint for name in _output_names(config.evals)]

    def estimate(self, config: EvalConfig, facts: PlanFacts) -> Estimate:
        """Core: store metrics on every held-out token; the model on a budget of them: one clean forward, then, from the
        hooked block on, the zero-ablated pass and one pass per checkpoint (a rerun on the same store reuses the first
        two). Sparse probing: one SAE pass over the first positions of the examples it reads; its caps are per label and
        the labels are not known here, so every example counts (an upper bound); its probes are small next to that.
        Absorption: see `_absorption_estimate`."""
        corpus, calibration = facts.corpus, facts.calibration
        if corpus is None or calibration is None:
            return Estimate()
        training = facts.configs["train"]
        fraction = config.validation_fraction if config.validation_fraction >= 0 else training.validation_fraction
        seed = config.seed if config.seed >= 0 else training.seed
        examples = validation_examples(ExampleSplit.by_text(len(corpus.lengths), fraction, seed, corpus.block_rows)) if fraction > 0 else []
        parts = []
        if "core" in config.evals:
            parts.append(self._core_estimate(config, facts, examples, seed))
        if "sparse_probing" in config.evals:
            context = config.probing_context_length
            tokens = int((np.minimum(corpus.lengths, context) if context else corpus.lengths).sum())
            seconds = seconds_for(None, tokens * len(config.checkpoint), calibration.encode_tokens_per_second)
            parts.append(
                Estimate(
                    examples=len(corpus.lengths),
                    tokens=tokens,
                    seconds=seconds,
                    note=f"sparse probing on up to {len(corpus.lengths):,} examples",
                )
            )
        if "absorption" in config.evals:
            parts.append(self._absorption_estimate(config, facts))
        seconds = [part.seconds for part in parts]
        return Estimate(
            examples=max((part.examples for part in parts if part.examples is not None), default=None),
            tokens=sum(part.tokens or 0 for part in parts),
            seconds=None if None in seconds else sum(seconds),
            note="; ".join(part.note for part in parts if part.note),
        )

    def _core_estimate(self, config: EvalConfig, facts: PlanFacts, examples: list[int], seed: int) -> Estimate:
        corpus, calibration = facts.corpus, facts.calibration
        store_examples = examples[: config.max_examples] if config.max_examples else examples
        tokens = int(corpus.lengths[store_examples].sum())
        encode = seconds_for(None, tokens * len(config.checkpoint), calibration.encode_tokens_per_second)
        if not config.model_metrics:
            return Estimate(examples=len(store_examples), tokens=tokens, seconds=encode, note="store metrics only")
        model_tokens = int(corpus.lengths[budgeted_examples(corpus.lengths, examples, config.model_tokens, seed)].sum()) if examples else 0
        from_hook = (facts.n_layers - max(facts.configs["extract"].layers)) / facts.n_layers
        passes = 1 + len(config.checkpoint)
        model = seconds_for(calibration.load_seconds, int((1 + passes * from_hook) * model_tokens), calibration.full_tokens_per_second)
        return Estimate(
            examples=len(store_examples),
            tokens=tokens,
            seconds=None if encode is None or model is None else encode + model,
            note=f"model on {model_tokens:,} tokens: 1 forward + {passes} from the hooked block",
        )

    def _absorption_estimate(self, config: EvalConfig, facts: PlanFacts) -> Estimate:
        """The spelling pass once (the checkpoints share the model and hook): loading the model, the prompts up to the
        hooked block, the letter probe; then per checkpoint its encodings, the L1 probe on its latents and the k-sparse
        fits (`AbsorptionWork` counts them; the checkpoint's M is training's, or its largest when not planned there).
        With every word asked for, the vocabulary's size bounds their number."""
        calibration = facts.calibration
        settings = AbsorptionSettings(max_words=config.absorption_words)
        words = settings.words_for(resolve_device(config.device)) or facts.vocab_size
        work = AbsorptionWork(words, settings)
        spelling = seconds_for(calibration.load_seconds, work.prompt_tokens, calibration.cut_tokens_per_second)
        encode = seconds_for(None, work.encoded_rows * len(config.checkpoint), calibration.encode_tokens_per_second)
        planned = [facts.output_facts("train", Path(checkpoint)) for checkpoint in config.checkpoint]
        largest = max(spec.m for spec in facts.configs["train"].specs(facts.d))
        latents = [known["m"] if known else largest for known in planned]
        seconds = (
            None
            if spelling is None or encode is None
            else spelling + work.phase_one_seconds(facts.vocab_size) + encode + sum(map(work.phase_two_seconds, latents))
        )
        note = f"absorption: {words:,} words, {work.prompt_tokens:,} prompt tokens to the hooked block; an upper bound"
        return Estimate(tokens=work.prompt_tokens, seconds=seconds, note=note)

    def key_figures(self, config: EvalConfig, outputs: list[Output]) -> list[tuple[str, str]]:
        """SAEBench's ce_loss_score, and sparse probing's mean top-1 accuracy and ceiling, of the first checkpoint."""
        first = {output.path.name: output.path for output in outputs[: len(_output_names(config.evals))]}
        figures = []
        if EVAL_FILE in first and first[EVAL_FILE].is_file():
            saved = json.loads(first[EVAL_FILE].read_text())
            core = saved.get("saebench_core")
            score = f"{core['eval_result_metrics']['model_performance_preservation']['ce_loss_score']:.4f}" if core else None
            # Not measured: skipped on purpose for this SAE (the reason is recorded), else MODEL_METRICS was off.
            unmeasured = f"not measured: {saved.get('model_metrics_skipped') or 'MODEL_METRICS off'}"
            figures.append(("SAEBench ce_loss_score (loss recovered)", score or unmeasured))
        if SPARSE_PROBING_FILE in first and first[SPARSE_PROBING_FILE].is_file():
            probing = json.loads(first[SPARSE_PROBING_FILE].read_text())
            if probing["status"] == "skipped":
                figures.append(("sparse probing", f"skipped: {probing['reason']}"))
            else:
                k, means = probing["k_values"][0], probing["mean_over_labels"]
                figures.append(
                    (
                        f"sparse probing, mean over {len(probing['labels'])} labels",
                        f"top-{k} accuracy {means[f'sae_top_{k}_test_accuracy']:.3f}, all-d ceiling {means['ceiling_test_accuracy']:.3f}",
                    )
                )
        return figures


def _output_names(evals: list[str]) -> list[str]:
    return [name for evaluation in EVALS if evaluation in evals for name in EVAL_FILES[evaluation]]


STAGE = EvaluateStage()
