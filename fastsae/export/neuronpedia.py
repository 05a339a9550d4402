"""Neuronpedia's upload files for an exported SAE: every feature's activation examples, logit lens, density and explanation.

    neuronpedia/
      batch-0.json  batch-1.json  …   128 features a file, in the layout SAEDashboard's NeuronpediaRunner writes
      explanations.json              interpretations.csv's LLM explanations, when it has any

Neuronpedia imports an SAE's dashboards from SAEDashboard's batch files: its neuronpedia-utils
script `convert-saedashboard-to-neuronpedia-export.py` reads every `batch-*` file of a folder. So the
batches take that layout key for key (`NeuronpediaDashboardBatch.to_dict()` in sae-dashboard 0.8.0:
`model_id`, `layer`, `sae_set`, `sae_id_suffix`, `features`), and their numbers follow SAEDashboard's
definitions wherever one applies:

- Activations are the SAE's, as SAELens' `encode` computes them on the exported folder (and as
  interpretations.csv and dashboard.html show them). SAEDashboard's runner first folds the decoder
  norms into the encoder (SAELens' `fold_W_dec_norm`), which SAELens refuses for a Top-K SAE like ours
  (`rescale_acts_by_decoder_norm` false), so for Top-K there is no folded scale to follow; for a ReLU or
  JumpReLU SAE the folded values would be ours times 1 / the activation scale, the same for every feature.
- Logit lens (`pos_str`/`pos_values`, `neg_str`/`neg_values`, 10 each): the unit decoder direction
  (a decoder row after that fold) through the unembedding as TransformerLens prepares it for
  SAEDashboard (the final norm's gain folded in, centred over the vocabulary).
- Top activations form one group, as SAEDashboard's "TOP ACTIVATIONS" group: `bin_min` and
  `bin_contains` -1, `bin_max` the feature's maximum; `qualifying_token_index` is the strongest token.
- Interval groups follow it, as SAEDashboard's "INTERVAL" groups with its NeuronpediaRunner's defaults
  (`n_quantiles` 5, `quantile_group_size` 5): [0, the feature's maximum] cut into 5 equal closed
  intervals, listed highest first, each with 5 examples drawn uniformly without replacement from what
  lies in it (seeded: a rerun writes the same files), tagged with `bin_min` and `bin_max` its edges and
  `bin_contains` the share of the store in it. Where the feature is silent its activation is 0, so the
  lowest interval also holds and draws from the silent part of the store; an empty interval has no group.
- Values are rounded to 3 decimals, as SAEDashboard rounds them; `bin_contains` to 5, as its "CONTAINS
  12.345%" title writes it.

What differs, and why: the examples are interpret_sae.py's windows (32 tokens cut as delphi cuts them,
one per region, special tokens never counted unless training saw them), not 128-token prompts, so the
intervals hold windows, by their activation (their maximum), where SAEDashboard's hold tokens, and an
interval's examples are listed strongest first rather than in the order drawn; the density
`frac_nonzero` is over the store's counted tokens; the activation histogram (`freq_hist_data_*`) is
interpretation's log-spaced one (8 bins a decade, the bars at their geometric centres, empty bins left
out), which a single pass can keep. Neuron alignment, correlations, the logit histogram, the
decoder-weight distribution and `vector` need data we do not compute: empty.

SAEDashboard's batches have no place for explanations; explanations.json holds them with the fields
of the `neuronpedia` package's `Explanation` (modelId, source, index, text), which its
`Source.upload_batch` sends with each feature.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fastsae.common.atomic_files import scratch_folder
from fastsae.common.errors import UserError
from fastsae.core.sae_info import SAEInfo
from fastsae.core.saelens_export import saelens_config
from fastsae.core.trained_sae import LanguageModel, TrainedSAE
from fastsae.export.interval_groups import IntervalSample
from fastsae.interpret.features import HISTOGRAM_EDGES, FeatureStatistics, collect_feature_statistics, logit_lens, unembedding_matrix
from fastsae.interpret.windows import Window, WindowGrid, WindowReservoir, iter_window_activations, read_windows
from fastsae.store.activation_store import ActivationStore

logger = logging.getLogger(__name__)

NEURONPEDIA_FOLDER = "neuronpedia"  # in the export folder
EXPLANATIONS_FILE = "explanations.json"
FEATURES_PER_BATCH = 128  # SAEDashboard's n_features_at_a_time; also the most the neuronpedia package uploads in one request
WINDOW_TOKENS = 32  # interpret_sae.py's default WINDOW_TOKENS (delphi's example_ctx_len), so the examples match the CSV's
LOGIT_TOKENS = 10  # SAEDashboard's logits table: 10 promoted and 10 suppressed tokens
DECIMALS = 3  # SAEDashboard rounds every value to 3 decimals
INTERVAL_EXAMPLES = 5  # its quantile_group_size: windows drawn from each interval
INTERVAL_SEED = 0  # the draws are seeded, so a rerun writes the same files
CONTAINS_DECIMALS = 5  # SAEDashboard writes an interval's share as a percentage to 3 decimals
# Where each bar of interpretation's log-spaced histogram stands: the geometric centre of its bin.
HISTOGRAM_CENTRES = (HISTOGRAM_EDGES[:-1].double() * HISTOGRAM_EDGES[1:].double()).sqrt().numpy()
SET_NAME = re.compile(r"[A-Za-z0-9-]+")  # Neuronpedia's rule for a source set's name
# A model's id is one part of its pages' address (neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/42): no slash.
MODEL_ID = re.compile(r"[A-Za-z0-9._-]+")
# SAEDashboard's feature keys for data we do not compute: written as empty lists, as SAEDashboard writes a table it skipped.
NOT_COMPUTED = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
    "vector",
)


def check_set_name(name: str) -> None:
    """A source set's name as Neuronpedia takes it: letters, digits and hyphens (an empty name: the default)."""
    if name and not SET_NAME.fullmatch(name):
        raise UserError(
            f"NEURONPEDIA_SET {name!r} is not a Neuronpedia source set name: use only letters, digits and hyphens, e.g. yourname-res-16k."
        )


def default_set_name(info: SAEInfo) -> str:
    return f"fastsae-{(info.hook_point or 'hook').replace('_', '-')}-{info.spec.m}"


def check_model_id(model_id: str) -> None:
    if model_id and not MODEL_ID.fullmatch(model_id):
        raise UserError(
            f"NEURONPEDIA_MODEL {model_id!r} is not a Neuronpedia model id, which is one part of its pages' address "
            "(neuronpedia.org/<model id>): use only letters, digits, dots, hyphens and underscores, e.g. gemma-2-2b."
        )


def default_model_id(model_name: str) -> str:
    """Neuronpedia names a model without its organisation, in lower case (gpt2-small, gemma-2-2b, llama3.1-8b), where the
    Hub id's slash would split its pages' address: HuggingFaceTB/SmolLM2-135M-Instruct → smollm2-135m-instruct."""
    name = re.sub(r"\.gguf$", "", model_name.rstrip("/").rsplit("/", 1)[-1], flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


@dataclass(frozen=True)
class NeuronpediaSource:
    """Where the features go on Neuronpedia: a model, and one SAE as the source `<layer>-<set name>` of a source set."""

    model_id: str
    layer: int
    set_name: str

    @property
    def source_id(self) -> str:
        return f"{self.layer}-{self.set_name}"


class LogitTable(NamedTuple):
    """Per feature (rows): the token ids its direction most promotes and suppresses, and those tokens' logits."""

    promoted: np.ndarray  # (M, LOGIT_TOKENS)
    promoted_logits: np.ndarray
    suppressed: np.ndarray
    suppressed_logits: np.ndarray


@torch.no_grad()
def logit_table(directions: torch.Tensor, unembedding: torch.Tensor, k: int = LOGIT_TOKENS, chunk: int = 256) -> LogitTable:
    """interpret's logit lens picks the tokens; their logits are read through the unembedding centred over the vocabulary
    (TransformerLens' `center_unembed`, on by default, which SAEDashboard's model gets): a shift per feature, same order."""
    promoted, suppressed = logit_lens(directions, unembedding, k)
    centre = unembedding.mean(0)

    def logits(token_ids: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(token_ids), chunk):
            rows = unembedding[torch.from_numpy(token_ids[start : start + chunk])] - centre  # (chunk, k, d)
            parts.append((rows @ directions[start : start + chunk, :, None]).squeeze(-1).numpy())
        return np.concatenate(parts) if parts else np.zeros((0, k))

    return LogitTable(promoted, logits(promoted), suppressed, logits(suppressed))


def _rounded(values: Any) -> list[float]:
    return np.round(np.asarray(values, dtype=np.float64), DECIMALS).tolist()


def activation_records(windows: list[Window], bin_min: float, bin_max: float, bin_contains: float) -> list[dict[str, Any]]:
    """A group of examples in SAEDashboard's keys, each tagged with its group (bin_min and bin_contains -1: the top activations)."""
    tag = {"bin_min": round(bin_min, DECIMALS), "bin_max": round(bin_max, DECIMALS), "bin_contains": round(bin_contains, CONTAINS_DECIMALS)}
    return [
        {**tag, "tokens": window.tokens, "values": _rounded(window.activations), "qualifying_token_index": window.peak}
        for window in windows
    ]


def feature_record(
    feature: int, examples: list[dict[str, Any]], statistics: FeatureStatistics, lens: LogitTable, tokenizer, dataset: dict[str, Any]
) -> dict[str, Any]:
    """One feature in SAEDashboard's keys, with its examples' records."""
    heights = statistics.histogram[feature]
    filled = np.flatnonzero(heights)
    return {
        "feature_index": feature,
        **{key: [] for key in NOT_COMPUTED},
        "pos_str": tokenizer.batch_decode([[int(t)] for t in lens.promoted[feature]]),
        "pos_values": _rounded(lens.promoted_logits[feature]),
        "neg_str": tokenizer.batch_decode([[int(t)] for t in lens.suppressed[feature]]),
        "neg_values": _rounded(lens.suppressed_logits[feature]),
        "frac_nonzero": float(statistics.frequency[feature]),
        "freq_hist_data_bar_values": _rounded(HISTOGRAM_CENTRES[filled]),
        "freq_hist_data_bar_heights": heights[filled].tolist(),
        "activations": examples,
        **dataset,
    }


def explanation_records(interpretations: pd.DataFrame | None, source: NeuronpediaSource) -> list[dict[str, Any]]:
    """The CSV's explanations with the fields of the neuronpedia package's `Explanation`; none when it has none."""
    if interpretations is None:
        return []
    text = interpretations["explanation"].fillna("").astype(str).str.strip()
    return [
        {"modelId": source.model_id, "source": source.source_id, "index": int(feature), "text": explanation}
        for feature, explanation in zip(interpretations["feature"], text)
        if explanation
    ]


def feature_records(
    trained: TrainedSAE, store: ActivationStore, language_model: LanguageModel, examples: int, device: str, scratch: Path
) -> Iterator[dict[str, Any]]:
    """Every feature's record, in order, from `store` (the SAE's activations) and `language_model` (tokens and logit lens).

    Two passes over the store, as interpret_sae.py makes them: statistics of every feature (their
    example-level maxima memory-mapped in `scratch`), then the `examples` strongest windows of every
    feature and the draws from its activation intervals, which the maxima define. Each feature's windows
    are read only when its record is asked for, so memory stays bounded.
    """
    tokenizer = language_model.tokenizer
    sae = trained.sae.to(device)
    include_special = trained.info.trained_with_special_tokens
    decoder = sae.W_dec.detach().float().cpu()
    # Unit directions, as SAELens' fold_W_dec_norm leaves them; on the CPU, as interpret's logit_lens hands back .numpy().
    lens = logit_table(decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8), unembedding_matrix(language_model.model))
    grid = WindowGrid(store.doc_offsets, WINDOW_TOKENS) if include_special else WindowGrid.after_leading_template(store, WINDOW_TOKENS)
    dataset = {
        "n_prompts_total": store.n_examples,
        "n_tokens_in_prompt": int(np.diff(store.doc_offsets).max()),  # the longest example: ours are not all one length
        "dataset": store.manifest.dataset.path or "",
    }
    statistics = collect_feature_statistics(store, sae, include_special=include_special, example_max_file=scratch / "example_max.npy")
    strongest = WindowReservoir(range(sae.spec.m), 0, examples)
    intervals = IntervalSample(statistics.max_activation, len(grid), INTERVAL_EXAMPLES, INTERVAL_SEED)
    for chunk in iter_window_activations(store, sae, range(sae.spec.m), grid, include_special):
        strongest.add(chunk.slots, chunk.values, chunk.peaks)
        intervals.add(chunk, grid)
    top = strongest.result()
    for feature in tqdm(range(sae.spec.m), desc="Neuronpedia features", unit="feature"):
        windows = read_windows(store, sae, feature, tokenizer, grid, grid.index_of(top[feature].top_peaks), include_special)
        records = activation_records(windows, -1, float(statistics.max_activation[feature]), -1)
        for group in intervals.groups(feature):
            drawn = read_windows(store, sae, feature, tokenizer, grid, group.windows, include_special)
            strongest_first = sorted(drawn, key=lambda window: window.activation, reverse=True)
            records += activation_records(strongest_first, group.lower, group.upper, group.contains)
        yield feature_record(feature, records, statistics, lens, tokenizer, dataset)


@dataclass(frozen=True)
class NeuronpediaSettings:
    """ExportConfig's NEURONPEDIA_* settings, and where the store and model come from (empty: what the checkpoint records)."""

    set_name: str
    model_id: str
    examples: int
    store: str
    model_name: str
    device: str


def write_neuronpedia(folder: Path, trained: TrainedSAE, interpretations: pd.DataFrame | None, settings: NeuronpediaSettings) -> Path:
    """The batches of every feature's record, and the explanations, into `folder`/neuronpedia; returns that folder."""
    info = trained.info
    if info.layer is None:
        raise UserError(
            f"{trained.checkpoint} was trained on {info.hook_name or 'a store'} with no layer (a LoRA bottleneck store?), "
            "and Neuronpedia files each SAE under a layer. Set NEURONPEDIA false (--neuronpedia false) for this SAE."
        )
    model_id = settings.model_id or default_model_id(saelens_config(info)["metadata"]["model_name"])
    if not settings.model_id:
        logger.info("Neuronpedia model id: %s (NEURONPEDIA_MODEL sets it: the id the model has on Neuronpedia, e.g. gpt2-small)", model_id)
    source = NeuronpediaSource(model_id, info.layer, settings.set_name or default_set_name(info))
    store = trained.open_store(settings.store)
    language_model = trained.load_model(settings.model_name, dtype=torch.float32, device="cpu")
    output = folder / NEURONPEDIA_FOLDER
    output.mkdir()
    header = {"model_id": source.model_id, "layer": source.layer, "sae_set": source.set_name, "sae_id_suffix": None}
    with scratch_folder(output) as scratch:  # inside the export's .partial folder, which a rerun clears if a kill left it
        records = feature_records(trained, store, language_model, settings.examples, settings.device, scratch)
        batches = iter(lambda: list(itertools.islice(records, FEATURES_PER_BATCH)), [])  # FEATURES_PER_BATCH at a time, until none are left
        for number, batch in enumerate(batches):
            (output / f"batch-{number}.json").write_text(json.dumps({**header, "features": batch}, allow_nan=False), encoding="utf-8")
    explanations = explanation_records(interpretations, source)
    if explanations:
        (output / EXPLANATIONS_FILE).write_text(json.dumps(explanations, indent=1, ensure_ascii=False), encoding="utf-8")
    logger.info(
        "Neuronpedia: %d features in %d batches and %d explanations, for source %s of model %s",
        info.spec.m,
        -(-info.spec.m // FEATURES_PER_BATCH),
        len(explanations),
        source.source_id,
        source.model_id,
    )
    return output
