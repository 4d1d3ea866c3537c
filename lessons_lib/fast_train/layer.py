"""One Qwen2/Llama decoder layer for training: forward, and a backward that recomputes it (lesson 09).

    x1 = x + o_proj(attention(rope(q|k|v_proj(norm1(x)))))
    y  = x1 + down_proj(silu(gate) * up),      gate|up = gate|up_proj(norm2(x1))

Same math as transformers' `modeling_qwen2` / `modeling_llama` (the tests compare losses and every LoRA gradient),
organised for a training step that keeps little in memory:

- the forward runs without autograd and keeps only the layer input x (the decoder's checkpoint);
- the backward recomputes the attention half with autograd, then runs the MLP **forward and backward together,
  one chunk of positions at a time**: the gradient dy of the layer output is already known, so the MLP output is
  never needed again, and the (N, intermediate) activations exist for one chunk only (MLP chunks of 1,024 rows
  hold 4x less than the whole batch, and `down_proj`'s forward is not recomputed at all);
- the MLP backward is the autograd formula written out (mul, then `silu_backward`), so the numbers are the same.

Shapes: B batch, T positions, N = B*T rows, H hidden, I intermediate, nh / nkv heads, hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .proj import Part, Proj, ProjFn, lora_params, proj_backward, proj_forward


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the inside in fp32 (F.rms_norm
    computes in fp32 and rounds once, as transformers does)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Layer:
    """One decoder layer's tensors, read in place: two norm weights and four projections (q|k|v and gate|up fused)."""

    def __init__(self, hf_layer, index: int):
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        for extra in ("q_norm", "k_norm"):
            if hasattr(attn, extra):
                raise NotImplementedError(f"layer {index}: attention has {extra} (Qwen3-style); not supported")
        name = f"layers.{index}"
        part = lambda m, n: Part(m, f"{name}.{n}")  # noqa: E731
        self.qkv = Proj([part(attn.q_proj, "self_attn.q_proj"), part(attn.k_proj, "self_attn.k_proj"),
                         part(attn.v_proj, "self_attn.v_proj")])
        self.o = Proj([part(attn.o_proj, "self_attn.o_proj")])
        self.gate_up = Proj([part(mlp.gate_proj, "mlp.gate_proj"), part(mlp.up_proj, "mlp.up_proj")])
        self.down = Proj([part(mlp.down_proj, "mlp.down_proj")])
        self.ln1, self.eps1 = hf_layer.input_layernorm.weight, hf_layer.input_layernorm.variance_epsilon
        post = hf_layer.post_attention_layernorm
        self.ln2, self.eps2 = post.weight, post.variance_epsilon
        self.scaling = attn.scaling
        self.window = getattr(attn, "sliding_window", None)

    @property
    def projs(self) -> list[Proj]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def loras(self) -> list[list]:
        """Active adapters of [q|k|v, o, gate|up, down], read once per forward and reused by its backward."""
        return [p.loras() for p in self.projs]


class Run:
    """What every layer of one forward pass shares: rotary cos/sin, the attention mask, sizes, chunking."""

    def __init__(self, cos, sin, attn_mask, keep, nh, nkv, hs, mlp_chunk: int):
        self.cos, self.sin = cos[:, None], sin[:, None]     # (B, 1, T, hs): broadcast over heads
        self.attn_mask = attn_mask                          # None (causal) or bool (B, 1, T, T), True = attend
        self.keep = keep                                    # None or (B, 1, T, 1): 0 on queries with no key
        self.nh, self.nkv, self.hs = nh, nkv, hs
        self.mlp_chunk = mlp_chunk


def attention(layer: Layer, x: torch.Tensor, run: Run, qkv_loras, o_loras) -> torch.Tensor:
    """x (B, T, H) -> x + attention output (B, T, H); with autograd when anything requires grad."""
    B, T, H = x.shape
    nh, nkv, hs = run.nh, run.nkv, run.hs
    grad = torch.is_grad_enabled()

    def proj(p, loras, inp):
        params = lora_params(loras)
        if grad and (inp.requires_grad or any(t.requires_grad for t in params)):
            return ProjFn.apply(inp, p, loras, *params)
        return proj_forward(p, inp, loras)

    h = rms_norm(x, layer.ln1, layer.eps1)
    qkv = proj(layer.qkv, qkv_loras, h.view(B * T, H))                     # (N, (nh + 2 nkv) hs)
    q = qkv[:, :nh * hs].view(B, T, nh, hs).transpose(1, 2)                # (B, nh, T, hs)
    k = qkv[:, nh * hs:(nh + nkv) * hs].view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
    v = qkv[:, (nh + nkv) * hs:].view(B, T, nkv, hs).transpose(1, 2)
    q = q * run.cos + rotate_half(q) * run.sin                             # transformers' apply_rotary_pos_emb
    k = k * run.cos + rotate_half(k) * run.sin
    if run.attn_mask is None:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling, enable_gqa=nkv != nh)
    else:  # masks rule out the flash kernel, and the kernel that takes masks has no GQA: repeat k, v (as transformers)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=run.attn_mask, scale=layer.scaling) * run.keep
    a = a.transpose(1, 2).reshape(B * T, nh * hs)                          # (N, nh*hs)
    return x + proj(layer.o, o_loras, a).view(B, T, H)


def _swiglu_parts(gu: torch.Tensor):
    """gate|up (C, 2I) -> gate, up views (C, I) each."""
    I = gu.shape[1] // 2
    return gu[:, :I], gu[:, I:]


def mlp_forward(layer: Layer, h: torch.Tensor, run: Run, gu_loras, d_loras) -> torch.Tensor:
    """down(silu(gate) * up) for h (N, H), no autograd, `run.mlp_chunk` rows at a time -> (N, H)."""
    w_gu = layer.gate_up.weight(h.dtype, h.device)                         # (2I, H), dequantized once per layer
    w_d = layer.down.weight(h.dtype, h.device)                             # (H, I)
    out = torch.empty_like(h)
    for a in range(0, h.shape[0], run.mlp_chunk):
        b = min(a + run.mlp_chunk, h.shape[0])
        gate, up = _swiglu_parts(proj_forward(layer.gate_up, h[a:b], gu_loras, weight=w_gu))  # (C, I) each
        proj_forward(layer.down, F.silu(gate) * up, d_loras, weight=w_d, out=out[a:b])
    return out


def mlp_backward(layer: Layer, h: torch.Tensor, dy: torch.Tensor, run: Run, gu_loras, d_loras, need_dh: bool):
    """Recompute and differentiate the MLP chunk by chunk: h, dy (N, H) -> (dh (N, H) or None, LoRA grads of
    gate|up then down, summed over chunks, in lora_params order)."""
    w_gu = layer.gate_up.weight(h.dtype, h.device)                         # (2I, H)
    w_d = layer.down.weight(h.dtype, h.device)                             # (H, I)
    dh = torch.empty_like(h) if need_dh else None
    grads = None
    for a in range(0, h.shape[0], run.mlp_chunk):
        b = min(a + run.mlp_chunk, h.shape[0])
        gate, up = _swiglu_parts(proj_forward(layer.gate_up, h[a:b], gu_loras, weight=w_gu))  # (C, I) each
        act = F.silu(gate)                                                 # (C, I)
        x_down = act * up if d_loras else None                             # the down input, for its LoRA only
        d_in, g_d = proj_backward(layer.down, x_down, dy[a:b], d_loras, weight=w_d)  # d_in (C, I)
        d_gu = torch.empty(b - a, 2 * gate.shape[1], dtype=h.dtype, device=h.device)  # (C, 2I)
        d_gate, d_up = _swiglu_parts(d_gu)
        torch.mul(d_in, act, out=d_up)                                     # mul backward: grad * other
        torch.ops.aten.silu_backward.grad_input(d_in * up, gate, grad_input=d_gate)
        _, g_gu = proj_backward(layer.gate_up, h[a:b], d_gu, gu_loras, need_dx=need_dh, weight=w_gu,
                                dx_out=dh[a:b] if need_dh else None)
        chunk_grads = g_gu + g_d
        grads = chunk_grads if grads is None else [s + g for s, g in zip(grads, chunk_grads)]
    return dh, grads or []


def layer_forward(layer: Layer, x: torch.Tensor, run: Run, loras) -> torch.Tensor:
    """The whole layer without autograd: x (B, T, H) -> y (B, T, H)."""
    qkv_l, o_l, gu_l, d_l = loras
    x1 = attention(layer, x, run, qkv_l, o_l)
    B, T, H = x1.shape
    h = rms_norm(x1, layer.ln2, layer.eps2).view(B * T, H)
    return x1 + mlp_forward(layer, h, run, gu_l, d_l).view(B, T, H)


def layer_backward(layer: Layer, x: torch.Tensor, dy: torch.Tensor, run: Run, loras, need_dx: bool,
                   need_params: list[bool]):
    """Recompute the layer from its input x and differentiate: -> (dx or None, grads in lora_params order of
    [q|k|v, o, gate|up, down]; None where `need_params` is False)."""
    qkv_l, o_l, gu_l, d_l = loras
    B, T, H = x.shape
    attn_params = lora_params(qkv_l) + lora_params(o_l)
    n_attn = len(attn_params)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(need_dx)
        x1 = attention(layer, xg, run, qkv_l, o_l)                         # autograd graph of the attention half
        h = rms_norm(x1, layer.ln2, layer.eps2)
    wanted = [p for p, need in zip(attn_params, need_params[:n_attn]) if need]
    attn_needs_grad = x1.requires_grad and (need_dx or wanted)
    dh, mlp_grads = mlp_backward(layer, h.detach().view(B * T, H), dy.reshape(B * T, H), run, gu_l, d_l,
                                 need_dh=bool(attn_needs_grad))
    dx, attn_grads = None, [None] * n_attn
    if attn_needs_grad:
        inputs = ([xg] if need_dx else []) + wanted
        got = list(torch.autograd.grad([x1, h], inputs, [dy, dh.view(B, T, H)], allow_unused=True))
        dx = got.pop(0) if need_dx else None
        it = iter(got)
        attn_grads = [next(it) if need else None for need in need_params[:n_attn]]
    elif need_dx:  # nothing in the attention half is trainable and x itself needs no grad: cannot happen
        raise RuntimeError("layer_backward: x needs a gradient but the attention half has no graph")
    grads = attn_grads + [g if need else None for g, need in zip(mlp_grads, need_params[n_attn:])]
    return dx, grads
