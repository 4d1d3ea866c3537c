"""Instruction and preference data: loading, validation, chat formatting and PPO queries (lesson 03).

Chat formatting lives here and only here: every module that turns an instruction into model input calls
`chat_prompt` / `chat_text`, so the SFT data, the reward model, PPO rollouts and evaluation all see the same text.

    ds = load_instruction_data("data.jsonl")              # mode detected: "score" or "preference"
    queries = tokenize_prompts(ds, tokenizer, max_prompt_length=256)
    loader = DataLoader(queries, batch_size=8, collate_fn=PromptCollator(tokenizer.pad_token_id))

Every problem in the input raises one error type, `DataValidationError` (a `ValueError`), whose message names the
row (the line number for jsonl/json/csv files, the index for in-memory rows), the field, what was found and what
was expected -- never a traceback from deep inside pyarrow, datasets or the JSON/CSV readers.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import math
import numbers
import sys
import warnings
from pathlib import Path

# The fields each mode needs, in the order the returned dataset lists them.
MODES = {
    "score": ("instruction", "response", "score"),        # one reference answer and its rating
    "preference": ("prompt", "chosen", "rejected"),       # a better and a worse answer to one prompt
    "prompt": ("instruction",),                           # prompts only (PPO queries, evaluation); never detected
}
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


class DataValidationError(ValueError):
    """Input data that cannot be used as it is; the message says where, which field, what was found and expected."""


def chat_prompt(tokenizer, instruction: str, system: str | None = None) -> str:
    """The prompt text a chat model sees for one user `instruction`, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_text(tokenizer, instruction: str, response: str, system: str | None = None) -> str:
    """Prompt plus `response` plus the end-of-turn token: the full text of one exchange."""
    return chat_prompt(tokenizer, instruction, system) + response + tokenizer.eos_token


# --------------------------------------------------------------------------------------------- reading rows


def _show(value, limit: int = 60) -> str:
    """A value as an error message quotes it: repr, shortened, with its type."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        text = f"an integer of {len(str(abs(value))) if value.bit_length() < 14000 else 'over 4000'} digits"
        return f"{text} ({type(value).__name__})"  # repr of a huge int is slow, or refused past 4300 digits
    try:
        text = repr(value)
    except Exception:  # a repr that fails (a broken object, nesting deeper than the recursion limit)
        text = f"<{type(value).__name__} object>"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 (a leading BOM is dropped); undecodable bytes are reported with their line and byte offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataValidationError(
            f"{name} line {line}: found undecodable bytes {raw[err.start:err.start + 4]!r} at byte {err.start}, "
            "expected UTF-8 text (re-save the file as UTF-8)") from None


class _LongInteger(Exception):
    """Raised from inside the JSON decoder for an integer literal Python refuses to convert (over 4300 digits)."""

    def __init__(self, digits: str):
        super().__init__(digits)
        self.digits = digits


def _parse_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # sys.get_int_max_str_digits(): a guard against very slow conversions
        raise _LongInteger(digits) from None


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _unreadable_json(err: Exception, where: str) -> DataValidationError:
    """The error for JSON that is well formed but that Python cannot read: a huge integer or very deep nesting."""
    if isinstance(err, _LongInteger):
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or "any number of"
        return DataValidationError(f"{where}: found an integer literal of {len(err.digits.lstrip('-'))} digits "
                                   f"({err.digits[:20]}...), expected numbers of at most {limit} digits")
    return DataValidationError(f"{where}: found JSON nested too deeply to read (deeper than Python's recursion "
                               "limit), expected rows of plain fields")


def _json_lines(text: str, name: str):
    """(where, row) for each non-blank line of a JSON-lines text."""
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines: \n, \r\n and \r all end a line
        if not line.strip():
            continue
        try:
            row = _DECODER.decode(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{name} line {number}: malformed JSON ({err.msg} at column {err.colno}): "
                                      f"found {line[:60]!r}, expected one JSON object per line") from None
        except (_LongInteger, RecursionError) as err:
            raise _unreadable_json(err, f"{name} line {number}") from None
        yield f"{name} line {number}", row


def _json_array(text: str, name: str):
    """(where, row) for each item of a top-level JSON array, with the line each item starts on."""
    decoder, rows = _DECODER, []

    def fail(position: int, expected: str):
        line = text.count("\n", 0, position) + 1
        found = repr(text[position:position + 20]) if position < len(text) else "the end of the file"
        raise DataValidationError(f"{name} line {line}: malformed JSON: found {found}, expected {expected}")

    def skip_space(position: int) -> int:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        return position

    position = skip_space(text.index("[") + 1)
    if position < len(text) and text[position] == "]":
        position += 1
    else:
        while True:
            if position >= len(text):
                fail(position, "an array item or ']'")
            line = text.count("\n", 0, position) + 1
            try:
                row, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                raise DataValidationError(f"{name} line {err.lineno}: malformed JSON ({err.msg} at column "
                                          f"{err.colno}), expected a JSON array of objects") from None
            except (_LongInteger, RecursionError) as err:
                if isinstance(err, _LongInteger):
                    line = text.count("\n", 0, max(text.find(err.digits, position), position)) + 1
                raise _unreadable_json(err, f"{name} line {line}") from None
            rows.append((f"{name} line {line}", row))
            position = skip_space(position)
            if position < len(text) and text[position] == ",":
                position = skip_space(position + 1)
            elif position < len(text) and text[position] == "]":
                position += 1
                break
            else:
                fail(position, "',' or ']' after an array item")
    if skip_space(position) < len(text):
        fail(skip_space(position), "nothing after the closing ']'")
    return rows


def _read_json(text: str, name: str):
    stripped = text.strip()
    if stripped.startswith("["):
        return _json_array(text, name)
    try:
        whole = _DECODER.decode(stripped)
    except json.JSONDecodeError:
        return list(_json_lines(text, name))  # many ".json" files are really JSON lines
    except (_LongInteger, RecursionError) as err:  # in the first value: the file's first line or its one object
        start = len(text) - len(text.lstrip())
        at = text.find(err.digits) if isinstance(err, _LongInteger) else start
        line = text.count("\n", 0, max(at, start)) + 1
        raise _unreadable_json(err, f"{name} line {line}") from None
    if isinstance(whole, dict):
        tables = [key for key, value in whole.items() if isinstance(value, list)]
        if len(tables) == 1:  # {"data": [...]} and similar wrappers
            return [(f"{name} {tables[0]}[{i}]", row) for i, row in enumerate(whole[tables[0]])]
        return [(f"{name} line 1", whole)]
    raise DataValidationError(f"{name} line 1: found {_show(whole)}, expected a JSON array of objects or JSON lines")


def _read_csv(text: str, name: str):
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, min(len(text) + 1, 2**31 - 1)))  # a long text field is data, not an error
    try:
        return _csv_rows(text, name)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(text: str, name: str):
    extra, missing = "\0extra", "\0missing"  # markers csv uses for rows longer / shorter than the header
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=extra, restval=missing)

    def records():  # the reader's own complaints (csv.Error) still name the line
        while True:
            try:
                yield next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataValidationError(f"{name} line {reader.line_num}: found text the CSV reader rejects "
                                          f"({err}), expected comma-separated values") from None

    try:
        header = reader.fieldnames
    except csv.Error as err:
        raise DataValidationError(f"{name} line 1: found a header the CSV reader rejects ({err}), "
                                  "expected comma-separated column names") from None
    if not header:
        return []
    seen = set()
    for column in header:
        if column in seen:  # a dict row would keep only the last of the two values
            raise DataValidationError(f"{name} line 1: found the column {column!r} twice in the header, "
                                      "expected each column name once")
        seen.add(column)
    rows = []
    for row in records():
        # line_num is where the record ends; a quoted value may span lines, so count back to where it starts
        spans = sum(value.count("\n") for value in row.values() if isinstance(value, str))
        where = f"{name} line {reader.line_num - spans}"
        if extra in row:
            raise DataValidationError(f"{where}: found {len(reader.fieldnames) + len(row[extra])} values, "
                                      f"expected {len(reader.fieldnames)} (the header's columns); quote fields with commas")
        if any(value == missing for value in row.values()):
            count = sum(value != missing for value in row.values())
            raise DataValidationError(f"{where}: found {count} values, expected {len(reader.fieldnames)} "
                                      "(the header's columns)")
        if any(value.strip() for value in row.values()):  # blank lines load
            rows.append((where, row))
    return rows


def _read_parquet(path: Path, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataValidationError(f"{name}: found a file pyarrow cannot read as parquet ({err}), "
                                  "expected a parquet table") from None
    with warnings.catch_warnings():  # e.g. nanoseconds dropped from timestamps: the typed column keeps them
        warnings.simplefilter("ignore")
        rows = table.to_pylist()
    return [(f"{name} row {i}", row) for i, row in enumerate(rows)], table


def _is_missing(value) -> bool:
    """pandas' markers for a missing cell: NaN, NaT, pd.NA (and None)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        type(value).__name__ in {"NaTType", "NAType"}


def _read_source(source):
    """(where, row) pairs, whether values came from CSV text (so numbers arrive as strings), and the source's own
    typed Arrow columns by name where it has them (parquet), which extra columns keep when datasets can use them."""
    import datasets

    if isinstance(source, (str, Path)):
        path = Path(source)
        name = path.name
        suffix = path.suffix.lower()
        if suffix not in EXTENSIONS:
            raise DataValidationError(f"{path}: found extension {suffix or '(none)'!r}, "
                                      f"expected one of {', '.join(EXTENSIONS)}")
        if not path.is_file():
            found = "a directory" if path.is_dir() else "no such file"
            raise DataValidationError(f"{path}: found {found}, expected an existing {suffix} file")
        if suffix == ".parquet":
            rows, table = _read_parquet(path, name)
            return rows, False, {column: table.column(column) for column in table.column_names}
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise DataValidationError(f"{path}: found a file that cannot be read ({type(err).__name__}: "
                                      f"{err.strerror or err}), expected a readable {suffix} file") from None
        text = _decode(raw, name)
        if suffix == ".jsonl":
            return list(_json_lines(text, name)), False, {}
        if suffix == ".json":
            return (_read_json(text, name) if text.strip() else []), False, {}
        return _read_csv(text, name), True, {}
    if isinstance(source, datasets.DatasetDict):
        raise DataValidationError(f"source: found a DatasetDict with splits {list(source)}, "
                                  "expected one split (e.g. ds['train'])")
    if isinstance(source, datasets.Dataset):
        return [(f"index {i}", row) for i, row in enumerate(source)], False, {}
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        # a missing cell is NaN, NaT or pd.NA in pandas; here it is None, as datasets.Dataset.from_pandas reads it
        rows = [{k: None if _is_missing(v) else v for k, v in row.items()} for row in source.to_dict("records")]
        return [(f"index {i}", row) for i, row in enumerate(rows)], False, {}
    if isinstance(source, (list, tuple)):
        return [(f"index {i}", row) for i, row in enumerate(source)], False, {}
    raise DataValidationError(f"source: found {type(source).__name__}, expected a path (.jsonl/.json/.csv/.parquet), "
                              "a list of dicts or a datasets.Dataset")


# --------------------------------------------------------------------------------------------- validating rows


def _names(row: dict) -> list:
    """A row's field names, sorted for a message (names of mixed types sort by their text)."""
    return sorted(row, key=str)


def _detect_mode(where: str, row: dict) -> str:
    for mode in ("preference", "score"):
        if any(field in row for field in MODES[mode][:2]):
            return mode
    raise DataValidationError(
        f"{where}: found fields {_names(row)}, expected either instruction/response/score (score mode) or "
        "prompt/chosen/rejected (preference mode); pass mode='prompt' for instructions alone")


def _check_text(where: str, field: str, value) -> str:
    if not isinstance(value, str):
        raise DataValidationError(f"{where}: field {field!r}: found {_show(value)}, expected a string")
    if not value.strip():
        raise DataValidationError(f"{where}: field {field!r}: found {'empty' if not value else 'blank'} text "
                                  f"{value!r}, expected non-blank text")
    return value


def _check_score(where: str, value, from_csv: bool) -> float:
    """A score as a float: any real number (int, float, numpy scalar, Decimal) that is finite as a 64-bit float.

    CSV scores arrive as text and are parsed with `float`; bools are refused (True is not a rating)."""
    if from_csv and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise DataValidationError(f"{where}: field 'score': found {value[:40]!r}, expected a number") from None
        shown = repr(value[:40] + ("..." if len(value) > 40 else ""))
    else:
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
            raise DataValidationError(f"{where}: field 'score': found {_show(value)}, expected a number")
        try:
            number = float(value)
        except (OverflowError, ValueError):  # an int or Decimal beyond float range, a signalling Decimal NaN
            number = math.nan if isinstance(value, decimal.Decimal) and value.is_nan() else math.inf
        shown = _show(value)
    if not math.isfinite(number):
        reason = "" if math.isnan(number) else " (at most about 1.8e308, the float64 range)"
        raise DataValidationError(f"{where}: field 'score': found {shown}, expected a finite number{reason}")
    return number


def _check_row(where: str, row, mode: str, first_where: str, from_csv: bool) -> dict:
    if not isinstance(row, dict):
        raise DataValidationError(f"{where}: found {_show(row)}, expected an object with fields {list(MODES[mode])}")
    other = "score" if mode == "preference" else "preference"
    if mode != "prompt" and any(f in row for f in MODES[other][:2]) and not any(f in row for f in MODES[mode][:2]):
        raise DataValidationError(
            f"{where}: found a {other}-mode row (fields {_names(row)}), expected a {mode}-mode row like the ones "
            f"before it (fields {list(MODES[mode])}, mode detected at {first_where}); keep one mode per dataset")
    out = {}
    for field in MODES[mode]:
        if field not in row:
            hint = next((f" (found {k!r}: names must match exactly, in case and spaces)" for k in row
                         if isinstance(k, str) and k.strip().lower() == field), "")
            raise DataValidationError(f"{where}: field {field!r}: found it missing{hint}, "
                                      f"expected the fields {list(MODES[mode])}")
        value = row[field]
        out[field] = _check_score(where, value, from_csv) if field == "score" else _check_text(where, field, value)
    if mode == "preference" and out["chosen"].strip() == out["rejected"].strip():
        raise DataValidationError(f"{where}: field 'rejected': found the same text as 'chosen' "
                                  f"({out['chosen'][:40]!r}), expected a different answer")
    for key, value in row.items():
        if key not in out:
            if not isinstance(key, str):
                raise DataValidationError(f"{where}: found a field name {_show(key)}, expected string field names")
            out[key] = value
    return out


def _column(values):
    """`values` (a list, or an Arrow array) as one datasets column, or None when datasets cannot store them.

    A one-column Dataset is built to find out: besides Arrow's own refusals (1 next to "x", integers beyond 64 bits,
    dicts whose values change type) datasets refuses some Arrow types (maps) and very deep nesting."""
    import datasets

    try:
        return datasets.Dataset.from_dict({"column": values}).data.column("column")
    except Exception:  # whatever the reason, the caller falls back to JSON text, checked value by value
        return None


def _arrow_type(values: list) -> str:
    import pyarrow as pa

    try:
        return str(pa.array(values).type)
    except Exception:
        return "none"


def _json_default(value):
    """json.dumps' fallback for values JSON has no type for but that have an obvious text or list form."""
    if hasattr(value, "tolist") and not isinstance(value, type):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(type(value).__name__)


def _as_json_text(rows: list[tuple[str, dict]], column: str) -> list:
    out = []
    for where, row in rows:
        value = row.get(column)
        try:
            out.append(None if value is None else json.dumps(value, ensure_ascii=False, default=_json_default))
        except (TypeError, ValueError, RecursionError):
            raise DataValidationError(
                f"{where}: field {column!r}: found {_show(value)}, expected a value JSON can write (text, a number "
                "of at most 4300 digits, bool, None, or a list or dict of these) in a column whose rows mix types"
            ) from None
    return out


def _to_dataset(rows: list[tuple[str, dict]], fields: tuple[str, ...], typed: dict):
    """A datasets.Dataset; an extra column that datasets cannot store as one type is kept as JSON text, with a warning.

    Arrow (under datasets) stores one type per column: a column mixing 1 and "x", dicts whose values change type
    from row to row, or integers beyond 64 bits has none. Such a column is written as JSON text (json.loads gives
    each value back; a missing value stays None) and a warning names the column, the first row that does not fit
    and the type of the rows before it. `typed` holds the source's own Arrow columns (parquet): an extra column
    keeps its type (uint64, timestamps in ns, ...) when datasets can use it.
    """
    import datasets

    columns = list(fields) + sorted({key for _, row in rows for key in row} - set(fields))
    data = {column: [row.get(column) for _, row in rows] for column in columns}
    for column in columns[len(fields):]:
        values = data[column]
        stored = _column(typed[column]) if column in typed and len(typed[column]) == len(rows) else None
        stored = stored if stored is not None else _column(values)
        if stored is not None:
            data[column] = stored
            continue
        low, high = 1, len(values)  # the shortest prefix datasets refuses: its last row is the first that does not fit
        while low < high:
            middle = (low + high) // 2
            if _column(values[:middle]) is None:
                high = middle
            else:
                low = middle + 1
        before = _arrow_type(values[:low - 1]) if low > 1 else "null"
        why = (f"which does not fit the type of the rows before it ({before})" if before not in {"null", "none"}
               else "which no single column type can hold")
        data[column] = _as_json_text(rows, column)
        warnings.warn(f"{rows[low - 1][0]}: field {column!r}: found {_show(values[low - 1])}, {why}; a column holds "
                      f"one type, so column {column!r} is kept as JSON text (json.loads gives each value back)",
                      UserWarning, stacklevel=3)
    return datasets.Dataset.from_dict(data)


def load_instruction_data(source, mode: str | None = None):
    """Load and validate instruction data as a `datasets.Dataset`.

    source: a path (.jsonl, .json, .csv, .parquet), a list of dicts, a `datasets.Dataset` or a pandas DataFrame.
    mode: "score" (instruction, response, score), "preference" (prompt, chosen, rejected) or "prompt"
        (instruction only); None detects score/preference from the first row.

    Harmless variations load: a UTF-8 BOM, blank lines, CRLF line endings, any language, long texts (CSV fields
    too), scores as numpy numbers or Decimals, and extra columns, which are kept as they are. An extra column that
    Arrow cannot store as one type (1 in one row and "x" in another, dicts whose values change type, integers
    beyond 64 bits, maps, very deep nesting) is kept as JSON text -- json.loads gives each value back -- with a
    UserWarning naming the column and the first row that does not fit; a missing extra field is None. Parquet
    extra columns keep their own Arrow type where datasets has one. In a pandas DataFrame a missing cell (NaN,
    NaT, pd.NA) is None, as `datasets.Dataset.from_pandas` reads it.
    Anything else raises `DataValidationError` naming the row, the field, what was found and what was expected:
    a missing or non-text instruction/response/prompt/chosen/rejected, a score that is not a finite number
    (bools, text in JSON, nan, inf, integers too large for a float), malformed or unreadable JSON/CSV
    (nesting deeper than Python can read, integers of more than 4300 digits, a header naming a column twice),
    rows of the other mode, and a JSON-mixed extra column holding a value JSON cannot write.
    """
    if mode is not None and mode not in MODES:
        raise DataValidationError(f"mode: found {mode!r}, expected one of {list(MODES)} or None (detect)")
    rows, from_csv, typed = _read_source(source)
    if not rows:
        label = Path(source).name if isinstance(source, (str, Path)) else "source"
        raise DataValidationError(f"{label}: found no rows, "
                                  "expected at least one example")
    first_where, first = rows[0]
    if mode is None:
        if not isinstance(first, dict):
            raise DataValidationError(f"{first_where}: found {_show(first)}, expected an object (a dict of fields)")
        mode = _detect_mode(first_where, first)
    checked = [(where, _check_row(where, row, mode, first_where, from_csv)) for where, row in rows]
    return _to_dataset(checked, MODES[mode], typed)


# --------------------------------------------------------------------------------------------- PPO queries


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int, field: str | None = None,
                     system: str | None = None, too_long: str = "drop"):
    """Turn each instruction into a PPO query: the chat-template prompt, tokenized, unpadded.

    Adds `query` (the prompt text) and `input_ids` (a list of token ids, no padding: `PromptCollator` left-pads
    at batch time) and keeps every other column (a `score` column stays available as `batch["score"]`).
    field: the instruction column ("instruction", else "prompt" if None). Prompts longer than
    `max_prompt_length` tokens are dropped with a warning (too_long="drop") or raise (too_long="error"):
    cutting a chat prompt would cut its template.
    """
    if too_long not in {"drop", "error"}:
        raise ValueError(f"too_long: found {too_long!r}, expected 'drop' or 'error'")
    field = field or next((f for f in ("instruction", "prompt") if f in dataset.column_names), None)
    if field is None or field not in dataset.column_names:
        raise DataValidationError(f"dataset: found columns {dataset.column_names}, expected an instruction "
                                  "column ('instruction' or 'prompt', or name it with field=)")

    def encode(row):
        query = chat_prompt(tokenizer, row[field], system)
        # the template already wrote every special token it wants: adding more would double the BOS
        return {"query": query, "input_ids": tokenizer(query, add_special_tokens=False)["input_ids"]}

    out = dataset.map(encode, desc="tokenizing prompts")
    lengths = [len(ids) for ids in out["input_ids"]]
    long_rows = [i for i, n in enumerate(lengths) if n > max_prompt_length]
    if long_rows and too_long == "error":
        raise DataValidationError(f"index {long_rows[0]}: field {field!r}: found a prompt of "
                                  f"{lengths[long_rows[0]]} tokens, expected at most {max_prompt_length}")
    if long_rows:
        if len(long_rows) == len(out):
            raise DataValidationError(f"dataset: found every prompt longer than max_prompt_length="
                                      f"{max_prompt_length} tokens (shortest {min(lengths)}), expected some to fit")
        warnings.warn(f"tokenize_prompts: dropped {len(long_rows)} of {len(out)} prompts longer than "
                      f"{max_prompt_length} tokens", stacklevel=2)
        keep = set(range(len(out))) - set(long_rows)
        out = out.select(sorted(keep))
    return out


def left_pad(sequences, pad_token_id: int):
    """Stack 1-D token sequences into `(input_ids, attention_mask)`, both (B, T), padded on the left.

    Left padding puts every prompt's last token in the last column, where generation continues.
    """
    import torch

    if len(sequences) == 0:
        raise ValueError("left_pad: found an empty batch, expected at least one sequence")
    if pad_token_id is None:
        raise ValueError("left_pad: pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)           # (B, T)
    for i, s in enumerate(sequences):
        if len(s):
            input_ids[i, width - len(s):] = s
            attention_mask[i, width - len(s):] = 1
    return input_ids, attention_mask


class PromptCollator:
    """`collate_fn` for a DataLoader over `tokenize_prompts` rows.

    Returns `input_ids` and `attention_mask` (B, Tq) left-padded (or `input_ids` as a list of 1-D tensors with
    padded=False), `score` as a float tensor when present, and every other column as a list.
    """

    def __init__(self, pad_token_id: int, padded: bool = True):
        self.pad_token_id, self.padded = pad_token_id, padded

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        batch = {key: [row[key] for row in rows] for key in rows[0] if key != "input_ids"}
        queries = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        if self.padded:
            batch["input_ids"], batch["attention_mask"] = left_pad(queries, self.pad_token_id)
        else:
            batch["input_ids"] = queries
        if "score" in batch:
            batch["score"] = torch.tensor(batch["score"], dtype=torch.float32)
        return batch
