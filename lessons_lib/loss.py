"""The next-token loss without (B, T, V) logits: `causal_lm_loss` and the fused `linear_cross_entropy` (lesson 02).

The usual loss materialises every logit: for Qwen2-1.5B at B=8, T=512 that is 4,096 x 151,936 values, 1.2 GB in
bf16, plus an fp32 copy inside the cross-entropy and the fp32 gradient of that copy in the backward (2.5 GB each).
The language-model head is frozen in LoRA training, so the backward only needs the gradient with respect to the
hidden states, and that gradient can be computed *during the forward*, a chunk of positions at a time:

    logits_c = h_c @ W^T                       (C, V) in the compute dtype, then fp32, as transformers does
    lse_c    = logsumexp(logits_c)             (C,)
    loss    += sum over valid rows of lse_c - logits_c[target]
    dlogits  = (softmax(logits_c) - onehot(target)) / count      (rows without a label: 0)
    dh_c     = dlogits.to(dtype) @ W           (C, H): kept; the chunk's logits are freed

Only one chunk of logits exists at any moment, and the backward is a multiplication by the incoming scalar gradient:
no recomputation of the head. (Liger-Kernel's fused linear cross-entropy uses the same idea.)
"""

from __future__ import annotations

import torch

# positions per chunk: about 2**25 logits (128 MB in fp32) at a time, whatever the vocabulary
_LOGITS_PER_CHUNK = 2**25


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary: a power of two with about 2**25 logits per chunk (Qwen2: 128)."""
    return max(16, 1 << max(0, (_LOGITS_PER_CHUNK // max(1, vocab_size)).bit_length() - 1))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H) frozen, targets (N,) long with -100 ignored -> mean loss (fp32 scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        N = hidden.shape[0]
        valid = targets != -100                                             # (N,)
        count = valid.sum()                                                 # on the device: no host sync
        safe = targets.masked_fill(~valid, 0)
        scale = valid.float() / count.clamp(min=1)                          # (N,) 1/count on rows with a label
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for a in range(0, N, chunk_tokens):
            b = min(a + chunk_tokens, N)
            logits = (hidden[a:b] @ weight.t()).float()                     # (C, V) fp32
            lse = torch.logsumexp(logits, dim=-1)                           # (C,)
            picked = logits.gather(1, safe[a:b, None]).squeeze(1)           # (C,) logit of the target
            total += ((lse - picked) * valid[a:b]).sum()
            if dh is not None:
                probs = logits.sub_(lse[:, None]).exp_()                    # softmax, in place of the logits
                probs.scatter_add_(1, safe[a:b, None], -valid[a:b, None].float())  # - onehot(target)
                probs.mul_(scale[a:b, None])
                torch.mm(probs.to(hidden.dtype), weight, out=dh[a:b])       # (C, H)
        ctx.save_for_backward(dh)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        (dh,) = ctx.saved_tensors
        return dh * grad_loss.to(dh.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, equal (value and gradient) to
    `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)`, never holding more than
    `chunk_tokens` rows of logits. weight (the LM head) must be frozen; the gradient flows to `hidden` only.

    hidden (N, H) or (B, T, H); targets of the same leading shape (long, -100 = no label).
    chunk_tokens: rows per chunk (default `default_chunk_tokens(V)`: about 2**25 logits).
    Raises ValueError when no row has a label (checked on the host, except while a CUDA graph is being captured).
    """
    if weight.requires_grad:
        raise NotImplementedError("linear_cross_entropy: the LM head weight requires grad; only a frozen head is "
                                  "supported (the gradient is computed for the hidden states only)")
    H = hidden.shape[-1]
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         f"do not match")
    hidden, targets = hidden.reshape(-1, H), targets.reshape(-1)
    if not _capturing() and not bool((targets != -100).any()):
        raise ValueError("causal_lm_loss: no position has a label (all -100 or padding)")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight.to(hidden.dtype), targets, chunk)


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) targets: position t predicts token t+1 (the last position predicts nothing: -100); labels of -100
    and padded positions (attention_mask 0) are ignored. Same shape as the hidden states: no slicing copy."""
    labels = input_ids if labels is None else labels
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        targets[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, -100)
    return targets


def causal_lm_loss(model, input_ids, attention_mask=None, labels=None, chunk_tokens: int | None = None):
    """Mean next-token cross-entropy, equal to `model(..., labels=labels).loss`, without (B, T, V) logits.

    The decoder of the transformers (or peft) model runs once; then `linear_cross_entropy` applies the LM head and
    the cross-entropy `chunk_tokens` positions at a time, computing the gradient of the hidden states on the way.
    labels: default `input_ids`; -100 and padded positions (attention_mask 0) are ignored.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    targets = next_token_targets(input_ids, attention_mask, labels)                                   # (B, T)
    lm_head = base.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("causal_lm_loss: an LM head with a bias is not supported")
    return linear_cross_entropy(hidden, lm_head.weight, targets, chunk_tokens)
