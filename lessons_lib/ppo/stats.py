"""The numbers a PPO step reports (lesson 04 reads them; docs/PPO.md lists them): a flat dict of floats with
namespaced keys, and the one-line summary printed while training."""

from __future__ import annotations

import torch

from .core import explained_variance, masked_mean, masked_var


@torch.no_grad()
def rollout_stats(roll, raw: torch.Tensor, kl_coef: float, reward_parts: dict) -> dict:
    """What the rollout looked like: per-response KL, entropy and scores, returns and values, lengths, EOS rate,
    and the mean of each part of a hybrid reward (`env/reward/<name>`). Sums over tokens are per response."""
    mask = roll.response_mask.float()
    lengths = mask.sum(1)
    kl_seq = roll.kl.sum(1)
    entropy_seq = roll.entropy.sum(1)
    non_score = (-kl_coef * roll.kl).sum(1)
    stats = {
        "objective/kl": kl_seq.mean(), "objective/kl_coef": kl_coef,
        "objective/entropy": entropy_seq.mean(), "objective/entropy_per_token": masked_mean(roll.entropy, mask),
        "objective/scores": roll.scores.mean(), "objective/raw_scores": raw.mean(),
        "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (roll.scores + non_score).mean(),
        "ppo/returns/mean": masked_mean(roll.returns, mask), "ppo/returns/var": masked_var(roll.returns, mask, False),
        "ppo/val/mean": masked_mean(roll.values, mask), "ppo/val/var": masked_var(roll.values, mask, False),
        "ppo/val/explained_variance": explained_variance(roll.values, roll.returns, mask),
        "ppo/advantages/mean": masked_mean(roll.advantages, mask),
        "env/response_length": lengths.mean(), "env/eos_rate": roll.has_eos.float().mean(),
    }
    for name, part in reward_parts.items():
        stats[f"env/reward/{name}"] = part.float().mean()
    return {k: float(v) for k, v in stats.items()}


def log_line(stats: dict) -> str:
    """The one-line progress summary of a step's stats."""
    return (f"score {stats['objective/scores']:+.3f} | kl {stats['objective/kl']:.3f} | "
            f"beta {stats['objective/kl_coef']:.3f} | entropy/token {stats['objective/entropy_per_token']:.3f} | "
            f"clipfrac {stats['ppo/policy/clipfrac']:.3f} | vf loss {stats['ppo/loss/value']:.3f} | "
            f"{stats['time/ppo/total']:.2f} s")
