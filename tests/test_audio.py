"""Tests of the audio front end on real speech (espeak-ng) in real formats (sox, soundfile, PyAV).

Tools a test needs and does not find make it skip with the reason: apt-get install espeak-ng sox
libsox-fmt-all; pip install av (M4A/WebM).
"""

import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.audio import (
    DEFAULT_MAX_AUDIO_SECONDS,
    MIN_SAMPLES,
    SILENCE_RMS_FLOOR,
    AudioError,
    audio_duration,
    load_audio,
    split_into_windows,
    validate_audio,
)
from blsp_chat.constants import N_SAMPLES, SAMPLE_RATE

# About 8 s, a typical spoken turn.
SENTENCE = ("The quick brown fox jumps over the lazy dog, and then it goes to sleep. "
            "Tomorrow morning we will walk along the river and count the boats.")
ENVELOPE_HOP = 320  # 20 ms at 16 kHz: loudness envelope frames, robust to codec noise and filtering
MAX_CODEC_DELAY_FRAMES = 5  # 100 ms: MP3 encoder delay is ~50 ms, AAC/Opus priming less
# What an MP3 without a LAME tag keeps: encoder + decoder delay (576 + 529 samples) plus end padding
# of at most one MPEG-1 frame (1152 samples); at 22050 Hz about 102 ms.
MP3_DELAY_AND_PADDING = 576 + 529 + 1152


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install espeak-ng sox libsox-fmt-all)")


def _run(*args):
    subprocess.run(args, check=True, capture_output=True)


def _sine(freq, rate, seconds, amplitude=0.5):
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _envelope(audio):
    n = len(audio) // ENVELOPE_HOP
    frames = audio[: n * ENVELOPE_HOP].reshape(n, ENVELOPE_HOP)
    return np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))


def _envelope_similarity(decoded, expected):
    """Best correlation of the loudness envelopes over lags up to the codec delay (decoded later)."""
    ed, ee = _envelope(decoded), _envelope(expected)
    best = -1.0
    for lag in range(MAX_CODEC_DELAY_FRAMES + 1):
        n = min(len(ed) - lag, len(ee))
        best = max(best, float(np.corrcoef(ed[lag:lag + n], ee[:n])[0, 1]))
    return best


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    """espeak-ng speech: 22050 Hz int16 mono WAV, the reference everything else is made from."""
    _need("espeak-ng")
    folder = tmp_path_factory.mktemp("speech")
    _run("espeak-ng", "-w", str(folder / "speech.wav"), SENTENCE)
    return folder


@pytest.fixture(scope="module")
def reference(speech_dir):
    """(samples at 22050 Hz as float, the duration in seconds) of the espeak-ng clip."""
    data, rate = sf.read(speech_dir / "speech.wav", dtype="float32")
    assert rate == 22050 and data.ndim == 1
    return data, len(data) / rate


def _sox_convert(speech_dir, name, options=(), effects=()):
    _need("sox")
    out = speech_dir / name
    _run("sox", str(speech_dir / "speech.wav"), *options, str(out), *effects)
    return out


def _encode_with_av(path, audio, rate, container_format, codec):
    """Encode as a browser would; pts 0 lets the muxer record the encoder's priming for trimming."""
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _check_output(audio, seconds):
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert audio.flags.c_contiguous
    assert np.all(np.abs(audio) <= 1.0)
    assert audio_duration(audio) == pytest.approx(seconds, rel=0.01)
    assert len(audio) == pytest.approx(seconds * SAMPLE_RATE, rel=0.01)


# --- formats, rates, channels -------------------------------------------------------------------

def _make(kind, speech_dir, reference):
    data, _ = reference
    if kind == "wav int16 22050 Hz":
        return speech_dir / "speech.wav"
    if kind == "wav float32":
        return _sox_convert(speech_dir, "float.wav", options=("-e", "floating-point", "-b", "32"))
    if kind == "wav 8 kHz":
        return _sox_convert(speech_dir, "narrow.wav", options=("-r", "8000"))
    if kind == "flac 44.1 kHz stereo":
        return _sox_convert(speech_dir, "stereo.flac", options=("-r", "44100", "-c", "2"))
    if kind == "ogg vorbis":
        return _sox_convert(speech_dir, "speech.ogg")
    if kind == "mp3":
        if "MP3" not in sf.available_formats():
            pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
        sf.write(speech_dir / "sf.mp3", data, 22050, format="MP3")
        return speech_dir / "sf.mp3"
    if kind == "m4a aac 44.1 kHz":
        import soxr
        return _encode_with_av(speech_dir / "speech.m4a", soxr.resample(data, 22050, 44100), 44100, "mp4", "aac")
    if kind == "webm opus 48 kHz":
        import soxr
        return _encode_with_av(speech_dir / "speech.webm", soxr.resample(data, 22050, 48000), 48000, "webm", "libopus")
    raise AssertionError(kind)


FORMATS = ["wav int16 22050 Hz", "wav float32", "wav 8 kHz", "flac 44.1 kHz stereo", "ogg vorbis",
           "mp3", "m4a aac 44.1 kHz", "webm opus 48 kHz"]


@pytest.mark.parametrize("kind", FORMATS)
def test_formats_decode_to_16k_mono_with_same_speech(kind, speech_dir, reference):
    path = _make(kind, speech_dir, reference)
    audio = load_audio(path)
    data, seconds = reference
    _check_output(audio, seconds)
    expected = load_audio((22050, data))
    # Same words at the same times: the loudness envelopes match (8 kHz loses the highs, codecs add noise).
    assert _envelope_similarity(audio, expected) > 0.9


def test_mp3_without_gapless_tag(speech_dir, reference):
    """SoX writes no LAME tag, so the encoder's delay and padding stay in the stream: no decoder can know
    to cut them. The file must still decode, to the same speech, only that much longer."""
    audio = load_audio(_sox_convert(speech_dir, "sox.mp3"))
    data, seconds = reference
    extra = audio_duration(audio) - seconds
    assert 0 <= extra <= MP3_DELAY_AND_PADDING / 22050
    assert _envelope_similarity(audio, load_audio((22050, data))) > 0.9


@pytest.mark.parametrize("kind", ["wav int16 22050 Hz", "mp3", "webm opus 48 kHz"])
def test_bytes_decode_like_the_file(kind, speech_dir, reference):
    path = _make(kind, speech_dir, reference)
    from_bytes = load_audio(path.read_bytes())
    np.testing.assert_array_equal(from_bytes, load_audio(path))


def test_lossless_file_matches_reference_samples(speech_dir, reference):
    data, _ = reference
    audio = load_audio(_make("wav float32", speech_dir, reference))
    expected = load_audio((22050, data))
    np.testing.assert_allclose(audio, expected, atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_sine_matches_sine_made_at_16k(rate):
    audio = load_audio((rate, _sine(440, rate, 1.0)))
    expected = _sine(440, SAMPLE_RATE, 1.0)
    assert len(audio) == len(expected)
    core = slice(200, -200)  # the filter's edges
    assert np.corrcoef(audio[core], expected[core])[0, 1] > 0.999
    assert np.max(np.abs(audio[core] - expected[core])) < 0.01


def test_gradio_int16_stereo_tuple():
    rate, seconds = 44100, 2.0
    left = (_sine(440, rate, seconds, 0.5) * 32767).astype(np.int16)
    right = np.zeros_like(left)  # mono is the average: half of the left channel
    audio = load_audio((rate, np.stack([left, right], axis=1)))  # Gradio's (n, channels)
    _check_output(audio, seconds)
    assert np.max(np.abs(audio)) == pytest.approx(0.25, abs=0.01)


def test_channels_first_array_is_averaged():
    left, right = _sine(440, SAMPLE_RATE, 1.0, 0.6), _sine(440, SAMPLE_RATE, 1.0, 0.2)
    audio = load_audio(np.stack([left, right]))  # (channels, n)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("dtype, low, high, expected", [
    (np.int16, -32768, 32767, (-1.0, 32767 / 32768)),
    (np.int32, -2**31, 2**31 - 1, (-1.0, (2**31 - 1) / 2**31)),
    (np.uint8, 0, 255, (-1.0, 127 / 128)),
])
def test_integer_pcm_is_scaled_to_unit_range(dtype, low, high, expected):
    square = np.where(np.arange(SAMPLE_RATE) % 100 < 50, high, low).astype(dtype)
    audio = load_audio((SAMPLE_RATE, square))
    assert audio.min() == pytest.approx(expected[0], abs=1e-6)
    assert audio.max() == pytest.approx(expected[1], abs=1e-6)


def test_uint8_midpoint_is_zero():
    pcm = np.full(SAMPLE_RATE, 128, np.uint8)
    pcm[::2] = 200  # keep it above the silence floor
    audio = load_audio((SAMPLE_RATE, pcm))
    assert audio[1] == 0.0 and audio[0] == pytest.approx(72 / 128)


def test_float_above_full_scale_is_scaled_not_clipped():
    loud = _sine(440, SAMPLE_RATE, 1.0, 3.0)
    audio = load_audio(loud)
    assert np.max(np.abs(audio)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(audio, loud / 3.0, atol=1e-5)


# --- rejections -------------------------------------------------------------------------------

def _rejects(source, *words, **kwargs):
    with pytest.raises(AudioError) as caught:
        load_audio(source, **kwargs)
    message = str(caught.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def test_missing_file(tmp_path):
    _rejects(tmp_path / "nowhere.wav", "not found", "nowhere.wav")


def test_folder_instead_of_file(tmp_path):
    _rejects(tmp_path, "folder")


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    _rejects(path, "could not read", "notes.wav", "not an audio file")


def test_truncated_header(tmp_path):
    whole = tmp_path / "whole.wav"
    sf.write(whole, _sine(440, SAMPLE_RATE, 1.0), SAMPLE_RATE, subtype="PCM_16")
    path = tmp_path / "cut.wav"
    path.write_bytes(whole.read_bytes()[:20])  # the 44-byte header cut inside its fmt chunk
    _rejects(path, "could not read", "cut.wav", "damaged")


def test_garbage_bytes():
    _rejects(bytes(range(256)) * 20, "could not read", "uploaded audio")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _rejects(path, "empty", "0 bytes")


def test_wav_with_no_samples(tmp_path):
    path = tmp_path / "nothing.wav"
    sf.write(path, np.zeros(0, np.int16), 22050)
    _rejects(path, "empty", "no samples")


def test_too_short():
    message = _rejects(_sine(440, SAMPLE_RATE, 0.05), "too short", "0.1 s")
    assert "50 ms" in message
    assert len(load_audio(_sine(440, SAMPLE_RATE, MIN_SAMPLES / SAMPLE_RATE))) == MIN_SAMPLES


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(bad):
    audio = _sine(440, SAMPLE_RATE, 1.0)
    audio[100] = bad
    _rejects(audio, "NaN or infinity", "1 invalid")


def test_all_zero_is_silent():
    _rejects(np.zeros(SAMPLE_RATE, np.float32), "silent", "zero")


def test_quiet_noise_below_floor_is_silent():
    noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)
    _rejects(noise * SILENCE_RMS_FLOOR * 0.3, "silent", "-80 dBFS")
    assert len(load_audio(noise * SILENCE_RMS_FLOOR * 3)) == SAMPLE_RATE  # just above the floor passes


def test_int16_dither_is_silent():
    dither = np.random.default_rng(0).integers(-1, 2, 2 * 44100).astype(np.int16)
    _rejects((44100, dither), "silent")


def test_too_long_says_length_and_limit():
    two_minutes = _sine(440, SAMPLE_RATE, 120.0)
    assert len(load_audio(two_minutes, max_seconds=None)) == 120 * SAMPLE_RATE
    _rejects(two_minutes, "120.0 s", "60 s", max_seconds=60)


def test_too_long_file_is_rejected(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, _sine(440, 8000, 90.0), 8000)
    _rejects(path, "90.0 s", "60 s", max_seconds=60)
    assert audio_duration(load_audio(path, max_seconds=None)) == pytest.approx(90.0)


def test_too_long_webm_is_rejected_while_decoding(tmp_path):
    path = _encode_with_av(tmp_path / "long.webm", _sine(440, SAMPLE_RATE, 70.0), SAMPLE_RATE, "webm", "libopus")
    _rejects(path, "over the limit of 60 s", max_seconds=60)
    assert audio_duration(load_audio(path, max_seconds=None)) == pytest.approx(70.0, rel=0.01)


def test_default_limit_allows_two_minutes_but_not_more():
    assert DEFAULT_MAX_AUDIO_SECONDS == 120
    assert len(load_audio(_sine(440, SAMPLE_RATE, 120.0))) == 120 * SAMPLE_RATE
    _rejects(_sine(440, SAMPLE_RATE, 121.0), "121.0 s", "120 s")


def test_m4a_without_pyav_names_format_and_fix(tmp_path, monkeypatch):
    path = tmp_path / "voice.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(200))
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    _rejects(path, "voice.m4a", "M4A", "pip install av")


def test_webm_bytes_without_pyav(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    _rejects(b"\x1a\x45\xdf\xa3" + bytes(200), "WebM", "pip install av")


def test_no_audio_received():
    _rejects(None, "no audio")


def test_bad_sample_rate():
    _rejects((0, _sine(440, SAMPLE_RATE, 1.0)), "sample rate")


def test_batch_shaped_array_is_rejected():
    _rejects(np.ones((100, 20000), np.float32), "channels")


def test_validate_audio_checks_arrays():
    good = _sine(440, SAMPLE_RATE, 1.0)
    assert validate_audio(good) is not None
    with pytest.raises(AudioError, match="silent"):
        validate_audio(np.zeros(SAMPLE_RATE, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        validate_audio(np.full(SAMPLE_RATE, np.nan, np.float32))
    with pytest.raises(AudioError, match="over the limit of 1 s"):
        validate_audio(_sine(440, SAMPLE_RATE, 2.0), max_seconds=1)
    with pytest.raises(AudioError, match="shape"):
        validate_audio(np.stack([good, good], axis=1))


# --- windows and duration -----------------------------------------------------------------------

def test_seventy_seconds_split_into_three_windows_in_order():
    audio = np.arange(70 * SAMPLE_RATE, dtype=np.float32)
    windows = split_into_windows(audio)
    assert [len(w) for w in windows] == [N_SAMPLES, N_SAMPLES, 10 * SAMPLE_RATE]
    np.testing.assert_array_equal(np.concatenate(windows), audio)  # every sample once, in order


@pytest.mark.parametrize("seconds, count", [(0.5, 1), (30.0, 1), (30.01, 2), (60.0, 2), (120.0, 4)])
def test_window_count(seconds, count):
    audio = np.zeros(int(round(seconds * SAMPLE_RATE)), np.float32)
    windows = split_into_windows(audio)
    assert len(windows) == count
    assert sum(len(w) for w in windows) == len(audio)
    assert all(len(w) <= N_SAMPLES for w in windows)


def test_custom_window_size():
    windows = split_into_windows(np.arange(10, dtype=np.float32), window_samples=4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_audio_duration_of_arrays_and_tuples():
    assert audio_duration(np.zeros(SAMPLE_RATE * 3, np.float32)) == 3.0
    assert audio_duration((44100, np.zeros((44100 * 2, 2), np.int16))) == 2.0
    assert audio_duration((8000, np.zeros(4000, np.int16))) == 0.5
