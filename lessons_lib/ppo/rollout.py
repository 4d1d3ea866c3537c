"""Rollout plumbing (lesson 04, steps 1-4): sample responses, cut them at EOS, and score every response token
with the policy, the reference and the critic, one minibatch at a time; the `Rollout` batch that carries the
results through steps 5-9; and the two model preparations PPO needs (no dropout, no bitsandbytes CPU repacking).

Shapes: B responses, Tq query length (left-padded), Tr response length (right-padded), H hidden size, V vocabulary.
Only the logits of the response positions are computed (`logits_to_keep`), and they are reduced to one
log-prob (and entropy) per token right away by `token_logprobs`: no (B, T, V) fp32 tensor is kept.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lessons_lib.data import left_pad

from .core import entropy_from_logits, logprobs_from_logits

# Sampling options that would make the sampled distribution differ from softmax(logits / temperature), which is
# the distribution PPO's log-probs describe ([N]: sample with top_k=0, top_p=1.0).
_DISTORTING = {"top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "repetition_penalty": 1.0,
               "no_repeat_ngram_size": 0}


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob (and entropy) of softmax(logits / temperature): (B, T, V), (B, T) -> (B, T), (B, T), fp32.

    The one place where PPO reduces logits. On a GPU it runs the fused Triton kernel
    (`lessons_lib.kernels.selective_log_softmax` / `logprobs_and_entropy`: no (B, T, V) fp32 temporary);
    on a CPU the torch path (the Triton interpreter is for reading kernels, far too slow to train with).
    The entropy is a statistic only: it carries no gradient.
    """
    if not logits.is_cuda:
        logprobs = logprobs_from_logits(logits, tokens, temperature)
        entropy = entropy_from_logits(logits.detach(), temperature) if with_entropy else None
        return logprobs, entropy
    from lessons_lib.kernels import logprobs_and_entropy, selective_log_softmax

    if with_entropy:
        logprobs, entropy = logprobs_and_entropy(logits, tokens, temperature)
        return logprobs, entropy.detach()
    return selective_log_softmax(logits, tokens, temperature), None


# --------------------------------------------------------------------------------------------- padding


pad_left = left_pad   # (B, Tq) left padding lives in lessons_lib.data; kept under this name for its callers


def pad_right(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token tensors, right-padded: returns (ids, mask), both (B, Tr). (Queries are left-padded with
    `lessons_lib.data.left_pad`, so that every response starts in the same column [N].)"""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int | None = None) -> tuple[torch.Tensor, bool]:
    """Cut a 1-D response just after its first EOS (kept: the reward is read there [N+]). Returns (tokens, has_eos).

    Without EOS the response is kept whole, minus trailing padding when the pad token differs from EOS.
    """
    hits = torch.nonzero(response == eos_id).flatten()
    if len(hits):
        return response[: int(hits[0]) + 1], True
    if pad_id is not None and pad_id != eos_id:
        real = torch.nonzero(response != pad_id).flatten()
        response = response[: int(real[-1]) + 1] if len(real) else response[:0]
    return response, False


# --------------------------------------------------------------------------------------------- generation


class _TokenProgress:
    """A stopping criterion that never stops: it only advances a progress bar by one per decoding step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs):
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(generate_kwargs: dict, temperature: float, max_new_tokens: int, eos_id: int, pad_id: int) -> dict:
    """The kwargs for `model.generate`: pure sampling at `temperature` unless the caller overrides a choice."""
    kwargs = {"do_sample": True, "temperature": temperature, "max_new_tokens": max_new_tokens, **_DISTORTING,
              **generate_kwargs, "eos_token_id": eos_id, "pad_token_id": pad_id}
    changed = {k: kwargs[k] for k, v in _DISTORTING.items() if kwargs[k] != v}
    if changed and kwargs["do_sample"]:
        warnings.warn(f"generate: {changed} change the sampling distribution, so PPO's log-probs (softmax of "
                      "logits / temperature) no longer describe how the responses were sampled", stacklevel=3)
    return kwargs


ENGINE_MODELS = ("qwen2", "llama")   # what lessons_lib.fastgen implements


def rollout_engine_problem(model, setting, generate_kwargs: dict) -> str | None:
    """Why step 1 should use `model.generate` rather than the RolloutEngine (PPOConfig.fast_rollout); None: use the
    engine. "auto" wants a GPU and a Qwen2/Llama policy; any setting needs options the engine implements."""
    if setting is False:
        return "fast_rollout=False"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in ENGINE_MODELS:
        return f"the engine implements {ENGINE_MODELS}, not model_type {model_type!r}"
    if setting == "auto" and next(model.parameters()).device.type != "cuda":
        return "no GPU (fast_rollout='auto' uses the engine on CUDA only)"
    from lessons_lib.fast_generate import engine_kwargs

    try:
        engine_kwargs(generate_kwargs)
    except ValueError as err:
        return str(err)
    return None


@torch.no_grad()
def sample_responses(model, queries: list[torch.Tensor], kwargs: dict, chunk_size: int,
                     progress: bool = False, engine=None) -> list[torch.Tensor]:
    """Step 1 + 2: left-pad the queries, sample, cut each response after its first EOS. Returns 1-D tensors.

    engine: a `lessons_lib.fast_generate.RolloutEngine` over `model` (same sampling law, no launch overhead; it
    re-reads LoRA weights that changed since its last call), or None for `model.generate`.
    """
    eos_id, pad_id = kwargs["eos_token_id"], kwargs["pad_token_id"]
    responses = []
    if engine is not None:
        from lessons_lib.fast_generate import engine_kwargs

        options = engine_kwargs(kwargs)                 # raises, naming them, on options the engine lacks
        for start in range(0, len(queries), chunk_size):
            out = engine.generate(queries[start:start + chunk_size], progress=progress, **options)
            responses += [truncate_after_eos(row, eos_id, pad_id)[0] for row in out.response_ids.cpu()]
        return responses
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(queries), chunk_size):
            ids, mask = left_pad(queries[start:start + chunk_size], pad_id)                # (b, Tq)
            bar = tqdm(total=kwargs["max_new_tokens"], desc=f"rollout {start + len(ids)}/{len(queries)}",
                       unit="tok", leave=False, disable=not progress)
            with bar:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     stopping_criteria=StoppingCriteriaList([_TokenProgress(bar)]), **kwargs)
            for row in out[:, ids.shape[1]:].cpu():                                        # (b, Tr)
                responses.append(truncate_after_eos(row, eos_id, pad_id)[0])
    finally:
        model.train(was_training)
    return responses


# --------------------------------------------------------------------------------------------- scoring passes


class ValueHead(nn.Module):
    """The critic as a linear layer on the policy's last hidden state: (B, Tr, H) -> (B, Tr).

    Zero-initialised, so every value starts at 0 ([N], "value head initialisation"); kept in fp32.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def query_response_inputs(query_ids, query_mask, response_ids, response_mask):
    """Concatenate left-padded queries and right-padded responses; position ids skip the left padding."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)                    # (B, Tq + Tr)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)                 # [N]: adjust positions for padding
    return input_ids, attention_mask, position_ids


def policy_forward(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                   with_entropy: bool = False, with_hidden: bool = False):
    """One causal-LM pass over query + response: returns (logprobs, entropy or None, hidden or None), each (B, Tr[, H]).

    The token at response position t is predicted by the logits at column Tq + t - 1, so we keep the last Tr + 1
    logit columns and drop the final one.
    """
    Tr = response_ids.shape[1]
    input_ids, attention_mask, position_ids = query_response_inputs(query_ids, query_mask, response_ids, response_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=Tr + 1, output_hidden_states=with_hidden, use_cache=False)
    logits = out.logits[:, -(Tr + 1):-1]                                           # (B, Tr, V)
    logprobs, entropy = token_logprobs(logits, response_ids, temperature, with_entropy)
    hidden = out.hidden_states[-1][:, -(Tr + 1):-1] if with_hidden else None      # (B, Tr, H)
    return logprobs, entropy, hidden


def critic_forward(critic, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """Per-token values from a separate sequence-classification critic (backbone + its score head): (B, Tr)."""
    Tr = response_ids.shape[1]
    input_ids, attention_mask, position_ids = query_response_inputs(query_ids, query_mask, response_ids, response_mask)
    backbone = getattr(critic, critic.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state[:, -(Tr + 1):-1]        # (B, Tr, H)
    head = critic.score if hasattr(critic, "score") else critic.classifier
    return head(hidden).squeeze(-1).float()


def reference_context(model, ref_model):
    """The reference policy: a separate frozen model, or the LoRA policy with its adapters switched off."""
    if ref_model is not None:
        return ref_model, nullcontext()
    return model, model.disable_adapter()


# --------------------------------------------------------------------------------------------- the batch


@dataclass
class Rollout:
    """One batch of experience on the training device. Per-token tensors are (B, Tr); queries (B, Tq)."""
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor            # (B,) bool
    scores: torch.Tensor = None      # (B,) final scores
    logprobs: torch.Tensor = None
    ref_logprobs: torch.Tensor = None
    entropy: torch.Tensor = None
    values: torch.Tensor = None
    kl: torch.Tensor = None
    rewards: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None

    def rows(self, idx: torch.Tensor) -> dict:
        """The tensors of rows `idx`, with padding columns that are padding in every chosen row trimmed."""
        q_len = int(self.query_mask[idx].sum(1).max())
        r_len = int(self.response_mask[idx].sum(1).max())
        out = {"query_ids": self.query_ids[idx, -q_len:], "query_mask": self.query_mask[idx, -q_len:]}
        for name in ("response_ids", "response_mask", "logprobs", "values", "advantages", "returns"):
            out[name] = getattr(self, name)[idx, :r_len]
        return out


# --------------------------------------------------------------------------------------------- model preparation


def disable_dropout(model: nn.Module) -> None:
    """p = 0 for every dropout, LoRA's included, and for attention dropout rates stored as floats [N]."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def fix_bnb_cpu_repacking(model: nn.Module) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on the first no-grad forward, after which
    training gets wrong gradients or fails (docs/ENVIRONMENT.md). PPO alternates both, so switch the repacking off."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
