"""Manifests and JSON lines for train/: the one reader, writer and audio-path rule every tool here uses.

Every long-running tool appends its output one whole line per write (flushed and fsync'ed), so a killed
run leaves at most one partial last line: `read_jsonl_tolerant` skips it, `repair_tail` cuts it before
appending resumes. Whole files are replaced atomically (`write_jsonl_atomic`). A manifest's relative
audio paths are read against the manifest's folder (`resolve_audio`). blsp_chat/manifest.py keeps the
chat engine's own rules (`python -m blsp_chat generate --manifest`): blsp_chat never imports train/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of a file this project wrote whole ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def numbered_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a manifest; ValueError naming the line for one
    that is not JSON."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None


def read_jsonl_tolerant(path: str | Path) -> list[dict]:
    """Complete JSON lines of a file that a killed writer may have left with a partial last line."""
    if not Path(path).is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # the partial last line of a killed run
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def repair_tail(path: str | Path) -> None:
    """Cut a partial last line (no newline) so that appends start on a fresh line."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)


def append_lines(handle, records: Iterable[dict]) -> None:
    """Whole lines, then one flush and fsync: a kill leaves at most one partial line."""
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def append_line(handle, record: dict) -> None:
    append_lines(handle, [record])


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Replace the file with these lines in one rename (a reader sees the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return count


def resolve_audio(manifest: str | Path, audio: str) -> Path:
    """Relative audio paths are read against the manifest's folder."""
    audio_path = Path(audio)
    return (audio_path if audio_path.is_absolute() else Path(manifest).parent / audio_path).resolve()


def rebase_audio(records: Iterable[dict], manifest: str | Path, new_manifest: str | Path) -> list[dict]:
    """Lines read from `manifest` as they must read from `new_manifest`: relative audio paths re-expressed
    against the new file's folder, so that a manifest written elsewhere still finds its clips."""
    new_folder = Path(new_manifest).resolve().parent
    rebased = []
    for record in records:
        audio = record.get("audio")
        if audio and not Path(audio).is_absolute():
            record = {**record, "audio": os.path.relpath(resolve_audio(manifest, audio), new_folder)}
        rebased.append(record)
    return rebased
