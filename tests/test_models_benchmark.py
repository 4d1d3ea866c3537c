"""benchmarks/train_step.py runs end to end (--quick: tiny config on CPU) and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path):
    out = tmp_path / "train_step"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick",
           "--stacks", "hf_peft,lessons,fast_graph_offload",
           "--steps", "2", "--warmup", "1", "--model-dir", str(tmp_path / "model"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["stack"] for r in results] == ["hf_peft", "lessons", "fast_graph_offload"]
    # same weights, same batch, same first loss: the fused loss and FastDecoder compute the transformers loss
    assert all(abs(r["first_loss"] - results[0]["first_loss"]) < 1e-4 for r in results)
    assert not results[2]["graphed"]  # no GPU here: the step runs eagerly
    assert all(r["ms_per_step"] > 0 and r["trainable_params"] == results[0]["trainable_params"] for r in results)
    table = out.with_suffix(".md").read_text()
    assert "| transformers + peft, no upcast" in table and "command:" in table and "(no GPU: eager)" in table
