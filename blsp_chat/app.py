"""The voice chat page: arguments -> model -> ui.build_demo(...) -> launch. Run as `blsp-chat app` (an installed
package) or `python app.py` (a checkout; the app file on Hugging Face Spaces)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import weights
from .options import add_context_option, add_model_option, add_speech_search_option, positive_int
from .weights import DTYPES

# About 1.5 GB of KV cache for the CPU default (~46 KB a position); a 7B model in float16 needs ~0.5 MB a
# position, so lower it there (or raise it on a large GPU).
DEFAULT_MAX_CACHED_TOKENS = 32768
DESCRIPTION = "BLSP voice chat: a web page to talk to the model, by voice or by typing"


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's options: for `python app.py` and for the `app` command of `blsp-chat` alike."""
    on_space = bool(os.environ.get("SPACE_ID"))  # Spaces set SPACE_ID and expect 0.0.0.0:7860
    add_model_option(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    add_speech_search_option(parser)
    parser.add_argument("--host",
                        default=os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1"))
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--auth", default=os.environ.get("BLSP_CHAT_AUTH"),
                        help="USER:PASS required to open the page (or $BLSP_CHAT_AUTH)")
    parser.add_argument("--max-audio-seconds", type=float, default=120.0)
    parser.add_argument("--concurrency", type=positive_int, default=None,
                        help="replies generated at once on the shared model, step by step in turn (default: 16)")
    add_context_option(parser)
    parser.add_argument("--max-cached-tokens", type=positive_int, default=DEFAULT_MAX_CACHED_TOKENS,
                        help="KV-cache positions all browser sessions may hold together; past it the least recently "
                             "used idle sessions drop theirs (recomputed on their next turn)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_app_arguments(parser)
    return parser.parse_args(argv)


def parse_auth(value: str | None):
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise SystemExit("--auth must look like USER:PASS")
    return (user, password)


def exit_on_sigterm() -> None:
    """End the process on SIGTERM (a platform stopping the Space, `kill`) as on Ctrl-C, by an exception:
    by default SIGTERM ends it at once, skipping the exit-time clean-ups (the page's folder of recordings)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Serve the page until stopped: `args` from add_app_arguments' options."""
    # Here, not at the top: gradio loads for serving the page only, not for the tests that parse arguments.
    from .ui import DEFAULT_CONCURRENCY, build_demo

    auth = parse_auth(args.auth)  # before the model loads, so that a typo is reported at once
    loaded = weights.load_pretrained(args.model, revision=args.revision, device=args.device,
                                     dtype=DTYPES.get(args.dtype), speech_search=args.speech_search)
    concurrency = args.concurrency or DEFAULT_CONCURRENCY
    demo = build_demo(loaded, max_audio_seconds=args.max_audio_seconds, concurrency=concurrency,
                      max_context_tokens=args.max_context_tokens, max_cached_tokens=args.max_cached_tokens)
    exit_on_sigterm()
    demo.queue(default_concurrency_limit=concurrency).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
