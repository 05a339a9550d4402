"""delphi's detection and fuzzing scores: the same examples, marks, batches, answer reading and arithmetic.

Computed as eai-delphi 0.1.3 computes them (`scorers/classifier/`, `log/result_analysis.py`);
tests/test_delphi_scorers.py runs delphi's own scorers beside these on one local server. The
instructions to the LLM are worded here; what they carry is delphi's.

- Examples: a feature's held-out activating windows (from its activation quantiles) and random
  windows where it never fires, non-activating first, shuffled by `random.Random(seed)` as
  delphi's scorer shuffles them, and put to the LLM EXAMPLES_PER_PROMPT at a time (delphi's
  `num_examples_per_scorer_prompt`, 5), numbered from 0 under the explanation. It answers with
  one 0/1 per example, in a list.
- Detection shows each window's plain text, raw as delphi shows it (a line break stays one, unlike
  the explainer's escaped lines): 1 = the feature fires in it.
- Fuzzing marks tokens <<like this>>. In an activating window every token at 0.3 × the window's
  maximum or more is marked (runs of them as one mark); in a non-activating window as many tokens as
  an activating window has firing ones on average, rounded up: the token three quarters of the way
  in, then the rest drawn as delphi draws them (`random.Random(22)`, anew for each window).
  1 = every marked token fits the explanation.
- An answer counts when its first [...] on one line is a JSON list with one entry per example
  (each read as true or false); otherwise that prompt's examples get no verdict and are left out.
  As in delphi, "one entry per example" means EXAMPLES_PER_PROMPT entries even in a feature's last
  prompt when it holds fewer examples (fewer non-activating windows than asked): its first entries
  are read, and an answer with one entry per example shown is not.
- Score: balanced accuracy over the examples with a verdict, (hits / activating + correct
  rejections / non-activating) / 2, a class with no verdicts counting 0 (delphi's
  `compute_classification_metrics` on one feature's examples); NaN when no answer could be read.
  Per quantile: the share of its activating windows the LLM got right.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass

from fastsae.interpret.llm import Messages
from fastsae.interpret.windows import Window

SCORERS = ("detection", "fuzzing")
MARK_THRESHOLD = 0.3  # fuzzing marks the tokens at this fraction of the window's maximum or more
DECOY_SEED = 22  # delphi seeds the draw of each non-activating window's marks with this

_DETECTION_SYSTEM = """You study the features of a language model, one at a time. A feature comes with a short explanation of what it responds to.

Then come numbered text examples. For each example, decide whether the feature, as explained, is present in it: 1 if it is, 0 if it is not.

Reply with a Python list of these 0s and 1s, one per example, in the examples' order, and nothing else."""

_FUZZING_SYSTEM = """You study the features of a language model, one at a time. A feature comes with a short explanation of what it responds to.

Then come numbered text examples in which some tokens are marked between << and >>. The marks may be right or wrong: all examples may be right, none may be, or some. For each example, decide whether every marked token is an instance of the feature as explained: 1 if all of them are, 0 if any one is not.

Reply with a Python list of these 0s and 1s, one per example, in the examples' order, and nothing else."""

# Worked examples, shown before each real prompt so the model sees the task and the answer format.
_DETECTION_DEMOS = [
    (
        "Names of rivers",
        [
            " the barges drifted down the Danube past the old customs house",
            " she finished her coffee and opened the laptop to check the mail",
            " floods along the Mississippi forced thousands from their homes in",
            " the recipe calls for two cups of flour and a pinch of salt",
            " fishermen on the Mekong reported the lowest water in decades",
        ],
        "[1,0,1,0,1]",
    ),
    (
        'The word "however" opening a contrast',
        [
            " prices rose sharply in spring. However, demand held steady through",
            " the team met on Monday to plan the launch of the new",
            " he liked the city; the rent, however, was more than he",
            " we walked to the harbour and watched the ferries come in",
            " the results were promising. However, the sample was small and",
        ],
        "[1,0,1,0,1]",
    ),
]
_FUZZING_DEMOS = [
    (
        "Names of rivers",
        [
            " the barges drifted down the<< Danube>> past the old customs house",
            " she finished her<< coffee>> and opened the laptop to check the mail",
            " floods along the<< Mississippi>> forced thousands from their homes in",
            " the recipe<< calls>> for two cups of<< flour>> and a pinch of salt",
            " fishermen on the<< Mekong>> reported the lowest<< water>> in decades",
        ],
        "[1,0,1,0,0]",
    ),
    (
        "Verbs of motion in the past tense",
        [
            " yesterday we<< walked>> to the station and<< ran>> for the train",
            " the committee<< approved>> the budget on Friday after a long",
            " after the match he<< drove>> home through the rain",
            " the letter<< arrived>> late, so she<< wrote>> back at once",
            " the children<< climbed>> the hill and<< rolled>> down the other side",
        ],
        "[1,0,1,0,1]",
    ),
]


@dataclass
class ScoringExample:
    """A window put to the scorers, and whether (and how strongly) the feature fires in it."""

    window: Window
    quantile: int | None  # the activating window's activation quantile (0 = the strongest); None: a non-activating window

    @property
    def activating(self) -> bool:
        return self.quantile is not None


def _marked(tokens: list[str], marked: list[bool]) -> str:
    """The tokens joined, each run of marked ones inside << >>."""
    pieces, inside = [], False
    for token, mark in zip(tokens, marked):
        if mark != inside:
            pieces.append("<<" if mark else ">>")
            inside = mark
        pieces.append(token)
    return "".join(pieces) + (">>" if inside else "")


def decoy_marks(length: int, count: int) -> list[bool]:
    """Which tokens of a non-activating window fuzzing marks: the one three quarters in, then count - 1 more, drawn as delphi does."""
    if length < 2:  # delphi has no marks to draw in a window this short (it puts a canned sentence in its place)
        return [False] * length
    count = min(count, length)
    anchor = length - length // 4
    if anchor < length:
        others = [index for index in range(length) if index != anchor]
        chosen = {anchor, *random.Random(DECOY_SEED).sample(others, count - 1)} if count > 0 else set()
    else:
        chosen = set(random.Random(DECOY_SEED).sample(range(length), count))
    return [index in chosen for index in range(length)]


def example_texts(scorer: str, examples: list[ScoringExample]) -> list[str]:
    """What the LLM reads for each example: plain text (detection) or text with marked tokens (fuzzing)."""
    if scorer == "detection":
        return [example.window.text() for example in examples]
    activating = [example.window for example in examples if example.activating]
    decoys = math.ceil(sum(sum(value != 0 for value in window.activations) for window in activating) / len(activating)) if activating else 0
    texts = []
    for example in examples:
        window = example.window
        if example.activating:
            marks = [value >= MARK_THRESHOLD * window.activation for value in window.activations]
        else:
            marks = decoy_marks(len(window.tokens), decoys)
        texts.append(_marked(window.tokens, marks))
    return texts


def scoring_order(count: int, seed: int | str) -> list[int]:
    """The examples' shuffled order (delphi shuffles its examples with random.Random(seed) before batching them)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def _user_message(explanation: str, texts: list[str]) -> str:
    numbered = "\n".join(f"Example {number}: {text}" for number, text in enumerate(texts))
    return f"Feature explanation: {explanation}\n\nText examples:\n\n{numbered}\n"


def classifier_prompts(scorer: str, explanation: str, texts: list[str], order: list[int], per_prompt: int) -> list[Messages]:
    """One prompt per `per_prompt` examples taken in `order`, each after the worked examples of its scorer."""
    system, demos = (_DETECTION_SYSTEM, _DETECTION_DEMOS) if scorer == "detection" else (_FUZZING_SYSTEM, _FUZZING_DEMOS)
    shown: Messages = [{"role": "system", "content": system}]
    for demo_explanation, demo_texts, answer in demos:
        shown += [{"role": "user", "content": _user_message(demo_explanation, demo_texts)}, {"role": "assistant", "content": answer}]
    return [
        [*shown, {"role": "user", "content": _user_message(explanation, [texts[index] for index in order[first : first + per_prompt]])}]
        for first in range(0, len(order), per_prompt)
    ]


def read_verdicts(answer: str, count: int) -> list[bool] | None:
    """The first [...] on one line of the answer, read as JSON: `count` true/false verdicts, or None when it is not that."""
    match = re.search(r"\[.*?\]", answer)
    try:
        values = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None
    return [bool(value) for value in values] if isinstance(values, list) and len(values) == count else None


@dataclass
class ClassifierResult:
    """One scorer's outcome for one feature."""

    verdicts: list[bool | None]  # per example, in the examples' order: the LLM's 1 (True) or 0, None where unreadable
    score: float  # balanced accuracy (NaN when no answer could be read)
    quantile_accuracy: list[float | None]  # per quantile, strongest first: share of its activating windows got right
    non_activating_accuracy: float | None  # share of the non-activating windows got right


def balanced_accuracy(verdicts: list[bool | None], activating: list[bool]) -> float:
    """(hit rate + correct-rejection rate) / 2 over the examples with a verdict; a class with none counts 0, as in delphi."""
    judged = [(verdict, truth) for verdict, truth in zip(verdicts, activating) if verdict is not None]
    if not judged:
        return math.nan
    positives = [verdict for verdict, truth in judged if truth]
    negatives = [not verdict for verdict, truth in judged if not truth]
    rates = [sum(group) / len(group) if group else 0.0 for group in (positives, negatives)]
    return sum(rates) / 2


def _share_right(pairs: list[tuple[bool | None, bool]]) -> float | None:
    judged = [verdict == truth for verdict, truth in pairs if verdict is not None]
    return sum(judged) / len(judged) if judged else None


def score_answers(
    examples: list[ScoringExample], order: list[int], per_prompt: int, answers: list[str], n_quantiles: int
) -> ClassifierResult:
    """Verdicts from each prompt's answer (see classifier_prompts), and the scores they give."""
    verdicts: list[bool | None] = [None] * len(examples)
    for answer, first in zip(answers, range(0, len(order), per_prompt)):
        batch = order[first : first + per_prompt]
        for index, verdict in zip(batch, read_verdicts(answer, per_prompt) or [None] * len(batch)):  # delphi's count
            verdicts[index] = verdict
    truth = [example.activating for example in examples]
    per_quantile = [
        _share_right([(verdict, True) for verdict, example in zip(verdicts, examples) if example.quantile == quantile])
        for quantile in range(n_quantiles)
    ]
    silent = _share_right([(verdict, False) for verdict, example in zip(verdicts, examples) if not example.activating])
    return ClassifierResult(verdicts, balanced_accuracy(verdicts, truth), per_quantile, silent)
