"""The PPO benchmark scripts (benchmarks/ppo_iteration.py, benchmarks/ppo_memory.py) on CPU.

- the random 4-bit builder of ppo_memory.py (weights quantized where they lie, no checkpoint) gives the same model
  as `load_model(..., load_in_4bit=True)` reading the same weights from disk: same module types, same logits;
- the word tokenizer decodes any ids and re-encodes them to the same ids (the reward model re-tokenizes text);
- both scripts' --quick modes run and write their tables.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def test_random_4bit_builder_equals_load_model(tmp_path):
    import transformers
    from ppo_memory import quantize_layers_

    from lessons_lib import get_peft_model, load_model

    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    plain = transformers.Qwen2ForCausalLM(cfg)
    plain.save_pretrained(tmp_path / "m")
    from common import word_tokenizer

    word_tokenizer(96).save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), load_in_4bit=True, device="cpu")
    built = quantize_layers_(plain, torch.float32)
    kinds = lambda m: [type(x).__name__ for x in m.modules()]  # noqa: E731
    assert kinds(built) == kinds(loaded) and kinds(built).count("Linear4bit") == 14
    assert built.is_loaded_in_4bit and type(built.lm_head) is torch.nn.Linear
    ids = torch.randint(3, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(built(ids).logits, loaded(ids).logits, atol=0, rtol=0)
    lora = get_peft_model(built, r=4, target_modules=["q_proj", "v_proj"], verbose=False)
    assert "Linear4bit" in type(lora.get_base_model().model.layers[0].self_attn.q_proj).__module__ + \
        type(lora.get_base_model().model.layers[0].self_attn.q_proj).__name__


def test_word_tokenizer_round_trip():
    from common import word_tokenizer

    tok = word_tokenizer(500)
    ids = torch.randint(3, 500, (40,)).tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert tok(chat + "w7" + tok.eos_token, add_special_tokens=False)["input_ids"] == ids + [7, tok.eos_token_id]


@pytest.mark.slow
def test_quick_modes_run(tmp_path):
    env_run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,  # noqa
                                          timeout=600)
    it = env_run("benchmarks/ppo_iteration.py", "--quick", "--stacks", "lessons,lessons-plain", "--iterations", "1",
                 "--out", str(tmp_path / "it"))
    assert it.returncode == 0, it.stderr[-2000:]
    results = json.loads((tmp_path / "it.json").read_text())["results"]
    for name in ("lessons", "lessons-plain"):
        assert results[name]["episodes_per_s"] > 0 and len(results[name]["iterations"]) == 2, results[name]
    assert results["lessons"]["forward_backend"] == "fast" and results["lessons"]["engine"] is not None
    assert results["lessons-plain"]["engine"] is None
    mem = env_run("benchmarks/ppo_memory.py", "--quick", "--sizes", "llama2-13b", "--out", str(tmp_path / "mem"))
    assert mem.returncode == 0, mem.stderr[-2000:]
    assert "median" in json.loads((tmp_path / "mem.json").read_text())["results"]["llama2-13b"]
