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

import dataclasses
import importlib
import importlib.util
import json
import logging
import runpy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastsae.common.atomic_files import write_json_atomically
from fastsae.common.config import config_fingerprint, parse_step_config, setting
from fastsae.common.errors import UserError
from fastsae.store.manifest import MANIFEST, StoreManifest

if TYPE_CHECKING:
    from fastsae.pipeline.preflight import Calibration, Corpus

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
}


@dataclass(frozen=True)
class Step:
    """One step: its script, where its config class and function live, and the constant naming its input."""

    name: str
    script: str
    module: str
    config_class: str
    function: str
    input_constant: str
    upstream: str | None  # the step whose output is this step's input, when the constants chain


STEPS = (
    Step(
        "extract", "extract_activations.py", "fastsae.extract.extract_activations", "ExtractConfig", "extract_activations", "DATASET", None
    ),
    Step("train", "train_sae.py", "fastsae.train.train_sae", "TrainConfig", "train_saes", "STORE", "extract"),
    Step("evaluate", "evaluate_sae.py", "fastsae.evaluate.evaluate_sae", "EvalConfig", "evaluate_sae", "CHECKPOINT", "train"),
    Step("interpret", "interpret_sae.py", "fastsae.interpret.interpret_sae", "InterpretConfig", "interpret_sae", "CHECKPOINT", "train"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


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
    """What the pipeline knows and decides about one step."""

    step: Step
    config: Any
    selected: bool
    input: Path
    outputs: list[Path] = field(default_factory=list)
    linked: bool = False  # its input is what its upstream step writes
    fingerprint: str = ""
    action: str = ""  # run, skip, or "-" (not selected)
    reason: str = ""
    overwrite: bool = False
    examples: int | None = None
    tokens: int | None = None
    store_bytes: int | None = None
    seconds: float | None = None  # estimated
    note: str = ""

    @property
    def runs(self) -> bool:
        return self.action == "run"


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


def load_step_config(step: Step, scripts_dir: Path) -> Any:
    """The step's config from its script's constants; the script's `__main__` block does not run."""
    path = scripts_dir / step.script
    if not path.is_file():
        raise UserError(f"{path} not found: SCRIPTS_DIR must be the folder that holds the four step scripts (the repository root).")
    namespace = runpy.run_path(str(path), run_name="fastsae_pipeline")
    constants = {name: value for name, value in namespace.items() if name.isupper()}
    config_class = getattr(importlib.import_module(step.module), step.config_class)
    return parse_step_config(config_class, constants, namespace.get("__doc__") or "", argv=[])


def outputs_exist(plan: StepPlan) -> bool:
    """Every output is there; a store only counts once its manifest says it is complete."""
    for path in plan.outputs:
        if plan.step.name == "extract":
            manifest = StoreManifest.read(path / MANIFEST)
            if manifest is None or not manifest.is_complete:
                return False
        elif not path.exists():
            return False
    return True


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


class Pipeline:
    """One run of run_pipeline.py, in the order it happens."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.state = PipelineState(Path(STATE_FILE))
        self.plans: dict[str, StepPlan] = {}
        self.calibration: Calibration | None = None

    def check(self, name: str, result: str) -> None:
        logger.info("check %-9s %s", name, result)

    # --- checks, chain and decisions ------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the plan is printed; any problem stops here, before a step has run."""
        self.check("packages", check_packages())
        from fastsae.lm.data import load_dataset
        from fastsae.pipeline import preflight

        selected = self.config.selected()
        configs = {step.name: load_step_config(step, Path(self.config.scripts_dir)) for step in STEPS}
        self.plans = {
            step.name: StepPlan(step, configs[step.name], step.name in selected, _input_path(configs[step.name], step.input_constant))
            for step in STEPS
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
        self._check_machine(preflight)

    def _link(self, preflight) -> None:
        """Each step's outputs, and whether a step's input is its upstream's output; checks the model on the way."""
        from fastsae.extract.extract_activations import store_folder, store_names
        from fastsae.lm.lora import LORA_HOOK_POINT
        from fastsae.lm.models import resolve_model
        from fastsae.train.train_sae import checkpoint_path, run_folder

        extract, train = self.plans["extract"], self.plans["train"]
        hooks = store_names(extract.config)
        extract.outputs = [store_folder(extract.config, resolve_model(extract.config.model_name).slug, hook) for hook in hooks]
        train.linked = any(_same_path(train.input, folder) for folder in extract.outputs)
        # The model is the extraction's, unless training reads another, existing store: then that store's.
        other_store = None if train.linked else self._store_manifest(train.input)
        uses_extraction_model = other_store is None or not other_store.model_name
        model_name = extract.config.model_name if uses_extraction_model else other_store.model_name
        layers_read = extract.config.layers if uses_extraction_model and extract.config.hook_point != LORA_HOOK_POINT else []
        self.model = preflight.check_model(model_name, layers_read)
        self.check("model", self.model.describe())
        self.specs = train.config.specs(self.model.d)
        if train.linked:
            hook = next(hook for hook, folder in zip(hooks, extract.outputs) if _same_path(train.input, folder))
            folder = run_folder(train.config, self.model.source.slug, hook)
            train.outputs = [checkpoint_path(folder, spec) for spec in self.specs]
        elif other_store is not None:
            folder = run_folder(train.config, other_store.model, other_store.hook_name)
            train.outputs = [checkpoint_path(folder, spec) for spec in self.specs]
        for name in ("evaluate", "interpret"):
            plan = self.plans[name]
            plan.linked = any(_same_path(plan.input, path) for path in train.outputs)
        self.plans["evaluate"].outputs = [
            Path(checkpoint).parent / name
            for checkpoint in self.plans["evaluate"].config.checkpoint
            for name in ("eval.json", "feature_density.png")
        ]
        interpretations = Path(self.plans["interpret"].config.interpretations_path)
        self.plans["interpret"].outputs = [interpretations, interpretations.with_name("dashboard.html")]

    def _check_machine(self, preflight) -> None:
        """Device and dtype, the estimates (with the calibration), free disk against the store, and the API key."""
        extract, train = self.plans["extract"], self.plans["train"]
        device = extract.config.resolved_device()
        self.check("device", preflight.describe_device(device, extract.config.resolved_compute_dtype(), train.config.uses_bfloat16()))
        self._estimate(preflight)
        if extract.runs:
            if extract.store_bytes is None:
                self.check("disk", "store size unknown until the model is downloaded; extraction checks free disk before it writes")
            else:
                on_disk = sum(
                    path.stat().st_size for folder in extract.outputs if folder.exists() for path in folder.rglob("*") if path.is_file()
                )
                self.check("disk", preflight.check_disk(Path(extract.config.output_dir), max(0, extract.store_bytes - on_disk)))
        else:
            self.check("disk", "extraction does not run: nothing new to store")
        interpret = self.plans["interpret"]
        if interpret.selected:
            self.check("API key", preflight.describe_api_key(interpret.config, self._explained_features()))

    def _store_manifest(self, folder: Path) -> StoreManifest | None:
        return StoreManifest.read(folder / MANIFEST)

    def _check_chain(self) -> None:
        """Each selected step's input is written by the step before it, or exists; otherwise say which constant to change."""
        for plan in self.plans.values():
            if not plan.selected or plan.step.upstream is None:
                continue
            upstream = self.plans[plan.step.upstream]
            constant = f"{plan.step.input_constant} in {plan.step.script}"
            if plan.linked and not upstream.selected and not outputs_exist(upstream):
                raise UserError(
                    f"{plan.step.script} reads {plan.input} ({constant}), which {upstream.step.script} has not written yet. "
                    f"Include the {upstream.step.name} step (see --steps and --from)."
                )
            if not plan.linked and not plan.input.exists():
                fix = (
                    f"Set {plan.step.input_constant} = {str(upstream.outputs[0])!r} in {plan.step.script}"
                    if upstream.outputs
                    else f"Point {constant} at an existing one"
                )
                raise UserError(
                    f"{constant} is {str(plan.input)!r}, which does not exist and is not what {upstream.step.script} writes. {fix}."
                )

    def _decide(self) -> None:
        """Fingerprint each step (its settings + its upstream's) and decide: skip when current, else run (and how)."""
        for plan in self.plans.values():
            settings = {key: value for key, value in dataclasses.asdict(plan.config).items() if key != "overwrite"}
            upstream = self._upstream_fingerprint(plan)
            extra = {"dataset": self.dataset.fingerprint()} if plan.step.name == "extract" and self.dataset else {}
            plan.fingerprint = config_fingerprint({"settings": settings, "upstream": upstream, **extra})
            plan.action, plan.reason, plan.overwrite = self._decision(plan, self.state.record(plan.step.name))

    def _upstream_fingerprint(self, plan: StepPlan) -> str | None:
        """What the input will hold: the upstream's new fingerprint if it is selected, else the one on record."""
        if not plan.linked:
            return None
        upstream = self.plans[plan.step.upstream]
        if upstream.selected:
            return upstream.fingerprint
        record = self.state.record(upstream.step.name)
        return record["fingerprint"] if record else None

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
        if not outputs_exist(plan):
            return "run", "outputs missing", False
        return "skip", "current", False

    # --- estimates ---------------------------------------------------------------------------------

    def _estimate(self, preflight) -> None:
        """Counts from the tokenized data (or the store), times from a short calibration on this machine."""
        from fastsae.interpret.interpret_sae import estimate_llm_cost
        from fastsae.lm.models import load_tokenizer
        from fastsae.store.activation_store import ActivationStore, bytes_per_token

        extract, train = self.plans["extract"], self.plans["train"]
        if not any(plan.runs for plan in self.plans.values()):
            return
        if extract.runs:
            tokenizer = load_tokenizer(self.model.source)
            corpus = preflight.corpus_from_dataset(tokenizer, self.dataset, extract.config)
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        elif (manifest := self._store_manifest(train.input)) is not None and manifest.is_complete:
            corpus, pad_token_id = preflight.corpus_from_store(ActivationStore(train.input)), 0
        else:
            return  # nothing to count yet: the plan says "unknown"
        self.calibration = self._calibrate(preflight, corpus, pad_token_id)
        calibration = self.calibration
        extract.examples, extract.tokens = len(corpus.lengths), corpus.n_tokens
        extract.store_bytes = corpus.n_tokens * len(extract.config.layers) * bytes_per_token(self.model.d, extract.config.storage_dtype)
        extract.seconds = _seconds(calibration.load_seconds, corpus.n_tokens, calibration.cut_tokens_per_second)
        self._estimate_training(corpus)
        self._estimate_evaluation(corpus)
        interpret = self.plans["interpret"]
        interpret.examples, interpret.tokens = len(corpus.lengths), corpus.n_tokens
        interpret.seconds = _seconds(calibration.load_seconds, corpus.n_tokens, calibration.encode_tokens_per_second)
        features = self._explained_features()
        cost = estimate_llm_cost(interpret.config, features)
        interpret.note = (
            f"+ {features} features ({interpret.config.scoring}): at most {cost.describe()}" if features else "explanations skipped"
        )

    def _estimate_training(self, corpus: Corpus) -> None:
        from fastsae.store.batches import ExampleSplit
        from fastsae.train.train_sae import training_steps

        train = self.plans["train"]
        config = train.config
        in_training = ~ExampleSplit.by_example(len(corpus.lengths), config.validation_fraction, config.seed).is_validation
        n_train_tokens = int((corpus.lengths if config.include_special_tokens else corpus.content)[in_training].sum())
        steps = training_steps(config, n_train_tokens)
        train.examples, train.tokens = int(in_training.sum()), steps * config.batch_size
        train.seconds = steps * self.calibration.sae_step_seconds if self.calibration.sae_step_seconds is not None else None
        train.note = f"{steps} steps; an upper bound (early stopping may end sooner)"

    def _estimate_evaluation(self, corpus: Corpus) -> None:
        """Our store metrics on every held-out token; the model on a budget of them: one clean forward, then, from the hooked
        block on, the zero-ablated pass and one pass per checkpoint (a rerun on the same store reuses the first two)."""
        from fastsae.evaluate.evaluate_sae import validation_examples
        from fastsae.evaluate.model_metrics import budgeted_examples

        evaluate, train, extract = self.plans["evaluate"], self.plans["train"], self.plans["extract"]
        config = evaluate.config
        fraction = config.validation_fraction if config.validation_fraction >= 0 else train.config.validation_fraction
        seed = config.seed if config.seed >= 0 else train.config.seed
        examples = validation_examples(len(corpus.lengths), fraction, seed) if fraction > 0 else []
        store_examples = examples[: config.max_examples] if config.max_examples else examples
        tokens = int(corpus.lengths[store_examples].sum())
        evaluate.examples, evaluate.tokens = len(store_examples), tokens
        calibration = self.calibration
        encode = _seconds(None, tokens * len(config.checkpoint), calibration.encode_tokens_per_second)
        model = 0.0
        if config.model_metrics:
            model_tokens = (
                int(corpus.lengths[budgeted_examples(corpus.lengths, examples, config.model_tokens, seed)].sum()) if examples else 0
            )
            from_hook = (self.model.n_layers - max(extract.config.layers)) / self.model.n_layers
            forwards = 1 + (1 + len(config.checkpoint)) * from_hook
            model = _seconds(calibration.load_seconds, int(forwards * model_tokens), calibration.full_tokens_per_second)
            evaluate.note = f"model on {model_tokens:,} tokens: 1 forward + {1 + len(config.checkpoint)} from the hooked block"
        else:
            evaluate.note = "store metrics only"
        evaluate.seconds = None if encode is None or model is None else encode + model

    def _calibrate(self, preflight, corpus: Corpus, pad_token_id: int) -> Calibration:
        """Time only what will run: the model when extraction, evaluation or interpretation runs, the SAE when any later step does."""
        from fastsae.lm.lora import LORA_HOOK_POINT

        calibration = preflight.Calibration()
        extract, train = self.plans["extract"], self.plans["train"]
        started = time.perf_counter()
        needs_model = extract.runs or any(self.plans[name].runs for name in ("evaluate", "interpret"))
        if needs_model and self.model.availability != "download":
            config = extract.config
            device = config.resolved_device()
            residual = config.hook_point != LORA_HOOK_POINT  # a LoRA capture runs every block: time the whole stack
            layers = config.layers if residual and (train.linked or extract.selected) else [self.model.n_layers - 1]
            preflight.calibrate_model(
                calibration,
                self.model.source,
                config.resolved_compute_dtype(),
                device,
                corpus.sample,
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
            preflight.calibrate_sae(
                calibration, self.specs, config.batch_size, config.resolved_device(), config.uses_bfloat16(), config.aux_coefficient
            )
            logger.info(
                "calibration: %s at batch %d: %.1f ms per training step; encoding %.0f tokens/s",
                ", ".join(spec.name for spec in self.specs),
                config.batch_size,
                1000 * calibration.sae_step_seconds,
                calibration.encode_tokens_per_second,
            )
        calibration.seconds = time.perf_counter() - started
        return calibration

    def _explained_features(self) -> int:
        """How many features interpretation will ask the LLM about (estimate_llm_cost prices them); 0 when explanations are skipped."""
        from fastsae.interpret.llm import api_key

        interpret = self.plans["interpret"]
        if not interpret.config.explain or api_key() is None:
            return 0
        m = next((spec.m for spec, path in zip(self.specs, self.plans["train"].outputs) if _same_path(path, interpret.input)), None)
        features = interpret.config.features
        try:
            if features == "all" or ":" in features:
                count = m if features == "all" else int(features.split(":", 1)[1])
                count = min(count, m) if m is not None else count
            else:
                count = len([int(part) for part in features.split(",") if part.strip()])
        except ValueError:
            raise UserError(
                f"FEATURES in interpret_sae.py is {features!r}: use all, frequency:N, label:N, random:N or a list like 3,17,42."
            ) from None
        return count

    # --- plan, confirmation, running -----------------------------------------------------------------

    def plan_table(self) -> str:
        from fastsae.pipeline.preflight import format_bytes

        lines = ["| step | action | reads | writes | examples | tokens | store size | estimate |", "|---|---|---|---|---|---|---|---|"]
        for plan in self.plans.values():
            action = f"{plan.action} ({plan.reason})"
            figures = ["", "", "", ""]
            if plan.runs:
                figures = [
                    _count(plan.examples),
                    _count(plan.tokens),
                    format_bytes(plan.store_bytes) if plan.store_bytes is not None else "",
                    (f"~{_duration(plan.seconds)}" if plan.seconds is not None else "unknown") + (f"; {plan.note}" if plan.note else ""),
                ]
            writes = "<br>".join(str(path) for path in plan.outputs)
            lines.append(f"| {plan.step.name} | {action} | {plan.input} | {writes} | " + " | ".join(figures) + " |")
        running = [plan for plan in self.plans.values() if plan.runs]
        if running and all(plan.seconds is not None for plan in running):
            lines.append(
                f"\nEstimated time: ~{_duration(sum(plan.seconds for plan in running))} (calibration took {self.calibration.seconds:.1f} s)."
            )
        return "\n".join(lines)

    def confirm(self) -> bool:
        if self.config.yes:
            return True
        if not sys.stdin.isatty():
            raise UserError("no terminal to confirm the plan on: pass --yes to run it (or set YES = True in run_pipeline.py).")
        return input("Run these steps? [y/N] ").strip().lower() in ("y", "yes")

    def run_steps(self) -> dict[str, float]:
        """Run the planned steps in order; each success is recorded at once, so a failure later loses nothing."""
        seconds: dict[str, float] = {}
        for plan in self.plans.values():
            if not plan.runs:
                continue
            function = getattr(importlib.import_module(plan.step.module), plan.step.function)
            step_config = (
                dataclasses.replace(plan.config, overwrite=True) if plan.overwrite and hasattr(plan.config, "overwrite") else plan.config
            )
            logger.info("\n=== %s: %s (%s) ===", plan.step.name, plan.step.script, plan.reason)
            self.state.update(plan.step.name, fingerprint=plan.fingerprint, status="running")
            started = time.perf_counter()
            try:
                function(step_config)
            except UserError as error:
                raise UserError(
                    f"{plan.step.script}: {error} (Steps that finished are kept: fix this and rerun run_pipeline.py to resume.)"
                ) from None
            seconds[plan.step.name] = time.perf_counter() - started
            self.state.update(
                plan.step.name,
                fingerprint=plan.fingerprint,
                status="complete",
                outputs=[str(path) for path in plan.outputs],
                seconds=round(seconds[plan.step.name], 2),
                estimated_seconds=None if plan.seconds is None else round(plan.seconds, 2),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
        return seconds

    # --- summary -------------------------------------------------------------------------------------

    def summary(self, seconds: dict[str, float]) -> str:
        lines = ["| step | status | estimate | took | outputs |", "|---|---|---|---|---|"]
        for plan in self.plans.values():
            status = "ran" if plan.step.name in seconds else plan.reason
            estimate = f"~{_duration(plan.seconds)}" if plan.step.name in seconds and plan.seconds is not None else ""
            took = _duration(seconds[plan.step.name]) if plan.step.name in seconds else ""
            outputs = "<br>".join(str(path) for path in plan.outputs if path.exists())
            lines.append(f"| {plan.step.name} | {status} | {estimate} | {took} | {outputs} |")
        figures = self.key_figures()
        if figures:
            lines += ["", "| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in figures)]
        return "\n".join(lines)

    def key_figures(self) -> list[tuple[str, str]]:
        """Read off the outputs themselves: the store manifest, metrics.json, eval.json and interpretations.csv."""
        figures: list[tuple[str, str]] = []
        for folder in self.plans["extract"].outputs:
            manifest = self._store_manifest(folder)
            if manifest is not None and manifest.is_complete:
                figures.append((f"tokens ({manifest.hook_name})", f"{manifest.n_tokens:,} in {manifest.n_examples:,} examples"))
        for checkpoint in self.plans["train"].outputs:
            metrics_path = checkpoint.parent / "metrics.json"
            if metrics_path.exists():
                final = json.loads(metrics_path.read_text())["final"]
                if final:
                    figures.append(
                        (
                            f"{checkpoint.stem}: validation FVU / L0 / dead",
                            f"{final['fvu']:.4f} / {final['l0']:.1f} / {final['dead_fraction']:.1%}",
                        )
                    )
        eval_path = self.plans["evaluate"].outputs[0]
        if eval_path.exists():
            core = json.loads(eval_path.read_text()).get("saebench_core")
            score = core["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] if core else None
            figures.append(("SAEBench ce_loss_score (loss recovered)", f"{score:.4f}" if core else "not measured (MODEL_METRICS off)"))
        csv_path = self.plans["interpret"].outputs[0]
        if csv_path.exists():
            import pandas as pd

            rows = pd.read_csv(csv_path)
            explained = rows["explanation"].dropna()
            ratings = rows["fast_rubric_rating"].dropna().astype(int)
            if len(explained):
                means = [(name, rows[f"{name}_score"].dropna()) for name in ("detection", "fuzzing")]
                mean = "".join(f", mean {name} {scores.mean():.3f} ({len(scores)} scored)" for name, scores in means if len(scores))
                figures.append(("explained features", f"{len(explained)} of {len(rows)}{mean}"))
            elif not len(ratings):
                figures.append(("explained features", f"0 of {len(rows)} (explanations skipped)"))
            if len(ratings):
                figures.append(("FAST rubric, rated 4-5", f"{(ratings >= 4).mean():.1%} of {len(ratings)} rated features"))
        return figures


def _input_path(config, constant: str) -> Path:
    """The step's input; for a list (evaluation's sweep of checkpoints) the first, which decides the chain."""
    value = getattr(config, constant.lower())
    return Path(value[0] if isinstance(value, list) else value)


def _seconds(load: float | None, tokens: int, tokens_per_second: float | None) -> float | None:
    if tokens_per_second is None:
        return None
    return (load or 0.0) + tokens / tokens_per_second


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
