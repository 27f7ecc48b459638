"""The voice acting of Beneath a Steel Sky (Revolution Software, 1994), read from the game's own data files.

Debian's `beneath-a-steel-sky` ships the CD release that ScummVM plays: sky.dnr is its directory (a count,
then 8 bytes per file: its number, a 24-bit offset and 24 bits of flags and size) and sky.dsk its data.
Files 50000-59999 are the speech: each is a 22-byte header and unsigned 8-bit mono samples at 11,025 Hz,
most of them RNC-packed (train/rnc.py). 3,650 lines by a cast of actors, with no transcripts:
train.pseudo_label has Whisper transcribe them. A file that cannot be read (damaged, cut short) is an
AudioError, so the build refuses that line and goes on.

The game's licence lets anyone give it away (train/results/steel_sky_leg.md says what was trained on it).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile as sf

from blsp_chat.audio import AudioError

from .rnc import SIGNATURE, RncError, unpack

SKY_DIR = Path("/usr/share/scummvm/beneath-a-steel-sky")
SPEECH_FILES = range(50000, 60000)
SPEECH_SAMPLE_RATE = 11025
FILE_HEADER_BYTES = 22
PACKED_FLAG = 0x80            # in the header's first word: the data after the header is RNC-packed
SHIFTED_OFFSET_FLAG = 1 << 23  # in the directory's offset: the offset counts 16-byte units
OWN_HEADER_FLAG = 1 << 22      # in the directory's flags: the unpacked data starts with a header of its own
SIZE_MASK = 0x3FFFFF


@dataclass(frozen=True)
class DiskFile:
    number: int
    offset: int
    size: int
    has_own_header: bool


def directory(dnr: bytes) -> list[DiskFile]:
    """The files sky.dnr lists, in its order."""
    if len(dnr) < 4:
        raise ValueError("sky.dnr is too short to hold a directory")
    count = struct.unpack_from("<I", dnr)[0]
    if len(dnr) < 4 + 8 * count:
        raise ValueError(f"sky.dnr says it lists {count} files but holds {(len(dnr) - 4) // 8}")
    files = []
    for at in range(4, 4 + 8 * count, 8):
        number = struct.unpack_from("<H", dnr, at)[0]
        offset = int.from_bytes(dnr[at + 2:at + 5], "little")
        flags = int.from_bytes(dnr[at + 5:at + 8], "little")
        if offset & SHIFTED_OFFSET_FLAG:
            offset = (offset & (SHIFTED_OFFSET_FLAG - 1)) << 4
        files.append(DiskFile(number, offset, flags & SIZE_MASK, bool(flags & OWN_HEADER_FLAG)))
    return files


def file_data(disk, entry: DiskFile) -> bytes:
    """A file's bytes after its header, unpacked where packed."""
    disk.seek(entry.offset)
    raw = disk.read(entry.size)
    if len(raw) < entry.size or len(raw) < FILE_HEADER_BYTES:
        raise ValueError(f"file {entry.number} goes past the end of sky.dsk")
    flag = struct.unpack_from("<H", raw)[0]
    body = raw[FILE_HEADER_BYTES:]
    if flag & PACKED_FLAG and body[:4] == SIGNATURE:
        body = unpack(body)
        if entry.has_own_header:
            body = body[FILE_HEADER_BYTES:]
    return body


def speech_wav(samples: bytes) -> bytes:
    """Unsigned 8-bit samples at the game's rate as a WAV file's bytes."""
    audio = (np.frombuffer(samples, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    out = io.BytesIO()
    sf.write(out, audio, SPEECH_SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def speech_lines(sky_dir: Path = SKY_DIR) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """(file number, a function giving the line as WAV bytes) for every speech file, by number."""
    entries = sorted((e for e in directory((sky_dir / "sky.dnr").read_bytes()) if e.number in SPEECH_FILES),
                     key=lambda e: e.number)
    disk_path = sky_dir / "sky.dsk"
    for entry in entries:
        def read(entry: DiskFile = entry) -> bytes:
            try:
                with open(disk_path, "rb") as disk:
                    return speech_wav(file_data(disk, entry))
            except (RncError, ValueError) as err:
                raise AudioError(f"sky.dsk file {entry.number} cannot be read: {err}") from err
        yield entry.number, read
