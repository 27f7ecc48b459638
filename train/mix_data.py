"""Repetition data (BLSP+RP) and mixing it with continuation data (paper section 4.1: 1:9).

    python -m train.mix_data --continuations C.jsonl --asr M.jsonl --out OUT.jsonl [--ratio 1:9] [--seed 0]
    python -m train.mix_data --asr M.jsonl --out R.jsonl --repetition-only

A repetition line is an ASR line with instruction constants.REPEAT_INSTRUCTION ("Please repeat the
following words.") and the transcript as its response: the paper skips the LLM for this behaviour.
`--ratio R:C` keeps every continuation line and adds round(n_continuations * R / C) repetition lines,
drawn without replacement by a seeded generator (preferring ASR lines whose audio the continuation set
does not use, so both behaviours see more clips); the mix is shuffled with the same seed.
Continuation lines whose audio is not in the --asr manifest are left out (and counted): a continuations
file made for every split then mixes into the training split without leaking dev or test clips.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from blsp_chat.constants import REPEAT_INSTRUCTION

from .io import read_jsonl_tolerant, rebase_audio, write_jsonl_atomic

PAPER_RATIO = "1:9"   # repetition : continuation


def parse_ratio(text: str) -> Fraction:
    """'1:9' -> 1/9 (repetition lines per continuation line); a plain number is that fraction of the mix."""
    if ":" in text:
        rep, cont = (Fraction(x) for x in text.split(":", 1))
        if rep < 0 or cont <= 0:
            raise ValueError(f"ratio {text!r} must be R:C with R >= 0 and C > 0")
        return rep / cont
    share = Fraction(text)
    if not 0 <= share < 1:
        raise ValueError(f"a repetition share must be in [0, 1), got {text!r}")
    return share / (1 - share)


def repetition_line(record: dict, response_field: str = "text") -> dict:
    out = {k: v for k, v in record.items() if k not in ("instruction", "response", "response_tokens", "stopped_by")}
    out.update(instruction=REPEAT_INSTRUCTION, response=record[response_field], task="repeat")
    return out


def mix(continuations: Sequence[dict], asr: Sequence[dict], *, ratio: Fraction, seed: int = 0,
        response_field: str = "text") -> list[dict]:
    """All continuation lines plus round(len(continuations) * ratio) repetition lines, shuffled."""
    rng = random.Random(seed)
    wanted = round(len(continuations) * ratio)
    if wanted > len(asr):
        raise ValueError(f"{wanted} repetition lines wanted but the ASR manifest has only {len(asr)}")
    used_audio = {c.get("audio") for c in continuations}
    fresh = [r for r in asr if r.get("audio") not in used_audio]
    reused = [r for r in asr if r.get("audio") in used_audio]
    rng.shuffle(fresh)
    rng.shuffle(reused)
    chosen = (fresh + reused)[:wanted]
    lines = [dict(c, task=c.get("task", "continue")) for c in continuations]
    lines += [repetition_line(r, response_field) for r in chosen]
    rng.shuffle(lines)
    return lines


def within(continuations: Sequence[dict], asr: Sequence[dict]) -> list[dict]:
    """The continuation lines whose clip the ASR manifest holds."""
    clips = {r.get("audio") for r in asr}
    return [c for c in continuations if c.get("audio") in clips]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asr", required=True, help="ASR manifest (prepare_data / synthesize): audio + text")
    parser.add_argument("--continuations", default=None, help="generate_continuations output")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ratio", default=PAPER_RATIO, help="repetition:continuation, e.g. 1:9, or a share like 0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--response-field", default="text", help="text (normalised, as the release) or text_raw")
    parser.add_argument("--repetition-only", action="store_true", help="write only repetition lines for every ASR line")
    args = parser.parse_args(argv)

    asr = read_jsonl_tolerant(Path(args.asr))
    if args.repetition_only:
        lines = [repetition_line(r, args.response_field) for r in asr]
    else:
        if not args.continuations:
            parser.error("--continuations is required unless --repetition-only")
        every_continuation = read_jsonl_tolerant(Path(args.continuations))
        continuations = within(every_continuation, asr)
        left_out = len(every_continuation) - len(continuations)
        try:
            lines = mix(continuations, asr, ratio=parse_ratio(args.ratio), seed=args.seed,
                        response_field=args.response_field)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    write_jsonl_atomic(Path(args.out), rebase_audio(lines, args.asr, args.out))
    counts = {"lines": len(lines), "repeat": sum(entry.get("task") == "repeat" for entry in lines)}
    counts["continue"] = counts["lines"] - counts["repeat"]
    if not args.repetition_only:
        counts["continuations_not_in_asr"] = left_out
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
