"""Student copies (`make student`: every exercise's solution replaced by its stub) execute up to their exercises.

Each copy is written into a temporary folder and executed cell by cell in a fresh python3 kernel, as nbmake runs the
notebooks (same kernel, same environment: the kernel inherits the offline hub and Triton settings of conftest.py).
Every cell before the first check must run without error, and the first error must come from a check cell that
follows an exercise whose solution was removed: the stub fails its check, as a student's unfinished answer should.
Execution stops after that first check cell; tests/test_exercises.py runs the rest of each notebook.
"""

import time

import pytest

nbformat = pytest.importorskip("nbformat")  # absent on the GPU image; CI has it
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from lessons_lib import course

NOTEBOOKS = sorted(course.NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_TIMEOUT = 600  # seconds per notebook, all cells together


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    course.write_student_copies(course.NOTEBOOK_DIR, out)
    return out


def run_until_first_check(nb, cwd) -> tuple[int | None, str | None, int]:
    """Execute the cells in order up to and including the first check cell.

    Returns (index of the first cell that raised or None, its error's last line, index of the first check cell).
    """
    first_check = next(i for i, c in enumerate(nb.cells) if course.CHECK_TAG in tags(c))
    client = NotebookClient(nb, timeout=NOTEBOOK_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells[:first_check + 1]):
            if cell.cell_type != "code":
                continue
            client.timeout = max(1, int(deadline - time.monotonic()))  # what is left of the notebook's time
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:
                return i, f"{e.ename}: {e.evalue}", first_check
    return None, None, first_check


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_copy_runs_until_its_first_exercise_check(path, student_dir):
    student = nbformat.read(student_dir / path.name, as_version=4)
    # The kernel runs in notebooks/, a sibling of the student/ folder `make student` writes: lessons that read
    # repository files through "../" find them from either folder.
    failed, error, first_check = run_until_first_check(student, cwd=course.NOTEBOOK_DIR)
    assert failed is None or failed >= first_check, \
        f"{path.name}: cell {failed} (before the first exercise check, cell {first_check}) failed: {error}"
    if failed is not None:
        exercise = student.cells[failed - 1]
        assert course.CHECK_TAG in tags(student.cells[failed]) and course.EXERCISE_TAG in tags(exercise), \
            f"{path.name}: the first error is in cell {failed}, not in an exercise's check: {error}"
        original = nbformat.read(path, as_version=4).cells[failed - 1]
        assert exercise.source == original.metadata["lessons"]["stub"] != original.source, \
            f"{path.name}: cell {failed - 1} still holds its solution"
