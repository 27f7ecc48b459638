"""Requests per second and time to first token of the OpenAI-compatible server at 1, 4 and 16 concurrent
clients, against one client sending its requests one at a time.

    PYTHONPATH=. .venv/bin/python bench/bench_serve.py --device cpu --max-tokens 16 --rounds 2

The baseline is one client sending every prompt once, one request after another. The server
(`blsp_chat.serve`, the in-process engine) runs on 127.0.0.1 in this process; each client is an
`openai.OpenAI` client in its own thread that streams `--rounds` chat completions one after another, taking
turns through the prompts (typed questions and the spoken example clips). TTFT runs from sending a request to
its first content delta. Greedy decoding, so every level must give every prompt the same reply ("same replies").
"""
from __future__ import annotations

import argparse
import base64
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from blsp_chat.serve import InProcessEngine, create_app
from blsp_chat.weights import load_pretrained

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
TYPED = ["What is the capital of France?", "Name three colours of the rainbow.", "Write a haiku about the sea.",
         "How many legs does a spider have?"]
LEVELS = (4, 16)  # and 1: the baseline
MODEL_ID = "blsp-chat"
SERVER_START_SECONDS = 60
P90 = 0.9


def prompts() -> list[list[dict]]:
    """Message lists: the typed questions, then each example clip as a spoken turn."""
    spoken = [[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(p.read_bytes()).decode(), "format": "wav"}}]}] for p in sorted(EXAMPLES.glob("*.wav"))]
    return [[{"role": "user", "content": t}] for t in TYPED] + spoken


def start_server(engine):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def one_request(client, messages, max_tokens: int) -> tuple[float, str]:
    """(seconds to the first content delta, the whole reply) of one streamed completion."""
    start, first, parts = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, stream=True):
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            first = first if first is not None else time.perf_counter() - start
            parts.append(delta)
    return (first if first is not None else time.perf_counter() - start), "".join(parts)


def run_level(url: str, clients: int, rounds: int, max_tokens: int, conversations) -> dict:
    """`clients` threads, each sending `rounds` requests in turn; client c's round r asks prompt c*rounds + r
    (cycling), so that every level asks a like mix of typed and spoken turns."""
    import openai

    ttfts, replies, errors = [], {}, []

    def client_thread(index: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        for round_ in range(rounds):
            which = (index * rounds + round_) % len(conversations)
            try:
                ttft, reply = one_request(client, conversations[which], max_tokens)
            except Exception as err:  # counted and printed: a benchmark of a failing server is no benchmark
                errors.append(err)
                continue
            ttfts.append(ttft)
            replies.setdefault(which, set()).add(reply)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed at {clients} clients, e.g. {errors[0]!r}")
    ttfts.sort()
    return {"clients": clients, "requests": len(ttfts), "wall": wall, "rps": len(ttfts) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[min(len(ttfts) - 1, int(P90 * len(ttfts)))],
            "replies": replies}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="BLSP checkpoint (default: the offline default model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent clients to measure")
    args = parser.parse_args(argv)

    loaded = load_pretrained(args.model, device=args.device)
    server, url = start_server(InProcessEngine(loaded, MODEL_ID))
    conversations = prompts()
    device = loaded.model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model: {loaded.source}; device {name}; torch {torch.__version__}; python {sys.version.split()[0]}; "
          f"max_tokens={args.max_tokens}; greedy; {len(conversations)} prompts ({len(TYPED)} typed, "
          f"{len(conversations) - len(TYPED)} spoken); {args.rounds} requests per client")
    run_level(url, 1, 1, args.max_tokens, conversations)  # warm-up: first-call allocations, thread pools
    baseline = run_level(url, 1, len(conversations), args.max_tokens, conversations)  # each prompt once, in turn
    results = [run_level(url, clients, args.rounds, args.max_tokens, conversations) for clients in args.levels]
    print("clients requests  wall s   req/s (x one-at-a-time) | TTFT p50 s (x)    p90 s (x)     | same replies")
    print(f"{'1*':>7} {baseline['requests']:>8} {baseline['wall']:7.2f} {baseline['rps']:7.2f} ({1:5.2f}x)       | "
          f"{baseline['ttft_p50']:6.3f} ({1:5.2f}x) {baseline['ttft_p90']:6.3f} ({1:5.2f}x) |")
    every = {}
    for run in [baseline, *results]:
        for which, texts in run["replies"].items():
            every.setdefault(which, set()).update(texts)
    for run in results:
        same = all(len(every[which]) == 1 for which in run["replies"])
        print(f"{run['clients']:>7} {run['requests']:>8} {run['wall']:7.2f} {run['rps']:7.2f} "
              f"({run['rps'] / baseline['rps']:5.2f}x)       | {run['ttft_p50']:6.3f} "
              f"({run['ttft_p50'] / baseline['ttft_p50']:5.2f}x) {run['ttft_p90']:6.3f} "
              f"({run['ttft_p90'] / baseline['ttft_p90']:5.2f}x) | {same}")
    print("* one-at-a-time: one client sending every prompt once, one request after another (the ratios' baseline)")
    server.should_exit = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
