"""Choosing the next token inside a captured decode step (lesson 08, fast rollouts).

The same distribution as transformers' `generate(do_sample=True)`: fp32 logits, then (in generate's order) the
min-new-tokens EOS block, temperature, top-k, top-p. Instead of `torch.multinomial` we use the Gumbel-max trick:
argmax(scores + G) with G = -log(-log U), U ~ Uniform(0, 1) i.i.d., picks token i with probability
softmax(scores)_i exactly, needs only elementwise ops and one argmax, and never talks to the host, so it can live
inside a CUDA graph (PyTorch advances the graph's Philox RNG offset at every replay). fp32 uniforms cap G at
about 16.6 and round U = 0 to G = -inf: both events have probability ~6e-8 per draw.
"""

from __future__ import annotations

import torch


def warp(scores: torch.Tensor, temperature: torch.Tensor | float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling scores: fp32 (B, V) -> (B, V), with -inf on the tokens top-k / top-p remove.

    Same semantics as transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper
    (min_tokens_to_keep=1): top-k keeps every token tied with the k-th score; top-p drops the lowest tokens whose
    cumulative probability stays <= 1 - top_p, always keeping the most likely one.
    """
    scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]                    # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)                          # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False                                                 # keep at least the best token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def gumbel_argmax(scores: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn from softmax(scores): (B, V) -> (B,)."""
    u = torch.rand_like(scores)
    return torch.argmax(scores - torch.log(-torch.log(u)), dim=-1)


def chosen_logprobs(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(scores)[token] per row: (B, V), (B,) -> (B,)."""
    return scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)


def block_eos(scores: torch.Tensor, eos_mask: torch.Tensor, step: torch.Tensor, min_new: torch.Tensor) -> torch.Tensor:
    """`min_new_tokens`: while step < min_new, EOS tokens get -inf. eos_mask (V,) bool; step, min_new 0-d/1-el."""
    return scores.masked_fill(eos_mask & (step < min_new), float("-inf"))
