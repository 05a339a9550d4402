"""SAEBench's prompted first-letter task: which tokens are words, and the prompts that ask for a word's first letter.

Read off sae-bench 0.6.0's `evals/absorption/vocab.py` (`get_alpha_tokens`), `prompting.py` (`create_icl_prompt`,
`first_letter_formatter`) and `probing.py` (`create_dataset_probe_training`):

- A **word** is a token of the model's own tokenizer that is ASCII letters only, after an optional leading space
  (" cat", "Transaction"), as the tokenizer writes it as text.
- A **prompt** is plain text, never a chat template: a newline, then `max_icl_examples` in-context lines
  "{word} has the first letter: W" for other words, then "{word} has the first letter:" for the word asked about.
  The model reads it with its BOS token in front, as TransformerLens' `to_tokens` gives it to SAEBench.
- The word's activation is read `prompt_token_pos` tokens from the end (-6: the word, before " has the first
  letter:"). SAEBench assumes the word is one token there; a word the template splits or merges with its
  neighbours is left out of the vocabulary here (SAEBench would read the wrong token for it).

Randomness follows SAEBench's calls one for one on a `random.Random` (SAEBench uses the global one): a shuffle of
the vocabulary, then `random.sample` of the in-context words for each prompt, drawn again while it contains the word.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastsae.lm.tokenization import with_sentencepiece_space

LETTERS = string.ascii_lowercase
EXAMPLE_SEPARATOR = "\n"  # between in-context lines, and before the first (SAEBench's prepend_separator_to_first_example)


@dataclass(frozen=True)
class Word:
    """One vocabulary token as text (" cat") with its id."""

    text: str
    token_id: int

    @property
    def letter(self) -> int:
        """The index in LETTERS of the word's first letter (what the probes predict)."""
        return LETTERS.index(self.text.strip()[0].lower())

    @property
    def answer(self) -> str:
        """What follows the template in an in-context line: a space and the capital letter (SAEBench's first_letter_formatter)."""
        return " " + self.text.strip()[0].upper()


@dataclass(frozen=True)
class SpellingPrompt:
    """A prompt asking for `word`'s first letter, with in-context examples; `text` ends before the answer."""

    word: Word
    text: str


def token_text(tokenizer, token: str) -> str:
    """A vocabulary entry as text; a SentencePiece "▁" keeps its space."""
    return with_sentencepiece_space(token, tokenizer.convert_tokens_to_string([token]))


def is_alpha_word(text: str) -> bool:
    body = text[1:] if text.startswith(" ") else text
    return bool(body) and all(char in string.ascii_letters for char in body)


def alpha_words(tokenizer) -> list[Word]:
    """Every token that is a word (see the module docstring), in token-id order."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [Word(token_text(tokenizer, token), token_id) for token, token_id in vocabulary]
    return [word for word in words if is_alpha_word(word.text)]


def with_bos(tokenizer, token_ids: list[int]) -> list[int]:
    """BOS in front when the tokenizer has one, as TransformerLens' default `prepend_bos` adds it."""
    return token_ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *token_ids]


def prompt_token_ids(tokenizer, prompts: Sequence[SpellingPrompt]) -> list[np.ndarray]:
    """Each prompt as the model reads it: BOS, then the plain text's tokens."""
    if not prompts:
        return []
    encoded = tokenizer([prompt.text for prompt in prompts], add_special_tokens=False)["input_ids"]
    return [np.asarray(with_bos(tokenizer, ids), dtype=np.int64) for ids in encoded]


def tokenizes_in_place(tokenizer, words: Sequence[Word], template: str, position: int) -> list[bool]:
    """Whether each word stays one token, `position` tokens from the end of its prompt line (checked on the line alone)."""
    lines = [EXAMPLE_SEPARATOR + template.format(word=word.text) for word in words]
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    return [len(ids) >= -position and ids[position] == word.token_id for ids, word in zip(encoded, words)]


def icl_prompt(word: Word, examples: Sequence[Word], rng: random.Random, template: str, max_icl_examples: int) -> SpellingPrompt:
    """SAEBench's `create_icl_prompt` as its absorption eval calls it: shuffled examples that never include the word."""
    chosen = rng.sample(examples, max_icl_examples)
    while word.text in {example.text for example in chosen}:
        chosen = rng.sample(examples, max_icl_examples)
    lines = [template.format(word=example.text) + example.answer for example in chosen]
    text = EXAMPLE_SEPARATOR + EXAMPLE_SEPARATOR.join([*lines, template.format(word=word.text)])
    return SpellingPrompt(word, text)


def train_test_prompts(
    words: Sequence[Word], rng: random.Random, template: str, max_icl_examples: int, train_fraction: float
) -> tuple[list[SpellingPrompt], list[SpellingPrompt]]:
    """SAEBench's `create_dataset_probe_training`: shuffle, split by word, one prompt per word with examples from its own split."""
    shuffled = rng.sample(list(words), len(words))
    split = int(len(shuffled) * train_fraction)
    train, test = shuffled[:split], shuffled[split:]
    return (
        [icl_prompt(word, train, rng, template, max_icl_examples) for word in train],
        [icl_prompt(word, test, rng, template, max_icl_examples) for word in test],
    )
