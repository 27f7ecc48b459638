"""Microphone-like augmentation of a speech manifest, as a data-preparation step (new wav files, so the
encoder cache of train/train_adapter.py keeps working on them as on any clip).

    python -m train.augment --manifest IN.jsonl --out-dir DIR --copies K --seed S
        [--effects speed,tempo,pitch,vtlp,reverb,noise,loudness,band_limit,codec | NAME=P,...] [--jobs J]

Each clip of IN.jsonl gets K copies, DIR/wav/<xx>/<id>-aug<k>.wav (16 kHz mono 16-bit), and DIR/manifest.jsonl
gets one line per copy: the source line with a new "id", "audio" and "duration", plus "source_id" (the
source clip's id), "augment" (the chain applied, in order, each step `{"effect": NAME, PARAMETER: VALUE...}`)
and "augment_seed". `--effects` names the effects that may be drawn, each with the probability of
DEFAULT_PROBABILITY or the one given as NAME=P.

Effects (pure functions `(audio, rng) -> audio` at 16 kHz; each draws its parameters from the ranges below):
- speed: resampled by 0.9 or 1.1 (Kaldi's 3-way speed perturbation; 1.0 is the copy that draws no speed),
  so duration and pitch both change, as with a talker who speaks faster and higher.
- tempo: duration x 1/0.85..1/1.15 at the same pitch (sox's WSOLA `tempo -s`).
- pitch: -300..300 cents at the same duration (sox `pitch`).
- vtlp: vocal-tract-length perturbation: the spectral envelope (cepstrally smoothed) warped by 0.9..1.1 with
  the piecewise-linear warp of Jaitly & Hinton (2013), harmonics and phase kept: formants move, pitch stays.
- reverb: a synthetic room: exponentially decaying Gaussian noise with RT60 0.2..0.8 s after a direct path,
  direct-to-reverberant ratio 0..12 dB; the output keeps the input's RMS level and length.
- noise: white, pink or brown noise, or babble (3..7 time-reversed excerpts of clips of the manifest itself,
  so no words can be understood in it), added at 5..30 dB SNR (powers over the whole clip).
- loudness: gain -20..+6 dB, cut to keep the peak at PEAK_LIMIT (no clipping).
- band_limit: telephone (300-3400 Hz band-pass, then through 8 kHz) or narrowband (through 8 kHz only).
- codec: an opus (8..24 kbit/s) or mp3 (16..32 kbit/s) round trip through PyAV's FFmpeg, same length.
The chain keeps the order of EFFECT_ORDER (talker, room, noise, gain, channel); a copy that draws no effect
gets one drawn by probability, so no copy repeats its source.

Deterministic: a copy's chain and parameters come from a generator seeded by (seed, source id, k), and the
babble bank from a seeded ranking of the manifest's ids, so the same seed gives byte-identical wav files
and manifest at any --jobs. Resumable as train/synthesize.py (its JSONL helpers): a copy whose manifest line
and wav exist is skipped; when all are done the manifest is rewritten in plan order. Refused: a manifest
line without audio, missing audio files, unknown effect names, --copies < 1; a source clip that cannot be
decoded, is empty or silent is listed in DIR/failures.jsonl and the run exits 3.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import soundfile as sf

from blsp_chat.audio import AudioError, load_audio, resample
from blsp_chat.constants import SAMPLE_RATE

from .io import append_line, numbered_lines, read_jsonl_tolerant, repair_tail, resolve_audio, write_jsonl_atomic
from .synthesize import MANIFEST, check_config, done_records, parallel_map

if TYPE_CHECKING:
    from scipy.signal import ShortTimeFFT

SPEED_FACTORS = (0.9, 1.1)
TEMPO_RANGE = (0.85, 1.15)           # >1 is faster
PITCH_CENTS_RANGE = (-300, 300)
VTLP_WARP_RANGE = (0.9, 1.1)         # >1: formants up, as from a shorter vocal tract
VTLP_BOUNDARY_HZ = 4800              # Jaitly & Hinton's F_hi: above it the warp bends back to Nyquist
VTLP_N_FFT = 512                     # 32 ms frames
VTLP_HOP = 128
VTLP_LIFTER = 24                     # cepstral coefficients of the envelope: 1.5 ms, below any pitch period
VTLP_MAX_GAIN_DB = 30                # bound on the per-bin gain, for bins of near silence
REVERB_RT60_RANGE = (0.2, 0.8)       # seconds for the tail to decay by 60 dB
REVERB_DRR_DB_RANGE = (0.0, 12.0)    # direct-to-reverberant energy ratio
REVERB_DECAY_DB = 60
NOISE_SNR_DB_RANGE = (5.0, 30.0)
NOISE_KINDS = ("white", "pink", "brown", "babble")
NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1/f**exponent
NOISE_FLOOR_HZ = 50                  # coloured noise is flat below: no inaudible rumble eating the SNR
BABBLE_TALKERS = (3, 7)
BABBLE_BANK_CLIPS = 16               # manifest clips loaded for babble, chosen by seeded hash
GAIN_DB_RANGE = (-20.0, 6.0)
PEAK_LIMIT = 0.99                    # full scale less 0.1 dB: no clipping in 16-bit PCM
TELEPHONE_BAND_HZ = (300, 3400)
NARROWBAND_RATE = 8000
BAND_KINDS = ("telephone", "narrowband")
BAND_FILTER_ORDER = 8                # Butterworth, run forward and backward (zero phase)
CODEC_BITRATES = {"opus": (8000, 12000, 16000, 24000), "mp3": (16000, 24000, 32000)}
CODEC_FORMATS = {"opus": ("ogg", "libopus"), "mp3": ("mp3", "libmp3lame")}
SOX_TIMEOUT_S = 60
SEED_BITS = 63
EPS = 1e-10

EFFECT_ORDER = ("speed", "tempo", "pitch", "vtlp", "reverb", "noise", "loudness", "band_limit", "codec")
DEFAULT_PROBABILITY = {"speed": 0.5, "tempo": 0.3, "pitch": 0.3, "vtlp": 0.5, "reverb": 0.4, "noise": 0.5,
                       "loudness": 0.7, "band_limit": 0.15, "codec": 0.3}


class AugmentError(ValueError):
    pass


# --- signal helpers ------------------------------------------------------------------------------------
def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def _sox(audio: np.ndarray, *effect: str) -> np.ndarray:
    """audio through a sox effect, as raw 32-bit floats on pipes (no dither: same bytes on every run)."""
    if not shutil.which("sox"):
        raise AugmentError("tempo and pitch need sox: apt-get install sox")
    raw = ["-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1"]
    result = subprocess.run(["sox", "-D", "-V1", *raw, "-", *raw, "-", *effect], input=audio.astype("<f4").tobytes(),
                            capture_output=True, timeout=SOX_TIMEOUT_S)
    if result.returncode != 0:
        raise AugmentError(f"sox {' '.join(effect)} failed: {result.stderr.decode(errors='replace').strip()[:300]}")
    return np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)


# --- the effects: (audio, **parameters) -> audio -------------------------------------------------------
def speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Played `factor` times faster: duration / factor, every frequency x factor."""
    return resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE)


def tempo(audio: np.ndarray, factor: float) -> np.ndarray:
    """Duration / factor at the same pitch."""
    return _sox(audio, "tempo", "-s", f"{factor:.4f}")


def pitch(audio: np.ndarray, cents: int) -> np.ndarray:
    """Every frequency x 2**(cents/1200), same duration."""
    return _fit_length(_sox(audio, "pitch", str(int(cents))), len(audio))


def vtlp_warp(freqs: np.ndarray, warp: float, nyquist: float = SAMPLE_RATE / 2,
              boundary: float = VTLP_BOUNDARY_HZ) -> np.ndarray:
    """Jaitly & Hinton's piecewise-linear warp: f -> warp * f up to the bend, then a line to Nyquist."""
    bend = boundary * min(warp, 1.0) / warp
    upper = nyquist - (nyquist - boundary * min(warp, 1.0)) / (nyquist - bend) * (nyquist - freqs)
    return np.where(freqs <= bend, warp * freqs, upper)


def _log_envelope(log_magnitude: np.ndarray, lifter: int = VTLP_LIFTER) -> np.ndarray:
    """(bins, frames) log magnitude -> its cepstrally smoothed envelope (the vocal tract's share)."""
    cepstrum = np.fft.irfft(log_magnitude, axis=0)
    cepstrum[lifter:len(cepstrum) - lifter + 1] = 0.0
    return np.fft.rfft(cepstrum, axis=0).real


def _stft() -> ShortTimeFFT:
    from scipy.signal import ShortTimeFFT
    from scipy.signal.windows import hann

    return ShortTimeFFT(hann(VTLP_N_FFT, sym=False), hop=VTLP_HOP, fs=SAMPLE_RATE)


def vtlp(audio: np.ndarray, warp: float) -> np.ndarray:
    """Formants moved by `warp` (the spectral envelope warped), harmonics and phase kept, same length."""
    stft = _stft()  # scipy's, not librosa's: that one compiles with numba for seconds in every worker
    spectrum = stft.stft(audio)
    envelope = _log_envelope(np.log(np.abs(spectrum) + EPS))
    bins = spectrum.shape[0]
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, bins)
    # The envelope at output frequency f is the input's at the frequency that the warp sends to f.
    source = np.interp(freqs, vtlp_warp(freqs, warp), freqs) / (SAMPLE_RATE / 2) * (bins - 1)
    low = np.clip(np.floor(source).astype(int), 0, bins - 2)
    frac = (source - low)[:, None]
    warped = envelope[low] * (1 - frac) + envelope[low + 1] * frac
    gain = np.exp(np.clip(warped - envelope, *np.log(10.0) / 20 * np.array([-VTLP_MAX_GAIN_DB, VTLP_MAX_GAIN_DB])))
    return stft.istft(spectrum * gain, k1=len(audio)).astype(np.float32)


def room_impulse_response(rt60_s: float, drr_db: float, seed: int) -> np.ndarray:
    """A direct path (1.0 at t=0) and a tail of Gaussian noise decaying by 60 dB over rt60_s, whose energy
    is drr_db below the direct path's."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, max(2, int(rt60_s * SAMPLE_RATE))) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * 10.0 ** (-REVERB_DECAY_DB / 20 * t / rt60_s)
    tail *= math.sqrt(10.0 ** (-drr_db / 10) / float(np.sum(tail**2)))
    return np.concatenate([[1.0], tail]).astype(np.float32)


def reverb(audio: np.ndarray, rt60_s: float, drr_db: float, seed: int) -> np.ndarray:
    """The clip in a synthetic room; same length and RMS level (gain is loudness's business)."""
    from scipy.signal import fftconvolve

    wet = fftconvolve(audio, room_impulse_response(rt60_s, drr_db, seed))[: len(audio)]
    return (wet * math.sqrt(_power(audio) / max(_power(wet), EPS))).astype(np.float32)


def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f**exponent (flat below NOISE_FLOOR_HZ)."""
    spectrum = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    freqs = np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), NOISE_FLOOR_HZ)
    return np.fft.irfft(spectrum * freqs ** (-exponent / 2), n).astype(np.float32)


def babble(n: int, bank: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Several talkers at once: time-reversed excerpts of the bank's clips (unintelligible), looped to n
    samples from a random start, each at unit power, summed."""
    out = np.zeros(n, dtype=np.float64)
    for _ in range(int(rng.integers(BABBLE_TALKERS[0], BABBLE_TALKERS[1] + 1))):
        clip = bank[int(rng.integers(len(bank)))][::-1]
        start = int(rng.integers(len(clip)))
        talker = np.resize(np.roll(clip, -start), n)
        out += talker / math.sqrt(max(_power(talker), EPS))
    return out.astype(np.float32)


def add_noise(audio: np.ndarray, kind: str, snr_db: float, seed: int, bank: Sequence[np.ndarray] = ()) -> np.ndarray:
    """audio + noise scaled to snr_db below the clip's power."""
    rng = np.random.default_rng(seed)
    if kind == "babble":
        if not bank:
            raise AugmentError("babble noise needs clips to make it from (an empty bank)")
        noise = babble(len(audio), bank, rng)
    elif kind in NOISE_EXPONENTS:
        noise = coloured_noise(len(audio), NOISE_EXPONENTS[kind], rng)
    else:
        raise AugmentError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")
    scale = math.sqrt(_power(audio) / max(_power(noise), EPS) / 10.0 ** (snr_db / 10))
    return (audio + scale * noise).astype(np.float32)


def loudness(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """audio x gain, the gain cut so that the peak stays at PEAK_LIMIT at most."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    gain = 10.0 ** (gain_db / 20)
    if peak * gain > PEAK_LIMIT:
        gain = PEAK_LIMIT / peak
    return (audio * gain).astype(np.float32)


def band_limit(audio: np.ndarray, kind: str) -> np.ndarray:
    """telephone: 300-3400 Hz band-pass, then through 8 kHz; narrowband: through 8 kHz (nothing above 4 kHz)."""
    if kind not in BAND_KINDS:
        raise AugmentError(f"unknown band {kind!r}; choose from {BAND_KINDS}")
    out = audio
    if kind == "telephone":
        from scipy.signal import butter, sosfiltfilt

        sos = butter(BAND_FILTER_ORDER, TELEPHONE_BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos")
        out = sosfiltfilt(sos, audio).astype(np.float32)
    narrow = resample(out, SAMPLE_RATE, NARROWBAND_RATE)
    return _fit_length(resample(narrow, NARROWBAND_RATE, SAMPLE_RATE), len(audio))


def codec(audio: np.ndarray, name: str, bitrate: int) -> np.ndarray:
    """An encode-decode round trip (opus in ogg, or mp3) at `bitrate` bit/s; same length (PyAV trims the
    encoder's delay)."""
    import av

    if name not in CODEC_FORMATS:
        raise AugmentError(f"unknown codec {name!r}; choose from {tuple(CODEC_FORMATS)}")
    container, encoder = CODEC_FORMATS[name]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(encoder, rate=SAMPLE_RATE)
        stream.bit_rate, stream.layout = int(bitrate), "mono"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, dtype=np.float32)[None, :], format="flt",
                                           layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        to_encoder = av.AudioResampler(format=stream.format.name, layout="mono", rate=SAMPLE_RATE)
        for piece in [*to_encoder.resample(frame), *to_encoder.resample(None), None]:
            for packet in stream.encode(piece):
                out.mux(packet)
    with av.open(io.BytesIO(buffer.getvalue())) as decoded:
        from_decoder = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pieces = [f for frame in decoded.decode(audio=0) for f in from_decoder.resample(frame)]
        pieces += from_decoder.resample(None)
    out_audio = np.concatenate([p.to_ndarray().reshape(-1) for p in pieces]) if pieces else np.zeros(0, np.float32)
    return _fit_length(out_audio.astype(np.float32), len(audio))


# --- drawing parameters: rng -> parameters ---------------------------------------------------------------
def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**SEED_BITS))


DRAWS: dict[str, Callable[[np.random.Generator], dict]] = {
    "speed": lambda rng: {"factor": float(rng.choice(SPEED_FACTORS))},
    "tempo": lambda rng: {"factor": round(float(rng.uniform(*TEMPO_RANGE)), 3)},
    "pitch": lambda rng: {"cents": int(rng.integers(PITCH_CENTS_RANGE[0], PITCH_CENTS_RANGE[1] + 1))},
    "vtlp": lambda rng: {"warp": round(float(rng.uniform(*VTLP_WARP_RANGE)), 3)},
    "reverb": lambda rng: {"rt60_s": round(float(rng.uniform(*REVERB_RT60_RANGE)), 3),
                           "drr_db": round(float(rng.uniform(*REVERB_DRR_DB_RANGE)), 1), "seed": _seed(rng)},
    "noise": lambda rng: {"kind": str(rng.choice(NOISE_KINDS)),
                          "snr_db": round(float(rng.uniform(*NOISE_SNR_DB_RANGE)), 1),
                          "seed": _seed(rng)},
    "loudness": lambda rng: {"gain_db": round(float(rng.uniform(*GAIN_DB_RANGE)), 2)},
    "band_limit": lambda rng: {"kind": str(rng.choice(BAND_KINDS))},
    "codec": lambda rng: (lambda name: {"name": name, "bitrate": int(rng.choice(CODEC_BITRATES[name]))})(
        str(rng.choice(sorted(CODEC_FORMATS)))),
}
APPLY: dict[str, Callable[..., np.ndarray]] = {
    "speed": speed, "tempo": tempo, "pitch": pitch, "vtlp": vtlp, "reverb": reverb, "noise": add_noise,
    "loudness": loudness, "band_limit": band_limit, "codec": codec,
}


@dataclass(frozen=True)
class Effect:
    """One augmentation: parameters drawn from its ranges, then applied. `effect(audio, rng)` does both."""

    name: str
    draw: Callable[[np.random.Generator], dict]
    apply: Callable[..., np.ndarray]

    def __call__(self, audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(audio, **self.draw(rng))


def _draw_generated_noise(rng: np.random.Generator) -> dict:
    return {"kind": str(rng.choice([k for k in NOISE_KINDS if k != "babble"])),
            "snr_db": round(float(rng.uniform(*NOISE_SNR_DB_RANGE)), 1), "seed": _seed(rng)}


def effects(bank: Sequence[np.ndarray] = ()) -> dict[str, Effect]:
    """Every effect; noise makes its babble from `bank` (without one it draws only generated noise)."""
    out = {name: Effect(name, DRAWS[name], APPLY[name]) for name in EFFECT_ORDER}
    bank = tuple(bank)
    if bank:
        out["noise"] = Effect("noise", DRAWS["noise"], functools.partial(add_noise, bank=bank))
    else:
        out["noise"] = Effect("noise", _draw_generated_noise, add_noise)
    return out


def parse_effects(text: str | None) -> dict[str, float]:
    """"speed,noise=0.8" -> {"speed": DEFAULT_PROBABILITY["speed"], "noise": 0.8}; None -> all defaults."""
    if text is None:
        return dict(DEFAULT_PROBABILITY)
    chosen = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in DEFAULT_PROBABILITY:
            raise AugmentError(f"unknown effect {name!r}; choose from {', '.join(EFFECT_ORDER)}")
        try:
            probability = float(value) if value else DEFAULT_PROBABILITY[name]
        except ValueError:
            raise AugmentError(f"effect {name}: probability {value!r} is not a number") from None
        if not 0.0 <= probability <= 1.0:
            raise AugmentError(f"effect {name}: probability {probability} is outside 0..1")
        chosen[name] = probability
    if not any(chosen.values()):
        raise AugmentError("--effects leaves no effect with a probability above 0")
    return chosen


def draw_chain(rng: np.random.Generator, probabilities: dict[str, float], table: dict[str, Effect]) -> list[dict]:
    """The effects of one copy in EFFECT_ORDER, each drawn with its probability (at least one: when none is,
    one is picked in proportion to the probabilities), with their parameters."""
    names = [n for n in EFFECT_ORDER if n in probabilities and rng.random() < probabilities[n]]
    if not names:
        candidates = [n for n in EFFECT_ORDER if probabilities.get(n, 0) > 0]
        weights = np.array([probabilities[n] for n in candidates])
        names = [candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]]
    return [{"effect": name, **table[name].draw(rng)} for name in names]


def apply_chain(audio: np.ndarray, chain: Sequence[dict], table: dict[str, Effect]) -> np.ndarray:
    for step in chain:
        params = {k: v for k, v in step.items() if k != "effect"}
        audio = table[step["effect"]].apply(audio, **params)
        if not np.all(np.isfinite(audio)):
            raise AugmentError(f"{step['effect']} made non-finite samples")
    return audio


# --- the corpus --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input clip and its pending copies."""

    id: str
    line: int
    audio: str
    record: dict
    copies: tuple[int, ...]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def copy_id(source_id: str, k: int) -> str:
    return f"{_safe(source_id)}-aug{k}"


def copy_wav(out_dir: Path, cid: str) -> Path:
    return out_dir / "wav" / hashlib.sha1(cid.encode()).hexdigest()[:2] / f"{cid}.wav"


def copy_rng(seed: int, source_id: str, k: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{source_id}:{k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def read_sources(manifest: Path) -> list[tuple[int, dict, str]]:
    """(line number, record, absolute audio path) of every line; refuses lines without audio, duplicate
    ids and missing files, naming them."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise AugmentError(f"manifest not found: {manifest}")
    rows, seen, missing = [], set(), []
    try:
        lines = list(numbered_lines(manifest))
    except ValueError as err:
        raise AugmentError(str(err)) from None
    for number, record in lines:
        if not isinstance(record, dict) or not record.get("audio"):
            raise AugmentError(f"{manifest}:{number}: no \"audio\" field")
        path = resolve_audio(manifest, record["audio"])
        record = dict(record, id=str(record.get("id") or hashlib.sha1(str(path).encode()).hexdigest()[:12]))
        if _safe(record["id"]) in seen:  # the copies' file names are made from the ids
            raise AugmentError(f"{manifest}:{number}: id {record['id']!r} appears twice (or differs from another "
                               "only in characters a file name cannot hold)")
        seen.add(_safe(record["id"]))
        if not path.is_file():
            missing.append(f"line {number}: {path}")
        rows.append((number, record, str(path)))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AugmentError(f"{len(missing)} audio file(s) of {manifest} not found: {shown}")
    if not rows:
        raise AugmentError(f"{manifest} has no clips")
    return rows


def load_clip(path: str) -> np.ndarray:
    """A source clip as 16 kHz mono float; blsp_chat.audio refuses undecodable, empty and silent ones."""

    try:
        return load_audio(path, max_seconds=None)
    except AudioError as err:
        raise AugmentError(f"{path}: {err}") from None


def babble_bank(rows: Sequence[tuple[int, dict, str]], seed: int,
                size: int = BABBLE_BANK_CLIPS) -> tuple[list[str], list[np.ndarray]]:
    """(ids, audio) of up to `size` clips of the manifest, ranked by a seeded hash of their ids (clips that
    fail to load are passed over)."""
    ranked = sorted(rows, key=lambda row: hashlib.sha256(f"{seed}:babble:{row[1]['id']}".encode()).digest())
    ids, clips = [], []
    for _, record, path in ranked:
        if len(clips) == size:
            break
        try:
            clips.append(load_clip(path))
            ids.append(record["id"])
        except AugmentError:
            continue
    return ids, clips


# Set by augment() before the workers fork (they inherit them).
_TABLE: dict[str, Effect] = {}
_SETTINGS: dict = {}


def augment_source(source: Source) -> list[dict]:
    """The pending copies of one clip, each written atomically; manifest records, or {"id", "error"}."""
    out_dir, seed, probabilities = _SETTINGS["out_dir"], _SETTINGS["seed"], _SETTINGS["probabilities"]
    try:
        audio = load_clip(source.audio)
    except AugmentError as err:
        return [{"id": copy_id(source.id, k), "source_id": source.id, "line": source.line, "error": str(err)}
                for k in source.copies]
    records = []
    for k in source.copies:
        cid = copy_id(source.id, k)
        try:
            chain = draw_chain(copy_rng(seed, source.id, k), probabilities, _TABLE)
            out = apply_chain(audio, chain, _TABLE)
            peak = float(np.max(np.abs(out))) if out.size else 0.0
            if peak > PEAK_LIMIT:  # reverb or noise may have pushed it over: scale, never clip
                out = out * (PEAK_LIMIT / peak)
            if out.size == 0:
                raise AugmentError("the chain left no samples")
            wav = copy_wav(out_dir, cid)
            wav.parent.mkdir(parents=True, exist_ok=True)
            partial = wav.with_name(wav.stem + ".partial.wav")
            sf.write(str(partial), out, SAMPLE_RATE, subtype="PCM_16")
            os.replace(partial, wav)
            records.append({**source.record, "id": cid, "audio": str(wav), "duration": round(len(out) / SAMPLE_RATE, 3),
                            "source_id": source.id, "augment": chain, "augment_seed": seed})
        except (AugmentError, OSError, RuntimeError, ValueError) as err:
            records.append({"id": cid, "source_id": source.id, "line": source.line,
                            "error": f"{type(err).__name__}: {err}"})
    return records


def augment(manifest: Path, out_dir: Path, *, copies: int, seed: int, probabilities: dict[str, float] | None = None,
            jobs: int = 1, limit: int | None = None) -> dict:
    """K copies of every clip of `manifest` under out_dir (resuming what a previous run left); returns a
    summary. `limit` stops after that many source clips (for tests of resuming)."""
    if copies < 1:
        raise AugmentError(f"--copies must be at least 1, got {copies}")
    probabilities = parse_effects(None) if probabilities is None else dict(probabilities)
    unknown = sorted(set(probabilities) - set(EFFECT_ORDER))
    if unknown:
        raise AugmentError(f"unknown effect(s) {unknown}; choose from {', '.join(EFFECT_ORDER)}")
    rows = read_sources(Path(manifest))
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    bank_ids, bank = babble_bank(rows, seed) if probabilities.get("noise", 0) > 0 else ([], [])
    check_config(out_dir, {"manifest_sha1": hashlib.sha1(Path(manifest).read_bytes()).hexdigest(), "copies": copies,
                           "seed": seed, "effects": probabilities, "babble_bank": bank_ids})
    _TABLE.clear()
    _TABLE.update(effects(bank))
    _SETTINGS.update(out_dir=out_dir, seed=seed, probabilities=probabilities)

    repair_tail(out_dir / MANIFEST)
    done = done_records(out_dir)
    plan = [(number, record, path, [copy_id(record["id"], k) for k in range(copies)]) for number, record, path in rows]
    sources = [Source(record["id"], number, path, record, tuple(k for k, cid in enumerate(cids) if cid not in done))
               for number, record, path, cids in plan]
    sources = [s for s in sources if s.copies][:limit]
    failures: list[dict] = []
    started = time.perf_counter()
    made = 0
    with open(out_dir / MANIFEST, "a", encoding="utf-8") as handle:
        for records in parallel_map(augment_source, sources, jobs):
            for record in records:
                if "error" in record:
                    failures.append(record)
                else:
                    append_line(handle, record)
                    done[record["id"]] = record
                    made += 1
    elapsed = time.perf_counter() - started
    write_jsonl_atomic(out_dir / "failures.jsonl", failures)
    order = [cid for *_, cids in plan for cid in cids]
    complete = all(cid in done for cid in order)
    if complete:
        write_jsonl_atomic(out_dir / MANIFEST, (done[cid] for cid in order))
    kept = [done[cid] for cid in order if cid in done]
    summary = {"sources": len(rows), "copies": len(kept), "planned": len(order), "complete": complete,
               "failed": len(failures), "made_this_run": made, "seconds_this_run": round(elapsed, 1),
               "hours": round(sum(r["duration"] for r in kept) / 3600, 3),
               "effects": {n: sum(any(s["effect"] == n for s in r["augment"]) for r in kept) for n in EFFECT_ORDER},
               "babble_bank": len(bank_ids)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.augment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="JSON lines with \"audio\" (and \"id\", \"text\", ...)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--copies", type=int, required=True, help="augmented copies of each clip")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--effects", default=None,
                        help=f"comma-separated NAME or NAME=PROBABILITY from {','.join(EFFECT_ORDER)} (default: all, "
                             "with the probabilities of DEFAULT_PROBABILITY)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    try:
        summary = augment(Path(args.manifest), Path(args.out_dir), copies=args.copies, seed=args.seed,
                          probabilities=parse_effects(args.effects), jobs=args.jobs)
    except AugmentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        failures = read_jsonl_tolerant(Path(args.out_dir) / "failures.jsonl")
        for failure in failures[:5]:
            print(f"failed: {failure['id']} (manifest line {failure.get('line')}): {failure['error']}", file=sys.stderr)
        print(f"{summary['failed']} copies failed: see {Path(args.out_dir) / 'failures.jsonl'}", file=sys.stderr)
    return 0 if summary["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
