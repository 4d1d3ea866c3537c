"""Rotary position embedding (RoPE) in transformers' rotate-half convention, in Triton. Lesson 07 reads it.

    q (B, nh, T, hs), k (B, nkv, T, hs), cos, sin (B, T, hs)  [batch 1 broadcasts]
    q_embed = q * cos + rotate_half(q) * sin,      rotate_half([x1, x2]) = [-x2, x1]   (x1, x2: the two halves)

Written per half, with c1, c2 (s1, s2) the halves of cos (sin):

    forward:   y1 = x1 * c1 - x2 * s1          y2 = x2 * c2 + x1 * s2
    backward:  dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1

so the backward is the same rotation with (s1, s2) replaced by (-s2, -s1): one kernel with a BACKWARD flag.
For each token (b, t) the kernel loads that token's cos and sin once and rotates every query head and every key
head (grouped-query attention: nkv may be smaller than nh). A program handles BLOCK_T consecutive tokens (a tuning
knob: one token is only a few kilobytes, more tokens keep more loads in flight per program). q and k are addressed
through their strides, so the `(B, T, nh, hs) -> (B, nh, T, hs)` transposed views that attention makes are used as
they are, without a copy.
"""

from __future__ import annotations

import torch

from ._common import cdiv, check_same_device, config, next_power_of_2, tl, triton, tuned, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_torch(q, k, cos, sin):
    """The reference: transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@triton.jit
def _rotate_heads(
    x_ptr, y_ptr,  # first element of the input and of the output
    x_tok, y_tok,  # (BLOCK_T, 1, 1) offsets of each token's first head in x and in y
    n_heads, stride_xh, stride_xd, stride_yh, stride_yd, half,
    c1, c2, s1, s2,  # (BLOCK_T, 1, BLOCK_D) halves of the tokens' cos and sin, fp32
    token_ok,  # (BLOCK_T, 1, 1): False past the last token (the last program's tail)
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[None, :, None]  # (1, BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    mask = token_ok & (h < n_heads) & (d < half)  # (BLOCK_T, BLOCK_H, BLOCK_D)
    x1_ptr = x_ptr + x_tok + h * stride_xh + d * stride_xd
    x1 = tl.load(x1_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptr + half * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    y1_ptr = y_ptr + y_tok + h * stride_yh + d * stride_yd
    tl.store(y1_ptr, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y1_ptr + half * stride_yd, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({
    "BLOCK_QH": lambda args: next_power_of_2(args["n_qh"]),
    "BLOCK_KH": lambda args: next_power_of_2(args["n_kh"]),
    "BLOCK_D": lambda args: next_power_of_2(args["half"]),
})
@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    n_tokens, T, n_qh, n_kh, half,  # n_tokens = B * T; half = hs // 2
    sq_b, sq_h, sq_t, sq_d,  # strides of q (B, nh, T, hs)
    sk_b, sk_h, sk_t, sk_d,  # strides of k (B, nkv, T, hs)
    sc_b, sc_t, sc_d,  # strides of cos and sin (B, T, hs); sc_b = 0 broadcasts one row of positions
    sqo_b, sqo_h, sqo_t, sqo_d,  # strides of q_out
    sko_b, sko_h, sko_t, sko_d,  # strides of k_out
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) flat token index b * T + t
    token_ok = (token < n_tokens)[:, None, None]  # (BLOCK_T, 1, 1)
    b = (token // T).to(tl.int64)[:, None, None]  # 64-bit offsets: B * nh * T * hs can pass 2**31
    t = (token % T).to(tl.int64)[:, None, None]

    d = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    cs_mask = token_ok & (d < half)
    cs = b * sc_b + t * sc_t + d * sc_d  # (BLOCK_T, 1, BLOCK_D): this token's row of cos and of sin
    c1 = tl.load(cos_ptr + cs, mask=cs_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half * sc_d, mask=cs_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=cs_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half * sc_d, mask=cs_mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation: (s1, s2) -> (-s2, -s1)
        s1_forward = s1
        s1 = -s2
        s2 = -s1_forward

    _rotate_heads(q_ptr, q_out_ptr, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t,
                  n_qh, sq_h, sq_d, sqo_h, sqo_d, half, c1, c2, s1, s2, token_ok, BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, b * sk_b + t * sk_t, b * sko_b + t * sko_t,
                  n_kh, sk_h, sk_d, sko_h, sko_d, half, c1, c2, s1, s2, token_ok, BLOCK_KH, BLOCK_D)


# GPU candidates (the first is the default when tuning is off); the interpreter takes a few tokens per program.
_rope = tuned(_rope_kernel, key=["n_qh", "n_kh", "half"], interpreter=config(BLOCK_T=4), configs=[
    config(BLOCK_T=1, num_warps=4), config(BLOCK_T=2, num_warps=4), config(BLOCK_T=4, num_warps=4),
    config(BLOCK_T=4, num_warps=8), config(BLOCK_T=1, num_warps=2), config(BLOCK_T=8, num_warps=8)])


def _launch(q, k, cos, sin, backward: bool):
    B, nh, T, hs = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # same memory layout as the inputs
    if q.numel() > 0:
        cos, sin = cos.expand(B, T, hs), sin.expand(B, T, hs)
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        grid = lambda meta: (cdiv(B * T, meta["BLOCK_T"]),)  # noqa: E731
        _rope[grid](q, k, cos, sin, q_out, k_out, B * T, T, nh, k.shape[1], hs // 2,
                    *q.stride(), *k.stride(), *cos.stride(), *q_out.stride(), *k_out.stride(), BACKWARD=backward)
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """q (B, nh, T, hs), k (B, nkv, T, hs), cos, sin (B or 1, T, hs) -> rotated q, k. Saves cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope(q, k, cos, sin, impl: str = "auto"):
    """Rotate q (B, nh, T, hs) and k (B, nkv, T, hs) by cos, sin (B or 1, T, hs), as transformers does.

    Gradients flow to q and k; cos and sin are tables (transformers computes them without grad), so they must not
    require grad on the Triton path. impl: "triton", "torch" (`apply_rope_torch`) or "auto".
    """
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: expected q (B, nh, T, hs), k (B, nkv, T, hs), cos and sin (B, T, hs); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    B, _, T, hs = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, hs) or cos.shape[1:] != (T, hs) or cos.shape[0] not in (1, B):
        raise ValueError(f"apply_rope: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cos/sin {tuple(cos.shape)} (need the same B, T and hs; cos/sin batch 1 or B)")
    if hs % 2:
        raise ValueError(f"apply_rope: head size {hs} must be even (rotate-half splits it in two)")
    check_same_device("apply_rope", q=q, k=k, cos=cos, sin=sin)
    if not use_triton(impl, q, k, cos, sin, op="apply_rope"):
        return apply_rope_torch(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope(impl='triton') computes no gradient for cos/sin, which require grad here; "
                         "detach them or use impl='torch'")
    if q.dtype != k.dtype or cos.dtype != sin.dtype or torch.promote_types(q.dtype, cos.dtype) != q.dtype:
        raise ValueError(f"apply_rope(impl='triton'): q, k dtypes {q.dtype}, {k.dtype} and cos, sin dtypes "
                         f"{cos.dtype}, {sin.dtype} must give outputs in q's dtype (transformers casts cos/sin to it)")
    return RoPEFunction.apply(q, k, cos, sin)
