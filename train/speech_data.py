"""Speech training data for the adapter: manifest -> examples -> length-bucketed batches -> padded tensors.

Manifest: JSON lines `{"audio": path, "text": transcript, "instruction": ..., "response": ...}` (relative
audio paths are read against the manifest's folder; an optional "duration" in seconds saves a header read).
Every prompt is rendered by `blsp_chat.prompt.render`, the renderer serving uses:
    Turn("human", instruction=instruction, speech_tokens=model.speech_token_count(n_samples)),
    Turn("assistant", text=response), add_eos=True
so labels are IGNORE_INDEX everywhere except the response and its EOS. For the distillation loss the same
conversation is also rendered with the transcript typed in place of the speech (the "teacher" view, the
prompt the LLM wrote its continuation from in step 1).

Repetition mixing (BLSP+RP, paper section 4.1: repetition:continuation = 1:9): `with_repetition` adds lines
with instruction "Please repeat the following words." whose response is the transcript.

Encoder cache (`EncoderCache`): the frozen Whisper encoder's output of each clip, saved once under a key of
(absolute path, mtime, size, encoder padding mode, encoder identity), so later epochs run only the adapter
and the LLM. A changed file gets a new key and is encoded again. `speech_embeddings` uses the model's own
`extract_features` / `encode_frames` / `adapt`, so cached and uncached paths feed the adapter the same frames.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from blsp_chat.audio import load_audio
from blsp_chat.constants import IGNORE_INDEX, REPEAT_INSTRUCTION
from blsp_chat.prompt import BLSP_TEMPLATE, PromptTemplate, Turn, render
from train.io import resolve_audio
from train.loop import shard_global_batches

PAPER_REPETITION_RATIO = 1 / 9        # repetition lines per continuation line (BLSP+RP, 1:9)
DEFAULT_MEGA_BATCH_FACTOR = 50        # global batches per sorted mega-batch
KIND_REPEAT, KIND_OTHER = "repeat", "other"


# --- examples ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechExample:
    audio: str          # absolute path
    text: str           # transcript
    instruction: str
    response: str
    duration: float     # seconds, for bucketing (from the manifest or the file header)

    @property
    def kind(self) -> str:
        return KIND_REPEAT if self.instruction == REPEAT_INSTRUCTION else KIND_OTHER


def audio_duration(path: str | Path) -> float:
    """Seconds, from the file header (no decoding)."""
    info = sf.info(str(path))
    return info.frames / info.samplerate


def manifest_audio_paths(path: str | Path) -> list[str]:
    """Every line's clip (any manifest: the "audio" field is all this reads)."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [str(resolve_audio(path, json.loads(line)["audio"])) for line in lines]


def read_manifest(path: str | Path, *, limit: int | None = None) -> list[SpeechExample]:
    """Parse a manifest; errors name the line. Repeat lines may omit "response" (it is the transcript)."""
    path = Path(path)
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            audio = resolve_audio(path, record["audio"])
            instruction = record.get("instruction", "")
            response = record.get("response")
            if response is None and instruction == REPEAT_INSTRUCTION:
                response = record["text"]
            if not response:
                raise KeyError("response")
            duration = record.get("duration")
            examples.append(SpeechExample(
                audio=str(audio), text=record.get("text", ""), instruction=instruction, response=response,
                duration=float(duration) if duration is not None else audio_duration(audio)))
        except (json.JSONDecodeError, KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: bad manifest line ({type(err).__name__}: {err})") from err
        if limit is not None and len(examples) >= limit:
            break
    return examples


def with_repetition(examples: Sequence[SpeechExample], ratio: float = PAPER_REPETITION_RATIO, *,
                    seed: int = 0) -> list[SpeechExample]:
    """Add round(ratio * #non-repeat lines) repeat lines (response = transcript), drawn from distinct
    clips while they last. Lines that are already repeat lines are kept and counted."""
    others = [e for e in examples if e.kind != KIND_REPEAT and e.text]
    wanted = round(ratio * len(others)) - sum(e.kind == KIND_REPEAT for e in examples)
    if wanted <= 0 or not others:
        return list(examples)
    rng = random.Random(seed)
    picks: list[SpeechExample] = []
    while len(picks) < wanted:
        picks += rng.sample(others, min(len(others), wanted - len(picks)))
    return list(examples) + [replace(e, instruction=REPEAT_INSTRUCTION, response=e.text) for e in picks]


def summarize(examples: Sequence[SpeechExample]) -> dict[str, Any]:
    """For the training record and the model card."""
    durations = [e.duration for e in examples]
    return {
        "examples": len(examples),
        "repeat_examples": sum(e.kind == KIND_REPEAT for e in examples),
        "hours": round(sum(durations) / 3600, 4),
        "mean_seconds": round(float(np.mean(durations)), 3) if durations else 0.0,
        "max_seconds": round(max(durations), 3) if durations else 0.0,
        "distinct_clips": len({e.audio for e in examples}),
    }


# --- encoder cache -----------------------------------------------------------------------------------
class EncoderCache:
    """Whisper encoder outputs per clip on disk: {"hidden": [(T_w, d) per 30 s window], "num_samples": n}.

    `memory_bytes` > 0 also keeps entries in memory once read, up to that many bytes of frames: a run on a
    CPU reads its whole mix every epoch, and `torch.load` of a clip (about 12 ms) is then about 0.4 s of a
    2.4 s step of 32 (bench/README.md). Entries past the budget are read from disk each time."""

    def __init__(self, directory: str | Path, *, encoder_padding: str, encoder_id: str, memory_bytes: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.encoder_padding, self.encoder_id = encoder_padding, encoder_id
        self.hits = self.misses = 0
        self.memory_bytes, self.held_bytes = memory_bytes, 0
        self._held: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_model(cls, directory: str | Path, model, memory_bytes: int = 0) -> "EncoderCache":
        config = model.config
        identity = f"{config.whisper_name_or_path}|{json.dumps(config.whisper_config, sort_keys=True, default=str)}"
        if config.encoder_tuned_layers:  # the frozen layers' frames, not the whole encoder's
            identity += f"|frozen_layers={model.frozen_encoder_layers}"
        return cls(directory, encoder_padding=config.encoder_padding, encoder_id=identity, memory_bytes=memory_bytes)

    def key(self, path: str | Path) -> str:
        stat = os.stat(path)
        raw = f"{Path(path).resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{self.encoder_padding}|{self.encoder_id}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self._file(key).is_file()

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry, or None. Callers must not change its tensors in place: a held entry is shared."""
        if key in self._held:
            self.hits += 1
            return self._held[key]
        file = self._file(key)
        if not file.is_file():
            self.misses += 1
            return None
        self.hits += 1
        entry = torch.load(file, map_location="cpu", weights_only=True)
        self._hold(key, entry)
        return entry

    def _hold(self, key: str, entry: dict[str, Any]) -> None:
        size = sum(h.numel() * h.element_size() for h in entry["hidden"])
        if self.held_bytes + size <= self.memory_bytes:
            self._held[key] = entry
            self.held_bytes += size

    def put(self, key: str, hidden: Sequence[torch.Tensor], num_samples: int) -> None:
        file = self._file(key)
        file.parent.mkdir(parents=True, exist_ok=True)
        entry = {"hidden": [h.detach().to("cpu").clone() for h in hidden], "num_samples": int(num_samples)}
        handle, scratch = tempfile.mkstemp(dir=file.parent, suffix=".partial")
        os.close(handle)
        torch.save(entry, scratch)
        os.replace(scratch, file)  # a reader never sees half an entry


def speech_embeddings(model, batch: dict[str, Any], cache: EncoderCache | None = None,
                      augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One (L_i, d_llm) tensor per example: encoder outputs from `batch["encodeds"]` (cache hits, filled by
    the dataset) or computed now from `batch["audios"]` (then stored in the cache), then the adapter.
    `augment` (training only) maps each window's (T, d) encoder output to an altered copy."""
    encoded = list(batch["encodeds"])
    missing = [i for i, e in enumerate(encoded) if e is None]
    if missing:
        with torch.no_grad():
            fresh = model.encode_windows([batch["audios"][i] for i in missing])
        for i, windows in zip(missing, fresh):
            encoded[i] = windows
            if cache is not None and batch["cache_keys"][i] is not None:
                cache.put(batch["cache_keys"][i], windows, len(batch["audios"][i]))
    if augment is not None:
        encoded = [[augment(window) for window in windows] for windows in encoded]
    return model.adapt_windows(encoded)


@dataclass(frozen=True)
class FrameMasking:
    """SpecAugment (Park et al. 2019) on the frozen encoder's outputs: spans of `time_span` frames, about
    `time_fraction` of each window in all, and about `channel_fraction` of the channels (the same ones
    over the whole window) are set to zero. The adapter then cannot lean on any one stretch of a clip,
    which is what it does when it learns the training sentences by heart."""

    time_fraction: float = 0.0
    time_span: int = 10
    channel_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not (0 <= self.time_fraction < 1 and 0 <= self.channel_fraction < 1):
            raise ValueError(f"mask fractions must be in [0, 1), got {self.time_fraction}, {self.channel_fraction}")
        if self.time_span < 1:
            raise ValueError(f"the masked time span must be at least 1 frame, got {self.time_span}")

    @property
    def active(self) -> bool:
        return self.time_fraction > 0 or self.channel_fraction > 0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        frames, channels = window.shape
        keep = torch.ones(frames, channels, dtype=torch.bool)  # drawn on the CPU: the same masks on any device
        spans = int(round(self.time_fraction * frames / self.time_span))
        for start in torch.randint(0, max(frames - self.time_span, 0) + 1, (spans,)).tolist():
            keep[start:start + self.time_span] = False
        keep[:, torch.rand(channels) < self.channel_fraction] = False
        return window * keep.to(window.device, window.dtype)


def word_piece_targets(tokenizer, blank_id: int) -> Callable[[str], list[int]]:
    """CTC targets over the LLM's vocabulary: a transcript's tokens as they follow other words (leading
    space), the blank left out."""
    def targets(text: str) -> list[int]:
        return [i for i in tokenizer(" " + text.strip(), add_special_tokens=False).input_ids if i != blank_id]
    return targets


# --- dataset and collator ----------------------------------------------------------------------------
class SpeechDataset(torch.utils.data.Dataset):
    """Examples -> rendered token ids + audio (or the cached encoder output).

    speech_token_count: `BlspModel.speech_token_count`. with_teacher: also render the transcript view
    for the distillation loss. max_seconds: longer clips are rejected by load_audio. ctc_targets: also
    give each transcript's CTC targets, as this gives them (`word_piece_targets`, `characters.spell`).
    """

    def __init__(self, examples: Sequence[SpeechExample], tokenizer, speech_token_count: Callable[[int], int], *,
                 template: PromptTemplate = BLSP_TEMPLATE, cache: EncoderCache | None = None,
                 with_teacher: bool = False, max_seconds: float | None = None,
                 ctc_targets: Callable[[str], list[int]] | None = None):
        self.examples, self.tokenizer, self.speech_token_count = list(examples), tokenizer, speech_token_count
        self.template, self.cache, self.with_teacher, self.max_seconds = template, cache, with_teacher, max_seconds
        self.ctc_targets = ctc_targets
        # Rendered token ids by (index, num_samples): the same every epoch, and tokenizing them is about a
        # tenth of a CTC-only step on a CPU (bench/README.md). A few kB an example.
        self._tokens: dict[tuple[int, int], dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def durations(self) -> list[float]:
        return [e.duration for e in self.examples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        key = self.cache.key(example.audio) if self.cache is not None else None
        entry = self.cache.get(key) if key is not None else None
        audio = None
        if entry is None:
            try:
                audio = load_audio(example.audio, max_seconds=self.max_seconds)
            except ValueError as err:
                raise ValueError(f"{example.audio}: {err}") from err
            num_samples = len(audio)
        else:
            num_samples = entry["num_samples"]
        return {"audio": audio, "encoded": None if entry is None else entry["hidden"], "cache_key": key,
                "num_samples": num_samples, "kind": example.kind, "text": example.text,
                "response": example.response, "instruction": example.instruction,
                **self.tokens(index, num_samples)}

    def tokens(self, index: int, num_samples: int) -> dict[str, Any]:
        """The example's prompt (and teacher and CTC targets where used), rendered once."""
        tokens = self._tokens.get((index, num_samples))
        if tokens is None:
            example = self.examples[index]
            tokens = self.render_speech(example, num_samples)
            if self.with_teacher:
                tokens["teacher"] = self.render_text(example)
            if self.ctc_targets is not None:
                tokens["transcript_ids"] = self.ctc_targets(example.text)
            self._tokens[(index, num_samples)] = tokens
        return tokens

    def render_speech(self, example: SpeechExample, num_samples: int) -> dict[str, list]:
        turns = [Turn("human", instruction=example.instruction, speech_tokens=self.speech_token_count(num_samples)),
                 Turn("assistant", text=example.response)]
        rendered = render(turns, self.tokenizer, self.template, add_eos=True)
        return {"input_ids": rendered.input_ids, "speech_mask": rendered.speech_mask, "labels": rendered.labels}

    def render_text(self, example: SpeechExample) -> dict[str, list]:
        turns = [Turn("human", instruction=example.instruction, text=example.text),
                 Turn("assistant", text=example.response)]
        rendered = render(turns, self.tokenizer, self.template, add_eos=True)
        return {"input_ids": rendered.input_ids, "speech_mask": rendered.speech_mask, "labels": rendered.labels}


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_tokens(items: Sequence[dict[str, list]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: pad ids, attention 0, speech mask False, labels IGNORE_INDEX."""
    return {
        "input_ids": pad_rows([i["input_ids"] for i in items], pad_id),
        "attention_mask": pad_rows([[1] * len(i["input_ids"]) for i in items], 0),
        "speech_mask": pad_rows([[int(s) for s in i["speech_mask"]] for i in items], 0).bool(),
        "labels": pad_rows([i["labels"] for i in items], IGNORE_INDEX),
    }


class SpeechCollator:
    """Items of `SpeechDataset` -> a batch dict: token tensors, `audios` (arrays or None where `encoded`
    holds cached encoder windows), `cache_keys`, metadata lists, and `teacher` tensors when rendered."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = collate_tokens(items, self.pad_id)
        for name in ("audio", "encoded", "cache_key", "num_samples", "kind", "text", "response", "instruction"):
            batch[name + "s"] = [i[name] for i in items]
        if "teacher" in items[0]:
            batch["teacher"] = collate_tokens([i["teacher"] for i in items], self.pad_id)
        if "transcript_ids" in items[0]:
            batch["transcript_ids"] = [i["transcript_ids"] for i in items]
        return batch


# --- length-bucketed batches -------------------------------------------------------------------------
class BucketBatchSampler:
    """Shuffle (seed, epoch), cut into mega-batches of `mega_batch_factor` global batches, sort each by
    duration, cut into global batches of batch_size * num_replicas, shuffle the batch order, and give
    rank r its slice (similar lengths on every GPU). One process: every example exactly once per epoch.
    Several: the last global batch is filled up with the epoch's first examples, so that every process
    takes the same number of steps."""

    def __init__(self, durations: Sequence[float], batch_size: int, *, seed: int = 0,
                 mega_batch_factor: int = DEFAULT_MEGA_BATCH_FACTOR, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError("batch_size and mega_batch_factor must be at least 1")
        self.durations, self.batch_size, self.seed = list(durations), batch_size, seed
        self.mega_batch_factor, self.num_replicas, self.rank = mega_batch_factor, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.durations)))
        rng.shuffle(order)
        global_size = self.batch_size * self.num_replicas
        if self.num_replicas > 1 and len(order) % global_size:
            order += order[: global_size - len(order) % global_size]
        mega = global_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start:start + mega], key=lambda i: self.durations[i], reverse=True)
            batches += [group[i:i + global_size] for i in range(0, len(group), global_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from shard_global_batches(self.global_batches(), self.num_replicas, self.rank, drop_last=False)

    def __len__(self) -> int:
        global_size = self.batch_size * self.num_replicas
        return -(-len(self.durations) // global_size)
