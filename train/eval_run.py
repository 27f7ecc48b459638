"""The evaluation run: settings, instructions, the engines of each system, batches of replies, and the
resumable outputs file (`{task}.{dataset}.jsonl`, appended and flushed batch by batch).

`train.evaluate` is the command line; `train.eval_score` turns the records written here into metrics and
`train.eval_compare` lays summaries out as paper Table 2.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

from blsp_chat.audio import AudioError, load_audio, split_into_windows
from blsp_chat.config import GenerationOptions
from blsp_chat.constants import (
    CONTINUATION_INSTRUCTION,
    FALLBACK_TEMPERATURES,
    INTENT_INSTRUCTION,
    REPEAT_INSTRUCTION,
    SAMPLE_RATE,
    SENTIMENT_INSTRUCTION,
    SNIPS_LIGHT_INTENTS,
    TRANSLATE_INSTRUCTION,
)
from blsp_chat.generate import encoded_batch, generate_replies, speech_turn
from blsp_chat.prompt import Turn

from .io import append_lines, numbered_lines, read_jsonl, repair_tail, resolve_audio

TASKS = ("asr", "st", "slu", "continuation", "qa")
SYSTEMS = ("blsp", "text", "cascade", "whisper")
SPEECH_SYSTEMS = ("blsp", "cascade", "whisper")
SYSTEM_NAMES = {"text": "Text+LLM", "cascade": "Whisper+LLM", "whisper": "Whisper", "blsp": "BLSP"}
# Replies long enough for each task's answer; short answers keep a looping small LLM cheap.
DEFAULT_MAX_NEW_TOKENS = {"asr": 128, "st": 160, "slu": 24, "continuation": 64, "qa": 128}
SENTIMENT_LABELS = ("positive", "negative", "neutral")
DEFAULT_BATCH_SIZE = 8

Judge = Callable[[str, str, str], "bool | None"]  # (question, transcript, answer) -> acceptable?


# --- manifest and outputs ---------------------------------------------------------------------------
def read_manifest(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items with an `id` (the manifest's own, else the line number) and absolute audio paths."""
    path = Path(path)
    items, seen = [], set()
    for number, item in numbered_lines(path):
        item["id"] = str(item.get("id", number))
        if item["id"] in seen:
            raise ValueError(f"{path}:{number}: id {item['id']!r} appears twice")
        seen.add(item["id"])
        if item.get("audio"):
            item["audio"] = str(resolve_audio(path, item["audio"]))
        items.append(item)
    return items[:limit] if limit else items


class OutputsFile:
    """Append-only JSONL of per-item records keyed by `id`. A half-written last line (a run killed
    mid-write) is cut off on open, so appending after it never glues two records together."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        repair_tail(self.path)
        for record in read_jsonl(self.path):
            self.records[str(record["id"])] = record

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            append_lines(handle, records)
        self.records.update((str(record["id"]), record) for record in records)


# --- settings -------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    task: str
    system: str
    model: str = "default"
    label: str | None = None           # the row name in --compare (default: the system's name)
    dataset: str = "test"
    batch_size: int = DEFAULT_BATCH_SIZE
    target_language: str = "German"
    labels: tuple[str, ...] = SNIPS_LIGHT_INTENTS
    instruction: str | None = None     # overrides the task's instruction (an item's own wins)
    options: GenerationOptions = field(default_factory=GenerationOptions)
    comet_model: str | None = None
    speech_search: str | None = None   # the readout's search chosen at load (None: the checkpoint's own)
    spelling_mapping: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {TASKS}")
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r}; choose from {SYSTEMS}")
        if self.system == "whisper" and self.task != "asr":
            raise ValueError("--system whisper is Whisper's decoder alone: it only does --task asr")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")

    @property
    def row_label(self) -> str:
        return self.label or SYSTEM_NAMES[self.system]

    def stem(self) -> str:
        return f"{self.task}.{self.dataset}"


def slu_instruction(labels: Sequence[str]) -> str:
    """Sentiment labels get the SLUE-VoxCeleb instruction, any other list the intent instruction."""
    if sorted(label.lower() for label in labels) == sorted(SENTIMENT_LABELS):
        return SENTIMENT_INSTRUCTION
    return INTENT_INSTRUCTION.format(labels=", ".join(labels))


def instruction_for(item: dict, settings: EvalSettings) -> str:
    if item.get("instruction"):
        return item["instruction"]
    if item.get("question"):
        return item["question"]
    if settings.instruction:
        return settings.instruction
    task = settings.task
    if task == "qa":
        raise ValueError(f"qa item {item['id']} has no question: give it an 'instruction'")
    return {
        "asr": REPEAT_INSTRUCTION,
        "st": TRANSLATE_INSTRUCTION.format(target=settings.target_language),
        "slu": slu_instruction(settings.labels),
        "continuation": CONTINUATION_INSTRUCTION,
    }[task]


def check_items(items: Sequence[dict], settings: EvalSettings) -> None:
    """Fail before any model runs when the manifest lacks what the task and system need."""
    need = ["audio"] if settings.system in SPEECH_SYSTEMS else ["text"]
    need += {"asr": [], "st": ["reference"], "slu": ["label"], "continuation": [], "qa": []}[settings.task]
    if settings.task == "continuation" and settings.system != "text":
        need += ["text"] if any("reference" not in item for item in items) else []
    for item in items:
        missing = [key for key in need if not item.get(key)]
        if settings.task == "asr" and not (item.get("reference") or item.get("text")):
            missing.append("text (or reference)")
        if missing:
            raise ValueError(f"manifest item {item['id']} lacks {', '.join(missing)} "
                             f"(needed for --task {settings.task} --system {settings.system})")


# --- engines --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One human turn: an instruction followed by speech (`audio`) or by typed `text`."""

    instruction: str
    text: str = ""
    audio: np.ndarray | None = None


class LlmRunner:
    """Batched replies of a loaded BLSP model (`.model`, `.tokenizer`) to single human turns, through
    the serving code (blsp_chat.generate: one renderer, left padding, the chat's stop rules)."""

    def __init__(self, loaded, options: GenerationOptions = GenerationOptions()):
        self.loaded, self.options = loaded, options
        self.model, self.tokenizer = loaded.model, loaded.tokenizer

    def turn(self, request: Request):
        if request.audio is not None:
            return speech_turn(request.audio, self.model, instruction=request.instruction, text=request.text)
        return Turn("human", instruction=request.instruction, text=request.text)

    def batch_inputs(self, requests: Sequence[Request]) -> dict:
        """Left-padded input_ids, attention_mask, speech_mask (B, T) and the encoded speech in row order."""

        batch, speech = encoded_batch(self.loaded, *self._conversations(requests))
        return batch | {"speech_embeds": speech}

    def replies(self, requests: Sequence[Request]) -> list[str]:
        if not requests:
            return []
        return generate_replies(self.loaded, *self._conversations(requests), self.options)

    def _conversations(self, requests: Sequence[Request]) -> tuple[list[list], list[list[np.ndarray]]]:
        """One single-turn conversation per request, and its clips."""
        return [[self.turn(r)] for r in requests], [[r.audio] if r.audio is not None else [] for r in requests]


class WhisperTranscriber:
    """Whisper's own encoder-decoder: 16 kHz clips -> English transcripts (clips past 30 s are cut
    into 30 s windows whose transcripts are joined)."""

    def __init__(self, source: str, device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE,
                 max_tokens_per_second: float | None = None):
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
        self.extractor = WhisperFeatureExtractor.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.batch_size = batch_size
        # A caller that refuses transcripts faster than people speak (train.pseudo_label) stops decoding there:
        # a grunt's hallucinated loop is otherwise decoded to 448 tokens at every fallback temperature.
        self.max_tokens_per_second = max_tokens_per_second
        multilingual = getattr(self.model.generation_config, "is_multilingual", False)
        self.generate_kwargs = {"language": "en", "task": "transcribe"} if multilingual else {}
        # openai/whisper's transcribe decoding: greedy first, and a window whose text compresses too well (a
        # loop) or scores too low is decoded again at rising temperature. Plain greedy decoding falls into
        # 300-word loops on a few unfamiliar voices, which would make the baseline look worse than Whisper is.
        self.generate_kwargs.update(temperature=FALLBACK_TEMPERATURES, compression_ratio_threshold=1.35,
                                    logprob_threshold=-1.0)

    @torch.inference_mode()
    def __call__(self, audios: Sequence[np.ndarray]) -> list[str]:
        windows, owners = [], []
        for index, audio in enumerate(audios):
            for window in split_into_windows(np.asarray(audio, dtype=np.float32)):
                windows.append(window)
                owners.append(index)
        texts = []
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            features = self.extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            torch.manual_seed(start)  # fallback samples: the same clips give the same transcripts on every run
            ids = self.model.generate(features.to(self.model.device, self.model.dtype), **self.generate_kwargs,
                                      **self._length_cap(batch))
            texts += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        joined = [[] for _ in audios]
        for owner, text in zip(owners, texts):
            joined[owner].append(text)
        return [" ".join(parts) for parts in joined]

    def _length_cap(self, batch: Sequence[np.ndarray]) -> dict:
        if self.max_tokens_per_second is None:
            return {}
        seconds = max(len(window) for window in batch) / SAMPLE_RATE
        return {"max_new_tokens": math.ceil(seconds * self.max_tokens_per_second) + 4}


@dataclass
class Engines:
    """What a system needs: the LLM (blsp, text, cascade), a transcriber (cascade, whisper), a judge (qa)."""

    llm: LlmRunner | None = None
    transcriber: Callable[[Sequence[np.ndarray]], list[str]] | None = None
    judge: Judge | None = None


# --- one batch ------------------------------------------------------------------------------------
def load_batch_audio(items: Sequence[dict]) -> tuple[list, dict[str, str]]:
    """Each item's audio, or None with the reason where it cannot be used (scored as an empty reply)."""

    audios, errors = [], {}
    for item in items:
        try:
            audios.append(load_audio(item["audio"], max_seconds=None))
        except AudioError as err:
            audios.append(None)
            errors[item["id"]] = str(err)
    return audios, errors


def run_batch(items: Sequence[dict], settings: EvalSettings, engines: Engines) -> list[dict]:
    """Replies of the system to a batch of items, as output records."""
    system = settings.system
    instructions = [instruction_for(item, settings) for item in items]
    audios, errors = load_batch_audio(items) if system in SPEECH_SYSTEMS else ([None] * len(items), {})
    ok = [i for i, item in enumerate(items) if item["id"] not in errors]
    asr = [None] * len(items)
    if system in ("cascade", "whisper"):
        for i, text in zip(ok, engines.transcriber([audios[i] for i in ok])):
            asr[i] = text
    replies = [""] * len(items)
    if system == "whisper":
        replies = [text or "" for text in asr]
    else:
        requests = [_request(system, instructions[i], items[i], audios[i], asr[i]) for i in ok]
        for i, reply in zip(ok, engines.llm.replies(requests)):
            replies[i] = reply
    reference_replies = continuation_references(items, instructions, replies, settings, engines)
    return [_record(items[i], settings, instructions[i], replies[i], asr[i], reference_replies[i],
                    errors.get(items[i]["id"]))
            for i in range(len(items))]


def _request(system: str, instruction: str, item: dict, audio, asr_text) -> Request:
    if system == "blsp":
        return Request(instruction, audio=audio)
    return Request(instruction, text=item["text"] if system == "text" else asr_text)


def continuation_references(items, instructions, replies, settings: EvalSettings, engines: Engines) -> list:
    """For `continuation`: the reply from the transcript each reply is compared with (the manifest's
    `reference`, else generated here by the LLM reading `text`; the text system's own replies are that)."""
    if settings.task != "continuation":
        return [None] * len(items)
    if settings.system == "text":
        return [item.get("reference") or reply for item, reply in zip(items, replies)]
    todo = [i for i, item in enumerate(items) if not item.get("reference")]
    generated = dict(zip(todo, engines.llm.replies([Request(instructions[i], text=items[i]["text"]) for i in todo])))
    return [item.get("reference") or generated[i] for i, item in enumerate(items)]


def _record(item: dict, settings: EvalSettings, instruction: str, reply: str, asr_text, reference_reply, error) -> dict:
    record = {"id": item["id"], "task": settings.task, "system": settings.system, "model": settings.model,
              "instruction": instruction, "reply": reply}
    for key in ("audio", "text", "reference", "label"):
        if key in item:
            record[key] = item[key]
    if asr_text is not None:
        record["asr"] = asr_text
    if reference_reply is not None:
        record["reference_reply"] = reference_reply
    if error:
        record["error"] = error
    return record


# --- the run --------------------------------------------------------------------------------------
def check_resumable(outputs: OutputsFile, settings: EvalSettings) -> None:
    for record in outputs.records.values():
        theirs = (record.get("task"), record.get("system"), record.get("model"))
        if theirs != (settings.task, settings.system, settings.model):
            raise ValueError(
                f"{outputs.path} holds outputs of another run (task, system, model = {theirs}); "
                f"this run is {(settings.task, settings.system, settings.model)}: use another --out"
            )


def pending_items(items: Sequence[dict], outputs: OutputsFile, settings: EvalSettings) -> list[dict]:
    """Items without a record yet; speech items longest first (by file size) so batches pad little."""
    todo = [item for item in items if item["id"] not in outputs.records]
    if settings.system in SPEECH_SYSTEMS:
        todo.sort(key=lambda item: -_file_size(item["audio"]))
    return todo


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def generate_outputs(items: Sequence[dict], settings: EvalSettings, engines: Engines, out_dir: str | Path,
                     progress: bool = True) -> list[dict]:
    """Generate what is missing from `{stem}.jsonl` in out_dir, batch by batch (a killed run resumes);
    returns every item's record, in manifest order."""
    check_items(items, settings)
    outputs = OutputsFile(Path(out_dir) / f"{settings.stem()}.jsonl")
    check_resumable(outputs, settings)
    todo = pending_items(items, outputs, settings)
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{settings.task}/{settings.system}",
              unit="item", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            outputs.append(run_batch(batch, settings, engines))
            bar.update(len(batch))
    return [outputs.records[item["id"]] for item in items]
