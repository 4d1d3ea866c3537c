"""
Per-token log-probabilities and entropy without the (B, T, V) fp32 log-softmax
=============================================================================

Run it:  python kernels/logprobs.py [--quick]
- on a GPU: checks the kernel, benchmarks time and memory against eager PyTorch, torch.compile and Liger-Kernel's
  cross-entropy, and writes kernels/results/logprobs.md (+ .json);
- on a CPU: checks the kernel in the Triton interpreter and says why it skips the timing.

The kernels live in lessons_lib/kernels/logprobs.py (`--source` prints them); this script is their walkthrough.

1. Motivation
-------------
PPO needs log p(token) for every generated token, three times per batch (policy at rollout, reference, policy
in every update) and the entropy for its statistics. The logits are (B, T, V) with V = 151,936 for Qwen2: at
B*T = 4,096 that is 1.16 GiB in bf16, and the usual one-liner

    torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])

makes an fp32 copy (2.3 GiB), a divided copy (2.3 GiB) and the fp32 log-softmax (2.3 GiB) to read one number
per row. The memory, not the time, is what limits the batch size of a PPO update.
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

from lessons_lib.kernels import bench, logprobs_and_entropy, selective_log_softmax  # noqa: E402
from lessons_lib.kernels.checking import check_against_reference  # noqa: E402

KERNEL = "logprobs"

# 2. The naive version, and what it moves
# ---------------------------------------
# forward, per logit (e = 2 bytes for bf16): .float() reads e, writes 4; / temperature reads 4, writes 4;
# log_softmax reads 4 twice (max and sum pass), writes 4: ~28 bytes per logit to produce 4 bytes per *row*.
# Its backward materializes an fp32 gradient (4 bytes per logit), the softmax (4) and casts to bf16 (e).
#
# 3. The kernels (lessons_lib/kernels/logprobs.py)
# ------------------------------------------------
# Forward: one program per row streams the vocabulary in blocks of BLOCK_V and keeps three running numbers,
# with z = logits / temperature (the online softmax of FlashAttention):
#     m = max z so far;  s = sum exp(z - m);  t = sum exp(z - m) * z       (rescaled by exp(m_old - m) when m grows)
# At the end lse = m + log s, logprob = z[index] - lse, entropy = lse - t / s. It writes 12 bytes per row.
#
# 4. The backward, derived
# ------------------------
# With p = softmax(z): d logprob / d z_j = onehot(index)_j - p_j, and for the entropy H = lse - sum p z:
#     d H / d z_j = p_j - (p_j + p_j z_j - p_j sum_k p_k z_k) = -p_j (z_j - lse + H) = -p_j (log p_j + H)
#     d logits = (g_logprob * (onehot - p) - g_entropy * p * (log p + H)) / temperature
# p_j = exp(z_j - lse) is recomputed from the logits and the saved lse: a second streaming pass.
#
# Bytes. The gradient of the logits must be written (N V e) and the logits read; "minimal" counts one read:
#     fwd+bwd minimal = 2 N V e   (N = B*T rows)
# but a per-token gradient g_logprob is only known after the forward (PPO's loss uses the log-probs), so the
# backward must read the logits again: this kernel pair moves 3 N V e, and 2 / 3 = 67 % is the best it can show
# as "% of copy" on the minimal-bytes scale (100 % of copy on its own byte count). With inplace_backward=True the
# gradient overwrites the logits: no (N, V) allocation at all.

def minimal_bytes(N, V, e=2):
    return 2 * N * V * e


FORMULA = ("fwd+bwd = 2 N V e (read logits once, write their gradient once; this kernel pair reads them twice: "
           "3 N V e, so 67% of copy on this scale is its ceiling); fwd = N V e; N = rows, e = 2 (bf16)")


# 5. Check
# --------
def check(device, quick=False):
    """Check the kernel on odd shapes (quick: the first shape only); raises AssertionError if it is wrong."""
    print(f"check on {device} ({'Triton interpreter' if device == 'cpu' else 'compiled Triton'}): "
          "max |error| against the float64 truth, kernel vs eager PyTorch in the same dtype")
    for B, T, V, temperature in [(2, 7, 1001, 0.7), (2, 3, 20011, 1.0)][:1 if quick else None]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            logits = (4 * torch.randn(B, T, V, device=device)).to(dtype).requires_grad_()
            index = torch.randint(0, V, (B, T), device=device)
            grads = [torch.randn(B, T, device=device), torch.randn(B, T, device=device)]
            report = check_against_reference(KERNEL, logprobs_and_entropy, [logits, index], grads, dtype,
                                              output_tol=torch.float32, temperature=temperature)
            errors = "  ".join(f"{what}: {err:.1e} (eager {ref:.1e})" for what, err, ref in report)
            print(f"  {str((B, T, V)):<16} T={temperature:<4} {str(dtype):<15} ok   {errors}")


# 6. Benchmark (GPU): time, and the memory each version adds on top of the logits a model already made
# -----------------------------------------------------------------------------------------------------
def eager(logits, index):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index[:, None])[:, 0]


def benchmark(copy_gbps, quick=False):
    rows = []
    liger = bench.liger()
    compiled = bench.compiled(eager)
    N, V = 4096, 151936
    logits = (3 * torch.randn(N, V, device="cuda")).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    providers = {
        "eager": lambda x: eager(x, index),
        "ours": lambda x: selective_log_softmax(x, index),
        "ours+entropy": lambda x: sum(logprobs_and_entropy(x, index)),
    }
    if compiled is not None:
        providers["compile"] = lambda x: compiled(x, index)
    if liger is not None:  # cross-entropy = -logprob; reduction="none" gives it per row
        providers["liger"] = lambda x: -liger.liger_cross_entropy(x, index, reduction="none")
    # last: from its first backward on, the benchmark's (leaf) logits hold gradients (timing does not care)
    providers["ours in-place"] = lambda x: selective_log_softmax(x, index, inplace_backward=True)
    shape = f"{N} x {V}"
    for name, fn in providers.items():
        if name != "ours in-place":  # in place overwrites the input: forward alone is the same as "ours"
            bench.measure(rows, KERNEL, shape, name, "fwd", N * V * 2, lambda fn=fn: fn(logits))
        bench.measure(rows, KERNEL, shape, name, "fwd+bwd", minimal_bytes(N, V),
                      lambda fn=fn: fn(logits).backward(g), grad_to_none=[logits])

    # memory as in a model: logits = hidden @ lm_head.T exist (part of the graph); what does each op add?
    hidden = torch.randn(N, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lm_head = torch.randn(V, 1536, device="cuda", dtype=torch.bfloat16) * 0.02
    lines = ["Memory each version adds on top of the logits (logits = hidden @ lm_head.T already computed, bf16, "
             f"{N} x {V}; the backward continues into the matmul):", "",
             "| provider | forward +MiB | forward + backward +MiB | fraction of eager (fwd / fwd+bwd) |",
             "|---|---|---|---|"]
    memory = {}
    for name, fn in providers.items():
        def step(backward, fn=fn):
            lp = fn(hidden @ lm_head.T)
            if backward:
                lp.backward(g)
            hidden.grad = None
        try:
            step(True)  # warm-up
            base = bench.peak_extra_mib(lambda: hidden @ lm_head.T)  # the logits themselves, subtracted below
            memory[name] = (bench.peak_extra_mib(lambda: step(False)) - base,
                            bench.peak_extra_mib(lambda: step(True)) - base)
        except Exception as err:  # noqa: BLE001
            print(f"  memory of {name} failed: {err}")
    ref = memory.get("eager")
    for name, (fwd, both) in memory.items():
        frac = f"{fwd / ref[0]:.3f} / {both / ref[1]:.3f}" if ref else "-"
        lines.append(f"| {name} | {fwd:.0f} | {both:.0f} | {frac} |")
        print(f"  memory {name:>14}: forward +{fwd:.0f} MiB, forward+backward +{both:.0f} MiB ({frac} of eager)")
    return rows, "\n".join(lines + ["", forward_share(rows, N, V, copy_gbps)])


def forward_share(rows, N, V, copy_gbps, e=2):
    """The forward's part of ours fwd+bwd (device times), and each pass's bandwidth on its own bytes."""
    time = {r.mode: r.device_ms for r in rows if r.provider == "ours"}
    fwd, both = time.get("fwd"), time.get("fwd+bwd")
    if not fwd or not both or both <= fwd:
        return "Forward share: no device times (CUDA graph capture failed?)"
    bwd = both - fwd
    fwd_gbps, bwd_gbps = N * V * e / (fwd * 1e-3) / 1e9, 2 * N * V * e / (bwd * 1e-3) / 1e9
    return (f"Forward share of ours fwd+bwd (device times): {fwd:.3f} of {both:.3f} ms = {fwd / both:.0%}. On its own "
            f"bytes the forward (reads N V e) runs at {fwd_gbps:.0f} GB/s ({100 * fwd_gbps / copy_gbps:.0f}% of copy), "
            f"the backward (reads and writes N V e: {bwd:.3f} ms) at {bwd_gbps:.0f} GB/s "
            f"({100 * bwd_gbps / copy_gbps:.0f}% of copy); at copy speed the forward would be a third of the total.")


def main():
    bench.script_main(__doc__, KERNEL, "lessons_lib.kernels.logprobs", check, benchmark, FORMULA)


if __name__ == "__main__":
    main()
