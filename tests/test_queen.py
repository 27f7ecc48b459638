"""Flight of the Amazon Queen's voice acting with its dialogue text (train/queen.py), as a dev-set source
(train/real_speech.py) and as training lines (train/pseudo_label.py): the resource table of queen.1c, the
.DOG dialogues cut into the segments the engine speaks, each segment paired with the voice file named after
it, and the held-out actors in the dev set only."""
import io
import struct

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.audio import load_audio
from blsp_chat.constants import SAMPLE_RATE
from train import pseudo_label, queen, real_speech
from train.real_speech import SourceMissing

CLIP_RATE = 11025  # the Debian release's MP3s


def _string(out: bytearray, text: str, align: int) -> None:
    """A length-prefixed string, padded so the next field starts on `align` bytes of the .DOG's body."""
    body = text.encode("latin-1")
    out += bytes([len(body)]) + body
    if body:
        out += b"\0" * (-len(out) % align)


def _dog(talk_key: int, joe: list[tuple[int, str]], person: list[tuple[int, str]],
         person_again: str = "0", joe_again: str = "0", levels: int = 1) -> bytes:
    """A .DOG file: its 20-byte header, the talk header, an empty dialogue tree, the sentences."""
    body = bytearray(b"\0" * (32 + levels * 96))
    for ident, text in joe:
        body += struct.pack(">hh", 0, ident)
        _string(body, text, 4)
    person_at = len(body)
    for ident, text in person:
        body += struct.pack(">hh", 0, ident)
        _string(body, text, 4)
    cutaway_at = len(body)
    body += struct.pack(">hh", 0, 0) + b"\0\0"
    again_at = len(body)
    _string(body, person_again, 2)
    _string(body, joe_again, 2)
    struct.pack_into(">5h", body, 0, levels, talk_key, talk_key, len(joe), len(person))
    struct.pack_into(">3H", body, 22, person_at, cutaway_at, again_at)
    return b"DOG HEADER 20 BYTES." + bytes(body)


def _queen1c(files: dict[str, bytes], compression: int = 1) -> bytes:
    """queen.1c as compress_queen writes it: header, table of absolute offsets, the files back to back."""
    head = struct.pack(">4s6sBBBH", b"QTBL", b"CEM10\0", 0, 0, compression, len(files))
    at = len(head) + len(files) * 21
    table = bytearray()
    for name, data in files.items():
        table += struct.pack(">12sBII", name.encode("ascii"), 1, at, len(data))
        at += len(data)
    return head + bytes(table) + b"".join(files.values())


def _mp3(seconds: float, seed: int) -> bytes:
    t = np.arange(int(seconds * CLIP_RATE)) / CLIP_RATE
    out = io.BytesIO()
    sf.write(out, 0.4 * np.sin(2 * np.pi * (150 + 20 * seed) * t), CLIP_RATE, format="MP3", subtype="MPEG_LAYER_III")
    return out.getvalue()


def _game_files() -> dict[str, bytes]:
    """Naomi (a held-out actor's character) and Bud (a training one), and Lou, whose actor is not credited."""
    naomi = _dog(37, joe=[(0, "Hi, I'm Joe.*03"), (6, "Who are you?*02")],
                 person=[(6, "*FLI'm Naomi.*00And you?*02"), (7, "*01Excuse me.*GD*00Bye.*02"), (8, "(sigh)")],
                 person_again="Hello again.*02", joe_again="0", levels=2)
    bud = _dog(8, joe=[(0, "0"), (10, "Nice hat.*XY00(237,112)Really.")], person=[(10, "Thanks Joe!")])
    lou = _dog(33, joe=[], person=[(1, "Howdy Joe.")])
    clips = ["37SSSSJ1", "370006J1", "370006P2", "370006P3", "370007P2", "370007P4", "370008P1", "37XXXXP1",
             "08000AJ1", "08000AJ2", "08000AP1", "330001P1", "370099P1"]
    files = {"NAOMI1.DOG": naomi, "BUD1.DOG": bud, "LOU1.DOG": lou, "12SSSSSS.SB": _mp3(0.3, 0)}
    files.update({f"{clip}.SB": _mp3(1.0 + 0.1 * n, n) for n, clip in enumerate(clips)})
    return files


@pytest.fixture
def game_dir(tmp_path):
    root = tmp_path / "queen"
    root.mkdir()
    (root / queen.QUEEN_FILE).write_bytes(_queen1c(_game_files()))
    return root


def test_a_sentence_is_spoken_in_the_segments_between_its_commands():
    assert queen.segments("*FLI'm Naomi.*00And you?*02") == [(1, ""), (2, "I'm Naomi."), (3, "And you?")]
    # a segment ended by *GD or *GM (Joe grabs) is not spoken, but it is counted
    assert queen.segments("Excuse me.*GD*00Bye.") == [(2, ""), (3, "Bye.")]
    assert queen.segments("Nice hat.*XY00(237,112)Really.") == [(1, "Nice hat."), (2, "Really.")]
    assert queen.segments("Thanks Joe!") == [(1, "Thanks Joe!")]


def test_each_voice_file_gets_the_segment_it_is_named_after(game_dir):
    lines = list(queen.spoken_lines(game_dir))
    # 370007P2's segment ends in *GD, 370008P1 is a sigh, 370099P1 and 12SSSSSS (a sound effect) have no
    # sentence, and Bud's opening line is "0", the game's "nothing to say"
    assert [(line.clip, line.speaker, line.subtitle, line.split) for line in lines] == [
        ("08000AJ1", "JOE", "Nice hat.", "training"), ("08000AJ2", "JOE", "Really.", "training"),
        ("08000AP1", "BUD", "Thanks Joe!", "training"), ("330001P1", "LOU", "Howdy Joe.", None),
        ("370006J1", "JOE", "Who are you?", "training"), ("370006P2", "NAOMI", "I'm Naomi.", "dev"),
        ("370006P3", "NAOMI", "And you?", "dev"), ("370007P4", "NAOMI", "Bye.", "dev"),
        ("37SSSSJ1", "JOE", "Hi, I'm Joe.", "training"),
        ("37XXXXP1", "NAOMI", "Hello again.", "dev")]
    assert lines[5].actors == ("Jessica Martin",) and lines[0].actors == (queen.JOE_ACTOR,)
    audio, rate = sf.read(io.BytesIO(lines[5].read()))
    assert rate == CLIP_RATE and len(audio) / rate == pytest.approx(1.0 + 0.1 * 2, abs=0.06)
    assert np.abs(audio).max() == pytest.approx(0.4, abs=0.05)


def test_a_voice_file_two_sentences_claim_is_left_out(tmp_path):
    files = _game_files()
    files["NAOMI2.DOG"] = _dog(37, joe=[], person=[(6, "*FLSomething else.*02")])
    (tmp_path / queen.QUEEN_FILE).write_bytes(_queen1c(files))
    clips = [line.clip for line in queen.spoken_lines(tmp_path)]
    assert "370006P3" in clips and "370006P2" not in clips


def test_an_uncompressed_speech_file_is_read_past_its_header():
    samples = np.clip(np.round(0.5 * np.sin(np.arange(CLIP_RATE) / 5) * 127 + 128), 0, 255).astype(np.uint8)
    for version, header in queen.SB_HEADER_SIZES.items():
        sb = b"\0\0" + struct.pack("<H", version) + b"\0" * (header - 4) + samples.tobytes()
        audio, rate = sf.read(io.BytesIO(queen.speech_file(sb, "SB")))
        assert rate == CLIP_RATE and len(audio) == CLIP_RATE and np.abs(audio).max() == pytest.approx(0.5, abs=0.02)
    assert queen.speech_file(b"ID3 mp3 bytes", "MP3") == b"ID3 mp3 bytes"


def test_a_truncated_or_damaged_file_is_named_as_such(tmp_path):
    whole = _queen1c(_game_files())
    path = tmp_path / queen.QUEEN_FILE
    for damaged, message in [(whole[:-100], "truncated"), (whole[:200], "truncated"),
                             (b"QTBM" + whole[4:], "no resource table"),
                             (whole[:12] + b"\x07" + whole[13:], "unknown speech compression")]:
        path.write_bytes(damaged)
        with pytest.raises(queen.QueenDataError, match=message):
            list(queen.spoken_lines(tmp_path))
    files = _game_files()
    files["BUD1.DOG"] = files["BUD1.DOG"][:60]  # its sentences cut off
    path.write_bytes(_queen1c(files))
    with pytest.raises(queen.QueenDataError, match="BUD1.DOG is damaged"):
        list(queen.spoken_lines(tmp_path))


def test_the_dev_set_takes_the_held_out_actors_and_training_the_rest(game_dir, tmp_path):
    records = real_speech.build(tmp_path / "dev", {"queen": lambda: real_speech.queen_recordings(game_dir)})
    assert [(r["id"], r["text"]) for r in records] == [
        ("queen/370006P2", "i am naomi"), ("queen/370006P3", "and you"), ("queen/370007P4", "bye"),
        ("queen/37XXXXP1", "hello again")]
    assert real_speech.group_of("queen") == "acted"
    assert records[0]["duration"] == pytest.approx(1.2, abs=0.06)
    assert records[0]["origin"] == f"{game_dir / queen.QUEEN_FILE}:370006P2.SB"

    def transcribe(audios):
        raise AssertionError("the game's text is the label; Whisper is not asked")

    trained = pseudo_label.build(tmp_path / "train", {"queen": lambda: pseudo_label.queen_recordings(game_dir)},
                                 transcribe)
    assert [(r["id"], r["text_raw"], r["pseudo_label"]) for r in trained] == [
        ("queen/08000AJ1", "Nice hat.", "subtitles"), ("queen/08000AJ2", "Really.", "subtitles"),
        ("queen/08000AP1", "Thanks Joe!", "subtitles"), ("queen/370006J1", "Who are you?", "subtitles"),
        ("queen/37SSSSJ1", "Hi, I'm Joe.", "subtitles")]
    assert not {r["id"] for r in records} & {r["id"] for r in trained}


def test_a_missing_game_is_named_with_how_to_install_it(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install flight-of-the-amazon-queen"):
        list(real_speech.queen_recordings(tmp_path / "nowhere"))
    with pytest.raises(SourceMissing, match="apt-get install flight-of-the-amazon-queen"):
        list(pseudo_label.queen_recordings(tmp_path / "nowhere"))


@pytest.mark.skipif(not (queen.QUEEN_DIR / queen.QUEEN_FILE).is_file(),
                    reason="needs apt-get install flight-of-the-amazon-queen")
def test_the_installed_game_gives_every_speakers_lines_with_their_text():
    lines = list(queen.spoken_lines())
    by_split = {split: [line for line in lines if line.split == split] for split in (queen.DEV, queen.TRAINING, None)}
    assert len(lines) == 3972 and len(by_split[queen.DEV]) == 454 and len(by_split[queen.TRAINING]) == 3289
    assert {line.speaker for line in by_split[queen.DEV]} == {"NAOMI", "SECRETARY", "ZOMBIE WOMAN", "IAN",
                                                              "PYGMY CHIEF"}
    dev_actors = {actor for line in by_split[queen.DEV] for actor in line.actors}
    assert dev_actors == set(queen.HELD_OUT_ACTORS)
    assert not dev_actors & {actor for line in by_split[queen.TRAINING] for actor in line.actors}
    known = {line.clip: line for line in lines}
    for clip, speaker, text, seconds in [("020006J1", "JOE", "At least I don't look like I need to wear one.", 3.0),
                                         ("020006P2", "ANDERSON", "I'm going to run you out of town.", 2.4),
                                         ("110001P3", "PYGMY CHIEF", "I am the chief of this pygmy village.", 3.5)]:
        line = known[clip]
        assert (line.speaker, line.subtitle) == (speaker, text)
        audio = load_audio(line.read(), max_seconds=None)  # 16 kHz mono float32, refused if silent
        assert audio.dtype == np.float32 and len(audio) / SAMPLE_RATE == pytest.approx(seconds, abs=0.2)
        assert np.sqrt(np.mean(audio ** 2)) > 0.01
    assert all(line.subtitle.strip() for line in lines)
