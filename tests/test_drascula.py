"""Drascula's voice acting with its subtitles (train/drascula.py) and as a dev-set source (train/real_speech.py):
the text tables are found at the end of drascula.dat as ScummVM's tools write it, each speech file gets its
speaker's line of the same number, files without one are left, and the hero's lines stay out of the dev set."""
import io
import struct

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.constants import SAMPLE_RATE
from train import drascula, real_speech
from train.real_speech import SourceMissing
from train.steel_sky import SPEECH_SAMPLE_RATE


def _entry(texts: list[str]) -> bytes:
    """One language's texts as drascula.dat holds them: text 0 empty, then each text's slot length (its bytes,
    its NUL, and the next slot's length field) before it."""
    out = bytearray(b"\0\0" + struct.pack(">H", 4) + b"\0\0")
    for text in texts[1:]:
        body = text.encode("latin-1") + b"\0"
        out += struct.pack(">H", len(body) + 2) + body
    return bytes(out + b"\0\0")


def _dat(tables: list[list[list[str]]], head: bytes = b"DRASCULA" + bytes(range(40))) -> bytes:
    """A drascula.dat: other tables (`head`), the language count, then 15 text tables, each [language][line]."""
    languages = len(tables[0])
    out = bytearray(head + struct.pack(">H", languages))
    for table in tables:
        out += struct.pack(">H", len(table[0]))
        for texts in table:
            entry = _entry(texts)
            out += struct.pack(">H", len(entry)) + entry
    return bytes(out)


def _tables() -> list[list[list[str]]]:
    """15 tables in English and Spanish; the hero's (0), Drascula's (1) and B.J.'s (3) have lines."""
    tables = [[["", "X"], ["", "X"]] for _ in range(drascula.TEXT_TABLE_COUNT)]
    tables[0] = [["", "THAT'S THE SECOND BIGGEST DOOR", "NOT REALLY", ""], ["", "ES LA PUERTA", "NO", ""]]
    tables[1] = [["", "HEY IGOR, HOW IS  EVERYTHING GOING?"], ["", "OYE IGOR"]]
    tables[3] = [["", "ARE YOU ALL RIGHT?", "NO, MY NAME IS BILLIE JEAN"], ["", "\xbfESTAS BIEN?", "NO"]]
    return tables


def _als(seconds: float, seed: int) -> bytes:
    t = np.arange(int(seconds * SPEECH_SAMPLE_RATE)) / SPEECH_SAMPLE_RATE
    wave = 0.4 * np.sin(2 * np.pi * (150 + 30 * np.sin(2 * t + seed)) * t)
    return np.clip(np.round(wave * 127 + 128), 0, 255).astype(np.uint8).tobytes()


@pytest.fixture
def game_dir(tmp_path):
    root = tmp_path / "en"
    root.mkdir()
    (root / "drascula.dat").write_bytes(_dat(_tables()))
    for name, seconds in [("1.ALS", 1.0), ("2.ALS", 0.5), ("3.ALS", 0.5), ("9.ALS", 0.5), ("D1.ALS", 1.5),
                          ("BJ2.ALS", 1.0), ("S1.ALS", 0.5), ("1.ALG", 0.1)]:
        (root / name).write_bytes(_als(seconds, seed=len(name)))
    return root


def test_the_text_tables_are_found_after_the_other_tables_in_each_language():
    dat = _dat(_tables())
    english = drascula.text_tables(dat)
    assert len(english) == drascula.TEXT_TABLE_COUNT
    assert english[0] == ["", "THAT'S THE SECOND BIGGEST DOOR", "NOT REALLY", ""]
    assert english[3][2] == "NO, MY NAME IS BILLIE JEAN"
    assert drascula.text_tables(dat, language=1)[3][1] == "\xbfESTAS BIEN?"
    with pytest.raises(ValueError, match="2 languages"):
        drascula.text_tables(dat, language=2)


def test_a_file_whose_tables_do_not_end_at_its_end_is_refused():
    dat = _dat(_tables())
    for damaged in (dat[:-3], dat + b"\0\0\0"):
        with pytest.raises(ValueError, match="no text tables"):
            drascula.text_tables(damaged)


def test_each_speech_file_gets_its_speakers_line_of_the_same_number(game_dir):
    lines = list(drascula.spoken_lines(game_dir))
    # 3.ALS has an empty text and 9.ALS a number past the table; S1 is a sound effect, 1.ALG a picture
    assert [(line.speaker, line.number, line.subtitle) for line in lines] == [
        ("", 1, "THAT'S THE SECOND BIGGEST DOOR"), ("", 2, "NOT REALLY"),
        ("D", 1, "HEY IGOR, HOW IS EVERYTHING GOING?"), ("BJ", 2, "NO, MY NAME IS BILLIE JEAN")]
    audio, rate = sf.read(io.BytesIO(lines[2].read()))
    assert rate == SPEECH_SAMPLE_RATE and len(audio) == int(1.5 * SPEECH_SAMPLE_RATE)
    assert np.abs(audio).max() == pytest.approx(0.4, abs=0.02)


def test_the_dev_set_takes_the_supporting_cast_and_leaves_the_hero_to_training(game_dir, tmp_path):
    records = real_speech.build(tmp_path / "dev", {"drascula": lambda: real_speech.drascula_recordings(game_dir)})
    assert [(r["id"], r["text"]) for r in records] == [
        ("drascula/D1", "hey igor how is everything going"), ("drascula/BJ2", "no my name is billie jean")]
    audio, rate = sf.read(tmp_path / "dev" / records[0]["audio"])
    assert rate == SAMPLE_RATE and records[0]["duration"] == pytest.approx(1.5, abs=0.01)
    assert records[0]["origin"] == str(game_dir / "D1.ALS")


def test_a_missing_game_is_named_with_how_to_install_it(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install drascula"):
        list(real_speech.drascula_recordings(tmp_path / "nowhere"))


@pytest.mark.skipif(not (drascula.DRASCULA_DIR / "drascula.dat").is_file(), reason="needs apt-get install drascula")
def test_the_installed_game_gives_every_speakers_lines_with_their_subtitles():
    lines = list(drascula.spoken_lines())
    hero = [line for line in lines if line.speaker in drascula.TRAINING_SPEAKERS]
    assert len(lines) == 742 and len(hero) == 446
    assert hero[0].subtitle == "THAT'S THE SECOND BIGGEST DOOR I'VE SEEN IN MY LIFE"
    igor_asked = next(line for line in lines if (line.speaker, line.number) == ("D", 1))
    assert igor_asked.subtitle == "HEY IGOR, HOW IS EVERYTHING GOING?"
    audio, rate = sf.read(io.BytesIO(igor_asked.read()))
    assert rate == SPEECH_SAMPLE_RATE and 2.0 < len(audio) / rate < 3.0
