"""
RoPE (rotary position embedding), fused for q and k, forward and backward
=========================================================================

Run it:  python kernels/rope.py [--quick]
- on a GPU: checks the kernel, benchmarks it against eager PyTorch, torch.compile and Liger-Kernel, and writes
  kernels/results/rope.md (+ .json);
- on a CPU: checks the kernel in the Triton interpreter and says why it skips the timing.

The kernel lives in lessons_lib/kernels/rope.py (`--source` prints it); this script is its walkthrough.

1. Motivation
-------------
Every attention layer rotates its queries and keys by position-dependent angles before the dot products:
    q_embed = q * cos + rotate_half(q) * sin,      rotate_half([x1, x2]) = [-x2, x1]
Qwen2-1.5B does it in 28 layers on q (B, 12, T, 128) and k (B, 2, T, 128). Four multiplies and two adds per
element: memory-bound again.
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

from lessons_lib.kernels import apply_rope, apply_rope_torch, bench  # noqa: E402
from lessons_lib.kernels.checking import check_against_reference  # noqa: E402

KERNEL = "rope"

# 2. The naive version, and what it moves
# ---------------------------------------
# transformers' apply_rotary_pos_emb (= apply_rope_torch), per element of q (e bytes each; the same for k):
EAGER_FORWARD_OPS = [  # (op, reads, writes) in units of e bytes per element of q (cos, sin: 1/nh of that, left out)
    ("q * cos", 1, 1),
    ("-x2 (on the second half of q)", 0.5, 0.5),
    ("torch.cat((-x2, x1))", 1, 1),
    ("rotate_half(q) * sin", 1, 1),
    ("q * cos + rotate_half(q) * sin", 2, 1),
]
# 10 e bytes per element instead of 2 (read q once, write q_embed once). Attention hands q and k over as
# transposed views, (B, T, nh, hs) in memory seen as (B, nh, T, hs); eager ops cope, some kernels copy them first.
#
# 3. The kernel (lessons_lib/kernels/rope.py)
# -------------------------------------------
# One program per token (b, t): it loads that token's cos and sin once, then rotates all nh query heads and all
# nkv key heads (grouped-query attention: nkv < nh) as (heads, hs/2) tiles, addressing q and k through their
# strides, so the transposed views are read in place and the outputs keep the inputs' memory layout.
#
# 4. The backward, derived
# ------------------------
# Per head, with halves x1, x2 of x and c1, c2, s1, s2 of cos and sin, the forward is linear in x:
#     y1 = c1 x1 - s1 x2          y2 = s2 x1 + c2 x2          i.e. y = R x,  R = [[c1, -s1], [s2, c2]]
# so dx = R^T dy:
#     dx1 = c1 dy1 + s2 dy2       dx2 = -s1 dy1 + c2 dy2
# which is the forward with (s1, s2) replaced by (-s2, -s1): the same kernel with BACKWARD=True. (transformers'
# tables have c1 = c2 and s1 = s2, and then the backward is simply a rotation by -angle; the kernel does not rely
# on it.) cos and sin get no gradient: transformers computes them under no_grad.
#
# Bytes, minimal: forward reads q, k and writes q_embed, k_embed; backward the same with gradients:
#     4 * (Q + K) * e,  Q = B nh T hs, K = B nkv T hs      (+ cos and sin, 2 B T hs e per pass, when not broadcast)

def minimal_bytes(B, nh, nkv, T, hs, e=2):
    return 4 * B * (nh + nkv) * T * hs * e + 2 * 2 * B * T * hs * e


FORMULA = ("fwd+bwd = 4 (Q + K) e + 4 B T hs e (read q, k, write both, in each pass; cos and sin read in each pass); "
           "Q = B nh T hs, K = B nkv T hs, e = 2 (bf16); fwd = half of it")


# 5. Check
# --------
def rope_inputs(B, nh, nkv, T, hs, dtype, device):
    q = torch.randn(B, T, nh, hs, device=device).to(dtype).transpose(1, 2).requires_grad_()  # attention's layout
    k = torch.randn(B, T, nkv, hs, device=device).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.randn(B, T, hs, device=device) * 3  # random halves: tests the general formula
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


def check(device, quick=False):
    """Check the kernel on odd shapes (quick: the first shape only); raises AssertionError if it is wrong."""
    print(f"check on {device} ({'Triton interpreter' if device == 'cpu' else 'compiled Triton'}): "
          "max |error| against the float64 truth, kernel vs eager PyTorch in the same dtype")
    for B, nh, nkv, T, hs in [(2, 6, 2, 7, 10), (3, 5, 1, 9, 6), (1, 12, 2, 5, 128)][:1 if quick else None]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, cos, sin = rope_inputs(B, nh, nkv, T, hs, dtype, device)
            report = check_against_reference(KERNEL, apply_rope, [q, k, cos, sin],
                                              [torch.randn_like(q), torch.randn_like(k)], dtype)
            errors = "  ".join(f"{what}: {err:.1e} (eager {ref:.1e})" for what, err, ref in report)
            print(f"  q {(B, nh, T, hs)} k {nkv} heads {str(dtype):<15} ok   {errors}")


# 6. Benchmark (GPU)
# ------------------
def benchmark(copy_gbps, quick=False):
    rows = []
    liger = bench.liger()
    compiled = bench.compiled(apply_rope_torch)
    nh, nkv, hs = 12, 2, 128  # Qwen2-1.5B
    for B, T in ([(8, 512)] if quick else [(8, 512), (8, 4096)]):
        q, k, cos, sin = rope_inputs(B, nh, nkv, T, hs, torch.bfloat16, "cuda")
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        shape = f"q {B}x{nh}x{T}x{hs}, k {nkv} heads"
        providers = {"eager": lambda: apply_rope_torch(q, k, cos, sin), "ours": lambda: apply_rope(q, k, cos, sin)}
        if compiled is not None:
            providers["compile"] = lambda: compiled(q, k, cos, sin)
        if liger is not None:
            providers["liger"] = lambda: liger.liger_rope(q, k, cos, sin)
        nbytes = minimal_bytes(B, nh, nkv, T, hs)
        for name, fn in providers.items():
            bench.measure(rows, KERNEL, shape, name, "fwd", nbytes // 2, lambda fn=fn: fn())
            bench.measure(rows, KERNEL, shape, name, "fwd+bwd", nbytes,
                          lambda fn=fn: torch.autograd.backward(fn(), [dq, dk]), grad_to_none=[q, k])
    return rows


def main():
    bench.script_main(__doc__, KERNEL, "lessons_lib.kernels.rope", check, benchmark, FORMULA)


if __name__ == "__main__":
    main()
