"""Instruction and preference data: loading, validation, chat formatting and PPO queries (lesson 03).

Chat formatting lives here and only here: every module that turns an instruction into model input calls
`chat_prompt` / `chat_text`, so the SFT data, the reward model, PPO rollouts and evaluation all see the same text.

    ds = load_instruction_data("data.jsonl")              # mode detected: "score" or "preference"
    queries = tokenize_prompts(ds, tokenizer, max_prompt_length=256)
    loader = DataLoader(queries, batch_size=8, collate_fn=PromptCollator(tokenizer.pad_token_id))

Every problem in the input raises one error type, `DataValidationError` (a `ValueError`), whose message names the
row (the line number for jsonl/json/csv files, the index for in-memory rows), the field, what was found and what
was expected -- never a traceback from deep inside pyarrow or datasets.
"""

from __future__ import annotations

import csv
import io
import json
import math
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
    text = repr(value)
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


def _json_lines(text: str, name: str):
    """(where, row) for each non-blank line of a JSON-lines text."""
    for number, line in enumerate(text.splitlines(), start=1):  # splitlines: \n, \r\n and \r all end a line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(f"{name} line {number}: malformed JSON ({err.msg} at column {err.colno}): "
                                      f"found {line[:60]!r}, expected one JSON object per line") from None
        yield f"{name} line {number}", row


def _json_array(text: str, name: str):
    """(where, row) for each item of a top-level JSON array, with the line each item starts on."""
    decoder, rows = json.JSONDecoder(), []

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
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        return list(_json_lines(text, name))  # many ".json" files are really JSON lines
    if isinstance(whole, dict):
        tables = [key for key, value in whole.items() if isinstance(value, list)]
        if len(tables) == 1:  # {"data": [...]} and similar wrappers
            return [(f"{name} {tables[0]}[{i}]", row) for i, row in enumerate(whole[tables[0]])]
        return [(f"{name} line 1", whole)]
    raise DataValidationError(f"{name} line 1: found {_show(whole)}, expected a JSON array of objects or JSON lines")


def _read_csv(text: str, name: str):
    extra, missing = "\0extra", "\0missing"  # markers csv uses for rows longer / shorter than the header
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=extra, restval=missing)
    if not reader.fieldnames:
        return []
    rows = []
    for row in reader:
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
    return [(f"{name} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_source(source):
    """(where, row) pairs and whether values came from CSV text (so numbers arrive as strings)."""
    import datasets

    if isinstance(source, (str, Path)):
        path = Path(source)
        name = path.name
        suffix = path.suffix.lower()
        if suffix not in EXTENSIONS:
            raise DataValidationError(f"{path}: found extension {suffix or '(none)'!r}, "
                                      f"expected one of {', '.join(EXTENSIONS)}")
        if not path.is_file():
            raise DataValidationError(f"{path}: found no such file, expected an existing {suffix} file")
        if suffix == ".parquet":
            return _read_parquet(path, name), False
        text = _decode(path.read_bytes(), name)
        if suffix == ".jsonl":
            return list(_json_lines(text, name)), False
        if suffix == ".json":
            return (_read_json(text, name) if text.strip() else []), False
        return _read_csv(text, name), True
    if isinstance(source, datasets.DatasetDict):
        raise DataValidationError(f"source: found a DatasetDict with splits {list(source)}, "
                                  "expected one split (e.g. ds['train'])")
    if isinstance(source, datasets.Dataset):
        return [(f"index {i}", row) for i, row in enumerate(source)], False
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        return [(f"index {i}", row) for i, row in enumerate(source.to_dict("records"))], False
    if isinstance(source, (list, tuple)):
        return [(f"index {i}", row) for i, row in enumerate(source)], False
    raise DataValidationError(f"source: found {type(source).__name__}, expected a path (.jsonl/.json/.csv/.parquet), "
                              "a list of dicts or a datasets.Dataset")


# --------------------------------------------------------------------------------------------- validating rows


def _detect_mode(where: str, row: dict) -> str:
    for mode in ("preference", "score"):
        if any(field in row for field in MODES[mode][:2]):
            return mode
    raise DataValidationError(
        f"{where}: found fields {sorted(row)}, expected either instruction/response/score (score mode) or "
        "prompt/chosen/rejected (preference mode); pass mode='prompt' for instructions alone")


def _check_text(where: str, field: str, value) -> str:
    if not isinstance(value, str):
        raise DataValidationError(f"{where}: field {field!r}: found {_show(value)}, expected a string")
    if not value.strip():
        raise DataValidationError(f"{where}: field {field!r}: found {'empty' if not value else 'blank'} text "
                                  f"{value!r}, expected non-blank text")
    return value


def _check_score(where: str, value, from_csv: bool) -> float:
    if from_csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataValidationError(f"{where}: field 'score': found {value[:40]!r}, expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataValidationError(f"{where}: field 'score': found {_show(value)}, expected a number")
    if not math.isfinite(value):
        raise DataValidationError(f"{where}: field 'score': found {value!r}, expected a finite number")
    return float(value)


def _check_row(where: str, row, mode: str, first_where: str, from_csv: bool) -> dict:
    if not isinstance(row, dict):
        raise DataValidationError(f"{where}: found {_show(row)}, expected an object with fields {list(MODES[mode])}")
    other = "score" if mode == "preference" else "preference"
    if mode != "prompt" and any(f in row for f in MODES[other][:2]) and not any(f in row for f in MODES[mode][:2]):
        raise DataValidationError(
            f"{where}: found a {other}-mode row (fields {sorted(row)}), expected a {mode}-mode row like the ones "
            f"before it (fields {list(MODES[mode])}, mode detected at {first_where}); keep one mode per dataset")
    out = {}
    for field in MODES[mode]:
        if field not in row:
            hint = next((f" (found {k!r}: names are case-sensitive)" for k in row if k.lower() == field), "")
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


def _to_dataset(rows: list[tuple[str, dict]], fields: tuple[str, ...]):
    """A datasets.Dataset, with a clear error if an extra column mixes types pyarrow cannot store together."""
    import datasets
    import pyarrow as pa

    columns = list(fields) + sorted({key for _, row in rows for key in row} - set(fields))
    data = {column: [row.get(column) for _, row in rows] for column in columns}
    for column in columns[len(fields):]:
        try:
            pa.array(data[column])
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            first = next(v for v in data[column] if v is not None)
            where, value = next((w, r[column]) for w, r in rows
                                if r.get(column) is not None and type(r[column]) is not type(first))
            raise DataValidationError(f"{where}: field {column!r}: found {_show(value)}, expected "
                                      f"{type(first).__name__} like the earlier rows (one type per column)") from None
    return datasets.Dataset.from_dict(data)


def load_instruction_data(source, mode: str | None = None):
    """Load and validate instruction data as a `datasets.Dataset`.

    source: a path (.jsonl, .json, .csv, .parquet), a list of dicts, a `datasets.Dataset` or a pandas DataFrame.
    mode: "score" (instruction, response, score), "preference" (prompt, chosen, rejected) or "prompt"
        (instruction only); None detects score/preference from the first row.

    Harmless variations load: a UTF-8 BOM, blank lines, CRLF line endings, extra columns (kept), any language.
    Anything else raises `DataValidationError` naming the row, the field, what was found and what was expected.
    """
    if mode is not None and mode not in MODES:
        raise DataValidationError(f"mode: found {mode!r}, expected one of {list(MODES)} or None (detect)")
    rows, from_csv = _read_source(source)
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
    return _to_dataset(checked, MODES[mode])


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
