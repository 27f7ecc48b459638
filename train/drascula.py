"""The voice acting of Drascula: The Vampire Strikes Back (Alcachofa Soft, 1996), with the game's own subtitles
as its transcripts.

Debian's `drascula` ships the English release that ScummVM plays, in /usr/share/scummvm/drascula/en:
- `<speaker><n>.ALS` is one spoken line: unsigned 8-bit mono samples at 11,025 Hz, no header. The speaker
  prefix is "" for the hero, John Hacker, then D (Drascula), B (the drunk), BJ, E, I (Igor), L, P (the
  pianist), T (the bartender) and VB (Von Braun). `S<n>.ALS` are sound effects, not speech.
- drascula.dat, written by ScummVM's tools, ends with the game's 15 text tables, each in every language
  (English first). Line n of a speaker's table is the subtitle of `<speaker><n>.ALS`.

drascula.dat's earlier tables (rooms, objects, actions) are not needed here: the text tables are found as the
one offset from which a language count and 15 tables of that many entries end exactly at the end of the file.
An entry holds its texts back to back, each NUL-terminated after a big-endian 16-bit slot length, which is
how far the next text starts from this one; the slots begin 4 bytes in.

The subtitles were written for the screen, and the actors were Spanish reading English: a few lines are
spoken with words that the subtitle does not have. Whisper's WER against them is measured beside every
system's (train/results/), so that such lines count against every system alike.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .steel_sky import speech_wav  # the same sample format: unsigned 8-bit mono at 11,025 Hz

DRASCULA_DIR = Path("/usr/share/scummvm/drascula/en")
TEXT_TABLE_COUNT = 15
ENGLISH = 0  # the languages' order in every table
FIRST_SLOT = 4
# Speaker prefix of the speech files -> the index of that speaker's table among the 15.
SPEAKER_TABLES = {"": 0, "D": 1, "B": 2, "BJ": 3, "E": 4, "I": 5, "L": 6, "P": 7, "T": 8, "VB": 9}
# The hero, John Hacker (the files without a prefix): 446 lines by one actor, kept for training
# (train.pseudo_label); the rest of the cast is in the real-speech dev set (train.real_speech).
TRAINING_SPEAKERS = ("",)
SPEECH_FILE = re.compile(r"(BJ|VB|[DBEILPT]?)(\d+)\.ALS", re.IGNORECASE)


@dataclass(frozen=True)
class SpokenLine:
    speaker: str          # the file's prefix: "" for the hero
    number: int
    path: Path
    subtitle: str
    read: Callable[[], bytes]  # the line as WAV bytes


def text_tables(dat: bytes, language: int = ENGLISH) -> list[list[str]]:
    """The 15 text tables of drascula.dat in one language: table -> line number -> text."""
    for start in range(len(dat) - 2):
        tables = _tables_from(dat, start)
        if tables is not None:
            if language >= len(tables[0]):
                raise ValueError(f"drascula.dat has {len(tables[0])} languages, not {language + 1}")
            return [_texts(count, entries[language]) for count, entries in tables]
    raise ValueError("drascula.dat: no text tables that end at the end of the file")


def _tables_from(dat: bytes, start: int) -> list[tuple[int, list[bytes]]] | None:
    """[(line count, one entry per language)] of the 15 tables if they start at `start` and fill the file to
    its end, else None."""
    languages = struct.unpack_from(">H", dat, start)[0]
    if not 1 <= languages <= 16:
        return None
    at, tables = start + 2, []
    for _ in range(TEXT_TABLE_COUNT):
        if at + 2 > len(dat):
            return None
        count, at = struct.unpack_from(">H", dat, at)[0], at + 2
        entries = []
        for _ in range(languages):
            if at + 2 > len(dat):
                return None
            size, at = struct.unpack_from(">H", dat, at)[0], at + 2
            entries.append(dat[at:at + size])
            at += size
        tables.append((count, entries))
    return tables if at == len(dat) else None


def _texts(count: int, entry: bytes) -> list[str]:
    """The `count` texts of one table entry; text 0 is the entry's start (unused by the game)."""
    starts, at = [0], FIRST_SLOT
    for _ in range(1, count):
        at += struct.unpack_from(">H", entry, at - 2)[0]
        starts.append(at)
    texts = []
    for start in starts:
        end = entry.find(b"\0", start)
        if start > len(entry) or end < 0:
            raise ValueError(f"a text table's slot runs past its entry ({start} of {len(entry)} bytes)")
        texts.append(entry[start:end].decode("latin-1"))
    return texts


def spoken_lines(game_dir: Path = DRASCULA_DIR) -> Iterator[SpokenLine]:
    """Every speech file with a subtitle, by speaker then number; files without one (sound effects, numbers
    past the speaker's table, empty texts) are left out."""
    tables = text_tables((game_dir / "drascula.dat").read_bytes())
    lines = []
    for path in game_dir.iterdir():
        match = SPEECH_FILE.fullmatch(path.name)
        if not match:
            continue
        speaker, number = match.group(1).upper(), int(match.group(2))
        table = tables[SPEAKER_TABLES[speaker]]
        if number < len(table) and table[number].strip():
            lines.append(SpokenLine(speaker, number, path, " ".join(table[number].split()), _reader(path)))
    yield from sorted(lines, key=lambda line: (list(SPEAKER_TABLES).index(line.speaker), line.number))


def _reader(path: Path) -> Callable[[], bytes]:
    return lambda: speech_wav(path.read_bytes())
