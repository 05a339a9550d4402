"""The sparse autoencoder: Top-K, BatchTopK, ReLU (L1) and JumpReLU, with Matryoshka prefixes and aux-K.

Weights are kept in the layout the fast paths want: `W_enc` and `W_dec` are
both (M, d), so feature m's encoder row and decoder row are each contiguous.
The checkpoint module translates to HypotheSAEs' and SAELens' layouts.

Where the code is sparse (Top-K and BatchTopK), only the encoder's forward
matmul is dense. Features are chosen without autograd; their values get a
gradient through `_SparseEncoderGradient`, whose backward touches only the
chosen rows of `W_enc`. On the CPU the decoder is an `embedding_bag` over the
active rows and nothing of size B × M is formed; on a GPU both become dense
products for the matrix units where M/K is small enough (`DENSE_KERNELS`). Under bfloat16 autocast on a CPU
only the encoder's matmul runs in bf16 (2.2× float32's rate with AVX512-BF16); the
gathers and the sparse gradient stay float32, as the CPU's bf16 versions of those
kernels are slower (benchmarks/RESULTS.md), and so do the weights, losses and Adam.

JumpReLU follows Rajamanoharan et al. (2024) and dictionary_learning, which train
on activations scaled to unit mean squared norm with a straight-through window
ε = 0.001 and thresholds starting at 0.001. The trainer scales to E‖x‖² = d
instead, so pre-activations are √d times larger and both lengths are multiplied
by √d here (ε = 0.024 for SmolLM2's d = 576, where a pre-activation's std
starts near 0.7; SAELens' 0.05 on raw activations comes to 0.009 there). A window of
0.001 in these units was √d too narrow: in a 1024-token batch most thresholds
had no pre-activation inside it, hence no gradient. The threshold path (the
comparison, the straight-through gradient and their batch sums) runs in float32
whatever the autocast dtype. Pre-activations still carry the bf16 matmul's
rounding, spacing θ/256 to θ/128 near θ, which this window exceeds for every
θ < 0.128·√d (about 4 stds at d = 576); the old window was narrower than the spacing
above θ = 0.25, and a threshold between two bf16 values got no gradient at all.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastsae.common.errors import UserError

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
SPARSE_ARCHITECTURES = ("topk", "batchtopk")
BATCHTOPK_THRESHOLD_RATE = 1e-2  # EMA rate of the inference threshold, as in HypotheSAEs
# Both in the references' units (activations at unit mean squared norm); the SAE multiplies them by √d.
JUMPRELU_BANDWIDTH = 1e-3  # width ε of the straight-through rectangle around each threshold
JUMPRELU_INITIAL_THRESHOLD = 1e-3  # near zero: the L0 penalty, not the start, decides where thresholds settle


@dataclass(frozen=True)
class SAESpec:
    """What one SAE is: its architecture and sizes. Everything in it is plain Python (checkpoint-safe)."""

    architecture: str
    d: int
    m: int
    k: int
    prefixes: tuple[int, ...] = ()  # Matryoshka prefix lengths, ending at m; empty for none
    aux_k: int = 0  # dead features used for the auxiliary loss; 0 turns it off

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}.")
        if self.m <= 0 or self.d <= 0:
            raise UserError(f"M and d must be positive; got M={self.m}, d={self.d}.")
        if self.architecture in SPARSE_ARCHITECTURES and not 0 < self.k <= self.m:
            raise UserError(f"K must be between 1 and M for {self.architecture}; got K={self.k}, M={self.m}. Lower K or raise M.")
        if self.prefixes:
            increasing = all(later > earlier for earlier, later in zip(self.prefixes, self.prefixes[1:]))
            if not increasing or self.prefixes[-1] != self.m or self.prefixes[0] <= 0:
                raise UserError(
                    f"Matryoshka prefixes (MATRYOSHKA_PREFIXES, or a SWEEP entry's last part) must increase and end at M={self.m}; "
                    f"got {list(self.prefixes)}. Example: [64, 256] for M=256."
                )

    @property
    def is_sparse(self) -> bool:
        return self.architecture in SPARSE_ARCHITECTURES

    @property
    def runs_in_hypothesaes(self) -> bool:
        """Whether HypotheSAEs' `load_model` computes this SAE's features: its Top-K and BatchTopK (with Matryoshka prefixes) only."""
        return self.architecture in SPARSE_ARCHITECTURES

    @property
    def name(self) -> str:
        """HypotheSAEs' checkpoint name for Top-K; the others carry their architecture in front (BatchTopK too: beside a Top-K SAE of its M and K)."""
        prefix = "" if self.architecture == "topk" else f"{self.architecture}_"
        if self.prefixes:
            return f"SAE_{prefix}matryoshka_M={self.m}_K={self.k}_prefixes={'-'.join(map(str, self.prefixes))}"
        return f"SAE_{prefix}M={self.m}_K={self.k}"


class SparseCode(NamedTuple):
    """Active features of each token: `values[b, j]` is the activation of feature `indices[b, j]` (0 where inactive)."""

    values: torch.Tensor  # (B, k)
    indices: torch.Tensor  # (B, k) int64


class StepOutput(NamedTuple):
    """What one training forward gives the trainer; all tensors stay on the device (no host syncs)."""

    loss: torch.Tensor  # scalar to minimise
    fvu: torch.Tensor  # fraction of variance unexplained by the full reconstruction, this batch
    aux_loss: torch.Tensor  # aux-K term before its coefficient (0 when off)
    l0: torch.Tensor  # mean number of active features per token
    fire_counts: torch.Tensor  # (M,) tokens on which each feature fired


# On a GPU the matrix units can make a dense (B × M) product cheaper than gathering K rows of d per
# token, which is memory-bound: the product costs ∝ M, the gathers ∝ K. benchmarks/bench_gpu.py at
# d=4096, batch 16384 on an H200 (RESULTS.md): dense 1.3× and 2.0× faster at M/K = 512 and 256; the
# gathers 1.1–1.8× faster at M/K = 1024 to 4096. On a CPU the gathers always win.
# None: decide by device and M/K; tests force either path.
DENSE_KERNELS: bool | None = None
DENSE_MAX_FEATURES_PER_ACTIVE = 512  # on a GPU, dense products up to this M/K (bench_gpu.py on an H200)


def _dense_kernels(tensor: torch.Tensor, n_features: int, n_active: int) -> bool:
    if DENSE_KERNELS is not None:
        return DENSE_KERNELS
    return tensor.is_cuda and n_features <= DENSE_MAX_FEATURES_PER_ACTIVE * n_active


class _SparseEncoderGradient(torch.autograd.Function):
    """Identity on `selected` (pre-activations at chosen features); backward reaches only those rows.

    For pre = centered @ W_enc.T + b_enc gathered at `indices`, the gradient wrt
    W_enc is nonzero only in the chosen rows: S @ centered for the sparse (M, B)
    matrix S holding grad[b, j] at (idx[b, j], b). On the CPU that is a sparse
    (CSR) matmul of B·K·d work; on a GPU S is made dense for the matrix units. When the
    input itself needs no gradient (training data), only b_dec does, through the
    batch sum of the input gradient: Σ_b Σ_j grad[b, j]·W_enc[idx[b, j]] = grad_b_enc @ W_enc,
    one vector-matrix product instead of B·K gathered rows.
    """

    @staticmethod
    def forward(ctx, selected, centered, weight, bias, indices, input_needs_grad: bool):
        ctx.save_for_backward(centered, weight, indices)
        ctx.input_needs_grad = input_needs_grad
        ctx.autocast = torch.is_autocast_enabled(centered.device.type), torch.get_autocast_dtype(centered.device.type)
        return selected.clone()

    @staticmethod
    def backward(ctx, grad):
        centered, weight, indices = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        n_tokens, n_features = indices.shape[0], weight.shape[0]
        grad_bias = torch.zeros(n_features, dtype=weight.dtype, device=weight.device).index_add_(0, indices.flatten(), grad.flatten())
        if _dense_kernels(centered, n_features, indices.shape[1]):
            grad_pre = torch.zeros(n_tokens, n_features, dtype=weight.dtype, device=weight.device).scatter_add_(1, indices, grad)
            enabled, dtype = ctx.autocast
            with torch.autocast(centered.device.type, dtype=dtype, enabled=enabled):
                grad_weight = (grad_pre.T @ centered).to(weight.dtype)
        else:
            grad_weight = feature_rows(indices, grad, n_features) @ centered.to(weight.dtype)
        if ctx.input_needs_grad:
            grad_centered = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum").to(centered.dtype)
        else:  # every row gets the batch mean: the sum that reaches b_dec is exact, and nothing else reads the rows
            grad_centered = ((grad_bias @ weight) / n_tokens).to(centered.dtype).expand_as(centered)
        return None, grad_centered, grad_weight, grad_bias, None, None


def feature_rows(indices: torch.Tensor, values: torch.Tensor, n_features: int) -> torch.Tensor:
    """The sparse (M, B) matrix holding values[b, j] at (indices[b, j], b), in CSR form (rows sorted by feature).

    Its product with a (B, d) matrix runs in parallel over features, where PyTorch's COO product runs on
    one thread and zero-fills its result twice: 2.9 against 3.9 ms at B=1024, K=32, M=4608, d=576 on 2 cores.
    """
    flat = indices.flatten()
    order = flat.argsort()
    row_ends = torch.bincount(flat, minlength=n_features).cumsum(0)
    row_starts = torch.cat([row_ends.new_zeros(1), row_ends])
    tokens = order // indices.shape[1]
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": its product with a dense matrix is all we use
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(row_starts, tokens, values.flatten()[order], (n_features, len(indices)), check_invariants=False)


class _JumpReLU(torch.autograd.Function):
    """x · 1[x > θ]; the threshold's gradient uses a rectangle kernel of width ε (Rajamanoharan et al., 2024).

    Autocast leaves these elementwise ops alone, so float32 inputs keep the whole path, backward
    included, in float32 (`torch.amp.custom_fwd` would do the same but is tied to one device type).
    """

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * near * grad
        return grad * (pre > threshold), grad_threshold.sum(0), None


class _Step(torch.autograd.Function):
    """1[x > θ], for the L0 penalty; gradient only to the threshold, through the same rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum(0), None


def fraction_of_variance_unexplained(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (HypotheSAEs' normalised MSE)."""
    error = (reconstruction.float() - target.float()).pow(2).sum()
    variance = (target.float() - target.float().mean(0)).pow(2).sum()
    return error / variance.clamp_min(1e-12)


class SparseAutoencoder(nn.Module):
    """An SAE on inputs scaled to E‖x‖² = d, as the trainer feeds it (a loaded checkpoint has the scale folded in).

    `jumprelu_initial_threshold` and `jumprelu_bandwidth` are given in the JumpReLU paper's units
    (activations at unit mean squared norm) and stored √d times larger, in the units of the input.
    """

    def __init__(
        self, spec: SAESpec, jumprelu_initial_threshold: float = JUMPRELU_INITIAL_THRESHOLD, jumprelu_bandwidth: float = JUMPRELU_BANDWIDTH
    ) -> None:
        super().__init__()
        self.spec = spec
        self.W_enc = nn.Parameter(torch.empty(spec.m, spec.d))
        self.b_enc = nn.Parameter(torch.zeros(spec.m))
        self.W_dec = nn.Parameter(torch.empty(spec.m, spec.d))
        self.b_dec = nn.Parameter(torch.zeros(spec.d))
        if spec.architecture == "jumprelu":
            # θ itself, not log θ (as dictionary_learning and SAELens ≥ 6): Adam then moves it by about the learning
            # rate per step, like b_enc, whereas log θ moved by a factor e^(learning rate × steps) at most, so in a
            # short run the thresholds stayed near their start whatever the L0 coefficient.
            self.jumprelu_threshold = nn.Parameter(torch.full((spec.m,), jumprelu_initial_threshold * math.sqrt(spec.d)))
            self.jumprelu_bandwidth = jumprelu_bandwidth * math.sqrt(spec.d)
        # BatchTopK's inference threshold: a running average of each batch's smallest chosen positive value, not learned by gradient.
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0))
        nn.init.xavier_uniform_(self.W_dec)
        self.enforce_constraints_()
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec)

    @classmethod
    @torch.no_grad()
    def from_weights(
        cls,
        spec: SAESpec,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> SparseAutoencoder:
        """An SAE in eval mode holding these weights as given (encoder and decoder both (M, d)).

        `threshold` is JumpReLU's per-feature threshold or BatchTopK's scalar one; nothing is renormalised,
        so a checkpoint or a converted peer SAE computes exactly what it computed before.
        """
        sae = cls(spec)
        for parameter, value in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
            parameter.copy_(value)
        if threshold is not None:
            (sae.jumprelu_threshold if spec.architecture == "jumprelu" else sae.threshold).copy_(threshold)
        return sae.eval()

    FINGERPRINT_ROWS = 64  # decoder rows hashed: random initialisations make them differ between any two SAEs

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A short hash of its shape and first decoder rows: tells one SAE from another of the same size (a sweep's K=8 and
        K=16 share M), so files written about one are not read for the other."""
        rows = self.W_dec[: self.FINGERPRINT_ROWS].detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(f"{self.spec.m}x{self.spec.d}".encode())
        digest.update(rows.numpy().tobytes())
        return digest.hexdigest()[:16]

    # --- initialisation and constraints -------------------------------------------------

    @torch.no_grad()
    def initialize_input_bias_(self, sample: torch.Tensor, statistic: str = "median") -> None:
        """Start b_dec at the data's centre: with a large mean offset, a zero bias (SAELens' start) kills most latents."""
        centres = {
            "median": lambda: sample.float().median(0).values,
            "mean": lambda: sample.float().mean(0),
            "zero": lambda: torch.zeros(self.spec.d),
        }
        self.b_dec.copy_(centres[statistic]())

    @torch.no_grad()
    def enforce_constraints_(self) -> None:
        """After each optimiser step: decoder rows back to unit norm, JumpReLU thresholds back to ≥ 0.

        A negative threshold would let negative pre-activations through (SAELens' JumpReLU, which applies a
        ReLU first, would then disagree with ours). Projecting, rather than clamping in the graph, keeps the
        gradient of a threshold that sits at 0.
        """
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        if self.spec.architecture == "jumprelu":
            self.jumprelu_threshold.clamp_(min=0)

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Keep the decoder's rows on the unit sphere: drop the gradient's component along each row.

        The subtraction runs in place (addcmul_), not through an (M, d) product: on a CPU each pass over a
        weight-sized tensor costs about a millisecond.
        """
        if self.W_dec.grad is not None:
            parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)
            self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1)

    # --- encoding -------------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def _threshold_input(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations in the thresholds' own precision (float32 master weights), even after a bf16 matmul."""
        return pre.to(self.jumprelu_threshold.dtype)

    def _jumprelu(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(self._threshold_input(pre), self.jumprelu_threshold, self.jumprelu_bandwidth)

    def _gathered(self, x: torch.Tensor, pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Pre-activations at `indices`, differentiable wrt the encoder through the sparse backward."""
        centered = x - self.b_dec
        return _SparseEncoderGradient.apply(pre.gather(1, indices), centered, self.W_enc, self.b_enc, indices, x.requires_grad)

    def _select_features(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which features each token uses (no gradient): (B, k) indices, and a (B, k) mask of those kept, if any are padding."""
        if self.spec.architecture == "topk":
            return pre.topk(self.spec.k, dim=1, sorted=False).indices, None
        if self.training:  # BatchTopK: the K·B largest activations of the whole batch
            chosen = pre.clamp_min(0).flatten().topk(min(self.spec.k * len(pre), pre.numel()), sorted=False)
            self._update_threshold_(chosen.values)
            # Exactly those K·B, placed by their indices as the references do: a comparison with the cutoff would also
            # keep every value tied with it, and bf16's coarse pre-activations tie often.
            candidates = torch.zeros_like(pre).flatten().scatter_(0, chosen.indices, chosen.values).view_as(pre)
            floor = 0.0
        else:  # at inference, the threshold learned in training keeps the expected sparsity
            candidates, floor = pre.clamp_min(0), self.threshold
        widest = max(int((candidates > floor).sum(1).max()), 1)  # one host sync per step: the code is padded to the busiest token
        top = candidates.topk(widest, dim=1, sorted=False)
        return top.indices, top.values > floor

    @torch.no_grad()
    def _update_threshold_(self, chosen: torch.Tensor) -> None:
        """Move the threshold towards the smallest positive value of the batch's chosen K·B, as HypotheSAEs, SAELens and
        dictionary_learning do: with fewer than K·B positive pre-activations the chosen include zeros, which are no
        cutoff, and a batch with none leaves the threshold alone. A plain mean of the first 1/rate such values, then
        HypotheSAEs' exponential average: no pull towards the initial 0. No host sync: a skipped batch is masked out.
        """
        smallest = torch.where(chosen > 0, chosen, torch.inf).min().to(self.threshold.dtype)
        found = smallest.isfinite()
        self.threshold_updates += found
        rate = torch.clamp(1.0 / self.threshold_updates.clamp_min(1), min=BATCHTOPK_THRESHOLD_RATE).to(self.threshold.dtype)
        self.threshold.copy_(torch.where(found, self.threshold.lerp(smallest, rate), self.threshold))

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """The active features of each token (Top-K, or BatchTopK)."""
        if not self.spec.is_sparse:
            raise ValueError("encode_sparse is for topk and batchtopk SAEs; use encode")
        with torch.no_grad():
            pre = self.pre_activations(x)
        indices, keep = self._select_features(pre)
        values = self._gathered(x, pre, indices).relu()
        return SparseCode(values if keep is None else values * keep, indices)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, M) feature activations, as used at inference."""
        if self.spec.is_sparse:
            code = self.encode_sparse(x)
            return torch.zeros(x.shape[0], self.spec.m, dtype=code.values.dtype, device=x.device).scatter_(1, code.indices, code.values)
        pre = self.pre_activations(x)
        if self.spec.architecture == "jumprelu":
            return self._jumprelu(pre)
        return pre.relu()

    # --- decoding -------------------------------------------------------------------------

    def decode_sparse(self, code: SparseCode, prefix: int | None = None) -> torch.Tensor:
        """x̂ = Σ_j values[j] · W_dec[indices[j]] + b_dec; `prefix` keeps features < prefix."""
        values = code.values if prefix is None else code.values * (code.indices < prefix)
        return self._decoder_sum(SparseCode(values, code.indices)) + self.b_dec

    def _decoder_sum(self, code: SparseCode) -> torch.Tensor:
        """Σ_j values[j] · W_dec[indices[j]]: gathered rows, or a dense product where that is faster (see DENSE_KERNELS)."""
        if _dense_kernels(code.values, self.spec.m, code.indices.shape[1]):
            dense = torch.zeros(len(code.values), self.spec.m, dtype=code.values.dtype, device=code.values.device)
            return dense.scatter(1, code.indices, code.values) @ self.W_dec
        return F.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values.to(self.W_dec.dtype), mode="sum")

    def decode(self, activations: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
        if prefix is not None:
            return activations[:, :prefix] @ self.W_dec[:prefix] + self.b_dec
        return activations @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂ of x."""
        if self.spec.is_sparse:
            return self.decode_sparse(self.encode_sparse(x))
        return self.decode(self.encode(x))

    # --- training -------------------------------------------------------------------------

    def training_step(
        self, x: torch.Tensor, dead_features: torch.Tensor | None, aux_coefficient: float, sparsity_coefficient: float
    ) -> StepOutput:
        """Loss and statistics for one batch. `dead_features` (M,) bool turns on aux-K for those features."""
        zero = x.new_zeros((), dtype=torch.float32)
        aux_code = None
        if self.spec.is_sparse:
            with torch.no_grad():  # the one dense matmul of the step, shared by the code and aux-K
                pre = self.pre_activations(x)
                indices, keep = self._select_features(pre)
                aux_indices = self._aux_candidates(pre, dead_features) if self.spec.aux_k and dead_features is not None else None
            # One sparse encoder gradient for the code and the aux-K candidates together.
            width = indices.shape[1]
            every = indices if aux_indices is None else torch.cat([indices, aux_indices], 1)
            values = self._gathered(x, pre, every).relu()
            code = SparseCode(values[:, :width] if keep is None else values[:, :width] * keep, indices)
            if aux_indices is not None:
                aux_code = SparseCode(values[:, width:], aux_indices)
            reconstruction = self.decode_sparse(code)
            active = code.values > 0
            fire_counts = torch.zeros(self.spec.m, device=x.device).index_add_(0, code.indices.flatten(), active.flatten().float())
            l0 = active.sum(1).float().mean()
            prefix_fvus = [fraction_of_variance_unexplained(self.decode_sparse(code, prefix), x) for prefix in self.spec.prefixes[:-1]]
            sparsity = zero
        else:
            pre = self.pre_activations(x)
            if self.spec.architecture == "jumprelu":
                activations = self._jumprelu(pre)
                sparsity = _Step.apply(self._threshold_input(pre), self.jumprelu_threshold, self.jumprelu_bandwidth).sum(1).mean()
            else:
                activations = pre.relu()
                sparsity = activations.sum(1).mean()
            reconstruction = self.decode(activations)
            active = activations > 0
            fire_counts = active.sum(0).float()
            l0 = active.sum(1).float().mean()
            prefix_fvus = [fraction_of_variance_unexplained(self.decode(activations, prefix), x) for prefix in self.spec.prefixes[:-1]]
        fvu = fraction_of_variance_unexplained(reconstruction, x)
        # Matryoshka: every prefix's reconstruction counts equally, the full one being the last prefix.
        main = torch.stack([*prefix_fvus, fvu]).mean()
        aux_loss = zero if aux_code is None else self._aux_loss(x, reconstruction, aux_code)
        loss = main + aux_coefficient * aux_loss + sparsity_coefficient * sparsity
        return StepOutput(loss, fvu.detach(), aux_loss.detach(), l0.detach(), fire_counts)

    def _aux_candidates(self, pre: torch.Tensor, dead_features: torch.Tensor) -> torch.Tensor | None:
        """Per token, the aux_k dead features with the largest pre-activations (None when none is dead)."""
        dead_ids = dead_features.nonzero().squeeze(1)
        if not len(dead_ids):  # all revived since the trainer last looked
            return None
        # Top-k among the dead columns only: far cheaper than a second top-k over all M when few are dead.
        chosen = pre.index_select(1, dead_ids).topk(min(self.spec.aux_k, len(dead_ids)), dim=1, sorted=False).indices
        return dead_ids[chosen]

    def _aux_loss(self, x: torch.Tensor, reconstruction: torch.Tensor, aux_code: SparseCode) -> torch.Tensor:
        """How well the top aux_k dead features predict what the live ones left unexplained (Gao et al., 2024)."""
        residual = (x - reconstruction).detach()
        return fraction_of_variance_unexplained(self._decoder_sum(aux_code), residual)
