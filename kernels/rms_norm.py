"""
RMSNorm, fused forward and backward
===================================

Run it:  python kernels/rms_norm.py [--quick]
- on a GPU: checks the kernel, benchmarks it against eager PyTorch, torch.compile and Liger-Kernel, and writes
  kernels/results/rms_norm.md (+ .json);
- on a CPU: checks the kernel in the Triton interpreter and says why it skips the timing.

The kernel itself lives in lessons_lib/kernels/rms_norm.py (`--source` prints it); this script is its walkthrough.

1. Motivation
-------------
Every Qwen2/Llama layer normalizes its input twice, and the model once more at the end: 57 RMSNorms in
Qwen2-1.5B, each over (B*T, 1536) activations. There is almost no arithmetic in it (a square, a mean, a rsqrt,
two multiplies per element), so its speed is set by how many bytes cross the memory bus.
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

from lessons_lib.kernels import bench, rms_norm, rms_norm_torch  # noqa: E402
from lessons_lib.kernels.checking import check_against_reference  # noqa: E402

KERNEL = "rms_norm"

# 2. The naive version, and what it moves
# ---------------------------------------
# transformers' Qwen2RMSNorm (= lessons_lib.kernels.rms_norm_torch) runs one kernel per line, and each one reads its
# input from memory and writes its output back. Per element of a bf16 x (e = 2 bytes; fp32 temporaries 4 bytes):

EAGER_FORWARD_OPS = [  # (op, bytes read per element, bytes written per element)
    ("x.to(float32)", 2, 4),
    ("x.pow(2)", 4, 4),
    ("mean(-1)", 4, 0),  # writes one number per row
    ("x * rsqrt(var + eps)", 4, 4),
    (".to(bfloat16)", 4, 2),
    ("weight * x", 2, 2),
]


def eager_forward_bytes(M, N):
    return M * N * sum(r + w for _, r, w in EAGER_FORWARD_OPS)


# A fused forward reads x once and writes y once: 4 bytes per element instead of the 36 above. The backward is
# worse in eager mode (autograd replays each op's backward and keeps the fp32 temporaries alive for it).
#
# 3. The kernel (lessons_lib/kernels/rms_norm.py)
# -----------------------------------------------
# Forward: a program takes BLOCK_M whole rows, loads them once (converting to fp32 right after the load),
# computes rstd = 1/sqrt(mean(x^2) + eps) per row, rounds x * rstd to x's dtype (transformers does), multiplies by
# the weight and stores y. It also stores rstd (4 bytes per row) for the backward.
#
# 4. The backward, derived before it is coded
# -------------------------------------------
# With n = x * rstd and y = w * n, for one row of N elements:
#     dn_j = dy_j * w_j
#     dx_j = sum_k dn_k * d n_k / d x_j = rstd * dn_j - rstd^3 * x_j * (sum_k dn_k * x_k) / N
#          = rstd * (dn_j - n_j * mean(dn * n))
#     dw_j = sum over rows of dy_j * n_j
# dx needs only this row: one pass. dw sums over all rows: each program walks rows pid, pid + G, ... (a
# grid-stride loop), keeps its partial dw in registers and writes one row of a (G, N) fp32 buffer; torch sums the G
# rows at the end. No atomics, deterministic.
#
# Bytes, fwd + bwd, minimal (M rows of N, e bytes per element):
#     forward  read x, write y               2 M N e
#     backward read dy and x, write dx      3 M N e     (+ rstd, w, dw: O(M + N))

def minimal_bytes(M, N, e=2):
    return 5 * M * N * e


FORMULA = "fwd+bwd = 5 * M * N * e (fwd: read x, write y; bwd: read dy, x, write dx), e = 2 for bf16; fwd = 2 M N e"


# 5. Check: odd shapes, three dtypes, every gradient
# --------------------------------------------------
def check(device, quick=False):
    """Check the kernel on odd shapes (quick: the first shape only); raises AssertionError if it is wrong."""
    print(f"check on {device} ({'Triton interpreter' if device == 'cpu' else 'compiled Triton'}): "
          "max |error| against the float64 truth, kernel vs eager PyTorch in the same dtype")
    for shape in [(3, 37, 133), (5, 123, 123), (2, 1536)][:1 if quick else None]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(shape, device=device).to(dtype).requires_grad_()
            w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
            report = check_against_reference(KERNEL, rms_norm, [x, w], [torch.randn_like(x)], dtype, eps=1e-6)
            errors = "  ".join(f"{what}: {err:.1e} (eager {ref:.1e})" for what, err, ref in report)
            print(f"  {str(shape):<14} {str(dtype):<15} ok   {errors}")


# 6. Benchmark (GPU)
# ------------------
def benchmark(copy_gbps, quick=False):
    rows = []
    liger = bench.liger()
    compiled = bench.compiled(rms_norm_torch)
    for M in ([4096] if quick else [4096, 32768]):
        N, eps = 1536, 1e-6
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        shape = f"{M} x {N}"
        providers = {"eager": lambda: rms_norm_torch(x, w, eps), "ours": lambda: rms_norm(x, w, eps)}
        if compiled is not None:
            providers["compile"] = lambda: compiled(x, w, eps)
        if liger is not None:
            providers["liger"] = lambda: liger.liger_rms_norm(x, w, eps)
        for name, fn in providers.items():
            bench.measure(rows, KERNEL, shape, name, "fwd", 2 * M * N * 2, lambda fn=fn: fn())
            bench.measure(rows, KERNEL, shape, name, "fwd+bwd", minimal_bytes(M, N),
                          lambda fn=fn: fn().backward(dy), grad_to_none=[x, w])
        print(f"  eager forward moves ~{eager_forward_bytes(M, N) / 2**20:.0f} MiB "
              f"vs {2 * M * N * 2 / 2**20:.0f} MiB minimal")
    return rows


def main():
    bench.script_main(__doc__, KERNEL, "lessons_lib.kernels.rms_norm", check, benchmark, FORMULA)


if __name__ == "__main__":
    main()
