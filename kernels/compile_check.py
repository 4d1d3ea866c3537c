"""
Compile every kernel for a GPU, without a GPU
=============================================

    python kernels/compile_check.py [--arch 90] [--first-only]

The Triton interpreter checks what a kernel computes, but not whether the GPU compiler accepts it: some Python the
interpreter runs happily is not valid Triton, and a launch config can need more registers than a GPU thread has
(the compiler then "spills" to slow local memory). Triton can compile ahead of time for any NVIDIA architecture
(LLVM and ptxas ship with it), so this script compiles every launch config of every kernel in
lessons_lib.kernels, in bf16, for sm_90 (H100/H200) by default, and prints registers per thread and spilled bytes.

It must run *without* TRITON_INTERPRET (the kernels would be interpreter functions); it unsets it for itself.
The argument types below mirror what the launchers pass (ints that fit 32 bits are i32, as Triton chooses).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.pop("TRITON_INTERPRET", None) is not None and "lessons_lib.kernels" in sys.modules:
    raise SystemExit("run compile_check.py in its own process (the kernels were already defined for the interpreter)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
try:
    import lessons_lib  # noqa: F401
except ModuleNotFoundError:  # a checkout where lessons_lib is not installed: use the checkout's copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lessons_lib.kernels  # noqa: E402, F401  (defines the kernels, compiled mode)

BF16, F32, I32, I64, U8 = "*bf16", "*fp32", "i32", "*i64", "*u8"
I32S = lambda *names: {n: I32 for n in names}  # noqa: E731

# Runtime values the @triton.heuristics of some kernels read (Qwen2-1.5B shapes): BLOCK_N from N, and so on.
SAMPLE = dict(N=1536, n_qh=12, n_kh=2, half=64, V=151936)

# (module, launcher, argument types, constexprs not in the configs: one dict per variant)
KERNELS = [
    ("rms_norm", "_fwd", dict(x_ptr=BF16, w_ptr=BF16, y_ptr=BF16, rstd_ptr=F32, eps="fp32",
                              **I32S("M", "N", "stride_x", "stride_y")), [{}]),
    ("rms_norm", "_bwd", dict(dy_ptr=BF16, x_ptr=BF16, w_ptr=BF16, rstd_ptr=F32, dx_ptr=BF16, dw_partial_ptr=F32,
                              **I32S("M", "N", "stride_dy", "stride_x", "stride_dx")),
     [dict(HAS_DW=True), dict(HAS_DW=False)]),
    ("rope", "_rope", dict(q_ptr=BF16, k_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, q_out_ptr=BF16, k_out_ptr=BF16,
                           **I32S("T", "n_qh", "n_kh", "half", "sq_b", "sq_h", "sq_t", "sq_d", "sk_b", "sk_h", "sk_t",
                                  "sk_d", "sc_b", "sc_t", "sc_d", "sqo_b", "sqo_h", "sqo_t", "sqo_d", "sko_b", "sko_h",
                                  "sko_t", "sko_d")),
     [dict(BACKWARD=b) for b in (False, True)]),
    ("swiglu", "_fwd", dict(gate_ptr=BF16, up_ptr=BF16, y_ptr=BF16, n_elements=I32), [{}]),
    ("swiglu", "_bwd", dict(dy_ptr=BF16, gate_ptr=BF16, up_ptr=BF16, dgate_ptr=BF16, dup_ptr=BF16, n_elements=I32),
     [{}]),
    ("logprobs", "_fwd", dict(logits_ptr=BF16, index_ptr=I64, logprobs_ptr=F32, entropy_ptr=F32, lse_ptr=F32,
                              inv_temperature="fp32", **I32S("T", "V", "stride_lb", "stride_lt", "stride_ib",
                                                             "stride_it")),
     [dict(COMPUTE_ENTROPY=c) for c in (False, True)]),
    ("logprobs", "_bwd", dict(logits_ptr=BF16, index_ptr=I64, lse_ptr=F32, entropy_ptr=F32, dlogprobs_ptr=F32,
                              dentropy_ptr=F32, dlogits_ptr=BF16, inv_temperature="fp32",
                              **I32S("T", "V", "stride_lb", "stride_lt", "stride_ib", "stride_it", "stride_db",
                                     "stride_dt")),
     [dict(HAS_DENTROPY=h) for h in (False, True)]),
    ("dequant", "_dequantize", dict(packed_ptr=U8, out_ptr=BF16, code_ptr=F32, absmax_ptr=U8, absmax_code_ptr=F32,
                                    absmax_scale_ptr=F32, absmax_offset_ptr=F32,
                                    **I32S("n", "n_bytes", "absmax_blocksize")),
     [dict(BYTES_PER_BLOCK=32, DOUBLE_QUANT=True, ROUND_BF16=False)]),
]


def jit_function(kernel):
    """The JITFunction under `kernel`, and the constexprs its @triton.heuristics would add for `args`."""
    heuristics = {}
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        heuristics.update(getattr(kernel, "values", {}))
        kernel = kernel.fn
    return kernel, lambda args: {name: rule(args) for name, rule in heuristics.items()}


def registers(ptx, arch):
    """(registers per thread, spilled bytes) from ptxas -v; None where ptxas cannot say."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(
        bin_dir, n))), None)
    if ptxas is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    out = res.stdout + res.stderr
    regs, spill = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def main():
    parser = argparse.ArgumentParser(description="compile every kernel config for an NVIDIA GPU, without one")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    parser.add_argument("--first-only", action="store_true", help="only each launcher's default (first) config")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"{'kernel':<24} {'config':<44} {'variant':<34} {'regs':>5} {'spill B':>8}")
    for module, name, types, variants in KERNELS:
        launcher = getattr(sys.modules[f"lessons_lib.kernels.{module}"], name)
        fn, heuristics = jit_function(launcher.kernel)
        for config in launcher.configs[:1] if args.first_only else launcher.configs:
            for variant in variants:
                constexprs = {**variant, **config.kwargs}
                constexprs.update(heuristics({**SAMPLE, **constexprs}))
                signature = {a: ("constexpr" if a in constexprs else types[a]) for a in fn.arg_names}
                options = {"num_warps": config.num_warps}
                if module == "dequant":
                    options["enable_fp_fusion"] = False  # as the launcher does
                label = f"{str(config.kwargs)[:34]} w{config.num_warps}"
                try:
                    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                              target=target, options=options)
                except Exception as err:  # noqa: BLE001 - report every failure, then exit non-zero
                    failures += 1
                    print(f"{module + '.' + name:<24} {label:<44} {str(variant)[:34]:<34} FAILED: {err}")
                    continue
                regs, spill = registers(compiled.asm["ptx"], args.arch)
                print(f"{module + '.' + name:<24} {label:<44} {str(variant)[:34]:<34} {regs!s:>5} {spill!s:>8}")
    if failures:
        raise SystemExit(f"{failures} kernel configs failed to compile for sm_{args.arch}")
    print(f"every config compiled for sm_{args.arch}")


if __name__ == "__main__":
    main()
