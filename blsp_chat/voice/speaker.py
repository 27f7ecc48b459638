"""Speaking a reply while it streams: sentences go to a background thread that synthesizes and plays them
one after another, so the first sentence is heard while the model is still writing the rest.

    reply = SpokenReply(voice, player.play, player.stop)
    for delta in deltas:
        reply.feed(delta)
    reply.finish()            # no more text: speak what is left
    reply.wait()              # until the last sentence has played
    reply.stop()              # or at once (Ctrl-C, barge-in): the sentence playing is cut
    sentences, audio = reply.heard()   # the sentences played to their end, and their audio joined

`play(audio, sample_rate)` blocks until the audio has played or `stop_playback()` was called.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np

from .sentences import SentenceSplitter, SplitterOptions

_END = None  # the queue's last item


class SpokenReply:
    def __init__(self, voice, play: Callable[[np.ndarray, int], None], stop_playback: Callable[[], None] = lambda: None,
                 splitter: SplitterOptions = SplitterOptions()):
        self.voice = voice
        self.play = play
        self.stop_playback = stop_playback
        self.splitter = SentenceSplitter(splitter)
        self.spoken: list[str] = []        # sentences played to their end
        self.spoken_audio: list[np.ndarray] = []  # their audio (appended first: never shorter than `spoken`)
        self.error: Exception | None = None
        self._sentences: queue.Queue[str | None] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._speak_all, name="spoken-reply", daemon=True)
        self._thread.start()

    def feed(self, delta: str) -> None:
        for sentence in self.splitter.feed(delta):
            self._sentences.put(sentence)

    def finish(self) -> None:
        for sentence in self.splitter.flush():
            self._sentences.put(sentence)
        self._sentences.put(_END)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether everything was spoken (or stopped) within timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stopped.set()
        self._sentences.put(_END)
        self.stop_playback()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _speak_all(self) -> None:
        while not self._stopped.is_set():
            sentence = self._sentences.get()
            if sentence is _END:
                return
            try:
                audio = self.voice.synthesize(sentence)
            except Exception as err:  # the voice broke mid-reply: keep the text flowing, say why once
                self.error = err
                return
            if self._stopped.is_set():
                return
            if len(audio):
                self.play(audio, self.voice.sample_rate)
            if not self._stopped.is_set():
                self.spoken_audio.append(audio)
                self.spoken.append(sentence)

    def heard(self) -> tuple[list[str], np.ndarray]:
        """The reply as far as it was heard, in one snapshot (the speaking thread may still append): the
        sentences played to their end, and their audio joined at voice.sample_rate (empty when none was)."""
        sentences = list(self.spoken)
        pieces = self.spoken_audio[:len(sentences)]
        return sentences, np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def spoken_prefix(reply: str, sentences: list[str]) -> str:
    """The reply as far as its spoken `sentences` (SpokenReply.spoken: in order, as the splitter cut them)
    reach: what a listener heard of a reply that was interrupted."""
    end = 0
    for sentence in sentences:
        found = reply.find(sentence, end)
        if found < 0:
            break
        end = found + len(sentence)
    return reply[:end]


def speak_text(voice, text: str, splitter: SplitterOptions = SplitterOptions()) -> np.ndarray:
    """A whole reply as one recording at voice.sample_rate, sentence by sentence as SpokenReply says it."""
    reply = SpokenReply(voice, lambda audio, rate: None, splitter=splitter)
    reply.feed(text)
    reply.finish()
    reply.wait()
    if reply.error is not None:
        raise reply.error
    return reply.heard()[1]
