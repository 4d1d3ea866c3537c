"""Nothing lost: a resumed PPO run reproduces the uninterrupted run exactly (CPU), and a non-finite value stops
training with the step named while the last good checkpoint stays intact."""

import hashlib
from pathlib import Path

import pytest
import torch

from lessons_lib.ppo import NonFiniteError, PPOConfig, PPOTrainer
from test_ppo_helpers import letter_reward, make_dataset, make_policy, make_reward_model, make_tokenizer

REWARD_FNS = [(letter_reward, 1.0)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def config(**kw):
    # every piece of state in play: adaptive KL, running score statistics, difficulty sampling, minibatch shuffles
    values = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=3e-3, max_new_tokens=6, progress=False,
                  adaptive_kl=True, kl_target=0.05, kl_horizon=100, score_norm=True, whiten_rewards=True)
    return PPOConfig(**{**values, **kw})


def new_trainer(tok, variant="lora", **kw):
    reward_model = make_reward_model(tok) if variant == "critic" else None
    extra = {"value_model": "reward"} if variant == "critic" else {}
    model = make_policy(tok, seed=0, lora=variant != "full")
    return PPOTrainer(config(**extra, **kw), model=model, tokenizer=tok, dataset=make_dataset(),
                      reward_model=reward_model, reward_fns=REWARD_FNS)


def run(trainer, steps, difficulty_at=2):
    out = []
    for _ in range(steps):
        if trainer.current_step == difficulty_at:
            trainer.dataloader.sampler.set_difficulty("hard", "reward_based")
        batch = next(iter(trainer.dataloader))
        responses = trainer.generate(batch["input_ids"], return_prompt=False, generate_kwargs={"max_new_tokens": 6})
        rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
        stats = trainer.step(queries=batch["input_ids"], responses=responses, rewards=rewards)
        out.append({k: v for k, v in stats.items() if not k.startswith("time/")})
    return out


def weights(trainer):
    value = trainer.value_head if trainer.value_head is not None else trainer.critic
    return [p.detach().clone() for p in trainer.model.parameters()] + [p.detach().clone() for p in value.parameters()]


@pytest.mark.parametrize("variant", ["lora", "lora_from_base", "full", "critic"])
def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tok, tmp_path, variant):
    build = "lora" if variant == "lora_from_base" else variant
    straight = new_trainer(tok, build)
    expected = run(straight, 4)

    first = new_trainer(tok, build)
    got = run(first, 2)
    first.save_checkpoint(tmp_path / "ck")
    del first
    base = make_policy(tok, seed=0, lora=variant not in ("full", "lora_from_base"))
    if variant == "lora_from_base":
        base = make_policy(tok, seed=0, lora=False)          # a plain model: the saved adapters are attached to it
    resumed = PPOTrainer.from_checkpoint(tmp_path / "ck", model=base, tokenizer=tok, dataset=make_dataset(),
                                         reward_model=make_reward_model(tok) if variant == "critic" else None,
                                         reward_fns=REWARD_FNS)
    assert resumed.current_step == 2
    got += run(resumed, 2)
    assert got == expected                                    # every stat, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(straight)))


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_finite_reward_keeps_the_last_good_checkpoint(tok, tmp_path):
    trainer = new_trainer(tok, checkpoint_dir=str(tmp_path / "ck"), save_every=1)
    run(trainer, 2)
    saved = digest(tmp_path / "ck")
    batch = next(iter(trainer.dataloader))
    responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=6)
    rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
    rewards[5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite reward.*last good checkpoint is .*ck \(step 2\)"):
        trainer.step(batch["input_ids"], responses, rewards=rewards)
    assert digest(tmp_path / "ck") == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]   # no temporary folders left behind
    back = PPOTrainer.from_checkpoint(tmp_path / "ck", model=make_policy(tok, seed=0), tokenizer=tok,
                                      dataset=make_dataset(), reward_fns=REWARD_FNS)
    assert back.current_step == 2


def test_non_finite_loss_and_gradient_stop_before_the_update(tok, tmp_path):
    trainer = new_trainer(tok, checkpoint_dir=str(tmp_path / "ck"), save_every=1)
    run(trainer, 1)
    saved = digest(tmp_path / "ck")
    before = weights(trainer)
    with torch.no_grad():
        trainer.value_head.summary.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite"):
        run(trainer, 1)
    policy_now = [p.detach() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, policy_now))   # nothing was applied

    trainer = new_trainer(tok, checkpoint_dir=str(tmp_path / "ck2"), save_every=1)
    run(trainer, 1)
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
    lora.register_hook(lambda grad: grad * float("nan"))
    before = weights(trainer)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient norm \(nan\) in PPO epoch 1"):
        run(trainer, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(trainer)))
    assert digest(tmp_path / "ck") == saved


def test_checkpoint_files_and_errors(tok, tmp_path):
    trainer = new_trainer(tok)
    run(trainer, 1)
    path = Path(trainer.save_checkpoint(tmp_path / "ck"))
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"policy/adapter_model.safetensors", "policy/adapter_config.json", "value.safetensors", "optimizer.pt",
            "state.pt", "config.json"} <= names
    trainer.save_checkpoint(tmp_path / "ck")            # overwriting replaces it atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(FileNotFoundError, match="not a PPO checkpoint"):
        PPOTrainer.from_checkpoint(tmp_path, model=make_policy(tok), tokenizer=tok)
    resumed = PPOTrainer.from_checkpoint(path, model=make_policy(tok), tokenizer=tok, dataset=make_dataset(),
                                         reward_fns=REWARD_FNS, learning_rate=1e-4)
    assert resumed.config.learning_rate == 1e-4 and resumed.config.adaptive_kl
