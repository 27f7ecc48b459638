"""Command-line options shared by every entry point that loads a model: `blsp-chat`'s commands and the app."""
from __future__ import annotations

import argparse
import os

from . import weights

# Read by the app and by every command that loads a model, where --model / --revision are not given (a Space's
# settings, a service's environment).
MODEL_ENV_VAR = "BLSP_CHAT_MODEL"
REVISION_ENV_VAR = "BLSP_CHAT_REVISION"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model and --revision, the same for every entry point that loads a model (the app too)."""
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV_VAR),
                        help=f"BLSP directory, hub id or modelscope:ORG/NAME (or ${MODEL_ENV_VAR}; default: the "
                             "offline default model)")
    add_revision_option(parser, default=os.environ.get(REVISION_ENV_VAR))


def add_speech_search_option(parser: argparse.ArgumentParser) -> None:
    """--speech-search, the same for every entry point that loads a model (the app too)."""
    parser.add_argument("--speech-search", choices=weights.SPEECH_SEARCHES, default=None,
                        help="how the readout finds the words heard: fused (beam search with the LLM as language "
                             "model) or greedy (each output's best label: a spoken turn's first token several "
                             "times sooner on a CPU, for a few points of WER). Default: the model's own")


def add_revision_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--revision, the same for every entry point that loads a model (the app too)."""
    parser.add_argument("--revision", default=default,
                        help="with --model HUB_ID (or modelscope:ORG/NAME): the branch, tag or commit to load "
                             f"(or ${REVISION_ENV_VAR}; default: the newest on main)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def add_context_option(parser: argparse.ArgumentParser) -> None:
    """--max-context-tokens, the same for every entry point that builds ChatSessions (the app too)."""
    parser.add_argument("--max-context-tokens", type=positive_int, default=None,
                        help="conversation + reply cap in tokens (default: the LLM's context); a conversation "
                             "that outgrows it drops its oldest turns")
