"""Small random Qwen2 policies, a ChatML tokenizer and toy prompts for the PPO tests (imported by tests/test_ppo_*.py).

Everything is built in memory in well under a second: hidden 64, 2 layers, a byte-level BPE vocabulary of ~260.
"""

from __future__ import annotations

import functools

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["apple", "pear", "plum", "fig", "red", "blue", "cat", "dog", "list", "three", "write", "name", "two"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20 + ["user assistant system"] * 5, trainer)
    return tok.to_str()


def make_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
                                  pad_token="<|pad|>", padding_side="left")
    tok.chat_template = CHATML
    return tok


def make_policy(tokenizer, seed: int = 0, lora: bool = True, hidden: int = 64):
    """A random tiny Qwen2ForCausalLM (optionally with LoRA adapters on q, k, v, o)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        # LoRA B starts at zero: give it small random values so policy and reference differ in tests that need it
    return model


def make_reward_model(tokenizer, seed: int = 1, hidden: int = 64):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForSequenceClassification(cfg)


def make_dataset(n: int = 24):
    from datasets import Dataset

    rows = [{"instruction": f"{WORDS[i % 5]} {WORDS[5 + i % 7]} {WORDS[i % 3 + 8]}", "score": float(i % 5),
             "family": ["a", "b", "c"][i % 3]} for i in range(n)]
    return Dataset.from_list(rows)


def letter_reward(prompt: str, response: str) -> float:
    """Toy rule reward: the share of the response's characters that are the letter 'e' (learnable, bounded)."""
    return sum(c == "e" for c in response) / max(len(response), 1)


def lowercase_reward(prompt: str, response: str) -> float:
    """Toy rule reward a random policy can learn fast: the share of characters that are a-z or a space."""
    return sum(c in "abcdefghijklmnopqrstuvwxyz " for c in response) / max(len(response), 1)


def batch_letter_reward(prompts, responses):
    """The same toy reward as a batched `(prompts, responses) -> scores` callable."""
    return [letter_reward(p, r) for p, r in zip(prompts, responses)]


def test_helpers_build_a_working_policy():
    tok = make_tokenizer()
    model = make_policy(tok)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "name two fruits"}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    out = model(**ids)
    assert out.logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert tok.eos_token_id != tok.pad_token_id
    assert len(make_dataset()) == 24
