"""Prompts that ask an LLM about a feature, and how its answers are scored.

Two scorings (InterpretConfig.scoring):

- Detection (as delphi does). Explaining: the feature's top-activating contexts, numbered, with
  the firing token marked «like this» and its activation, against contexts where it does not
  fire; the LLM answers with one concrete phrase. Scoring: given only that phrase, the LLM labels
  a shuffled mix of held-out activating and non-activating contexts; the score is the balanced
  accuracy of its labels.
- The FAST paper's rubric. The LLM sees the top-5 contexts, marked the same way, and rates how
  consistent a pattern they share from 1 (none) to 5 (no exceptions), with a short name; the
  headline is the share of features rated 4 or 5.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fastsae.features import TokenContext
from fastsae.llm import Messages

SYSTEM = "You are an interpretability researcher studying the features of a sparse autoencoder trained on a language model's activations."

RUBRIC = {
    1: "no discernible pattern",
    2: "a broad, loose theme",
    3: "a clear pattern, with quite a few exceptions",
    4: "a clear pattern, with one or two deviations",
    5: "a clear pattern, with no deviations",
}
HIGH_RATINGS = (4, 5)  # the FAST paper's headline: the share of features rated 4 or 5


def numbered_contexts(contexts: list[TokenContext]) -> str:
    """One line per context: its number, the firing token's activation in brackets, the text with that token «marked»."""
    return "\n".join(f"{number}. [{context.activation:.2f}] {context.marked_text()}" for number, context in enumerate(contexts, 1))


def explanation_messages(activating: list[TokenContext], non_activating: list[str]) -> Messages:
    fires = numbered_contexts(activating)
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


def rubric_messages(contexts: list[TokenContext]) -> Messages:
    """The FAST paper's rubric: rate the pattern shared by the top contexts 1-5 and name it, in two fixed lines."""
    scale = "\n".join(f"{rating}: {meaning}" for rating, meaning in RUBRIC.items())
    prompt = (
        f"Here are the {len(contexts)} excerpts on which one feature fires most strongly. In each, the token where it fires "
        "is marked «like this», with the feature's activation on it in brackets.\n\n"
        f"{numbered_contexts(contexts)}\n\n"
        "How consistent a pattern do the marked tokens, in their contexts, share? Rate it on this scale:\n"
        f"{scale}\n\n"
        "Answer with exactly two lines and nothing else:\nRATING: <a whole number from 1 to 5>\nNAME: <a short name for the pattern, under 8 words>"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


_RATING = re.compile(r"^[^A-Za-z\n]*rating\s*(?:\([^)\n]*\))?\W*?[:=\-]?\W*?(\d+(?:\.\d+)?)", re.IGNORECASE | re.MULTILINE)  # "(1-5)" skipped
_NAME = re.compile(r"^[^A-Za-z\n]*name\W*?[:=\-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)


def parse_rubric(answer: str) -> tuple[int | None, str]:
    """(rating, name) from a RATING / NAME answer; the rating is None unless a whole number 1-5 is given.

    Tolerates what chat models add: Markdown bold, "4/5", "Rating = 4", lower case, text around
    the two lines, quotes around the name. A missing name leaves "".
    """
    rating_match = _RATING.search(answer)
    rating = None
    if rating_match and float(rating_match.group(1)) in RUBRIC:
        rating = int(float(rating_match.group(1)))
    name_match = _NAME.search(answer)
    name = name_match.group(1).strip().strip("*_`").strip() if name_match else ""
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        name = name[1:-1]
    return rating, name


@dataclass
class RubricSummary:
    """The rating distribution over the features the LLM rated, and how many answers could not be read."""

    counts: dict[int, int]  # rating 1-5 -> features with it
    missing: int  # answers with no readable rating

    @property
    def rated(self) -> int:
        return sum(self.counts.values())

    @property
    def high_share(self) -> float | None:
        """The headline: the fraction of rated features rated 4 or 5 (None when none was rated)."""
        return sum(self.counts[rating] for rating in HIGH_RATINGS) / self.rated if self.rated else None

    def describe(self) -> str:
        share = "–" if self.high_share is None else f"{self.high_share:.1%}"
        counts = ", ".join(f"{rating}: {count}" for rating, count in self.counts.items())
        return f"{share} of {self.rated} rated features rated 4-5 (ratings {counts}; unreadable answers: {self.missing})"

    def as_dict(self) -> dict:
        return {"counts": [self.counts[rating] for rating in RUBRIC], "rated": self.rated, "missing": self.missing, "high_share": self.high_share}


def rubric_summary(ratings: Iterable[int | None]) -> RubricSummary:
    """Count the ratings 1-5; None (an unreadable answer) counts as missing, never as a rating."""
    ratings = list(ratings)
    return RubricSummary({rating: ratings.count(rating) for rating in RUBRIC}, sum(rating is None for rating in ratings))
