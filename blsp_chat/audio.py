"""Audio front end: any file, encoded bytes or array -> mono float32 at 16 kHz, checked, split into windows.

Pure I/O and signal code (no model, no UI). Every rejection is an `AudioError` whose message is written
for the person in the chat window: what is wrong and what to do about it.

Decoding: soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3) first; containers it cannot open
(M4A/MP4/AAC, WebM/Matroska from browsers) go to PyAV, an optional dependency (`pip install av`) whose
wheel bundles FFmpeg. Resampling: soxr (a declared dependency; librosa.resample's default too).

Work is bounded by duration before anything is decoded whole (a few kilobytes of FLAC can hold ten minutes of
8-channel 96 kHz silence, gigabytes once decoded): a header that states the length is checked first, a
stream that does not state it (a FLAC without its length, WebM) is decoded only until it passes the limit,
and every block is mixed to mono as it is read, so memory grows with the kept duration, not the channels.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from .constants import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE

# Four Whisper windows. Whisper's encoder gives one frame per 20 ms and the adapter's three stride-2
# convs make that one LLM position per 160 ms, so 120 s is 750 positions: room is left in a small LLM's
# context for the conversation, and the wait stays acceptable in a demo.
DEFAULT_MAX_AUDIO_SECONDS = 4 * CHUNK_LENGTH          # 120 s
# Shorter than a syllable (~100-200 ms): a mis-click on the record button, not speech.
MIN_AUDIO_SECONDS = 0.1
MIN_SAMPLES = round(MIN_AUDIO_SECONDS * SAMPLE_RATE)  # 1600 samples
# RMS below this is a muted or unplugged microphone: 20*log10(1e-4) = -80 dBFS, under 16-bit dither
# (+-1 LSB is about -90 dBFS) is still caught while the quietest real speech (~-60 dBFS) passes.
SILENCE_RMS_FLOOR = 1e-4
SILENCE_FLOOR_DBFS = 20 * math.log10(SILENCE_RMS_FLOOR)  # -80.0
# More channels than this on the short axis of a 2-D array means it is not (samples, channels)
# audio but e.g. a batch of clips; 32 covers microphone arrays.
MAX_CHANNELS = 32
RESAMPLE_QUALITY = "HQ"  # soxr's high quality; the same as librosa.resample's default "soxr_hq"

# Named in messages about unreadable files, without and with PyAV.
SOUNDFILE_FORMATS = "WAV, FLAC, OGG or MP3 file (M4A and WebM need `pip install av`)"
ALL_FORMATS = "WAV, FLAC, OGG, MP3, M4A or WebM file"
# Containers libsndfile cannot open, by file suffix and by magic bytes: these need PyAV.
_PYAV_ONLY_SUFFIXES = {".m4a": "M4A", ".mp4": "MP4", ".aac": "AAC", ".webm": "WebM",
                       ".mkv": "Matroska", ".wma": "WMA", ".amr": "AMR"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM / Matroska
_MP4_BRAND_OFFSET = slice(4, 8)    # ISO-BMFF files (M4A, MP4) carry "ftyp" at bytes 4-8
_HEAD_BYTES = 16
# soundfile reads this many seconds at a time, each block mixed to mono before the next is read.
DECODE_BLOCK_SECONDS = 10
# libsndfile's frame count for a stream whose header does not state its length (SF_COUNT_MAX).
UNKNOWN_FRAMES = 2**63 - 1


class AudioError(ValueError):
    """Unusable audio. The message is shown to end users: it says what is wrong and what to do."""


class AudioTooLongError(AudioError):
    """Audio over the length limit, known from its header or from decoding up to the limit (`seconds` is then
    how far decoding got)."""

    def __init__(self, seconds: float, max_seconds: float):
        super().__init__(f"The audio is {seconds:.1f} s long, over the limit of {max_seconds:g} s. "
                         "Trim it or send a shorter clip.")
        self.seconds, self.max_seconds = seconds, max_seconds


def load_audio(source, *, max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode and check audio; returns (n_samples,) float32, mono, SAMPLE_RATE Hz, within [-1, 1].

    source: a file path (str/PathLike); bytes of an encoded file; a (sample_rate, array) tuple as
    Gradio's gr.Audio(type="numpy") gives (int or float samples, shape (n,) or (n, channels));
    or an array of shape (n,), (n, channels) or (channels, n) already at SAMPLE_RATE.
    max_seconds: reject longer audio; None for no limit.
    """
    _check_max_seconds(max_seconds)
    sample_rate, samples = _read_source(source, max_seconds)
    mono = _to_mono(_to_float(samples))
    # Checked before resampling: a NaN would smear over the filter length, and a too-long clip is
    # rejected without spending time on it.
    _check_finite(mono)
    _check_duration(len(mono) / sample_rate, max_seconds)
    audio = _limit_peak(resample(mono, sample_rate))
    return validate_audio(audio, max_seconds=max_seconds)


def validate_audio(audio: np.ndarray, *,
                   max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS) -> np.ndarray:
    """Check (n_samples,) float audio at SAMPLE_RATE; returns it as contiguous float32.

    Raises AudioError if it has NaN/inf samples, is empty or shorter than MIN_AUDIO_SECONDS, is longer
    than max_seconds (None: no limit), or is silent (RMS below SILENCE_RMS_FLOOR).
    """
    _check_max_seconds(max_seconds)
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.dtype.kind != "f":
        raise AudioError(f"Expected mono floating-point audio of shape (samples,), got shape "
                         f"{audio.shape} of {audio.dtype}. Use load_audio() to convert it.")
    _check_finite(audio)
    _check_length(audio)
    _check_duration(len(audio) / SAMPLE_RATE, max_seconds)
    _check_not_silent(audio)
    return np.ascontiguousarray(audio, dtype=np.float32)


def split_into_windows(audio: np.ndarray, window_samples: int = N_SAMPLES) -> list[np.ndarray]:
    """Cut (n_samples,) audio into consecutive windows of window_samples (views, in order).

    Whisper hears at most 30 s at once; the model encodes each window and concatenates the adapter
    outputs. Every sample lands in exactly one window; the last window is the remainder (shorter,
    possibly very short); audio of one window or less comes back as one window, empty audio as [].
    """
    if window_samples <= 0:
        raise ValueError(f"window_samples must be positive, got {window_samples}")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"expected audio of shape (samples,), got {audio.shape}")
    return [audio[start:start + window_samples] for start in range(0, len(audio), window_samples)]


def decode_mono(source, *, max_seconds: float | None) -> tuple[int, np.ndarray]:
    """A file, bytes or (rate, array) pair -> (its sample rate, (n,) float32 mono), decoded no further than
    `max_seconds` (AudioTooLongError past it) and not resampled or otherwise checked: for callers that take
    any rate, such as the live microphone's voice detector."""
    _check_max_seconds(max_seconds)
    sample_rate, samples = _read_source(source, max_seconds)
    mono = _to_mono(_to_float(samples))
    _check_duration(len(mono) / sample_rate, max_seconds)
    return sample_rate, mono


def audio_duration(audio) -> float:
    """Seconds of audio: an array at SAMPLE_RATE ((n,), (n, ch) or (ch, n)) or a (sample_rate, array) tuple."""
    sample_rate = SAMPLE_RATE
    if isinstance(audio, tuple):
        sample_rate, audio = _unpack_tuple(audio)
    return _num_samples(np.asarray(audio)) / sample_rate


# --- sources ------------------------------------------------------------------------------------

def _read_source(source, max_seconds):
    """-> (sample_rate, samples as (n,) or 2-D array of any dtype)."""
    if source is None:
        raise AudioError("No audio was received. Record or upload a clip, then send it again.")
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(Path(source), max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), max_seconds)
    if isinstance(source, tuple):
        return _unpack_tuple(source)
    if isinstance(source, np.ndarray):
        return SAMPLE_RATE, source
    raise TypeError("load_audio() takes a file path, bytes, a (sample_rate, array) tuple or a numpy "
                    f"array, not {type(source).__name__}")


def _unpack_tuple(pair):
    """Gradio's (sample_rate, samples) pair -> (int sample_rate, array)."""
    if len(pair) != 2:
        raise AudioError(f"Expected audio as (sample_rate, samples), got a tuple of {len(pair)} items.")
    sample_rate, samples = pair
    if not isinstance(sample_rate, (int, np.integer, float, np.floating)) or sample_rate <= 0:
        raise AudioError(f"Invalid sample rate {sample_rate!r}: expected a positive number of Hz "
                         "in a (sample_rate, samples) pair.")
    if sample_rate != int(sample_rate):
        raise AudioError(f"Invalid sample rate {sample_rate!r}: expected a whole number of Hz.")
    return int(sample_rate), np.asarray(samples)


def _decode_file(path: Path, max_seconds):
    if not path.exists():
        raise AudioError(f"Audio file not found: '{path}'. Check the path, or upload the file again.")
    if not path.is_file():
        raise AudioError(f"'{path}' is a folder, not an audio file. Choose an audio file instead.")
    label = f"the file '{path.name}'"
    if path.stat().st_size == 0:
        raise AudioError(f"Could not read {label}: it is empty (0 bytes). Upload or record it again.")
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    return _decode(str(path), label, _pyav_format_name(head, path.suffix), max_seconds)


def _decode_bytes(data: bytes, max_seconds):
    label = "the uploaded audio"
    if not data:
        raise AudioError(f"Could not read {label}: it is empty (0 bytes). Upload or record it again.")
    return _decode(io.BytesIO(data), label, _pyav_format_name(data[:_HEAD_BYTES], ""), max_seconds)


def _pyav_format_name(head: bytes, suffix: str) -> str | None:
    """Name of a container only PyAV can open, from magic bytes or the suffix; None if not one."""
    if head[_MP4_BRAND_OFFSET] == b"ftyp":
        return "M4A/MP4"
    if head.startswith(_EBML_MAGIC):
        return "WebM"
    return _PYAV_ONLY_SUFFIXES.get(suffix.lower())


# --- decoders -----------------------------------------------------------------------------------

def _decode(src, label: str, pyav_format: str | None, max_seconds):
    """Try soundfile, then PyAV; -> (sample_rate, (n, channels) float32)."""
    try:
        return _decode_soundfile(src, max_seconds)
    except (sf.SoundFileError, RuntimeError) as error:
        soundfile_error = error  # chained below, for logs; the user gets a plain message
    av = _import_pyav()
    if av is None:
        if pyav_format:
            raise AudioError(f"Could not decode {label}: {pyav_format} audio needs the PyAV decoder, "
                             "which is not installed (`pip install av` adds it). Or convert the file "
                             "to WAV, FLAC, OGG or MP3.") from soundfile_error
        raise _unreadable(label, SOUNDFILE_FORMATS) from soundfile_error
    if isinstance(src, io.BytesIO):
        src.seek(0)  # soundfile has read part of it
    try:
        return _decode_pyav(av, src, label, max_seconds)
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, IndexError, RuntimeError) as error:
        raise _unreadable(label, ALL_FORMATS) from error


def _unreadable(label: str, formats: str) -> AudioError:
    return AudioError(f"Could not read {label}: it is not an audio file, or it is damaged. "
                      f"Send a {formats}.")


def _decode_soundfile(src, max_seconds):
    """-> (sample_rate, (n, 1) mono float32), read block by block and refused from its header when too long."""
    with sf.SoundFile(src) as f:
        if f.frames >= UNKNOWN_FRAMES:  # no stated length: PyAV decodes it, stopping at the limit
            raise sf.SoundFileError("the stream does not state its length")
        _check_channels(f.channels)
        _check_duration(f.frames / f.samplerate, max_seconds)  # from the header: before decoding anything
        blocks, n_frames, block = [], 0, DECODE_BLOCK_SECONDS * f.samplerate
        while n_frames < f.frames:
            data = f.read(frames=min(block, f.frames - n_frames), dtype="float32", always_2d=True)
            if not len(data):
                break
            n_frames += len(data)
            _check_duration(n_frames / f.samplerate, max_seconds)  # a header that understated the length
            blocks.append(_mix_block(data))
        return f.samplerate, _joined(blocks)


def _mix_block(block: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,) float32, the mean over channels (as _to_mono mixes whole arrays)."""
    return block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]


def _joined(blocks: list[np.ndarray]) -> np.ndarray:
    """Mono blocks -> (n, 1) float32."""
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32))[:, None]


def _import_pyav():
    """The optional PyAV module, or None when it is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


def _decode_pyav(av, src, label: str, max_seconds):
    with av.open(src, mode="r") as container:
        if not container.streams.audio:
            raise AudioError(f"Could not read {label}: it has no audio track. Send a file with sound.")
        stream = container.streams.audio[0]
        chunks, n_samples, sample_rate = [], 0, stream.rate
        # Closed inside `with`: a decoder left suspended past its container's close would read freed memory.
        with contextlib.closing(_pyav_mono_chunks(av, container, stream)) as decoded:
            for sample_rate, chunk in decoded:
                chunks.append(chunk)
                n_samples += len(chunk)
                # Streamed formats (WebM, a FLAC without its length) may not state it: stop once it is too long.
                _check_duration(n_samples / sample_rate, max_seconds)
    return sample_rate or SAMPLE_RATE, _joined(chunks)


def _pyav_mono_chunks(av, container, stream) -> Iterator[tuple[int, np.ndarray]]:
    """(sample rate, (n,) float32 mono) per decoded frame, mixed at once so that a many-channel stream costs what
    a mono one does. Packed float ("flt", channels interleaved): PyAV 18's to_ndarray() of planar audio with 8
    channels crashes the process."""
    resampler = av.AudioResampler(format="flt")
    rate = stream.rate
    for frame in container.decode(stream):
        rate = frame.sample_rate
        _check_channels(len(frame.layout.channels))
        for out in resampler.resample(frame):
            yield rate, _mix_block(_interleaved(out))
    for out in resampler.resample(None):
        yield rate, _mix_block(_interleaved(out))


def _interleaved(frame) -> np.ndarray:
    """A packed audio frame -> (n, channels)."""
    return frame.to_ndarray().reshape(-1, len(frame.layout.channels))


# --- signal -------------------------------------------------------------------------------------

def _to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1): signed / 2**(bits-1), unsigned centred first (uint8 WAV)."""
    x = np.asarray(samples)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu":
        half_scale = 2.0 ** (8 * x.dtype.itemsize - 1)  # int16: 32768, int32: 2**31, uint8: 128
        offset = half_scale if x.dtype.kind == "u" else 0.0
        return ((x.astype(np.float64) - offset) / half_scale).astype(np.float32)
    raise AudioError(f"Unsupported sample type {x.dtype}: expected integer PCM or floating-point samples.")


def _to_mono(x: np.ndarray) -> np.ndarray:
    """(n,), (n, channels) or (channels, n) -> (n,) by averaging the channels."""
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise AudioError(f"Expected audio shaped (samples,) or (samples, channels), got {x.shape}.")
    if x.size == 0:
        return np.zeros(0, np.float32)
    # Channels are the short axis; on a tie use Gradio's and soundfile's (samples, channels).
    channel_axis = 1 if x.shape[1] <= x.shape[0] else 0
    _check_channels(x.shape[channel_axis], f"Audio of shape {x.shape}")
    return x.mean(axis=channel_axis, dtype=np.float32)


def _num_samples(x: np.ndarray) -> int:
    if x.size == 0:
        return 0
    return len(x) if x.ndim == 1 else max(x.shape)  # samples are the long axis, as in _to_mono


def resample(x: np.ndarray, rate_in: float, rate_out: float = SAMPLE_RATE) -> np.ndarray:
    """float32 audio (samples on the first axis) from rate_in to rate_out Hz, with soxr's high quality."""
    if rate_in == rate_out or x.size == 0:
        return x
    return soxr.resample(x, rate_in, rate_out, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def _limit_peak(x: np.ndarray) -> np.ndarray:
    """Scale down audio that exceeds full scale (resampler overshoot, loud float input).

    Scaling instead of clipping keeps the waveform: clipping float samples of int16 size would turn
    speech into a square wave.
    """
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return x / np.float32(peak) if peak > 1.0 else x


# --- checks -------------------------------------------------------------------------------------

def _check_max_seconds(max_seconds):
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")


def _check_channels(channels: int, what: str = "The audio"):
    if channels > MAX_CHANNELS:
        raise AudioError(f"{what} has {channels} channels (at most {MAX_CHANNELS} supported): it looks like "
                         "several clips; send one at a time.")


def _check_finite(x: np.ndarray):
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise AudioError(f"The audio contains {bad} invalid samples (NaN or infinity), so it is "
                         "corrupt. Export the file again or record a new clip.")


def _check_length(x: np.ndarray):
    if len(x) == 0:
        raise AudioError("The audio is empty: it contains no samples. Check that the microphone is "
                         "working and record again, or upload a different file.")
    if len(x) < MIN_SAMPLES:
        raise AudioError(f"The audio is too short ({1000 * len(x) / SAMPLE_RATE:.0f} ms); at least "
                         f"{MIN_AUDIO_SECONDS:g} s is needed. Record a longer clip.")


def _check_duration(seconds: float, max_seconds):
    # Half a sample of slack: resampling may round the length up by one sample.
    if max_seconds is not None and seconds > max_seconds + 0.5 / SAMPLE_RATE:
        raise AudioTooLongError(seconds, max_seconds)


def _check_not_silent(x: np.ndarray):
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms == 0.0:
        raise AudioError("The audio is completely silent (every sample is zero). Check that the "
                         "microphone is on and not muted, then record again.")
    if rms < SILENCE_RMS_FLOOR:
        raise AudioError(f"The audio is silent: its level is {20 * math.log10(rms):.0f} dBFS, below "
                         f"the {SILENCE_FLOOR_DBFS:.0f} dBFS floor. Check that the microphone is on "
                         "and not muted, move closer, then record again.")
