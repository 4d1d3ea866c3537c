"""A real browser: JupyterLab on localhost, a lesson notebook opened in headless Chromium, run from the menu, and
the PPO stepper widget rendered and clicked. Opt-in (`make test-browser`): it needs Debian's `chromium` and the
`playwright` package (its driver only: the browser is the system's, never downloaded). The screenshot is saved to
`$BROWSER_ARTIFACTS` (default: test-artifacts/).

The notebook is lesson 04 cut down to its setup, the trainer and the stepper cell, so the test runs in about a
minute instead of the whole lesson's three.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
nbformat = pytest.importorskip("nbformat")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (driver only)")

from lessons_lib import course  # noqa: E402
from lessons_lib.widgets import NEXT_DESCRIPTION  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def stepper_notebook(path: Path) -> None:
    """Lesson 04's cells up to the trainer, then its stepper cell."""
    nb = nbformat.read(course.NOTEBOOK_DIR / "04_ppo.ipynb", as_version=4)
    cells, trainer_seen = [], False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "PPOStepper" in cell.source:
            cells.append(cell)
            break
        if not trainer_seen:
            cells.append(cell)
            trainer_seen = "PPOTrainer(" in cell.source
    assert trainer_seen and "PPOStepper" in cells[-1].source, "lesson 04 no longer has the trainer + stepper cells"
    nb.cells = cells
    nbformat.write(nb, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    port, token = free_port(), "lessons-browser-test"
    stepper_notebook(tmp_path / "stepper.ipynb")
    # render every cell (JupyterLab 4 otherwise only renders cells near the viewport) and skip the news prompt
    settings = tmp_path / "settings"
    for plugin, value in [("notebook-extension/tracker", '{"windowingMode": "none"}'),
                          ("apputils-extension/notification", '{"fetchNews": "false"}')]:
        target = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTERLAB_SETTINGS_DIR=str(settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
    yield f"http://127.0.0.1:{port}/lab/tree/stepper.ipynb?token={token}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_stepper_renders_and_responds_to_a_click(lab):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(lab, timeout=120_000)
        page.wait_for_selector(".jp-Notebook", timeout=120_000)
        page.get_by_text("Idle").first.wait_for(state="attached", timeout=120_000)  # the kernel has started
        page.get_by_role("menuitem", name="Run").click()
        page.get_by_text("Run All Cells", exact=True).click()
        button = page.get_by_role("button", name=NEXT_DESCRIPTION)
        try:
            button.wait_for(state="visible", timeout=300_000)
        except sync_api.TimeoutError:
            page.screenshot(path=str(ARTIFACTS / "ppo_stepper_timeout.png"), full_page=True)
            raise
        panel = page.locator(".widget-vbox").filter(has=button)
        button.scroll_into_view_if_needed()
        before = panel.inner_text()
        # the lesson's cell already ran "generate", so the header marks the next step: [score]
        assert "[score]" in before, f"the stepper should be waiting at the score step:\n{before[:500]}"
        button.click()
        page.wait_for_function(
            "([sel, old]) => { const el = document.querySelector(sel); return el && el.innerText !== old; }",
            arg=[".widget-vbox:has(.ppo-stepper-next)", before], timeout=120_000)
        after = panel.inner_text()
        page.screenshot(path=str(ARTIFACTS / "ppo_stepper.png"), full_page=False)
        browser.close()
    assert "[log-probs]" in after, f"the click did not advance the stepper to log-probs:\n{after[:500]}"
