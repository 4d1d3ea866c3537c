"""
SwiGLU, fused forward and backward
==================================

Run it:  python kernels/swiglu.py [--quick]
- on a GPU: checks the kernel, benchmarks it against eager PyTorch, torch.compile and Liger-Kernel, and writes
  kernels/results/swiglu.md (+ .json);
- on a CPU: checks the kernel in the Triton interpreter and says why it skips the timing.

The kernel lives in lessons_lib/kernels/swiglu.py (`--source` prints it); this script is its walkthrough.

1. Motivation
-------------
The MLP of every Qwen2/Llama layer is down_proj(silu(gate_proj(x)) * up_proj(x)). Between the matmuls sit two
elementwise ops over (B*T, 8960) activations in Qwen2-1.5B: the largest activations of the model, so the largest
memory traffic outside the matmuls (and the logits).
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

from lessons_lib.kernels import bench, swiglu, swiglu_torch  # noqa: E402
from lessons_lib.kernels.checking import check_against_reference  # noqa: E402

KERNEL = "swiglu"

# 2. The naive version, and what it moves
# ---------------------------------------
# eager: a = silu(gate) reads gate, writes a; y = a * up reads a and up, writes y: 5 e bytes per element instead
# of 3 (read gate and up, write y). Its backward (autograd saves a, gate and up):
#     d up = dy * a                          read dy, a; write d up
#     d a = dy * up                          read dy, up; write d a
#     d gate = silu_backward(d a, gate)      read d a, gate; write d gate
# 9 e bytes per element instead of 5 (read dy, gate, up; write d gate, d up), and `a` stays allocated from the
# forward to the backward: (B*T, 8960) more activations to keep per layer.
#
# 3. The kernel (lessons_lib/kernels/swiglu.py)
# ---------------------------------------------
# A flat elementwise kernel: each program handles BLOCK consecutive elements of the flattened tensors, loads gate
# and up (converting to fp32), computes g * sigmoid(g) * u and stores y. Nothing else is saved: the backward
# recomputes sigmoid(g), which costs arithmetic (free here) instead of memory (not free).
#
# 4. The backward, derived
# ------------------------
# With s = sigmoid(g), silu(g) = g s, and d s / d g = s (1 - s):
#     d silu / d g = s + g s (1 - s) = s (1 + g (1 - s))
#     d up   = dy * g * s
#     d gate = dy * up * s * (1 + g * (1 - s))

def minimal_bytes(M, N, e=2):
    return 8 * M * N * e


FORMULA = ("fwd+bwd = 8 M N e (fwd: read gate, up, write y; bwd: read dy, gate, up, write d gate, d up), e = 2; "
           "fwd = 3 M N e")


# 5. Check
# --------
def check(device, quick=False):
    """Check the kernel on odd shapes (quick: the first shape only); raises AssertionError if it is wrong."""
    print(f"check on {device} ({'Triton interpreter' if device == 'cpu' else 'compiled Triton'}): "
          "max |error| against the float64 truth, kernel vs eager PyTorch in the same dtype")
    for shape in [(1001,), (3, 37, 133), (2, 8960)][:1 if quick else None]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            gate = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
            up = torch.randn(shape, device=device).to(dtype).requires_grad_()
            report = check_against_reference(KERNEL, swiglu, [gate, up], [torch.randn_like(gate)], dtype)
            errors = "  ".join(f"{what}: {err:.1e} (eager {ref:.1e})" for what, err, ref in report)
            print(f"  {str(shape):<14} {str(dtype):<15} ok   {errors}")


# 6. Benchmark (GPU)
# ------------------
def benchmark(copy_gbps, quick=False):
    rows = []
    liger = bench.liger()
    compiled = bench.compiled(swiglu_torch)
    for M in ([4096] if quick else [4096, 32768]):
        N = 8960
        gate = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(gate)
        shape = f"{M} x {N}"
        providers = {"eager": lambda: swiglu_torch(gate, up), "ours": lambda: swiglu(gate, up)}
        if compiled is not None:
            providers["compile"] = lambda: compiled(gate, up)
        if liger is not None:
            providers["liger"] = lambda: liger.liger_swiglu(gate, up)
        for name, fn in providers.items():
            bench.measure(rows, KERNEL, shape, name, "fwd", 3 * M * N * 2, lambda fn=fn: fn())
            bench.measure(rows, KERNEL, shape, name, "fwd+bwd", minimal_bytes(M, N),
                          lambda fn=fn: fn().backward(dy), grad_to_none=[gate, up])
    return rows


def main():
    bench.script_main(__doc__, KERNEL, "lessons_lib.kernels.swiglu", check, benchmark, FORMULA)


if __name__ == "__main__":
    main()
