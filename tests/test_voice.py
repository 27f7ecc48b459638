"""Talking by voice: end of turn on real recordings joined with real pauses, spoken replies that Whisper
understands, the streaming sentence splitter, the chat's hands-free and spoken paths, a missing voice."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import LIBRIVOX_DIR

from blsp_chat import ui
from blsp_chat.audio import resample
from blsp_chat.config import BlspConfig, GenerationOptions
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.ctc_decode import collapse_ctc
from blsp_chat.heard import heard_piece_ids, heard_text
from blsp_chat.readout import embedding_distance_logits
from blsp_chat.session import ChatSession
from blsp_chat.ui import ChatHandlers, build_demo, forget_chat, model_name, on_gpu
from blsp_chat.voice import tts
from blsp_chat.voice.listen import TurnListener
from blsp_chat.voice.live import LiveTurns
from blsp_chat.voice.paced import PacedPlayer
from blsp_chat.voice.sentences import SentenceSplitter, SplitterOptions
from blsp_chat.voice.speaker import SpokenReply, speak_text, spoken_prefix
from blsp_chat.voice.vad import (
    END_BY_MAX_LENGTH,
    END_BY_PAUSE,
    FRAME_SECONDS,
    SPEECH_START,
    TURN_END,
    EndOfTurnDetector,
    TurnOptions,
    detect_turns,
    frames_in,
)
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_blsp, tiny_tokenizer, tone

ROOM_TONE_S = 0.15       # every LibriVox clip starts with more than this before its first word (VAD: > 0.25 s)
EDGE_S = 0.35            # room tone at either end of a clip, at most: its speech lies inside the rest
PAUSE_S = 1.2            # a pause between turns, longer than the default end_pause_s (0.7 s)
SHORT_PAUSE_S = 0.4      # a pause inside a turn, shorter than end_pause_s
MAX_WER = 0.10
BARGE_IN_S = 0.5         # speech must be confirmed this soon after it starts (stream time)
ONSET_FACTOR = 10        # speech starts where the level first rises 20 dB above the room tone


# --- real recordings with real pauses -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    paths = sorted(LIBRIVOX_DIR.glob("*.wav"))
    if len(paths) < 5:
        pytest.skip("needs the LibriVox clips: apt-get install -y pocketsphinx-testdata")
    audios = []
    for path in paths:
        audio, rate = sf.read(path, dtype="float32")
        assert rate == SAMPLE_RATE
        audios.append(audio)
    return audios


def room_tone(clip: np.ndarray, seconds: float) -> np.ndarray:
    """The recording's own background (its first ROOM_TONE_S, before the first word), to `seconds` long: tiled
    forwards and backwards in turn, so the joins make no clicks."""
    tone = clip[: int(ROOM_TONE_S * SAMPLE_RATE)]
    return np.resize(np.concatenate([tone, tone[::-1]]), int(seconds * SAMPLE_RATE))


def join(clips: list[np.ndarray], pause_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Clips with pause_s of room tone before and between them and PAUSE_S after them (the speaker stops);
    and each clip's (start, end) sample. A pause continues the background of the clip before it."""
    pieces, spans, at = [room_tone(clips[0], pause_s)], [], 0
    for index, clip in enumerate(clips):
        at += len(pieces[-1])
        spans.append((at, at + len(clip)))
        at += len(clip)
        pieces += [clip, room_tone(clip, pause_s if index < len(clips) - 1 else PAUSE_S)]
    return np.concatenate(pieces), spans


def speech_onset(clip: np.ndarray) -> int:
    """The first sample of speech, found without the VAD: the first 10 ms louder than ONSET_FACTOR times the
    recording's room tone (RMS)."""
    window = SAMPLE_RATE // 100
    floor = np.sqrt(np.mean(clip[: int(ROOM_TONE_S * SAMPLE_RATE)] ** 2))
    for start in range(0, len(clip) - window, window):
        if np.sqrt(np.mean(clip[start:start + window] ** 2)) > ONSET_FACTOR * floor:
            return start
    raise AssertionError("no speech in the clip")


def turn_span(event, options: TurnOptions) -> tuple[int, int]:
    """Where a turn's audio lies in the stream (it starts pre_roll before the speech did)."""
    frame = round(FRAME_SECONDS * SAMPLE_RATE)
    start = round(event.speech_start_s * SAMPLE_RATE) - frames_in(options.pre_roll_s) * frame
    return max(start, 0), max(start, 0) + len(event.audio)


def test_turn_ends_at_each_pause_and_holds_the_whole_clip(clips):
    options = TurnOptions()
    stream, spans = join(clips, PAUSE_S)
    events = detect_turns(stream, options, chunk=1000)  # an odd chunk size, as a browser delivers
    ends = [e for e in events if e.kind == TURN_END]
    assert [e.kind for e in events] == [SPEECH_START, TURN_END] * len(clips)
    assert [e.reason for e in ends] == [END_BY_PAUSE] * len(clips)
    for end, (clip_start, clip_end) in zip(ends, spans):
        heard_start, heard_end = turn_span(end, options)
        assert np.array_equal(end.audio, stream[heard_start:heard_end])
        edge = int(EDGE_S * SAMPLE_RATE)
        assert heard_start <= clip_start + edge and heard_end >= clip_end - edge  # no word cut off
        assert heard_start >= clip_start - edge and heard_end <= clip_end + edge  # little of the pause
        # The turn ends end_pause_s after the last word: after the clip, well before the next one.
        assert clip_end / SAMPLE_RATE < end.at_s <= clip_end / SAMPLE_RATE + options.end_pause_s + FRAME_SECONDS


def test_a_pause_shorter_than_end_pause_stays_inside_the_turn(clips):
    stream, spans = join([clips[1], clips[4]], SHORT_PAUSE_S)
    ends = [e for e in detect_turns(stream) if e.kind == TURN_END]
    assert len(ends) == 1 and ends[0].reason == END_BY_PAUSE
    start, end = turn_span(ends[0], TurnOptions())
    assert start <= spans[0][0] + EDGE_S * SAMPLE_RATE and end >= spans[1][1] - EDGE_S * SAMPLE_RATE
    # The same recording with a shorter end_pause_s is two turns: the pause is what decides.
    quick = TurnOptions(end_pause_s=0.25, tail_s=0.1)
    assert len([e for e in detect_turns(stream, quick) if e.kind == TURN_END]) == 2


def test_chunk_size_does_not_change_the_turns(clips):
    stream, _ = join(clips[:3], PAUSE_S)

    def boundaries(chunk):
        return [(e.kind, e.at_s, None if e.audio is None else len(e.audio)) for e in detect_turns(stream, chunk=chunk)]

    assert boundaries(160) == boundaries(512) == boundaries(4099)


def test_max_turn_length_cuts_a_turn_that_never_pauses(clips):
    options = TurnOptions(max_turn_s=6.0)
    stream, spans = join([clips[0], clips[2], clips[3]], 0.0)  # 18.5 s of speech, read on without a pause
    ends = [e for e in detect_turns(stream, options) if e.kind == TURN_END]
    assert len(ends) >= 3 and [e.reason for e in ends[:2]] == [END_BY_MAX_LENGTH] * 2
    assert all(len(e.audio) <= options.max_turn_s * SAMPLE_RATE for e in ends)
    # Nothing is lost at a cut: the next turn starts where the cut one ended.
    cut_spans = [turn_span(e, options) for e in ends]
    for (_, cut_end), (next_start, _) in zip(cut_spans, cut_spans[1:]):
        assert next_start - cut_end <= frames_in(options.pre_roll_s + FRAME_SECONDS) * FRAME_SECONDS * SAMPLE_RATE
    speech = spans[-1][1] - spans[0][0]
    assert sum(len(e.audio) for e in ends) >= speech - 2 * EDGE_S * SAMPLE_RATE


def test_clicks_noise_and_a_lone_syllable_give_no_turn(clips):
    rng = np.random.default_rng(0)
    seconds = 3 * SAMPLE_RATE
    hiss = (0.05 * rng.standard_normal(seconds)).astype(np.float32)
    clicks = np.zeros(seconds, np.float32)
    clicks[:: SAMPLE_RATE // 2] = 0.9  # a sharp click every half second
    hum = (0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds) / SAMPLE_RATE)).astype(np.float32)
    syllable = clips[1][int(0.6 * SAMPLE_RATE): int(0.75 * SAMPLE_RATE)]  # 150 ms of a word: shorter than min_speech_s
    room = room_tone(clips[1], 1.0)
    for noise in (hiss, clicks, hum, np.concatenate([room, syllable, room]), room_tone(clips[0], 5.0)):
        assert detect_turns(noise) == []


def test_speech_is_confirmed_soon_enough_to_interrupt_a_reply(clips):
    """Barge-in needs SPEECH_START within BARGE_IN_S of the first word, counted in audio fed (stream time)."""
    stream, spans = join(clips[1:3], PAUSE_S)
    detector, step, starts = EndOfTurnDetector(), SAMPLE_RATE // 50, []  # 20 ms blocks
    for at in range(0, len(stream), step):
        starts += [(e.at_s, (at + step) / SAMPLE_RATE) for e in detector.feed(stream[at:at + step])
                   if e.kind == SPEECH_START]
    assert len(starts) == 2
    for (began_s, confirmed_s), (clip_start, _), clip in zip(starts, spans, clips[1:3]):
        assert began_s >= clip_start / SAMPLE_RATE  # not before the clip (the room tone is not speech)
        assert 0 < confirmed_s - (clip_start + speech_onset(clip)) / SAMPLE_RATE <= BARGE_IN_S


@pytest.mark.parametrize("chunk, message", [
    (np.zeros((100, 2), np.float32), "mono"),
    (np.zeros(100, np.int16), "float"),
    (np.full(100, np.nan, np.float32), "NaN"),
])
def test_bad_chunks_get_a_clear_error(chunk, message):
    with pytest.raises(ValueError, match=message):
        EndOfTurnDetector().feed(chunk)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="release"):
        TurnOptions(threshold=0.3, release=0.5)
    with pytest.raises(ValueError, match="max_turn_s"):
        TurnOptions(max_turn_s=0.1)


def test_listener_hears_turns_from_device_rate_blocks(clips):
    """A 48 kHz microphone delivering 10 ms blocks: resampled on the fly, each pause ends a turn."""
    device_rate, block = 48_000, 480
    stream, _ = join(clips[1:3], PAUSE_S)
    import soxr

    at_48k = soxr.resample(stream, SAMPLE_RATE, device_rate).astype(np.float32)
    blocks = [at_48k[i:i + block, None] for i in range(0, len(at_48k), block)] + [np.zeros((0, 1), np.float32)]
    feed = iter(blocks)
    listener = TurnListener(lambda timeout: next(feed), device_rate)
    started = []
    first = listener.next_turn(on_speech_start=lambda: started.append(1))
    second = listener.next_turn(on_speech_start=lambda: started.append(2))
    assert started == [1, 2] and listener.next_turn() is None
    for turn, clip in zip((first, second), clips[1:3]):
        assert abs(len(turn) - len(clip)) < 2 * EDGE_S * SAMPLE_RATE


# --- the streaming sentence splitter ----------------------------------------------------------------------
def stream_of(text: str, size: int = 3) -> list[str]:
    """Text in deltas of a few characters, as tokens arrive."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_splitter_yields_the_first_sentence_before_the_text_ends():
    text = "Paris is the capital of France. It has about two million people! Do you want to know more?"
    splitter, got, first_at = SentenceSplitter(), [], None
    deltas = stream_of(text)
    for index, delta in enumerate(deltas):
        finished = splitter.feed(delta)
        if finished and first_at is None:
            first_at = index
        got += finished
    assert got[0] == "Paris is the capital of France."
    assert first_at is not None and first_at < len(deltas) // 2
    got += splitter.flush()
    assert got == ["Paris is the capital of France.", "It has about two million people!", "Do you want to know more?"]


@pytest.mark.parametrize("text, sentences", [
    ("Dr. Smith paid 3.5 dollars, e.g. for tea. Then he left.",
     ["Dr. Smith paid 3.5 dollars, e.g. for tea.", "Then he left."]),
    ("Steps:\n1. Boil water.\n2. Add tea.", ["Steps:", "1. Boil water.", "2. Add tea."]),
    ('She said "Hello." Then she left.', ['She said "Hello."', "Then she left."]),
    ("No full stop at all", ["No full stop at all"]),
])
def test_splitter_keeps_abbreviations_numbers_and_quotes(text, sentences):
    splitter = SentenceSplitter()
    got = [s for delta in stream_of(text, 2) for s in splitter.feed(delta)] + splitter.flush()
    assert got == sentences


def test_splitter_cuts_a_run_on_clause_at_a_comma():
    text = "one two three, four five six, seven eight nine ten eleven twelve"
    splitter = SentenceSplitter(SplitterOptions(max_chars=40))
    got = [s for delta in stream_of(text) for s in splitter.feed(delta)] + splitter.flush()
    assert got[0] == "one two three, four five six," and " ".join(got) == text
    assert all(len(s) <= 40 for s in got)


# --- voices ---------------------------------------------------------------------------------------------------
REPLY = ("The capital of France is Paris. It is famous for the Eiffel Tower and its museums. "
         "Many people visit the city every year.")


@pytest.fixture(scope="module")
def whisper(whisper_tiny_en_dir):
    from train.eval_run import WhisperTranscriber

    return WhisperTranscriber(str(whisper_tiny_en_dir))


def heard_wer(whisper, audio: np.ndarray, rate: int, text: str) -> tuple[float, str]:
    from train.metrics import EnglishNormalizer, word_errors

    heard = whisper([resample(audio, rate, SAMPLE_RATE)])[0]
    return word_errors(text, heard, EnglishNormalizer()).wer, heard


def load_or_skip(engine: str) -> tts.Voice:
    try:
        return tts.load_voice(tts.VoiceOptions(engine=engine, threads=1))
    except tts.VoiceUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.integration
@pytest.mark.parametrize("engine", tts.ENGINES)
def test_each_voice_is_understood_by_whisper(whisper, engine):
    voice = load_or_skip(engine)
    wer, heard = heard_wer(whisper, speak_text(voice, REPLY), voice.sample_rate, REPLY)
    assert wer <= MAX_WER, heard


@pytest.mark.integration
def test_generate_speech_out_is_understood_by_whisper(whisper, default_blsp, monkeypatch, capsys, tmp_path):
    from blsp_chat import cli, weights

    monkeypatch.setattr(weights, "load_pretrained", lambda *args, **kwargs: default_blsp)
    out = tmp_path / "reply.wav"
    # A question whose reply is plain English: about Paris the model opens with "Bonjour", which the English-only
    # Whisper hears as "Bunchier", and piper's unseeded noise then decides whether one more word slips.
    rc = cli.main(["generate", "--text", "Why do people like to read books?", "--max-new-tokens", "60",
                   "--speech-out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    reply = captured.out.strip()
    assert len(reply.split()) >= 5, reply  # enough words for a WER to mean something
    audio, rate = sf.read(out, dtype="float32")
    wer, heard = heard_wer(whisper, audio, rate, reply)
    assert wer <= MAX_WER, (reply, heard)


def test_spoken_reply_plays_the_first_sentence_while_the_text_streams():
    voice = load_or_skip("espeak-ng")
    played, first_played = [], threading.Event()

    def play(audio, rate):
        played.append((len(audio), rate))
        first_played.set()

    reply = SpokenReply(voice, play)
    for delta in stream_of("Paris is the capital of France. It is "):
        reply.feed(delta)
    # The reply's text has not ended, yet the first sentence is spoken (no wall-clock limit: a generous wait).
    assert first_played.wait(timeout=60)
    assert reply.spoken == ["Paris is the capital of France."] or played
    for delta in stream_of("a large city."):
        reply.feed(delta)
    reply.finish()
    assert reply.wait(timeout=60)
    assert reply.spoken == ["Paris is the capital of France.", "It is a large city."]
    assert len(played) == 2 and all(n > 0 and rate == voice.sample_rate for n, rate in played)


def test_stop_cuts_the_reply_short():
    voice = load_or_skip("espeak-ng")
    playing, release = threading.Event(), threading.Event()

    def play(audio, rate):
        playing.set()
        release.wait(timeout=60)  # "plays" until stopped

    reply = SpokenReply(voice, play, stop_playback=release.set)
    reply.feed("One sentence. Two sentences. Three sentences. ")
    assert playing.wait(timeout=60)
    reply.stop()
    assert reply.wait(timeout=60) and reply.spoken == []


# --- a missing voice --------------------------------------------------------------------------------------------
@pytest.fixture
def no_voice(monkeypatch, tmp_path):
    """Neither piper's voice nor espeak-ng can be found."""
    monkeypatch.setattr(tts, "piper_voice_packages", lambda: {})
    monkeypatch.setenv("PATH", str(tmp_path))


def test_a_missing_voice_gives_a_notice_not_a_crash(no_voice):
    voice, notice = tts.try_load_voice()
    assert voice is None
    assert "piper" in notice and "espeak-ng is not installed" in notice and "text only" in notice
    with pytest.raises(ValueError, match="unknown voice engine"):
        tts.VoiceOptions(engine="festival")


@pytest.fixture(scope="module")
def tiny_loaded():
    from blsp_chat.weights import LoadedBlsp
    from tiny import lively_blsp, tiny_tokenizer

    return LoadedBlsp(lively_blsp(seed=5), tiny_tokenizer(), "tiny", adapter_trained=True)


def test_generate_without_a_voice_still_prints_the_reply(no_voice, tiny_loaded, monkeypatch, capsys, tmp_path):
    from blsp_chat import cli, weights

    monkeypatch.setattr(weights, "load_pretrained", lambda *args, **kwargs: tiny_loaded)
    out = tmp_path / "reply.wav"
    rc = cli.main(["generate", "--text", "hello", "--max-new-tokens", "8", "--speech-out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and not out.exists()
    assert captured.out.strip()  # the text reply
    assert "no voice for spoken replies" in captured.err and "was not written" in captured.err


# --- the terminal chat's spoken and hands-free paths --------------------------------------------------------
class FakePlayer:
    def __init__(self):
        self.clips = []

    def play(self, audio, rate):
        self.clips.append((audio, rate))

    def stop(self):
        pass


def chat_with(loaded, **kwargs):
    from blsp_chat.cli import TerminalChat
    from blsp_chat.config import GenerationOptions

    return TerminalChat(loaded, GenerationOptions(max_new_tokens=12), read_line=lambda prompt: "", **kwargs)


def test_chat_speak_plays_each_reply(tiny_loaded, capsys):
    voice, player = load_or_skip("espeak-ng"), FakePlayer()
    chat = chat_with(tiny_loaded, voice=voice, player=player)
    chat.handle("hello there")
    printed = capsys.readouterr().out
    reply = chat.session.turns[-1].text
    assert "bot> " in printed and reply.strip()
    if any(ch.isalnum() for ch in reply):
        assert player.clips and all(rate == voice.sample_rate for _, rate in player.clips)


def test_chat_hands_free_sends_each_turn_at_its_pause(tiny_loaded, clips, monkeypatch, capsys):
    from blsp_chat import cli

    stream, _ = join(clips[1:3], PAUSE_S)
    block = 1600

    class RecordedMicrophone:
        """The microphone plays back a recording, then the input ends."""
        device_name, sample_rate = "recording", SAMPLE_RATE

        def __init__(self, device=None, max_seconds=None):
            self.blocks = [stream[i:i + block, None] for i in range(0, len(stream), block)] + [np.zeros((0, 1))]

        def start(self):
            pass

        def read_block(self, timeout):
            return self.blocks.pop(0)

        def drain(self):
            pass

        def cancel(self):
            pass

    monkeypatch.setattr(cli, "Recorder", RecordedMicrophone)  # where the chat looks it up
    chat = chat_with(tiny_loaded)
    chat.listen("")
    printed = capsys.readouterr().out
    human = [t for t in chat.session.turns if t.role == "human"]
    assert len(human) == 2 and printed.count("(hearing you...)") == 2 and printed.count("bot> ") == 2
    assert printed.count("(sent ") == 2


def test_speech_out_wav_is_written_at_the_voice_rate(tmp_path):
    voice = load_or_skip("espeak-ng")
    audio = speak_text(voice, REPLY)
    path = Path(tmp_path) / "x.wav"
    sf.write(path, audio, voice.sample_rate)
    assert sf.info(path).samplerate == voice.sample_rate and sf.info(path).duration > 3


def test_chat_barge_in_stops_the_spoken_reply_within_half_a_second(tiny_loaded, clips, monkeypatch, capsys):
    """Hands-free with --barge-in: the second question is spoken while the first reply plays; the reply's
    playback is stopped within BARGE_IN_S of that speech starting (counted in microphone audio), and the
    second question is sent as the next turn."""
    from blsp_chat import cli

    voice = load_or_skip("espeak-ng")
    stream, spans = join(clips[1:3], PAUSE_S)
    second_starts = spans[1][0] + speech_onset(clips[2])  # the first word of the second question
    block = SAMPLE_RATE // 50
    playing, stopped = threading.Event(), threading.Event()
    heard = {"at": 0, "stopped_at": None}

    class RecordedMicrophone:
        """Plays back the recording; the second question starts only once the first reply is playing."""
        device_name, sample_rate = "recording", SAMPLE_RATE

        def __init__(self, device=None, max_seconds=None):
            pass

        def start(self):
            pass

        def read_block(self, timeout):
            at = heard["at"]
            if at + block > second_starts and not playing.is_set():
                playing.wait(timeout=60)
            heard["at"] = at + block
            return stream[at:at + block, None] if at < len(stream) else np.zeros((0, 1), np.float32)

        def drain(self):
            pass

        def cancel(self):
            pass

    class InterruptiblePlayer:
        """The first clip "plays" until stopped; later ones return at once."""

        def play(self, audio, rate):
            if not playing.is_set():
                playing.set()
                stopped.wait(timeout=60)

        def stop(self):
            if playing.is_set() and heard["stopped_at"] is None:
                heard["stopped_at"] = heard["at"]
                stopped.set()

    monkeypatch.setattr(cli, "Recorder", RecordedMicrophone)  # where the chat looks it up
    chat = chat_with(tiny_loaded, voice=voice, player=InterruptiblePlayer(), barge_in=True)
    chat.options = chat.options.__class__(max_new_tokens=40)
    chat.listen("")
    printed = capsys.readouterr().out
    assert playing.is_set(), printed  # the first reply was spoken
    assert heard["stopped_at"] is not None, printed
    assert 0 < heard["stopped_at"] - second_starts <= BARGE_IN_S * SAMPLE_RATE
    assert "[interrupted]" in printed
    human = [t for t in chat.session.turns if t.role == "human"]
    assert len(human) == 2 and printed.count("(sent ") == 2
    assert chat.session.turns[1].text == "", "the reply was cut in its first sentence: nothing of it was heard"


def test_a_microphone_that_fails_to_start_is_reported_and_the_chat_goes_on(tiny_loaded, monkeypatch, capsys):
    from blsp_chat import cli

    class BusyMicrophone:
        device_name, sample_rate = "busy mic", SAMPLE_RATE

        def __init__(self, device=None, max_seconds=None):
            pass

        def start(self):
            raise OSError("Device unavailable [PaErrorCode -9985]")

        def read_block(self, timeout):
            raise AssertionError("never started: nothing to read")

    monkeypatch.setattr(cli, "Recorder", BusyMicrophone)  # where the chat looks it up
    chat = chat_with(tiny_loaded)
    chat.handle("/listen")
    chat.handle("hello")
    printed = capsys.readouterr().out
    assert "error: could not start listening on busy mic" in printed and "bot> " in printed


# --- the page: hands-free chunks, spoken replies, barge-in, heard words -----------------------------------
BROWSER_RATE = 48000      # what Chromium records at
BROWSER_CHUNK_S = 0.5     # as ui.STREAM_EVERY_S sends them


def browser_chunks(audio16k: np.ndarray, directory: Path) -> list[str]:
    """A 16 kHz recording as the page's streaming microphone delivers it: 48 kHz int16 wav files of 0.5 s."""
    audio = resample(audio16k, SAMPLE_RATE, BROWSER_RATE)
    step, paths = int(BROWSER_CHUNK_S * BROWSER_RATE), []
    for index, start in enumerate(range(0, len(audio), step)):
        path = directory / f"chunk{index:04d}.wav"
        sf.write(path, audio[start:start + step], BROWSER_RATE, subtype="PCM_16")
        paths.append(str(path))
    return paths


def test_live_turns_hear_browser_chunks(clips):
    stream, spans = join(clips[:2], PAUSE_S)
    audio = (resample(stream, SAMPLE_RATE, BROWSER_RATE) * 32767).astype(np.int16)
    live, ends = LiveTurns(), []
    for start in range(0, len(audio), BROWSER_RATE // 4):
        ends += [e for e in live.feed(BROWSER_RATE, audio[start:start + BROWSER_RATE // 4]) if e.kind == TURN_END]
    assert len(ends) == 2
    for event, (start, end) in zip(ends, spans):
        assert abs(len(event.audio) - (end - start)) < SAMPLE_RATE  # the whole clip, give or take its edges
    with pytest.raises(ValueError, match="int16 or float"):
        live.feed(BROWSER_RATE, np.zeros(10, np.int32))


def test_paced_player_hands_over_each_clip_and_stop_cuts_the_wait():
    player = PacedPlayer(start_delay_s=0.0)
    player.play(np.zeros(160, np.float32), SAMPLE_RATE)  # 10 ms: returns once "played"
    rate, clip = player.take()
    assert rate == SAMPLE_RATE and len(clip) == 160 and player.take() is None
    waiting = threading.Thread(target=player.play, args=(np.zeros(SAMPLE_RATE * 600, np.float32), SAMPLE_RATE))
    waiting.start()
    player.stop()
    waiting.join(timeout=30)
    assert not waiting.is_alive(), "stop() must end a clip's wait at once"
    player.play(np.zeros(160, np.float32), SAMPLE_RATE)
    assert player.take() is not None and player.take() is None  # the stopped clip; nothing after stop()


def test_piper_speaks_the_same_sentence_the_same_way_in_each_run():
    first = load_or_skip("piper").synthesize("The capital of France is Paris.")
    again = tts.load_voice(tts.VoiceOptions(engine="piper")).synthesize("The capital of France is Paris.")
    np.testing.assert_array_equal(first, again)


def test_heard_words_are_the_ctc_readouts_word_pieces():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5)
    audio = tone(2.0)
    with torch.no_grad():  # word embeddings spread as a trained LLM's are: the readout's posteriors are sharp
        model.llama_model.get_input_embeddings().weight.mul_(30)
        model.match_speech_scale_to_embeddings()
        (outputs,) = model.adapt_windows(model.encode_windows([audio]))
        labels = embedding_distance_logits(outputs, model.llama_model.get_input_embeddings().weight).argmax(-1)
        (speech,) = model.encode_speech([audio])
    assert heard_piece_ids(model, speech) == collapse_ctc(labels.tolist(), 5)
    assert isinstance(heard_text(model, tiny_tokenizer(), speech), str)
    assert heard_piece_ids(tiny_blsp("none"), speech) is None  # the paper's readout reads no words


@pytest.fixture(scope="module")
def ctc_loaded():
    """A tiny "ctc"-readout model that hears words in any clip (its readout's blank is an unused id)."""
    model = lively_blsp(seed=3)
    model.config = BlspConfig(**{**model.config.__dict__, "speech_readout": "ctc", "ctc_blank_id": 300})
    return LoadedBlsp(model, tiny_tokenizer(), "/home/someone/models/tiny-ctc", adapter_trained=True)


def page_handlers(loaded, **kwargs):
    return ChatHandlers(loaded, max_audio_seconds=60, **kwargs)


SETTINGS = (24, False, 0.7, 0.9, 1.0)  # max new tokens, sample, temperature, top-p, repetition penalty


def listen_to(handlers, paths, chat, stop_when=lambda outputs: False):
    """Feed the page's listen handler chunk files; returns (chat, the outputs of each call)."""
    calls = []
    for path in paths:
        chat, trigger, reply_audio = handlers.listen(path, True, chat)
        calls.append((trigger, reply_audio))
        if stop_when((trigger, reply_audio)):
            break
    return chat, calls


def is_trigger(value) -> bool:
    return isinstance(value, str)


def test_page_hands_free_turn_is_sent_at_the_pause_with_the_words_heard(ctc_loaded, clips, tmp_path):
    handlers = page_handlers(ctc_loaded)
    stream, _ = join(clips[1:2], PAUSE_S)
    chat, calls = listen_to(handlers, browser_chunks(stream, tmp_path), None)
    triggers = [trigger for trigger, _ in calls if is_trigger(trigger)]
    assert triggers == ["1"], "one turn, ended by its pause"
    *_, (messages, chat, _) = handlers.take_heard_turn(triggers[0], "Chat", "German", *SETTINGS, chat, False)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"].strip()
    clip, heard = messages[0]["content"]
    assert sf.info(clip["path"]).duration > 1.0, "the turn's audio, for the chat's bubble"
    assert heard.startswith("*heard:*") and len(heard) > len("*heard:* ")
    assert chat.session.turns[0].speech_tokens > 0
    *_, (again, chat, _) = handlers.take_heard_turn("1", "Chat", "German", *SETTINGS, chat, False)
    assert len(again) == 2, "a trigger with no turn waiting sends nothing"


def test_page_speaks_the_reply_and_a_missing_voice_leaves_text(ctc_loaded):
    voice = load_or_skip("espeak-ng")
    handlers = page_handlers(ctc_loaded, voice_options=tts.VoiceOptions(engine="espeak-ng"))
    updates = list(handlers.send("hello there", None, "Chat", "German", *SETTINGS, None, True))
    clips = [update[-1] for update in updates if isinstance(update[-1], tuple)]
    reply = updates[-1][0][1]["content"]
    if any(ch.isalnum() for ch in reply):
        assert clips and all(rate == voice.sample_rate and len(audio) for rate, audio in clips)
        assert sf.info(updates[-1][0][2]["content"]["path"]).samplerate == voice.sample_rate, "its audio, under it"

    silent = page_handlers(ctc_loaded, voice_options=tts.VoiceOptions(engine="piper", piper_voice="nobody"))
    updates = list(silent.send("hello there", None, "Chat", "German", *SETTINGS, None, True))
    messages = updates[-1][0]
    assert "text only" in messages[1]["content"] and messages[-1]["role"] == "assistant"
    assert messages[-1]["content"].strip(), "the reply itself, as text"
    assert not any(isinstance(update[-1], tuple) for update in updates)
    updates = list(silent.send("and again", None, "Chat", "German", *SETTINGS, updates[-1][1], True))
    assert sum("text only" in str(m["content"]) for m in updates[-1][0]) == 1, "the notice is given once"


def test_page_barge_in_stops_the_spoken_reply_and_keeps_what_was_said(ctc_loaded, clips, tmp_path):
    """A reply is being spoken when the user speaks again: the reply stops, stays in the history as far as
    it was heard, and the new speech becomes the next turn."""
    load_or_skip("espeak-ng")
    handlers = page_handlers(ctc_loaded, voice_options=tts.VoiceOptions(engine="espeak-ng"))
    first, _ = join(clips[1:2], PAUSE_S)
    (tmp_path / "a").mkdir()
    chat, _ = listen_to(handlers, browser_chunks(first, tmp_path / "a"), None)
    settings = (40, False, 0.7, 0.9, 1.0)
    updates = handlers.take_heard_turn("1", "Chat", "German", *settings, chat, True)
    spoken = []
    for update in updates:  # until the reply's first sentence is handed to the page to play
        if isinstance(update[-1], tuple):
            spoken.append(update[-1])
            break
    assert spoken and chat.reply is not None, "the reply is being spoken"
    second, _ = join(clips[2:3], PAUSE_S)
    (tmp_path / "b").mkdir()
    chat, calls = listen_to(handlers, browser_chunks(second, tmp_path / "b"), chat)
    assert any(reply_audio is None for _, reply_audio in calls), "barge-in stops the page's playback"
    rest = list(updates)
    assert chat.reply is None
    messages = rest[-1][0]
    assert "interrupted" in messages[-1]["content"]
    kept = chat.session.turns[-1]
    assert kept.role == "assistant" and kept.text in messages[-1]["content"]
    audio_messages = [m for m in messages if isinstance(m["content"], dict)]
    assert len(audio_messages) == (1 if kept.text else 0), "the reply's audio as heard joins it, if any was heard"
    assert [t for t, _ in calls if is_trigger(t)] == ["2"], "the new speech ended as the next turn"
    *_, (messages, chat, _) = handlers.take_heard_turn("2", "Chat", "German", *SETTINGS, chat, False)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2


@pytest.mark.parametrize("sentences, kept", [
    ([], ""), (["Paris is big."], "Paris is big."), (["Paris is big.", "It is old!"], "Paris is big. It is old!"),
    (["Paris is big.", "Not said."], "Paris is big."),
])
def test_spoken_prefix_is_the_reply_as_far_as_it_was_heard(sentences, kept):
    assert spoken_prefix("Paris is big. It is old!\nSee it.", sentences) == kept


def test_trim_last_reply_and_last_speech(ctc_loaded):
    session = ChatSession.from_loaded(ctc_loaded)
    session.submit_text("hello")
    assert session.last_speech() is None
    list(session.stream_reply(GenerationOptions(max_new_tokens=6)))
    session.trim_last_reply("he")
    assert session.turns[-1].text == "he"
    session.submit_audio(tone(1.5))
    assert session.last_speech().shape[0] == session.turns[-1].speech_tokens
    with pytest.raises(ValueError, match="no reply to trim"):
        session.trim_last_reply("x")
    list(session.stream_reply(GenerationOptions(max_new_tokens=6)))  # the trimmed history still replies


def test_page_names_the_model_never_a_path(ctc_loaded):
    assert model_name(ctc_loaded) == "whisper-dir + llm-dir"
    snapshot = "/root/.cache/huggingface/hub/models--cwang621--blsp/snapshots/0123abcd"
    assert model_name(LoadedBlsp(ctc_loaded.model, None, snapshot, True)) == "cwang621/blsp"
    assert model_name(LoadedBlsp(ctc_loaded.model, None, "Qwen/some-blsp", True)) == "Qwen/some-blsp"


def test_generation_runs_under_spaces_gpu_when_the_package_is_there(ctc_loaded, monkeypatch):
    def handler():
        return "ran"

    assert on_gpu(handler) is handler  # no `spaces` package here
    wrapped = []
    fake = types.ModuleType("spaces")

    def gpu(duration):
        def decorate(fn):
            def on_the_gpu(*args, **kwargs):
                return fn(*args, **kwargs)
            wrapped.append(fn.__name__)
            return on_the_gpu
        return decorate

    fake.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert on_gpu(handler)() == "ran"
    build_demo(ctc_loaded)
    assert {"send", "regenerate", "take_heard_turn"} <= set(wrapped)


# --- the reply's audio in the conversation, and the session's wav files ----------------------------------
class ToneVoice:
    """A voice that says each sentence as a short tone: spoken replies at test speed, of a known length."""

    sample_rate = 22050
    description = "a tone per sentence"
    seconds = 0.2

    def synthesize(self, text: str) -> np.ndarray:
        samples = np.arange(int(self.seconds * self.sample_rate))
        return (0.3 * np.sin(2 * np.pi * 330 * samples / self.sample_rate)).astype(np.float32)


@pytest.fixture
def tone_voice(monkeypatch):
    monkeypatch.setattr(ui, "try_load_voice", lambda options: (ToneVoice(), None))


def spoken_turn(handlers, chat, clip: np.ndarray, directory: Path, speak: bool = True):
    """A hands-free turn on the page: `clip` heard through the streaming microphone, then sent at its
    pause and answered (spoken with `speak`). Returns (chat, every update of the reply's stream)."""
    directory.mkdir()
    stream, _ = join([clip], PAUSE_S)
    chat, calls = listen_to(handlers, browser_chunks(stream, directory), chat)
    trigger = [t for t, _ in calls if is_trigger(t)][-1]
    updates = list(handlers.take_heard_turn(trigger, "Chat", "German", *SETTINGS, chat, speak))
    return updates[-1][1], updates


def shown_paths(messages) -> list[Path]:
    return sorted(ui.paths_shown(messages))


def test_page_spoken_reply_joins_the_conversation_under_its_text_and_undo_removes_it(ctc_loaded, clips, tone_voice,
                                                                                       tmp_path):
    import gradio as gr  # here: the page's own format, as the Chatbot component takes it

    handlers = page_handlers(ctc_loaded)
    chat, updates = spoken_turn(handlers, None, clips[1], tmp_path / "a")
    messages = updates[-1][0]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    reply, audio = messages[1]["content"], messages[2]["content"]
    assert isinstance(reply, str) and reply.strip(), "the reply's text, with its audio right under it"
    played = [update[-1] for update in updates if isinstance(update[-1], tuple)]  # (rate, clip) for the player
    recorded, rate = sf.read(audio["path"], dtype="float32")
    assert played and rate == ToneVoice.sample_rate
    np.testing.assert_allclose(recorded, np.concatenate([clip for _, clip in played]), atol=1e-4,
                               err_msg="the sentences joined, as the page played them")
    shown = gr.Chatbot().postprocess(messages).root
    assert shown[2].role == "assistant" and shown[2].content[0].file.mime_type.startswith("audio/")
    assert [(t.role, t.text) for t in chat.session.turns][1] == ("assistant", reply), "the history stays text"

    messages, chat = handlers.undo(chat)
    assert messages == [] and len(chat.session.turns) == 0 and chat.turn_sizes == []
    assert not Path(audio["path"]).exists(), "the undone reply's audio is deleted"
    assert not any(handlers.turn_dir.iterdir()), "and the turn's wav"


def test_page_deletes_the_wavs_no_message_shows_and_keeps_the_rest(ctc_loaded, clips, tone_voice, tmp_path):
    handlers = page_handlers(ctc_loaded)
    chat, _ = spoken_turn(handlers, None, clips[1], tmp_path / "a")
    first = shown_paths(chat.messages)
    chat, _ = spoken_turn(handlers, chat, clips[2], tmp_path / "b")
    turn, reply = Path(chat.messages[3]["content"][0]["path"]), Path(chat.messages[5]["content"]["path"])
    assert len(first) == 2 and sorted(handlers.turn_dir.iterdir()) == sorted(first + [turn, reply]), \
        "each exchange: the turn's wav and the reply's"

    *_, (messages, chat, _) = handlers.regenerate(*SETTINGS, chat, True)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"] * 2
    new_reply = Path(messages[5]["content"]["path"])
    assert new_reply != reply and new_reply.exists() and turn.exists()
    assert not reply.exists(), "the regenerated reply's old audio is deleted"
    assert len(chat.session.turns) == 4 and all(isinstance(t.text, str) for t in chat.session.turns)

    messages, chat = handlers.undo(chat)
    assert shown_paths(messages) == first and all(path.exists() for path in first)
    assert sorted(handlers.turn_dir.iterdir()) == first, "the undone exchange's wavs are deleted"

    other, _ = spoken_turn(handlers, None, clips[3], tmp_path / "c")
    others = shown_paths(other.messages)
    messages, other = handlers.clear(other)
    assert messages == [] and not any(path.exists() for path in others), "Clear deletes the session's wavs"

    forget_chat(chat)  # Gradio dropped the session's state
    assert not any(handlers.turn_dir.iterdir()) and chat.session.cached_tokens == 0


class BrokenVoice(ToneVoice):
    def synthesize(self, text: str) -> np.ndarray:
        raise RuntimeError("the synthesizer crashed")


def test_page_voice_that_breaks_leaves_the_text_and_says_so_under_it(ctc_loaded, monkeypatch):
    monkeypatch.setattr(ui, "try_load_voice", lambda options: (BrokenVoice(), None))
    handlers = page_handlers(ctc_loaded)
    updates = list(handlers.send("hello there", None, "Chat", "German", *SETTINGS, None, True))
    (messages, chat, *_), played = updates[-1], [u[-1] for u in updates if isinstance(u[-1], tuple)]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"] and not played
    assert messages[1]["content"].strip() and "synthesizer crashed" in messages[2]["content"], "no audio; why"
    assert chat.turn_sizes == [3] and not any(handlers.turn_dir.iterdir())
    messages, chat = handlers.undo(chat)
    assert messages == []


def test_a_refused_hands_free_turn_leaves_no_wav(ctc_loaded, clips, tmp_path):
    handlers = ChatHandlers(ctc_loaded, max_audio_seconds=1.0)  # every spoken turn is too long
    chat, updates = spoken_turn(handlers, None, clips[1], tmp_path / "a", speak=False)
    assert "1" in updates[-1][0][-1]["content"] and chat.messages == []
    assert not any(handlers.turn_dir.iterdir())


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_the_turn_folder_goes_when_the_server_process_ends(ending):
    """At a normal exit, and when stopped by SIGTERM (app.py makes that an exit, as a platform stops a Space)."""
    program = ("import sys, time\n"
               "from blsp_chat import app\n"
               "from blsp_chat.ui import ChatHandlers\n"
               "handlers = ChatHandlers(None, 60)\n"
               "(handlers.turn_dir / 'turn-x.wav').write_bytes(b'RIFF')\n"
               "app.exit_on_sigterm()\n"
               "print(handlers.turn_dir, flush=True)\n"
               "if sys.argv[1] == 'sigterm':\n"
               "    time.sleep(300)\n")
    server = subprocess.Popen([sys.executable, "-c", program, ending], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    folder = Path(server.stdout.readline().strip())
    assert folder.name.startswith("blsp-chat-turns-") and folder.is_dir(), server.stderr.read()
    if ending == "sigterm":
        server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) == (0 if ending == "exit" else 128 + signal.SIGTERM)
    assert not folder.exists()
