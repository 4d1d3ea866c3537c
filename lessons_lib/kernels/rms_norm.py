"""RMSNorm as Qwen2 and Llama compute it, in Triton: forward, backward, autograd wrapper. Lesson 07 steps through it.

    y = w * (x * rstd).to(x.dtype),   rstd = 1 / sqrt(mean(x**2) + eps)      (per row, in fp32)

The cast back to the input dtype *before* the weight multiply is transformers' `Qwen2RMSNorm` / `LlamaRMSNorm`
behaviour, and so is the output dtype: `promote(w.dtype, x.dtype)` (bf16 x with fp32 w gives fp32).

Backward, with n = x * rstd and dn = dy * w (derived in kernels/rms_norm.py):

    dx = rstd * (dn - n * mean(dn * n))        dw = sum over rows of dy * n

The forward saves only rstd (4 bytes per row). Each backward program walks a strided set of rows and keeps its
own partial dw in registers (the layout of Liger-Kernel's first rms_norm and of the Triton layer-norm tutorial);
a second, small kernel sums those few partial rows and writes dw in the weight's dtype. (Summing them with torch
would cost three more launches per call, zero-fill, sum and cast, each a few microseconds of CPU time.)
"""

from __future__ import annotations

import torch

from ._common import cdiv, check_same_device, config, multiprocessors, next_power_of_2, tl, triton, tuned, use_triton

MAX_N = 65536  # one row must fit in one block


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference: transformers' Qwen2RMSNorm.forward, line for line."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


@triton.heuristics({"BLOCK_N": lambda args: next_power_of_2(args["N"])})
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,  # x, y: (M, N) rows of stride stride_x / stride_y; w: (N,); rstd: (M,) fp32
    M, N, stride_x, stride_y,
    eps,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N: a whole row in one block
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)[:, None]  # 64-bit offsets: M * N can pass 2**31

    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)

    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,); masked columns added zeros
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # round to x's dtype, as transformers does
    y = n * w[None, :]

    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.heuristics({"BLOCK_N": lambda args: next_power_of_2(args["N"])})
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr,  # inputs: dy, x (M, N); w (N,); rstd (M,) fp32
    dx_ptr, dw_partial_ptr,  # outputs: dx (M, N); dw_partial (>= number of programs, N) fp32
    n_partial_ptr,  # output: (1,) int32, the number of programs (= rows of dw_partial written)
    M, N, stride_dy, stride_x, stride_dx,
    HAS_DW: tl.constexpr,  # False when the weight is frozen (LoRA): no dw at all
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # used by the launcher's grid only (a tuning knob)
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M  # grid-stride loop: program pid takes row blocks pid, pid + G, ...
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for start in range(pid * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)

        n = x * rstd[:, None]
        if HAS_DW:  # the forward multiplied w by n rounded to x's dtype
            dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None])
        tl.store(dx_ptr + rows64 * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    if HAS_DW:
        tl.store(dw_partial_ptr + pid * N + cols, dw, mask=col_ok)
        tl.store(n_partial_ptr, tl.num_programs(0), mask=pid == 0)  # the launcher's grid depends on the config


@triton.jit
def _rms_norm_dw_kernel(
    dw_partial_ptr,  # (>= G, N) fp32: one partial sum per backward program
    n_partial_ptr,  # (1,) int32: G, the number of rows the backward wrote
    dw_ptr,  # output (N,) in the weight's dtype
    N,
    BLOCK_G: tl.constexpr,  # partial rows added per step
    BLOCK_COLS: tl.constexpr,  # columns per program
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < N
    n_partial = tl.load(n_partial_ptr)
    acc = tl.zeros((BLOCK_G, BLOCK_COLS), dtype=tl.float32)
    for start in range(0, n_partial, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        mask = (g < n_partial)[:, None] & col_ok[None, :]
        acc += tl.load(dw_partial_ptr + g[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)


# GPU candidates, autotuned per N (the first is the default when tuning is off). The interpreter runs many rows per
# block: fewer Python steps. For the backward, more rows per program or more programs per SM keep more loads in
# flight, at the price of registers or of partial dw rows.
_fwd = tuned(_rms_norm_fwd_kernel, key=["N"], interpreter=config(BLOCK_M=16), configs=[
    config(BLOCK_M=2, num_warps=8), config(BLOCK_M=1, num_warps=4), config(BLOCK_M=2, num_warps=4),
    config(BLOCK_M=4, num_warps=8), config(BLOCK_M=8, num_warps=16)])
_bwd = tuned(_rms_norm_bwd_kernel, key=["N"], interpreter=config(BLOCK_M=16, PROGRAMS_PER_SM=4), configs=[
    config(BLOCK_M=2, PROGRAMS_PER_SM=4, num_warps=8), config(BLOCK_M=1, PROGRAMS_PER_SM=8, num_warps=4),
    config(BLOCK_M=2, PROGRAMS_PER_SM=8, num_warps=4), config(BLOCK_M=4, PROGRAMS_PER_SM=4, num_warps=8),
    config(BLOCK_M=4, PROGRAMS_PER_SM=2, num_warps=16)])
_MAX_PROGRAMS_PER_SM = 8
# The dw sum: a few hundred partial rows of N fp32; more, narrower column blocks = more programs reading at once.
_dw = tuned(_rms_norm_dw_kernel, key=["N"], interpreter=config(BLOCK_G=64, BLOCK_COLS=512), configs=[
    config(BLOCK_G=64, BLOCK_COLS=32, num_warps=4), config(BLOCK_G=128, BLOCK_COLS=16, num_warps=4),
    config(BLOCK_G=32, BLOCK_COLS=64, num_warps=4)])


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """x (..., N), weight (N,) -> y (..., N) in promote(x.dtype, weight.dtype). Saves x, weight and rstd (M,) fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        N = x.shape[-1]
        x2 = _rows(x, N)  # (M, N)
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M > 0:
            grid = lambda meta: (cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
            _fwd[grid](x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = _rows(dy, N)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        sms = multiprocessors(x2.device)
        # grid-stride: a few programs per SM, never more than there are row blocks; each writes its dw row
        grid = lambda meta: (max(1, min(cdiv(M, meta["BLOCK_M"]), sms * meta["PROGRAMS_PER_SM"])),)  # noqa
        has_dw = ctx.needs_input_grad[1]
        if M == 0:
            return dx.view(ctx.x_shape), torch.zeros_like(weight) if has_dw else None, None
        if has_dw:  # one fp32 row per backward program (never more than this), and their count
            dw_partial = torch.empty((min(M, sms * _MAX_PROGRAMS_PER_SM), N), dtype=torch.float32, device=x2.device)
            n_partial = torch.empty(1, dtype=torch.int32, device=x2.device)
        else:  # a frozen weight (LoRA): nothing to allocate, the pointers are not used
            dw_partial = n_partial = rstd
        _bwd[grid](dy2, x2, weight, rstd, dx, dw_partial, n_partial, M, N, dy2.stride(0), x2.stride(0), dx.stride(0),
                   HAS_DW=has_dw)
        if not has_dw:
            return dx.view(ctx.x_shape), None, None
        dw = torch.empty(N, dtype=weight.dtype, device=weight.device)
        _dw[lambda meta: (cdiv(N, meta["BLOCK_COLS"]),)](dw_partial, n_partial, dw, N)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of x (..., N) with weight (N,), exactly as transformers' Qwen2/Llama RMSNorm.

    impl: "triton" (the kernels above), "torch" (`rms_norm_torch`), or "auto" (Triton on CUDA tensors or in the
    Triton interpreter, else torch). Gradients flow to x and weight.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    check_same_device("rms_norm", x=x, weight=weight)
    if not use_triton(impl, x, weight, op="rms_norm"):
        return rms_norm_torch(x, weight, eps)
    if x.shape[-1] > MAX_N:
        raise ValueError(f"rms_norm: rows of {x.shape[-1]} elements are longer than the kernel's {MAX_N}")
    return RMSNormFunction.apply(x, weight, float(eps))
