"""Step 5 of the PPO loop: turn whatever the user passed as `reward_model` into one function
`(prompts, responses) -> scores`, and add rule rewards on top (the hybrid reward of lesson 08).

`reward_model` may be
  - a path or tiny-world id of a sequence-classification model with one label,
  - such a model object (it is scored with the policy's tokenizer and chat template),
  - an object with a `score(prompts, responses)` method (lessons_lib.reward.RewardModel),
  - any callable `(prompts, responses) -> scores`,
  - None, when the scores come from the caller or from `reward_fns` alone.
`prompts` are the raw instructions and `responses` the decoded response texts (no special tokens).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn


class SequenceClassifierScorer:
    """Scores (instruction, response) pairs with a one-label sequence-classification model.

    The text is the chat-formatted exchange (`lessons_lib.data.chat_text`), left-padded so the last column is
    every row's last real token, where the model reads its score ([N], "the reward is read at the last token").
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 32):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"reward model: expected a sequence-classification model with 1 label, "
                             f"got num_labels={model.config.num_labels}")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        from lessons_lib.data import chat_text

        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [chat_text(self.tokenizer, p, r) for p, r in
                     zip(prompts[start:start + self.batch_size], responses[start:start + self.batch_size])]
            side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
            try:
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            finally:
                self.tokenizer.padding_side = side
            mask = enc["attention_mask"].to(device)
            out = self.model(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            scores.append(out.logits[:, 0].float().cpu())
        return torch.cat(scores)

    score = __call__


class FastRewardScorer:
    """`RewardModel.score` with the backbone run by `lessons_lib.fast_train.FastDecoder` (fused 4-bit projections,
    LoRA written out), on a GPU as one CUDA graph replay per bucketed text length: the same rewards, fewer launches.

    The first call also scores its first 8 rows (`check_rows`) with `RewardModel.score` and compares: on any failure
    or difference the scorer warns and hands this and every later call to `RewardModel.score` (with `strict=True` it
    raises instead).
    """

    def __init__(self, reward_model, graphs: bool = False, bucket: int = 32, strict: bool = False, pool=None):
        from lessons_lib.fast_train import FastDecoder
        from lessons_lib.reward import _parts

        from .graphs import GraphedForward

        self.rm, self.bucket, self.strict = reward_model, bucket, strict
        self.decoder = FastDecoder(reward_model.model)       # raises NotImplementedError for what it cannot run
        self.head = _parts(reward_model.model)[1]
        self.head_dtype = next(self.head.parameters()).dtype
        self.graphed = GraphedForward(self._rewards, enabled=graphs, pool=pool)
        self.checked, self.failed = False, None
        self.check_rows = 8   # rows the first call also scores with RewardModel.score

    def _rewards(self, input_ids, attention_mask, padded: bool) -> dict:
        """Raw rewards, (B,): the head at each row's last real token (RewardModel.rewards, through FastDecoder)."""
        if padded:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                   # (B, T)
            hidden = self.decoder(input_ids, attention_mask, position_ids)                # (B, T, H)
        else:
            hidden = self.decoder(input_ids)
        T = attention_mask.shape[1]
        last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]           # (B, H)
        return {"rewards": self.head(pooled.to(self.head_dtype)).squeeze(-1).float()}

    @torch.no_grad()
    def fast_score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
        rm, out = self.rm, []
        was_training = rm.model.training
        rm.model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                enc = rm.encode(prompts[start:start + batch_size], responses[start:start + batch_size])
                ids, mask = enc["input_ids"], enc["attention_mask"]                       # (B, T), left-padded
                extra = -ids.shape[1] % self.bucket
                if extra:
                    pad = rm.tokenizer.pad_token_id
                    ids, mask = nn.functional.pad(ids, (extra, 0), value=pad), nn.functional.pad(mask, (extra, 0))
                padded = not bool(mask.all())
                out.append(self.graphed({"input_ids": ids, "attention_mask": mask}, padded=padded)["rewards"].cpu())
        finally:
            rm.model.train(was_training)
        return (torch.cat(out) - rm.mean) / rm.std

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self.failed is not None:
            return self.rm.score(prompts, responses)
        if self.checked:
            return self.fast_score(prompts, responses)
        self.checked = True
        n = min(len(prompts), self.check_rows)  # the check: a few rows (the plain path's memory is the model's)
        expected = self.rm.score(prompts[:n], responses[:n])
        got = None
        try:
            got = self.fast_score(prompts, responses)
            diff = (got[:n] - expected).abs().mean().item()
            problem = None if diff <= 0.05 * (1.0 + expected.std().item()) else f"rewards differ by {diff:.3g}"
        except Exception as err:  # noqa: BLE001 (the point is not to stop the run)
            problem = f"{type(err).__name__}: {err}"
        if problem is not None:
            if self.strict:
                raise RuntimeError(f"FastRewardScorer: {problem}")
            self.failed = problem
            warnings.warn(f"reward model: the fast scorer failed its check ({problem}); scoring with "
                          "RewardModel.score from now on", stacklevel=2)
            return expected if n == len(prompts) else self.rm.score(prompts, responses)
        return got

    score = __call__


def fast_reward_fn(reward_model, plain_fn, setting, graphs: bool, pool=None):
    """The reward function PPOTrainer uses: a `FastRewardScorer` for a `RewardModel` (PPOConfig.fast_forward: "auto" =
    on a GPU when FastDecoder can run its backbone; True = always), otherwise `plain_fn`."""
    reward_model = getattr(plain_fn, "__self__", reward_model)       # a path was loaded into a RewardModel
    if setting is False or plain_fn is None or not all(hasattr(reward_model, a) for a in ("model", "encode", "mean")):
        return plain_fn
    if setting == "auto" and next(reward_model.model.parameters()).device.type != "cuda":
        return plain_fn
    try:
        return FastRewardScorer(reward_model, graphs=graphs, strict=setting is True, pool=pool)
    except (NotImplementedError, ValueError, AttributeError) as err:
        if setting is True:
            raise ValueError(f"PPOConfig.fast_forward=True, but FastDecoder cannot run the reward model: "
                             f"{err}") from err
        return plain_fn


def load_reward_model(name: str | os.PathLike):
    """A reward scorer from a folder or tiny-world id (through lessons_lib.reward when it provides a loader)."""
    try:
        from lessons_lib.reward import RewardModel
    except ImportError:
        RewardModel = None
    if RewardModel is not None and hasattr(RewardModel, "from_pretrained"):
        return RewardModel.from_pretrained(str(name))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(name)
    try:
        from lessons_lib.tiny import resolve

        path = str(resolve(path) or path)
    except ImportError:
        pass
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    return SequenceClassifierScorer(model, AutoTokenizer.from_pretrained(path))


def as_reward_fn(reward_model, tokenizer):
    """Normalise every accepted kind of `reward_model` to a callable (prompts, responses) -> scores, or None."""
    if reward_model is None:
        return None
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = load_reward_model(reward_model)
    if isinstance(reward_model, nn.Module):   # check first: a classifier's `score` attribute is its head layer
        return SequenceClassifierScorer(reward_model, tokenizer)
    if callable(getattr(reward_model, "score", None)):
        return reward_model.score
    if callable(reward_model):
        return reward_model
    raise TypeError(f"reward_model must be a path, a model, an object with .score(prompts, responses), a callable "
                    f"or None; got {type(reward_model).__name__}")


def rule_fn(fn):
    """A rule reward as `(prompt_text, response_text) -> float`; one-argument rules (the article's
    `custom_reward(response_text)`) get the response only."""
    try:
        from lessons_lib.rewards_rules import as_reward_fn as as_rule
    except ImportError:
        return fn
    return as_rule(fn)


def critic_source(*reward_models):
    """The sequence-classification module inside a reward model (the user's object, or the scorer built from a
    path), to warm-start a separate critic [N+]."""
    for reward_model in reward_models:
        for candidate in (reward_model, getattr(reward_model, "model", None),
                          getattr(getattr(reward_model, "__self__", None), "model", None)):
            if isinstance(candidate, nn.Module) and hasattr(candidate, "base_model_prefix"):
                return candidate.get_base_model() if hasattr(candidate, "get_base_model") else candidate
    raise ValueError("value_model='reward' warm-starts the critic from the reward model, so reward_model must be "
                     "(or wrap, as .model) a sequence-classification model; got "
                     f"{type(reward_models[0]).__name__}")


def to_scores(values, batch_size: int, what: str) -> torch.Tensor:
    """One float per response as a (B,) fp32 tensor; a clear error for anything else (e.g. per-token tensors)."""
    if isinstance(values, torch.Tensor):
        flat = values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)
        if not flat or values.shape[0] != batch_size:
            raise ValueError(f"{what}: expected {batch_size} scalar values (shape ({batch_size},)), got a tensor "
                             f"of shape {tuple(values.shape)}")
        return values.detach().reshape(-1).float().cpu()
    values = list(values)
    if len(values) != batch_size:
        raise ValueError(f"{what}: expected {batch_size} values (one per response), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(
                    f"{what}[{i}] is a tensor with {v.numel()} elements; step() needs one scalar reward per "
                    "response. (Adding a number to a response's token ids, as the article's section 5.1 does, "
                    "gives a tensor of shifted token ids, not a reward: use reward_fns=[(fn, weight)] instead.)")
            v = v.item()
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)
