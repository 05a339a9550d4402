"""export_sae: one folder that SAELens, HypotheSAEs and fastsae load alike, with a model card the Hub reads, and a push that fails clearly offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from safetensors.torch import load_file

from conftest import InterruptedRun, hypothesaes_module, interpret_without_llm
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.core.formats.sources import load_any_sae, results_folder
from fastsae.evaluate.evaluate_sae import EvalConfig, evaluate_sae
from fastsae.export import export_sae as share
from fastsae.export.export_sae import ExportConfig, export_sae
from fastsae.export.model_card import REPO_PLACEHOLDER
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainConfig, train_saes

REPO_ROOT = Path(__file__).resolve().parents[1]
M, K = 64, 4
HOOK = "blocks.2.hook_resid_post"
# What an LLM might answer: a pipe, a newline and HTML must stay inside one cell, as text.
TRICKY_EXPLANATION = "words like «would» | «could»\nand <script>alert(1)</script>"


@pytest.fixture(scope="module")
def trained(tiny_store, tmp_path_factory) -> Path:
    """A trained SAE's folder as train_sae.py leaves it (checkpoint, saelens/, metrics.json, curves), not evaluated."""
    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path_factory.mktemp("export-runs")), m=M, k=K, batch_size=256, epochs=2.0
    )
    (result,) = train_saes(config)
    return Path(result["checkpoint"])


@pytest.fixture(scope="module")
def evaluated(trained, tiny_model_folder, tmp_path_factory) -> Path:
    """A copy of the run, evaluated with the model metrics (eval.json, feature_density.png beside the checkpoint)."""
    folder = shutil.copytree(trained.parent, tmp_path_factory.mktemp("evaluated") / trained.parent.name)
    checkpoint = folder / trained.name
    evaluate_sae(EvalConfig(checkpoint=str(checkpoint), model_name=str(tiny_model_folder), device="cpu", max_examples=12))
    return checkpoint


@pytest.fixture(scope="module")
def unscored_csv(trained, tiny_model_folder, tmp_path_factory) -> Path:
    """interpret_sae.py's CSV as it is without an API key: statistics and contexts, no explanation or score."""
    return interpret_without_llm(trained, tiny_model_folder, tmp_path_factory.mktemp("interpret") / "interpretations.csv", "frequency:20")


@pytest.fixture(scope="module")
def scored_csv(unscored_csv) -> Path:
    """The same CSV with explanations and scores filled in for 14 of its 20 features, as the LLM step writes them."""
    table = pd.read_csv(unscored_csv)
    scores = np.random.default_rng(0).permutation(np.linspace(0.5, 1.0, 14))
    table["explanation"] = table["explanation"].astype(object)
    for row, score in enumerate(scores):
        table.loc[row, ["explanation", "detection_score"]] = [f"explanation of feature {table.loc[row, 'feature']}", round(float(score), 4)]
    best = int(np.argmax(scores))
    table.loc[best, "explanation"] = TRICKY_EXPLANATION
    path = unscored_csv.with_name("scored.csv")
    table.to_csv(path, index=False)
    return path


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table as rendered by a GFM parser (rows of cell texts), after checking each source row has the header's column count.

    The parser alone would hide a broken row (it drops extra cells), so the raw rows are counted too.
    """
    for block in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in block.splitlines()}
        assert len(widths) == 1, f"a row's column count differs from its header's:\n{block}"
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    assert not [token for token in tokens if token.type == "html_block"]
    assert not [child for token in tokens for child in token.children or [] if child.type == "html_inline"], "raw HTML in the card"
    tables: list[list[list[str]]] = []
    row: list[str] | None = None
    for token in tokens:
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close":
            tables[-1].append(row)
            row = None
        elif token.type == "inline" and row is not None:
            row.append("".join(child.content for child in token.children))
    assert len(tables) == len(re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M)), "a pipe block that does not render as a table"
    return tables


def table_with_header(tables: list[list[list[str]]], *header: str) -> list[list[str]]:
    return next(table for table in tables if tuple(table[0][: len(header)]) == header)


def card_body(folder: Path) -> tuple[ModelCard, list[list[list[str]]]]:
    card = ModelCard.load(folder / "README.md")  # the Hub's own parser of the front matter
    return card, markdown_tables(card.text)


def test_the_export_loads_in_saelens_hypothesaes_and_fastsae_with_the_same_encodings(evaluated, scored_csv, tiny_store, tmp_path):
    from sae_lens import SAE
    from sae_lens.training.sae_trainer import _log_feature_sparsity

    folder = export_sae(ExportConfig(checkpoint=str(evaluated), output=str(tmp_path / "export"), interpretations=str(scored_csv)))
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert files == sorted(
        ["README.md", evaluated.name, f"{HOOK}/cfg.json", f"{HOOK}/sae_weights.safetensors", f"{HOOK}/sparsity.safetensors"]
        + ["eval.json", "feature_density.png", "metrics.json", "training_curves.png", "interpretations.csv"]
    )
    assert (folder / evaluated.name).read_bytes() == evaluated.read_bytes()
    raw = ActivationStore(tiny_store).activations(0, 3000).float()  # stored activations, special tokens included
    ours = load_sae(folder / evaluated.name).sae
    theirs = SAE.load_from_disk(folder / HOOK)
    hypothesaes = hypothesaes_module().load_model(str(folder / evaluated.name), device="cpu")
    with torch.no_grad():
        codes = ours.encode(raw)
        assert (codes > 0).sum(1).float().mean() > 1  # the comparison is not between empty codes
        torch.testing.assert_close(theirs.encode(raw), codes, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hypothesaes(raw)[1]["activations"], codes, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes), ours.decode(codes), rtol=1e-4, atol=1e-4)
    density = torch.tensor(json.loads((folder / "eval.json").read_text())["feature_density"])
    sparsity = load_file(folder / HOOK / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, _log_feature_sparsity(density.float()))  # what SAELens' trainer writes there
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("architecture", "prefixes", "saelens_architecture"),
    [("batchtopk", [], "jumprelu"), ("relu", [], "standard"), ("jumprelu", [], "jumprelu"), ("batchtopk", [16, M], "jumprelu")],
    ids=["batchtopk", "relu", "jumprelu", "matryoshka-batchtopk"],
)
def test_every_architecture_exports_to_the_same_encoder_in_each_library(architecture, prefixes, saelens_architecture, tiny_store, tmp_path):
    """The Top-K export is checked above; the others take other paths (thresholds, no k, prefixes) through the same export."""
    from sae_lens import SAE

    config = TrainConfig(
        store=str(tiny_store), output_dir=str(tmp_path / "runs"), m=M, k=K, architecture=architecture, matryoshka_prefixes=prefixes,
        batch_size=256, epochs=0.5,
    )  # fmt: skip
    (result,) = train_saes(config)
    checkpoint = Path(result["checkpoint"])
    folder = export_sae(ExportConfig(checkpoint=str(checkpoint), output=str(tmp_path / "export"), interpretations=""))
    cfg = json.loads((folder / HOOK / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_name"]) == (saelens_architecture, 64, M, HOOK)
    raw = ActivationStore(tiny_store).activations(0, 2000).float()
    ours = load_sae(folder / checkpoint.name).sae
    theirs = SAE.load_from_disk(folder / HOOK)
    with torch.no_grad():
        codes = ours.encode(raw)
        assert (codes > 0).sum(1).float().mean() > 1
        torch.testing.assert_close(theirs.encode(raw), codes, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.decode(codes), ours.decode(codes), rtol=1e-4, atol=1e-4)
        if ours.spec.runs_in_hypothesaes:
            hypothesaes = hypothesaes_module().load_model(str(folder / checkpoint.name), device="cpu").eval()  # BatchTopK's threshold
            torch.testing.assert_close(hypothesaes(raw)[1]["activations"], codes, rtol=1e-4, atol=1e-5)


def test_the_training_folder_stands_for_its_checkpoint(trained):
    """The folder train_sae.py writes holds the checkpoint and the SAELens export of the same SAE: not two SAEs to choose from."""
    from_folder, from_file = load_any_sae(trained.parent), load_any_sae(trained)
    assert from_folder.info == from_file.info and results_folder(trained.parent) == results_folder(trained)
    for name, tensor in from_file.sae.state_dict().items():
        assert torch.equal(from_folder.sae.state_dict()[name], tensor), name


def test_saelens_from_pretrained_finds_the_sae_where_the_repo_keeps_it(evaluated, tiny_store, tmp_path, monkeypatch):
    """SAE.from_pretrained(repo, sae_id) reads `{sae_id}/cfg.json` from the repo: served here from a Hub cache, offline."""
    from huggingface_hub import constants
    from sae_lens import SAE

    folder = export_sae(ExportConfig(checkpoint=str(evaluated), output=str(tmp_path / "export"), interpretations=""))
    repo_cache, commit = tmp_path / "hub" / "models--me--tiny-sae", "0" * 40
    shutil.copytree(folder, repo_cache / "snapshots" / commit)  # what `upload_folder` then a download would leave
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sae, cfg, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity("me/tiny-sae", HOOK)
    raw = ActivationStore(tiny_store).activations(0, 500).float()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(raw), load_sae(evaluated).sae.encode(raw), rtol=1e-4, atol=1e-5)
    assert cfg["metadata"]["hook_name"] == HOOK and log_sparsity.shape == (M,)


def test_the_model_card_renders_its_tables_with_the_right_values(evaluated, scored_csv, tmp_path):
    folder = export_sae(ExportConfig(checkpoint=str(evaluated), output=str(tmp_path / "export"), interpretations=str(scored_csv)))
    card, tables = card_body(folder)
    assert card.data.library_name == "saelens"
    assert {"sparse-autoencoder", "saelens", "fastsae", "topk"} <= set(card.data.tags)
    assert card.data.base_model is None  # the tiny model is a local folder: no Hub id to link
    info = load_sae(evaluated).info
    manifest = info.store_manifest

    facts = dict(row for row in table_with_header(tables, "", "value") if len(row) == 2)
    assert facts["hook"] == HOOK and facts["layer"] == "2" and facts["activation width d"] == "64"
    assert facts["dataset fingerprint"] == manifest.dataset.fingerprint
    assert facts["tokens in the store"] == str(manifest.n_tokens) and facts["examples"] == str(manifest.dataset.n_examples)
    assert facts["special tokens in training"] == "excluded (BOS and chat-template tokens)" and "the FAST way" in card.text
    metadata = json.loads((folder / HOOK / "cfg.json").read_text())["metadata"]
    assert (metadata["exclude_special_tokens"], metadata["prepend_bos"]) == (True, True)  # the chat template opens with BOS
    settings = dict(table_with_header(tables, "setting", "value")[1:])
    assert settings["m"] == str(M) and settings["k"] == str(K) and settings["learning_rate"] == str(info.training["learning_rate"])
    # Published: the folders of the machine that trained are named, not their paths (a home folder, a project's name).
    assert settings["store"] == Path(info.training["store"]).name and settings["output_dir"] == Path(info.training["output_dir"]).name
    assert str(Path(info.training["store"]).parent) not in card.text
    assert f'load_model(hf_hub_download("{REPO_PLACEHOLDER}", "{evaluated.name}")).eval()' in card.text  # BatchTopK: its threshold

    evaluation = json.loads((evaluated.parent / "eval.json").read_text())
    reconstruction = {row[0]: row[1:] for row in table_with_header(tables, "metric (ours)", "all tokens", "content", "special")}
    assert reconstruction["FVU"] == [f"{evaluation['reconstruction'][kind]['fvu']:.4f}" for kind in ("all", "content", "special")]
    saebench = {row[1]: row[2] for row in table_with_header(tables, "group", "metric", "value", "95% interval")[1:]}
    assert (
        saebench["ce_loss_score"]
        == f"{evaluation['saebench_core']['eval_result_metrics']['model_performance_preservation']['ce_loss_score']:.4f}"
    )
    verdicts = {row[0]: row[3] for row in table_with_header(tables, "health check")[1:]}
    assert verdicts == {row["metric"]: row["verdict"] for row in evaluation["health"]}

    features = table_with_header(tables, "rank", "feature", "detection", "fuzzing", "explanation")
    expected = pd.read_csv(scored_csv).dropna(subset=["detection_score"]).sort_values("detection_score", ascending=False).head(10)
    assert [int(row[1]) for row in features[1:]] == expected["feature"].tolist()
    assert [float(row[2]) for row in features[1:]] == pytest.approx(expected["detection_score"].tolist(), abs=5e-4)
    assert features[1][4] == " ".join(TRICKY_EXPLANATION.split())  # one cell, the text intact, no HTML
    assert "best-scored" in card.text and "No LLM scores" not in card.text
    assert "![feature density](feature_density.png)" in card.text


def test_a_rare_features_frequency_shows_on_the_card_as_it_is(trained, scored_csv, tmp_path):
    """A feature firing on 3 tokens in 100,000 is common in a large SAE: four decimals showed it as 0.0000, never firing."""
    table = pd.read_csv(scored_csv)
    best = table["detection_score"].idxmax()
    table.loc[best, "frequency"] = 3.2e-5
    table.to_csv(tmp_path / "rare.csv", index=False)
    folder = export_sae(ExportConfig(checkpoint=str(trained), output=str(tmp_path / "export"), interpretations=str(tmp_path / "rare.csv")))
    features = table_with_header(card_body(folder)[1], "rank", "feature", "detection", "fuzzing", "explanation")
    assert (int(features[1][1]), float(features[1][5])) == (table.loc[best, "feature"], 3.2e-5)


def test_an_evaluation_without_model_metrics_claims_no_saebench_table(trained, tmp_path):
    folder = shutil.copytree(trained.parent, tmp_path / trained.parent.name)
    evaluate_sae(EvalConfig(checkpoint=str(folder / trained.name), model_metrics=False, device="cpu", max_examples=4))
    card, tables = card_body(export_sae(ExportConfig(checkpoint=str(folder / trained.name), interpretations="")))
    assert "The SAEBench table" not in card.text and not [table for table in tables if table[0][:2] == ["group", "metric"]]
    assert "Model metrics (SAEBench's core: ce_loss_score, KL) not measured: run `python evaluate_sae.py" in card.text


def test_missing_evaluation_and_interpretations_are_said_on_the_card(trained, unscored_csv, tmp_path):
    bare = export_sae(ExportConfig(checkpoint=str(trained), output=str(tmp_path / "bare"), interpretations=str(tmp_path / "absent.csv")))
    card, tables = card_body(bare)
    assert "Not evaluated: run `python evaluate_sae.py" in card.text and "No interpretations: run `python interpret_sae.py" in card.text
    assert not (bare / "eval.json").exists() and not (bare / "interpretations.csv").exists()
    # Without an evaluation, SAELens' sparsity comes from the training export (its validation tokens).
    assert (bare / HOOK / "sparsity.safetensors").read_bytes() == (trained.parent / "saelens" / "sparsity.safetensors").read_bytes()
    assert not any(table[0][:2] == ["rank", "feature"] for table in tables)

    unscored = export_sae(ExportConfig(checkpoint=str(trained), output=str(tmp_path / "unscored"), interpretations=str(unscored_csv)))
    card, tables = card_body(unscored)
    assert "No LLM scores" in card.text
    features = table_with_header(tables, "rank", "feature", "detection", "fuzzing", "explanation")
    frequencies = [float(row[5]) for row in features[1:]]
    assert len(frequencies) == 10 and frequencies == sorted(frequencies, reverse=True)
    assert all(row[2] == row[3] == row[4] == "—" for row in features[1:])


def test_interpretations_of_another_sae_of_the_same_size_are_refused(trained, unscored_csv, tiny_store, tmp_path):
    """A sweep's SAEs can share M: the feature numbers alone let one SAE's explanations be attached to another."""
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path / "runs"), m=M, k=K, batch_size=256, epochs=0.2, seed=1)
    (other,) = train_saes(config)
    with pytest.raises(UserError, match=r"interpretations.csv was written for another SAE \(sae_fingerprint"):
        export_sae(ExportConfig(checkpoint=other["checkpoint"], output=str(tmp_path / "export"), interpretations=str(unscored_csv)))
    assert not (tmp_path / "export").exists()


def test_an_evaluation_of_the_sae_at_another_step_or_of_another_sae_is_refused(tiny_store, tmp_path):
    """eval.json stays beside the checkpoint when training goes on (a mid-run checkpoint evaluated, then the run resumed)
    or starts over (--overwrite): its numbers and densities would be exported as the new SAE's."""
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path / "runs"), m=M, k=K, batch_size=256, epochs=0.5)
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config, stop_after=3).run()
    (checkpoint,) = (tmp_path / "runs").rglob("SAE_*.pt")
    evaluate = EvalConfig(checkpoint=str(checkpoint), model_metrics=False, device="cpu", max_examples=4)
    evaluate_sae(evaluate)
    train_saes(config)  # resumed to its end
    export = ExportConfig(checkpoint=str(checkpoint), output=str(tmp_path / "export"), interpretations="")
    with pytest.raises(
        UserError, match=r"eval.json describes other weights than those in .*trained further since. Rerun evaluate_sae.py on it"
    ):
        export_sae(export)
    evaluate_sae(evaluate)
    assert export_sae(export).is_dir()
    train_saes(replace(config, overwrite=True, seed=1))  # the same steps, another SAE
    with pytest.raises(UserError, match="eval.json describes other weights than those in"):
        export_sae(export)
    # An eval.json from before the fingerprint was recorded: its checkpoint state tells.
    evaluate_sae(evaluate)
    eval_path = checkpoint.parent / "eval.json"
    older = {key: value for key, value in json.loads(eval_path.read_text()).items() if key != "sae_fingerprint"}
    eval_path.write_text(json.dumps({**older, "checkpoint_state": {**older["checkpoint_state"], "step": 3}}))
    with pytest.raises(
        UserError, match=r"eval.json describes the SAE at step 3, and .* holds it at step \d+.*Rerun `python evaluate_sae.py"
    ):
        export_sae(export)
    assert not (tmp_path / "export.partial").exists()


def test_base_model_is_named_only_when_the_model_is_on_the_hub(trained, tmp_path):
    info = load_sae(trained).info
    embedded = replace(info, model_source="embedded", model_name="embedded:smollm2-135m-instruct")
    assert embedded.hub_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert replace(info, model_source="folder", model_name="/models/mine").hub_model_id is None
    assert replace(info, model_source=None).hub_model_id is None  # a checkpoint from before model_source was recorded
    # A checkpoint whose store came from a Hub model: the card links it, and SAELens' cfg.json names it.
    run = tmp_path / "run"
    run.mkdir()
    payload = torch.load(trained, weights_only=True)
    hub_info = replace(info, model_name="meta-llama/Llama-3.1-8B-Instruct", model_source="hub")
    torch.save({**payload, "fastsae": hub_info.to_dict()}, run / trained.name)
    folder = export_sae(ExportConfig(checkpoint=str(run / trained.name), interpretations=""))
    assert folder == run / trained.stem / "export"  # beside its eval.json: a folder of its own in a folder not named after it
    assert ModelCard.load(folder / "README.md").data.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert json.loads((folder / HOOK / "cfg.json").read_text())["metadata"]["model_name"] == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            "offline",
            "cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE is set). Unset HF_HUB_OFFLINE on a machine with a network.",
        ),
        ("unreachable", "cannot reach the Hugging Face Hub at http://127.0.0.1:{port} (ConnectError"),
    ],
    ids=["offline", "unreachable"],
)
def test_push_without_a_network_fails_fast_with_one_line_and_keeps_the_export(trained, tmp_path, network, message):
    """Run as the user runs it: the script, in a process whose environment says offline or points at a closed port."""
    with socket.socket() as probe:  # a port nothing listens on: no request ever leaves this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "export"
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HUB_OFFLINE": "1" if network == "offline" else "0",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": "hf_unused",
    }
    command = [
        sys.executable,
        str(REPO_ROOT / "export_sae.py"),
        "--checkpoint",
        str(trained),
        "--output",
        str(output),
        "--push-to-hub",
        "me/tiny-sae",
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert message.format(port=port) in errors[0]
    assert f"The export is complete in {output}: push it later with `hf upload me/tiny-sae {output} .`" in errors[0]
    assert (output / "README.md").is_file() and (output / HOOK / "sae_weights.safetensors").is_file()
    assert f'SAE.from_pretrained("me/tiny-sae", "{HOOK}")' in (output / "README.md").read_text()


def test_the_command_to_push_later_runs_from_a_folder_with_a_space(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "My Drive" / "export"
    folder.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as refused:
        share.push_to_hub(folder, "me/tiny-sae", private=True)
    command = re.search(r"`(hf upload [^`]*)`", str(refused.value))[1]
    assert shlex.split(command) == ["hf", "upload", "me/tiny-sae", str(folder), "."]


def test_no_half_written_folder_on_failure_and_an_earlier_export_stays(trained, unscored_csv, tmp_path, monkeypatch):
    output = tmp_path / "export"
    export_sae(ExportConfig(checkpoint=str(trained), output=str(output), interpretations=""))
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}

    def fail(inputs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(share, "render_model_card", fail)  # fails after the weights and copies are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_sae(ExportConfig(checkpoint=str(trained), output=str(output), interpretations=str(unscored_csv)))
    monkeypatch.undo()
    other_sae = pd.read_csv(unscored_csv).assign(feature=lambda table: table["feature"] + M)
    other_sae.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(UserError, match=f"describes feature {int(other_sae['feature'].iloc[0])}, but this SAE has features 0..{M - 1}"):
        export_sae(ExportConfig(checkpoint=str(trained), output=str(output), interpretations=str(tmp_path / "other.csv")))
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "other.csv"]

    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not an earlier export: it would be replaced. Set OUTPUT"):
        export_sae(ExportConfig(checkpoint=str(trained), output=str(mine)))
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not a Hub repo id"):
        ExportConfig(checkpoint=str(trained), push_to_hub="not a repo/with spaces")


def test_an_earlier_export_holding_other_files_is_not_replaced(trained, tmp_path):
    """A git clone of the pushed repo holds the export and its .git (and maybe other SAEs): a re-export into it deleted them."""
    clone = export_sae(ExportConfig(checkpoint=str(trained), output=str(tmp_path / "clone"), interpretations=""))
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(UserError, match=r"clone exists and holds an earlier export, but also .git, which the export does not write: it"):
        export_sae(ExportConfig(checkpoint=str(trained), output=str(clone), interpretations=""))
    assert (clone / ".git" / "HEAD").is_file() and (clone / "README.md").is_file()
    shutil.rmtree(clone / ".git")
    assert export_sae(ExportConfig(checkpoint=str(trained), output=str(clone), interpretations="")) == clone  # an export alone is


def test_an_output_that_names_a_file_is_refused_before_any_work(trained, tmp_path):
    """OUTPUT pointing at a file (a typo, a notes file) gets the same one-line refusal as a folder of the user's, not a crash."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(UserError, match="notes.txt exists and is not an earlier export: it would be replaced. Set OUTPUT"):
        export_sae(ExportConfig(checkpoint=str(trained), output=str(notes), interpretations=""))
    assert notes.read_text() == "keep me" and sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_a_checkpoint_saved_before_training_finished_is_refused(tiny_store, tmp_path):
    """A Ctrl-C'd run's checkpoint would be shared under a card listing the settings of a run it never completed."""
    config = TrainConfig(store=str(tiny_store), output_dir=str(tmp_path / "runs"), m=M, k=K, batch_size=256, epochs=1.0)
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config, stop_after=5).run()
    (stopped,) = (tmp_path / "runs").rglob("SAE_*.pt")
    with pytest.raises(UserError, match=r"saved before its training finished \(at step 5\).*Rerun train_sae.py with the same settings"):
        export_sae(ExportConfig(checkpoint=str(stopped), interpretations=""))
    assert not list(stopped.parent.glob("export*"))
