"""Every exercise's check is tested both ways, in a live kernel, cell by cell through the notebook:
the student's stub and a known wrong answer must make the check fail; the reference solution must make it pass.
tests/test_student.py executes the student copies themselves (`make student`) up to their first exercise check."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # absent on the GPU image; CI has it
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from lessons_lib import course

NOTEBOOKS = sorted(course.NOTEBOOK_DIR.glob("*.ipynb"))


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def run_cell(client, cell, index) -> str | None:
    """Execute one cell; return None on success or the error's last line."""
    try:
        client.execute_cell(cell, index)
    except CellExecutionError as e:
        return str(e).strip().splitlines()[-1]
    return None


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checks_reject_stub_and_wrong_answer_and_accept_solution(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    failures, checked = [], 0
    with client.setup_kernel():
        i = 0
        while i < len(nb.cells):
            cell = nb.cells[i]
            if cell.cell_type != "code":
                i += 1
                continue
            if course.EXERCISE_TAG in tags(cell):
                check_cell = nb.cells[i + 1]
                meta = cell.metadata["lessons"]
                for label, source in [("stub", meta["stub"]), ("wrong answer", meta["wrong"])]:
                    trial = nbformat.v4.new_code_cell(source)
                    run_cell(client, trial, i)  # the stub itself may raise (e.g. NotImplementedError): also a failure
                    if run_cell(client, nbformat.v4.new_code_cell(check_cell.source), i + 1) is None:
                        failures.append(f"cell {i}: the check accepted the {label}: {source!r}")
                error = run_cell(client, cell, i) or run_cell(client, check_cell, i + 1)
                if error:
                    failures.append(f"cell {i}: the reference solution failed its check: {error}")
                checked += 1
                i += 2
                continue
            error = run_cell(client, cell, i)
            assert error is None, f"{path.name} cell {i} failed: {error}"
            i += 1
    assert checked >= 2, f"{path.name}: only {checked} exercises"
    assert not failures, f"{path.name}:\n" + "\n".join(failures)


def test_student_copies_replace_solutions_only(tmp_path):
    written = course.write_student_copies(course.NOTEBOOK_DIR, tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        original = nbformat.read(path, as_version=4)
        student = nbformat.read(tmp_path / path.name, as_version=4)
        assert len(student.cells) == len(original.cells)
        for a, b in zip(original.cells, student.cells):
            if course.EXERCISE_TAG in tags(a):
                assert b.source == a.metadata["lessons"]["stub"] and "lessons" not in b.metadata
                assert b.source != a.source, f"{path.name}: a student copy still shows a solution"
            else:
                assert b.source == a.source
