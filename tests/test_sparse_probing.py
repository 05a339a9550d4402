"""Sparse probing finds what was planted: a store whose label-L examples carry direction e_L, read by an SAE whose
feature L reads e_L. Each label's probe ranks its planted feature first and separates at k = 1; labels drawn
independently of the activations stay at chance; BOS (here pointing at another label's direction) stays out of the
pooling, a template token the store marks special counts, as in SAEBench's; data without labels is skipped, and
sparse_probing.json says so."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import save_checkpoint
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.sae_info import SAEInfo
from fastsae.core.trained_sae import TrainedSAE
from fastsae.evaluate.evaluate_sae import EvalConfig, EvaluateStage, evaluate_sae
from fastsae.evaluate.sparse_probing import (
    MULTICLASS,
    SPARSE_PROBING_FILE,
    SPARSE_PROBING_PLOT_FILE,
    balanced_one_vs_rest,
    pool_examples,
    read_probe_choices,
    run_sparse_probing,
    score_key,
)
from fastsae.store.activation_store import ActivationStore, ActivationStoreWriter, plan_shards
from fastsae.store.batches import ExampleSplit

LABELS = ["alpha", "beta", "gamma", "delta"]  # label i is planted along e_i and read by feature i
D, M = 16, 12  # features 4..11 read random directions
PER_LABEL = 60
SIGNAL, BOS_NORM = 3.0, 60.0
SEED, FRACTION = 0, 0.25
BOS_ID, TEMPLATE_ID, CONTENT_ID = 1, 9, 7  # SmolLM2's BOS; any other ids


def write_planted_store(
    folder: Path,
    labels_follow_activations: bool = True,
    labelled: bool = True,
    training_only: int = 0,
    packing: str = "sequential",
    model_name: str | None = None,
) -> ActivationStore:
    """PER_LABEL examples per label, each a BOS (special; norm BOS_NORM along the *next* label's direction), a template
    token (special, not BOS) then 3-10 content tokens, those of noise + SIGNAL · e_label. With
    `labels_follow_activations` false, the labels written are drawn independently of the directions planted; the first
    `training_only` training examples are labelled "rare"; `packing` and `model_name` are the manifest's."""
    generator = np.random.default_rng(0)
    planted = np.repeat(np.arange(len(LABELS)), PER_LABEL)
    generator.shuffle(planted)
    written = planted if labels_follow_activations else generator.permutation(planted)
    lengths = generator.integers(5, 13, len(planted))
    activations, special, ids = [], [], []
    for label, length in zip(planted, lengths):
        tokens = generator.normal(0, 0.5, (length, D))
        tokens[1:, label] += SIGNAL
        tokens[0] = 0.0
        tokens[0, (label + 1) % len(LABELS)] = BOS_NORM
        activations.append(tokens)
        special.append(np.arange(length) < 2)
        ids.append(np.array([BOS_ID, TEMPLATE_ID] + [CONTENT_ID] * (length - 2), dtype=np.int32))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shards = plan_shards(lengths.tolist(), shard_tokens=300)  # several shards: pooling streams across them
    records = [{"row": i, "source": f"row {i}", "label": LABELS[label] if labelled else None} for i, label in enumerate(written)]
    for i in np.flatnonzero(~ExampleSplit.by_example(len(planted), FRACTION, SEED).is_validation)[:training_only]:
        records[i]["label"] = "rare"
    writer = ActivationStoreWriter(
        folder,
        {"test": 1},
        {"model": "planted", "model_name": model_name, "hook_name": "planted", "d": D, "dtype": "float32", "packing": packing},
        shards,
        offsets,
        records,
    )
    x, mask, token_ids = np.concatenate(activations).astype(np.float32), np.concatenate(special), np.concatenate(ids)
    for index, shard in enumerate(shards):
        rows = slice(shard.first_token, shard.first_token + shard.n_tokens)
        writer.write_shard(index, torch.from_numpy(x[rows]), token_ids[rows], mask[rows])
    writer.finish("now", 1)
    return ActivationStore(folder)


def planted_sae() -> SparseAutoencoder:
    """A ReLU SAE whose feature i < 4 is relu(x_i − 1): it fires on label i's content tokens and rarely elsewhere."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec("relu", D, M, 0)).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(D)[: len(LABELS)], torch.nn.functional.normalize(torch.randn(M - len(LABELS), D), dim=1)]))
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    return sae


def trained(folder: Path, store: ActivationStore) -> TrainedSAE:
    info = SAEInfo(spec=planted_sae().spec, store=str(store.folder), training={"validation_fraction": FRACTION, "seed": SEED})
    return TrainedSAE(folder / "SAE_M=12_K=0.pt", planted_sae(), info, folder)


def probe(folder: Path, store: ActivationStore, k_values=(1, 2, 5)) -> dict:
    split = ExampleSplit.by_example(store.n_examples, FRACTION, SEED)
    return run_sparse_probing(trained(folder, store), store, split, SEED, {BOS_ID}, list(k_values))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("planted")
    return folder, probe(folder, write_planted_store(folder / "store"))


def test_pooling_leaves_out_bos_eos_and_padding_ids_and_counts_the_other_special_tokens(tmp_path):
    """SAEBench's pooled set (`get_bos_pad_eos_mask`): a template token the store marks special counts, BOS does not."""
    store = write_planted_store(tmp_path / "store")
    examples = np.array([0, 1, 5])
    pooled = pool_examples(store, planted_sae(), examples, {BOS_ID, 2}, context_length=0)
    for row, example in enumerate(examples):
        x = store.example(int(example)).activations.float()
        torch.testing.assert_close(pooled.raw_ND[row], x[1:].mean(0))  # the template token in, BOS out
        torch.testing.assert_close(pooled.features_NM[row], planted_sae().encode(x[1:]).mean(0))
    cut = pool_examples(store, planted_sae(), examples, {BOS_ID}, context_length=3)
    torch.testing.assert_close(cut.raw_ND[0], store.example(0).activations.float()[1:3].mean(0))


def test_each_label_uses_its_planted_feature_and_separates_at_k_1(planted):
    _, results = planted
    assert results["labels"] == sorted(LABELS)
    for label in LABELS:
        task = results["tasks"][label]
        assert task["features"][0]["feature"] == LABELS.index(label), label
        assert task["features"][0]["mean_difference"] > 1.0
        assert task["sae_top_1_test_accuracy"] >= 0.95 and task["sae_top_1_test_auroc"] >= 0.99, label
        assert task["ceiling_test_accuracy"] >= 0.95
        assert task["test_examples"] % 2 == 0 and task["train_examples"] % 2 == 0  # balanced: as many others as positives
    multiclass = results["tasks"][MULTICLASS]
    assert {f["feature"] for f in multiclass["features"][: len(LABELS)]} == set(range(len(LABELS)))
    assert multiclass["multiclass_top_1_test_accuracy"] < 0.6  # one feature tells one label from the rest, not four apart
    assert multiclass["multiclass_top_5_test_accuracy"] >= 0.95
    assert results["mean_over_labels"]["sae_top_1_test_accuracy"] >= 0.95


def test_labels_independent_of_the_activations_stay_at_chance(tmp_path):
    results = probe(tmp_path, write_planted_store(tmp_path / "store", labels_follow_activations=False))
    means = results["mean_over_labels"]
    for key in ("sae_top_1_test_accuracy", "sae_top_5_test_accuracy", "ceiling_test_accuracy"):
        assert 0.3 <= means[key] <= 0.7, (key, means[key])
    assert 0.1 <= results["tasks"][MULTICLASS]["multiclass_top_5_test_accuracy"] <= 0.45  # four labels: chance 0.25


def test_only_the_numbers_saebench_defines_carry_its_names(planted):
    """SAEBench probes each class of a multiclass label set against the rest and names those accuracies (and their mean)
    sae_top_{k}_test_accuracy; our multiclass probe is another number, so it must not carry that name."""
    _, results = planted
    multiclass = results["tasks"][MULTICLASS]
    assert not [key for key in multiclass if key.startswith(("sae_", "ceiling_"))]
    assert set(multiclass) >= {f"multiclass_top_{k}_test_{m}" for k in results["k_values"] for m in ("accuracy", "auroc")}
    assert {"multiclass_ceiling_test_accuracy", "multiclass_ceiling_test_auroc"} <= set(multiclass)
    for label in results["labels"]:
        assert {f"sae_top_{k}_test_accuracy" for k in results["k_values"]} | {"ceiling_test_accuracy"} <= set(results["tasks"][label])
        assert not [key for key in results["tasks"][label] if key.startswith("multiclass_")]


def test_outputs_beside_the_checkpoint_and_the_dashboard_reader(planted, capsys):
    folder, results = planted
    assert json.loads((folder / SPARSE_PROBING_FILE).read_text())["tasks"] == json.loads(json.dumps(results["tasks"]))
    assert (folder / SPARSE_PROBING_PLOT_FILE).stat().st_size > 0
    sae = trained(folder, ActivationStore(folder / "store"))
    choices = read_probe_choices(sae)
    assert [(choice["task"], choice["rank"]) for choice in choices[1] if choice["rank"] == 1] == [("beta", 1)]
    assert read_probe_choices(replace(sae, results_folder=folder / "elsewhere")) == {}


def test_results_about_other_weights_are_refused(planted):
    """sparse_probing.json records the weights it probed: once the SAE is retrained (or trained further), the dashboard
    would show another SAE's probe choices as this one's."""
    folder, _ = planted
    retrained = trained(folder, ActivationStore(folder / "store"))
    with torch.no_grad():
        retrained.sae.W_dec[0] += 1.0
    with pytest.raises(UserError, match=r"sparse_probing.json describes other weights than those in .* Rerun evaluate_sae.py on it"):
        read_probe_choices(retrained)
    damaged = replace(retrained, results_folder=folder / "damaged")
    damaged.results_folder.mkdir()
    (damaged.results_folder / SPARSE_PROBING_FILE).write_text('{"tasks": {"alpha"')
    with pytest.raises(UserError, match=r"sparse_probing.json is not readable JSON: rerun evaluate_sae.py"):
        read_probe_choices(damaged)


def test_a_label_on_one_side_only_is_dropped_logged_and_recorded(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fastsae.evaluate.sparse_probing"):
        results = probe(tmp_path, write_planted_store(tmp_path / "store", training_only=5))
    assert results["labels"] == sorted(LABELS) and results["dropped_labels"] == {"rare": {"train": 5, "test": 0}}
    assert "rare (5 training, 0 held-out)" in caplog.text
    multiclass = results["tasks"][MULTICLASS]  # every example of the labels that take part
    assert results["examples"] == {"train": multiclass["train_examples"], "test": multiclass["test_examples"]}


def test_features_with_no_difference_are_not_listed_as_chosen(tmp_path, capsys):
    store = write_planted_store(tmp_path / "store")
    dead = trained(tmp_path, store)
    with torch.no_grad():
        dead.sae.b_enc[8:] = -1e6  # features 8..11 never fire: no difference on any label
    results = run_sparse_probing(dead, store, ExampleSplit.by_example(store.n_examples, FRACTION, SEED), SEED, {BOS_ID}, [1, M])
    for name, task in results["tasks"].items():
        listed = [f["feature"] for f in task["features"]]
        assert not set(listed) & {8, 9, 10, 11} and all(f["mean_difference"] != 0 for f in task["features"]), name
        assert task[score_key(name == MULTICLASS, M, "accuracy")] >= 0.95  # the probes still read all M
    assert not set(read_probe_choices(dead)) & {8, 9, 10, 11}
    table_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| alpha |")]
    assert table_rows and not any(f"{feature}+" in table_rows[0] or f"{feature}−" in table_rows[0] for feature in (8, 9, 10, 11))


def test_the_table_shows_each_task_at_each_k(tmp_path, capsys):
    probe(tmp_path, write_planted_store(tmp_path / "store"), k_values=(1, 3, 50))  # k above M=12 reads all 12
    printed = capsys.readouterr().out
    assert "| task | train / test | ceiling (all d) | k=1 | k=3 | k=12 | top features |" in printed
    assert all(f"| {label} |" in printed for label in LABELS) and MULTICLASS in printed and "mean over labels" in printed


def test_data_without_labels_is_skipped_and_says_so(tmp_path, caplog):
    store = write_planted_store(tmp_path / "store", labelled=False)
    (tmp_path / SPARSE_PROBING_PLOT_FILE).write_bytes(b"an earlier run's plot")
    with caplog.at_level(logging.INFO, logger="fastsae.evaluate.sparse_probing"):
        result = probe(tmp_path, store)
    reason = f"the data in {store.folder} has no labels; it needs a label per example (LABEL_FIELD in extract_activations.py)"
    assert [record.message for record in caplog.records if "skipped" in record.message] == [f"Sparse probing skipped: {reason}."]
    assert result["status"] == "skipped" and result["reason"] == reason
    assert json.loads((tmp_path / SPARSE_PROBING_FILE).read_text()) == result  # so the pipeline sees the step done
    assert result["split"] == ExampleSplit.by_example(store.n_examples, FRACTION, SEED).record(SEED)  # which examples it would have used
    assert not (tmp_path / SPARSE_PROBING_PLOT_FILE).exists()
    assert read_probe_choices(trained(tmp_path, store)) == {}


def test_a_block_packed_store_is_skipped_with_the_packing_to_extract_it_with(tmp_path):
    store = write_planted_store(tmp_path / "store", labelled=False, packing="block")  # a block's records carry no label
    result = probe(tmp_path, store)
    assert result["status"] == "skipped"
    assert result["reason"] == (
        f'{store.folder} was extracted with PACKING = "block": its blocks mix examples, so no block has one label; '
        'extract the store again with PACKING = "sequential" (extract_activations.py)'
    )


def test_balancing_draws_as_many_others_as_positives_spread_over_the_other_labels():
    rows = {"a": np.arange(0, 9), "b": np.arange(9, 100), "c": np.arange(100, 200)}
    chosen, targets = balanced_one_vs_rest(rows, "a", torch.Generator().manual_seed(0))
    negatives = chosen[targets == 0]
    assert (targets == 1).sum() == 9 and len(negatives) == 9
    assert 4 <= (negatives < 100).sum() <= 5  # ceil(9 / 2) drawn from each of b and c, then 9 of those 10 kept
    assert len(set(chosen)) == 18


def test_a_label_outnumbering_the_rest_keeps_a_random_draw_of_its_positives():
    rows = {"a": np.arange(0, 900), "b": np.arange(900, 950), "c": np.arange(950, 1000)}
    chosen, targets = balanced_one_vs_rest(rows, "a", torch.Generator().manual_seed(0))
    positives = chosen[targets == 1]
    assert len(positives) == 100 and len(set(positives)) == 100 and (chosen[targets == 0] >= 900).all()
    assert positives.max() > 450 and (positives < 300).sum() < 60  # spread over the label, not its first 100 rows
    again, _ = balanced_one_vs_rest(rows, "a", torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(chosen, again)  # seeded


def test_evaluate_runs_only_the_evaluations_named(tmp_path, tiny_model_folder):
    store = write_planted_store(tmp_path / "store", model_name=str(tiny_model_folder))  # whose tokenizer names BOS_ID
    checkpoint = tmp_path / "SAE_M=12_K=0" / "SAE_M=12_K=0.pt"  # as train_sae.py lays it out
    save_checkpoint(checkpoint, planted_sae(), 0, trained(tmp_path, store).info)
    config = EvalConfig(checkpoint=[str(checkpoint)], evals=["sparse_probing"], probing_k=[1, 2], device="cpu")
    (results,) = evaluate_sae(config)
    assert results["sparse_probing"]["tasks"]["alpha"]["sae_top_1_test_accuracy"] >= 0.95
    saved = json.loads((checkpoint.parent / SPARSE_PROBING_FILE).read_text())
    assert (saved["checkpoint"], saved["store"]) == (str(checkpoint), str(store.folder))
    n_held_out = round(store.n_examples * FRACTION)  # the training run's split, recorded in the checkpoint
    assert saved["split"] == {"seed": SEED, "examples": store.n_examples, "held_out_examples": n_held_out}
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == sorted(
        [checkpoint.name, SPARSE_PROBING_FILE, SPARSE_PROBING_PLOT_FILE]
    )
    stage = EvaluateStage()
    assert [output.path.name for output in stage.outputs(config, None)] == [SPARSE_PROBING_FILE]
    both = EvalConfig(checkpoint=[str(checkpoint)], evals=["core", "sparse_probing"])
    assert [output.path.name for output in stage.outputs(both, None)] == ["eval.json", "feature_density.png", SPARSE_PROBING_FILE]
    figures = dict(stage.key_figures(config, stage.outputs(config, None)))
    assert figures["sparse probing, mean over 4 labels"].startswith("top-1 accuracy 1.000")


def test_a_store_that_names_no_model_asks_for_the_model_whose_tokenizer_names_bos(tmp_path):
    store = write_planted_store(tmp_path / "store")
    checkpoint = tmp_path / "SAE_M=12_K=0" / "SAE_M=12_K=0.pt"  # as train_sae.py lays it out
    save_checkpoint(checkpoint, planted_sae(), 0, trained(tmp_path, store).info)
    with pytest.raises(UserError, match=r"does not name its model\. Pass --model-name: sparse probing pools over every token but"):
        evaluate_sae(EvalConfig(checkpoint=[str(checkpoint)], evals=["sparse_probing"], device="cpu"))
    assert not (checkpoint.parent / SPARSE_PROBING_FILE).exists()


def test_unknown_evaluations_are_refused():
    with pytest.raises(UserError, match="EVALS takes one or more of core, sparse_probing, absorption"):
        EvalConfig(evals=["sparse-probing"])


def test_a_task_size_of_one_and_a_negative_context_length_are_refused():
    with pytest.raises(UserError, match=r"be 0 \(all\) or at least 2 \(half of each task's examples come from its label\)"):
        EvalConfig(evals=["sparse_probing"], probing_train_examples=1)
    with pytest.raises(UserError, match=r"PROBING_CONTEXT_LENGTH must be 0 \(the whole example\) or positive; got -1"):
        EvalConfig(evals=["sparse_probing"], probing_context_length=-1)
