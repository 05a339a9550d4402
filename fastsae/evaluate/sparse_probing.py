"""k-sparse probing on the dataset's labels: SAEBench's sparse-probing method, on the user's model, data and split.

How much of a label does a handful of SAE features carry? Per label (one against the rest), and for all labels
together (multiclass), features are ranked on the training examples by how differently they fire on the label's
examples, a logistic regression reads the top k of them, and its accuracy and AUROC are measured on the held-out
examples of the SAE's own training run (so no text is in both). A probe on all d raw activations is the ceiling.

What follows sae-bench 0.6.0 (`evals/sparse_probing/`: `main.py`, `probe_training.py`) and what does not:

- **Pooling** (`activation_collection.get_sae_meaned_activations`): each example becomes the mean, over its tokens,
  of the SAE's feature activations (and of the raw activations, for the ceiling). Only its first `context_length`
  positions count (SAEBench's context_length, 128: `tokenize_data_dictionary` truncates each example there), special
  and template tokens among them, as SAEBench's tokenizer counts its BOS; 0 keeps the whole example. Of those, the
  tokens whose ids are the tokenizer's BOS, EOS or padding are left out of the mean, as SAEBench leaves them out
  (`get_bos_pad_eos_mask`); a chat template's other tokens (role names, line breaks, a default system prompt) count,
  though the store marks them special and training leaves them out by default. An example with no token left is
  left out.
- **Balancing** (`probe_training.prepare_probe_data`), one-vs-rest: all of the label's examples, and as many others
  drawn evenly across the other labels, shuffled; separately on the training and held-out sides. The sampling
  procedure is SAEBench's: a call draws with the same `torch.randperm` calls as one `prepare_probe_data` call, from a
  generator seeded with the split's seed. SAEBench calls it anew for its LLM probe and for every k, so its runs draw
  other examples; we draw once per label and side, and every k is probed on the same examples. Unlabelled
  examples take no part, nor do labels without examples on both sides (`ensure_shared_keys`): they are logged and
  listed in `dropped_labels`.
- **Ranking** (`get_top_k_mean_diff_mask`): |mean over the label's examples − mean over the others| on the balanced
  training set; the top k are the probe's inputs, for each k in `k_values`. The ranked list is what each label
  "uses" (the signed difference is kept: negative means the feature fires *less* on the label), less the features
  whose difference is zero (most often features that never fire on the set): they carry nothing of the label.
- **Probe** (`train_sklearn_probe`): scikit-learn's `LogisticRegression` with its L2 default, C = 1, max_iter = 1000,
  on unnormalised float32 inputs. **Test accuracy** is `accuracy_score` on the balanced held-out set, so chance
  is 0.5: `sae_top_{k}_test_accuracy` per label, and their mean over labels, are SAEBench's numbers.
- Ours, under our own names: **AUROC** of the probe's decision function on the same held-out set; the **ceiling**
  (`ceiling_test_*`), the same probe on all d mean-pooled raw activations. SAEBench's `llm_test_accuracy` is the
  same idea trained by a torch probe that keeps the epoch with the best *test* accuracy; ours never sees the test
  set. The **multiclass** task is not SAEBench's: every labelled example, unbalanced (`chance` is the share of the
  most common held-out label), features ranked by their largest one-vs-rest difference, a multinomial logistic
  regression; AUROC is the mean one-vs-rest AUROC over the held-out labels.

**Key names**, against SAEBench's output (`SparseProbingEvalOutput`): SAEBench has no multiclass probe. On a label set
of more than two classes (its bias_in_bios, ag_news, github-code, europarl sets) it probes each class against the rest,
keeps each class's accuracy as `eval_result_unstructured["<dataset>_results"]["sae_top_{k}_test_accuracy"][class]`,
and their mean as the dataset's `sae_top_{k}_test_accuracy` (`eval_result_details`). Ours are those numbers under
those names: `tasks[label]["sae_top_{k}_test_accuracy"]` and `mean_over_labels["sae_top_{k}_test_accuracy"]`. The
multiclass task's numbers are defined differently, so they carry names of their own: `multiclass_top_{k}_test_accuracy`
(and `_auroc`) and `multiclass_ceiling_test_*`, under `tasks["all labels (multiclass)"]`; `score_key` names them all.

**Examples** (`dataset_utils.gather_dataset_from_df`): SAEBench's probe_train_set_size and probe_test_set_size (4,000
and 1,000) are each one-vs-rest task's size, so its dataset builders draw half of it per label; we draw at most
`train_examples // 2` training and `test_examples // 2` held-out examples per label with its draw (pandas' `sample`
with the seed), and a label with fewer keeps them all (SAEBench asserts).

Pooling streams the store's examples in store order, a group of about 4,096 tokens at a time: only the pooled
vectors ((examples, d) and (examples, M)) are held.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from tqdm.auto import tqdm

from fastsae.common.atomic_files import write_figure_atomically, write_json_atomically
from fastsae.common.markdown import table
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.trained_sae import SAE_FINGERPRINT_KEY, TrainedSAE
from fastsae.store.activation_store import ActivationStore, StoreChunk
from fastsae.store.batches import ExampleSplit

logger = logging.getLogger(__name__)

SPARSE_PROBING_FILE = "sparse_probing.json"  # beside the checkpoint: every task's accuracies, AUROCs and chosen features
SPARSE_PROBING_PLOT_FILE = "sparse_probing.png"
K_VALUES = [1, 2, 5, 10, 20]  # SAEBench's defaults are 1, 2, 5; its output format also names 10, 20, 50 and 100
PROBE_TRAIN_EXAMPLES = 4000  # SAEBench's probe_train_set_size: a one-vs-rest task's training examples, half per label
PROBE_TEST_EXAMPLES = 1000  # SAEBench's probe_test_set_size: the same on the held-out side
PROBE_C = 1.0  # SAEBench's train_sklearn_probe: scikit-learn's default L2 strength...
PROBE_MAX_ITER = 1000  # ...and its raised iteration limit
CONTEXT_LENGTH = 128  # SAEBench's context_length: pooling reads each example's first 128 positions
POOL_GROUP_TOKENS = 4096  # tokens read and encoded together in the pooling pass
MULTICLASS = "all labels (multiclass)"  # the multiclass task's name among the labels'
POSITIVE, NEGATIVE = 1, 0  # SAEBench's dataset_info.POSITIVE_CLASS_LABEL and NEGATIVE_CLASS_LABEL


@dataclass(frozen=True)
class PooledExamples:
    """Examples as mean-pooled vectors (SAEBench's pooling); row i is store example `examples[i]`."""

    examples: np.ndarray  # (N,) store example indices
    raw_ND: torch.Tensor  # (N, d) float32 mean raw activation
    features_NM: torch.Tensor  # (N, M) float32 mean SAE feature activation


def first_positions(store: ActivationStore, example: int, context_length: int) -> StoreChunk:
    """The example's first `context_length` tokens (0: all of them), special ones included: SAEBench's truncation."""
    start, stop = int(store.doc_offsets[example]), int(store.doc_offsets[example + 1])
    return store.chunk(start, min(stop, start + context_length) if context_length else stop)


@torch.no_grad()
def pool_examples(
    store: ActivationStore, sae: SparseAutoencoder, examples: np.ndarray, ignored_ids: Collection[int], context_length: int = CONTEXT_LENGTH
) -> PooledExamples:
    """One streaming pass over `examples` (ascending): per example, the mean over its first `context_length` positions
    (0: all), less the tokens of `ignored_ids` (SAEBench's BOS, EOS and padding), of the raw activations and of the SAE's
    feature activations. Examples with no token left there are dropped."""
    ignored = np.array(sorted(ignored_ids), dtype=np.int64)
    device = next(sae.parameters()).device
    raw_sums, feature_sums, counts = [], [], []
    for group in tqdm(store.example_groups(examples, POOL_GROUP_TOKENS), desc="sparse probing: pooling", unit="group"):
        parts = [first_positions(store, index, context_length) for index in group]
        pooled = ~torch.from_numpy(np.isin(np.concatenate([part.token_ids for part in parts]), ignored))
        x_TD = torch.cat([part.activations for part in parts]).float()[pooled]
        lengths = torch.tensor([len(part.special_mask) for part in parts])
        example_of_token = torch.repeat_interleave(torch.arange(len(parts)), lengths)[pooled]
        codes_TM = sae.encode(x_TD.to(device)).float().cpu()
        raw_sums.append(torch.zeros(len(parts), store.d).index_add_(0, example_of_token, x_TD))
        feature_sums.append(torch.zeros(len(parts), sae.spec.m).index_add_(0, example_of_token, codes_TM))
        counts.append(torch.bincount(example_of_token, minlength=len(parts)))
    if not counts:
        return PooledExamples(np.zeros(0, dtype=np.int64), torch.zeros(0, store.d), torch.zeros(0, sae.spec.m))
    count_N = torch.cat(counts)
    kept = count_N > 0
    if not kept.all():
        logger.info(
            "Sparse probing: %d examples hold only BOS, EOS or padding tokens in their first positions and are left out.",
            int((~kept).sum()),
        )
    denominator = count_N[kept, None].float()
    return PooledExamples(
        np.asarray(examples)[kept.numpy()], torch.cat(raw_sums)[kept] / denominator, torch.cat(feature_sums)[kept] / denominator
    )


def probing_examples(
    labels: list[str | None], split: ExampleSplit, seed: int, train_task_size: int, test_task_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled training and held-out examples, at most half a task's size per label and side (0: all); ascending.
    SAEBench's dataset builders give each class probe_train_set_size // 2 examples (`gather_dataset_from_df`: pandas'
    `sample` with the seed, which draws as this does), so each one-vs-rest task holds at most the size: the label's
    examples and as many others. A label with fewer keeps them all (SAEBench's builders assert instead)."""
    names = np.array(labels, dtype=object)
    sides = []
    for examples, task_size in (
        (np.flatnonzero(split.is_training), train_task_size),
        (np.flatnonzero(split.is_validation), test_task_size),
    ):
        kept = []
        for label in sorted({name for name in names[examples] if name is not None}):
            own = examples[names[examples] == label]
            if 0 < task_size // 2 < len(own):
                own = own[np.random.RandomState(seed).choice(len(own), task_size // 2, replace=False)]
            kept.append(own)
        sides.append(np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64))
    return sides[0], sides[1]


def balanced_one_vs_rest(rows_by_label: dict[str, np.ndarray], label: str, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SAEBench's `prepare_probe_data` on row indices: the label's rows and as many others, drawn evenly across the
    other labels (in `rows_by_label`'s order), shuffled; returns (rows, 0/1 targets). One call draws as one call of
    SAEBench's does, randperm for randperm (SAEBench calls it per k as well, so its run's draws differ from ours); where
    the others are too few (SAEBench's assertion fails), as many positives are drawn at random from the same generator
    (not the first ones in store order, which would favour the store's beginning)."""
    positives = rows_by_label[label]
    others = [name for name in rows_by_label if name != label]
    per_label = math.ceil(len(positives) / len(others))
    negatives = np.concatenate(
        [rows_by_label[name][torch.randperm(len(rows_by_label[name]), generator=generator)[:per_label].numpy()] for name in others]
    )
    negatives = negatives[torch.randperm(len(negatives), generator=generator)[: len(positives)].numpy()]
    if len(negatives) < len(positives):
        positives = np.sort(positives[torch.randperm(len(positives), generator=generator)[: len(negatives)].numpy()])
    rows = np.concatenate([positives, negatives])
    targets = np.concatenate([np.full(len(positives), POSITIVE), np.full(len(negatives), NEGATIVE)])
    order = torch.randperm(len(rows), generator=generator).numpy()
    return rows[order], targets[order]


def mean_differences(acts_BF: torch.Tensor, targets_B: np.ndarray) -> torch.Tensor:
    """Per feature: mean over the positives − mean over the negatives (SAEBench ranks by its absolute value)."""
    positive = torch.from_numpy(targets_B == POSITIVE)
    return acts_BF[positive].mean(0) - acts_BF[~positive].mean(0)


def multiclass_differences(acts_BF: torch.Tensor, names_B: np.ndarray) -> torch.Tensor:
    """Per feature: its one-vs-rest mean difference for the label where that difference is largest in size."""
    differences = torch.stack([mean_differences(acts_BF, (names_B == name).astype(int)) for name in np.unique(names_B)])
    return differences.gather(0, differences.abs().argmax(0, keepdim=True))[0]


def score_key(multiclass: bool, k: int | None, measure: str) -> str:
    """The JSON key of a task's held-out `measure` (accuracy or auroc) with its top k features (None: the all-d ceiling).
    A one-vs-rest top-k accuracy is SAEBench's number under SAEBench's name; the multiclass task's are not, so they are
    named multiclass_ (see the module docstring)."""
    if multiclass:
        return f"multiclass_{'ceiling' if k is None else f'top_{k}'}_test_{measure}"
    return f"{'ceiling' if k is None else f'sae_top_{k}'}_test_{measure}"


@dataclass(frozen=True)
class ProbeScore:
    accuracy: float
    auroc: float | None  # None when the held-out set has one class only
    converged: bool


def fit_probe(train_X: torch.Tensor, train_y: np.ndarray, test_X: torch.Tensor, test_y: np.ndarray) -> ProbeScore:
    """SAEBench's `train_sklearn_probe` (L2 logistic regression, C = 1, max_iter = 1000, float32 inputs as they are),
    scored by accuracy and AUROC on the held-out set. Multiclass AUROC: the mean one-vs-rest AUROC over held-out labels."""
    train_np, test_np = train_X.float().numpy(), test_X.float().numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER).fit(train_np, train_y)
    converged = not any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
    accuracy = float(accuracy_score(test_y, probe.predict(test_np)))
    if len(probe.classes_) == 2:
        auroc = float(roc_auc_score(test_y, probe.decision_function(test_np))) if len(np.unique(test_y)) == 2 else None
    else:
        probabilities = probe.predict_proba(test_np)
        per_label = [
            roc_auc_score(test_y == name, probabilities[:, column])
            for column, name in enumerate(probe.classes_)
            if 0 < (test_y == name).sum() < len(test_y)
        ]
        auroc = float(np.mean(per_label)) if per_label else None
    return ProbeScore(accuracy, auroc, converged)


def probe_task(
    train: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    differences_F: torch.Tensor,
    k_values: list[int],
    multiclass: bool = False,
) -> dict[str, Any]:
    """The ceiling and the top-k probes of one task; `train` and `test` are (raw_BD, features_BF, targets)."""
    (train_raw, train_features, train_y), (test_raw, test_features, test_y) = train, test
    ceiling = fit_probe(train_raw, train_y, test_raw, test_y)
    ranked = torch.argsort(differences_F.abs(), descending=True)
    result: dict[str, Any] = {
        "train_examples": len(train_y),
        "test_examples": len(test_y),
        score_key(multiclass, None, "accuracy"): ceiling.accuracy,
        score_key(multiclass, None, "auroc"): ceiling.auroc,
    }
    unconverged = [] if ceiling.converged else ["ceiling"]
    for k in k_values:
        # In ascending feature order, as SAEBench's `apply_topk_mask_reduce_dim` hands them to its probe.
        chosen = ranked[:k].sort().values
        score = fit_probe(train_features[:, chosen], train_y, test_features[:, chosen], test_y)
        result[score_key(multiclass, k, "accuracy")], result[score_key(multiclass, k, "auroc")] = score.accuracy, score.auroc
        unconverged += [] if score.converged else [f"k={k}"]
    # A feature with no difference (one that never fires on the set) tells the label nothing: the probes read it when k
    # reaches it, as SAEBench's do, but it is not listed as one the label uses.
    result["features"] = [
        {"feature": int(f), "mean_difference": float(differences_F[f])} for f in ranked[: max(k_values)] if differences_F[f] != 0
    ]
    result["unconverged_probes"] = unconverged
    return result


def _rows_by_label(names: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    return {label: np.flatnonzero(names == label) for label in labels}


def _side(pooled: PooledExamples, rows: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    index = torch.from_numpy(rows)
    return pooled.raw_ND[index], pooled.features_NM[index], targets


def probe_labels(
    train: PooledExamples,
    train_names: np.ndarray,
    test: PooledExamples,
    test_names: np.ndarray,
    labels: list[str],
    k_values: list[int],
    seed: int,
) -> dict[str, dict]:
    """Every task on pooled examples: each of `labels` (at least two, each with examples on both sides) against the
    rest, in their order, then all of them together."""
    train_rows, test_rows = _rows_by_label(train_names, labels), _rows_by_label(test_names, labels)
    generator = torch.Generator().manual_seed(seed)
    tasks = {}
    for label in tqdm(labels, desc="sparse probing: probes", unit="label"):
        train_side = _side(train, *balanced_one_vs_rest(train_rows, label, generator))
        test_side = _side(test, *balanced_one_vs_rest(test_rows, label, generator))
        tasks[label] = probe_task(train_side, test_side, mean_differences(train_side[1], train_side[2]), k_values)
    train_all, test_all = np.concatenate(list(train_rows.values())), np.concatenate(list(test_rows.values()))
    train_side, test_side = _side(train, train_all, train_names[train_all]), _side(test, test_all, test_names[test_all])
    tasks[MULTICLASS] = probe_task(train_side, test_side, multiclass_differences(train_side[1], train_side[2]), k_values, multiclass=True)
    _, counts = np.unique(test_side[2], return_counts=True)
    tasks[MULTICLASS]["chance"] = float(counts.max() / counts.sum())
    return tasks


def summary(tasks: dict[str, dict], k_values: list[int]) -> dict[str, float | None]:
    """Means over the one-vs-rest tasks: SAEBench's dataset-level `sae_top_{k}_test_accuracy`, and ours beside it."""
    labels = [task for name, task in tasks.items() if name != MULTICLASS]
    keys = [score_key(False, k, measure) for k in (None, *k_values) for measure in ("accuracy", "auroc")]
    means = {}
    for key in keys:
        values = [task[key] for task in labels if task[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def run_sparse_probing(
    trained: TrainedSAE,
    store: ActivationStore,
    split: ExampleSplit,
    seed: int,
    ignored_ids: Collection[int],
    k_values: list[int] = K_VALUES,
    train_examples: int = PROBE_TRAIN_EXAMPLES,
    test_examples: int = PROBE_TEST_EXAMPLES,
    context_length: int = CONTEXT_LENGTH,
) -> dict[str, Any]:
    """Probe the store's labels with the SAE's features on `split` (training vs held-out examples), pooling over every
    token but those of `ignored_ids` (the tokenizer's BOS, EOS and padding: `saebench_core.ignored_token_ids`); writes
    sparse_probing.json and sparse_probing.png beside the checkpoint and prints the table. When the data has fewer than
    two labels, or the store is block-packed (a block spans examples), sparse_probing.json says why it was skipped
    (status "skipped"), so a rerun knows it is done."""
    source = {
        "checkpoint": str(trained.checkpoint),
        SAE_FINGERPRINT_KEY: trained.sae.fingerprint(),
        "store": str(store.folder),
        "split": split.record(seed),
    }
    if store.manifest.packing == "block":
        return skipped(
            source,
            trained,
            f'{store.folder} was extracted with PACKING = "block": its blocks mix examples, so no block has one label; '
            'extract the store again with PACKING = "sequential" (extract_activations.py)',
        )
    names = np.array([record.get("label") for record in store.example_records()], dtype=object)
    present = sorted({name for name in names if name is not None})
    if len(present) < 2:
        found = f"one label ({present[0]})" if present else "no labels"
        return skipped(
            source, trained, f"the data in {store.folder} has {found}; it needs a label per example (LABEL_FIELD in extract_activations.py)"
        )
    sae = trained.sae
    usable = sorted({min(k, sae.spec.m) for k in k_values})
    if max(k_values) > sae.spec.m:
        logger.info("Sparse probing: the SAE has M=%d features, so k above it reads all %d.", sae.spec.m, sae.spec.m)
    train_rows, test_rows = probing_examples(list(names), split, seed, train_examples, test_examples)
    logger.info("Sparse probing on %d training and %d held-out labelled examples, %d labels", len(train_rows), len(test_rows), len(present))
    train = pool_examples(store, sae, train_rows, ignored_ids, context_length)
    test = pool_examples(store, sae, test_rows, ignored_ids, context_length)
    train_names, test_names = names[train.examples], names[test.examples]
    labels = sorted(set(train_names) & set(test_names))
    dropped = dropped_labels(present, labels, train_names, test_names)
    if len(labels) < 2:
        return skipped(source, trained, f"fewer than two labels have both training and held-out examples ({', '.join(labels)})")
    tasks = probe_labels(train, train_names, test, test_names, labels, usable, seed)
    unconverged = {name: task["unconverged_probes"] for name, task in tasks.items() if task["unconverged_probes"]}
    if unconverged:
        logger.warning(
            "Sparse probing: some probes stopped at max_iter=%d before converging (as SAEBench's would): %s", PROBE_MAX_ITER, unconverged
        )
    results = {
        **source,
        "status": "measured",
        "hook_name": store.hook_name,
        "method": "SAEBench sparse probing (sae-bench 0.6.0 evals/sparse_probing): mean-pooled over the tokens but BOS, EOS and padding of "
        f"{f'the first {context_length} positions' if context_length else 'the whole example'}, features "
        "ranked by |difference of class means| on the balanced training set, L2 logistic regression (C=1, max_iter=1000)",
        "k_values": usable,
        "context_length": context_length,
        "examples": {"train": int(np.isin(train_names, labels).sum()), "test": int(np.isin(test_names, labels).sum())},
        "labels": [name for name in tasks if name != MULTICLASS],
        "dropped_labels": dropped,
        "mean_over_labels": summary(tasks, usable),
        "tasks": tasks,
    }
    folder = trained.results_folder
    folder.mkdir(parents=True, exist_ok=True)
    # The plot first: the JSON, which says the probing is done, never stands beside an earlier run's plot.
    plot_sparse_probing(folder / SPARSE_PROBING_PLOT_FILE, results, f"{sae.spec.name} — {store.hook_name}")
    write_json_atomically(folder / SPARSE_PROBING_FILE, results)
    print(f"\n{trained.checkpoint}: sparse probing\n\n" + probing_table(results))
    return results


def dropped_labels(present: list[str], kept: list[str], train_names: np.ndarray, test_names: np.ndarray) -> dict[str, dict[str, int]]:
    """The labels left out for lacking examples on one side (or both), with their counts per side, logged: SAEBench's
    `ensure_shared_keys` removes them too, and prints which."""
    dropped = {
        label: {"train": int((train_names == label).sum()), "test": int((test_names == label).sum())}
        for label in present
        if label not in kept
    }
    if dropped:
        logger.warning(
            "Sparse probing: %d labels have no training or no held-out examples and take no part (as SAEBench's ensure_shared_keys "
            "removes them): %s",
            len(dropped),
            "; ".join(f"{label} ({counts['train']} training, {counts['test']} held-out)" for label, counts in dropped.items()),
        )
    return dropped


def skipped(source: dict[str, Any], trained: TrainedSAE, reason: str) -> dict[str, Any]:
    """The record of a skipped probing (`source`: its checkpoint, store and split), written as sparse_probing.json (a
    plot of an earlier run goes: it no longer holds)."""
    logger.info("Sparse probing skipped: %s.", reason)
    result = {**source, "status": "skipped", "reason": reason}
    folder = trained.results_folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPARSE_PROBING_PLOT_FILE).unlink(missing_ok=True)
    write_json_atomically(folder / SPARSE_PROBING_FILE, result)
    return result


def _pair(accuracy: float | None, auroc: float | None) -> str:
    return " / ".join("–" if value is None else f"{value:.3f}" for value in (accuracy, auroc))


def probing_table(results: dict[str, Any]) -> str:
    """Per task: examples, the ceiling's accuracy / AUROC, the same at each k, and the top listed features (sign: fires
    more or less; zero-difference features are not listed)."""
    k_values = results["k_values"]
    header = ["task", "train / test", "ceiling (all d)", *(f"k={k}" for k in k_values), "top features"]
    rows = []
    for name, task in [*results["tasks"].items(), ("mean over labels", {**results["mean_over_labels"], "features": []})]:
        multiclass = name == MULTICLASS
        rows.append(
            [
                name + (f" (chance {task['chance']:.3f})" if "chance" in task else ""),
                f"{task['train_examples']} / {task['test_examples']}" if "train_examples" in task else "",
                *(_pair(task[score_key(multiclass, k, "accuracy")], task[score_key(multiclass, k, "auroc")]) for k in (None, *k_values)),
                ", ".join(f"{f['feature']}{'+' if f['mean_difference'] >= 0 else '−'}" for f in task["features"][:5]),
            ]
        )
    return "Test accuracy / AUROC on held-out examples (one-vs-rest tasks balanced: chance 0.5)\n\n" + table(header, rows)


def plot_sparse_probing(path: Path, results: dict[str, Any], title: str) -> None:
    """Held-out accuracy against k, one line per task, ending (dotted) at the task's all-d ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k_values = results["k_values"]
    positions = list(range(len(k_values)))
    figure, axis = plt.subplots(figsize=(8.5, 4.6))
    for name, task in results["tasks"].items():
        multiclass = name == MULTICLASS
        accuracies = [task[score_key(multiclass, k, "accuracy")] for k in k_values]
        style = {"color": "black", "linewidth": 2.4} if multiclass else {"linewidth": 1.2}
        label = f"{name}, chance {task['chance']:.2f}" if multiclass else name
        (line,) = axis.plot(positions, accuracies, "o-", label=label, markersize=3, **style)
        ceiling = task[score_key(multiclass, None, "accuracy")]
        axis.plot([positions[-1], len(k_values)], [accuracies[-1], ceiling], ":", color=line.get_color(), linewidth=1)
        axis.plot([len(k_values)], [ceiling], "s", color=line.get_color(), markersize=4)
    axis.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axis.set_xticks([*positions, len(k_values)], [*(str(k) for k in k_values), "all d\n(ceiling)"])
    axis.set_xlabel("k (SAE features the probe reads)")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.set_title(f"Sparse probing — {title}\n(one-vs-rest tasks balanced: chance 0.5, dashed)", fontsize=10)
    figure.tight_layout()
    write_figure_atomically(path, figure, dpi=110)
    plt.close(figure)


def read_probe_choices(trained: TrainedSAE) -> dict[int, list[dict[str, Any]]]:
    """Per feature, the tasks whose probes chose it, from the SAE's sparse_probing.json (empty without one):
    [{"task", "rank" (1: the first chosen, so it is in every probe with k ≥ rank), "mean_difference"}]."""
    probing = trained.read_result(SPARSE_PROBING_FILE) or {}
    choices: dict[int, list[dict[str, Any]]] = {}
    for task, result in probing.get("tasks", {}).items():  # a skipped probing has none
        for rank, chosen in enumerate(result["features"], start=1):
            choices.setdefault(chosen["feature"], []).append({"task": task, "rank": rank, "mean_difference": chosen["mean_difference"]})
    return choices
