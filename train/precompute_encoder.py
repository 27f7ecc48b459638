"""Fill the encoder cache ahead of training: run the frozen Whisper encoder once over every clip of the
given manifests and store its output where `train_adapter` (`data.encoder_cache_dir`) reads it.

    python -m train.precompute_encoder --config train/configs/adapter_tiny_offline.json \
        --manifest data/offline_v2/train.jsonl --manifest data/offline_v2/dev.jsonl [section.key=value ...]

Clips already cached are skipped, so an interrupted run continues where it stopped. Training fills the
cache on its own during its first epoch; running this first lets that epoch (and the CTC pre-alignment
stage, which needs no LLM) read every clip from disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

import torch

from blsp_chat.audio import load_audio
from train.adapter_config import load_config
from train.speech_data import EncoderCache, manifest_audio_paths
from train.train_adapter import build_model


def missing_clips(paths: Sequence[str], cache: EncoderCache) -> list[tuple[str, str]]:
    """(audio path, cache key) for each distinct clip of the manifests that the cache lacks."""
    seen, missing = set(), []
    for manifest in paths:
        for audio in manifest_audio_paths(manifest):
            if audio in seen:
                continue
            seen.add(audio)
            key = cache.key(audio)
            if not cache.has(key):
                missing.append((audio, key))
    return missing


def fill(model, cache: EncoderCache, clips: Sequence[tuple[str, str]], batch_size: int,
         max_seconds: float | None) -> int:
    """Encode `clips` in batches, in path order (the same order on every run), and store them; returns how
    many were stored."""
    ordered = sorted(clips, key=lambda clip: clip[0])
    started, done = time.time(), 0
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        audios = [load_audio(path, max_seconds=max_seconds) for path, _ in group]
        with torch.no_grad():
            encoded = model.encode_windows(audios)
        for (_, key), windows, audio in zip(group, encoded, audios):
            cache.put(key, windows, len(audio))
        done += len(group)
        if done % (batch_size * 20) < batch_size or done == len(ordered):
            rate = done / max(time.time() - started, 1e-9)
            print(f"encoded {done}/{len(ordered)} clips ({rate:.1f} clips/s)", flush=True)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", action="append", required=True, help="speech manifest (JSON lines); repeatable")
    parser.add_argument("--config", required=True, help="adapter training config: gives the model and the cache dir")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for train_adapter")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if not config.data.encoder_cache_dir:
        parser.error("the config sets no data.encoder_cache_dir")
    # Only the frozen encoder runs here, and it does not depend on the adapter, so the run's starting
    # adapter (model.init_adapter, which may not exist yet when the cache is filled) is not needed.
    model = build_model(dataclasses.replace(config.model, init_adapter=None)).model.to(args.device).eval()
    cache = EncoderCache.for_model(config.data.encoder_cache_dir, model)
    clips = missing_clips(args.manifest, cache)
    print(f"{len(clips)} clips to encode into {cache.directory}", flush=True)
    fill(model, cache, clips, args.batch_size, config.data.max_seconds)
    print(f"cache complete: {cache.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
