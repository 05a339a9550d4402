"""Load examples (plain texts or chat conversations) from JSONL, a JSON array, CSV or TSV, Parquet or a saved HF dataset.

Rows that cannot be used are skipped and counted with their reason, never
silently; a file whose rows are all bad is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastsae.common.errors import UserError

logger = logging.getLogger(__name__)

TEXT_FIELD_CANDIDATES = ("text", "content", "prompt", "messages")
LABEL_FIELD_CANDIDATES = ("label", "labels", "category")
MAX_REASON_EXAMPLES = 5
MALFORMED_JSON = "malformed JSON"
NOT_UTF8 = "not UTF-8"
TOO_MANY_CELLS = "more cells than the CSV header"
NO_USER_MESSAGE = "a chat with no user message that has text (system or assistant turns only)"
CSV_DELIMITERS = (",", ";", "\t", "|")  # the first wins a tie, so a one-column header reads as comma-separated


@dataclass
class Example:
    """One usable row: either a plain `text` (with an optional `response`) or chat `messages`.

    `row` is its index among the file's rows (a line that could not be read is one, a blank line is not); `source`
    says where the row is ("line 12") for messages.
    """

    row: int
    source: str
    text: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    label: str | None = None


@dataclass(frozen=True)
class UnreadableRow:
    """A line that never became a row (malformed JSON, not UTF-8, more cells than the CSV header), yet is a row of the
    file: kept in its place among the rows, so it is reported where it falls and MAX_EXAMPLES stops the report where it
    stops reading."""

    reason: str
    detail: str


@dataclass
class SkipReport:
    """Rows left out, by reason, with the first few row/line numbers of each."""

    counts: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, location: str) -> None:
        self.counts[reason] += 1
        self.where.setdefault(reason, [])
        if len(self.where[reason]) < MAX_REASON_EXAMPLES:
            self.where[reason].append(location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        parts = []
        for reason, count in self.counts.most_common():
            shown = ", ".join(self.where[reason])
            more = ", ..." if count > len(self.where[reason]) else ""
            parts.append(f"{count} × {reason} ({shown}{more})")
        return "; ".join(parts)


@dataclass
class Dataset:
    """Loaded examples plus what was skipped and which fields were used."""

    path: str
    examples: list[Example]
    skipped: SkipReport
    text_field: str
    label_field: str | None
    n_rows: int

    def fingerprint(self) -> str:
        """Hash of the usable content, so a store can tell whether it came from the same data."""
        digest = hashlib.sha256()
        for example in self.examples:
            record = [example.row, example.text, example.response, example.messages, example.label]
            digest.update(json.dumps(record, sort_keys=True).encode())
        return digest.hexdigest()[:16]


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """Rows of a JSONL file. Lines are read as bytes and decoded one by one, so a line that is not UTF-8 is
    skipped and reported like malformed JSON; decoding the file as text would stop at it, or, with a lenient
    `errors=`, silently change its text."""
    rows: list[tuple[str, Any]] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            location = f"line {line_number}"
            try:
                line = raw.decode("utf-8-sig")  # -sig: files saved on Windows often start with a BOM
            except UnicodeDecodeError as error:
                rows.append((location, UnreadableRow(NOT_UTF8, _where_not_utf8(error))))
                continue
            if not line.strip():
                continue
            try:
                rows.append((location, json.loads(line)))
            except json.JSONDecodeError as error:
                rows.append((location, UnreadableRow(MALFORMED_JSON, error.msg)))
    return rows


def _refuse_utf16(path: Path) -> None:
    """Excel's and Notepad's "Unicode" saves are UTF-16: read as UTF-8, every line of them was malformed or not UTF-8."""
    with path.open("rb") as handle:
        if handle.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise UserError(f"{path} is UTF-16 (its first bytes are a UTF-16 byte-order mark). Save it as UTF-8.")


def _starts_with_array(path: Path) -> bool:
    """Whether a `.json` file holds one JSON array (Alpaca-style `[{...}, ...]`) rather than JSON Lines."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf")
    return head.lstrip().startswith(b"[")


def _read_json_array(path: Path) -> list[tuple[str, Any]]:
    """The items of a JSON array, each a row located by its index ("item 0", as Python and jq count). The array is
    one JSON document, so a syntax error or a byte that is not UTF-8 cannot be skipped row by row: it stops the load."""
    try:
        items = json.loads(_decode_whole(path))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} starts with '[' but is not one valid JSON array: {error.msg} at line {error.lineno}, column {error.colno}. "
            "Fix the file, or write one JSON object per line (JSON Lines)."
        ) from None
    return [(f"item {index}", item) for index, item in enumerate(items)]


def _refuse_one_json_document(path: Path) -> None:
    """A file with no JSON Lines row may be one pretty-printed document: say what it holds, not that every line is malformed."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(document, list):
        raise UserError(f"{path} holds one JSON array, not JSON Lines: name it .json, or write one JSON object per line.")
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        inside = f" ({', '.join(repr(key) for key in lists)} holds a list: save that list as a .json array)" if lists else ""
        raise UserError(f"{path} holds one JSON object, not one example per line{inside}. Write one JSON object per line (JSON Lines).")


def _decode_whole(path: Path) -> str:
    """The text of a file that must be decoded as one piece (a JSON array, a CSV whose cells may hold newlines)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: files saved on Windows often start with a BOM
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 ({_where_not_utf8(error)}). Save it as UTF-8.") from None


def _where_not_utf8(error: UnicodeDecodeError) -> str:
    return f"{error.reason} 0x{error.object[error.start]:02x} at byte {error.start + 1}"


def _read_csv(path: Path, delimiter: str | None = None) -> list[tuple[str, Any]]:
    """Rows of a CSV file, each located by the line it starts on; an empty cell is a missing field.

    Read with the csv module, not pandas, because pandas reads the texts "NA", "null" or "None" as missing, turns a
    column of numbers into floats ("1" becomes 1.0 when another cell is empty) and numbers rows past a cell holding a
    newline wrongly. The delimiter is the one of `CSV_DELIMITERS` the header line holds most (Excel writes ';' in
    many locales), unless `delimiter` is given (a .tsv file's tab); a row with more cells than the header is skipped,
    as no cell can be matched to its column. Column names are read without the spaces around them, and must differ.
    """
    text = _decode_whole(path)
    header_line = text.split("\n", 1)[0]
    delimiter = delimiter or max(CSV_DELIMITERS, key=header_line.count)
    # The csv module refuses a cell over 128 KiB (a long document) by default: allow one as long as the file.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]  # "text, label": the column is 'label', not ' label'
    _refuse_repeated_column(path, header)
    rows: list[tuple[str, Any]] = []
    start = reader.line_num + 1
    for cells in reader:
        location, start = f"line {start}", reader.line_num + 1
        if not cells:  # a blank line
            continue
        if len(cells) > len(header):
            rows.append((location, UnreadableRow(TOO_MANY_CELLS, f"{len(cells)} cells, the header names {len(header)}")))
            continue
        rows.append((location, {name: cell for name, cell in zip(header, cells) if cell != ""}))
    return rows


def _refuse_repeated_column(path: Path, header: list[str]) -> None:
    """Two columns of one name left a row the last non-empty cell of the two: texts mixed from both, silently."""
    for name in dict.fromkeys(header):
        columns = [str(index + 1) for index, other in enumerate(header) if other == name]
        if name and len(columns) > 1:
            raise UserError(f"{path}: the header names column {name!r} more than once (columns {', '.join(columns)}). Rename them apart.")


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pandas as pd

    records = pd.read_parquet(path).to_dict(orient="records")
    # pandas turns missing cells into NaN floats (dropped: "missing") and list cells into arrays (back to lists).
    cleaned = [
        {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in record.items() if not _is_missing(value)}
        for record in records
    ]
    return [(f"row {index}", record) for index, record in enumerate(cleaned)]


def _is_missing(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _read_hf_dataset(path: Path) -> list[tuple[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        logger.info("Using split %r of the dataset dictionary at %s", split, path)
        loaded = loaded[split]
    return [(f"row {index}", record) for index, record in enumerate(loaded)]


def read_rows(path: Path, path_setting: str = "DATASET") -> list[tuple[str, Any]]:
    """Raw rows of a dataset file or saved dataset folder, each with a location for messages (an `UnreadableRow` where a
    line could not be read); `path_setting` is the constant that named the file, for the messages."""
    if not path.exists():
        flag = "--" + path_setting.lower().replace("_", "-")
        raise UserError(f"dataset not found: {path}. Set {path_setting} (or {flag}) to a JSONL, CSV or Parquet file.")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise UserError(
                f"{path} is a folder but not a dataset saved with datasets' save_to_disk. "
                f"Point {path_setting} at a JSONL, CSV or Parquet file, or at such a folder."
            )
        return _read_hf_dataset(path)
    if path.stat().st_size == 0:
        raise UserError(f"dataset file is empty: {path}. Add examples (one JSON object per line for JSONL).")
    _refuse_utf16(path)
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with_array(path):
        return _read_json_array(path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(path)
        if all(isinstance(record, UnreadableRow) for _, record in rows):
            _refuse_one_json_document(path)
        return rows
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else None)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(
        f"unsupported dataset format {suffix!r} for {path}: use .jsonl, .json (JSON Lines or one array of objects), .csv, .tsv, .parquet or a saved dataset folder."
    )


def _fields_in_rows(rows: list[tuple[str, Any]]) -> list[str]:
    return sorted({key for _, record in rows if isinstance(record, dict) for key in record})


def _detect_field(rows: list[tuple[str, Any]], requested: str, candidates: tuple[str, ...], what: str) -> str | None:
    keys = _fields_in_rows(rows)
    if requested not in ("auto", ""):
        if requested not in keys:
            available = ", ".join(keys) or "none"
            raise UserError(f"{what} field {requested!r} is in no row; the rows have: {available}. Set the field name to one of them.")
        return requested
    if requested == "":
        return None
    for candidate in candidates:
        if candidate in keys:
            return candidate
    return None


def _parse_messages(value: Any) -> list[dict[str, str]] | str:
    """The chat's {role, content} messages, or why they are unusable: a reason per kind of fault, so the report says
    what to fix (OpenAI's content parts, a tool call's null content) rather than one reason for all."""
    if not isinstance(value, list) or not value:
        return "messages is not a non-empty list"
    messages = []
    for message in value:
        if not isinstance(message, dict):
            return "a message is not a {role, content} object"
        if not isinstance(message.get("role"), str):
            return "a message has no string role"
        content = message.get("content")
        if isinstance(content, list):
            return "a message's content is a list of parts (OpenAI style), not one string: join its text parts"
        if not isinstance(content, str):
            return "a message's content is not a string (a tool call's null content?)"
        messages.append({"role": message["role"], "content": content})
    return messages


def load_dataset(
    path: str | Path,
    text_field: str = "auto",
    response_field: str = "",
    label_field: str = "auto",
    max_examples: int = 0,
    path_setting: str = "DATASET",
) -> Dataset:
    """Read and validate examples; `text_field="auto"` picks text, content, prompt or messages. `path_setting` names the
    constant that gave `path` (TEXTS_FILE, PROMPTS_FILE), so that messages name what to change.

    With `max_examples`, reading stops at the row that completes them: `n_rows` and the skip report cover the rows
    read, so that n_rows = examples + skipped."""
    path = Path(path)
    rows = read_rows(path, path_setting)
    if not rows:
        raise UserError(f"{path} holds no rows (a header or an empty array only). Add examples, or set {path_setting} to another file.")
    chosen_text = _detect_field(rows, text_field, TEXT_FIELD_CANDIDATES, "text")
    if chosen_text is None and any(isinstance(record, dict) for _, record in rows):
        raise UserError(
            f"no text field found in {path}: looked for {', '.join(TEXT_FIELD_CANDIDATES)}; "
            f"the rows have: {', '.join(_fields_in_rows(rows)) or 'none'}. Set TEXT_FIELD (or --text-field) to the one holding the text."
        )  # with no object among the rows, every row is skipped below and the error says why
    chosen_label = _detect_field(rows, label_field, LABEL_FIELD_CANDIDATES, "label")
    if chosen_label:
        _refuse_labels_that_are_collections(path, rows, chosen_label)
    chosen_response = _detect_field(rows, response_field, (), "response") if response_field else None

    skipped = SkipReport()
    examples: list[Example] = []
    n_rows = len(rows)
    for row_index, (location, record) in enumerate(rows):
        if max_examples and len(examples) >= max_examples:
            n_rows = row_index
            logger.info("Read the first %d of %d rows of %s: they hold the %d examples asked for", n_rows, len(rows), path, max_examples)
            break
        example = _example_from_record(row_index, location, record, chosen_text, chosen_response, chosen_label, skipped)
        if example is not None:
            examples.append(example)
    if not examples:
        raise UserError(f"no usable rows in {path}: {skipped.describe()}. Fix the rows or choose another TEXT_FIELD.")
    if skipped.total:
        logger.warning("Skipped %d of %d rows of %s: %s", skipped.total, n_rows, path, skipped.describe())
    return Dataset(
        path=str(path),
        examples=examples,
        skipped=skipped,
        text_field=chosen_text,
        label_field=chosen_label,
        n_rows=n_rows,
    )


def _example_from_record(
    row_index: int,
    location: str,
    record: Any,
    text_field: str,
    response_field: str | None,
    label_field: str | None,
    skipped: SkipReport,
) -> Example | None:
    if isinstance(record, UnreadableRow):
        skipped.add(record.reason, f"{location}: {record.detail}")
        return None
    if not isinstance(record, dict):
        skipped.add("row is not an object", location)
        return None
    if text_field not in record:
        # A file mixing plain texts and chats: TEXT_FIELD reads one field from every row, so name the other one.
        other = next((field for field in TEXT_FIELD_CANDIDATES if field in record), None)
        hint = f" (it has {other!r}: TEXT_FIELD reads one field from every row; split the file to read both)" if other else ""
        skipped.add(f"missing field {text_field!r}{hint}", location)
        return None
    value = record[text_field]
    label = _label_text(record.get(label_field)) if label_field else None
    if text_field == "messages":
        messages = _parse_messages(value)
        if isinstance(messages, str):
            skipped.add(messages, location)
            return None
        if not any(message["content"].strip() for message in messages):
            skipped.add("empty text", location)  # as a plain text would be: only template tokens, nothing to train on
            return None
        if not any(message["role"] == "user" and message["content"].strip() for message in messages):
            # Not a conversation the model answers, as in fine-tuning; some chat templates (Gemma's) refuse one.
            skipped.add(NO_USER_MESSAGE, location)
            return None
        return Example(row=row_index, source=location, messages=messages, label=label)
    if not isinstance(value, str):
        skipped.add(f"{text_field!r} is not a string", location)
        return None
    if not value.strip():
        skipped.add("empty text", location)
        return None
    response = None
    if response_field:
        response = record.get(response_field)
        if not isinstance(response, str) or not response.strip():
            skipped.add(f"missing or empty response field {response_field!r}", location)
            return None
    return Example(row=row_index, source=location, text=value, response=response, label=label)


def _refuse_labels_that_are_collections(path: Path, rows: list[tuple[str, Any]], label_field: str) -> None:
    """A list or object has no one text to group examples by: as text ("['a', 'b']") it became a label of its own."""
    for location, record in rows:
        value = record.get(label_field) if isinstance(record, dict) else None
        if isinstance(value, (list, dict)):
            shown = json.dumps(value, ensure_ascii=False, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            kind = "a list" if isinstance(value, list) else "an object"
            raise UserError(
                f"{path}, {location}: the label field {label_field!r} holds {kind}, {shown}, not one label. "
                "Give each row one string or number as its label (multi-label data: one row per label), "
                "or set LABEL_FIELD (or --label-field) to another field, or to '' for no labels."
            )


def _label_text(value: Any) -> str | None:
    """A label as the text later steps group examples by. 1, "1" and 1.0 are one label: a JSON file may mix them, and
    pandas reads a Parquet integer column with a null as floats. true and false are "True" and "False", as pandas
    writes a boolean column to a CSV. Missing, NaN and blank labels are no label."""
    if value is None or _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() or None
