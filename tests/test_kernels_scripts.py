"""The top-level kernels/ scripts: their checks run (interpreter on CPU), and their reporting code works.

The GPU half of the scripts (timing) cannot run here; its table and summary writers are exercised on made-up rows
so that a GPU run does not fail on a formatting bug.
"""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lessons_lib.kernels import bench

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


def test_kernels_folder_is_not_a_package():
    assert not (KERNELS_DIR / "__init__.py").exists(), "kernels/ must not be a package (bitsandbytes imports `kernels`)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, run kernels/bench_all.py itself")
def test_bench_all_runs_the_checks_on_cpu():
    out = subprocess.run([sys.executable, str(KERNELS_DIR / "bench_all.py"), "--only", "swiglu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "all checks passed" in out.stdout and "timing skipped" in out.stdout


@pytest.mark.parametrize("script", ["rms_norm", "rope", "logprobs", "nf4_dequantize"])
def test_script_checks_pass(script):
    """Each walkthrough's check (first shape, three dtypes) runs and passes on this machine's device."""
    namespace = runpy.run_path(str(KERNELS_DIR / f"{script}.py"), run_name="test")
    with bench.no_autotune():
        namespace["check"]("cuda" if torch.cuda.is_available() else "cpu", quick=True)


def test_every_kernel_compiles_for_a_gpu_without_one():
    """Ahead-of-time compilation for sm_90 (H100/H200): catches what the interpreter accepts but the GPU compiler
    does not. Default configs here; `python kernels/compile_check.py` compiles them all and shows registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(KERNELS_DIR / "compile_check.py"), "--first-only"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "every config compiled for sm_90" in out.stdout


def test_tables_summary_and_results_files(tmp_path):
    rows = []
    for provider, ms in [("eager", 2.0), ("compile", 0.6), ("liger", 0.7), ("ours", 0.25)]:
        rows.append(bench.Row("rms_norm", "32768 x 1536", provider, ms, "fwd+bwd", 503_316_480, 100.0))
    rows.append(bench.Row("rms_norm", "32768 x 1536", "broken", None, "fwd+bwd", 1, None, "failed: ValueError: x"))
    text = bench.table(rows, copy_gbps=4000.0)
    assert "| 32768 x 1536 | fwd+bwd | ours | 0.250 | 2013 | 50% |" in text
    assert "8.00x" in text and "failed: ValueError" in text

    path = bench.write_results("rms_norm", rows, 4000.0, "5 M N e", "a note", results_dir=tmp_path)
    assert "a note" in path.read_text() and "5 M N e" in path.read_text()
    data = json.loads((tmp_path / "rms_norm.json").read_text())
    assert data["rows"][3]["provider"] == "ours" and abs(data["rows"][3]["pct_copy"] - 50.33) < 0.01

    summary = runpy.run_path(str(KERNELS_DIR / "bench_all.py"), run_name="test")["summary"]
    nf4 = [bench.Row("nf4_dequantize", "8960 x 1536", p, ms, "fwd", 34_000_000) for p, ms in
           [("eager", 0.5), ("ours", 0.01), ("bitsandbytes", 0.012)]]
    assert set(bench.load_results(tmp_path)) == {"rms_norm"}
    line = summary({"rms_norm": bench.load_results(tmp_path)["rms_norm"], "nf4_dequantize": (nf4, 4000.0)})
    assert "| rms_norm | 32768 x 1536 | fwd+bwd | 0.250 | 50% | 85% | 8.00x | 2.40x | 2.80x |" in line
    assert "| nf4_dequantize | 8960 x 1536 | fwd | 0.010 | 85% | 80% | 50.00x | - | 1.20x |" in line
