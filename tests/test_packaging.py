"""pyproject.toml's pins are the requirements files' pins: the README installs from those files, the package
metadata from pyproject, and the two must not drift apart."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pins(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def test_pyproject_pins_equal_the_requirements_files():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) | set(extras["train"]) == pins(REPO / "requirements.txt")
    assert not set(project["dependencies"]) & set(extras["train"])
    assert set(extras["test"]) == pins(REPO / "requirements-test.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", pin) for pin in pins(REPO / "requirements.txt"))


def test_every_python_package_of_the_project_is_in_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(REPO).parts) for top in ("blsp_chat", "train")
             for init in (REPO / top).rglob("__init__.py")}
    assert listed == found
