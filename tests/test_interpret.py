"""interpret_sae: the no-LLM part of the CSV, on a tiny trained SAE and its store."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from conftest import TEXTS, interpret_without_llm, make_tiny_llama, write_jsonl
from fastsae.common.errors import UserError
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.interpret.features import FeatureStatistics
from fastsae.interpret.interpret_sae import InterpretConfig, select_features
from fastsae.lm.data import load_dataset


def test_interpretations_csv_has_one_row_per_chosen_feature(checkpoint, tiny_model_folder, tmp_path):
    killed_runs_scratch = tmp_path / "interpretations.csv.scratch"  # its per-example maxima, left by a SIGKILL
    killed_runs_scratch.mkdir()
    (killed_runs_scratch / "example_max.npy").write_bytes(b"stale")
    path = interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "interpretations.csv", "frequency:10")
    assert sorted(file.name for file in tmp_path.iterdir()) == ["dashboard.html", "interpretations.csv"]
    table = pd.read_csv(path, keep_default_na=False)
    assert len(table) == 10
    assert list(table["frequency"]) == sorted(table["frequency"], reverse=True) and (table["frequency"] > 0).all()
    labels = {
        "reconsidering",
        "doubting",
        "planning",
        "comparing_options",
        "recalling",
        "justifying",
        "predicting",
        "noticing_bias",
        "committing",
        "questioning_assumption",
    }
    assert set(table["top_label"]) <= labels
    assert ((table["top_label_auroc"] >= 0.5) & (table["top_label_auroc"] <= 1)).all()  # the best label is at least chance
    assert all("«" in contexts and "»" in contexts for contexts in table["top_contexts"])
    for contexts in table["top_contexts"]:  # one line per window: the chat template's line breaks are written \n
        assert len(contexts.split("\n")) == 5 and all(re.match(r"\[\d+\.\d\d\] ", line) for line in contexts.split("\n"))
    llm_columns = [
        "explanation",
        "detection_score",
        "detection_quantile_accuracy",
        "fuzzing_score",
        "fast_rubric_rating",
        "fast_rubric_name",
    ]
    assert all((table[column] == "").all() for column in llm_columns)  # EXPLAIN off
    assert all(len(tokens.split(" | ")) == 8 for tokens in table["logit_lens_promoted"])


@pytest.mark.parametrize("features", ["frequency:5", "random:3", "label:2"])
def test_an_sae_with_no_live_feature_is_refused_and_nothing_is_written(features, dead_checkpoint, tiny_model_folder, tmp_path):
    """frequency:N and random:N crashed in the logit lens (torch.cat of nothing); label:N likewise."""
    with pytest.raises(UserError, match=f"^FEATURES '{features}' picks no feature: none of this SAE's 64 features fires on the store"):
        interpret_without_llm(dead_checkpoint, tiny_model_folder, tmp_path / "interpretations.csv", features)
    assert list(tmp_path.iterdir()) == []


def test_two_csvs_in_one_folder_keep_a_dashboard_each(checkpoint, tiny_model_folder, tmp_path):
    """A sweep interpreted into one folder: every CSV's dashboard used to be the one dashboard.html, the last run's."""
    for name in ("sae_a.csv", "sae_b.csv"):
        interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / name, "frequency:3")
    assert sorted(file.name for file in tmp_path.iterdir()) == ["sae_a.csv", "sae_a_dashboard.html", "sae_b.csv", "sae_b_dashboard.html"]


def test_a_feature_listed_twice_leaves_the_others_their_own_logit_lens(checkpoint, tiny_model_folder, tmp_path):
    """The logit lens is read per row: a duplicate must not shift feature 17 onto feature 3's promoted tokens."""
    twice = pd.read_csv(interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "twice.csv", "3,3,17"), keep_default_na=False)
    alone = pd.read_csv(interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "alone.csv", "17,3"), keep_default_na=False)
    assert twice["feature"].tolist() == [3, 17]
    lens = ["logit_lens_promoted", "logit_lens_suppressed"]
    assert twice.set_index("feature").loc[[3, 17], lens].equals(alone.set_index("feature").loc[[3, 17], lens])


def statistics_with(frequency: list[float]) -> FeatureStatistics:
    m = len(frequency)
    zeros = np.zeros(m)
    return FeatureStatistics(10, np.array(frequency), zeros, zeros, np.zeros((m, 2)), np.zeros((3, m)))


def test_feature_selection():
    statistics = statistics_with([0.1, 0.0, 0.5, 0.3])
    labels = pd.DataFrame({"top_label": ["a", None, "b", "a"], "top_label_auroc": [0.9, np.nan, 0.6, 0.95]})
    assert select_features("frequency:2", statistics, labels) == [2, 3]
    assert select_features("label:2", statistics, labels) == [3, 0]
    assert select_features("all", statistics, labels) == [0, 1, 2, 3]
    assert select_features("3, 1", statistics, labels) == [3, 1]
    assert select_features("3,1,3", statistics, labels) == [3, 1]  # a feature listed twice gets one row
    sample = select_features("random:2", statistics, labels, seed=1)
    assert (
        len(sample) == 2
        and set(sample) <= {0, 2, 3}
        and sample == sorted(sample) == select_features("random:2", statistics, labels, seed=1)
    )
    assert select_features("random:10", statistics, labels) == [0, 2, 3]  # live features only
    unranked = statistics_with([0.1, 0.0, 0.5, 0.3, 0.2])  # feature 4 fires, but on no labelled example: no AUROC
    with_unranked = pd.concat([labels, pd.DataFrame({"top_label": [None], "top_label_auroc": [np.nan]})], ignore_index=True)
    assert select_features("label:5", unranked, with_unranked) == [3, 0, 2]  # only the features a label ranks
    unlabelled = pd.DataFrame({"top_label": [None] * 4, "top_label_auroc": [np.nan] * 4})  # live, but on no labelled example
    with pytest.raises(UserError, match="^FEATURES 'label:2' picks no feature: no live feature fires on a labelled example"):
        select_features("label:2", statistics, unlabelled)  # returned no feature: a CSV with no row
    with pytest.raises(UserError, match="feature 7 does not exist"):
        select_features("7", statistics, labels)
    with pytest.raises(UserError, match="not understood"):
        select_features("most:3", statistics, labels)


def test_a_listed_feature_the_sae_lacks_is_refused_before_the_store_is_read(checkpoint, tiny_model_folder, tmp_path):
    """Feature 64 of an M=64 SAE was refused only after the model load and the whole pass over the store (here: a store
    that does not exist, so the old order failed on it first)."""
    with pytest.raises(UserError, match=r"^feature 64 does not exist: this SAE has features 0\.\.63\. Fix FEATURES\.$"):
        interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "interpretations.csv", "3,64", store=str(tmp_path / "no-store"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "value", "least"),
    [
        ("top_contexts", -1, 0),
        ("logit_lens_tokens", -2, 0),
        ("min_windows", -1, 0),
        ("seed", -1, 0),
        ("rubric_contexts", 0, 1),
        ("llm_concurrency", 0, 1),
    ],
)
def test_counts_out_of_range_are_refused(name, value, least):
    """TOP_CONTEXTS = -1 would drop a context, a negative SEED or LLM_CONCURRENCY = 0 would crash deep in the run."""
    with pytest.raises(UserError, match=f"^{name.upper()} must be at least {least}, not {value}.$"):
        InterpretConfig(**{name: value})


@pytest.mark.parametrize(
    ("features", "problem"),
    [
        ("frequency:-250", "picks no feature"),
        ("frequency:0", "picks no feature"),
        ("label:0", "picks no feature"),
        ("random:0", "picks no feature"),
        ("", "lists no feature"),
        (" , ", "lists no feature"),
        ("3,-1", "lists a negative feature"),
        ("frequency:", "is not understood"),
        ("3,,5", "is not understood"),
        ("3,5,", "is not understood"),
    ],
)
def test_features_that_pick_nothing_are_refused_before_the_run(features, problem):
    """frequency:-250 wrote 6 features, frequency:0 and an empty list crashed after the whole statistics pass; "3,,5" (a
    number lost) was read as 3,5."""
    with pytest.raises(UserError, match=f"^FEATURES {re.escape(repr(features))} {problem}: use all, frequency:N"):
        InterpretConfig(features=features)


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        (
            {"explain_examples": 5},
            "EXPLAIN_EXAMPLES=5 is not a multiple of N_QUANTILES=10: .* so 0 would be used. Set EXPLAIN_EXAMPLES to 10,",
        ),
        ({"explain_examples": 45}, "EXPLAIN_EXAMPLES=45 .* so 40 would be used. Set EXPLAIN_EXAMPLES to 40 or 50,"),
        ({"score_examples": 5}, "SCORE_EXAMPLES=5 is not a multiple of N_QUANTILES=10: .* so 0 would be used"),
        ({"score_examples": 50, "n_quantiles": 3}, "SCORE_EXAMPLES=50 is not a multiple of N_QUANTILES=3"),
        ({"explain_examples": 45, "explain_from": "top", "score_examples": 7}, "SCORE_EXAMPLES=7 "),
    ],
)
def test_window_counts_the_quantiles_would_shrink_are_refused(settings, refused):
    """delphi takes count // N_QUANTILES windows from each quantile: EXPLAIN_EXAMPLES=5 sent the explainer no window at all."""
    with pytest.raises(UserError, match=refused):
        InterpretConfig(**settings)


def test_window_counts_the_quantiles_divide_are_accepted():
    InterpretConfig(explain_examples=30, score_examples=20, n_quantiles=5)
    InterpretConfig(explain_examples=45, explain_from="top")  # the strongest 45: no quantiles involved


def test_a_store_of_another_model_is_read_with_a_warning_naming_both(checkpoint, smollm2_tokenizer, tiny_model_folder, tmp_path, caplog):
    """Another model of the same width at the same hook: its activations were read with this SAE's features, silently.
    Not refused: a base model's SAE read on its chat model's activations is a study of its own."""
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in TEXTS])
    config = ExtractConfig(dataset=str(texts), layers=[2], output_dir=str(tmp_path / "stores"))
    (store,) = write_activation_stores(
        make_tiny_llama(len(smollm2_tokenizer), seed=1), smollm2_tokenizer, load_dataset(config.dataset), config, "other"
    )
    with caplog.at_level("WARNING", logger="fastsae.core.trained_sae"):
        interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "out" / "interpretations.csv", "frequency:3", store=str(store))
    assert (
        "trained on tiny's activations, but the store at" in caplog.text
        and "holds other's: its features are read on another" in caplog.text
    )
    assert (tmp_path / "out" / "interpretations.csv").is_file()


@pytest.mark.parametrize("labels", [[None] * len(TEXTS), ["planning"] * len(TEXTS)])
def test_label_choice_needs_two_labels_in_the_store(labels, checkpoint, tiny_llama, smollm2_tokenizer, tiny_model_folder, tmp_path):
    """label:N on a store with no label or a single one used to return the first N live features by id, silently."""
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": text, "label": label} for text, label in zip(TEXTS, labels)])
    config = ExtractConfig(dataset=str(texts), layers=[2], output_dir=str(tmp_path / "stores"))
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    distinct = "0 distinct labels" if labels[0] is None else "1 distinct label:"
    with pytest.raises(UserError, match=f"FEATURES 'label:3' ranks features by how well they pick out a label, .* carry {distinct}"):
        interpret_without_llm(checkpoint, tiny_model_folder, tmp_path / "interpretations.csv", "label:3", store=str(store))
