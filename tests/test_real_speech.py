"""The real-speech dev set builder (train/real_speech.py): sources parsed as shipped, clips written as the
evaluator reads them, deterministic, and a missing package named."""
import json

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.constants import SAMPLE_RATE
from train import real_speech
from train.real_speech import Recording, SourceMissing


def _voice_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A harmonic tone with a wobble: loud enough that the audio checks take it for sound."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    voiced = 0.3 * np.sin(2 * np.pi * (140 + 20 * np.sin(3 * t)) * t)
    return (voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def sphinx_tree(tmp_path):
    root = tmp_path / "pocketsphinx"
    (root / "librivox").mkdir(parents=True)
    (root / "cards").mkdir()
    (root / "librivox" / "transcription").write_text(
        "<s> he was not an ill disposed young man </s> (sense_and_sensibility_01_austen_64kb-0880)\n"
        "\n<s> he might even  have been made amiable himself </s> (sense_and_sensibility_01_austen_64kb-0930)\n")
    for name in ("0880", "0930"):
        sf.write(root / "librivox" / f"sense_and_sensibility_01_austen_64kb-{name}.wav", _voice_like(1.0, 16000), 16000)
    (root / "cards" / "cards.transcription").write_text("<s> ten of clubs  </s> (001)\n")
    sf.write(root / "cards" / "001.wav", _voice_like(0.8, 8000), 8000)
    return root


def test_sphinx_transcripts_are_read_with_their_file_ids(sphinx_tree):
    librivox = list(real_speech.librivox_recordings(sphinx_tree))
    assert [(r.clip_id, r.text_raw) for r in librivox] == [
        ("0880", "he was not an ill disposed young man"), ("0930", "he might even have been made amiable himself")]
    assert all(r.origin.is_file() for r in librivox)
    assert [(r.clip_id, r.text_raw) for r in real_speech.cards_recordings(sphinx_tree)] == [("001", "ten of clubs")]


@pytest.mark.parametrize("stem, word", [("ball", "ball"), ("egypt_camel", "camel"), ("egypt_palmtree", "palm tree"),
                                        ("moon_fallingstar", "falling star"), ("pizzeria_broccolli", "broccoli"),
                                        ("tv_train", "train"), ("egypt_sphynx", "sphinx")])
def test_ktuberling_file_names_give_the_spoken_word(stem, word):
    assert real_speech.ktuberling_word(stem) == word


def test_tuxpaint_transcript_is_the_stamp_name_its_recording_speaks(tmp_path):
    stamps = tmp_path / "stamps" / "animals" / "birds"
    stamps.mkdir(parents=True)
    for name in ("duck", "crow", "hen", "orphan"):
        sf.write(stamps / f"{name}_desc.ogg", _voice_like(0.5, 22050), 22050, format="OGG", subtype="VORBIS")
    (stamps / "duck.txt").write_text("A duck.\naf.utf8='n Eend.\n")
    (stamps / "crow.txt").write_text("An crow!\n")
    (stamps / "hen.txt").write_text("A brown hen.\n")  # the recording says "Hen!": its words are not known
    recordings = list(real_speech.tuxpaint_recordings(tmp_path / "stamps"))
    assert [(r.clip_id, r.text_raw) for r in recordings] == [
        ("animals__birds__crow_desc", "crow"), ("animals__birds__duck_desc", "duck")]


def _sources(sphinx_tree):
    return {"librivox": lambda: real_speech.librivox_recordings(sphinx_tree),
            "cards": lambda: real_speech.cards_recordings(sphinx_tree)}


def test_build_writes_16k_mono_clips_and_a_deterministic_manifest(sphinx_tree, tmp_path):
    out = tmp_path / "dev"
    records = real_speech.build(out, _sources(sphinx_tree))
    assert [r["id"] for r in records] == ["librivox/0880", "librivox/0930", "cards/001"]
    card = records[-1]
    audio, rate = sf.read(out / card["audio"])
    assert rate == SAMPLE_RATE and audio.ndim == 1 and card["duration"] == pytest.approx(0.8, abs=0.01)
    assert card["text"] == "10 of clubs"  # Whisper's normaliser, as the evaluator scores it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["by_source"] == {"librivox": {"clips": 2, "seconds": 2.0}, "cards": {"clips": 1, "seconds": 0.8}}
    first = (out / "manifest.jsonl").read_bytes()
    real_speech.build(out, _sources(sphinx_tree))
    assert (out / "manifest.jsonl").read_bytes() == first


def test_a_silent_recording_is_reported_not_fatal(sphinx_tree, tmp_path):
    sf.write(sphinx_tree / "cards" / "001.wav", np.zeros(8000, dtype=np.float32), 8000)
    out = tmp_path / "dev"
    records = real_speech.build(out, _sources(sphinx_tree))
    assert [r["id"] for r in records] == ["librivox/0880", "librivox/0930"]
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert [s["id"] for s in skipped] == ["cards/001"] and "silent" in skipped[0]["reason"].lower()


def test_a_missing_package_is_named_with_its_install_command(tmp_path, monkeypatch, capsys):
    with pytest.raises(SourceMissing, match="apt-get install ktuberling-data"):
        list(real_speech.ktuberling_recordings(tmp_path / "nowhere"))
    monkeypatch.setitem(real_speech.SOURCES, "ktuberling",
                        lambda: real_speech.ktuberling_recordings(tmp_path / "nowhere"))
    assert real_speech.main(["--out-dir", str(tmp_path / "dev"), "--sources", "ktuberling"]) == 2
    assert "apt-get install ktuberling-data" in capsys.readouterr().err


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        real_speech.main(["--out-dir", str(tmp_path), "--sources", "librivox,asterisk"])


def test_jfk_clip_comes_from_the_fetched_sample(tmp_path):
    wav = tmp_path / "jfk.wav"
    sf.write(wav, _voice_like(2.0, 16000), 16000)
    (recording,) = real_speech.jfk_recordings(fetch=lambda: wav)
    assert recording == Recording("jfk", "jfk", wav, real_speech.JFK_TRANSCRIPT)


@pytest.mark.skipif(not real_speech.POCKETSPHINX_DATA.is_dir(), reason="needs apt-get install pocketsphinx-testdata")
def test_the_installed_recordings_build(tmp_path):
    sources = {"librivox": real_speech.librivox_recordings, "cards": real_speech.cards_recordings}
    if real_speech.KTUBERLING_SOUNDS.is_dir():
        sources["ktuberling"] = real_speech.ktuberling_recordings
    records = real_speech.build(tmp_path, sources)
    by_source = json.loads((tmp_path / "summary.json").read_text())["by_source"]
    assert by_source["librivox"]["clips"] == 5 and by_source["cards"]["clips"] == 5
    assert 20 < by_source["librivox"]["seconds"] < 30
    assert by_source.get("ktuberling", {"clips": 72})["clips"] == 72
    assert all(r["text"] for r in records)


def test_score_gives_wer_per_source_against_the_manifest_transcripts(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "cards/001", "source": "cards", "text": "10 of clubs"},
        {"id": "ktuberling/ball", "source": "ktuberling", "text": "ball"},
        {"id": "ktuberling/hat", "source": "ktuberling", "text": "hat"},
        {"id": "drascula/D1", "source": "drascula", "text": "hey igor"},
        {"id": "steelsky/50001", "source": "steelsky", "text": "you were wrong"}]))
    ids = ["cards/001", "ktuberling/ball", "ktuberling/hat", "drascula/D1", "steelsky/50001"]
    for system, replies in {"whisper": ["Ten of clubs.", "Ball!", "Cat.", "Hey, Igor!", "You were wrong."],
                            "blsp": ["ten of gloves", "", "hat", "hey eager", "you were long"]}.items():
        (tmp_path / system).mkdir()
        (tmp_path / system / "asr.real_dev.jsonl").write_text("".join(
            json.dumps({"id": i, "system": system, "reply": reply, "text": "stale transcript"}) + "\n"
            for i, reply in zip(ids, replies)))
    out = tmp_path / "table.md"
    assert real_speech.main(["score", str(manifest), str(tmp_path / "whisper"), str(tmp_path / "blsp"),
                             "--markdown", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out
    assert "| cards (1) | 0.0 | 33.3 |" in table        # "ten" is normalised to "10"
    assert "| ktuberling (2) | 50.0 | 50.0 |" in table
    assert "| all (5) | 10.0 | 40.0 |" in table
    assert "| sentences (1) | 0.0 | 33.3 |" in table and "| words (2) | 50.0 | 50.0 |" in table
    assert "| acted (1) | 0.0 | 50.0 |" in table  # the dev set's acted lines, a group of their own
    assert "| other (1) | 0.0 | 33.3 |" in table  # a source of no group (a pseudo-labelled manifest)


def test_score_refuses_a_folder_without_asr_records(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text("")
    assert real_speech.main(["score", str(tmp_path / "m.jsonl"), str(tmp_path)]) == 2
    assert "train.evaluate --task asr" in capsys.readouterr().err
