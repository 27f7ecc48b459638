"""Barge-in: while a reply is generated or spoken, keep listening; speech stops the reply, and the turn
it starts becomes the next one.

    watch = BargeInWatch(listener, interrupt=stop_reply)   # interrupt() runs on the watch's thread
    watch.start()
    ...                                                     # the reply streams and plays
    next_turn = watch.finish()   # the turn heard meanwhile (None when the user only listened)

The listener's detector keeps its state across finish(): speech still going on when the reply ended
is picked up by the next listener.next_turn() call. Use headphones: a loudspeaker's reply would be heard
as speech and interrupt itself (there is no echo cancellation here).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np


class BargeInWatch:
    def __init__(self, listener, interrupt: Callable[[], None]):
        self.listener = listener
        self.interrupt = interrupt
        self.interrupted = threading.Event()
        self._done = threading.Event()
        self._turn: np.ndarray | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, name="barge-in", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> np.ndarray | None:
        """Stop watching; the turn heard while the reply ran, if one ended."""
        self._done.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._turn

    def _on_speech(self) -> None:
        if not self.interrupted.is_set():
            self.interrupted.set()
            self.interrupt()

    def _watch(self) -> None:
        try:
            self._turn = self.listener.next_turn(on_speech_start=self._on_speech,
                                                 keep_going=lambda: not self._done.is_set())
        except BaseException as err:  # handed to the caller's thread by finish()
            self._error = err
