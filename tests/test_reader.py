"""Reading texts through a trained SAE on the tiny Llama: the same features as its store, pooling, checkpoints without metadata, analyze_texts.py."""

from __future__ import annotations

import copy
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_pipeline import set_constants

from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
from fastsae.interpret.interpret_sae import InterpretConfig, interpret_sae
from fastsae.lm.data import load_dataset
from fastsae.store.activation_store import ActivationStore
from fastsae.tools.analyze_texts import AnalyzeConfig, load_texts
from fastsae.tools.reader import SAEReader, pool
from fastsae.train.train_sae import TrainConfig, train_saes

REPO = Path(__file__).resolve().parents[1]
N_EXAMPLES = 40
MAX_LENGTH = 48  # shorter than some examples with SmolLM2's chat template: truncation is exercised too
HOSTILE = 'Then I typed </script><b>bold</b> & <img src=x onerror="window.hacked = 1"> into the form.'


def trained_run(folder: Path, model, tokenizer, model_folder: Path, storage_dtype: str) -> dict:
    """A store of the first examples of the default dataset (in `storage_dtype`), and a small SAE trained on it."""
    config = ExtractConfig(
        model_name=str(model_folder),
        layers=[2],
        max_length=MAX_LENGTH,
        max_examples=N_EXAMPLES,
        batch_tokens=400,
        storage_dtype=storage_dtype,
        output_dir=str(folder / "activations"),
    )
    dataset = load_dataset(config.dataset, max_examples=N_EXAMPLES)
    (store,) = write_activation_stores(model, tokenizer, dataset, config, "tiny", {"model_name": str(model_folder)})
    (result,) = train_saes(
        TrainConfig(
            store=str(store),
            output_dir=str(folder / "checkpoints"),
            m=32,
            k=4,
            batch_size=128,
            epochs=3.0,
            buffer_tokens=1024,
            eval_every=10,
        )
    )
    return {"store": ActivationStore(store), "checkpoint": result["checkpoint"], "examples": dataset.examples}


@pytest.fixture(scope="module")
def run32(tmp_path_factory, tiny_llama, smollm2_tokenizer, tiny_model_folder) -> dict:
    return trained_run(tmp_path_factory.mktemp("reader32"), tiny_llama, smollm2_tokenizer, tiny_model_folder, "float32")


@pytest.fixture(scope="module")
def reader32(run32) -> SAEReader:
    return SAEReader.load(run32["checkpoint"], device="cpu")


def test_reader_uses_the_extraction_settings_of_the_checkpoint(reader32, tiny_model_folder):
    settings = reader32.extraction
    assert (settings.model_name, settings.hook_point, settings.layers, settings.max_length, settings.chat_template) == (
        str(tiny_model_folder),
        "resid_post",
        [2],
        MAX_LENGTH,
        "auto",
    )
    assert settings.device == "cpu" and reader32.include_special is False
    assert (settings.batching, settings.attention) == ("auto", "auto")  # the store records the path its run took: packed, sdpa


def test_texts_in_the_store_get_the_features_of_their_stored_activations(run32, reader32, caplog):
    """Read in other batches than extraction's (packed rows, as extraction packs them), each text gets its stored
    activations and hence the same features."""
    store, examples = run32["store"], run32["examples"]
    chosen = [0, 5, 7, 12, 13, 30, 39]
    with caplog.at_level("INFO", logger="fastsae.extract.extract_activations"):
        readings = reader32.read([examples[index].text for index in chosen])
    assert "Batching: packed rows of up to" in caplog.text
    activations = reader32.activations([examples[index].text for index in chosen])
    assert any(reading.truncated for reading in readings) and any(reading.special_mask.any() for reading in readings)
    for index, reading, raw in zip(chosen, readings, activations):
        stored = store.example(index)
        np.testing.assert_array_equal(reading.token_ids, stored.token_ids)
        np.testing.assert_array_equal(reading.special_mask, stored.special_mask)
        # float32 storage: only the summation order of differently padded batches differs.
        torch.testing.assert_close(raw, stored.activations, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reading.token_features.to_dense(), reader32.encode(stored.activations).cpu(), rtol=1e-4, atol=1e-4)
        assert "".join(reading.tokens) == reader32.tokenizer.decode(stored.token_ids) and len(reading.tokens) == len(stored.token_ids)
    (japanese,) = reader32.read(["I would fly to 日本語 🙂 tomorrow."])  # byte-level tokens split 日 and 🙂 over several
    assert "\ufffd" not in "".join(japanese.tokens) and " 日" in japanese.tokens and " 🙂" in japanese.tokens


def test_float16_store_matches_too(tmp_path, tiny_llama, smollm2_tokenizer, tiny_model_folder):
    """The reader rounds to the store's dtype as extraction did: the same float16 values, so the same features."""
    run = trained_run(tmp_path, tiny_llama, smollm2_tokenizer, tiny_model_folder, "float16")
    reader = SAEReader.load(run["checkpoint"], device="cpu")
    chosen = [1, 2, 20]
    readings = reader.read([run["examples"][index] for index in chosen])
    for index, reading, raw in zip(chosen, readings, reader.activations([run["examples"][index] for index in chosen])):
        stored = run["store"].example(index).activations
        # Different batching can move a float32 value across a float16 rounding boundary: at most one float16 step apart.
        torch.testing.assert_close(raw, stored.float(), rtol=2**-10, atol=1e-6)
        torch.testing.assert_close(reading.token_features.to_dense(), reader.encode(stored).cpu(), rtol=1e-3, atol=1e-3)


def test_texts_run_in_the_precision_the_store_was_computed_in_on_any_device(tmp_path, tiny_llama, smollm2_tokenizer, tiny_model_folder):
    """A store computed in bfloat16 (as COMPUTE_DTYPE = auto does on a GPU) is read in bfloat16 on the CPU too, whose own auto
    is float32: a store's activations and a reading's differ by rounding only, not by a change of precision."""
    run = trained_run(tmp_path, copy.deepcopy(tiny_llama).to(torch.bfloat16), smollm2_tokenizer, tiny_model_folder, "float32")
    assert run["store"].manifest.extraction["compute_dtype"] == "bfloat16"
    reader = SAEReader.load(run["checkpoint"], device="cpu")
    assert next(reader.model.parameters()).dtype == torch.bfloat16
    (raw,) = reader.activations([run["examples"][1]])
    torch.testing.assert_close(raw, run["store"].example(1).activations, rtol=2**-7, atol=1e-3)


def test_pooled_features_are_the_token_reductions(run32, reader32):
    texts = [example.text for example in run32["examples"][:6]]
    for pooling, reduce in (("max", lambda x: x.amax(0)), ("mean", lambda x: x.mean(0))):
        for reading in reader32.read(texts, pooling=pooling):
            np.testing.assert_array_equal(reading.pooled_mask, ~reading.special_mask)  # trained without special tokens
            dense = reading.token_features.to_dense()
            torch.testing.assert_close(reading.pooled, reduce(dense[torch.from_numpy(reading.pooled_mask)]))
    assert torch.equal(pool(torch.ones(3, 2), torch.zeros(3, dtype=torch.bool), "mean"), torch.zeros(2))
    with pytest.raises(UserError, match="POOLING must be one of max, mean"):
        reader32.read(texts, pooling="sum")


def test_encode_and_decode_work_on_raw_activations(run32, reader32):
    raw = run32["store"].activations(0, 200)
    features = reader32.encode(raw)
    assert features.shape == (200, 32) and int((features > 0).sum(1).max()) <= 4
    torch.testing.assert_close(reader32.decode(features), load_sae(run32["checkpoint"]).sae(raw.float()), rtol=1e-4, atol=1e-4)


def test_a_bare_hypothesaes_checkpoint_needs_model_hook_and_layer(run32, reader32, tmp_path, tiny_model_folder):
    payload = torch.load(run32["checkpoint"], weights_only=True)
    bare = tmp_path / "SAE_M=32_K=4.pt"
    torch.save({"config": payload["config"], "state_dict": payload["state_dict"]}, bare)
    with pytest.raises(UserError, match=r"does not record the model, hook point and layer.*MODEL_NAME, HOOK_POINT .* and LAYER"):
        SAEReader.load(str(bare), device="cpu")
    with pytest.raises(UserError, match="does not record"):
        SAEReader.load(str(bare), device="cpu", model_name=str(tiny_model_folder), hook_point="resid_post")
    reader = SAEReader.load(str(bare), device="cpu", model_name=str(tiny_model_folder), hook_point="resid_post", layer=2)
    text = min((example.text for example in run32["examples"]), key=len)  # short: not truncated under either MAX_LENGTH
    (ours,), (theirs,) = reader32.read([text]), reader.read([text])
    np.testing.assert_array_equal(ours.token_ids, theirs.token_ids)
    # The bare file falls back to extraction's float16 storage: features agree to float16 precision.
    torch.testing.assert_close(theirs.token_features.to_dense(), ours.token_features.to_dense(), rtol=1e-2, atol=1e-2)


def test_settings_that_contradict_the_checkpoint_are_refused(run32):
    with pytest.raises(UserError, match="trained at layer 2, not 1"):
        SAEReader.load(run32["checkpoint"], device="cpu", layer=1)
    with pytest.raises(UserError, match="trained at hook_point 'resid_post', not 'mlp_out'"):
        SAEReader.load(run32["checkpoint"], device="cpu", hook_point="mlp_out")


@pytest.fixture(scope="module")
def analysis(run32, tiny_model_folder, tmp_path_factory) -> dict:
    """analyze_texts.py run as a user runs it, with an interpretations.csv from interpret_sae for the same SAE."""
    folder = tmp_path_factory.mktemp("analysis")
    interpretations = interpret_sae(
        InterpretConfig(
            checkpoint=run32["checkpoint"],
            features="all",
            interpretations_path=str(folder / "interpretations.csv"),
            explain=False,
            device="cpu",
        )
    )
    script = folder / "analyze_texts.py"
    shutil.copy(REPO / "analyze_texts.py", script)
    texts = [run32["examples"][0].text, HOSTILE, "Maybe I was wrong about her."]
    set_constants(
        script,
        CHECKPOINT=run32["checkpoint"],
        TEXTS=texts,
        TOP_N=3,
        INTERPRETATIONS=str(interpretations),
        DEVICE="cpu",
        CSV_PATH=str(folder / "text_features.csv"),
        HEATMAP_PATH=str(folder / "text_features.png"),
        HTML_PATH=str(folder / "text_features.html"),
    )
    return {"folder": folder, "script": script, "texts": texts, "interpretations": pd.read_csv(interpretations, keep_default_na=False)}


def run_script(script: Path, monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out


def test_analyze_texts_writes_csv_png_and_html(analysis, monkeypatch, capsys):
    out = run_script(analysis["script"], monkeypatch, capsys)
    folder, texts = analysis["folder"], analysis["texts"]
    table = pd.read_csv(folder / "text_features.csv", keep_default_na=False)
    assert list(table["text"]) == texts
    feature_columns = [column for column in table.columns if column.startswith("feature_")]
    assert feature_columns and all(len(str(top).split()) <= 3 for top in table["top_features"])
    for row in table.itertuples():  # each text's top features are columns, and the largest of its row
        top = [int(f) for f in str(row.top_features).split()]
        values = table.loc[row.Index, feature_columns].astype(float)
        assert top and values[f"feature_{top[0]}"] == values.max()
    assert (folder / "text_features.png").read_bytes().startswith(b"\x89PNG")
    # The report names each text's features with their firing tokens from interpretations.csv.
    first_top = int(str(table["top_features"][0]).split()[0])
    tokens = analysis["interpretations"].set_index("feature").loc[first_top, "top_tokens"]
    assert f"feature {first_top:>6}" in out and f"tokens: {tokens}" in out

    page = (folder / "text_features.html").read_text()
    data_text = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data_text and ">" not in data_text and "&" not in data_text
    data = json.loads(data_text)
    assert [t["text"] for t in data["texts"]] == texts
    assert "</script><b>" not in page.split('id="data">', 1)[1].split("</script>", 1)[0]
    assert "function tokenHeatmap" in page and "__HEATMAP" not in page  # the dashboard's shared heatmap


def test_analyze_texts_reads_a_texts_file_and_stops_on_a_bare_checkpoint(analysis, run32, monkeypatch, capsys, tmp_path):
    texts_file = tmp_path / "texts.csv"
    pd.DataFrame({"content": ["First, I weigh the options.", "", "Then I decide."]}).to_csv(texts_file, index=False)
    run_script(
        analysis["script"],
        monkeypatch,
        capsys,
        "--texts-file",
        str(texts_file),
        "--pooling",
        "mean",
        "--csv-path",
        str(tmp_path / "out.csv"),
    )
    assert list(pd.read_csv(tmp_path / "out.csv")["text"]) == ["First, I weigh the options.", "Then I decide."]  # the empty row is skipped
    payload = torch.load(run32["checkpoint"], weights_only=True)
    torch.save({"config": payload["config"], "state_dict": payload["state_dict"]}, tmp_path / "bare.pt")
    with pytest.raises(SystemExit) as stopped:
        run_script(analysis["script"], monkeypatch, capsys, "--checkpoint", str(tmp_path / "bare.pt"))
    assert stopped.value.code == 2
    assert "MODEL_NAME, HOOK_POINT" in capsys.readouterr().err


def test_reader_page_in_chromium_shows_heatmaps_and_keeps_hostile_text_as_text(analysis, monkeypatch, capsys, tmp_path):
    from test_dashboard import CHROMIUM, CHROMIUM_FLAGS

    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run does).")
    from playwright.sync_api import sync_playwright

    run_script(analysis["script"], monkeypatch, capsys, "--html-path", str(tmp_path / "page.html"))
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((tmp_path / "page.html").resolve().as_uri())
        cards = page.locator(".card")
        assert cards.count() == len(analysis["texts"])
        hostile = cards.nth(1)
        assert "</script><b>bold</b>" in hostile.inner_text()  # the markup is there, as visible text
        assert page.locator(".card b").count() == 0 and page.locator(".card img").count() == 0
        assert page.evaluate("window.hacked") is None
        chips = hostile.locator("button.chip")
        assert chips.count() >= 1 and "selected" in chips.first.get_attribute("class")
        chips.last.click()
        assert "selected" in chips.last.get_attribute("class")
        assert hostile.locator(".about").inner_text().startswith(f"feature {chips.last.get_attribute('data-feature')}:")
        assert hostile.locator(".context .token").first.get_attribute("title").startswith("activation ")
        browser.close()
    assert errors == []


def test_texts_file_settings_are_checked_and_named_as_analyze_texts_names_them(tmp_path):
    with pytest.raises(UserError, match="MAX_TEXTS must be positive, or 0 for every text; got -1"):  # it read one text
        AnalyzeConfig(max_texts=-1)
    with pytest.raises(UserError, match=r"Set TEXTS_FILE \(or --texts-file\)"):
        load_texts(AnalyzeConfig(texts_file=str(tmp_path / "missing.jsonl")))


def test_an_output_path_that_is_a_folder_or_named_twice_is_refused_before_the_model_runs(tmp_path):
    """A folder failed only after every text was read, with the CSV written and the figure not; one path for two outputs
    kept only the last written."""
    with pytest.raises(UserError, match=rf"HEATMAP_PATH = {tmp_path} is a folder: set it to the path of a file"):
        AnalyzeConfig(texts=["Hi."], heatmap_path=str(tmp_path))
    with pytest.raises(UserError, match="CSV_PATH and HTML_PATH name the same file, .*out: one output would replace the other"):
        AnalyzeConfig(texts=["Hi."], csv_path=str(tmp_path / "out"), html_path=str(tmp_path / "out"))


def test_texts_are_cut_at_a_learned_position_table_even_when_max_length_is_longer(smollm2_tokenizer):
    """Extraction refuses sequences past GPT-2's table, so a store made with a longer MAX_LENGTH never held one; the
    reader cuts there too, where it used to index past the table."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastsae.core.sae import SAESpec, SparseAutoencoder

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    extraction = ExtractConfig(layers=[1], max_length=64, chat_template="none")
    reader = SAEReader(SparseAutoencoder(SAESpec("topk", 64, 96, 4)).eval(), gpt2, smollm2_tokenizer, extraction, include_special=False)
    long_text, short_text = " ".join(["word"] * 50), "Ok."
    long_read, short_read = reader.read([long_text, short_text])
    assert len(long_read.token_ids) == 32 and long_read.truncated
    assert not short_read.truncated and long_read.token_features.shape == (32, 96)


def test_a_blank_text_in_texts_is_refused_naming_it():
    """A blank text was read through the chat template: its row reported the features of a lone space token, as if they
    were the text's, where a TEXTS_FILE skips such a row."""
    with pytest.raises(UserError, match=r"TEXTS\[1\] is empty: write the text to read, or remove it"):
        AnalyzeConfig(texts=["Maybe I was wrong.", "  "])
    with pytest.raises(UserError, match=r"TEXTS\[0\] is empty"):
        AnalyzeConfig(texts=[""])
