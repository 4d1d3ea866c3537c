"""The PPO math in lessons_lib.ppo.core against loop references and hand-computed values, on fresh random inputs."""

import math

import pytest
import torch

from lessons_lib.ppo import core

SHAPES = [(1, 1), (3, 7), (5, 13), (4, 33)]


def prefix_mask(B, T, g, min_len=1):
    """A right-padded response mask: row b has a random length in [min_len, T]."""
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    return (torch.arange(T)[None, :] < lengths[:, None]).long(), lengths


def rand(shape, g, dtype=torch.float64):
    return torch.randn(shape, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------ masked statistics

@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_var_whiten_match_selected_elements(shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = rand(shape, g)
    mask = (torch.rand(shape, generator=g) < 0.6).long()
    mask.view(-1)[0] = 1
    selected = x[mask.bool()]
    torch.testing.assert_close(core.masked_mean(x, mask), selected.mean())
    torch.testing.assert_close(core.masked_var(x, mask, unbiased=False), selected.var(unbiased=False))
    if selected.numel() > 1:
        torch.testing.assert_close(core.masked_var(x, mask), selected.var(unbiased=True))
        white = core.masked_whiten(x, mask)
        torch.testing.assert_close(white[mask.bool()], (selected - selected.mean()) / torch.sqrt(selected.var(unbiased=False) + 1e-8))
        assert torch.all(white[~mask.bool()] == 0)
        kept = core.masked_whiten(x, mask, shift_mean=False)
        torch.testing.assert_close(kept[mask.bool()], white[mask.bool()] + selected.mean())


def test_masked_mean_along_a_dim():
    g = torch.Generator().manual_seed(1)
    x = rand((4, 9), g)
    mask, lengths = prefix_mask(4, 9, g)
    expected = torch.stack([x[b, :lengths[b]].mean() for b in range(4)])
    torch.testing.assert_close(core.masked_mean(x, mask, dim=1), expected)


@pytest.mark.parametrize("fn", [core.masked_mean, core.masked_var, core.masked_whiten])
def test_all_zero_mask_raises_instead_of_nan(fn):
    with pytest.raises(ValueError, match="all zeros"):
        fn(torch.randn(3, 5), torch.zeros(3, 5))


def test_degenerate_inputs_are_named():
    with pytest.raises(ValueError, match="at least 2"):
        core.masked_var(torch.randn(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        core.masked_mean(torch.randn(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        core.compute_gae(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]))


# ------------------------------------------------------------------------------------------ log-probs, entropy, KL

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.9])
def test_logprobs_and_entropy_match_log_softmax_with_gradients(dtype, temperature):
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 5, 37
    base = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(V, (B, T), generator=g)
    logits = base.clone().requires_grad_(True)
    ref_logits = base.double().clone().requires_grad_(True)
    got = core.logprobs_from_logits(logits, tokens, temperature)
    ref_logp = torch.log_softmax(ref_logits / temperature, -1)
    ref = ref_logp.gather(-1, tokens[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    torch.testing.assert_close(got.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    weights = torch.randn(B, T, generator=g, dtype=torch.float64)
    (got.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=TOL[dtype] * 2, rtol=TOL[dtype] * 2)
    entropy = core.entropy_from_logits(base, temperature)
    torch.testing.assert_close(entropy.double(), -(ref_logp.exp() * ref_logp).sum(-1).detach(),
                               atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


def test_logprobs_reject_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        core.logprobs_from_logits(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="do not match"):
        core.logprobs_from_logits(torch.randn(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    """Monte Carlo: E_p[k1] = E_p[k3] = KL(p || q) for tokens sampled from p (Schulman's estimators)."""
    g = torch.Generator().manual_seed(3)
    V, N = 11, 200_000
    logp = torch.log_softmax(torch.randn(V, generator=g), -1).double()
    logq = torch.log_softmax(torch.randn(V, generator=g), -1).double()
    exact = float((logp.exp() * (logp - logq)).sum())
    tokens = torch.multinomial(logp.exp(), N, replacement=True, generator=g)
    k1 = core.kl_penalty(logp[tokens], logq[tokens], "k1")
    k3 = core.kl_penalty(logp[tokens], logq[tokens], "k3")
    assert torch.all(k3 >= -1e-12)
    for est in (k1, k3):
        stderr = float(est.std()) / math.sqrt(N)
        assert abs(float(est.mean()) - exact) < 5 * stderr, (float(est.mean()), exact, stderr)
    with pytest.raises(ValueError, match="estimator"):
        core.kl_penalty(logp, logq, "k2")


# ------------------------------------------------------------------------------------------ rewards and GAE

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_rewards_matches_a_loop(shape, estimator):
    B, T = shape
    g = torch.Generator().manual_seed(4)
    logprobs, ref_logprobs, scores = rand((B, T), g), rand((B, T), g), rand((B,), g)
    mask, lengths = prefix_mask(B, T, g)
    beta = 0.13
    rewards, kl = core.compute_rewards(scores, logprobs, ref_logprobs, mask, beta, estimator)
    for b in range(B):
        for t in range(T):
            if t >= lengths[b]:
                assert rewards[b, t] == 0 and kl[b, t] == 0
                continue
            d = float(logprobs[b, t] - ref_logprobs[b, t])
            k = d if estimator == "k1" else math.exp(-d) - 1 + d
            expected = -beta * k + (float(scores[b]) if t == lengths[b] - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert kl[b, t].item() == pytest.approx(k, rel=1e-5, abs=1e-6)


def gae_loop(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = adv + values * (torch.arange(T)[None] < lengths[:, None])
    return adv, ret


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_compute_gae_matches_a_loop(shape, gamma, lam):
    B, T = shape
    g = torch.Generator().manual_seed(5)
    rewards, values = rand((B, T), g), rand((B, T), g)
    mask, lengths = prefix_mask(B, T, g)
    rewards = rewards * mask  # padding positions hold garbage in values only
    adv, ret = core.compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    g = torch.Generator().manual_seed(6)
    rewards, values = rand((3, 6), g), rand((3, 6), g)
    mask, lengths = prefix_mask(3, 6, g)
    rewards = rewards * mask
    _, returns = core.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask   # sum of future rewards
    torch.testing.assert_close(returns.double(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ losses

def test_policy_loss_by_hand():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))     # ratios 1.5, 0.5, 1.0 against old = 0
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = core.policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped active); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2, 2) = 2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = core.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clipped value 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24; token 1: 1 either way
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(2, 3), (3, 5)])
def test_losses_gradients_by_finite_differences(shape):
    g = torch.Generator().manual_seed(7)
    mask, _ = prefix_mask(*shape, g)
    old, adv = rand(shape, g) * 0.1, rand(shape, g)
    logprobs = (old + rand(shape, g) * 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: core.policy_loss(lp, old, adv, mask, 0.2)[0], (logprobs,))
    old_v, returns = rand(shape, g), rand(shape, g)
    values = (old_v + rand(shape, g) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: core.value_loss(v, old_v, returns, mask, 0.2)[0], (values,))
    # padding positions receive exactly zero gradient
    core.policy_loss(logprobs, old, adv, mask, 0.2)[0].backward()
    assert torch.all(logprobs.grad[~mask.bool()] == 0)


def test_policy_loss_is_zero_clip_at_ratio_one():
    g = torch.Generator().manual_seed(8)
    lp, adv = rand((4, 6), g), rand((4, 6), g)
    loss, stats = core.policy_loss(lp, lp.clone(), adv, torch.ones(4, 6), 0.2)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clipfrac"] == 0 and abs(stats["approxkl"]) < 1e-12


def test_explained_variance():
    g = torch.Generator().manual_seed(9)
    returns, mask = rand((3, 8), g), torch.ones(3, 8)
    assert core.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(returns, 0.3), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ controllers, moments

def test_adaptive_kl_controller_by_hand():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.2, n_steps=32)            # error = 7.2/6 - 1 = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))
    ctl.update(60.0, n_steps=100)          # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000) * (1 + 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(0.0, n_steps=10000)         # error clipped to -0.2, one horizon of episodes: x0.8
    assert ctl.value == pytest.approx(before * 0.8)
    restored = core.AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        ctl.update(float("nan"), 1)


def test_running_moments_match_numpy():
    g = torch.Generator().manual_seed(10)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 8)]
    moments = core.RunningMoments()
    for b in batches:
        moments.update(b)
    everything = torch.cat(batches).double()
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.std == pytest.approx(float(everything.std()))
