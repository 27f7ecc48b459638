"""The CTC-compressed readouts against the paper's readout and Whisper: speech positions and time to first token.

One model, the shipped default adapter, read three ways: the paper's readout, the greedy ctc readout and
the ctc readout decoded by beam search with the LLM fused in (`ctc+lm`, KV-cached). Each clip is a run of
speech clips joined end to end: offline_v2 test clips (`--manifest`) or plain wav files (`--wavs`). For each
clip and readout the script reports how many LLM positions the clip takes, the time to encode it (Whisper +
adapter + readout), and the time to prefill a one-turn prompt with it (the speech turn's time to first
token). It reports ratios to embeddings from the same run, and the time Whisper tiny.en's own
encoder-decoder takes to transcribe the same clip (a cascade's first step, before its LLM reads a word).

    PYTHONPATH=. python bench/bench_readout.py --manifest data/offline_v2/test.jsonl --seconds 3 10 30 60
    PYTHONPATH=. python bench/bench_readout.py --wavs /usr/share/pocketsphinx/test/data/librivox/*.wav \
        assets/examples/*.wav --seconds 3 10 30 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Iterable, Iterator

import numpy as np
import torch

from blsp_chat.audio import load_audio
from blsp_chat.constants import REPEAT_INSTRUCTION, SAMPLE_RATE
from blsp_chat.prompt import Turn, render, template_for
from blsp_chat.weights import load_pretrained, resolve_base
from train.eval_run import WhisperTranscriber

READOUTS = ("embeddings", "ctc", "ctc+lm")


def clip_paths(manifest: str | None, wavs: list[str]) -> Iterator[str]:
    if manifest:
        with open(manifest) as lines:
            yield from (json.loads(line)["audio"] for line in lines)
    yield from wavs


def joined_clip(paths: Iterable[str], seconds: float) -> np.ndarray:
    """Clips joined end to end until `seconds` of speech."""
    parts, total = [], 0
    for path in paths:
        audio = load_audio(path, max_seconds=None)
        parts.append(audio)
        total += len(audio)
        if total >= seconds * SAMPLE_RATE:
            return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]
    raise SystemExit(f"the clips given hold only {total / SAMPLE_RATE:.1f} s of speech, not {seconds:g} s")


@torch.inference_mode()
def time_whisper(transcriber, audio: np.ndarray, repeats: int) -> tuple[float, str]:
    """(median s, transcript) of Whisper's encoder-decoder alone on one clip."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (text,) = transcriber([audio])
        times.append(time.perf_counter() - start)
    return statistics.median(times), text


@torch.inference_mode()
def time_turn(loaded, audio: np.ndarray, repeats: int) -> tuple[int, float, float]:
    """(positions, median encode s, median prefill s) of one spoken turn."""
    model, tokenizer = loaded.model, loaded.tokenizer
    encode, prefill = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        (speech,) = model.encode_speech([audio])
        encode.append(time.perf_counter() - start)
        prompt = render([Turn("human", instruction=REPEAT_INSTRUCTION, speech_tokens=speech.shape[0])], tokenizer,
                        template_for(model.config.prompt_template, tokenizer))
        start = time.perf_counter()
        model(torch.tensor([prompt.input_ids]), speech_mask=torch.tensor([prompt.speech_mask]), speech_embeds=[speech],
              logits_to_keep=1)
        prefill.append(time.perf_counter() - start)
    return speech.shape[0], statistics.median(encode), statistics.median(prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=None, help="JSONL of speech clips (offline_v2 test)")
    parser.add_argument("--wavs", nargs="*", default=[], help="audio files, joined after the manifest's clips")
    parser.add_argument("--model", default=None, help="a CTC-trained BLSP checkpoint (default: the shipped one)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3, 10, 30, 60])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--lm-weight", type=float, default=None, help="ctc+lm's (default: the checkpoint's, else 0.3)")
    parser.add_argument("--token-bonus", type=float, default=None, help="ctc+lm's (default: the checkpoint's)")
    args = parser.parse_args()
    if not args.manifest and not args.wavs:
        parser.error("give the speech to join: --manifest, --wavs or both")
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_pretrained(args.model, device=args.device)
    ctc_config = loaded.model.config
    if ctc_config.speech_readout != "ctc":
        raise SystemExit("this checkpoint is not served through the ctc readout; pass --model with one that is")
    lm_weight = args.lm_weight if args.lm_weight is not None else (ctc_config.ctc_lm_weight or 0.3)
    bonus = args.token_bonus if args.token_bonus is not None else ctc_config.ctc_token_bonus
    configs = {"embeddings": dataclasses.replace(ctc_config, speech_readout="embeddings"),
               "ctc": dataclasses.replace(ctc_config, ctc_lm_weight=0.0),
               "ctc+lm": dataclasses.replace(ctc_config, ctc_lm_weight=lm_weight, ctc_token_bonus=bonus)}
    if not ctc_config.whisper_name_or_path:
        raise SystemExit("this checkpoint names no base Whisper, so there is no Whisper decoder to time")
    transcriber = WhisperTranscriber(resolve_base(ctc_config.whisper_name_or_path), device=args.device)
    print(f"model: {loaded.source}; device {args.device}; {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"ctc+lm: lm weight {lm_weight}, token bonus {bonus}, beam {ctc_config.ctc_beam_size}")
    print(" clip s | readout    positions  encode s  prefill s  TTFT s | /embeddings: positions  TTFT | /whisper")
    for seconds in args.seconds:
        audio = joined_clip(clip_paths(args.manifest, args.wavs), seconds)
        rows = {}
        for readout in READOUTS:
            loaded.model.config = configs[readout]
            time_turn(loaded, audio, 1)  # warm-up
            rows[readout] = time_turn(loaded, audio, args.repeats)
        time_whisper(transcriber, audio, 1)  # warm-up
        whisper_s, transcript = time_whisper(transcriber, audio, args.repeats)
        for readout in READOUTS:
            positions, encode, prefill = rows[readout]
            ratio = ""
            if readout != "embeddings":
                base = rows["embeddings"]
                ratio = f"{positions / base[0]:.2f}x  {(encode + prefill) / (base[1] + base[2]):.2f}x"
            print(f"{seconds:7.0f} | {readout:10s} {positions:9d}  {encode:8.3f}  {prefill:9.3f}  "
                  f"{encode + prefill:6.3f} | {ratio:22s} | {(encode + prefill) / whisper_s:.2f}x")
        print(f"{seconds:7.0f} | whisper transcribes in {whisper_s:.3f} s: {transcript[:60]!r}")
    loaded.model.config = ctc_config


if __name__ == "__main__":
    main()
