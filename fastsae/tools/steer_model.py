"""Steer a model with SAE features (the FAST paper, section 6): generate while a forward hook moves
the hook's activation along the features' decoder directions, and lay the answers out prompt × strength.

For chosen features k with decoder rows d_k in raw activation space (checkpoints have the
activation scale s folded in, so ‖d_k‖ = 1/s, not 1), the hook changes the activation h at the
checkpoint's hook (layer L = the output of decoder block L, read as in extraction: a `HookSite`) to:

- add:    h + α·Σ_k d_k/‖d_k‖ — one column per α in STRENGTHS;
- clamp:  h + Σ_k (v − f_k(h))·d_k — feature k set to v (CLAMP_VALUE) in the SAE's decomposition;
- ablate: h − Σ_k f_k(h)·d_k — feature k's contribution removed.

f_k(h) is the SAE's activation of feature k on h, so v is in the activation units interpret_sae.py
reports, and clamp and ablate leave the SAE's reconstruction error (h − x̂) untouched. α is a
distance in the residual stream, as in the FAST paper, whose decoder directions have unit norm: it
does not depend on the training scale, and set against a token's norm (~140 at SmolLM2's layer 12)
it says how hard the push is.

Positions: the hook acts at every position, the prompt's (template tokens included) and each
generated token's. Steering only new tokens would leave the prompt's keys and values unsteered, and
the answer reads those at every step; with the KV cache each forward carries only the new positions,
so hooking every forward steers each position exactly once. The FAST paper intervenes on special
tokens too, which restricting to content tokens would rule out.

The strengths of one prompt run as one batch: every row holds the same prompt, so there is no
padding, and the hook gives row b its own α (clamp and ablate: an unsteered row and a steered one).
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.generation import BaseStreamer

from fastsae.common import markdown
from fastsae.common.atomic_files import check_output_files, write_text_atomically
from fastsae.common.config import setting
from fastsae.common.default_paths import DEFAULT_CHECKPOINT
from fastsae.common.devices import resolve_device
from fastsae.common.errors import UserError
from fastsae.core.sae import SparseAutoencoder
from fastsae.core.sae_info import SAEInfo
from fastsae.core.trained_sae import open_trained_sae
from fastsae.lm.data import Example, load_dataset
from fastsae.lm.hook_points import HOOK_POINTS, HookSite, decoder_layers, hook_name, hook_site
from fastsae.lm.lora import LORA_HOOK_POINT
from fastsae.lm.models import learned_position_limit
from fastsae.lm.tokenization import example_label, prompt_token_ids, wants_chat_template
from fastsae.templates import read_template

logger = logging.getLogger(__name__)

STEERING_MODES = ("add", "clamp", "ablate")
DEFAULT_PROMPTS = [
    "What are you planning to do this weekend?",
    "Describe the city you live in.",
    "Should I take the new job offer?",
]


@dataclass
class SteerConfig:
    checkpoint: str = setting(DEFAULT_CHECKPOINT, "SAE checkpoint trained by train_sae.py (it names the model and the hook)")
    prompts: list[str] = setting(DEFAULT_PROMPTS, "prompts, each its own user turn (commas stay inside a prompt)", split_commas=False)
    prompts_file: str = setting(
        "",
        "JSONL (or a .json array), CSV or Parquet file of prompts, read like extraction's dataset (text, prompt or messages); replaces PROMPTS",
    )
    text_field: str = setting("auto", "field of PROMPTS_FILE holding the prompt; auto picks text, content, prompt or messages (chat)")
    features: list[int] = setting([201], "SAE features to steer with (their directions are summed)")
    strengths: list[float] = setting(
        [0.0, 15.0, 25.0, 50.0, 100.0], "MODE add: one column per α, the distance h moves along the feature's unit direction"
    )
    mode: str = setting("add", "add: h + α·d_k; clamp: set the feature to CLAMP_VALUE; ablate: remove the feature's contribution")
    clamp_value: float = setting(20.0, "MODE clamp: the activation the features are set to")
    max_new_tokens: int = setting(40, "tokens generated per answer")
    temperature: float = setting(0.0, "0: greedy (deterministic); above 0: sampling at this temperature")
    seed: int = setting(0, "seed for sampling (TEMPERATURE > 0)")
    markdown_path: str = setting("steering.md", "the table as Markdown")
    html_path: str = setting("steering.html", "the table as one self-contained HTML page")
    model_name: str = setting("", "model to steer; empty: the checkpoint's model")
    hook_point: str = setting("", "hook point, only for an SAE that does not record it: resid_post, mlp_out or attn_out")
    layer: int = setting(-1, "layer, only for an SAE that does not record it; -1: the SAE's")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if self.mode not in STEERING_MODES:
            raise UserError(f"MODE must be one of {', '.join(STEERING_MODES)}; got {self.mode!r}.")
        if not self.features:
            raise UserError("FEATURES is empty: name at least one feature, e.g. --features 201 (interpretations.csv lists them).")
        repeated = sorted({feature for feature in self.features if self.features.count(feature) > 1})
        if repeated:  # its direction would count twice in the sum
            raise UserError(f"FEATURES names feature {repeated[0]} more than once: list each feature once.")
        if self.mode == "add" and not self.strengths:
            raise UserError("STRENGTHS is empty: give at least one α, e.g. --strengths 0 25 50.")
        if not self.prompts and not self.prompts_file:
            raise UserError("no prompts: set PROMPTS or PROMPTS_FILE.")
        blank = [index for index, prompt in enumerate(self.prompts) if not prompt.strip()]
        if blank and not self.prompts_file:  # the model would answer the bare chat template (PROMPTS_FILE skips such rows)
            raise UserError(f"PROMPTS[{blank[0]}] is empty: write the text the model should answer, or remove it.")
        if self.max_new_tokens <= 0:
            raise UserError(f"MAX_NEW_TOKENS must be positive; got {self.max_new_tokens}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"TEMPERATURE must be 0 (greedy) or positive; got {self.temperature}.")
        # Checked before the model runs: a bad path used to fail only after every answer was generated, the table written and the page not.
        check_output_files({"MARKDOWN_PATH": self.markdown_path, "HTML_PATH": self.html_path})
        # NaN or inf in the hook turns every logit into NaN: each answer would come back empty, with no error.
        if not all(map(math.isfinite, [*self.strengths, self.clamp_value])):
            raise UserError(
                f"STRENGTHS and CLAMP_VALUE must be finite numbers; got STRENGTHS = {self.strengths}, CLAMP_VALUE = {self.clamp_value}."
            )


@dataclass(frozen=True)
class SteeringColumns:
    """The table's columns and what the hook does in each: row b of a batch is column b."""

    labels: list[str]
    coefficients: list[float]  # add: α; clamp and ablate: 1 steers the row, 0 leaves it alone


def steering_columns(mode: str, strengths: list[float], clamp_value: float) -> SteeringColumns:
    if mode == "add":
        return SteeringColumns([f"α = {alpha:g}" for alpha in strengths], list(strengths))
    return SteeringColumns(["unsteered", f"clamped to {clamp_value:g}" if mode == "clamp" else "ablated"], [0.0, 1.0])


def check_features(sae: SparseAutoencoder, features: list[int]) -> None:
    bad = [feature for feature in features if not 0 <= feature < sae.spec.m]
    if bad:
        raise UserError(
            f"feature {bad[0]} does not exist: this SAE has M={sae.spec.m} features, numbered 0..{sae.spec.m - 1}. Pick FEATURES from interpretations.csv."
        )


class FeatureSteering:
    """Moves the hook's activation along SAE features (see the module docstring); `steering` puts it in place."""

    def __init__(self, sae: SparseAutoencoder, features: list[int], mode: str, coefficients: list[float], clamp_value: float = 0.0) -> None:
        check_features(sae, features)
        if mode not in STEERING_MODES:
            raise UserError(f"MODE must be one of {', '.join(STEERING_MODES)}; got {mode!r}.")
        self.sae, self.features, self.mode, self.clamp_value = sae, features, mode, clamp_value
        self.decoder_rows = sae.W_dec.detach()[features].float()  # (n_features, d), raw activation space
        self.direction = F.normalize(self.decoder_rows, dim=1).sum(0)  # add: unit directions, so α is a distance
        self.coefficients = torch.tensor(coefficients, dtype=torch.float32, device=self.decoder_rows.device)

    def feature_activations(self, hidden_BTd: torch.Tensor) -> torch.Tensor:
        """f_k(h) of the chosen features at every position: (B, T, n_features)."""
        flat = hidden_BTd.reshape(-1, hidden_BTd.shape[-1])
        return self.sae.encode(flat)[:, self.features].reshape(*hidden_BTd.shape[:-1], len(self.features))

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The steered activation for (B, T, d) `hidden`."""
        if len(self.coefficients) not in (1, len(hidden)):
            raise ValueError(f"{len(self.coefficients)} coefficients for a batch of {len(hidden)} rows: give one per row, or one for all")
        h_BTd = hidden.float()
        coefficient = self.coefficients[:, None, None]  # one per batch row
        if self.mode == "add":
            delta_BTd = coefficient * self.direction
        else:
            target = self.clamp_value if self.mode == "clamp" else 0.0
            delta_BTd = coefficient * ((target - self.feature_activations(h_BTd)) @ self.decoder_rows)
        return (h_BTd + delta_BTd).to(hidden.dtype)


@contextmanager
def steering(site: HookSite, steer: FeatureSteering) -> Iterator[FeatureSteering]:
    """`steer` changing the activation at `site` for the `with` block; removed on the way out, errors included."""
    handle = site.replace(steer)
    try:
        yield steer
    finally:
        handle.remove()


def steering_site(model: nn.Module, info: SAEInfo) -> HookSite:
    """Where the checkpoint's SAE reads its activations in `model`, with a clear error when `model` does not have it."""
    hook_name, hook_point, d = info.hook_name, info.hook_point, info.spec.d
    if hook_point == LORA_HOOK_POINT:
        raise UserError(
            f"{hook_name} concatenates a LoRA adapter's bottlenecks from every layer: there is no single hook to steer. Use an SAE trained on resid_post, mlp_out or attn_out."
        )
    n_layers = len(decoder_layers(model))
    layer = int(info.layer)
    if not 0 <= layer < n_layers:
        raise UserError(
            f"the SAE reads {hook_name}, but this model has {n_layers} blocks (0..{n_layers - 1}). Set MODEL to the model the SAE was trained on ({info.model_label})."
        )
    if model.config.hidden_size != d:
        raise UserError(
            f"the SAE takes d={d} but this model's hidden size is {model.config.hidden_size}. Set MODEL to the model the SAE was trained on ({info.model_label})."
        )
    return hook_site(model, layer, hook_point)


@torch.no_grad()
def check_generation_room(model: nn.Module, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse before the first answer a prompt plus MAX_NEW_TOKENS longer than a learned position table (GPT-2's):
    past its end the model indexes out of range (on a GPU, an opaque device-side assert). Past a rotary model's
    trained context generation runs, at positions the model never saw: a warning, as extraction gives."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(range(len(prompts)), key=lambda index: len(prompts[index]), default=None)
    if not context or longest is None or len(prompts[longest]) + max_new_tokens <= context:
        return
    length = len(prompts[longest])
    if learned_position_limit(model) is None:
        logger.warning(
            "Prompt %d has %d tokens, so with MAX_NEW_TOKENS = %d its answer runs past the %d positions %s was trained on: "
            "its later tokens come from positions the model never saw.",
            longest,
            length,
            max_new_tokens,
            context,
            type(model).__name__,
        )
        return
    fix = f"set MAX_NEW_TOKENS to {context - length} or less" if length < context else "shorten it"
    raise UserError(
        f"prompt {longest} has {length} tokens, so with MAX_NEW_TOKENS = {max_new_tokens} generation would run past the "
        f"{context} positions {type(model).__name__} has learned embeddings for: {fix}."
    )


class TokenProgress(BaseStreamer):
    """Advances `bar` at each generated position: a long answer moves the bar while it is written, not once it is done.
    (`generate` puts the prompt first, then each step's new tokens, one per row.)"""

    def __init__(self, bar: tqdm) -> None:
        self.bar, self.prompt_seen = bar, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.prompt_seen = False  # the next `generate` starts with its prompt


def generate(
    model: nn.Module,
    prompt_ids: list[int],
    n_rows: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    pad_token_id: int | None,
    progress: TokenProgress | None = None,
) -> torch.Tensor:
    """`n_rows` continuations of one prompt, (n_rows, new tokens); greedy unless `temperature` > 0."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids] * n_rows, dtype=torch.long, device=device)
    # Explicit None for the sampling knobs: a model's generation_config may set them, and greedy ignores them.
    options = (
        {"do_sample": True, "temperature": temperature}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(seed)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        streamer=progress,
        **options,
    )
    return output[:, len(prompt_ids) :]


def prompt_examples(config: SteerConfig) -> list[Example]:
    if config.prompts_file:
        return load_dataset(config.prompts_file, config.text_field, label_field="", path_setting="PROMPTS_FILE").examples
    return [Example(row=index, source=f"PROMPTS[{index}]", text=prompt) for index, prompt in enumerate(config.prompts)]


@dataclass
class SteeringTable:
    """Answers per prompt (rows) and column (strengths, or unsteered / steered)."""

    title: str
    columns: list[str]
    prompts: list[str]
    answers: list[list[str]]  # answers[prompt][column]


def markdown_table(table: SteeringTable) -> str:
    return markdown.table(
        ["prompt", *table.columns], [[prompt, *answers] for prompt, answers in zip(table.prompts, table.answers)], line_breaks=True
    )


def html_page(table: SteeringTable) -> str:
    """One self-contained page; every text is escaped, so generated text can never become markup."""
    escape = html.escape
    rows = "".join(
        f'<tr><td class="prompt">{escape(prompt)}</td>' + "".join(f"<td>{escape(answer)}</td>" for answer in answers) + "</tr>\n"
        for prompt, answers in zip(table.prompts, table.answers)
    )
    return read_template("steering.html").format(
        title=escape(table.title), header="".join(f"<th>{escape(column)}</th>" for column in table.columns), rows=rows
    )


def steer_model(config: SteerConfig) -> SteeringTable:
    """Generate each prompt under each column's steering; print the table and write it as Markdown and HTML."""
    trained = open_trained_sae(config.checkpoint)
    hook_point, layer = trained.hook(config.hook_point, config.layer)
    if hook_point is None or (layer is None and hook_point != LORA_HOOK_POINT):
        raise UserError(
            f"{config.checkpoint} does not record the hook it was trained on ({trained.info.source_description}): "
            f"set HOOK_POINT ({', '.join(HOOK_POINTS)}) and LAYER in steer_model.py."
        )
    recorded_name = trained.info.hook_name or (hook_name(layer, hook_point) if layer is not None else None)
    info = dataclasses.replace(trained.info, hook_point=hook_point, layer=layer, hook_name=recorded_name)
    check_features(trained.sae, config.features)
    model_name = trained.model_name(config.model_name)
    device = resolve_device(config.device)
    language_model = trained.load_model(model_name, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    model, tokenizer = language_model.model, language_model.tokenizer
    sae = trained.sae.to(device)
    site = steering_site(model, info)
    use_template = wants_chat_template(tokenizer, info.extraction.get("chat_template", "auto"))
    columns = steering_columns(config.mode, config.strengths, config.clamp_value)
    steer = FeatureSteering(sae, config.features, config.mode, columns.coefficients, config.clamp_value)
    examples = prompt_examples(config)
    logger.info(
        "Steering %s with features %s at %s (%s; %s)",
        model_name,
        config.features,
        info.hook_name,
        config.mode,
        "chat template" if use_template else "plain text",
    )
    prompts = [prompt_token_ids(tokenizer, example, use_template) for example in examples]
    check_generation_room(model, prompts, config.max_new_tokens)
    answers = []
    with steering(site, steer), tqdm(total=len(prompts) * config.max_new_tokens, desc="steering", unit="token") as bar:
        progress = TokenProgress(bar)
        for index, prompt_ids in enumerate(prompts):
            bar.set_postfix_str(f"prompt {index + 1}/{len(prompts)}")
            new_tokens = generate(
                model,
                prompt_ids,
                len(columns.labels),
                config.max_new_tokens,
                config.temperature,
                config.seed,
                tokenizer.pad_token_id,
                progress,
            )
            bar.update((index + 1) * config.max_new_tokens - bar.n)  # an answer that ended early skips the rest of its share
            answers.append([tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens])
    features = ", ".join(map(str, config.features))
    decoding = f"sampled at temperature {config.temperature:g}, seed {config.seed}" if config.temperature > 0 else "greedy"
    title = (
        f"{sae.spec.name} feature{'s' if len(config.features) > 1 else ''} {features} ({config.mode}) at {info.hook_name} "
        f"of {info.model or model_name}; {decoding}, up to {config.max_new_tokens} new tokens"
    )
    table = SteeringTable(title, columns.labels, [example_label(example) for example in examples], answers)
    table_text = markdown_table(table)
    print("\n" + table_text)
    write_text_atomically(Path(config.markdown_path), f"# {markdown.cell(title)}\n\n{table_text}\n")
    write_text_atomically(Path(config.html_path), html_page(table))
    logger.info("Wrote %s and %s", config.markdown_path, config.html_path)
    return table
