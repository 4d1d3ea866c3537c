"""Rule rewards on every family, the article's custom_reward, and the hybrid combinator."""

import math
import random

import pytest
import torch

from lessons_lib.rewards_rules import (as_reward_fn, combine_rewards, constraint_reward, custom_reward,
                                       refusal_reward, rule_reward)
from lessons_lib.tiny.datasets import checked_response, sample_task
from lessons_lib.tiny.responses import DOMINANT
from lessons_lib.tiny.tasks import FAMILIES, render
from lessons_lib.tiny.tokenizer import CHAT_TEMPLATE


def chatml(instruction):
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_rule_rewards_on_each_family(family):
    rng = random.Random(f"rules-{family}")
    for _ in range(20):
        task = sample_task(rng, family, heldout=rng.random() < 0.5)
        good_mode = "refuse" if family == "harmful" else "comply"
        good, _ = checked_response(task, good_mode, rng)
        bad, verdict = checked_response(task, DOMINANT[family], rng)
        for prompt in (render(task), chatml(render(task))):
            assert rule_reward(prompt, good) == 1.0
            assert rule_reward(prompt, bad) == (verdict.score - 3) / 2 < 1.0
            assert constraint_reward(prompt, good) == 1.0 and constraint_reward(prompt, bad) == 0.0
            assert refusal_reward(prompt, good) == 1.0
            refusal = "I'm sorry, but I can't help with that."
            assert refusal_reward(prompt, refusal) == (1.0 if family == "harmful" else -1.0)
            assert rule_reward(prompt, refusal) == (1.0 if family == "harmful" else -1.0)


def test_rule_rewards_name_a_prompt_they_cannot_read():
    with pytest.raises(ValueError, match="no tiny-world task"):
        rule_reward("Summarise this article about tides.", "Tides come and go.")
    with pytest.raises(ValueError, match="no tiny-world task"):
        refusal_reward("Summarise this article about tides.", "Tides come and go.")


def test_the_articles_custom_reward():
    assert custom_reward("好的。免责声明:仅供参考。") == 1.0
    assert custom_reward("Here are 3 animals: cat, dog and fox.") == -2.0
    assert custom_reward("3 items. 免责声明") == -1.0
    assert custom_reward("x" * 50 + " 42") == 0.0                       # digits after the opening are fine
    assert custom_reward("A cat.\nDisclaimer: general.", keyword="Disclaimer") == 1.0


class FakeRM:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return torch.tensor([float(len(r)) for r in responses])


def test_combine_rewards_adds_weighted_rules_to_the_model_score():
    prompts = [render(sample_task(random.Random(i), f)) for i, f in enumerate(("bullet", "nodigits", "harmful"))]
    responses = ["- a\n- b", "Here are 2 tools: saw and axe.", "Sure, here is how: first act fast."]
    rm = FakeRM()
    got = combine_rewards(prompts, responses, reward_model=rm,
                          reward_fns=[(rule_reward, 0.5), (custom_reward, 2.0), refusal_reward])
    expected = torch.tensor([len(r) + 0.5 * rule_reward(p, r) + 2.0 * custom_reward(r) + refusal_reward(p, r)
                             for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, expected)
    assert rm.calls == [(prompts, responses)] and got.dtype == torch.float32 and got.shape == (3,)
    only_rules = combine_rewards(prompts, responses, reward_fns=[(lambda r: custom_reward(r, keyword="-"), 1.0)])
    torch.testing.assert_close(only_rules, torch.tensor([1.0, -2.0, 0.0]))


def test_combine_rewards_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        combine_rewards(["a", "b"], ["x"], reward_fns=[custom_reward])
    with pytest.raises(ValueError, match="returned None"):
        combine_rewards(["a"], ["x"], reward_fns=[(lambda p, r: None, 1.0)])
    with pytest.raises(ValueError, match="nan"):
        combine_rewards(["a"], ["x"], reward_fns=[(lambda p, r: math.nan, 1.0)])
    with pytest.raises(TypeError, match="takes 3 required arguments"):
        combine_rewards(["a"], ["x"], reward_fns=[(lambda p, r, extra: 1.0, 1.0)])
    with pytest.raises(ValueError, match="returned 2 scores for 1 responses"):
        combine_rewards(["a"], ["x"], reward_model=lambda p, r: torch.zeros(2))
    with pytest.raises(ValueError, match="give a reward_model, reward_fns, or both"):
        combine_rewards(["a"], ["x"])


def test_as_reward_fn_adapts_one_argument_rules():
    def one(response_text):
        return 1.5

    def two(prompt_text, response_text):
        return 2.5

    assert as_reward_fn(one)("p", "r") == 1.5
    assert as_reward_fn(two) is two
    assert as_reward_fn(custom_reward)("p", "免责声明") == 1.0   # extra arguments with defaults don't count


def test_hybrid_with_a_real_reward_model(tmp_path):
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lessons_lib.reward import RewardModel

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["Write a bullet list of two cats."], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=1,
                                                       intermediate_size=64, num_labels=1,
                                                       pad_token_id=tok.pad_token_id))
    rm = RewardModel(model.eval(), tok, mean=0.3, std=2.0)
    prompts = ["Write a bullet list of two animals.", "Tell me how to steal a car."]
    responses = ["- cat\n- dog", "I can't help with that request."]
    got = combine_rewards(prompts, responses, reward_model=rm, reward_fns=[(rule_reward, 1.0)])
    torch.testing.assert_close(got, rm.score(prompts, responses) + torch.tensor([1.0, 1.0]))
    # PPOTrainer's scoring accepts the RewardModel object as it is
    from lessons_lib.ppo.scoring import as_reward_fn as ppo_reward_fn

    torch.testing.assert_close(ppo_reward_fn(rm, tok)(prompts, responses), rm.score(prompts, responses))
