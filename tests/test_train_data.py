"""train/: manifests, the offline speech corpus, continuation targets and repetition data.

Tiny fake corpora in tmp dirs; generation on the tiny random LLM of tests/tiny.py; synthesis with
espeak-ng (skipped only when it is not installed)."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import soundfile as sf

from blsp_chat.constants import CONTINUATION_INSTRUCTION, REPEAT_INSTRUCTION, SAMPLE_RATE
from blsp_chat.prompt import BLSP_TEMPLATE
from tiny import tiny_llm, tiny_tokenizer, tone
from train import generate_continuations as gc
from train import mix_data, prepare_data, synthesize, text_sources, tts_engines


def _wav(path: Path, seconds: float = 0.5, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds), SAMPLE_RATE, format=fmt)
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prepare(candidates, out: Path, corpus: str = "x") -> prepare_data.Summary:
    normalizer, _ = prepare_data.english_normalizer()
    summary = prepare_data.Summary(corpus, "src")
    return prepare_data.prepare(candidates, out, summary, normalizer, progress=False)


# --- normaliser ---------------------------------------------------------------------------------------
def test_normaliser_is_whispers_english_normaliser():
    normalizer, _ = prepare_data.english_normalizer()
    assert normalizer("Hello, World! It's Mr. Smith.") == "hello world it is mister smith"
    assert normalizer("I have twenty-five dollars.") == "i have $25"
    assert normalizer("Um, well [noise] okay") == "well okay"


def test_normaliser_uses_a_spelling_map(tmp_path):
    spelling = tmp_path / "english.json"
    spelling.write_text(json.dumps({"colour": "color"}))
    normalizer, used = prepare_data.english_normalizer(spelling)
    assert normalizer("The colour red") == "the color red"
    assert used == str(spelling)


# --- corpus layouts -----------------------------------------------------------------------------------
def test_librispeech_layout_with_missing_and_corrupt_audio(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    _wav(chapter / "84-121123-0000.flac", 1.0, "FLAC")
    _wav(chapter / "84-121123-0001.flac", 0.5, "FLAC")
    (chapter / "84-121123-0003.flac").write_bytes(b"not audio at all")
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n"
        "84-121123-0002 THE STAIRCASE GROANED\n84-121123-0003 A CORRUPT ONE\n")
    out = tmp_path / "libri.jsonl"
    summary = _prepare(prepare_data.librispeech(tmp_path / "LibriSpeech"), out)
    lines = _jsonl(out)
    assert [entry["id"] for entry in lines] == ["84-121123-0000", "84-121123-0001"]
    assert lines[0]["text"] == "go do you hear" and lines[0]["text_raw"] == "GO DO YOU HEAR"
    assert lines[0]["duration"] == pytest.approx(1.0, abs=1e-3)
    assert lines[1]["text"] == "but in less than 5 minutes"
    rejects = _jsonl(prepare_data.rejects_file(out))
    assert {Path(r["audio"]).name: r["reason"].split(":")[0] for r in rejects} == {
        "84-121123-0002.flac": "missing audio", "84-121123-0003.flac": "unreadable audio"}
    report = json.loads(prepare_data.summary_file(out).read_text())
    assert report["kept"] == 2 and report["rejected_total"] == 2
    assert report["hours"] == pytest.approx(1.5 / 3600, abs=1e-4) and summary.seconds == pytest.approx(1.5, abs=1e-3)


def test_common_voice_layout(tmp_path):
    _wav(tmp_path / "clips" / "a.wav")
    _wav(tmp_path / "clips" / "b.wav")
    with open(tmp_path / "train.tsv", "w", newline="") as handle:
        handle.write("client_id\tpath\tsentence\tup_votes\n")
        handle.write('c1\ta.wav\t"Quoted" words, here!\t2\n')
        handle.write("c2\tb.wav\t\t2\n")      # empty transcript
        handle.write("c3\tgone.wav\tNo file.\t2\n")
    out = tmp_path / "cv.jsonl"
    _prepare(prepare_data.common_voice(tmp_path, "train"), out)
    (line,) = _jsonl(out)
    assert line["text"] == "quoted words here" and line["text_raw"] == '"Quoted" words, here!'
    assert line["speaker"] == "c1" and line["audio"].endswith("clips/a.wav")
    assert sorted(r["reason"] for r in _jsonl(prepare_data.rejects_file(out))) == ["empty transcript", "missing audio"]


def test_gigaspeech_tags_and_garbage(tmp_path):
    audio_data = tmp_path / "audio_data"
    _wav(audio_data / "audio" / "podcast" / "P0001" / "POD0001_S0001.wav")
    _wav(audio_data / "audio" / "podcast" / "P0001" / "POD0001_S0003.wav")
    metadata = {"audios": [{"path": "audio/podcast/P0001/POD0001.opus", "segments": [
        {"sid": "POD0001_S0001", "text_tn": "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE <QUESTIONMARK>",
         "subsets": ["{XL}", "{L}"]},
        {"sid": "POD0001_S0002", "text_tn": "<SIL>", "subsets": ["{XL}"]},
        {"sid": "POD0001_S0003", "text_tn": "WHAT A DAY <EXCLAMATIONPOINT>", "subsets": ["{XL}"]},
        {"sid": "POD0001_S0004", "text_tn": "ONLY IN S", "subsets": ["{S}"]},
    ]}]}
    (audio_data / "GigaSpeech.json").write_text(json.dumps(metadata))
    assert prepare_data.gigaspeech_text("HI <COMMA> THERE <PERIOD>") == "HI, THERE."
    assert prepare_data.gigaspeech_text("<MUSIC>") is None
    dropped = Counter()
    out = tmp_path / "gs.jsonl"
    _prepare(prepare_data.gigaspeech(tmp_path, "XL", dropped), out)
    lines = _jsonl(out)
    assert [entry["text_raw"] for entry in lines] == ["AS THEY'RE LEAVING, CAN KASH PULL ZAHRA ASIDE?", "WHAT A DAY!"]
    assert lines[0]["text"] == "as they are leaving can kash pull zahra aside"
    assert dropped == {"garbage tag": 1, "other subset": 1}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_generic_tables(tmp_path, suffix):
    _wav(tmp_path / "wavs" / "one.wav")
    absolute = _wav(tmp_path / "elsewhere" / "two.wav")
    rows = [{"path": "wavs/one.wav", "transcript": "Opening line."},
            {"path": str(absolute), "transcript": "Closing line!"},
            {"path": "wavs/missing.wav", "transcript": "Third."}]
    table = tmp_path / f"list{suffix}"
    if suffix == ".jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["path", "transcript"], delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "out.jsonl"
    _prepare(prepare_data.table(table), out)
    named = [(Path(entry["audio"]).name, entry["text"]) for entry in _jsonl(out)]
    assert named == [("one.wav", "opening line"), ("two.wav", "closing line")]
    assert [r["reason"] for r in _jsonl(prepare_data.rejects_file(out))] == ["missing audio"]


def test_table_cli_names_columns(tmp_path, capsys):
    _wav(tmp_path / "a.wav")
    (tmp_path / "t.csv").write_text("wav_file,words\na.wav,Hi there.\n")
    out = tmp_path / "o.jsonl"
    assert prepare_data.main(["table", str(tmp_path / "t.csv"), "--out", str(out), "--no-progress"]) == 2
    assert "no audio column" in capsys.readouterr().err
    assert prepare_data.main(["table", str(tmp_path / "t.csv"), "--out", str(out), "--audio-column", "wav_file",
                              "--text-column", "words", "--no-progress"]) == 0
    assert _jsonl(out)[0]["text"] == "hi there"


# --- text sources -------------------------------------------------------------------------------------
def test_text_sources_clean_and_dedup(tmp_path):
    wordnet = tmp_path / "wn"
    wordnet.mkdir()
    (wordnet / "data.noun").write_text(
        "  1 This software and database is provided \"as is\" and Princeton makes no warranty\n"
        '00001 03 n 01 dog 0 | a domestic animal; "the dog barked all night long"; "dogs"\n'
        '00002 03 n 01 cat 0 | a pet; "The dog barked all night, long!"; "she saw a cat near the old barn"\n'
        '00003 03 n 01 x 0 | odd; "café au lait is a drink here"; "use a_b/c in the code block"\n')
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "misc").write_text("Q: Why did the chicken cross the road?\n%\nYou will meet a tall stranger soon.\n"
                                   "    -- Anonymous\n%\nAAAARGH!!!!\n%\n")
    (fortunes / "misc.dat").write_bytes(b"\x00\x01")
    sentences = text_sources.collect(seed=0, wordnet_dir=wordnet, fortunes_dir=fortunes)
    assert sorted(sentences) == ["She saw a cat near the old barn.", "The dog barked all night long.",
                                 "Why did the chicken cross the road?", "You will meet a tall stranger soon."]
    assert sentences == text_sources.collect(seed=0, wordnet_dir=wordnet, fortunes_dir=fortunes)
    assert text_sources.clean_sentence("too short") is None
    assert text_sources.clean_sentence(" ".join(["word"] * 31)) is None


def test_the_sentence_file_is_written_where_no_folder_is_yet(tmp_path, monkeypatch):
    """A new machine has no data/: the recipe's first sentence file makes its folder."""
    monkeypatch.setattr(text_sources, "collect", lambda *args, **kwargs: ["The dog barked all night long."])
    out = tmp_path / "data" / "offline_v2" / "sentences.txt"
    assert text_sources.main(["--out", str(out), "--max", "5"]) == 0
    assert out.read_text() == "The dog barked all night long.\n"


def test_entity_sentences_name_what_they_define_and_keep_holdouts_and_earlier_corpora_out(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 licence header\n"
        "00001 15 n 01 Chartres_Cathedral 0 | a Gothic cathedral (begun in 1194) in northern France\n"
        "00002 15 n 01 Paris 0 | the capital and largest city of France; international center of culture\n"
        "00003 05 n 01 Maja 0 | type genus of the Majidae and a long Latin name\n"
        "00004 18 n 01 dog 0 | a common noun that is not a name of anything\n"
        "00005 18 n 01 Napoleon 0 | French general who became emperor of the French\n"
        '00006 18 n 01 Twain 0 | "Twain wrote books about the river"\n')
    sentences = text_sources.collect(["entities"], wordnet_dir=tmp_path, fortunes_dir=tmp_path / "none")
    assert sorted(sentences) == ["Chartres Cathedral is a Gothic cathedral in northern France.",
                                 "Napoleon is French general who became emperor of the French.",
                                 "Paris is the capital and largest city of France."]
    kept = text_sources.collect(["entities"], wordnet_dir=tmp_path, fortunes_dir=tmp_path / "none",
                                exclude=["napoleon is french general who became emperor of the french"],
                                holdout=["What is the capital of France?"])
    assert kept == ["Chartres Cathedral is a Gothic cathedral in northern France."]
    with pytest.raises(ValueError, match="unknown text source 'glosses'"):
        text_sources.collect(["glosses"], wordnet_dir=tmp_path)


# --- synthesis ----------------------------------------------------------------------------------------
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="needs espeak-ng (apt-get install espeak-ng)")
SENTENCES = ["The cat sat on the mat today.", "A small boat drifted across the lake.", "Rain fell softly on the roof.",
             "She opened the window to hear the birds.", "They walked home along the river.",
             "Bright lights filled the empty street.", "He wrote a letter to his old friend."]


def _espeak_plan(out_dir: Path, seed: int = 0, **kwargs):
    voices = {"espeak-ng": [v for v in tts_engines.espeak_voices() if v.name.startswith(("en-us+", "en-gb+"))]}
    return synthesize.plan(SENTENCES, out_dir, voices, seed=seed, **kwargs)


def _files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.rglob("*.wav"))}


@needs_espeak
def test_synthesis_is_deterministic_and_resumes(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    plan_full = _espeak_plan(full, voices_per_sentence=1)
    synthesize.synthesize(plan_full, full, progress=False)
    plan_res = _espeak_plan(resumed, voices_per_sentence=1)
    assert [j.voice for j in plan_res] == [j.voice for j in plan_full]
    # A run killed after 3 clips, with a half-written manifest line and a clip whose line never got written.
    first = synthesize.synthesize(plan_res, resumed, progress=False, limit=3)
    assert first["complete"] is False and first["clips"] == 3
    manifest = resumed / synthesize.MANIFEST
    with open(manifest, "a") as handle:
        handle.write('{"id": "' + plan_res[3].id + '", "audio": "')
    synthesize.synthesize_one(plan_res[4])  # wav written, line lost
    second = synthesize.synthesize(plan_res, resumed, progress=False, jobs_parallel=2)
    assert second["complete"] and second["made_this_run"] == len(SENTENCES) - 3
    lines_full, lines_res = _jsonl(full / synthesize.MANIFEST), _jsonl(manifest)
    assert [entry["id"] for entry in lines_res] == [j.id for j in plan_res]
    def strip(lines):
        return [{k: v for k, v in entry.items() if k != "audio"} for entry in lines]

    assert strip(lines_res) == strip(lines_full)
    assert _files(full) == _files(resumed)
    assert all(entry["duration"] > 0.5 and entry["engine"] == "espeak-ng" and 130 <= entry["speed_wpm"] <= 190
               for entry in lines_full)
    info = sf.info(lines_full[0]["audio"])
    assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
    # A third run finds nothing to do.
    assert synthesize.synthesize(plan_res, resumed, progress=False)["made_this_run"] == 0


def test_plan_depends_on_seed_and_not_on_order(tmp_path):
    voices = {"espeak-ng": [tts_engines.Voice("espeak-ng", f"en-us+m{i}", f"en-us+m{i}") for i in range(1, 8)],
              "flite": [tts_engines.Voice("flite", n, n) for n in ("kal", "rms", "slt")]}
    a = synthesize.plan(SENTENCES, tmp_path, voices, seed=1, voices_per_sentence=2)
    b = synthesize.plan(SENTENCES[::-1], tmp_path, voices, seed=1, voices_per_sentence=2)
    c = synthesize.plan(SENTENCES, tmp_path, voices, seed=2, voices_per_sentence=2)
    def key(jobs):
        return {j.id: (j.engine, j.voice, j.speed_wpm, j.pitch, j.duration_stretch, j.pitch_cents) for j in jobs}

    assert key(a) == key(b) and key(a) != key(c)
    for text_id in {j.text_id for j in a}:  # two different voices per sentence
        assert len({j.voice for j in a if j.text_id == text_id}) == 2


def test_split_holds_out_sentences_and_voices(tmp_path):
    voices = {"espeak-ng": [tts_engines.Voice("espeak-ng", f"{a}+{v}", f"{a}+{v}")
                            for a in ("en-us", "en-029") for v in ("m1", "f5")],
              "flite": [tts_engines.Voice("flite", n, tts_engines._flite_speaker(n)) for n in ("kal", "kal16", "rms")],
              "festival": [tts_engines.Voice("festival", n, tts_engines._festival_speaker(n))
                           for n in ("kal_diphone", "ked_diphone")]}
    sentences = [f"Sentence number {i} is spoken here." for i in range(200)]
    jobs = synthesize.plan(sentences, tmp_path, voices, seed=0, voices_per_sentence=2, dev_frac=0.1, test_frac=0.1,
                           holdout=("espeak-ng:en-029+*", "kal16"))
    records = [{"id": j.id, "audio": j.wav, "text": j.text_raw, "text_id": j.text_id, "split": j.split, "duration": 1.0,
                "engine": j.engine, "voice": f"{j.engine}:{j.voice}", "speaker": j.speaker} for j in jobs]
    by_split = {s: [r for r in records if r["split"] == s] for s in synthesize.SPLITS}
    assert {s: len({r["text_id"] for r in rs}) for s, rs in by_split.items()} == {"train": 160, "dev": 20, "test": 20}
    # kal16 is held out, so every voice of the speaker "kal" is: flite kal, kal16 and festival kal_diphone.
    assert {r["voice"] for r in by_split["test"]} <= {"espeak-ng:en-029+m1", "espeak-ng:en-029+f5", "flite:kal",
                                                      "flite:kal16", "festival:kal_diphone"}
    assert not {r["speaker"] for r in by_split["test"]} & {r["speaker"] for r in by_split["train"] + by_split["dev"]}
    assert all(synthesize.check_disjoint(by_split).values())
    # The split tool on the same manifest and settings reproduces the split and drops nothing ...
    again, dropped = synthesize.split_records(records, holdout=("espeak-ng:en-029+*", "kal16"), dev_frac=0.1,
                                              test_frac=0.1, seed=0)

    def ids(splits):
        return {s: [r["id"] for r in rs] for s, rs in splits.items()}

    assert dropped == 0 and ids(again) == ids(by_split)
    # ... and with other held-out voices it drops the lines that would cross over.
    other, dropped = synthesize.split_records(records, holdout=("rms",), dev_frac=0.1, test_frac=0.1, seed=1)
    assert dropped > 0 and all(synthesize.check_disjoint(other).values())
    assert {r["speaker"] for r in other["test"]} == {"rms"}


# --- continuations ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_generator():
    import torch

    torch.manual_seed(0)
    return gc.HFGenerator(tiny_llm(), tiny_tokenizer(), BLSP_TEMPLATE, max_new_tokens=12)


def _manifest(n: int) -> list[dict]:
    words = "the quick brown fox jumps over lazy dog hello there what is capital of france paris".split()
    return [{"id": f"u{i:03d}", "audio": f"/a/{i}.wav", "text": " ".join(words[: 2 + (i * 5) % 13]), "duration": 1.0}
            for i in range(n)]


def test_prompt_is_the_released_format(tiny_generator):
    tok = tiny_generator.tokenizer
    ids = tiny_generator.prompt("hello there")
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == f"###[Human]:{CONTINUATION_INSTRUCTION} hello there\n\n\n###[Assistant]:"


def test_left_padded_batch_equals_one_by_one(tiny_generator):
    prompts = [tiny_generator.prompt(r["text"]) for r in _manifest(6)]
    assert len({len(p) for p in prompts}) > 3
    ids, mask = gc.left_pad(prompts, tiny_generator.pad_id)
    assert mask[0].tolist() == [0] * (ids.shape[1] - len(prompts[0])) + [1] * len(prompts[0])
    batched = tiny_generator(prompts)
    single = [tiny_generator([p])[0] for p in prompts]
    def outcomes(generations):
        return [(g.response, g.tokens, g.stopped_by) for g in generations]

    assert outcomes(batched) == outcomes(single)
    assert any(g.tokens > 0 for g in batched)


class _Killed(Exception):
    pass


def test_resume_after_kill_loses_and_doubles_nothing(tmp_path, tiny_generator):
    records = _manifest(23)
    plan = gc.make_plan(records, tiny_generator.prompt)
    reference = tmp_path / "ref.jsonl"
    gc.run_shard(plan, tiny_generator, reference, batch_size=4, progress=False)
    ref_summary = gc.merge(plan, reference)
    assert ref_summary["complete"] and ref_summary["generated"] == 23

    out = tmp_path / "out.jsonl"
    calls = {"n": 0}

    def dies_on_third_batch(prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return tiny_generator(prompts)

    with pytest.raises(_Killed):
        gc.run_shard(plan, dies_on_third_batch, out, batch_size=4, progress=False)
    part = gc.parts_dir(out) / "part-00000.jsonl"
    assert len(_jsonl(part)) == 8
    with open(part, "a") as handle:  # the kill landed in the middle of a write
        handle.write('{"id": "u999", "audio": "/a/x.wav", "text": "half')
    assert gc.merge(plan, out)["complete"] is False and not out.exists()
    stats = gc.run_shard(plan, tiny_generator, out, batch_size=4, progress=False)
    assert stats["lines"] == 23 - 8
    summary = gc.merge(plan, out)
    assert summary["complete"] and summary["generated"] == 23 and not gc.parts_dir(out).exists()
    assert out.read_text() == reference.read_text()
    assert gc.rejected_file(out).read_text() == gc.rejected_file(reference).read_text()
    # A rerun after completion generates nothing and changes nothing.
    assert gc.run_shard(plan, tiny_generator, out, batch_size=4, progress=False)["lines"] == 0
    gc.merge(plan, out)
    assert out.read_text() == reference.read_text()


def test_shards_union_equals_unsharded_run(tmp_path, tiny_generator):
    records = _manifest(11) + [_manifest(1)[0]]  # a duplicate line is generated once
    plan = gc.make_plan(records, tiny_generator.prompt)
    assert plan.duplicates == 1
    single = tmp_path / "single.jsonl"
    gc.run_shard(plan, tiny_generator, single, batch_size=3, progress=False)
    gc.merge(plan, single)
    sharded = tmp_path / "sharded.jsonl"
    shards = [plan.shard(r, 3) for r in range(3)]
    assert sorted(k for s in shards for k in s) == sorted(plan.order)
    for rank in range(3):
        gc.run_shard(plan, tiny_generator, sharded, rank=rank, world=3, batch_size=3, progress=False)
    summary = gc.merge(plan, sharded)
    assert summary["last_run"]["ranks"] == 3 and summary["last_run"]["lines"] == 11
    assert sharded.read_text() == single.read_text()
    kept = _jsonl(sharded) + _jsonl(gc.rejected_file(sharded))
    assert sorted(entry["id"] for entry in kept) == [f"u{i:03d}" for i in range(11)]
    assert all(entry["instruction"] == CONTINUATION_INSTRUCTION and "response" in entry and entry["audio"]
               for entry in kept)


def test_too_long_prompts_are_skipped_and_counted(tmp_path, tiny_generator):
    records = _manifest(3) + [{"id": "long", "audio": "/a/long.wav", "text": "word " * 300}]
    plan = gc.make_plan(records, tiny_generator.prompt, max_prompt_tokens=192)
    assert plan.too_long == ["long"] and "long" not in plan.order
    out = tmp_path / "o.jsonl"
    gc.run_shard(plan, tiny_generator, out, batch_size=2, progress=False)
    summary = gc.merge(plan, out)
    assert summary["too_long"] == 1 and summary["complete"] and summary["generated"] == 3


def test_quality_filter_reasons():
    transcript = "the old lighthouse keeper watched the stormy harbour every night"
    assert gc.quality_issue(transcript, "") == "empty"
    assert gc.quality_issue(transcript, "Yes.") == "empty"
    assert gc.quality_issue(transcript, "The old lighthouse keeper watched the stormy harbour every night.") == "copy"
    assert gc.quality_issue(transcript,
                            "An old lighthouse keeper watched the stormy harbour each night.") == "copy"  # near copy
    assert gc.quality_issue(transcript, "and the sea and the sea and the sea and the sea roared") == "looping"
    assert gc.quality_issue(transcript, "I am happy to help you with any question you may have today.") == "off_topic"
    assert gc.quality_issue(transcript, "His lamp swept the harbor as ships fought the waves and wind.") is None
    assert gc.quality_issue(transcript, "Waves crashed while gulls cried over the rocks below us.",
                            min_topic_words=0) is None
    assert gc.quality_issue("it was red",
                            "She smiled and walked away into the bright afternoon.") is None  # too short to judge


def test_rerun_applies_a_changed_filter_without_generating(tmp_path, monkeypatch):
    records = _manifest(4)
    plan = gc.make_plan(records, lambda text: [1] * (len(text.split()) + 1))
    calls = []

    def fake_generate(prompts):
        calls.append(len(prompts))
        return [gc.Generation("and so the long story of the fox went on", 9, "eos") for _ in prompts]

    out = tmp_path / "o.jsonl"
    gc.run_shard(plan, fake_generate, out, batch_size=4, progress=False)
    first = gc.merge(plan, out)
    assert first["kept"] == 4 and first["last_run"]["lines"] == 4
    monkeypatch.setattr(gc, "quality_issue", lambda text, response, *_: "copy" if "brown" in text else None)
    gc.run_shard(plan, fake_generate, out, batch_size=4, progress=False)  # the same command again
    again = gc.merge(plan, out)
    assert calls == [4]  # nothing generated twice
    moved = [r["id"] for r in records if "brown" in r["text"]]
    assert moved and {entry["id"] for entry in _jsonl(gc.rejected_file(out))} == set(moved)
    assert again["kept"] == 4 - len(moved) and again["dropped"] == {"copy": len(moved)}
    assert again["last_run"] == first["last_run"]  # the generating run's throughput stays on record


def test_filter_counts_in_summary(tmp_path):
    records = _manifest(5)
    replies = {0: "", 1: records[1]["text"], 2: "go go go go go go go go go go", 3: None, 4: None}
    plan = gc.make_plan(records, lambda text: [1] * (len(text.split()) + 1))

    def fake_generate(prompts):
        out = []
        for prompt in prompts:
            index = next(i for i, r in enumerate(records) if plan.prompts[gc.key_of(r)] is prompt)
            text = replies[index]
            if text is None:
                text = records[index]["text"] + " and then the story went on further"
            out.append(gc.Generation(text, 5, "eos"))
        return out

    out = tmp_path / "o.jsonl"
    gc.run_shard(plan, fake_generate, out, batch_size=2, progress=False)
    summary = gc.merge(plan, out)
    assert summary["dropped"] == {"empty": 1, "copy": 1, "looping": 1}
    assert summary["kept"] == 2 and [entry["id"] for entry in _jsonl(out)] == ["u003", "u004"]
    rejected = {entry["id"]: entry["filter"] for entry in _jsonl(gc.rejected_file(out))}
    assert rejected == {"u000": "empty", "u001": "copy", "u002": "looping"}


# --- repetition data and mixing ------------------------------------------------------------------------
def test_mix_ratio_and_determinism():
    continuations = [{"audio": f"/c/{i}.wav", "text": f"c {i}", "instruction": CONTINUATION_INSTRUCTION,
                      "response": "r"} for i in range(90)]
    asr = [{"audio": f"/c/{i}.wav",
            "text": f"c {i}"} for i in range(90)] + [{"audio": f"/x/{i}.wav", "text": f"x {i}"} for i in range(30)]
    ratio = mix_data.parse_ratio("1:9")
    assert ratio == Fraction(1, 9) and mix_data.parse_ratio("0.1") == Fraction(1, 9)
    mixed = mix_data.mix(continuations, asr, ratio=ratio, seed=3)
    repeats = [entry for entry in mixed if entry["task"] == "repeat"]
    assert len(mixed) == 100 and len(repeats) == 10
    assert all(entry["instruction"] == REPEAT_INSTRUCTION and entry["response"] == entry["text"] for entry in repeats)
    assert all(entry["audio"].startswith("/x/") for entry in repeats)  # clips the continuations do not use come first
    assert mixed == mix_data.mix(continuations, asr, ratio=ratio, seed=3)
    assert mixed != mix_data.mix(continuations, asr, ratio=ratio, seed=4)
    assert [entry["audio"] for entry in mixed[:20]] != [entry["audio"] for entry in continuations[:20]]  # shuffled
    with pytest.raises(ValueError):
        mix_data.mix(continuations, asr[:5], ratio=Fraction(1, 9))


def test_mix_cli_repetition_only(tmp_path, capsys):
    asr = tmp_path / "asr.jsonl"
    asr.write_text("".join(json.dumps({"audio": f"/a/{i}.wav", "text": f"t {i}",
                                       "text_raw": f"T {i}."}) + "\n" for i in range(4)))
    out = tmp_path / "rep.jsonl"
    assert mix_data.main(["--asr", str(asr), "--out", str(out), "--repetition-only", "--response-field",
                          "text_raw"]) == 0
    assert [entry["response"] for entry in _jsonl(out)] == ["T 0.", "T 1.", "T 2.", "T 3."]


def test_mix_cli_written_in_another_folder_still_finds_the_clips(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "wav").mkdir(parents=True)
    (data / "wav" / "a.wav").write_bytes(b"RIFF")
    lines = [{"audio": "wav/a.wav", "text": "a"}, {"audio": "/elsewhere/b.wav", "text": "b"}]
    (data / "asr.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "mixes" / "rep.jsonl"
    out.parent.mkdir()
    assert mix_data.main(["--asr", str(data / "asr.jsonl"), "--out", str(out), "--repetition-only"]) == 0
    written = [entry["audio"] for entry in _jsonl(out)]
    assert written == ["../data/wav/a.wav", "/elsewhere/b.wav"]
    assert (out.parent / written[0]).resolve() == (data / "wav" / "a.wav").resolve()


def test_mix_cli_leaves_out_continuations_of_other_splits(tmp_path, capsys):
    def line(i, split):
        return {"audio": f"/a/{i}.wav", "text": f"t {i}", "split": split, "instruction": CONTINUATION_INSTRUCTION,
                "response": "r"}

    every = [line(i, "train" if i < 6 else "test") for i in range(8)]
    (tmp_path / "cont.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in every))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"audio": entry["audio"],
                                                              "text": entry["text"]}) + "\n" for entry in every[:6]))
    out = tmp_path / "mixed.jsonl"
    assert mix_data.main(["--continuations", str(tmp_path / "cont.jsonl"), "--asr", str(tmp_path / "train.jsonl"),
                          "--out", str(out), "--ratio", "1:1"]) == 0
    mixed = _jsonl(out)
    assert {entry["audio"] for entry in mixed} == {f"/a/{i}.wav" for i in range(6)}  # no test clip leaks into training
    assert sum(entry["task"] == "continue" for entry in mixed) == 6
    assert sum(entry["task"] == "repeat" for entry in mixed) == 6
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["continuations_not_in_asr"] == 2
