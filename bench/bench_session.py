"""ChatSession: time to first token and decode speed over a 10-turn mixed conversation, with the KV
cache kept across turns vs the whole history recomputed every turn (what the released demo does: it
re-encodes every clip and prefills the whole history each turn).

    /work/venv/bin/python bench/bench_session.py [--turns 10] [--max-new-tokens 16] [--device cpu]

Both sessions decode greedily and are run turn by turn, interleaved, in the same process. TTFT is
from submitting the turn (speech encoding included) to the end of the prefill forward pass; decode
tokens/s counts the later forward passes. Needs `espeak-ng` to synthesize the spoken turns.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from blsp_chat.audio import load_audio
from blsp_chat.config import GenerationOptions
from blsp_chat.session import ChatSession
from blsp_chat.weights import load_pretrained

TYPED = ["What is the capital of France?", "Name three colours of the rainbow.", "Why is the sky blue?",
         "Give me a word that rhymes with cat.", "How many legs does a spider have?"]
SPOKEN = ["Tell me a short fact about the moon.", "What do cats like to eat?", "Please count from one to five.",
          "What is your favourite season and why?", "Say something nice about the weather today."]


def synthesize(texts: list[str], directory: Path) -> list:
    clips = []
    for index, text in enumerate(texts):
        path = directory / f"clip{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        clips.append(load_audio(path))
    return clips


class ForwardClock:
    """Wraps the LLM's forward and records when each call ends."""

    def __init__(self, llm):
        self.ends: list[float] = []
        original = llm.forward

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            self.ends.append(time.perf_counter())
            return out

        llm.forward = forward


def run_turn(session: ChatSession, clock: ForwardClock, turn: int, typed, spoken, past_clips, options,
             recompute_speech):
    del clock.ends[:]
    start = time.perf_counter()
    if turn % 2 == 0:
        session.submit_text(typed[turn // 2])
    else:
        clip = spoken[turn // 2]
        if recompute_speech:  # the released demo encodes every clip of the history again each turn
            session.model.encode_speech(past_clips)
        session.submit_audio(clip)
    *_, last = session.stream_reply(options)
    ends = list(clock.ends)
    ttft = ends[0] - start
    decode = len(ends) - 1
    tps = decode / (ends[-1] - ends[0]) if decode else float("nan")
    return ttft, tps, last.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    loaded = load_pretrained(None, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        spoken = synthesize(SPOKEN, Path(tmp))
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    clock = ForwardClock(loaded.model.llama_model)
    warm = ChatSession.from_loaded(loaded)  # first calls pay one-off costs: keep them out of turn 1
    warm.submit_audio(spoken[0])
    list(warm.stream_reply(options))
    kv = ChatSession.from_loaded(loaded)
    full = ChatSession.from_loaded(loaded, reuse_cache=False)
    print(f"model: {loaded.source}; device {args.device}; {torch.get_num_threads()} threads; "
          f"max_new_tokens={args.max_new_tokens}; greedy")
    print(f"{'turn':>4} {'kind':>6} {'ctx':>6} | {'KV reuse TTFT s':>15} {'tok/s':>6} | "
          f"{'recompute TTFT s':>16} {'tok/s':>6} | same reply")
    rows = []
    for turn in range(args.turns):
        past = [spoken[i // 2] for i in range(1, turn + 1, 2)]
        kv_ttft, kv_tps, kv_text = run_turn(kv, clock, turn, TYPED, spoken, past, options, False)
        full_ttft, full_tps, full_text = run_turn(full, clock, turn, TYPED, spoken, past, options, True)
        prompt = kv.cached_tokens  # history positions held after the reply
        rows.append((kv_ttft, full_ttft))
        kind = "text" if turn % 2 == 0 else "speech"
        print(f"{turn + 1:>4} {kind:>6} {prompt:>6} | {kv_ttft:>15.3f} {kv_tps:>6.1f} | {full_ttft:>16.3f} "
              f"{full_tps:>6.1f} | {kv_text == full_text}")
    last, first = rows[-1], rows[0]
    print(f"turn-{args.turns}/turn-1 TTFT ratio: KV reuse {last[0] / first[0]:.2f}x, "
          f"recompute {last[1] / first[1]:.2f}x; turn-{args.turns} recompute/KV TTFT {last[1] / last[0]:.2f}x")
    if args.turns >= 4:  # the same kind of turn at both ends (turn 1 is typed, turn 2 spoken)
        for a, b in ((len(rows) - 1 - (len(rows) - 1) % 2, 0), (len(rows) - 1 - len(rows) % 2, 1)):
            print(f"turn-{a + 1}/turn-{b + 1} TTFT ratio ({'text' if b == 0 else 'speech'}): "
                  f"KV reuse {rows[a][0] / rows[b][0]:.2f}x, recompute {rows[a][1] / rows[b][1]:.2f}x")


if __name__ == "__main__":
    main()
