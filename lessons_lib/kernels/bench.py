"""Measuring kernels the way the top-level `kernels/*.py` scripts do (GPU only), and writing their results.

Three times per provider and shape, because a short kernel can be limited by the CPU that issues it rather than by
the GPU that runs it:

- per call (`ms`): `triton.testing.do_bench` of eager calls (warm-up, median of many runs, L2 flushed before each
  run), input gradients reset to None before each run (`grad_to_none`), so no `.grad +=` traffic is timed. This is
  GPU time between two events around one call: if the CPU issues the call's kernels more slowly than the GPU runs
  them, the GPU waits and the events measure the CPU. (The L2 flush before each run, a ~60 us memset, gives the
  CPU a head start of about that much, so up to ~60 us of CPU time per call stays hidden.)
- device (`device_ms`): the same call captured once in a CUDA graph (forward, and `backward` where timed), and
  `do_bench` over graph replays. A replay issues the captured kernels with one call, so nothing of the CPU side
  (Python, autograd, launch overhead) is left between them: the time of the kernels themselves, and the one
  bandwidth figure that means what it says. A provider that cannot be captured (it synchronizes, e.g. `.item()`)
  gets no device time and a note.
- host (`host_ms`): wall time of the CPU per call, issuing calls back to back (the GPU keeps up, so nothing
  waits). When host > device the op is launch-bound: the GPU idles between kernels and a faster kernel does not help.

- Bandwidth: *minimal* bytes (each input read once, each output written once; the formula is printed with every
  table) divided by the time; the device time's GB/s is compared with the copy bandwidth measured in the same run
  (`copy_bandwidth`).
- Memory: the peak allocated during one call above what was allocated before it.
- Baselines: eager PyTorch, `torch.compile` of the same function, and Liger-Kernel when it is installed.

Results go to `kernels/results/<kernel>.md` (a table, the command, the date and the hardware) and `.json`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[2] / "kernels" / "results"


@dataclass
class Row:
    """One measurement: a provider (eager, compile, liger, ours) on one shape (module docstring: the three times)."""

    kernel: str
    shape: str
    provider: str
    ms: float | None  # per call: median of do_bench over eager calls, forward (+ backward when `mode` says so)
    mode: str  # "fwd", "fwd+bwd"
    bytes: int  # minimal bytes moved, from the kernel's byte formula
    peak_mib: float | None = None  # peak allocation above the inputs during one call
    note: str = ""
    gbps: float | None = field(default=None)  # minimal bytes / per-call time
    pct_copy: float | None = field(default=None)
    device_ms: float | None = None  # median of do_bench over CUDA-graph replays of one call: the kernels alone
    host_ms: float | None = None  # CPU wall time to issue one call
    device_gbps: float | None = field(default=None)  # minimal bytes / device time
    device_pct_copy: float | None = field(default=None)

    def finish(self, copy_gbps: float | None) -> "Row":
        if self.ms:
            self.gbps = self.bytes / (self.ms * 1e-3) / 1e9
            self.pct_copy = 100 * self.gbps / copy_gbps if copy_gbps else None
        if self.device_ms:
            self.device_gbps = self.bytes / (self.device_ms * 1e-3) / 1e9
            self.device_pct_copy = 100 * self.device_gbps / copy_gbps if copy_gbps else None
        return self

    @property
    def regime(self) -> str:
        """"launch" when the CPU needs longer to issue a call than the GPU needs to run it, else "device"."""
        if self.device_ms is None or self.host_ms is None:
            return "-"
        return "launch" if self.host_ms > self.device_ms else "device"


def load_results(results_dir: Path = RESULTS_DIR) -> dict:
    """{kernel: (rows, copy_gbps)} from every results/<kernel>.json (each file from its own run)."""
    results = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        rows = [Row(**{k: v for k, v in row.items() if k in Row.__dataclass_fields__}) for row in data["rows"]]
        results[data["kernel"]] = (rows, data["copy_gbps"])
    return results


@contextlib.contextmanager
def no_autotune():
    """Launch every kernel with its first config inside the block (a check on many small shapes would otherwise
    autotune, i.e. compile every config, for each of them)."""
    from . import _common

    previous, _common.AUTOTUNE = _common.AUTOTUNE, False
    try:
        yield
    finally:
        _common.AUTOTUNE = previous


def hardware() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def time_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn() on the GPU."""
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def _reset(grad_to_none):
    for t in grad_to_none or ():
        t.grad = None


def device_time_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn's GPU work alone: fn captured once into a CUDA graph, replays timed by do_bench.

    Capturing records the kernels fn launches on the capture stream, backward passes included (autograd runs the
    backward of each op on the stream of its forward); a replay issues them all with one call. Gradients are reset
    to None before the capture, so the graph writes them afresh, as `grad_to_none` does for eager runs. Raises if
    fn cannot be captured (a host sync such as `.item()`, or a CPU tensor copy)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream before capturing, as torch.cuda.graph asks
        for _ in range(2):
            _reset(grad_to_none)
            fn()
    torch.cuda.current_stream().wait_stream(side)
    _reset(grad_to_none)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay)
    finally:
        _reset(grad_to_none)  # they live in the graph's memory pool
        del graph


def host_ms(fn, grad_to_none=None, calls: int = 25, repeats: int = 5) -> float:
    """Median wall milliseconds the CPU spends per call, issuing `calls` calls back to back without waiting.

    Only the CPU is timed: the GPU runs behind, and as long as its queue does not fill (a few hundred launches)
    nothing waits for it, unless fn itself synchronizes (then that wait is part of its cost)."""
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            _reset(grad_to_none)
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    torch.cuda.synchronize()
    return statistics.median(runs)


def peak_extra_mib(fn) -> float:
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """GB/s of `dst.copy_(src)` for a 1 GiB buffer: reads nbytes, writes nbytes. The roof to compare against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def compiled(fn):
    """torch.compile(fn), or None with the reason printed (e.g. no working compiler on this machine)."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as err:  # noqa: BLE001 - any failure just drops the baseline
        print(f"  torch.compile unavailable: {err}")
        return None


def liger():
    """The `liger_kernel.transformers.functional` module, or None (it is an optional baseline)."""
    try:
        import liger_kernel
        from liger_kernel.transformers import functional
    except Exception as err:  # noqa: BLE001
        print(f"  Liger-Kernel not available ({type(err).__name__}: {err}); its rows are skipped")
        return None
    functional.version = getattr(liger_kernel, "__version__", "?")
    return functional


def measure(rows: list, kernel: str, shape: str, provider: str, mode: str, nbytes: int, fn, grad_to_none=None,
            note: str = "") -> None:
    """Time fn three ways (module docstring) and its peak memory, and append a Row. A provider that fails gets a
    row with its error; one that cannot be captured in a CUDA graph keeps its other numbers and gets a note."""
    try:
        fn()  # warm-up: compiles, autotunes
        ms = time_ms(fn, grad_to_none)
        peak = peak_extra_mib(fn)
        host = host_ms(fn, grad_to_none)
    except Exception as err:  # noqa: BLE001 - a baseline that breaks must not stop the others
        rows.append(Row(kernel, shape, provider, None, mode, nbytes, None, f"failed: {type(err).__name__}: {err}"))
        print(f"  {provider:>12} {mode:<8} {shape:<28} FAILED {type(err).__name__}: {str(err)[:120]}")
        return
    try:
        device = device_time_ms(fn, grad_to_none)
    except Exception as err:  # noqa: BLE001 - e.g. a host sync inside fn
        device, note = None, (note + "; " if note else "") + f"no CUDA graph: {type(err).__name__}: {str(err)[:80]}"
        torch.cuda.synchronize()
    row = Row(kernel, shape, provider, ms, mode, nbytes, peak, note, device_ms=device, host_ms=host)
    rows.append(row)
    dev = f"{device:8.3f}" if device is not None else "       -"
    print(f"  {provider:>12} {mode:<8} {shape:<28} call {ms:7.3f}  device {dev}  host {host:7.3f} ms  "
          f"{nbytes / (device or ms) / 1e6:6.0f} GB/s  +{peak:6.0f} MiB  {row.regime}")


def _fmt(value, spec: str) -> str:
    return (spec % value) if value is not None else "-"


def table(rows: list, copy_gbps: float | None) -> str:
    """A markdown table of the rows; "ours vs this": this provider's time / ours on the same shape and mode, per
    call and on the device."""
    rows = [r.finish(copy_gbps) for r in rows]
    lines = ["| shape | mode | provider | ms per call | host ms | device ms | device GB/s (minimal bytes) | "
             "device % of copy | regime | peak +MiB | ours vs this (call / device) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = next((o for o in rows if o.provider == "ours" and o.shape == r.shape and o.mode == r.mode), None)
        speedup = ""
        if ours and r.provider != "ours" and ours.ms and r.ms:
            speedup = f"{r.ms / ours.ms:.2f}x / " + (f"{r.device_ms / ours.device_ms:.2f}x"
                                                     if r.device_ms and ours.device_ms else "-")
        lines.append(f"| {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '%.3f')} | {_fmt(r.host_ms, '%.3f')} | "
                     f"{_fmt(r.device_ms, '%.3f')} | {_fmt(r.device_gbps, '%.0f')} | "
                     f"{_fmt(r.device_pct_copy, '%.0f%%')} | {r.regime} | {_fmt(r.peak_mib, '%.0f')} | "
                     f"{'; '.join(x for x in (speedup, r.note) if x)} |")
    return "\n".join(lines)


def picked_configs(kernel: str) -> str:
    """What the autotuner picked for each launcher of `kernel`'s module in this process, one line per key."""
    from . import _common

    module_name = {"nf4_dequantize": "dequant"}.get(kernel, kernel)
    module = sys.modules.get(f"lessons_lib.kernels.{module_name}")
    lines = []
    for name, launcher in sorted(vars(module).items() if module else []):
        if isinstance(launcher, _common.Launcher):
            for (values, dtypes), config in launcher.picked.items():
                key = ", ".join(f"{k}={v}" for k, v in zip(launcher.key, values))
                lines.append(f"- `{name}` ({key or 'any shape'}; {str(dtypes[0]).replace('torch.', '')}): "
                             + ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
                             + f", num_warps={config.num_warps}")
    return "\n".join(["Configs the autotuner picked in this run:", "", *lines]) if lines else ""


def write_results(kernel: str, rows: list, copy_gbps: float | None, formula: str, notes: str = "",
                  results_dir: Path = RESULTS_DIR) -> Path:
    """Write results/<kernel>.md and .json: the table, the byte formula, the command, the date, the hardware."""
    results_dir.mkdir(parents=True, exist_ok=True)
    info = hardware()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# {kernel}: measured results", "",
          f"- command: `{command}`", f"- date: {date}",
          "- hardware: " + ", ".join(f"{k} {v}" for k, v in info.items()),
          f"- copy bandwidth measured in the same run: {copy_gbps:.0f} GB/s" if copy_gbps else "- copy bandwidth: -",
          f"- minimal bytes: {formula}",
          "- ms per call: median of `triton.testing.do_bench` over eager calls; device ms: the same over replays of "
          "one call captured in a CUDA graph (the kernels alone); host ms: CPU wall time per call, calls issued "
          "back to back; regime: launch when host > device (the GPU waits for the CPU); input grads reset to None "
          "before each run; bandwidth and % of copy from the device time", "",
          table(rows, copy_gbps), ""]
    md += [text + "\n" for text in (notes, picked_configs(kernel)) if text]
    path = results_dir / f"{kernel}.md"
    path.write_text("\n".join(md))
    (results_dir / f"{kernel}.json").write_text(json.dumps(
        {"kernel": kernel, "command": command, "date": date, "hardware": info, "copy_gbps": copy_gbps,
         "formula": formula, "rows": [asdict(r) for r in rows]}, indent=1))
    return path


def script_main(doc: str, kernel: str, source_module: str, check, benchmark, formula: str) -> None:
    """The command line every `kernels/<kernel>.py` script shares: check (always), then time (GPU only).

    `benchmark(copy_gbps, quick)` returns the rows, or (rows, notes) when the results need a note.
    """
    import argparse
    import importlib
    import inspect

    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--source", action="store_true", help="print the kernels' source and exit")
    args = parser.parse_args()
    if args.source:
        print(inspect.getsource(importlib.import_module(source_module)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with no_autotune():  # the checks' many small shapes would each autotune (compile every config)
        check(device)
    if device == "cpu":
        print("timing skipped: no GPU here (the interpreter runs kernels in Python; its speed says nothing)")
        return
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    result = benchmark(copy_gbps, args.quick)
    rows, notes = result if isinstance(result, tuple) else (result, None)
    print(table(rows, copy_gbps))
    print("wrote", write_results(kernel, rows, copy_gbps, formula, notes or ""))
