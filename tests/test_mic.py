"""mic.Recorder against a fake sounddevice module: device-rate blocks in, 16 kHz mono float32 out."""
import importlib.abc
import sys
import threading
import types

import numpy as np
import pytest

from blsp_chat import mic
from blsp_chat.audio import AudioError
from blsp_chat.constants import SAMPLE_RATE

DEVICE_RATE = 48_000
BLOCK = 480  # 10 ms at 48 kHz, a typical PortAudio block
FREQ = 440.0


def sine(rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * FREQ * t)).astype(np.float32)


class FakePortAudioError(Exception):
    pass


def fake_sounddevice(signal: np.ndarray, *, rate: int = DEVICE_RATE, has_input: bool = True):
    """A stand-in for the sounddevice module. Its InputStream feeds `signal` in blocks of (BLOCK, 1)
    float32 to the callback from its own thread, as PortAudio does, and stop() waits for that thread."""
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = FakePortAudioError
    sd.opened = []

    def query_devices(device=None, kind=None):
        assert kind == "input"
        if not has_input:
            raise FakePortAudioError("Error querying device -1")
        return {"name": "fake mic", "default_samplerate": float(rate), "max_input_channels": 2}

    class InputStream:
        def __init__(self, *, samplerate, channels, dtype, device, callback):
            self.kwargs = dict(samplerate=samplerate, channels=channels, dtype=dtype, device=device)
            self.callback, self.closed, self.thread = callback, False, None
            sd.opened.append(self)

        def _feed(self):
            buffer = np.empty((BLOCK, self.kwargs["channels"]), np.float32)
            for start in range(0, len(signal), BLOCK):
                block = signal[start:start + BLOCK]
                buffer[: len(block), 0] = block  # PortAudio reuses its buffer: the recorder must copy
                self.callback(buffer[: len(block)], len(block), None, None)
                buffer[:] = np.nan

        def start(self):
            self.thread = threading.Thread(target=self._feed)
            self.thread.start()

        def stop(self):
            self.thread.join()

        def close(self):
            self.closed = True

    sd.query_devices = query_devices
    sd.InputStream = InputStream
    return sd


@pytest.fixture
def install(monkeypatch):
    def install(sd):
        monkeypatch.setitem(sys.modules, "sounddevice", sd)
        return sd
    return install


def test_recorder_turns_48k_blocks_into_16k_mono_float32(install):
    seconds = 1.0
    sd = install(fake_sounddevice(sine(DEVICE_RATE, seconds)))
    recorder = mic.Recorder()  # the module found through `import sounddevice`
    assert recorder.sample_rate == DEVICE_RATE
    recorder.start()
    assert recorder.recording
    audio = recorder.stop()
    assert not recorder.recording
    (stream,) = sd.opened
    assert stream.kwargs == dict(samplerate=DEVICE_RATE, channels=1, dtype="float32", device=None)
    assert stream.closed
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - int(seconds * SAMPLE_RATE)) <= 1
    # The same sine sampled at 16 kHz, away from the resampler's edges: every block arrived, in order.
    expected = sine(SAMPLE_RATE, seconds)[: len(audio)]
    edge = 400
    np.testing.assert_allclose(audio[edge:-edge], expected[edge:-edge], atol=2e-3)


def test_each_take_starts_empty(install):
    install(fake_sounddevice(sine(DEVICE_RATE, 0.5)))
    recorder = mic.Recorder()
    recorder.start()
    first = recorder.stop()
    recorder.start()
    second = recorder.stop()
    assert len(first) == len(second) == SAMPLE_RATE // 2
    with pytest.raises(RuntimeError, match="start"):
        recorder.stop()


def test_cancel_discards_and_silence_is_rejected(install):
    install(fake_sounddevice(np.zeros(DEVICE_RATE, np.float32)))
    recorder = mic.Recorder()
    recorder.start()
    recorder.cancel()
    assert not recorder.recording
    recorder.start()
    with pytest.raises(AudioError, match="silent"):
        recorder.stop()


def test_no_input_device_is_reported(install):
    install(fake_sounddevice(sine(DEVICE_RATE, 0.5), has_input=False))
    problem = mic.microphone_problem()
    assert problem is not None and "no audio input device" in problem
    with pytest.raises(mic.MicrophoneUnavailable):
        mic.Recorder()


class _NoPortAudio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")  # what sounddevice raises on import
        return None


def test_missing_portaudio_is_reported(monkeypatch):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    problem = mic.microphone_problem()
    assert problem is not None and "PortAudio" in problem
    with pytest.raises(mic.MicrophoneUnavailable, match="PortAudio"):
        mic.Recorder()


def test_an_available_microphone_has_no_problem(install):
    install(fake_sounddevice(sine(DEVICE_RATE, 0.5)))
    assert mic.microphone_problem() is None
