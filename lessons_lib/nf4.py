"""4-bit NormalFloat (NF4) quantization with double quantization, from scratch in plain torch (lesson 01).

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores a frozen weight matrix in 4 bits per value:

1. **Code values from normal quantiles.** Trained weights are roughly normal, so the 16 representable values
   are quantiles of N(0, 1) scaled to [-1, 1]: each bin then holds about the same share of the weights.
2. **Blockwise absmax.** The flat weight is cut into blocks of `blocksize` (64) values; each block is divided by
   its largest |value| (its *absmax*), so every block spans [-1, 1] and one outlier only hurts its own block.
3. **Nearest code, two per byte.** Each scaled value becomes the index (0..15) of the nearest code value;
   two indices share one byte, the first in the high nibble.
4. **Double quantization.** One fp32 absmax per 64 weights costs 0.5 bit per weight. Subtract their mean, then
   quantize them to 8 bits with a 256-value "dynamic" code in blocks of 256 (one fp32 scale per 256 absmax):
   0.5 bit becomes 8/64 + 32/(64*256) ≈ 0.127 bit per weight.

Everything here matches `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=...)` and
`dequantize_4bit` byte for byte on CPU (tests/test_nf4.py checks it on fresh random tensors). Where bitsandbytes
has a quirk that changes bytes, the code below reproduces it and says so.

`NF4State` is the format `lessons_lib.kernels.nf4_dequantize` reads; `NF4State.from_bnb(weight.quant_state)` turns
the state of a `bitsandbytes.nn.Linear4bit` weight into it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 quantized absmax values
NF4_OFFSET = 0.9677083  # = 1 - (1/32 + 1/30) / 2, rounded as in QLoRA: the outermost quantile used


# ------------------------------------------------------------------------------------------ the two codes


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, sorted, in [-1, 1]: quantiles of N(0, 1) normalised by the largest. Shape (16,), fp32.

    8 positive quantiles (probabilities evenly spaced from 0.5 to NF4_OFFSET, 0.5 itself dropped), 7 negative
    ones, and an exact 0 so that zero weights (padding, pruned weights) stay exactly zero. The extra positive
    value is why NF4 is asymmetric: 1.0 is representable, -1.0 too, but the grid is finer on the positive side.
    """
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # (8,) norm.ppf, descending
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # (7,)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()  # (16,) in [-1, 1]; normalised in fp32, as bitsandbytes built its table


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit "dynamic" code bitsandbytes uses for the absmax values. Shape (256,), sorted, fp32.

    Like a tiny float: for exponent e = 0..6 there are 2**e evenly spaced fractions (bin centres of
    linspace(0.1, 1)), scaled by 10**(e-6), with both signs; plus 0 and 1. Large magnitudes get many values,
    tiny ones few (Dettmers, "8-bit approximations for parallelism", https://arxiv.org/abs/1511.04561).
    """
    non_sign_bits = total_bits - 1
    values = []
    for e in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** (e + non_sign_bits - max_exponent_bits) + 1)  # fp32, as bitsandbytes
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - (max_exponent_bits - 1))
        values += (scale * centres).tolist() + (-scale * centres).tolist()  # products rounded to fp32, as bnb
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))  # none here: 2*(1+2+...+64) + 2 = 256
    return torch.tensor(sorted(values), dtype=torch.float32)


# ------------------------------------------------------------------------------------------ the state


@dataclass
class NF4State:
    """Everything needed to turn packed NF4 bytes back into a tensor.

    Without double quantization the per-block scales are `absmax` (fp32). With it, they are stored as
    `absmax_q` (uint8 indices into `absmax_code`), and block b's scale is

        absmax[b] = absmax_code[absmax_q[b]] * absmax_scale[b // ABSMAX_BLOCKSIZE] + absmax_offset

    and weight element i (flat, row-major) is  `code[nibble(i)] * absmax[i // blocksize]`, computed in fp32 and
    then cast to `dtype`. Nibble i is the high nibble of packed byte i // 2 when i is even, the low one when odd.
    """

    shape: torch.Size
    """Shape of the original tensor."""
    dtype: torch.dtype
    """dtype of the original tensor, and of the dequantized one."""
    blocksize: int
    """Number of consecutive (flat) values sharing one absmax."""
    code: torch.Tensor
    """(16,) fp32: the NF4 values, indexed by the 4-bit codes."""
    absmax: torch.Tensor | None = None
    """(n_blocks,) fp32 per-block scales; None when double quantized."""
    absmax_q: torch.Tensor | None = None
    """(n_blocks,) uint8: the double-quantized scales (indices into absmax_code)."""
    absmax_scale: torch.Tensor | None = None
    """(ceil(n_blocks / 256),) fp32: the absmax of each block of 256 (absmax - offset) values."""
    absmax_offset: torch.Tensor | None = None
    """() fp32: the mean of the absmax values, subtracted before the 8-bit quantization."""
    absmax_code: torch.Tensor | None = None
    """(256,) fp32: the dynamic code of the 8-bit absmax values."""
    absmax_blocksize: int = ABSMAX_BLOCKSIZE
    """Number of absmax values sharing one absmax_scale."""

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def n_blocks(self) -> int:
        return -(-self.shape.numel() // self.blocksize)

    def scales(self) -> torch.Tensor:
        """The fp32 per-block scales, (n_blocks,): `absmax`, or its double-quantized form decoded."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax_q, self.absmax_scale, self.absmax_code,
                                         self.absmax_blocksize) + self.absmax_offset

    def to(self, device) -> "NF4State":
        """A copy with every tensor on `device`."""
        moved = {k: getattr(self, k).to(device) for k in ("code", "absmax", "absmax_q", "absmax_scale",
                                                           "absmax_offset", "absmax_code")
                 if getattr(self, k) is not None}
        return replace(self, **moved)

    # bitsandbytes interop: its QuantState keeps the same numbers under other names.
    @classmethod
    def from_bnb(cls, quant_state) -> "NF4State":
        """From a `bitsandbytes.functional.QuantState` (e.g. `linear4bit.weight.quant_state`)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"NF4State.from_bnb: quant_type is {quant_state.quant_type!r}, expected 'nf4'")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("NF4State.from_bnb: this weight was repacked for bitsandbytes' AVX512-BF16 CPU "
                             "inference path; load it with lessons_lib.load_model (which disables the repack)")
        common = dict(shape=torch.Size(quant_state.shape), dtype=quant_state.dtype, blocksize=quant_state.blocksize,
                      code=quant_state.code.float())
        if not quant_state.nested:
            return cls(absmax=quant_state.absmax, **common)
        s2 = quant_state.state2
        return cls(absmax_q=quant_state.absmax, absmax_scale=s2.absmax, absmax_offset=quant_state.offset,
                   absmax_code=s2.code, absmax_blocksize=s2.blocksize, **common)

    def to_bnb(self):
        """To a `bitsandbytes.functional.QuantState` (for `bitsandbytes.functional.dequantize_4bit`)."""
        from bitsandbytes.functional import QuantState

        common = dict(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, code=self.code, quant_type="nf4")
        if not self.double_quant:
            return QuantState(absmax=self.absmax, **common)
        state2 = QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=self.absmax_blocksize,
                            dtype=torch.float32)
        return QuantState(absmax=self.absmax_q, offset=self.absmax_offset, state2=state2, **common)


# ------------------------------------------------------------------------------------------ 4-bit NF4


def _scale_to_unit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling of a flat fp32 tensor: returns (scaled in [-1, 1], absmax per block).

    bitsandbytes multiplies full blocks by 1/absmax but divides the last, partial block by its absmax (clamped
    to 1e-38, and stored clamped); the two can differ in the last bit, so we do exactly the same.
    """
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Quantize `w` (fp32, bf16 or fp16, any shape) to NF4. Returns (packed, state).

    packed: uint8, shape (ceil(numel / 2), 1), two 4-bit codes per byte (the layout of bitsandbytes' Params4bit).
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_nf4: w must be fp32, bf16 or fp16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4: w is empty")
    code = nf4_code().to(w.device)

    # 1. blockwise absmax scaling, in fp32
    scaled, absmax = _scale_to_unit(w.reshape(-1).float(), blocksize)  # (n,), (n_blocks,)

    # 2. nearest code value. The code is sorted, so "nearest" means "which midpoint interval": the index is the
    #    number of midpoints strictly below the value (a value exactly on a midpoint takes the lower code).
    midpoints = (code[:-1] + code[1:]) / 2  # (15,)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # an odd count: pad with 0, whose code is 7
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (n_even,) codes 0..15

    # 3. two codes per byte, the first in the high nibble
    packed = (q[0::2] << 4 | q[1::2]).unsqueeze(1)  # (n_even // 2, 1)

    state = NF4State(shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code)
    if not double_quant:
        state.absmax = absmax
        return packed, state

    # 4. double quantization of the absmax values
    offset = absmax.mean()  # () fp32
    state.absmax_q, state.absmax_scale = quantize_blockwise_8bit(absmax - offset, dynamic_code().to(w.device),
                                                                 ABSMAX_BLOCKSIZE)
    state.absmax_offset, state.absmax_code = offset, dynamic_code().to(w.device)
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """Inverse of `quantize_nf4`: a tensor of `state.shape` and `state.dtype`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize_nf4: packed must be uint8, got {packed.dtype}")
    n = state.shape.numel()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: packed has {packed.numel()} bytes, state.shape {tuple(state.shape)} "
                         f"needs {(n + 1) // 2}")
    packed = packed.reshape(-1)
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]  # (n,) codes, high nibble first
    scales = state.scales().to(packed.device)  # (n_blocks,) fp32
    values = state.code.to(packed.device)[q.long()] * scales.repeat_interleave(state.blocksize)[:n]  # (n,) fp32
    return values.to(state.dtype).reshape(state.shape)


# ------------------------------------------------------------------------------------------ 8-bit absmax


def _bnb_cpu_lookup(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted 256-value `code`, the way bitsandbytes' CPU kernel finds it.

    For speed it first rounds the value to one of 65,536 evenly spaced points in [-1, 1] and then looks up the
    code index for that point; it is not always the true nearest (about 1 value in 1,000 lands one code away).
    We reproduce it to match bytes (bitsandbytes csrc/cpu_ops.cpp, build_quantize_lut and norm_to_lut_index).
    """
    lut_size = 65536
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(lut_size, dtype=torch.float32, device=code.device)) / (lut_size - 1)
    lut = torch.bucketize(grid, midpoints)  # (65536,) code index of each grid point
    point = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (lut_size - 1) + 0.5).long()  # truncation, as the uint16 cast
    return lut[point].to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat fp32 tensor: (uint8 indices into `code`, fp32 absmax per block)."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # zeros: no effect
    absmax = padded.abs().amax(dim=1)  # (n_blocks,)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # an all-zero block is not divided by 0
    q = _bnb_cpu_lookup(padded * (1.0 / safe)[:, None], code)  # (n_blocks, blocksize)
    q[absmax == 0] = 0  # an all-zero block: bitsandbytes writes index 0 (and absmax 0 decodes it to 0)
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: code[q] * absmax of its block, fp32."""
    return code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]
