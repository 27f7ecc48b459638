"""Recording from the microphone with `sounddevice` (desktop use; no model code here).

    recorder = Recorder()        # raises MicrophoneUnavailable without PortAudio or an input device
    recorder.start()
    ...                          # the user speaks
    audio = recorder.stop()      # (n,) float32 mono at 16 kHz, checked by audio.load_audio

The stream runs at the input device's own sample rate (many devices cannot capture at 16 kHz); its
callback only copies each block into a queue, and `stop()` joins the blocks and hands them to
`audio.load_audio((rate, samples))`, which mixes to mono, resamples and rejects silent or empty takes.
"""
from __future__ import annotations

import importlib
import queue
import threading

import numpy as np

from .audio import DEFAULT_MAX_AUDIO_SECONDS, load_audio

CHANNELS = 1            # PortAudio mixes or picks a channel for us; load_audio would mix more anyway
DTYPE = "float32"       # what load_audio takes without conversion


class MicrophoneUnavailable(RuntimeError):
    """No microphone can be used: sounddevice or PortAudio is missing, or there is no input device.
    The message says which, for the person at the terminal."""


def load_sounddevice():
    """The sounddevice module; MicrophoneUnavailable when it or its PortAudio library is missing."""
    try:
        return importlib.import_module("sounddevice")
    except ImportError as err:
        raise MicrophoneUnavailable("the sounddevice package is not installed (`pip install sounddevice`)") from err
    except OSError as err:  # sounddevice raises OSError on import when libportaudio is missing
        raise MicrophoneUnavailable(f"the PortAudio library is missing ({err}); install it "
                                    "(Debian/Ubuntu: `apt-get install libportaudio2`)") from err


def input_device(sd, device=None) -> dict:
    """sounddevice's description of the input device (the default one when device is None)."""
    errors = (getattr(sd, "PortAudioError", OSError), OSError, ValueError)
    try:
        info = sd.query_devices(device, kind="input")
    except errors as err:
        raise MicrophoneUnavailable(f"no audio input device was found ({err})") from err
    if not info or int(info.get("max_input_channels", 0)) < CHANNELS:
        raise MicrophoneUnavailable(f"the audio device {info.get('name', device)!r} has no input channels")
    return info


def microphone_problem(device=None) -> str | None:
    """Why recording cannot work here, or None when a microphone is available."""
    try:
        input_device(load_sounddevice(), device)
    except MicrophoneUnavailable as err:
        return str(err)
    return None


class Recorder:
    """One take at a time from an input device. Not thread-safe: start and stop from one thread."""

    def __init__(self, device=None, *, max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS, sounddevice=None):
        self._sd = sounddevice if sounddevice is not None else load_sounddevice()
        info = input_device(self._sd, device)
        self.device = device
        self.device_name = str(info.get("name", "default input"))
        self.sample_rate = int(info["default_samplerate"])
        self.max_seconds = max_seconds
        self.overflows = 0  # blocks PortAudio reported as overflowed (samples were lost)
        self._blocks: queue.Queue[np.ndarray] = queue.Queue()
        self._stream = None
        self._lock = threading.Lock()

    @property
    def recording(self) -> bool:
        return self._stream is not None

    def start(self) -> None:
        if self._stream is not None:
            raise RuntimeError("already recording: stop() first")
        self._blocks = queue.Queue()
        self.overflows = 0
        stream = self._sd.InputStream(samplerate=self.sample_rate, channels=CHANNELS, dtype=DTYPE,
                                      device=self.device, callback=self._callback)
        stream.start()
        self._stream = stream

    def _callback(self, indata, frames, time, status) -> None:
        """PortAudio's thread: copy the block (its buffer is reused) and return at once."""
        if status:
            with self._lock:
                self.overflows += 1
        self._blocks.put(np.array(indata, dtype=np.float32, copy=True))

    def read_block(self, timeout: float) -> np.ndarray | None:
        """While recording, the next captured (frames, 1) block at self.sample_rate, or None when none
        came within timeout (hands-free listening reads the take as it is captured)."""
        try:
            return self._blocks.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Drop the blocks captured so far (what the microphone heard while a reply was spoken)."""
        while True:
            try:
                self._blocks.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> np.ndarray:
        """End the take; returns (n,) float32 mono audio at 16 kHz. Raises audio.AudioError for an
        empty, too short, too long or silent take."""
        rate, samples = self._close()
        return load_audio((rate, samples), max_seconds=self.max_seconds)

    def cancel(self) -> None:
        """End the take and discard it."""
        if self._stream is not None:
            self._close()

    def _close(self) -> tuple[int, np.ndarray]:
        if self._stream is None:
            raise RuntimeError("not recording: start() first")
        stream, self._stream = self._stream, None
        try:
            stream.stop()  # returns once the callback has run for every captured block
        finally:
            stream.close()
        blocks = []
        while True:
            try:
                blocks.append(self._blocks.get_nowait())
            except queue.Empty:
                break
        samples = np.concatenate(blocks) if blocks else np.zeros((0, CHANNELS), np.float32)
        return self.sample_rate, samples


class Player:
    """Plays one clip at a time through the default (or given) output device; stop() from any thread.
    Raises MicrophoneUnavailable (sounddevice or PortAudio missing) or OSError (no output device)."""

    def __init__(self, device=None, *, sounddevice=None):
        self._sd = sounddevice if sounddevice is not None else load_sounddevice()
        try:
            info = self._sd.query_devices(device, kind="output")
        except (getattr(self._sd, "PortAudioError", OSError), ValueError) as err:
            raise OSError(f"no audio output device was found ({err})") from err
        self.device = device
        self.device_name = str(info.get("name", "default output"))

    def play(self, audio: np.ndarray, sample_rate: int) -> None:
        """Blocks until the clip has played or stop() was called."""
        self._sd.play(audio, sample_rate, device=self.device)
        self._sd.wait()

    def stop(self) -> None:
        self._sd.stop()
