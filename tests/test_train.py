"""Training from a real (tiny-model) store: it learns, its checkpoints open in HypotheSAEs, and runs resume exactly."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import InterruptedRun, hypothesaes_module, run_until_killed, write_jsonl
from fastsae.common.devices import cpu_has_bfloat16_instructions
from fastsae.common.errors import UserError
from fastsae.common.stage import Output
from fastsae.core.checkpoint import load_sae
from fastsae.core.sae import SAESpec, SparseAutoencoder
from fastsae.core.trained_sae import open_trained_sae
from fastsae.store.activation_store import ActivationStore, StoreError
from fastsae.store.batches import ExampleSplit, TokenSource, mixed_batches, read_ahead
from fastsae.train import train_sae as train_module
from fastsae.train.train_sae import TrainConfig, TrainingRun, sparsity_coefficient, train_saes, validate, validation_objective

M, K = 128, 4


def config_for(store: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        store=str(store),
        output_dir=str(output),
        m=M,
        k=K,
        batch_size=256,
        epochs=20.0,
        learning_rate=1e-3,
        eval_every=20,
        log_every=5,
        buffer_tokens=4096,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def assert_saelens_export_matches(result: dict, raw: torch.Tensor) -> None:
    """SAELens' own loader reads our export and computes the same features and reconstruction as we do."""
    from sae_lens import SAE

    folder = Path(result["checkpoint"]).parent / "saelens"
    theirs = SAE.load_from_disk(folder)
    ours = load_sae(result["checkpoint"]).sae
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(raw), ours.encode(raw), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(raw)), ours(raw), rtol=1e-4, atol=1e-4)
    sparsity = load_file(folder / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (ours.spec.m,) and float(sparsity.max()) <= 0


def raw_validation_activations(store_folder: Path, limit: int = 2000) -> torch.Tensor:
    store = ActivationStore(store_folder)
    split = ExampleSplit.by_example(store.n_examples, 0.1, 0)
    return TokenSource(store, split, validation=True, include_special=False).all_tokens(limit)


@pytest.fixture(scope="module")
def topk_run(tiny_store, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    (result,) = train_saes(config_for(tiny_store, output))
    return result


def test_topk_training_learns_with_exactly_k_active(topk_run):
    history = topk_run["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert all(row["l0"] == K for row in history)
    assert topk_run["final"]["fvu"] < 0.7 and 0 < topk_run["final"]["l0"] <= K
    folder = Path(topk_run["checkpoint"]).parent
    assert json.loads((folder / "metrics.json").read_text())["final"] == topk_run["final"]
    assert (folder / "training_curves.png").read_bytes().startswith(b"\x89PNG")


def test_the_pipeline_summary_reads_the_never_fired_fraction_of_this_and_of_an_older_metrics_file(topk_run, tmp_path):
    """Validation's never-fired fraction was once called dead_fraction, the name the history keeps for aux-K's count;
    a metrics.json written then still gives the summary its figures, which a skipped train step reads without retraining."""
    metrics = json.loads((Path(topk_run["checkpoint"]).parent / "metrics.json").read_text())
    older = {
        **metrics,
        "final": {("dead_fraction" if key == "never_fired_fraction" else key): value for key, value in metrics["final"].items()},
    }
    figures = []
    for name, written in (("now", metrics), ("older", older)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(written))
        figures += train_module.STAGE.key_figures(None, [Output(tmp_path / name / "SAE_M=64_K=4.pt")])
    final = topk_run["final"]
    expected = (
        "SAE_M=64_K=4: validation FVU / L0 / never fired",
        f"{final['fvu']:.4f} / {final['l0']:.1f} / {final['never_fired_fraction']:.1%}",
    )
    assert figures == [expected, expected]
    assert "dead_fraction" in metrics["history"][-1] and "dead_fraction" not in metrics["final"]


def test_hypothesaes_load_model_gives_our_feature_activations(topk_run, tiny_store):
    hypothesaes = hypothesaes_module()
    theirs = hypothesaes.load_model(topk_run["checkpoint"], device="cpu")
    ours = load_sae(topk_run["checkpoint"]).sae
    raw = raw_validation_activations(tiny_store)
    with torch.no_grad():
        their_reconstruction, info = theirs(raw)
        torch.testing.assert_close(info["activations"], ours.encode(raw), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(their_reconstruction, ours(raw), rtol=1e-4, atol=1e-4)


def test_saelens_loads_the_topk_export(topk_run, tiny_store):
    assert_saelens_export_matches(topk_run, raw_validation_activations(tiny_store))
    cfg = json.loads((Path(topk_run["checkpoint"]).parent / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"


def test_checkpoint_applies_to_raw_activations_like_the_scaled_training_sae(topk_run, tiny_store):
    loaded = load_sae(topk_run["checkpoint"])
    state = torch.load(Path(topk_run["checkpoint"]).parent / "training_state.pt", weights_only=True)
    from fastsae.core.sae import SAESpec, SparseAutoencoder

    spec = loaded.sae.spec
    assert spec == SAESpec(**{**topk_run["spec"], "prefixes": tuple(topk_run["spec"]["prefixes"])})
    training_sae = SparseAutoencoder(spec)
    training_sae.load_state_dict(state["sae"])
    scale = loaded.info.activation_scale
    raw = raw_validation_activations(tiny_store)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae.encode(raw), training_sae.encode(raw * scale), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.sae(raw), training_sae(raw * scale) / scale, rtol=1e-4, atol=1e-4)
    assert loaded.info.hook_name == "blocks.2.hook_resid_post" and loaded.info.store_manifest.d == 64


def test_batchtopk_keeps_the_expected_sparsity_at_inference_in_both_implementations(tiny_store, tmp_path):
    (result,) = train_saes(config_for(tiny_store, tmp_path, architecture="batchtopk", epochs=10.0))
    assert abs(result["final"]["l0"] - K) / K < 0.2
    theirs = hypothesaes_module().load_model(result["checkpoint"], device="cpu").eval()
    raw = raw_validation_activations(tiny_store)
    with torch.no_grad():
        torch.testing.assert_close(theirs(raw)[1]["activations"], load_sae(result["checkpoint"]).sae.encode(raw), rtol=1e-4, atol=1e-5)
    assert_saelens_export_matches(result, raw)  # exported as JumpReLU with one constant threshold


def test_aux_k_revives_dead_features(smollm2_store, tmp_path):
    """SmolLM2's layer 12 carries a large mean offset: started from a zero bias, as SAELens does, most latents die."""
    dead = {}
    for aux_k in (0, 16):
        config = config_for(
            smollm2_store, tmp_path / str(aux_k), m=512, k=8, epochs=8.0, aux_k=aux_k, dead_after_tokens=4096, input_bias_init="zero"
        )
        (result,) = train_saes(config)
        dead[aux_k] = result["history"][-1]["dead_fraction"]
    assert dead[0] > 0.3
    assert dead[16] < 0.5 * dead[0]


@pytest.fixture(scope="module")
def jumprelu_runs(tiny_store, tmp_path_factory) -> dict[str, dict]:
    """JumpReLU at L0 coefficients 1e-3 and 1e-2 in float32, and at 1e-2 under bf16 autocast; 1e-2 at the default PATIENCE.

    Thresholds move by about the learning rate per Adam step, in units where pre-activations have a std
    near 1: ~500 steps at 5e-3 let them travel far enough for the coefficient to show.
    """
    output = tmp_path_factory.mktemp("jumprelu")
    runs = {
        "1e-3": {"l0_coefficient": 1e-3, "precision": "float32", "patience": 0},
        "1e-2": {"l0_coefficient": 1e-2, "precision": "float32", "patience": TrainConfig.patience},
        "1e-2 bf16": {"l0_coefficient": 1e-2, "precision": "bfloat16", "patience": 0},
    }
    return {
        name: train_saes(config_for(tiny_store, output / name.replace(" ", "_"), architecture="jumprelu", learning_rate=5e-3, **settings))[
            0
        ]
        for name, settings in runs.items()
    }


def test_jumprelu_l0_follows_its_coefficient(jumprelu_runs, tiny_store):
    """Ten times the L0 coefficient, a much sparser SAE (before the window was on the data's scale: 79 against 60)."""
    l0 = {name: run["final"]["l0"] for name, run in jumprelu_runs.items()}
    assert l0["1e-2"] < 0.5 * l0["1e-3"], l0
    assert jumprelu_runs["1e-2"]["final"]["never_fired_fraction"] < 0.1
    assert_saelens_export_matches(jumprelu_runs["1e-2"], raw_validation_activations(tiny_store))  # thresholds apply to raw activations


def test_early_stopping_watches_the_penalised_objective(jumprelu_runs):
    """As the thresholds climb, the 1e-2 run's validation FVU stops improving for longer than PATIENCE, so early
    stopping on FVU would have cut it short; its objective, FVU + 1e-2 × L0, keeps falling, and it trains to its budget."""
    run = jumprelu_runs["1e-2"]
    fvus = [row["fvu"] for row in run["validation"]]
    assert len(fvus) - 1 - fvus.index(min(fvus)) >= TrainConfig.patience, fvus
    assert run["stopped"] == "budget reached"
    for row in run["validation"]:
        assert row["objective"] == pytest.approx(row["fvu"] + 1e-2 * row["l0"])


def test_bfloat16_autocast_jumprelu_lands_close_to_float32(jumprelu_runs):
    float32, bfloat16 = jumprelu_runs["1e-2"]["final"], jumprelu_runs["1e-2 bf16"]["final"]
    assert bfloat16["l0"] == pytest.approx(float32["l0"], rel=0.15)
    assert bfloat16["fvu"] == pytest.approx(float32["fvu"], rel=0.1)


def test_matryoshka_prefixes_reconstruct_better_as_they_grow(tiny_store, tmp_path):
    (result,) = train_saes(config_for(tiny_store, tmp_path, matryoshka_prefixes=[16, 48, M]))
    assert Path(result["checkpoint"]).name == f"SAE_matryoshka_M={M}_K={K}_prefixes=16-48-{M}.pt"
    sae = load_sae(result["checkpoint"]).sae
    raw = raw_validation_activations(tiny_store)
    with torch.no_grad():
        codes = sae.encode(raw)
        errors = [float((sae.decode(codes, prefix) - raw).pow(2).sum()) for prefix in (16, 48, M)]
    assert errors[0] > errors[1] > errors[2]
    theirs = hypothesaes_module().load_model(result["checkpoint"], device="cpu")
    assert theirs.prefix_lengths == [16, 48, M]


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_early_stopping_watches_what_a_matryoshka_sae_minimises(architecture):
    """The validation objective is the training loss without aux-K on the same tokens: for a Matryoshka SAE
    the mean of its prefixes' FVUs (plus any sparsity penalty), not its full FVU."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAESpec(architecture, 16, 48, 4, (8, 24, 48)))
    x = torch.randn(300, 16) + 1
    config = TrainConfig(l1_coefficient=1e-2)
    metrics = validate(sae, x, batch_size=128).metrics  # in batches: the sums add up to the whole set's
    with torch.no_grad():
        loss = sae.eval().training_step(x, None, 0.0, sparsity_coefficient(config, architecture)).loss
    assert validation_objective(config, sae.spec, metrics) == pytest.approx(float(loss), rel=1e-5)
    assert metrics["matryoshka_fvu"] != pytest.approx(metrics["fvu"], rel=1e-2)  # the full FVU alone would not do


def test_a_sweep_trains_every_sae_on_one_pass(tiny_store, tmp_path, capsys):
    results = train_saes(
        config_for(tiny_store, tmp_path, sweep=["topk:64:4", "relu:64:0", "jumprelu:64:0", "topk:128:8:32-128"], epochs=3.0)
    )
    names = [result["name"] for result in results]
    assert names == ["SAE_M=64_K=4", "SAE_relu_M=64_K=0", "SAE_jumprelu_M=64_K=0", "SAE_matryoshka_M=128_K=8_prefixes=32-128"]
    assert len({result["tokens_trained"] for result in results}) == 1
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in names)
    raw = raw_validation_activations(tiny_store)
    for result in results:
        assert result["history"][-1]["loss"] < result["history"][0]["loss"]
        assert_saelens_export_matches(result, raw)
        # The settings a checkpoint records (a model card's table) are its own, not the unused ARCHITECTURE, M and K.
        training = load_sae(result["checkpoint"]).info.training
        spec = result["spec"]
        assert (training["architecture"], training["m"], training["k"]) == (spec["architecture"], spec["m"], spec["k"])
        assert (training["matryoshka_prefixes"], training["aux_k"]) == (list(spec["prefixes"]), spec["aux_k"])
    assert_only_what_hypothesaes_runs_has_its_format(results, raw)


def assert_only_what_hypothesaes_runs_has_its_format(results: list[dict], raw: torch.Tensor) -> None:
    """HypotheSAEs' `load_model` gives our features for every file in its format, and cannot open the others."""
    hypothesaes = hypothesaes_module()
    runs_there = {result["name"]: result["spec"]["architecture"] in ("topk", "batchtopk") for result in results}
    assert runs_there == {
        "SAE_M=64_K=4": True,
        "SAE_relu_M=64_K=0": False,
        "SAE_jumprelu_M=64_K=0": False,
        "SAE_matryoshka_M=128_K=8_prefixes=32-128": True,
    }
    for result in results:
        checkpoint = result["checkpoint"]
        if runs_there[result["name"]]:
            theirs = hypothesaes.load_model(checkpoint, device="cpu").eval()
            with torch.no_grad():
                torch.testing.assert_close(theirs(raw)[1]["activations"], load_sae(checkpoint).sae.encode(raw), rtol=1e-4, atol=1e-5)
        else:
            assert "config" not in torch.load(checkpoint, weights_only=True)
            with pytest.raises(KeyError, match="config"):
                hypothesaes.load_model(checkpoint, device="cpu")


def test_a_stopped_run_resumes_to_the_same_sae(tiny_store, tmp_path, caplog):
    (uninterrupted,) = train_saes(config_for(tiny_store, tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config_for(tiny_store, tmp_path / "b"), stop_after=33).run()
    stopped_state = torch.load(next((tmp_path / "b").rglob("training_state.pt")), weights_only=True)
    assert stopped_state["step"] == 33
    # The checkpoint saved at Ctrl-C is read with a warning by every step that opens it (evaluate, interpret, export...).
    stopped_checkpoint = next((tmp_path / "b").rglob("SAE_*.pt"))
    with caplog.at_level(logging.WARNING, logger="fastsae.core.trained_sae"):
        assert open_trained_sae(stopped_checkpoint).info.training_finished is False
    assert f"{stopped_checkpoint} was saved before its training finished, at step 33" in caplog.text
    (resumed,) = train_saes(config_for(tiny_store, tmp_path / "b"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastsae.core.trained_sae"):
        assert open_trained_sae(resumed["checkpoint"]).info.training_finished is True
    assert not caplog.text
    first, second = load_sae(uninterrupted["checkpoint"]).sae, load_sae(resumed["checkpoint"]).sae
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed["final"] == uninterrupted["final"]
    assert resumed["history"] == uninterrupted["history"]


def test_a_stopped_run_resumes_on_its_store_moved_or_named_another_way(tiny_store, tmp_path, monkeypatch):
    """The resume key held the store's path as typed: the same store named relative to the working folder, or moved,
    was refused as "different: store", and the fix offered (--overwrite) threw the progress away. Its contents decide."""
    shutil.copytree(tiny_store, tmp_path / "stores" / "first")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config_for(Path("stores/first"), tmp_path / "runs"), stop_after=5).run()
    (tmp_path / "stores" / "first").rename(tmp_path / "stores" / "moved")
    (resumed,) = train_saes(config_for(tmp_path / "stores" / "moved", tmp_path / "runs"))
    assert resumed["steps"] > 5 and load_sae(resumed["checkpoint"]).info.store == str(tmp_path / "stores" / "moved")
    other = shutil.copytree(tiny_store, tmp_path / "stores" / "other")
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace('"max_length": ', '"max_length": 1'))
    with pytest.raises(UserError, match=r"other settings \(different: store, store_settings\)"):
        train_saes(config_for(other, tmp_path / "runs"))


def test_a_sweep_killed_between_two_saes_saves_resumes_to_the_same_saes(tiny_store, tmp_path):
    """Killed after the first SAE's step-20 state and before the second's, the rerun used to refuse the sweep as "saved at
    different steps". The SAE a save ahead waits for the replayed batches to reach it, and the sweep ends as a whole one does."""
    settings = dict(sweep=["topk:64:4", "topk:64:8"], epochs=1.0, checkpoint_every=10, export_saelens=False, precision="float32")
    whole = train_saes(config_for(tiny_store, tmp_path / "whole", **settings))
    config = config_for(tiny_store, tmp_path / "killed", **settings)
    run_until_killed(
        "import torch\n"
        "from fastsae.train import train_sae\n"
        "write = train_sae.write_atomically\n"
        "def write_then_die(path, fill):\n"
        "    write(path, fill)\n"
        "    if 'K=4' in str(path) and torch.load(path, weights_only=True)['step'] == 20:\n"
        "        kill_here()\n"
        "train_sae.write_atomically = write_then_die\n"
        f"train_sae.train_saes(train_sae.TrainConfig(**{asdict(config)!r}))\n",
        cwd=tmp_path,
    )
    states = {
        path.parent.name: torch.load(path, weights_only=True)["step"] for path in (tmp_path / "killed").rglob(train_module.TRAINING_STATE)
    }
    assert states == {"SAE_M=64_K=4": 20, "SAE_M=64_K=8": 10}
    for uninterrupted, resumed in zip(whole, train_saes(config)):
        first, second = load_sae(uninterrupted["checkpoint"]).sae, load_sae(resumed["checkpoint"]).sae
        for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
            assert torch.equal(a, b), name
        assert {key: resumed[key] for key in ("steps", "final", "history", "validation")} == {
            key: uninterrupted[key] for key in ("steps", "final", "history", "validation")
        }


def test_rerun_with_other_settings_is_refused_unless_overwrite(topk_run, tiny_store):
    output = Path(topk_run["checkpoint"]).parents[2]
    with pytest.raises(UserError, match=r"other settings \(different: learning_rate\).*--overwrite"):
        train_saes(config_for(tiny_store, output, learning_rate=2e-3))


def test_overwrite_removes_what_described_the_replaced_sae(tiny_store, tmp_path):
    """Started over with --overwrite and stopped, the new SAE's checkpoint sat beside the old one's metrics.json (its
    final FVU), curves and SAELens export, which export_sae.py would ship with it."""
    settings = dict(epochs=1.0, eval_every=5)
    (old,) = train_saes(config_for(tiny_store, tmp_path, **settings))
    folder = Path(old["checkpoint"]).parent
    assert {"metrics.json", "training_curves.png", "saelens"} <= {path.name for path in folder.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config_for(tiny_store, tmp_path, **settings, learning_rate=2e-3, overwrite=True), stop_after=3).run()
    assert sorted(path.name for path in folder.iterdir()) == [Path(old["checkpoint"]).name, "training_state.pt"]
    assert load_sae(old["checkpoint"]).info.step == 3


def test_a_setting_of_one_architecture_retrains_only_the_saes_it_shapes(tiny_store, tmp_path):
    """The L0 coefficient, the JumpReLU window and AUX_K's spelling (8 is -1's 2K) used to be in every SAE's resume key,
    so changing one refused the Top-K SAE beside the JumpReLU one too."""
    settings = dict(sweep=["topk:64:4", "jumprelu:64:0"], epochs=1.0, export_saelens=False)
    topk, _ = train_saes(config_for(tiny_store, tmp_path, **settings))
    changed = dict(settings, l0_coefficient=1e-2, jumprelu_bandwidth=2e-3, aux_k=8)
    with pytest.raises(
        UserError, match=r"SAE_jumprelu_M=64_K=0 holds a run with other settings \(different: jumprelu_bandwidth, l0_coefficient\)"
    ):
        train_saes(config_for(tiny_store, tmp_path, **changed))
    (resumed,) = train_saes(config_for(tiny_store, tmp_path, **dict(changed, sweep=["topk:64:4"])))
    assert {key: resumed[key] for key in ("steps", "final", "history", "validation")} == {
        key: topk[key] for key in ("steps", "final", "history", "validation")
    }


def test_log_every_changes_the_history_but_not_the_sae(tiny_store, tmp_path):
    """LOG_EVERY is left out of the resume key, yet aux-K used to learn which features were dead only at log steps."""
    settings = dict(m=256, epochs=2.0, dead_after_tokens=512, precision="float32", export_saelens=False)
    results = [train_saes(config_for(tiny_store, tmp_path / str(every), **settings, log_every=every))[0] for every in (5, 7)]
    assert any(row["dead_fraction"] > 0 for row in results[0]["history"])  # aux-K had dead features to work on
    first, second = (load_sae(result["checkpoint"]).sae for result in results)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


class DivergingRun(TrainingRun):
    """Weights turn to NaN after 5 logged stretches (25 steps), as they would if training diverged."""

    def train_step(self, trainer, x, factor) -> None:
        super().train_step(trainer, x, factor)
        if len(trainer.history) >= 5:
            with torch.no_grad():
                trainer.sae.W_enc.fill_(float("nan"))


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_store, tmp_path):
    with pytest.raises(UserError, match=r"loss became nan.*last good checkpoint.*LEARNING_RATE"):
        DivergingRun(config_for(tiny_store, tmp_path, checkpoint_every=10)).run()
    good = load_sae(next(tmp_path.rglob("SAE_M=*.pt"))).sae
    assert torch.isfinite(good.W_enc).all()


class CorruptedRun(TrainingRun):
    """Weights turn to NaN from step `nan_from` on, between log steps; with `stop`, a stop request (Ctrl-C) comes at that step."""

    def __init__(self, config: TrainConfig, nan_from: int, stop: bool = False) -> None:
        super().__init__(config)
        self.steps_taken, self.nan_from, self.stop = 0, nan_from, stop

    def train_step(self, trainer, x, factor) -> None:
        super().train_step(trainer, x, factor)
        self.steps_taken += 1
        if self.steps_taken >= self.nan_from:
            with torch.no_grad():
                trainer.sae.W_enc.fill_(float("nan"))
            self.stop_requested = self.stop


@pytest.mark.parametrize("stop, saved_at", [(False, 30), (True, 22)], ids=["checkpoint_every", "stop request"])
def test_a_save_between_log_steps_refuses_nan_weights_and_names_a_finite_checkpoint(tiny_store, tmp_path, stop, saved_at):
    """Saves at step 15, 30, ... or on a stop request; logs at 20, 40: the NaN of step 22 reaches a save before a log."""
    config = config_for(tiny_store, tmp_path, log_every=20, checkpoint_every=15, export_saelens=False)
    with pytest.raises(UserError, match=rf"weights became NaN or inf by step {saved_at}; the last good checkpoint is .*LEARNING_RATE"):
        CorruptedRun(config, nan_from=22, stop=stop).run()
    checkpoint = load_sae(next(tmp_path.rglob("SAE_M=*.pt")))
    assert checkpoint.info.step == 15 and torch.isfinite(checkpoint.sae.W_enc).all()
    state = torch.load(next(tmp_path.rglob("training_state.pt")), weights_only=True)
    assert state["step"] == 15 and torch.isfinite(state["sae"]["W_enc"]).all()


def test_a_nan_validation_objective_is_divergence_not_an_early_stop(tiny_store, tmp_path):
    """Validations at steps 5, 10, 15; the first log at 20: with PATIENCE=1, NaN at step 15 used to count as "no improvement"."""
    config = config_for(tiny_store, tmp_path, eval_every=5, patience=1, log_every=20, export_saelens=False)
    with pytest.raises(UserError, match=r"validation objective became nan by step 15; no checkpoint was saved yet"):
        CorruptedRun(config, nan_from=12).run()
    assert not list(tmp_path.rglob("SAE_M=*.pt"))


def test_early_stopping_on_validation_fvu(tiny_store, tmp_path):
    (result,) = train_saes(config_for(tiny_store, tmp_path, epochs=60.0, eval_every=2, patience=1, learning_rate=3e-3))
    assert result["stopped"].startswith("early stop")
    assert result["steps"] < 60 * 5800 // 256


def test_an_sae_stopped_early_in_a_sweep_reports_and_keeps_its_own_steps_through_a_resume(tiny_store, tmp_path):
    """A JumpReLU SAE whose thresholds start far above every activation stops early; the Top-K SAE beside it trains on."""
    settings = dict(
        sweep=["jumprelu:64:0", "topk:64:4"],
        jumprelu_initial_threshold=1000.0,
        epochs=3.0,
        eval_every=2,
        patience=1,
        learning_rate=3e-3,
        precision="float32",
        export_saelens=False,
    )
    stopped, trained = train_saes(config_for(tiny_store, tmp_path / "whole", **settings))
    assert trained["stopped"] == "budget reached" and trained["history"][-1]["step"] == trained["steps"]
    assert stopped["stopped"] == f"early stop at step {stopped['steps']}" and stopped["steps"] < trained["steps"]
    assert stopped["validation"][-1]["step"] == stopped["steps"] >= stopped["history"][-1]["step"]
    for result in (stopped, trained):
        info = load_sae(result["checkpoint"]).info
        assert result["tokens_trained"] == result["steps"] * 256 == info.tokens_trained and info.step == result["steps"]
        assert json.loads((Path(result["checkpoint"]).parent / "metrics.json").read_text())["steps"] == result["steps"]

    # Interrupted after the stop, the stopped SAE's state keeps its own step, and the resumed sweep equals the whole one.
    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(config_for(tiny_store, tmp_path / "resumed", **settings), stop_after=2 * stopped["steps"] + 6).run()
    state = torch.load(Path(tmp_path / "resumed", *Path(stopped["checkpoint"]).parts[-3:-1], "training_state.pt"), weights_only=True)
    assert state["step"] == state["stopped_at"] == stopped["steps"]
    for whole, resumed in zip((stopped, trained), train_saes(config_for(tiny_store, tmp_path / "resumed", **settings))):
        assert {key: resumed[key] for key in ("steps", "tokens_trained", "stopped", "final", "history", "validation")} == {
            key: whole[key] for key in ("steps", "tokens_trained", "stopped", "final", "history", "validation")
        }


def test_split_is_by_example_and_the_buffer_streams_each_token_once(tiny_store):
    store = ActivationStore(tiny_store)
    split = ExampleSplit.by_example(store.n_examples, 0.1, seed=3)
    assert split.is_validation.sum() == 33
    validation_mask = split.token_mask(store, 0, store.n_tokens, validation=True)
    for index in range(store.n_examples):  # an example's tokens all fall on one side
        tokens = validation_mask[store.doc_offsets[index] : store.doc_offsets[index + 1]]
        assert (tokens == split.is_validation[index]).all()
    train = TokenSource(store, split, validation=False, include_special=False)
    validation = TokenSource(store, split, validation=True, include_special=False)
    content_tokens = int((~store.special_mask(0, store.n_tokens)).sum())
    assert train.count_tokens() + validation.count_tokens() == content_tokens

    all_train = train.all_tokens(store.n_tokens)
    buffer_tokens, batch_size = 1024, 128  # the store holds ~6x the buffer
    batches = mixed_batches(train, buffer_tokens, batch_size, seed=0)
    n_batches = (len(all_train) - buffer_tokens) // batch_size
    emitted = Counter(row.float().numpy().tobytes() for _ in range(n_batches) for row in next(batches))
    available = Counter(row.numpy().tobytes() for row in all_train)
    assert not emitted - available  # within one pass no token comes out twice, and only training tokens come out
    assert emitted.total() == n_batches * batch_size


def test_a_fast_stores_split_is_its_examples_seeded_choice_as_before(tiny_store):
    store = ActivationStore(tiny_store)
    split = ExampleSplit.of_store(store, 0.1, seed=3)
    assert np.flatnonzero(split.is_validation).tolist() == [
        12, 39, 42, 58, 65, 80, 83, 87, 94, 96, 108, 111, 121, 126, 130, 134, 150, 153, 155, 167, 171, 173, 194, 209, 227, 241,
        243, 247, 268, 275, 295, 311, 325,
    ]  # fmt: skip
    assert (split.is_training == ~split.is_validation).all()
    assert split.record(3) == {"seed": 3, "examples": 330, "held_out_examples": 33}


def texts_of_tokens(store: ActivationStore, fast: ActivationStore, mask: np.ndarray) -> set[int]:
    """The texts (FAST examples) whose tokens `mask` picks out of the block store, which holds the FAST store's tokens in order."""
    return set((np.searchsorted(fast.doc_offsets, np.flatnonzero(mask), side="right") - 1).tolist())


def test_a_block_stores_training_and_validation_hold_disjoint_texts(tiny_block_store, tiny_store, tmp_path):
    """Blocks cut texts in two: a split by block put one text's tokens on both sides, so validation measured seen text."""
    store, fast = ActivationStore(tiny_block_store), ActivationStore(tiny_store)
    assert np.array_equal(store.token_ids(0, store.n_tokens), fast.token_ids(0, fast.n_tokens))
    run = TrainingRun(config_for(tiny_block_store, tmp_path, validation_fraction=0.1, seed=0))
    split = run.train_source.split
    training = split.token_mask(store, 0, store.n_tokens, validation=False)
    validation = split.token_mask(store, 0, store.n_tokens, validation=True)
    training_texts, validation_texts = texts_of_tokens(store, fast, training), texts_of_tokens(store, fast, validation)
    assert training_texts and validation_texts and not training_texts & validation_texts
    block_rows = store.block_rows()  # the same from the dataset rows extraction recorded per block
    training_rows, validation_rows = (
        {row for index in np.flatnonzero(side) for row in block_rows[index]} for side in (split.is_training, split.is_validation)
    )
    assert not training_rows & validation_rows
    # The blocks a split by block held out still validate, and few others are lost to training.
    chosen = ExampleSplit.by_example(store.n_examples, 0.1, 0).is_validation
    assert split.is_validation[chosen].all()
    left_out = ~split.is_validation & ~split.is_training
    assert 0 < left_out.sum() <= 2 * chosen.sum()
    assert split.record(0) == {
        "seed": 0,
        "examples": store.n_examples,
        "held_out_examples": int(split.is_validation.sum()),
        "held_out_texts": len(validation_texts),
        "left_out_examples": int(left_out.sum()),
    }
    assert run.n_train_tokens == int((training & ~store.special_mask(0, store.n_tokens)).sum())


def test_a_block_store_that_does_not_name_its_blocks_rows_is_refused_as_damaged(tiny_block_store, tmp_path):
    copy = Path(shutil.copytree(tiny_block_store, tmp_path / "store"))
    records = [json.loads(line) for line in (copy / "examples.jsonl").read_text().splitlines()]
    (copy / "examples.jsonl").write_text("".join(json.dumps({"block": record["block"]}) + "\n" for record in records))
    with pytest.raises(StoreError, match=r"examples\.jsonl does not name the dataset rows of every block\. Re-extract"):
        TrainingRun(config_for(copy, tmp_path / "runs"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(k=200), "K must be between 1 and M"),
        (dict(matryoshka_prefixes=[64, 32, M]), "MATRYOSHKA_PREFIXES, or a SWEEP entry's last part. must increase and end at M"),
        (dict(batch_size=100_000, buffer_tokens=200_000), "fewer than two batches of 100000"),
        (dict(batch_size=4096), "fewer than two batches of 4096: the mixing buffer"),  # one batch fits: its buffer repeated tokens
        (dict(sweep=["topk:64"]), "should look like topk:256:8"),
        # A budget under one batch trained one batch anyway.
        (dict(epochs=0.01), r"EPOCHS = 0.01 of [\d,]+ training tokens is a budget of \d+ tokens, less than one batch of 256.*Raise EPOCHS"),
        (
            dict(max_tokens=100),
            "MAX_TOKENS = 100 is a budget of 100 tokens, less than one batch of 256.*Raise MAX_TOKENS or lower BATCH_SIZE",
        ),
    ],
)
def test_bad_settings_get_clear_messages(tiny_store, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_saes(config_for(tiny_store, tmp_path, **overrides))
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_a_store_of_one_example_names_both_fixes(tiny_llama, smollm2_tokenizer, tmp_path):
    from fastsae.extract.extract_activations import ExtractConfig, write_activation_stores
    from fastsae.lm.data import load_dataset

    texts = write_jsonl(tmp_path / "one.jsonl", [{"text": "Looking back, I should have checked the numbers twice. " * 20}])
    config = ExtractConfig(layers=[2], dataset=str(texts), output_dir=str(tmp_path / "stores"))
    (store,) = write_activation_stores(tiny_llama, smollm2_tokenizer, load_dataset(config.dataset), config, "tiny")
    with pytest.raises(UserError, match=r"has 1 example\(s\).*Extract more examples, or set VALIDATION_FRACTION = 0"):
        train_saes(config_for(store, tmp_path / "runs", batch_size=64, buffer_tokens=128))
    assert not (tmp_path / "runs").exists()
    (result,) = train_saes(config_for(store, tmp_path / "runs", batch_size=64, buffer_tokens=128, validation_fraction=0.0, epochs=1.0))
    assert result["final"] == {} and result["steps"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(learning_rate=0.0), "LEARNING_RATE must be positive; got 0.0"),
        (dict(dead_after_tokens=-1), "DEAD_AFTER_TOKENS must be at least 0; got -1"),  # every feature counted as dead
        (dict(patience=-1), "PATIENCE must be at least 0"),  # stopped at the first validation
        (dict(seed=-2), "SEED must be at least 0"),  # numpy's traceback
        (dict(warmup_fraction=-0.1, decay_fraction=0.3), "WARMUP_FRACTION must be at least 0"),  # the sum alone was checked
        (dict(aux_k=-2), "AUX_K must be -1"),
        (dict(l1_coefficient=-1e-3), "L1_COEFFICIENT must be at least 0"),
    ],
)
def test_out_of_range_settings_are_refused_when_the_config_is_made(overrides, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**overrides)


def test_a_sweep_holds_a_topk_and_a_batchtopk_sae_of_the_same_size():
    names = [spec.name for spec in TrainConfig(sweep=["topk:256:8", "batchtopk:256:8", "batchtopk:256:8:64-256"]).specs(64)]
    assert names == ["SAE_M=256_K=8", "SAE_batchtopk_M=256_K=8", "SAE_batchtopk_matryoshka_M=256_K=8_prefixes=64-256"]


def test_missing_or_incomplete_store_points_to_step_one(tiny_store, tmp_path):
    with pytest.raises(UserError, match="extract_activations.py"):
        train_saes(config_for(tmp_path / "nowhere", tmp_path))
    manifest = json.loads((tiny_store / "manifest.json").read_text())
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "status": "in_progress"}))
    with pytest.raises(UserError, match="incomplete.*resume"):
        train_saes(config_for(incomplete, tmp_path))


def test_foreign_or_corrupt_checkpoints_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError, match="not a fastsae or HypotheSAEs SAE checkpoint"):
        load_sae(foreign)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_sae(corrupt)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_sae(tmp_path / "missing.pt")


def test_reading_ahead_keeps_the_order_and_passes_errors_on():
    def source():
        for index in range(5):
            yield torch.full((2, 3), float(index))
        raise UserError("store went away")

    prefetched = read_ahead(source())
    assert [float(next(prefetched)[0, 0]) for _ in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(UserError, match="store went away"):
        next(prefetched)


def test_parallel_store_readers_give_the_same_batches_as_reading_in_line(tiny_store):
    """The GPU path reads chunks on several threads: the batch sequence must not depend on it (resume replays it)."""
    store = ActivationStore(tiny_store)
    split = ExampleSplit.by_example(store.n_examples, 0.1, seed=0)
    source = TokenSource(store, split, validation=False, include_special=False)
    source_chunks = [(start, min(start + 1000, store.n_tokens)) for start in range(0, store.n_tokens, 1000)]
    gathered = torch.cat([source.chunk(start, stop) for start, stop in source_chunks])  # chunks that cross no shard and several
    torch.testing.assert_close(gathered, source.all_tokens(store.n_tokens).to(store.dtype), rtol=0, atol=0)
    in_line = mixed_batches(source, 2048, 256, seed=4, readers=0)
    threaded = mixed_batches(source, 2048, 256, seed=4, readers=3)
    for _ in range(3 * store.n_tokens // 256):  # three epochs
        assert torch.equal(next(in_line), next(threaded))


def test_bfloat16_autocast_trains_close_to_float32(tiny_store, tmp_path):
    """The same run under bf16 autocast ends within 0.01 of float32's validation FVU (evaluated in float32)."""
    (float32,) = train_saes(config_for(tiny_store, tmp_path / "fp32", epochs=5.0, precision="float32"))
    (bfloat16,) = train_saes(config_for(tiny_store, tmp_path / "bf16", epochs=5.0, precision="bfloat16"))
    assert bfloat16["final"]["l0"] == pytest.approx(K, abs=0.5)
    assert bfloat16["final"]["fvu"] == pytest.approx(float32["final"]["fvu"], abs=0.01)


@pytest.mark.parametrize("instructions", [False, True], ids=["plain-cpu", "bf16-cpu"])
def test_auto_precision_takes_bfloat16_on_a_cpu_only_with_its_instructions(instructions, monkeypatch):
    monkeypatch.setattr(train_module, "cpu_has_bfloat16_instructions", lambda: instructions)
    assert TrainConfig(device="cpu").uses_bfloat16() == instructions
    assert not TrainConfig(device="cpu", precision="float32").uses_bfloat16()
    assert TrainConfig(device="cpu", precision="bfloat16").uses_bfloat16()


def test_bfloat16_instructions_are_those_the_cpu_lists():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    assert cpu_has_bfloat16_instructions() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_training_without_a_validation_split_still_finishes(tiny_store, tmp_path, capsys):
    (result,) = train_saes(config_for(tiny_store, tmp_path, validation_fraction=0.0, epochs=2.0))
    assert result["final"] == {} and result["validation"] == []
    assert f"| {result['name']} | n/a |" in capsys.readouterr().out
    assert load_sae(result["checkpoint"]).sae.spec.m == M


def test_the_scale_is_measured_across_a_store_sorted_by_norm(tmp_path):
    """A dataset sorted by source or length puts unlike activations at its two ends: the scale's sample spans the store
    (seeded chunks), where the first 65,536 tokens described only its start."""
    import numpy as np

    from fastsae.store.activation_store import ActivationStoreWriter, plan_shards

    d, n_examples, length = 4, 2000, 100  # 200,000 tokens: three times the scale's sample
    norms = np.repeat([1.0, 10.0], n_examples * length // 2)[:, None]  # the first half small, the second large
    x = (np.random.default_rng(0).normal(size=(n_examples * length, d)) * norms).astype(np.float32)
    lengths = [length] * n_examples
    offsets = np.arange(n_examples + 1) * length
    shards = plan_shards(lengths, shard_tokens=50_000)
    records = [{"row": i, "source": f"row {i}"} for i in range(n_examples)]
    writer = ActivationStoreWriter(
        tmp_path / "store", {"test": 1}, {"model": "sorted", "hook_name": "sorted", "d": d, "dtype": "float32"}, shards, offsets, records
    )
    for index, shard in enumerate(shards):
        rows = slice(shard.first_token, shard.first_token + shard.n_tokens)
        writer.write_shard(index, torch.from_numpy(x[rows]), np.zeros(shard.n_tokens, dtype=np.int32), np.zeros(shard.n_tokens, dtype=bool))
    writer.finish("now", 1)
    run = TrainingRun(TrainConfig(store=str(tmp_path / "store"), output_dir=str(tmp_path / "runs"), m=8, k=2, epochs=1.0))
    whole = math.sqrt(d / float((x.astype(np.float64) ** 2).sum(1).mean()))
    assert run.scale == pytest.approx(whole, rel=0.1)


def test_a_capped_validation_set_samples_the_whole_store_not_its_start(tiny_store, tmp_path, monkeypatch):
    """Past VALIDATION_MAX_TOKENS the held-out tokens were the store's first ones: on a store sorted by source or label,
    the validation set described its first rows only."""
    monkeypatch.setattr("fastsae.store.batches.READ_CHUNK_TOKENS", 512)
    monkeypatch.setattr(train_module, "VALIDATION_MAX_TOKENS", 300)
    run = TrainingRun(config_for(tiny_store, tmp_path))
    store = ActivationStore(tiny_store)
    held_out = TokenSource(store, ExampleSplit.by_example(store.n_examples, 0.1, 0), validation=True, include_special=False)
    every = held_out.all_tokens(store.n_tokens) * run.scale
    assert len(every) > 2 * 300 and len(run.validation_tokens) == 300
    distances = torch.cdist(run.validation_tokens, every)
    assert float(distances.min(dim=1).values.max()) < 0.05  # every one a held-out token (norms ~8; cdist rounds)
    assert int(distances.argmin(dim=1).max()) >= 300  # some from past the first 300 (argmin: the first of equal tokens)


def test_a_store_damaged_after_extraction_stops_training_naming_the_file(tiny_store, tmp_path):
    """A shard file that a copy left empty raised numpy's EOFError from deep inside the run's setup."""
    store = shutil.copytree(tiny_store, tmp_path / "store")
    (store / "shard_00000" / "activations.npy").write_bytes(b"")
    with pytest.raises(
        UserError,
        match=r"shard_00000/activations\.npy is damaged or missing.*Rerun extract_activations\.py with the same settings: it rewrites",
    ):
        train_saes(config_for(store, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
