"""Test-wide environment, set before anything imports a model library or defines a Triton kernel.

Applies to `tests/` and to the notebooks nbmake runs (their kernels inherit this environment).
"""

import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def _has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_nvidia_gpu():
    # Triton kernels can only run on CPU in the interpreter, and the flag must be set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
