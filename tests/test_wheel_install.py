"""The package as a user installs it: the wheel built from this tree, installed into a fresh virtual environment and
run from a directory outside the repository, where only what the wheel holds can be found.

Nothing is downloaded: the wheel is built with the setuptools already installed (no build isolation) and
installed without its dependencies; the new environment then finds those in this one's site-packages, through a
.pth file read after its own site-packages, so that blsp_chat itself can come only from the wheel. Whether the
dependencies installed here satisfy the wheel's requirements is checked with the wheel's own metadata."""
import json
import os
import shutil
import site
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from blsp_chat import __version__, offline

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from. train/ is copied too, so that leaving it out of the wheel is tested, not assumed.
SOURCES = ("pyproject.toml", "README.md", "blsp_chat", "assets", "train")
DIST_INFO = f"blsp_chat-{__version__}.dist-info"
DEPENDENCIES_PTH = "tested_dependencies.pth"


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tree, so that the build's scratch folders never land in the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", dist, source])
    [built] = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def environment(wheel, tmp_path_factory) -> dict:
    """A fresh virtual environment holding the wheel: its python, its site-packages and the environment
    variables to run it with (no PYTHONPATH: nothing of the checkout on the path)."""
    root = tmp_path_factory.mktemp("env")
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", wheel])
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    site_packages = Path(purelib)
    (site_packages / DEPENDENCIES_PTH).write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env['PATH']}"
    return {"root": root, "python": python, "site_packages": site_packages, "env": env}


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """The working directory of every command: not the repository, nor inside it."""
    return tmp_path_factory.mktemp("elsewhere")


def blsp_chat(environment, outside, *args: str) -> subprocess.CompletedProcess:
    return run([environment["root"] / "bin" / "blsp-chat", *args], cwd=outside, env=environment["env"])


def test_the_wheel_holds_blsp_chat_its_assets_and_command_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"blsp_chat", DIST_INFO}
    tracked = run(["git", "ls-files", "assets"], cwd=REPO).stdout.split()
    assert tracked and {f"blsp_chat/{path}" for path in tracked} <= names
    assert "blsp-chat = blsp_chat.cli:main" in entry_points


def test_the_environment_has_no_top_level_train_and_imports_blsp_chat_from_the_wheel(environment, outside):
    assert sorted(p.name for p in environment["site_packages"].iterdir()) == sorted(
        ["blsp_chat", DIST_INFO, DEPENDENCIES_PTH])
    where = run([environment["python"], "-c", "import blsp_chat, importlib.util; print(blsp_chat.__file__); "
                 "print(importlib.util.find_spec('train'))"], cwd=outside, env=environment["env"]).stdout.split()
    assert Path(where[0]).is_relative_to(environment["site_packages"] / "blsp_chat")
    assert where[1] == "None"


def test_the_installed_dependencies_satisfy_the_wheels_requirements(environment, outside):
    """What pip would check on a real install: each requirement of the wheel, with every extra, is met here."""
    script = """
from importlib import metadata
from packaging.requirements import Requirement
unmet = []
for line in metadata.requires("blsp-chat"):
    requirement = Requirement(line)
    extras = [{"extra": e} for e in ("", "app", "serve", "voice", "train", "test")]
    if requirement.name == "blsp-chat" or not any(requirement.marker is None or requirement.marker.evaluate(e)
                                                  for e in extras):
        continue
    if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
        unmet.append(f"{requirement} (installed {metadata.version(requirement.name)})")
print(len(metadata.requires("blsp-chat")), unmet)
"""
    result = run([environment["python"], "-c", script], cwd=outside, env=environment["env"])
    checked, unmet = result.stdout.split(" ", 1)
    assert int(checked) > 20 and unmet.strip() == "[]"


def test_blsp_chat_version(environment, outside):
    assert blsp_chat(environment, outside, "--version").stdout.strip() == f"blsp-chat {__version__}"


def installed_example(environment, outside, name: str) -> Path:
    """An example clip as the installed package finds it (importlib.resources, inside its site-packages)."""
    script = f"from blsp_chat.resources import EXAMPLES_DIR; print(EXAMPLES_DIR / {name!r})"
    clip = Path(run([environment["python"], "-c", script], cwd=outside, env=environment["env"]).stdout.strip())
    assert clip.is_file() and clip.is_relative_to(environment["site_packages"])
    return clip


@pytest.mark.integration
def test_blsp_chat_generate_answers_typed_and_spoken_questions_on_the_default_model(environment, outside):
    offline.download_defaults()  # the base weights in the user's cache, as `blsp-chat download` leaves them
    typed = blsp_chat(environment, outside, "generate", "--device", "cpu", "--text", "What is the capital of France?")
    assert "Paris" in typed.stdout, typed.stdout + typed.stderr
    clip = installed_example(environment, outside, "capital_of_france.wav")
    spoken = blsp_chat(environment, outside, "generate", "--device", "cpu", "--audio", str(clip))
    assert "Paris" in spoken.stdout, spoken.stdout + spoken.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_page(url: str, app: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert app.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(f"{url}/config", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise AssertionError(f"the app did not serve {url} within {timeout} s")


def load_example(url: str, index: int) -> dict:
    """The audio input's value after a click on example clip `index`, through Gradio's HTTP API."""
    event = httpx.post(f"{url}/gradio_api/call/load_example", json={"data": [index]}, timeout=30).json()["event_id"]
    stream = httpx.get(f"{url}/gradio_api/call/load_example/{event}", timeout=120).text
    assert "event: complete" in stream, stream[-2000:]
    return json.loads(stream.split("data: ", 1)[1].splitlines()[0])[0]["value"]


@pytest.mark.integration
def test_blsp_chat_app_serves_the_page_with_the_installed_example_clips(environment, outside):
    """The app from the installed package: the page's example clips come from the package data, and a click on
    one gives the audio input that clip."""
    offline.download_defaults()
    url = f"http://127.0.0.1:{free_port()}"
    log = outside / "app.log"  # a file, not a pipe nobody reads while the app runs
    with log.open("w") as output:
        app = subprocess.Popen([environment["root"] / "bin" / "blsp-chat", "app", "--device", "cpu",
                                "--port", url.rsplit(":", 1)[1]], cwd=outside, env=environment["env"],
                               stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_page(url, app, log)
        value = load_example(url, 0)
        clip = httpx.get(value["url"], timeout=30)
        assert value["orig_name"] == "capital_of_france.wav" and clip.status_code == 200
        assert clip.content == installed_example(environment, outside, "capital_of_france.wav").read_bytes()
    finally:
        app.terminate()
        app.wait(timeout=60)
