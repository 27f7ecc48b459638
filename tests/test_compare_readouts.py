"""train.compare_readouts: a CTC model's greedy and fused readouts on the same clips, scored and timed."""
import json

import pytest
import soundfile as sf
import torch
from test_weights import _write_base_models

from blsp_chat.audio import load_audio
from blsp_chat.characters import BLANK, ENGLISH_ALPHABET
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.heard import heard_text
from blsp_chat.weights import load_pretrained, save_adapter
from tiny import tiny_blsp, tiny_tokenizer, tone
from train import compare_readouts
from train.speech_data import read_manifest


def saved_model(tmp_path, **config):
    model, tokenizer = tiny_blsp("none", **config), tiny_tokenizer()
    if model.ctc_head is not None:
        with torch.no_grad():
            model.ctc_head.bias[BLANK] = -10.0  # a head that spells something at every output
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "model")
    return tmp_path / "model"


def manifest(tmp_path):
    lines = []
    for i, text in enumerate(["hello there", "the quick brown fox"]):
        sf.write(tmp_path / f"clip{i}.wav", tone(0.8 + 0.4 * i, 220 + 60 * i, i), SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": text, "response": text}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_both_readouts_are_scored_on_every_clip_with_only_the_search_changed(tmp_path, capsys, monkeypatch):
    model_dir = saved_model(tmp_path, speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    searches = []
    heard_by = compare_readouts.heard_by
    monkeypatch.setattr(compare_readouts, "heard_by",
                        lambda loaded, outputs, **search: searches.append(search) or heard_by(loaded, outputs,
                                                                                              **search))
    compare_readouts.main(["--model", str(model_dir), "--manifest", str(manifest(tmp_path)), "--lm-weight", "0.3"])
    out = capsys.readouterr().out
    assert out.count("REF ") == 2 and out.count("  greedy ") == 2 and out.count("  fused  ") == 2
    assert "2 clips: greedy WER" in out
    assert "at LM weight 0.3, bonus 0.0, beam 4, label floor None, beam prune None" in out
    assert searches == [{"ctc_lm_weight": 0.0}, {"ctc_lm_weight": 0.3, "ctc_token_bonus": 0.0, "ctc_beam_size": 4,
                                                  "ctc_label_min_log_prob": None, "ctc_beam_prune_log_prob": None}]


def test_a_grid_searches_every_combination_and_shows_the_clips_of_the_best(tmp_path, capsys, monkeypatch):
    model_dir = saved_model(tmp_path, speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    searches = []

    def heard_by(loaded, adapted, **search):  # the fused search hears every clip right only at weight 0.5, bonus 1
        searches.append(search)
        right = search.get("ctc_lm_weight") == 0.5 and search.get("ctc_token_bonus") == 1.0
        return (["hello there", "the quick brown fox"] if right else ["hello", "the quick"]), 0.1

    monkeypatch.setattr(compare_readouts, "heard_by", heard_by)
    compare_readouts.main(["--model", str(model_dir), "--manifest", str(manifest(tmp_path)),
                           "--lm-weight", "0.2", "0.5", "--token-bonus", "0", "1", "--beam-size", "2",
                           "--label-min-log-prob", "-3", "none", "--beam-prune-log-prob", "-5"])
    out = capsys.readouterr().out
    assert len(searches) == 9 and searches[0] == {"ctc_lm_weight": 0.0}
    assert {tuple(s.values()) for s in searches[1:]} == {
        (lm, bonus, 2, floor, -5.0) for lm in (0.2, 0.5) for bonus in (0.0, 1.0) for floor in (-3.0, None)}
    assert out.count("fused WER") == 9 and out.count("REF ") == 2
    lines = out.splitlines()  # the greedy figure comes before the grid runs, for a grid cut short
    assert lines[0].startswith("encoder and adapter: ") and lines[1] == "greedy WER 50.0% (0.1 s)"
    assert "  fused  the quick brown fox" in out
    assert ("fused WER 0.0% (0.1 s) at LM weight 0.5, bonus 1.0, beam 2, label floor -3.0, beam prune -5.0 "
            "(the best of 8)") in out


def test_a_grid_runs_the_encoder_once_a_clip_and_hears_what_the_served_model_hears(tmp_path, capsys, monkeypatch):
    model_dir = saved_model(tmp_path, speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    loaded = load_pretrained(model_dir, device="cpu")
    monkeypatch.setattr(compare_readouts, "load_pretrained", lambda *args, **kwargs: loaded)
    encoded, served = [], []
    encode_windows = loaded.model.encode_windows
    monkeypatch.setattr(loaded.model, "encode_windows",
                        lambda audios: encoded.append(len(audios)) or encode_windows(audios))
    real_heard_by = compare_readouts.heard_by

    def heard_by(loaded, adapted, **search):
        texts, seconds = real_heard_by(loaded, adapted, **search)
        served.append(texts)
        return texts, seconds

    monkeypatch.setattr(compare_readouts, "heard_by", heard_by)
    clips = manifest(tmp_path)
    compare_readouts.main(["--model", str(model_dir), "--manifest", str(clips), "--lm-weight", "0.2", "0.5"])
    assert encoded == [1, 1]  # two clips, once each, for the greedy readout and both searches
    with torch.inference_mode():
        expected = [heard_text(loaded.model, loaded.tokenizer, loaded.model.encode_speech([load_audio(e.audio)])[0])
                    for e in read_manifest(clips)]
    assert served[0] == expected and all(texts for texts in served)


def test_a_model_without_words_or_without_an_lm_weight_is_refused(tmp_path):
    clips = manifest(tmp_path)
    with pytest.raises(SystemExit, match="paper's readout"):
        compare_readouts.main(["--model", str(saved_model(tmp_path / "a")), "--manifest", str(clips)])
    characters = saved_model(tmp_path / "b", speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    with pytest.raises(SystemExit, match="give --lm-weight"):
        compare_readouts.main(["--model", str(characters), "--manifest", str(clips)])
    with pytest.raises(SystemExit, match="every value above 0"):
        compare_readouts.main(["--model", str(characters), "--manifest", str(clips), "--lm-weight", "0.3", "0"])
