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
