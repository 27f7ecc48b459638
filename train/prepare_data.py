"""ASR corpora on disk -> JSONL manifests `{"audio", "text", "duration", "text_raw"}`.

    python -m train.prepare_data librispeech  ROOT --out train.jsonl
    python -m train.prepare_data commonvoice  ROOT --out cv.jsonl  [--split train]
    python -m train.prepare_data gigaspeech   ROOT --out gs.jsonl  [--subset XL]
    python -m train.prepare_data table        FILE --out x.jsonl   [--audio-column path --text-column text]

Layouts:
- librispeech: any directory holding `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` files (a split such as
  train-clean-100, or the LibriSpeech folder with several splits); each line `ID TRANSCRIPT`, audio `ID.flac`.
- commonvoice: a Common Voice release folder: `{split}.tsv` (columns `path`, `sentence`) and `clips/`.
- gigaspeech: `GigaSpeech.json` (in ROOT or ROOT/audio_data) with segments already cut into files
  `<folder of the audio's path>/<sid>.wav` (or .opus/.flac), as the released BLSP scripts expect.
  Punctuation tags (<COMMA>, <PERIOD>, <QUESTIONMARK>, <EXCLAMATIONPOINT>) become punctuation; segments
  carrying a garbage tag (<SIL>, <MUSIC>, <NOISE>, <OTHER>) are dropped and counted.
- table: a CSV, TSV or JSONL file of audio path + transcript; relative paths are relative to the file.

`text` is the transcript through Whisper's English text normaliser (what the released BLSP data scripts
apply: lower case, punctuation removed, numbers and spellings standardised); `text_raw` keeps the original.
Audio is checked by reading its header (soundfile; PyAV through blsp_chat.audio for containers libsndfile
cannot open); a missing or unreadable file, or an empty transcript, goes to `OUT.rejects.jsonl` with its
reason and is skipped. `OUT.summary.json` holds the counts and hours, also printed.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import soundfile as sf

from blsp_chat.audio import AudioError, load_audio
from blsp_chat.constants import SAMPLE_RATE

SECONDS_PER_HOUR = 3600.0
GIGASPEECH_PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")
GIGASPEECH_SEGMENT_SUFFIXES = (".wav", ".opus", ".flac")
AUDIO_COLUMNS = ("audio", "path", "audio_path", "file", "filename", "wav")
TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription", "normalized_text")
# Where the British->American spelling list of Whisper's normaliser lives in packages that ship it.
SPELLING_MAP_LOCATIONS = (("whisper", "normalizers/english.json"), ("whisper_normalizer", "english.json"))


# --- normalisation -----------------------------------------------------------------------------------
def find_spelling_map() -> Path | None:
    """english.json of openai-whisper or whisper-normalizer when either is installed (not imported)."""
    for package, member in SPELLING_MAP_LOCATIONS:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidate = Path(location) / member
                if candidate.is_file():
                    return candidate
    return None


def english_normalizer(spelling_map: str | Path | None = None) -> tuple[Callable[[str], str], str | None]:
    """Whisper's EnglishTextNormalizer (transformers' copy of openai-whisper's) and the spelling list it
    uses: `spelling_map`, else the one an installed package ships, else none (British spellings then
    stay as they are; everything else is identical)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    path = Path(spelling_map) if spelling_map else find_spelling_map()
    mapping = json.loads(path.read_text(encoding="utf-8")) if path else {}
    return EnglishTextNormalizer(mapping), (str(path) if path else None)


# --- records -------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One utterance as the corpus lists it, before its audio is checked."""

    audio: Path
    text_raw: str
    extra: dict = field(default_factory=dict)


@dataclass
class Summary:
    corpus: str
    source: str
    kept: int = 0
    seconds: float = 0.0
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # by design (garbage tags, other subsets)
    spelling_map: str | None = None

    def as_dict(self) -> dict:
        return {
            "corpus": self.corpus, "source": self.source, "kept": self.kept,
            "hours": round(self.seconds / SECONDS_PER_HOUR, 4), "seconds": round(self.seconds, 2),
            "rejected": dict(self.rejected), "rejected_total": sum(self.rejected.values()),
            "dropped": dict(self.dropped), "spelling_map": self.spelling_map,
        }


class Reject(Exception):
    """An utterance that cannot be used; the message is its reason."""


def audio_duration(path: Path) -> float:
    """Seconds of audio from the file's header; Reject when it is missing or unreadable."""
    if not path.is_file():
        raise Reject("missing audio")
    try:
        info = sf.info(str(path))
        seconds = info.frames / info.samplerate
    except Exception:  # libsndfile cannot open it: try a full decode (PyAV containers, if installed)
        seconds = _decoded_duration(path)
    if not seconds > 0:
        raise Reject("empty audio")
    return seconds


def _decoded_duration(path: Path) -> float:
    try:
        return len(load_audio(str(path), max_seconds=None)) / SAMPLE_RATE
    except AudioError as err:
        raise Reject(f"unreadable audio: {str(err).splitlines()[0][:160]}") from err
    except Exception as err:  # a decoder's own error types
        raise Reject(f"unreadable audio: {type(err).__name__}") from err


# --- corpus layouts ------------------------------------------------------------------------------------
def librispeech(root: Path) -> Iterator[Candidate]:
    transcripts = sorted(Path(root).rglob("*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(f"no *.trans.txt under {root}: not a LibriSpeech folder")
    for trans in transcripts:
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            yield Candidate(trans.parent / f"{utt_id}.flac", text, {"id": utt_id})


def common_voice(root: Path, split: str = "train") -> Iterator[Candidate]:
    tsv = Path(root) / f"{split}.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} not found: not a Common Voice release folder (or no split {split!r})")
    with open(tsv, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"path", "sentence"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{tsv} lacks the column(s) {sorted(missing)}")
        for row in reader:
            extra = {"id": Path(row["path"]).stem}
            if row.get("client_id"):
                extra["speaker"] = row["client_id"]
            yield Candidate(Path(root) / "clips" / row["path"], row["sentence"] or "", extra)


def gigaspeech_text(text_tn: str) -> str | None:
    """GigaSpeech's `text_tn` with punctuation tags restored; None for a garbage utterance."""
    if any(tag in text_tn for tag in GIGASPEECH_GARBAGE):
        return None
    words = [GIGASPEECH_PUNCTUATION.get(w, w) for w in text_tn.split()]
    text = ""
    for word in words:
        text += word if word in GIGASPEECH_PUNCTUATION.values() or not text else " " + word
    return text


def _gigaspeech_metadata(root: Path) -> Path:
    for candidate in (root / "GigaSpeech.json", root / "audio_data" / "GigaSpeech.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no GigaSpeech.json in {root} or {root / 'audio_data'}")


def gigaspeech(root: Path, subset: str = "XL", dropped: Counter | None = None) -> Iterator[Candidate]:
    dropped = dropped if dropped is not None else Counter()
    metadata = _gigaspeech_metadata(Path(root))
    base = metadata.parent
    data = json.loads(metadata.read_text(encoding="utf-8"))
    tag = "{" + subset.strip("{}") + "}"
    for audio in data["audios"]:
        folder = base / Path(audio["path"]).parent
        for segment in audio["segments"]:
            if tag not in segment.get("subsets", []):
                dropped["other subset"] += 1
                continue
            text = gigaspeech_text(segment["text_tn"])
            if text is None:
                dropped["garbage tag"] += 1
                continue
            sid = segment["sid"]
            path = next((folder / (sid + s) for s in GIGASPEECH_SEGMENT_SUFFIXES if (folder / (sid + s)).exists()),
                        folder / f"{sid}.wav")
            yield Candidate(path, text, {"id": sid})


def table(path: Path, audio_column: str | None = None, text_column: str | None = None) -> Iterator[Candidate]:
    """CSV / TSV (by suffix; header row) or JSONL of audio path + transcript."""
    path = Path(path)
    rows = _jsonl_rows(path) if path.suffix in (".jsonl", ".json") else _csv_rows(path)
    base = path.parent
    audio_key = text_key = None
    for row in rows:
        if audio_key is None:
            audio_key = _pick_column(row, audio_column, AUDIO_COLUMNS, path, "audio")
            text_key = _pick_column(row, text_column, TEXT_COLUMNS, path, "text")
        audio = Path(str(row.get(audio_key) or ""))
        extra = {k: v for k, v in row.items() if k not in (audio_key, text_key) and k not in ("duration",)}
        yield Candidate(audio if audio.is_absolute() else base / audio, str(row.get(text_key) or ""), extra)


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not JSON: {err}") from err


def _csv_rows(path: Path) -> Iterator[dict]:
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter=delimiter)


def _pick_column(row: dict, wanted: str | None, known: tuple[str, ...], path: Path, what: str) -> str:
    if wanted:
        if wanted not in row:
            raise ValueError(f"{path} has no column {wanted!r} (columns: {sorted(row)})")
        return wanted
    for name in known:
        if name in row:
            return name
    raise ValueError(f"{path}: no {what} column found among {sorted(row)}; name it with --{what}-column")


# --- writing -------------------------------------------------------------------------------------------
def prepare(candidates: Iterable[Candidate], out: Path, summary: Summary, normalizer: Callable[[str], str],
            *, max_duration: float | None = None, progress: bool = True) -> Summary:
    """Check each candidate, write kept lines to `out` and rejects (with reasons) beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = rejects_file(out)
    tmp_out, tmp_rej = out.with_name(out.name + ".tmp"), rejects_path.with_name(rejects_path.name + ".tmp")
    iterator = _progress(candidates, progress)
    try:
        _check_all(iterator, tmp_out, tmp_rej, summary, normalizer, max_duration)
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        tmp_rej.unlink(missing_ok=True)
        raise
    os.replace(tmp_out, out)
    os.replace(tmp_rej, rejects_path)
    summary_file(out).write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def _check_all(candidates: Iterable[Candidate], tmp_out: Path, tmp_rej: Path, summary: Summary,
               normalizer: Callable[[str], str], max_duration: float | None) -> None:
    with open(tmp_out, "w", encoding="utf-8") as kept, open(tmp_rej, "w", encoding="utf-8") as rejects:
        for cand in candidates:
            text = normalizer(cand.text_raw).strip()
            try:
                if not text:
                    raise Reject("empty transcript")
                duration = audio_duration(cand.audio)
                if max_duration and duration > max_duration:
                    raise Reject(f"longer than {max_duration:g} s")
            except Reject as why:
                summary.rejected[str(why)] += 1
                rejects.write(json.dumps({"audio": str(cand.audio), "text_raw": cand.text_raw,
                                          "reason": str(why)}) + "\n")
                continue
            record = {"audio": str(cand.audio), "text": text, "duration": round(duration, 3), "text_raw": cand.text_raw}
            record.update({k: v for k, v in cand.extra.items() if k not in record})
            kept.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.kept += 1
            summary.seconds += duration


def rejects_file(out: Path) -> Path:
    return Path(out).with_suffix(".rejects.jsonl")


def summary_file(out: Path) -> Path:
    return Path(out).with_suffix(".summary.json")


def _progress(items: Iterable, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="utt", desc="checking audio", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=("librispeech", "commonvoice", "gigaspeech", "table"))
    parser.add_argument("source", help="corpus folder (or the file, for table)")
    parser.add_argument("--out", required=True, help="JSONL manifest to write")
    parser.add_argument("--split", default="train", help="commonvoice: which TSV (train, dev, test, validated, ...)")
    parser.add_argument("--subset", default="XL", help="gigaspeech: XS, S, M, L or XL")
    parser.add_argument("--audio-column", default=None, help="table: the audio path column (default: guessed)")
    parser.add_argument("--text-column", default=None, help="table: the transcript column (default: guessed)")
    parser.add_argument("--max-duration", type=float, default=None, help="reject clips longer than this (s)")
    parser.add_argument("--spelling-map", default=None, help="Whisper's english.json (British->American)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    normalizer, spelling = english_normalizer(args.spelling_map)
    source = Path(args.source)
    summary = Summary(args.corpus, str(source), spelling_map=spelling)
    if args.corpus == "librispeech":
        candidates = librispeech(source)
    elif args.corpus == "commonvoice":
        candidates = common_voice(source, args.split)
    elif args.corpus == "gigaspeech":
        candidates = gigaspeech(source, args.subset, summary.dropped)
    else:
        candidates = table(source, args.audio_column, args.text_column)
    try:
        prepare(candidates, Path(args.out), summary, normalizer, max_duration=args.max_duration,
                progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = summary.as_dict()
    print(json.dumps(report, indent=2))
    if report["rejected_total"]:
        print(f"{report['rejected_total']} utterances rejected; see {rejects_file(Path(args.out))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
