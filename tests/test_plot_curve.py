"""train.plot_curve: the held-out WER curve of runs, read from eval.jsonl as the loop writes it."""
import json

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from train.plot_curve import draw, main, parse_baseline, read_curve


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


def test_each_baseline_is_named_inside_the_plot_when_the_curve_starts_past_step_0():
    figure = draw({"run": [(500, 0.5), (2500, 0.35)]}, [("Whisper base", 0.184), ("v5 default", 0.48)])
    renderer = FigureCanvasAgg(figure).get_renderer()
    axes = figure.axes[0]
    box = axes.get_window_extent(renderer)
    names = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
    assert set(names) == {"Whisper base", "v5 default"}
    for extent in names.values():
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1


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
