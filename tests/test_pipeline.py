"""run_pipeline.py end to end on the tiny Llama: outputs, skipping, re-runs, --force / --from, confirmation, failures, disk.

Each test works in its own directory holding copies of the scripts, whose constants are edited by
text replacement (small settings), and runs run_pipeline.py the way a user does.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import re
import runpy
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_tiny_llama, run_until_killed, write_tiny_gguf
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import load_sae
from fastsae.evaluate import evaluate_sae as evaluate_module
from fastsae.interpret.interpret_sae import STAGE as INTERPRET_STAGE
from fastsae.interpret.interpret_sae import InterpretConfig
from fastsae.interpret.llm import API_KEY_VARIABLES
from fastsae.lm.models import CACHE_ENV_VAR
from fastsae.pipeline.run_pipeline import Pipeline, PipelineConfig, StepPlan
from fastsae.store.activation_store import ActivationStore
from fastsae.train.train_sae import TrainingRun

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("extract_activations.py", "train_sae.py", "evaluate_sae.py", "interpret_sae.py", "run_pipeline.py")
STORE = "activations/tiny-llama/blocks.2.hook_resid_post"
CHECKPOINT = "checkpoints/tiny-llama_blocks.2.hook_resid_post/SAE_M=32_K=4/SAE_M=32_K=4.pt"
# The file each step (re)writes whenever it runs.
MARKERS = {
    "extract": f"{STORE}/manifest.json",
    "train": CHECKPOINT,
    "evaluate": str(Path(CHECKPOINT).parent / "eval.json"),
    "interpret": "interpretations.csv",
}


def set_constants(script: Path, **values) -> None:
    """Edit UPPER_CASE constants in a copied script, as a user would (a list may span lines)."""
    text = script.read_text()
    for name, value in values.items():
        line = f"{name} = {value!r}"  # given as a function, so backslashes in it are not read as escapes
        text, count = re.subn(rf"^{name} = (\[[^\]]*\]|.*)$", lambda _, line=line: line, text, count=1, flags=re.MULTILINE)
        assert count == 1, f"{name} not found in {script.name}"
    script.write_text(text)


def write_project(folder: Path, model_folder: Path) -> None:
    """The scripts, set to 60 examples through the tiny Llama's block 2 and a 32-feature SAE."""
    for script in SCRIPTS:
        shutil.copy(REPO / script, folder / script)
    set_constants(
        folder / "extract_activations.py",
        MODEL_NAME=str(model_folder),
        DATASET=str(REPO / "data/cognitive_actions.jsonl"),
        LAYERS=[2],
        MAX_EXAMPLES=60,
    )
    set_constants(folder / "train_sae.py", STORE=STORE, M=32, K=4, BATCH_SIZE=128, EPOCHS=2.0)
    set_constants(folder / "evaluate_sae.py", CHECKPOINT=CHECKPOINT)
    set_constants(folder / "interpret_sae.py", CHECKPOINT=CHECKPOINT, FEATURES="frequency:5")


def run_pipeline(monkeypatch, *argv: str) -> None:
    """`python run_pipeline.py ARGV` in the current directory."""
    monkeypatch.setattr(sys, "argv", ["run_pipeline.py", *argv])
    runpy.run_path("run_pipeline.py", run_name="__main__")


def failing_run(monkeypatch, capsys, *argv: str) -> str:
    """Run, expect the one-line `error:` exit (code 2), and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(monkeypatch, *argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def marker_times() -> dict[str, int]:
    return {step: Path(path).stat().st_mtime_ns for step, path in MARKERS.items() if Path(path).exists()}


def steps_run(monkeypatch, *argv: str) -> set[str]:
    """Which steps rewrote their outputs during one run."""
    before = marker_times()
    run_pipeline(monkeypatch, *argv)
    after = marker_times()
    return {step for step in after if before.get(step) != after[step]}


def planned() -> dict[str, StepPlan]:
    """run_pipeline.py's checks and plan in the current directory, each step's decision with it."""
    pipeline = Pipeline(PipelineConfig(plan_only=True))
    pipeline.prepare()
    return pipeline.plans


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    for name in API_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_model_folder) -> Path:
    write_project(tmp_path, tiny_model_folder)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def completed_project(tmp_path_factory, tiny_model_folder) -> Path:
    """A project after one full run (shared; tests copy it)."""
    folder = tmp_path_factory.mktemp("completed")
    write_project(folder, tiny_model_folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        for name in API_KEY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        run_pipeline(monkeypatch, "--yes")
    return folder


@pytest.fixture
def completed(completed_project, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(completed_project, folder)
    monkeypatch.chdir(folder)
    return folder


def test_every_output_exists_and_parses_and_a_second_run_skips_every_step(project, monkeypatch, capsys):
    run_pipeline(monkeypatch, "--yes")
    printed = capsys.readouterr().out
    store = ActivationStore(STORE)
    assert store.n_examples == 60 and store.d == 64
    assert load_sae(CHECKPOINT).sae.spec.m == 32
    metrics = json.loads((Path(CHECKPOINT).parent / "metrics.json").read_text())
    evaluation = json.loads(Path(MARKERS["evaluate"]).read_text())
    interpretations = pd.read_csv("interpretations.csv")
    assert 0 < metrics["final"]["fvu"] < 1.5
    score = evaluation["saebench_core"]["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"]
    assert evaluation["examples"] == 6
    assert len(interpretations) == 5 and interpretations["explanation"].isna().all()
    assert "<script" in Path("dashboard.html").read_text()
    state = json.loads(Path("pipeline_state.json").read_text())["steps"]
    assert all(state[step]["status"] == "complete" for step in MARKERS)
    # The plan and the summary, with figures read off the outputs.
    assert "| extract | run (new) |" in printed and "explanations skipped" in printed
    assert f"{store.n_tokens:,} in 60 examples" in printed
    assert f"{metrics['final']['fvu']:.4f}" in printed and f"| SAEBench ce_loss_score (loss recovered) | {score:.4f} |" in printed
    assert "0 of 5 (explanations skipped)" in printed

    # Everything is current: no confirmation is needed, nothing is rewritten.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert steps_run(monkeypatch) == set()
    printed = capsys.readouterr().out
    assert printed.count("skip (current)") == 4 and "nothing to run" in printed


def test_a_changed_constant_reruns_its_step_and_the_steps_that_read_its_outputs(completed, monkeypatch):
    set_constants(completed / "train_sae.py", LEARNING_RATE=1e-3)
    assert steps_run(monkeypatch, "--yes") == {"train", "evaluate", "interpret"}
    set_constants(completed / "evaluate_sae.py", MAX_EXAMPLES=3)
    assert steps_run(monkeypatch, "--yes") == {"evaluate"}
    assert json.loads(Path(MARKERS["evaluate"]).read_text())["examples"] == 3
    # Where a step logs is not what it writes: a new tracker reruns nothing.
    set_constants(completed / "train_sae.py", LOGGER="tensorboard", LOGGER_PROJECT="elsewhere")
    assert steps_run(monkeypatch, "--yes") == set()
    # Nor is how extraction batches its examples, or on which device.
    set_constants(completed / "extract_activations.py", BATCH_TOKENS=700, BATCHING="padded", ATTENTION="eager", DEVICE="cpu")
    assert steps_run(monkeypatch, "--yes") == set()
    # Nor is naming the device `auto` picks (here the CPU) in the other steps.
    for script in ("train_sae.py", "evaluate_sae.py", "interpret_sae.py"):
        set_constants(completed / script, DEVICE="cpu")
    assert steps_run(monkeypatch, "--yes") == set()


def test_a_retraining_killed_before_its_first_save_reruns_with_the_same_command(completed, monkeypatch):
    """A changed constant re-runs training over the old run; killed before its first save, the rerun used to be refused,
    because training (resumed, without --overwrite) found the old settings' state."""
    set_constants(completed / "train_sae.py", LEARNING_RATE=1e-3)
    run_until_killed(
        "import runpy, sys\n"
        "from fastsae.train.train_sae import TrainingRun\n"
        "TrainingRun.train_step = lambda self, trainer, x, factor: kill_here()\n"
        "sys.argv = ['run_pipeline.py', '--yes']\n"
        "runpy.run_path('run_pipeline.py', run_name='__main__')\n",
        cwd=completed,
    )
    assert json.loads(Path("pipeline_state.json").read_text())["steps"]["train"]["status"] == "running"
    assert steps_run(monkeypatch, "--yes") == {"train", "evaluate", "interpret"}
    assert load_sae(CHECKPOINT).info.training["learning_rate"] == 1e-3


def test_a_step_after_an_interrupted_training_is_refused_until_training_finishes(completed, monkeypatch, capsys):
    """Ctrl-C saves the checkpoint of the step training stopped at. `--from evaluate` used to evaluate and interpret that
    half-trained SAE and record them complete, and the run that then finished training skipped them as current."""
    set_constants(completed / "train_sae.py", LEARNING_RATE=1e-3)
    step, steps_taken = TrainingRun.train_step, itertools.count(1)

    def control_c_at_step_three(self, trainer, x, factor) -> None:
        step(self, trainer, x, factor)
        if next(steps_taken) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainingRun, "train_step", control_c_at_step_three)
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(monkeypatch, "--yes")
    assert exit_info.value.code == 130 and load_sae(CHECKPOINT).info.step == 3
    monkeypatch.setattr(TrainingRun, "train_step", step)

    message = failing_run(monkeypatch, capsys, "--yes", "--from", "evaluate")
    assert "train_sae.py began but did not finish" in message and "Include the train step" in message
    assert steps_run(monkeypatch, "--yes") == {"train", "evaluate", "interpret"}
    assert json.loads(Path(MARKERS["evaluate"]).read_text())["checkpoint"] == CHECKPOINT and load_sae(CHECKPOINT).info.step > 3


def test_new_weights_saved_into_the_model_folder_rerun_extraction(tiny_model_folder, smollm2_tokenizer, tmp_path, monkeypatch):
    model_folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model_folder, model_folder)
    project = tmp_path / "project"
    project.mkdir()
    write_project(project, model_folder)
    monkeypatch.chdir(project)
    assert steps_run(monkeypatch, "--yes", "--steps", "extract") == {"extract"}
    stored = ActivationStore(STORE).activations(0, 100)
    assert steps_run(monkeypatch, "--yes", "--steps", "extract") == set()
    make_tiny_llama(len(smollm2_tokenizer), seed=1).save_pretrained(model_folder)
    assert steps_run(monkeypatch, "--yes", "--steps", "extract") == {"extract"}
    assert not torch.allclose(ActivationStore(STORE).activations(0, 100), stored, atol=1e-2)


def test_a_step_run_by_hand_with_other_flags_reruns_the_steps_that_read_its_outputs(completed, monkeypatch):
    """The scripts' constants are unchanged, so fingerprints cannot see it: the checkpoint's file has changed under them."""
    from fastsae.pipeline.run_pipeline import load_step_config
    from fastsae.train.train_sae import STAGE as TRAIN_STAGE
    from fastsae.train.train_sae import train_saes

    by_hand = load_step_config(TRAIN_STAGE, completed)
    train_saes(dataclasses.replace(by_hand, learning_rate=by_hand.learning_rate / 2, overwrite=True))
    plans = planned()
    assert {name: (plan.action, plan.reason) for name, plan in plans.items()} == {
        "extract": ("skip", "current"),
        "train": ("skip", "current"),
        "evaluate": ("run", "input rewritten outside the pipeline"),
        "interpret": ("run", "input rewritten outside the pipeline"),
    }
    assert steps_run(monkeypatch, "--yes") == {"evaluate", "interpret"}
    assert steps_run(monkeypatch, "--yes") == set()


def test_a_step_that_reruns_with_unchanged_settings_reruns_the_steps_that_read_its_outputs(completed, monkeypatch):
    """Extraction run by hand re-runs training, whose settings are unchanged, so its readers' fingerprints are too: they
    were skipped as current beside a checkpoint trained on the new store, and the next run blamed "outside the pipeline"."""
    from fastsae.extract.extract_activations import STAGE as EXTRACT_STAGE
    from fastsae.extract.extract_activations import extract_activations
    from fastsae.pipeline.run_pipeline import load_step_config

    by_hand = load_step_config(EXTRACT_STAGE, completed)
    extract_activations(dataclasses.replace(by_hand, max_examples=40, overwrite=True))
    plans = planned()
    assert {name: (plan.action, plan.reason) for name, plan in plans.items()} == {
        "extract": ("skip", "current"),
        "train": ("run", "input rewritten outside the pipeline"),
        "evaluate": ("run", "train re-runs"),
        "interpret": ("run", "train re-runs"),
    }
    assert steps_run(monkeypatch, "--yes") == {"train", "evaluate", "interpret"}
    assert steps_run(monkeypatch, "--yes") == set()


def test_an_api_key_set_after_an_offline_run_reruns_interpretation_and_so_does_another_endpoint(completed, monkeypatch):
    """Whether a key is set decides whether interpretations.csv gets explanations; which key it is does not."""
    assert {name: plan.action for name, plan in planned().items()} == dict.fromkeys(MARKERS, "skip")
    assert INTERPRET_STAGE.fingerprint_facts(InterpretConfig()) == {}  # offline: the fingerprint of the runs before the key counted
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    plans = planned()
    assert (plans["interpret"].action, plans["interpret"].reason) == ("run", "settings changed")
    assert all(plans[name].action == "skip" for name in ("extract", "train", "evaluate"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-key")
    assert planned()["interpret"].fingerprint == plans["interpret"].fingerprint
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:10/v1")
    assert planned()["interpret"].fingerprint != plans["interpret"].fingerprint
    set_constants(completed / "interpret_sae.py", EXPLAIN=False)  # no explanations either way: the key does not count
    with_key = planned()["interpret"].fingerprint
    for name in API_KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert planned()["interpret"].fingerprint == with_key


def test_sparse_probing_reruns_interpretation_whose_dashboard_reads_it(completed, monkeypatch):
    set_constants(completed / "evaluate_sae.py", EVALS="core,sparse_probing")
    actions = {name: plan.action for name, plan in planned().items()}
    assert actions == {"extract": "skip", "train": "skip", "evaluate": "run", "interpret": "run"}
    assert steps_run(monkeypatch, "--yes") == {"evaluate", "interpret"}
    assert (Path(CHECKPOINT).parent / "sparse_probing.json").is_file()
    assert steps_run(monkeypatch, "--yes") == set()
    # Evaluation is fingerprinted as a whole: any change that re-runs it rewrites the probes' file, and so re-runs interpretation.
    set_constants(completed / "evaluate_sae.py", MAX_EXAMPLES=3)
    assert steps_run(monkeypatch, "--yes") == {"evaluate", "interpret"}


def test_an_interpretation_beside_an_interrupted_evaluation_reruns_once_evaluation_finishes(completed, monkeypatch):
    """The dashboard shows sparse_probing.json's probes. Read while evaluation was interrupted (the old file), interpretation
    used to be recorded with the interrupted evaluation's fingerprint, and so was skipped once that evaluation finished."""
    set_constants(completed / "evaluate_sae.py", EVALS="core,sparse_probing")
    assert steps_run(monkeypatch, "--yes") == {"evaluate", "interpret"}
    set_constants(completed / "evaluate_sae.py", MAX_EXAMPLES=3)
    probing = evaluate_module.run_sparse_probing
    monkeypatch.setattr(evaluate_module, "run_sparse_probing", lambda *args: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline(monkeypatch, "--yes")
    assert exit_info.value.code == 130
    monkeypatch.setattr(evaluate_module, "run_sparse_probing", probing)
    assert steps_run(monkeypatch, "--yes", "--from", "interpret") == {"interpret"}
    assert steps_run(monkeypatch, "--yes") == {"evaluate", "interpret"}


def test_force_reruns_and_steps_and_from_choose(completed, monkeypatch):
    assert steps_run(monkeypatch, "--yes", "--force", "--from", "evaluate") == {"evaluate", "interpret"}
    assert steps_run(monkeypatch, "--yes", "--force", "--steps", "train") == {"train"}
    assert steps_run(monkeypatch, "--yes", "--force") == set(MARKERS)


def test_without_a_terminal_it_asks_for_yes_and_at_a_terminal_no_means_no(project, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert "pass --yes" in failing_run(monkeypatch, capsys)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    run_pipeline(monkeypatch)
    assert "Nothing was run." in capsys.readouterr().out
    assert not Path("activations").exists() and not Path("pipeline_state.json").exists()


def test_a_failing_step_keeps_the_earlier_outputs_and_the_rerun_resumes(project, monkeypatch, capsys):
    set_constants(project / "train_sae.py", BATCH_SIZE=100_000)
    with pytest.raises(SystemExit):
        run_pipeline(monkeypatch, "--yes")
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1].startswith("error: train_sae.py: the store has") and "BATCH_SIZE" in printed.err
    # The summary says what each step came to, with the time the failed one took, before the error.
    summary = printed.out[printed.out.rindex("| step | status |") :]
    assert re.search(r"\| extract \| ran \| ~[\d.]+ s \| [\d.]+ s \|", summary)
    assert re.search(r"\| train \| failed \| ~[\d.]+ s \| [\d.]+ s \|", summary)
    assert "| evaluate | not run |" in summary and "| interpret | not run |" in summary
    assert ActivationStore(STORE).n_examples == 60
    state = json.loads(Path("pipeline_state.json").read_text())["steps"]
    assert state["extract"]["status"] == "complete" and state["train"]["status"] == "running"

    set_constants(project / "train_sae.py", BATCH_SIZE=128)
    assert steps_run(monkeypatch, "--yes") == {"train", "evaluate", "interpret"}


def test_the_disk_check_refuses_a_store_larger_than_the_free_space(project, monkeypatch, capsys):
    monkeypatch.setattr(
        "fastsae.store.activation_store.free_disk_bytes", lambda folder: 100 * 2**20
    )  # the store is small, the margin is not
    assert "not enough disk space" in failing_run(monkeypatch, capsys, "--yes")
    assert not Path("activations").exists()


def test_texts_past_a_learned_position_table_get_extractions_message_before_anything_runs(smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    """The calibration runs sample texts through the model before extraction does: they get extraction's check, not an
    index error from inside GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_folder = tmp_path / "tiny-llama"  # the name the project's STORE and CHECKPOINT expect
    GPT2LMHeadModel(GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=16)).save_pretrained(
        model_folder
    )
    smollm2_tokenizer.save_pretrained(model_folder)
    project = tmp_path / "project"
    project.mkdir()
    write_project(project, model_folder)
    monkeypatch.chdir(project)
    message = failing_run(monkeypatch, capsys, "--plan-only")
    assert "16 positions GPT2LMHeadModel has learned embeddings for" in message and "Set MAX_LENGTH to 16 or less" in message


def test_inputs_must_chain_before_anything_runs(project, monkeypatch, capsys):
    set_constants(project / "evaluate_sae.py", CHECKPOINT="checkpoints/elsewhere/SAE.pt")
    message = failing_run(monkeypatch, capsys, "--yes")
    assert "CHECKPOINT in evaluate_sae.py" in message and CHECKPOINT in message
    assert "Include the extract step" in failing_run(monkeypatch, capsys, "--yes", "--steps", "train")
    assert not Path("activations").exists()


def test_a_broken_step_script_stops_the_run_before_anything_runs(project, monkeypatch, capsys):
    """Each of the four scripts is read before the first step runs: an error in the last names its file and line."""
    set_constants(project / "interpret_sae.py", TOP_CONTEXTS=[5])
    line = (project / "interpret_sae.py").read_text().splitlines().index("TOP_CONTEXTS = [5]") + 1
    message = failing_run(monkeypatch, capsys, "--yes")
    assert message.startswith(f"error: interpret_sae.py, line {line}: TOP_CONTEXTS must be a whole number")
    assert not Path("activations").exists() and not Path("pipeline_state.json").exists()


def test_a_step_whose_upstream_runs_must_read_what_it_writes(completed, monkeypatch, capsys):
    """A new LAYERS moves extraction's store: training, still reading the old one, would re-run on it and leave the new one unused."""
    set_constants(completed / "extract_activations.py", LAYERS=[1])
    before = marker_times()
    message = failing_run(monkeypatch, capsys, "--yes")
    assert "STORE = 'activations/tiny-llama/blocks.1.hook_resid_post' in train_sae.py" in message and "--from train" in message
    assert marker_times() == before and not Path("activations/tiny-llama/blocks.1.hook_resid_post").exists()
    assert steps_run(monkeypatch, "--yes", "--from", "train") == set()  # without extraction, the existing store is current


def test_the_plan_shows_every_checkpoint_a_sweep_evaluation_reads(project, monkeypatch, capsys):
    """Its "reads" showed the first checkpoint alone, though evaluation reads each of them."""
    second = CHECKPOINT.replace("M=32_K=4", "M=16_K=2")
    set_constants(project / "train_sae.py", SWEEP=["topk:32:4", "topk:16:2"])
    set_constants(project / "evaluate_sae.py", CHECKPOINT=[CHECKPOINT, second])
    run_pipeline(monkeypatch, "--plan-only")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| evaluate |"))
    assert f"| {CHECKPOINT}<br>{second} |" in row


def test_the_dataset_check_reports_a_line_that_is_not_utf8(project, monkeypatch, caplog):
    """The check reads the file with the loader extraction uses: the line is counted and named, not a traceback."""
    lines = (REPO / "data/cognitive_actions.jsonl").read_bytes().splitlines()[:20]
    lines.insert(2, '{"text": "na\u00efve"}'.encode("latin-1"))
    (project / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    set_constants(project / "extract_activations.py", DATASET="mixed.jsonl")
    with caplog.at_level(logging.INFO, logger="fastsae.pipeline.run_pipeline"):
        run_pipeline(monkeypatch, "--plan-only")
    assert "mixed.jsonl: 21 rows, 20 usable, 1 bad (1 × not UTF-8 (line 3: invalid continuation byte 0xef at byte 13))" in caplog.text
    assert not Path("activations").exists()


def test_steps_and_from_are_validated():
    assert PipelineConfig(from_step="train").selected() == {"train", "evaluate", "interpret"}
    assert PipelineConfig(steps="extract,train").selected() == {"extract", "train"}
    with pytest.raises(UserError, match="FROM is 'evaluate'"):
        PipelineConfig(steps="extract,train", from_step="evaluate")
    with pytest.raises(UserError, match="unknown step 'trian'"):
        PipelineConfig(steps="extract,trian")


def test_a_plan_alone_reads_a_gguf_without_dequantising_it(tmp_path, monkeypatch, capsys, caplog):
    """--plan-only dequantised a GGUF not in the cache yet to read its config and tokenizer: tens of seconds and hundreds of
    MB written (GBs for an 8B model) by a command that should only print."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    gguf = write_tiny_gguf(tmp_path / "tiny-llama.gguf")  # the name the project's STORE and CHECKPOINT expect
    project = tmp_path / "project"
    project.mkdir()
    write_project(project, gguf)
    monkeypatch.chdir(project)
    with caplog.at_level(logging.INFO, logger="fastsae.pipeline.run_pipeline"):
        run_pipeline(monkeypatch, "--plan-only")
    assert not cache.exists()
    assert f"{gguf} (gguf; 4 blocks, d=64): GGUF, not in the cache yet: a run dequantises it once" in caplog.text
    printed = capsys.readouterr().out
    extract_row = next(line for line in printed.splitlines() if line.startswith("| extract |"))
    assert extract_row.startswith(f"| extract | run (new) | {REPO / 'data/cognitive_actions.jsonl'} | {STORE} | 60 |")
    assert extract_row.endswith("| unknown |")  # no model timed: that would have taken the dequantisation


def test_the_plan_of_the_default_run_on_smollm2(smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    """The repository's own scripts chain, and the plan counts the default data's tokens with SmolLM2's tokenizer. Its
    estimate needs the model's dequantised copy in the cache (a plan alone does not make it): the tokenizer fixture makes it."""
    for script in SCRIPTS:
        shutil.copy(REPO / script, tmp_path / script)
    shutil.copytree(REPO / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run_pipeline(monkeypatch, "--plan-only")
    printed = capsys.readouterr().out
    assert (
        "| extract | run (new) | data/cognitive_actions.jsonl | activations/SmolLM2-135M-Instruct/blocks.12.hook_resid_post | 330 | 15,752 | 17.4 MiB |"
        in printed
    )
    assert "SAE_M=256_K=8.pt" in printed and "Estimated time" in printed
    assert not Path("activations").exists()
