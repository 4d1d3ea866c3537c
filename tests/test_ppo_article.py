"""Acceptance: the article's listings (sections 3.2-3.4 and 5.1-5.3) run as written on the tiny world, on CPU,
in 4-bit with LoRA. The only changes: imports from lessons_lib instead of unsloth/trl, tiny-world ids instead of
hub ids, and a 64-row dataset so the loop (one pass over the dataloader) makes two PPO steps."""

import math

import pytest
import torch


def test_article_listing_runs_as_written(tmp_path, monkeypatch, capsys):
    from lessons_lib.data import load_instruction_data
    from lessons_lib.tiny import data_file

    dataset = load_instruction_data(data_file("sft")).select(range(64))   # instruction, response, score

    # ---------------------------------------------------------------- 3.2 (from lessons_lib instead of unsloth / trl)
    from lessons_lib import is_bfloat16_supported  # noqa: F401
    from transformers import TrainingArguments  # noqa: F401
    from lessons_lib import PPOConfig, PPOTrainer
    from lessons_lib import load_model, get_peft_model

    # 1. 加载基础模型(自动启用 4-bit QLoRA + Flash Attention)
    model, tokenizer = load_model(
        model_name = "tiny-qwen2-sft",          # the article: "Qwen/Qwen2-1.5B-Instruct"
        max_seq_length = 2048,
        dtype = None,  # 自动选择 bfloat16(A100)或 float16(V100)
        load_in_4bit = True,
    )
    # 2. 添加 LoRA 适配器(仅训练少量参数)
    model = get_peft_model(
        model,
        r = 16,
        target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_alpha = 16,
        lora_dropout = 0.1,
    )

    # ---------------------------------------------------------------- 3.3
    # 定义 PPO 配置
    ppo_config = PPOConfig(
        model_name = "qwen2-1.5b-ppo",
        learning_rate = 1.41e-5,
        batch_size = 32,
        mini_batch_size = 8,
        gradient_accumulation_steps = 4,
        ppo_epochs = 4,
        remove_unused_columns = False,
    )
    # 初始化 PPO 训练器(自动构建 critic 和 reward model)
    ppo_trainer = PPOTrainer(
        config = ppo_config,
        model = model,
        ref_model = None,  # Unsloth 自动创建参考模型(冻结初始权重)
        tokenizer = tokenizer,
        dataset = dataset,  # 你准备好的指令数据集
        reward_model = "tiny-qwen2-reward",     # the article: "unsloth/llama-3-8b-bnb-4bit"
    )

    # ---------------------------------------------------------------- 3.4
    with pytest.warns(UserWarning, match="rates the dataset's answer"):   # the score trap (docs/PPO.md)
        for epoch, batch in enumerate(ppo_trainer.dataloader):
            # 1. Actor 生成响应
            query_tensors = batch["input_ids"]
            response_tensors = ppo_trainer.generate(
                query_tensors,
                return_prompt=False,
                generate_kwargs = {
                    "max_new_tokens": 128,
                    "do_sample": True,
                    "temperature": 0.7,
                }
            )
            # 2. Reward model 打分
            rewards = ppo_trainer.compute_reward(
                responses = response_tensors,
                queries = query_tensors,
                scores = batch.get("score", None),  # 若提供 score,则直接使用
            )
            # 3. PPO 更新(含 critic loss + KL penalty)
            stats = ppo_trainer.step(
                queries = query_tensors,
                responses = response_tensors,
                rewards = rewards,
            )
            # 4. 每 10 步打印一次关键指标
            if epoch % 10 == 0:
                print(f"Epoch {epoch} | Reward: {rewards.mean():.3f} | KL: {stats['objective/kl']: .3f}")
    assert epoch == 1 and ppo_trainer.current_step == 2
    assert "Epoch 0 | Reward:" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in stats.values())
    assert rewards.tolist() == pytest.approx(batch["score"])   # the dataset's scores, used as they are

    # ---------------------------------------------------------------- 5.1 as written: a number added to token ids
    def custom_reward(response_text):
        reward = 0.0
        if "免责声明" in response_text:
            reward += 1.0
        if any(char.isdigit() for char in response_text[:50]):
            reward -= 2.0  # 惩罚开头出现数字
        return reward

    # 在训练循环中注入
    rewards = [r + custom_reward(tokenizer.decode(r)) for r in response_tensors]
    assert rewards[0].dtype == torch.float32 and rewards[0].shape == response_tensors[0].shape
    assert any(len(r) > 1 for r in response_tensors)     # the mistake is only detectable on a multi-token response
    with pytest.raises(ValueError, match="section 5.1"):
        ppo_trainer.step(queries=query_tensors, responses=response_tensors, rewards=rewards)
    # ... and what it meant: a rule reward on top of the reward model (the hybrid reward)
    hybrid = PPOTrainer(config=ppo_config, model=model, tokenizer=tokenizer, dataset=dataset,
                        reward_model="tiny-qwen2-reward", reward_fns=[(custom_reward, 1.0)])
    scores = hybrid.compute_reward(responses=response_tensors, queries=query_tensors)
    assert scores.shape == (32,) and "custom_reward" in hybrid.last_reward_parts

    # ---------------------------------------------------------------- 5.2
    ppo_trainer.dataloader.sampler.set_difficulty(
        difficulty = "hard",  # 可选 "easy"/"medium"/"hard"
        strategy = "entropy_based",  # 基于响应熵值筛选高不确定性样本
    )
    batch = next(iter(ppo_trainer.dataloader))
    assert len(batch["input_ids"]) == 32

    # ---------------------------------------------------------------- 5.3
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("qwen2-1.5b-ppo-finetuned")
    tokenizer.save_pretrained("qwen2-1.5b-ppo-finetuned")
    reloaded, _ = load_model(str(tmp_path / "qwen2-1.5b-ppo-finetuned"), load_in_4bit=True)
    reloaded.eval(), model.eval()     # the reloaded adapters come with their lora_dropout = 0.1
    with torch.no_grad():
        ids = query_tensors[0][None]
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
