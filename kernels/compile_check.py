"""
Compile every kernel for a GPU, without a GPU
=============================================

    python kernels/compile_check.py [--arch 90] [--first-only] [--general]

The Triton interpreter checks what a kernel computes, but not whether the GPU compiler accepts it: some Python the
interpreter runs happily is not valid Triton, and a launch config can need more registers than a GPU thread has
(the compiler then "spills" to slow local memory). Triton can compile ahead of time for any NVIDIA architecture
(LLVM and ptxas ship with it), so this script compiles every launch config of every kernel in
lessons_lib.kernels, in bf16, for sm_90 (H100/H200) by default, and prints registers per thread, spilled bytes and
the width of the global loads and stores in the PTX (a memory-bound kernel wants 16-byte vectors: "ld 16Bx4").

It must run *without* TRITON_INTERPRET (the kernels would be interpreter functions); it unsets it for itself.
The argument types below mirror what the launchers pass (ints that fit 32 bits are i32, as Triton chooses), with
the specialization a launch at a Qwen2-1.5B shape gets (see KERNELS); --general compiles without it.
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

BF16, F32, I64, U8 = "*bf16", "*fp32", "*i64", "*u8"

# (module, launcher, pointer and float arguments, integer arguments with the values a real launch passes at a
#  Qwen2-1.5B shape, constexprs not in the configs: one dict per variant). A launch specializes integers as Triton
#  does: 1 becomes a constant, a multiple of 16 is marked divisible by 16, as are the (aligned) pointers; that is
#  what decides the vector width of loads and stores. `--general` compiles without any of it.
M, H, INTER, V = 4096, 1536, 8960, 151936  # rows (B*T), hidden, intermediate, vocabulary
B, T, NH, NKV, HS = 8, 512, 12, 2, 128  # RoPE, in attention's transposed layout: (B, T, heads, hs) in memory
KERNELS = [
    ("rms_norm", "_fwd", dict(x_ptr=BF16, w_ptr=BF16, y_ptr=BF16, rstd_ptr=F32, eps="fp32"),
     dict(M=M, N=H, stride_x=H, stride_y=H), [{}]),
    ("rms_norm", "_bwd", dict(dy_ptr=BF16, x_ptr=BF16, w_ptr=BF16, rstd_ptr=F32, dx_ptr=BF16, dw_partial_ptr=F32,
                              n_partial_ptr="*i32"),
     dict(M=M, N=H, stride_dy=H, stride_x=H, stride_dx=H), [dict(HAS_DW=True), dict(HAS_DW=False)]),
    ("rms_norm", "_dw", dict(dw_partial_ptr=F32, n_partial_ptr="*i32", dw_ptr=BF16), dict(N=H), [{}]),
    ("rope", "_rope", dict(q_ptr=BF16, k_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16, q_out_ptr=BF16, k_out_ptr=BF16),
     dict(n_tokens=B * T, T=T, n_qh=NH, n_kh=NKV, half=HS // 2,
          sq_b=T * NH * HS, sq_h=HS, sq_t=NH * HS, sq_d=1, sk_b=T * NKV * HS, sk_h=HS, sk_t=NKV * HS, sk_d=1,
          sc_b=T * HS, sc_t=HS, sc_d=1, sqo_b=T * NH * HS, sqo_h=HS, sqo_t=NH * HS, sqo_d=1,
          sko_b=T * NKV * HS, sko_h=HS, sko_t=NKV * HS, sko_d=1),
     [dict(BACKWARD=b) for b in (False, True)]),
    ("swiglu", "_fwd", dict(gate_ptr=BF16, up_ptr=BF16, y_ptr=BF16), dict(n_elements=M * INTER), [{}]),
    ("swiglu", "_bwd", dict(dy_ptr=BF16, gate_ptr=BF16, up_ptr=BF16, dgate_ptr=BF16, dup_ptr=BF16),
     dict(n_elements=M * INTER), [{}]),
    ("logprobs", "_fwd", dict(logits_ptr=BF16, index_ptr=I64, logprobs_ptr=F32, entropy_ptr=F32, lse_ptr=F32,
                              inv_temperature="fp32"),
     dict(T=M, V=V, stride_lb=M * V, stride_lt=V, stride_ib=M, stride_it=1),
     [dict(COMPUTE_ENTROPY=c) for c in (False, True)]),
    ("logprobs", "_bwd", dict(logits_ptr=BF16, index_ptr=I64, lse_ptr=F32, entropy_ptr=F32, dlogprobs_ptr=F32,
                              dentropy_ptr=F32, dlogits_ptr=BF16, inv_temperature="fp32"),
     dict(T=M, V=V, stride_lb=M * V, stride_lt=V, stride_ib=M, stride_it=1, stride_db=M * V, stride_dt=V),
     [dict(HAS_DENTROPY=h) for h in (False, True)]),
    ("dequant", "_dequantize", dict(packed_ptr=U8, out_ptr=BF16, code_ptr=F32, absmax_ptr=U8, absmax_code_ptr=F32,
                                    absmax_scale_ptr=F32, absmax_offset_ptr=F32),
     dict(n=H * H, n_bytes=H * H // 2, absmax_blocksize=256),
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


def access_widths(ptx: str) -> str:
    """How wide the global loads and stores in `ptx` are: e.g. "ld 16Bx6 2Bx1 | st 16Bx4" (bytes x count)."""
    out = []
    for op in ("ld", "st"):
        widths = {}
        for vec, bits in re.findall(rf"\b{op}\.global(?:\.[a-z0-9_:]+)*?\.(?:v(\d)\.)?[bufs](8|16|32|64)\b", ptx):
            size = int(vec or 1) * int(bits) // 8
            widths[size] = widths.get(size, 0) + 1
        out.append(f"{op} " + " ".join(f"{w}Bx{n}" for w, n in sorted(widths.items(), reverse=True)))
    return " | ".join(out)


def signature_and_attrs(fn, pointers: dict, ints: dict, constexprs: dict, general: bool):
    """The signature a launch with these integer values compiles (see KERNELS), and its divisibility attributes."""
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ints:
            value = ints[arg]
            if value == 1 and not general:  # Triton turns an integer argument equal to 1 into a constant
                signature[arg] = "constexpr"
                constexprs[arg] = 1
                continue
            signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not general:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = pointers[arg]
            if pointers[arg].startswith("*") and not general:  # torch's allocations are aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def main():
    parser = argparse.ArgumentParser(description="compile every kernel config for an NVIDIA GPU, without one")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    parser.add_argument("--first-only", action="store_true", help="only each launcher's default (first) config")
    parser.add_argument("--general", action="store_true",
                        help="compile without the integer/alignment specialization a real launch gets")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"{'kernel':<22} {'config':<40} {'variant':<28} {'regs':>4} {'spill':>5}  global access widths")
    for module, name, pointers, ints, variants in KERNELS:
        launcher = getattr(sys.modules[f"lessons_lib.kernels.{module}"], name)
        fn, heuristics = jit_function(launcher.kernel)
        for config in launcher.configs[:1] if args.first_only else launcher.configs:
            for variant in variants:
                constexprs = {**variant, **config.kwargs}
                constexprs.update(heuristics({**ints, **constexprs}))
                signature, attrs = signature_and_attrs(fn, pointers, ints, constexprs, args.general)
                options = {"num_warps": config.num_warps}
                if module == "dequant":
                    options["enable_fp_fusion"] = False  # as the launcher does
                label = f"{str(config.kwargs)[:30]} w{config.num_warps}"
                try:
                    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                        attrs=attrs), target=target, options=options)
                except Exception as err:  # noqa: BLE001 - report every failure, then exit non-zero
                    failures += 1
                    print(f"{module + '.' + name:<22} {label:<40} {str(variant)[:28]:<28} FAILED: {err}")
                    continue
                regs, spill = registers(compiled.asm["ptx"], args.arch)
                print(f"{module + '.' + name:<22} {label:<40} {str(variant)[:28]:<28} {regs!s:>4} {spill!s:>5}  "
                      f"{access_widths(compiled.asm['ptx'])}")
    if failures:
        raise SystemExit(f"{failures} kernel configs failed to compile for sm_{args.arch}")
    print(f"every config compiled for sm_{args.arch}")


if __name__ == "__main__":
    main()
