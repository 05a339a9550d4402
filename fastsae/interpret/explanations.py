"""Prompts that ask an LLM to explain a feature or rate it with the FAST rubric, and how the rubric's answers are read.

- Explaining (for delphi's detection and fuzzing scores, fastsae/interpret/scorers.py): the feature's
  windows sampled across its activation quantiles (or its top windows), numbered, one line each, with
  its strongest token marked «like this» and that activation in brackets (line breaks written \\n, a
  « or » of the text \\« or \\»: windows.escaped_token); the LLM answers with one concrete phrase.
- The FAST paper's rubric. The LLM sees the top-5 windows, marked the same way, and rates how
  consistent a pattern they share from 1 (none) to 5 (no exceptions), with a short name; the
  headline is the share of features rated 4 or 5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fastsae.interpret.llm import Messages
from fastsae.interpret.windows import Window

SYSTEM = "You are an interpretability researcher studying the features of a sparse autoencoder trained on a language model's activations."

RUBRIC = {
    1: "no discernible pattern",
    2: "a broad, loose theme",
    3: "a clear pattern, with quite a few exceptions",
    4: "a clear pattern, with one or two deviations",
    5: "a clear pattern, with no deviations",
}
HIGH_RATINGS = (4, 5)  # the FAST paper's headline: the share of features rated 4 or 5


ESCAPES_NOTE = "A line break in an excerpt is written \\n, and a « or » of the text itself \\« or \\»."


def numbered_windows(windows: list[Window]) -> str:
    """One line per window (marked_text escapes line breaks): its number, its activation in brackets, the text with its
    strongest token «marked». delphi's explainer pastes raw text, its << >> unescaped; this prompt is our own."""
    return "\n".join(f"{number}. [{window.activation:.2f}] {window.marked_text()}" for number, window in enumerate(windows, 1))


def explanation_messages(windows: list[Window]) -> Messages:
    prompt = (
        "One feature fires on each of the excerpts below. In each, the token where it fires "
        f"most strongly is marked «like this», with that activation in brackets. {ESCAPES_NOTE}\n\n"
        f"{numbered_windows(windows)}\n\n"
        "In one short phrase (under 20 words), what does this feature detect? Be concrete and specific: name the words, "
        "the meaning or the function that triggers it, and do not hedge. Answer with the phrase only."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def rubric_messages(windows: list[Window]) -> Messages:
    """The FAST paper's rubric: rate the pattern shared by the top contexts 1-5 and name it, in two fixed lines."""
    scale = "\n".join(f"{rating}: {meaning}" for rating, meaning in RUBRIC.items())
    prompt = (
        f"Here are the {len(windows)} excerpts on which one feature fires most strongly. In each, the token where it fires "
        f"is marked «like this», with the feature's activation on it in brackets. {ESCAPES_NOTE}\n\n"
        f"{numbered_windows(windows)}\n\n"
        "How consistent a pattern do the marked tokens, in their contexts, share? Rate it on this scale:\n"
        f"{scale}\n\n"
        "Answer with exactly two lines and nothing else:\nRATING: <a whole number from 1 to 5>\nNAME: <a short name for the pattern, under 8 words>"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def without_reasoning(answer: str) -> str:
    """The answer after a thinking model's reasoning, which a server without a reasoning parser sends first, ending in
    </think> (DeepSeek-R1's chat template opens the block in the prompt, so the answer holds only its end)."""
    return answer.rpartition("</think>")[2]


def parse_explanation(answer: str) -> str:
    """The explainer's phrase: its answer after any reasoning, stripped, and without its enclosing quotes when it is
    quoted whole. A quote that opens or closes a quoted word at either end (`The word "would"`) stays."""
    text = without_reasoning(answer).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        return text[1:-1].strip()
    return text


_RATING = re.compile(
    r"^[^A-Za-z\n]*rating\s*(?:\([^)\n]*\))?\W*?[:=\-]?\W*?(\d+(?:\.\d+)?)", re.IGNORECASE | re.MULTILINE
)  # "(1-5)" skipped
_NAME = re.compile(r"^[^A-Za-z\n]*name\W*?[:=\-]\s*(.+)$", re.IGNORECASE | re.MULTILINE)


def parse_rubric(answer: str) -> tuple[int | None, str]:
    """(rating, name) from a RATING / NAME answer; the rating is None unless a whole number 1-5 is given.

    Tolerates what chat models add: Markdown bold, "4/5", "Rating = 4", lower case, text around
    the two lines, quotes around the name, a thinking model's reasoning before them. A missing name leaves "".
    """
    answer = without_reasoning(answer)
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
        return {
            "counts": [self.counts[rating] for rating in RUBRIC],
            "rated": self.rated,
            "missing": self.missing,
            "high_share": self.high_share,
        }


def rubric_summary(ratings: Iterable[int | None]) -> RubricSummary:
    """Count the ratings 1-5; None (an unreadable answer) counts as missing, never as a rating."""
    ratings = list(ratings)
    return RubricSummary({rating: ratings.count(rating) for rating in RUBRIC}, sum(rating is None for rating in ratings))
