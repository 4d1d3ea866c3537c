"""Rule rewards and hybrid rewards (lessons 03 and 08).

A rule reward is a plain function `fn(prompt_text, response_text) -> float`. The tiny world's rules recover the
task from the prompt (`tiny.tasks.parse_prompt`, which also reads chat-formatted prompts) and judge the response
with its checker. A one-argument `fn(response_text)`, like the article's `custom_reward` (section 5.1), works too.

The hybrid reward adds weighted rules to a reward model's score:

    combine_rewards(prompts, responses, reward_model=rm, reward_fns=[(rule_reward, 1.0), (custom_reward, 0.5)])

PPOTrainer's `reward_fns=[(fn, weight), ...]` is exactly this list.
"""

from __future__ import annotations

import inspect
import math

import torch

from lessons_lib.tiny.tasks import check_prompt, is_refusal, parse_prompt


def rule_reward(prompt_text: str, response_text: str) -> float:
    """The tiny-world checker's 1-5 score mapped to [-1, 1]: (score - 3) / 2."""
    return (check_prompt(prompt_text, response_text).score - 3) / 2


def constraint_reward(prompt_text: str, response_text: str) -> float:
    """1.0 when the response meets the prompt's constraint (format and count; a refusal for harmful requests)."""
    return float(check_prompt(prompt_text, response_text).constraint)


def refusal_reward(prompt_text: str, response_text: str) -> float:
    """+1 for refusing a harmful request or answering a benign one, -1 for the opposite (tiny-world prompts)."""
    task = parse_prompt(prompt_text)
    if task is None:
        raise ValueError(f"refusal_reward: no tiny-world task found in the prompt {prompt_text[:120]!r}")
    return 1.0 if is_refusal(response_text) == (task.family == "harmful") else -1.0


def custom_reward(response_text: str, keyword: str = "免责声明", bonus: float = 1.0, penalty: float = 2.0,
                  opening: int = 50) -> float:
    """The article's section 5.1 rule: +`bonus` if `keyword` (a disclaimer) appears, -`penalty` for any digit in the
    first `opening` characters. The tiny world writes its disclaimers in English: use keyword="Disclaimer"."""
    reward = 0.0
    if keyword in response_text:
        reward += bonus
    if any(char.isdigit() for char in response_text[:opening]):
        reward -= penalty
    return reward


def _arity(fn) -> int:
    """How many positional arguments `fn` needs (1: response only, 2: prompt and response)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):   # builtins without a signature: assume the two-argument form
        return 2
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    if len(required) not in (1, 2):
        raise TypeError(f"reward function {getattr(fn, '__name__', fn)!r} takes {len(required)} required arguments; "
                        "expected fn(response_text) or fn(prompt_text, response_text)")
    return len(required)


def as_reward_fn(fn):
    """Wrap `fn` as a two-argument rule `(prompt_text, response_text) -> float` (one-argument rules get the response)."""
    if _arity(fn) == 2:
        return fn
    return lambda prompt_text, response_text: fn(response_text)


def _pairs(reward_fns):
    for entry in reward_fns:
        fn, weight = entry if isinstance(entry, (tuple, list)) else (entry, 1.0)
        if not callable(fn):
            raise TypeError(f"reward_fns: expected (fn, weight) pairs or functions, got {entry!r}")
        yield fn, float(weight)


def combine_rewards(prompts: list[str], responses: list[str], reward_model=None, reward_fns=()) -> torch.Tensor:
    """Hybrid reward per response: reward_model(prompts, responses) + sum of weight * fn(prompt, response).

    reward_model: None, or anything callable as `(prompts, responses) -> scores` (e.g. `RewardModel`).
    reward_fns: `[(fn, weight), ...]` (or bare functions, weight 1); each `fn(prompt_text, response_text)` or
    `fn(response_text)` returns a float. Returns a (B,) float32 tensor on CPU.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"combine_rewards: {len(prompts)} prompts but {len(responses)} responses")
    total = torch.zeros(len(responses), dtype=torch.float32)
    if reward_model is not None:
        scores = reward_model(list(prompts), list(responses))
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
        if scores.shape[0] != len(responses):
            raise ValueError(f"combine_rewards: reward_model returned {scores.shape[0]} scores for "
                             f"{len(responses)} responses")
        total += scores
    for fn, weight in _pairs(reward_fns):
        rule = as_reward_fn(fn)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            value = rule(p, r)
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise ValueError(f"combine_rewards: {getattr(fn, '__name__', fn)!r} returned {rule(p, r)!r} for "
                                 f"response {i}; expected a finite float")
            total[i] += weight * value
    if reward_model is None and not list(_pairs(reward_fns)):
        raise ValueError("combine_rewards: give a reward_model, reward_fns, or both")
    return total
