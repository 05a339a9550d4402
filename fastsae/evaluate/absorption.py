"""First-letter feature absorption of a trained SAE, as SAEBench measures it (sae-bench 0.6.0, `evals/absorption/`).

Absorption (Chanin et al., "A is for Absorption"): a latent that should fire for a general feature ("starts with S")
stays silent on some tokens where a more specific latent ("short") fires instead and carries the general direction.
The evaluation has two phases:

1. **What the model knows** (`spelling_probe`, the same for every SAE on this model and hook, so `AbsorptionSweep`
   runs it once for all of them): SAEBench's prompted spelling task (`spelling_task.py`) on the model's own
   vocabulary; the activations at the SAE's hook on each word; a logistic probe per first letter trained on 80% of
   the words and scored on the rest. When fewer than
   `min_feats_for_eval` letters reach a held-out F1 above `min_GT_probe_f1` (SAEBench's own gate: 20 letters,
   F1 > 0.6), the model does not spell well enough here and no absorption is reported, only the probe's scores.
   Otherwise each held-out word the probe gets right is asked about again in a fresh prompt.
2. **Where the SAE puts it** (`sae_absorption`): k-sparse probing finds each letter's main latents; on the fresh
   prompts' activations, each word's absorption fraction and full absorption; per letter and averaged
   (`absorption_metrics.py` has the arithmetic).

The one reduction against SAEBench's defaults is the vocabulary: SAEBench prompts every alphabetic token (47,078
for SmolLM2, ~4M tokens through the model); `max_words` samples that many at random, by default all on a GPU and
1,000 on a CPU. The result (`absorption.json`) keeps SAEBench's names for SAEBench's numbers, in its
`AbsorptionEvalOutput` format.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastsae import __version__
from fastsae.common.atomic_files import write_json_atomically
from fastsae.common.config import setting
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.common.markdown import table
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.saelens_export import saelens_config
from fastsae.core.trained_sae import SAE_FINGERPRINT_KEY, TrainedSAE
from fastsae.evaluate.absorption_metrics import (
    LETTER_PROBE_TRAINING,
    LetterAbsorption,
    LinearProbes,
    ProbeTraining,
    f1_score,
    k_sparse_probes,
    latent_activations,
    letter_absorption,
    main_latents,
    mean_metrics,
    one_hot_letters,
    precision_recall,
    train_probes,
    word_absorption,
)
from fastsae.evaluate.saebench_core import SAEBENCH_VERSION
from fastsae.evaluate.spelling_task import (
    LETTERS,
    SpellingPrompt,
    Word,
    alpha_words,
    icl_prompt,
    prompt_token_ids,
    tokenizes_in_place,
    train_test_prompts,
)
from fastsae.extract.extract_activations import iter_example_activations, pad_token_id
from fastsae.lm.hook_points import HOOK_POINTS, ResidualCapture, hook_name
from fastsae.lm.models import load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

ABSORPTION_FILE = "absorption.json"  # beside the checkpoint
EVAL_TYPE_ID = "absorption_first_letter"  # SAEBench's EVAL_TYPE_ID_ABSORPTION
MAX_ICL_EXAMPLES = 10  # in-context lines per prompt (fixed in SAEBench's absorption eval)
TRAIN_FRACTION = 0.8  # of the words, for training the probes (SAEBench's train_test_fraction)
# SAEBench's L1 probe on the latents (`train_sparse_multi_probe`'s defaults besides the settings).
L1_PROBE_LR, L1_PROBE_END_LR, L1_PROBE_L2_DECAY = 0.01, 1e-5, 1e-6
# Words sampled on a CPU: ~1,250 prompts of ~88 tokens (the probe's true positives are prompted again), a few minutes for SmolLM2.
CPU_MAX_WORDS = 1000
# What the pipeline's plan counts absorption's work in (`AbsorptionWork`). The model's forwards are timed on the machine at
# plan time; the rest was timed once, on the 2-core development CPU (float32, the median of 3 runs, other jobs running) with
# the default checkpoint (SmolLM2 layer 12, d=576, Top-K M=256) and its 1,000-word task (800 training words): vocabulary
# filter 1.3 s; letter probe 0.42 s for 650 steps; L1 probe 2.3 s against 1.5 s of encoding alone for a random M=4096 SAE
# (9.8 s against 6.5 s for M=16384); k-sparse probes 1.0 s for 260 fits on 800 words, 2.6 s on those words tiled to 8,000.
PROMPT_TOKENS = 88  # per spelling prompt with SmolLM2's tokenizer: BOS, a newline, ten in-context lines and the question
VOCABULARY_SECONDS_PER_TOKEN = 2.7e-5  # finding the alphabetic tokens that stay one token in the template
LETTER_PROBE_SECONDS_PER_STEP = 6.4e-4  # one Adam step of the 26 letter probes on a batch of 64 words
L1_PROBE_SECONDS_PER_ROW_LATENT = 5e-9  # the L1 probe on an SAE's latents beyond encoding them, per word, epoch and latent
K_SPARSE_SECONDS_PER_FIT = 3.1e-3  # one scikit-learn fit of a k-sparse probe ...
K_SPARSE_SECONDS_PER_FIT_WORD = 8.8e-7  # ... plus this per training word


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's `AbsorptionEvalConfig` fields that change a result (same names, same defaults), and the vocabulary sample."""

    max_words: int = setting(
        -1,
        "words sampled at random from the vocabulary's alphabetic tokens; 0: all of them (SAEBench; SmolLM2 has 47,078); "
        f"-1: all on a GPU, {CPU_MAX_WORDS} on the CPU",
    )
    random_seed: int = setting(42, "seed of the word sample, the prompts and the probes")
    prompt_template: str = setting("{word} has the first letter:", "the spelling question; {word} is the word")
    prompt_token_pos: int = setting(-6, "where the word is, counted from the prompt's end (-6 for the default template)")
    max_k_value: int = setting(10, "k-sparse probes on k = 1..MAX_K_VALUE latents per letter")
    f1_jump_threshold: float = setting(0.03, "a letter has one more main latent while adding it raises the F1 by more than this")
    k_sparse_probe_l1_decay: float = setting(0.01, "L1 weight of the probe that ranks the latents")
    k_sparse_probe_batch_size: int = setting(4096, "batch size of that probe's training")
    k_sparse_probe_num_epochs: int = setting(50, "epochs of that probe's training")
    min_GT_probe_f1: float = setting(0.6, "a letter counts when the model's letter probe has held-out F1 above this")
    min_feats_for_eval: int = setting(20, "absorption is reported only when at least this many letters count (else: probe too weak)")
    llm_batch_size: int = setting(64, "prompts per model batch (speed only)")

    def __post_init__(self) -> None:
        if "{word}" not in self.prompt_template:
            raise UserError(f"PROMPT_TEMPLATE must contain {{word}}; got {self.prompt_template!r}.")
        if self.prompt_token_pos >= 0:
            raise UserError(f"PROMPT_TOKEN_POS counts from the prompt's end, so it must be negative; got {self.prompt_token_pos}.")
        if not 2 <= self.min_feats_for_eval <= len(LETTERS):
            raise UserError(f"MIN_FEATS_FOR_EVAL must be 2..26 (the means need two letters); got {self.min_feats_for_eval}.")
        positive = {
            "max_k_value": self.max_k_value,
            "k_sparse_probe_batch_size": self.k_sparse_probe_batch_size,
            "k_sparse_probe_num_epochs": self.k_sparse_probe_num_epochs,
            "llm_batch_size": self.llm_batch_size,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name.upper()} must be positive; got {value}.")
        if self.max_words < -1:
            raise UserError(f"MAX_WORDS must be -1 (by device), 0 (all) or positive; got {self.max_words}.")

    def words_for(self, device: str) -> int:
        """How many words to sample on `device` (0: all)."""
        if self.max_words == -1:
            return 0 if device.startswith("cuda") else CPU_MAX_WORDS
        return self.max_words

    @property
    def l1_probe_training(self) -> ProbeTraining:
        return ProbeTraining(
            self.k_sparse_probe_num_epochs,
            self.k_sparse_probe_batch_size,
            L1_PROBE_LR,
            L1_PROBE_END_LR,
            L1_PROBE_L2_DECAY,
            self.k_sparse_probe_l1_decay,
        )


@dataclass(frozen=True)
class AbsorptionWork:
    """What absorption does on `words` words, for the pipeline's estimate. An upper bound: phase 2 is counted as if the
    probe passes the gate, and every held-out word as one of its true positives, prompted again."""

    words: int
    settings: AbsorptionSettings

    @property
    def train_words(self) -> int:
        return int(self.words * TRAIN_FRACTION)

    @property
    def prompt_tokens(self) -> int:
        """Phase 1's tokens through the model: each word's prompt, and a fresh one for each held-out word."""
        return (2 * self.words - self.train_words) * PROMPT_TOKENS

    def phase_one_seconds(self, vocabulary_size: int) -> float:
        """Phase 1 besides the model's forwards: the vocabulary filter and the letter probe's training."""
        steps = LETTER_PROBE_TRAINING.epochs * math.ceil(self.train_words / LETTER_PROBE_TRAINING.batch_size)
        return vocabulary_size * VOCABULARY_SECONDS_PER_TOKEN + steps * LETTER_PROBE_SECONDS_PER_STEP

    @property
    def encoded_rows(self) -> int:
        """Phase 2's rows through one SAE: the training words in every epoch of the L1 probe (the other encodings are fewer)."""
        return self.settings.k_sparse_probe_num_epochs * self.train_words

    def phase_two_seconds(self, m: int) -> float:
        """Phase 2 for one SAE of `m` latents besides encoding: the L1 probe on its latents and a k-sparse fit per letter and k."""
        fits = len(LETTERS) * self.settings.max_k_value
        fit_seconds = K_SPARSE_SECONDS_PER_FIT + self.train_words * K_SPARSE_SECONDS_PER_FIT_WORD
        return self.encoded_rows * m * L1_PROBE_SECONDS_PER_ROW_LATENT + fits * fit_seconds


def task_vocabulary(tokenizer, settings: AbsorptionSettings, device: str) -> tuple[list[Word], dict[str, int]]:
    """The words the task asks about: alphabetic tokens that stay one token in the prompt, `max_words` of them at random.
    Too few for the task's prompts are refused here, from the tokenizer alone, before any model runs."""
    words = alpha_words(tokenizer)
    in_place = [
        word for word, ok in zip(words, tokenizes_in_place(tokenizer, words, settings.prompt_template, settings.prompt_token_pos)) if ok
    ]
    sampled, max_words = in_place, settings.words_for(device)
    if max_words and max_words < len(in_place):
        sampled = sorted(random.Random(settings.random_seed).sample(in_place, max_words), key=lambda word: word.token_id)
    if len(sampled) - int(len(sampled) * TRAIN_FRACTION) <= MAX_ICL_EXAMPLES:
        fix = (
            f"Raise ABSORPTION_WORDS in evaluate_sae.py (or use 0: all {len(in_place)})."
            if len(sampled) < len(in_place)
            else f"The tokenizer has only {len(in_place)} alphabetic tokens that stay one token in the prompt ({len(words)} alphabetic "
            "in all, the rest split or merged by PROMPT_TEMPLATE at PROMPT_TOKEN_POS): absorption cannot be measured on this "
            "model with this template; leave absorption out of EVALS."
        )
        raise UserError(
            f"{len(sampled)} words for the spelling task: its held-out fifth must exceed {MAX_ICL_EXAMPLES} words for its prompts' "
            f"in-context examples. {fix}"
        )
    counts = {"alpha_tokens": len(words), "split_or_merged_by_template": len(words) - len(in_place), "sampled": len(sampled)}
    return sampled, counts


def word_activations(
    model: torch.nn.Module, tokenizer, prompts: Sequence[SpellingPrompt], capture: ResidualCapture, settings: AbsorptionSettings, desc: str
) -> torch.Tensor:
    """(n, d) float32 activations at each prompt's word, from the model's hook; CPU."""
    sequences = prompt_token_ids(tokenizer, prompts)
    misplaced = [prompt.word.text for prompt, ids in zip(prompts, sequences) if ids[settings.prompt_token_pos] != prompt.word.token_id]
    if misplaced:
        raise UserError(
            f"PROMPT_TOKEN_POS={settings.prompt_token_pos} does not point at the word in {len(misplaced)} of {len(prompts)} prompts "
            f"(e.g. {misplaced[0]!r}): this tokenizer splits PROMPT_TEMPLATE differently; set PROMPT_TOKEN_POS to the word's position."
        )
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    batch_tokens = settings.llm_batch_size * max((len(ids) for ids in sequences), default=1)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as progress:
        for batch, per_store in iter_example_activations(capture, sequences, batch_tokens, pad_token_id(tokenizer), device):
            (pieces,) = per_store.values()
            for index, piece in zip(batch, pieces):
                rows[index] = piece[settings.prompt_token_pos].to("cpu", torch.float32, copy=True)  # an ordinary tensor, not inference-mode
            progress.update(len(batch))
    return torch.stack(rows) if rows else torch.zeros(0, capture.d)


@dataclass(frozen=True)
class LetterProbeScore:
    """How well the model's probe finds one letter among the held-out words (SAEBench's names)."""

    first_letter: str
    train_words: int
    test_words: int
    f1_probe: float | None  # None: no held-out word starts with it
    precision_probe: float | None
    recall_probe: float | None


@dataclass(frozen=True)
class SpellingProbe:
    """Phase 1: the task's activations and the model's letter probe; the same for every SAE on this model and hook."""

    settings: AbsorptionSettings
    train_x: torch.Tensor  # (train words, d)
    train_letters: torch.Tensor  # (train words,) letter index
    test_x: torch.Tensor
    test_letters: torch.Tensor
    probe: LinearProbes
    scores: list[LetterProbeScore]  # one per letter, a..z
    test_accuracy: float  # the probe's top letter is the word's first letter (ours: SAEBench reports F1 per letter)
    candidate_x: dict[int, torch.Tensor]  # per letter: activations of its probe true positives in fresh prompts; empty when too weak

    @property
    def counted_letters(self) -> list[str]:
        """The letters SAEBench averages over: held-out probe F1 above min_GT_probe_f1."""
        return [
            score.first_letter for score in self.scores if score.f1_probe is not None and score.f1_probe > self.settings.min_GT_probe_f1
        ]

    @property
    def measurable(self) -> bool:
        return len(self.counted_letters) >= self.settings.min_feats_for_eval


def _probe_scores(
    probe: LinearProbes, train_letters: torch.Tensor, test_x: torch.Tensor, test_letters: torch.Tensor
) -> list[LetterProbeScore]:
    predicted = probe.logits(test_x) > 0
    scores = []
    for letter, name in enumerate(LETTERS):
        truth = test_letters == letter
        precision, recall = precision_recall(truth, predicted[:, letter])
        found = bool(truth.any())
        scores.append(
            LetterProbeScore(
                first_letter=name,
                train_words=int((train_letters == letter).sum()),
                test_words=int(truth.sum()),
                f1_probe=f1_score(truth, predicted[:, letter]) if found else None,
                precision_probe=precision if found else None,
                recall_probe=recall if found else None,
            )
        )
    return scores


def spelling_probe(
    model: torch.nn.Module, tokenizer, layer: int, hook_point: str, words: Sequence[Word], settings: AbsorptionSettings, device: str
) -> SpellingProbe:
    """Phase 1 (see the module docstring) for `words` (`task_vocabulary`'s), at `hook_point` of block `layer`."""
    rng = random.Random(settings.random_seed)
    train_prompts, test_prompts = train_test_prompts(words, rng, settings.prompt_template, MAX_ICL_EXAMPLES, TRAIN_FRACTION)
    capture = ResidualCapture(model, [layer], hook_point)
    train_x = word_activations(model, tokenizer, train_prompts, capture, settings, "spelling prompts (train)")
    test_x = word_activations(model, tokenizer, test_prompts, capture, settings, "spelling prompts (held out)")
    train_letters = torch.tensor([prompt.word.letter for prompt in train_prompts])
    test_letters = torch.tensor([prompt.word.letter for prompt in test_prompts])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.random_seed)
        probe = train_probes(train_x, one_hot_letters(train_letters), LETTER_PROBE_TRAINING, device, desc="letter probe")
    logits = probe.logits(test_x)
    scores = _probe_scores(probe, train_letters, test_x, test_letters)
    test_accuracy = float((logits.argmax(1) == test_letters).float().mean())
    unmeasured = SpellingProbe(settings, train_x, train_letters, test_x, test_letters, probe, scores, test_accuracy, {})
    if not unmeasured.measurable:
        return unmeasured
    # Each held-out word the probe gets right, asked again with in-context examples drawn from `words`, the task's words
    # (training and held-out alike; with ABSORPTION_WORDS, only the sampled ones). SAEBench builds these for every
    # letter, in alphabetical order, so the prompts' random draws follow its own.
    candidates = {
        letter: ((test_letters == letter) & (logits[:, letter] > 0)).nonzero().flatten().tolist() for letter in range(len(LETTERS))
    }
    fresh = [
        icl_prompt(test_prompts[index].word, words, rng, settings.prompt_template, MAX_ICL_EXAMPLES)
        for letter in range(len(LETTERS))
        for index in candidates[letter]
    ]
    fresh_x = word_activations(model, tokenizer, fresh, capture, settings, "spelling prompts (probe's true positives)")
    counts = [len(candidates[letter]) for letter in range(len(LETTERS))]
    candidate_x = dict(enumerate(fresh_x.split(counts)))
    return dataclasses.replace(unmeasured, candidate_x=candidate_x)


@dataclass(frozen=True)
class LetterLatents:
    """Phase 2 for one letter: its main latents and the held-out F1 of its k-sparse probes, k = 1..max_k."""

    first_letter: str
    split_feats: list[int]
    f1_sparse_sae: list[float]


def sae_absorption(spelling: SpellingProbe, sae: SparseAutoencoder, device: str) -> tuple[list[LetterLatents], list[LetterAbsorption]]:
    """Phase 2 (see the module docstring): each letter's main latents, and the absorption of the letters with true positives."""
    settings = spelling.settings
    if not spelling.measurable:
        raise ValueError("phase 2 needs a letter probe that passes SAEBench's gate (SpellingProbe.measurable)")
    if sae.spec.m < settings.max_k_value:
        raise UserError(f"the SAE has {sae.spec.m} latents, fewer than MAX_K_VALUE={settings.max_k_value}: lower MAX_K_VALUE.")
    sae = sae.to(device).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.random_seed)
        l1_probe = train_probes(
            spelling.train_x,
            one_hot_letters(spelling.train_letters),
            settings.l1_probe_training,
            device,
            encode=lambda batch: latent_activations(sae, batch),
            dim=sae.spec.m,
            desc="L1 probe on the latents",
        )
    probes = k_sparse_probes(l1_probe, latent_activations(sae, spelling.train_x).cpu(), spelling.train_letters, settings.max_k_value)
    test_latents = latent_activations(sae, spelling.test_x).cpu()
    decoder = sae.W_dec.detach().float().cpu()
    latents, absorption = [], []
    for letter, letter_probes in probes.items():
        if not spelling.scores[letter].test_words:
            continue
        split_feats, f1s = main_latents(letter_probes, test_latents, spelling.test_letters == letter, settings.f1_jump_threshold)
        latents.append(LetterLatents(LETTERS[letter], split_feats, f1s))
        words_x = spelling.candidate_x[letter]
        if len(words_x):
            words = word_absorption(words_x, latent_activations(sae, words_x).cpu(), decoder, spelling.probe.weight[letter], split_feats)
            absorption.append(letter_absorption(LETTERS[letter], words, len(split_feats)))
    return latents, absorption


def saebench_block(
    settings: AbsorptionSettings, counted: list[LetterAbsorption], model_name: str, sae_name: str, sae_cfg: dict[str, Any]
) -> dict[str, Any]:
    """The result in SAEBench's `AbsorptionEvalOutput` format (validates against `eval_output_schema_absorption_first_letter.json`)."""
    config = {
        name: getattr(settings, name)
        for name in (
            "random_seed",
            "f1_jump_threshold",
            "max_k_value",
            "prompt_template",
            "prompt_token_pos",
            "llm_batch_size",
            "k_sparse_probe_l1_decay",
            "k_sparse_probe_batch_size",
            "k_sparse_probe_num_epochs",
            "min_GT_probe_f1",
            "min_feats_for_eval",
        )
    }
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": {
            "model_name": model_name,
            **config,
            "llm_dtype": "float32",
            "eval_k_sparse_probe_batch_size": 24,  # scores do not depend on it
            "precalc_k_sparse_probe_sae_acts": False,  # the L1 probe encodes each batch, as SAEBench's default
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {"mean": mean_metrics(counted)},
        "eval_result_details": [dataclasses.asdict(letter) for letter in counted],
        "sae_bench_commit_hash": f"computed by fastsae {__version__} with the definitions of sae-bench {SAEBENCH_VERSION}",
        "sae_lens_id": sae_name,
        "sae_lens_release_id": "fastsae",
        "sae_lens_version": sae_cfg.get("metadata", {}).get("sae_lens_version", ""),
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": None,
    }


def absorption_result(
    spelling: SpellingProbe,
    phase_two: tuple[list[LetterLatents], list[LetterAbsorption]] | None,
    vocabulary: dict[str, int],
    model_name: str,
    hook: str,
    sae_name: str,
    sae_cfg: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready result: the probe's scores always; SAEBench's block when the probe is good enough (`phase_two`)."""
    settings = spelling.settings
    counted = spelling.counted_letters
    f1s = [score.f1_probe for score in spelling.scores if score.f1_probe is not None]
    letters = {score.first_letter: dataclasses.asdict(score) | {"counted": score.first_letter in counted} for score in spelling.scores}
    block = None
    if phase_two is None:
        statement = (
            f"The model's first-letter probe is too weak to measure absorption at {hook}: its held-out F1 is above "
            f"{settings.min_GT_probe_f1} for {len(counted)} letters, and SAEBench needs {settings.min_feats_for_eval} "
            f"(held-out accuracy {spelling.test_accuracy:.1%}, mean F1 {np.mean(f1s):.3f}). No absorption number is reported."
        )
        usable = vocabulary.get("alpha_tokens", 0) - vocabulary.get("split_or_merged_by_template", 0)
        if vocabulary.get("sampled", usable) < usable:
            statement += (
                f" The probe learned from {len(spelling.train_x):,} words, a sample of the {usable:,} the task can use (SAEBench uses "
                "them all): a larger ABSORPTION_WORDS (0: all) trains a better probe."
            )
    else:
        latents, absorption = phase_two
        for entry in latents:
            letters[entry.first_letter] |= dataclasses.asdict(entry)
        for entry in absorption:
            letters[entry.first_letter] |= dataclasses.asdict(entry)
        block = saebench_block(settings, [entry for entry in absorption if entry.first_letter in counted], model_name, sae_name, sae_cfg)
        means = block["eval_result_metrics"]["mean"]
        statement = (
            f"Absorption over {len(counted)} letters whose probe F1 is above {settings.min_GT_probe_f1}: mean absorption fraction "
            f"{means['mean_absorption_fraction_score']:.4f}, mean full-absorption rate {means['mean_full_absorption_score']:.4f}, "
            f"{means['mean_num_split_features']:.2f} main latents per letter."
        )
    return {
        "status": "measured" if block else "probe_too_weak",
        "statement": statement,
        "model_name": model_name,
        "hook_name": hook,
        "vocabulary": vocabulary | {"train_words": len(spelling.train_x), "test_words": len(spelling.test_x)},
        "probe": {
            "test_accuracy": spelling.test_accuracy,
            "mean_f1_probe": float(np.mean(f1s)),
            "letters_above_min_f1": len(counted),
            "min_GT_probe_f1": settings.min_GT_probe_f1,
            "min_feats_for_eval": settings.min_feats_for_eval,
        },
        "letters": list(letters.values()),
        "saebench_absorption": block,
        "settings": dataclasses.asdict(settings),
    }


class AbsorptionSweep:
    """Absorption of several SAEs with one set of settings. Phase 1 (the model's forwards over every spelling prompt and
    the letter probe) depends only on the model, the hook and the settings, so it runs once per (model, hook) and every
    SAE on that model and hook reuses it: a sweep on one store pays for it once, with the same results as one SAE alone.
    The model is loaded for phase 1 only; each (model, hook) keeps its `SpellingProbe` (the words' activations) until
    the sweep ends."""

    def __init__(self, device: str, settings: AbsorptionSettings, model_name: str = "") -> None:
        self.device = resolve_device(device)
        self.settings = settings
        self.model_name = model_name  # a moved copy of the checkpoints' model; empty: the one each records
        self.spelling_probes: dict[tuple[str, int, str], tuple[SpellingProbe, dict[str, int]]] = {}
        self.vocabularies: dict[str, tuple[list[Word], dict[str, int]]] = {}

    def vocabulary_for(self, model_name: str) -> tuple[list[Word], dict[str, int]]:
        """`task_vocabulary` of the model's tokenizer, once per model: `check` needs it before the model loads."""
        if model_name not in self.vocabularies:
            self.vocabularies[model_name] = task_vocabulary(load_tokenizer(resolve_model(model_name)), self.settings, self.device)
        return self.vocabularies[model_name]

    def spelling_for(self, trained: TrainedSAE) -> tuple[SpellingProbe, dict[str, int]]:
        """Phase 1 at `trained`'s model and hook, with the task's vocabulary counts: computed on first use, then reused."""
        info = trained.info
        key = (trained.model_name(self.model_name), info.layer, info.hook_point)
        if key not in self.spelling_probes:
            words, vocabulary = self.vocabulary_for(key[0])
            language_model = trained.load_model(self.model_name, dtype=torch.float32, device=self.device)
            logger.info(
                "Spelling task at %s: %d words (%d alphabetic tokens)",
                hook_name(info.layer, info.hook_point),
                len(words),
                vocabulary["alpha_tokens"],
            )
            probe = spelling_probe(
                language_model.model, language_model.tokenizer, info.layer, info.hook_point, words, self.settings, self.device
            )
            self.spelling_probes[key] = (probe, vocabulary)
        return self.spelling_probes[key]

    def check(self, trained: TrainedSAE) -> None:
        """Refuse an SAE absorption cannot measure (its hook, or its model, unknown or not probeable, or its tokenizer's
        words too few for the task): a sweep calls this
        for every SAE before any evaluation, so the refusal comes before the work, not after the first SAEs'."""
        info = trained.info
        if info.hook_point not in HOOK_POINTS or info.layer is None:
            raise UserError(
                f"{trained.checkpoint} reads {info.hook_point or 'an unrecorded hook'}: absorption needs a residual-stream-like hook "
                f"({', '.join(HOOK_POINTS)}) at a recorded layer, where the model's activations can be probed for first letters. "
                "Leave absorption out of EVALS for it."
            )
        self.vocabulary_for(trained.model_name(self.model_name))

    def evaluate(self, trained: TrainedSAE) -> dict[str, Any]:
        """First-letter absorption of `trained` (see the module docstring). Its `seconds` include phase 1 for the first SAE
        on a model and hook only."""
        self.check(trained)
        info = trained.info
        started = time.perf_counter()
        spelling, vocabulary = self.spelling_for(trained)
        phase_two = sae_absorption(spelling, trained.sae, self.device) if spelling.measurable else None
        hook = hook_name(info.layer, info.hook_point)
        result = absorption_result(
            spelling, phase_two, vocabulary, trained.model_name(self.model_name), hook, trained.checkpoint.stem, saelens_config(info)
        )
        result = {
            "checkpoint": str(trained.checkpoint),
            SAE_FINGERPRINT_KEY: trained.sae.fingerprint(),
            **result,
            "seconds": time.perf_counter() - started,
        }
        logger.info("Absorption of %s: %s", trained.checkpoint.name, result["statement"])
        return result


def run_absorption(trained: TrainedSAE, device: str, config: AbsorptionSettings, model_name: str = "") -> dict[str, Any]:
    """First-letter absorption of one SAE on its model (or `model_name`, a moved copy of it); a sweep uses `AbsorptionSweep`."""
    return AbsorptionSweep(device, config, model_name).evaluate(trained)


def write_absorption(folder: Path, result: dict[str, Any]) -> Path:
    """`absorption.json` in `folder` (beside the checkpoint), written whole or not at all."""
    return write_json_atomically(Path(folder) / ABSORPTION_FILE, result)


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(value: Any) -> Any:
    """A per-letter value: floats to 3 decimals; missing ones (a letter without held-out words or true positives) as —."""
    return _number(value, 3) if isinstance(value, float) else value


def absorption_table(result: dict[str, Any]) -> str:
    """Markdown: the statement, the headline numbers, and one row per letter (its absorption when measured)."""
    probe = result["probe"]
    rows = [
        ["letter probe: held-out accuracy", f"{probe['test_accuracy']:.1%}"],
        ["letter probe: mean F1", _number(probe["mean_f1_probe"], 3)],
        [f"letters counted (probe F1 > {probe['min_GT_probe_f1']})", f"{probe['letters_above_min_f1']} of {len(LETTERS)}"],
    ]
    columns = ["first_letter", "test_words", "f1_probe"]
    if result["saebench_absorption"]:
        means = result["saebench_absorption"]["eval_result_metrics"]["mean"]
        rows += [
            [name, _number(means[name])]
            for name in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features")
        ]
        columns += ["num_probe_true_positives", "num_split_features", "mean_absorption_fraction", "full_absorption_rate"]
    letters = [[_cell(letter.get(name)) for name in columns] + ["yes" if letter["counted"] else "no"] for letter in result["letters"]]
    return "\n\n".join([result["statement"], table(["metric", "value"], rows), table([*columns, "counted"], letters)])
