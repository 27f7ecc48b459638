"""train/loop.py on a toy model: learning, freezing checks, schedules, exact resume, run-directory record."""
import json

import pytest
import torch
from torch import nn

from train.loop import (
    CHECKPOINTS_DIR,
    LoopConfig,
    ShuffledBatchSampler,
    StopTraining,
    check_trainable,
    checkpoint_dirs,
    lr_lambda,
    train,
)

N_EXAMPLES, DIM = 40, 6


class Toy(nn.Module):
    """`body` trains; `frozen` is a fixed random projection in front of it; dropout uses the global RNG."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(DIM, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.frozen.requires_grad_(False)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.body(self.frozen(x)).squeeze(-1), y)


def dataset():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_EXAMPLES, DIM, generator=generator)
    y = x @ torch.linspace(-1, 1, DIM)
    return [(x[i], y[i]) for i in range(N_EXAMPLES)]


def collate(items):
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


def loss_fn(model, batch):
    loss = model(batch["x"], batch["y"])
    return loss, {"abs_y": float(batch["y"].abs().mean())}


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), learning_rate=3e-2, per_device_batch_size=4, num_epochs=3,
                  warmup_steps=2, lr_schedule="cosine", log_every=1, seed=3, gradient_accumulation_steps=2)
    kwargs.update(overrides)
    return LoopConfig(**kwargs)


def run(tmp_path, resume=False, callbacks=(), **overrides):
    data = dataset()
    return train(Toy(), loss_fn, data, collate, config(tmp_path, **overrides), expected_trainable=("body.",),
                 eval_dataset=data[:8], resume=resume, callbacks=callbacks)


def test_loss_falls_and_only_trainable_parameters_change(tmp_path):
    before = Toy().state_dict()
    result = run(tmp_path, learning_rate=5e-2, num_epochs=6)
    after = result.model.state_dict()
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert torch.equal(before["frozen.weight"], after["frozen.weight"])
    assert not torch.equal(before["body.0.weight"], after["body.0.weight"])
    # 40 examples / batch 4 = 10 micro-batches per epoch, 2 per step, 6 epochs.
    assert result.state.step == len(result.losses) == 30


def test_resume_after_a_kill_reproduces_the_loss_sequence(tmp_path):
    full = run(tmp_path / "full", save_every=3)

    def kill_at_step_8(state, metrics):
        if state.step == 8:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", save_every=3, callbacks=[kill_at_step_8])
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step-3", "step-6"]  # keep_last=2
    resumed = run(tmp_path / "cut", save_every=3, resume=True)
    assert resumed.losses == full.losses  # bit for bit, through dropout and an epoch boundary
    assert [r["loss"] for r in map(json.loads,
                                   (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())] == full.losses
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_that_loses_the_data_position_differs(tmp_path):
    """The resume test above can fail: skipping the data position (resuming at a different batch) breaks it."""
    full = run(tmp_path / "full", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", save_every=3,
            callbacks=[lambda s, m: (_ for _ in ()).throw(KeyboardInterrupt) if s.step == 4 else None])
    state_file = checkpoint_dirs(tmp_path / "cut")[-1] / "loop_state.json"
    state = json.loads(state_file.read_text())
    state["batches_in_epoch"] = 0  # forget the data position
    state_file.write_text(json.dumps(state))
    resumed = run(tmp_path / "cut", save_every=3, resume=True)
    assert resumed.losses[:3] == full.losses[:3] and resumed.losses != full.losses


def test_stop_training_writes_a_final_checkpoint(tmp_path):
    def stop(state, metrics):
        if state.step == 2:
            raise StopTraining

    result = run(tmp_path, callbacks=[stop])
    assert result.state.step == 2 and checkpoint_dirs(tmp_path)[-1].name == "step-2"


def test_run_directory_holds_the_record(tmp_path):
    result = run(tmp_path, eval_every=5)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"train_config.json", "metrics.jsonl", "eval.jsonl", "loss_curve.png", CHECKPOINTS_DIR} <= names
    record = json.loads((tmp_path / "train_config.json").read_text())
    assert record["loop"]["learning_rate"] == 3e-2 and record["trainable_parameters"] == 6 * 8 + 8 + 8 + 1
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "abs_y"} <= set(metrics[0])
    assert [r["step"] for r in result.eval_history] == [5, 10, 15]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_frozen_parameter_that_requires_grad_fails_loudly():
    model = Toy()
    model.frozen.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="should be frozen"):
        check_trainable(model, ("body.",))
    with pytest.raises(RuntimeError, match="should train"):
        check_trainable(Toy(), ("body.", "frozen."))
    assert check_trainable(Toy(), lambda name: name.startswith("body."), log=lambda _: None) == 65


def test_schedule_warms_up_then_decays():
    factor = lr_lambda(LoopConfig(output_dir="x", warmup_steps=4, lr_schedule="linear"), total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.5) and factor(14) == 0.0
    cosine = lr_lambda(LoopConfig(output_dir="x", lr_schedule="cosine", min_lr_ratio=0.1), total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.55) and cosine(10) == pytest.approx(0.1)


def test_sharded_sampler_covers_each_example_once_per_epoch():
    shards = [ShuffledBatchSampler(23, 3, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(2):
        seen = []
        for sampler in shards:
            sampler.set_epoch(epoch)
            seen += [i for batch in sampler for i in batch]
            assert len(list(sampler)) == len(sampler) == 3  # 23 // 6 full global batches
        assert len(seen) == len(set(seen)) == 18
    one = ShuffledBatchSampler(23, 3, seed=5)
    assert sorted(i for b in one for i in b) == list(range(23))


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown loop config keys"):
        LoopConfig.from_dict({"output_dir": "x", "learning_rat": 1e-3})


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    run(tmp_path, gradient_accumulation_steps=1, num_epochs=1, lr_schedule="linear", warmup_steps=4)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[:6] == pytest.approx([3e-2 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6)])  # 10 steps
