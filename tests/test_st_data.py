"""Speech translation data (train/build_st_data.py): Apertium's plumbing and its absence, the split held out by
speaker and by sentence, and the written folder, on tiny pools (a stand-in `apertium` script; the real one
where Debian's apertium-eng-spa is installed)."""
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from train import build_st_data
from train.build_st_data import ApertiumMissing, build, check_apertium, split_clips, translate
from train.io import resolve_audio

# A stand-in apertium: lists one pair and "translates" by upper-casing each line, as the real one keeps lines.
FAKE_APERTIUM = """#!/bin/sh
if [ "$1" = "-l" ]; then echo "  eng-spa"; echo "  spa-eng"; exit 0; fi
tr 'a-z' 'A-Z' | sed 's/ \\././'
"""


@pytest.fixture
def fake_apertium(tmp_path) -> str:
    path = tmp_path / "bin" / "apertium"
    path.parent.mkdir()
    path.write_text(FAKE_APERTIUM)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_missing_apertium_says_what_to_install(tmp_path):
    with pytest.raises(ApertiumMissing, match=r"apt-get install apertium apertium-eng-spa"):
        check_apertium("eng-spa", command=str(tmp_path / "no-such-apertium"))


def test_a_missing_language_pair_names_its_package(fake_apertium):
    with pytest.raises(ApertiumMissing, match=r"no eng-cat language pair.*apt-get install apertium apertium-cat-eng"):
        check_apertium("eng-cat", command=fake_apertium)


def test_translation_keeps_one_line_per_sentence_and_closes_up_punctuation(fake_apertium):
    assert translate(["Her dress\nwas red .", "", "Go"], "eng-spa", command=fake_apertium) == ["HER DRESS WAS RED.",
                                                                                             "", "GO"]


@pytest.mark.skipif(not shutil.which("apertium"), reason="needs Debian's apertium and apertium-eng-spa")
def test_real_apertium_translates_english_into_spanish():
    try:
        check_apertium("eng-spa")
    except ApertiumMissing as err:
        pytest.skip(str(err))
    spanish = translate(["Her dress was a violent red.", "I like the house."], "eng-spa")
    assert spanish[0] == "Su vestido era un rojo violento." and "casa" in spanish[1]


# --- the split and the folder ---------------------------------------------------------------------
def pools(root: Path) -> tuple[Path, Path]:
    """A synthetic pool (train and test splits) and a pool of real people with Amazon Queen lines."""
    synthetic, people = root / "offline_v2", root / "pseudo_queen"
    for folder in (synthetic, people):
        (folder / "wav").mkdir(parents=True)
    synthetic_lines = {
        "train": [("s1", "v1", "The cat sleeps."), ("s2", "v2", "A dog barks."), ("s3", "v1", "Rain falls.")],
        "test": [("t1", "v9", "Snow is white."), ("t2", "v9", "Birds sing.")],
    }
    for split, lines in synthetic_lines.items():
        records = [{"id": i, "audio": f"wav/{i}.wav", "text": t.lower().rstrip("."), "text_raw": t, "duration": 1.0,
                    "voice": v, "engine": "espeak-ng"} for i, v, t in lines]
        (synthetic / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    queen_lines = [("queen/01J1", "Snow is white."), ("queen/01P1", "Hello sailor."),   # P1: a held-out actor
                   ("queen/02P1", "Where is the key?"), ("queen/02J1", "The key is here.")]
    records = [{"id": i, "audio": f"wav/{i}.wav", "text": t.lower().rstrip(".?"), "text_raw": t, "duration": 2.0,
                "source": "queen"} for i, t in queen_lines]
    (people / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return synthetic, people


SPEAKERS = {"01J1": ("JOE", ("Brad Lavelle",)), "02J1": ("JOE", ("Brad Lavelle",)),
            "01P1": ("FAYE", ("Lisa Valdez",)), "02P1": ("FAYE", ("Lisa Valdez",))}


def test_held_out_split_is_new_in_speaker_and_sentence(tmp_path):
    synthetic, people = pools(tmp_path)
    clips = build_st_data.synthetic_clips(synthetic) + build_st_data.people_clips(people, ("Lisa Valdez",), SPEAKERS)
    train, held, dropped = split_clips(clips)
    assert {c.id for c in held} == {"t1", "t2", "queen/01P1", "queen/02P1"}
    # Joe says a held-out synthetic sentence: dropped from training
    assert {c.id for c in train} == {"s1", "s2", "s3", "queen/02J1"} and dropped == {"held-out sentence": 1}
    assert not {c.speaker for c in train} & {c.speaker for c in held}


def test_build_writes_manifests_that_train_and_evaluate_read_and_a_data_card(tmp_path, fake_apertium):
    synthetic, people = pools(tmp_path)
    out = tmp_path / "st"
    summary = build(out, synthetic, [people], held_out_actors=("Lisa Valdez",), test_per_group=1,
                    command=fake_apertium, speakers=SPEAKERS)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert len(train) == 4 and len(test) == 2 and len(valid) == 2
    assert {r["group"] for r in test} == {"synthetic", "people"}
    assert not {r["id"] for r in test} & {r["id"] for r in valid}
    line = next(r for r in train if r["id"] == "s1")
    assert line["response"] == line["reference"] == "THE CAT SLEEPS."
    assert line["instruction"] == "Please translate the following English text into Spanish text."
    assert not os.path.isabs(line["audio"])
    assert resolve_audio(out / "train.jsonl", line["audio"]) == (synthetic / "wav" / "s1.wav").resolve()
    assert summary["train"]["by_group"]["people"]["clips"] == 1 and summary["dropped_from_train"]
    card = (out / "README.md").read_text()
    assert "Apertium" in card and "GPL-2" in card and "| train | 4 |" in card
    # the same inputs build the same folder
    before = (out / "train.jsonl").read_bytes()
    build(out, synthetic, [people], held_out_actors=("Lisa Valdez",), test_per_group=1, command=fake_apertium,
          speakers=SPEAKERS)
    assert (out / "train.jsonl").read_bytes() == before


def test_the_dev_set_is_never_read(tmp_path):
    (tmp_path / "real_dev").mkdir()
    with pytest.raises(ValueError, match="never trained on"):
        build_st_data.people_clips(tmp_path / "real_dev", (), {})


def test_command_line_reports_a_missing_apertium(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apertium on PATH
    assert build_st_data.main(["--out", str(tmp_path / "st")]) == 2
    assert "apt-get install apertium apertium-eng-spa" in capsys.readouterr().err
