"""The health check: `python -m lessons_lib` (dissected in notebooks/00_env_check.ipynb).

It answers, in one table, the questions every later lesson depends on: which versions are installed, which device
the course will use (CPU cores and RAM, GPU memory), whether bf16 works there, how Triton kernels will run (compiled
for the GPU, in the CPU interpreter, or not at all) and which attention implementation transformers will pick.

Rules: only the standard library is imported at module level, every probe is guarded, and a missing or broken
required package -- every runtime dependency in pyproject.toml, jupyterlab included although only `make lab`
starts it -- ends with NOT READY, a non-zero exit code and a one-line fix hint instead of a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import logging
import os
import platform
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

# The runtime dependencies of pyproject.toml, by import name: a missing or broken one means NOT READY (exit 1).
# triton is one on Linux only (its marker there); elsewhere kernels fall back to their torch reference.
TRITON_REQUIRED = platform.system() == "Linux"
REQUIRED = ["torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors", "tokenizers",
            "numpy", "pandas", "tqdm", "matplotlib", "ipywidgets", "gguf", "jupyterlab"]
REQUIRED += ["triton"] if TRITON_REQUIRED else []
OPTIONAL = ([] if TRITON_REQUIRED else ["triton"]) + ["flash_attn"]
# what a required package is for, where its name does not say (printed next to a missing or broken one)
NEEDED_FOR = {"jupyterlab": "needed by `make lab`", "ipywidgets": "lesson 04's PPO stepper widget",
              "matplotlib": "the lessons' plots", "tqdm": "progress bars", "gguf": "lesson 06's GGUF export",
              "triton": "lesson 07's kernels"}
FIX_HINT = ("fix: in the repository, inside the course's virtualenv, run `pip install -c constraints.txt -e .` "
            "(`make install` runs it on first use only)")


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # missing/broken required packages: exit code 1
    notes: list[str] = field(default_factory=list)      # worth knowing, not fatal

    def add(self, key: str, value: str) -> None:
        self.rows.append((key, value))


def _quiet_import(name: str):
    """Import a module with its import-time chatter (bitsandbytes logs a warning on CPU) silenced."""
    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(sink), redirect_stderr(sink):
            return importlib.import_module(name)
    finally:
        logging.disable(previous)


def probe_package(name: str):
    """Return (module or None, status string). Status is a version, 'missing' or 'broken: <why>'."""
    try:
        module = _quiet_import(name)
    except ModuleNotFoundError as e:
        if e.name == name or (e.name and name.startswith(e.name + ".")):
            return None, "missing"
        return None, f"broken: needs {e.name!r}"
    except Exception as e:  # any import-time failure counts as broken
        return None, f"broken: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}".rstrip(": ")
    version = getattr(module, "__version__", None)
    if not isinstance(version, str):  # gguf has no __version__: ask the installed distribution
        try:
            version = importlib.metadata.version(name)
        except (importlib.metadata.PackageNotFoundError, ValueError):
            version = "installed"
    return module, version


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def memory(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup") -> dict:
    """RAM in bytes: {"total", "available", "limit"}, each None when unknown or absent.

    Linux: /proc/meminfo (MemTotal, MemAvailable) and the memory limit a container sets on its cgroup (v2
    memory.max, v1 memory.limit_in_bytes). Elsewhere: os.sysconf (macOS and other POSIX systems, total only), then
    GlobalMemoryStatusEx (Windows).
    """
    out = {"total": None, "available": None, "limit": None}
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["total"] = int(fields["MemTotal"].split()[0]) * 1024
        out["available"] = int(fields["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in fields else None
    except (OSError, KeyError, ValueError, IndexError):
        pass
    if out["total"] is not None:
        for limit_file in ("memory.max", "memory/memory.limit_in_bytes"):
            try:
                with open(os.path.join(cgroup_root, limit_file)) as f:
                    limit = int(f.read().strip())  # "max" (no limit) is not a number: skipped
            except (OSError, ValueError):
                continue
            if 0 < limit < out["total"]:  # v1 writes "no limit" as a huge number
                out["limit"] = limit
            break
        return out
    try:
        out["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return out
    except (AttributeError, ValueError, OSError):
        pass
    if sys.platform == "win32":
        try:
            import ctypes

            class MemoryStatus(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

            status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                out["total"], out["available"] = int(status.ullTotalPhys), int(status.ullAvailPhys)
        except Exception:  # no ctypes, an unexpected Windows: the row says unknown
            pass
    return out


def memory_line(mem: dict) -> str:
    """The CPU row's memory part, e.g. "RAM 15.5 GiB (11.2 GiB available), container limit 8.0 GiB"."""
    if mem.get("total") is None:
        return "RAM unknown"
    line = f"RAM {_gib(mem['total'])}"
    if mem.get("available") is not None:
        line += f" ({_gib(mem['available'])} available)"
    if mem.get("limit") is not None:
        line += f", container limit {_gib(mem['limit'])}"
    return line


def triton_mode(torch, triton) -> str:
    if triton is None:
        return "unavailable: Triton kernels fall back to their torch reference"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "CPU interpreter (TRITON_INTERPRET=1): kernels run, slowly, for learning and tests"
    if torch is not None and torch.cuda.is_available():
        return "GPU compiler: kernels are compiled for the GPU"
    return "installed, no GPU: kernels use their torch reference (set TRITON_INTERPRET=1 to step them on CPU)"


def attention_impl(torch, flash_attn) -> str:
    """What `load_model` will ask transformers for (models.default_attention): FlashAttention-2 on a GPU in 16-bit
    when `flash_attn` is installed, else torch's scaled_dot_product_attention."""
    if torch is not None and torch.cuda.is_available() and flash_attn is not None:
        return "flash_attention_2 (flash_attn installed; load_model requests it on the GPU in 16-bit)"
    return "sdpa (torch scaled_dot_product_attention)"


def bf16_line(torch) -> str:
    """Same rule as `lessons_lib.is_bfloat16_supported`: bf16 training only on a GPU with native bf16."""
    if torch is None:
        return "unknown (no torch)"
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "yes: training dtype bf16" if native else "no: training dtype fp16 (with loss scaling)"
    return "no on CPU (bf16 matmuls are emulated and slower): training dtype fp32"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def collect() -> Report:
    from lessons_lib import __version__

    r = Report()
    r.add("lessons_lib", __version__)
    r.add("Python", f"{platform.python_version()} ({sys.executable})")
    modules, status = {}, {}
    for name in REQUIRED + OPTIONAL:
        modules[name], status[name] = probe_package(name)
        if name in REQUIRED and modules[name] is None:
            r.problems.append(f"{name}: {status[name]}" + (f" ({NEEDED_FOR[name]})" if name in NEEDED_FOR else ""))
    torch = modules["torch"]

    cuda = "" if torch is None else f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
    r.add("torch", status["torch"] + cuda)
    r.add("Triton", f"{status['triton']} · {triton_mode(torch, modules['triton'])}")
    for name in ["transformers", "peft", "datasets", "accelerate"]:
        r.add(name, status[name])
    bnb = modules["bitsandbytes"]
    backend = ""
    if bnb is not None:
        backend = f" (backend {getattr(sys.modules.get('bitsandbytes.cextension'), 'BNB_BACKEND', '?')})"
    r.add("bitsandbytes", status["bitsandbytes"] + backend)
    for key, names in [("notebooks", ["jupyterlab", "ipywidgets", "matplotlib", "tqdm"]),
                       ("other libraries", ["numpy", "pandas", "safetensors", "tokenizers", "gguf"])]:
        r.add(key, " · ".join(f"{name} {status[name]}" for name in names))

    flags = cpu_flags()
    cores = os.cpu_count() or 0
    threads = torch.get_num_threads() if torch is not None else "?"
    r.add("CPU", f"{platform.machine()}, {cores} cores, torch threads {threads}, {memory_line(memory())}"
          + (", AVX512-BF16" if "avx512_bf16" in flags else ""))
    if "avx512_bf16" in flags and bnb is not None:
        r.notes.append("this CPU has AVX512-BF16: load_model applies the bitsandbytes 4-bit repack fix "
                       "(see docs/ENVIRONMENT.md) so LoRA training still works after generate()")
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            r.add(f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    else:
        r.add("GPU", "none: the course runs the tiny offline world on CPU")
    r.add("bf16 supported", bf16_line(torch))
    r.add("attention", attention_impl(torch, modules["flash_attn"]))
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    r.add("Hugging Face hub", "offline (HF_HUB_OFFLINE=1)" if offline else "online allowed")
    return r


def verdict(r: Report, torch) -> str:
    if r.problems:
        return "NOT READY: " + "; ".join(r.problems) + f" -> {FIX_HINT}"
    if torch.cuda.is_available():
        return "READY: GPU found, every lesson can use a real model (MODEL=...) or the tiny world"
    return "READY: CPU only, every lesson runs on the tiny offline world"


def render(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    out = [line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    try:
        report = collect()
    except Exception as e:  # a probe itself failed: still no traceback for the learner
        print(f"health check failed: {type(e).__name__}: {e}\n{FIX_HINT}")
        return 1
    print(render(report.rows))
    for note in report.notes:
        print(f"note: {note}")
    print(verdict(report, sys.modules.get("torch")))
    return 1 if report.problems else 0
