"""The tiny-world PPO recipe (lessons_lib.ppo.tiny): it runs, and the `tiny-qwen2-ppo` builder writes a loadable model."""

import math

import torch

from lessons_lib.ppo.tiny import TinyRecipe, build_ppo_model, train_tiny_ppo, training_prompts


def short_recipe(**kw):
    recipe = TinyRecipe(steps=2, **kw)
    recipe.config = recipe.config.replace(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=16,
                                          progress=False)
    return recipe


def test_training_prompts_are_distinct_instructions():
    prompts = training_prompts()
    assert len(set(prompts["instruction"])) == len(prompts) > 1000
    assert "harmful" in set(prompts["family"])


def test_recipe_runs_with_rules_on_top():
    trainer, history = train_tiny_ppo(short_recipe(rule_weight=0.5))
    assert len(history) == 2 and trainer.current_step == 2
    assert all(math.isfinite(v) for v in history[-1].values())
    assert "env/reward/rule_reward" in history[-1] and "env/reward/reward_model" in history[-1]


def test_builder_writes_a_plain_model(tmp_path):
    from lessons_lib.models import load_model

    build_ppo_model(tmp_path, recipe=short_recipe(), progress=False)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    model, tokenizer = load_model(str(tmp_path), load_in_4bit=False)
    assert not hasattr(model, "peft_config")
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
