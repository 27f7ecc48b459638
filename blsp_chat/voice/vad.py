"""End-of-turn detection: Silero VAD (the ONNX model shipped inside the `silero-vad` wheel, run by
onnxruntime: offline, no torch) and a streaming detector over its speech probabilities.

    detector = EndOfTurnDetector()            # TurnOptions() defaults: a 0.7 s pause ends a turn
    for chunk in chunks:                      # 16 kHz mono float32 blocks of any size
        for event in detector.feed(chunk):
            if event.kind == SPEECH_START: ...            # e.g. barge-in: stop the reply playing
            if event.kind == TURN_END: send(event.audio)  # the turn, with a little audio around it

Speech is *confirmed* only after `min_speech_s` of it (a click or a cough is ignored), so SPEECH_START
comes that long after the speech began; its `at_s` says when it began. A turn ends after `end_pause_s` of
silence, or is cut at `max_turn_s` when the speaker never pauses (the speech that goes on starts a new turn).
"""
from __future__ import annotations

import functools
import importlib.util
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import SAMPLE_RATE

# --- the model (silero-vad 6.x, its utils_vad.OnnxWrapper at 16 kHz) --------------------------------
VAD_PACKAGE = "silero_vad"
VAD_MODEL_FILE = ("data", "silero_vad.onnx")
VAD_FRAME = 512                    # samples the model takes per call at 16 kHz (32 ms)
VAD_CONTEXT = 64                   # samples of the previous frame prepended to each call
VAD_STATE_SHAPE = (2, 1, 128)      # the model's recurrent state for one stream
FRAME_SECONDS = VAD_FRAME / SAMPLE_RATE
VAD_THREADS = 1                    # one frame is ~0.1 ms of work: more threads only add overhead

# --- event kinds -------------------------------------------------------------------------------------
SPEECH_START = "speech_start"
TURN_END = "turn_end"
END_BY_PAUSE = "pause"
END_BY_MAX_LENGTH = "max_length"
END_BY_FLUSH = "flush"


class VadUnavailable(RuntimeError):
    """The VAD model cannot be loaded; the message says what to install."""


def vad_model_path() -> Path:
    """silero_vad.onnx inside the installed wheel, found without importing the package (which imports torch)."""
    spec = importlib.util.find_spec(VAD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("the silero-vad package is not installed (`pip install silero-vad==6.2.3`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*VAD_MODEL_FILE)
    if not path.is_file():
        raise VadUnavailable(f"silero-vad is installed but its model {path} is missing: reinstall silero-vad==6.2.3")
    return path


@functools.lru_cache(maxsize=None)
def vad_session(model_path: str):
    """One onnxruntime session per model file, shared by every stream: the recurrent state lives in each
    SileroVad, and a session's run() is thread-safe, so a page's many microphones load the model once."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = VAD_THREADS, 1
    return onnxruntime.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


class SileroVad:
    """Speech probability of each 32 ms frame of one 16 kHz stream (the model is recurrent: frames in order)."""

    def __init__(self, model_path: Path | None = None):
        self.session = vad_session(str(model_path or vad_model_path()))
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros(VAD_STATE_SHAPE, np.float32)
        self._context = np.zeros(VAD_CONTEXT, np.float32)

    def probability(self, frame: np.ndarray) -> float:
        """frame: (VAD_FRAME,) float32 in [-1, 1] -> probability that it holds speech."""
        if frame.shape != (VAD_FRAME,):
            raise ValueError(f"a VAD frame is {VAD_FRAME} samples at {SAMPLE_RATE} Hz, got shape {frame.shape}")
        window = np.concatenate([self._context, frame])[None, :]
        feed = {"input": window, "state": self._state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
        output, self._state = self.session.run(None, feed)
        self._context = frame[-VAD_CONTEXT:]
        return float(output[0, 0])


# --- the detector ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurnOptions:
    threshold: float = 0.5          # a frame at or above this is speech (silero's default)
    release: float = 0.35           # below this a frame is silence (silero: threshold - 0.15; hysteresis)
    end_pause_s: float = 0.7        # silence that ends a turn: shorter pauses fall inside sentences
    min_speech_s: float = 0.25      # speech needed before a turn starts: shorter bursts are clicks or coughs
    max_turn_s: float = 30.0        # a turn that never pauses is cut here (Whisper's window)
    pre_roll_s: float = 0.2         # audio kept before the speech began: the VAD reacts a frame late
    tail_s: float = 0.2             # audio kept after the speech ended: soft word endings

    def __post_init__(self):
        if not 0.0 < self.release <= self.threshold < 1.0:
            raise ValueError(f"need 0 < release ({self.release}) <= threshold ({self.threshold}) < 1")
        if self.end_pause_s <= 0 or self.min_speech_s < 0 or self.pre_roll_s < 0 or self.tail_s < 0:
            raise ValueError("end_pause_s must be positive; min_speech_s, pre_roll_s and tail_s not negative")
        if self.tail_s > self.end_pause_s:
            raise ValueError(f"tail_s ({self.tail_s}) cannot exceed end_pause_s ({self.end_pause_s})")
        if self.max_turn_s <= self.min_speech_s + self.pre_roll_s:
            raise ValueError(f"max_turn_s ({self.max_turn_s}) must exceed min_speech_s + pre_roll_s")


@dataclass
class TurnEvent:
    kind: str                        # SPEECH_START or TURN_END
    at_s: float                      # stream time: when the speech began (start) or when the turn ended (end)
    audio: np.ndarray | None = None  # TURN_END: (n,) float32 16 kHz, the turn with pre-roll and tail
    reason: str | None = None        # TURN_END: END_BY_PAUSE, END_BY_MAX_LENGTH or END_BY_FLUSH
    speech_start_s: float | None = None  # TURN_END: when the turn's speech began


def frames_in(seconds: float) -> int:
    return max(1, round(seconds / FRAME_SECONDS))


@dataclass
class _Turn:
    """The speech being heard: its frames since it began (with pre-roll before them)."""
    start_frame: int
    frames: list[np.ndarray] = field(default_factory=list)
    speech_frames: int = 0
    confirmed: bool = False
    pause_from: int | None = None    # index (in frames) of the first silent frame of the current pause


class EndOfTurnDetector:
    """Feed 16 kHz mono audio in chunks of any size; get SPEECH_START and TURN_END events. No I/O, no threads.
    `vad` is anything with probability(frame) and reset() (SileroVad by default)."""

    def __init__(self, options: TurnOptions = TurnOptions(), vad=None):
        self.options = options
        self.vad = vad if vad is not None else SileroVad()
        self._pre_roll: deque[np.ndarray] = deque(maxlen=frames_in(options.pre_roll_s) if options.pre_roll_s else 0)
        self._pending = np.zeros(0, np.float32)
        self._frame_index = 0            # frames processed so far
        self._turn: _Turn | None = None

    @property
    def speaking(self) -> bool:
        """Whether a confirmed turn is in progress."""
        return self._turn is not None and self._turn.confirmed

    def reset(self) -> None:
        """Forget the stream (e.g. after a reply was spoken through the same room's speaker)."""
        self.vad.reset()
        self._pre_roll.clear()
        self._pending = np.zeros(0, np.float32)
        self._turn = None

    def feed(self, chunk) -> list[TurnEvent]:
        samples = checked_chunk(chunk)
        self._pending = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        events: list[TurnEvent] = []
        whole = len(self._pending) // VAD_FRAME * VAD_FRAME
        for start in range(0, whole, VAD_FRAME):
            events += self._step(self._pending[start:start + VAD_FRAME])
        self._pending = self._pending[whole:]
        return events

    def flush(self) -> list[TurnEvent]:
        """The stream ended: a confirmed turn in progress ends now."""
        if self._turn is None or not self._turn.confirmed:
            self._turn = None
            return []
        return [self._end_turn(END_BY_FLUSH)]

    # --- one frame -----------------------------------------------------------------------------------
    def _step(self, frame: np.ndarray) -> list[TurnEvent]:
        probability = self.vad.probability(frame)
        index, self._frame_index = self._frame_index, self._frame_index + 1
        if self._turn is None:
            if probability < self.options.threshold:
                self._pre_roll.append(frame)
                return []
            self._turn = _Turn(start_frame=index, frames=list(self._pre_roll))
            self._pre_roll.clear()
        return self._continue_turn(self._turn, frame, probability, index)

    def _continue_turn(self, turn: _Turn, frame: np.ndarray, probability: float, index: int) -> list[TurnEvent]:
        turn.frames.append(frame)
        if probability >= self.options.threshold:
            turn.speech_frames += 1
            turn.pause_from = None
        elif probability < self.options.release and turn.pause_from is None:
            turn.pause_from = index
        events = []
        if not turn.confirmed and turn.speech_frames >= frames_in(self.options.min_speech_s):
            turn.confirmed = True
            events.append(TurnEvent(SPEECH_START, at_s=turn.start_frame * FRAME_SECONDS))
        paused = turn.pause_from is not None and index + 1 - turn.pause_from >= frames_in(self.options.end_pause_s)
        if paused and turn.confirmed:
            events.append(self._end_turn(END_BY_PAUSE))
        elif paused:  # a burst too short to be speech
            self._turn = None
        elif len(turn.frames) >= int(self.options.max_turn_s / FRAME_SECONDS):  # whole frames: never longer
            events.append(self._end_turn(END_BY_MAX_LENGTH))
        return events

    def _end_turn(self, reason: str) -> TurnEvent:
        turn, self._turn = self._turn, None
        frames = turn.frames
        if reason == END_BY_PAUSE:  # keep tail_s of the pause, drop the rest
            speech_end = len(frames) - (self._frame_index - turn.pause_from)
            frames = frames[:speech_end + frames_in(self.options.tail_s)]
        return TurnEvent(TURN_END, at_s=self._frame_index * FRAME_SECONDS, audio=np.concatenate(frames),
                         reason=reason, speech_start_s=turn.start_frame * FRAME_SECONDS)


def checked_chunk(chunk) -> np.ndarray:
    """A chunk as (n,) float32; a clear error for stereo, non-float or non-finite input."""
    samples = np.asarray(chunk)
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)  # sounddevice's (frames, 1) blocks
    if samples.ndim != 1:
        raise ValueError(f"the detector takes mono audio, one sample per row; got shape {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"the detector takes float samples in [-1, 1] at {SAMPLE_RATE} Hz; got {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise ValueError("the audio chunk holds NaN or infinite samples")
    return samples


def detect_turns(audio: np.ndarray, options: TurnOptions = TurnOptions(), chunk: int = VAD_FRAME,
                 vad=None) -> list[TurnEvent]:
    """Every event of a whole 16 kHz recording fed in chunks of `chunk` samples, then flushed."""
    detector = EndOfTurnDetector(options, vad)
    events = []
    for start in range(0, len(audio), chunk):
        events += detector.feed(audio[start:start + chunk])
    return events + detector.flush()
