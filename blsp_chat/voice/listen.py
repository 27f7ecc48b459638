"""Hands-free turns from a live microphone: blocks at the device's rate -> 16 kHz -> EndOfTurnDetector.

    listener = TurnListener(recorder.read_block, recorder.sample_rate)
    audio = listener.next_turn(on_speech_start=lambda: print("(hearing you)"))   # blocks until a pause

`read_block(timeout)` returns the next captured block, or None when none came within timeout (the
recorder in mic.py has one). No sounddevice here: tests feed recorded blocks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..constants import SAMPLE_RATE
from .vad import SPEECH_START, TURN_END, EndOfTurnDetector, TurnOptions

READ_TIMEOUT_S = 0.1   # how long one read waits for the microphone: also how often `keep_going` is asked


class StreamResampler:
    """Chunks at `rate` -> chunks at 16 kHz, with the filter's state carried across chunks (soxr)."""

    def __init__(self, rate: int):
        import soxr

        self.rate = rate
        self._stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")

    def __call__(self, block: np.ndarray) -> np.ndarray:
        mono = np.asarray(block, dtype=np.float32)
        mono = mono.mean(axis=1) if mono.ndim == 2 else mono
        return mono if self._stream is None else self._stream.resample_chunk(mono)


class TurnListener:
    def __init__(self, read_block: Callable[[float], np.ndarray | None], rate: int,
                 options: TurnOptions = TurnOptions(), vad=None):
        self.read_block = read_block
        self.resample = StreamResampler(rate)
        self.detector = EndOfTurnDetector(options, vad)

    def next_turn(self, on_speech_start: Callable[[], None] = lambda: None,
                  keep_going: Callable[[], bool] = lambda: True) -> np.ndarray | None:
        """The next turn's 16 kHz audio; None when keep_going() turned false or the input ended."""
        while keep_going():
            block = self.read_block(READ_TIMEOUT_S)
            if block is None:
                continue
            if len(block) == 0:  # the input ended
                events = self.detector.flush()
            else:
                events = self.detector.feed(self.resample(block))
            for event in events:
                if event.kind == SPEECH_START:
                    on_speech_start()
                elif event.kind == TURN_END:
                    return event.audio
            if len(block) == 0:
                return None
        return None

    def forget(self) -> None:
        """Drop what was heard so far (e.g. the reply's own voice from the speakers)."""
        self.detector.reset()
