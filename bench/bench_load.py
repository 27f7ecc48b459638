"""Many people at once on the chat page: time to first token of N concurrent browser sessions against one
session alone, errors, and the server's memory after many opened-and-closed sessions.

    PYTHONPATH=. .venv/bin/python bench/bench_load.py --sessions 16 --turns 5 --churn 100

The server is `app.py` in a child process on 127.0.0.1 (its own RSS, read from /proc). Each session is a
`gradio_client.Client` in its own thread that sends `--turns` turns one after another, typed questions and
the spoken example clips in turn (each session starts at a different one). TTFT runs from submitting a turn
to the first update that shows reply text. The baseline is one session sending the same turns alone, in
the same run. Beside it the bench prints what the sessions' first turns, all sent at the same moment, would
get if each were served alone, one after another, shortest first, as fast as it was alone: where a scheduler
that does not batch work stops, so that a ratio goal below it says how much batching must win. Then
`--churn` sessions each open, send one turn and close, one after another; the server's RSS is read after the
first and after the last has been released (a closed page frees its KV cache).
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
TYPED = ["What is the capital of France?", "Name three colours of the rainbow.", "Tell me more about that.",
         "How many legs does a spider have?"]
SERVER_START_SECONDS = 600  # loading (and on a first run converting) the default model
RELEASE_WAIT_SECONDS = 60   # a closed page is noticed when its heartbeat stops (Gradio beats every 15 s)
SETTLE_SECONDS = 2.0        # let the server's allocator settle before reading RSS
P95 = 0.95


def turns() -> list[dict]:
    """The turn kinds a session cycles through: typed questions and spoken example clips."""
    spoken = [{"audio": str(p)} for p in sorted(EXAMPLES.glob("*.wav"))]
    return [{"text": t} for t in TYPED[:2]] + spoken[:1] + [{"text": t} for t in TYPED[2:]] + spoken[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--concurrency", str(args.concurrency)]
    if args.device:
        command += ["--device", args.device]
    if args.max_cached_tokens:
        command += ["--max-cached-tokens", str(args.max_cached_tokens)]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("app.py did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def reply_text(messages) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        return ""
    content = messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content if isinstance(c, dict))


def one_turn(chat, turn: dict, max_new_tokens: int) -> tuple[float, str]:
    """(seconds to the first reply text, the final reply) of one streamed turn."""
    from gradio_client import handle_file

    audio = handle_file(turn["audio"]) if "audio" in turn else None
    start = time.perf_counter()
    job = chat.submit(turn.get("text", ""), audio, "Chat", "German", max_new_tokens, False, 0.7, 0.9, 1.0,
                      api_name="/send")
    first = None
    for update in job:
        if first is None and reply_text(update[0]).strip():
            first = time.perf_counter() - start
    final = reply_text(job.result()[0])
    if first is None or not final.strip() or "Notice" in str(job.result()[0][-1].get("metadata")):
        raise RuntimeError(f"no reply: {job.result()[0][-1]}")
    return first, final


def session(url, offset: int, n_turns: int, max_new_tokens: int, ttfts: list, errors: list) -> None:
    kinds = turns()
    try:
        chat = client(url)
    except Exception as err:  # noqa: BLE001  (counted, the run goes on)
        errors.append(repr(err))
        return
    for i in range(n_turns):
        turn = kinds[(offset + i) % len(kinds)]
        try:
            ttfts.append(("spoken" if "audio" in turn else "typed", one_turn(chat, turn, max_new_tokens)[0]))
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))
    chat.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def by_kind(ttfts: list[tuple[str, float]]) -> str:
    """Each turn kind's TTFT percentiles: a spoken turn's readout and a typed turn's prefill wait differently."""
    parts = []
    for kind in ("typed", "spoken"):
        values = [seconds for k, seconds in ttfts if k == kind]
        if values:
            parts.append(f"{kind} p50 {statistics.median(values):.2f} s p95 {percentile(values, P95):.2f} s "
                         f"(n={len(values)})")
    return ";  ".join(parts)


def served_one_by_one(n_sessions: int, alone_turns: list[tuple[str, float]]) -> float | None:
    """p95 TTFT of the sessions' first turns, all sent at once, if each were served alone in turn, shortest
    first, taking its kind's median time alone (None without a time alone for every kind they send)."""
    alone = {kind: statistics.median([t for k, t in alone_turns if k == kind]) for kind, _ in alone_turns}
    kinds = ["spoken" if "audio" in turn else "typed" for turn in turns()]
    first = [kinds[i % len(kinds)] for i in range(n_sessions)]
    if any(kind not in alone for kind in first):
        return None
    return percentile(list(itertools.accumulate(sorted(alone[kind] for kind in first))), P95)


def run_sessions(url, n_sessions: int, n_turns: int, max_new_tokens: int
                 ) -> tuple[list[tuple[str, float]], list[str], float]:
    ttfts, errors = [], []
    threads = [threading.Thread(target=session, args=(url, i, n_turns, max_new_tokens, ttfts, errors))
               for i in range(n_sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ttfts, errors, time.perf_counter() - start


def churn(url, server_pid: int, count: int, max_new_tokens: int) -> tuple[float, float, int]:
    """Open, use and close `count` sessions in turn; (RSS after the first, RSS after all, errors)."""
    errors, first_rss = 0, None
    for i in range(count):
        try:
            chat = client(url)
            one_turn(chat, {"text": TYPED[i % len(TYPED)]}, max_new_tokens)
            chat.close()
        except Exception:  # noqa: BLE001
            errors += 1
        if i == 0:
            time.sleep(RELEASE_WAIT_SECONDS)
            first_rss = rss_mb(server_pid)
    time.sleep(RELEASE_WAIT_SECONDS + SETTLE_SECONDS)
    return first_rss, rss_mb(server_pid), errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--churn", type=int, default=100, help="sessions opened, used once and closed (0: skip)")
    parser.add_argument("--concurrency", type=int, default=16, help="app.py --concurrency (its default: 16)")
    parser.add_argument("--max-cached-tokens", type=int, default=None, help="app.py --max-cached-tokens")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    server, url = start_server(args)
    try:
        one_turn(client(url), {"text": TYPED[0]}, args.max_new_tokens)  # warm-up
        alone_turns, alone_errors, _ = run_sessions(url, 1, args.turns, args.max_new_tokens)
        many_turns, errors, wall = run_sessions(url, args.sessions, args.turns, args.max_new_tokens)
        alone, many = [t for _, t in alone_turns], [t for _, t in many_turns]
        rss_after_load = rss_mb(server.pid)
        base50, base95 = statistics.median(alone), percentile(alone, P95)
        print(f"server: app.py --concurrency {args.concurrency}, {os.cpu_count()} CPUs; "
              f"{args.turns} turns of up to {args.max_new_tokens} tokens per session, typed and spoken")
        print(f"1 session alone:   TTFT p50 {base50:.2f} s  p95 {base95:.2f} s  errors {len(alone_errors)}")
        print(f"    by kind: {by_kind(alone_turns)}")
        if many:
            p50, p95 = statistics.median(many), percentile(many, P95)
            print(f"{args.sessions} sessions at once: TTFT p50 {p50:.2f} s ({p50 / base50:.1f}x)  p95 {p95:.2f} s "
                  f"({p95 / base95:.1f}x alone)  errors {len(errors)} of {args.sessions * args.turns}  "
                  f"wall {wall:.0f} s  server RSS {rss_after_load:.0f} MB")
            print(f"    by kind: {by_kind(many_turns)}")
            serial = served_one_by_one(args.sessions, alone_turns)
            if serial is not None:
                print(f"    first turns served one by one, shortest first, as fast as alone: p95 {serial:.2f} s "
                      f"({serial / base95:.1f}x alone)")
        for err in (alone_errors + errors)[:5]:
            print("  error:", err)
        if args.churn:
            first, last, churn_errors = churn(url, server.pid, args.churn, args.max_new_tokens)
            print(f"{args.churn} sessions opened, used and closed: server RSS {first:.0f} MB after the first, "
                  f"{last:.0f} MB after all ({100 * (last - first) / first:+.1f}%), errors {churn_errors}")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
