"""One training process of tests/test_multiprocess.py, run under `accelerate launch --multi_gpu
--num_processes N` (CPU processes, gloo) or as a plain single process, with the repository and tests/ on
PYTHONPATH.

    python tests/multiprocess_worker.py toy OUT [--batch 4] [--resume] [--kill-at STEP]
    python tests/multiprocess_worker.py adapter OUT CORPUS_MANIFEST [--stop-at STEP]
    python tests/multiprocess_worker.py finetune OUT ST_MANIFEST

toy: train.loop on a linear model over 32 numbered examples. Each rank appends, after every optimizer step,
the ids of the examples it trained on to OUT/ids.rank{R}.jsonl (written and flushed before the next step),
and rank 0 saves the trainable weights of every step to OUT/weights.step{S}.pt. --kill-at S kills rank 0
with SIGKILL right after step S, as a crash or an OOM killer would.
adapter: train.train_adapter.run on a tiny BLSP model (tests/tiny.py) over the manifest; --stop-at S raises
StopTraining after step S on the last rank only (every rank must stop there, or the others wait forever).
finetune: train.finetune.run (LoRA, encoder and adapter training) on test_finetune's tiny model.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from torch import nn

from train.loop import LoopConfig, StopTraining, train

N_EXAMPLES, N_EVAL, DIM = 32, 5, 6
_trained_ids: list[int] = []


class Linear(nn.Module):
    """Deterministic (no dropout): the same weights on every rank and in every run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.body(x).squeeze(-1), y)


def toy_dataset(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=generator)
    y = x @ torch.linspace(-1, 1, DIM) + 0.1 * torch.randn(n, generator=generator)
    return [{"id": i, "x": x[i], "y": y[i]} for i in range(n)]


def collate(items):
    return {"ids": [i["id"] for i in items], "x": torch.stack([i["x"] for i in items]),
            "y": torch.stack([i["y"] for i in items])}


def loss_fn(model, batch):
    if model.training:  # held-out batches are not training data
        _trained_ids.extend(batch["ids"])
    return model(batch["x"], batch["y"]), {}


def toy_config(out: Path, batch: int) -> LoopConfig:
    return LoopConfig(output_dir=str(out / "run"), learning_rate=5e-2, per_device_batch_size=batch, num_epochs=2,
                      warmup_steps=1, lr_schedule="cosine", log_every=1, save_every=3, eval_every=4, seed=7,
                      max_grad_norm=1.0, plot=False)


def record_steps(out: Path, rank: int, kill_at: int | None):
    def callback(state, metrics):
        with open(out / f"ids.rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": state.step, "ids": list(_trained_ids), "loss": metrics["loss"]}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _trained_ids.clear()
        if rank == 0:
            model = current_model[0]
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                       out / f"weights.step{state.step}.pt")
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    return callback


current_model: list[nn.Module] = []


def run_toy(args) -> None:
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Linear()
    current_model[:] = [model]
    _trained_ids.clear()
    result = train(model, loss_fn, toy_dataset(N_EXAMPLES, 1), collate, toy_config(out, args.batch),
                   expected_trainable=("body.",), eval_dataset=toy_dataset(N_EVAL, 2), resume=args.resume,
                   callbacks=[record_steps(out, rank, args.kill_at)])
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"losses": result.losses, "eval": result.eval_history,
                                                     "steps": result.state.step}))


def run_adapter(args) -> None:
    from blsp_chat.weights import LoadedBlsp
    from tiny import tiny_blsp, tiny_tokenizer
    from train.adapter_config import AdapterTrainConfig, DataSection, EvalSection, LossSection, ModelSection
    from train.train_adapter import run

    config = AdapterTrainConfig(
        loop=LoopConfig(output_dir=str(Path(args.out) / "run"), learning_rate=1e-2, per_device_batch_size=2,
                        num_epochs=2, warmup_steps=1, log_every=1, seed=1, save_every=2, plot=False),
        model=ModelSection(encoder_padding="none"),
        data=DataSection(train_manifest=args.manifest, eval_manifest=args.manifest, repetition_ratio=0,
                         mega_batch_factor=2),
        loss=LossSection(kd_weight=0.5), eval=EvalSection(repeat_wer_examples=1, max_new_tokens=4))
    loaded = LoadedBlsp(tiny_blsp("none"), tiny_tokenizer(), "tiny", adapter_trained=False)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def stop_on_last_rank(state, metrics):
        if state.step == args.stop_at and rank == world - 1:
            raise StopTraining

    result = run(config, loaded=loaded, callbacks=[stop_on_last_rank])
    (Path(args.out) / f"adapter_result.rank{rank}.json").write_text(
        json.dumps({"losses": result.losses, "steps": result.state.step}))


def run_finetune(args) -> None:
    from test_finetune import config_for, tiny_loaded

    from train.finetune import prepare_model, run

    rank = int(os.environ.get("RANK", "0"))
    config = config_for(Path(args.manifest), Path(args.out) / "run", per_device_batch_size=2, max_steps=3,
                        save_every=2)
    result = run(config, loaded=prepare_model(tiny_loaded(Path(args.out) / f"base.rank{rank}"), config))
    (Path(args.out) / f"finetune_result.rank{rank}.json").write_text(json.dumps({"losses": result.losses}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["toy", "adapter", "finetune"])
    parser.add_argument("out")
    parser.add_argument("manifest", nargs="?")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--stop-at", type=int)
    args = parser.parse_args()
    {"toy": run_toy, "adapter": run_adapter, "finetune": run_finetune}[args.kind](args)


if __name__ == "__main__":
    main()
