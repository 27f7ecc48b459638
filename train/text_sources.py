"""Offline English sentences to synthesise: WordNet usage examples and fortunes, from Debian packages.

    apt-get install wordnet-base fortunes-min
    python -m train.text_sources --out sentences.txt [--sources wordnet,fortunes,entities] [--max N] [--seed S]
        [--exclude-file earlier.txt] [--holdout-sentence "What is the capital of France?"]

WordNet (`wordnet-base`): every synset line of /usr/share/wordnet/data.{noun,verb,adj,adv} ends in a gloss
after `|`; the quoted parts of the gloss are usage examples ("he lived in a world of entities").
WordNet entities (`wordnet-base`, source `entities`): each proper-noun synset of a few kinds (places, people,
events, languages, artifacts, foods) read as "<name> is <definition>." ("Chartres Cathedral is a Gothic cathedral
in northern France."): the named entities that usage examples and fortunes almost never say.
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
KNOWN_SOURCES = SOURCES + ("entities",)
# WordNet lexicographer files whose proper nouns people say aloud (the others are mostly Latin taxonomy):
# 06 artifact, 10 communication (languages), 11 event, 13 food, 15 location, 18 person.
ENTITY_LEX_FILES = frozenset({"06", "10", "11", "13", "15", "18"})
# A held-out sentence's words of this length or longer mark its topic; shorter ones are function words.
HOLDOUT_MIN_LETTERS = 5

# Letters, digits, spaces and plain punctuation; anything else (quotes, brackets, slashes, @, #, &,
# underscores, tabs) marks code, markup, ASCII art or a formula, which no speaker reads out naturally.
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:!?'\-]+$")
_QUOTED = re.compile(r'"([^"]+)"')
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ATTRIBUTION = re.compile(r"^\s*(--|-- |\u2014)")
_WORD = re.compile(r"[a-z0-9']+")
_PARENTHESISED = re.compile(r"\s*\([^)]*\)")


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
def synset_lines(path: Path) -> Iterator[tuple[list[str], str]]:
    """(fields before the gloss, gloss) of every synset line of one WordNet data file; none if it is missing."""
    if not path.is_file():
        return
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header is indented
            head, gloss = line.split("|", 1)
            yield head.split(), gloss


def wordnet_examples(directory: Path = WORDNET_DIR) -> Iterator[str]:
    """Raw usage examples from WordNet's data files (the quoted parts of each gloss)."""
    for name in WORDNET_FILES:
        for _, gloss in synset_lines(directory / name):
            yield from _QUOTED.findall(gloss)


def wordnet_entities(directory: Path = WORDNET_DIR) -> Iterator[str]:
    """Raw "<name> is <definition>." sentences of WordNet's proper-noun synsets of `ENTITY_LEX_FILES`."""
    for fields, gloss in synset_lines(directory / "data.noun"):
        name, lex_file = fields[4], fields[1]
        if lex_file not in ENTITY_LEX_FILES or not name[0].isupper():
            continue
        definition = gloss.split(";")[0]
        if '"' in definition:
            continue  # a usage example, not a definition
        yield f"{name.replace('_', ' ')} is {_PARENTHESISED.sub('', definition).strip()}"


def fortune_blocks(path: Path) -> Iterator[list[str]]:
    """The lines of each `%`-separated fortune of one file, attribution lines (`-- Mark Twain`) dropped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for block in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        yield [ln for ln in block.splitlines() if not _ATTRIBUTION.match(ln)]


def fortunes(directory: Path = FORTUNES_DIR) -> Iterator[str]:
    """Raw sentences of every fortune file (skipping the .dat indexes and .u8 links)."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        for lines in fortune_blocks(path):
            joined = " ".join(" ".join(lines).split())
            yield from _SENTENCE_END.split(joined)


def _source(name: str, wordnet_dir: Path, fortunes_dir: Path) -> Iterator[str]:
    if name == "wordnet":
        return wordnet_examples(wordnet_dir)
    if name == "fortunes":
        return fortunes(fortunes_dir)
    if name == "entities":
        return wordnet_entities(wordnet_dir)
    raise ValueError(f"unknown text source {name!r}; choose from {KNOWN_SOURCES}")


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


def topic_words(sentence: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(sentence.lower()) if len(w) >= HOLDOUT_MIN_LETTERS)


def about_a_holdout(sentence: str, holdout_topics: Iterable[frozenset[str]]) -> bool:
    """True when the sentence holds every topic word of some held-out sentence (evaluation prompts
    stay out of training text, however the corpus words them)."""
    words = topic_words(sentence)
    return any(topic and topic <= words for topic in holdout_topics)


def collect(sources: Iterable[str] = SOURCES, *, seed: int = 0, max_sentences: int | None = None,
            wordnet_dir: Path = WORDNET_DIR, fortunes_dir: Path = FORTUNES_DIR,
            exclude: Iterable[str] = (), holdout: Iterable[str] = ()) -> list[str]:
    """Cleaned, deduplicated sentences of the named sources, shuffled with `seed`; without the sentences
    of `exclude` (an earlier corpus) and those about a sentence of `holdout` (see `about_a_holdout`)."""
    candidates: list[str] = []
    for name in sources:
        candidates.extend(_source(name, Path(wordnet_dir), Path(fortunes_dir)))
    excluded = {dedup_key(s) for s in exclude}
    holdout_topics = [topic_words(s) for s in holdout]
    sentences = [s for s in clean_unique(candidates)
                 if dedup_key(s) not in excluded and not about_a_holdout(s, holdout_topics)]
    random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences] if max_sentences else sentences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="text file to write, one sentence a line")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, from {KNOWN_SOURCES}")
    parser.add_argument("--max", type=int, default=None, help="keep at most this many sentences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-file", type=Path, action="append", default=[],
                        help="leave out the sentences of this file (an earlier corpus); repeatable")
    parser.add_argument("--holdout-sentence", action="append", default=[],
                        help="leave out every sentence holding all this sentence's words of "
                             f"{HOLDOUT_MIN_LETTERS}+ letters (an evaluation prompt); repeatable")
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    exclude = [line for path in args.exclude_file for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = collect(sources, seed=args.seed, max_sentences=args.max, exclude=exclude,
                        holdout=args.holdout_sentence)
    if not sentences:
        print("no sentences found: apt-get install wordnet-base fortunes-min", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # a new machine has no data/ yet
    Path(args.out).write_text("\n".join(sentences) + "\n", encoding="utf-8")
    print(f"wrote {len(sentences)} sentences from {', '.join(sources)} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
