"""The SAEBench reference harness runs SAEBench's own core evaluation on the tiny Llama, and its numbers match a hand
computation from the Hugging Face model: this pins down SAEBench's definitions (which positions, which mask, which means)."""

from __future__ import annotations

import importlib.resources
import json

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_LAYERS
from saebench_reference import hooked_transformer_from_hf, saebench_core_reference, saebench_ignore_tokens

LAYER = 1
D, M, K = 64, 128, 8
SAEBENCH_KEYS = {
    "ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation",
    "kl_div_score", "kl_div_with_sae", "kl_div_with_ablation",
    "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias",
    "l0", "l1", "explained_variance", "explained_variance_legacy", "mse", "cossim",
    "frac_alive", "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
    "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
}  # fmt: skip


def token_batches(tokenizer, seed: int = 0) -> list[torch.Tensor]:
    """Two (4, 16) batches of SAEBench-style contexts: BOS first, then text with a document's EOS (= pad) inside some rows."""
    generator = torch.Generator().manual_seed(seed)
    special = sorted(saebench_ignore_tokens(tokenizer))
    batches = []
    for _ in range(2):
        tokens = torch.randint(max(special) + 1, len(tokenizer), (4, 16), generator=generator)
        tokens[:, 0] = tokenizer.bos_token_id
        batches.append(tokens)
    batches[0][1, 6] = tokenizer.eos_token_id  # a document ends mid-row: position 5's CE (target EOS) counts, position 6's not
    batches[0][1, 7] = tokenizer.bos_token_id
    batches[1][3, 15] = tokenizer.eos_token_id  # an ignored token in the last position
    batches[1][2, 9] = tokenizer.pad_token_id
    return batches


def random_sae(architecture: str, activations: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens-layout weights on the scale of the activations, with unit decoder rows (SAEBench warns otherwise), so
    that some latents fire and others do not."""
    generator = torch.Generator().manual_seed(seed)
    W_dec = F.normalize(torch.randn(M, D, generator=generator), dim=1)
    scale = activations.norm(dim=-1).mean()
    weights = {
        "W_enc": W_dec.T + 0.2 * torch.randn(D, M, generator=generator),
        "b_enc": scale * ((-0.3 if architecture == "relu" else 0.0) + 0.1 * torch.randn(M, generator=generator)),
        "W_dec": W_dec,
        "b_dec": activations.flatten(0, 1).mean(0),
    }
    if architecture == "jumprelu":
        weights["threshold"] = scale * 0.6 * torch.rand(M, generator=generator)
    return weights


def encode(weights, architecture, x):
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if architecture == "topk":
        values, indices = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    if architecture == "jumprelu":
        return pre.relu() * (pre > weights["threshold"])
    return pre.relu()


def decode(weights, acts):
    return acts @ weights["W_dec"] + weights["b_dec"]


def hf_forward(hf_model, tokens, replace=None):
    """Logits and block LAYER's output, with `replace(output)` substituted for that output at every position."""
    captured = {}

    def hook(module, args, output):
        captured["x"] = output
        return None if replace is None else replace(output)

    handle = hf_model.model.layers[LAYER].register_forward_hook(hook)
    try:
        logits = hf_model(tokens).logits
    finally:
        handle.remove()
    return logits, captured["x"]


def kl(p_logits, q_logits):
    return (p_logits.softmax(-1) * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)


@torch.no_grad()
def hand_metrics(hf_model, weights, architecture, batches, sparsity_batches, ignore) -> tuple[dict[str, float], torch.Tensor]:
    """SAEBench's definitions written out from the Hugging Face model, independently of SAEBench's code; and the feature densities."""
    ignored = torch.tensor(sorted(ignore))
    ce = {"clean": [], "sae": [], "ablation": []}
    kls = {"sae": [], "ablation": []}
    for tokens in batches:
        keep = ~torch.isin(tokens, ignored)  # by the *input* token at a position
        clean, _ = hf_forward(hf_model, tokens)
        runs = {"clean": clean}
        runs["sae"], _ = hf_forward(
            hf_model, tokens, lambda x: decode(weights, encode(weights, architecture, x))
        )  # every position, BOS too
        runs["ablation"], _ = hf_forward(hf_model, tokens, torch.zeros_like)
        for name, logits in runs.items():
            per_position = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # position t predicts t+1
            ce[name].append(per_position[keep[:, :-1]])
            if name != "clean":
                kls[name].append(kl(clean, logits)[keep])  # every position, the last one too
    result = {f"ce_loss_{name}": torch.cat(values).mean().item() for name, values in ce.items()}
    result["ce_loss_without_sae"] = result.pop("ce_loss_clean")
    result |= {"kl_div_with_sae": torch.cat(kls["sae"]).mean().item(), "kl_div_with_ablation": torch.cat(kls["ablation"]).mean().item()}
    result["ce_loss_with_sae"], result["ce_loss_with_ablation"] = result.pop("ce_loss_sae"), result.pop("ce_loss_ablation")

    l0, mse, sum_sq, mean_sq, resid_sq = [], [], [], [], []
    fired, tokens_kept = torch.zeros(M), 0
    for tokens in sparsity_batches:
        keep = ~torch.isin(tokens, ignored)
        _, x = hf_forward(hf_model, tokens)
        x = x[keep]  # (kept tokens, D)
        acts = encode(weights, architecture, x)
        sse = (x - decode(weights, acts)).pow(2).sum(-1)
        l0.append((acts != 0).sum(-1).float())
        mse.append(sse / len(x))  # divided by this batch's kept-token count, not by D
        sum_sq.append(x.pow(2).sum(-1).mean())
        mean_sq.append(x.pow(2).mean(0))
        resid_sq.append(sse.mean())
        fired += (acts > 0).sum(0)
        tokens_kept += len(x)
    # SAEBench's "explained_variance": 1 - mean_b E[SSE] / (mean_b E[|x|^2] - (mean_b mean_j E[x_j^2])^2), batches equally weighted.
    total = torch.stack(sum_sq).mean() - torch.cat(mean_sq).mean() ** 2
    density = fired / tokens_kept
    result |= {
        "l0": torch.cat(l0).mean().item(),
        "mse": torch.cat(mse).mean().item(),
        "explained_variance": (1 - torch.stack(resid_sq).mean() / total).item(),
        "frac_alive": (density > 0).float().mean().item(),
        "freq_over_1_percent": (density > 0.01).float().mean().item(),
    }
    return result, density


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A d=64 model gains nothing from threads, and on a shared CPU two threads can make a forward pass 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches(smollm2_tokenizer):
    return token_batches(smollm2_tokenizer)


@torch.no_grad()
def test_hooked_transformer_equals_the_hf_llama(tiny_llama, batches):
    hooked = hooked_transformer_from_hf(tiny_llama)
    assert hooked.tokenizer is None and hooked.cfg.n_layers == TINY_LAYERS
    hf = tiny_llama(batches[0], output_hidden_states=True)
    logits, cache = hooked.run_with_cache(batches[0], names_filter=f"blocks.{LAYER}.hook_resid_post")
    assert logits.shape == hf.logits.shape  # token ids go in as they are: no BOS prepended
    torch.testing.assert_close(logits, hf.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache[f"blocks.{LAYER}.hook_resid_post"], hf.hidden_states[LAYER + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_saebench_reference_matches_a_hand_computation(tiny_llama, smollm2_tokenizer, batches, architecture):
    ignore = saebench_ignore_tokens(smollm2_tokenizer)
    assert ignore == {1, 2}  # SmolLM2: bos <|im_start|> = 1, eos = pad <|im_end|> = 2
    with torch.no_grad():
        activations = tiny_llama(batches[0], output_hidden_states=True).hidden_states[LAYER + 1]
    weights = random_sae(architecture, activations)
    # relu: the sparsity/variance pass reads other batches than the reconstruction pass, as in a real SAEBench run
    sparsity_batches = [batches[1]] if architecture == "relu" else None

    reference = saebench_core_reference(
        tiny_llama, LAYER, weights, architecture, K if architecture == "topk" else None, batches, ignore, sparsity_batches
    )

    assert reference.max_logit_difference <= 1e-4
    assert SAEBENCH_KEYS <= reference.flat.keys()
    expected, density = hand_metrics(tiny_llama, weights, architecture, batches, sparsity_batches or batches, ignore)
    for name, value in expected.items():
        assert reference.flat[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert 0 < reference.flat["frac_alive"] < 1  # some latents fire, some do not: the density checks mean something
    torch.testing.assert_close(torch.tensor(reference.feature_metrics["feature_density"]), density, rtol=0, atol=1e-7)
    ce = reference.metrics["model_performance_preservation"]
    assert ce["ce_loss_score"] == pytest.approx(
        (ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"]) / (ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"])
    )
    n_tokens = batches[0].numel() * len(batches)  # ignored tokens included
    assert reference.metrics["token_stats"]["total_tokens_eval_reconstruction"] == n_tokens

    schema_file = importlib.resources.files("sae_bench.evals.core") / "eval_output_schema_core.json"
    jsonschema.validate(reference.eval_output, json.loads(schema_file.read_text()))
    assert reference.eval_output["eval_type_id"] == "core" and len(reference.eval_output["eval_result_details"]) == M
