"""Spoken questions against typed ones, and the example clips: is a question answered as often when it is said as
when it is typed, and does the model still hear the clips the app offers?

Issue 16 asks for spoken questions answered as often as typed ones, within one. Each general-knowledge question
is put to the model twice, each time as a conversation of its own (`generate.generate_reply`): typed, and spoken
by a TTS voice (piper joe by default, a natural neural voice; `--voice espeak-ng` for a robotic one). An answer
counts as right when it contains the expected word (a regular expression, case-insensitive).

    python -m train.spoken_questions [--model DIR] [--voice piper] [--out answers.jsonl]

A spoken question the readout hears as nothing is counted as not answered, with the refusal as its reply.

Then each clip of `assets/examples` (espeak-ng) is answered and repeated: the France question is answered when its
reply names Paris, and the park sentence is heard when its repeat is within 50% WER, as the shipped default's tests
ask (`tests/test_default_model.py`).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from blsp_chat.audio import load_audio
from blsp_chat.config import GenerationOptions
from blsp_chat.constants import REPEAT_INSTRUCTION
from blsp_chat.generate import NothingHeardError, generate_reply, speech_turn
from blsp_chat.prompt import Turn
from blsp_chat.weights import LoadedBlsp
from train.metrics import EnglishNormalizer, word_errors

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

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
# (clip, what it says (its README's espeak-ng line), a pattern every right answer contains)
EXAMPLE_CLIPS: tuple[tuple[str, str, str], ...] = (
    ("capital_of_france.wav", "What is the capital of France?", r"\bparis\b"),
    ("walk_in_the_park.wav", "The weather is lovely today, so let us walk to the park by the river.",
     r"\bpark\b|\bwalk"),
)
EXAMPLE_MAX_REPEAT_WER = 0.5  # the shipped default's test of the park clip


def acceptance_sentences() -> list[str]:
    """Every sentence the acceptance checks speak, once: training text about any of them is held out."""
    return list(dict.fromkeys([said for _, said, _ in EXAMPLE_CLIPS] + [question for question, _ in QUESTIONS]))


REFUSED = "[refused: "  # how a clip heard as nothing is recorded as its reply


@dataclass
class Answer:
    question: str
    typed_reply: str
    typed_right: bool
    spoken_reply: str
    spoken_right: bool


def ask(loaded: LoadedBlsp, turn: str | np.ndarray, options: GenerationOptions, instruction: str = "") -> str:
    """The reply to a conversation of one turn: text, or 16 kHz audio after `instruction` (a clip heard as
    nothing: the refusal, in brackets)."""
    if isinstance(turn, str):
        return generate_reply(loaded, [Turn("human", text=turn)], (), options).strip()
    try:
        return generate_reply(loaded, [speech_turn(turn, loaded.model, instruction)], [turn], options).strip()
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


@dataclass
class ExampleHeard:
    clip: str
    said: str
    reply: str
    answered: bool
    repeat: str
    repeat_wer: float

    @property
    def heard(self) -> bool:
        return self.repeat_wer <= EXAMPLE_MAX_REPEAT_WER


def hear_examples(loaded: LoadedBlsp, clips: Sequence[tuple[str, str, str]] = EXAMPLE_CLIPS,
                  directory: Path = EXAMPLES_DIR,
                  options: GenerationOptions = GenerationOptions(max_new_tokens=40, do_sample=False),
                  ) -> list[ExampleHeard]:
    """Each example clip answered (a conversation of its own) and repeated, and how far the repeat is from what
    the clip says."""
    heard = []
    for name, said, pattern in clips:
        audio = load_audio(directory / name)
        reply = ask(loaded, audio, options)
        repeat = ask(loaded, audio, options, REPEAT_INSTRUCTION)
        wer = word_errors(said, "" if repeat.startswith(REFUSED) else repeat, EnglishNormalizer()).wer
        heard.append(ExampleHeard(name, said, reply, _right(pattern, reply), repeat, wer))
    return heard


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
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=False)
    answers = answer_all(loaded, voice.synthesize_16k, options=options)
    for answer in answers:
        print(f"{answer.question}\n  typed  {'right' if answer.typed_right else 'wrong'}: {answer.typed_reply!r}\n"
              f"  spoken {'right' if answer.spoken_right else 'wrong'}: {answer.spoken_reply!r}")
    typed, spoken = sum(a.typed_right for a in answers), sum(a.spoken_right for a in answers)
    print(f"answered right: typed {typed} of {len(answers)}, spoken ({voice.description}) {spoken} of {len(answers)}")
    examples = hear_examples(loaded, options=options)
    for example in examples:
        print(f"{example.clip}: {example.said!r}\n  reply {'right' if example.answered else 'wrong'}: "
              f"{example.reply!r}\n  repeat {example.repeat_wer:.0%} WER: {example.repeat!r}")
    print(f"example clips: answered {sum(e.answered for e in examples)} of {len(examples)}, "
          f"heard (repeat within {EXAMPLE_MAX_REPEAT_WER:.0%} WER) {sum(e.heard for e in examples)} of {len(examples)}")
    if args.out is not None:
        args.out.write_text("".join(json.dumps(asdict(a)) + "\n" for a in answers)
                            + "".join(json.dumps(dict(asdict(e), heard=e.heard)) + "\n" for e in examples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
