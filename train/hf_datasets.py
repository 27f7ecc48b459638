"""Hugging Face `datasets` as a training data source: a split's rows become the project's manifest lines.

    python -m train.train_adapter --config ... --dataset-dir my_saved_dataset          # datasets.load_from_disk
    python -m train.train_adapter --config ... --dataset-name ORG/NAME --dataset-config en --dataset-split train

A row gives one manifest line `{"audio", "text", "instruction", "response", "duration"}`:
- audio from `data.audio_column`: an `Audio` column (read undecoded, so its encoded bytes or its file are
  decoded by `blsp_chat.audio.load_audio`, no torchcodec needed), a file path, or `{"array", "sampling_rate"}`.
  Every clip is written once as a 16 kHz mono 16-bit wav named by its content's hash, so the encoder cache
  (keyed by file) and a resumed run find the same files.
- text from `data.text_column`; instruction and response from `data.instruction_column` and
  `data.response_column` when named, else the line is a repeat line (the ASR task: the paper's repeat
  instruction, response = transcript).
The manifest (`<split>.jsonl`) and `audio/` go to `data.dataset_audio_dir` (train_adapter: default
OUTPUT_DIR/dataset); only the main process writes them, the others wait and read.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from blsp_chat.audio import load_audio
from blsp_chat.constants import REPEAT_INSTRUCTION, SAMPLE_RATE
from train.loop import distributed_state

AUDIO_DIR = "audio"
WAV_SUBTYPE = "PCM_16"
DIGEST_CHARS = 20


def import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("a Hugging Face dataset as training data needs the datasets package: pip install "
                          "datasets (in the train extra: pip install 'blsp-chat[train]')") from err
    return datasets


def load_split(data, split: str):
    """The split as a `datasets.Dataset`, from `data.dataset_dir` (save_to_disk) or `data.dataset_name`."""
    datasets = import_datasets()
    if data.dataset_dir:
        if not Path(data.dataset_dir).is_dir():
            raise FileNotFoundError(f"data.dataset_dir {data.dataset_dir!r} is not a directory")
        loaded = datasets.load_from_disk(data.dataset_dir)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{data.dataset_dir} has no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        source = data.dataset_dir
    else:
        loaded = datasets.load_dataset(data.dataset_name, data.dataset_config, split=split)
        source = data.dataset_name
    needed = [c for c in (data.audio_column, data.text_column, data.instruction_column, data.response_column) if c]
    missing = [c for c in needed if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{source} ({split}) has no column {missing}; its columns are {loaded.column_names} "
                         "(set data.audio_column, data.text_column, data.instruction_column, data.response_column)")
    if isinstance(loaded.features.get(data.audio_column), datasets.Audio):
        loaded = loaded.cast_column(data.audio_column, datasets.Audio(decode=False))
    return loaded


def manifest_for_split(data, split: str, out_dir: str | Path) -> Path:
    """Write (main process) and return the split's manifest under out_dir; every process gets the path."""
    out_dir = Path(out_dir)
    manifest = out_dir / f"{split}.jsonl"
    state = distributed_state()
    if state.is_main_process:
        write_manifest(load_split(data, split), data, manifest)
    state.wait_for_everyone()
    return manifest


def write_manifest(dataset, data, manifest: Path) -> None:
    audio_dir = manifest.parent / AUDIO_DIR
    audio_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    rows = tqdm(dataset, desc=f"dataset {manifest.stem}", unit="row", file=sys.stderr, disable=None)
    for index, row in enumerate(rows):
        where = f"{manifest.stem} row {index}"
        samples = clip_samples(row[data.audio_column], where)
        clip = audio_dir / f"{hashlib.sha1(to_pcm16(samples).tobytes()).hexdigest()[:DIGEST_CHARS]}.wav"
        if not clip.is_file():
            write_wav(clip, samples)
        lines.append(json.dumps(manifest_line(row, data, clip.relative_to(manifest.parent), samples, where)))
    scratch = manifest.with_suffix(".jsonl.partial")
    scratch.write_text("".join(line + "\n" for line in lines))
    os.replace(scratch, manifest)


def manifest_line(row: dict[str, Any], data, clip: Path, samples: np.ndarray, where: str) -> dict[str, Any]:
    text = row[data.text_column]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: column {data.text_column!r} must be a non-empty string, got {text!r}")
    instruction = row[data.instruction_column] if data.instruction_column else REPEAT_INSTRUCTION
    response = row[data.response_column] if data.response_column else text
    return {"audio": str(clip), "text": text.strip(), "instruction": instruction, "response": response,
            "duration": round(len(samples) / SAMPLE_RATE, 4)}


def clip_samples(value: Any, where: str) -> np.ndarray:
    """An audio cell (undecoded Audio, path, or array with its rate) -> mono float32 at 16 kHz."""
    if isinstance(value, dict) and value.get("array") is not None:
        source = (value.get("sampling_rate"), np.asarray(value["array"]))
    elif isinstance(value, dict) and value.get("bytes"):
        source = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        source = value["path"]
    elif isinstance(value, (str, os.PathLike)):
        source = value
    else:
        raise ValueError(f"{where}: the audio cell is neither an Audio value, a file path nor an array with its "
                         f"sampling_rate: {type(value).__name__}")
    try:
        return load_audio(source, max_seconds=None)
    except (ValueError, OSError, RuntimeError) as err:
        raise ValueError(f"{where}: unreadable audio ({err})") from err


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    scratch = path.with_suffix(".partial.wav")
    sf.write(scratch, to_pcm16(samples), SAMPLE_RATE, subtype=WAV_SUBTYPE)
    os.replace(scratch, path)
