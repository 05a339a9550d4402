"""Evaluation: oracle reconstructions pin the metrics' ends, and real checkpoints (ours, HypotheSAEs') land between."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import hypothesaes_module, save_tiny_llama_with_blocks
from fastsae.errors import UserError
from fastsae.evaluate import EvalConfig, ReconstructionSums, evaluate_sae, model_metrics, validation_examples
from fastsae.store import ActivationStore
from fastsae.train import TrainConfig, train_saes


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_store, tmp_path_factory) -> Path:
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("eval-runs")), m=128, k=8, batch_size=256, epochs=20.0)
    (result,) = train_saes(config)
    return Path(result["checkpoint"])


def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean():
    x = torch.randn(500, 16) * 3 + 2
    perfect, mean = ReconstructionSums(16), ReconstructionSums(16)
    perfect.add(x, x)
    mean.add(x, x.mean(0).expand_as(x))
    assert perfect.metrics()["fvu"] == 0.0 and perfect.metrics()["cosine"] == pytest.approx(1.0)
    assert mean.metrics()["fvu"] == pytest.approx(1.0)


def test_loss_recovered_oracles(tiny_llama, tiny_store, trained_checkpoint):
    store = ActivationStore(tiny_store)
    examples = validation_examples(store.n_examples, 0.1, 0, 12)
    identity = model_metrics(tiny_llama, store, examples, lambda x: x, include_special=False, batch_tokens=2048)
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert identity["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert identity["ce_sae"] == pytest.approx(identity["ce_clean"], abs=1e-6)
    zero = model_metrics(tiny_llama, store, examples, torch.zeros_like, include_special=False, batch_tokens=2048)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    from fastsae.checkpoint import load_sae

    sae = load_sae(trained_checkpoint).sae
    trained = model_metrics(tiny_llama, store, examples, lambda x: sae(x), include_special=False, batch_tokens=2048)
    assert 0.0 < trained["loss_recovered"] < 1.0
    assert trained["kl_divergence"] > 0
    assert trained["tokens"] == identity["tokens"] == zero["tokens"]


def test_evaluate_writes_eval_json_and_the_density_plot(trained_checkpoint, tiny_model_folder, capsys):
    results = evaluate_sae(EvalConfig(checkpoint=str(trained_checkpoint), model_name=str(tiny_model_folder), device="cpu"))
    saved = json.loads((trained_checkpoint.parent / "eval.json").read_text())
    assert saved["examples"] == 33 and len(saved["feature_density"]) == 128
    assert saved["sparsity"]["l0_mean"] == pytest.approx(8, abs=0.5)
    assert 0 < saved["model"]["loss_recovered"] < 1
    content = saved["reconstruction"]["content"]
    training_metrics = json.loads((trained_checkpoint.parent / "metrics.json").read_text())["final"]
    assert content["fvu"] == pytest.approx(training_metrics["fvu"], rel=1e-3)  # the same held-out tokens as training's validation
    assert saved["fast_token_mse"]["log2"] == pytest.approx(torch.tensor(saved["fast_token_mse"]["raw"]).log2().item())
    assert {row["metric"] for row in saved["health"]} == {"loss_recovered", "l0_mean", "dead_fraction", "dense_fraction"}
    assert (trained_checkpoint.parent / "feature_density.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| loss recovered |" in printed and "FAST token MSE, raw / log2" in printed
    assert results["model"] == saved["model"]


def test_a_hypothesaes_checkpoint_is_evaluated_given_its_store(tiny_store, tiny_model_folder, tmp_path):
    torch.manual_seed(0)
    theirs = hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu")
    path = Path(theirs.save(str(tmp_path / "SAE_M=32_K=4.pt")))
    with pytest.raises(UserError, match="Pass --store"):
        evaluate_sae(EvalConfig(checkpoint=str(path), model_metrics=False))
    results = evaluate_sae(EvalConfig(checkpoint=str(path), store=str(tiny_store), model_name=str(tiny_model_folder), validation_fraction=0.1, seed=0))
    assert results["sparsity"]["l0_mean"] <= 4 and 0 <= results["model"]["loss_recovered"] <= 1.5


def test_mismatches_and_missing_validation_get_clear_errors(tiny_store, trained_checkpoint, tmp_path, smollm2_tokenizer):
    small = hypothesaes_module().SparseAutoencoder(32, 16, 2, device="cpu")
    wrong_width = Path(small.save(str(tmp_path / "SAE_M=16_K=2.pt")))
    with pytest.raises(UserError, match="d=32 but the store .* has d=64"):
        evaluate_sae(EvalConfig(checkpoint=str(wrong_width), store=str(tiny_store), model_metrics=False))
    with pytest.raises(UserError, match="no validation examples"):
        evaluate_sae(EvalConfig(checkpoint=str(trained_checkpoint), validation_fraction=0.0, model_metrics=False))
    two_blocks = tmp_path / "two-block-llama"
    save_tiny_llama_with_blocks(two_blocks, smollm2_tokenizer, 2)
    with pytest.raises(UserError, match="layer 2 is out of range"):  # the store's hook is in block 2
        evaluate_sae(EvalConfig(checkpoint=str(trained_checkpoint), model_name=str(two_blocks), device="cpu"))
