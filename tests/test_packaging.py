"""The package as a whole: pyproject.toml's pins are the requirements files' pins (the README installs from
those files, the package metadata from pyproject, and the two must not drift apart); every module imports on
its own; the project's modules import one another without a circle; `train/` does not import the chat engine."""
import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("blsp_chat", "train")
# The chat engine and its front ends: training uses prompt, generate, lock, model and weights instead.
CHAT_ENGINE = ("blsp_chat.session", "blsp_chat.ui", "blsp_chat.serve", "blsp_chat.cli")


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


# --- imports -------------------------------------------------------------------------------------
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages."""
    modules = {}
    for top in PROJECT_PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_time_statements(body: list[ast.stmt]):
    """The statements a module runs when imported: not function bodies, nor `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        if _is_type_checking(node):
            yield from _import_time_statements(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _import_time_statements(getattr(node, field, []))


def imported_modules(name: str, path: Path, modules: dict[str, Path], module_level_only: bool) -> set[str]:
    """The project modules `name` imports (at import time only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = _import_time_statements(tree.body) if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(kept + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path a -> ... -> a in `graph`, or None when it has no cycle."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_project_modules_import_one_another_without_a_circle():
    modules = project_modules()
    graph = {name: imported_modules(name, path, modules, module_level_only=True) for name, path in modules.items()}
    assert graph["blsp_chat.session"] >= {"blsp_chat.generate", "blsp_chat.prompt"}  # the scan sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_train_does_not_import_the_chat_engine():
    modules = project_modules()
    engine_users = {name: sorted(imported_modules(name, path, modules, module_level_only=False) & set(CHAT_ENGINE))
                    for name, path in modules.items() if name.split(".")[0] == "train"}
    assert {name: used for name, used in engine_users.items() if used} == {}


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module imported first, with none of the project's modules loaded before it: one that works only
    after another has been imported (a hidden order dependence, or a circle) fails here."""
    names = [name for name in project_modules() if not name.endswith("__main__")]  # __main__ runs the CLI
    script = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {PROJECT_PACKAGES!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
