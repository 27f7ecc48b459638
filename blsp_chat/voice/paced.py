"""A player for a page: a browser plays the reply's audio, so "playing" a sentence here means handing its
clip to the page and waiting as long as it takes to play. SpokenReply then paces the clips as it paces a
loudspeaker, knows which sentences were heard to their end, and barge-in can cut the one playing.

    player = PacedPlayer()
    reply = SpokenReply(voice, player.play, player.stop)
    ...                                  # the page's stream loop:
    clip = player.take()                 # (sample_rate, audio) to show now, or None
"""
from __future__ import annotations

import queue
import threading

import numpy as np

# A browser starts a clip a little after the server hands it over (the update's trip, decoding): waiting
# this much longer than the clip lasts keeps the next one from cutting the end of the last.
START_DELAY_S = 0.25


class PacedPlayer:
    def __init__(self, start_delay_s: float = START_DELAY_S):
        self.start_delay_s = start_delay_s
        self._clips: queue.Queue[tuple[int, np.ndarray]] = queue.Queue()
        self._stopped = threading.Event()

    def play(self, audio: np.ndarray, sample_rate: int) -> None:
        """Hand the clip to the page; return once it has played, or at once after stop()."""
        if self._stopped.is_set():
            return
        self._clips.put((sample_rate, audio))
        self._stopped.wait(len(audio) / sample_rate + self.start_delay_s)

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def take(self) -> tuple[int, np.ndarray] | None:
        """The next clip for the page, if one is ready (never blocks)."""
        try:
            return self._clips.get_nowait()
        except queue.Empty:
            return None
