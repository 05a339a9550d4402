"""The SAE module: the sparse step equals the dense computation, and each architecture behaves as defined."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import hypothesaes_module
from fastsae.common.errors import UserError
from fastsae.core import sae as sae_module
from fastsae.core.checkpoint import hypothesaes_config, raw_space_state
from fastsae.core.sae import SAESpec, SparseAutoencoder, fraction_of_variance_unexplained

D, M, K, B = 37, 101, 7, 53  # odd sizes on purpose


def make_sae(architecture: str = "topk", prefixes: tuple[int, ...] = (), aux_k: int = 0, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAESpec(architecture, D, M, K, prefixes, aux_k)).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def dense_topk_loss(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, aux_coefficient: float) -> torch.Tensor:
    """The textbook computation: a dense (B, M) code and dense matmuls everywhere."""
    pre = F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
    chosen = pre.topk(K, dim=1).indices
    mask = torch.zeros_like(pre).scatter_(1, chosen, 1.0)
    codes = pre.relu() * mask
    reconstruction = codes @ sae.W_dec + sae.b_dec
    terms = [fraction_of_variance_unexplained(codes[:, :p] @ sae.W_dec[:p] + sae.b_dec, x) for p in sae.spec.prefixes[:-1]]
    loss = torch.stack([*terms, fraction_of_variance_unexplained(reconstruction, x)]).mean()
    if dead is not None:
        aux_chosen = pre.masked_fill(~dead, float("-inf")).topk(sae.spec.aux_k, dim=1).indices
        aux_mask = torch.zeros_like(pre).scatter_(1, aux_chosen, 1.0) * dead
        predicted = (pre.relu() * aux_mask) @ sae.W_dec
        loss = loss + aux_coefficient * fraction_of_variance_unexplained(predicted, (x - reconstruction).detach())
    return loss


@pytest.mark.parametrize("gpu_kernels", [False, True], ids=["cpu-kernels", "gpu-kernels"])
@pytest.mark.parametrize("input_needs_grad", [False, True], ids=["data", "input-grad"])
@pytest.mark.parametrize("prefixes, aux_k", [((), 0), ((20, 64, M), 0), ((), 2 * K)])
def test_sparse_step_equals_dense_loss_and_gradients(prefixes, aux_k, input_needs_grad, gpu_kernels, monkeypatch):
    """Both kernel paths (gathers on the CPU, dense products on a GPU) give the textbook loss and every gradient."""
    monkeypatch.setattr(sae_module, "DENSE_KERNELS", gpu_kernels)
    torch.manual_seed(1)
    x = torch.randn(B, D, dtype=torch.float64) * 3 + 1
    dead = (torch.arange(M) % 3 == 0) if aux_k else None
    sparse, dense = make_sae(prefixes=prefixes, aux_k=aux_k), make_sae(prefixes=prefixes, aux_k=aux_k)
    x_sparse, x_dense = x.clone().requires_grad_(input_needs_grad), x.clone().requires_grad_(input_needs_grad)
    sparse_loss = sparse.training_step(x_sparse, dead, 1 / 32, 0.0).loss
    dense_loss = dense_topk_loss(dense, x_dense, dead, 1 / 32)
    sparse_loss.backward()
    dense_loss.backward()
    torch.testing.assert_close(sparse_loss, dense_loss)
    for (name, parameter), reference in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, msg=lambda text, name=name: f"{name}: {text}")
    if input_needs_grad:
        torch.testing.assert_close(x_sparse.grad, x_dense.grad)


def clearly_chosen_tokens(pre: torch.Tensor, dead: torch.Tensor, k: int, aux_k: int, gap: float = 0.05) -> torch.Tensor:
    """Tokens whose K-th pre-activation (and aux_k-th among the dead) beats the next by more than `gap`.

    bf16 rounds a pre-activation of size ~3 by up to ~0.01, which reorders near-ties: a token whose
    choice flips gets another feature's gradient, a difference of selection, not of arithmetic.
    """
    top = pre.topk(k + 1, dim=1).values
    top_dead = pre[:, dead].topk(aux_k + 1, dim=1).values
    return (top[:, k - 1] - top[:, k] > gap) & (top_dead[:, aux_k - 1] - top_dead[:, aux_k] > gap)


@pytest.mark.parametrize("gpu_kernels", [False, True], ids=["cpu-kernels", "gpu-kernels"])
def test_bfloat16_autocast_step_matches_float32_loss_and_gradients(gpu_kernels, monkeypatch):
    """Under bf16 autocast (the encoder matmul in bf16, float32 weights) loss and gradients stay float32 and match
    the float32 step to bf16 precision: 8 significant bits, a relative rounding of 2^-9, here 0.5% at most."""
    monkeypatch.setattr(sae_module, "DENSE_KERNELS", gpu_kernels)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("topk", D, M, K, (20, 64, M), 2 * K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    dead = torch.arange(M) % 3 == 0
    x = torch.randn(20 * B, D) * 3 + 1
    with torch.no_grad():
        x = x[clearly_chosen_tokens(sae.pre_activations(x), dead, K, 2 * K)][:B]
    assert len(x) == B
    losses, gradients = [], []
    for bfloat16 in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            output = sae.training_step(x, dead, 1 / 32, 0.0)
        output.loss.backward()
        losses.append(output.loss.detach())
        gradients.append({name: parameter.grad.clone() for name, parameter in sae.named_parameters()})
    assert losses[1].dtype == torch.float32 and all(gradient.dtype == torch.float32 for gradient in gradients[1].values())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)
    for name, reference in gradients[0].items():
        error = float((gradients[1][name] - reference).norm() / reference.norm())
        assert error < 1.5e-2, f"{name}: relative error {error:.2e}"


def test_topk_code_has_exactly_k_features_and_encode_matches_forward():
    sae = make_sae()
    x = torch.randn(B, D, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive, so all K survive the ReLU
        codes = sae.encode(x)
        assert ((codes > 0).sum(1) == K).all()
        torch.testing.assert_close(sae(x), sae.decode(codes))


def test_batchtopk_keeps_k_times_b_in_training_and_its_threshold_at_inference():
    sae = make_sae("batchtopk")
    x = torch.randn(512, D, dtype=torch.float64)
    with torch.no_grad():
        sae.train()
        for _ in range(800):
            code = sae.encode_sparse(x)
        assert int((code.values > 0).sum()) == K * 512
        assert int((code.values > 0).sum(1).max()) > K  # tokens share the batch's budget unevenly
        sae.eval()
        inference_l0 = (sae.encode(x) > 0).sum(1).double().mean()
    assert abs(float(inference_l0) - K) / K < 0.2


def test_batchtopk_keeps_exactly_k_times_b_under_bfloat16_autocast():
    """bf16 pre-activations tie often (about 50 share each bf16 value near this batch's cutoff): exactly the K·B
    chosen by the batch's top-k are kept, as in the references, not every value tied with the smallest of them."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("batchtopk", D, M, K)).train()
    x = torch.randn(512, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            pre = sae.pre_activations(x)
        output = sae.training_step(x, None, 0.0, 0.0)
    cutoff = pre.flatten().topk(K * 512).values.min()
    assert int((pre >= cutoff).sum()) > K * 512  # ties at the cutoff
    assert float(output.l0) == K and int(output.fire_counts.sum()) == K * 512


@pytest.mark.parametrize("warmed_up", [False, True], ids=["first-update", "after-warm-up"])
def test_batchtopk_threshold_moves_towards_the_smallest_positive_chosen_value_as_in_hypothesaes(warmed_up):
    """With fewer positive pre-activations than K·B, the batch's K·B largest include zeros: the threshold follows the
    smallest positive one (HypotheSAEs' own `_update_threshold_` beside ours), and a batch with none leaves it alone.
    Past the warm-up (a plain mean of the first 100 values) both take the same EMA step; the first value is kept whole."""
    torch.manual_seed(0)
    ours = SparseAutoencoder(SAESpec("batchtopk", D, M, K)).train()
    with torch.no_grad():
        ours.b_enc.fill_(-2.0)
    theirs = hypothesaes_module().SparseAutoencoder(**hypothesaes_config(ours.spec, 256), device="cpu").train()
    theirs.load_state_dict(raw_space_state(ours, 1.0))
    if warmed_up:
        ours.threshold_updates.fill_(1000)
        for sae in (ours, theirs):
            sae.threshold.fill_(0.3)
    x = torch.randn(B, D)
    with torch.no_grad():
        assert 0 < int((ours.pre_activations(x) > 0).sum()) < K * B
        ours.encode_sparse(x)
        activations = theirs(x)[1]["activations"]
        expected = theirs.threshold if warmed_up else activations[activations > 0].min()
        torch.testing.assert_close(ours.threshold, expected)
        before = ours.threshold.clone()
        ours.b_enc.fill_(-100.0)  # no positive pre-activation at all
        ours.encode_sparse(x)
    assert torch.equal(ours.threshold, before)


def test_jumprelu_thresholds_learn_from_the_sparsity_penalty():
    sae = make_sae("jumprelu")
    x = torch.randn(4096, D, dtype=torch.float64)  # enough pre-activations land within the kernel's width of θ
    with torch.no_grad():
        sae.jumprelu_threshold.fill_(0.5)
    before = sae.jumprelu_threshold.detach().clone()
    output = sae.training_step(x, None, 0.0, 1.0)
    output.loss.backward()
    assert sae.jumprelu_threshold.grad is not None and sae.jumprelu_threshold.grad.abs().sum() > 0
    with torch.no_grad():
        sae.jumprelu_threshold -= 0.01 * sae.jumprelu_threshold.grad
    assert (sae.jumprelu_threshold >= before).all() and (sae.jumprelu_threshold > before).any()
    codes = sae.encode(x)
    assert ((codes == 0) | (codes > sae.jumprelu_threshold)).all()


def smollm2_like_activations(n_tokens: int, d: int = 576, seed: int = 0) -> torch.Tensor:
    """Tokens shaped like SmolLM2's layer 12 (mean-vector norm ~100, median token norm ~140), scaled as the trainer
    scales them (E‖x‖² = d): the offset leaves a std of only ~0.7 along a random direction."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=generator)
    spread = torch.randn(n_tokens, d, generator=generator) * torch.empty(n_tokens, 1).log_normal_(0, 0.3, generator=generator)
    raw = 100 * mean / mean.norm() + spread * (140**2 - 100**2) ** 0.5 / d**0.5
    return raw * (d / raw.pow(2).sum(1).mean()) ** 0.5


@pytest.mark.parametrize("bfloat16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("raised", [False, True], ids=["at-init", "thresholds-at-1-std"])
def test_most_jumprelu_thresholds_get_a_gradient_from_one_batch(bfloat16, raised):
    """The window is on the data's scale and the threshold path is float32, so one 1024-token batch reaches most
    thresholds. With a 0.001 window in these units, 6-35% did in float32; under bf16 a threshold between two bf16
    values (their spacing is 1/256 to 1/128 between 0.5 and 2) got none."""
    x = smollm2_like_activations(1024)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("jumprelu", 576, 1024, 0))
    sae.initialize_input_bias_(x)
    if raised:  # where training takes them: about one pre-activation std, each off the bf16 grid
        with torch.no_grad():
            sae.jumprelu_threshold.copy_(sae.pre_activations(x).std(0) + 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        output = sae.training_step(x, None, 0.0, 1e-3)
        codes = sae.encode(x)
    output.loss.backward()
    assert codes.dtype == torch.float32
    reached = float((sae.jumprelu_threshold.grad != 0).float().mean())
    assert reached > 0.8, f"only {reached:.0%} of thresholds got a gradient"


def test_jumprelu_window_and_start_scale_with_the_data():
    """Given in the paper's units (unit mean squared norm), both are √d larger on the trainer's E‖x‖² = d data."""
    sae = SparseAutoencoder(SAESpec("jumprelu", 576, 8, 0), jumprelu_initial_threshold=2e-3, jumprelu_bandwidth=1e-3)
    assert sae.jumprelu_bandwidth == pytest.approx(0.024)
    torch.testing.assert_close(sae.jumprelu_threshold.detach(), torch.full((8,), 0.048))
    with torch.no_grad():
        sae.jumprelu_threshold[0] = -0.1  # an optimiser step past zero
    sae.enforce_constraints_()
    assert float(sae.jumprelu_threshold.detach().min()) == 0.0


def test_relu_l1_penalty_reduces_activity():
    x = torch.randn(B, D, dtype=torch.float64)
    l0s = []
    for coefficient in (0.0, 0.5):
        sae = make_sae("relu")
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(60):
            optimizer.zero_grad()
            sae.training_step(x, None, 0.0, coefficient).loss.backward()
            optimizer.step()
        l0s.append(float(sae.training_step(x, None, 0.0, coefficient).l0))
    assert l0s[1] < 0.5 * l0s[0]


def test_decoder_constraint_keeps_unit_rows():
    sae = make_sae()
    x = torch.randn(B, D, dtype=torch.float64)
    sae.training_step(x, None, 0.0, 0.0).loss.backward()
    sae.remove_parallel_gradient_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6 * sae.W_dec.grad.abs().max()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M, dtype=torch.float64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec)  # the encoder starts as the decoder's transpose


@pytest.mark.parametrize(
    "spec, message",
    [
        (("topk", D, 8, 9), "K must be between 1 and M"),
        (("topk", D, 256, 8, (64, 128)), "end at M=256"),
        (("topk", D, 256, 8, (128, 64, 256)), "must increase"),
        (("sparse", D, 256, 8), "unknown architecture"),
    ],
)
def test_bad_specs_get_clear_messages(spec, message):
    with pytest.raises(UserError, match=message):
        SAESpec(*spec)


def test_aux_k_with_no_dead_feature_left_adds_nothing():
    sae = make_sae(aux_k=2 * K)
    x = torch.randn(B, D, dtype=torch.float64)
    without = sae.training_step(x, None, 1 / 32, 0.0)
    revived = sae.training_step(x, torch.zeros(M, dtype=torch.bool), 1 / 32, 0.0)
    assert float(revived.aux_loss) == 0.0
    torch.testing.assert_close(revived.loss, without.loss)
