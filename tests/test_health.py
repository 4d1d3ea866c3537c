"""The health check (`python -m lessons_lib`): a readable table and exit 0 when ready; a one-line fix hint and
exit 1, never a traceback, when a required package (any runtime dependency in pyproject.toml) is missing or broken."""

import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

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
                "accelerate", "notebooks", "jupyterlab", "ipywidgets", "matplotlib", "tqdm", "numpy", "pandas", "gguf",
                "bf16 supported", "attention", "READY"]:
        assert key in out.stdout, f"{key!r} missing from the health check output:\n{out.stdout}"
    assert re.search(r"^CPU +\| .*, RAM (\d+\.\d GiB|unknown)", out.stdout, re.M), out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("package", ["peft", "torch", "bitsandbytes", "jupyterlab"])
def test_missing_required_package_gives_hint_and_exit_1(tmp_path, package):
    out = run_health(tmp_path, prelude=f"import sys; sys.modules[{package!r}] = None")
    assert out.returncode == 1, out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("NOT READY") and package in last and "fix:" in last, last
    assert "Traceback" not in out.stdout + out.stderr
    if package == "jupyterlab":  # the table still shows every row; the verdict says what needs it
        assert "jupyterlab: missing (needed by `make lab`" in last
        assert re.search(r"^notebooks +\| jupyterlab missing · ipywidgets ", out.stdout, re.M), out.stdout


def test_every_runtime_dependency_is_checked():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for requirement in pyproject["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower().replace("-", "_")
        marker = requirement.partition(";")[2].strip()
        if marker:  # the one marker in use: platform_system == 'Linux'
            assert marker == "platform_system == 'Linux'", marker
            assert (name in health.REQUIRED) == (platform.system() == "Linux"), name
            assert name in health.REQUIRED + health.OPTIONAL, name
        else:
            assert name in health.REQUIRED, f"{name} is a runtime dependency the health check does not require"


@pytest.mark.parametrize("package", ["tqdm", "matplotlib", "ipywidgets", "gguf", "numpy", "pandas", None])
def test_each_runtime_dependency_tested_both_ways(monkeypatch, capsys, package):
    """In-process (the subprocess tests above cover the entry point): READY and exit 0 with everything installed,
    NOT READY, exit 1 and the fix hint with `package` missing."""
    for name in health.REQUIRED:  # imported first, so that blocking one cannot leave another half imported
        health.probe_package(name)
    if package is not None:
        monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    code = health.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    if package is None:
        assert code == 0 and last.startswith("READY"), last
    else:
        assert code == 1 and last.startswith(f"NOT READY: {package}: missing") and "fix:" in last, last


def test_memory_from_proc_meminfo_and_container_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    mem = health.memory(str(meminfo), str(cgroup))  # no limit file: no limit
    assert mem == {"total": 16384000 * 1024, "available": 8192000 * 1024, "limit": None}
    assert health.memory_line(mem) == "RAM 15.6 GiB (7.8 GiB available)"
    (cgroup / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert health.memory(str(meminfo), str(cgroup))["limit"] is None
    (cgroup / "memory.max").write_text(f"{4 * 2**30}\n")
    mem = health.memory(str(meminfo), str(cgroup))
    assert health.memory_line(mem) == "RAM 15.6 GiB (7.8 GiB available), container limit 4.0 GiB"
    (cgroup / "memory.max").unlink()
    (cgroup / "memory").mkdir()
    (cgroup / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # cgroup v1: no limit
    assert health.memory(str(meminfo), str(cgroup))["limit"] is None


def test_memory_falls_back_then_says_unknown(tmp_path, monkeypatch):
    absent = str(tmp_path / "no_meminfo")
    monkeypatch.setattr(health.os, "sysconf", lambda key: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**20}[key])
    assert health.memory(absent, str(tmp_path)) == {"total": 4 * 2**30, "available": None, "limit": None}
    assert health.memory_line(health.memory(absent, str(tmp_path))) == "RAM 4.0 GiB"

    def no_sysconf(key):
        raise ValueError(f"unrecognized configuration name {key!r}")

    monkeypatch.setattr(health.os, "sysconf", no_sysconf)
    monkeypatch.setattr(health.sys, "platform", "unknown-os")
    assert health.memory_line(health.memory(absent, str(tmp_path))) == "RAM unknown"


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
