"""The decoder forward the rollout engine runs: Qwen2 and Llama, written out (lesson 08, fast rollouts).

Same math as transformers' `modeling_qwen2` / `modeling_llama` (RMSNorm in fp32 then cast, rotate-half RoPE with
the model's own inverse frequencies and scaling, grouped-query attention, q/k/v biases, SwiGLU MLP), but shaped for
generation with a *static* KV cache:

- `prefill(ids, mask)` runs the left-padded prompts (B, Tq) once and fills cache columns [0, Tq).
- `decode(tok, pos, col, valid)` runs one new token per row, writes its key/value at cache column `col`, and
  attends over the whole preallocated cache (B, nkv, Tc, hs) with `valid` masking columns that are padding or not
  yet written. Every shape is fixed, nothing syncs with the host, so the step can be captured in a CUDA graph.

Positions follow `generate` for left padding: position_ids = cumsum(attention_mask) - 1 (padding gets 1).
Shapes: B batch, Tq prompt length, Tc cache length, H hidden, V vocabulary, nh heads, nkv key-value heads,
g = nh / nkv, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import Proj, Source

SUPPORTED = ("qwen2", "llama")


def unwrap_causal_lm(model, who: str = "the rollout engine", instead: str = "use transformers' generate for this model"):
    """The transformers causal LM inside a peft model (or the model itself), checked to be a SUPPORTED one; the error
    names `who` needs it and what to do `instead` (FastDecoder shares this check)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise NotImplementedError(f"{who} supports {SUPPORTED} models, got model_type={model_type!r} "
                                  f"({type(inner).__name__}); {instead}")
    return inner


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) with the inside in fp32: `F.rms_norm`
    does the inside in fp32 and rounds once, the same numbers in 2 kernels instead of 8."""
    return (weight * F.rms_norm(x, (x.shape[-1],), eps=eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for (B, T, heads, hs) with cos, sin (B, T, 1, hs): queries and keys at once."""
    return torch.addcmul(x * cos, rotate_half(x), sin)


class Layer:
    """One decoder layer's tensors: two norm weights and four (fused) projections."""

    def __init__(self, hf_layer, index: int, dtype, dense: bool, scratch: dict):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        for extra in ("q_norm", "k_norm"):
            if hasattr(attn, extra):
                raise NotImplementedError(f"layer {index}: attention has {extra} (Qwen3-style); not supported")
        p = f"layers.{index}"
        src = lambda m, n: Source(m, f"{p}.{n}")  # noqa: E731
        self.qkv = Proj([src(attn.q_proj, "self_attn.q_proj"), src(attn.k_proj, "self_attn.k_proj"),
                         src(attn.v_proj, "self_attn.v_proj")], dtype, dense, scratch)
        self.o = Proj([src(attn.o_proj, "self_attn.o_proj")], dtype, dense, scratch)
        self.gate_up = Proj([src(mlp.gate_proj, "mlp.gate_proj"), src(mlp.up_proj, "mlp.up_proj")],
                            dtype, dense, scratch)
        self.down = Proj([src(mlp.down_proj, "mlp.down_proj")], dtype, dense, scratch)
        self.ln1, self.eps1 = hf_layer.input_layernorm.weight, hf_layer.input_layernorm.variance_epsilon
        post = hf_layer.post_attention_layernorm
        self.ln2, self.eps2 = post.weight, post.variance_epsilon
        self.act = mlp.act_fn

    @property
    def projs(self) -> list[Proj]:
        return [self.qkv, self.o, self.gate_up, self.down]


class Decoder:
    """Qwen2/Llama forward over the engine's projections and a static KV cache."""

    def __init__(self, model, dtype: torch.dtype, dense_layers: list[bool], scratch: dict, kernels: str = "torch"):
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.kernels = kernels
        if kernels == "triton":  # lessons_lib.kernels: RMSNorm and q+k RoPE in one kernel each (lesson 07)
            from lessons_lib import kernels as K

            self._K = K
        lm = unwrap_causal_lm(model)
        inner, cfg = lm.model, lm.config
        for name in ("embed_tokens",):
            if hasattr(getattr(inner, name), "lora_embedding_A"):
                raise NotImplementedError(f"LoRA on {name} is not supported by the rollout engine")
        if hasattr(lm.lm_head, "modules_to_save"):
            raise NotImplementedError("lm_head in peft modules_to_save is not supported by the rollout engine")
        self.dtype = dtype
        self.embed = inner.embed_tokens.weight                                     # (V, H), used in place
        self.layers = [Layer(layer, i, dtype, dense_layers[i], scratch) for i, layer in enumerate(inner.layers)]
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = Proj([Source(lm.lm_head, "lm_head")], dtype, dense=False, scratch=scratch)
        rope = inner.rotary_emb
        rope_type = getattr(rope, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope_type={rope_type!r} changes with the sequence length; not supported")
        self.inv_freq = rope.inv_freq.float()                                      # (hs/2,)
        self.rope_scaling = float(rope.attention_scaling)
        attn = inner.layers[0].self_attn
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hs, self.scale = attn.head_dim, attn.scaling
        self.g = self.nh // self.nkv
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in inner.layers]
        self.window = min((w for w in windows if w), default=None)
        self.device = self.embed.device

    @property
    def projs(self) -> list[Proj]:
        return [p for layer in self.layers for p in layer.projs] + [self.lm_head]

    # ------------------------------------------------------------------ pieces
    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for integer positions (B, T): each (B, T, hs), in fp32 then cast, as transformers does."""
        freqs = pos[..., None].float() * self.inv_freq                            # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                    # (B, T, hs)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(self.dtype), sin.to(self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.kernels == "triton":
            return self._K.rms_norm(x, weight, eps, impl="triton").to(x.dtype)
        return rms_norm(x, weight, eps)

    def _qkv(self, layer: Layer, x: torch.Tensor, cos, sin):
        """Normalise, project, rotate: x (B, T, H) -> q (B, nh, T, hs), k and v (B, nkv, T, hs) (views)."""
        B, T, H = x.shape
        h = self._norm(x, layer.ln1, layer.eps1).view(B * T, H)
        qkv = layer.qkv(h)                                                         # (B*T, (nh + 2 nkv) hs)
        nq, nqk = self.nh * self.hs, (self.nh + self.nkv) * self.hs
        v = qkv[:, nqk:].view(B, T, self.nkv, self.hs).transpose(1, 2)
        if self.kernels == "triton":
            q = qkv[:, :nq].view(B, T, self.nh, self.hs).transpose(1, 2)
            k = qkv[:, nq:nqk].view(B, T, self.nkv, self.hs).transpose(1, 2)
            q, k = self._K.apply_rope(q, k, cos, sin, impl="triton")
            return q, k, v
        qk = apply_rope(qkv[:, :nqk].view(B, T, self.nh + self.nkv, self.hs), cos[:, :, None], sin[:, :, None])
        qk = qk.transpose(1, 2)                                                    # (B, nh + nkv, T, hs), rotated
        return qk[:, :self.nh], qk[:, self.nh:], v

    def _rest(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual: attn (B, T, nh*hs) -> new x (B, T, H)."""
        B, T, H = x.shape
        x = x + layer.o(attn.reshape(B * T, -1)).view(B, T, H)
        h = self._norm(x, layer.ln2, layer.eps2).view(B * T, H)
        gate, up = layer.gate_up(h).split(layer.gate_up.sizes, dim=-1)             # 2 x (B*T, I)
        return x + layer.down(layer.act(gate) * up).view(B, T, H)

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head for one position per row: (B, H) -> fp32 (B, V), as `generate` upcasts."""
        return self.lm_head(self._norm(x_last, self.norm, self.norm_eps)).float()

    # ------------------------------------------------------------------ the two passes
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, cache_k: list, cache_v: list) -> torch.Tensor:
        """Left-padded prompts (B, Tq) -> logits of the next token (B, V); fills cache columns [0, Tq)."""
        B, T = ids.shape
        mask = mask.bool()
        pos = (mask.long().cumsum(1) - 1).masked_fill(~mask, 1)                    # (B, Tq), as generate does
        cos, sin = self.rope(pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        allowed = causal[None] & mask[:, None, :]                                  # (B, Tq, Tq): query i sees key j
        allowed |= torch.eye(T, dtype=torch.bool, device=ids.device)               # padding sees itself: no NaN rows
        x = F.embedding(ids, self.embed).to(self.dtype)                            # (B, Tq, H)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)                               # (B, heads, Tq, hs)
            cache_k[i][:, :, :T] = k
            cache_v[i][:, :, :T] = v
            k, v = k.repeat_interleave(self.g, dim=1), v.repeat_interleave(self.g, dim=1)  # (B, nh, Tq, hs)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=self.scale)
            x = self._rest(layer, x, a.transpose(1, 2))                           # a: (B, nh, Tq, hs)
        return self.logits(x[:, -1])

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, valid: torch.Tensor,
               cache_k: list, cache_v: list) -> torch.Tensor:
        """One token per row: tok, pos (B,), col (1,) the cache column it goes to, valid (B, Tc) -> logits (B, V).

        Graph-safe: fixed shapes, in-place writes only into preallocated buffers, no host synchronisation.
        """
        B, Tc = valid.shape
        valid.index_fill_(1, col, True)
        bias = torch.zeros(B, Tc, device=valid.device, dtype=self.dtype)
        bias = bias.masked_fill(~valid, torch.finfo(self.dtype).min)[:, None, None, :]  # (B, 1, 1, Tc)
        cos, sin = self.rope(pos[:, None])                                         # (B, 1, hs)
        x = F.embedding(tok[:, None], self.embed).to(self.dtype)                   # (B, 1, H)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)                               # q (B, nh, 1, hs)
            cache_k[i].index_copy_(2, col, k)                                      # (B, nkv, 1, hs) at column col
            cache_v[i].index_copy_(2, col, v)
            qg = q.reshape(B, self.nkv, self.g, self.hs)                           # query heads grouped by kv head
            scores = torch.add(bias, torch.matmul(qg, cache_k[i].transpose(-1, -2)), alpha=self.scale)
            probs = torch.softmax(scores, dim=-1)                                  # (B, nkv, g, Tc), fp32 inside
            a = torch.matmul(probs, cache_v[i])                                    # (B, nkv, g, hs)
            x = self._rest(layer, x, a.reshape(B, 1, self.nh * self.hs))
        return self.logits(x[:, -1])
