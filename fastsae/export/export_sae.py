"""Share a trained SAE: one folder with everything a reader needs, ready for `huggingface_hub.upload_folder`.

    README.md                   model card (fastsae/export/model_card.py)
    SAE_M=256_K=8.pt            the checkpoint, copied as it is (HypotheSAEs' format for Top-K/BatchTopK; our metadata under `fastsae`)
    blocks.12.hook_resid_post/  SAELens: cfg.json, sae_weights.safetensors, sparsity.safetensors
    eval.json  feature_density.png  metrics.json  training_curves.png  interpretations.csv   when they exist
    neuronpedia/                with NEURONPEDIA: Neuronpedia's upload files (fastsae/export/neuronpedia.py)

The SAELens files go in a subfolder named after the hook, not in the root: SAELens' Hub loader,
`SAE.from_pretrained(repo_id, sae_id)`, downloads `{sae_id}/cfg.json`, as its own releases keep
one folder per hook (`blocks.8.hook_resid_pre/`). The other files sit in the root, so one repo holds
one export: another SAE's, pushed there, would replace its card and checkpoint. Locally, `SAE.load_from_disk` takes the same folder.

The folder is built under a temp name and renamed when complete, so a failure leaves no half
export (and an earlier export stays as it was). A push that cannot reach the Hub stops with one
message and keeps the folder, to be pushed later.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from fastsae.common.atomic_files import replace_folder_atomically
from fastsae.common.config import setting
from fastsae.common.default_paths import DEFAULT_CHECKPOINT, DEFAULT_INTERPRETATIONS
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.core.checkpoint import HYPOTHESAES_DEAD_AFTER_STEPS, save_checkpoint
from fastsae.core.formats.saelens import CONFIG_FILE
from fastsae.core.formats.sources import results_folder
from fastsae.core.saelens_export import write_saelens_folder
from fastsae.core.trained_sae import TrainedSAE, open_trained_sae
from fastsae.evaluate.evaluate_sae import DENSITY_PLOT_FILE, EVAL_FILE
from fastsae.export.model_card import EXPORT_TAG, CardInputs, render_model_card
from fastsae.export.neuronpedia import NEURONPEDIA_FOLDER, NeuronpediaSettings, check_model_id, check_set_name, write_neuronpedia
from fastsae.interpret.interpret_sae import read_interpretations
from fastsae.train.training_report import CURVES_FILE, METRICS_FILE, SAELENS_EXPORT_FOLDER

logger = logging.getLogger(__name__)

# Written by the training step and evaluate_sae.py beside the checkpoint; copied when there.
COMPANION_FILES = (EVAL_FILE, DENSITY_PLOT_FILE, METRICS_FILE, CURVES_FILE)
TRAINING_SPARSITY = Path(SAELENS_EXPORT_FOLDER) / "sparsity.safetensors"  # the training step's export, from its validation tokens


@dataclass
class ExportConfig:
    checkpoint: str = setting(DEFAULT_CHECKPOINT, "SAE checkpoint written by train_sae.py")
    output: str = setting(
        "", "the export folder (replaced if it holds an earlier export); empty: export/ in the SAE's folder, beside its eval.json"
    )
    interpretations: str = setting(
        DEFAULT_INTERPRETATIONS, "interpretations.csv written by interpret_sae.py for this SAE; empty or missing: none"
    )
    push_to_hub: str = setting("", "Hugging Face repo id (user/name) to push the folder to; empty: export only")
    private: bool = setting(True, "create the repo private (an existing repo keeps its visibility)")
    neuronpedia: bool = setting(
        False,
        "also write Neuronpedia's upload files in neuronpedia/: every feature's top activating windows and windows drawn from its "
        "activation intervals, logit lens, density and explanation (reads the training store and the model)",
    )
    neuronpedia_set: str = setting(
        "", "Neuronpedia source set name (letters, digits, hyphens); the SAE becomes source <layer>-<set>; empty: fastsae-<hook>-<M>"
    )
    neuronpedia_model: str = setting(
        "", "the model's id on Neuronpedia (neuronpedia.org/<id>), e.g. gemma-2-2b; empty: its name without the organisation, lower-case"
    )
    neuronpedia_examples: int = setting(20, "top activating windows per feature in the Neuronpedia files (SAEDashboard's default: 20)")
    store: str = setting("", "activation store the Neuronpedia files are read from; empty: the one the checkpoint was trained on")
    model_name: str = setting("", "model whose tokenizer and unembedding the Neuronpedia files use; empty: the one the checkpoint names")
    device: str = setting("auto", "where the Neuronpedia files are computed: auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check_set_name(self.neuronpedia_set)
        check_model_id(self.neuronpedia_model)
        if self.neuronpedia_examples < 1:
            raise UserError(f"NEURONPEDIA_EXAMPLES must be at least 1, not {self.neuronpedia_examples}.")
        if self.push_to_hub:
            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError as error:
                raise UserError(
                    f"PUSH_TO_HUB {self.push_to_hub!r} is not a Hub repo id ({error}). Use the form your-name/sae-name."
                ) from None

    def output_folder(self) -> Path:
        return Path(self.output) if self.output else results_folder(self.checkpoint) / "export"


def _why_not_replace(folder: Path) -> str | None:
    """Why OUTPUT must not be replaced; None when it may: a new or empty folder, or an earlier export holding nothing else
    (a git clone of the pushed repo keeps its .git there). Never a file or a folder of the user's."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "is not an earlier export"
    entries = list(folder.iterdir())
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if entries and not ("library_name: saelens" in text and f"- {EXPORT_TAG}\n" in text):
        return "is not an earlier export"
    others = sorted(entry.name for entry in entries if not _written_by_export(entry))
    if others:
        return f"holds an earlier export, but also {', '.join(others[:5])}, which the export does not write"
    return None


def _written_by_export(entry: Path) -> bool:
    """Whether an export writes a file or folder of this name at its top level."""
    if entry.is_dir():
        return entry.name == NEURONPEDIA_FOLDER or (entry / CONFIG_FILE).is_file()  # Neuronpedia's files, a SAELens folder
    return entry.suffix == ".pt" or entry.name in {"README.md", "interpretations.csv", *COMPANION_FILES}


def _evaluation_of(trained: TrainedSAE) -> dict[str, Any] | None:
    """eval.json beside the checkpoint; None when there is none. One written about other weights is refused (see
    `TrainedSAE.read_result`), and so is one from before the fingerprint was recorded whose checkpoint state (step, ...)
    is not the checkpoint's: the card would show its numbers, and SAELens' sparsity its densities, as this SAE's."""
    evaluation = trained.read_result(EVAL_FILE)
    if evaluation is None:
        logger.info("No eval.json beside the checkpoint: the model card says it was not evaluated.")
        return None
    info = trained.info
    state = {"step": info.step, "tokens_trained": info.tokens_trained, "training_finished": info.training_finished}
    evaluated_state = evaluation.get("checkpoint_state", state)  # eval.json from before these were recorded: trusted
    if evaluated_state != state:
        raise UserError(
            f"{trained.results_folder / EVAL_FILE} describes the SAE at step {evaluated_state.get('step')}, and {trained.checkpoint} "
            f"holds it at step {info.step}, so its numbers are not this SAE's. Rerun `python evaluate_sae.py --checkpoint "
            f"{trained.checkpoint}`, then export again."
        )
    return evaluation


def _write_export(folder: Path, checkpoint: str, config: ExportConfig) -> None:
    """Everything into `folder` (a fresh temp folder): Neuronpedia files, SAELens subfolder, checkpoint, companions, card last.

    Our own checkpoint is copied as it is; an SAE another library made is written as one of ours (HypotheSAEs' format
    where HypotheSAEs runs it), so the export reads the same whatever the SAE's origin.
    """
    trained = open_trained_sae(checkpoint)
    info, source = trained.info, trained.results_folder
    if info.training_finished is False:  # the card and cfg.json would present it as the trained SAE its settings describe
        raise UserError(
            f"{checkpoint} was saved before its training finished (at step {info.step}), so it is not exported. "
            "Rerun train_sae.py with the same settings to finish it, then export."
        )
    hook_name = info.hook_name
    if not hook_name:
        raise UserError(
            f"{checkpoint} does not record the hook it reads ({info.source_format}'s file): the export names its SAELens folder and "
            "model card after it. Export an SAE whose format records its hook (ours, SAELens', sparsify's)."
        )
    interpretations = read_interpretations(config.interpretations, trained.sae)
    evaluation = _evaluation_of(trained)
    if config.neuronpedia:  # first: the slow part, and the one that needs the store and the model
        settings = NeuronpediaSettings(
            config.neuronpedia_set,
            config.neuronpedia_model,
            config.neuronpedia_examples,
            config.store,
            config.model_name,
            resolve_device(config.device),
        )
        write_neuronpedia(folder, trained, interpretations, settings)
    # SAELens' sparsity: the evaluation's feature density (the numbers on the card), else the training export's.
    frequency = torch.tensor(evaluation["feature_density"]) if evaluation else None
    write_saelens_folder(trained.sae, info, folder / hook_name, frequency)
    # Else the sparsity training exported (ours), or the one a SAELens folder holds beside its weights.
    sparsity = next((path for path in (source / TRAINING_SPARSITY, source / TRAINING_SPARSITY.name) if path.is_file()), None)
    if frequency is None and sparsity is not None:
        shutil.copy2(sparsity, folder / hook_name / TRAINING_SPARSITY.name)
    ours = info.trained_by_fastsae
    checkpoint_name = Path(checkpoint).name if ours else f"{info.spec.name}.pt"
    if ours:
        shutil.copy2(checkpoint, folder / checkpoint_name)
    else:
        save_checkpoint(folder / checkpoint_name, trained.sae, HYPOTHESAES_DEAD_AFTER_STEPS, info)
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if interpretations is not None:
        shutil.copy2(config.interpretations, folder / "interpretations.csv")
    files = sorted([path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()] + ["README.md"])
    card = render_model_card(CardInputs(info, checkpoint_name, hook_name, files, evaluation, interpretations, config.push_to_hub))
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_export(config: ExportConfig) -> Path:
    """Build the export under `<folder>.partial`, then swap it in; on any failure the partial folder is removed."""
    checkpoint = config.checkpoint
    folder = config.output_folder()
    reason = _why_not_replace(folder)
    if reason:
        raise UserError(f"{folder} exists and {reason}: it would be replaced. Set OUTPUT (--output) to a new or empty folder.")
    replace_folder_atomically(folder, lambda partial: _write_export(partial, checkpoint, config))
    logger.info("Exported %s to %s (%d files)", checkpoint, folder, sum(path.is_file() for path in folder.rglob("*")))
    return folder


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises: a ConnectionError (huggingface_hub's offline mode is one), a timeout,
    or a transport error of the HTTP client huggingface_hub uses (httpx2 from its version 2, httpx in 1)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    errors += [importlib.import_module(client).TransportError for client in ("httpx2", "httpx") if importlib.util.find_spec(client)]
    return tuple(errors)


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """create_repo + upload_folder; returns the repo's URL. Any failure is one UserError, and `folder` stays."""
    keep = (
        f"The export is complete in {folder}: push it later with `hf upload {repo_id} {shlex.quote(str(folder))} .`, "
        f"or rerun with --push-to-hub {repo_id}"
    )  # quoted: a folder with a space ("My Drive") would split the command
    login = "log in with `hf auth login` (or set HF_TOKEN) with a token that can write to it"
    try:
        url = create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=f"Upload {folder.name} (fastsae export)")
    except OfflineModeIsEnabled:
        raise UserError(
            f"cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE is set). Unset HF_HUB_OFFLINE on a machine with a network. {keep}."
        ) from None
    except LocalTokenNotFoundError:
        raise UserError(f"no Hugging Face token to push to {repo_id}: {login}. {keep}.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        fix = login if status in (401, 403) else "check the repo id and your access to it"
        raise UserError(f"the Hugging Face Hub refused the push to {repo_id} (HTTP {status}): {fix}. {keep}.") from None
    except _connection_errors() as error:
        raise UserError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: {error}). "
            f"Connect to a network (or fix HF_ENDPOINT / the proxy settings). {keep}."
        ) from None
    logger.info("Pushed %s to %s", folder, url)
    return str(url)


def export_sae(config: ExportConfig) -> Path:
    """Write the export folder, then push it when PUSH_TO_HUB names a repo."""
    folder = write_export(config)
    if config.push_to_hub:
        push_to_hub(folder, config.push_to_hub, config.private)
    return folder
