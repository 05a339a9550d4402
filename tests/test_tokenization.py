"""Chat-template rendering as in fine-tuning, with template tokens marked, on SmolLM2's real tokenizer; each token's
text on a SentencePiece tokenizer."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer

from fastsae.common.errors import UserError
from fastsae.lm.data import Example
from fastsae.lm.tokenization import example_label, prompt_token_ids, token_texts, tokenize_example, tokenize_examples


def content_text(tokenizer, tokenized) -> str:
    return tokenizer.decode(tokenized.token_ids[~tokenized.special_mask])


def test_plain_text_becomes_a_user_turn_with_the_template_marked(smollm2_tokenizer):
    text = "I keep second-guessing the route I picked."
    tokenized = tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", text=text), True, 512)
    rendered = smollm2_tokenizer.decode(tokenized.token_ids)
    assert rendered.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{text}<|im_end|>" in rendered
    assert content_text(smollm2_tokenizer, tokenized) == text
    assert tokenized.special_mask.sum() > 10  # system prompt, markers and role names are all marked


def test_response_field_adds_an_assistant_turn(smollm2_tokenizer):
    example = Example(row=0, source="line 1", text="Should I switch teams?", response="Compare what each team would teach you.")
    tokenized = tokenize_example(smollm2_tokenizer, example, True, 512)
    assert "<|im_start|>assistant\nCompare what each team would teach you.<|im_end|>" in smollm2_tokenizer.decode(tokenized.token_ids)
    assert content_text(smollm2_tokenizer, tokenized) == "Should I switch teams?Compare what each team would teach you."


def test_chat_messages_keep_every_turns_content(smollm2_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Plan my morning."},
        {"role": "assistant", "content": "Gym, then email."},
    ]
    tokenized = tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", messages=messages), True, 512)
    decoded = smollm2_tokenizer.decode(tokenized.token_ids)
    assert "You are a helpful AI assistant" not in decoded  # the default system prompt only comes when none is given
    assert content_text(smollm2_tokenizer, tokenized) == "Be brief.Plan my morning.Gym, then email."


def test_no_template_tokenizes_the_plain_text(smollm2_tokenizer):
    tokenized = tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", text="Just the text."), False, 512)
    assert smollm2_tokenizer.decode(tokenized.token_ids) == "Just the text."
    assert not tokenized.special_mask.any()
    with pytest.raises(UserError, match="^line 1 is a chat .* tokenized as plain text: CHAT_TEMPLATE is 'none'"):
        tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", messages=[{"role": "user", "content": "hi"}]), False, 512)


def test_long_examples_are_truncated_and_counted(smollm2_tokenizer):
    examples = [Example(row=i, source=f"line {i + 1}", text=text) for i, text in enumerate(["short", "word " * 200])]
    tokenized = tokenize_examples(smollm2_tokenizer, examples, "auto", 64)
    assert [item.truncated for item in tokenized] == [False, True]
    assert len(tokenized[1].token_ids) == 64 and tokenized[1].token_ids.dtype == np.int32
    assert len(tokenized[1].special_mask) == 64


SMOLLM2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# Llama-3.x and Gemma render `message['content'] | trim`; this is SmolLM2's layout with that filter.
TRIMMING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}{% endfor %}"
)


def content_positions(tokenizer, before: str, content: str) -> list[int]:
    """Token positions of `content` in a rendered chat that reads `before` + `content` + a special token."""
    start = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    return list(range(start, start + len(tokenizer(content, add_special_tokens=False)["input_ids"])))


@pytest.fixture()
def trimming_tokenizer(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = TRIMMING_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("text", ["I doubt the forecast.\n", "  I doubt the forecast. \n\n"])
def test_a_trimming_template_keeps_the_content_of_a_text_with_surrounding_whitespace(trimming_tokenizer, text):
    tokenized = tokenize_example(trimming_tokenizer, Example(row=0, source="line 1", text=text), True, 512)
    assert tokenized.unlocated_messages == 0
    expected = content_positions(trimming_tokenizer, "<|im_start|>user\n", "I doubt the forecast.")
    assert np.flatnonzero(~tokenized.special_mask).tolist() == expected
    assert content_text(trimming_tokenizer, tokenized) == "I doubt the forecast."


@pytest.mark.parametrize(
    ("text", "response"),
    [("user", None), ("What is 2+2?", "a"), ("Hugging Face", None), ("Hugging Face", "Hugging Face")],
)
def test_contents_that_also_occur_in_the_template_are_marked_where_the_message_is(smollm2_tokenizer, text, response):
    example = Example(row=0, source="line 1", text=text, response=response)
    tokenized = tokenize_example(smollm2_tokenizer, example, True, 512)
    before_text = SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\n"
    expected = content_positions(smollm2_tokenizer, before_text, text)
    if response is not None:
        expected += content_positions(smollm2_tokenizer, before_text + text + "<|im_end|>\n<|im_start|>assistant\n", response)
    assert np.flatnonzero(~tokenized.special_mask).tolist() == expected
    assert tokenized.unlocated_messages == 0


def test_content_the_template_leaves_out_is_counted_and_reported(smollm2_tokenizer, caplog):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan my morning."}]
    examples = [
        Example(row=0, source="line 1", messages=with_system),
        Example(row=1, source="line 2", text="Plan my evening."),
        Example(row=2, source="line 3", messages=with_system),
    ]
    with caplog.at_level(logging.WARNING, logger="fastsae.lm.tokenization"):
        tokenized = tokenize_examples(tokenizer, examples, "auto", 512)
    assert [item.unlocated_messages for item in tokenized] == [1, 0, 1]
    assert content_text(tokenizer, tokenized[0]) == "Plan my morning."
    assert "in 2 of 3 examples" in caplog.text and "(line 1, line 3)" in caplog.text


def test_a_conversation_is_called_by_its_last_user_turn_not_its_shared_system_prompt():
    system = {"role": "system", "content": "You are a helpful assistant."}
    chat = [system, {"role": "user", "content": "First?"}, {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Why?"}]
    assert example_label(Example(0, "line 1", messages=chat)) == "Why?"
    assert example_label(Example(1, "line 2", text="Plain.", response="Answer.")) == "Plain."
    assert example_label(Example(2, "line 3", messages=[system])) == "line 3"


def test_a_text_that_quotes_a_template_marker_is_content(smollm2_tokenizer):
    """The marker's text becomes the marker's token id (as in fine-tuning), and was marked special for that id alone."""
    text = "Wrap each turn in <|im_start|> and <|im_end|>, then <|endoftext|>."
    tokenized = tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", text=text), True, 512)
    expected = content_positions(smollm2_tokenizer, SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\n", text)
    assert np.flatnonzero(~tokenized.special_mask).tolist() == expected
    assert content_text(smollm2_tokenizer, tokenized) == text
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenized.token_ids[~tokenized.special_mask]


def test_a_prompt_whose_last_turn_is_the_assistants_is_continued(smollm2_tokenizer):
    """Steering a prefilled answer: a new assistant opening after it made the model answer its own answer."""
    chat = [{"role": "user", "content": "Plan my day."}, {"role": "assistant", "content": "First, coffee. Then"}]
    ids = prompt_token_ids(smollm2_tokenizer, Example(row=0, source="test", messages=chat), use_chat_template=True)
    text = smollm2_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\nFirst, coffee. Then") and text.count("<|im_start|>assistant") == 1
    answered = prompt_token_ids(smollm2_tokenizer, Example(row=0, source="test", messages=chat[:1]), use_chat_template=True)
    assert smollm2_tokenizer.decode(answered).endswith("<|im_start|>assistant\n")  # a user's last turn gets the opening


def sentencepiece_tokenizer() -> LlamaTokenizer:
    """A Llama 2-style tokenizer ("▁"-marked words, BPE, byte fallback, a decoder that strips the first space),
    trained here on a few sentences."""
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    sentences = ["Hello world, hello there.", "The world says hello to the sea.", "Hello again, world!"]
    trained.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])


def test_a_sentencepiece_token_shows_its_leading_space_wherever_it_stands():
    """Llama 2's decoder strips the space of a sequence's first "▁" token, so "▁Hello" read "Hello" at the start of an
    example or a window, and " Hello" anywhere else."""
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer("Hello world 日本 Hello", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "▁Hello" and tokenizer.decode(ids).startswith("Hello")
    texts = token_texts(tokenizer, ids)
    assert texts[0] == texts[-1] == " Hello"
    assert token_texts(tokenizer, ids[1:])[0] == texts[1] == " world"  # a window that starts mid-example
    assert "".join(texts) == " " + tokenizer.decode(ids) and len(texts) == len(ids)
    assert "日" in texts and "本" in texts  # each character whole, on the last of its byte-fallback tokens
