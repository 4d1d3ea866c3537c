"""The Colab setup cell, tested offline by simulating Colab: a fake `google.colab` module, the repository cloned
from a local `file://` URL, and pip redirected into a temporary folder (no dependencies, no index)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # absent on the GPU image; CI has it
from nbclient import NotebookClient

from lessons_lib import course

REPO = Path(__file__).resolve().parents[1]


def kernel_run(cells: list[str], cwd: Path) -> list[str]:
    """Run cells in a fresh IPython kernel (the setup cell uses `!` shell magics); return their stdout texts."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in nb.cells]


def test_setup_cell_does_nothing_outside_colab(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LESSONS_LIB_HOME", str(home))
    out = kernel_run([course.setup_cell_source(), "import os; print(os.getcwd())"], cwd=tmp_path)
    assert out[1].strip() == str(tmp_path)
    assert not home.exists()


def test_setup_cell_installs_from_a_clone_on_simulated_colab(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("IN_COLAB = True\n")
    home, site = tmp_path / "content" / "lessons_lib", tmp_path / "site"
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("LESSONS_LIB_REPO", f"file://{REPO}")
    monkeypatch.setenv("LESSONS_LIB_HOME", str(home))
    # pip reads PIP_<OPTION> variables: install into a scratch folder, offline, without touching this virtualenv.
    # (PIP_NO_BUILD_ISOLATION=0 *disables* isolation: a documented pip quirk for negative options.)
    for key, value in {"PIP_TARGET": str(site), "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1",
                       "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}.items():
        monkeypatch.setenv(key, value)

    out = kernel_run([
        "import google.colab, sys; print('google.colab' in sys.modules)",
        course.setup_cell_source(),
        "import os; print(os.getcwd()); print(os.environ['LESSONS_LIB_DATA'])",
        course.setup_cell_source(),  # a second run (Colab "run all" twice) must not clone again
    ], cwd=tmp_path)
    assert out[0].strip() == "True"
    cwd, data = out[2].split()
    assert cwd == str(home / "notebooks") and data == str(home / "data")
    assert (home / ".git").is_dir() and (home / "notebooks" / "00_env_check.ipynb").is_file()
    assert (site / "lessons_lib" / "__init__.py").is_file(), "pip did not install the package"
    # the installed copy (not this checkout) imports and runs its health check
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = subprocess.run([sys.executable, "-c", "import lessons_lib; print(lessons_lib.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.strip().startswith(str(site)), probe.stdout + probe.stderr
