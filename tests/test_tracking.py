"""Experiment tracking: what W&B (offline) and TensorBoard hold, read back with their own formats, equals metrics.json
and eval.json; a missing package is one clear error before any work; only rank 0 tracks."""

from __future__ import annotations

import json
import struct
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train import config_for

from fastsae.common import distributed, tracking
from fastsae.common.errors import UserError
from fastsae.evaluate.evaluate_sae import EVAL_FILE, EvalConfig, evaluate_sae
from fastsae.train.train_sae import TrainConfig, TrainingRun, train_saes

TRAIN_KEYS = ("loss", "fvu", "l0", "dead_fraction", "learning_rate", "tokens")
SWEEP = ["topk:64:4", "batchtopk:96:8"]
OPTIONAL = "an optional tracker's package is missing: pip install -r requirements-dev.txt installs it"
SHORT = dict(max_tokens=256 * 30, log_every=5, eval_every=10)  # 30 steps: 6 history rows, 3 validations

# A .wandb file (W&B's transaction log) is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each
# framed by a CRC-32 of its type and data, a 2-byte length and a type; a record spans one chunk (FULL) or several.
WANDB_HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7
FULL, LAST = 1, 4  # a record's only chunk, its last chunk
WANDB_WRITE_SECONDS = 60


def wandb_records(path: Path) -> list:
    """The records of one offline W&B run's .wandb file, parsed with W&B's own protobuf schema
    (wandb 0.31 has no Python reader of these files; its Go core reads them)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data.startswith(b":W&B")
    records, chunks, position = [], [], WANDB_HEADER
    while position + CHUNK_HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        if position + CHUNK_HEADER + length > len(data):  # still being written
            break
        payload = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        assert zlib.crc32(bytes([kind]) + payload) == checksum, f"corrupt chunk at byte {position}"
        chunks.append(payload)
        position += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wandb_run(path: Path) -> SimpleNamespace:
    """The run record, config, history by step, final summary and exit code of an offline W&B run's .wandb file.

    W&B's service writes the file on its own, after `finish` has returned: wait for the run's last record, its exit.
    """
    deadline = time.monotonic() + WANDB_WRITE_SECONDS
    while (run := _wandb_run(path)).exit_code is None:
        assert time.monotonic() < deadline, f"{path} has no exit record after {WANDB_WRITE_SECONDS} s"
        time.sleep(0.1)
    return run


def _wandb_run(path: Path) -> SimpleNamespace:
    run, history, summary, exit_code = None, {}, {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    config = {item.key: json.loads(item.value_json) for item in run.config.update} if run else {}
    return SimpleNamespace(run=run, config=config, history=history, summary=summary, exit_code=exit_code)


def wandb_run_of(sae_folder: Path, job_type: str) -> SimpleNamespace:
    """The one W&B run of `job_type` ("train" or "evaluate") among the offline runs in an SAE's folder."""
    runs = [wandb_run(path) for path in sae_folder.glob("wandb/offline-run-*/run-*.wandb")]
    (run,) = [run for run in runs if run.run.job_type == job_type]
    return run


def tensorboard_events(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point of `tag` TensorBoard shows for a run folder, read by its own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def assert_same_points(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps in the same order, and the same values to float32's precision (TensorBoard keeps float32)."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def metrics_json(result: dict) -> dict:
    return json.loads((Path(result["checkpoint"]).parent / "metrics.json").read_text())


@pytest.fixture(scope="module")
def wandb_sweep(tiny_store, tmp_path_factory) -> list[dict]:
    """A sweep of two SAEs tracked by W&B with WANDB_MODE unset: offline by default."""
    pytest.importorskip("wandb", reason=OPTIONAL)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_MODE", raising=False)
        return train_saes(config_for(tiny_store, tmp_path_factory.mktemp("wandb"), sweep=SWEEP, tracker="wandb", run_name="sweep", **SHORT))


def assert_wandb_history_is_metrics_json(tracked: SimpleNamespace, written: dict) -> None:
    """The run's history has a row at each step metrics.json has one, and no other, with the same values; its summary is `final`."""
    assert sorted(tracked.history) == sorted({row["step"] for row in written["history"] + written["validation"]})
    for row in written["history"]:
        assert {key: tracked.history[row["step"]][f"train/{key}"] for key in TRAIN_KEYS} == {key: row[key] for key in TRAIN_KEYS}
    for row in written["validation"]:
        logged = tracked.history[row["step"]]
        assert (logged["validation/fvu"], logged["validation/l0"]) == (row["fvu"], row["l0"])
    assert {name: tracked.summary[f"final/{name}"] for name in written["final"]} == written["final"]


def test_wandb_offline_run_per_sae_holds_the_metrics_json_history(wandb_sweep):
    for result in wandb_sweep:
        folder = Path(result["checkpoint"]).parent
        tracked, written = wandb_run_of(folder, "train"), metrics_json(result)
        run = tracked.run  # one run per SAE, grouped by the run folder
        assert (run.project, run.display_name, run.run_group, run.job_type) == ("fastsae", result["name"], "sweep", "train")
        assert tracked.config["sae"] == result["spec"] and tracked.config["tracker"] == "wandb"
        own = ("architecture", "m", "k", "aux_k")  # the sweep entry's, not the ARCHITECTURE, M, K it replaces
        assert {key: tracked.config[key] for key in own} == {key: result["spec"][key] for key in own}
        assert len(written["history"]) == 6 and len(written["validation"]) == 3
        assert_wandb_history_is_metrics_json(tracked, written)
        assert tracked.summary["steps"] == 30 and tracked.exit_code == 0


def test_evaluation_summary_holds_eval_json_headline_metrics(wandb_sweep, tiny_model_folder):
    checkpoint = wandb_sweep[0]["checkpoint"]
    config = EvalConfig(checkpoint=[checkpoint], model_name=str(tiny_model_folder), model_tokens=600, device="cpu", tracker="wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_MODE", raising=False)
        evaluate_sae(config)
    written = json.loads((Path(checkpoint).parent / EVAL_FILE).read_text())
    core = written["saebench_core"]["eval_result_metrics"]
    evaluation = wandb_run_of(Path(checkpoint).parent, "evaluate")
    assert evaluation.run.display_name == Path(checkpoint).stem and evaluation.run.run_group == "sweep"
    assert evaluation.summary["saebench_core/ce_loss_score"] == core["model_performance_preservation"]["ce_loss_score"]
    assert evaluation.summary["saebench_core/kl_div_score"] == core["model_behavior_preservation"]["kl_div_score"]
    assert evaluation.summary["saebench_core/explained_variance"] == core["reconstruction_quality"]["explained_variance"]
    assert evaluation.summary["reconstruction/content/fvu"] == written["reconstruction"]["content"]["fvu"]
    assert evaluation.summary["sparsity/l0_mean"] == written["sparsity"]["l0_mean"]


def test_tensorboard_events_hold_the_metrics_json_history(tiny_store, tmp_path):
    pytest.importorskip("tensorboard", reason=OPTIONAL)
    (result,) = train_saes(config_for(tiny_store, tmp_path, tracker="tensorboard", **SHORT))
    folder, written = Path(result["checkpoint"]).parent / "tensorboard" / "train", metrics_json(result)
    for key in TRAIN_KEYS:
        assert_same_points(tensorboard_events(folder, f"train/{key}"), [(row["step"], row[key]) for row in written["history"]])
    for key in ("fvu", "l0"):
        assert_same_points(tensorboard_events(folder, f"validation/{key}"), [(row["step"], row[key]) for row in written["validation"]])
    assert_same_points(tensorboard_events(folder, "final/fvu"), [(30, written["final"]["fvu"])])


class CrashingRun(TrainingRun):
    """A run that crashes (saving nothing) at step 21: saved at step 15, its history logged to step 20."""

    def train_step(self, trainer, x, factor) -> None:
        if len(trainer.history) == 4:
            raise RuntimeError("simulated crash")
        super().train_step(trainer, x, factor)


def test_a_run_resumed_after_a_crash_continues_the_same_tensorboard_curves(tiny_store, tmp_path):
    """Resumed at step 15, it logs step 20 again: TensorBoard shows each step once, the values of metrics.json."""
    pytest.importorskip("tensorboard", reason=OPTIONAL)
    config = config_for(tiny_store, tmp_path, tracker="tensorboard", checkpoint_every=15, **SHORT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashingRun(config).run()
    (result,) = train_saes(config)
    logged = tensorboard_events(Path(result["checkpoint"]).parent / "tensorboard" / "train", "train/loss")
    assert_same_points(logged, [(row["step"], row["loss"]) for row in metrics_json(result)["history"]])


def test_a_run_resumed_after_a_crash_is_a_new_wandb_run_holding_the_whole_metrics_json_history(tiny_store, tmp_path, monkeypatch):
    """The crashed session's run is closed as failed; the resumed one logs steps 5 to 15 again from the saved state."""
    pytest.importorskip("wandb", reason=OPTIONAL)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = config_for(tiny_store, tmp_path, tracker="wandb", checkpoint_every=15, **SHORT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        CrashingRun(config).run()
    (result,) = train_saes(config)
    runs = [wandb_run(path) for path in Path(result["checkpoint"]).parent.glob("wandb/offline-run-*/run-*.wandb")]
    (crashed,), (resumed,) = [run for run in runs if run.exit_code == 1], [run for run in runs if run.exit_code == 0]
    assert sorted(crashed.history) == [5, 10, 15, 20] and resumed.run.display_name == crashed.run.display_name
    assert_wandb_history_is_metrics_json(resumed, metrics_json(result))


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_rerunning_a_finished_training_logs_nothing_more(tiny_store, tmp_path, monkeypatch, tracker):
    """No second W&B run holding only a copy of the summary; no second TensorBoard point at the last step."""
    pytest.importorskip(tracker, reason=OPTIONAL)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = config_for(tiny_store, tmp_path, tracker=tracker, **SHORT)
    train_saes(config)
    (result,) = train_saes(config)
    folder = Path(result["checkpoint"]).parent
    if tracker == "wandb":
        assert_wandb_history_is_metrics_json(wandb_run_of(folder, "train"), metrics_json(result))
    else:
        assert_same_points(tensorboard_events(folder / "tensorboard" / "train", "final/fvu"), [(30, metrics_json(result)["final"]["fvu"])])


@pytest.mark.parametrize("config_class", [TrainConfig, EvalConfig])
@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_missing_package_is_one_error_naming_its_install(monkeypatch, config_class, tracker, tmp_path):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import wandb` now fails as if it were not installed
    with pytest.raises(UserError, match=f"LOGGER = {tracker} needs .*pip install {tracker}"):
        config_class(tracker=tracker)
    settings = SimpleNamespace(tracker=tracker, tracker_project="fastsae", tracker_dir="")
    with pytest.raises(UserError, match=f"pip install {tracker}"):
        tracking.start_tracker(settings, tmp_path / "run" / "SAE", "SAE", "train", {})


def test_an_unknown_logger_is_refused():
    with pytest.raises(UserError, match="LOGGER must be none, wandb or tensorboard; got 'mlflow'"):
        TrainConfig(tracker="mlflow")


def test_only_rank_0_tracks(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank=1, world_size=2, local_rank=1))
    settings = SimpleNamespace(tracker="tensorboard", tracker_project="fastsae", tracker_dir="")
    with tracking.start_tracker(settings, tmp_path / "run" / "SAE", "SAE", "train", {}) as tracker:
        tracker.log({"train/loss": 1.0}, step=5)
    assert isinstance(tracker, tracking.NoTracker) and not any(tmp_path.iterdir())


def test_logger_dir_mirrors_the_checkpoint_layout(tmp_path):
    sae_folder = Path("checkpoints/run/SAE_M=64_K=4")
    assert tracking.tracker_folder(SimpleNamespace(tracker_dir=""), sae_folder) == sae_folder
    assert tracking.tracker_folder(SimpleNamespace(tracker_dir=str(tmp_path)), sae_folder) == tmp_path / "run" / "SAE_M=64_K=4"
