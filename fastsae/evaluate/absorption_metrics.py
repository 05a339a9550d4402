"""Feature absorption's arithmetic, on tensors: the letter probes, k-sparse probing and the absorption of each word.

Read off sae-bench 0.6.0 (`evals/absorption/`: `probing.py`, `k_sparse_probing.py`, `feature_absorption_calculator.py`,
`main.py`), the code of Chanin et al., "A is for Absorption". Nothing here runs a model, so a test can plant absorption
in made-up activations and read it back.

1. **Letter probes** (`train_probes`): 26 one-vs-rest logistic probes, trained together as SAEBench's
   `train_multi_probe` trains them (Adam, BCE with each letter's positives weighted by negatives/positives, the
   learning rate decaying exponentially to `end_lr`, shuffled mini-batches). A letter's probe predicts it when its
   logit is > 0; its F1 on held-out words (`f1_probe`) says whether the model knows that letter at this hook.
2. **k-sparse probing** (`k_sparse_probes`, `main_latents`): an L1-penalised probe of the same kind on the SAE's
   latents ranks them per letter; for k = 1..max_k the k top-weighted latents get a logistic regression
   (scikit-learn's, as SAEBench's). The letter's **main latents** are those of the largest k reached while each
   step raises the held-out F1 by more than `f1_jump_threshold` over the previous best: more than one is
   *feature splitting*.
3. **Absorption of a word** (`word_absorption`), on the letter's probe direction p (unit norm), the word's
   activation x and its latents a_j with decoder directions d_j:
   - each latent's probe projection a_j·cos(p, d_j), the word's probe projection x·p;
   - **full absorption**: no main latent fires, and the latent with the largest projection has cos(p, d_j) ≥ 0.025
     and carries at least 40% of x·p (which must be ≥ 0);
   - **absorption fraction**: the share of the probe projection that up to 3 other latents with cos ≥ 0.1 carry
     instead of the main latents (0 when the main latents carry all of x·p, or the others less than 40% of it).
4. **Per letter**, over the held-out words of that letter that the probe gets right (its true positives):
   `full_absorption_rate` = full absorptions / true positives, `mean_absorption_fraction` = Σ fractions / true
   positives; SAEBench's means are over the letters whose probe F1 is above `min_GT_probe_f1`.

SAEBench reads a latent's activation as the length of its contribution along d_j, which holds when decoder rows
have unit norm (its loader folds the norms into the encoder). Our checkpoints keep the activation scale in the
decoder, so `latent_activations` multiplies each latent by its decoder row's norm: the same SAE, unit-norm rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fastsae.core.sae import SparseAutoencoder

N_LETTERS = 26
ENCODE_BATCH = 4096  # rows per SAE encoding outside training (SAEBench's k_sparse_probe_batch_size)
# SAEBench's fixed thresholds (evals/absorption/feature_absorption.py and FeatureAbsorptionCalculator).
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS = 3
INACTIVE = 1e-8  # a main latent below this has not fired


@dataclass(frozen=True)
class ProbeTraining:
    """How SAEBench's `train_multi_probe` is called: epochs, batch size, learning rate and its end, L2 and L1 weights."""

    epochs: int
    batch_size: int
    lr: float
    end_lr: float
    weight_decay: float
    l1_decay: float = 0.0


# The letter probes: `train_and_save_probes` (batch 64, 50 epochs, lr 1e-2) and `train_linear_probe_for_task` (weight decay 1e-4).
LETTER_PROBE_TRAINING = ProbeTraining(epochs=50, batch_size=64, lr=1e-2, end_lr=1e-5, weight_decay=1e-4)


@dataclass(frozen=True)
class LinearProbes:
    """One logistic probe per row: logits = x · weight.T + bias."""

    weight: torch.Tensor  # (probes, dim)
    bias: torch.Tensor  # (probes,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight), self.weight, self.bias)


def one_hot_letters(letters: torch.Tensor) -> torch.Tensor:
    return F.one_hot(letters.long(), N_LETTERS)


def train_probes(
    x: torch.Tensor,
    targets: torch.Tensor,
    training: ProbeTraining,
    device: str,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dim: int | None = None,
    desc: str = "probe",
) -> LinearProbes:
    """SAEBench's `train_multi_probe` on (n, d) inputs and (n, probes) 0/1 targets; `encode` maps each batch first.

    Uses torch's global random generator as SAEBench does (the probe's initialisation, then each epoch's shuffle),
    so the caller seeds it. A probe without positives gets weight 1 on its (absent) positives instead of SAEBench's
    division by zero.
    """
    positives = targets.sum(0)
    pos_weight = torch.where(
        positives > 0, (len(targets) - positives) / positives.clamp_min(1), torch.ones_like(positives, dtype=torch.float)
    )
    loader = DataLoader(TensorDataset(x, targets.to(x.dtype)), batch_size=training.batch_size, shuffle=True)
    probe = nn.Linear(dim or x.shape[1], targets.shape[1]).to(device, dtype=x.dtype)
    optimizer = torch.optim.Adam(probe.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    gamma = math.exp(math.log(training.end_lr / training.lr) / training.epochs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    loss_function = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(device))
    with torch.enable_grad():
        for _ in tqdm(range(training.epochs), desc=desc, unit="epoch", leave=False):
            for batch_x, batch_targets in loader:
                if encode is not None:
                    batch_x = encode(batch_x)
                optimizer.zero_grad()
                loss = loss_function(probe(batch_x.to(device)), batch_targets.to(device))
                if training.l1_decay:
                    loss += training.l1_decay * probe.weight.abs().sum(dim=-1).mean()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return LinearProbes(probe.weight.detach().float().cpu(), probe.bias.detach().float().cpu())


def f1_score(truth: torch.Tensor, predicted: torch.Tensor) -> float:
    """Binary F1 as scikit-learn computes it, 0 when there is nothing to find and nothing found."""
    true_positives = int((truth & predicted).sum())
    denominator = int(truth.sum()) + int(predicted.sum())
    return 2 * true_positives / denominator if denominator else 0.0


def precision_recall(truth: torch.Tensor, predicted: torch.Tensor) -> tuple[float, float]:
    true_positives = int((truth & predicted).sum())
    return true_positives / max(int(predicted.sum()), 1), true_positives / max(int(truth.sum()), 1)


@torch.no_grad()
def latent_activations(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """(n, M) latents of raw activations, each times its decoder row's norm (see the module docstring), in ENCODE_BATCH rows."""
    parameter = sae.W_dec
    norms = parameter.norm(dim=1).clamp_min(1e-8)
    chunks = [sae.encode(chunk.to(parameter.device, parameter.dtype)) * norms for chunk in x.split(ENCODE_BATCH)]
    return torch.cat(chunks) if chunks else x.new_zeros(0, sae.spec.m)


@dataclass(frozen=True)
class KSparseProbe:
    """A logistic regression on k latents: score = a[feature_ids] · weight + bias, the letter predicted when > 0."""

    feature_ids: list[int]
    weight: torch.Tensor  # (k,)
    bias: float

    def scores(self, latents: torch.Tensor) -> torch.Tensor:
        return latents[:, self.feature_ids].float() @ self.weight + self.bias


def k_sparse_probes(l1_probe: LinearProbes, latents: torch.Tensor, letters: torch.Tensor, max_k: int) -> dict[int, list[KSparseProbe]]:
    """Per letter present in `letters`, the k-sparse probes for k = 1..max_k (SAEBench's `train_k_sparse_probes`)."""
    probes: dict[int, list[KSparseProbe]] = {}
    features = latents.float().numpy()
    labels = letters.numpy()
    present = sorted(set(labels.tolist()))
    with tqdm(total=len(present) * max_k, desc="k-sparse probes", leave=False) as progress:
        for letter in present:
            probes[letter] = []
            for k in range(1, max_k + 1):
                # The largest weights, not the largest |weights|: latents that predict the letter, not its absence.
                feature_ids = l1_probe.weight[letter].topk(k).indices.tolist()
                fitted = LogisticRegression(max_iter=500, class_weight="balanced").fit(
                    features[:, feature_ids], (labels == letter).astype(np.int64)
                )
                probes[letter].append(KSparseProbe(feature_ids, torch.tensor(fitted.coef_[0]).float(), float(fitted.intercept_[0])))
                progress.update(1)
    return probes


def main_latents(
    probes: list[KSparseProbe], latents: torch.Tensor, truth: torch.Tensor, f1_jump_threshold: float
) -> tuple[list[int], list[float]]:
    """A letter's main latents (SAEBench's `add_feature_splits_to_metrics_df`) and the held-out F1 of each k."""
    f1s = [f1_score(truth, probe.scores(latents) > 0) for probe in probes]
    best, chosen = -math.inf, []
    for probe, f1 in zip(probes, f1s):
        if f1 <= best + f1_jump_threshold:
            break
        best, chosen = f1, probe.feature_ids
    return chosen, f1s


@dataclass(frozen=True)
class WordAbsorption:
    """Per word: the absorption fraction and whether it is a full absorption."""

    fraction: torch.Tensor  # (n,) float64 in [0, 1]
    full: torch.Tensor  # (n,) bool


def word_absorption(
    activations: torch.Tensor, latents: torch.Tensor, decoder: torch.Tensor, probe_direction: torch.Tensor, main_feature_ids: list[int]
) -> WordAbsorption:
    """SAEBench's `FeatureAbsorptionCalculator.calculate_absorption` for n words of one letter (see the module docstring).

    activations (n, d) at the hook; latents (n, M) from `latent_activations`; decoder (M, d) rows in any norm.
    """
    direction = probe_direction.float() / probe_direction.float().norm()
    cosines = F.cosine_similarity(direction[None, :], decoder.float(), dim=-1)  # (M,)
    projections = latents.float() * cosines  # each latent's probe projection
    word_projection = (activations.float() @ direction).double()
    main_projection = projections[:, main_feature_ids].sum(1).double()
    not_main = torch.ones(len(cosines), dtype=torch.bool)
    not_main[main_feature_ids] = False

    # Absorption fraction: what up to 3 other probe-aligned latents carry, capped by what the main latents leave.
    candidates = (not_main & (cosines >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD))[None, :] & (projections > 0)
    ranked = torch.where(candidates, projections, torch.zeros_like(projections))
    absorbing = ranked.topk(min(ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS, ranked.shape[1]), dim=1).values.sum(1).double()
    absorbed = torch.minimum(absorbing, word_projection - main_projection)
    fraction = torch.where(main_projection <= 0, torch.ones_like(absorbed), (absorbed / (absorbed + main_projection)).clamp(0, 1))
    no_absorption = (main_projection >= word_projection) | (absorbing / word_projection < ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD)
    fraction = torch.where(no_absorption, torch.zeros_like(fraction), fraction)

    # Full absorption: the main latents are silent and one latent carries the probe direction instead.
    top = projections.argmax(1)
    top_projection = latents[torch.arange(len(top)), top].double() * cosines[top].double()
    full = (
        (latents[:, main_feature_ids] < INACTIVE).all(1)
        & (cosines[top] >= FULL_ABSORPTION_PROBE_COS_THRESHOLD)
        & (word_projection >= 0)
        & (top_projection / word_projection >= ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD)
    )
    return WordAbsorption(fraction, full)


@dataclass(frozen=True)
class LetterAbsorption:
    """One letter's row of SAEBench's `eval_result_details`."""

    first_letter: str
    mean_absorption_fraction: float
    full_absorption_rate: float
    num_full_absorption: int
    num_probe_true_positives: int
    num_split_features: int


def letter_absorption(first_letter: str, absorption: WordAbsorption, num_split_features: int) -> LetterAbsorption:
    """SAEBench's `_aggregate_results_df` for one letter; `absorption` covers the letter's probe true positives."""
    true_positives = len(absorption.fraction)
    full = int(absorption.full.sum())
    return LetterAbsorption(
        first_letter=first_letter,
        mean_absorption_fraction=float(absorption.fraction.sum()) / true_positives,
        full_absorption_rate=full / true_positives,
        num_full_absorption=full,
        num_probe_true_positives=true_positives,
        num_split_features=num_split_features,
    )


def mean_metrics(letters: list[LetterAbsorption]) -> dict[str, float]:
    """SAEBench's `AbsorptionMeanMetrics` over the letters given (means and sample standard deviations)."""
    columns = {
        "absorption_fraction_score": [letter.mean_absorption_fraction for letter in letters],
        "full_absorption_score": [letter.full_absorption_rate for letter in letters],
        "num_split_features": [float(letter.num_split_features) for letter in letters],
    }
    means = {f"mean_{name}": float(np.mean(values)) for name, values in columns.items()}
    deviations = {f"std_dev_{name}": float(np.std(values, ddof=1)) for name, values in columns.items()}
    return means | deviations
