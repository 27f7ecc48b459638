"""Spoken questions against typed ones: is a question answered as often when it is said as when it is typed?

Issue 16 asks for spoken questions answered as often as typed ones, within one. Each general-knowledge question
is put to the model twice, each time as a conversation of its own (`generate.generate_reply`): typed, and spoken
by a TTS voice (piper joe by default, a natural neural voice; `--voice espeak-ng` for a robotic one). An answer
counts as right when it contains the expected word (a regular expression, case-insensitive).

    python -m train.spoken_questions [--model DIR] [--voice piper] [--out answers.jsonl]

A spoken question the readout hears as nothing is counted as not answered, with the refusal as its reply.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from blsp_chat.config import GenerationOptions
from blsp_chat.generate import NothingHeardError, generate_reply, speech_turn
from blsp_chat.prompt import Turn
from blsp_chat.weights import LoadedBlsp

# (question, a pattern every right answer contains)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", r"\bparis\b"),
    ("How many days are in a week?", r"\bseven\b|\b7\b"),
    ("What color is the sky on a clear day?", r"\bblue\b"),
    ("What is two plus two?", r"\bfour\b|\b4\b"),
    ("Who wrote Romeo and Juliet?", r"shakespeare"),
    ("What is the largest planet in our solar system?", r"\bjupiter\b"),
    ("What language do people speak in Spain?", r"\bspanish\b"),
    ("What do bees make?", r"\bhoney\b"),
)


REFUSED = "[refused: "  # how a clip heard as nothing is recorded as its reply


@dataclass
class Answer:
    question: str
    typed_reply: str
    typed_right: bool
    spoken_reply: str
    spoken_right: bool


def ask(loaded: LoadedBlsp, turn: str | np.ndarray, options: GenerationOptions) -> str:
    """The reply to a conversation of one turn: text, or 16 kHz audio (a clip heard as nothing: the
    refusal, in brackets)."""
    if isinstance(turn, str):
        return generate_reply(loaded, [Turn("human", text=turn)], (), options).strip()
    try:
        return generate_reply(loaded, [speech_turn(turn, loaded.model)], [turn], options).strip()
    except NothingHeardError as err:
        return f"{REFUSED}{err}]"


def answer_all(loaded: LoadedBlsp, speak: Callable[[str], np.ndarray], questions: Sequence[tuple[str, str]] = QUESTIONS,
               options: GenerationOptions = GenerationOptions(max_new_tokens=40, do_sample=False)) -> list[Answer]:
    """Each question typed and spoken (`speak`: text -> 16 kHz audio), and whether each reply is right."""
    answers = []
    for question, pattern in questions:
        typed = ask(loaded, question, options)
        spoken = ask(loaded, speak(question), options)
        answers.append(Answer(question, typed, _right(pattern, typed), spoken, _right(pattern, spoken)))
    return answers


def _right(pattern: str, reply: str) -> bool:
    return not reply.startswith(REFUSED) and re.search(pattern, reply, re.IGNORECASE) is not None


def main(argv: Sequence[str] | None = None) -> int:
    from blsp_chat.voice.tts import VoiceOptions, load_voice
    from blsp_chat.weights import load_pretrained

    parser = argparse.ArgumentParser(prog="python -m train.spoken_questions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="BLSP directory or id (default: the offline default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--voice", default="piper", choices=("piper", "espeak-ng"))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="also write each answer here (JSON lines)")
    args = parser.parse_args(argv)
    loaded = load_pretrained(args.model, device=args.device)
    voice = load_voice(VoiceOptions(engine=args.voice))
    answers = answer_all(loaded, voice.synthesize_16k,
                         options=GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=False))
    for answer in answers:
        print(f"{answer.question}\n  typed  {'right' if answer.typed_right else 'wrong'}: {answer.typed_reply!r}\n"
              f"  spoken {'right' if answer.spoken_right else 'wrong'}: {answer.spoken_reply!r}")
    typed, spoken = sum(a.typed_right for a in answers), sum(a.spoken_right for a in answers)
    print(f"answered right: typed {typed} of {len(answers)}, spoken ({voice.description}) {spoken} of {len(answers)}")
    if args.out is not None:
        args.out.write_text("".join(json.dumps(asdict(a)) + "\n" for a in answers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
