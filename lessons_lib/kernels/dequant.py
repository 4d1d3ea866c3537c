"""NF4 dequantization in one Triton kernel, equal (bit for bit) to `lessons_lib.nf4.dequantize_nf4`. Lessons 01, 07.

The format is `lessons_lib.nf4.NF4State` (lesson 01 builds it from scratch): two 4-bit codes per byte, high nibble
first; per block of `blocksize` values one scale, itself 8-bit quantized when double quantization is on:

    scale[b] = absmax_code[absmax_q[b]] * absmax_scale[b // 256] + absmax_offset      (or absmax[b])
    w[i]     = code[nibble(i)] * scale[i // blocksize]                              (fp32, then cast to dtype)

Each program handles a tile of whole quantization blocks, one per row: (BLOCKS, blocksize / 2) packed bytes. A row
loads its scale once; every byte gives its two values (high nibble first), and the tile is written interleaved.
The 16-entry code and the 256-entry absmax code are gathered through pointers (they stay in cache). Reads 1/2
byte per weight, writes 2 (bf16): write-bound.

Bit-exactness needs two details: the GPU must not fuse `a * b + c` into one fma (the reference rounds twice;
we launch with enable_fp_fusion=False), and the interpreter's fp32 -> bf16 cast truncates where torch and GPUs
round to nearest even, so in the interpreter the kernel rounds by hand first (`_round_fp32_to_bf16`).
"""

from __future__ import annotations

import torch

from ..nf4 import NF4State, dequantize_nf4
from ._common import INTERPRETED, cdiv, check_same_device, config, tl, triton, tuned, use_triton


@triton.jit
def _round_fp32_to_bf16(x):
    """x rounded to the nearest bf16 value (ties to even), still as fp32: its low 16 bits become zero."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.heuristics({"BLOCKS": lambda args: max(1, args["BYTES"] // args["BYTES_PER_BLOCK"])})
@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,  # (n_bytes,) uint8, two codes per byte
    out_ptr,  # (n,) in the original dtype
    code_ptr,  # (16,) fp32 NF4 values
    absmax_ptr,  # (n_blocks,) fp32 scales, or uint8 indices into absmax_code when DOUBLE_QUANT
    absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,  # (256,) fp32, (n_blocks / 256,) fp32, () fp32
    n, n_bytes,
    absmax_blocksize,  # scales per absmax_scale (256)
    BYTES_PER_BLOCK: tl.constexpr,  # blocksize // 2: the packed bytes of one quantization block
    DOUBLE_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter only: round to bf16 by hand (its cast truncates)
    BYTES: tl.constexpr,  # packed bytes per program (a tuning knob) ...
    BLOCKS: tl.constexpr,  # ... as whole quantization blocks: the rows of this program's tile
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) quantization blocks
    byte = block[:, None] * BYTES_PER_BLOCK + tl.arange(0, BYTES_PER_BLOCK)[None, :]  # (BLOCKS, BYTES_PER_BLOCK)
    block_ok = block * BYTES_PER_BLOCK < n_bytes
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    if DOUBLE_QUANT:  # one scale per row of the tile
        q = tl.load(absmax_ptr + block, mask=block_ok, other=0).to(tl.int32)
        scale = tl.load(absmax_code_ptr + q) * tl.load(absmax_scale_ptr + block // absmax_blocksize, mask=block_ok)
        scale = scale + tl.load(absmax_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)

    hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]  # value 2 * byte
    lo = tl.load(code_ptr + (packed & 0x0F).to(tl.int32)) * scale[:, None]  # value 2 * byte + 1
    values = tl.reshape(tl.join(hi, lo), (BLOCKS, 2 * BYTES_PER_BLOCK))  # interleave: hi0, lo0, hi1, lo1, ...
    if ROUND_BF16:
        values = _round_fp32_to_bf16(values)

    i = block[:, None] * (2 * BYTES_PER_BLOCK) + tl.arange(0, 2 * BYTES_PER_BLOCK)[None, :]
    tl.store(out_ptr + i, values.to(out_ptr.dtype.element_ty), mask=i < n)


# GPU candidates (packed bytes per program), tuned per matrix size: a model has a handful of them, and a small
# matrix (1536 x 1536: 1.2 MB packed) wants smaller tiles, i.e. more programs, than the embedding (117 MB).
# The interpreter takes one big tile.
_dequantize = tuned(_nf4_dequantize_kernel, key=["n", "BYTES_PER_BLOCK"], interpreter=config(BYTES=8192), configs=[
    config(BYTES=1024, num_warps=4), config(BYTES=512, num_warps=4), config(BYTES=256, num_warps=2),
    config(BYTES=2048, num_warps=8), config(BYTES=4096, num_warps=8)])


def nf4_dequantize(packed: torch.Tensor, state, impl: str = "auto") -> torch.Tensor:
    """Dequantize NF4 `packed` (uint8, ceil(numel / 2) bytes) with `state` -> tensor of state.shape and state.dtype.

    `state` is a `lessons_lib.nf4.NF4State`, or a bitsandbytes `QuantState` (e.g. `linear4bit.weight.quant_state`).
    impl: "triton", "torch" (`lessons_lib.nf4.dequantize_nf4`) or "auto". The result equals the reference exactly.
    """
    if not isinstance(state, NF4State):
        state = NF4State.from_bnb(state)
    if packed.dtype != torch.uint8:
        raise TypeError(f"nf4_dequantize: packed must be uint8, got {packed.dtype}")
    n = state.shape.numel()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"nf4_dequantize: packed has {packed.numel()} bytes; state.shape {tuple(state.shape)} "
                         f"needs {(n + 1) // 2}")
    if state.blocksize < 2 or state.blocksize & (state.blocksize - 1):
        raise ValueError(f"nf4_dequantize: blocksize must be a power of 2, got {state.blocksize}")
    scales = state.absmax_q if state.double_quant else state.absmax
    check_same_device("nf4_dequantize", packed=packed, code=state.code, absmax=scales)
    if not use_triton(impl, packed, op="nf4_dequantize"):
        return dequantize_nf4(packed, state)

    packed = packed.reshape(-1).contiguous()
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    if n == 0:
        return out
    code = state.code.float().contiguous()
    if state.double_quant:
        extra = (state.absmax_code.float().contiguous(), state.absmax_scale.float().contiguous(),
                 state.absmax_offset.float().reshape(1))
    else:
        extra = (code, code, code)  # unused pointers
    gpu_only = {} if INTERPRETED else {"enable_fp_fusion": False}  # no fma: round like the reference
    grid = lambda meta: (cdiv(state.n_blocks, meta["BLOCKS"]),)  # noqa: E731
    _dequantize[grid](packed, out, code, scales.contiguous(), *extra, n, packed.numel(), state.absmax_blocksize,
                      BYTES_PER_BLOCK=state.blocksize // 2, DOUBLE_QUANT=state.double_quant,
                      ROUND_BF16=INTERPRETED and state.dtype == torch.bfloat16, **gpu_only)
    return out
