"""Sentences out of streaming text: fed a reply's deltas as they arrive, yield each sentence as soon as it
is complete, so that the first one can be spoken while the rest is still being generated.

    splitter = SentenceSplitter()
    for delta in deltas:
        for sentence in splitter.feed(delta):
            speak(sentence)
    for sentence in splitter.flush():     # whatever is left when the reply ends
        speak(sentence)

A sentence ends at . ! ? (or … and closing quotes after them) followed by whitespace, or at a line break.
The whitespace must be seen, so "3.5" and "e.g." inside a word never end one; common abbreviations
("Mr.", "Dr.", "e.g.") do not either. A clause that runs on past `max_chars` is cut at its last comma or
space so that a reply with no full stop still starts speaking.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = re.compile(r"([.!?…]+[\"'”’)\]]*)(\s+)|(\n+)")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "jr", "sr"})
CLAUSE_BREAK = re.compile(r"[,;:]\s")


@dataclass(frozen=True)
class SplitterOptions:
    max_chars: int = 200    # a run-on clause is cut here: about 12 s of speech, long enough for any sentence
    min_chars: int = 2      # shorter pieces ("1." of a list) join the next sentence

    def __post_init__(self):
        if self.max_chars < 1 or self.min_chars < 0:
            raise ValueError("max_chars must be positive and min_chars not negative")


class SentenceSplitter:
    def __init__(self, options: SplitterOptions = SplitterOptions()):
        self.options = options
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        """The sentences `delta` completed (often none)."""
        self._buffer += delta
        sentences = []
        while True:
            cut = self._next_cut()
            if cut is None:
                break
            piece, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if piece:
                sentences.append(piece)
        return sentences

    def flush(self) -> list[str]:
        """The rest, once the text has ended."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    def _next_cut(self) -> int | None:
        for match in SENTENCE_END.finditer(self._buffer):
            if len(self._buffer[:match.start()].strip()) < self.options.min_chars:
                continue
            if match.group(1) and ends_in_abbreviation(self._buffer[:match.start() + 1]):
                continue
            return match.end()
        if len(self._buffer) > self.options.max_chars:
            return run_on_cut(self._buffer, self.options.max_chars)
        return None


def ends_in_abbreviation(text: str) -> bool:
    """Whether text (ending with a full stop) ends in "Mr." or "e.g." rather than a sentence."""
    if not text.endswith("."):
        return False
    word = text[:-1].rsplit(None, 1)[-1].lower() if text[:-1].strip() else ""
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word != "i")  # initials: "J. Austen"


def run_on_cut(text: str, max_chars: int) -> int:
    """Where to cut a long text with no sentence end: after its last clause break before max_chars,
    else after its last space, else at max_chars."""
    head = text[:max_chars]
    breaks = list(CLAUSE_BREAK.finditer(head))
    if breaks:
        return breaks[-1].end()
    space = head.rfind(" ")
    return space + 1 if space > 0 else max_chars
