"""Data loading and validation (lessons_lib.data): good inputs load, bad inputs fail with a message that names the
row, the field, what was found and what was expected -- never a traceback from inside pyarrow/datasets."""

import csv
import datetime
import decimal
import fractions
import json
import math
import random
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lessons_lib.data import (DataValidationError, PromptCollator, chat_prompt, left_pad, load_instruction_data,
                              tokenize_prompts)

SCORE = {"instruction": "请用一句话解释什么是量子纠缠。", "response": "两个粒子的状态相互关联。", "score": 4.8}
PREF = {"prompt": "Name two colors.", "chosen": "Red and blue.", "rejected": "Sure!"}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# --------------------------------------------------------------------------------------------- inputs that load


def test_score_jsonl_with_bom_crlf_blank_lines_extra_columns_and_chinese(tmp_path):
    rows = [dict(SCORE, source="ultrachat", id=i, score=float(i) + 0.5) for i in range(3)]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\r\n\r\n   \r\n" + json.dumps(rows[2])
    path = write(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = load_instruction_data(path)
    assert ds.column_names[:3] == ["instruction", "response", "score"]
    assert set(ds.column_names) == {"instruction", "response", "score", "source", "id"}
    assert ds["score"] == [0.5, 1.5, 2.5]
    assert ds[0]["instruction"] == SCORE["instruction"]  # non-ASCII text survives the round trip


def test_preference_detected_from_every_source_kind(tmp_path):
    rows = [dict(PREF, chosen=f"Red and blue {i}.") for i in range(4)]
    sources = [
        rows,
        write(tmp_path, "p.jsonl", jsonl(*rows)),
        write(tmp_path, "p.json", json.dumps(rows, indent=2)),
        write(tmp_path, "w.json", json.dumps({"data": rows})),
        write(tmp_path, "l.json", jsonl(*rows)),  # JSON lines saved as .json: common, and loads
        write(tmp_path, "p.csv", pd.DataFrame(rows).to_csv(index=False)),
        pd.DataFrame(rows),
    ]
    parquet = tmp_path / "p.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    sources.append(parquet)
    for source in sources:
        ds = load_instruction_data(source)
        assert ds.column_names == ["prompt", "chosen", "rejected"], source
        assert ds["chosen"] == [r["chosen"] for r in rows], source
    assert load_instruction_data(load_instruction_data(rows))["prompt"] == [PREF["prompt"]] * 4


def test_csv_scores_are_parsed_and_quoted_multiline_fields_keep_line_numbers(tmp_path):
    text = 'instruction,response,score\r\n"Write a\r\npoem.","Roses, red.",4\r\n"Hi","Hello",3.5\r\n'
    ds = load_instruction_data(write(tmp_path, "d.csv", text))
    assert ds["score"] == [4.0, 3.5] and ds["instruction"][0] == "Write a\r\npoem."
    bad = text + '"Bye","See you",high\r\n'
    with pytest.raises(DataValidationError, match=r"d\.csv line 5: field 'score': found 'high'"):
        load_instruction_data(write(tmp_path, "d.csv", bad))


def test_explicit_modes():
    ds = load_instruction_data([{"instruction": "Name a fruit.", "family": "bullet"}], mode="prompt")
    assert ds.column_names == ["instruction", "family"]
    with pytest.raises(DataValidationError, match="index 0: field 'score': found it missing"):
        load_instruction_data([{"instruction": "a", "response": "b"}], mode="score")


def test_random_valid_rows_round_trip(tmp_path):
    rng = random.Random(1234)
    alphabet = "abc xyz 数据集 ünï \t\"',{}[]"
    rows = [{"instruction": "q" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))),
             "response": "r" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))),
             "score": rng.uniform(-5, 5)} for _ in range(50)]
    for path in (write(tmp_path, "r.jsonl", jsonl(*rows)), write(tmp_path, "r.csv", pd.DataFrame(rows).to_csv(index=False))):
        ds = load_instruction_data(path)
        assert ds["instruction"] == [r["instruction"] for r in rows]
        assert ds["response"] == [r["response"] for r in rows]
        assert all(math.isclose(a, r["score"], rel_tol=1e-12) for a, r in zip(ds["score"], rows))


def test_extra_columns_that_mix_types_are_kept_as_json_text(tmp_path):
    rows = [dict(SCORE, meta={"a": 1}, big=10**30, tag=1, ok=1),
            dict(SCORE, meta={"a": "x"}, big=1, tag="x", ok=2.5),
            dict(SCORE, tag=None)]  # missing extra fields
    for source, where in ((rows, "index 1"), (write(tmp_path, "m.jsonl", jsonl(*rows)), "m.jsonl line 2")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = load_instruction_data(source)
        messages = sorted(str(w.message) for w in caught)
        assert len(messages) == 3 and all(issubclass(w.category, UserWarning) for w in caught), messages
        big, meta, tag = messages
        assert big.startswith("index 0: field 'big'") or big.startswith("m.jsonl line 1: field 'big'"), big
        assert "1000000000000000000000000000000 (int)" in big and "no single column type" in big
        assert meta.startswith(f"{where}: field 'meta': found {{'a': 'x'}} (dict)") and "struct<a: int64>" in meta
        assert tag.startswith(f"{where}: field 'tag': found 'x' (str)") and "(int64)" in tag and "JSON text" in tag
        for column in ("meta", "big", "tag"):  # json.loads gives every value back; a missing value stays None
            assert ds.features[column].dtype == "string"
            assert [None if v is None else json.loads(v) for v in ds[column]] == [r.get(column) for r in rows]
        assert ds["ok"] == [1.0, 2.5, None] and ds["score"] == [SCORE["score"]] * 3  # other columns keep types


def test_harmless_variations_load(tmp_path):
    scores = [np.float32(1.5), np.int64(3), decimal.Decimal("2.25"), fractions.Fraction(1, 4), 10**30]
    ds = load_instruction_data([dict(SCORE, score=s) for s in scores])
    assert ds["score"] == [1.5, 3.0, 2.25, 0.25, 1e30]

    limit = csv.field_size_limit()
    long_text = "长" * 200_000  # longer than the csv module's default field limit (131072)
    path = write(tmp_path, "long.csv", pd.DataFrame([dict(SCORE, response=long_text)]).to_csv(index=False))
    assert load_instruction_data(path)["response"] == [long_text]
    assert csv.field_size_limit() == limit  # the reader's limit is put back
    path = write(tmp_path, "long.jsonl", jsonl(dict(SCORE, response="x" * 2_000_000)))
    assert len(load_instruction_data(path)[0]["response"]) == 2_000_000

    text_json = '{"role": "user", "content": [1, 2]}'  # text that happens to be JSON stays text
    rows = [dict(SCORE, instruction=text_json, tag="a", n=1), dict(SCORE, tag="7", n=2.5)]
    for source in (write(tmp_path, "t.jsonl", jsonl(*rows)), write(tmp_path, "t.csv", pd.DataFrame(rows).to_csv(index=False))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing here needs a warning
            ds = load_instruction_data(source)
        assert ds["instruction"][0] == text_json and ds["tag"] == ["a", "7"]

    frame = pd.DataFrame([dict(SCORE, source="web", n=1.0), dict(SCORE, source=None, n=np.nan)])
    frame["when"] = pd.to_datetime(["2024-01-02", None])
    ds = load_instruction_data(frame)  # pandas' missing cells (NaN, NaT) are None, as in Dataset.from_pandas
    assert ds["source"] == ["web", None] and ds["n"] == [1.0, None] and ds["when"][1] is None


def test_parquet_extra_columns_keep_their_arrow_types(tmp_path):
    table = pa.table({"instruction": ["a", "b"], "response": ["c", "d"], "score": pa.array([1, 2], pa.int32()),
                      "id": pa.array([1, 2**64 - 1], pa.uint64()),             # beyond int64
                      "at": pa.array([1, 1_000_000_001], pa.timestamp("ns")),  # nanoseconds
                      "kv": pa.array([[("k", 1)], [("k", 2)]], pa.map_(pa.string(), pa.int64()))})
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.warns(UserWarning, match=r"t\.parquet row 0: field 'kv'.*JSON text"):  # datasets has no map type
        ds = load_instruction_data(tmp_path / "t.parquet")
    assert ds["score"] == [1.0, 2.0] and ds["id"] == [1, 2**64 - 1]
    assert ds.features["id"].dtype == "uint64" and ds.features["at"].dtype == "timestamp[ns]"
    assert [json.loads(v) for v in ds["kv"]] == [[["k", 1]], [["k", 2]]]


def random_value(rng, depth=0):
    kinds = ["int", "big", "float", "special", "str", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-5, 5)
    if kind == "big":
        return rng.choice([2**63, -(2**63) - 1, 10**30, 10**400])
    if kind == "float":
        return rng.uniform(-1e3, 1e3)
    if kind == "special":
        return rng.choice([math.nan, math.inf, -math.inf, 1e308])
    if kind == "str":
        return rng.choice(["", "x", "数据", "1", "nan", "{}"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice("ab"): random_value(rng, depth + 1) for _ in range(rng.randint(0, 2))}


def test_random_extra_columns_and_scores_load_or_raise_the_one_error(tmp_path):
    """Random values of every JSON kind in extra columns and in the score: each input loads (possibly warning) or
    raises DataValidationError, from memory and from a JSON-lines file; nothing else escapes."""
    rng = random.Random(2024)
    outcomes = {"loaded": 0, "as JSON text": 0, "refused": 0}
    for trial in range(40):
        rows = [dict(SCORE, **{k: random_value(rng) for k in rng.sample(["meta", "tag", "n"], rng.randint(1, 3))})
                for _ in range(rng.randint(1, 4))]
        if trial % 3 == 0:
            rows[-1]["score"] = random_value(rng)
        for source in (rows, write(tmp_path, f"r{trial}.jsonl", jsonl(*rows))):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ds = load_instruction_data(source)
                except DataValidationError:
                    outcomes["refused"] += 1
                    continue
            assert len(ds) == len(rows)
            outcomes["as JSON text" if caught else "loaded"] += 1
            for w in caught:
                column = str(w.message).split("field ", 1)[1].split(":", 1)[0].strip("'")
                expected = [None if r.get(column) is None else json.dumps(r[column], ensure_ascii=False) for r in rows]
                assert ds[column] == expected, str(w.message)
    assert all(outcomes.values()), outcomes


def test_unreadable_paths(tmp_path, monkeypatch):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataValidationError, match=r"dir\.jsonl: found a directory, expected an existing \.jsonl file"):
        load_instruction_data(tmp_path / "dir.jsonl")
    path = write(tmp_path, "locked.jsonl", jsonl(SCORE))

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)
    with pytest.raises(DataValidationError, match=r"locked\.jsonl: found a file that cannot be read "
                                                  r"\(PermissionError: Permission denied\)"):
        load_instruction_data(path)


# --------------------------------------------------------------------------------------------- inputs that fail

# (name, file name or None for in-memory rows, content, mode, substrings the message must contain)
BAD = [
    ("missing field", None, [SCORE, {"instruction": "a", "score": 1}], None, ["index 1", "'response'", "missing"]),
    ("case-sensitive field", None, [{"Instruction": "a", "response": "b", "score": 1}], "score",
     ["index 0", "'instruction'", "found 'Instruction'"]),
    ("field name with a stray space", "sp.csv", "instruction, response,score\na,b,1\n", None,
     ["sp.csv line 2", "'response'", "found ' response'", "spaces"]),
    ("field names that are not all text", None, [{1: "a", "x": "b"}], None, ["index 0", "[1, 'x']", "score mode"]),
    ("no known fields", None, [{"question": "a", "answer": "b"}], None, ["index 0", "question", "prompt/chosen/rejected"]),
    ("text is a number", None, [SCORE, dict(SCORE, response=42)], None, ["index 1", "'response'", "42 (int)", "string"]),
    ("text is a list", None, [dict(PREF, chosen=["a"])], None, ["index 0", "'chosen'", "list", "string"]),
    ("text is nested JSON", "nj.jsonl", jsonl(SCORE, dict(SCORE, instruction={"text": "hi"})), None,
     ["nj.jsonl line 2", "'instruction'", "{'text': 'hi'} (dict)", "string"]),
    ("missing text cell in a DataFrame", None, pd.DataFrame([SCORE, dict(SCORE, response=None)]), None,
     ["index 1", "'response'", "None", "string"]),
    ("empty text", None, [dict(SCORE, instruction="")], None, ["index 0", "'instruction'", "empty", "non-blank"]),
    ("blank text", None, [SCORE, SCORE, dict(SCORE, response=" \n\t")], None,
     ["index 2", "'response'", "blank"]),
    ("score is a string", None, [dict(SCORE, score="4.8")], None, ["index 0", "'score'", "'4.8' (str)", "a number"]),
    ("score is a bool", None, [dict(SCORE, score=True)], None, ["index 0", "'score'", "True (bool)"]),
    ("score is a JSON bool", "b.jsonl", jsonl(SCORE, dict(SCORE, score=False)), None,
     ["b.jsonl line 2", "'score'", "False (bool)", "a number"]),
    ("score is a numpy bool", None, [dict(SCORE, score=np.bool_(True))], None, ["index 0", "'score'", "a number"]),
    ("score is NaN as a string", "ns.jsonl", jsonl(dict(SCORE, score="NaN")), None,
     ["ns.jsonl line 1", "'score'", "'NaN' (str)", "a number"]),
    ("score is a huge integer", None, [dict(SCORE, score=10**400)], None,
     ["index 0", "'score'", "integer of 401 digits", "finite number"]),
    ("score is a 400-digit integer in a file", "h.jsonl",
     jsonl(SCORE) + '{"instruction": "a", "response": "b", "score": ' + "9" * 400 + "}\n", None,
     ["h.jsonl line 2", "'score'", "integer of 400 digits", "finite number"]),
    ("score is 1e400 in a file", "e.jsonl", jsonl(SCORE, '{"instruction": "a", "response": "b", "score": 1e400}'),
     None, ["e.jsonl line 2", "'score'", "inf", "finite number"]),
    ("score is a Decimal beyond float range", None, [dict(SCORE, score=decimal.Decimal("1e400"))], None,
     ["index 0", "'score'", "Decimal('1E+400')", "finite number"]),
    ("csv score inf", "i.csv", "instruction,response,score\na,b,-inf\n", None, ["i.csv line 2", "'-inf'", "finite"]),
    ("csv score beyond float range", "o.csv", "instruction,response,score\na,b,1e400\n", None,
     ["o.csv line 2", "'1e400'", "finite"]),
    ("csv score nan", "n.csv", "instruction,response,score\na,b,nan\n", None, ["n.csv line 2", "'nan'", "finite"]),
    ("csv score is a bool word", "t.csv", "instruction,response,score\na,b,True\n", None,
     ["t.csv line 2", "'True'", "a number"]),
    ("score is null", None, [SCORE, dict(SCORE, score=None)], None, ["index 1", "'score'", "None", "a number"]),
    ("score is nan", None, [dict(SCORE, score=float("nan"))], None, ["index 0", "'score'", "nan", "finite"]),
    ("score is inf in a file", "s.jsonl", jsonl(SCORE, '{"instruction": "a", "response": "b", "score": Infinity}'),
     None, ["s.jsonl line 2", "'score'", "inf", "finite"]),
    ("chosen equals rejected", None, [PREF, dict(PREF, rejected=" Red and blue. ")], None,
     ["index 1", "'rejected'", "same text as 'chosen'"]),
    ("other mode mixed in", "m.jsonl", jsonl(SCORE, SCORE, "", PREF), None,
     ["m.jsonl line 4", "preference-mode row", "score-mode", "line 1"]),
    ("score rows in a preference file", None, [PREF, SCORE], None, ["index 1", "score-mode row", "preference-mode"]),
    ("row is not an object", "n.jsonl", jsonl(SCORE, [1, 2]), None, ["n.jsonl line 2", "[1, 2] (list)", "object"]),
    ("first row is not an object", None, ["just text"], None, ["index 0", "'just text' (str)", "object"]),
    ("a list of rows on one line", "l.jsonl", jsonl([SCORE, SCORE]), None, ["l.jsonl line 1", "(list)", "object"]),
    ("integer literal over 4300 digits", "d.jsonl", jsonl(SCORE) + '{"instruction": "a", "n": ' + "7" * 5000 + "}\n",
     None, ["d.jsonl line 2", "5000 digits", "at most 4300"]),
    ("integer literal over 4300 digits in an array", "d.json", "[\n" + json.dumps(SCORE) + ',\n{"n":\n'
     + "7" * 5000 + "}\n]", None, ["d.json line 4", "5000 digits"]),
    ("integer literal over 4300 digits in one object", "o.json", '{\n"instruction": "a",\n"score": ' + "7" * 5000
     + "\n}", None, ["o.json line 3", "5000 digits"]),
    ("json nested too deeply", "n.jsonl", jsonl(SCORE) + '{"n": ' + "[" * 100_000 + "]" * 100_000 + "}\n", None,
     ["n.jsonl line 2", "nested too deeply"]),
    ("json array item nested too deeply", "n.json", "[\n" + json.dumps(SCORE) + ",\n" + "[" * 100_000
     + "]" * 100_000 + "\n]", None, ["n.json line 3", "nested too deeply"]),
    ("malformed json line", "j.jsonl", jsonl(SCORE, SCORE) + '{"instruction": "a", "response": "b" "score": 1}\n',
     None, ["j.jsonl line 3", "malformed JSON", "delimiter"]),
    ("truncated json line", "t.jsonl", jsonl(SCORE) + '{"instruction": "a", "resp', None,
     ["t.jsonl line 2", "malformed JSON"]),
    ("malformed json array", "a.json", '[\n' + json.dumps(SCORE) + ',\n{"instruction": "x",,}\n]', None,
     ["a.json line 3", "malformed JSON"]),
    ("json array missing comma", "c.json", '[\n' + json.dumps(SCORE) + '\n' + json.dumps(SCORE) + '\n]', None,
     ["c.json line 3", "malformed JSON", "',' or ']'"]),
    ("json array unclosed", "u.json", '[\n' + json.dumps(SCORE) + ',\n', None, ["u.json line 3", "end of the file"]),
    ("json array bad item deep in file", "d.json", json.dumps([SCORE] * 3 + [dict(SCORE, score="x")], indent=1),
     None, ["d.json line 17", "'score'", "'x' (str)"]),
    ("json scalar", "s.json", "42", None, ["s.json line 1", "42 (int)"]),
    ("empty jsonl", "e.jsonl", "", None, ["e.jsonl", "no rows"]),
    ("only blank lines and BOM", "b.jsonl", b"\xef\xbb\xbf\n  \r\n\n", None, ["b.jsonl", "no rows"]),
    ("empty json array", "e.json", "[ ]", None, ["e.json", "no rows"]),
    ("empty list", None, [], None, ["source", "no rows"]),
    ("csv header only", "h.csv", "instruction,response,score\n", None, ["h.csv", "no rows"]),
    ("csv too many values", "x.csv", "instruction,response,score\na,b,1\na,b,c,1\n", None,
     ["x.csv line 3", "found 4 values", "expected 3"]),
    ("csv too few values", "y.csv", "instruction,response,score\na,b,1\na,b\n", None,
     ["y.csv line 3", "found 2 values", "expected 3"]),
    ("csv column named twice", "w.csv", "instruction,response,score,score\na,b,1,2\n", None,
     ["w.csv line 1", "'score' twice"]),
    ("csv empty score", "z.csv", "instruction,response,score\na,b,\n", None, ["z.csv line 2", "'score'", "''"]),
    ("undecodable bytes", "latin.jsonl", jsonl(SCORE).encode() + '{"instruction": "café"}\n'.encode("latin-1"), None,
     ["latin.jsonl line 2", "undecodable", "UTF-8"]),
    ("utf-16 file", "w.csv", "instruction,response,score\na,b,1\n".encode("utf-16"), None,
     ["w.csv line 1", "undecodable", "UTF-8"]),
    ("unsupported extension", "d.txt", "hello", None, ["d.txt", "'.txt'", ".jsonl"]),
    ("no extension", "data", "hello", None, ["'(none)'", ".jsonl"]),
    ("not a parquet file", "f.parquet", b"PAR1 this is not parquet", None, ["f.parquet", "parquet"]),
    ("mixed extra column holding a value JSON cannot write", None, [dict(SCORE, meta=1), dict(SCORE, meta=object())],
     None, ["index 1", "'meta'", "(object)", "JSON can write"]),
    ("mixed extra column holding a complex number", None, [dict(SCORE, meta="x"), dict(SCORE, meta=1j)], None,
     ["index 1", "'meta'", "1j (complex)", "JSON can write"]),
    ("unknown mode", None, [SCORE], "ratings", ["mode", "'ratings'", "preference"]),
    ("wrong source type", None, 3.14, None, ["source", "float", "list of dicts"]),
]


@pytest.mark.parametrize("name,file,content,mode,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_row_and_field(tmp_path, name, file, content, mode, needles):
    source = write(tmp_path, file, content) if file else content
    with pytest.raises(DataValidationError) as info:
        load_instruction_data(source, mode=mode)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, DataValidationError)


def test_missing_file_and_dataset_dict(tmp_path):
    import datasets

    with pytest.raises(DataValidationError, match=r"nope\.jsonl: found no such file"):
        load_instruction_data(tmp_path / "nope.jsonl")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([SCORE])})
    with pytest.raises(DataValidationError, match=r"DatasetDict with splits \['train'\]"):
        load_instruction_data(dd)


def test_error_is_a_value_error():
    assert issubclass(DataValidationError, ValueError)


# --------------------------------------------------------------------------------------------- PPO queries


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A small byte-level BPE tokenizer with a ChatML template, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Name two colors. Write a list of fruits. user assistant system"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def test_tokenize_prompts_uses_chat_template_and_drops_long(chat_tokenizer):
    ds = load_instruction_data([dict(SCORE, instruction="Name two colors."),
                                dict(SCORE, instruction="Write a list of fruits. " * 20),
                                dict(SCORE, instruction="Name a fruit.", score=2.0)])
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        q = tokenize_prompts(ds, chat_tokenizer, max_prompt_length=40)
    assert len(q) == 2 and q["score"] == [4.8, 2.0]
    assert q[0]["query"] == chat_prompt(chat_tokenizer, "Name two colors.")
    expected = chat_tokenizer.apply_chat_template([{"role": "user", "content": "Name two colors."}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)
    assert q[0]["input_ids"] == list(expected["input_ids"])
    assert chat_tokenizer.decode(q[1]["input_ids"]).endswith("<|im_start|>assistant\n")
    with pytest.raises(DataValidationError, match="index 1: field 'instruction': found a prompt of"):
        tokenize_prompts(ds, chat_tokenizer, max_prompt_length=40, too_long="error")
    with pytest.raises(DataValidationError, match="every prompt longer"):
        tokenize_prompts(ds, chat_tokenizer, max_prompt_length=3)
    prefs = tokenize_prompts(load_instruction_data([PREF]), chat_tokenizer, 64)
    assert prefs[0]["query"] == chat_prompt(chat_tokenizer, PREF["prompt"])


def test_left_pad_and_collator_on_random_lengths(chat_tokenizer):
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 300, (int(n),), generator=g) for n in torch.randint(1, 13, (5,), generator=g)]
    ids, mask = left_pad(seqs, pad_token_id=0)
    assert ids.shape == mask.shape == (5, max(len(s) for s in seqs))
    for row, m, s in zip(ids, mask, seqs):
        assert torch.equal(row[m.bool()], s) and m[-1] == 1 and int(m.sum()) == len(s)
        assert (row[~m.bool()] == 0).all() and torch.equal(m, m.sort().values)  # zeros first: padding on the left
    rows = [{"input_ids": s.tolist(), "score": float(i), "query": f"q{i}"} for i, s in enumerate(seqs)]
    batch = PromptCollator(pad_token_id=0)(rows)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert batch["score"].dtype == torch.float32 and batch["query"] == [f"q{i}" for i in range(5)]
    listed = PromptCollator(pad_token_id=0, padded=False)(rows)
    assert all(torch.equal(a, b) for a, b in zip(listed["input_ids"], seqs))
    with pytest.raises(ValueError, match="empty batch"):
        left_pad([], 0)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        left_pad(seqs, None)
