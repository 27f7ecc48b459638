"""train.ctc_symbols: symbols learnt from a mix's transcripts become a training config that loads and trains
a head over them, and the report says which subsampling leaves every clip room to be aligned."""
import json

from blsp_chat.characters import ENGLISH_ALPHABET, learn_symbols
from train import ctc_symbols
from train.adapter_config import load_config

BASE_CONFIG = "train/configs/adapter_base_context_aug_chars_ctc.json"
LINES = [("the cat sat on the mat", 2.0), ("then the theory", 1.5), ("a fast talker says the rest", 0.4)]


def write_manifest(path):
    rows = [{"audio": f"{n}.wav", "text": text, "duration": seconds} for n, (text, seconds) in enumerate(LINES)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows + [{"audio": "x.wav", "text": ""}]))


def test_the_written_config_trains_over_the_learnt_symbols_and_the_report_counts_unalignable_clips(tmp_path, capsys):
    manifest, out = tmp_path / "mix.jsonl", tmp_path / "symbols.json"
    write_manifest(manifest)
    assert ctc_symbols.main(["--manifest", str(manifest), "--count", "45", "--base-config", BASE_CONFIG,
                             "--out", str(out), "--output-dir", "runs/symbols_s0"]) == 0
    config = load_config(out)
    symbols = learn_symbols([text for text, _ in LINES], 45)
    assert config.model.ctc_alphabet == symbols and symbols[:len(ENGLISH_ALPHABET)] == list(ENGLISH_ALPHABET)
    assert (config.loop.output_dir, config.data.train_manifest) == ("runs/symbols_s0", str(manifest))
    assert config.model.conv_kernel_sizes == "5"  # the rest is the base config's
    printed = capsys.readouterr().out
    assert "45 symbols from 3 transcripts" in printed  # the line without a transcript teaches nothing
    # "a fast talker says the rest" in 0.4 s: 5 outputs at 12.5 a second, 10 at 25, for some 15 symbols
    assert "12.5 outputs a second: 33.33% of 3 clips" in printed and "25 outputs a second: 33.33%" in printed


def test_a_mix_without_transcripts_is_refused(tmp_path, capsys):
    manifest = tmp_path / "mix.jsonl"
    manifest.write_text(json.dumps({"audio": "x.wav", "text": " "}) + "\n")
    assert ctc_symbols.main(["--manifest", str(manifest), "--count", "45", "--base-config", BASE_CONFIG,
                             "--out", str(tmp_path / "c.json")]) == 2
    assert "no transcripts" in capsys.readouterr().err
