"""Talking by voice on this machine: TTS real-time factor (piper, espeak-ng), and the time from the end of a
spoken question to the first reply audio (VAD delay + time to first token + the rest of the first sentence
+ its synthesis), for a ~3 s and a ~10 s question spoken by a person (LibriVox, pocketsphinx-testdata).

    PYTHONPATH=. .venv/bin/python bench/bench_voice.py [--device cpu|cuda] [--dtype ...] [--threads 1] [--repeats 3]

The VAD delay is counted in audio, not wall clock: the question is fed to EndOfTurnDetector in 20 ms blocks
followed by silence, and the delay is from the end of the recording's speech (the detector's own speech end)
to the block on which it reported the turn's end; its processing time per block is printed beside it.
The rest is wall clock in this process: ChatSession.stream_reply from submitting the turn to the first
chunk (TTFT) and to the first complete sentence (SentenceSplitter), then piper's synthesis of that sentence.
On a GPU the model runs there (bfloat16 unless --dtype says otherwise) after one untimed reply (the CUDA
context and kernel choice would otherwise land in the first run); the voice stays on the CPU, as in the app.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from blsp_chat.config import GenerationOptions
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.voice.sentences import SentenceSplitter
from blsp_chat.voice.tts import ENGINES, VoiceOptions, VoiceUnavailable, load_voice
from blsp_chat.voice.vad import FRAME_SECONDS, TURN_END, EndOfTurnDetector, TurnOptions, frames_in
from blsp_chat.weights import DTYPES, load_pretrained

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SHORT_QUESTION = ["sense_and_sensibility_01_austen_64kb-0880"]                    # 3.0 s
LONG_QUESTION = ["sense_and_sensibility_01_austen_64kb-0870",
                 "sense_and_sensibility_01_austen_64kb-0930"]                      # 7.1 + 3.3 s
BLOCK = SAMPLE_RATE // 50          # 20 ms: a typical microphone block
TRAILING_SILENCE_S = 2.0           # after the question: enough for any end_pause_s
RTF_TEXT = ("The capital of France is Paris. It is famous for the Eiffel Tower and its museums. "
            "Many people visit the city every year, and most of them take the train.")


def question(names: list[str]) -> np.ndarray:
    clips = [sf.read(LIBRIVOX / f"{name}.wav", dtype="float32")[0] for name in names]
    return np.concatenate(clips)


def tts_rtf(engine: str, threads: int, repeats: int) -> tuple[float, float] | None:
    """(median seconds of synthesis per second of audio, audio seconds), or None without the engine."""
    try:
        voice = load_voice(VoiceOptions(engine=engine, threads=threads))
    except VoiceUnavailable as err:
        print(f"{engine}: not available ({err})")
        return None
    voice.synthesize("Warm up.")
    ratios, seconds = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        audio = voice.synthesize(RTF_TEXT)
        seconds = len(audio) / voice.sample_rate
        ratios.append((time.perf_counter() - start) / seconds)
    return statistics.median(ratios), seconds


def vad_delay(audio: np.ndarray, options: TurnOptions) -> tuple[float, float, np.ndarray]:
    """(seconds of audio from the end of speech to the TURN_END report, VAD seconds per second of audio, turn)."""
    stream = np.concatenate([audio, np.zeros(int(TRAILING_SILENCE_S * SAMPLE_RATE), np.float32)])
    detector = EndOfTurnDetector(options)
    start = time.perf_counter()
    for at in range(0, len(stream), BLOCK):
        for event in detector.feed(stream[at:at + BLOCK]):
            if event.kind == TURN_END:
                elapsed = time.perf_counter() - start
                reported_s = (at + BLOCK) / SAMPLE_RATE
                kept_s = (frames_in(options.tail_s) + frames_in(options.pre_roll_s)) * FRAME_SECONDS
                speech_end_s = event.speech_start_s + len(event.audio) / SAMPLE_RATE - kept_s
                return reported_s - speech_end_s, elapsed / reported_s, event.audio
    raise RuntimeError("the detector never ended the turn")


def first_sentence(loaded, turn_audio: np.ndarray, voice, max_new_tokens: int) -> dict:
    from blsp_chat.session import ChatSession

    session = ChatSession.from_loaded(loaded)
    splitter = SentenceSplitter()
    start = time.perf_counter()
    session.submit_audio(turn_audio)
    ttft, sentence = None, None
    for chunk in session.stream_reply(GenerationOptions(max_new_tokens=max_new_tokens)):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        done = splitter.feed(chunk.delta)
        if done:
            sentence = done[0]
            break
    sentence = sentence or " ".join(splitter.flush())
    text_s = time.perf_counter() - start
    session.cancel()
    synth_start = time.perf_counter()
    voice.synthesize(sentence)
    return {"ttft": ttft or text_s, "first_sentence_text": text_s, "synthesis": time.perf_counter() - synth_start,
            "sentence": sentence}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for piper (0: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU")
    return args


def machine_line(args) -> str:
    line = (f"cpu cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}; load: {os.getloadavg()[0]:.1f}; "
            f"piper threads: {args.threads or 'default'}")
    if args.device.startswith("cuda"):
        line += f"; model on {torch.cuda.get_device_name(torch.device(args.device))} ({args.dtype or 'bfloat16'})"
    return line


def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine_line(args))
    for engine in ENGINES:
        result = tts_rtf(engine, args.threads, args.repeats)
        if result:
            print(f"TTS {engine:9s} real-time factor {result[0]:.3f} "
                  f"(synthesis s / audio s; {result[1]:.1f} s of speech)")
    options = TurnOptions()
    loaded = load_pretrained(None, device=args.device, dtype=DTYPES.get(args.dtype))
    voice = load_voice(VoiceOptions(threads=args.threads))
    for label, names in (("3 s", SHORT_QUESTION), ("10 s", LONG_QUESTION)):
        audio = question(names)
        delay, vad_rtf, turn = vad_delay(audio, options)
        if args.device != "cpu":
            first_sentence(loaded, turn, voice, args.max_new_tokens)  # untimed: CUDA's first-use costs
        runs = [first_sentence(loaded, turn, voice, args.max_new_tokens) for _ in range(args.repeats)]
        median = {key: statistics.median(run[key] for run in runs) for key in ("ttft", "first_sentence_text",
                                                                               "synthesis")}
        total = delay + median["first_sentence_text"] + median["synthesis"]
        print(f"{label} question ({len(audio) / SAMPLE_RATE:.1f} s): end of speech -> first reply audio {total:.2f} s "
              f"= VAD delay {delay:.2f} s (end_pause_s {options.end_pause_s}; VAD RTF {vad_rtf:.4f}) "
              f"+ TTFT {median['ttft']:.2f} s + rest of first sentence "
              f"{median['first_sentence_text'] - median['ttft']:.2f} s + {voice.description} synthesis "
              f"{median['synthesis']:.2f} s; first sentence: {runs[0]['sentence']!r}")


if __name__ == "__main__":
    main()
