"""Audio out: float32 samples -> the bytes of a file in one of OpenAI's audio response formats.

    data = encode_audio(samples, 24000, "mp3")     # bytes of an MP3 file
    MEDIA_TYPES["mp3"]                             # "audio/mpeg"

`audio.py` reads any file into samples; this is the other direction, for the server's spoken replies and
`/v1/audio/speech`. WAV is written by libsndfile; the compressed formats by FFmpeg's encoders inside PyAV's
wheel (libmp3lame, libopus, its native AAC and FLAC); `pcm` is OpenAI's raw format, bare signed 16-bit
little-endian samples with no header.
"""
from __future__ import annotations

import io

import numpy as np

INT16_SCALE = 32767
# format -> (PyAV container, FFmpeg encoder); formats absent here are written without PyAV.
AV_ENCODERS = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),   # OpenAI's opus is Ogg-wrapped
    "aac": ("adts", "aac"),       # ADTS, the stream of AAC frames a .aac file holds
    "flac": ("flac", "flac"),
}
FORMATS = ("wav", "pcm", *AV_ENCODERS)
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "aac": "audio/aac", "flac": "audio/flac"}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libopus encodes


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16; samples past full scale are clipped (a voice's output stays within it)."""
    return (np.clip(samples, -1.0, 1.0) * INT16_SCALE).round().astype("<i2")


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """(n,) float32 mono at sample_rate -> the bytes of a `fmt` file (one of FORMATS)."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if fmt == "pcm":
        return to_int16(samples).tobytes()
    if fmt == "wav":
        return _encode_wav(samples, sample_rate)
    if fmt not in AV_ENCODERS:
        raise ValueError(f"unknown audio format {fmt!r}; choose from {FORMATS}")
    if fmt == "opus" and sample_rate not in OPUS_RATES:
        raise ValueError(f"opus encodes only at {OPUS_RATES} Hz, got {sample_rate}")
    return _encode_av(samples, sample_rate, *AV_ENCODERS[fmt])


def _encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, samples, sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _encode_av(samples: np.ndarray, sample_rate: int, container_format: str, codec: str) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(to_int16(samples)[None, :], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        # The stream converts the frame to its encoder's sample format and frame size; None flushes it.
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)
    return out.getvalue()
