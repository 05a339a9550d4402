"""Evaluation: oracle SAEs pin SAEBench's scores at their ends, the shared-prefix passes equal three full forwards,
the saved clean/zero passes are reused only when model, store and split match, and real checkpoints land between."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hypothesaes_module, make_tiny_llama, save_tiny_llama_with_blocks
from fastsae.common.errors import UserError
from fastsae.core.formats.sources import results_folder
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.evaluate.evaluate_sae import EvalConfig, ReconstructionSums, evaluate_sae, fast_token_mse, validation_examples
from fastsae.evaluate.model_metrics import KEPT_REFERENCE_PASSES, CountedPositions, ReferencePasses, length_grouped
from fastsae.evaluate.saebench_core import ignored_token_ids
from fastsae.lm.hook_points import hooked_module, output_tensor, with_output_tensor
from fastsae.lm.split_forward import ModelBatch, SplitModel
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit
from fastsae.train.train_sae import TrainConfig, TrainingRun, train_saes

LAYER = 2


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_store, tmp_path_factory) -> Path:
    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("eval-runs")), m=128, k=8, batch_size=256, epochs=20.0
    )
    (result,) = train_saes(config)
    return Path(result["checkpoint"])


def oracle_sae(d: int, perfect: bool) -> SparseAutoencoder:
    """A ReLU SAE with M = 2d that reconstructs exactly (x = relu(x) − relu(−x)), or outputs zeros."""
    sae = SparseAutoencoder(SAESpec("relu", d, 2 * d, 0)).eval()
    with torch.no_grad():
        identity = torch.cat([torch.eye(d), -torch.eye(d)])
        sae.W_enc.copy_(identity)
        sae.W_dec.copy_(identity if perfect else torch.zeros_like(identity))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def reference_passes(model, store: ActivationStore, tokenizer, n_examples: int = 24) -> ReferencePasses:
    examples = list(range(n_examples))
    batches = length_grouped(examples, np.diff(store.doc_offsets), 8)
    passes = ReferencePasses(
        SplitModel(model, LAYER, "resid_post"), store, batches, ignored_token_ids(tokenizer), tokenizer.pad_token_id, {"test": 1}
    )
    passes.compute()
    return passes


def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean():
    x = torch.randn(500, 16) * 3 + 2
    perfect, mean = ReconstructionSums(16), ReconstructionSums(16)
    perfect.add(x, x)
    mean.add(x, x.mean(0).expand_as(x))
    assert perfect.metrics()["fvu"] == 0.0 and perfect.metrics()["cosine"] == pytest.approx(1.0)
    assert mean.metrics()["fvu"] == pytest.approx(1.0)


def test_fvu_is_not_measured_on_tokens_without_spread():
    """One held-out special token, or only BOS (the same activation in every example): FVU would divide by zero or noise."""
    x = torch.randn(1, 16) * 3 + 2
    for tokens in (x, x.expand(40, 16)):
        sums = ReconstructionSums(16)
        sums.add(tokens, tokens * 0.5)
        assert sums.metrics()["fvu"] is None and sums.metrics()["cosine"] == pytest.approx(1.0)


def test_a_held_out_split_without_content_tokens_has_no_sparsity_numbers(tiny_llama, smollm2_tokenizer, texts_file, tmp_path, capsys):
    """Examples cut to their first 6 tokens hold only the chat template: an SAE trained on content tokens has nothing to
    fire on there, which is not an L0 of 0 with every feature dead."""
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    extract = ExtractConfig(layers=[LAYER], dataset=str(texts_file), max_length=6, output_dir=str(tmp_path / "stores"))
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(extract.dataset), extract, "tiny")
    sae = hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu")
    checkpoint = sae.save(str(tmp_path / "SAE_M=32_K=4.pt"))
    (results,) = evaluate_sae(
        EvalConfig(checkpoint=[checkpoint], store=str(store), validation_fraction=0.3, seed=0, model_metrics=False, device="cpu")
    )
    saved = json.loads((results_folder(checkpoint) / "eval.json").read_text())
    assert saved["reconstruction"]["content"] == {"tokens": 0} and saved["reconstruction"]["special"]["tokens"] > 0
    assert saved["sparsity"]["tokens"] == 0 and saved["sparsity"]["l0_mean"] is None and saved["sparsity"]["never_fired_fraction"] is None
    assert {row["metric"]: row["verdict"] for row in saved["health"]} == dict.fromkeys(
        ("ce_loss_score", "l0_mean", "never_fired_fraction", "dense_fraction"), "not measured"
    )
    assert "| never-fired / dense features | n/a / n/a |" in capsys.readouterr().out


def test_oracle_saes_score_one_and_zero(tiny_llama, tiny_store, smollm2_tokenizer):
    store = ActivationStore(tiny_store)
    passes = reference_passes(tiny_llama, store, smollm2_tokenizer)
    perfect_losses, perfect_sv = passes.evaluate(oracle_sae(store.d, perfect=True), False, "perfect")
    scores = perfect_losses.metrics()
    assert scores["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert scores["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert perfect_sv.metrics()["reconstruction_quality"]["cossim"] == pytest.approx(1.0, abs=1e-5)
    zero_losses, _ = passes.evaluate(oracle_sae(store.d, perfect=False), False, "zero")
    zero = zero_losses.metrics()  # reconstructing zeros everywhere is the zero-ablation
    assert zero["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert zero["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-5)


def full_forward_losses(model, batch: ModelBatch, replace, positions: CountedPositions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE and log-probs from a plain forward of the whole model, the hook's output replaced by `replace`."""
    module = hooked_module(model, LAYER, "resid_post")
    handle = None
    if replace is not None:
        handle = module.register_forward_hook(
            lambda mod, args, out: with_output_tensor(out, replace(output_tensor(out), positions.replaced))
        )
    try:
        with torch.no_grad():
            log_probs = model(input_ids=batch.input_ids, attention_mask=batch.attention).logits.float().log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    targets = torch.zeros_like(batch.input_ids)
    targets[:, :-1] = batch.input_ids[:, 1:]
    return -log_probs.gather(-1, targets[..., None])[..., 0], log_probs


def test_shared_prefix_passes_equal_three_full_forwards(tiny_llama, tiny_store, smollm2_tokenizer, trained_checkpoint):
    from fastsae.core.checkpoint import load_sae

    store = ActivationStore(tiny_store)
    sae = load_sae(trained_checkpoint).sae
    passes = reference_passes(tiny_llama, store, smollm2_tokenizer)
    losses, _ = passes.evaluate(sae, False, "shared prefix")
    sums = {name: 0.0 for name in ("clean", "sae", "zero", "kl_sae", "kl_zero")}
    counts = [0, 0]
    for entry in passes.entries:
        batch = ModelBatch(entry["input_ids"], entry["attention"])
        positions = CountedPositions.of(batch, passes.ignored, False)

        def splice(hidden, where):
            replaced = hidden.clone()
            replaced[where] = sae(hidden[where].float()).to(hidden.dtype)
            return replaced

        ce_clean, clean = full_forward_losses(tiny_llama, batch, None, positions)
        ce_sae, spliced = full_forward_losses(tiny_llama, batch, splice, positions)
        ce_zero, ablated = full_forward_losses(tiny_llama, batch, lambda hidden, where: torch.zeros_like(hidden), positions)
        for name, ce in (("clean", ce_clean), ("sae", ce_sae), ("zero", ce_zero)):
            sums[name] += float(ce[positions.next_token].double().sum())
        for name, other in (("kl_sae", spliced), ("kl_zero", ablated)):
            sums[name] += float((clean.exp() * (clean - other)).sum(-1)[positions.scored].double().sum())
        counts[0] += int(positions.next_token.sum())
        counts[1] += int(positions.scored.sum())
    ours = losses.metrics()
    performance, behaviour = ours["model_performance_preservation"], ours["model_behavior_preservation"]
    assert performance["ce_loss_without_sae"] == pytest.approx(sums["clean"] / counts[0], rel=1e-5)
    assert performance["ce_loss_with_sae"] == pytest.approx(sums["sae"] / counts[0], rel=1e-5)
    assert performance["ce_loss_with_ablation"] == pytest.approx(sums["zero"] / counts[0], rel=1e-5)
    assert behaviour["kl_div_with_sae"] == pytest.approx(sums["kl_sae"] / counts[1], rel=1e-4)
    assert behaviour["kl_div_with_ablation"] == pytest.approx(sums["kl_zero"] / counts[1], rel=1e-4)
    assert performance["ce_loss_with_sae"] != performance["ce_loss_without_sae"]


def test_evaluate_writes_eval_json_with_the_saebench_block(trained_checkpoint, tiny_model_folder, capsys):
    (results,) = evaluate_sae(
        EvalConfig(checkpoint=[str(trained_checkpoint)], model_name=str(tiny_model_folder), model_tokens=1000, device="cpu")
    )
    saved = json.loads((trained_checkpoint.parent / "eval.json").read_text())
    assert saved["examples"] == 33 and len(saved["feature_density"]) == 128
    assert saved["sparsity"]["l0_mean"] == pytest.approx(8, abs=0.5)
    content = saved["reconstruction"]["content"]
    training_metrics = json.loads((trained_checkpoint.parent / "metrics.json").read_text())["final"]
    assert content["fvu"] == pytest.approx(training_metrics["fvu"], rel=1e-3)  # the same held-out tokens as training's validation
    assert saved["fast_token_mse"]["log2"] == pytest.approx(np.log2(saved["fast_token_mse"]["raw"]))
    core = saved["saebench_core"]
    metrics = core["eval_result_metrics"]
    assert core["eval_type_id"] == "core" and len(core["eval_result_details"]) == 128
    assert core["eval_config"]["exclude_special_tokens_from_reconstruction"] is True  # auto: the SAE was trained without them
    assert 0 < saved["model_tokens"]["tokens"] <= 1000
    assert metrics["token_stats"]["total_tokens_eval_sparsity_variance"] <= saved["model_tokens"]["tokens"]
    score = metrics["model_performance_preservation"]["ce_loss_score"]
    low, high = saved["saebench_core_intervals_95"]["ce_loss_score"]
    assert low <= score <= high  # (the tiny random Llama predicts almost uniformly: its score is noise, see test_saebench_core)
    assert metrics["sparsity"]["l0"] == pytest.approx(8, abs=0.5)
    assert {row["metric"] for row in saved["health"]} == {"ce_loss_score", "l0_mean", "never_fired_fraction", "dense_fraction"}
    assert all(row["source"] for row in saved["health"])
    assert (trained_checkpoint.parent / "feature_density.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| model_performance_preservation | ce_loss_score |" in printed and "FAST token MSE, raw / log2" in printed
    assert results["saebench_core"]["eval_result_metrics"] == metrics


def test_a_sweep_shares_the_passes_and_reruns_reuse_them_until_model_store_or_split_change(
    tiny_store, tiny_model_folder, smollm2_tokenizer, tmp_path, capsys
):
    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path / "runs"), sweep=["topk:64:4", "topk:128:8"], batch_size=256, epochs=2.0
    )
    checkpoints = [result["checkpoint"] for result in train_saes(config)]
    settings = dict(model_name=str(tiny_model_folder), model_tokens=600, device="cpu")
    first = evaluate_sae(EvalConfig(checkpoint=checkpoints, **settings))
    assert [r["model_tokens"]["reused_reference_passes"] for r in first] == [False, False]  # computed once, in memory for both
    for checkpoint in checkpoints:  # each file names its own checkpoint, and the split the -1 settings resolved to
        saved = json.loads((Path(checkpoint).parent / "eval.json").read_text())
        assert saved["checkpoint"] == saved["settings"]["checkpoint"] == checkpoint
        assert saved["split"] == {"validation_fraction": 0.1, "seed": config.seed, "examples": 330, "held_out_examples": 33}
        assert saved["checkpoint_state"]["training_finished"] is True and saved["checkpoint_state"]["step"] > 0
    assert "| checkpoint | FVU (content) |" in capsys.readouterr().out  # the sweep table
    cache_files = list((tiny_store / "evaluation_cache").glob("*.pt"))
    rerun = evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], **settings))[0]
    assert rerun["model_tokens"]["reused_reference_passes"]
    assert rerun["saebench_core"]["eval_result_metrics"] == first[0]["saebench_core"]["eval_result_metrics"]
    other_split = evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], seed=7, **settings))[0]
    assert not other_split["model_tokens"]["reused_reference_passes"]
    other_model = tmp_path / "other-tiny-llama"
    make_tiny_llama(len(smollm2_tokenizer), seed=1).save_pretrained(other_model)
    smollm2_tokenizer.save_pretrained(other_model)
    assert not evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], **{**settings, "model_name": str(other_model)}))[0]["model_tokens"][
        "reused_reference_passes"
    ]
    manifest_path = tiny_store / "manifest.json"
    original = manifest_path.read_text()
    try:  # the same folder re-extracted from other data
        manifest = json.loads(original)
        manifest["dataset"]["fingerprint"] = "0000000000000000"
        manifest_path.write_text(json.dumps(manifest))
        assert not evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], **settings))[0]["model_tokens"]["reused_reference_passes"]
    finally:
        manifest_path.write_text(original)
    # Four sets of passes were made; the three most recently used stay, so the first setting's are gone.
    assert len(list((tiny_store / "evaluation_cache").glob("*.pt"))) == KEPT_REFERENCE_PASSES
    assert not any(path.exists() for path in cache_files)
    assert not evaluate_sae(EvalConfig(checkpoint=checkpoints[:1], **settings))[0]["model_tokens"]["reused_reference_passes"]


def test_a_hypothesaes_checkpoint_is_evaluated_given_its_store(tiny_store, tiny_model_folder, tmp_path):
    torch.manual_seed(0)
    theirs = hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu")
    path = Path(theirs.save(str(tmp_path / "SAE_M=32_K=4.pt")))
    with pytest.raises(UserError, match="Pass --store"):
        evaluate_sae(EvalConfig(checkpoint=[str(path)], model_metrics=False))
    (results,) = evaluate_sae(
        EvalConfig(
            checkpoint=[str(path)],
            store=str(tiny_store),
            model_name=str(tiny_model_folder),
            validation_fraction=0.1,
            seed=0,
            model_tokens=500,
        )
    )
    core = results["saebench_core"]["eval_result_metrics"]
    assert results["sparsity"]["l0_mean"] <= 4 and core["sparsity"]["l0"] <= 4
    assert results["saebench_core"]["eval_config"]["exclude_special_tokens_from_reconstruction"] is True  # no training record: as ours


def test_an_sae_absorption_cannot_measure_is_refused_before_any_evaluation(tiny_store, tmp_path):
    """A HypotheSAEs checkpoint records no hook: absorption cannot probe it, and says so before the core metrics run,
    not after they have written eval.json (in a sweep, after every SAE before it)."""
    path = hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu").save(str(tmp_path / "SAE_M=32_K=4.pt"))
    config = EvalConfig(checkpoint=[path], store=str(tiny_store), evals=["core", "absorption"], model_metrics=False, device="cpu")
    with pytest.raises(UserError, match="absorption needs a residual-stream-like hook .* Leave absorption out of EVALS"):
        evaluate_sae(config)
    assert not (results_folder(path) / "eval.json").exists() and not results_folder(path).exists()


def test_a_sweep_table_tells_checkpoints_of_the_same_name_apart(tiny_store, tmp_path, capsys):
    """Two runs' SAE_M=32_K=4.pt (and folder SAEs named like sparsify's layers.2) were rows of one name."""
    checkpoints = []
    for run in ("run.a", "run.b"):
        (tmp_path / run).mkdir()
        checkpoints.append(hypothesaes_module().SparseAutoencoder(64, 32, 4, device="cpu").save(str(tmp_path / run / "SAE_M=32_K=4.pt")))
    evaluate_sae(EvalConfig(checkpoint=checkpoints, store=str(tiny_store), validation_fraction=0.1, seed=0, model_metrics=False))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| run.")]
    assert [row.split(" | ")[0] for row in rows] == ["| run.a/SAE_M=32_K=4.pt", "| run.b/SAE_M=32_K=4.pt"]


def test_mismatches_and_missing_validation_get_clear_errors(tiny_store, trained_checkpoint, tmp_path, smollm2_tokenizer):
    small = hypothesaes_module().SparseAutoencoder(32, 16, 2, device="cpu")
    wrong_width = Path(small.save(str(tmp_path / "SAE_M=16_K=2.pt")))
    with pytest.raises(UserError, match="d=32 but the store .* has d=64"):
        evaluate_sae(EvalConfig(checkpoint=[str(wrong_width)], store=str(tiny_store), model_metrics=False))
    with pytest.raises(UserError, match="no validation examples"):  # a training run without a validation split
        validation_examples(ExampleSplit.by_example(60, 0.0, 0))
    with pytest.raises(UserError, match="auto, true or false"):
        EvalConfig(exclude_special_tokens_from_reconstruction="yes")
    two_blocks = tmp_path / "two-block-llama"
    save_tiny_llama_with_blocks(two_blocks, smollm2_tokenizer, 2)
    with pytest.raises(UserError, match="layer 2 is out of range"):  # the store's hook is in block 2
        evaluate_sae(EvalConfig(checkpoint=[str(trained_checkpoint)], model_name=str(two_blocks), device="cpu"))


def test_a_store_of_another_hook_is_refused_before_anything_is_written(tiny_llama, smollm2_tokenizer, trained_checkpoint, tmp_path):
    """A store at block 3 for an SAE trained at block 2: it was evaluated there, with a warning, and its eval.json
    replaced by numbers of the SAE read where it learned nothing."""
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    config = ExtractConfig(layers=[LAYER + 1], max_examples=20, output_dir=str(tmp_path / "stores"))
    (other_hook,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    copy = tmp_path / "run" / trained_checkpoint.name
    copy.parent.mkdir()
    copy.write_bytes(trained_checkpoint.read_bytes())
    message = rf"trained at blocks.{LAYER}.hook_resid_post, but the store at .* holds blocks.{LAYER + 1}.hook_resid_post.* Pass a --store"
    with pytest.raises(UserError, match=message):
        evaluate_sae(EvalConfig(checkpoint=[str(copy)], store=str(other_hook), model_metrics=False))
    assert sorted(path.name for path in copy.parent.iterdir()) == [copy.name]


def test_a_misspelt_evaluation_is_refused_with_the_name_it_resembles():
    with pytest.raises(UserError, match=r"got \['core', 'sparse_probng'\]\. Did you mean sparse_probing \(not 'sparse_probng'\)\?$"):
        EvalConfig(evals=["core", "sparse_probng"])
    with pytest.raises(UserError, match=r"Did you mean absorption \(not 'Absorption'\)\?$"):
        EvalConfig(evals=["Absorption"])


def test_a_block_sae_is_evaluated_on_the_blocks_its_training_held_out(tiny_block_store, tmp_path):
    """Training, evaluation and their records share one split: in a block store, by text (blocks sharing a text with
    both sides in neither)."""
    config = TrainConfig(store=str(tiny_block_store), output_dir=str(tmp_path), m=32, k=4, batch_size=256, max_tokens=2048)
    run = TrainingRun(config)
    (result,) = run.run()
    (results,) = evaluate_sae(EvalConfig(checkpoint=[result["checkpoint"]], model_metrics=False, device="cpu"))
    split = run.train_source.split
    assert results["split"] == {"validation_fraction": 0.1, **split.record(0)} and results["split"]["left_out_examples"] > 0
    assert results["examples"] == int(split.is_validation.sum())
    assert results["reconstruction"]["content"]["tokens"] == int(
        split.token_mask(run.store, 0, run.store.n_tokens, validation=True)[~run.store.special_mask(0, run.store.n_tokens)].sum()
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"validation_fraction": 1.5},
            r"VALIDATION_FRACTION must be -1 \(the training run's split\) or between 0 and 1, e.g. 0.1; got 1.5",
        ),
        ({"validation_fraction": 0.0}, "VALIDATION_FRACTION must be -1"),
        ({"validation_fraction": -0.5}, "VALIDATION_FRACTION must be -1"),
        ({"seed": -2}, r"SEED must be -1 \(the training run's\) or at least 0; got -2"),
        ({"max_examples": -3}, r"MAX_EXAMPLES must be at least 0 \(0: every held-out example\); got -3"),
    ],
)
def test_out_of_range_split_settings_are_refused(setting, message):
    """A fraction of 1.5 would evaluate on training examples too, and MAX_EXAMPLES = -3 would drop the last three."""
    with pytest.raises(UserError, match=message):
        EvalConfig(**setting)
    EvalConfig(validation_fraction=0.2, seed=0, max_examples=0)  # in range, and the sentinels: accepted
    EvalConfig(validation_fraction=-1, seed=-1)


def test_a_checkpoint_listed_twice_is_evaluated_once_and_a_perfect_reconstruction_has_no_log2():
    """Listed twice, it was evaluated twice and had two rows in the sweep's table; an MSE of 0 wrote -Infinity, which
    strict JSON readers refuse."""
    assert EvalConfig(checkpoint=["a.pt", "b.pt", "a.pt"]).checkpoint == ["a.pt", "b.pt"]
    assert EvalConfig(checkpoint="a/a.pt").checkpoint == ["a/a.pt"]  # one checkpoint given from Python
    assert fast_token_mse([0.0, 0.0], d=4) == {"raw": 0.0, "log2": None}
    assert fast_token_mse([8.0], d=4) == {"raw": 2.0, "log2": 1.0}
