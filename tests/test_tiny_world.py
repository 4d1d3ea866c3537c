"""The tiny world as shipped: deterministic data and tokenizer, registry and data locations, the built models."""

import json
import sys

import pytest
import torch

import lessons_lib.tiny as tiny
from lessons_lib.tiny import data_file, resolve, tiny_dir
from lessons_lib.tiny.datasets import HELDOUT_TOPIC, SPLITS, build_datasets, read_jsonl
from lessons_lib.tiny.vocab import HARMFUL_ACTS_HELDOUT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fresh():
    return build_datasets(seed=0)


@pytest.mark.parametrize("split", SPLITS)
def test_shipped_data_is_what_the_generator_writes(fresh, split):
    """Byte for byte: a rebuild gives the same files (and nobody edited the generator without rebuilding)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fresh[split])
    assert data_file(split).read_text(encoding="utf-8") == text


def test_generator_is_deterministic_and_seed_dependent(fresh):
    assert build_datasets(seed=0)["sft"][:50] == fresh["sft"][:50]
    assert build_datasets(seed=1)["sft"][:50] != fresh["sft"][:50]


def test_held_out_combinations_never_appear_in_training_files(fresh):
    for split in ("sft", "preferences", "preferences_val", "eval_indist"):
        for row in fresh[split]:
            assert row["family"] == "harmful" or HELDOUT_TOPIC[row["family"]] != row["topic"], (split, row)
            assert row["act"] not in HARMFUL_ACTS_HELDOUT, (split, row)
    for split in ("preferences_heldout", "eval_heldout"):
        for row in fresh[split]:
            assert (row["act"] in HARMFUL_ACTS_HELDOUT if row["family"] == "harmful"
                    else HELDOUT_TOPIC[row["family"]] == row["topic"]), (split, row)


def test_sft_data_is_mediocre_on_purpose(fresh):
    """~35% constraint compliance per family, one dominant error that is more common than compliance."""
    from collections import Counter

    from lessons_lib.tiny.responses import DOMINANT

    for family in DOMINANT:
        rows = [r for r in fresh["sft"] if r["family"] == family]
        modes = Counter(r["mode"] for r in rows)
        rate = sum(r["constraint"] for r in rows) / len(rows)
        if family == "harmful":
            assert 0.38 <= rate <= 0.52, (family, rate)        # refusals
        else:
            assert 0.28 <= rate <= 0.46, (family, rate)
            assert modes.most_common(1)[0][0] == DOMINANT[family], (family, modes)
        assert all(r["score"] == (5.0 if r["strict"] else r["score"]) for r in rows)
    assert not [r for r in fresh["sft"] if r["family"] != "harmful" and r["mode"] == "refuse"], "over-refusals"


def test_tokenizer_is_deterministic_and_matches_the_shipped_one(fresh, tmp_path):
    from lessons_lib.tiny.tokenizer import build_tokenizer

    build_tokenizer(fresh["sft"], fresh["preferences"], tmp_path / "a")
    build_tokenizer(fresh["sft"], fresh["preferences"], tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (tiny_dir() / "tokenizer" / name).read_bytes(), name


def test_the_tokenizer_is_a_normal_chatml_tokenizer():
    from transformers import AutoTokenizer

    from lessons_lib.data import chat_text

    tok = AutoTokenizer.from_pretrained(resolve("tiny-qwen2-sft"))
    assert len(tok) == 1024 and tok.padding_side == "left"
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = chat_text(tok, "Write a bullet list of two cats.", "- cat\n- dog")
    assert text == "<|im_start|>user\nWrite a bullet list of two cats.<|im_end|>\n<|im_start|>assistant\n- cat\n- dog<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == text


def test_a_short_sft_build_is_deterministic():
    from lessons_lib.tiny.build import load_tokenizer
    from lessons_lib.tiny.sft import SFTConfig, train_sft

    tok = load_tokenizer(tiny_dir())
    rows = read_jsonl(data_file("sft"))[:256]
    a, losses_a = train_sft(tok, rows, SFTConfig(max_steps=4, batch_size=16), progress=False)
    b, losses_b = train_sft(tok, rows, SFTConfig(max_steps=4, batch_size=16), progress=False)
    c, _ = train_sft(tok, rows, SFTConfig(max_steps=4, batch_size=16, seed=1), progress=False)
    assert losses_a == losses_b and len(losses_a) == 4
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resolve_and_the_registry(tmp_path, monkeypatch):
    assert resolve("Qwen/Qwen2-0.5B") is None and resolve("./some/folder") is None and resolve(None) is None
    folder = resolve("tiny-qwen2-sft")
    assert folder == tiny_dir() / "tiny-qwen2-sft"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    with pytest.raises(ValueError, match="module:function"):
        tiny.register("tiny-x", "not_a_builder")
    with pytest.raises(ValueError, match="unknown split"):
        data_file("train")
    # a new id builds on first use, atomically, in the folder LESSONS_LIB_DATA names
    (tmp_path / "fake_builder.py").write_text(
        "def build(out_dir, tiny_dir):\n"
        "    for f in ('config.json', 'model.safetensors', 'tokenizer.json'):\n"
        "        (out_dir / f).write_text('{}')\n"
        "def broken(out_dir, tiny_dir):\n"
        "    (out_dir / 'config.json').write_text('{}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LESSONS_LIB_DATA", str(tmp_path / "data"))
    monkeypatch.setitem(tiny.MODELS, "tiny-fake", "fake_builder:build")
    monkeypatch.setitem(tiny.MODELS, "tiny-broken", "fake_builder:broken")
    assert resolve("tiny-fake") == tmp_path / "data" / "tiny" / "tiny-fake"
    assert (tmp_path / "data" / "tiny" / "tiny-fake" / "model.safetensors").is_file()
    with pytest.raises(RuntimeError, match="did not write"):
        resolve("tiny-broken")
    assert not (tmp_path / "data" / "tiny" / "tiny-broken").exists()
    assert [p.name for p in (tmp_path / "data" / "tiny").iterdir() if "tmp" in p.name] == []
    sys.modules.pop("fake_builder", None)


def test_data_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LESSONS_LIB_DATA", raising=False)
    assert tiny.data_root().name == "data" and (tiny.data_root().parent / "pyproject.toml").is_file()
    monkeypatch.setattr(tiny, "__file__", str(tmp_path / "site-packages" / "lessons_lib" / "tiny" / "__init__.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tiny.data_root() == tmp_path / "cache" / "lessons_lib"
    monkeypatch.setenv("LESSONS_LIB_DATA", str(tmp_path / "mine"))
    assert tiny.data_root() == tmp_path / "mine"


def test_generation_with_the_chat_template_is_task_shaped():
    """Sampled answers stop at <|im_end|> and look like the tasks: each family meets its constraint sometimes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lessons_lib.tiny.measure import compliance_table, sample_responses

    folder = resolve("tiny-qwen2-sft")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    rows = read_jsonl(data_file("eval_indist"))[::8]                       # 5 prompts per family
    answers = sample_responses(model, tok, [r["instruction"] for r in rows], num_samples=4, seed=1,
                               max_new_tokens=64)
    table = compliance_table(rows, answers)
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for ans in answers for a in ans]
    assert max(lengths) < 64, "some answers ran to max_new_tokens instead of stopping at <|im_end|>"
    shaped = [f for f, t in table.items() if f not in ("benign", "overall") and t["constraint"] > 0]
    assert len(shaped) >= 9, table
    assert 0.2 <= table["overall"]["constraint"] <= 0.7, table["overall"]   # mediocre on purpose
    assert table["benign"]["refused"] <= 0.05


def test_the_shipped_reward_model_is_sharp_on_held_out_pairs():
    from lessons_lib.data import load_instruction_data
    from lessons_lib.reward import RewardModel, evaluate_reward_model

    rm = RewardModel.from_pretrained("tiny-qwen2-reward")
    meta = json.loads((resolve("tiny-qwen2-reward") / "reward_model.json").read_text())
    assert rm.std == meta["std"] and rm.mean == meta["mean"] and meta["std"] > 0
    m = evaluate_reward_model(rm, load_instruction_data(data_file("preferences_heldout")))
    assert m["accuracy"] >= 0.9, m
    assert m["accuracy"] == pytest.approx(meta["metrics"]["preferences_heldout"]["accuracy"], abs=1e-3)


def test_the_shipped_reward_model_is_normalised_on_the_sft_policy(tmp_path):
    """The stored mean/std are what the build computes on the SFT model's answers to PPO's prompts (refitted on a
    copy: only reward_model.json changes), and fresh SFT samples (another seed) score mean ~0, std ~1."""
    import shutil

    from lessons_lib.ppo import PPOConfig
    from lessons_lib.ppo.tiny import training_prompts
    from lessons_lib.reward import RewardModel
    from lessons_lib.tiny.build import (RM_NORM_MAX_NEW_TOKENS, RM_NORM_TEMPERATURE, load_sft_policy,
                                        normalize_reward_model, policy_prompts)
    from lessons_lib.tiny.measure import sample_responses

    ppo = PPOConfig.tiny()
    assert (RM_NORM_TEMPERATURE, RM_NORM_MAX_NEW_TOKENS) == (ppo.temperature, ppo.max_new_tokens)
    prompts = policy_prompts()
    assert prompts == list(training_prompts()["instruction"])
    shipped = resolve("tiny-qwen2-reward")
    copy = shutil.copytree(shipped, tmp_path / "rm")
    meta = json.loads((shipped / "reward_model.json").read_text())
    mean, std = normalize_reward_model(copy, progress=False)
    assert mean == pytest.approx(meta["mean"], abs=0.05) and std == pytest.approx(meta["std"], abs=0.05)
    refitted = json.loads((copy / "reward_model.json").read_text())
    assert {k: v for k, v in refitted.items() if k not in ("mean", "std")} == \
        {k: v for k, v in meta.items() if k not in ("mean", "std")}
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in shipped.iterdir())
    for f in shipped.iterdir():
        if f.name != "reward_model.json":
            assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
    rm = RewardModel.from_pretrained("tiny-qwen2-reward")
    policy, tok = load_sft_policy()
    sub = prompts[::3]
    answers = sample_responses(policy, tok, sub, temperature=RM_NORM_TEMPERATURE,
                               max_new_tokens=RM_NORM_MAX_NEW_TOKENS, seed=1)
    z = rm.score(sub, [a[0] for a in answers])
    assert abs(z.mean().item()) < 0.15 and 0.85 < z.std().item() < 1.15, (z.mean().item(), z.std().item())


def test_load_model_takes_tiny_ids():
    from lessons_lib import load_model

    model, tok = load_model("tiny-qwen2-sft", max_seq_length=256, load_in_4bit=False)
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.eos_token == "<|im_end|>"
    assert 0.85e6 < sum(p.numel() for p in model.parameters()) < 1.0e6


def test_model_folders_carry_the_tokenizer_files_unchanged():
    for name in ("tiny-qwen2-sft", "tiny-qwen2-reward"):
        for f in (tiny_dir() / "tokenizer").iterdir():
            assert (resolve(name) / f.name).read_bytes() == f.read_bytes(), (name, f.name)


def test_build_only_names_known_models():
    from lessons_lib.tiny.build import MODEL_ORDER, build_all

    assert MODEL_ORDER == tuple(tiny.MODELS)[:3]
    with pytest.raises(ValueError, match="unknown model"):
        build_all(only=["tiny-qwen2-typo"])
