"""Every notebook follows the lesson pattern (docs/DEVELOPING.md, "Notebooks") and is stored clean."""

import re
from collections import defaultdict
from pathlib import Path


import pytest

nbformat = pytest.importorskip("nbformat")  # absent on the GPU image; CI has it
from lessons_lib import course

NOTEBOOKS = sorted(course.NOTEBOOK_DIR.glob("*.ipynb"))


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_clean_with_python3_kernel(path):
    nb = nbformat.read(path, as_version=4)
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"{path.name}: name must look like NN_topic.ipynb"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {i}: outputs stored (run `python -m lessons_lib.course sync`)"
            assert cell.execution_count is None, f"{path.name} cell {i}: execution count stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lesson_pattern(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert course.BADGE_TAG in tags(first), f"{path.name}: first cell must be the badge/title cell"
    assert first.source.split("\n")[0] == course.badge_markdown(path.name), f"{path.name}: stale Colab badge"
    assert "What you'll learn" in first.source, f"{path.name}: say what the learner will learn"
    setup = [c for c in nb.cells if course.SETUP_TAG in tags(c)]
    assert len(setup) == 1 and setup[0].source == course.setup_cell_source(), f"{path.name}: setup cell missing/stale"
    params = [c for c in nb.cells if course.PARAMS_TAG in tags(c)]
    assert len(params) == 1 and re.search(r"^MODEL\s*=", params[0].source, re.M), f"{path.name}: MODEL parameter"
    pip_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "pip install" in c.source
                 and course.SETUP_TAG not in tags(c)]
    assert not pip_cells, f"{path.name}: `pip install` outside the setup cell (cells {pip_cells})"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Closing questions" in text, f"{path.name}: closing questions missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_have_stub_wrong_answer_and_check(path):
    nb = nbformat.read(path, as_version=4)
    exercises = [i for i, c in enumerate(nb.cells) if course.EXERCISE_TAG in tags(c)]
    assert len(exercises) >= 2, f"{path.name}: at least two exercises expected, found {len(exercises)}"
    for i in exercises:
        meta = nb.cells[i].metadata.get("lessons", {})
        assert meta.get("stub") and meta.get("wrong"), f"{path.name} cell {i}: exercise needs lessons.stub and .wrong"
        assert meta["wrong"] != nb.cells[i].source, f"{path.name} cell {i}: the wrong answer equals the solution"
        nxt = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        assert nxt is not None and course.CHECK_TAG in tags(nxt), f"{path.name} cell {i}: next cell must be a check"


def test_no_helper_defined_in_two_notebooks():
    """Helpers that several lessons need belong in lessons_lib; notebooks import them."""
    where = defaultdict(set)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and course.EXERCISE_TAG not in tags(cell):
                for name in re.findall(r"^def (\w+)\(", cell.source, re.M):
                    where[name].add(path.name)
    shared = {name: sorted(files) for name, files in where.items() if len(files) > 1}
    assert not shared, f"functions defined in several notebooks (move them to lessons_lib): {shared}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_model_parameter_is_picked_or_explained(path):
    """MODEL comes from `pick_model` (tiny world on CPU/offline/CI, hub model on a GPU with network), or is a tiny-world
    id under a comment that says why the lesson stays on the tiny world."""
    nb = nbformat.read(path, as_version=4)
    source = next(c for c in nb.cells if course.PARAMS_TAG in tags(c)).source
    if re.search(r"^MODEL = pick_model\(", source, re.M):
        assert "from lessons_lib.course import pick_model" in source and "LESSONS_LIB_MODEL" in source, \
            f"{path.name}: import pick_model and name its override in the comment"
        return
    assert re.search(r'^MODEL = "tiny-[\w-]+"', source, re.M), f"{path.name}: MODEL is neither picked nor tiny"
    assert source.startswith("# Parameters.") and "\n#" in source, f"{path.name}: say why MODEL stays tiny"


# --------------------------------------------------------------------------------------------- pick_model

PICK_ENV = ("LESSONS_LIB_MODEL", "CI", "GITHUB_ACTIONS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.mark.parametrize("env, cuda, reachable, expected, probed", [
    ({}, True, True, "hub/model", True),                                   # a GPU with network
    ({}, True, False, "tiny-x", True),                                     # a GPU, no network
    ({}, False, True, "tiny-x", False),                                    # a CPU: no probe at all
    ({"HF_HUB_OFFLINE": "1"}, True, True, "tiny-x", False),                # offline: `make test`, the tests, nbmake
    ({"TRANSFORMERS_OFFLINE": "true"}, True, True, "tiny-x", False),
    ({"HF_HUB_OFFLINE": "0"}, True, True, "hub/model", True),             # explicitly online
    ({"CI": "true"}, True, True, "tiny-x", False),                         # CI, even with a GPU and network
    ({"GITHUB_ACTIONS": "true"}, True, True, "tiny-x", False),
    ({"LESSONS_LIB_MODEL": "my/model"}, False, False, "my/model", False),  # the override wins everywhere
    ({"LESSONS_LIB_MODEL": "tiny-qwen2-ppo", "CI": "1", "HF_HUB_OFFLINE": "1"}, True, True, "tiny-qwen2-ppo", False),
    ({"LESSONS_LIB_MODEL": " "}, True, True, "hub/model", True),           # a blank override is no override
])
def test_pick_model(monkeypatch, env, cuda, reachable, expected, probed):
    for name in PICK_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    probes = []
    monkeypatch.setattr(course, "cuda_available", lambda: cuda)
    monkeypatch.setattr(course, "hub_reachable", lambda: probes.append(1) or reachable)   # never the real network
    assert course.pick_model(gpu="hub/model", cpu="tiny-x") == expected
    assert bool(probes) == probed


def test_pick_model_defaults(monkeypatch):
    for name in PICK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(course, "hub_reachable", lambda: True)
    monkeypatch.setattr(course, "cuda_available", lambda: False)
    assert course.pick_model() == course.TINY_MODEL == "tiny-qwen2-sft"
    monkeypatch.setattr(course, "cuda_available", lambda: True)
    assert course.pick_model() == course.HUB_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"


def test_hub_reachable_answers_within_its_timeout(monkeypatch):
    """No network: socket.create_connection is replaced by a connection that opens, one that fails, one that hangs."""
    import socket
    import time

    class Connection:
        def close(self):
            pass

    def hang(address, timeout=None):
        time.sleep(5)
        return Connection()

    def refuse(address, timeout=None):
        raise ConnectionRefusedError(address)

    seen = []
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: seen.append(address) or Connection())
    assert course.hub_reachable(timeout=1) and seen == [("hub.example", 8443)]
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not course.hub_reachable(timeout=1)
    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert not course.hub_reachable(timeout=0.2)
    assert time.monotonic() - start < 2, "a stalled connection must not hang the caller"
