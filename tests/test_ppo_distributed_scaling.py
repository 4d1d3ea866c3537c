"""benchmarks/scaling.py --quick: one `accelerate launch` with 1 process and one with 2 (gloo, a tiny random
Qwen2 in 4 bits + LoRA), the table and the JSON it writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_scaling_run_writes_both_rows(tmp_path):
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick", "--out", str(out),
                           "--model-dir", str(tmp_path / "model")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = data["runs"]
    assert set(runs) == {"1", "2"} and all("error" not in r for r in runs.values()), runs
    assert [len(runs[n]["ranks"]) for n in ("1", "2")] == [1, 2]
    assert runs["2"]["global_batch"] == 2 * runs["1"]["global_batch"]        # a fixed batch per process
    assert runs["2"]["ranks"][0]["sync_s"] > 0 and runs["1"]["ranks"][0]["sync_s"] == 0
    assert 0 < runs["2"]["scaling_efficiency"] < 4 and runs["1"]["episodes_per_s_total"] > 0
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "scaling.py --quick" in table
