"""PPO for RLHF (lessons 04 and 08): the pure math in `core`, the config, the stepped trainer.

    from lessons_lib.ppo import PPOConfig, PPOTrainer                    # the article's API
    from lessons_lib.ppo import masked_whiten, compute_gae, policy_loss   # one function per lesson cell
"""

from .config import PPOConfig
from .core import (AdaptiveKLController, FixedKLController, RunningMoments, compute_gae, compute_rewards,
                   entropy_from_logits, explained_variance, kl_penalty, last_token_index, logprobs_from_logits,
                   masked_mean, masked_var, masked_whiten, policy_loss, value_loss)
from .rollout import Rollout
from .sampler import DifficultySampler, PromptLoader
from .trainer import NonFiniteError, PPOTrainer

__all__ = [
    "PPOConfig", "PPOTrainer", "NonFiniteError", "Rollout", "DifficultySampler", "PromptLoader",
    "masked_mean", "masked_var", "masked_whiten", "logprobs_from_logits", "entropy_from_logits", "kl_penalty",
    "compute_rewards", "compute_gae", "policy_loss", "value_loss", "explained_variance", "last_token_index",
    "AdaptiveKLController", "FixedKLController", "RunningMoments",
]
