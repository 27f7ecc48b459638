"""CTC over characters: an adapter's head spells what it hears, one character class per output (blank 0).

A 49k-class CTC over the LLM's word pieces sees each rare piece a handful of times in hours of speech and
spends most of a CPU step on the (outputs x 49k) distance product; a few dozen letters are each seen
thousands of times, and a rare word is spelled from them. The text heard is then tokenized for the LLM
(`readout.character_readout`), so speech still reaches the LLM only through encoder -> adapter.
"""
from __future__ import annotations

import re
import unicodedata

import torch

from .ctc_decode import collapse_ctc

BLANK = 0  # the CTC blank is class 0; the alphabet's characters are classes 1..N in order
# Lower-case letters, the apostrophe of contractions and digits: what an English transcript keeps once
# case and punctuation are gone. The space separates words (it is a class, not the blank).
ENGLISH_ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"
# Marks that stand between words: read as a space, so "well-known" spells "well known" and not "wellknown".
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015/_.,;:!?\"()\[\]{}]+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})


def check_alphabet(alphabet: str) -> None:
    """Refuse an alphabet no CTC head can be trained or read with."""
    if " " not in alphabet:
        raise ValueError("a CTC alphabet needs the space: it is how the head separates words")
    if len(set(alphabet)) != len(alphabet):
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        raise ValueError(f"a CTC alphabet names each character once; repeated: {repeated}")


def spell(text: str, alphabet: str) -> list[int]:
    """A transcript -> its CTC targets: class ids (1..N) of its characters once lower-cased, accents and
    curly quotes plain, separators single spaces; characters outside the alphabet are dropped."""
    plain = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES).lower())
    plain = _SEPARATORS.sub(" ", "".join(c for c in plain if not unicodedata.combining(c)))
    classes = {c: i + 1 for i, c in enumerate(alphabet)}
    spelled = " ".join("".join(c for c in word if c in classes) for word in plain.split())
    return [classes[c] for c in " ".join(spelled.split())]


def greedy_characters(logits: torch.Tensor, alphabet: str) -> str:
    """(L, N+1) per-output scores -> the text heard: the best class per output, runs merged, blanks dropped,
    spaces collapsed and trimmed. "" when only blanks (or spaces) were heard."""
    kept = collapse_ctc(logits.argmax(-1).tolist(), BLANK)
    return " ".join("".join(alphabet[c - 1] for c in kept).split())
