"""The health check (`python -m lessons_lib`): a readable table and exit 0 when ready; a one-line fix hint and
exit 1, never a traceback, when a required package is missing or broken."""

import os
import subprocess
import sys
import textwrap

import pytest

from lessons_lib import health


def run_health(tmp_path, prelude: str = "", extra_path: str | None = None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    code = prelude + "\nimport sys\nfrom lessons_lib.health import main\nsys.exit(main())\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_module_entry_point_reports_every_line():
    out = subprocess.run([sys.executable, "-m", "lessons_lib"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for key in ["lessons_lib", "Python", "torch", "Triton", "transformers", "peft", "bitsandbytes", "datasets",
                "accelerate", "bf16 supported", "attention", "READY"]:
        assert key in out.stdout, f"{key!r} missing from the health check output:\n{out.stdout}"
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("package", ["peft", "torch", "bitsandbytes"])
def test_missing_required_package_gives_hint_and_exit_1(tmp_path, package):
    out = run_health(tmp_path, prelude=f"import sys; sys.modules[{package!r}] = None")
    assert out.returncode == 1, out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("NOT READY") and package in last and "fix:" in last, last
    assert "Traceback" not in out.stdout + out.stderr


def test_broken_package_gives_hint_and_exit_1(tmp_path):
    fake = tmp_path / "fake_site" / "peft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('simulated broken install')\n")
    out = run_health(tmp_path, extra_path=str(tmp_path / "fake_site"))
    assert out.returncode == 1, out.stdout
    assert "peft: broken: RuntimeError: simulated broken install" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_triton_mode_reflects_interpreter_flag(monkeypatch):
    import torch
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert health.triton_mode(torch, triton).startswith("CPU interpreter")
    monkeypatch.delenv("TRITON_INTERPRET")
    expected = "GPU compiler" if torch.cuda.is_available() else "installed, no GPU"
    assert health.triton_mode(torch, triton).startswith(expected)
    assert health.triton_mode(torch, None).startswith("unavailable")


def test_render_aligns_columns():
    text = health.render([("a", "1"), ("longer key", "2")])
    lines = text.splitlines()
    assert lines[1].index("|") == lines[2].index("|") == len("longer key") + 1
