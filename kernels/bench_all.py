"""
Every kernel script in one run: checks, benchmarks, results files, and one summary table
========================================================================================

    python kernels/bench_all.py [--quick] [--only rms_norm,rope]

On a GPU (meant for one call on the H200 machine: a few minutes) it measures the copy bandwidth once, runs each
script's check and benchmark, writes kernels/results/<kernel>.md/.json for each and kernels/results/summary.md.
On a CPU it runs the checks in the Triton interpreter only.

Optional baselines: Liger-Kernel (`liger_kernel`) and bitsandbytes, e.g. from wheels carried in .whl/ (see
docs/KERNELS.md); torch.compile needs a working compiler. A missing or failing baseline only loses its rows.
"""

import argparse
import runpy
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCRIPTS = ["rms_norm", "rope", "swiglu", "logprobs", "nf4_dequantize"]
TARGETS = {"rms_norm": 85, "rope": 85, "swiglu": 85, "logprobs": 85, "nf4_dequantize": 80}  # % of copy, docs


def summary(results):
    """One line per kernel and shape: ours (fwd+bwd, or fwd for NF4) against each baseline of the same run.

    results: {kernel: (rows, copy_gbps)}, as `bench.load_results()` reads them from kernels/results/*.json.
    Times: per call (eager launches, what a loop of calls sees) and device (CUDA-graph replay: the kernels alone);
    % of copy from the device time; ratios are baseline / ours, per call and on the device.
    """
    lines = ["| kernel | shape | mode | ours ms per call | ours host ms | ours device ms | device % of copy | "
             "target | regime | eager / ours | compile / ours | liger or bnb / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kernel, (rows, copy_gbps) in results.items():
        for r in rows:
            r.finish(copy_gbps)
        keys = sorted({(r.shape, r.mode) for r in rows if r.provider == "ours" and r.ms}, key=str)
        for shape, mode in keys:
            if kernel != "nf4_dequantize" and mode != "fwd+bwd":
                continue
            by = {r.provider: r for r in rows if r.shape == shape and r.mode == mode}
            ours = by["ours"]

            def ratio(name):
                other = by.get(name)
                if other is None or not other.ms:
                    return "-"
                device = (f"{other.device_ms / ours.device_ms:.2f}x" if other.device_ms and ours.device_ms
                          else "-")
                return f"{other.ms / ours.ms:.2f}x / {device}"

            fmt = lambda v, spec: (spec % v) if v is not None else "-"  # noqa: E731
            other = ratio("liger") if "liger" in by else ratio("bitsandbytes")
            lines.append(f"| {kernel} | {shape} | {mode} | {ours.ms:.3f} | {fmt(ours.host_ms, '%.3f')} | "
                         f"{fmt(ours.device_ms, '%.3f')} | {fmt(ours.device_pct_copy, '%.0f%%')} | "
                         f"{TARGETS.get(kernel, '-')}% | {ours.regime} | {ratio('eager')} | {ratio('compile')} | "
                         f"{other} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="run every kernels/ script")
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of " + ",".join(SCRIPTS))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {SCRIPTS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    scripts = {name: runpy.run_path(str(HERE / f"{name}.py"), run_name="bench_all") for name in names}
    from lessons_lib.kernels import bench  # after the scripts: they find lessons_lib in the checkout if needed

    with bench.no_autotune():  # the checks' many small shapes would each autotune (compile every config)
        for name, ns in scripts.items():
            ns["check"](device)
    if device == "cpu":
        print(f"all checks passed in {time.perf_counter() - start:.0f} s; timing skipped (no GPU)")
        return

    copy_gbps = bench.copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    for name, ns in scripts.items():
        t0 = time.perf_counter()
        print(f"\n== {name}")
        result = ns["benchmark"](copy_gbps, args.quick)
        rows, notes = result if isinstance(result, tuple) else (result, "")
        bench.write_results(ns["KERNEL"], rows, copy_gbps, ns["FORMULA"], notes)
        print(f"   ({time.perf_counter() - t0:.0f} s)")
    # the summary covers every results file, so the suite can also be run in parts (--only)
    text = summary(bench.load_results())
    info = bench.hardware()
    header = [f"# Kernel summary ({info.get('gpu', '?')})", "",
              "- command: `python kernels/bench_all.py" + (" --quick" if args.quick else "") + "` (and --only parts)",
              "- hardware: " + ", ".join(f"{k} {v}" for k, v in info.items()),
              "- fwd+bwd for the four training kernels, fwd for NF4. ms per call: do_bench over eager calls; host: "
              "CPU time per call; device: do_bench over CUDA-graph replays of one call (the kernels alone). "
              "Regime: launch when host > device. % of copy: device-time bandwidth against the copy bandwidth "
              "measured in the same run as the row. Ratios: baseline / ours, per call / device. The per-kernel "
              "files hold every row, the command, the date and the configs the autotuner picked", ""]
    (bench.RESULTS_DIR / "summary.md").write_text("\n".join(header) + text + "\n")
    print("\n" + text)
    print(f"\nwrote {bench.RESULTS_DIR}/summary.md; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
