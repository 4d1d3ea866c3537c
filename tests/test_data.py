"""Data loading and validation (lessons_lib.data): good inputs load, bad inputs fail with a message that names the
row, the field, what was found and what was expected -- never a traceback from inside pyarrow/datasets."""

import json
import math
import random

import pandas as pd
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


# --------------------------------------------------------------------------------------------- inputs that fail

# (name, file name or None for in-memory rows, content, mode, substrings the message must contain)
BAD = [
    ("missing field", None, [SCORE, {"instruction": "a", "score": 1}], None, ["index 1", "'response'", "missing"]),
    ("case-sensitive field", None, [{"Instruction": "a", "response": "b", "score": 1}], "score",
     ["index 0", "'instruction'", "found 'Instruction'"]),
    ("no known fields", None, [{"question": "a", "answer": "b"}], None, ["index 0", "question", "prompt/chosen/rejected"]),
    ("text is a number", None, [SCORE, dict(SCORE, response=42)], None, ["index 1", "'response'", "42 (int)", "string"]),
    ("text is a list", None, [dict(PREF, chosen=["a"])], None, ["index 0", "'chosen'", "list", "string"]),
    ("empty text", None, [dict(SCORE, instruction="")], None, ["index 0", "'instruction'", "empty", "non-blank"]),
    ("blank text", None, [SCORE, SCORE, dict(SCORE, response=" \n\t")], None,
     ["index 2", "'response'", "blank"]),
    ("score is a string", None, [dict(SCORE, score="4.8")], None, ["index 0", "'score'", "'4.8' (str)", "a number"]),
    ("score is a bool", None, [dict(SCORE, score=True)], None, ["index 0", "'score'", "True (bool)"]),
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
    ("csv empty score", "z.csv", "instruction,response,score\na,b,\n", None, ["z.csv line 2", "'score'", "''"]),
    ("undecodable bytes", "latin.jsonl", jsonl(SCORE).encode() + '{"instruction": "café"}\n'.encode("latin-1"), None,
     ["latin.jsonl line 2", "undecodable", "UTF-8"]),
    ("utf-16 file", "w.csv", "instruction,response,score\na,b,1\n".encode("utf-16"), None,
     ["w.csv line 1", "undecodable", "UTF-8"]),
    ("unsupported extension", "d.txt", "hello", None, ["d.txt", "'.txt'", ".jsonl"]),
    ("no extension", "data", "hello", None, ["'(none)'", ".jsonl"]),
    ("not a parquet file", "f.parquet", b"PAR1 this is not parquet", None, ["f.parquet", "parquet"]),
    ("extra column mixing types", None, [dict(SCORE, meta=1), dict(SCORE, meta="x")], None,
     ["index 1", "'meta'", "'x' (str)", "int"]),
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
