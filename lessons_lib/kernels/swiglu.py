"""SwiGLU, the gated activation inside every Qwen2/Llama MLP, in Triton: forward, backward, autograd wrapper.

    y = silu(gate) * up,            silu(g) = g * sigmoid(g)

The MLP computes `down_proj(silu(gate_proj(x)) * up_proj(x))`; eager PyTorch writes silu(gate) to memory and reads
it back for the product (and saves it for backward). Fused, the forward reads gate and up once and writes y once.
Backward recomputes sigmoid(g) instead of storing it (s = sigmoid(g)):

    d up = dy * g * s               d gate = dy * up * s * (1 + g * (1 - s))

Elementwise and memory-bound: each program handles BLOCK contiguous elements of the flattened tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import cdiv, check_same_device, config, tl, triton, tuned, use_triton


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The reference, as transformers' MLP computes it with `hidden_act="silu"`."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, y_ptr,  # contiguous, n_elements each
    n_elements,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, gate_ptr, up_ptr,  # inputs
    dgate_ptr, dup_ptr,  # outputs
    n_elements,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dup = dy * g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, dup.to(dup_ptr.dtype.element_ty), mask=mask)


# GPU candidates (elementwise: tuned once per dtype); the interpreter takes one big block (few Python steps).
_CONFIGS = [config(BLOCK=1024, num_warps=4), config(BLOCK=2048, num_warps=4), config(BLOCK=2048, num_warps=8),
            config(BLOCK=4096, num_warps=8), config(BLOCK=8192, num_warps=16)]
_fwd = tuned(_swiglu_fwd_kernel, key=[], configs=_CONFIGS, interpreter=config(BLOCK=16384))
_bwd = tuned(_swiglu_bwd_kernel, key=[], configs=_CONFIGS, interpreter=config(BLOCK=16384))


def _grid(n_elements: int):
    return lambda meta: (cdiv(n_elements, meta["BLOCK"]),)


class SwiGLUFunction(torch.autograd.Function):
    """gate, up (...) same shape -> y (...) in promote(gate.dtype, up.dtype). Saves gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if y.numel() > 0:
            _fwd[_grid(y.numel())](gate, up, y, y.numel())
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        if dy.numel() > 0:
            _bwd[_grid(dy.numel())](dy, gate, up, dgate, dup, dy.numel())
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape, fused; gradients for both.

    impl: "triton", "torch" (`swiglu_torch`) or "auto" (Triton on CUDA tensors or in the interpreter, else torch).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    check_same_device("swiglu", gate=gate, up=up)
    if not use_triton(impl, gate, up, op="swiglu"):
        return swiglu_torch(gate, up)
    return SwiGLUFunction.apply(gate, up)
