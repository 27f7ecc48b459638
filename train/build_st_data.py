r"""Speech translation data, offline: English speech of the training pools with Apertium's Spanish as the target.

    python -m train.build_st_data --out data/st_eng_spa
    python -m train.build_st_data --out data/st_eng_spa --pair eng-cat --target Catalan

The paper fine-tunes on MuST-C (section 5.2, Table 4), which no registry ships. Here the English speech
is the project's own training pools and the target side is made by a rule-based machine translation
system Debian ships, Apertium (`apt-get install apertium apertium-eng-spa`; `apertium-eng-cat` for
Catalan), run on each clip's written transcript (`text_raw`: cased and punctuated, as Apertium expects).

Sources (read only; the real-speech dev set, data/real_dev, is never read):
  --synthetic  data/offline_v2: synthetic voices (espeak-ng, flite, festival). Its `train` split trains;
               its `test` split, voices and sentences never in `train`, is held out.
  --people     data/pseudo_base (Beneath a Steel Sky, Drascula, Warzone 2100, ...: trains) and
               data/pseudo_queen (Flight of the Amazon Queen's cast). Whole actors of Amazon Queen
               (`HELD_OUT_ACTORS`) are held out; their characters come from the game's files
               (train/queen.py, Debian's flight-of-the-amazon-queen).
A training line whose sentence is also spoken in the held-out split is dropped, so the held-out split is
new in speaker and in sentence. `test.jsonl` is a fixed sample of the held-out split (`--test-per-group`
lines from each group) for evaluations that cannot afford all of it; `valid.jsonl` is the rest of the
held-out split (the held-out loss of train.finetune), so a training run never looks at the test lines.

Output folder: train.jsonl, heldout.jsonl, test.jsonl, valid.jsonl (lines: id, audio (relative to the folder), text,
text_raw, instruction, response, reference, source, speaker, group, duration), summary.json and README.md,
the data card. `instruction` is the paper's translate instruction (Table 11); `response` and `reference`
are the same Apertium translation (train.train_adapter/train.finetune read `response`, train.evaluate
`reference`). The build is a pure function of its inputs and the Apertium version it records.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from blsp_chat.constants import TRANSLATE_INSTRUCTION
from train.io import read_jsonl, resolve_audio, write_jsonl_atomic

DEFAULT_PAIR, DEFAULT_TARGET = "eng-spa", "Spanish"
DEFAULT_SYNTHETIC = "data/offline_v2"
DEFAULT_PEOPLE = ("data/pseudo_base", "data/pseudo_queen")
# Amazon Queen actors whose every line is held out: two single-character actors of the training cast (the
# dev set's actors are not in data/pseudo_queen at all), a woman (Faye) and a man (Trader Bob).
HELD_OUT_ACTORS = ("Lisa Valdez", "Jon Coleman")
TEST_PER_GROUP = 80
SYNTHETIC, PEOPLE = "synthetic", "people"
TRAIN_NAME, HELDOUT_NAME, TEST_NAME, VALID_NAME = "train.jsonl", "heldout.jsonl", "test.jsonl", "valid.jsonl"
SUMMARY_NAME, CARD_NAME = "summary.json", "README.md"
FORBIDDEN = ("real_dev",)  # the real-speech dev set decides the default model: never trained on here


class ApertiumMissing(RuntimeError):
    """Apertium, or its language pair, is not installed: the message says what to install."""


# --- Apertium -----------------------------------------------------------------------------------------
def apertium_package(pair: str) -> str:
    """Debian names a pair's package by its languages in alphabetical order: eng-spa and spa-eng are both
    in apertium-eng-spa."""
    return "apertium-" + "-".join(sorted(pair.split("-")[:2]))


def check_apertium(pair: str, command: str = "apertium") -> str:
    """The Apertium executable's path, after checking `pair` is installed; ApertiumMissing otherwise."""
    install = f"apt-get install apertium {apertium_package(pair)}"
    path = shutil.which(command)
    if path is None:
        raise ApertiumMissing(f"Apertium is not installed ({command!r} is not on PATH): run `{install}` "
                              "(Debian/Ubuntu), then build the data again")
    listed = subprocess.run([path, "-l"], capture_output=True, text=True, check=False).stdout.split()
    if pair not in listed:
        raise ApertiumMissing(f"Apertium has no {pair} language pair (installed: {', '.join(listed) or 'none'}): "
                              f"run `{install}`")
    return path


def apertium_version(pair: str) -> str:
    """The Debian package version of the pair (recorded in the data card), or 'unknown'."""
    if not shutil.which("dpkg-query"):
        return "unknown"
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", apertium_package(pair)],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def translate(sentences: Sequence[str], pair: str, command: str = "apertium") -> list[str]:
    """One translation per sentence, in order. Apertium keeps line breaks, so the sentences go through one
    process, one a line (`-u`: unknown words without Apertium's `*` mark)."""
    path = check_apertium(pair, command)
    lines = [" ".join(s.split()) for s in sentences]
    if not lines:
        return []
    result = subprocess.run([path, "-u", pair], input="\n".join(lines) + "\n", capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"apertium -u {pair} failed ({result.returncode}): {result.stderr.strip()[:500]}")
    out = result.stdout.split("\n")
    if out and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise RuntimeError(f"apertium returned {len(out)} lines for {len(lines)} sentences")
    return [tidy(t) for t in out]


def tidy(text: str) -> str:
    """Apertium leaves a space before some final punctuation ("rojo violento ."): closed up, as a person writes."""
    return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(text.split()))


# --- sources ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    id: str
    audio: Path          # absolute
    text: str            # normalised transcript (what the adapter was trained to hear)
    text_raw: str        # cased, punctuated: what Apertium translates
    source: str
    speaker: str
    group: str           # SYNTHETIC or PEOPLE
    duration: float
    held_out: bool


def sentence_key(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def check_not_forbidden(folder: Path) -> None:
    if any(part in FORBIDDEN for part in folder.resolve().parts):
        raise ValueError(f"{folder} is the real-speech dev set: it is never trained on; pick a training pool")


def synthetic_clips(folder: Path) -> list[Clip]:
    """offline_v2: `train` trains, `test` (other voices, other sentences) is held out; `dev` is not used."""
    check_not_forbidden(folder)
    clips = []
    for split, held_out in (("train", False), ("test", True)):
        manifest = folder / f"{split}.jsonl"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} is missing: build the synthetic pool first (train/synthesize.py)")
        for record in read_jsonl(manifest):
            clips.append(Clip(record["id"], resolve_audio(manifest, record["audio"]), record["text"],
                              record.get("text_raw") or record["text"], record.get("engine", "synthetic"),
                              record.get("voice") or record.get("speaker", "unknown"), SYNTHETIC,
                              float(record["duration"]), held_out))
    return clips


def queen_speakers() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Amazon Queen clip name -> (character, actors), from the game's files."""
    from train import queen

    if not (queen.QUEEN_DIR / queen.QUEEN_FILE).is_file():
        raise FileNotFoundError(f"{queen.QUEEN_DIR / queen.QUEEN_FILE} is missing: the speakers of Amazon Queen's "
                                f"lines come from the game's files (apt-get install {queen.APT_PACKAGE})")
    return {line.clip: (line.speaker, line.actors) for line in queen.spoken_lines()}


def people_clips(folder: Path, held_out_actors: Sequence[str], speakers=None) -> list[Clip]:
    """A pseudo-labelled pool of real people. Amazon Queen lines get their character; a line is held out when
    every credited actor of it is in `held_out_actors`. Other sources' clips train, their speaker being the
    source (Drascula: the speaker prefix of the file)."""
    check_not_forbidden(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: build the pool first (python -m train.pseudo_label)")
    clips = []
    for record in read_jsonl(manifest):
        source = record.get("source", folder.name)
        speaker, held_out = source, False
        if source == "queen":
            speakers = speakers if speakers is not None else queen_speakers()
            character, actors = speakers.get(record["id"].split("/", 1)[-1], ("unknown", ()))
            speaker = f"queen:{character}"
            held_out = bool(actors) and all(actor in held_out_actors for actor in actors)
        elif source == "drascula":
            speaker = "drascula:" + re.sub(r"\d+$", "", record["id"].split("/", 1)[-1])
        clips.append(Clip(record["id"], resolve_audio(manifest, record["audio"]), record["text"],
                          record.get("text_raw") or record["text"], source, speaker, PEOPLE,
                          float(record["duration"]), held_out))
    return clips


# --- the split -------------------------------------------------------------------------------------
def split_clips(clips: Sequence[Clip]) -> tuple[list[Clip], list[Clip], dict[str, int]]:
    """(train, held out, what was dropped): training clips whose speaker or sentence is in the held-out split
    are dropped, so the held-out split is new in both."""
    held = [c for c in clips if c.held_out]
    held_speakers = {c.speaker for c in held}
    held_sentences = {sentence_key(c.text) for c in held}
    train, dropped = [], Counter()
    for clip in clips:
        if clip.held_out:
            continue
        if clip.speaker in held_speakers:
            dropped["held-out speaker"] += 1
        elif sentence_key(clip.text) in held_sentences:
            dropped["held-out sentence"] += 1
        else:
            train.append(clip)
    return train, held, dict(dropped)


def stable_rank(clip: Clip) -> str:
    return hashlib.sha1(clip.id.encode()).hexdigest()


def test_sample(held: Sequence[Clip], per_group: int) -> list[Clip]:
    """The first `per_group` held-out clips of each group in the order of a hash of their id."""
    sample = []
    for group in (SYNTHETIC, PEOPLE):
        sample += sorted((c for c in held if c.group == group), key=stable_rank)[:per_group]
    return sorted(sample, key=stable_rank)  # groups interleaved: `train.evaluate --limit N` takes some of each


# --- writing ------------------------------------------------------------------------------------------
def manifest_line(clip: Clip, translation: str, instruction: str, out: Path) -> dict:
    return {"id": clip.id, "audio": os.path.relpath(clip.audio, out.resolve()), "text": clip.text,
            "text_raw": clip.text_raw, "instruction": instruction, "response": translation,
            "reference": translation, "source": clip.source, "speaker": clip.speaker, "group": clip.group,
            "duration": clip.duration}


def describe(clips: Sequence[Clip]) -> dict:
    by_group = {}
    for group in (SYNTHETIC, PEOPLE):
        members = [c for c in clips if c.group == group]
        by_group[group] = {"clips": len(members), "hours": round(sum(c.duration for c in members) / 3600, 3),
                           "speakers": len({c.speaker for c in members}),
                           "sentences": len({sentence_key(c.text) for c in members}),
                           "sources": dict(sorted(Counter(c.source for c in members).items()))}
    return {"clips": len(clips), "hours": round(sum(c.duration for c in clips) / 3600, 3), "by_group": by_group}


def build(out: Path, synthetic: Path | None, people: Sequence[Path], *, pair: str = DEFAULT_PAIR,
          target: str = DEFAULT_TARGET, held_out_actors: Sequence[str] = HELD_OUT_ACTORS,
          test_per_group: int = TEST_PER_GROUP, command: str = "apertium", speakers=None) -> dict:
    """Build the folder; returns the summary. `speakers`: Amazon Queen's clip -> (character, actors), read
    from the game when None."""
    check_apertium(pair, command)  # before reading any pool: a missing package is the likeliest failure
    clips = synthetic_clips(synthetic) if synthetic else []
    for folder in people:
        clips += people_clips(folder, held_out_actors, speakers)
    if not clips:
        raise ValueError("no source given: pass --synthetic and/or --people")
    train, held, dropped = split_clips(clips)
    translations = translate([c.text_raw for c in train + held], pair, command)
    by_id = dict(zip([c.id for c in train + held], translations))
    empty = [c.id for c in train + held if not by_id[c.id]]
    train = [c for c in train if by_id[c.id]]
    held = [c for c in held if by_id[c.id]]
    instruction = TRANSLATE_INSTRUCTION.format(target=target)
    out.mkdir(parents=True, exist_ok=True)
    test = test_sample(held, test_per_group)
    tested = {c.id for c in test}
    valid = [c for c in held if c.id not in tested]
    for name, members in ((TRAIN_NAME, train), (HELDOUT_NAME, held), (TEST_NAME, test), (VALID_NAME, valid)):
        write_jsonl_atomic(out / name, (manifest_line(c, by_id[c.id], instruction, out) for c in members))
    summary = {"pair": pair, "target": target, "apertium_package": apertium_package(pair),
               "apertium_version": apertium_version(pair), "instruction": instruction,
               "sources": {"synthetic": str(synthetic) if synthetic else None, "people": [str(p) for p in people]},
               "held_out_actors": list(held_out_actors), "train": describe(train), "heldout": describe(held),
               "test": describe(test), "valid": describe(valid), "dropped_from_train": dropped,
               "empty_translations": len(empty),
               "examples": [{"text_raw": c.text_raw, "reference": by_id[c.id]} for c in test[:6]]}
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / CARD_NAME).write_text(data_card(summary))
    return summary


def data_card(summary: dict) -> str:
    def row(name: str, part: dict) -> str:
        s, p = part["by_group"][SYNTHETIC], part["by_group"][PEOPLE]
        return (f"| {name} | {part['clips']:,} | {part['hours']} | {s['clips']:,} clips, {s['speakers']} voices | "
                f"{p['clips']:,} clips, {p['speakers']} speakers |")

    examples = "\n".join(f"| {e['text_raw']} | {e['reference']} |" for e in summary["examples"])
    dropped = ", ".join(f"{n} {k}" for k, n in summary["dropped_from_train"].items()) or "none"
    return f"""# Speech translation data: English speech -> {summary['target']} ({summary['pair']})

Built by `python -m train.build_st_data` (train/build_st_data.py) from the project's training pools; the
real-speech dev set (data/real_dev) is never read.

| split | clips | hours | synthetic voices | real people |
|---|---|---|---|---|
{row('train', summary['train'])}
{row('heldout', summary['heldout'])}
{row('test (sample of heldout)', summary['test'])}
{row('valid (heldout but test)', summary['valid'])}

**Held out, by speaker and by sentence.** Synthetic: the `test` split of {summary['sources']['synthetic']}, whose
voices and sentences are not in its `train` split. Real people: every Amazon Queen line of
{', '.join(summary['held_out_actors'])} (whole actors; their characters read from the game's files). Training lines
spoken by a held-out speaker or saying a held-out sentence were dropped ({dropped}). `test.jsonl` takes
{summary['test']['by_group'][SYNTHETIC]['clips']} synthetic and {summary['test']['by_group'][PEOPLE]['clips']} real
held-out lines by a hash of their id.

**How the references were made.** Not by people: each clip's English transcript (`text_raw`, cased and
punctuated) was translated by Apertium, a rule-based machine translation system
(`apertium -u {summary['pair']}`, Debian package {summary['apertium_package']} {summary['apertium_version']}),
with spaces before final punctuation closed up. {summary['empty_translations']} clips whose translation came out
empty were dropped. Apertium translates word by word with shallow transfer rules: its Spanish is often
literal or ungrammatical ("No podrías pilotar vuestra manera fuera de un bolso de papel"). A BLEU or chrF
against it says how close a system comes to Apertium's output, not how good its translation is.
The transcripts themselves: synthetic clips speak their text exactly; Amazon Queen and Drascula lines are
the games' subtitles; Beneath a Steel Sky, Warzone 2100 and the other real clips of data/pseudo_base were
transcribed by Whisper (pseudo-labels, some wrong), so some references translate a mishearing.

**Licences.** Apertium and apertium-eng-spa: GPL-2 (the translations are its output). Synthetic speech: the
project's own (espeak-ng, flite, festival voices). Real speech: the voice acting of Debian's
`beneath-a-steel-sky`, `flight-of-the-amazon-queen`, `drascula`, `warzone2100-data` and the other sources
listed in data/pseudo_base's summary, each under its package's licence; the audio is referenced, not copied.

Examples (test):

| English | {summary['target']} (Apertium) |
|---|---|
{examples}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.build_st_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/st_eng_spa")
    parser.add_argument("--synthetic", default=DEFAULT_SYNTHETIC,
                        help="a synthetic pool (offline_v2 layout); '' for none")
    parser.add_argument("--people", nargs="*", default=list(DEFAULT_PEOPLE),
                        help="pseudo-labelled pools of real people")
    parser.add_argument("--pair", default=DEFAULT_PAIR, help="Apertium language pair, e.g. eng-spa, eng-cat")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the target language's name in the instruction")
    parser.add_argument("--held-out-actor", action="append", dest="held_out_actors",
                        help=f"an Amazon Queen actor to hold out (repeatable; default: {', '.join(HELD_OUT_ACTORS)})")
    parser.add_argument("--test-per-group", type=int, default=TEST_PER_GROUP)
    args = parser.parse_args(argv)
    try:
        summary = build(Path(args.out), Path(args.synthetic) if args.synthetic else None,
                        [Path(p) for p in args.people], pair=args.pair, target=args.target,
                        held_out_actors=tuple(args.held_out_actors or HELD_OUT_ACTORS),
                        test_per_group=args.test_per_group)
    except (ApertiumMissing, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("train", "heldout", "test", "dropped_from_train")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
