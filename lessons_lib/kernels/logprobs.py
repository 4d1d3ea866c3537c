"""Per-token log-probabilities (and entropy) of chosen tokens, without a (B, T, V) fp32 log-softmax. Lesson 07.

PPO needs, for every response token, log p(token) under `softmax(logits / temperature)` and (for its statistics)
the entropy of that distribution. The obvious code

    logp = torch.log_softmax(logits.float() / temperature, -1)        # (B, T, V) fp32: 2.5 GB at 4096 x 151,936
    logprobs = logp.gather(-1, index[..., None]).squeeze(-1)           # (B, T)

materializes several fp32 copies of the logits. Here one program per row streams the vocabulary in blocks and
keeps three running numbers (z = logits / temperature, online softmax as in FlashAttention):

    m = max z,   s = sum exp(z - m),   t = sum exp(z - m) * z
    lse = m + log s,    logprob = z[index] - lse,    entropy = lse - t / s

and saves only lse (and the entropy) per row: 8 bytes instead of 4 V bytes. The backward streams the logits again:

    p = exp(z - lse)
    d z = g_logprob * (onehot(index) - p)  -  g_entropy * p * (log p + entropy)
    d logits = d z / temperature        (written in the logits' dtype)

`inplace_backward=True` writes that gradient into the logits' own storage (and bumps their autograd version, so a
later use of the overwritten logits raises instead of silently reading gradients). Use it when nothing else needs
the logits after the backward, as in a PPO update: the backward then allocates nothing of size (B, T, V).
"""

from __future__ import annotations

import torch

from ._common import check_same_device, config, tl, triton, tuned, use_triton


def logprobs_and_entropy_torch(logits, index, temperature: float = 1.0):
    """The reference (materializes the fp32 log-softmax): returns (logprobs, entropy), both (...) fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    logprobs = logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, index_ptr,  # logits (B, T, V), unit stride along V; index (B, T) int
    logprobs_ptr, entropy_ptr, lse_ptr,  # outputs, (B * T,) fp32 each
    T, V, stride_lb, stride_lt, stride_ib, stride_it,
    inv_temperature,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    logits_row = logits_ptr + b * stride_lb + t * stride_lt

    # Two things keep the loads streaming. The max is shared by the whole block (one reduction across the
    # program's warps per step), but the two sums are kept per lane and added up once at the end: a step waits for
    # one cross-warp reduction, not three. And the next block is loaded before this block's math (prefetch), so
    # its bytes are in flight while the exponentials and the reduction run.
    m = tl.zeros((), dtype=tl.float32) - float("inf")  # running max of z
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)  # per lane: running sum of exp(z - m)
    zs = tl.zeros((BLOCK_V,), dtype=tl.float32)  # per lane: running sum of exp(z - m) * z  (for the entropy)
    lanes = tl.arange(0, BLOCK_V)
    z_next = tl.load(logits_row + lanes, mask=lanes < V, other=float("-inf"))  # first block, in the logits' dtype
    for start in range(0, V, BLOCK_V):
        z = z_next.to(tl.float32) * inv_temperature
        cols = start + BLOCK_V + lanes  # the next block (past V: fully masked, reads nothing)
        z_next = tl.load(logits_row + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep exp() away from inf - inf
        scale = tl.exp(m - m_ref)  # one number: how much the old sums shrink
        e = tl.exp(z - m_ref)  # 0 where masked
        s = s * scale + e
        if COMPUTE_ENTROPY:
            zs = zs * scale + e * tl.where(e > 0.0, z, 0.0)  # masked: 0 * 0, not 0 * -inf
        m = m_new

    s_total = tl.sum(s, axis=0)
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s_total)
    # An id outside [0, V) is not read (no out-of-bounds access); its log-prob is NaN. The host-side check in
    # `_validate` would need a device sync on a GPU, so it runs for CPU tensors only.
    idx = tl.load(index_ptr + b * stride_ib + t * stride_it).to(tl.int64)
    idx_ok = (idx >= 0) & (idx < V)
    z_idx = tl.load(logits_row + idx, mask=idx_ok, other=float("nan")).to(tl.float32) * inv_temperature
    tl.store(logprobs_ptr + row, z_idx - lse)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(zs, axis=0) / s_total)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, index_ptr, lse_ptr, entropy_ptr,  # saved by the forward
    dlogprobs_ptr, dentropy_ptr,  # incoming gradients, (B * T,) fp32
    dlogits_ptr,  # output (B, T, V) in the logits' dtype; may be logits_ptr itself (inplace_backward)
    T, V, stride_lb, stride_lt, stride_ib, stride_it, stride_db, stride_dt,
    inv_temperature,
    HAS_DENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    dlogits_row = dlogits_ptr + b * stride_db + t * stride_dt

    lse = tl.load(lse_ptr + row)
    idx = tl.load(index_ptr + b * stride_ib + t * stride_it).to(tl.int64)
    g = tl.load(dlogprobs_ptr + row)
    g = tl.where((idx >= 0) & (idx < V), g, float("nan"))  # an id outside [0, V): a NaN gradient, as its log-prob
    if HAS_DENTROPY:
        g_entropy = tl.load(dentropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        z = tl.load(logits_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        logp = z - lse
        p = tl.exp(logp)
        dz = tl.where(cols == idx, g, 0.0) - g * p
        if HAS_DENTROPY:
            dz -= g_entropy * tl.where(p > 0.0, p * (logp + entropy), 0.0)
        tl.store(dlogits_row + cols, (dz * inv_temperature).to(dlogits_ptr.dtype.element_ty), mask=valid)


# GPU candidates, autotuned per V (the first is the default when tuning is off); the interpreter takes big blocks.
# The forward keeps per-lane sums and a prefetched block in registers: 16 logits per thread (larger blocks spill).
_FWD_CONFIGS = [config(BLOCK_V=8192, num_warps=16), config(BLOCK_V=2048, num_warps=4),
                config(BLOCK_V=4096, num_warps=8), config(BLOCK_V=4096, num_warps=16),
                config(BLOCK_V=1024, num_warps=2)]
_CONFIGS = [config(BLOCK_V=8192, num_warps=16), config(BLOCK_V=2048, num_warps=4), config(BLOCK_V=4096, num_warps=8),
            config(BLOCK_V=8192, num_warps=8), config(BLOCK_V=16384, num_warps=16), config(BLOCK_V=32768, num_warps=32)]
_fwd = tuned(_logprobs_fwd_kernel, key=["V"], configs=_FWD_CONFIGS, interpreter=config(BLOCK_V=16384))
_bwd = tuned(_logprobs_bwd_kernel, key=["V"], configs=_CONFIGS, interpreter=config(BLOCK_V=16384))
# The tuner would run an in-place backward several times over its own output, so in place uses one fixed config.
_bwd_inplace = tuned(_logprobs_bwd_kernel, key=["V"], configs=[config(BLOCK_V=8192, num_warps=16)],
                     interpreter=config(BLOCK_V=16384))


def _as_3d(logits: torch.Tensor, index: torch.Tensor):
    """(..., V) / (...) -> (B, T, V) / (B, T) views keeping the strides (PPO slices logits; don't copy them)."""
    if logits.dim() == 1:
        logits, index = logits[None, None], index.reshape(1, 1)
    elif logits.dim() == 2:
        logits, index = logits[None], index[None]
    elif logits.dim() > 3:
        logits, index = logits.reshape(-1, *logits.shape[-2:]), index.reshape(-1, index.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, index


class LogprobsEntropyFunction(torch.autograd.Function):
    """logits (..., V), index (...) -> logprobs (...) fp32, entropy (...) fp32. Saves logits, index, lse, entropy."""

    @staticmethod
    def forward(ctx, logits, index, temperature: float, compute_entropy: bool, inplace_backward: bool):
        out_shape = index.shape
        logits3, index3 = _as_3d(logits, index)  # (B, T, V), (B, T)
        if inplace_backward and logits3.data_ptr() != logits.data_ptr():
            raise ValueError("inplace_backward=True needs logits whose (B, T, V) view is not a copy: unit stride "
                             "along V, and leading dims that merge without a copy")
        B, T, V = logits3.shape
        rows = B * T
        logprobs, lse = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
        entropy = torch.empty_like(lse) if compute_entropy else lse  # (unused pointer when not computed)
        if rows > 0:
            _fwd[(rows,)](logits3, index3, logprobs, entropy, lse, T, V, *logits3.stride()[:2], *index3.stride(),
                          1.0 / temperature, COMPUTE_ENTROPY=compute_entropy)
        ctx.save_for_backward(logits, index, lse, entropy)
        ctx.temperature, ctx.inplace_backward = temperature, inplace_backward
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            return logprobs.view(out_shape), None
        return logprobs.view(out_shape), entropy.view(out_shape)

    @staticmethod
    def backward(ctx, dlogprobs, dentropy):
        logits, index, lse, entropy = ctx.saved_tensors
        logits3, index3 = _as_3d(logits, index)
        B, T, V = logits3.shape
        if dlogprobs is None:
            dlogprobs = torch.zeros_like(lse)
        dlogprobs = dlogprobs.reshape(-1).to(torch.float32).contiguous()
        has_dentropy = dentropy is not None
        dentropy = dentropy.reshape(-1).to(torch.float32).contiguous() if has_dentropy else dlogprobs
        if ctx.inplace_backward:
            dlogits3, launcher = logits3, _bwd_inplace
        else:
            dlogits3, launcher = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device), _bwd
        if B * T > 0:
            launcher[(B * T,)](logits3, index3, lse, entropy, dlogprobs, dentropy, dlogits3, T, V,
                               *logits3.stride()[:2], *index3.stride(), *dlogits3.stride()[:2],
                               1.0 / ctx.temperature, HAS_DENTROPY=has_dentropy)
        if ctx.inplace_backward:
            torch.autograd.graph.increment_version(logits)  # the logits now hold their gradient
            return logits.detach(), None, None, None, None
        return dlogits3.view(logits.shape), None, None, None, None


def _validate(op: str, logits, index, temperature):
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: index must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary dim), "
                         f"got {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: index must be int64 or int32 token ids, got {index.dtype}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    check_same_device(op, logits=logits, index=index)
    V = logits.shape[-1]
    # On a GPU this check would wait for the device (a host sync per call, and impossible inside a CUDA graph),
    # so it runs on CPU tensors only; on a GPU the kernels never read a bad id and give it a NaN log-prob.
    if not index.is_cuda and index.numel() and bool(((index < 0) | (index >= V)).any()):
        raise ValueError(f"{op}: token ids must lie in [0, {V}); got min {int(index.min())}, max {int(index.max())}")


def selective_log_softmax(logits, index, temperature: float = 1.0, impl: str = "auto", inplace_backward: bool = False):
    """log_softmax(logits / temperature)[..., index]: logits (..., V), index (...) -> logprobs (...) fp32.

    Same result as `torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])[..., 0]`
    (TRL's `selective_log_softmax` spec), with gradients for the logits, on the Triton path without any (..., V)
    fp32 temporary. impl: "triton", "torch" (the reference, which does materialize it) or "auto".
    """
    return _logprobs("selective_log_softmax", logits, index, temperature, impl, inplace_backward, entropy=False)[0]


def logprobs_and_entropy(logits, index, temperature: float = 1.0, impl: str = "auto", inplace_backward: bool = False):
    """(logprobs, entropy) of softmax(logits / temperature): logits (..., V), index (...) -> two (...) fp32 tensors.

    Both are differentiable (the entropy gradient is -p * (log p + H) per logit, for an entropy bonus).
    `inplace_backward=True` writes the logits' gradient into the logits themselves (see the module docstring).
    """
    return _logprobs("logprobs_and_entropy", logits, index, temperature, impl, inplace_backward, entropy=True)


def _logprobs(op, logits, index, temperature, impl, inplace_backward, entropy: bool):
    _validate(op, logits, index, temperature)
    if use_triton(impl, logits, index, op=op):
        return LogprobsEntropyFunction.apply(logits, index, float(temperature), entropy, inplace_backward)
    if entropy:
        return logprobs_and_entropy_torch(logits, index, temperature)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, index.unsqueeze(-1)).squeeze(-1), None
