"""PPO on a 4-bit (NF4) policy with LoRA adapters, on the CPU: the article's setup at toy scale."""

import math

import pytest
import torch

from lessons_lib import PPOConfig, PPOTrainer, get_peft_model, load_model
from test_ppo_helpers import lowercase_reward, make_dataset


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    from lessons_lib.models import save_random_model

    folder = save_random_model(tmp_path_factory.mktemp("random") / "qwen2")
    model, tokenizer = load_model(str(folder), load_in_4bit=True)
    model = get_peft_model(model, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_alpha=16,
                           lora_dropout=0.1, verbose=False)
    return model, tokenizer


def test_qlora_policy_trains_after_generate(qlora):
    model, tok = qlora
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=6,
                    progress=False)
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, dataset=make_dataset(), reward_fns=[(lowercase_reward, 1.0)])
    assert trainer.ref_model is None                     # reference = adapters disabled, no second 4-bit copy
    for _ in range(2):
        batch = next(iter(trainer.dataloader))
        responses = trainer.generate(batch["input_ids"], return_prompt=False, generate_kwargs={"max_new_tokens": 6})
        rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
        stats = trainer.step(queries=batch["input_ids"], responses=responses, rewards=rewards)
        assert all(math.isfinite(v) for v in stats.values())
    assert stats["objective/kl"] != 0
    # after generate() (no-grad forwards of the 4-bit layers), every LoRA matrix must still get a gradient
    roll = trainer.last_rollout
    trainer.optimizer.zero_grad()
    loss, _ = trainer._minibatch_loss(roll, torch.arange(8))
    loss.backward()
    lora = [(n, p) for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 4 * trainer.model.config.num_hidden_layers
    assert not [n for n, p in lora if p.grad is None or p.grad.abs().sum() == 0]
