"""SAEBench's core metrics, computed as sae-bench 0.6.0 computes them, written in its output format.

Read off `sae_bench/evals/core/main.py` (`get_recons_loss`, `get_downstream_reconstruction_metrics`,
`get_sparsity_and_variance_metrics`, `get_featurewise_weight_based_metrics`, `calculate_misc_metrics`)
and `eval_output.py`. Every metric skips the positions whose *input* token is BOS, EOS or padding
(SAEBench's `ignore_tokens`); the SAE replaces the hook's output and zero-ablation zeros it at every
position, template tokens included (its default `exclude_special_tokens_from_reconstruction=False`).
One difference of setting, not of definition: SAEBench packs 128-token contexts, where our examples are
each their own sequence, so a next-token prediction never crosses an example's end here.

Some of SAEBench's numbers depend on how tokens are grouped into batches: `mse` divides each token's
squared error by the batch's token count, `relative_reconstruction_bias` is a ratio per batch, and
`explained_variance` averages per-batch means (its formula is close to an uncentred R²). A batch here
is `batch_size_prompts` examples (SAEBench's default 16), so the same batches give the same numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastsae.core.sae import SparseAutoencoder

SAEBENCH_VERSION = "0.6.0"
BATCH_SIZE_PROMPTS = 16  # CoreEvalConfig.batch_size_prompts
# SAEBench's default: n_eval_reconstruction_batches (10) × batch_size_prompts (16) × context_size (128).
DEFAULT_TOKEN_BUDGET = 20_480
INTERVAL_RESAMPLES = 1000  # bootstrap resamples (over examples) for the 95% intervals
FLOAT_PRECISION = 10  # SAEBench rounds per-feature metrics to 10 decimals


def ignored_token_ids(tokenizer) -> set[int]:
    """SAEBench's `ignore_tokens`: the tokenizer's pad, EOS and BOS ids."""
    return {token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if token is not None}


class SparsityVarianceSums:
    """`get_sparsity_and_variance_metrics`, fed one batch at a time (only the non-ignored tokens)."""

    PER_TOKEN = ("l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1", "explained_variance_legacy", "mse", "cossim")

    def __init__(self, m: int) -> None:
        self.per_token: dict[str, list[torch.Tensor]] = {name: [] for name in self.PER_TOKEN}
        self.relative_reconstruction_bias: list[float] = []
        self.mean_sum_of_squares: list[float] = []
        self.mean_square_per_element: list[float] = []  # SAEBench's `mean_act_per_dimension`, averaged
        self.mean_sum_of_residual_squares: list[float] = []
        self.fire_counts = torch.zeros(m, dtype=torch.float64)
        self.prompts_fired = torch.zeros(m, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor, prompt_of_token: torch.Tensor) -> None:
        """x, x_hat (N, d) and codes (N, M) at the batch's counted tokens; `prompt_of_token` (N,) their row in the batch."""
        x, x_hat, codes = x.float(), x_hat.float(), codes.float()
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        safe_norm_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        residual_squares = (x - x_hat).pow(2).sum(-1)
        centred_squares = (x - x.mean(0)).pow(2).sum(-1)
        values = {
            "l2_norm_in": norm_in,
            "l2_norm_out": norm_out,
            "l2_ratio": norm_out / safe_norm_in,
            "l0": (codes != 0).sum(-1).float(),
            "l1": codes.sum(-1),
            "explained_variance_legacy": 1 - residual_squares / centred_squares,
            "mse": residual_squares / len(x),
            "cossim": (x / norm_in[:, None] * (x_hat / norm_out[:, None])).sum(-1),
        }
        for name, value in values.items():
            self.per_token[name].append(value.cpu())
        self.relative_reconstruction_bias.append(float(norm_out.pow(2).mean() / (x * x_hat).sum(-1).mean()))
        self.mean_sum_of_squares.append(float(x.pow(2).sum(-1).mean()))
        self.mean_square_per_element.append(float(x.pow(2).mean()))
        self.mean_sum_of_residual_squares.append(float(residual_squares.mean()))
        active = (codes > 0).double().cpu()
        self.fire_counts += active.sum(0)
        per_prompt = torch.zeros(int(prompt_of_token.max()) + 1, codes.shape[1], dtype=torch.float64).index_add_(
            0, prompt_of_token.cpu(), active
        )
        self.prompts_fired += (per_prompt > 0).sum(0)
        self.tokens += len(x)

    def metrics(self) -> dict[str, dict[str, float]]:
        mean = {name: float(torch.cat(values).double().mean()) for name, values in self.per_token.items()}
        total_variance = np.mean(self.mean_sum_of_squares) - np.mean(self.mean_square_per_element) ** 2
        return {
            "reconstruction_quality": {
                "explained_variance": float(1 - np.mean(self.mean_sum_of_residual_squares) / total_variance),
                "explained_variance_legacy": mean["explained_variance_legacy"],
                "mse": mean["mse"],
                "cossim": mean["cossim"],
            },
            "shrinkage": {
                "l2_norm_in": mean["l2_norm_in"],
                "l2_norm_out": mean["l2_norm_out"],
                "l2_ratio": mean["l2_ratio"],
                "relative_reconstruction_bias": float(np.mean(self.relative_reconstruction_bias)),
            },
            "sparsity": {"l0": mean["l0"], "l1": mean["l1"]},
        }

    def feature_metrics(self) -> dict[str, list[float]]:
        return {
            "feature_density": (self.fire_counts / self.tokens).tolist(),
            "consistent_activation_heuristic": (self.fire_counts / self.prompts_fired).tolist(),  # 0/0 is NaN, as in SAEBench
        }


class LossSums:
    """Per-example sums of the cross-entropies and KL divergences: their means, scores and bootstrap intervals."""

    CE = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")
    KL = ("kl_div_with_sae", "kl_div_with_ablation")

    def __init__(self) -> None:
        self.rows: list[list[float]] = []  # per example: the five sums, then the CE and KL position counts

    def add_example(self, ce: dict[str, torch.Tensor], kl: dict[str, torch.Tensor]) -> None:
        """Per-position values of one example at its counted positions (CE: next-token predictions; KL: positions)."""
        row = [float(ce[name].double().sum()) for name in self.CE] + [float(kl[name].double().sum()) for name in self.KL]
        self.rows.append(row + [len(ce[self.CE[0]]), len(kl[self.KL[0]])])

    @staticmethod
    def _scores(sums: np.ndarray) -> dict[str, np.ndarray]:
        """Means and scores from column sums; works on one row or on many (bootstrap resamples)."""
        ce_count, kl_count = sums[..., 5], sums[..., 6]
        means = {name: sums[..., i] / ce_count for i, name in enumerate(LossSums.CE)}
        means |= {name: sums[..., 3 + i] / kl_count for i, name in enumerate(LossSums.KL)}
        with np.errstate(divide="ignore", invalid="ignore"):
            means["ce_loss_score"] = (means["ce_loss_with_ablation"] - means["ce_loss_with_sae"]) / (
                means["ce_loss_with_ablation"] - means["ce_loss_without_sae"]
            )
            means["kl_div_score"] = (means["kl_div_with_ablation"] - means["kl_div_with_sae"]) / means["kl_div_with_ablation"]
        return means

    @property
    def next_token_predictions(self) -> int:
        """How many cross-entropy positions were counted (0: nothing to score)."""
        return int(sum(row[5] for row in self.rows))

    def metrics(self) -> dict[str, dict[str, float]]:
        means = self._scores(np.asarray(self.rows).sum(0))
        return {
            "model_behavior_preservation": {
                name: float(means[name]) for name in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")
            },
            "model_performance_preservation": {
                name: float(means[name]) for name in ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae")
            },
        }

    def intervals(self, resamples: int = INTERVAL_RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
        """95% percentile-bootstrap intervals, resampling whole examples (tokens of one example are not independent)."""
        table = np.asarray(self.rows)
        weights = np.random.default_rng(seed).multinomial(len(table), np.full(len(table), 1 / len(table)), size=resamples)
        resampled = self._scores(weights @ table)
        return {name: [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))] for name, values in resampled.items()}


def max_cosine_to_another(directions: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each row's largest cosine similarity to any other row (M × M never whole)."""
    unit = F.normalize(directions.float(), dim=1)
    maxima = []
    for start in range(0, len(unit), chunk):
        similarity = unit[start : start + chunk] @ unit.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = float("-inf")
        maxima.append(similarity.max(1).values)
    return torch.cat(maxima)


@torch.no_grad()
def weight_metrics(sae: SparseAutoencoder) -> dict[str, list[float]]:
    """`get_featurewise_weight_based_metrics`: per feature, from the weights alone (raw-activation space)."""
    encoder, decoder = sae.W_enc.detach().float().cpu(), sae.W_dec.detach().float().cpu()
    return {
        "encoder_bias": sae.b_enc.detach().float().cpu().tolist(),
        "encoder_norm": encoder.norm(dim=1).tolist(),
        "encoder_decoder_cosine_sim": F.cosine_similarity(encoder, decoder, dim=1).tolist(),
        "max_encoder_cosine_sim": max_cosine_to_another(encoder).tolist(),
        "max_decoder_cosine_sim": max_cosine_to_another(decoder).tolist(),
    }


def misc_metrics(feature_metrics: dict[str, list[float]]) -> dict[str, float]:
    """`calculate_misc_metrics`: shares of dense features and the mean maximum cosine similarities."""
    density = np.asarray(feature_metrics["feature_density"], dtype=np.float64)
    total = density.sum()

    def share_of_firing(threshold: float) -> float:
        return float(density[density > threshold].sum() / total) if total > 0 else 0.0

    return {
        "freq_over_1_percent": float((density > 0.01).mean()),
        "freq_over_10_percent": float((density > 0.1).mean()),
        "normalized_freq_over_1_percent": share_of_firing(0.01),
        "normalized_freq_over_10_percent": share_of_firing(0.1),
        "average_max_encoder_cosine_sim": float(np.mean(feature_metrics["max_encoder_cosine_sim"])),
        "average_max_decoder_cosine_sim": float(np.mean(feature_metrics["max_decoder_cosine_sim"])),
        "frac_alive": float((density > 0).mean()),
    }


def _without_nan(value: Any) -> Any:
    """SAEBench writes every NaN (e.g. a dead feature's consistent_activation_heuristic) as -1."""
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return -1 if isinstance(value, float) and math.isnan(value) else value


def core_output(
    losses: LossSums,
    sparsity_variance: SparsityVarianceSums,
    sae: SparseAutoencoder,
    eval_config: dict[str, Any],
    tokens: int,
    sae_name: str,
    sae_cfg: dict[str, Any],
    version: str,
) -> dict[str, Any]:
    """The block in SAEBench's `CoreEvalOutput` format (validates against its `eval_output_schema_core.json`)."""
    feature_metrics = sparsity_variance.feature_metrics() | weight_metrics(sae)
    metrics = {
        **losses.metrics(),
        **sparsity_variance.metrics(),
        "token_stats": {
            "total_tokens_eval_reconstruction": tokens,
            "total_tokens_eval_sparsity_variance": tokens,
        },  # every token the model read
        "misc_metrics": misc_metrics(feature_metrics),
    }
    names = list(feature_metrics)
    details = [
        {"index": index, **{name: round(feature_metrics[name][index], FLOAT_PRECISION) for name in names}} for index in range(sae.spec.m)
    ]
    block = {
        "eval_type_id": "core",
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"computed by fastsae {version} with the definitions of sae-bench {SAEBENCH_VERSION}",
        "sae_lens_id": sae_name,
        "sae_lens_release_id": "fastsae",
        "sae_lens_version": sae_cfg.get("metadata", {}).get("sae_lens_version", ""),
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": None,
    }
    return _without_nan(block)
