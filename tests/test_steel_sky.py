"""Beneath a Steel Sky's voice acting as a pseudo-label source (train/steel_sky.py, train/rnc.py): RNC streams
unpack to exactly what was packed, damaged ones are refused, and the speech files of a game directory laid
out as Debian's package lays it out come back as audio at the game's rate, other files left."""
import struct

import numpy as np
import pytest

from blsp_chat.audio import AudioError, load_audio
from blsp_chat.constants import SAMPLE_RATE
from train import pseudo_label, steel_sky
from train.real_speech import SourceMissing
from train.rnc import RncError, crc16, unpack

# --- a small RNC method 1 packer, only for these tests: every table gives 16 symbols 4-bit codes ----------
FLAT_TABLE_BITS = 4


class _Stream:
    """Bits least significant first into 16-bit little-endian words, a new word reserved where the last is
    full; literal bytes go at the end, after the last word reserved (where the unpacker looks for them)."""

    def __init__(self):
        self.out, self.word_at, self.used = bytearray(), 0, 16

    def bits(self, value: int, count: int) -> None:
        for bit in range(count):
            if self.used == 16:
                self.word_at, self.used = len(self.out), 0
                self.out += b"\0\0"
            if value >> bit & 1:
                self.out[self.word_at + self.used // 8] |= 1 << (self.used % 8)
            self.used += 1

    def flat_table(self) -> None:
        self.bits(16, 5)
        for _ in range(16):
            self.bits(FLAT_TABLE_BITS, 4)

    def value(self, number: int) -> None:
        symbol = number if number < 2 else number.bit_length()
        # symbol s has the canonical 4-bit code s; the stream holds it bit-reversed
        self.bits(int(format(symbol, "04b")[::-1], 2), FLAT_TABLE_BITS)
        if symbol >= 2:
            self.bits(number - (1 << (symbol - 1)), symbol - 1)


def pack(blocks: list[list[tuple[bytes, tuple[int, int] | None]]], keep_tables_after_first: bool = False) -> bytes:
    """Blocks of rounds (literal run, (distance, length) or None in a block's last round) as an RNC file."""
    stream, data = _Stream(), bytearray()
    stream.bits(0, 2)
    for number, rounds in enumerate(blocks):
        for _ in range(3):
            if number and keep_tables_after_first:
                stream.bits(0, 5)
            else:
                stream.flat_table()
        stream.bits(len(rounds), 16)
        for literal, match in rounds:
            stream.value(len(literal))
            stream.out += literal
            data += literal
            if match is not None:
                distance, length = match
                stream.value(distance - 1)
                stream.value(length - 2)
                for _ in range(length):
                    data.append(data[-distance])
    body = bytes(stream.out)
    header = struct.pack(">4sIIHHBB", b"RNC\x01", len(data), len(body), crc16(bytes(data)), crc16(body), 0,
                         len(blocks))
    return header + body, bytes(data)


ROUNDS = [(b"abc", (3, 9)), (b"XYZ", (1, 5)), (b"", (4, 2)), (b"end of block", None)]


@pytest.mark.parametrize("keep_tables", [False, True])
def test_rnc_streams_unpack_to_what_was_packed(keep_tables):
    packed, data = pack([ROUNDS, [(b"second", (6, 6)), (b"!" * 40, None)]], keep_tables_after_first=keep_tables)
    assert data.startswith(b"abcabcabcabcXYZZZZZZ")  # a match of 9 from 3 back and one overlapping itself
    assert unpack(packed) == data


def test_a_damaged_rnc_stream_is_refused_not_half_unpacked():
    packed, _ = pack([ROUNDS])
    damaged = bytearray(packed)
    damaged[-3] ^= 0x10
    with pytest.raises(RncError, match="damaged"):
        unpack(bytes(damaged))
    with pytest.raises(RncError, match="not an RNC"):
        unpack(b"RIFF" + packed[4:])
    with pytest.raises(RncError, match="damaged"):
        unpack(packed[:-4])


# --- a game directory laid out as sky.dnr + sky.dsk -----------------------------------------------------
def tone(seconds: float, hz: float = 220.0) -> bytes:
    t = np.arange(int(seconds * steel_sky.SPEECH_SAMPLE_RATE)) / steel_sky.SPEECH_SAMPLE_RATE
    return np.round(128 + 100 * np.sin(2 * np.pi * hz * t)).astype(np.uint8).tobytes()


def file_header(packed: bool) -> bytes:
    return struct.pack("<11H", 0x81 if packed else 0, *[0] * 10)


@pytest.fixture
def sky_dir(tmp_path):
    """Three files: a packed speech line (stored at a 16-byte-unit offset), a raw one, and a sprite file."""
    short, long = tone(0.5), tone(1.0, 330.0)
    # the packed line: a literal run of its first 200 samples, then copies of them
    packed, data = pack([[(short[:200], (200, len(short) - 200)), (b"", None)]])
    assert data == short[:200] + (short[:200] * 30)[:len(short) - 200]
    files = [(50001, file_header(True) + packed, True), (50000, file_header(False) + long, False),
             (4096, file_header(False) + b"\x07" * 64, False)]
    disk, entries = bytearray(), []
    for number, content, shifted in files:
        if shifted:
            disk += b"\0" * (-len(disk) % 16)
            offset = (len(disk) >> 4) | steel_sky.SHIFTED_OFFSET_FLAG
        else:
            offset = len(disk)
        entries.append(struct.pack("<H", number) + offset.to_bytes(3, "little") + len(content).to_bytes(3, "little"))
        disk += content
    (tmp_path / "sky.dnr").write_bytes(struct.pack("<I", len(entries)) + b"".join(entries))
    (tmp_path / "sky.dsk").write_bytes(bytes(disk))
    return tmp_path, {50000: long, 50001: data}


def test_the_speech_files_are_read_by_number_and_the_others_left(sky_dir):
    directory, expected = sky_dir
    recordings = list(pseudo_label.steel_sky_recordings(directory))
    assert [r.clip_id for r in recordings] == ["50000", "50001"]
    assert recordings[0].origin == f"{directory / 'sky.dsk'}:50000"
    for recording in recordings:
        samples = expected[int(recording.clip_id)]
        audio = load_audio(recording.read(), max_seconds=None)
        assert len(audio) == pytest.approx(len(samples) * SAMPLE_RATE / steel_sky.SPEECH_SAMPLE_RATE, abs=2)
        assert 0.5 < np.abs(audio).max() < 1.0  # unsigned 8-bit around 128, not read as signed


def test_a_damaged_speech_file_is_refused_as_unreadable_audio(sky_dir):
    directory, _ = sky_dir
    disk = bytearray((directory / "sky.dsk").read_bytes())
    disk[64] ^= 0xFF  # inside the packed line's stream
    (directory / "sky.dsk").write_bytes(bytes(disk))
    packed = next(r for r in pseudo_label.steel_sky_recordings(directory) if r.clip_id == "50001")
    with pytest.raises(AudioError, match="sky.dsk file 50001 cannot be read: .*damaged"):
        packed.read()


def test_a_directory_that_lists_more_than_it_holds_is_refused(sky_dir):
    directory, _ = sky_dir
    dnr = (directory / "sky.dnr").read_bytes()
    with pytest.raises(ValueError, match="says it lists 3 files but holds 2"):
        steel_sky.directory(dnr[:-8])


def test_a_missing_game_package_is_named_with_how_to_install_it(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install beneath-a-steel-sky"):
        list(pseudo_label.steel_sky_recordings(tmp_path))
