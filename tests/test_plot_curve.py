"""train.plot_curve: the held-out WER curve of runs, read from eval.jsonl as the loop writes it."""
import json

import pytest

from train.plot_curve import main, parse_baseline, read_curve


def write_eval(run, records):
    run.mkdir(parents=True)
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_curve_keeps_the_last_record_of_a_step_and_skips_evals_without_the_metric(tmp_path):
    run = tmp_path / "run"
    write_eval(run, [{"step": 500, "repeat_wer": 0.5}, {"step": 1000, "eval_loss": 2.0},
                     {"step": 1000, "repeat_wer": 0.4}, {"step": 1000, "repeat_wer": 0.38}])
    assert read_curve(run, "repeat_wer") == [(500, 0.5), (1000, 0.38)]


def test_the_command_draws_a_png_and_prints_the_table(tmp_path, capsys):
    write_eval(tmp_path / "s0", [{"step": 500, "repeat_wer": 0.5, "readout_wer": 0.4}])
    write_eval(tmp_path / "s1", [{"step": 500, "repeat_wer": 0.45}, {"step": 1000, "repeat_wer": 0.3}])
    out = tmp_path / "curve.png"
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--baseline", "Whisper base=0.12",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| step | s0 repeat_wer | s1 repeat_wer |"
    assert table[2:] == ["| 500 | 50.0 | 45.0 |", "| 1000 |  | 30.0 |"]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.jsonl"):
        read_curve(tmp_path, "repeat_wer")
    write_eval(tmp_path / "run", [{"step": 500, "eval_loss": 2.0}])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), "--out", str(tmp_path / "c.png")])
    for bad in ("0.3", "=0.3", "base=abc"):
        with pytest.raises(Exception, match="NAME=WER"):
            parse_baseline(bad)
    assert parse_baseline("Whisper a=b=0.25") == ("Whisper a=b", 0.25)
