"""
NF4 dequantization in one kernel
================================

Run it:  python kernels/nf4_dequantize.py [--quick]
- on a GPU: checks the kernel (bit-exact), benchmarks it against the torch reference (eager and torch.compile)
  and bitsandbytes' CUDA kernel, and writes kernels/results/nf4_dequantize.md (+ .json);
- on a CPU: checks the kernel in the Triton interpreter and says why it skips the timing.

The kernel lives in lessons_lib/kernels/dequant.py (`--source` prints it); the format is lesson 01's
lessons_lib/nf4.py.

1. Motivation
-------------
A QLoRA model keeps its frozen weights in 4 bits and turns each back into bf16 right before its matmul, in every
forward and every backward: for Qwen2-1.5B about 1.3 billion weights per pass. Dequantization reads half a byte
per weight and writes two: it is bound by the writes.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before lessons_lib.kernels defines its kernels
try:
    import lessons_lib  # noqa: F401
except ModuleNotFoundError:  # a checkout where lessons_lib is not installed: use the checkout's copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lessons_lib.kernels import bench, nf4_dequantize  # noqa: E402
from lessons_lib.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

KERNEL = "nf4_dequantize"

# 2. The naive version, and what it moves
# ---------------------------------------
# lessons_lib.nf4.dequantize_nf4 in eager PyTorch, per weight (n weights, blocksize 64, double quantization):
#     split nibbles: packed >> 4, packed & 15, stack, reshape        read 0.5 + 0.5 + 2, write 0.5 + 0.5 + 1 (uint8)
#     q.long()                                                       read 1, write 8
#     code[q]                                                        read 8, write 4
#     scales: absmax_code[absmax_q] * absmax_scale + offset          per block: small
#     scales.repeat_interleave(64)                                   write 4
#     code[q] * scales                                               read 8, write 4
#     .to(bfloat16)                                                  read 4, write 2
# about 50 bytes per weight, against 2.5 minimal (read 0.5, write 2) plus the scales (1/64 byte per weight).
#
# 3. The kernel (lessons_lib/kernels/dequant.py)
# ----------------------------------------------
# Each program takes a tile of whole quantization blocks, one per row: (BLOCKS, blocksize / 2) packed bytes. Each
# row decodes its scale once (its 8-bit index, the 256-entry dynamic code, the scale of its group of 256 blocks,
# the offset); every byte splits into its two codes, both are looked up in the 16-entry NF4 table and multiplied
# by the scale, and the row's values are written interleaved, high nibble first (tl.join).
# Bit-exact: the same fp32 multiplies and adds in the same order, no fused multiply-add, round to nearest even.
# There is no backward: the weights are frozen (LoRA trains the adapters beside them).

def minimal_bytes(n, blocksize=64, e=2):
    return n // 2 + n // blocksize + 4 * (n // blocksize // 256) + n * e


FORMULA = "n/2 (packed) + n/64 (8-bit scales) + 4 n/16384 (their scales) + n e (output), e = 2 for bf16"


# 4. Check: bit-exact on odd shapes
# ---------------------------------
def check(device, quick=False):
    """Check the kernel on odd shapes (quick: the first shape only); raises AssertionError if it is wrong."""
    print(f"check on {device} ({'Triton interpreter' if device == 'cpu' else 'compiled Triton'}): "
          "equal to lessons_lib.nf4.dequantize_nf4, bit for bit")
    for shape, blocksize in [((37, 1001), 64), ((5, 123, 123), 128), ((3,), 32)][:1 if quick else None]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for double_quant in (False, True):
                w = (0.02 * torch.randn(shape, device=device)).to(dtype)
                packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
                out, ref = nf4_dequantize(packed, state, impl="triton"), dequantize_nf4(packed, state)
                if not torch.equal(out, ref):
                    raise AssertionError(f"nf4_dequantize {shape} {dtype} double_quant={double_quant}: differs from "
                                         f"the reference (max diff {(out.float() - ref.float()).abs().max():.3g})")
            print(f"  {str(shape):<16} blocksize {blocksize:<4} {str(dtype):<15} plain and double-quant: exact")


# 5. Benchmark (GPU)
# ------------------
def benchmark(copy_gbps, quick=False):
    rows = []
    compiled = bench.compiled(dequantize_nf4)
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as err:  # noqa: BLE001 - optional baseline
        print(f"  bitsandbytes not available ({err}); its rows are skipped")
        bnb_f = None
    shapes = [(8960, 1536)] if quick else [(1536, 1536), (8960, 1536), (151936, 1536)]
    for shape in shapes:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
        del w
        name = f"{shape[0]} x {shape[1]} bf16"
        nbytes = minimal_bytes(state.shape.numel())
        providers = {"eager": lambda: dequantize_nf4(packed, state), "ours": lambda: nf4_dequantize(packed, state)}
        if compiled is not None:
            providers["compile"] = lambda: compiled(packed, state)
        if bnb_f is not None:
            quant_state = state.to_bnb()
            providers["bitsandbytes"] = lambda: bnb_f.dequantize_4bit(packed, quant_state)
        for provider, fn in providers.items():
            bench.measure(rows, KERNEL, name, provider, "fwd", nbytes, fn)
    return rows


def main():
    bench.script_main(__doc__, KERNEL, "lessons_lib.kernels.dequant", check, benchmark, FORMULA)


if __name__ == "__main__":
    main()
