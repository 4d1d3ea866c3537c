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
    for provider, ms, device, host in [("eager", 2.0, 1.8, 0.3), ("compile", 0.6, 0.5, 0.1), ("liger", 0.7, None, 0.8),
                                       ("ours", 0.25, 0.125, 0.2)]:
        rows.append(bench.Row("rms_norm", "32768 x 1536", provider, ms, "fwd+bwd", 503_316_480, 100.0,
                              device_ms=device, host_ms=host))
    rows.append(bench.Row("rms_norm", "32768 x 1536", "broken", None, "fwd+bwd", 1, None, "failed: ValueError: x"))
    text = bench.table(rows, copy_gbps=4000.0)
    # ours: 503 MB in 0.125 ms on the device = 4027 GB/s = 101% of copy; host 0.2 ms > device: launch-bound
    assert "| 32768 x 1536 | fwd+bwd | ours | 0.250 | 0.200 | 0.125 | 4027 | 101% | launch | 100 |  |" in text
    assert "| eager | 2.000 | 0.300 | 1.800 | 280 | 7% | device | 100 | 8.00x / 14.40x |" in text
    assert "| liger | 0.700 | 0.800 | - | - | - | - | 100 | 2.80x / - |" in text
    assert "failed: ValueError" in text

    path = bench.write_results("rms_norm", rows, 4000.0, "5 M N e", "a note", results_dir=tmp_path)
    assert "a note" in path.read_text() and "5 M N e" in path.read_text()
    data = json.loads((tmp_path / "rms_norm.json").read_text())
    ours = data["rows"][3]
    assert ours["provider"] == "ours" and abs(ours["pct_copy"] - 50.33) < 0.01
    assert abs(ours["device_pct_copy"] - 100.66) < 0.01 and ours["host_ms"] == 0.2

    summary = runpy.run_path(str(KERNELS_DIR / "bench_all.py"), run_name="test")["summary"]
    nf4 = [bench.Row("nf4_dequantize", "8960 x 1536", p, ms, "fwd", 34_000_000, device_ms=d, host_ms=0.02)
           for p, ms, d in [("eager", 0.5, 0.4), ("ours", 0.01, 0.008), ("bitsandbytes", 0.012, 0.004)]]
    assert set(bench.load_results(tmp_path)) == {"rms_norm"}
    line = summary({"rms_norm": bench.load_results(tmp_path)["rms_norm"], "nf4_dequantize": (nf4, 4000.0)})
    assert ("| rms_norm | 32768 x 1536 | fwd+bwd | 0.250 | 0.200 | 0.125 | 101% | 85% | launch | 8.00x / 14.40x | "
            "2.40x / 4.00x | 2.80x / - |") in line
    assert ("| nf4_dequantize | 8960 x 1536 | fwd | 0.010 | 0.020 | 0.008 | 106% | 80% | launch | 50.00x / 50.00x | "
            "- | 1.20x / 0.50x |") in line


def test_results_files_of_an_earlier_format_still_load(tmp_path):
    """kernels/results/*.json written before the device and host columns existed load (those are None)."""
    old_row = dict(kernel="rope", shape="q 8x12x512x128", provider="ours", ms=0.5, mode="fwd+bwd", bytes=10,
                   peak_mib=1.0, note="", gbps=1.0, pct_copy=2.0)
    (tmp_path / "rope.json").write_text(json.dumps({"kernel": "rope", "copy_gbps": 4000.0, "rows": [old_row]}))
    (rows, copy_gbps), = bench.load_results(tmp_path).values()
    assert rows[0].device_ms is None and rows[0].regime == "-" and copy_gbps == 4000.0
