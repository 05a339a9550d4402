"""Tests for fastsae.lm.data.load_dataset: formats, field detection, skipped rows and fingerprints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from fastsae.common.errors import UserError
from fastsae.lm.data import MAX_REASON_EXAMPLES, load_dataset

ROWS = [
    {"text": "I had planned to take the train, but the bus is cheaper.", "label": "planning"},
    {"text": "Maybe I was wrong about her.", "label": "reconsidering"},
    {"text": "Ok.", "label": "committing"},
    {"text": "Why do I assume the meeting has to be an hour long?", "label": "questioning_assumption"},
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Plan my day."},
    {"role": "assistant", "content": "Hardest task first."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    """One row per line; a str row is written as-is (for malformed or blank lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def texts(dataset) -> list:
    return [example.text for example in dataset.examples]


def summary(dataset) -> list[tuple]:
    """What a store keeps of each example, independent of the file format."""
    return [(example.row, example.text, example.response, example.messages, example.label) for example in dataset.examples]


@pytest.fixture
def rows_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "rows.jsonl", ROWS)


# --- JSONL basics -----------------------------------------------------------------------------


def test_jsonl_with_text_and_label(rows_file):
    dataset = load_dataset(rows_file)
    assert dataset.path == str(rows_file)
    assert dataset.text_field == "text" and dataset.label_field == "label"
    assert dataset.n_rows == 4 and dataset.skipped.total == 0
    assert texts(dataset) == [row["text"] for row in ROWS]
    assert [example.label for example in dataset.examples] == [row["label"] for row in ROWS]
    assert [example.source for example in dataset.examples] == ["line 1", "line 2", "line 3", "line 4"]
    assert [example.row for example in dataset.examples] == [0, 1, 2, 3]
    assert all(example.messages is None and example.response is None for example in dataset.examples)


def test_blank_lines_are_ignored_but_keep_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", [ROWS[0], "", "   ", ROWS[1]])
    dataset = load_dataset(path)
    assert texts(dataset) == [ROWS[0]["text"], ROWS[1]["text"]]
    assert [example.source for example in dataset.examples] == ["line 1", "line 4"]
    assert dataset.skipped.total == 0 and dataset.n_rows == 2


@pytest.mark.parametrize("suffix", [".json", ".ndjson", ".JSONL"])
def test_other_jsonl_suffixes(tmp_path, suffix):
    dataset = load_dataset(write_jsonl(tmp_path / f"rows{suffix}", ROWS))
    assert texts(dataset) == [row["text"] for row in ROWS]


def test_non_string_labels_become_strings_and_missing_labels_none(tmp_path):
    path = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a", "label": 3}, {"text": "b"}, {"text": "c", "label": None}])
    dataset = load_dataset(path)
    assert [example.label for example in dataset.examples] == ["3", None, None]


def test_one_number_is_one_label_and_blank_labels_are_none(tmp_path):
    """1, "1" and 1.0 were three labels ("1", "1", "1.0"); NaN was the label "nan", whitespace a label of its own."""
    labels = [1, "1", 1.0, " 1 ", 2.5, True, "", "   ", None]
    path = write_jsonl(tmp_path / "labels.jsonl", [{"text": f"t{index}", "label": label} for index, label in enumerate(labels)])
    path.write_text(path.read_text() + '{"text": "nan", "label": NaN}\n', encoding="utf-8")
    dataset = load_dataset(path)
    assert [example.label for example in dataset.examples] == ["1", "1", "1", "1", "2.5", "True", None, None, None, None]


@pytest.mark.parametrize(
    ("label", "shown"),
    [(["planning", "doubting"], 'a list, ["planning", "doubting"]'), ({"name": "planning"}, 'an object, {"name": "planning"}')],
)
def test_a_label_that_is_a_list_or_an_object_is_refused_naming_its_row(tmp_path, label, shown):
    """str() made a label of its own of each list or object ("['planning', 'doubting']"), silently."""
    path = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a", "label": "planning"}, {"text": "b", "label": label}])
    with pytest.raises(UserError) as error:
        load_dataset(path)
    assert str(error.value) == (
        f"{path}, line 2: the label field 'label' holds {shown}, not one label. Give each row one string or number as its "
        "label (multi-label data: one row per label), or set LABEL_FIELD (or --label-field) to another field, or to '' for no labels."
    )
    assert [example.label for example in load_dataset(path, label_field="").examples] == [None, None]


def test_a_parquet_list_label_is_refused_and_its_long_value_shortened(tmp_path):
    path = tmp_path / "labels.parquet"
    pd.DataFrame({"text": ["a"], "labels": [[f"label number {index}" for index in range(10)]]}).to_parquet(path, index=False)
    with pytest.raises(UserError) as error:
        load_dataset(path)
    assert 'row 0: the label field \'labels\' holds a list, ["label number 0", "label number 1", "label number 2", "l..., not' in str(
        error.value
    )


def test_parquet_integer_labels_with_a_null_stay_integers(tmp_path):
    """pandas reads an integer column with a null as floats: the labels were "1.0", "2.0"."""
    path = tmp_path / "labels.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1, None, 2]}).to_parquet(path, index=False)
    assert [example.label for example in load_dataset(path).examples] == ["1", None, "2"]


def test_label_field_auto_picks_category_and_empty_means_none(tmp_path):
    path = write_jsonl(tmp_path / "category.jsonl", [{"text": "a", "category": "x"}, {"text": "b", "category": "y"}])
    assert [example.label for example in load_dataset(path).examples] == ["x", "y"]
    assert load_dataset(path).label_field == "category"
    no_labels = load_dataset(path, label_field="")
    assert no_labels.label_field is None
    assert [example.label for example in no_labels.examples] == [None, None]


# --- text field detection ---------------------------------------------------------------------


@pytest.mark.parametrize("field", ["text", "content", "prompt"])
def test_auto_detects_plain_text_fields(tmp_path, field):
    path = write_jsonl(tmp_path / "data.jsonl", [{field: "first text", "id": 1}, {field: "second text", "id": 2}])
    dataset = load_dataset(path)
    assert dataset.text_field == field
    assert texts(dataset) == ["first text", "second text"]
    assert dataset.label_field is None


def test_auto_detection_prefers_text_over_content_and_prompt(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "content": "c", "text": "t"}])
    dataset = load_dataset(path)
    assert dataset.text_field == "text"
    assert texts(dataset) == ["t"]


def test_auto_detects_chat_messages(tmp_path):
    with_extra_key = [{**CHAT[0], "name": "ignored"}, *CHAT[1:]]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": with_extra_key, "label": "planning"}, {"messages": CHAT[1:2]}])
    dataset = load_dataset(path)
    assert dataset.text_field == "messages"
    assert [example.messages for example in dataset.examples] == [CHAT, CHAT[1:2]]
    assert all(example.text is None for example in dataset.examples)
    assert [example.label for example in dataset.examples] == ["planning", None]
    assert [example.source for example in dataset.examples] == ["line 1", "line 2"]


def test_explicit_text_field_that_is_not_a_candidate(tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "hello", "text": "not this one"}])
    dataset = load_dataset(path, text_field="body")
    assert dataset.text_field == "body"
    assert texts(dataset) == ["hello"]


def test_explicit_text_field_in_no_row_lists_available_fields(rows_file):
    with pytest.raises(UserError) as error:
        load_dataset(rows_file, text_field="body")
    message = str(error.value)
    assert "'body'" in message
    assert "the rows have: label, text" in message


def test_no_candidate_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "hello"}])
    with pytest.raises(UserError, match=r"no text field found .*looked for text, content, prompt, messages.*TEXT_FIELD"):
        load_dataset(path)


def test_no_candidate_text_field_names_the_columns_there_are(tmp_path):
    """The message listed the names it looked for, not the CSV's own columns to choose from."""
    path = tmp_path / "reviews.csv"
    path.write_text("review_body,stars\nGreat.,5\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_dataset(path)
    assert str(error.value) == (
        f"no text field found in {path}: looked for text, content, prompt, messages; the rows have: review_body, stars. "
        "Set TEXT_FIELD (or --text-field) to the one holding the text."
    )


# --- file-level errors ------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.jsonl"
    with pytest.raises(UserError, match="dataset not found") as error:
        load_dataset(path)
    assert str(path) in str(error.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(UserError, match="empty") as error:
        load_dataset(path)
    assert str(path) in str(error.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("some text\n")
    with pytest.raises(UserError, match=r"unsupported dataset format '\.txt'"):
        load_dataset(path)


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "rows.jsonl", ROWS)
    with pytest.raises(UserError, match="not a dataset saved with datasets' save_to_disk") as error:
        load_dataset(folder)
    assert str(folder) in str(error.value)


# --- skipped rows -----------------------------------------------------------------------------


def test_malformed_json_line_is_skipped_and_reported_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [ROWS[0], '{"text": "unterminated', ROWS[1]])
    dataset = load_dataset(path)
    assert texts(dataset) == [ROWS[0]["text"], ROWS[1]["text"]]
    assert [example.source for example in dataset.examples] == ["line 1", "line 3"]
    assert dataset.skipped.counts == Counter({"malformed JSON": 1})
    assert dataset.skipped.total == 1
    assert dataset.skipped.where["malformed JSON"][0].startswith("line 2: ")
    assert dataset.skipped.describe().startswith("1 × malformed JSON (line 2: ")
    assert dataset.n_rows == 3


def test_line_that_is_not_utf8_is_skipped_and_reported_with_its_line(tmp_path):
    """A Latin-1 'é' on line 2: the line is left out (not decoded into other text), the rest of the file loads."""
    path = tmp_path / "mixed_encoding.jsonl"
    lines = [json.dumps(ROWS[0]).encode(), '{"text": "café au lait"}'.encode("latin-1"), json.dumps(ROWS[1]).encode()]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a BOM, as Windows editors save it
    dataset = load_dataset(path)
    assert texts(dataset) == [ROWS[0]["text"], ROWS[1]["text"]]
    assert [example.source for example in dataset.examples] == ["line 1", "line 3"]
    assert dataset.skipped.counts == Counter({"not UTF-8": 1}) and dataset.n_rows == 3
    assert dataset.skipped.describe() == "1 × not UTF-8 (line 2: invalid continuation byte 0xe9 at byte 14)"


def test_bad_rows_are_skipped_with_their_reasons(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "good one"},
            {"body": "no text field"},
            {"text": 5},
            {"text": ["a", "list"]},
            {"text": "   \n\t"},
            {"text": ""},
            [1, 2, 3],
            {"text": "good two"},
        ],
    )
    dataset = load_dataset(path)
    assert texts(dataset) == ["good one", "good two"]
    assert [example.row for example in dataset.examples] == [0, 7]
    assert dataset.skipped.counts == Counter(
        {
            "missing field 'text'": 1,
            "'text' is not a string": 2,
            "empty text": 2,
            "row is not an object": 1,
        }
    )
    assert dataset.skipped.where == {
        "missing field 'text'": ["line 2"],
        "'text' is not a string": ["line 3", "line 4"],
        "empty text": ["line 5", "line 6"],
        "row is not an object": ["line 7"],
    }
    description = dataset.skipped.describe()
    assert "2 × empty text (line 5, line 6)" in description
    assert "1 × missing field 'text' (line 2)" in description
    assert dataset.n_rows == 8


def test_bad_messages_are_skipped_each_with_what_is_wrong(tmp_path):
    not_a_list, no_role = "messages is not a non-empty list", "a message has no string role"
    parts = "a message's content is a list of parts (OpenAI style), not one string: join its text parts"
    not_text = "a message's content is not a string (a tool call's null content?)"
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": CHAT},
            {"messages": "just a string"},
            {"messages": []},
            {"messages": [{"role": "user"}]},
            {"messages": [{"role": "user", "content": 5}]},
            {"messages": [{"role": None, "content": "hi"}]},
            {"messages": [CHAT[0], "not a dict"]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            {"messages": [CHAT[0], {"role": "assistant", "content": None, "tool_calls": []}]},
        ],
    )
    dataset = load_dataset(path)
    assert [example.messages for example in dataset.examples] == [CHAT]
    assert dataset.skipped.where == {
        not_a_list: ["line 2", "line 3"],
        not_text: ["line 4", "line 5", "line 9"],
        no_role: ["line 6"],
        "a message is not a {role, content} object": ["line 7"],
        parts: ["line 8"],
    }
    assert f"1 × {parts} (line 8)" in dataset.skipped.describe()


def test_a_reason_met_often_names_its_first_lines_only(tmp_path):
    dataset = load_dataset(write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}] * 7 + [{"text": "kept"}]))
    assert dataset.skipped.where["empty text"] == [f"line {number}" for number in range(1, 1 + MAX_REASON_EXAMPLES)]
    assert dataset.skipped.describe() == "7 × empty text (line 1, line 2, line 3, line 4, line 5, ...)"


def test_chat_whose_messages_are_all_empty_is_an_empty_text(tmp_path):
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}, {"messages": CHAT}],
    )
    dataset = load_dataset(path)
    assert [example.messages for example in dataset.examples] == [CHAT]
    assert dataset.skipped.where == {"empty text": ["line 1"]}


def test_chat_without_a_user_message_is_skipped_with_its_reason(tmp_path):
    """A system prompt alone, or assistant turns alone, were examples: no conversation a model answers."""
    reason = "a chat with no user message that has text (system or assistant turns only)"
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"messages": CHAT[:1]},
            {"messages": CHAT[2:]},
            {"messages": [CHAT[0], CHAT[2]]},
            {"messages": [{"role": "user", "content": " "}, CHAT[2]]},
            {"messages": CHAT},
            {"messages": CHAT[1:2]},
        ],
    )
    dataset = load_dataset(path)
    assert [example.messages for example in dataset.examples] == [CHAT, CHAT[1:2]]
    assert dataset.skipped.where == {reason: ["line 1", "line 2", "line 3", "line 4"]}
    assert dataset.n_rows == 6


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"text": 3}, {"text": "  "}])
    with pytest.raises(UserError, match="no usable rows") as error:
        load_dataset(path)
    assert "2 × empty text (line 1, line 3)" in str(error.value)
    assert "'text' is not a string (line 2)" in str(error.value)


def test_all_lines_malformed_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "not json"])
    with pytest.raises(UserError, match=r"2 × malformed JSON \(line 1: .*line 2: "):
        load_dataset(path)


# --- response field and max_examples ----------------------------------------------------------


def test_response_field(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "q1", "answer": "a1"},
            {"prompt": "q2"},
            {"prompt": "q3", "answer": "   "},
            {"prompt": "q4", "answer": 4},
            {"prompt": "q5", "answer": "a5"},
        ],
    )
    dataset = load_dataset(path, response_field="answer")
    assert [(example.text, example.response) for example in dataset.examples] == [("q1", "a1"), ("q5", "a5")]
    assert dataset.skipped.counts == Counter({"missing or empty response field 'answer'": 3})
    assert dataset.skipped.where["missing or empty response field 'answer'"] == ["line 2", "line 3", "line 4"]


def test_response_field_in_no_row_is_an_error(rows_file):
    with pytest.raises(UserError, match=r"response field 'answer' is in no row; the rows have: label, text"):
        load_dataset(rows_file, response_field="answer")


def test_max_examples_counts_usable_examples(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], {"text": ""}, ROWS[1], ROWS[2], ROWS[3]])
    dataset = load_dataset(path, max_examples=2)
    assert texts(dataset) == [ROWS[0]["text"], ROWS[1]["text"]]
    assert [example.row for example in dataset.examples] == [0, 2]
    assert dataset.skipped.counts == Counter({"empty text": 1})
    assert len(load_dataset(path, max_examples=0).examples) == 4
    assert len(load_dataset(path, max_examples=100).examples) == 4


def test_max_examples_reports_only_the_rows_it_read(tmp_path):
    """The malformed and non-UTF-8 lines after the stop were counted as skipped, and n_rows was the whole file's."""
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(ROWS[0]), "{oops", json.dumps({"text": ""}), json.dumps(ROWS[1]), "{oops", '{"text": "\xe9"}', json.dumps(ROWS[2])]
    path.write_bytes(b"\n".join(line.encode("latin-1") for line in lines) + b"\n")
    dataset = load_dataset(path, max_examples=2)
    assert [(example.row, example.text) for example in dataset.examples] == [(0, ROWS[0]["text"]), (3, ROWS[1]["text"])]
    assert dataset.skipped.where == {
        "malformed JSON": ["line 2: Expecting property name enclosed in double quotes"],
        "empty text": ["line 3"],
    }
    assert dataset.n_rows == 4 == len(dataset.examples) + dataset.skipped.total
    everything = load_dataset(path)
    assert everything.skipped.counts == Counter({"malformed JSON": 2, "empty text": 1, "not UTF-8": 1})
    assert everything.n_rows == 7 == len(everything.examples) + everything.skipped.total


def test_max_examples_stops_before_a_csv_row_it_does_not_read(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\nfirst,a\nsecond,b,extra\nthird,c\n", encoding="utf-8")
    dataset = load_dataset(path, max_examples=1)
    assert texts(dataset) == ["first"]
    assert dataset.skipped.total == 0 and dataset.n_rows == 1


# --- CSV, Parquet and saved HF datasets -------------------------------------------------------


def test_csv_loads_the_same_examples_as_jsonl(tmp_path, rows_file):
    path = tmp_path / "rows.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    from_csv, from_jsonl = load_dataset(path), load_dataset(rows_file)
    assert summary(from_csv) == summary(from_jsonl)
    assert from_csv.fingerprint() == from_jsonl.fingerprint()
    assert (from_csv.text_field, from_csv.label_field) == ("text", "label")
    assert [example.source for example in from_csv.examples] == ["line 2", "line 3", "line 4", "line 5"]


def test_parquet_loads_the_same_examples_as_jsonl(tmp_path, rows_file):
    path = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(path, index=False)
    from_parquet, from_jsonl = load_dataset(path), load_dataset(rows_file)
    assert summary(from_parquet) == summary(from_jsonl)
    assert from_parquet.fingerprint() == from_jsonl.fingerprint()
    assert [example.source for example in from_parquet.examples] == ["row 0", "row 1", "row 2", "row 3"]


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty-printed"])
def test_json_array_loads_the_same_examples_as_jsonl(tmp_path, rows_file, indent):
    path = tmp_path / "alpaca.json"
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(ROWS, indent=indent).encode())  # a BOM and a blank first line
    from_array, from_jsonl = load_dataset(path), load_dataset(rows_file)
    assert summary(from_array) == summary(from_jsonl)
    assert from_array.fingerprint() == from_jsonl.fingerprint()
    assert (from_array.text_field, from_array.label_field, from_array.n_rows) == ("text", "label", 4)
    assert [example.source for example in from_array.examples] == ["item 0", "item 1", "item 2", "item 3"]


def test_json_array_items_are_rows_skipped_and_reported_as_jsonl_lines_are(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"instruction": "Plan my day.", "output": "Hardest task first."}, 3, {"instruction": ""}], indent=2))
    dataset = load_dataset(path, text_field="instruction", response_field="output")
    assert [(example.row, example.text, example.response) for example in dataset.examples] == [(0, "Plan my day.", "Hardest task first.")]
    assert dataset.skipped.counts == Counter({"row is not an object": 1, "empty text": 1})
    assert dataset.skipped.where == {"row is not an object": ["item 1"], "empty text": ["item 2"]}
    assert dataset.n_rows == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[\n  {"text": "a"},\n  {"text": }\n]', "not one valid JSON array: Expecting value at line 3, column 12"),
        (b'[{"text": "caf\xe9"}]', r"not UTF-8 \(invalid continuation byte 0xe9 at byte 15\)"),
    ],
)
def test_a_broken_json_array_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_dataset(path)


def test_rows_with_another_text_field_are_skipped_naming_it(tmp_path):
    """A file mixing plain texts and chats: auto reads `text` from every row, and the chats' skip reason says what they hold."""
    chat = {"messages": [{"role": "user", "content": "Plan my day."}]}
    dataset = load_dataset(write_jsonl(tmp_path / "mixed.jsonl", [{"text": "A plain text."}, chat, chat, {"body": "neither"}]))
    assert texts(dataset) == ["A plain text."]
    hint = "missing field 'text' (it has 'messages': TEXT_FIELD reads one field from every row; split the file to read both)"
    assert dataset.skipped.where == {hint: ["line 2", "line 3"], "missing field 'text'": ["line 4"]}


def test_csv_empty_cell_is_a_missing_field(tmp_path):
    path = tmp_path / "gaps.csv"
    pd.DataFrame([{"text": "first", "label": "a"}, {"text": None, "label": "b"}, {"text": "third", "label": None}]).to_csv(
        path, index=False
    )
    dataset = load_dataset(path)
    assert texts(dataset) == ["first", "third"]
    assert [example.label for example in dataset.examples] == ["a", None]
    assert dataset.skipped.counts == Counter({"missing field 'text'": 1})
    assert dataset.skipped.where["missing field 'text'"] == ["line 3"]


def test_csv_cells_stay_the_texts_they_are(tmp_path):
    """pandas read "NA", "null" and "None" as missing and a numbers column with a gap as floats ("1" became "1.0")."""
    path = tmp_path / "cells.csv"
    path.write_text("text,label\nNA,1\nnull,2\nNone,\n42,3\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert [(example.text, example.label) for example in dataset.examples] == [("NA", "1"), ("null", "2"), ("None", None), ("42", "3")]
    assert dataset.skipped.total == 0


def test_csv_rows_are_located_by_the_line_they_start_on(tmp_path):
    """A quoted cell with a comma and a newline, CRLF line ends, a BOM and a blank line; line numbers count them."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\r\n"Plan it, then\r\ndo it.",a\r\n\r\nOk.,b\r\n,c\r\n')
    dataset = load_dataset(path)
    assert [(example.text, example.label, example.source) for example in dataset.examples] == [
        ("Plan it, then\r\ndo it.", "a", "line 2"),
        ("Ok.", "b", "line 5"),
    ]
    assert dataset.skipped.where == {"missing field 'text'": ["line 6"]}


def test_csv_with_semicolons_reads_its_columns(tmp_path):
    path = tmp_path / "excel_de.csv"
    path.write_text("text;label\nMaybe I was wrong, again.;reconsidering\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert [(example.text, example.label) for example in dataset.examples] == [("Maybe I was wrong, again.", "reconsidering")]


def test_csv_column_names_are_read_without_the_spaces_around_them(tmp_path):
    """A hand-written "text, label" header named a column ' label': no label was found, silently."""
    path = tmp_path / "spaced.csv"
    path.write_text(" text , label\nMaybe I was wrong.,reconsidering\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert (dataset.text_field, dataset.label_field) == ("text", "label")
    assert [(example.text, example.label) for example in dataset.examples] == [("Maybe I was wrong.", "reconsidering")]


def test_csv_that_names_a_column_twice_is_refused(tmp_path):
    """Each row got the last non-empty cell of the two 'text' columns: "second" for the first row, "x" for the next."""
    path = tmp_path / "twice.csv"
    path.write_text("text,label,text,,\nfirst,a,second,,\nx,b,,,\n", encoding="utf-8")  # unnamed columns, as Excel leaves
    with pytest.raises(UserError) as error:
        load_dataset(path)
    assert str(error.value) == f"{path}: the header names column 'text' more than once (columns 1, 3). Rename them apart."


def test_csv_row_with_more_cells_than_the_header_is_skipped_with_its_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\nfirst,a\nsecond,b,extra\nthird,c\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert texts(dataset) == ["first", "third"]
    assert dataset.skipped.describe() == "1 × more cells than the CSV header (line 3: 3 cells, the header names 2)"
    assert dataset.n_rows == 3


def test_csv_cell_longer_than_the_csv_modules_limit_is_read_whole(tmp_path):
    """A text over 128 KiB stopped the load with the csv module's "field larger than field limit (131072)"."""
    long_text = "word " * 40_000
    path = tmp_path / "long.csv"
    path.write_text(f"text,label\n{long_text},a\nshort,b\n", encoding="utf-8")
    assert [(example.text, example.label) for example in load_dataset(path).examples] == [(long_text, "a"), ("short", "b")]


def test_csv_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ncafé\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.csv is not UTF-8 \(invalid continuation byte 0xe9 at byte 9\)\. Save it as UTF-8\."):
        load_dataset(path)


@pytest.mark.parametrize("name", ["excel.csv", "notepad.jsonl", "array.json"])
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_named_as_such(tmp_path, name, encoding):
    """A JSONL file was read as every line malformed or not UTF-8; a CSV as "not UTF-8 (invalid start byte 0xff ...)"."""
    path = tmp_path / name
    content = {"excel.csv": "text\nOk.\n", "notepad.jsonl": '{"text": "Ok."}\n', "array.json": '[{"text": "Ok."}]'}[name]
    path.write_bytes(("\ufeff" + content).encode(encoding))
    with pytest.raises(UserError) as error:
        load_dataset(path)
    assert str(error.value) == f"{path} is UTF-16 (its first bytes are a UTF-16 byte-order mark). Save it as UTF-8."


def test_saved_hf_dataset_folder(tmp_path, rows_file):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    dataset = load_dataset(folder)
    assert summary(dataset) == summary(load_dataset(rows_file))
    assert [example.source for example in dataset.examples] == ["row 0", "row 1", "row 2", "row 3"]


def test_saved_hf_chat_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "chat"
    datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:]}]).save_to_disk(str(folder))
    dataset = load_dataset(folder)
    assert dataset.text_field == "messages"
    assert [example.messages for example in dataset.examples] == [CHAT, CHAT[1:]]


def test_saved_dataset_dict_uses_the_train_split(tmp_path):
    import datasets

    folder = tmp_path / "dict"
    splits = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list([{"text": "held out", "label": "t"}]),
            "train": datasets.Dataset.from_list(ROWS[:2]),
        }
    )
    splits.save_to_disk(str(folder))
    dataset = load_dataset(folder)
    assert texts(dataset) == [ROWS[0]["text"], ROWS[1]["text"]]
    assert [example.label for example in dataset.examples] == ["planning", "reconsidering"]


def test_saved_dataset_dict_without_train_uses_its_first_split(tmp_path):
    import datasets

    folder = tmp_path / "dict"
    splits = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_list([{"text": "first split"}]),
            "test": datasets.Dataset.from_list([{"text": "second split"}]),
        }
    )
    splits.save_to_disk(str(folder))
    assert texts(load_dataset(folder)) == ["first split"]


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_equal_for_identical_content_in_different_files(tmp_path, rows_file):
    copy = write_jsonl(tmp_path / "copy.jsonl", ROWS)
    first, second = load_dataset(rows_file), load_dataset(copy)
    assert first.path != second.path
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 16


def test_fingerprint_changes_when_one_text_changes(tmp_path, rows_file):
    edited = [dict(row) for row in ROWS]
    edited[2]["text"] = "Ok!"
    changed = write_jsonl(tmp_path / "edited.jsonl", edited)
    assert load_dataset(rows_file).fingerprint() != load_dataset(changed).fingerprint()


def test_fingerprint_changes_when_a_label_or_the_order_changes(tmp_path, rows_file):
    relabelled = [dict(row) for row in ROWS]
    relabelled[0]["label"] = "doubting"
    reordered = [ROWS[1], ROWS[0], *ROWS[2:]]
    base = load_dataset(rows_file).fingerprint()
    assert load_dataset(write_jsonl(tmp_path / "relabelled.jsonl", relabelled)).fingerprint() != base
    assert load_dataset(write_jsonl(tmp_path / "reordered.jsonl", reordered)).fingerprint() != base


@pytest.mark.parametrize(
    ("name", "document", "message"),
    [
        (
            "wrapped.json",
            {"data": [{"text": "a"}, {"text": "b"}]},
            r"holds one JSON object, not one example per line \('data' holds a list",
        ),
        ("array.jsonl", [{"text": "a"}, {"text": "b"}], r"holds one JSON array, not JSON Lines: name it .json"),
    ],
)
def test_one_pretty_printed_json_document_says_what_it_holds(tmp_path, name, document, message):
    """Read as JSON Lines, every line of it was reported as malformed JSON."""
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=2))
    with pytest.raises(UserError, match=message):
        load_dataset(path)


@pytest.mark.parametrize("name, content", [("header.csv", "text,label\n"), ("array.json", "[]")])
def test_a_file_without_rows_names_the_setting_to_change(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=rf"{name} holds no rows \(a header or an empty array only\)\. Add examples, or set TEXTS_FILE"):
        load_dataset(tmp_path / name, path_setting="TEXTS_FILE")


def test_a_tsv_file_splits_at_tabs_only(tmp_path):
    """A one-column header cannot show the delimiter: a .tsv's is the tab, so a text's commas stay in it."""
    path = tmp_path / "texts.tsv"
    path.write_text("text\nFirst, I plan; then I act.\nSecond\n", encoding="utf-8")
    assert [example.text for example in load_dataset(path).examples] == ["First, I plan; then I act.", "Second"]
