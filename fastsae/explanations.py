"""Prompts that ask an LLM what a feature detects, and the detection score of its answer (as delphi does).

Explaining: the feature's top-activating contexts, numbered, with the firing token marked «like
this» and its activation, against contexts where it does not fire; the LLM answers with one
concrete phrase. Scoring: given only that phrase, the LLM labels a shuffled mix of held-out
activating and non-activating contexts; the score is the balanced accuracy of its labels.
"""

from __future__ import annotations

import json
import re

from fastsae.features import TokenContext
from fastsae.llm import Messages

SYSTEM = "You are an interpretability researcher studying the features of a sparse autoencoder trained on a language model's activations."


def explanation_messages(activating: list[TokenContext], non_activating: list[str]) -> Messages:
    fires = "\n".join(f"{number}. [{context.activation:.2f}] {context.marked_text()}" for number, context in enumerate(activating, 1))
    silent = "\n".join(f"{number}. {text}" for number, text in enumerate(non_activating, 1))
    prompt = (
        "One feature fires on the excerpts of the first list; the token where it fires most strongly is marked "
        "«like this», with the activation in brackets. It does not fire anywhere in the excerpts of the second list.\n\n"
        f"Fires on:\n{fires}\n\nDoes not fire on:\n{silent}\n\n"
        "In one short phrase (under 20 words), what does this feature detect? Be concrete and specific: name the words, "
        "the meaning or the function that triggers it, and do not hedge. Answer with the phrase only."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def scoring_messages(explanation: str, excerpts: list[str]) -> Messages:
    numbered = "\n".join(f"{number}. {text}" for number, text in enumerate(excerpts, 1))
    prompt = (
        f'A feature is described as: "{explanation}"\n\nFor each numbered excerpt below, decide whether this feature '
        f"fires somewhere in it.\n\n{numbered}\n\nAnswer with only a JSON list of {len(excerpts)} numbers, 1 where it fires "
        "and 0 where it does not, in the excerpts' order."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def parse_labels(answer: str, count: int) -> list[int] | None:
    """The first JSON list of `count` 0/1 values in the answer, or None if there is none."""
    for candidate in re.findall(r"\[[^\[\]]*\]", answer):
        try:
            values = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(values, list) and len(values) == count and all(value in (0, 1) for value in values):
            return [int(value) for value in values]
    return None


def balanced_accuracy(predicted: list[int], truth: list[int]) -> float:
    """Mean of the hit rate on activating excerpts and the correct-rejection rate on the others."""
    positives = [p for p, t in zip(predicted, truth) if t == 1]
    negatives = [p for p, t in zip(predicted, truth) if t == 0]
    rates = [sum(positives) / len(positives)] if positives else []
    rates += [1 - sum(negatives) / len(negatives)] if negatives else []
    return sum(rates) / len(rates)
