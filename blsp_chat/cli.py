"""`python -m blsp_chat generate|download`: the model from a terminal."""
from __future__ import annotations

import argparse
import sys

from .config import GenerationOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m blsp_chat", description="BLSP speech LLM")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="reply to one spoken or typed turn")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="audio file to speak to the model (wav, flac, mp3, ogg, ...)")
    source.add_argument("--text", help="a typed turn instead of speech")
    gen.add_argument("--instruction", default="", help="text placed before the speech, e.g. 'Please repeat the following words.'")
    gen.add_argument("--model", default=None, help="BLSP directory or hub id (default: the offline default model)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    gen.add_argument("--max-new-tokens", type=int, default=GenerationOptions.max_new_tokens)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=GenerationOptions.temperature)
    gen.add_argument("--top-p", type=float, default=GenerationOptions.top_p)
    commands.add_parser("download", help="fetch and convert the offline default base models into the cache")
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from .audio import AudioError, load_audio
    from .prompt import Turn
    from .session import generate_reply, speech_turn
    from .weights import load_pretrained

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                temperature=args.temperature, top_p=args.top_p)
    try:
        audio = load_audio(args.audio) if args.audio else None
    except AudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded = load_pretrained(args.model, device=args.device)
    if audio is not None and not loaded.adapter_trained:
        print("warning: this model's adapter is untrained (no trained default adapter is shipped yet), "
              "so it cannot understand speech; typed turns (--text) work.", file=sys.stderr)
    if audio is None:
        turn, audios = Turn("human", instruction=args.instruction, text=args.text), []
    else:
        turn, audios = speech_turn(audio, loaded.model, instruction=args.instruction), [audio]
    print(generate_reply(loaded, [turn], audios, options))
    return 0


def run_download(_: argparse.Namespace) -> int:
    from .weights import download_defaults

    for name, path in download_defaults().items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .weights import WeightsError

    handlers = {"generate": run_generate, "download": run_download}
    try:
        return handlers[args.command](args)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
