"""The whole pipeline in one command: checks, a plan with estimates, confirmation, resume, and a summary.

Each step's settings are the constants in its own script (extract_activations.py, train_sae.py,
evaluate_sae.py, interpret_sae.py), read without running the script, so editing a script and
rerunning the pipeline re-runs that step. A step is skipped when its outputs exist and its
fingerprint — its settings plus the fingerprint of the step it reads from — matches the one recorded
in pipeline_state.json after its last success; so a changed constant re-runs its step and every step
downstream of it. Steps run in this process, sharing imports and the model cache.

This module imports only the standard library at the top, so that a missing package is reported
by the first check, with its fix, rather than as an ImportError.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import logging
import runpy
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsae.common.atomic_files import write_json_atomically
from fastsae.common.config import config_fingerprint, parse_step_config, setting
from fastsae.common.errors import UserError
from fastsae.common.stage import Calibration, Corpus, Estimate, Output, PlanFacts, Stage, same_path
from fastsae.store.manifest import MANIFEST, StoreManifest

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
STATE_FORMAT_VERSION = 1
# Import name → what to pip install; requirements.txt lists the same packages.
REQUIRED_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "pandas": "pandas",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "openai": "openai",
    "sklearn": "scikit-learn",
}


# The stages in the order they chain; each module defines its `STAGE` (fastsae/common/stage.py).
STAGE_MODULES = {
    "extract": "fastsae.extract.extract_activations",
    "train": "fastsae.train.train_sae",
    "evaluate": "fastsae.evaluate.evaluate_sae",
    "interpret": "fastsae.interpret.interpret_sae",
}
STEP_NAMES = tuple(STAGE_MODULES)


@dataclass
class PipelineConfig:
    steps: str = setting(",".join(STEP_NAMES), "steps to consider, comma-separated, from: " + ", ".join(STEP_NAMES))
    from_step: str = setting("", "start at this step: it and the steps after it (within STEPS)", name="from")
    force: bool = setting(False, "re-run the chosen steps even when their outputs are current")
    yes: bool = setting(False, "run without asking for confirmation (required when there is no terminal)")
    plan_only: bool = setting(False, "print the checks and the plan, then stop")
    scripts_dir: str = setting(".", "folder with the four step scripts whose constants configure the steps")

    def __post_init__(self) -> None:
        unknown = [name for name in self.step_list() + ([self.from_step] if self.from_step else []) if name not in STEP_NAMES]
        if unknown:
            raise UserError(f"unknown step {unknown[0]!r}: STEPS and FROM take {', '.join(STEP_NAMES)}.")
        if self.from_step and self.from_step not in self.step_list():
            raise UserError(f"FROM is {self.from_step!r}, which STEPS ({self.steps}) leaves out. Add it to STEPS or choose another FROM.")

    def step_list(self) -> list[str]:
        return [name.strip() for name in self.steps.split(",") if name.strip()]

    def selected(self) -> set[str]:
        chosen = self.step_list()
        return set(chosen[chosen.index(self.from_step) :] if self.from_step else chosen)


@dataclass
class StepPlan:
    """What the pipeline knows and decides about one stage."""

    stage: Stage
    config: Any
    selected: bool
    input: Path
    outputs: list[Output] = field(default_factory=list)
    linked: bool = False  # its input is what its upstream stage writes
    fingerprint: str = ""
    action: str = ""  # run, skip, or "-" (not selected)
    reason: str = ""
    overwrite: bool = False
    estimate: Estimate = field(default_factory=Estimate)

    @property
    def runs(self) -> bool:
        return self.action == "run"

    @property
    def output_paths(self) -> list[Path]:
        return [output.path for output in self.outputs]


class PipelineState:
    """pipeline_state.json: per step, the fingerprint it last ran with, whether it finished, its outputs and time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                self.steps = json.loads(path.read_text())["steps"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} is damaged. Delete it: every step then re-runs, resuming from what is on disk.") from None

    def record(self, name: str) -> dict[str, Any] | None:
        return self.steps.get(name)

    def update(self, name: str, **fields: Any) -> None:
        """Written to a temp file and renamed, so a crash never leaves half a state file."""
        self.steps[name] = fields
        write_json_atomically(self.path, {"format_version": STATE_FORMAT_VERSION, "steps": self.steps})


def check_packages() -> str:
    missing = [package for module, package in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"missing Python packages: {', '.join(missing)}. Install them: pip install -r requirements.txt")
    from importlib.metadata import version

    return ", ".join(f"{package} {version(package)}" for package in ("torch", "transformers"))


def load_stages() -> list[Stage]:
    """The stage objects, imported only after the package check (their modules need torch and the rest)."""
    return [importlib.import_module(module).STAGE for module in STAGE_MODULES.values()]


def load_step_config(stage: Stage, scripts_dir: Path) -> Any:
    """The stage's config from its script's constants; the script's `__main__` block does not run.

    A script that does not parse, or is not this step's (one of another project's, under the same name), is refused
    before any of it runs: its top level could do anything. One whose constants fail is named with the line."""
    path = scripts_dir / stage.script
    where = "SCRIPTS_DIR must be the folder that holds the four step scripts (the repository root)"
    if not path.is_file():
        raise UserError(f"{path} not found: {where}.")
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as error:
        raise UserError(f"{path}, line {error.lineno}: {error.msg}. Fix the script, then rerun.") from None
    config_name = stage.config_class.__name__
    if not any(isinstance(node, ast.Name) and node.id == config_name for node in ast.walk(tree)):
        raise UserError(f"{path} is not fastsae's {stage.script}: it never names {config_name}, the settings that script builds. {where}.")
    try:
        namespace = runpy.run_path(str(path), run_name="fastsae_pipeline")
    except Exception as error:
        line = next((frame.lineno for frame in reversed(traceback.extract_tb(error.__traceback__)) if frame.filename == str(path)), None)
        raise UserError(f"{path}, line {line}: {type(error).__name__}: {error}. Fix the script, then rerun.") from None
    return parse_step_config(stage.config_class, namespace, namespace.get("__doc__") or "", argv=[])


class Pipeline:
    """One run of run_pipeline.py, in the order it happens."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.state = PipelineState(Path(STATE_FILE))
        self.plans: dict[str, StepPlan] = {}
        self.facts: PlanFacts | None = None
        self.calibration: Calibration | None = None

    def check(self, name: str, result: str) -> None:
        logger.info("check %-9s %s", name, result)

    # --- checks, chain and decisions ------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the plan is printed; any problem stops here, before a stage has run."""
        self.check("packages", check_packages())
        from fastsae.lm.data import load_dataset
        from fastsae.pipeline import preflight

        selected = self.config.selected()
        stages = load_stages()
        configs = {stage.name: load_step_config(stage, Path(self.config.scripts_dir)) for stage in stages}
        self.plans = {
            stage.name: StepPlan(stage, configs[stage.name], stage.name in selected, stage.input_path(configs[stage.name]))
            for stage in stages
        }
        extract = self.plans["extract"]
        self.dataset = None
        if extract.selected:
            cfg = extract.config
            self.dataset = load_dataset(cfg.dataset, cfg.text_field, cfg.response_field, cfg.label_field, cfg.max_examples)
            bad = f", {self.dataset.skipped.total} bad ({self.dataset.skipped.describe()})" if self.dataset.skipped.total else ", 0 bad"
            self.check("dataset", f"{self.dataset.path}: {self.dataset.n_rows} rows, {len(self.dataset.examples)} usable{bad}")
        self._link(preflight)
        self._check_chain()
        self._decide()
        self._check_reads_what_runs()
        self._check_machine(preflight)

    def _name_outputs(self, plan: StepPlan) -> None:
        """What the stage writes, and whether its input is what its upstream stage writes."""
        plan.outputs = plan.stage.outputs(plan.config, self.facts)
        self.facts.outputs[plan.stage.name] = plan.outputs
        upstream = plan.stage.upstream
        plan.linked = upstream is not None and any(same_path(plan.input, path) for path in self.plans[upstream].output_paths)

    def _link(self, preflight) -> None:
        """Each stage's outputs, and whether its input is its upstream's output; checks the model on the way."""
        from fastsae.lm.lora import LORA_HOOK_POINT
        from fastsae.lm.models import resolve_model

        extract, train = self.plans["extract"], self.plans["train"]
        configs = {name: plan.config for name, plan in self.plans.items()}
        self.facts = PlanFacts(resolve_model(extract.config.model_name).slug, configs)
        self._name_outputs(extract)
        train.linked = any(same_path(train.input, path) for path in extract.output_paths)
        # The model is the extraction's, unless training reads another, existing store: then that store's.
        other_store = None if train.linked else StoreManifest.read(train.input / MANIFEST)
        uses_extraction_model = other_store is None or not other_store.model_name
        model_name = extract.config.model_name if uses_extraction_model else other_store.model_name
        layers_read = extract.config.layers if uses_extraction_model and extract.config.hook_point != LORA_HOOK_POINT else []
        # A plan alone writes nothing: a GGUF not in the cache yet is read as it is, and dequantised only for a run.
        self.model = preflight.check_model(model_name, layers_read, dequantise=not self.config.plan_only)
        self.check("model", self.model.describe())
        self.facts.d, self.facts.n_layers, self.facts.vocab_size = self.model.d, self.model.n_layers, self.model.vocab_size
        for plan in list(self.plans.values())[1:]:
            self._name_outputs(plan)

    def _check_chain(self) -> None:
        """Each selected stage's input is written by the stage before it, or exists; otherwise say which constant to change."""
        for plan in self.plans.values():
            if not plan.selected or plan.stage.upstream is None:
                continue
            upstream = self.plans[plan.stage.upstream]
            constant = f"{plan.stage.input_constant} in {plan.stage.script}"
            if plan.linked and not upstream.selected and not upstream.stage.outputs_complete(upstream.outputs):
                raise UserError(
                    f"{plan.stage.script} reads {plan.input} ({constant}), which {upstream.stage.script} has not written yet. "
                    f"Include the {upstream.stage.name} step (see --steps and --from)."
                )
            record = self.state.record(upstream.stage.name)
            if plan.linked and not upstream.selected and record is not None and record["status"] != "complete":
                # An interrupted training leaves a checkpoint of the step it stopped at: read now, it would be recorded as
                # the finished SAE's, and the rerun that finishes training would then skip this step as current.
                raise UserError(
                    f"{plan.stage.script} reads {plan.input} ({constant}), which {upstream.stage.script} began but did not finish "
                    f"(interrupted or failed; see {STATE_FILE}). Include the {upstream.stage.name} step to finish it (see --steps and --from)."
                )
            if not plan.linked and not plan.input.exists():
                fix = (
                    f"Set {plan.stage.input_constant} = {str(upstream.output_paths[0])!r} in {plan.stage.script}"
                    if upstream.outputs
                    else f"Point {constant} at an existing one"
                )
                raise UserError(
                    f"{constant} is {str(plan.input)!r}, which does not exist and is not what {upstream.stage.script} writes. {fix}."
                )

    def _check_reads_what_runs(self) -> None:
        """A stage whose upstream runs reads what that run writes: else the new outputs go unused while it re-runs on old ones."""
        for plan in self.plans.values():
            if not plan.selected or plan.linked or plan.stage.upstream is None:
                continue
            upstream = self.plans[plan.stage.upstream]
            if upstream.runs and upstream.outputs:
                constant = f"{plan.stage.input_constant} in {plan.stage.script}"
                raise UserError(
                    f"{upstream.stage.script} will write {upstream.output_paths[0]}, but {plan.stage.script} reads {plan.input} "
                    f"({constant}). Set {plan.stage.input_constant} = {str(upstream.output_paths[0])!r} in {plan.stage.script} "
                    f"to use the new output, or leave the {upstream.stage.name} step out (--from {plan.stage.name})."
                )

    def _decide(self) -> None:
        """Fingerprint each stage (its settings + its upstream's) and decide: skip when current, else run (and how)."""
        from fastsae.common.devices import resolve_device

        for plan in self.plans.values():
            fingerprinted = dataclasses.asdict(plan.config).items()
            settings = {key: value for key, value in fingerprinted if key not in plan.stage.unfingerprinted}
            if "device" in settings:  # auto is the device it picks; only the kind decides outputs (precision, absorption's words)
                settings["device"] = resolve_device(settings["device"]).split(":")[0]
            upstream = self._upstream_fingerprint(plan)
            reads_dataset = plan.stage.upstream is None and self.dataset is not None  # the first stage reads the texts
            extra = {"dataset": self.dataset.fingerprint()} if reads_dataset else {}
            # Each only when there is one, so that the other stages keep their fingerprints.
            if facts := plan.stage.fingerprint_facts(plan.config):
                extra["facts"] = facts
            if also_reads := self._optional_input_fingerprints(plan):
                extra["also_reads"] = also_reads
            plan.fingerprint = config_fingerprint({"settings": settings, "upstream": upstream, **extra})
            plan.action, plan.reason, plan.overwrite = self._decision(plan, self.state.record(plan.stage.name))

    def _upstream_fingerprint(self, plan: StepPlan) -> str | None:
        """What the input will hold, when its upstream writes it; else what it holds, when a recorded run of its upstream wrote it."""
        if plan.stage.upstream is None:
            return None
        if plan.linked:
            return self._written_by(self.plans[plan.stage.upstream])
        record = self.state.record(plan.stage.upstream)
        wrote_it = record is not None and record["status"] == "complete" and any(same_path(plan.input, path) for path in record["outputs"])
        return record["fingerprint"] if wrote_it else None

    def _optional_input_fingerprints(self, plan: StepPlan) -> dict[str, str | None]:
        """What each of the stage's optional inputs that an earlier stage writes will hold, by path."""
        earlier = list(self.plans.values())[: list(self.plans).index(plan.stage.name)]
        return {
            str(path): self._written_by(writer)
            for path in plan.stage.optional_inputs(plan.config)
            for writer in earlier
            if any(same_path(path, output) for output in writer.output_paths)
        }

    def _running_writers_of_inputs(self, plan: StepPlan) -> list[str]:
        """The earlier stages that run and write what `plan` reads (its input or an optional input): a stage re-run with the
        same settings (its outputs missing, an interrupted run, its own input rewritten) leaves the fingerprints of its readers
        as they were, yet rewrites what they read."""
        earlier = list(self.plans.values())[: list(self.plans).index(plan.stage.name)]
        reads = [*plan.stage.input_paths(plan.config), *plan.stage.optional_inputs(plan.config)]
        return [
            writer.stage.name
            for writer in earlier
            if writer.runs and any(same_path(path, output) for path in reads for output in writer.output_paths)
        ]

    def _written_by(self, writer: StepPlan) -> str | None:
        """What `writer`'s outputs will hold: its new fingerprint if it is selected, else the one on record, once it finished
        (an interrupted run's outputs may still be its old settings')."""
        if writer.selected:
            return writer.fingerprint
        record = self.state.record(writer.stage.name)
        return record["fingerprint"] if record and record["status"] == "complete" else None

    def _decision(self, plan: StepPlan, record: dict | None) -> tuple[str, str, bool]:
        """(action, reason, overwrite). A re-run with other settings overwrites; an interrupted one resumes."""
        if not plan.selected:
            return "-", "not selected", False
        if self.config.force:
            return "run", "--force", True
        if record is None:
            return "run", "new", False
        if record["fingerprint"] != plan.fingerprint:
            return "run", "settings changed", True
        if record["status"] != "complete":
            return "run", "resume (interrupted)", False
        if not plan.stage.outputs_complete(plan.outputs):
            return "run", "outputs missing or damaged", False
        if rewriters := self._running_writers_of_inputs(plan):
            return "run", f"{rewriters[0]} re-runs", True
        if record.get("input") is not None and record["input"] != plan.stage.input_identity(plan.config):
            return "run", "input rewritten outside the pipeline", True
        return "skip", "current", False

    def _check_machine(self, preflight) -> None:
        """Device and dtype, the estimates (with the calibration), free disk for what the stages write, and each stage's checks."""
        extract, train = self.plans["extract"], self.plans["train"]
        device = extract.config.resolved_device()
        self.check("device", preflight.describe_device(device, extract.config.resolved_compute_dtype(), train.config.uses_bfloat16()))
        self._estimate(preflight)
        self._check_disk(preflight)
        for plan in self.plans.values():
            if plan.selected:
                for name, result in plan.stage.checks(plan.config, self.facts):
                    self.check(name, result)

    def _check_disk(self, preflight) -> None:
        """Each running stage that writes to disk needs what it will write, less what its outputs already hold."""
        writers = [plan for plan in self.plans.values() if plan.runs and plan.estimate.disk_folder is not None]
        if not writers:
            self.check("disk", "no step that runs writes a store: nothing large to write")
        for plan in writers:
            estimate = plan.estimate
            if estimate.disk_bytes is None:
                self.check(
                    "disk", f"{plan.stage.name}: size unknown until the model is downloaded; the step checks free disk before it writes"
                )
                continue
            on_disk = sum(
                path.stat().st_size for folder in plan.output_paths if folder.exists() for path in folder.rglob("*") if path.is_file()
            )
            self.check("disk", preflight.check_disk(estimate.disk_folder, max(0, estimate.disk_bytes - on_disk)))

    # --- estimates ---------------------------------------------------------------------------------

    def _estimate(self, preflight) -> None:
        """Counts from the tokenized data (or the store), times from a short calibration on this machine; then each stage's cost."""
        from fastsae.lm.models import load_tokenizer
        from fastsae.store.activation_store import ActivationStore

        extract, train = self.plans["extract"], self.plans["train"]
        if any(plan.runs for plan in self.plans.values()):
            if extract.runs:
                tokenizer = load_tokenizer(self.model.source, self.model.dequantises)
                corpus = preflight.corpus_from_dataset(tokenizer, self.dataset, extract.config)
                pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                self.facts.corpus = corpus
            elif (manifest := StoreManifest.read(train.input / MANIFEST)) is not None and manifest.is_complete:
                corpus, pad_token_id = preflight.corpus_from_store(ActivationStore(train.input)), 0
                self.facts.corpus = corpus
            if self.facts.corpus is not None:
                self.calibration = self.facts.calibration = self._calibrate(preflight, corpus, pad_token_id)
        for plan in self.plans.values():
            if plan.runs:
                plan.estimate = plan.stage.estimate(plan.config, self.facts)

    def _calibrate(self, preflight, corpus: Corpus, pad_token_id: int) -> Calibration:
        """Time only what will run: the model when extraction, evaluation or interpretation runs, the SAE when any later step does."""
        from fastsae.lm.lora import LORA_HOOK_POINT

        calibration = preflight.Calibration()
        extract, train = self.plans["extract"], self.plans["train"]
        started = time.perf_counter()
        needs_model = extract.runs or any(self.plans[name].runs for name in ("evaluate", "interpret"))
        if needs_model and self.model.can_calibrate:
            config = extract.config
            residual = config.hook_point != LORA_HOOK_POINT  # a LoRA capture runs every block: time the whole stack
            layers = config.layers if residual and (train.linked or extract.selected) else [self.model.n_layers - 1]
            preflight.calibrate_model(
                calibration,
                self.model.source,
                config,
                corpus,
                layers,
                config.hook_point if residual else "resid_post",
                pad_token_id,
            )
            logger.info(
                "calibration: model loaded in %.1f s; %d real examples at %.0f tokens/s to layer %d, %.0f tokens/s through the whole model",
                calibration.load_seconds,
                len(corpus.sample),
                calibration.cut_tokens_per_second,
                max(layers),
                calibration.full_tokens_per_second,
            )
        if any(self.plans[name].runs for name in ("train", "evaluate", "interpret")):
            config = train.config
            specs = config.specs(self.model.d)
            preflight.calibrate_sae(
                calibration, specs, config.batch_size, config.resolved_device(), config.uses_bfloat16(), config.aux_coefficient
            )
            logger.info(
                "calibration: %s at batch %d: %.1f ms per training step; encoding %.0f tokens/s",
                ", ".join(spec.name for spec in specs),
                config.batch_size,
                1000 * calibration.sae_step_seconds,
                calibration.encode_tokens_per_second,
            )
        calibration.seconds = time.perf_counter() - started
        return calibration

    # --- plan, confirmation, running -----------------------------------------------------------------

    def plan_table(self) -> str:
        from fastsae.store.activation_store import format_bytes

        lines = ["| step | action | reads | writes | examples | tokens | store size | estimate |", "|---|---|---|---|---|---|---|---|"]
        for plan in self.plans.values():
            action = f"{plan.action} ({plan.reason})"
            figures = ["", "", "", ""]
            if plan.runs:
                estimate = plan.estimate
                figures = [
                    _count(estimate.examples),
                    _count(estimate.tokens),
                    format_bytes(estimate.disk_bytes) if estimate.disk_bytes is not None else "",
                    (f"~{_duration(estimate.seconds)}" if estimate.seconds is not None else "unknown")
                    + (f"; {estimate.note}" if estimate.note else ""),
                ]
            reads = "<br>".join(str(path) for path in plan.stage.input_paths(plan.config))  # every checkpoint of a sweep
            writes = "<br>".join(str(path) for path in plan.output_paths)
            lines.append(f"| {plan.stage.name} | {action} | {reads} | {writes} | " + " | ".join(figures) + " |")
        running = [plan.estimate.seconds for plan in self.plans.values() if plan.runs]
        if running and all(seconds is not None for seconds in running):
            lines.append(f"\nEstimated time: ~{_duration(sum(running))} (calibration took {self.calibration.seconds:.1f} s).")
        return "\n".join(lines)

    def confirm(self) -> bool:
        if self.config.yes:
            return True
        if not sys.stdin.isatty():
            raise UserError("no terminal to confirm the plan on: pass --yes to run it (or set YES = True in run_pipeline.py).")
        return input("Run these steps? [y/N] ").strip().lower() in ("y", "yes")

    def run_steps(self) -> dict[str, float]:
        """Run the planned stages in order; each success is recorded at once, so a failure later loses nothing."""
        seconds: dict[str, float] = {}
        for plan in self.plans.values():
            if not plan.runs:
                continue
            stage = plan.stage
            step_config = (
                dataclasses.replace(plan.config, overwrite=True) if plan.overwrite and hasattr(plan.config, "overwrite") else plan.config
            )
            logger.info("\n=== %s: %s (%s) ===", stage.name, stage.script, plan.reason)
            self.state.update(stage.name, fingerprint=plan.fingerprint, status="running")
            started = time.perf_counter()
            try:
                stage.run(step_config)
            except (Exception, KeyboardInterrupt) as error:
                seconds[stage.name] = time.perf_counter() - started
                print("\n" + self.summary(seconds, (stage.name, "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")))
                if isinstance(error, UserError):
                    raise UserError(
                        f"{stage.script}: {error} (Steps that finished are kept: fix this and rerun run_pipeline.py to resume.)"
                    ) from None
                raise
            seconds[stage.name] = time.perf_counter() - started
            self.state.update(
                stage.name,
                fingerprint=plan.fingerprint,
                status="complete",
                outputs=[str(path) for path in plan.output_paths],
                input=stage.input_identity(plan.config),
                seconds=round(seconds[stage.name], 2),
                estimated_seconds=None if plan.estimate.seconds is None else round(plan.estimate.seconds, 2),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
        return seconds

    # --- summary -------------------------------------------------------------------------------------

    def summary(self, seconds: dict[str, float], stopped: tuple[str, str] | None = None) -> str:
        """What ran, against its estimate, and the key figures each stage reads off its own outputs. `stopped`: the step
        that failed or was interrupted, and which; the steps planned after it did not run, and no figures are read off
        outputs that may be half-written or stale."""
        lines = ["| step | status | estimate | took | outputs |", "|---|---|---|---|---|"]
        after_stop = False
        for plan in self.plans.values():
            name = plan.stage.name
            if stopped and name == stopped[0]:
                status, after_stop = stopped[1], True
            elif after_stop and plan.runs:
                status = "not run"
            else:
                status = "ran" if name in seconds else plan.reason
            estimate = f"~{_duration(plan.estimate.seconds)}" if name in seconds and plan.estimate.seconds is not None else ""
            took = _duration(seconds[name]) if name in seconds else ""
            outputs = "<br>".join(str(path) for path in plan.output_paths if path.exists())
            lines.append(f"| {name} | {status} | {estimate} | {took} | {outputs} |")
        figures = (
            [] if stopped else [figure for plan in self.plans.values() for figure in plan.stage.key_figures(plan.config, plan.outputs)]
        )
        if figures:
            lines += ["", "| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in figures)]
        return "\n".join(lines)


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_pipeline(config: PipelineConfig) -> dict[str, float]:
    """Checks, plan, confirmation, the steps, summary. Returns the seconds each step that ran took."""
    pipeline = Pipeline(config)
    pipeline.prepare()
    print("\n" + pipeline.plan_table() + "\n")
    if config.plan_only:
        return {}
    if not any(plan.runs for plan in pipeline.plans.values()):
        print("Every chosen step is current: nothing to run (--force re-runs them).\n")
        print(pipeline.summary({}))
        return {}
    if not pipeline.confirm():
        print("Nothing was run.")
        return {}
    seconds = pipeline.run_steps()
    print("\n" + pipeline.summary(seconds))
    return seconds
