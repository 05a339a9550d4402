"""Step 2b: SAEBench-style metrics of a trained SAE on the held-out examples of its training run.

Definitions (x: raw activation of a token, x̂: the SAE's reconstruction, d: width):

- MSE = mean over tokens and dimensions of (x − x̂)².
- FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: mean over the evaluated tokens); explained variance = 1 − FVU.
- cosine = mean over tokens of cos(x, x̂).
- FAST token MSE (the FAST paper, Eq. 7) = mean over examples of [mean over the example's tokens
  of ‖x − x̂‖²], divided by d; raw activations, not variance-normalised. MSE_st is the same over
  special/template tokens only. The paper prints log2 of both, so both are reported raw and log2.
- L0 = active features per token; L1 = Σ activations per token; density of a feature = the
  fraction of tokens it fires on; dead = never fires here; dense = fires on more than 10%.
- With the model: CE_clean, CE_sae (the SAE's reconstruction replaces the hook's output) and
  CE_zero (the hook's output replaced by zeros), next-token cross-entropy over content tokens.
  Loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) (SAEBench's ce_loss_score);
  relative loss increase = (CE_sae − CE_clean) / CE_clean; KL = KL(clean ‖ spliced) per token.
  The replacement happens at the token kinds the SAE was trained on (content tokens by default).
- Decoder geometry: for each decoder row, its maximum cosine similarity to any other row.

Note what these are not: 1 − FVU is explained variance, not loss recovered; a mean decoder
cosine similarity is not feature absorption.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastsae.batches import ExampleSplit
from fastsae.checkpoint import load_sae
from fastsae.config import setting
from fastsae.devices import resolve_device
from fastsae.errors import UserError
from fastsae.extract import length_batches
from fastsae.hook_points import check_layers, hooked_module, output_tensor, with_output_tensor
from fastsae.lora import LORA_HOOK_POINT
from fastsae.models import load_model, resolve_model
from fastsae.sae import SparseAutoencoder
from fastsae.store import ActivationStore

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
DENSE_FREQUENCY = 0.1
# (metric, test, threshold, what it means) — the usual sanity bands of SAEBench-style reports.
HEALTH_CHECKS = (
    ("loss_recovered", ">=", 0.9, "the spliced model keeps at least 90% of the loss the SAE could lose"),
    ("l0_mean", "between", (5.0, 200.0), "sparse, but not trivially so"),
    ("dead_fraction", "<=", 0.1, "at most 10% of features never fire"),
    ("dense_fraction", "<=", 0.01, "at most 1% of features fire on more than 10% of tokens"),
)

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalConfig:
    checkpoint: str = setting(DEFAULT_CHECKPOINT, "SAE checkpoint (ours or HypotheSAEs')")
    store: str = setting("", "activation store; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model for the loss metrics; empty: the store's model")
    validation_fraction: float = setting(-1.0, "fraction of examples held out; -1: the training run's")
    seed: int = setting(-1, "seed of the example split; -1: the training run's")
    max_examples: int = setting(0, "evaluate at most N held-out examples (0: all)")
    model_metrics: bool = setting(True, "load the model for loss recovered, relative loss increase and KL")
    batch_tokens: int = setting(4096, "padded tokens per model forward batch")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")


class ReconstructionSums:
    """Running sums for reconstruction metrics over one kind of token."""

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

    def metrics(self) -> dict[str, float | int]:
        if not self.tokens:
            return {"tokens": 0}
        d = len(self.total)
        variance = self.squared_norm - float(self.total.pow(2).sum()) / self.tokens  # Σ‖x − x̄‖²
        fvu = self.squared_error / variance
        return {"tokens": self.tokens, "mse": self.squared_error / (self.tokens * d), "fvu": fvu, "explained_variance": 1 - fvu, "cosine": self.cosine / self.tokens}


def _fast_mse(per_example: list[float], d: int) -> dict[str, float | None]:
    """The FAST paper's Eq. 7 (and its log2, which is what the paper prints)."""
    if not per_example:
        return {"raw": None, "log2": None}
    raw = float(np.mean(per_example)) / d
    return {"raw": raw, "log2": math.log2(raw) if raw > 0 else float("-inf")}


def validation_examples(n_examples: int, fraction: float, seed: int, max_examples: int) -> list[int]:
    if fraction <= 0:
        raise UserError("no validation examples: the split has VALIDATION_FRACTION = 0. Pass --validation-fraction 0.1 (examples the SAE may have seen count then).")
    examples = np.flatnonzero(ExampleSplit.by_example(n_examples, fraction, seed).is_validation).tolist()
    return examples[:max_examples] if max_examples else examples


@torch.no_grad()
def store_metrics(store: ActivationStore, examples: list[int], sae: SparseAutoencoder, include_special: bool) -> dict[str, Any]:
    """Reconstruction, FAST MSE and sparsity metrics from one pass over the held-out examples in the store."""
    sums = {"all": ReconstructionSums(store.d), "content": ReconstructionSums(store.d), "special": ReconstructionSums(store.d)}
    fast_all, fast_special = [], []
    fire_counts = torch.zeros(sae.spec.m, dtype=torch.float64)
    l0_per_token, l1_total, sparsity_tokens = [], 0.0, 0
    for index in tqdm(examples, desc="evaluating (store)", unit="ex"):
        example = store.example(index)
        x = example.activations.float()
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        special = torch.from_numpy(example.special_mask)
        sums["all"].add(x, x_hat)
        sums["content"].add(x[~special], x_hat[~special])
        sums["special"].add(x[special], x_hat[special])
        token_errors = (x - x_hat).double().pow(2).sum(1)
        fast_all.append(float(token_errors.mean()))
        if special.any():
            fast_special.append(float(token_errors[special].mean()))
        trained_on = torch.ones_like(special) if include_special else ~special
        active = codes[trained_on] > 0
        fire_counts += active.sum(0)
        l0_per_token.append(active.sum(1).numpy())
        l1_total += float(codes[trained_on].sum())
        sparsity_tokens += int(trained_on.sum())
    l0 = np.concatenate(l0_per_token) if l0_per_token else np.zeros(0)
    density = (fire_counts / max(sparsity_tokens, 1)).numpy()
    return {
        "reconstruction": {kind: total.metrics() for kind, total in sums.items()},
        "fast_token_mse": _fast_mse(fast_all, store.d),
        "fast_token_mse_special": _fast_mse(fast_special, store.d),
        "sparsity": {
            "tokens": sparsity_tokens,
            "l0_mean": float(l0.mean()) if len(l0) else 0.0,
            "l0_percentiles": {str(p): float(np.percentile(l0, p)) for p in (10, 50, 90)} if len(l0) else {},
            "l1_mean": l1_total / max(sparsity_tokens, 1),
            "dead_fraction": float((fire_counts == 0).double().mean()),
            "dense_fraction": float((density > DENSE_FREQUENCY).mean()),
        },
        "feature_density": density.tolist(),
    }


def decoder_max_cosine(sae: SparseAutoencoder, chunk: int = 4096) -> dict[str, float]:
    """Distribution of each decoder row's maximum cosine similarity to any other row (chunked: M×M never whole)."""
    directions = F.normalize(sae.W_dec.detach().float(), dim=1)
    maxima = []
    for start in range(0, len(directions), chunk):
        similarity = directions[start : start + chunk] @ directions.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -1.0
        maxima.append(similarity.max(1).values)
    values = torch.cat(maxima).numpy()
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)), "max": float(values.max())}


class _Splice:
    """A forward hook that replaces the hooked module's output at chosen positions."""

    def __init__(self, replace: Reconstruct) -> None:
        self.replace = replace
        self.positions: torch.Tensor | None = None  # (B, T) bool, set per batch

    def __call__(self, module, inputs, output):
        hidden = output_tensor(output)
        replaced = hidden.clone()
        chosen = hidden[self.positions]
        replaced[self.positions] = self.replace(chosen.float()).to(hidden.dtype)
        return with_output_tensor(output, replaced)


def _next_token_log_probs(model, module, hook: _Splice | None, input_ids, attention, positions) -> torch.Tensor:
    """Log-probabilities of each next token, with `hook` (if any) replacing the module's output at `positions`."""
    handle = None
    if hook is not None:
        hook.positions = positions
        handle = module.register_forward_hook(hook)
    try:
        return model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def model_metrics(
    model: torch.nn.Module,
    store: ActivationStore,
    examples: list[int],
    reconstruct: Reconstruct,
    include_special: bool,
    batch_tokens: int,
) -> dict[str, float]:
    """CE clean / with `reconstruct` spliced in / zero-ablated, loss recovered, relative loss increase, KL.

    Each example is its own sequence, batched by length with right padding as in extraction. The
    loss counts next-token predictions whose target is a content token (no padding, no template).
    """
    layer, hook_point = int(store.manifest["layer"]), store.manifest["hook_point"]
    check_layers(model, [layer])
    device = next(model.parameters()).device
    # Only token ids and masks are needed here (not activations): memory stays small for large splits.
    spans = [(int(store.doc_offsets[index]), int(store.doc_offsets[index + 1])) for index in examples]
    token_ids = [store.token_ids(start, stop) for start, stop in spans]
    special_masks = [store.special_mask(start, stop) for start, stop in spans]
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    counted = 0
    splice = _Splice(reconstruct)
    zero = _Splice(torch.zeros_like)
    module = hooked_module(model, layer, hook_point)
    lengths = [len(ids) for ids in token_ids]
    for batch in tqdm(length_batches(lengths, batch_tokens), desc="evaluating (model)", unit="batch"):
        width = lengths[batch[0]]
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        special = torch.ones((len(batch), width), dtype=torch.bool)
        for row, index in enumerate(batch):
            length = lengths[index]
            input_ids[row, :length] = torch.from_numpy(token_ids[index].astype(np.int64))
            attention[row, :length] = 1
            special[row, :length] = torch.from_numpy(special_masks[index])
        input_ids, attention, special = input_ids.to(device), attention.to(device), special.to(device)
        splice_positions = attention.bool() & (torch.ones_like(special) if include_special else ~special)
        target_counts = attention[:, 1:].bool() & ~special[:, 1:]  # predict content tokens only
        targets = input_ids[:, 1:]

        clean, spliced, ablated = (
            _next_token_log_probs(model, module, hook, input_ids, attention, splice_positions) for hook in (None, splice, zero)
        )
        chosen = target_counts
        for name, log_probs in (("clean", clean), ("sae", spliced), ("zero", ablated)):
            totals[name] += float(-log_probs.gather(-1, targets[..., None])[..., 0][chosen].sum())
        totals["kl"] += float((clean.exp() * (clean - spliced)).sum(-1)[chosen].sum())
        counted += int(chosen.sum())
    if not counted:
        raise UserError("the held-out examples have no content tokens to score. Extract longer examples.")
    ce = {name: totals[name] / counted for name in ("clean", "sae", "zero")}
    return {
        "tokens": counted,
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "relative_loss_increase": (ce["sae"] - ce["clean"]) / ce["clean"],
        "kl_divergence": totals["kl"] / counted,
    }


def health_table(values: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for metric, test, threshold, meaning in HEALTH_CHECKS:
        value = values.get(metric)
        if value is None:
            verdict = "not measured"
        elif test == ">=":
            verdict = "pass" if value >= threshold else "fail"
        elif test == "<=":
            verdict = "pass" if value <= threshold else "fail"
        else:
            verdict = "pass" if threshold[0] <= value <= threshold[1] else "fail"
        rows.append({"metric": metric, "value": value, "test": test, "threshold": threshold, "verdict": verdict, "meaning": meaning})
    return rows


def plot_feature_density(path: Path, density: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(density)
    figure, axis = plt.subplots(figsize=(6, 3.6))
    alive = values[values > 0]
    axis.hist(np.log10(alive), bins=50, color="#4c72b0") if len(alive) else None
    axis.set_xlabel("log10 feature density (fraction of tokens it fires on)")
    axis.set_ylabel("features")
    axis.set_title(f"{title}\n{int((values == 0).sum())} of {len(values)} features never fire (not shown)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_table(results: dict[str, Any]) -> str:
    """The printed summary: the headline metrics, then the health checks."""
    rec, fast, sparsity, model = results["reconstruction"], results["fast_token_mse"], results["sparsity"], results.get("model") or {}
    fast_special = results["fast_token_mse_special"]

    def number(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| metric | all tokens | content | special |",
        "|---|---|---|---|",
        *(
            f"| {label} | " + " | ".join(number(rec[kind].get(key)) for kind in ("all", "content", "special")) + " |"
            for label, key in (("MSE", "mse"), ("FVU", "fvu"), ("explained variance", "explained_variance"), ("cosine(x, x̂)", "cosine"))
        ),
        "",
        "| metric | value |",
        "|---|---|",
        f"| FAST token MSE, raw / log2 | {number(fast['raw'])} / {number(fast['log2'])} |",
        f"| FAST MSE_st (special tokens), raw / log2 | {number(fast_special['raw'])} / {number(fast_special['log2'])} |",
        f"| L0 (mean; p10 / p50 / p90) | {sparsity['l0_mean']:.2f}; " + " / ".join(f"{v:.0f}" for v in sparsity["l0_percentiles"].values()) + " |",
        f"| L1 (mean) | {sparsity['l1_mean']:.3f} |",
        f"| dead / dense features | {sparsity['dead_fraction']:.1%} / {sparsity['dense_fraction']:.1%} |",
        f"| decoder rows' max cosine to another row (mean / p90 / max) | {results['decoder_max_cosine']['mean']:.3f} / {results['decoder_max_cosine']['p90']:.3f} / {results['decoder_max_cosine']['max']:.3f} |",
    ]
    if model:
        lines += [
            f"| CE clean / with SAE / zero-ablated | {model['ce_clean']:.4f} / {model['ce_sae']:.4f} / {model['ce_zero_ablation']:.4f} |",
            f"| loss recovered | {model['loss_recovered']:.4f} |",
            f"| relative loss increase | {model['relative_loss_increase']:.4f} |",
            f"| KL(clean ‖ spliced) per token | {model['kl_divergence']:.4f} |",
        ]
    lines += ["", "| health check | value | threshold | verdict |", "|---|---|---|---|"]
    for row in results["health"]:
        threshold = f"{row['threshold'][0]:g}–{row['threshold'][1]:g}" if row["test"] == "between" else f"{row['test']} {row['threshold']:g}"
        lines.append(f"| {row['metric']} | {number(row['value'], 3)} | {threshold} | {row['verdict']} |")
    return "\n".join(lines)


def evaluate_sae(config: EvalConfig) -> dict[str, Any]:
    """Evaluate the checkpoint on its held-out examples; writes eval.json and feature_density.png beside it."""
    checkpoint = Path(config.checkpoint)
    loaded = load_sae(checkpoint)
    sae, metadata = loaded.sae, loaded.metadata
    training = metadata.get("training", {})
    store_path = config.store or metadata.get("store")
    if not store_path:
        raise UserError(f"{checkpoint} does not say which activation store it was trained on (a HypotheSAEs checkpoint?). Pass --store.")
    store = ActivationStore(store_path)
    if store.d != sae.spec.d:
        raise UserError(f"the checkpoint's SAE takes d={sae.spec.d} but the store at {store.folder} has d={store.d}: they come from different models or hooks. Pass the matching --store.")
    fraction = config.validation_fraction if config.validation_fraction >= 0 else training.get("validation_fraction", 0.1)
    seed = config.seed if config.seed >= 0 else training.get("seed", 0)
    include_special = bool(training.get("include_special_tokens", False))
    examples = validation_examples(store.n_examples, fraction, seed, config.max_examples)
    logger.info("Evaluating %s on %d held-out examples of %s", checkpoint.name, len(examples), store.folder)
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "store": str(store.folder), "hook_name": store.hook_name, "examples": len(examples), "settings": asdict(config)}
    results.update(store_metrics(store, examples, sae, include_special))
    results["decoder_max_cosine"] = decoder_max_cosine(sae)
    if config.model_metrics and store.manifest.get("hook_point") == LORA_HOOK_POINT:
        results["model_metrics_skipped"] = (
            "a LoRA store concatenates the adapter's bottlenecks across all its layers, so there is no single hook to splice "
            "the reconstruction into: loss recovered, relative loss increase and KL do not apply"
        )
        logger.info("Model metrics skipped: %s. The store metrics above still apply.", results["model_metrics_skipped"])
    elif config.model_metrics:
        model_name = config.model_name or store.manifest.get("model_name")
        if not model_name:
            raise UserError(f"the store at {store.folder} does not name its model. Pass --model-name, or --model-metrics false.")
        device = resolve_device(config.device)
        model = load_model(resolve_model(model_name), torch.float32 if device == "cpu" else torch.bfloat16, device)
        sae_on_device = sae.to(device)
        results["model"] = model_metrics(model, store, examples, lambda x: sae_on_device(x), include_special, config.batch_tokens)
    headline = {**results["sparsity"], **(results.get("model") or {})}
    results["health"] = health_table(headline)
    density = results.pop("feature_density")
    plot_feature_density(checkpoint.parent / "feature_density.png", density, f"{sae.spec.name} — {store.hook_name}")
    (checkpoint.parent / "eval.json").write_text(json.dumps({**results, "feature_density": density}, indent=2))
    print("\n" + report_table(results))
    return results
