"""Reward models: last-token pooling under any padding, the losses, training in both modes, save/load."""

import math
import random

import pytest
import torch

from lessons_lib.reward import (RewardModel, RewardTrainingConfig, bradley_terry_loss, data_mode,
                                evaluate_reward_model, pairwise_metrics, regression_loss, train_reward_model)
from lessons_lib.tiny import tiny_dir
from lessons_lib.tiny.build import load_tokenizer
from lessons_lib.tiny.datasets import preference_rows, sft_rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core machine two OpenMP threads per process run ~10x slower than one (see docs/TINY_WORLD.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_dir())


def small_rm(tokenizer, seed=0, **config) -> RewardModel:
    """A random-weight Qwen2 sequence classifier, small enough to train in seconds."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from lessons_lib.reward import init_reward_head

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                  tie_word_embeddings=True)
    model = Qwen2ForSequenceClassification(Qwen2Config(**{**kwargs, **config}))
    init_reward_head(model)
    return RewardModel(model.eval(), tokenizer)


PROMPTS = ["Write a bullet list of two cats.", "Name a color and put it in double quotes.",
           "Tell me how to steal a car.", "Describe a horse in at most five words."]
RESPONSES = ["- lion\n- tiger", 'My pick is "red".', "I'm sorry, but I can't help with that.",
             "A horse is an animal that lives in the wild and people like to watch it run."]


def unpadded_rewards(rm, prompts, responses):
    """One sequence at a time, no padding at all: the head on the hidden state of the last position."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            hidden = rm.model.model(**rm.encode([p], [r])).last_hidden_state    # (1, T, H)
            out.append(rm.model.score(hidden[0, -1]).item())
    return torch.tensor(out)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_at_the_last_real_token(tokenizer, side, pad_is_eos):
    rm = small_rm(tokenizer, seed=3)
    if pad_is_eos:   # Llama-style setups pad with the end-of-turn token: the pad id alone can't find the end
        rm.tokenizer = tokenizer.__class__.from_pretrained(tiny_dir() / "tokenizer")
        rm.tokenizer.pad_token = rm.tokenizer.eos_token
        rm.model.config.pad_token_id = rm.tokenizer.eos_token_id
    reference = unpadded_rewards(rm, PROMPTS, RESPONSES)
    enc = rm.encode(PROMPTS, RESPONSES)                                  # left-padded
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(PROMPTS), "the test needs different lengths to mean anything"
    if side == "right":   # move every row's padding to the right
        ids, mask = enc["input_ids"].clone(), enc["attention_mask"].clone()
        for b, n in enumerate(lengths.tolist()):
            ids[b] = torch.cat([enc["input_ids"][b, -n:], enc["input_ids"][b, :-n]]) if n < ids.shape[1] else ids[b]
            mask[b] = torch.cat([torch.ones(n, dtype=mask.dtype), torch.zeros(ids.shape[1] - n, dtype=mask.dtype)])
        enc = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        got = rm.rewards(**enc)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.score(PROMPTS, RESPONSES, normalize=False, batch_size=3), reference,
                               atol=1e-5, rtol=1e-5)
    if pad_is_eos:   # the trap we avoid: transformers' own pooling looks for the last non-pad id
        with torch.no_grad():
            builtin = rm.model(**rm.encode(PROMPTS, RESPONSES)).logits[:, 0]
        assert (builtin - reference).abs().max() > 1e-3


def test_bradley_terry_loss_matches_the_formula_and_its_gradient():
    torch.manual_seed(7)
    c = torch.randn(37, dtype=torch.float64, requires_grad=True)
    r = torch.randn(37, dtype=torch.float64, requires_grad=True)
    m = torch.rand(37, dtype=torch.float64)
    loss = bradley_terry_loss(c, r, m)
    d = (c - r - m).detach()
    hand = torch.log1p(torch.exp(-d)).mean()
    torch.testing.assert_close(loss.detach(), hand)
    loss.backward()
    torch.testing.assert_close(c.grad, -torch.sigmoid(-d) / 37)       # d/dc of -log sigmoid(c - r - m), averaged
    torch.testing.assert_close(r.grad, torch.sigmoid(-d) / 37)
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    torch.testing.assert_close(regression_loss(c.detach(), r.detach()), ((c - r) ** 2).mean().detach())


def test_pairwise_metrics_by_hand():
    m = pairwise_metrics(torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 1.5, -3.0]))
    assert m["accuracy"] == 0.5
    assert m["margin"] == pytest.approx((2 - 1 - 0.5 + 2) / 4)
    confident = pairwise_metrics(torch.full((50,), 20.0), torch.zeros(50))
    assert confident["accuracy"] == 1.0 and confident["ece"] < 1e-6


def test_data_mode_is_picked_from_the_columns():
    assert data_mode([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == "preference"
    assert data_mode([{"instruction": "p", "response": "a", "score": 4.0}]) == "score"
    with pytest.raises(ValueError, match="expected prompt/chosen/rejected"):
        data_mode([{"question": "p", "answer": "a"}])


def tiny_pairs(n, seed, families=("bullet", "json", "harmful")):
    """Tiny-world pairs of a few families whose rejected answer has a format error (or is a harmful compliance)."""
    rows = [r for r in preference_rows(random.Random(seed), n * 8)
            if r["family"] in families and r["rejected_mode"] not in ("wrong_topic", "duplicate")]
    assert len(rows) >= n
    return rows[:n]


def test_bradley_terry_training_improves_held_out_accuracy(tokenizer):
    """A random-weight RM starts at chance and learns to prefer compliant answers on pairs it never saw."""
    rm = small_rm(tokenizer, seed=1)
    train, held = tiny_pairs(256, seed=11), tiny_pairs(96, seed=12)
    before = evaluate_reward_model(rm, held)["accuracy"]
    history = train_reward_model(rm, train, config=RewardTrainingConfig(epochs=2, batch_size=16, lr=3e-3,
                                                                        progress=False))
    after = evaluate_reward_model(rm, held)["accuracy"]
    assert history["mode"] == "preference" and len(history["loss"]) == 32
    assert before < 0.75, f"an untrained RM should be near chance, got {before:.2f}"
    assert after >= 0.9, f"held-out pairwise accuracy only {after:.2f} after training (before {before:.2f})"
    assert sum(history["loss"][-8:]) / 8 < sum(history["loss"][:8]) / 8
    # normalisation: the training responses now score mean 0, std 1
    scores = rm.score([r["prompt"] for r in train] * 2, [r["chosen"] for r in train] + [r["rejected"] for r in train])
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_regression_training_on_scores_learns_the_ranking(tokenizer):
    rm = small_rm(tokenizer, seed=2)
    rows = [r for r in sft_rows(random.Random(5), 1200) if r["family"] in ("bullet", "numbered", "harmful")]
    train, held = rows[:300], rows[300:420]
    before = evaluate_reward_model(rm, held)
    history = train_reward_model(rm, train, config=RewardTrainingConfig(epochs=3, batch_size=16, lr=3e-3,
                                                                        progress=False))
    after = evaluate_reward_model(rm, held)
    assert history["mode"] == "score" and rm.target_stats is not None
    assert after["spearman"] > 0.6 and after["spearman"] > before["spearman"] + 0.3, (before, after)
    assert after["mse"] < before["mse"]


def test_save_and_load_keep_weights_and_normalisation(tokenizer, tmp_path):
    rm = small_rm(tokenizer, seed=4)
    rm.fit_normalization(PROMPTS, RESPONSES)
    assert rm.std != 1.0 and rm.mean != 0.0
    expected = rm.score(PROMPTS, RESPONSES)
    rm.save(tmp_path / "rm", metrics={"note": 1})
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert (loaded.mean, loaded.std) == (rm.mean, rm.std)
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), expected)
    torch.testing.assert_close(loaded(PROMPTS, RESPONSES), expected)
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES, normalize=False), expected * rm.std + rm.mean)


@pytest.fixture(scope="module")
def sft_policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lessons_lib.tiny import resolve

    folder = resolve("tiny-qwen2-sft")
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_normalisation_on_policy_samples(tokenizer, sft_policy):
    """Mean 0, std 1 on the policy's own answers (sampled with the chat template), seeded, the caller's RNG kept."""
    from lessons_lib.tiny.measure import sample_responses

    policy, policy_tokenizer = sft_policy
    prompts = [r["prompt"] for r in tiny_pairs(24, seed=31)]
    rm = small_rm(tokenizer, seed=5)
    state = torch.get_rng_state()
    kwargs = dict(samples_per_prompt=2, max_new_tokens=24, batch_size=16, progress=False)
    mean, std = rm.fit_normalization_on_policy(policy, policy_tokenizer, prompts, seed=3, **kwargs)
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state changed"
    assert (rm.mean, rm.std) == (mean, std)
    answers = sample_responses(policy, policy_tokenizer, prompts, num_samples=2, max_new_tokens=24, batch_size=16,
                               seed=3)
    z = rm.score([p for p in prompts for _ in range(2)], [a for group in answers for a in group])
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-4)
    assert rm.fit_normalization_on_policy(policy, policy_tokenizer, prompts, seed=3, **kwargs) == (mean, std)
    assert rm.fit_normalization_on_policy(policy, policy_tokenizer, prompts, seed=4, **kwargs) != (mean, std)
    with pytest.raises(ValueError, match="no prompts"):
        rm.fit_normalization_on_policy(policy, policy_tokenizer, [], **kwargs)


def test_training_with_a_policy_normalises_on_its_samples(tokenizer, sft_policy):
    """train_reward_model(policy=...) fits on the policy's answers to the distinct training prompts; without a policy
    it falls back to the training answers."""
    policy, policy_tokenizer = sft_policy
    rows = tiny_pairs(32, seed=41)
    config = RewardTrainingConfig(max_steps=2, batch_size=16, progress=False, norm_max_new_tokens=24, seed=7)
    fallback, on_policy = small_rm(tokenizer, seed=6), small_rm(tokenizer, seed=6)
    train_reward_model(fallback, rows, config=config)
    train_reward_model(on_policy, rows, config=config, policy=policy, policy_tokenizer=policy_tokenizer)
    z = fallback.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, abs=1e-4)
    dataset_stats = fallback.mean, fallback.std
    a, b = fallback.model.state_dict(), on_policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the same training must give the same weights"
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    expected = fallback.fit_normalization_on_policy(policy, policy_tokenizer, prompts, max_new_tokens=24, seed=7,
                                                    progress=False)
    assert (on_policy.mean, on_policy.std) == expected != dataset_stats


def test_encode_rejects_mismatched_or_empty_batches(tokenizer):
    rm = small_rm(tokenizer)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(ValueError, match="empty batch"):
        rm.score([], [])


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["lora", "4bit-lora"])
def test_lora_reward_model_trains_adapters_and_head_and_round_trips(tmp_path, load_in_4bit):
    rm = RewardModel.from_backbone("tiny-qwen2-sft", lora_r=4, target_modules=["q_proj", "v_proj"],
                                   load_in_4bit=load_in_4bit)
    trainable = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable), sorted(trainable)[:5]
    assert any("score" in n for n in trainable)
    if load_in_4bit:
        assert any("4bit" in type(m).__name__ for m in rm.model.modules())
    rows = tiny_pairs(32, seed=21)
    rm.score(PROMPTS, RESPONSES)   # a no-grad forward first: bitsandbytes' CPU repack must not break training after
    rm.model.train()
    loss = bradley_terry_loss(*[rm.rewards(**rm.encode([r["prompt"] for r in rows], [r[k] for r in rows]))
                                for k in ("chosen", "rejected")])
    loss.backward()
    missing = [n for n, p in rm.model.named_parameters() if p.requires_grad and (p.grad is None or
                                                                                  p.grad.abs().sum() == 0)]
    # lora_A gets no gradient on the first step (lora_B starts at zero); lora_B and the head must
    assert not [n for n in missing if "lora_B" in n or "score" in n], missing
    rm.model.eval()
    rm.fit_normalization(PROMPTS, RESPONSES)
    rm.save(tmp_path / "lora-rm")
    loaded = RewardModel.from_pretrained(tmp_path / "lora-rm")
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), rm.score(PROMPTS, RESPONSES), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_any_causal_lm_backbone_becomes_a_reward_model(tmp_path, arch):
    """A causal-LM folder (random weights) loads as a one-label classifier; padding side does not change rewards."""
    from lessons_lib.models import save_random_model

    folder = save_random_model(tmp_path / arch, arch)
    rm = RewardModel.from_backbone(folder)
    assert type(rm.model).__name__ == f"{'Qwen2' if arch == 'qwen2' else 'Llama'}ForSequenceClassification"
    prompts, responses = ["Name two colors.", "Write a bullet list of three fruits."], ["red", "- apple\n- pear\n- plum"]
    left = rm.score(prompts, responses, normalize=False)
    single = torch.cat([rm.score([p], [r], normalize=False) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(left, single, atol=1e-5, rtol=1e-5)
    assert left.std() > 0
