"""train/branch_run.py: a run branched at a checkpoint goes on exactly as the source would, or on other data."""
import json
import shutil

import pytest
import torch
from test_loop import Toy, collate, config, dataset, loss_fn, run

from train.branch_run import BRANCH_RECORD_NAME, branch_run, main
from train.loop import StopTraining, checkpoint_dirs, train


def stop_at(step):
    def stop(state, metrics):
        if state.step == step:
            raise StopTraining
    return stop


def source_stopped_at_step_6(tmp_path):
    source = tmp_path / "source"
    run(source, save_every=3, callbacks=[stop_at(6)])
    return source


def test_a_branch_on_the_same_data_continues_the_source_bit_for_bit(tmp_path):
    full = run(tmp_path / "full", save_every=3)
    source = source_stopped_at_step_6(tmp_path)
    branch_run(source, "step-3", tmp_path / "branch")
    branched = run(tmp_path / "branch", save_every=3, resume=True)
    assert branched.losses == full.losses
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, branched.model.state_dict()[key]), key
    assert json.loads((tmp_path / "branch" / BRANCH_RECORD_NAME).read_text()) == {
        "source": str(source), "checkpoint": "step-3", "step": 3}


def test_a_branch_on_other_data_shares_the_history_up_to_the_step_and_leaves_the_source_alone(tmp_path):
    source = source_stopped_at_step_6(tmp_path)
    before = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    branch_run(source, "6", tmp_path / "branch")
    assert (tmp_path / "branch" / "train_config.json").read_bytes() == (source / "train_config.json").read_bytes()
    doubled = [(x, 2 * y) for x, y in dataset()]
    other = train(Toy(), loss_fn, doubled, collate, config(tmp_path / "branch", save_every=3),
                  expected_trainable=("body.",), resume=True)
    source_losses = [row["loss"] for row in map(json.loads, (source / "metrics.jsonl").read_text().splitlines())]
    assert other.losses[:6] == source_losses and len(other.losses) == 15
    assert other.losses[6:] != run(tmp_path / "same", save_every=3).losses[6:]  # the other data did train
    assert {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()} == before


def test_branching_never_overwrites_a_run_and_names_the_checkpoints_kept(tmp_path, capsys):
    source = source_stopped_at_step_6(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint 'step-5'; kept: step-3, step-6"):
        branch_run(source, "step-5", tmp_path / "branch")
    main([str(source), "step-6", str(tmp_path / "branch")])
    assert "branched" in capsys.readouterr().out
    assert [d.name for d in checkpoint_dirs(tmp_path / "branch")] == ["step-6"]
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        branch_run(source, "step-3", tmp_path / "branch")


def test_a_branch_killed_while_copying_is_branched_again_and_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    source = source_stopped_at_step_6(tmp_path)
    target = tmp_path / "branch"

    real_copytree = shutil.copytree

    def killed_after_the_files(src, dst, ignore=None):  # the copy stops before the rename and the marker
        real_copytree(src, dst, ignore=ignore)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("train.branch_run.shutil.copytree", killed_after_the_files)
    with pytest.raises(KeyboardInterrupt):
        branch_run(source, "step-6", target)
    assert checkpoint_dirs(target) == []  # the partial copy holds no complete marker
    monkeypatch.undo()
    branch_run(source, "step-6", target)
    assert [d.name for d in (target / "checkpoints").iterdir()] == ["step-6"]
    assert [d.name for d in checkpoint_dirs(target)] == ["step-6"]
