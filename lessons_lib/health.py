"""The health check: `python -m lessons_lib` (dissected in notebooks/00_env_check.ipynb).

It answers, in one table, the questions every later lesson depends on: which versions are installed, which device
the course will use, whether bf16 works there, how Triton kernels will run (compiled for the GPU, in the CPU
interpreter, or not at all) and which attention implementation transformers will pick.

Rules: only the standard library is imported at module level, every probe is guarded, and a missing or broken
required package ends with a non-zero exit code and a one-line fix hint instead of a traceback.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import platform
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

REQUIRED = ["torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "safetensors", "tokenizers"]
OPTIONAL = ["triton", "matplotlib", "ipywidgets", "gguf", "flash_attn"]
FIX_HINT = "fix: run `make install` in the repository (or `pip install -e .`) inside the course's virtualenv"


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
        if e.name == name or (e.name and name.startswith(e.name)):
            return None, "missing"
        return None, f"broken: needs {e.name!r}"
    except Exception as e:  # any import-time failure counts as broken
        return None, f"broken: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}".rstrip(": ")
    return module, getattr(module, "__version__", "installed")


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
            r.problems.append(f"{name}: {status[name]}")
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

    flags = cpu_flags()
    cores = os.cpu_count() or 0
    threads = torch.get_num_threads() if torch is not None else "?"
    r.add("CPU", f"{platform.machine()}, {cores} cores, torch threads {threads}"
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
