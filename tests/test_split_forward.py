"""SplitModel's next-token log-probabilities equal the model's own forward's, for families that change the logits
after the LM head (Gemma's soft cap, Cohere's logit_scale, Granite's logits_scaling), and a model with an unknown such
step is refused before any loss is computed from it; and what evaluation splices in at a sublayer that the block scales
before adding it (Granite's residual_multiplier) reaches the residual stream as spliced."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from conftest import FAMILY_SHAPES
from fastsae.common.errors import UserError
from fastsae.lm.split_forward import ModelBatch, SplitModel

FAMILIES = {
    "llama": FAMILY_SHAPES,
    "gemma2": dict(FAMILY_SHAPES, query_pre_attn_scalar=16, final_logit_softcapping=2.0),
    "cohere": dict(FAMILY_SHAPES, logit_scale=0.25),
    "granite": dict(FAMILY_SHAPES, logits_scaling=4.0, residual_multiplier=0.22),
}
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **FAMILIES[model_type])).eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_log_probs_equal_the_models_own_forward(model_type):
    model = tiny_model(model_type)
    split = SplitModel(model, 1, "resid_post")
    state = split.reference(ModelBatch(TOKENS, torch.ones_like(TOKENS)))  # checks one example against the model first
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits.float().log_softmax(-1)
    ours = split.log_probs(state.final_hidden.reshape(-1, FAMILY_SHAPES["hidden_size"])).reshape(expected.shape)
    assert (ours - expected).abs().max() < 1e-5


class DoubledLogitsLlama(LlamaForCausalLM):
    """A family whose forward rescales the LM head's output in a way SplitModel does not know."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


def test_a_model_with_an_unknown_logit_step_is_refused():
    torch.manual_seed(0)
    model = DoubledLogitsLlama(AutoConfig.for_model("llama", **FAMILY_SHAPES)).eval()
    with pytest.raises(UserError, match="DoubledLogitsLlama turns its last hidden state into logits in a way fastsae does not"):
        SplitModel(model, 1, "resid_post").reference(ModelBatch(TOKENS, torch.ones_like(TOKENS)))


def test_a_splice_at_a_scaled_sublayer_reaches_the_residual_stream_as_spliced():
    """Granite adds 0.22 × its MLP's output: mlp_out is that product, so an SAE's reconstruction of it is spliced back in
    unscaled. An unchanged activation leaves the model's output as it was, and adding δ to mlp_out is adding δ to the
    block's output (resid_post, which nothing scales)."""
    model, layer = tiny_model("granite"), 1
    batch, everywhere = ModelBatch(TOKENS, torch.ones_like(TOKENS)), torch.ones_like(TOKENS, dtype=torch.bool)
    delta = torch.randn(FAMILY_SHAPES["hidden_size"], generator=torch.Generator().manual_seed(1))
    final_hidden = {}
    for hook_point in ("mlp_out", "resid_post"):
        split = SplitModel(model, layer, hook_point)
        state = split.reference(batch)
        unchanged = split.variant(batch, state.block_input, lambda hidden, where: hidden, everywhere)
        torch.testing.assert_close(unchanged, state.final_hidden, rtol=1e-5, atol=1e-5)
        final_hidden[hook_point] = split.variant(batch, state.block_input, lambda hidden, where: hidden + delta, everywhere)
    torch.testing.assert_close(final_hidden["mlp_out"], final_hidden["resid_post"], rtol=1e-5, atol=1e-5)
