"""Training that shows itself (train/loop.py): a progress bar on a terminal only, accelerate's trackers
(TensorBoard) holding the same figures as metrics.jsonl through a kill and a resume, clear errors for a
tracker that is not installed, the command-line options, and checkpoints of older runs still resuming."""
import io
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_loop import run

from train import loop, train_adapter
from train.adapter_config import load_config
from train.loop import TRACKING_DIR, LoopConfig, checkpoint_dirs

STEPS = 15  # test_loop's toy run: 40 examples, batch 4, accumulation 2, 3 epochs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def captured_run(monkeypatch, stream, tmp_path, **overrides):
    monkeypatch.setattr(sys, "stderr", stream)
    return run(tmp_path, **overrides)


def test_the_progress_bar_counts_steps_on_a_terminal(monkeypatch, tmp_path):
    stream = Terminal()
    captured_run(monkeypatch, stream, tmp_path)
    text = stream.getvalue()
    assert f"{STEPS}/{STEPS}" in text and "step/s" in text and "loss=" in text
    assert "[train] step 15/15 loss" in text  # log lines still come, above the bar


@pytest.mark.parametrize("stream, option", [(io.StringIO(), True), (Terminal(), False)])
def test_no_progress_bar_in_a_log_file_or_when_switched_off(monkeypatch, tmp_path, stream, option):
    captured_run(monkeypatch, stream, tmp_path, progress_bar=option)
    text = stream.getvalue()
    assert "[train] step 15/15 loss" in text and "step/s" not in text and "it/s" not in text


def test_a_resumed_run_continues_the_bar_from_its_checkpoint(monkeypatch, tmp_path):
    def kill(state, metrics):
        if state.step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, save_every=3, callbacks=[kill])
    stream = Terminal()
    captured_run(monkeypatch, stream, tmp_path, save_every=3, resume=True)
    assert f" 6/{STEPS}" in stream.getvalue() and f" 5/{STEPS}" not in stream.getvalue()


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir / TRACKING_DIR / run_dir.name))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_holds_the_metrics_and_eval_records(tmp_path):
    run_dir = tmp_path / "tb"
    run(run_dir, eval_every=5, report_to=("tensorboard",))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = scalars(run_dir, "train/loss")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    assert [v for _, v in logged] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [s for s, _ in scalars(run_dir, "train/lr")] == list(range(1, STEPS + 1))
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert scalars(run_dir, "eval/eval_loss") == [(e["step"], pytest.approx(e["eval_loss"], rel=1e-6)) for e in evals]


def test_a_resumed_run_replaces_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    full = run(tmp_path / "full", save_every=3, report_to=("tensorboard",))

    def kill(state, metrics):
        if state.step == 8:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(cut, save_every=3, callbacks=[kill], report_to=("tensorboard",))
    run(cut, save_every=3, resume=True, report_to=("tensorboard",))
    logged = scalars(cut, "train/loss")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))  # steps 7 and 8 once, from the resumed run
    assert [v for _, v in logged] == pytest.approx(full.losses, rel=1e-6)


def test_a_tracker_that_is_not_installed_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setattr(loop, "get_available_trackers", lambda: [])
    with pytest.raises(ImportError, match=r"'tensorboard'.*pip install tensorboard \(in the train extra"):
        LoopConfig(output_dir="x", report_to=("tensorboard",))
    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        LoopConfig(output_dir="x", report_to=("tensorbored",))


def test_the_command_line_options_reach_the_loop_config(monkeypatch, capsys):
    args = train_adapter.parse_args(["--config", "train/configs/adapter_tiny_offline.json", "--report-to",
                                     "tensorboard", "--no-progress", "loop.max_steps=3"])
    config = load_config(args.config, train_adapter.cli_overrides(args))
    assert config.loop.report_to == ("tensorboard",) and config.loop.progress_bar is False
    assert config.loop.max_steps == 3
    monkeypatch.setattr(loop, "get_available_trackers", lambda: [])
    assert train_adapter.main(["--config", "train/configs/adapter_tiny_offline.json", "--report-to",
                               "tensorboard"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_a_checkpoint_written_before_the_process_count_was_recorded_still_resumes(tmp_path):
    full = run(tmp_path / "full", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "old", save_every=3,
            callbacks=[lambda s, m: (_ for _ in ()).throw(KeyboardInterrupt) if s.step == 7 else None])
    for checkpoint in checkpoint_dirs(tmp_path / "old"):  # the layout of runs started before this change
        state_file = checkpoint / "loop_state.json"
        state = json.loads(state_file.read_text())
        del state["num_processes"]
        state_file.write_text(json.dumps(state) + "\n")
    resumed = run(tmp_path / "old", save_every=3, resume=True)
    assert resumed.losses == full.losses
