"""The PPO math for RLHF as small pure functions (lesson 04 calls them one cell at a time).

Every function works on per-token tensors of shape (B, Tr): B responses, Tr response tokens (right-padded).
`mask` is 1 on real response tokens (the EOS token included) and 0 on padding. Nothing here touches a model.

Sources, cited per function:
  [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
  [GAE]   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
  [Z19]   Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (openai/lm-human-preferences).
  [N]     Huang et al. 2024, "The N Implementation Details of RLHF with PPO" (ICLR blog track).
  [N+]    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization".
  [K]     Schulman 2020, "Approximating KL Divergence" (blog post; the k1/k2/k3 estimators).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "masked_mean", "masked_var", "masked_whiten", "logprobs_from_logits", "entropy_from_logits", "kl_penalty",
    "compute_rewards", "compute_gae", "policy_loss", "value_loss", "explained_variance",
    "AdaptiveKLController", "FixedKLController", "RunningMoments", "last_token_index",
]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_mask(x: torch.Tensor, mask: torch.Tensor, where: str) -> torch.Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"{where}: values have shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    mask = mask.to(x.dtype)
    # the check reads the device; while a CUDA graph is being captured that is not allowed (the PPO update checks
    # its minibatches' masks before capturing: lessons_lib/ppo/graphs.py)
    if not _capturing() and not bool(mask.sum() > 0):
        raise ValueError(f"{where}: the mask is all zeros, so there is nothing to average over "
                         "(an empty batch, or responses with no real tokens?)")
    return mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1:  sum(x * m) / sum(m).

    With `dim`, the mean along that axis (every slice must have at least one real position).
    Raises ValueError on an all-zero mask instead of returning NaN.
    Source: TRL's `masked_mean` (trl/core.py, 0.x); every per-token PPO statistic is one of these.
    """
    mask = _check_mask(x, mask, "masked_mean")
    if dim is None:
        return (x * mask).sum() / mask.sum()
    count = mask.sum(dim)
    if bool((count == 0).any()):
        raise ValueError(f"masked_mean: {int((count == 0).sum())} slice(s) along dim {dim} have an all-zero mask")
    return (x * mask).sum(dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions: mean((x - mean(x))^2), times n/(n-1) when `unbiased`.

    Bessel's correction needs n >= 2 real positions; with n = 1 an unbiased variance is undefined and we raise.
    Source: TRL's `masked_var` (trl/core.py, 0.x), which applies the same n/(n-1) correction.
    """
    mask = _check_mask(x, mask, "masked_var")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if bool(n < 2):
            raise ValueError("masked_var: an unbiased variance needs at least 2 real positions; the mask has 1")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize `x` to unit variance over the masked positions: (x - mean) / sqrt(var + eps).

    shift_mean=False adds the mean back (scale only): [Z19] whitens rewards that way so their sign survives,
    and advantages with the mean removed. Masked-out positions are set to 0 so they add nothing downstream.
    Uses the biased variance, like TensorFlow's `tf.nn.moments` in [Z19] (see [N], "reward and advantage whitening").
    """
    mask = _check_mask(x, mask, "masked_whiten")
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for every position: (B, T, V), (B, T) -> (B, T), in fp32.

    Dividing by the sampling temperature makes these the log-probs of the distribution the tokens were actually
    sampled from ([N], "scale the logits by sampling temperature"). Computed as logit[token] - logsumexp(logits),
    without writing a (B, T, V) log-softmax; the fused kernel (lessons_lib.kernels) avoids the fp32 copy as well.
    """
    if temperature <= 0:
        raise ValueError(f"logprobs_from_logits: temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logprobs_from_logits: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    logits = logits.float() / temperature                                 # (B, T, V)
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)   # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position: H = logsumexp(z) - sum(p * z). (B, T, V) -> (B, T)."""
    z = logits.float() / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens ([K]).

    k1 = log r,  with log r = logprobs - ref_logprobs: unbiased, can be negative per token ([Z19] uses it).
    k3 = (exp(-log r) - 1) + log r: unbiased and always >= 0, lower variance when pi is close to pi_ref.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; use 'k1' or 'k3'")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row of a (B, Tr) mask; raises if a row has none."""
    lengths = mask.long().sum(-1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"response row(s) {rows} have no real tokens (all-zero mask)")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(-1).values          # (B,)


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards ([Z19] eq. 2; [N], "per-token KL penalty"): returns (rewards, kl), both (B, Tr).

        r_t = -kl_coef * KL_t                 on every real response token t
        r_T = r_T + score                     at the last real token T (the EOS token when there is one)

    `scores` is (B,): one scalar per response from the reward model and/or rules. Padding positions get 0.
    """
    if scores.ndim != 1 or scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"compute_rewards: scores must have shape ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    maskf = mask.to(torch.float32)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * maskf            # (B, Tr)
    rewards = -kl_coef * kl
    last = last_token_index(mask)                                         # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards)
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation [GAE], backwards over the response tokens: returns (advantages, returns).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the value-function target)

    The mask must be a prefix (real tokens first, padding after), as produced by EOS truncation; padding
    positions get A = R = 0. gamma = 1 is the RLHF default ([N], "discount factor = 1").
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"compute_gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, Tr) shape")
    last_token_index(mask)  # raises on an empty row
    maskf = mask.to(torch.float32)
    rewards, values = rewards.float() * maskf, values.float() * maskf
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * maskf[:, t]
        advantages[:, t] = next_adv
    returns = (advantages + values) * maskf
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective [PPO] eq. 7, as a loss to minimise:

        ratio = exp(logprobs - old_logprobs)
        L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    Returns (loss, stats) with the diagnostics CleanRL logs, computed without gradient:
    clipfrac (share of tokens where the clipped term is active) and approxkl = mean((ratio - 1) - log ratio),
    the k3 estimate of KL(old || new) [K].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((losses_clipped > losses).float(), mask),
            "approxkl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ([N], "clipped value function"; OpenAI baselines' PPO2):

        V_clip = old_V + clip(V - old_V, -c, c)
        L = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    Returns (loss, stats) with clipfrac (share of tokens where the clipped error is the larger one).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask), "error": masked_mean(err, mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked positions: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp_min(1e-8)


class FixedKLController:
    """A constant KL coefficient beta (the `adaptive_kl=False` choice)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient [Z19] section 2.2 ([N], "adaptive KL"): steer the observed KL towards a target.

        e    = clip(KL_observed / KL_target - 1, -0.2, 0.2)
        beta = beta * (1 + e * n_steps / horizon)

    `n_steps` is the number of episodes (responses) in the batch that produced KL_observed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be > 0")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: the observed KL is {current_kl}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of scores, for reward normalisation ([N], "reward normalisation").

    Merges each batch with Chan et al.'s parallel update: with counts n_a, n_b, means m_a, m_b, squared-deviation
    sums M_a, M_b:  d = m_b - m_a,  m = m_a + d * n_b / n,  M = M_a + M_b + d^2 * n_a * n_b / n.
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n_b, mean_b = x.numel(), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta ** 2 * self.count * n_b / n
        self.count = n

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
