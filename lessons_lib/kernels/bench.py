"""Measuring kernels the way the top-level `kernels/*.py` scripts do (GPU only), and writing their results.

- Time: `triton.testing.do_bench` (warm-up, then the median of many runs, with the L2 cache flushed between them);
  input gradients are reset to None before each run (`grad_to_none`), so no `.grad +=` traffic is timed.
- Bandwidth: *minimal* bytes (each input read once, each output written once; the formula is printed with every
  table) divided by the time. Compare it with the copy bandwidth measured in the same run (`copy_bandwidth`).
- Memory: the peak allocated during one call above what was allocated before it.
- Baselines: eager PyTorch, `torch.compile` of the same function, and Liger-Kernel when it is installed.

Results go to `kernels/results/<kernel>.md` (a table, the command, the date and the hardware) and `.json`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[2] / "kernels" / "results"


@dataclass
class Row:
    """One measurement: a provider (eager, compile, liger, ours) on one shape."""

    kernel: str
    shape: str
    provider: str
    ms: float | None  # median time of forward (+ backward when `mode` says so)
    mode: str  # "fwd", "fwd+bwd"
    bytes: int  # minimal bytes moved, from the kernel's byte formula
    peak_mib: float | None = None  # peak allocation above the inputs during one call
    note: str = ""
    gbps: float | None = field(default=None)
    pct_copy: float | None = field(default=None)

    def finish(self, copy_gbps: float | None) -> "Row":
        if self.ms:
            self.gbps = self.bytes / (self.ms * 1e-3) / 1e9
            self.pct_copy = 100 * self.gbps / copy_gbps if copy_gbps else None
        return self


def load_results(results_dir: Path = RESULTS_DIR) -> dict:
    """{kernel: (rows, copy_gbps)} from every results/<kernel>.json (each file from its own run)."""
    results = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        rows = [Row(**{k: v for k, v in row.items()}) for row in data["rows"]]
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
    """Time fn (and its peak memory) and append a Row; a failing provider becomes a row with its error."""
    try:
        fn()  # warm-up: compiles, autotunes
        ms = time_ms(fn, grad_to_none)
        peak = peak_extra_mib(fn)
    except Exception as err:  # noqa: BLE001 - a baseline that breaks must not stop the others
        rows.append(Row(kernel, shape, provider, None, mode, nbytes, None, f"failed: {type(err).__name__}: {err}"))
        print(f"  {provider:>10} {mode:<8} {shape:<28} FAILED {type(err).__name__}: {str(err)[:120]}")
        return
    rows.append(Row(kernel, shape, provider, ms, mode, nbytes, peak, note))
    print(f"  {provider:>10} {mode:<8} {shape:<28} {ms:8.3f} ms  {nbytes / ms / 1e6:8.0f} GB/s  +{peak:8.0f} MiB")


def table(rows: list, copy_gbps: float | None) -> str:
    """A markdown table of the rows, with speed-ups against eager, compile and liger on the same shape and mode."""
    rows = [r.finish(copy_gbps) for r in rows]
    lines = ["| shape | mode | provider | ms | GB/s (minimal bytes) | % of copy | peak +MiB | ours vs this |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = next((o for o in rows if o.provider == "ours" and o.shape == r.shape and o.mode == r.mode), None)
        speedup = f"{r.ms / ours.ms:.2f}x" if ours and ours.ms and r.ms and r.provider != "ours" else ""
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        lines.append(f"| {r.shape} | {r.mode} | {r.provider} | {fmt(r.ms, '%.3f')} | {fmt(r.gbps, '%.0f')} | "
                     f"{fmt(r.pct_copy, '%.0f%%')} | {fmt(r.peak_mib, '%.0f')} | {speedup or r.note} |")
    return "\n".join(lines)


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
          "- times: median of `triton.testing.do_bench`; input grads reset to None before each run", "",
          table(rows, copy_gbps), ""]
    if notes:
        md += [notes, ""]
    path = results_dir / f"{kernel}.md"
    path.write_text("\n".join(md))
    (results_dir / f"{kernel}.json").write_text(json.dumps(
        {"kernel": kernel, "command": command, "date": date, "hardware": info, "copy_gbps": copy_gbps,
         "formula": formula, "rows": [asdict(r) for r in rows]}, indent=1))
    return path
