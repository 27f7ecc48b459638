"""Hands-free turns from a browser microphone: the page receives the recording in chunks (whatever rate
and sample format the browser chose); this turns them into 16 kHz mono float32 and runs them through one
EndOfTurnDetector, per browser session.

    live = LiveTurns()
    for rate, samples in chunks:            # e.g. each chunk of gr.Audio(streaming=True)
        for event in live.feed(rate, samples):
            if event.kind == SPEECH_START: ...              # barge-in: stop the reply
            if event.kind == TURN_END: send(event.audio)    # the turn, 16 kHz

No Gradio here: the page (ui.py) reads its chunks and hands them over; tests feed recordings.
"""
from __future__ import annotations

import numpy as np

from .listen import StreamResampler
from .vad import EndOfTurnDetector, TurnEvent, TurnOptions

INT16_FULL_SCALE = 32768.0  # browsers' 16-bit PCM: samples in [-32768, 32767]


def as_float_mono(samples) -> np.ndarray:
    """(n,) or (n, channels) samples, int16 or float in [-1, 1] -> (n,) float32 in [-1, 1]."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / INT16_FULL_SCALE
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"microphone samples must be int16 or float, got {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise ValueError(f"microphone audio must be (samples,) or (samples, channels), got shape {samples.shape}")
    return samples


class LiveTurns:
    """One browser microphone's stream -> SPEECH_START and TURN_END events (TurnEvent, audio at 16 kHz)."""

    def __init__(self, options: TurnOptions = TurnOptions(), vad=None):
        self.detector = EndOfTurnDetector(options, vad)
        self._resample: StreamResampler | None = None

    def feed(self, rate: int, samples) -> list[TurnEvent]:
        if rate <= 0:
            raise ValueError(f"the microphone's sample rate must be positive, got {rate}")
        if self._resample is None or self._resample.rate != rate:  # a new device (or the first chunk)
            self._resample = StreamResampler(rate)
        return self.detector.feed(self._resample(as_float_mono(samples)))

    @property
    def speaking(self) -> bool:
        return self.detector.speaking

    def reset(self) -> None:
        """Forget what was heard (the microphone stopped: its next recording starts afresh)."""
        self.detector.reset()
        self._resample = None
