"""The voice acting of Flight of the Amazon Queen (Interactive Binary Illusions, 1995), with the game's own
dialogue text as its transcripts.

Debian's `flight-of-the-amazon-queen` ships the freeware CD ("talkie") release that ScummVM plays: one file,
queen.1c, rebuilt by ScummVM's compress_queen tool with a resource table in front and the speech compressed.
- Header (15 bytes): "QTBL", the 6-byte version string ("CEM10" for the English CD), floppy and demo flags,
  the compression of the .SB speech files (0 none, 1 MP3, 2 Ogg Vorbis, 3 FLAC; Debian's is 1: MPEG-2.5
  layer III, 11,025 Hz mono, 16 kbit/s) and the number of entries (big-endian 16-bit).
- One 21-byte entry per file: its 12-byte NUL-padded name, a bundle byte, and its offset from the start of
  queen.1c and size (both big-endian 32-bit). The files follow, back to back, to the end of queen.1c.
- An uncompressed .SB (compression 0) is a 110- or 122-byte header (by the version at bytes 2-3, 104 or 110)
  and unsigned 8-bit mono samples at 11,025 Hz.

The dialogues are the .DOG files (one per conversation, named after the character: BOB1.DOG, NAOMI2.DOG).
After a 20-byte header a .DOG holds its talk key, the number of Joe's and of the other person's sentences,
the dialogue tree (from byte 32, 96 bytes a level), Joe's sentences right after the tree and the person's at
an offset the header gives: each sentence is a 16-bit id and a length-prefixed string padded to 4 bytes.
The engine (ScummVM's engines/queen/talk.cpp) speaks a sentence in segments, cut where the text has a command
(`*` and two characters, `*XY` with 11 more), and plays for segment n the voice file `<key><id>J<n>` or
`<key><id>P<n>` (key 2 decimal digits, id 4 hex digits, n 1 hex digit, zero-filled): J for Joe's sentences,
P for the person's; Joe's opening line is `<key>SSSSJ<n>`, the repeat visit's lines `<key>XXXXJ<n>` and
`<key>XXXXP<n>`. A segment is taken here only where that file exists, its text has letters and no sound
written out ("<gulp>", "(sigh)"), and no other sentence claims the same file: 3,972 of the 6,745 speech
files, 2.9 hours. The cutaway scenes' speech (C30E_102.SB ...) and Joe's object descriptions (JOE*.SB) have
their text in other tables and are not read.

Speakers: Joe is Brad Lavelle; the rest of the cast is in the game's credits (CREDIT2.CRD), each actor beside
the characters they voiced. `CAST` names the character of each .DOG and its credited actors. The dev set
holds out two whole actors (`HELD_OUT_ACTORS`): Jessica Martin (Naomi, the Secretary, the Zombie Woman: 290
lines) and Barry James (Ian, the Pygmy Chief: 164 lines), a woman and a man, neither of whom shares a
character with another actor (as Klunk, Lola and Rico are shared), 454 lines and 22 minutes in all. Everyone
else trains: Joe and 21 characters by nine actors, 3,289 lines and 2.3 hours; no voice is in both. The
characters whose actor the credits leave open (Lou, the man in the dinosaur costume) are in neither, as
they could be a held-out voice; so are the animals (the gorilla, the guard dog and Wedgewood the parrot),
whose lines are grunts, barks and squawks.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .steel_sky import speech_wav  # unsigned 8-bit mono at 11,025 Hz, as an uncompressed .SB holds

QUEEN_DIR = Path("/usr/share/scummvm/flight-of-the-amazon-queen")
QUEEN_FILE = "queen.1c"
APT_PACKAGE = "flight-of-the-amazon-queen"

TABLE_MAGIC = b"QTBL"
HEADER = struct.Struct(">4s6sBBBH")   # magic, version, floppy, demo, compression, entry count
ENTRY = struct.Struct(">12sBII")      # name, bundle, offset, size
COMPRESSIONS = {0: "SB", 1: "MP3", 2: "OGG", 3: "FLAC"}
SB_HEADER_SIZES = {104: 110, 110: 122}  # .SB version -> header bytes before the samples
SB_DEFAULT_VERSION = 104                # the engine's choice for a version it does not know

DOG_HEADER_SIZE = 20          # skipped by the engine before the talk header
DIALOGUE_TREE_START = 32
DIALOGUE_LEVEL_SIZE = 6 * 16  # six nodes of eight 16-bit fields
SENTENCE_ALIGN = 4
TWO_BYTE_ALIGN = 2
NO_TEXT = "0"                 # a sentence the game leaves unsaid
COMMAND = re.compile(r"\*(XY.{11}|..)", re.DOTALL)
SILENT_COMMANDS = ("GD", "GM")  # Joe grabs: the engine skips the segment but counts it
SOUND_CUE = re.compile(r"<[^>]*>|\([^)]*\)")

JOE = "JOE"
JOE_ACTOR = "Brad Lavelle"
# .DOG stem, digits dropped or not -> (character, the actors the credits name for it).
CAST: dict[str, tuple[str, tuple[str, ...]]] = {
    "AND": ("ANDERSON", ("Enn Reitel",)), "BOB": ("TRADER BOB", ("Jon Coleman",)),
    "BUD": ("BUD", ("Bill Hootkins",)), "CHEF": ("CHEF", ("Bill Hootkins",)),
    "CHIEF": ("PYGMY CHIEF", ("Barry James",)), "DEATH": ("CHARON", ("Enn Reitel",)),
    "FAYE": ("FAYE", ("Lisa Valdez",)), "FRANK": ("FRANK", ("Bill Hootkins",)),
    "HENRY": ("HENRY", ("Enn Reitel",)), "IAN": ("IAN", ("Barry James",)),
    "JIM": ("JIMMY COOK", ("Tom Hill",)), "JOHN": ("JOHN", ("Bill Hootkins",)),
    "KLUNK": ("KLUNK", ("Enn Reitel", "Mike Hurley")), "LARIS": ("BELLBOY", ("Bill Hootkins",)),
    "LOLA": ("LOLA", ("Debbie Arnold", "Regina Reagan")),
    "MAN1": ("SPACED OUT PRISONER", ("Bill Hootkins",)),
    "MAN2": ("PRISONER WITH PUPPET", ("Tom Hill",)),
    "NAOMI": ("NAOMI", ("Jessica Martin",)), "ORACLE": ("TEMPLE GUARDIAN", ("Penelope Keith",)),
    "PRIN": ("AZURA", ("Debbie Arnold",)), "SEC": ("SECRETARY", ("Jessica Martin",)),
    "SHOWERAM": ("SHOWERING AMAZON", ("Debbie Arnold",)), "SPARKY": ("SPARKY", ("Tom Hill",)),
    "TAM": ("MARY-LOU COOK", ("Regina Reagan",)), "WITCH": ("WITCH DOCTOR", ("Regina Reagan",)),
    "ZOMBIE": ("ZOMBIE WOMAN", ("Jessica Martin",)),
    # credited to no one for certain, or not speaking words: in neither split
    "LOU": ("LOU", ()), "APE2": ("DINOSAUR COSTUME", ()), "APE3": ("DINOSAUR COSTUME", ()),
    "APE": ("GORILLA", ()), "DOG": ("GUARD DOG", ()), "WEDGE": ("WEDGEWOOD", ()),
    "TALLPYG": ("TALL PYGMY", ()),
}
HELD_OUT_ACTORS = ("Jessica Martin", "Barry James")
DEV, TRAINING = "dev", "training"


class QueenDataError(ValueError):
    """queen.1c is not the file this reader knows: damaged, truncated, or another release."""


@dataclass(frozen=True)
class Resource:
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class ResourceTable:
    version: str
    compression: str      # a value of COMPRESSIONS
    resources: dict[str, Resource]


@dataclass(frozen=True)
class SpokenLine:
    clip: str             # the voice file's name without ".SB": "020006P1"
    speaker: str          # the character: JOE or a CAST character
    actors: tuple[str, ...]  # who voiced it, per the credits (several where they do not say which)
    dialogue: str         # the .DOG file the text comes from
    path: Path            # queen.1c
    subtitle: str
    read: Callable[[], bytes]  # the clip as an encoded audio file (MP3, Ogg, FLAC or WAV)

    @property
    def split(self) -> str | None:
        """DEV for the held-out actors, TRAINING for the others, None where the actor is not known."""
        if not self.actors:
            return None
        held_out = [actor in HELD_OUT_ACTORS for actor in self.actors]
        return DEV if all(held_out) else TRAINING if not any(held_out) else None


# --- the resource file ----------------------------------------------------------------------------
def read_table(stream: BinaryIO, file_size: int) -> ResourceTable:
    """queen.1c's resource table; every entry checked to lie within the file's `file_size` bytes."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size or not head.startswith(TABLE_MAGIC):
        raise QueenDataError("queen.1c has no resource table (no QTBL header): not a compress_queen build")
    _, version, _, _, compression, count = HEADER.unpack(head)
    if compression not in COMPRESSIONS:
        raise QueenDataError(f"queen.1c: unknown speech compression {compression}")
    table = stream.read(count * ENTRY.size)
    if len(table) < count * ENTRY.size:
        raise QueenDataError(f"queen.1c is truncated: its table of {count} entries ends past the file")
    resources = {}
    for start in range(0, len(table), ENTRY.size):
        raw_name, _, offset, size = ENTRY.unpack_from(table, start)
        name = raw_name.split(b"\0", 1)[0].decode("ascii", errors="replace")
        if offset + size > file_size:
            raise QueenDataError(f"queen.1c is truncated or damaged: {name} ends at byte {offset + size:,}, "
                                 f"the file at {file_size:,}; reinstall {APT_PACKAGE}")
        resources[name] = Resource(name, offset, size)
    return ResourceTable(version.split(b"\0", 1)[0].decode("ascii", errors="replace"),
                         COMPRESSIONS[compression], resources)


def open_table(path: Path) -> ResourceTable:
    with path.open("rb") as stream:
        return read_table(stream, path.stat().st_size)


def read_resource(path: Path, resource: Resource) -> bytes:
    with path.open("rb") as stream:
        stream.seek(resource.offset)
        data = stream.read(resource.size)
    if len(data) != resource.size:
        raise QueenDataError(f"queen.1c is truncated: {resource.name} has {len(data)} of its {resource.size} bytes")
    return data


def speech_file(data: bytes, compression: str) -> bytes:
    """A speech resource as an encoded audio file: compressed ones as they are, a raw .SB as WAV."""
    if compression != "SB":
        return data
    if len(data) < 4:
        raise QueenDataError(f"a .SB file of {len(data)} bytes has no header")
    version = struct.unpack_from("<H", data, 2)[0]
    return speech_wav(data[SB_HEADER_SIZES.get(version, SB_HEADER_SIZES[SB_DEFAULT_VERSION]):])


# --- the dialogue files ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Dialogue:
    name: str
    talk_key: int
    joe: list[tuple[int, str]]     # (sentence id, text) of Joe's sentences
    person: list[tuple[int, str]]  # and of the other person's
    person_again: str              # what the person says when Joe comes back
    joe_again: str                 # and Joe


def parse_dialogue(name: str, data: bytes) -> Dialogue:
    """A .DOG file (with its 20-byte header) -> its sentences."""
    try:
        body = data[DOG_HEADER_SIZE:]
        levels, _, talk_key, joe_count, person_count = struct.unpack_from(">5h", body, 0)
        person_at, _, again_at = struct.unpack_from(">3H", body, 22)
        joe = _sentences(body, DIALOGUE_TREE_START + abs(levels) * DIALOGUE_LEVEL_SIZE, joe_count)
        person = _sentences(body, person_at, person_count)
        person_again, at = _string(body, again_at, TWO_BYTE_ALIGN)
        joe_again, _ = _string(body, at, TWO_BYTE_ALIGN)
    except (struct.error, IndexError, ValueError) as err:
        raise QueenDataError(f"queen.1c: the dialogue {name} is damaged ({err})") from err
    return Dialogue(name, talk_key, joe, person, person_again, joe_again)


def _sentences(body: bytes, at: int, count: int) -> list[tuple[int, str]]:
    sentences = []
    for _ in range(count):
        ident = struct.unpack_from(">h", body, at + 2)[0]
        text, at = _string(body, at + 4, SENTENCE_ALIGN)
        sentences.append((ident, text))
    return sentences


def _string(body: bytes, at: int, align: int) -> tuple[str, int]:
    """A length-prefixed string at `at` -> (text, where the next field starts, aligned)."""
    length = body[at]
    if at + 1 + length > len(body):
        raise ValueError(f"a string of {length} bytes at {at} runs past the file's {len(body)}")
    text = body[at + 1:at + 1 + length].decode("latin-1")
    return text, (at + 1 + length + align - 1) // align * align if length else at + 1


def segments(sentence: str) -> list[tuple[int, str]]:
    """(segment number from 1, its text) of a sentence as the engine speaks it, commands cut out."""
    out, start, number = [], 0, 0
    for match in COMMAND.finditer(sentence):
        number += 1
        if match.group(1)[:2] not in SILENT_COMMANDS:
            out.append((number, sentence[start:match.start()]))
        start = match.end()
    if start < len(sentence):
        out.append((number + 1, sentence[start:]))
    return out


def voice_files(dialogue: Dialogue) -> Iterator[tuple[str, bool, str]]:
    """(voice file name without ".SB", spoken by Joe?, segment text) of every segment of a dialogue."""
    key = f"{dialogue.talk_key:02d}"
    sentences = [(f"{key}{ident:04X}J" if ident else f"{key}SSSSJ", True, text) for ident, text in dialogue.joe]
    sentences += [(f"{key}{ident:04X}P", False, text) for ident, text in dialogue.person]
    sentences += [(f"{key}XXXXP", False, dialogue.person_again), (f"{key}XXXXJ", True, dialogue.joe_again)]
    for prefix, by_joe, text in sentences:
        if text != NO_TEXT:
            for number, segment in segments(text):
                yield f"{prefix}{number:X}", by_joe, segment


def character_of(dialogue_name: str) -> tuple[str, tuple[str, ...]]:
    """The other person of a .DOG ("NAOMI2.DOG" -> NAOMI) and the actors credited for them."""
    stem = dialogue_name.rsplit(".", 1)[0].upper()
    for key in (stem, stem.rstrip("0123456789")):
        if key in CAST:
            return CAST[key]
    raise QueenDataError(f"queen.1c: the dialogue {dialogue_name} is not one of this release's")


def clean_subtitle(text: str) -> str | None:
    """The words of a segment: the game's trademark sign (^_) dropped, spaces collapsed; None for a segment
    without letters or with a sound written out ("<gulp>", "(sigh)"), which the subtitle does not spell."""
    if not re.search("[A-Za-z]", text) or SOUND_CUE.search(text):
        return None
    return " ".join(text.replace("^_", "").split())


# --- the lines -------------------------------------------------------------------------------------
def spoken_lines(game_dir: Path = QUEEN_DIR) -> Iterator[SpokenLine]:
    """Every voice file of the dialogues that one segment of text certainly belongs to, by file name."""
    path = game_dir / QUEEN_FILE
    table = open_table(path)
    claims: dict[str, list[tuple[str, bool, str]]] = {}
    for name in sorted(n for n in table.resources if n.upper().endswith(".DOG")):
        dialogue = parse_dialogue(name, read_resource(path, table.resources[name]))
        for clip, by_joe, text in voice_files(dialogue):
            subtitle = clean_subtitle(text)
            if f"{clip}.SB" in table.resources and subtitle:
                claims.setdefault(clip, []).append((name, by_joe, subtitle))
    for clip in sorted(claims):
        if len({(by_joe, text) for _, by_joe, text in claims[clip]}) != 1:
            continue  # two sentences for one file: not certain which is spoken
        dialogue, by_joe, text = claims[clip][0]
        speaker, actors = (JOE, (JOE_ACTOR,)) if by_joe else character_of(dialogue)
        yield SpokenLine(clip, speaker, actors, dialogue, path, text,
                         _reader(path, table.resources[f"{clip}.SB"], table.compression))


def _reader(path: Path, resource: Resource, compression: str) -> Callable[[], bytes]:
    return lambda: speech_file(read_resource(path, resource), compression)
