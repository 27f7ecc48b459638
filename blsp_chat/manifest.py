"""Batch replies: one spoken turn per manifest line, left-padded batches, resumable output.

Manifest (JSON lines): `{"audio": "clip.wav", "instruction": "..."?, ...any other fields}`. A relative
`audio` path is looked up beside the manifest first, then from the working directory. Blank lines are
skipped. Each output line is the input record plus `"response"` (or `"error"` when the line could not be
used) and `"_line"`, the 1-based line number in the manifest.

Resuming: output is appended one batch at a time (flush + fsync). On a restart the line numbers already
in OUT are skipped, and a last line cut short by a kill is removed first, so every manifest line ends up
in OUT exactly once.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .audio import DEFAULT_MAX_AUDIO_SECONDS, AudioError, load_audio
from .config import GenerationOptions
from .generate import NothingHeardError, replies_if_heard, speech_turn
from .prompt import Turn, render, template_for

if TYPE_CHECKING:
    from .weights import LoadedBlsp

LINE_KEY = "_line"         # where each output line records its manifest line number
RESPONSE_KEY = "response"
ERROR_KEY = "error"
DEFAULT_BATCH_SIZE = 8


# --- the manifest ----------------------------------------------------------------------------------
@dataclass
class Item:
    line: int                      # 1-based line number in the manifest
    record: dict
    error: str | None = None
    audio: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Summary:
    total: int = 0      # manifest lines with content
    skipped: int = 0    # already in OUT when the run started
    answered: int = 0
    failed: int = 0


def read_manifest(path: Path) -> list[Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                items.append(Item(number, {}, f"line {number} is not valid JSON: {err}"))
                continue
            if not isinstance(record, dict):
                items.append(Item(number, {}, f"line {number} is not a JSON object"))
            elif not isinstance(record.get("audio"), str) or not record["audio"]:
                items.append(Item(number, record, 'the line has no "audio" file path'))
            else:
                items.append(Item(number, record))
    return items


def done_lines(out_path: Path) -> set[int]:
    """Line numbers already answered in OUT. A last line cut short by a kill is truncated away."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        print(f"[blsp_chat] {out_path}: removing an incomplete last line left by an interrupted run",
              file=sys.stderr, flush=True)
        with open(out_path, "r+b") as f:
            f.truncate(complete)
            os.fsync(f.fileno())
    done = set()
    for number, text in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            done.add(int(json.loads(text)[LINE_KEY]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{out_path} line {number} is not an output line of this runner (no "
                             f'"{LINE_KEY}"): use a new --out file or remove that line') from err
    return done


def resolve_audio(path: str, manifest_dir: Path) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and (manifest_dir / candidate).exists():
        return manifest_dir / candidate
    return candidate


def batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def run_manifest(loaded: LoadedBlsp, manifest: str | os.PathLike, out: str | os.PathLike, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, instruction: str = "",
                 options: GenerationOptions = GenerationOptions(),
                 max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS, progress: bool = True) -> Summary:
    """Answer every manifest line not yet in `out`, appending one batch at a time."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    manifest, out = Path(manifest), Path(out)
    items = read_manifest(manifest)
    done = done_lines(out)
    todo = [item for item in items if item.line not in done]
    summary = Summary(total=len(items), skipped=len(items) - len(todo))
    limit = getattr(loaded.model.llama_model.config, "max_position_embeddings", None)
    with open(out, "a", encoding="utf-8") as sink, \
            tqdm(total=len(items), initial=summary.skipped, unit="line", disable=not progress, file=sys.stderr) as bar:
        for batch in batches(todo, batch_size):
            results = _answer(loaded, batch, manifest.parent, instruction, options, max_audio_seconds, limit)
            sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
            sink.flush()
            os.fsync(sink.fileno())
            failed = sum(ERROR_KEY in r for r in results)
            summary.failed += failed
            summary.answered += len(results) - failed
            bar.update(len(batch))
    return summary


def _answer(loaded: LoadedBlsp, batch: list[Item], manifest_dir: Path, instruction: str, options: GenerationOptions,
            max_audio_seconds: float | None, limit: int | None) -> list[dict]:
    """Output records of one batch, in manifest order: lines that load are generated together."""
    model = loaded.model
    turns: dict[int, Turn] = {}
    for item in batch:
        if item.error is not None:
            continue
        try:
            item.audio = load_audio(resolve_audio(item.record["audio"], manifest_dir), max_seconds=max_audio_seconds)
        except AudioError as err:
            item.error = str(err)
            continue
        text = item.record.get("instruction")
        turn = speech_turn(item.audio, model, instruction=text if isinstance(text, str) else instruction)
        needed = len(render([turn], loaded.tokenizer, template_for(model.config.prompt_template, loaded.tokenizer)))
        if limit and needed + options.max_new_tokens > limit:
            item.error = (f"the clip and instruction take {needed} tokens and the reply up to "
                          f"{options.max_new_tokens} more, but the model's context holds {limit}")
            continue
        turns[item.line] = turn
    ready = [item for item in batch if item.line in turns]
    replies = []
    if ready:
        replies = replies_if_heard(loaded, [[turns[i.line]] for i in ready], [[i.audio] for i in ready], options)
    answers = {item.line: reply for item, reply in zip(ready, replies) if reply is not None}
    for item, reply in zip(ready, replies):
        if reply is None:
            item.error = str(NothingHeardError())
    results = []
    for item in batch:
        record = {k: v for k, v in item.record.items() if k not in (RESPONSE_KEY, ERROR_KEY, LINE_KEY)}
        if item.line in answers:
            record[RESPONSE_KEY] = answers[item.line]
        else:
            record[ERROR_KEY] = item.error
        record[LINE_KEY] = item.line
        item.audio = None  # the batch's audio is not needed any more
        results.append(record)
    return results
