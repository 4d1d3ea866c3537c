"""PPO on a CUDA GPU: a 4-bit + LoRA Qwen2 policy in bf16, the fused log-prob kernel on the training path.

Run on the GPU machine (docs/GPU.md): python -m pytest tests/test_ppo_cuda.py -q
"""

import math

import pytest
import torch

from lessons_lib import PPOConfig, PPOTrainer, get_peft_model, load_model
from lessons_lib.data import chat_prompt
from lessons_lib.ppo.rollout import token_logprobs
from test_ppo_helpers import lowercase_reward

pytestmark = pytest.mark.cuda


def test_fused_token_logprobs_match_the_torch_path():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(3, 17, 1031, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(1031, (3, 17), device="cuda", generator=g)
    got, entropy = token_logprobs(logits, tokens, 0.7, with_entropy=True)
    ref_logp = torch.log_softmax(logits.detach().float() / 0.7, -1)
    torch.testing.assert_close(got, ref_logp.gather(-1, tokens[..., None]).squeeze(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, -(ref_logp.exp() * ref_logp).sum(-1), atol=1e-3, rtol=1e-3)
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_qlora_ppo_steps_on_gpu(tmp_path):
    from lessons_lib.models import save_random_model

    folder = save_random_model(tmp_path / "qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    model, tok = load_model(str(folder), load_in_4bit=True)
    assert next(model.parameters()).is_cuda
    model = get_peft_model(model, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_alpha=16,
                           lora_dropout=0.1, verbose=False)
    cfg = PPOConfig(batch_size=16, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2,
                    learning_rate=1e-3, max_new_tokens=16, progress=False)
    # no `datasets` on the GPU machine: queries are tokenized here instead of coming from trainer.dataloader
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_fns=[(lowercase_reward, 1.0)])
    queries = [torch.tensor(tok(chat_prompt(tok, f"name {n} fruits"), add_special_tokens=False)["input_ids"])
               for n in range(16)]
    for _ in range(3):
        responses = trainer.generate(queries, return_prompt=False, generate_kwargs={"max_new_tokens": 16})
        rewards = trainer.compute_reward(responses=responses, queries=queries)
        stats = trainer.step(queries=queries, responses=responses, rewards=rewards)
        assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["objective/kl"] != 0 and trainer.ref_model is None
    path = trainer.save_checkpoint(tmp_path / "ck")
    assert (tmp_path / "ck" / "policy" / "adapter_model.safetensors").exists() and path
