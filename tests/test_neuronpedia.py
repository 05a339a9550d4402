"""export_sae with NEURONPEDIA: files that SAEDashboard's and the neuronpedia package's own classes accept, with the right numbers.

The batches are checked against sae-dashboard 0.8.0's `NeuronpediaDashboardBatch` (the layout Neuronpedia's importer reads)
and mapped onto the `neuronpedia` package's `Feature`, `Activation`, `Logit` and `Explanation`, as docs/export.md uploads them;
the numbers against SAELens' own SAE from the export, over the whole store, and the interval groups against SAEDashboard's
own code for them run on the store's windows.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch

from conftest import interpret_without_llm
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.export.export_sae import ExportConfig, export_sae
from fastsae.export.interval_groups import N_INTERVALS
from fastsae.export.neuronpedia import (
    EXPLANATIONS_FILE,
    FEATURES_PER_BATCH,
    INTERVAL_EXAMPLES,
    LOGIT_TOKENS,
    NEURONPEDIA_FOLDER,
    WINDOW_TOKENS,
    default_model_id,
)
from fastsae.interpret.windows import WindowGrid
from fastsae.lm.models import load_tokenizer, resolve_model
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, train_saes

with warnings.catch_warnings():  # neuronpedia 1.2.1's generated pydantic models pass Field(example=...), deprecated in pydantic 2
    warnings.simplefilter("ignore", DeprecationWarning)
    from neuronpedia.np_activation import Activation
    from neuronpedia.np_explanation import Explanation
    from neuronpedia.np_feature import Feature, Logit
    from neuronpedia.types.common.activation import NPActivation
    from neuronpedia.types.common.feature import NPFeature

M, K = 160, 4  # more features than one batch holds
HOOK, LAYER = "blocks.2.hook_resid_post", 2
EXAMPLES = 6
SET_NAME = "tiny-res-160"


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("np-runs")), m=M, k=K, batch_size=256, epochs=1.0)
    (result,) = train_saes(config)
    return Path(result["checkpoint"])


@pytest.fixture(scope="module")
def offset_model_folder(tiny_model_folder, tmp_path_factory) -> Path:
    """The tiny Llama with a final-norm gain that is not all ones and a shared offset in every unembedding row, so the logit
    lens's gain fold and centring both show. Neither touches block 2's output, so the store stays this model's."""
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(tiny_model_folder, tmp_path_factory.mktemp("np-models") / "tiny-llama-offset")
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(model.config.hidden_size, generator=generator) * 2 + 0.25)
        model.lm_head.weight += torch.randn(model.config.hidden_size, generator=generator)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def explained_csv(trained, tiny_model_folder, tmp_path_factory) -> Path:
    """interpret_sae.py's CSV for 12 features, with explanations written into 8 of them as the LLM step writes them."""
    path = interpret_without_llm(
        trained, tiny_model_folder, tmp_path_factory.mktemp("np-interpret") / "interpretations.csv", "frequency:12"
    )
    table = pd.read_csv(path)
    table["explanation"] = [f"«quoted» words, feature {feature}" if row < 8 else np.nan for row, feature in enumerate(table["feature"])]
    table.to_csv(path, index=False)
    return path


def export_to(output: Path, trained: Path, explained_csv: Path, model_folder: Path) -> Path:
    config = ExportConfig(
        checkpoint=str(trained),
        output=str(output),
        interpretations=str(explained_csv),
        neuronpedia=True,
        neuronpedia_set=SET_NAME,
        neuronpedia_examples=EXAMPLES,
        model_name=str(model_folder),  # the tiny store does not name its model
        device="cpu",
    )
    return export_sae(config)


@pytest.fixture(scope="module")
def exported(trained, explained_csv, offset_model_folder, tmp_path_factory) -> Path:
    return export_to(tmp_path_factory.mktemp("np-export") / "export", trained, explained_csv, offset_model_folder)


def batches(folder: Path) -> list[dict]:
    paths = sorted((folder / NEURONPEDIA_FOLDER).glob("batch-*.json"), key=lambda path: int(path.stem.split("-")[1]))
    return [json.loads(path.read_text()) for path in paths]


def features_by_index(folder: Path) -> dict[int, dict]:
    return {feature["feature_index"]: feature for batch in batches(folder) for feature in batch["features"]}


def is_top(example: dict) -> bool:
    """SAEDashboard's "TOP ACTIVATIONS" group: bin_min -1; every other example belongs to an activation interval."""
    return example["bin_min"] == -1


def activation(model_id: str, source: str, index: int, example: dict) -> Activation:
    """An example as docs/export.md uploads it: an interval group's tag becomes the package's quantile fields."""
    if is_top(example):
        return Activation(model_id, source, index, example["tokens"], example["values"])
    interval = {"quantileMin": example["bin_min"], "quantileMax": example["bin_max"], "quantileFraction": example["bin_contains"]}
    return Activation(model_id, source, index, example["tokens"], example["values"], **interval)


def test_every_file_is_accepted_by_saedashboard_and_the_neuronpedia_package(exported, explained_csv):
    written = sorted(path.relative_to(exported / NEURONPEDIA_FOLDER).as_posix() for path in (exported / NEURONPEDIA_FOLDER).rglob("*"))
    assert written == ["batch-0.json", "batch-1.json", EXPLANATIONS_FILE]
    model_id = json.loads((exported / HOOK / "cfg.json").read_text())["metadata"]["model_name"]  # as SAEDashboard reads it
    explanations = [Explanation(**record) for record in json.loads((exported / NEURONPEDIA_FOLDER / EXPLANATIONS_FILE).read_text())]
    explanation_of = {explanation.index: explanation for explanation in explanations}
    indices = []
    for batch in batches(exported):
        # SAEDashboard's own classes take every key (an unknown one is a TypeError) and write the file back as it is (a missing one differs).
        assert NeuronpediaDashboardBatch(**batch).to_dict() == batch
        assert (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"]) == (model_id, LAYER, SET_NAME, None)
        assert len(batch["features"]) <= FEATURES_PER_BATCH
        for record in batch["features"]:
            indices.append(record["feature_index"])
            # What docs/export.md hands to the neuronpedia package's Source.upload_batch.
            source = f"{batch['layer']}-{batch['sae_set']}"
            feature = Feature(
                modelId=batch["model_id"],
                source=source,
                index=record["feature_index"],
                density=record["frac_nonzero"],
                top_logits=[Logit(token, value) for token, value in zip(record["pos_str"], record["pos_values"], strict=True)],
                bottom_logits=[Logit(token, value) for token, value in zip(record["neg_str"], record["neg_values"], strict=True)],
                activations=[activation(batch["model_id"], source, record["feature_index"], example) for example in record["activations"]],
                explanations=[explanation_of[record["feature_index"]]] if record["feature_index"] in explanation_of else None,
            )
            NPFeature.model_validate({"model": feature.modelId, "source": feature.source, "index": feature.index}, strict=True)
            for example in feature.activations:
                NPActivation.model_validate({"tokens": example.tokens, "values": example.values}, strict=True)
                assert len(example.tokens) == len(example.values)
            assert 0 <= feature.density <= 1 and len(feature.top_logits) == len(feature.bottom_logits) == LOGIT_TOKENS
    assert indices == list(range(M))
    table = pd.read_csv(explained_csv).dropna(subset=["explanation"])
    assert {(e.modelId, e.source, e.index, e.text) for e in explanations} == {
        (model_id, f"{LAYER}-{SET_NAME}", int(feature), text) for feature, text in zip(table["feature"], table["explanation"])
    }
    assert len(explanations) == 8


def test_activations_density_and_logits_are_those_of_saelens_sae_over_the_store(exported, tiny_store, offset_model_folder):
    """Recomputed over the whole store with SAELens' SAE from the export; the logit lens of its unit decoder rows, as SAEDashboard's."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    sae = SAE.load_from_disk(exported / HOOK)
    store = ActivationStore(tiny_store)
    with torch.no_grad():
        codes = sae.encode(store.activations(0, store.n_tokens).float())
    content = torch.from_numpy(~store.special_mask(0, store.n_tokens))  # trained without special tokens: they never count
    codes[~content] = 0
    maxima, argmax = codes.max(0)
    frequency = (codes[content] > 0).float().mean(0)
    token_ids = store.token_ids(0, store.n_tokens)
    tokenizer = load_tokenizer(resolve_model(str(offset_model_folder)))
    records = features_by_index(exported)
    alive = set(torch.nonzero(maxima > 0).flatten().tolist())
    assert len(alive) > M // 2  # the comparison is not between dead features
    for feature, record in records.items():
        assert record["frac_nonzero"] == pytest.approx(float(frequency[feature]), abs=1e-6)
        if feature not in alive:
            assert record["activations"] == [] and record["freq_hist_data_bar_heights"] == []
            continue
        top = record["activations"][0]
        assert max(top["values"]) == pytest.approx(float(maxima[feature]), abs=1e-3)
        assert top["bin_max"] == pytest.approx(float(maxima[feature]), abs=1e-3)
        assert top["tokens"][top["qualifying_token_index"]] == tokenizer.decode([int(token_ids[argmax[feature]])])
        strengths = [max(example["values"]) for example in record["activations"] if is_top(example)]
        assert strengths == sorted(strengths, reverse=True) and len(strengths) <= EXAMPLES
        assert sum(record["freq_hist_data_bar_heights"]) == int((codes[:, feature] > 0).sum())

    model = AutoModelForCausalLM.from_pretrained(offset_model_folder)
    unembedding = model.lm_head.weight.detach() * model.model.norm.weight.detach()
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)  # what SAELens' fold_W_dec_norm leaves
    logits = directions @ unembedding.T
    logits -= logits.mean(1, keepdim=True)  # TransformerLens' center_unembed
    top_logits, bottom_logits = logits.topk(LOGIT_TOKENS, dim=1), (-logits).topk(LOGIT_TOKENS, dim=1)
    for feature, record in records.items():
        assert record["pos_values"] == pytest.approx(top_logits.values[feature].tolist(), abs=1e-3)
        assert record["neg_values"] == pytest.approx((-bottom_logits.values[feature]).tolist(), abs=1e-3)
        assert record["pos_str"] == tokenizer.batch_decode([[int(t)] for t in top_logits.indices[feature]])
        assert record["neg_str"] == tokenizer.batch_decode([[int(t)] for t in bottom_logits.indices[feature]])


INTERVAL_TITLE = re.compile(r"INTERVAL (\S+) - (\S+)<br>CONTAINS (\S+)%")  # SAEDashboard's name for an interval group


def test_interval_groups_are_saedashboards_over_the_stores_windows(exported, tiny_store, offset_model_folder):
    """SAEDashboard's own interval code (`get_indices_dict`, with its NeuronpediaRunner's settings), run on every window's
    activation recomputed with SAELens' SAE over the whole store (a window's maximum, 0 where the feature is silent), names
    the groups the files hold, in their order, with their edges, shares and sizes; every drawn example is a window of the
    store with its recomputed values, its activation inside its interval."""
    from sae_dashboard.components_config import SequencesConfig
    from sae_dashboard.sequence_data_generator import SequenceDataGenerator
    from sae_lens import SAE

    sae = SAE.load_from_disk(exported / HOOK)
    store = ActivationStore(tiny_store)
    with torch.no_grad():
        codes = sae.encode(store.activations(0, store.n_tokens).float())
    codes[torch.from_numpy(store.special_mask(0, store.n_tokens))] = 0  # trained without special tokens: they never count
    grid = WindowGrid.after_leading_template(store, WINDOW_TOKENS)
    spans = [grid.span(window)[1:] for window in range(len(grid))]
    window_maxima = torch.stack([codes[start:stop].max(0).values for start, stop in spans])  # (windows, M)
    tokenizer = load_tokenizer(resolve_model(str(offset_model_folder)))
    token_ids = store.token_ids(0, store.n_tokens)
    windows_with_tokens = defaultdict(list)
    for window, (start, stop) in enumerate(spans):
        windows_with_tokens[tuple(tokenizer.batch_decode([[int(t)] for t in token_ids[start:stop]]))].append(window)
    sequences = SequencesConfig(buffer=None, n_quantiles=N_INTERVALS, top_acts_group_size=EXAMPLES, quantile_group_size=INTERVAL_EXAMPLES)
    layout = SimpleNamespace(feature_centric_layout=SimpleNamespace(seq_cfg=sequences))
    saedashboard = SequenceDataGenerator(layout, tokens=torch.zeros(1, len(grid), dtype=torch.long), W_U=None)

    drawn = silent = 0
    for feature, record in features_by_index(exported).items():
        tags = itertools.groupby(
            record["activations"], key=lambda example: (example["bin_min"], example["bin_max"], example["bin_contains"])
        )
        groups = [(tag, list(examples)) for tag, examples in tags]
        if not window_maxima[:, feature].any():
            assert groups == []  # a feature that never fires has no groups at all
            continue
        titles, _, _ = saedashboard.get_indices_dict(None, window_maxima[:, feature][None])
        (top_title, _), *interval_titles = titles.items()
        (top_tag, _), *interval_groups = groups
        assert top_tag[0] == top_tag[2] == -1 and top_tag[1] == pytest.approx(float(top_title.split(" = ")[1]), abs=1e-3)
        assert len(interval_groups) == sum(len(indices) > 0 for _, indices in interval_titles)
        nonempty = ((title, indices) for title, indices in interval_titles if len(indices))  # an empty interval has no group
        for ((bin_min, bin_max, bin_contains), examples), (title, indices) in zip(interval_groups, nonempty):  # highest first
            lower, upper, percent = (float(number) for number in INTERVAL_TITLE.fullmatch(title).groups())
            assert (bin_min, bin_max) == pytest.approx((lower, upper), abs=1.5e-3)  # both written to 3 decimals
            assert bin_contains == pytest.approx(percent / 100, abs=1.5e-5) and len(examples) == len(indices)
        for (bin_min, bin_max, _), examples in interval_groups:
            strengths = [max(example["values"]) for example in examples]
            assert strengths == sorted(strengths, reverse=True) and all(bin_min <= strength <= bin_max for strength in strengths)
            for example in examples:
                assert example["values"][example["qualifying_token_index"]] == max(example["values"])
                same = [
                    window
                    for window in windows_with_tokens[tuple(example["tokens"])]
                    if np.allclose(example["values"], codes[slice(*spans[window]), feature], atol=1e-3)
                ]
                assert same and all(bin_min - 1e-3 <= window_maxima[window, feature] <= bin_max + 1e-3 for window in same)
                drawn += 1
                silent += max(example["values"]) == 0
    assert drawn > 100 and silent > 10  # the lowest interval also draws windows where the feature is silent, as SAEDashboard's


def test_a_rerun_writes_the_same_files(exported, trained, explained_csv, offset_model_folder, tmp_path):
    """The interval draws are seeded: exporting the same SAE again writes the same bytes."""
    again = export_to(tmp_path / "again", trained, explained_csv, offset_model_folder)
    written = sorted((exported / NEURONPEDIA_FOLDER).iterdir())
    assert [path.read_bytes() for path in written] == [(again / NEURONPEDIA_FOLDER / path.name).read_bytes() for path in written]


def test_the_card_lists_the_neuronpedia_folder_and_a_plain_export_has_none(exported, trained, tmp_path):
    card = (exported / "README.md").read_text()
    assert (
        f"| `{NEURONPEDIA_FOLDER}/` | Neuronpedia's upload files" in card and "batch-0.json`" not in card.split("## Files")[1].split("|")[1]
    )
    plain = export_sae(ExportConfig(checkpoint=str(trained), output=str(tmp_path / "plain"), interpretations=""))
    assert not (plain / NEURONPEDIA_FOLDER).exists() and NEURONPEDIA_FOLDER not in (plain / "README.md").read_text()


def test_user_mistakes_get_one_message_and_leave_no_folder(trained, tmp_path):
    with pytest.raises(UserError, match="NEURONPEDIA_SET 'my set' is not a Neuronpedia source set name"):
        ExportConfig(checkpoint=str(trained), neuronpedia=True, neuronpedia_set="my set")
    with pytest.raises(UserError, match="NEURONPEDIA_MODEL 'google/gemma-2-2b' is not a Neuronpedia model id.*e.g. gemma-2-2b"):
        ExportConfig(checkpoint=str(trained), neuronpedia=True, neuronpedia_model="google/gemma-2-2b")
    with pytest.raises(UserError, match="NEURONPEDIA_EXAMPLES must be at least 1"):
        ExportConfig(checkpoint=str(trained), neuronpedia=True, neuronpedia_examples=0)
    # An SAE with no layer (as on a LoRA store): Neuronpedia files every SAE under a layer.
    payload = torch.load(trained, weights_only=True)
    no_layer = tmp_path / trained.parent.name / trained.name  # in a folder of its name, as train_sae.py writes it
    no_layer.parent.mkdir()
    torch.save({**payload, "fastsae": replace(load_sae(trained).info, layer=None).to_dict()}, no_layer)
    with pytest.raises(UserError, match="Neuronpedia files each SAE under a layer. Set NEURONPEDIA false"):
        export_sae(ExportConfig(checkpoint=str(no_layer), interpretations="", neuronpedia=True, device="cpu"))
    assert sorted(path.name for path in no_layer.parent.iterdir()) == [trained.name]


def test_a_store_that_has_moved_is_named_with_the_setting_that_finds_it(tiny_store, tiny_model_folder, tmp_path):
    """The checkpoint records where its store was; once it is moved, the message says to pass --store, and nothing is written."""
    store = shutil.copytree(tiny_store, tmp_path / "store")
    config = TrainConfig(store=str(store), output_dir=str(tmp_path / "runs"), m=16, k=K, batch_size=256, epochs=0.2)
    checkpoint = Path(train_saes(config)[0]["checkpoint"])
    store.rename(tmp_path / "moved")
    moved = ExportConfig(checkpoint=str(checkpoint), interpretations="", neuronpedia=True, model_name=str(tiny_model_folder), device="cpu")
    with pytest.raises(UserError, match=f"no activation store at {store}.* if it has moved, pass --store with its new place"):
        export_sae(moved)
    assert not list(checkpoint.parent.glob("export*"))
    # NEURONPEDIA_MODEL names the model as Neuronpedia does, in every batch.
    exported = export_sae(replace(moved, store=str(tmp_path / "moved"), neuronpedia_model="tiny-llama-42m"))
    assert json.loads((exported / NEURONPEDIA_FOLDER / "batch-0.json").read_text())["model_id"] == "tiny-llama-42m"


def test_the_default_model_id_is_one_part_of_neuronpedias_address():
    """A Hub id's slash would split neuronpedia.org/<model>/<source>/<index>: the default drops the organisation."""
    assert default_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert default_model_id("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert default_model_id("/models/my tuned llama/") == "my-tuned-llama"
    assert default_model_id("gpt2") == "gpt2"


def test_no_example_is_only_special_tokens(exported, tiny_store, offset_model_folder):
    """The lowest interval drew an example's closing <|im_end|> and newline, cut off as a window of their own, as a
    silent example; interpret never shows such a window. Every example must match a window of the store with content."""
    store = ActivationStore(tiny_store)
    mask = store.special_mask(0, store.n_tokens)
    offsets = store.doc_offsets
    firsts = np.array([start + int(np.argmin(mask[start:stop])) for start, stop in zip(offsets[:-1], offsets[1:])])
    every = WindowGrid(offsets, WINDOW_TOKENS, firsts)  # every window from the first content token, template-only ones too
    tokenizer = load_tokenizer(resolve_model(str(offset_model_folder)))
    token_ids = store.token_ids(0, store.n_tokens)
    has_content = defaultdict(bool)
    for window in range(len(every)):
        _, start, stop = every.span(window)
        has_content[tuple(tokenizer.batch_decode([[int(t)] for t in token_ids[start:stop]]))] |= not mask[start:stop].all()
    examples = [tuple(example["tokens"]) for record in features_by_index(exported).values() for example in record["activations"]]
    assert examples and all(has_content[tokens] for tokens in examples)
