"""Our sparse probing equals what sae-bench 0.6.0's own sparse-probing code computes, on the same model, SAE, examples
and labels.

SAEBench's `run_eval` cannot run here: it downloads its own datasets. So its lower-level functions run on our data,
each as its `main.py` calls them:

0. Examples. `gather_dataset_from_df` (the builder of its AG News set) draws probe_train_set_size // 2 examples per
   class from a table of our labelled examples: ours keeps the same ones.
1. Pooling. SAEBench collects the tiny Llama's block-2 activations of our examples' tokens through TransformerLens
   (`get_all_llm_activations` with `mask_bos_pad_eos_tokens=True`, cut at a context length of 16 tokens and
   right-padded like its tokenised datasets; most examples are longer), then
   mean-pools them (`create_meaned_model_activations`) and a SAELens copy of our SAE's features
   (`get_sae_meaned_activations`). Ours pools the store. They agree to float32 noise (TransformerLens' forward is not
   Hugging Face's bit for bit). The examples are chat-templated, so the store marks more tokens special than
   SAEBench's BOS/EOS/pad ids (the test checks that precondition): SAEBench's means count the template's others.
2. Probes. After `torch.manual_seed(seed)`, per label: `prepare_probe_data` (balancing) on the training and held-out
   sides, then for each k `get_top_k_mean_diff_mask` (ranking) and `train_sklearn_probe` (the probe and its test
   accuracy); the ceiling is `train_sklearn_probe` on all d raw pooled activations. Run on *our* pooled tensors they
   pick the same examples, the same features and give the same accuracies exactly; run on SAEBench's own pooled
   tensors, too (the float32 noise of step 1 moves no feature past another and no example across a decision boundary).
3. End to end: SAEBench's `train_probe_on_activations(select_top_k=k)` (balancing, ranking and probe in one call, as
   `run_eval_single_dataset` calls it) on its own pooled features gives our accuracies per label.

Not compared: SAEBench's `llm_test_accuracy` and `sae_test_accuracy` (a torch probe whose best epoch is picked on the
test set; our ceiling is a scikit-learn probe that never sees it), and our AUROCs and multiclass task, which SAEBench
does not compute.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import sae_bench.evals.sparse_probing.probe_training as saebench_probes
import sae_bench.sae_bench_utils.activation_collection as saebench_activations
import sae_bench.sae_bench_utils.dataset_info as dataset_info
import sae_bench.sae_bench_utils.dataset_utils as saebench_datasets
import torch

from fastsae.core.saelens_export import saelens_weights
from fastsae.core.trained_sae import open_trained_sae
from fastsae.evaluate.saebench_core import ignored_token_ids
from fastsae.evaluate.sparse_probing import PooledExamples, pool_examples, probe_labels, probing_examples
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.lm.data import load_dataset
from fastsae.store.activation_store import ActivationStore
from fastsae.store.batches import ExampleSplit
from fastsae.train.train_sae import TrainConfig, train_saes
from saebench_reference import hooked_transformer_from_hf, saelens_sae

LAYER = 2
K_VALUES = [1, 2, 5, 20]
CONTEXT_LENGTH = 40  # past the chat template's opening (the default system prompt) and below most examples' lengths


@pytest.fixture(scope="module")
def probing_run(tmp_path_factory, tiny_llama, smollm2_tokenizer) -> dict:
    """A chat-templated float32 store of the default dataset through the tiny Llama, a Top-K SAE trained on it, and our probes."""
    folder = tmp_path_factory.mktemp("probing")
    config = ExtractConfig(layers=[LAYER], chat_template="auto", storage_dtype="float32", output_dir=str(folder / "stores"))
    (store_folder,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    training = TrainConfig(store=str(store_folder), output_dir=str(folder / "runs"), m=128, k=8, batch_size=256, epochs=2.0)
    trained = open_trained_sae(train_saes(training)[0]["checkpoint"])
    store = ActivationStore(store_folder)
    seed = trained.info.seed
    names = np.array([record["label"] for record in store.example_records()], dtype=object)
    split = ExampleSplit.by_example(store.n_examples, trained.info.validation_fraction, seed)
    train_rows, test_rows = probing_examples(list(names), split, seed, 0, 0)
    ignored = ignored_token_ids(smollm2_tokenizer)
    train = pool_examples(store, trained.sae, train_rows, ignored, CONTEXT_LENGTH)
    test = pool_examples(store, trained.sae, test_rows, ignored, CONTEXT_LENGTH)
    labels = sorted(set(names))
    tasks = probe_labels(train, names[train.examples], test, names[test.examples], labels, K_VALUES, seed)
    return {
        "store": store,
        "trained": trained,
        "names": names,
        "split": split,
        "train": train,
        "test": test,
        "labels": labels,
        "tasks": tasks,
        "seed": seed,
    }


def by_label(pooled: PooledExamples, names: np.ndarray, labels: list[str]) -> dict[str, torch.Tensor]:
    """Our pooled examples as SAEBench holds them: per label, [raw | features] rows in store order."""
    both = torch.cat([pooled.raw_ND, pooled.features_NM], dim=1)
    return {label: both[torch.from_numpy(names[pooled.examples] == label)] for label in labels}


def saebench_pooled(run: dict, pooled: PooledExamples, tiny_llama, tokenizer) -> dict[str, torch.Tensor]:
    """SAEBench's pooling of the same examples: its activation collection through TransformerLens, its means."""
    store, names = run["store"], run["names"]
    model = hooked_transformer_from_hf(tiny_llama)
    # SAEBench reads the BOS, EOS and pad ids off `model.tokenizer`; the ids are all it needs.
    model.tokenizer = SimpleNamespace(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, padding_side="right"
    )
    tokens = {}
    for label in run["labels"]:
        examples = pooled.examples[names[pooled.examples] == label]
        # Cut at its context_length, as `tokenize_data_dictionary`'s truncation=True, max_length=context_length cuts.
        ids = [torch.from_numpy(store.example(int(index)).token_ids[:CONTEXT_LENGTH].astype(np.int64)) for index in examples]
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id)
        tokens[label] = {"input_ids": input_ids, "attention_mask": (input_ids != tokenizer.pad_token_id).long()}
    acts_BLD = saebench_activations.get_all_llm_activations(
        tokens, model, 32, LAYER, f"blocks.{LAYER}.hook_resid_post", mask_bos_pad_eos_tokens=True
    )
    sae = saelens_sae(
        saelens_weights(run["trained"].sae), "topk", run["trained"].sae.spec.k, f"blocks.{LAYER}.hook_resid_post", "tiny", 512
    )
    raw = saebench_activations.create_meaned_model_activations(acts_BLD)
    features = saebench_activations.get_sae_meaned_activations(acts_BLD, sae, 125)
    return {label: torch.cat([raw[label], features[label]], dim=1) for label in run["labels"]}


def saebench_probe_results(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor], d: int, seed: int) -> dict[str, dict]:
    """SAEBench's balancing, ranking and probe per label, on [raw | features] rows: the chosen features and accuracies."""
    torch.manual_seed(seed)
    results = {}
    for label in train:
        train_acts, train_y = saebench_probes.prepare_probe_data(train, label)
        test_acts, test_y = saebench_probes.prepare_probe_data(test, label)
        _, ceiling = saebench_probes.train_sklearn_probe(train_acts[:, :d], train_y, test_acts[:, :d], test_y)
        results[label] = {"ceiling_test_accuracy": ceiling}
        train_features, test_features = train_acts[:, d:].contiguous(), test_acts[:, d:].contiguous()
        # Ours lists a label's chosen features less those with no mean difference (they carry nothing of it).
        positive = train_y == dataset_info.POSITIVE_CLASS_LABEL
        differs = train_features[positive].mean(0) != train_features[~positive].mean(0)
        for k in K_VALUES:
            mask = saebench_probes.get_top_k_mean_diff_mask(train_features, train_y, k)
            _, accuracy = saebench_probes.train_sklearn_probe(
                saebench_probes.apply_topk_mask_reduce_dim(train_features, mask),
                train_y,
                saebench_probes.apply_topk_mask_reduce_dim(test_features, mask),
                test_y,
            )
            results[label][f"sae_top_{k}_test_accuracy"] = accuracy
            results[label][f"top_{k}_features"] = set(torch.nonzero(~mask & differs).flatten().tolist())
    return results


def assert_same_probes(ours: dict[str, dict], theirs: dict[str, dict]) -> None:
    for label, expected in theirs.items():
        for k in K_VALUES:
            assert {f["feature"] for f in ours[label]["features"][:k]} == expected[f"top_{k}_features"], (label, k)
        for key, value in expected.items():
            if key.endswith("accuracy"):
                assert ours[label][key] == pytest.approx(value, abs=1e-12), (label, key)


def test_the_store_marks_more_tokens_special_than_saebench_masks_within_the_context(probing_run, smollm2_tokenizer):
    """So pooling over the store's content tokens alone would not be SAEBench's pooling: the comparisons below would fail."""
    store = probing_run["store"]
    within = np.concatenate([store.example(index).token_ids[:CONTEXT_LENGTH] for index in range(store.n_examples)])
    special = np.concatenate([store.example(index).special_mask[:CONTEXT_LENGTH] for index in range(store.n_examples)])
    masked = np.isin(within, sorted(ignored_token_ids(smollm2_tokenizer)))
    assert (masked <= special).all() and (special & ~masked).sum() > 2 * masked.sum()
    assert (~special).sum() > len(special) // 10  # and content tokens within the context too


@pytest.fixture(scope="module")
def saebench_side(probing_run, tiny_llama, smollm2_tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """SAEBench's pooling of our training and held-out examples."""
    return {side: saebench_pooled(probing_run, probing_run[side], tiny_llama, smollm2_tokenizer) for side in ("train", "test")}


def test_each_label_keeps_half_a_task_drawn_as_saebench_dataset_builders_draw(probing_run):
    """SAEBench's probe_train_set_size is a one-vs-rest task's size: `gather_dataset_from_df` draws half of it per class
    (pandas' `sample` with the seed); ours draws the same examples. A label with fewer than half keeps them all."""
    names, split, seed = probing_run["names"], probing_run["split"], probing_run["seed"]
    sides = {"train": np.flatnonzero(~split.is_validation), "test": np.flatnonzero(split.is_validation)}
    labels = sorted(set(names))
    per_label = {side: max(1, min((names[examples] == label).sum() for label in labels) - 1) for side, examples in sides.items()}
    ours = dict(zip(sides, probing_examples(list(names), split, seed, 2 * per_label["train"], 2 * per_label["test"])))
    for side, examples in sides.items():
        frame = pd.DataFrame({"label": names[examples], "text": examples})
        theirs = saebench_datasets.gather_dataset_from_df(frame, labels, per_label[side], "label", "text", seed)
        for label in labels:
            assert set(ours[side][names[ours[side]] == label]) == set(theirs[label]), (side, label)
    # A task size above twice every label's count keeps every labelled example.
    everything = probing_examples(list(names), split, seed, 2 * len(names), 2 * len(names))
    np.testing.assert_array_equal(np.concatenate(everything), np.concatenate(list(sides.values())))


def test_pooling_equals_saebench_activation_collection_and_means(probing_run, saebench_side):
    names, labels, store = probing_run["names"], probing_run["labels"], probing_run["store"]
    lengths = np.diff(store.doc_offsets)
    assert (lengths > CONTEXT_LENGTH).mean() > 0.5  # most examples are longer than the context, so a missing cut shows
    for side in ("train", "test"):
        theirs = saebench_side[side]
        ours = by_label(probing_run[side], names, labels)
        for label in labels:
            torch.testing.assert_close(ours[label], theirs[label], rtol=1e-4, atol=2e-5)
            assert ours[label][:, probing_run["store"].d :].count_nonzero() > 0


def test_probes_equal_saebench_functions_on_our_pooled_examples(probing_run):
    names, labels, d = probing_run["names"], probing_run["labels"], probing_run["store"].d
    theirs = saebench_probe_results(
        by_label(probing_run["train"], names, labels), by_label(probing_run["test"], names, labels), d, probing_run["seed"]
    )
    assert_same_probes(probing_run["tasks"], theirs)
    # A random model carries little of the labels, so most accuracies sit near chance; they still vary with the label
    # and k, so a different balance, ranking or probe would show.
    assert len({value for task in theirs.values() for key, value in task.items() if key.endswith("accuracy")}) > 5


def test_probes_equal_saebench_end_to_end_on_its_own_pooling(probing_run, saebench_side):
    d, seed, tasks = probing_run["store"].d, probing_run["seed"], probing_run["tasks"]
    train, test = saebench_side["train"], saebench_side["test"]
    assert_same_probes(tasks, saebench_probe_results(train, test, d, seed))
    train_features = {label: acts[:, d:].contiguous() for label, acts in train.items()}
    test_features = {label: acts[:, d:].contiguous() for label, acts in test.items()}
    # Its jaxtyping annotation binds `train_dataset_size` to one label's example count, and its own call of
    # `train_sklearn_probe` on the balanced set (twice that) then fails the runtime check (jaxtyping 0.3.11, beartype
    # 0.23): the undecorated function is the same code without that check; the functions it calls keep theirs.
    train_probe_on_activations = saebench_probes.train_probe_on_activations.__wrapped__
    for k in K_VALUES:
        torch.manual_seed(seed)
        _, accuracies = train_probe_on_activations(train_features, test_features, select_top_k=k)
        assert accuracies == pytest.approx({label: tasks[label][f"sae_top_{k}_test_accuracy"] for label in accuracies}, abs=1e-12), k
