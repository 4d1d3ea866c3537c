"""Course plumbing shared by every notebook: lesson setup, answer checks, and notebook maintenance commands.

In a notebook:

    from lessons_lib.course import pick_model, setup_lesson, check
    MODEL = pick_model()                 # tiny world on CPU / offline / CI; Qwen2.5-0.5B-Instruct on a GPU with network
    device = setup_lesson(seed=0, model=MODEL)   # offline hub, Triton interpreter on CPU, seeds, one summary line
    check("my kl", my_kl, reference_kl)  # prints exact / approximate / max diff; raises if wrong

From the shell (see docs/DEVELOPING.md, "Notebooks"):

    python -m lessons_lib.course new 04_ppo "PPO, one step at a time"   # a notebook skeleton with the lesson pattern
    python -m lessons_lib.course sync                                   # badges, setup cell, kernelspec, no outputs
    python -m lessons_lib.course student notebooks student               # student copies without solutions
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

# The one place that names the public repository: badges and the Colab setup cell are generated from it.
REPO_SLUG = "lessons-lib/lessons_lib"
REPO_BRANCH = "main"
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


# --------------------------------------------------------------------------------------------- in a lesson


def setup_lesson(seed: int = 0, model: str | None = None, quiet: bool = False):
    """Prepare a lesson: offline hub, Triton interpreter and one thread on CPU, seeded RNGs. Returns the device.

    The hub stays offline unless `model` names a hub model (not a tiny-world id, not a local path), so the hub model
    that `pick_model` picks on a GPU with network (or that LESSONS_LIB_MODEL names) can be downloaded. Call this
    before importing `lessons_lib.kernels`: TRITON_INTERPRET is read when a kernel is *defined*. Existing environment
    variables win (`setdefault`), so a GPU user or CI can override any of them.
    """
    if model is None or model.startswith("tiny-") or os.path.exists(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The tiny world's models are so small that one CPU thread is fastest: more threads add synchronisation
        # per tiny op (measured on a 2-core box: a PPO step 0.8 s with 1 thread, 8-24 s with 2 under load).
        torch.set_num_threads(int(os.environ.get("LESSONS_LIB_THREADS", "1")))
    seed_everything(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not quiet:
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        hub = "offline" if os.environ.get("HF_HUB_OFFLINE") == "1" else "online"
        print(f"device {device} · {name} · torch {torch.__version__} · hub {hub} · seed {seed}")
    return device


TINY_MODEL = "tiny-qwen2-sft"
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MODEL_ENV = "LESSONS_LIB_MODEL"
_TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """True when the environment asks for no hub downloads (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def in_ci() -> bool:
    """True on a CI runner (`CI`, set by GitHub Actions, GitLab and this repository's .ci/run; or GITHUB_ACTIONS)."""
    return _env_true("CI") or _env_true("GITHUB_ACTIONS")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, default huggingface.co) opens within `timeout` s
    (`lessons_lib.models.hub_reachable`: a daemon thread, so a stalled name lookup cannot hang the notebook)."""
    from lessons_lib.models import hub_reachable as probe

    return probe(timeout)


def pick_model(gpu: str = HUB_MODEL, cpu: str = TINY_MODEL) -> str:
    """The `MODEL` of a lesson's parameters cell: `gpu` (a hub model) where it can run, else `cpu` (the tiny world).

    In order: the environment variable LESSONS_LIB_MODEL, when set, wins (an instructor's override: a hub id, a
    tiny-world id or a local folder). On CI, with the hub offline (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1, which
    `make test` and the tests set), or without CUDA, the answer is `cpu`. On a CUDA machine the hub must answer a
    connection within 2 s (`hub_reachable`); then the answer is `gpu`, else `cpu`.
    """
    override = os.environ.get(MODEL_ENV, "").strip()
    if override:
        return override
    if in_ci() or hub_offline() or not cuda_available():
        return cpu
    return gpu if hub_reachable() else cpu


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check(name: str, got, expected, *, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Compare a learner's answer with the reference; print exact / approximate / max diff; raise if wrong.

    Works for tensors, arrays, numbers, strings and nested lists/tuples/dicts of those.
    (The three-word verdict is the `cmp()` of Karpathy's nn-zero-to-hero notebooks.)
    """
    import numpy as np
    import torch

    def as_array(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().double().numpy()
        return np.asarray(x, dtype=np.float64)

    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            raise AssertionError(f"{name}: expected a dict with keys {sorted(expected)}, got {type(got).__name__}"
                                 + (f" with keys {sorted(got)}" if isinstance(got, dict) else ""))
        for key in expected:
            check(f"{name}[{key!r}]", got[key], expected[key], atol=atol, rtol=rtol)
        return
    if isinstance(expected, str) or got is None or isinstance(got, str):
        if got != expected:
            raise AssertionError(f"{name}: expected {expected!r}, got {got!r}")
        print(f"{name:<28} exact: True")
        return
    try:
        g, e = as_array(got), as_array(expected)
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{name}: cannot compare {type(got).__name__} with {type(expected).__name__}") from err
    if g.shape != e.shape:
        raise AssertionError(f"{name}: expected shape {tuple(e.shape)}, got {tuple(g.shape)}")
    exact = bool(np.array_equal(g, e))
    approx = bool(np.allclose(g, e, atol=atol, rtol=rtol, equal_nan=False))
    maxdiff = float(np.max(np.abs(g - e))) if g.size else 0.0
    print(f"{name:<28} exact: {exact!s:<5} | approximate: {approx!s:<5} | max diff: {maxdiff:.3g}")
    if not approx:
        raise AssertionError(f"{name}: not equal to the reference (max abs diff {maxdiff:.3g}, "
                             f"tolerance atol={atol:g} rtol={rtol:g})")


# --------------------------------------------------------------------------------------------- notebooks

SETUP_TAG, BADGE_TAG, PARAMS_TAG = "colab-setup", "colab-badge", "parameters"
EXERCISE_TAG, CHECK_TAG = "exercise", "check"


def badge_markdown(notebook_name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO_SLUG}/blob/{REPO_BRANCH}/notebooks/{notebook_name}"
    return f'<a href="{url}" target="_parent"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>'


def setup_cell_source() -> str:
    """The guarded Colab setup cell, identical in every notebook. Outside Colab it does nothing.

    On Colab it clones the course (notebooks, data and the tiny world's models) and installs the package with pip,
    which keeps Colab's own torch. `LESSONS_LIB_REPO` / `LESSONS_LIB_HOME` override where from and where to
    (tests/test_colab_setup.py simulates Colab offline with a local `file://` clone).
    """
    return "\n".join([
        "# Colab only: fetch the course and install lessons_lib. In a local checkout this cell does nothing.",
        "import os, sys",
        "if \"google.colab\" in sys.modules:",
        "    HOME = os.environ.get(\"LESSONS_LIB_HOME\", \"/content/lessons_lib\")",
        "    if not os.path.isdir(HOME):",
        f"        REPO = os.environ.get(\"LESSONS_LIB_REPO\", \"https://github.com/{REPO_SLUG}\")",
        "        !git clone -q --depth 1 {REPO} {HOME}",
        "        %pip install -q {HOME}",
        "    os.environ[\"LESSONS_LIB_DATA\"] = os.path.join(HOME, \"data\")",
        "    os.chdir(os.path.join(HOME, \"notebooks\"))",
    ])


def _tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def sync_notebook(path: Path) -> bool:
    """Regenerate the badge and setup cell, set the python3 kernelspec and Colab GPU metadata, strip outputs.

    Returns True when the file changed. The badge line is the first line of the cell tagged `colab-badge`.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        tags = _tags(cell)
        if BADGE_TAG in tags:
            lines = cell.source.split("\n")
            lines[0] = badge_markdown(path.name)
            cell.source = "\n".join(lines)
        if SETUP_TAG in tags:
            cell.source = setup_cell_source()
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"))
    return after != before


# The parameters cell of a lesson that runs on a hub model too (lessons 00-03 and 06; the skeleton of a new one).
PARAMS_SOURCE = (
    "# Parameters. pick_model() picks the tiny offline world on a CPU, offline or in CI, and a real instruct model on\n"
    "# a GPU with network; LESSONS_LIB_MODEL=<hub id, tiny-world id or folder> overrides it.\n"
    "from lessons_lib.course import pick_model\n"
    "\n"
    f'MODEL = pick_model(gpu="{HUB_MODEL}", cpu="{TINY_MODEL}")')


def new_notebook(stem: str, title: str, directory: Path = NOTEBOOK_DIR) -> Path:
    """Write a notebook skeleton that follows the lesson pattern (docs/DEVELOPING.md)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook as nb_new

    number = stem.split("_", 1)[0]
    cells = [
        new_markdown_cell("\n".join([
            badge_markdown(f"{stem}.ipynb"), "", f"# {number} · {title}", "",
            "**What you'll learn**", "- ...", "", "*Time: ~N min on a laptop CPU (tiny world), ~N min on a GPU.*"]),
            metadata={"tags": [BADGE_TAG]}),
        new_code_cell(setup_cell_source(), metadata={"tags": [SETUP_TAG]}),
        new_code_cell(PARAMS_SOURCE, metadata={"tags": [PARAMS_TAG]}),
        new_code_cell("from lessons_lib.course import setup_lesson, check\n\ndevice = setup_lesson(seed=0, model=MODEL)"),
    ]
    path = directory / f"{stem}.ipynb"
    if path.exists():
        raise FileExistsError(f"{path} exists; edit it instead")
    nbformat.write(nb_new(cells=cells), path)
    sync_notebook(path)
    return path


def student_copy(nb):
    """A student copy of a notebook: every exercise's solution replaced by its stub; outputs stripped."""
    import copy

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if EXERCISE_TAG in _tags(cell):
            cell.source = cell.metadata["lessons"]["stub"]
            cell.metadata.pop("lessons")  # the wrong answer is a hint: keep it out of the student's copy
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def write_student_copies(source_dir: Path, target_dir: Path) -> list[Path]:
    """`make student`: write student copies of every notebook in `source_dir` into `target_dir`."""
    import nbformat

    target_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(source_dir).glob("*.ipynb")):
        out = target_dir / path.name
        nbformat.write(student_copy(nbformat.read(path, as_version=4)), out)
        written.append(out)
        print(f"wrote {out}")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    command, args = argv[0], argv[1:]
    if command == "sync":
        paths = [Path(a) for a in args] or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
        for p in paths:
            print(("updated  " if sync_notebook(p) else "unchanged ") + str(p))
        return 0
    if command == "new":
        print(new_notebook(args[0], " ".join(args[1:]) or args[0]))
        return 0
    if command == "student":
        write_student_copies(Path(args[0]), Path(args[1]))
        return 0
    print(f"unknown command {command!r}; try: sync, new, student", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
