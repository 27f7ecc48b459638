"""Offline English sentences to synthesise: WordNet usage examples and fortunes, from Debian packages.

    apt-get install wordnet-base fortunes-min
    python -m train.text_sources --out sentences.txt [--sources wordnet,fortunes] [--max N] [--seed S]

WordNet (`wordnet-base`): every synset line of /usr/share/wordnet/data.{noun,verb,adj,adv} ends in a gloss
after `|`; the quoted parts of the gloss are usage examples ("he lived in a world of entities").
Fortunes (`fortunes-min`): /usr/share/games/fortunes/* text files, one fortune per `%`-separated block;
attribution lines (`-- Mark Twain`) are dropped and each block is split into sentences.

Every candidate is cleaned (`clean_sentence`): ASCII only, no odd symbols, whitespace collapsed, a
capital first letter and end punctuation added, 4-30 words. Duplicates (same words, any case or
punctuation) are dropped, keeping the first. The result is the same list on every run: files are read in
sorted order and shuffled with a seeded generator.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_WORDS = 4
MAX_WORDS = 30
SOURCES = ("wordnet", "fortunes")

# Letters, digits, spaces and plain punctuation; anything else (quotes, brackets, slashes, @, #, &,
# underscores, tabs) marks code, markup, ASCII art or a formula, which no speaker reads out naturally.
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:!?'\-]+$")
_QUOTED = re.compile(r'"([^"]+)"')
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ATTRIBUTION = re.compile(r"^\s*(--|-- |\u2014)")
_WORD = re.compile(r"[a-z0-9']+")


def clean_sentence(text: str) -> str | None:
    """A speakable sentence, or None if it is not one we want."""
    text = " ".join(text.split())
    text = re.sub(r"^[QA]:\s*", "", text)        # riddles: "Q: Why ...?" / "A: Because ..."
    text = text.replace(" -- ", ", ")             # a typed dash is a pause
    text = text.strip(" -;:,")
    if not text or not text.isascii() or not _ALLOWED.match(text):
        return None
    if not text[0].isalpha():
        return None
    if re.search(r"(.)\1{3,}", text) or re.search(r"[!?.]{2,}", text.replace("...", ".")):
        return None  # "Aaaargh", "!!!!", "?!": shouting and noise
    if re.search(r"\b[A-Z]{2,}\b.*\b[A-Z]{2,}\b", text):
        return None  # several all-caps words: acronym soup or shouting, read out letter by letter
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def dedup_key(sentence: str) -> str:
    return " ".join(_WORD.findall(sentence.lower()))


# --- sources ---------------------------------------------------------------------------------------
def wordnet_examples(directory: Path = WORDNET_DIR) -> Iterator[str]:
    """Raw usage examples from WordNet's data files (the quoted parts of each gloss)."""
    for name in WORDNET_FILES:
        path = directory / name
        if not path.is_file():
            continue
        with open(path, encoding="latin-1") as handle:
            for line in handle:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header is indented
                gloss = line.split("|", 1)[1]
                yield from _QUOTED.findall(gloss)


def fortunes(directory: Path = FORTUNES_DIR) -> Iterator[str]:
    """Raw sentences of every fortune file (skipping the .dat indexes and .u8 links)."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            lines = [ln for ln in block.splitlines() if not _ATTRIBUTION.match(ln)]
            joined = " ".join(" ".join(lines).split())
            yield from _SENTENCE_END.split(joined)


def _source(name: str, wordnet_dir: Path, fortunes_dir: Path) -> Iterator[str]:
    if name == "wordnet":
        return wordnet_examples(wordnet_dir)
    if name == "fortunes":
        return fortunes(fortunes_dir)
    raise ValueError(f"unknown text source {name!r}; choose from {SOURCES}")


def clean_unique(candidates: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for raw in candidates:
        sentence = clean_sentence(raw)
        if sentence is None:
            continue
        key = dedup_key(sentence)
        if key and key not in seen:
            seen.add(key)
            out.append(sentence)
    return out


def collect(sources: Iterable[str] = SOURCES, *, seed: int = 0, max_sentences: int | None = None,
            wordnet_dir: Path = WORDNET_DIR, fortunes_dir: Path = FORTUNES_DIR) -> list[str]:
    """Cleaned, deduplicated sentences of the named sources, shuffled with `seed`."""
    candidates: list[str] = []
    for name in sources:
        candidates.extend(_source(name, Path(wordnet_dir), Path(fortunes_dir)))
    sentences = clean_unique(candidates)
    random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences] if max_sentences else sentences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="text file to write, one sentence a line")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, from {SOURCES}")
    parser.add_argument("--max", type=int, default=None, help="keep at most this many sentences")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    sentences = collect(sources, seed=args.seed, max_sentences=args.max)
    if not sentences:
        print("no sentences found: apt-get install wordnet-base fortunes-min", file=sys.stderr)
        return 1
    Path(args.out).write_text("\n".join(sentences) + "\n", encoding="utf-8")
    print(f"wrote {len(sentences)} sentences from {', '.join(sources)} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
