"""Tests for fastsae.common.config: script constants as defaults, command-line overrides, --help, run_step, fingerprints."""

from __future__ import annotations

import dataclasses
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed

from fastsae.common.config import config_fingerprint, parse_step_config, run_step, setting
from fastsae.common.errors import UserError
from fastsae.extract.extract_activations import ExtractConfig

SCRIPT = Path(__file__).resolve().parents[1] / "extract_activations.py"


@dataclass
class DemoConfig:
    count: int = setting(3, "how many things")
    rate: float = setting(0.5, "learning rate")
    name: str = setting("demo", "a name for the run")
    verbose: bool = setting(False, "print more")
    layers: list[int] = setting([1, 2], "layers to read")
    tags: list[str] = setting(["alpha"], "free-form tags")


DEMO_CONSTANTS = {
    "COUNT": 7,
    "RATE": 0.25,
    "NAME": "from-script",
    "VERBOSE": True,
    "LAYERS": [4, 5],
    "TAGS": ["x", "y"],
}


def script_constants() -> dict:
    """The UPPER_CASE constants of extract_activations.py, read without running its main block."""
    namespace = runpy.run_path(str(SCRIPT), run_name="extract_activations_under_test")
    return {name: value for name, value in namespace.items() if name.isupper()}


def parse_demo(constants: dict, *argv: str) -> DemoConfig:
    return parse_step_config(DemoConfig, constants, "demo step", list(argv))


def help_text(capsys, monkeypatch, config_class, constants) -> str:
    """The --help output with whitespace normalised (argparse wraps long lines)."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        parse_step_config(config_class, constants, "A test step.", ["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


# --- defaults from the script's constants -----------------------------------------------------


def test_script_constants_become_defaults():
    config = parse_demo(DEMO_CONSTANTS)
    assert config == DemoConfig(count=7, rate=0.25, name="from-script", verbose=True, layers=[4, 5], tags=["x", "y"])
    assert isinstance(config.count, int) and isinstance(config.rate, float) and isinstance(config.verbose, bool)


def test_constant_absent_from_script_falls_back_to_dataclass_default():
    config = parse_demo({"COUNT": 9})
    assert config.count == 9
    assert (config.rate, config.name, config.verbose, config.layers, config.tags) == (0.5, "demo", False, [1, 2], ["alpha"])


def test_lower_case_mixed_case_and_private_names_in_a_script_are_not_settings():
    config = parse_demo({"count": 100, "Count": 101, "_CACHE": 1, "__doc__": "docstring"})
    assert config == DemoConfig()


def test_list_defaults_are_fresh_copies_per_instance():
    first, second = parse_demo({}), parse_demo({})
    assert first.layers == second.layers == [1, 2]
    first.layers.append(99)
    assert second.layers == [1, 2]
    assert DemoConfig().layers == [1, 2]


def test_extract_script_sets_a_constant_for_every_extract_config_field():
    constants = script_constants()
    fields = {field.name.upper() for field in dataclasses.fields(ExtractConfig)}
    assert fields == set(constants)


def test_extract_script_constants_become_extract_config_defaults():
    constants = script_constants()
    config = parse_step_config(ExtractConfig, constants, "extract", [])
    for field in dataclasses.fields(ExtractConfig):
        assert getattr(config, field.name) == constants[field.name.upper()], field.name
    assert config.max_length == 512 and config.layers == [12] and config.overwrite is False


def test_extract_constant_absent_uses_extract_config_default():
    constants = script_constants()
    del constants["MAX_LENGTH"], constants["PACKING"]
    constants["BLOCK_SIZE"] = 64
    config = parse_step_config(ExtractConfig, constants, "extract", [])
    assert config.max_length == 512 and config.packing == "sequential"
    assert config.block_size == 64


# --- command-line overrides -------------------------------------------------------------------


def test_max_length_override_is_an_int():
    config = parse_step_config(ExtractConfig, script_constants(), "extract", ["--max-length", "256"])
    assert config.max_length == 256
    assert isinstance(config.max_length, int)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--layers", "6", "12"], [6, 12]),
        (["--layers", "6,12"], [6, 12]),
        (["--layers", "6,", "12"], [6, 12]),
        (["--layers", "12", "6", "6"], [6, 12]),  # ExtractConfig sorts and removes duplicates
        (["--layers", "3"], [3]),
    ],
)
def test_layers_override_space_or_comma_separated(argv, expected):
    config = parse_step_config(ExtractConfig, script_constants(), "extract", argv)
    assert config.layers == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("no", False),
        ("0", False),
        ("OFF", False),
    ],
)
def test_bool_override_words(word, expected):
    constants = {**script_constants(), "OVERWRITE": not expected}
    config = parse_step_config(ExtractConfig, constants, "extract", ["--overwrite", word])
    assert config.overwrite is expected


def test_overwrite_true_override():
    config = parse_step_config(ExtractConfig, script_constants(), "extract", ["--overwrite", "true"])
    assert config.overwrite is True


def test_overrides_of_every_field_type():
    config = parse_demo(
        DEMO_CONSTANTS,
        "--count",
        "11",
        "--rate",
        "1e-3",
        "--name",
        "cli",
        "--verbose",
        "false",
        "--layers",
        "8,9",
        "10",
        "--tags",
        "p,q",
        "r",
    )
    assert config == DemoConfig(count=11, rate=0.001, name="cli", verbose=False, layers=[8, 9, 10], tags=["p", "q", "r"])


def test_override_leaves_other_constants_and_the_constants_dict_alone():
    constants = {name: (list(value) if isinstance(value, list) else value) for name, value in DEMO_CONSTANTS.items()}
    config = parse_demo(constants, "--layers", "1")
    assert config.layers == [1]
    assert config.tags == ["x", "y"] and config.count == 7
    assert constants == DEMO_CONSTANTS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--verbose", "maybe"], "expected true or false"),
        (["--count", "many"], "invalid int value"),
        (["--rate", "fast"], "invalid float value"),
        (["--layers", "1,x"], "--layers"),
        (["--no-such-option", "1"], "unrecognized arguments"),
    ],
)
def test_malformed_override_is_an_argparse_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_demo({}, *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- --help -----------------------------------------------------------------------------------


@dataclass
class KeywordConfig:
    from_step: str = setting("", "where to start", name="from")


def test_a_field_named_like_a_keyword_takes_its_public_name_for_the_constant_and_the_flag(capsys, monkeypatch):
    assert parse_step_config(KeywordConfig, {"FROM": "train"}, "demo", []).from_step == "train"
    assert parse_step_config(KeywordConfig, {"FROM": "train"}, "demo", ["--from", "evaluate"]).from_step == "evaluate"
    assert "--from STR where to start (default: train)" in help_text(capsys, monkeypatch, KeywordConfig, {"FROM": "train"})


def test_a_mistyped_constant_is_refused_with_the_setting_it_resembles():
    with pytest.raises(UserError) as error:
        parse_demo({"COUNT": 7, "RAET": 0.1, "__file__": "/repo/demo_step.py"})
    message = str(error.value)
    assert "demo_step.py sets RAET (did you mean RATE?)" in message and "lower case" in message
    with pytest.raises(UserError, match=r"the script sets FROM_STEP \(did you mean FROM\?\)"):
        parse_step_config(KeywordConfig, {"FROM_STEP": "train"}, "demo", [])


def test_a_constant_the_pipeline_reads_from_a_script_is_checked_too(tmp_path):
    from fastsae.pipeline.run_pipeline import load_step_config
    from fastsae.train.train_sae import STAGE

    (tmp_path / STAGE.script).write_text("M = 512\nLEARNNG_RATE = 1e-3\n" + TRAIN_SCRIPT_MAIN)
    with pytest.raises(UserError, match=r"train_sae.py sets LEARNNG_RATE \(did you mean LEARNING_RATE\?\)"):
        load_step_config(STAGE, tmp_path)


TRAIN_SCRIPT_MAIN = """
if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.train.train_sae import TrainConfig, train_saes

    run_step(TrainConfig, globals(), train_saes, description=__doc__)
"""


@pytest.mark.parametrize(
    ("constants", "message"),
    [
        ("M = 512)\n", "train_sae.py, line 1: unmatched ')'"),
        ("M = 512\nK = k\n", "train_sae.py, line 2: NameError: name 'k' is not defined"),
        ("M = 512\nEPOCHS = [2]\n", "train_sae.py, line 2: EPOCHS must be a number, e.g. EPOCHS = 1.0; got [2]"),
        ('M = "many"\n', "train_sae.py, line 1: M must be a whole number, e.g. M = 1; got 'many'"),
        ("M = 3.7\n", "train_sae.py, line 1: M must be a whole number, e.g. M = 1; got 3.7"),
        ('M = 512\nEXPORT_SAELENS = "maybe"\n', "train_sae.py, line 2: EXPORT_SAELENS must be True or False"),
    ],
)
def test_a_script_the_pipeline_cannot_read_is_named_with_its_line(tmp_path, constants, message):
    """A syntax error, a failing line and a constant of the wrong type used to end in a traceback (or argparse's usage of
    another script), naming neither the script nor the line."""
    from fastsae.pipeline.run_pipeline import load_step_config
    from fastsae.train.train_sae import STAGE

    (tmp_path / STAGE.script).write_text(constants + TRAIN_SCRIPT_MAIN)
    with pytest.raises(UserError) as error:
        load_step_config(STAGE, tmp_path)
    assert message in str(error.value) and str(tmp_path) in str(error.value)


def test_another_projects_script_under_a_step_scripts_name_is_refused_before_it_runs(tmp_path):
    """Reading its constants ran the whole script: another project's train_sae.py trained whatever it trains, then its
    constants were taken for ours (or, with none, every default silently)."""
    from fastsae.pipeline.run_pipeline import load_step_config
    from fastsae.train.train_sae import STAGE

    ran = tmp_path / "ran"
    (tmp_path / STAGE.script).write_text(f"from pathlib import Path\nPath({str(ran)!r}).touch()\n")
    with pytest.raises(UserError, match="is not fastsae's train_sae.py: it never names TrainConfig"):
        load_step_config(STAGE, tmp_path)
    assert not ran.exists()


def test_help_lists_every_option_with_its_default_from_the_constants(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch, DemoConfig, {"COUNT": 7, "LAYERS": [4, 5], "NAME": "from-script"})
    assert "A test step." in text
    expected = {
        "--count": "7",
        "--rate": "0.5",
        "--name": "from-script",
        "--verbose": "False",
        "--layers": "[4, 5]",
        "--tags": "['alpha']",
    }
    for field in dataclasses.fields(DemoConfig):
        option = "--" + field.name.replace("_", "-")
        assert option in text
        assert f"{field.metadata['help']} (default: {expected[option]})" in text, option


def test_extract_help_shows_every_option_and_current_constant_values(capsys, monkeypatch):
    constants = {**script_constants(), "MAX_LENGTH": 1024, "LAYERS": [3, 7], "PACKING": "block", "OVERWRITE": True}
    text = help_text(capsys, monkeypatch, ExtractConfig, constants)
    for field in dataclasses.fields(ExtractConfig):
        option = "--" + field.name.replace("_", "-")
        assert f"{option} " in text, option
        assert f"(default: {constants[field.name.upper()]})" in text, option
    assert "(default: 1024)" in text and "(default: [3, 7])" in text and "(default: block)" in text
    assert "(default: 512)" not in text
    assert "overrides the UPPER_CASE constant" in text


# --- validation -------------------------------------------------------------------------------


def test_invalid_choice_on_command_line_raises_user_error_naming_the_constant():
    with pytest.raises(UserError, match=r"PACKING must be one of sequential, block; got 'foo'"):
        parse_step_config(ExtractConfig, script_constants(), "extract", ["--packing", "foo"])


def test_invalid_choice_in_script_constant_gives_the_same_error():
    constants = {**script_constants(), "PACKING": "foo"}
    with pytest.raises(UserError, match=r"PACKING must be one of sequential, block; got 'foo'"):
        parse_step_config(ExtractConfig, constants, "extract", [])


@pytest.mark.parametrize(
    ("argv", "constant"),
    [
        (["--hook-point", "mlp_in"], "HOOK_POINT"),
        (["--storage-dtype", "int8"], "STORAGE_DTYPE"),
        (["--max-length", "0"], "MAX_LENGTH"),
        (["--batch-tokens", "100"], "BATCH_TOKENS"),
        (["--layers", ","], "LAYERS"),
    ],
)
def test_other_invalid_values_name_their_constant(argv, constant):
    with pytest.raises(UserError) as error:
        parse_step_config(ExtractConfig, script_constants(), "extract", argv)
    assert str(error.value).startswith(constant)


# --- run_step ---------------------------------------------------------------------------------


def test_run_step_passes_the_parsed_config_to_the_step(capsys):
    seen = []
    run_step(DemoConfig, DEMO_CONSTANTS, seen.append, "demo", ["--count", "2"])
    assert seen == [DemoConfig(count=2, rate=0.25, name="from-script", verbose=True, layers=[4, 5], tags=["x", "y"])]
    assert capsys.readouterr().err == ""


def test_run_step_turns_a_user_error_from_the_step_into_exit_code_2(capsys):
    def step(config: DemoConfig) -> None:
        raise UserError(f"dataset not found: {config.name}.jsonl. Set DATASET to a JSONL file.")

    with pytest.raises(SystemExit) as exit_info:
        run_step(DemoConfig, DEMO_CONSTANTS, step, "demo", [])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: dataset not found: from-script.jsonl. Set DATASET to a JSONL file.\n"
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""


def test_under_torchrun_only_the_steps_that_split_their_work_run(capsys, monkeypatch):
    """Evaluation (and every step but extraction and training) would run whole in each process, writing the same files."""
    from fastsae.evaluate.evaluate_sae import EvalConfig

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True)  # the store torchrun keeps for its ranks
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    calls = []
    with pytest.raises(SystemExit) as exit_info:
        run_step(EvalConfig, {"__file__": "/repo/evaluate_sae.py"}, calls.append, "evaluate", [])
    assert exit_info.value.code == 2 and calls == []
    assert capsys.readouterr().err.startswith("error: evaluate_sae.py runs in one process: start it with python, not torchrun")
    run_step(ExtractConfig, script_constants(), calls.append, "extract", [])
    assert len(calls) == 1
    monkeypatch.setenv("RANK", "1")  # the other ranks stay silent: one has said it
    with pytest.raises(SystemExit):
        run_step(EvalConfig, {"__file__": "/repo/evaluate_sae.py"}, calls.append, "evaluate", [])
    assert capsys.readouterr().err == ""


def test_run_step_turns_an_invalid_setting_into_exit_code_2_without_running_the_step(capsys):
    calls = []
    with pytest.raises(SystemExit) as exit_info:
        run_step(ExtractConfig, script_constants(), calls.append, "extract", ["--packing", "foo"])
    assert exit_info.value.code == 2
    assert calls == []
    err = capsys.readouterr().err
    assert err.startswith("error: PACKING must be one of")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err


def test_run_step_lets_unexpected_errors_propagate():
    def step(config: DemoConfig) -> None:
        raise ValueError("a bug, not a user mistake")

    with pytest.raises(ValueError, match="a bug"):
        run_step(DemoConfig, {}, step, "demo", [])


def test_run_step_keyboard_interrupt_exits_130(capsys):
    def step(config: DemoConfig) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_step(DemoConfig, {}, step, "demo", [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted:")


# --- config_fingerprint -----------------------------------------------------------------------


def test_config_fingerprint_is_stable_under_key_order():
    first = config_fingerprint({"layers": [6, 12], "max_length": 512, "packing": "sequential"})
    second = config_fingerprint({"packing": "sequential", "max_length": 512, "layers": [6, 12]})
    assert first == second
    assert len(first) == 16 and all(character in "0123456789abcdef" for character in first)
    assert config_fingerprint({"layers": [6, 12], "max_length": 512, "packing": "sequential"}) == first


@pytest.mark.parametrize(
    "changed",
    [
        {"layers": [6, 12], "max_length": 256, "packing": "sequential"},
        {"layers": [12, 6], "max_length": 512, "packing": "sequential"},
        {"layers": [6, 12], "max_length": 512, "packing": "block"},
        {"layers": [6, 12], "max_length": 512},
        {"layers": [6, 12], "max_length": "512", "packing": "sequential"},
    ],
)
def test_config_fingerprint_changes_when_a_value_changes(changed):
    assert config_fingerprint(changed) != config_fingerprint({"layers": [6, 12], "max_length": 512, "packing": "sequential"})


def test_config_fingerprint_of_extract_configs():
    constants = script_constants()
    base = dataclasses.asdict(parse_step_config(ExtractConfig, constants, "extract", []))
    same = dataclasses.asdict(parse_step_config(ExtractConfig, dict(reversed(list(constants.items()))), "extract", []))
    other = dataclasses.asdict(parse_step_config(ExtractConfig, constants, "extract", ["--layers", "6"]))
    assert config_fingerprint(base) == config_fingerprint(same)
    assert config_fingerprint(base) != config_fingerprint(other)
    # values JSON cannot encode (a Path) still hash, by their string form
    assert config_fingerprint({"out": Path("a/b")}) == config_fingerprint({"out": "a/b"})


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "cuda:"])
def test_a_device_name_torch_would_reject_later_is_refused_first(name):
    """`--device gpu` failed inside torch after the model had loaded."""
    from fastsae.common.devices import resolve_device

    with pytest.raises(UserError, match=f"DEVICE must be auto, cpu, cuda or cuda:N .*got '{name}'"):
        resolve_device(name)
    assert resolve_device("cpu") == "cpu"


def test_without_torch_the_pipeline_names_the_missing_packages():
    """run_pipeline.py imports this module before it checks the packages: it must not need torch itself."""
    blocked = "import sys; sys.modules['torch'] = sys.modules['numpy'] = None; import runpy; sys.argv = ['run_pipeline.py', '--plan-only']"
    run = subprocess.run(
        [sys.executable, "-c", f"{blocked}; runpy.run_path('run_pipeline.py', run_name='__main__')"],
        cwd=SCRIPT.parent,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "missing Python packages: torch, numpy. Install them" in run.stderr, run.stderr
