"""Our SAEBench core metrics equal what sae-bench 0.6.0's own code computes on the same model, SAE and tokens.

SAEBench runs through TransformerLens (`tests/saebench_reference.py`), ours through the split Hugging Face forward, both
in float32: the real SmolLM2 with a Top-K SAE trained on its layer 12, and the tiny random Llama with a ReLU SAE whose
dead features give SAEBench's NaN → -1 cases. Those batches are examples of one length: SAEBench packs fixed-length
contexts, so equal lengths give both the same tokens with no padding. evaluate_sae's own batches (examples of
different lengths, padded, with the SAE kept off BOS/EOS or not) are compared on the tiny Llama too. The block we
write also validates against SAEBench's JSON schema and parses as its `CoreEvalOutput`.
"""

from __future__ import annotations

import importlib.resources
import json
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.sae_info import SAEInfo
from fastsae.core.saelens_export import saelens_config, saelens_weights
from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae
from fastsae.evaluate.model_metrics import ReferencePasses, length_grouped
from fastsae.evaluate.saebench_core import core_output, ignored_token_ids
from fastsae.lm.split_forward import SplitModel
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, train_saes
from saebench_reference import saebench_core_reference

PROMPTS = 4


def trained_topk(store: Path, folder: Path, epochs: float) -> Path:
    config = TrainConfig(store=str(store), output_dir=str(folder), m=128, k=8, batch_size=256, epochs=epochs)
    return Path(train_saes(config)[0]["checkpoint"])


@pytest.fixture(scope="module")
def topk_checkpoint(tiny_store, tmp_path_factory) -> Path:
    return trained_topk(tiny_store, tmp_path_factory.mktemp("core-runs"), epochs=3.0)


def equal_length_batches(store: ActivationStore, n_batches: int = 3) -> list[list[int]]:
    """`n_batches` batches of PROMPTS examples, all of the most common length."""
    lengths = np.diff(store.doc_offsets)
    length, count = Counter(lengths.tolist()).most_common(1)[0]
    assert count >= n_batches * PROMPTS, "the tiny store has too few examples of one length for this test"
    examples = np.flatnonzero(lengths == length)[: n_batches * PROMPTS].tolist()
    return [examples[start : start + PROMPTS] for start in range(0, len(examples), PROMPTS)]


def relu_sae(d: int) -> SparseAutoencoder:
    """A ReLU SAE some of whose features never fire: NaN consistent-activation heuristics, written as -1."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("relu", d, 96, 0)).eval()
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-3, 0.5, 96))
    return sae


def ours_and_saebench(model, tokenizer, store: ActivationStore, sae: SparseAutoencoder) -> tuple[dict, dict]:
    """Our core block and SAEBench's `CoreEvalOutput`, on the same batches of the store's examples."""
    layer = int(store.manifest.layer)
    batches = equal_length_batches(store)
    ignored = ignored_token_ids(tokenizer)
    passes = ReferencePasses(SplitModel(model, layer, "resid_post"), store, batches, ignored, tokenizer.pad_token_id, {})
    passes.compute()
    losses, sparsity_variance = passes.evaluate(sae, False, "ours")
    tokens = sum(int(entry["attention"].sum()) for entry in passes.entries)
    ours = core_output(losses, sparsity_variance, sae, {}, tokens, "test", saelens_config(SAEInfo(spec=sae.spec)), "test")
    architecture = "topk" if sae.spec.architecture == "topk" else "relu"
    theirs = saebench_core_reference(
        model,
        layer,
        saelens_weights(sae),
        architecture,
        sae.spec.k if architecture == "topk" else None,
        [entry["input_ids"] for entry in passes.entries],
        ignored,
    )
    return ours, theirs.eval_output


def assert_equal_metrics(ours: dict, theirs: dict, score_tolerance: float = 1e-4) -> None:
    for group, metrics in theirs["eval_result_metrics"].items():
        for name, value in metrics.items():
            tolerance = score_tolerance if name == "ce_loss_score" else 1e-4
            assert ours["eval_result_metrics"][group][name] == pytest.approx(value, rel=1e-4, abs=tolerance), f"{group}.{name}"
    for feature_ours, feature_theirs in zip(ours["eval_result_details"], theirs["eval_result_details"], strict=True):
        assert feature_ours == pytest.approx(feature_theirs, rel=1e-4, abs=1e-4)


def test_core_metrics_equal_saebench_own_code_on_smollm2(smollm2_model, smollm2_tokenizer, smollm2_store, tmp_path):
    sae = load_sae(trained_topk(smollm2_store, tmp_path, epochs=1.0)).sae
    ours, theirs = ours_and_saebench(smollm2_model, smollm2_tokenizer, ActivationStore(smollm2_store), sae)
    assert_equal_metrics(ours, theirs)
    performance = ours["eval_result_metrics"]["model_performance_preservation"]
    assert performance["ce_loss_with_ablation"] - performance["ce_loss_without_sae"] > 1  # a well-conditioned score


def test_core_metrics_equal_saebench_own_code_with_dead_features(tiny_llama, smollm2_tokenizer, tiny_store):
    store = ActivationStore(tiny_store)
    ours, theirs = ours_and_saebench(tiny_llama, smollm2_tokenizer, store, relu_sae(store.d))
    # A random model predicts almost uniformly with or without the hook: CE_zero − CE_clean is ~1e-3 of CE, so the score
    # carries SAEBench's float32 rounding of the means (we sum in float64) magnified by CE / (CE_zero − CE_clean).
    performance = theirs["eval_result_metrics"]["model_performance_preservation"]
    conditioning = performance["ce_loss_with_ablation"] / abs(performance["ce_loss_with_ablation"] - performance["ce_loss_without_sae"])
    assert_equal_metrics(ours, theirs, score_tolerance=1e-6 * conditioning)
    assert any(feature["consistent_activation_heuristic"] == -1 for feature in ours["eval_result_details"])


@pytest.mark.parametrize("exclude", [False, True], ids=["sae_everywhere", "sae_off_bos_eos"])
def test_core_metrics_equal_saebench_own_code_on_padded_batches_of_different_lengths(tiny_llama, smollm2_tokenizer, store_and_sae, exclude):
    """evaluate_sae's batches: examples of different lengths grouped by length and right-padded, so batches hold different
    token counts (SAEBench's per-batch means: mse, explained_variance, relative_reconstruction_bias) and pad positions
    that no metric may count; with the SAE spliced in everywhere, and kept off BOS/EOS (`exclude`: our default for an
    SAE trained without special tokens).

    SAEBench reads the same batches padded to one width. It also scores each example's last position's prediction (of a
    pad token), which ours leaves out (no prediction crosses an example's end), so the cross-entropies are compared as the
    mean of SAEBench's own per-position values (`get_recons_loss`) over the positions that predict a token of the same
    example; its token counts include the padding."""
    store, sae = store_and_sae
    lengths = np.diff(store.doc_offsets)
    batches = length_grouped(list(range(0, 60, 5)), lengths, PROMPTS)
    assert len({int(lengths[batch].max()) for batch in batches}) == len(batches) > 1  # batches of different widths
    assert all(len({int(lengths[index]) for index in batch}) > 1 for batch in batches)  # padding inside every batch
    ignored = ignored_token_ids(smollm2_tokenizer)
    passes = ReferencePasses(SplitModel(tiny_llama, 2, "resid_post"), store, batches, ignored, smollm2_tokenizer.pad_token_id, {})
    passes.compute()
    losses, sparsity_variance = passes.evaluate(sae, exclude, "ours")
    ours = core_output(losses, sparsity_variance, sae, {}, 0, "test", saelens_config(SAEInfo(spec=sae.spec)), "test")

    width = max(entry["input_ids"].shape[1] for entry in passes.entries)
    pad = smollm2_tokenizer.pad_token_id
    padded = [F.pad(entry["input_ids"], (0, width - entry["input_ids"].shape[1]), value=pad) for entry in passes.entries]
    attention = [F.pad(entry["attention"], (0, width - entry["attention"].shape[1])).bool() for entry in passes.entries]
    theirs = saebench_core_reference(
        tiny_llama, 2, saelens_weights(sae), "topk", sae.spec.k, padded, ignored,
        exclude_special_tokens_from_reconstruction=exclude, per_token_losses=True,
    )  # fmt: skip

    for group in ("model_behavior_preservation", "reconstruction_quality", "shrinkage", "sparsity", "misc_metrics"):
        for name, value in theirs.eval_output["eval_result_metrics"][group].items():
            assert ours["eval_result_metrics"][group][name] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{group}.{name}"
    for feature_ours, feature_theirs in zip(ours["eval_result_details"], theirs.eval_output["eval_result_details"], strict=True):
        assert feature_ours == pytest.approx(feature_theirs, rel=1e-4, abs=1e-4)
    predicts_same_example = [~torch.isin(ids[:, :-1], torch.tensor(sorted(ignored))) & real[:, 1:] for ids, real in zip(padded, attention)]
    performance = ours["eval_result_metrics"]["model_performance_preservation"]
    for name in ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation"):
        values = torch.cat([batch[name][counted] for batch, counted in zip(theirs.per_token_losses, predicts_same_example)])
        assert performance[name] == pytest.approx(values.double().mean().item(), rel=1e-5), name
    assert theirs.flat["ce_loss_score"] != pytest.approx(performance["ce_loss_score"], rel=1e-2)  # the last predictions matter


def test_the_block_in_eval_json_validates_against_saebench_schema_and_model(topk_checkpoint, tiny_model_folder):
    from pydantic import TypeAdapter
    from sae_bench.evals.core.eval_output import CoreEvalOutput

    evaluate_sae(EvalConfig(checkpoint=[str(topk_checkpoint)], model_name=str(tiny_model_folder), model_tokens=400, device="cpu"))
    block = json.loads((topk_checkpoint.parent / "eval.json").read_text())["saebench_core"]
    schema_file = importlib.resources.files("sae_bench.evals.core") / "eval_output_schema_core.json"
    jsonschema.validate(block, json.loads(schema_file.read_text()))
    parsed = TypeAdapter(CoreEvalOutput).validate_python(block)
    assert (
        parsed.eval_result_metrics.model_performance_preservation.ce_loss_score
        == block["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"]
    )
