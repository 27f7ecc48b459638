"""train.evaluate (eval_run, eval_score, eval_compare) and train.metrics: each task's metric on hand-made
outputs, label mapping, resume, the Table-2 comparison, and system dispatch on the tiny models."""
import json
import math
from types import SimpleNamespace

import pytest
import soundfile as sf

from blsp_chat.config import GenerationOptions
from blsp_chat.constants import REPEAT_INSTRUCTION, SAMPLE_RATE, SNIPS_LIGHT_INTENTS
from tiny import tiny_blsp, tiny_tokenizer, tone
from train import evaluate as ev
from train import metrics
from train.eval_compare import compare_table
from train.eval_run import (
    SYSTEM_NAMES,
    SYSTEMS,
    Engines,
    EvalSettings,
    LlmRunner,
    Request,
    check_items,
    read_manifest,
    slu_instruction,
)
from train.eval_score import judge_verdicts, parse_verdict, summarize

SENTIMENT = ("positive", "negative", "neutral")


# --- ASR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reference, hypothesis", [
    ("Mr. Jones has twenty-one apples, um, I think.", "mister jones has 21 apples i think"),
    ("It's nine o'clock!", "it is 9 o'clock"),
    ("HELLO,   World.", "hello world"),
])
def test_whisper_normaliser_removes_formatting_differences(reference, hypothesis):
    normalizer = metrics.EnglishNormalizer()
    assert metrics.word_errors(reference, hypothesis).errors > 0  # they differ as written ...
    assert metrics.word_errors(reference, hypothesis, normalizer).errors == 0  # ... not once normalised


def test_spelling_mapping_is_applied_and_read_from_normalizer_json(tmp_path):
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    mapping = metrics.load_spelling_mapping(tmp_path)
    assert metrics.EnglishNormalizer(mapping)("The colour") == "the color"
    assert metrics.load_spelling_mapping(tmp_path / "missing") == {}


def test_corpus_wer_counts_edits_over_reference_words():
    errors = metrics.corpus_wer(["the cat sat on the mat", "good morning"],
                                ["the cat sit on mat", "good morning to you"])
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.reference_words) == (1, 1, 2, 8)
    assert errors.wer == pytest.approx(4 / 8)


def test_wer_of_empty_sides():
    assert metrics.word_errors("one two three", "").deletions == 3
    empty_ref = metrics.word_errors("", "extra words")
    assert (empty_ref.insertions, empty_ref.reference_words) == (2, 0)


def test_asr_summary_reports_percent_wer():
    settings = EvalSettings("asr", "blsp")
    records = [{"id": "1", "reply": "Hello world.", "text": "hello world"},
               {"id": "2", "reply": "", "text": "good night"}]
    summary = summarize(records, settings)
    assert summary["headline"] == {"metric": "WER", "value": pytest.approx(50.0), "higher_is_better": False}
    assert summary["metrics"]["deletions"] == 2


# --- ST ------------------------------------------------------------------------------------------
def test_bleu_known_value():
    # 7 tokens, one wrong at the end: n-gram precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty.
    expected = 100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    assert metrics.bleu(["a b c d e f g"], ["a b c d e f h"]) == pytest.approx(expected, abs=1e-6)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def test_st_summary_notes_missing_comet():
    settings = EvalSettings("st", "text", comet_model=None)
    summary = summarize([{"id": "1", "reply": "Guten Morgen, wie geht es dir?",
                             "reference": "Guten Morgen, wie geht es dir?", "text": "Good morning, how are you?"}],
                           settings)
    assert summary["headline"]["metric"] == "BLEU" and summary["headline"]["value"] == pytest.approx(100)
    assert summary["metrics"]["comet"] is None
    assert any("COMET skipped" in note for note in summary["notes"])


# --- SLU -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, labels, label, how", [
    ("SwitchLightOn", SNIPS_LIGHT_INTENTS, "SwitchLightOn", "exact"),
    ("  switchlightoff. ", SNIPS_LIGHT_INTENTS, "SwitchLightOff", "case"),
    ("Positive", SENTIMENT, "positive", "case"),
    ("The intent of the text is SetLightColor.", SNIPS_LIGHT_INTENTS, "SetLightColor", "contained"),
    ("The tone is negative.", SENTIMENT, "negative", "contained"),
    ("switch light of", SNIPS_LIGHT_INTENTS, "SwitchLightOff", "closest"),
    ("Increase brightnes", SNIPS_LIGHT_INTENTS, "IncreaseBrightness", "closest"),
    ("I am not sure what you mean.", SNIPS_LIGHT_INTENTS, None, "unmappable"),
    ("positive, negative, or neutral", SENTIMENT, None, "ambiguous"),
])
def test_map_label(reply, labels, label, how):
    assert metrics.map_label(reply, labels) == metrics.LabelMatch(label, how)


def test_slu_accuracy_counts_unmappable_separately():
    settings = EvalSettings("slu", "text", labels=SENTIMENT)
    records = [{"id": "1", "reply": "positive", "label": "positive"},
               {"id": "2", "reply": "It sounds negative.", "label": "negative"},
               {"id": "3", "reply": "neutral", "label": "positive"},
               {"id": "4", "reply": "bananas", "label": "neutral"}]
    summary = summarize(records, settings)
    assert summary["metrics"]["accuracy"] == pytest.approx(50.0)
    assert summary["metrics"]["unmappable"] == 1
    assert summary["predictions"] == {"1": "positive", "2": "negative", "3": "neutral", "4": None}


def test_slu_instruction_follows_the_label_list():
    assert "emotional tone" in slu_instruction(["Positive", "negative", "neutral"])
    assert slu_instruction(["a", "b"]).endswith("choose from [a, b].")


# --- continuation and QA ---------------------------------------------------------------------------
def test_continuation_closeness_identical_is_max_and_unrelated_is_low():
    replies = ["It was a sunny day and the children ran to the beach.", "Then they ate ice cream."]
    same = metrics.continuation_closeness(replies, replies)
    assert same == pytest.approx({"chrf": 100.0, "bleu": 100.0, "token_f1": 1.0, "exact_match": 1.0})
    other = metrics.continuation_closeness(["Quantum physics describes particles.", "Stocks fell sharply."], replies)
    assert other["chrf"] < 25 and other["bleu"] < 5 and other["token_f1"] == 0.0


def test_token_f1_known_value():
    assert metrics.token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("a", "") == 0.0


def test_qa_judge_gives_accept_rate_and_is_cached(tmp_path):
    settings = EvalSettings("qa", "text")
    records = [{"id": str(i), "instruction": "Q?", "text": "t", "reply": r} for i, r in enumerate(["yes", "no", "yes"])]
    calls = []

    def judge(question, transcript, answer):
        calls.append(answer)
        return answer == "yes"
    verdicts = judge_verdicts(records, judge, tmp_path, settings)
    assert summarize(records, settings, verdicts)["metrics"]["accept_rate"] == pytest.approx(200 / 3)
    judge_verdicts(records, judge, tmp_path, settings)
    assert len(calls) == 3  # the second pass read the cache
    assert summarize(records, settings)["headline"]["metric"] == "answers"


def test_parse_verdict():
    assert parse_verdict("Unacceptable.") is False
    assert parse_verdict("acceptable") is True
    assert parse_verdict("maybe") is None


# --- resume ----------------------------------------------------------------------------------------
class FakeLlm:
    """Replies with the request's text upper-cased; raises once `fail_after` batches have run."""

    def __init__(self, fail_after=None):
        self.fail_after, self.batches, self.requests = fail_after, 0, []

    def replies(self, requests):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.requests += list(requests)
        return [r.text.upper() if r.audio is None else "SPEECH" for r in requests]


def _text_items(n):
    return [{"id": str(i), "text": f"sentence number {i}"} for i in range(n)]


def test_resume_after_a_kill_has_no_duplicates_and_no_lost_items(tmp_path):
    items, settings = _text_items(7), EvalSettings("asr", "text", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(items, settings, Engines(llm=FakeLlm(fail_after=2)), tmp_path, progress=False)
    path = tmp_path / "asr.test.jsonl"
    assert len(path.read_text().splitlines()) == 4
    with open(path, "a") as handle:  # killed in the middle of writing a record
        handle.write('{"id": "4", "task": "asr", "sys')
    llm = FakeLlm()
    summary = ev.evaluate(items, settings, Engines(llm=llm), tmp_path, progress=False)
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(item["id"] for item in items)  # each once
    assert [r.text for r in llm.requests] == [f"sentence number {i}" for i in (4, 5, 6)]
    assert summary["items"] == 7 and summary["headline"]["value"] == pytest.approx(0.0)
    assert (tmp_path / "asr.test.summary.json").is_file()


def test_resume_refuses_outputs_of_another_run(tmp_path):
    ev.evaluate(_text_items(2), EvalSettings("asr", "text"), Engines(llm=FakeLlm()), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another run"):
        ev.evaluate(_text_items(2), EvalSettings("asr", "text", model="other"), Engines(llm=FakeLlm()), tmp_path,
                    progress=False)


def test_manifest_ids_and_relative_audio(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "x"}\n\n{"id": "k", "audio": "/abs/b.wav"}\n')
    items = read_manifest(tmp_path / "m.jsonl")
    assert [i["id"] for i in items] == ["1", "k"]
    assert items[0]["audio"] == str(tmp_path / "a.wav") and items[1]["audio"] == "/abs/b.wav"
    (tmp_path / "d.jsonl").write_text('{"id": 1}\n{"id": 1}\n')
    with pytest.raises(ValueError, match="twice"):
        read_manifest(tmp_path / "d.jsonl")


def test_missing_fields_fail_before_running():
    with pytest.raises(ValueError, match="lacks label"):
        check_items([{"id": "1", "text": "x"}], EvalSettings("slu", "text"))
    with pytest.raises(ValueError, match="only does --task asr"):
        EvalSettings("slu", "whisper")


# --- compare ---------------------------------------------------------------------------------------
def _summary(task, system, value, label=None, metric="WER", higher=False):
    return {"task": task, "dataset": "smoke", "system": system, "label": label or SYSTEM_NAMES[system],
            "headline": {"metric": metric, "value": value, "higher_is_better": higher}}


def test_compare_table_has_paper_table_2_layout():
    summaries = [_summary("asr", "blsp", 80.0), _summary("asr", "whisper", 17.4), _summary("asr", "cascade", 20.25),
                 _summary("asr", "text", 1.0), _summary("slu", "blsp", 10.0, metric="ACC", higher=True),
                 _summary("slu", "text", 90.0, metric="ACC", higher=True)]
    lines = compare_table(summaries).splitlines()
    assert lines[0] == "| Method | ASR (WER↓) smoke | SLU (ACC↑) smoke |"
    assert lines[2:] == ["| Text+LLM | 1.0 | 90.0 |", "| Whisper+LLM | 17.4 / 20.2 | - |", "| BLSP | 80.0 | 10.0 |"]


def test_compare_cli_reads_summaries(tmp_path, capsys):
    for name, summary in {"t": _summary("asr", "text", 2.0),
                          "b": _summary("asr", "blsp", 50.0, label="BLSP+RP")}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "asr.smoke.summary.json").write_text(json.dumps(summary))
    assert ev.main(["--compare", str(tmp_path / "b"), str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "| BLSP+RP | 50.0 |"


# --- systems on the tiny models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded():
    return SimpleNamespace(model=tiny_blsp(), tokenizer=tiny_tokenizer(), adapter_trained=False)


@pytest.fixture()
def speech_items(tmp_path):
    items = []
    for i, seconds in enumerate((0.6, 1.3, 0.9)):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, tone(seconds, 200 + 50 * i, seed=i), SAMPLE_RATE)
        items.append({"id": f"c{i}", "audio": str(path), "text": f"hello there {i}"})
    return items


class SpyRunner(LlmRunner):
    def __init__(self, loaded):
        super().__init__(loaded, GenerationOptions(max_new_tokens=4))
        self.requests = []

    def replies(self, requests):
        self.requests += list(requests)
        return super().replies(requests)


def fake_whisper(audios):
    return [f"heard {len(a)}" for a in audios]


@pytest.mark.parametrize("system", SYSTEMS)
def test_system_dispatch(system, tiny_loaded, speech_items, tmp_path):
    spy = SpyRunner(tiny_loaded)
    engines = Engines(llm=None if system == "whisper" else spy, transcriber=fake_whisper)
    summary = ev.evaluate(speech_items, EvalSettings("asr", system, batch_size=2), engines, tmp_path, progress=False)
    lines = (tmp_path / "asr.test.jsonl").read_text().splitlines()
    records = {json.loads(entry)["id"]: json.loads(entry) for entry in lines}
    assert summary["items"] == 3 and set(records) == {"c0", "c1", "c2"}
    requests = {r.text or ("audio", len(r.audio)) for r in spy.requests}
    lengths = {item["id"]: round(seconds * SAMPLE_RATE) for item, seconds in zip(speech_items, (0.6, 1.3, 0.9))}
    if system == "whisper":
        assert not spy.requests and records["c1"]["reply"] == f"heard {lengths['c1']}"
    elif system == "blsp":
        assert requests == {("audio", n) for n in lengths.values()} and "asr" not in records["c0"]
    elif system == "text":
        assert requests == {f"hello there {i}" for i in range(3)}
    else:  # cascade: the LLM reads Whisper's transcript
        assert requests == {f"heard {n}" for n in lengths.values()} and records["c1"]["asr"] == f"heard {lengths['c1']}"
    assert all(r.instruction == REPEAT_INSTRUCTION for r in spy.requests)


def test_batched_replies_equal_one_by_one(tiny_loaded):
    runner = LlmRunner(tiny_loaded, GenerationOptions(max_new_tokens=6))
    requests = [Request(REPEAT_INSTRUCTION, audio=tone(1.7, 300)), Request("Hi", text="the quick brown fox"),
                Request(REPEAT_INSTRUCTION, audio=tone(0.5, 180, seed=3))]
    batch = runner.batch_inputs(requests)
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()  # some rows are padded
    assert batch["attention_mask"][:, -1].all()  # ... on the left
    assert runner.replies(requests) == [runner.replies([r])[0] for r in requests]


def test_ctc_readout_prompts_hold_exactly_the_encoded_speech():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5)
    runner = LlmRunner(SimpleNamespace(model=model, tokenizer=tiny_tokenizer()), GenerationOptions(max_new_tokens=6))
    clips = [tone(1.7, 300), tone(0.5, 180, seed=3)]
    requests = [Request(REPEAT_INSTRUCTION, audio=clips[0]), Request("Hi", text="fox"),
                Request(REPEAT_INSTRUCTION, audio=clips[1])]
    batch = runner.batch_inputs(requests)
    heard = [e.shape[0] for e in batch["speech_embeds"]]
    assert heard == [e.shape[0] for e in model.encode_speech(clips)]
    assert batch["speech_mask"].sum(1).tolist() == [heard[0], 0, heard[1]]
    model(**batch)  # every placeholder is filled


def test_continuation_compares_with_the_reply_from_the_transcript(tiny_loaded, speech_items, tmp_path):
    spy = SpyRunner(tiny_loaded)
    speech_items[0]["reference"] = "given continuation"
    ev.evaluate(speech_items, EvalSettings("continuation", "blsp"), Engines(llm=spy), tmp_path, progress=False)
    records = [json.loads(entry) for entry in (tmp_path / "continuation.test.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert by_id["c0"]["reference_reply"] == "given continuation"
    text_requests = [r.text for r in spy.requests if r.audio is None]
    assert sorted(text_requests) == ["hello there 1", "hello there 2"]  # generated only where not given


def test_cli_prints_the_headline_last(tmp_path, capsys, monkeypatch, speech_items):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(item) + "\n" for item in speech_items))
    monkeypatch.setattr(ev, "build_engines", lambda args, settings: Engines(transcriber=fake_whisper))
    code = ev.main(["--task", "asr", "--system", "whisper", "--manifest", str(manifest), "--out", str(tmp_path / "o")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and last.startswith("asr m Whisper: WER↓ ") and last.endswith("(3 items)")
    assert math.isfinite(json.loads((tmp_path / "o" / "asr.m.summary.json").read_text())["headline"]["value"])


def test_continuation_of_the_text_system_is_its_own_reference(tmp_path):
    llm = FakeLlm()
    summary = ev.evaluate(_text_items(3), EvalSettings("continuation", "text"), Engines(llm=llm), tmp_path,
                          progress=False)
    assert len(llm.requests) == 3  # no second generation for the reference
    assert summary["headline"]["metric"] == "chrF" and summary["metrics"]["token_f1"] == pytest.approx(1.0)


def test_fallback_flag_turns_on_temperature_fallback_and_is_recorded(tmp_path):
    parser = ev.build_parser()
    greedy = ev.settings_from_args(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl"]))
    assert greedy.options.fallback_temperatures == ()
    settings = ev.settings_from_args(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl", "--system", "text",
                                                        "--fallback"]))
    assert settings.options.fallback_temperatures == (0.2, 0.4, 0.6, 0.8, 1.0)
    ev.evaluate(_text_items(2), settings, Engines(llm=FakeLlm()), tmp_path, progress=False)
    written = json.loads(next(tmp_path.glob("*.summary.json")).read_text())
    assert written["settings"]["generation"]["fallback_temperatures"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert written["settings"]["speech_search"] is None  # the checkpoint's own


def test_loops_stop_as_in_the_app_unless_turned_off_and_the_setting_is_recorded(tmp_path):
    parser = ev.build_parser()
    default = ev.settings_from_args(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl"]))
    assert default.options.loop_stop_tokens == GenerationOptions().loop_stop_tokens > 0
    off = ev.settings_from_args(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl", "--system", "text",
                                                   "--loop-stop-tokens", "0"]))
    assert off.options.loop_stop_tokens == 0
    ev.evaluate(_text_items(2), off, Engines(llm=FakeLlm()), tmp_path, progress=False)
    written = json.loads(next(tmp_path.glob("*.summary.json")).read_text())
    assert written["settings"]["generation"]["loop_stop_tokens"] == 0


def test_a_speech_search_is_handed_to_the_loader_and_recorded(monkeypatch, tmp_path):
    parser = ev.build_parser()
    settings = ev.settings_from_args(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl", "--system", "text",
                                                        "--speech-search", "greedy"]))
    assert settings.speech_search == "greedy"
    seen = {}

    class Loaded(Exception):
        """Stands for the model: the test needs only what the loader was asked for."""

    def load(name, device=None, speech_search=None):
        seen.update(speech_search=speech_search)
        raise Loaded

    monkeypatch.setattr(ev, "load_pretrained", load)
    with pytest.raises(Loaded):
        ev.build_engines(parser.parse_args(["--task", "asr", "--manifest", "m.jsonl"]), settings)
    assert seen == {"speech_search": "greedy"}
    ev.evaluate(_text_items(1), settings, Engines(llm=FakeLlm()), tmp_path, progress=False)
    written = json.loads(next(tmp_path.glob("*.summary.json")).read_text())
    assert written["settings"]["speech_search"] == "greedy"
