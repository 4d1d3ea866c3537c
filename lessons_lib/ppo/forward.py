"""The PPO forward pass without full-vocabulary logits (steps 3-4 and 9; docs/PPO.md "Performance").

PPO needs three things per response token: its log-prob under softmax(logits / T), the entropy of that
distribution (a statistic), and a value. All three come from the decoder's hidden states at the response positions,
so the decoder runs once and the LM head is applied a chunk of positions at a time by `linear_logprobs`:

    logits_c = h_c @ W^T                                   (C, V), compute dtype; one chunk exists at a time
    z        = logits_c / T
    logprob  = z[token] - logsumexp(z)                     (C,) fp32
    entropy  = logsumexp(z) - sum_v softmax(z)_v z_v       (C,) fp32, no gradient
    dh_c     = ((onehot(token) - softmax(z)) / T) @ W      (C, H): d logprob / d h, computed in the forward

The backward is then `dh * g` (g: the incoming gradient of each row's log-prob): nothing of size V is kept or
recomputed (the idea of `lessons_lib.loss.linear_cross_entropy`, for per-token outputs). On a GPU each chunk's
log-prob, entropy and logit gradient come from the fused Triton kernel (`lessons_lib.kernels`), which needs no fp32
(C, V) temporary and writes the gradient over the logits; on a CPU, from the torch formulas above.

The decoder is transformers' own (`model.get_decoder()`, LoRA layers and all) or, with `backend="fast"`,
`lessons_lib.fast_train.FastDecoder`: the same arithmetic in fewer kernels (fused 4-bit q|k|v and gate|up, one
autograd node per layer that keeps only its input and recomputes in the backward).

Shapes: B responses, Tq query length (left-padded), Tr response length (right-padded), H hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rollout import policy_forward, query_response_inputs

# architectures whose logits are exactly lm_head(final hidden state): no scaling, soft-capping or bias
PLAIN_HEAD_MODELS = ("qwen2", "qwen3", "llama", "mistral")
FAST_MODELS = ("qwen2", "llama")          # what FastDecoder implements
_LOGITS_PER_CHUNK = 2**25


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk: a power of two with about 2**25 logits (Qwen2's vocabulary: 128 positions)."""
    return max(16, 1 << max(0, (_LOGITS_PER_CHUNK // max(1, vocab_size)).bit_length() - 1))


# --------------------------------------------------------------------------------------------- log-probs


def _chunk_terms(logits, tokens, temperature: float, with_entropy: bool, need_grad: bool, triton: bool):
    """One chunk: logits (C, V), tokens (C,) -> logprobs (C,), entropy (C,) or None, d logprob / d logits (C, V) or
    None (in the logits' dtype; on the Triton path written over the logits)."""
    if triton:
        from lessons_lib.kernels import logprobs_and_entropy, selective_log_softmax

        def run(z, inplace):
            if with_entropy:
                return logprobs_and_entropy(z, tokens, temperature, impl="triton", inplace_backward=inplace)
            return selective_log_softmax(z, tokens, temperature, impl="triton", inplace_backward=inplace), None

        if not need_grad:
            return (*run(logits, False), None)
        z = logits.requires_grad_()                        # a fresh tensor: its storage takes the gradient
        with torch.enable_grad():
            logprobs, entropy = run(z, True)
            (dz,) = torch.autograd.grad(logprobs, z, torch.ones_like(logprobs))
        return logprobs.detach(), None if entropy is None else entropy.detach(), dz
    z = logits.float() / temperature                                           # (C, V) fp32
    lse = torch.logsumexp(z, dim=-1)                                           # (C,)
    logprobs = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    entropy = dz = None
    if with_entropy or need_grad:
        p = torch.exp(z - lse[:, None])                                        # softmax(z)
        if with_entropy:
            entropy = lse - (p * z).sum(-1)
        if need_grad:
            ones = torch.ones_like(tokens[:, None], dtype=p.dtype)
            dz = p.neg_().scatter_add_(1, tokens[:, None], ones).div_(temperature).to(logits.dtype)
    return logprobs, entropy, dz


class _LinearLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H) frozen, tokens (N,) -> logprobs (N,) fp32 [, entropy (N,) fp32, no gradient]."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, with_entropy, chunk, triton):
        N = hidden.shape[0]
        need = ctx.needs_input_grad[0]
        logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(N, dtype=torch.float32, device=hidden.device) if with_entropy else None
        dh = torch.empty_like(hidden) if need else None
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            logits = hidden[a:b] @ weight.t()                                  # (C, V)
            lp, ent, dz = _chunk_terms(logits, tokens[a:b], temperature, with_entropy, need, triton)
            logprobs[a:b] = lp
            if with_entropy:
                entropy[a:b] = ent
            if need:
                torch.mm(dz, weight, out=dh[a:b])                              # (C, H)
            del logits, dz
        ctx.save_for_backward(dh)
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        (dh,) = ctx.saved_tensors
        return dh * g_logprobs[:, None].to(dh.dtype), None, None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False, chunk_tokens: int | None = None, impl: str = "auto"):
    """Per-token log-probs (and entropy) of softmax(hidden @ weight.T / temperature) without (..., V) logits.

    hidden (..., H), weight (V, H) (the LM head: frozen, it gets no gradient), tokens (...) -> logprobs (...) fp32
    and entropy (...) fp32 or None. Equal to `logprobs_from_logits(hidden @ weight.T, tokens, temperature)` (and
    `entropy_from_logits`) up to rounding; differentiable with respect to `hidden`.
    impl: "auto" (the fused Triton kernel on CUDA tensors, torch otherwise), "triton", "torch".
    """
    if weight.requires_grad:
        raise NotImplementedError("linear_logprobs: the LM head requires grad; only a frozen head is supported")
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"linear_logprobs: hidden {tuple(hidden.shape)} does not match tokens {tuple(tokens.shape)}")
    if not temperature > 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"linear_logprobs: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    shape = tokens.shape
    h = hidden.reshape(-1, hidden.shape[-1])                                   # (N, H)
    triton = impl == "triton" or (impl == "auto" and h.is_cuda)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    logprobs, entropy = _LinearLogprobs.apply(h, weight.to(h.dtype), tokens.reshape(-1), float(temperature),
                                              with_entropy, chunk, triton)
    return logprobs.view(shape), None if entropy is None else entropy.view(shape)


# --------------------------------------------------------------------------------------------- the forward


def plain_lm_head(model) -> torch.Tensor | None:
    """The LM head's weight (V, H) when logits are exactly `hidden @ W.T` (a frozen, bias-free, un-adapted head of a
    known architecture); None otherwise (then only full logits give the right answer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None          # LoRA on the head, modules_to_save, a bias, or a trained head
    return head.weight


def fast_decoder_problem(model) -> str | None:
    """Why `FastDecoder` cannot run this policy's PPO forward (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in FAST_MODELS:
        return f"model_type {model_type!r} (FastDecoder implements {FAST_MODELS})"
    if not (hasattr(model, "disable_adapter") and hasattr(model, "peft_config")):
        return "no LoRA adapters (FastDecoder trains adapters over frozen weights)"
    if plain_lm_head(model) is None:
        return "the LM head is trained or adapted"
    drop = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if drop or float(getattr(base.config, "attention_dropout", 0.0) or 0.0) > 0:
        return "dropout is on (PPOConfig.disable_dropout=True turns it off)"
    try:
        from lessons_lib.fast_train import FastDecoder

        FastDecoder(model)
    except (NotImplementedError, ValueError, ImportError) as err:
        return str(err)
    return None


def choose_backend(model, setting, device: torch.device) -> tuple[str, str]:
    """(backend, why) for PPOConfig.fast_forward: "fast" (FastDecoder), "hf" or "logits" (see PolicyForward)."""
    plain = "hf" if plain_lm_head(model) is not None else "logits"
    if setting is False:
        return plain, "fast_forward=False"
    if setting == "auto" and device.type != "cuda":
        return plain, "no GPU (fast_forward='auto' uses FastDecoder on CUDA only)"
    problem = fast_decoder_problem(model)
    if problem is None:
        return "fast", "FastDecoder"
    if setting is True:
        raise ValueError(f"PPOConfig.fast_forward=True, but FastDecoder cannot run this policy: {problem}")
    return plain, problem


def check_fast_forward(fast: "PolicyForward", reference: "PolicyForward", rows, temperature: float) -> str | None:
    """Run FastDecoder's forward and backward once on a few rollout rows and compare its log-probs with those of
    transformers' forward: what went wrong, or None. With fast_forward="auto" the trainer does this once, so an
    untried GPU / library combination falls back to transformers instead of stopping a run. Gradients the check
    leaves on the parameters are the caller's to clear."""
    try:
        with torch.enable_grad():
            logprobs, _, hidden = fast(*rows, temperature, with_hidden=True)
            (logprobs.sum() + hidden.float().mean()).backward()
        with torch.no_grad():
            expected = reference(*rows, temperature)[0]
    except Exception as err:  # noqa: BLE001 (anything: the point is not to stop the run)
        return f"{type(err).__name__}: {err}"
    mask = rows[3].bool()
    got, expected = logprobs.detach()[mask], expected[mask]
    diff = (got - expected).abs().mean().item()
    if not torch.isfinite(got).all() or diff > 0.05 * (1.0 + expected.std().item()):
        return f"its log-probs differ from transformers' by {diff:.3g} on average"
    return None


class PolicyForward:
    """The policy's forward for PPO: `(logprobs, entropy or None, hidden)` of the response tokens, each (B, Tr[, H]).

    backend: "fast" (FastDecoder), "hf" (transformers' decoder), both with `linear_logprobs`; "logits" (the model's
    own logits of the response positions, for heads `plain_lm_head` cannot vouch for).
    """

    def __init__(self, model, backend: str = "hf", chunk_tokens: int | None = None, impl: str = "auto"):
        if backend not in ("fast", "hf", "logits"):
            raise ValueError(f"PolicyForward: backend must be 'fast', 'hf' or 'logits', got {backend!r}")
        self.model, self.backend, self.chunk_tokens, self.impl = model, backend, chunk_tokens, impl
        self.head = plain_lm_head(model) if backend != "logits" else None
        if backend != "logits" and self.head is None:
            raise ValueError("PolicyForward: this model's logits are not lm_head(hidden); use backend='logits'")
        self.decoder = None
        if backend == "fast":
            from lessons_lib.fast_train import FastDecoder

            self.decoder = FastDecoder(model)

    def hidden(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T) -> hidden states after the final norm (B, T, H). attention_mask None: no padding anywhere."""
        if self.decoder is not None:
            return self.decoder(input_ids, attention_mask, position_ids)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state

    def __call__(self, query_ids, query_mask, response_ids, response_mask, temperature: float,
                 with_entropy: bool = False, with_hidden: bool = False, padded: bool = True):
        """One pass over query + response. The token at response position t is predicted at column Tq + t - 1.
        padded=False promises there is no padding at all (then the causal flash-attention kernel can run)."""
        Tr = response_ids.shape[1]
        if self.backend == "logits":
            return policy_forward(self.model, query_ids, query_mask, response_ids, response_mask, temperature,
                                  with_entropy, with_hidden)
        input_ids, attention_mask, position_ids = query_response_inputs(query_ids, query_mask, response_ids,
                                                                        response_mask)
        if padded:
            hidden = self.hidden(input_ids, attention_mask, position_ids)
        else:
            hidden = self.hidden(input_ids)
        hidden = hidden[:, -(Tr + 1):-1]                                           # (B, Tr, H)
        logprobs, entropy = linear_logprobs(hidden, self.head, response_ids, temperature, with_entropy,
                                            self.chunk_tokens, self.impl)
        return logprobs, entropy, hidden if with_hidden else None


# --------------------------------------------------------------------------------------------- static shapes


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_columns(roll_tensors: dict, query_width: int, response_width: int, pad_id: int) -> dict:
    """Widen a rollout's tensors to fixed widths: queries (and their mask) padded on the left, per-token response
    tensors on the right (ids with `pad_id`, everything else with 0). Shapes (B, query_width), (B, response_width)."""
    out = {}
    for name, t in roll_tensors.items():
        if name.startswith("query"):
            extra = query_width - t.shape[1]
            value = pad_id if name == "query_ids" else 0
            out[name] = F.pad(t, (extra, 0), value=value) if extra else t
        else:
            extra = response_width - t.shape[1]
            value = pad_id if name == "response_ids" else 0
            out[name] = F.pad(t, (0, extra), value=value) if extra else t
    return out
