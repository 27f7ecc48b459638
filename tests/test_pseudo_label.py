"""Pseudo-labelled real speech (train/pseudo_label.py): the voice lines are found and the rest left, long
readings are cut at their pauses, untrustworthy transcripts and dev-set clips are refused, and Whisper's
labels on a real recording are close to what was said."""
import io
import json
import math
import zipfile

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.audio import load_audio
from blsp_chat.constants import SAMPLE_RATE
from train import pseudo_label
from train.metrics import word_errors
from train.pseudo_label import UnlabelledRecording
from train.real_speech import SourceMissing

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-{}.wav"


def ogg_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="OGG", subtype="VORBIS")
    return buffer.getvalue()


def real_clip(name: str = "0880") -> np.ndarray:
    return load_audio(LIBRIVOX.format(name))


@pytest.fixture
def base_wz(tmp_path):
    """An archive laid out as warzone2100's base.wz: voice lines, weapon sounds, cutscene audio, images."""
    path = tmp_path / "base.wz"
    speech = ogg_bytes(real_clip())
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("audio/tutorial/tut25.ogg", speech)
        archive.writestr("audio/memressp/research/pcv354.ogg", speech)
        archive.writestr("audio/sfx/weapons/rocket.ogg", speech)
        archive.writestr("audio/radclick/radclik2.ogg", speech)
        archive.writestr("sequenceaudio/nexend.ogg", speech)
        archive.writestr("images/intfac.png", b"\x89PNG")
    return path


def test_the_warzone_voice_lines_are_found_and_the_sound_effects_left(base_wz):
    recordings = list(pseudo_label.warzone_recordings(base_wz))
    assert [r.clip_id for r in recordings] == ["memressp__research__pcv354", "tutorial__tut25"]
    assert recordings[1].origin == f"{base_wz}:audio/tutorial/tut25.ogg"
    assert len(load_audio(recordings[1].read())) == pytest.approx(len(real_clip()), abs=SAMPLE_RATE // 50)


def test_a_missing_warzone_package_is_named_with_how_to_install_it(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install warzone2100-data"):
        list(pseudo_label.warzone_recordings(tmp_path / "base.wz"))


@pytest.fixture
def hedgewars_voices(tmp_path):
    """Voice packs laid out as hedgewars-data's: English packs, a Spanish one, and a file that is not audio."""
    speech = ogg_bytes(real_clip())
    for pack, line in [("British", "Leavemealone"), ("Pirate", "Jump2"), ("Default_es", "Hello")]:
        (tmp_path / pack).mkdir(exist_ok=True)
        (tmp_path / pack / f"{line}.ogg").write_bytes(speech)
    (tmp_path / "British" / "README").write_text("not a voice line")
    return tmp_path


def test_the_english_hedgewars_lines_are_found_with_what_their_names_spell(hedgewars_voices):
    recordings = list(pseudo_label.hedgewars_recordings(hedgewars_voices))
    assert [(r.clip_id, r.spelled) for r in recordings] == [("British__Leavemealone", "leavemealone"),
                                                             ("Pirate__Jump2", "jump")]
    assert len(load_audio(recordings[0].read())) == pytest.approx(len(real_clip()), abs=SAMPLE_RATE // 50)


def test_a_missing_hedgewars_package_is_named_with_how_to_install_it(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install hedgewars-data"):
        list(pseudo_label.hedgewars_recordings(tmp_path / "voices"))


@pytest.mark.parametrize("text, problem", [
    ("Leave me alone!", None),
    ("leave me, alone.", None),
    ("Leave me a loan", "not its file name"),
    ("Leave me alone now", "not its file name"),
])
def test_a_label_must_spell_what_the_file_name_says(text, problem):
    assert pseudo_label.transcript_problem(text, 1.5, spelled="leavemealone") == problem


def test_a_long_reading_is_cut_at_its_pauses_and_a_short_one_kept_whole():
    first, second = real_clip("0880"), real_clip("0870")
    pause = np.zeros(SAMPLE_RATE, dtype=np.float32)
    reading = np.concatenate([first, pause, second])
    parts = pseudo_label.segments(reading, max_seconds=8.0)
    assert len(parts) == 2
    assert len(parts[0]) / SAMPLE_RATE == pytest.approx(len(first) / SAMPLE_RATE, abs=0.8)
    assert len(parts[1]) / SAMPLE_RATE == pytest.approx(len(second) / SAMPLE_RATE, abs=0.8)
    assert [len(p) for p in pseudo_label.segments(first, max_seconds=8.0)] == [len(first)]


@pytest.mark.parametrize("text, seconds, problem", [
    ("", 2.0, "no words"),
    (" ... ♪ ", 2.0, "no words"),
    ("the end " * 12, 12.0, "loop"),
    ("one two three four five six seven eight nine ten eleven twelve", 1.0, "12.0 words/s"),
    ("he was not an ill disposed young man", 3.0, None),
])
def test_untrustworthy_transcripts_are_refused_with_the_reason(text, seconds, problem):
    assert pseudo_label.transcript_problem(text, seconds) == problem


def recording(source: str, clip_id: str, audio: np.ndarray) -> UnlabelledRecording:
    data = ogg_bytes(audio) if source != "wav" else None
    if data is None:
        buffer = io.BytesIO()
        sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        data = buffer.getvalue()
    return UnlabelledRecording(source, clip_id, f"test:{clip_id}", lambda: data)


def test_the_build_keeps_trusted_clips_and_refuses_dev_clips_and_bad_labels(tmp_path):
    dev_dir = tmp_path / "dev"
    (dev_dir / "wav").mkdir(parents=True)
    sf.write(dev_dir / "wav" / "0880.wav", real_clip("0880"), SAMPLE_RATE, subtype="PCM_16")
    (dev_dir / "manifest.jsonl").write_text(json.dumps({"id": "librivox/0880", "audio": "wav/0880.wav",
                                                        "text": "he was not an ill disposed young man"}) + "\n")
    dev_copy = load_audio(dev_dir / "wav" / "0880.wav")  # the dev clip, shipped again in another package
    other, noise, hum = real_clip("0870"), real_clip("0890"), real_clip("0930")
    labels = {len(other): "And Mr. John Dashwood had then leisure.", len(noise): "you you you you you you you you",
              len(hum): "Mmm."}  # a filler: no word left once normalised

    def transcribe(audios):
        return [labels[len(a)] for a in audios]

    sources = {"wav": lambda: iter([recording("wav", "dev", dev_copy), recording("wav", "other", other),
                                    recording("wav", "noise", noise), recording("wav", "hum", hum)])}
    out = tmp_path / "out"
    records = pseudo_label.build(out, sources, transcribe, exclude=pseudo_label.excluded_digests([dev_dir /
                                                                                                  "manifest.jsonl"]))
    assert [r["id"] for r in records] == ["wav/other"]
    assert records[0]["text_raw"] == "And Mr. John Dashwood had then leisure."
    assert records[0]["text"] == "and mister john dashwood had then leisure"
    assert records[0]["pseudo_label"] == "whisper-tiny.en"
    written = load_audio(out / records[0]["audio"])
    assert np.abs(written - other).max() < 1e-3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refused_by_reason"] == {"a dev-set clip": 1, "loop": 1, "no words": 1}
    assert [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()] == ["wav/other"]


def test_shipped_words_are_taken_as_they_are_and_whisper_hears_only_the_rest(tmp_path):
    """A game's subtitles are its lines' transcripts: Whisper is not asked for them (it is for the clip without),
    they are checked like Whisper's, and a line too long to keep whole is refused rather than cut from its words."""
    asked = []

    def transcribe(audios):
        asked.extend(len(a) for a in audios)
        return ["And Mr. John Dashwood had then leisure."] * len(audios)

    said, unsaid, long_line, fast = real_clip("0880"), real_clip("0930"), real_clip("0870"), real_clip("0890")
    sixty_words = " ".join(f"W{n}" for n in range(60))
    sources = {"game": lambda: iter([
        UnlabelledRecording("game", "said", "test:said", lambda: ogg_bytes(said), transcript="HE WAS NOT ILL DISPOSED"),
        UnlabelledRecording("game", "unsaid", "test:unsaid", lambda: ogg_bytes(unsaid)),
        UnlabelledRecording("game", "long", "test:long", lambda: ogg_bytes(long_line), transcript="A LONG LINE"),
        UnlabelledRecording("game", "fast", "test:fast", lambda: ogg_bytes(fast), transcript=sixty_words),
    ])}
    max_seconds = (len(long_line) / SAMPLE_RATE) - 0.5
    assert len(said) / SAMPLE_RATE < max_seconds and len(unsaid) / SAMPLE_RATE < max_seconds
    records = pseudo_label.build(tmp_path, sources, transcribe, max_segment_seconds=max_seconds)
    assert asked == [len(load_audio(ogg_bytes(unsaid)))]
    assert [(r["id"], r["text"], r["pseudo_label"]) for r in records] == [
        ("game/said", "he was not ill disposed", "subtitles"),
        ("game/unsaid", "and mister john dashwood had then leisure", "whisper-tiny.en")]
    refused = {r["id"]: r["reason"] for r in json.loads((tmp_path / "summary.json").read_text())["refused"]}
    assert "transcript cannot be cut" in refused["game/long"] and refused["game/fast"].endswith("words/s")


def test_remembered_labels_spare_decoding_heard_audio_and_survive_a_torn_last_line(tmp_path):
    """A second build (a new machine with the committed file, or a build killed midway) asks Whisper only for
    audio it has not labelled, and gets the same records; another transcriber's labels are not taken."""
    said, other = real_clip("0880"), real_clip("0870")
    asked = []

    def whisper(audios):
        asked.extend(len(a) for a in audios)
        return [f"Heard {len(a)} samples." for a in audios]

    sources = {"wav": lambda: iter([recording("wav", "said", said), recording("wav", "other", other)])}
    cache = tmp_path / "labels" / "whisper-base.jsonl"
    first = pseudo_label.build(tmp_path / "a", sources, pseudo_label.RememberedLabels(whisper, cache, "whisper-base"))
    assert len(asked) == 2 and len(cache.read_text().splitlines()) == 2
    with open(cache, "a") as handle:
        handle.write('{"digest": "tor')  # the partial line of a killed writer
    again = pseudo_label.RememberedLabels(whisper, cache, "whisper-base")
    second = pseudo_label.build(tmp_path / "b", sources, again)
    assert len(asked) == 2 and again.decoded == 0
    assert [(r["id"], r["text_raw"]) for r in second] == [(r["id"], r["text_raw"]) for r in first]
    pseudo_label.RememberedLabels(whisper, cache, "whisper-tiny.en")([said])
    assert len(asked) == 3  # another Whisper's labels are its own
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["transcriber"] for r in lines] == ["whisper-base", "whisper-base", "whisper-tiny.en"]


@pytest.mark.integration
def test_whisper_labels_a_real_recording_close_to_what_was_said(whisper_tiny_en_dir, librivox_clip, tmp_path):
    path, truth = librivox_clip
    transcribe = pseudo_label.WhisperTranscriber(str(whisper_tiny_en_dir))
    sources = {"librivox": lambda: iter([UnlabelledRecording("librivox", "0870", str(path), path.read_bytes)])}
    records = pseudo_label.build(tmp_path, sources, transcribe)
    assert len(records) == 1
    errors = word_errors(truth, records[0]["text"])
    assert errors.errors / errors.reference_words < 0.15, records[0]["text"]


@pytest.mark.integration
def test_a_length_cap_stops_decoding_at_the_rate_people_speak(whisper_tiny_en_dir, librivox_clip):
    """Decoding stops at `max_tokens_per_second` of the clip: a hallucinated loop cannot run to 448 tokens, and a
    clip spoken at a normal rate is transcribed whole under the cap pseudo_label uses."""
    path, truth = librivox_clip
    audio = load_audio(path)
    capped = pseudo_label.WhisperTranscriber(str(whisper_tiny_en_dir), max_tokens_per_second=0.5)([audio])[0]
    seconds = len(audio) / SAMPLE_RATE
    assert len(capped.split()) <= math.ceil(seconds * 0.5) + 4 < len(truth.split())
    roomy = pseudo_label.WhisperTranscriber(str(whisper_tiny_en_dir),
                                            max_tokens_per_second=2 * pseudo_label.MAX_WORDS_PER_SECOND)([audio])[0]
    errors = word_errors(truth, pseudo_label.english_normalizer()[0](roomy))
    assert errors.errors / errors.reference_words < 0.15, roomy
