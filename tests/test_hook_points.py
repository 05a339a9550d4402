"""mlp_out and attn_out are what each block adds to its residual stream, in every family whose blocks the hooks special-case.

Each family is a tiny random model built from its transformers config class, read through fastsae's own capture
(`ResidualCapture`). fastsae extracts no resid_mid, so the defining identities are checked as: on a plain forward pass,
resid_post(L) - resid_post(L - 1) = attn_out(L) + mlp_out(L); with one of the two hooks' outputs zeroed (as evaluation
zero-ablates a hook), the block adds exactly the other's, so each hook alone is its sublayer's whole share; and what a
replacement adds to a hook's activation (an SAE's error, a steering vector) the residual stream receives unchanged.

Against TransformerLens: Llama, Gemma 2 and Gemma 3 (text), whose hook_attn_out and hook_mlp_out read after Gemma's
post-norms. `saebench_reference.hooked_transformer_from_hf` builds them offline with TransformerLens' own settings and
weight conversion. TransformerLens' other sandwich-norm families (OLMo 2 and 3) take their settings from the model's
config on the Hub, which these tests cannot reach, so for them the identities stand alone.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILY_SHAPES
from fastsae.common.errors import UserError
from fastsae.lm.hook_points import (
    HOOK_POINTS,
    ResidualCapture,
    decoder_layers,
    hook_name,
    hook_site,
    hooked_module,
    sublayer_reader,
)
from saebench_reference import hooked_transformer_from_hf, max_logit_difference

VOCAB = FAMILY_SHAPES["vocab_size"]
# Config settings by model type: one family per special case in hook_points.RESIDUAL_WRITERS, and some without one.
ARCHITECTURES = {
    "llama": FAMILY_SHAPES,
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4),
    # Sandwich norms. Gemma scales queries by query_pre_attn_scalar**-0.5, which TransformerLens takes to be head_dim.
    "gemma2": dict(FAMILY_SHAPES, query_pre_attn_scalar=16),
    "gemma3_text": dict(FAMILY_SHAPES, query_pre_attn_scalar=16),
    "olmo2": FAMILY_SHAPES,
    "glm4": FAMILY_SHAPES,
    "hyperclovax": dict(FAMILY_SHAPES, residual_multiplier=0.5),  # its post-norms' outputs are scaled too
    "afmoe": dict(FAMILY_SHAPES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "lfm3": dict(FAMILY_SHAPES, layer_types=["conv", "full_attention", "sliding_attention"]),
    # Sublayers that add the residual themselves.
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=3, n_head=4),
    # Parallel attention, whose output the block adds into the MLP's output in place.
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
    # An MLP that adds the residual itself, and an attention that does not.
    "mpt": dict(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4),
    # Sublayer outputs scaled before the add (hook_points.RESIDUAL_MULTIPLIERS): Granite-3's residual_multiplier, and
    # MiniCPM3's scale_depth / sqrt(num_hidden_layers) = 1.4 / sqrt(3), with its multi-head latent attention's shapes.
    "granite": dict(FAMILY_SHAPES, residual_multiplier=0.22),
    "minicpm3": dict(FAMILY_SHAPES, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8),
}
LAYERS = [1, 2]  # layer 1 is not the deepest read, so the forward pass goes on past it
TOKENS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@functools.cache
def tiny_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])).eval()


def capture(model: torch.nn.Module, layers: list[int], hook_point: str) -> dict[int, torch.Tensor]:
    return ResidualCapture(model, layers, hook_point)(TOKENS, torch.ones_like(TOKENS))


@contextmanager
def replaced(model: torch.nn.Module, layer: int, hook_point: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    handle = hook_site(model, layer, hook_point).replace(change)
    try:
        yield
    finally:
        handle.remove()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_attn_out_and_mlp_out_sum_to_what_the_block_adds(model_type):
    model = tiny_model(model_type)
    resid = capture(model, [LAYERS[0] - 1, *LAYERS], "resid_post")
    attn, mlp = capture(model, LAYERS, "attn_out"), capture(model, LAYERS, "mlp_out")
    for layer in LAYERS:
        assert relative_error(attn[layer] + mlp[layer], resid[layer] - resid[layer - 1]) < 1e-5


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize(("zeroed", "kept"), [("attn_out", "mlp_out"), ("mlp_out", "attn_out")])
def test_with_one_hook_zeroed_the_block_adds_exactly_the_other(model_type, zeroed, kept):
    model, layer = tiny_model(model_type), LAYERS[0]
    with replaced(model, layer, zeroed, torch.zeros_like):
        resid = capture(model, [layer - 1, layer], "resid_post")
        kept_output = capture(model, [layer], kept)[layer]
    assert relative_error(kept_output, resid[layer] - resid[layer - 1]) < 1e-5


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize(("changed", "zeroed"), [("attn_out", "mlp_out"), ("mlp_out", "attn_out")])
def test_what_a_replacement_adds_to_a_hook_the_residual_stream_receives(model_type, changed, zeroed):
    """Evaluation's spliced reconstruction and steering change the model as they mean to: a block that scales its
    sublayer's output (Granite) must not scale what they add, since the activation they change is already scaled.
    The other sublayer is zeroed, so that it adds nothing that depends on the change (an MLP reading the attention's)."""
    model, layer = tiny_model(model_type), LAYERS[0]
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with replaced(model, layer, zeroed, torch.zeros_like):
        clean = capture(model, [layer], "resid_post")[layer]
        with replaced(model, layer, changed, lambda hidden: hidden + delta):
            moved = capture(model, [layer], "resid_post")[layer]
    assert relative_error(moved - clean, delta.expand_as(clean)) < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text"])
def test_every_hook_equals_transformer_lens(model_type):
    model = tiny_model(model_type)
    hooked = hooked_transformer_from_hf(model)
    assert max_logit_difference(model, hooked, [TOKENS]) < 1e-4  # the same model in both libraries
    _, cache = hooked.run_with_cache(TOKENS)
    layers = list(range(model.config.num_hidden_layers))
    for hook_point in HOOK_POINTS:
        ours = capture(model, layers, hook_point)
        for layer in layers:
            assert relative_error(ours[layer], cache[hook_name(layer, hook_point)]) < 1e-5, (hook_point, layer)


def test_a_store_read_after_a_residual_multiplier_records_it():
    """A Granite mlp_out store extracted before the multiplier was applied holds other activations: it must not resume."""
    assert ResidualCapture(tiny_model("granite"), [1], "mlp_out").targets[1].identity == {
        "hook_point": "mlp_out",
        "layer": 1,
        "residual_multiplier": 0.22,
    }
    assert ResidualCapture(tiny_model("granite"), [1], "resid_post").targets[1].identity == {"hook_point": "resid_post", "layer": 1}
    assert "residual_multiplier" not in ResidualCapture(tiny_model("llama"), [1], "mlp_out").targets[1].identity


def test_llama_hooks_read_its_sublayers_themselves():
    model = tiny_model("llama")
    assert hooked_module(model, 1, "attn_out") is model.model.layers[1].self_attn
    assert hooked_module(model, 1, "mlp_out") is model.model.layers[1].mlp


def test_where_a_hook_reads_after_its_sublayer_it_names_the_module():
    """What sparsify SAEs of `layers.L.mlp` must be warned about: fastsae's mlp_out there is not the MLP's own output."""
    assert sublayer_reader(tiny_model("llama"), 1, "mlp_out") is None and sublayer_reader(tiny_model("gpt2"), 1, "attn_out") is None
    assert sublayer_reader(tiny_model("gemma2"), 1, "mlp_out") == "post_feedforward_layernorm"
    assert sublayer_reader(tiny_model("bloom"), 1, "attn_out") == "self_attention.dense"
    assert sublayer_reader(tiny_model("mpt"), 1, "mlp_out") == "ffn.down_proj" and sublayer_reader(tiny_model("mpt"), 1, "attn_out") is None
    assert sublayer_reader(tiny_model("granite"), 1, "mlp_out") == "mlp (times its residual multiplier 0.22)"


def test_a_block_without_attention_has_no_attn_out():
    """Hybrid models: LFM3's convolution blocks lack the attribute; others (GraniteMoeHybrid's Mamba blocks) set it to None."""
    with pytest.raises(UserError, match="block 0 of Lfm3ForCausalLM has no attn_out submodule; use HOOK_POINT = 'resid_post'"):
        hooked_module(tiny_model("lfm3"), 0, "attn_out")
    llama = copy.deepcopy(tiny_model("llama"))
    llama.model.layers[1].self_attn = None
    with pytest.raises(UserError, match="block 1 of LlamaForCausalLM has no attn_out submodule"):
        hooked_module(llama, 1, "attn_out")


OPT_SHAPES = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4)


def test_pre_ln_opt_has_attn_out_and_refuses_mlp_out():
    """OPT's MLP is its bare fc1/fc2: fc2 outputs the MLP's share, but on (B·T, d) rows, so no module outputs a
    (B, T, d) mlp_out and it is refused with resid_post named; its attention is a sublayer like Llama's."""
    torch.manual_seed(0)
    pre_ln = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **OPT_SHAPES)).eval()
    fc2 = {}
    handle = pre_ln.model.decoder.layers[1].fc2.register_forward_hook(lambda module, inputs, output: fc2.update({1: output}))
    try:
        added = capture(pre_ln, [0, 1], "resid_post")
    finally:
        handle.remove()
    attn_out = capture(pre_ln, [1], "attn_out")[1]
    assert relative_error(attn_out + fc2[1].reshape(attn_out.shape), added[1] - added[0]) < 1e-5
    with pytest.raises(UserError, match="^block 1 of OPTForCausalLM has no mlp_out submodule; use HOOK_POINT = 'resid_post'.$"):
        capture(pre_ln, [1], "mlp_out")


def test_a_sublayer_that_outputs_flattened_rows_is_refused_with_resid_post_named():
    """Llama 4's MoE MLP returns (B·T, d) rows, which its block reshapes before the add: read as they are, they would
    reach the store as B·T "examples" of one token; its attention's output is (B, T, d) and read as usual."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama4_text", **FAMILY_SHAPES, intermediate_size_mlp=128, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    assert capture(model, [1], "attn_out")[1].shape == (*TOKENS.shape, config.hidden_size)
    with pytest.raises(UserError, match=r"^Llama4TextMoe outputs its share .* rows of shape \[24, 64\].* use HOOK_POINT = 'resid_post'\.$"):
        capture(model, [1], "mlp_out")


@pytest.mark.parametrize("hook_point", ["attn_out", "mlp_out"])
def test_post_ln_blocks_are_refused_sublayer_hooks(hook_point):
    """OPT-350m normalises the residual stream after each add, so its attention's output is not what the block adds."""
    torch.manual_seed(0)
    post_ln = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **OPT_SHAPES, do_layer_norm_before=False)).eval()
    with pytest.raises(UserError, match=f"OPTForCausalLM normalises its residual stream .* no module outputs what its {hook_point} adds"):
        hooked_module(post_ln, 1, hook_point)


def test_dbrx_mlp_out_is_what_its_ffn_adds():
    """DBRX's MLP is `ffn`, added to the residual stream that its attention sublayer (norm_attn_norm) returns."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "dbrx", vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4,
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    )  # fmt: skip
    dbrx = AutoModelForCausalLM.from_config(config).eval()
    after_attention = {}
    handle = decoder_layers(dbrx)[1].norm_attn_norm.register_forward_hook(
        lambda module, inputs, output: after_attention.update({1: output[0]})  # (residual stream, its normed copy)
    )
    try:
        added = capture(dbrx, [1], "resid_post")[1]
    finally:
        handle.remove()
    assert relative_error(capture(dbrx, [1], "mlp_out")[1], added - after_attention[1]) < 1e-5
