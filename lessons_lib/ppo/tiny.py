"""PPO on the tiny world: the recipe behind `scripts/tiny_ppo_win.py`, lesson 04's training, and the tiny-world
id `tiny-qwen2-ppo` (the SFT model after this recipe, LoRA merged into plain weights).

    from lessons_lib.ppo.tiny import train_tiny_ppo
    trainer, history = train_tiny_ppo()                   # tiny-qwen2-sft + tiny-qwen2-reward, CPU, ~1 s per step

The builder `build_ppo_model(out_dir, tiny_dir)` is registered in `lessons_lib.tiny.MODELS`; it runs the recipe
with a fixed number of steps and seeds, so a rebuild on the same machine gives the same model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .config import PPOConfig
from .trainer import PPOTrainer


@dataclass
class TinyRecipe:
    """Everything that defines a tiny-world PPO run besides the models."""
    steps: int = 40
    """PPO iterations (each: 32 prompts sampled, scored, 4 epochs x 4 minibatches)"""
    lora_r: int | None = 16
    """LoRA rank on every linear layer of the policy; None trains every weight (full fine-tuning)"""
    load_in_4bit: bool = False
    """NF4 base weights (the article's QLoRA); on a CPU it is ~1.3x slower and changes nothing else"""
    rule_weight: float = 0.0
    """weight of the tiny world's rule reward (`rewards_rules.rule_reward`) added to the reward model's score"""
    config: PPOConfig = field(default_factory=lambda: PPOConfig.tiny())
    """the PPO hyperparameters"""


def training_prompts(split: str = "sft"):
    """The distinct instructions of a tiny-world split, as a `datasets.Dataset` with `instruction` and `family`."""
    from datasets import Dataset

    from lessons_lib.tiny import data_file
    from lessons_lib.tiny.datasets import read_jsonl

    seen, rows = set(), []
    for row in read_jsonl(data_file(split)):
        if row["instruction"] not in seen:
            seen.add(row["instruction"])
            rows.append({"instruction": row["instruction"], "family": row["family"]})
    return Dataset.from_list(rows)


def make_tiny_trainer(recipe: TinyRecipe | None = None, policy: str = "tiny-qwen2-sft",
                      reward: str = "tiny-qwen2-reward", dataset=None, reward_fns=()):
    """The policy (with LoRA adapters unless full fine-tuning), the reward model and a PPOTrainer over the prompts;
    `reward_fns` are extra rule rewards `[(fn, weight), ...]` on top of the reward model (and the recipe's rule)."""
    from lessons_lib.models import get_peft_model, load_model

    recipe = recipe or TinyRecipe()
    model, tokenizer = load_model(policy, load_in_4bit=recipe.load_in_4bit)
    if recipe.lora_r:
        model = get_peft_model(model, r=recipe.lora_r, lora_alpha=recipe.lora_r, lora_dropout=0.0, verbose=False)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    reward_fns = list(reward_fns)
    if recipe.rule_weight:
        from lessons_lib.rewards_rules import rule_reward

        reward_fns.append((rule_reward, recipe.rule_weight))
    return PPOTrainer(config=recipe.config, model=model, tokenizer=tokenizer,
                      dataset=dataset if dataset is not None else training_prompts(),
                      reward_model=reward, reward_fns=reward_fns)


def train_tiny_ppo(recipe: TinyRecipe | None = None, seconds: float | None = None, trainer=None, on_step=None,
                   **trainer_kwargs):
    """Run the recipe (or stop after `seconds`); returns (trainer, list of step stats)."""
    from tqdm.auto import tqdm

    recipe = recipe or TinyRecipe()
    trainer = trainer or make_tiny_trainer(recipe, **trainer_kwargs)
    history, start = [], time.perf_counter()
    bar = tqdm(total=recipe.steps, desc="PPO", disable=not trainer.config.progress)
    while len(history) < recipe.steps and (seconds is None or time.perf_counter() - start < seconds):
        batch = next(iter(trainer.dataloader))
        queries = batch["input_ids"]
        responses = trainer.generate(queries, return_prompt=False)
        rewards = trainer.compute_reward(responses=responses, queries=queries)
        stats = trainer.step(queries=queries, responses=responses, rewards=rewards)
        history.append(stats)
        bar.update(1)
        bar.set_postfix_str(f"score {stats['objective/scores']:+.2f} kl {stats['objective/kl']:.2f}")
        if on_step is not None:
            on_step(stats)
    bar.close()
    return trainer, history


def merged_policy(trainer):
    """The trained policy as a plain model (LoRA merged into the weights; 4-bit bases dequantized)."""
    if not trainer.is_peft:
        return trainer.model
    from lessons_lib.models import merge_lora

    return merge_lora(trainer.model)


def build_ppo_model(out_dir, tiny_dir=None, recipe: TinyRecipe | None = None, progress: bool = True) -> None:
    """tiny-qwen2-ppo: the recipe from tiny-qwen2-sft with tiny-qwen2-reward, seeded, merged, saved to `out_dir`."""
    import torch

    recipe = recipe or TinyRecipe()
    recipe.config = recipe.config.replace(progress=progress)
    torch.manual_seed(recipe.config.seed)
    trainer, _ = train_tiny_ppo(recipe)
    model = merged_policy(trainer)
    model.save_pretrained(out_dir)
    trainer.tokenizer.save_pretrained(out_dir)
