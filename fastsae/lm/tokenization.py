"""Turn examples into token ids, the way fine-tuning sees them, with a mask of special/template tokens.

For an instruct model each example becomes a conversation rendered by the
model's chat template (a plain text is one user turn; with a response field it
is user + assistant). Tokens that are not part of a message's own content —
BOS, chat markers, role names, a default system prompt — are marked in
`special_mask`, so training can leave them out while the store keeps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from fastsae.common import distributed
from fastsae.common.errors import UserError
from fastsae.lm.data import Example, SkipReport

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_CHOICES = ("auto", "none")
CONTENT_PLACEHOLDER = "<<fastsae message content>>"  # stands in for one message's content to find where it goes
SENTENCEPIECE_SPACE = "▁"  # "▁", which SentencePiece vocabularies (Llama 2's, Mistral's) write for a space


@dataclass
class TokenizedExample:
    token_ids: np.ndarray  # (T,) int32
    special_mask: np.ndarray  # (T,) bool: True for special and chat-template tokens
    truncated: bool
    unlocated_messages: int  # messages whose content the chat template hid or changed past finding: their tokens are marked special


def wants_chat_template(tokenizer, chat_template: str) -> bool:
    """`auto` uses the template whenever the tokenizer has one (instruct models do)."""
    return chat_template == "auto" and getattr(tokenizer, "chat_template", None) is not None


def example_messages(example: Example) -> list[dict[str, str]]:
    if example.messages is not None:
        return example.messages
    messages = [{"role": "user", "content": example.text}]
    if example.response is not None:
        messages.append({"role": "assistant", "content": example.response})
    return messages


def example_label(example: Example) -> str:
    """What outputs call an example: its text, or a conversation's last user turn (not its system prompt, which many
    conversations share)."""
    if example.text is not None:
        return example.text
    return next((message["content"] for message in reversed(example_messages(example)) if message["role"] == "user"), example.source)


def _content_span(
    tokenizer, rendered: str, messages: list[dict[str, str]], index: int, add_generation_prompt: bool
) -> tuple[int, int] | None:
    """Character span of message `index`'s content in `rendered`, or None where the template makes it unfindable.

    Searching `rendered` for the content text mis-places short texts ("user", "a") inside role headers
    or a default system prompt, and misses contents that the template changes (Llama-3 and Gemma trim
    them). Rendering the conversation again with a placeholder as this message's content shows what the
    template puts before and after it; the content is whatever lies between the two.
    """
    placeholder = CONTENT_PLACEHOLDER
    while placeholder in rendered:
        placeholder += "#"
    with_placeholder = [dict(message, content=placeholder) if i == index else message for i, message in enumerate(messages)]
    template = tokenizer.apply_chat_template(with_placeholder, tokenize=False, add_generation_prompt=add_generation_prompt)
    if template.count(placeholder) != 1:
        return None
    prefix, suffix = template.split(placeholder)
    end = len(rendered) - len(suffix)
    if end < len(prefix) or not rendered.startswith(prefix) or not rendered.endswith(suffix):
        return None
    return len(prefix), end


def _template_tokenization(tokenizer, example: Example, add_generation_prompt: bool = False) -> tuple[list[int], np.ndarray, int]:
    """Token ids, their special mask, and how many messages' content could not be located (all their tokens marked special)."""
    messages = example_messages(example)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    spans = [_content_span(tokenizer, rendered, messages, index, add_generation_prompt) for index in range(len(messages))]
    located = [span for span in spans if span is not None]
    # A token is the template's unless it lies in a message's content, whatever its id: a text that quotes "<|im_start|>"
    # is tokenized, as in fine-tuning, to the marker's id, and it is still the message's content.
    special = np.array(
        [not any(start < span_end and end > span_start for span_start, span_end in located) for start, end in encoded["offset_mapping"]],
        dtype=bool,
    )
    return encoded["input_ids"], special, len(spans) - len(located)


def _plain_tokenization(tokenizer, example: Example) -> tuple[list[int], np.ndarray, int]:
    if example.messages is not None:
        # Steering and analyze_texts have no CHAT_TEMPLATE of their own: they tokenize as the SAE's store was extracted.
        raise UserError(
            f"{example.source} is a chat (a 'messages' field), but these examples are tokenized as plain text: CHAT_TEMPLATE is "
            "'none' (for steering and analyze_texts, in the extraction of the SAE's store) or the model has no chat template. "
            "Give plain texts, or extract with CHAT_TEMPLATE = 'auto' from an instruct model."
        )
    text = example.text if example.response is None else f"{example.text}\n{example.response}"
    encoded = tokenizer(text, add_special_tokens=True, return_special_tokens_mask=True)
    return encoded["input_ids"], np.asarray(encoded["special_tokens_mask"], dtype=bool), 0


def tokenize_example(tokenizer, example: Example, use_chat_template: bool, max_length: int) -> TokenizedExample:
    token_ids, special, unlocated = (_template_tokenization if use_chat_template else _plain_tokenization)(tokenizer, example)
    truncated = len(token_ids) > max_length
    return TokenizedExample(
        token_ids=np.asarray(token_ids[:max_length], dtype=np.int32),
        special_mask=special[:max_length],
        truncated=truncated,
        unlocated_messages=unlocated,
    )


def prompt_token_ids(tokenizer, example: Example, use_chat_template: bool) -> list[int]:
    """A prompt to generate from, tokenized as extraction tokenized its examples; a chat ends with the assistant's opening,
    so the model answers. A chat whose last turn is the assistant's is a prefilled answer: it stays open and the model
    continues it (with a new assistant opening after it, the model would answer its own answer)."""
    if not use_chat_template:
        return list(_plain_tokenization(tokenizer, example)[0])
    messages = example_messages(example)
    if messages[-1]["role"] == "assistant":
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(_template_tokenization(tokenizer, example, add_generation_prompt=True)[0])


def tokenize_examples(tokenizer, examples: list[Example], chat_template: str, max_length: int) -> list[TokenizedExample]:
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise UserError(f"CHAT_TEMPLATE must be one of {CHAT_TEMPLATE_CHOICES}, got {chat_template!r}.")
    use_template = wants_chat_template(tokenizer, chat_template)
    if use_template and not tokenizer.is_fast:
        raise UserError(
            "marking chat-template tokens needs a fast tokenizer (with offsets); set CHAT_TEMPLATE = 'none' or use a fast tokenizer."
        )
    logger.info("Tokenizing %d examples (%s)", len(examples), "chat template" if use_template else "plain text")
    tokenized = [
        tokenize_example(tokenizer, example, use_template, max_length)
        for example in tqdm(examples, desc="tokenizing", unit="ex", leave=False, disable=not distributed.current().is_main)
    ]
    n_truncated = sum(item.truncated for item in tokenized)
    if n_truncated:
        logger.warning("Truncated %d of %d examples to MAX_LENGTH=%d tokens", n_truncated, len(tokenized), max_length)
    unlocated = SkipReport()
    for example, item in zip(examples, tokenized):
        if item.unlocated_messages:
            unlocated.add("message content not found in the rendered chat", example.source)
    if unlocated.total:
        logger.warning(
            "The chat template leaves out or rewrites message content in %d of %d examples: those messages' tokens are marked "
            "special (kept in the store, left out of training): %s. Check the template, or for plain texts set CHAT_TEMPLATE = 'none'.",
            unlocated.total,
            len(tokenized),
            unlocated.describe(),
        )
    return tokenized


def with_sentencepiece_space(piece: str, text: str) -> str:
    """`text`, the decoded vocabulary entry `piece`, with the leading space its "▁" stands for: a SentencePiece decoder
    strips it at the start of a sequence, so Llama 2's "▁Hello" decodes to "Hello" there and to " Hello" elsewhere
    (SAEBench's fix for Mistral's tokenizer)."""
    return " " + text if piece.startswith(SENTENCEPIECE_SPACE) and not text.startswith(" ") else text


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text, such that they join into the decoded sequence, leading spaces and all.

    A token decoded alone loses what only its neighbours give: a byte-level tokenizer (SmolLM2's, Llama 3's) splits
    a character such as 日 or an emoji over several tokens, each a lone "\ufffd". So each token gets what it adds to
    the decoded text so far, and a token that ends mid-character adds "": the token that completes the character
    carries it, at the position where the model has read it whole. A SentencePiece token keeps its leading space
    wherever it stands (`with_sentencepiece_space`), so the texts of a sequence that starts with one join into its
    decoded text with that space in front.
    """
    prefixes = tokenizer.batch_decode([token_ids[: end + 1] for end in range(len(token_ids))], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    texts, done = [], ""
    for index, text in enumerate(prefixes):
        if text.endswith("\ufffd") and index + 1 < len(prefixes):  # mid-character: a later token completes it
            texts.append("")
            continue
        added = text[len(done) :] if text.startswith(done) else tokenizer.decode(token_ids[index : index + 1])
        texts.append(with_sentencepiece_space(pieces[index], added))
        done = text
    return texts
