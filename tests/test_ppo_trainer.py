"""PPOTrainer on small random Qwen2 models: the article's API, rollout correctness, rewards, the update."""

import warnings

import pytest
import torch

from lessons_lib.ppo import NonFiniteError, PPOConfig, PPOTrainer
from lessons_lib.ppo.rollout import policy_forward, truncate_after_eos
from test_ppo_helpers import (batch_letter_reward, letter_reward, lowercase_reward, make_dataset, make_policy,
                              make_reward_model, make_tokenizer)

REQUIRED_STATS = ["objective/kl", "objective/kl_coef", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                  "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                  "ppo/val/clipfrac", "ppo/val/explained_variance", "ppo/returns/mean", "time/ppo/total"]


def small_config(**kw):
    values = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=3e-3, max_new_tokens=10, progress=False)
    return PPOConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def trainer_for(tok, lora=True, seed=0, **kw):
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in PPOConfig.__dataclass_fields__}
    kw.setdefault("reward_fns", [(letter_reward, 1.0)])
    return PPOTrainer(small_config(**cfg_kw), model=make_policy(tok, seed=seed, lora=lora), tokenizer=tok,
                      dataset=make_dataset(), **kw)


def one_iteration(trainer, **gen):
    batch = next(iter(trainer.dataloader))
    queries = batch["input_ids"]
    responses = trainer.generate(queries, return_prompt=False, generate_kwargs={"max_new_tokens": 10, **gen})
    rewards = trainer.compute_reward(responses=responses, queries=queries)
    return batch, responses, rewards, trainer.step(queries=queries, responses=responses, rewards=rewards)


# ------------------------------------------------------------------------------------------ config

def test_config_relations_and_errors():
    cfg = PPOConfig.article()
    assert (cfg.backward_batch_size, cfg.num_mini_batches, cfg.optimizer_steps_per_step) == (32, 4, 4)
    assert PPOConfig.tiny().optimizer_steps_per_step == 16
    with pytest.raises(ValueError, match=r"multiple of mini_batch_size \* gradient_accumulation_steps"):
        PPOConfig(batch_size=32, mini_batch_size=8, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="unknown field"):
        PPOConfig.from_dict({"batch_sise": 4})
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------ dataloader and generate

def test_dataloader_batches_follow_the_article(tok):
    trainer = trainer_for(tok)
    batch = next(iter(trainer.dataloader))
    assert isinstance(batch["input_ids"], list) and all(q.ndim == 1 for q in batch["input_ids"])
    assert len(batch["input_ids"]) == 8 and batch.get("score") is not None and "family" in batch
    from lessons_lib.data import chat_prompt

    expected = tok(chat_prompt(tok, batch["instruction"][0]), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    lean = trainer_for(tok, remove_unused_columns=True)
    assert set(next(iter(lean.dataloader))) == {"input_ids", "instruction", "query", "prompt_id"}


def test_generate_shapes_and_eos_truncation(tok):
    trainer = trainer_for(tok)
    batch = next(iter(trainer.dataloader))
    q = batch["input_ids"]
    torch.manual_seed(1)
    with_prompt = trainer.generate(q, generate_kwargs={"max_new_tokens": 6})
    torch.manual_seed(1)
    responses = trainer.generate(q, return_prompt=False, generate_kwargs={"max_new_tokens": 6})
    for qi, full, r in zip(q, with_prompt, responses):
        assert torch.equal(full, torch.cat([qi, r])) and 1 <= len(r) <= 6
        eos = (r == tok.eos_token_id).nonzero().flatten().tolist()
        assert eos in ([], [len(r) - 1])            # EOS only as the last token
    single = trainer.generate(q[0], return_prompt=False, max_new_tokens=3)
    assert single.ndim == 1 and len(single) <= 3
    cut, has_eos = truncate_after_eos(torch.tensor([5, 6, tok.eos_token_id, 7, tok.pad_token_id]), tok.eos_token_id,
                                      tok.pad_token_id)
    assert cut.tolist() == [5, 6, tok.eos_token_id] and has_eos
    cut, has_eos = truncate_after_eos(torch.tensor([5, 6, tok.pad_token_id]), tok.eos_token_id, tok.pad_token_id)
    assert cut.tolist() == [5, 6] and not has_eos


def test_distorting_sampling_options_warn(tok):
    trainer = trainer_for(tok)
    q = next(iter(trainer.dataloader))["input_ids"]
    with pytest.warns(UserWarning, match="top_k"):
        trainer.generate(q[:2], generate_kwargs={"max_new_tokens": 2, "top_k": 50})


# ------------------------------------------------------------------------------------------ the rollout's numbers

def test_rollout_logprobs_equal_an_unpadded_forward(tok):
    """Left/right padding and logits_to_keep must not change a single log-prob (position ids skip padding)."""
    trainer = trainer_for(tok, lora=False)
    batch, responses, _, _ = one_iteration(trainer, temperature=0.9)
    roll = trainer.last_rollout
    # after the update the policy changed; compare the reference, which did not
    ref = trainer.ref_model
    for i, (q, r) in enumerate(zip(batch["input_ids"], responses)):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logits = ref(ids).logits[0, len(q) - 1:-1].double() / 0.9
        expected = torch.log_softmax(logits, -1).gather(-1, r[:, None]).squeeze(-1)
        torch.testing.assert_close(roll.ref_logprobs[i, :len(r)].double(), expected, atol=2e-5, rtol=1e-5)
        assert torch.all(roll.ref_logprobs[i, len(r):] == 0)


def test_first_minibatch_ratio_is_one(tok):
    """One epoch over one minibatch: the policy has not moved yet, so ratio = 1, approxkl = 0, clipfrac = 0."""
    trainer = trainer_for(tok, ppo_epochs=1, mini_batch_size=8)
    _, _, _, stats = one_iteration(trainer)
    assert abs(stats["ppo/policy/approxkl"]) < 1e-6 and stats["ppo/policy/clipfrac"] == 0
    assert stats["ppo/policy/ratio"] == pytest.approx(1.0, abs=1e-5)


def test_reference_is_the_policy_with_adapters_disabled(tok):
    trainer = trainer_for(tok)
    assert trainer.ref_model is None and trainer.is_peft
    for _ in range(2):
        _, responses, _, stats = one_iteration(trainer)
    assert stats["objective/kl"] != 0
    roll = trainer.last_rollout
    base = trainer.model.get_base_model()
    with torch.no_grad(), trainer.model.disable_adapter():
        expected = policy_forward(base, roll.query_ids, roll.query_mask, roll.response_ids, roll.response_mask,
                                  trainer.sampling_temperature)[0] * roll.response_mask
    torch.testing.assert_close(roll.ref_logprobs, expected, atol=1e-5, rtol=1e-5)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)        # adapters moved away from zero


def test_full_finetune_uses_a_frozen_copy(tok):
    trainer = trainer_for(tok, lora=False)
    before = [p.clone() for p in trainer.ref_model.parameters()]
    one_iteration(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref_model.parameters()))
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(trainer.ref_model.parameters(), trainer.model.parameters())]
    assert sum(moved) > 0


def test_every_trainable_parameter_gets_a_gradient_after_generate(tok):
    """Generation (no-grad) must not break training: every LoRA matrix and the value head receive gradients."""
    trainer = trainer_for(tok)
    one_iteration(trainer)                               # lora_B leaves zero, so lora_A gets gradients next time
    batch = next(iter(trainer.dataloader))
    responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=6)
    roll = trainer.prepare_rollout(batch["input_ids"], responses)
    trainer.score_tokens(roll)
    roll.scores = torch.randn(8)
    trainer.kl_rewards(roll)
    trainer.advantages(roll)
    trainer.optimizer.zero_grad()
    loss, _ = trainer._minibatch_loss(roll, torch.arange(8))
    loss.backward()
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    named += [(f"value_head.{n}", p) for n, p in trainer.value_head.named_parameters()]
    missing = [n for n, p in named if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_dropout_is_disabled(tok):
    trainer = trainer_for(tok)
    drops = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0 for m in drops)


def test_sampling_temperature_follows_generate(tok):
    trainer = trainer_for(tok)
    with pytest.warns(UserWarning, match="temperature"):
        one_iteration(trainer, temperature=1.3)
    assert trainer.sampling_temperature == 1.3


# ------------------------------------------------------------------------------------------ rewards

def test_missing_eos_penalty_replaces_the_score(tok):
    trainer = trainer_for(tok, missing_eos_penalty=-3.0)
    batch = next(iter(trainer.dataloader))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses = [torch.tensor([10, 11, eos, 12, 13]) if i % 2 else torch.tensor([10, 11, 12]) for i in range(8)]
    trainer.step(batch["input_ids"], responses, rewards=[float(i) for i in range(8)])
    roll = trainer.last_rollout
    assert roll.response_mask.sum(1).tolist() == [3, 3] * 4          # cut after EOS; EOS counts as a real token
    assert roll.scores.tolist() == [-3.0, 1.0, -3.0, 3.0, -3.0, 5.0, -3.0, 7.0]
    assert pad != eos


def test_reward_model_kinds_and_hybrid(tok, tmp_path):
    rm = make_reward_model(tok)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    trainer = trainer_for(tok, reward_model=rm, reward_fns=[(letter_reward, 2.0)])
    batch = next(iter(trainer.dataloader))
    responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=5)
    hybrid = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
    rm_part = trainer.last_reward_parts["reward_model"]
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rules = torch.tensor([letter_reward(p, r) for p, r in zip(batch["instruction"], texts)])
    torch.testing.assert_close(hybrid, rm_part + 2.0 * rules)
    for kind in (str(tmp_path / "rm"), batch_letter_reward):
        other = trainer_for(tok, reward_model=kind, reward_fns=())
        other._remember_batch(batch)
        scores = other.compute_reward(responses=responses, queries=batch["input_ids"])
        expected = rm_part if isinstance(kind, str) else rules
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)

    class WithScore:
        def score(self, prompts, responses):
            return torch.tensor([float(len(r)) for r in responses])

    obj = trainer_for(tok, reward_model=WithScore(), reward_fns=())
    assert obj.compute_reward(responses, batch["input_ids"]).tolist() == [float(len(t)) for t in texts]
    with pytest.raises(ValueError, match="nothing to score"):
        trainer_for(tok, reward_fns=()).compute_reward(responses, batch["input_ids"])


def test_given_scores_are_used_as_they_are(tok):
    trainer = trainer_for(tok)
    batch = next(iter(trainer.dataloader))
    with pytest.warns(UserWarning, match="rates the dataset's answer"):
        out = trainer.compute_reward(responses=batch["input_ids"], queries=batch["input_ids"], scores=batch["score"])
    assert out.tolist() == batch["score"]
    responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=4)
    stats = trainer.step(queries=batch["input_ids"], responses=responses, scores=out)
    assert stats["objective/raw_scores"] == pytest.approx(sum(batch["score"]) / 8)


def test_per_token_rewards_are_rejected_clearly(tok):
    """The article's section 5.1 adds a float to the response token ids: step() must say what went wrong."""
    trainer = trainer_for(tok)
    batch = next(iter(trainer.dataloader))
    responses = [torch.tensor([10, 11, 12, tok.eos_token_id])] * 8
    as_written = [r + 0.5 for r in responses]        # `r + custom_reward(tokenizer.decode(r))`
    with pytest.raises(ValueError, match="section 5.1"):
        trainer.step(batch["input_ids"], responses, rewards=as_written)
    with pytest.raises(ValueError, match="batch_size is 8"):
        trainer.step(batch["input_ids"][:4], responses[:4], rewards=[0.0] * 4)


def test_non_finite_reward_stops_with_the_step_number(tok):
    trainer = trainer_for(tok)
    one_iteration(trainer)
    batch = next(iter(trainer.dataloader))
    responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=4)
    rewards = torch.zeros(8)
    rewards[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite reward\(s\) of response\(s\) \[3\]"):
        trainer.step(batch["input_ids"], responses, rewards=rewards)
    assert trainer.current_step == 1


# ------------------------------------------------------------------------------------------ the update

def test_stats_are_flat_floats_and_complete(tok):
    trainer = trainer_for(tok, adaptive_kl=True, kl_target=0.01, whiten_rewards=True, score_norm=True)
    for _ in range(2):
        _, _, _, stats = one_iteration(trainer)
    assert all(isinstance(v, float) for v in stats.values())
    assert not [k for k in REQUIRED_STATS if k not in stats]
    assert stats["objective/kl_coef"] != 0.05                       # the adaptive controller moved beta
    assert trainer.log_line(stats).startswith("score ")


def test_gradient_accumulation_sums_minibatches(tok):
    """ga=2 with minibatch 4 must give the same first update as ga=1 with minibatch 8 (one optimizer step)."""
    results = []
    for mini, ga in ((8, 1), (4, 2)):
        trainer = trainer_for(tok, mini_batch_size=mini, gradient_accumulation_steps=ga, ppo_epochs=1)
        torch.manual_seed(5)
        one_iteration(trainer)
        results.append(torch.cat([p.detach().flatten() for p in trainer._params]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_separate_critic_starts_from_the_reward_model(tok):
    rm = make_reward_model(tok)
    trainer = trainer_for(tok, reward_model=rm, value_model="reward")
    assert trainer.value_head is None
    assert all(torch.equal(a, b) for a, b in zip(rm.parameters(), trainer.critic.parameters()))
    _, _, _, stats = one_iteration(trainer)
    assert stats["ppo/val/mean"] != 0                               # warm-started: values are not all zero
    assert any(not torch.equal(a, b) for a, b in zip(rm.parameters(), trainer.critic.parameters()))


def test_adam_tf_style_matches_its_formula():
    from lessons_lib.ppo.optim import AdamTFStyle

    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)
    start = p.detach().clone()
    opt = AdamTFStyle([p], lr=0.1, eps=1e-3)
    m = v = torch.zeros(5, dtype=torch.float64)
    expected = start.clone()
    for t in range(1, 4):
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        expected = expected - 0.1 * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(p.detach(), expected)


def test_ppo_raises_a_toy_reward(tok):
    """Reward = share of lowercase letters in the response: 20 PPO steps must raise it clearly (random start ~0.25)."""
    trainer = trainer_for(tok, lora=False, batch_size=16, mini_batch_size=8, learning_rate=1e-3, max_new_tokens=8,
                          missing_eos_penalty=None, kl_coef=0.0, reward_fns=[(lowercase_reward, 1.0)])
    history = []
    for _ in range(20):
        batch = next(iter(trainer.dataloader))
        responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=8)
        rewards = trainer.compute_reward(responses=responses, queries=batch["input_ids"])
        trainer.step(batch["input_ids"], responses, rewards=rewards)
        history.append(float(rewards.mean()))
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert last > first + 0.15, (first, last)
