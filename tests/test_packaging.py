"""The install files agree: pyproject.toml's Python and dependencies, constraints.txt's pins, environment.yml."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a name==version pin"
            pins[_name(name)] = version
    return pins


def test_every_dependency_is_pinned_by_the_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    missing = [r for r in wanted if _name(r) not in pins]
    assert not missing, f"constraints.txt pins none of {missing}: CI would test an unpinned version"


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert len(python) == 1, env["dependencies"]
    minimum = re.fullmatch(r">=(\d+\.\d+)", project["requires-python"]).group(1)
    assert python[0].split("=")[1] == minimum, (python, project["requires-python"])
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c constraints.txt" in pip and '-e ".[dev]"' in pip, pip


def test_the_pinned_python_matches_requires_python():
    """constraints.txt says which Python CI tests; requires-python must not promise an older one."""
    first = (ROOT / "constraints.txt").read_text().splitlines()[0]
    tested = re.search(r"Python (\d+\.\d+)", first).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={tested}"
