"""
Launch overhead: the Python each kernel call costs on the host
==============================================================

    python kernels/launch_overhead.py [--calls 1000] [--repeats 7]
    PYTHONPATH=<older checkout> python kernels/launch_overhead.py --no-write --save-json before.json
    python kernels/launch_overhead.py --before before.json --before-label "<its commit>"   # adds a "before" column

A kernel that runs for 5 microseconds on the GPU is slowed down by anything that takes longer than that to *issue*
it: while the CPU is still in Python, the GPU waits. At the Qwen2-1.5B training shapes RMSNorm and RoPE run for
tens of microseconds, so tens of microseconds of Python per call (argument checks, allocations, autograd, Triton's
launcher) decide what a user sees. This script measures that host-side cost, on any machine, without a GPU:

- the kernels are defined in compiled mode (no interpreter), and Triton's last step, `JITFunction.run` (argument
  binding, the compiled-kernel cache lookup and the driver call), is replaced by a stub that only counts the call;
  everything above it is timed: the public function, our launcher, autograd, allocations (of CPU tensors here);
- each op is timed two ways: "autotuner" sends every launch through `triton.autotune`'s `Autotuner.run` (on a
  cache hit, i.e. after tuning), which is how lessons_lib launched before; "cached" is `Launcher`'s own path, which
  launches the `@triton.jit` function directly with the config the tuner picked (lessons_lib/kernels/_common.py);
- CPU time of the thread (not wall time), the median over `--repeats` runs of `--calls` calls each.

What it cannot show: the stubbed `JITFunction.run` itself (the same in both paths), CUDA's launch latency, and the
autograd engine's hand-off to its GPU thread on a backward pass. kernels/bench_all.py measures those on a GPU
(its "host" column: the CPU time per call while the GPU keeps up). Results: kernels/results/launch_overhead.md.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

if os.environ.pop("TRITON_INTERPRET", None) is not None and "lessons_lib.kernels" in sys.modules:
    raise SystemExit("run launch_overhead.py in its own process (the kernels were already defined for the interpreter)")
try:
    import lessons_lib  # noqa: F401
except ModuleNotFoundError:  # a checkout where lessons_lib is not installed: use the checkout's copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.autotuner  # noqa: E402

from lessons_lib import kernels as K  # noqa: E402
from lessons_lib.kernels import _common  # noqa: E402
from lessons_lib.nf4 import quantize_nf4  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "launch_overhead.md"
MODULES = [sys.modules[f"lessons_lib.kernels.{m}"] for m in ("rms_norm", "rope", "swiglu", "logprobs", "dequant")]
LAUNCHES = [0]


def stub_the_gpu():
    """No GPU work: the final launch returns at once (and is counted); the tuner's timing returns a constant."""
    def run(self, *args, grid, warmup, **kwargs):
        LAUNCHES[0] += 1

    triton.runtime.jit.JITFunction.run = run
    triton.runtime.autotuner.Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]  # all equal
    for module in MODULES:  # CPU tensors stand in for CUDA ones: take the Triton path anyway
        module.use_triton = lambda impl, *tensors, op: True


def through_autotuner(self, grid, args, kwargs):
    """Launcher.launch as before: every launch goes through Triton's Autotuner.run (and Heuristics.run)."""
    if self._autotuner is None:
        self._autotuner = triton.autotune(configs=self.configs, key=self.key)(self.kernel)
    return self._autotuner[grid](*args, **kwargs)


def ops():
    """name -> a function doing one call of the op (forward, or forward + backward), on CPU stand-in tensors.

    Shapes are tiny (no kernel runs, so only the host path matters, and small CPU tensors come from the allocator's
    cache as CUDA ones do) but keep the model's structure: Qwen2-1.5B's hidden size, heads, head size, attention's
    transposed q/k, bf16."""
    bf16 = torch.bfloat16
    x = torch.randn(8, 1536, dtype=bf16, requires_grad=True)
    w = torch.randn(1536, dtype=bf16, requires_grad=True)
    w_frozen = w.detach()
    dy = torch.randn_like(x)
    q = torch.randn(1, 4, 12, 128, dtype=bf16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 4, 2, 128, dtype=bf16).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(1, 4, 128, dtype=bf16), torch.randn(1, 4, 128, dtype=bf16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    gate = torch.randn(2, 8960, dtype=bf16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    dh = torch.randn_like(gate)
    logits = torch.randn(8, 1000, dtype=bf16, requires_grad=True)
    index = torch.randint(0, 1000, (8,))
    g = torch.randn(8)
    packed, state = quantize_nf4(torch.randn(16, 1536, dtype=bf16) * 0.02, blocksize=64, double_quant=True)

    def clear(*tensors):
        for t in tensors:
            t.grad = None

    return {
        "rms_norm fwd": lambda: K.rms_norm(x, w),
        "rms_norm fwd+bwd": lambda: (K.rms_norm(x, w).backward(dy), clear(x, w)),
        "rms_norm fwd+bwd, frozen weight": lambda: (K.rms_norm(x, w_frozen).backward(dy), clear(x)),
        "rope fwd": lambda: K.apply_rope(q, k, cos, sin),
        "rope fwd+bwd": lambda: (torch.autograd.backward(K.apply_rope(q, k, cos, sin), [dq, dk]), clear(q, k)),
        "swiglu fwd": lambda: K.swiglu(gate, up),
        "swiglu fwd+bwd": lambda: (K.swiglu(gate, up).backward(dh), clear(gate, up)),
        "log-prob fwd": lambda: K.selective_log_softmax(logits, index),
        "log-prob fwd+bwd": lambda: (K.selective_log_softmax(logits, index).backward(g), clear(logits)),
        "nf4 dequantize": lambda: K.nf4_dequantize(packed, state),
    }


def per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(median, spread) of the CPU microseconds per call over `repeats` runs of `calls` calls.

    CPU time of this thread, not wall time: on a shared machine wall time also counts the time other processes
    held the core. (It still varies with what they do to the caches and the clock.)"""
    fn()  # first call: tuning (stubbed), caches
    runs = []
    for _ in range(repeats):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        runs.append((time.thread_time_ns() - t0) / calls / 1e3)
    return statistics.median(runs), max(runs) - min(runs)


def main():
    parser = argparse.ArgumentParser(description="host-side cost of each kernel call (no GPU needed)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", default=str(RESULTS), help=f"results file (default {RESULTS})")
    parser.add_argument("--save-json", help="also save {op: us per call} of the package's own launch path here")
    parser.add_argument("--before", help="a --save-json file from another checkout: shown as a first column")
    parser.add_argument("--before-label", default="before", help="what the --before column measured")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_the_gpu()
    _common.AUTOTUNE = True
    cases = ops()
    cached_launch = getattr(_common.Launcher, "launch", None)  # None in a version without the cached path
    paths = {"autotuner": through_autotuner} if cached_launch else {}
    paths["cached"] = cached_launch
    rows = []
    for name, fn in cases.items():
        results = {}
        for path, launch in paths.items():
            if launch is not None:
                _common.Launcher.launch = launch
            LAUNCHES[0] = 0
            results[path] = per_call_us(fn, args.calls, args.repeats)
            launches = LAUNCHES[0] / (1 + args.calls * args.repeats)
        if cached_launch is not None:
            _common.Launcher.launch = cached_launch
        rows.append((name, launches, results))
        shown = "   ".join(f"{p}: {m:6.1f} us (spread {s:4.1f})" for p, (m, s) in results.items())
        print(f"{name:<34} {launches:3.0f} Triton launches   {shown}")

    if args.save_json:
        Path(args.save_json).write_text(json.dumps({name: results["cached"][0] for name, _, results in rows}))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    header = ("| op | Triton launches | " + (f"{args.before_label} us/call | " if before else "")
              + " | ".join(f"{p} us/call" for p in paths) + (" | saved by the cached path |" if len(paths) == 2
                                                              else " |"))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, launches, results in rows:
        cells = ([f"{before[name]:.1f}" if name in before else "-"] if before else [])
        cells += [f"{results[p][0]:.1f} (±{results[p][1] / 2:.1f})" for p in paths]
        saved = f" {results['autotuner'][0] - results['cached'][0]:.1f} us |" if len(paths) == 2 else ""
        lines.append(f"| {name} | {launches:.0f} | " + " | ".join(cells) + f" |{saved}")
    table = "\n".join(lines)
    print("\n" + table)
    if args.no_write:
        return
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        "# Host-side cost of one kernel call (no GPU work)", "",
        f"- command: `python kernels/launch_overhead.py {shlex.join(sys.argv[1:])}`",
        f"- date: {date}; python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{cpu}, {os.cpu_count()} cores (shared: other jobs were running, so treat differences of a few us as noise)",
        "- what is timed (CPU time of the thread): everything above Triton's `JITFunction.run` (stubbed), on CPU "
        "tensors: the public function, argument checks, allocations, autograd, our launcher; `JITFunction.run` "
        "itself, CUDA's launch latency, the launches of torch ops and the autograd engine's hand-off to its GPU "
        "thread are not in these numbers",
        "- autotuner: every launch through Triton's `Autotuner.run` (cache hit); cached: `Launcher` launches the jit "
        "function directly with the cached config; median over the repeats (± half the spread)"
        + (f"; {args.before_label}: the same script run against that checkout (its own launch path)" if before
           else ""), "",
        table, ""]))
    print("wrote", out)


if __name__ == "__main__":
    main()
