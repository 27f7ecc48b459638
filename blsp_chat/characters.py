"""CTC over characters: an adapter's head spells what it hears, one character class per output (blank 0).

A 49k-class CTC over the LLM's word pieces sees each rare piece a handful of times in hours of speech and
spends most of a CPU step on the (outputs x 49k) distance product; a few dozen letters are each seen
thousands of times, and a rare word is spelled from them. The text heard is then tokenized for the LLM
(`readout.character_readout`), so speech still reaches the LLM only through encoder -> adapter.

An alphabet is a sequence of symbols: a string (each character a symbol) or a list of strings, where a
symbol may be several characters ("the", "ing"; `learn_symbols` picks them by byte-pair merges over the
training transcripts). A word is then spelled by its longest symbols first: fewer, more frequent targets
than letters, with the letters kept to spell any word no longer symbol covers.
"""
from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Iterable, Sequence

import torch

from .ctc_decode import BLANK_CLASS, collapse_ctc

BLANK = BLANK_CLASS  # the CTC blank is class 0; the alphabet's symbols are classes 1..N in order
# Lower-case letters, the apostrophe of contractions and digits: what an English transcript keeps once
# case and punctuation are gone. The space separates words (it is a class, not the blank).
ENGLISH_ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"
# Marks that stand between words: read as a space, so "well-known" spells "well known" and not "wellknown".
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015/_.,;:!?\"()\[\]{}]+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})


Alphabet = str | Sequence[str]  # its symbols, in class order (class i + 1 is symbol i; 0 is the blank)


def check_alphabet(alphabet: Alphabet) -> None:
    """Refuse an alphabet no CTC head can be trained or read with."""
    if not isinstance(alphabet, str) and not all(isinstance(s, str) and s for s in alphabet):
        raise ValueError("a CTC alphabet is a string of characters or a list of non-empty strings")
    if " " not in alphabet:
        raise ValueError("a CTC alphabet needs the space: it is how the head separates words")
    if len(set(alphabet)) != len(alphabet):
        repeated = sorted({c for c in alphabet if list(alphabet).count(c) > 1})
        raise ValueError(f"a CTC alphabet names each character once; repeated: {repeated}")
    joined = [s for s in alphabet if len(s) > 1]
    if any(" " in s for s in joined):
        raise ValueError("the space is a symbol of its own: a longer symbol cannot hold it")
    letters = {s for s in alphabet if len(s) == 1}
    unspellable = sorted({c for s in joined for c in s} - letters)
    if unspellable:
        raise ValueError(f"every character of a longer symbol must be a symbol too, so that any word of them can "
                         f"be spelled; missing: {unspellable}")


def spell(text: str, alphabet: Alphabet) -> list[int]:
    """A transcript -> its CTC targets: class ids (1..N) of its symbols once lower-cased, accents and
    curly quotes plain, separators single spaces; characters outside the alphabet are dropped. Each word is
    spelled by its longest symbols first."""
    plain = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES).lower())
    plain = _SEPARATORS.sub(" ", "".join(c for c in plain if not unicodedata.combining(c)))
    classes = {symbol: i + 1 for i, symbol in enumerate(alphabet)}
    words = ["".join(c for c in word if c in classes) for word in plain.split()]
    longest = max(len(symbol) for symbol in alphabet)
    targets: list[int] = []
    for word in filter(None, words):
        if targets:
            targets.append(classes[" "])
        targets += [classes[symbol] for symbol in _longest_first(word, classes, longest)]
    return targets


def _longest_first(word: str, symbols: dict[str, int], longest: int) -> list[str]:
    """`word` cut into symbols, each the longest that starts where the last ended (every letter is one)."""
    cut, start = [], 0
    while start < len(word):
        end = min(len(word), start + longest)
        while word[start:end] not in symbols:
            end -= 1
        cut.append(word[start:end])
        start = end
    return cut


def learn_symbols(transcripts: Iterable[str], count: int, letters: str = ENGLISH_ALPHABET) -> list[str]:
    """An alphabet of `count` symbols for CTC: `letters` (which must hold the space), then the byte-pair
    merges of the transcripts' words (each word's count weighs it; ties go to the pair met first), until
    `count` symbols or no pair is left. Deterministic for the same transcripts."""
    check_alphabet(letters)
    if count < len(letters):
        raise ValueError(f"an alphabet of {count} symbols cannot hold the {len(letters)} letters")
    word_counts = collections.Counter()
    for text in transcripts:
        spelled = "".join(letters[c - 1] for c in spell(text, letters))
        word_counts.update(spelled.split())
    words = {tuple(word): n for word, n in word_counts.items()}
    symbols = list(letters)
    while len(symbols) < count:
        pairs: collections.Counter = collections.Counter()
        for parts, n in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=pairs.__getitem__)  # the first of the most frequent: Counter keeps insertion order
        if best[0] + best[1] not in symbols:  # two merges can join the same letters ("th"+"e", "t"+"he")
            symbols.append(best[0] + best[1])
        merged: collections.Counter = collections.Counter()
        for parts, n in words.items():
            merged[_merged(parts, best)] += n
        words = dict(merged)
    return symbols


def _merged(parts: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def greedy_characters(logits: torch.Tensor, alphabet: Alphabet) -> str:
    """(L, N+1) per-output scores -> the text heard: the best class per output, runs merged, blanks dropped,
    spaces collapsed and trimmed. "" when only blanks (or spaces) were heard."""
    kept = collapse_ctc(logits.argmax(-1).tolist(), BLANK)
    return " ".join("".join(alphabet[c - 1] for c in kept).split())
