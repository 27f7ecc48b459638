"""Unpacking RNC ProPack method 1, the compression of Revolution Software's game data (Beneath a Steel Sky).

A packed file is an 18-byte header ("RNC\\x01", unpacked and packed lengths, a CRC-16 of each, a leeway byte and
the count of blocks) and a stream that mixes bits and bytes. The bits are read least significant first from
little-endian 16-bit words, a word only when its bits are needed; literal bytes are copied straight from the
stream at the first word not yet read, so bits and literal runs interleave at word boundaries. Each block
starts with three Huffman tables (literal-run lengths, match distances, match lengths) and a count of
rounds; a round copies a literal run, then (except in the block's last round) a match from what was output
before. Both CRCs are checked: a damaged file is refused, never half unpacked.
"""
from __future__ import annotations

import struct

HEADER = struct.Struct(">4sIIHHBB")  # signature, unpacked length, packed length, CRCs, leeway, blocks
SIGNATURE = b"RNC\x01"
MIN_MATCH = 2


class RncError(ValueError):
    """Not an RNC method 1 stream, or a damaged one."""


def crc16(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001), as RNC stores it."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


class _BitStream:
    """Bits least significant first from 16-bit little-endian words, a word taken only when its bits are
    needed, so that `pos` is always where the next literal run starts."""

    def __init__(self, data: bytes, pos: int):
        self.data, self.pos, self.bits, self.count = data, pos, 0, 0

    def _word(self, at: int) -> int:
        return int.from_bytes(self.data[at:at + 2], "little")

    def peek16(self) -> int:
        bits, count, at = self.bits, self.count, self.pos
        while count < 16:
            bits |= self._word(at) << count
            at, count = at + 2, count + 16
        return bits & 0xFFFF

    def read(self, n: int) -> int:
        while self.count < n:
            if self.pos >= len(self.data):
                raise RncError("the packed stream ends early")
            self.bits |= self._word(self.pos) << self.count
            self.pos, self.count = self.pos + 2, self.count + 16
        value = self.bits & ((1 << n) - 1)
        self.bits >>= n
        self.count -= n
        return value

    def literal(self, length: int) -> bytes:
        run = self.data[self.pos:self.pos + length]
        if len(run) < length:
            raise RncError("a literal run goes past the packed stream")
        self.pos += length
        return run


def _huffman_table(bits: _BitStream) -> list[tuple[int, int, int]] | None:
    """(mask, code, symbol) in the order codes are tried; None when the block keeps the previous table."""
    lengths = [bits.read(4) for _ in range(bits.read(5))]
    if not lengths:
        return None
    table, code = [], 0
    for length in range(1, 17):
        for symbol, own in enumerate(lengths):
            if own == length:
                # Canonical codes, stored bit-reversed because the stream is read least significant first.
                reversed_code = int(format(code >> (16 - length), f"0{length}b")[::-1], 2)
                table.append(((1 << length) - 1, reversed_code, symbol))
                code += 1 << (16 - length)
    return table


def _value(bits: _BitStream, table: list[tuple[int, int, int]]) -> int:
    """A symbol s < 2 is itself; a larger one is a number of s - 1 more bits under an implied top bit."""
    window = bits.peek16()
    for mask, code, symbol in table:
        if window & mask == code:
            bits.read(mask.bit_length())
            return symbol if symbol < 2 else bits.read(symbol - 1) | (1 << (symbol - 1))
    raise RncError("no Huffman code matches the stream")


def unpack(packed: bytes) -> bytes:
    """The unpacked bytes of an RNC method 1 file; RncError if it is not one or its CRCs do not match."""
    if len(packed) < HEADER.size or packed[:4] != SIGNATURE:
        raise RncError("not an RNC method 1 file")
    _, unpacked_length, packed_length, unpacked_crc, packed_crc, _, blocks = HEADER.unpack_from(packed)
    body = packed[HEADER.size:HEADER.size + packed_length]
    if len(body) < packed_length or crc16(body) != packed_crc:
        raise RncError("the packed data is damaged (its CRC does not match)")
    bits, out = _BitStream(packed, HEADER.size), bytearray()
    bits.read(2)  # the lock and key flags: unused by these files
    tables: list = [None, None, None]
    for _ in range(blocks):
        tables = [_huffman_table(bits) or kept for kept in tables]
        if None in tables:
            raise RncError("a block has no Huffman table")
        runs, distances, lengths = tables
        rounds = bits.read(16)
        for left in range(rounds, 0, -1):
            literal_length = _value(bits, runs)
            if literal_length:
                out += bits.literal(literal_length)
            if left > 1:
                distance, length = _value(bits, distances) + 1, _value(bits, lengths) + MIN_MATCH
                if distance > len(out):
                    raise RncError("a match reaches before the start of the output")
                start = len(out) - distance
                if distance >= length:
                    out += out[start:start + length]
                else:  # the match overlaps what it copies: byte by byte
                    for _ in range(length):
                        out.append(out[-distance])
    if len(out) < unpacked_length or crc16(bytes(out[:unpacked_length])) != unpacked_crc:
        raise RncError("the unpacked data is damaged (its CRC does not match)")
    return bytes(out[:unpacked_length])
