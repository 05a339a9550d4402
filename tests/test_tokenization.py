"""Chat-template rendering as in fine-tuning, with template tokens marked, on SmolLM2's real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from fastsae.common.errors import UserError
from fastsae.lm.data import Example
from fastsae.lm.tokenization import tokenize_example, tokenize_examples


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
    with pytest.raises(UserError, match="need a chat template"):
        tokenize_example(smollm2_tokenizer, Example(row=0, source="line 1", messages=[{"role": "user", "content": "hi"}]), False, 512)


def test_long_examples_are_truncated_and_counted(smollm2_tokenizer):
    examples = [Example(row=i, source=f"line {i + 1}", text=text) for i, text in enumerate(["short", "word " * 200])]
    tokenized = tokenize_examples(smollm2_tokenizer, examples, "auto", 64)
    assert [item.truncated for item in tokenized] == [False, True]
    assert len(tokenized[1].token_ids) == 64 and tokenized[1].token_ids.dtype == np.int32
    assert len(tokenized[1].special_mask) == 64
