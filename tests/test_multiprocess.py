"""train/loop.py with two real processes: `accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo),
running tests/multiprocess_worker.py. The ranks split the data, DDP averages their gradients, one checkpoint
is written per save, a killed run resumes where it stopped, and train_adapter and train.finetune run the same
way."""
import json
import os
import shutil
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import multiprocess_worker as worker
import numpy as np
import pytest
import soundfile as sf
import torch

from blsp_chat.constants import TRANSLATE_INSTRUCTION
from tiny import tone
from train.loop import CHECKPOINTS_DIR, LoopConfig, ShardedEvalSampler, ShuffledBatchSampler, train
from train.speech_data import BucketBatchSampler

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LAUNCH_TIMEOUT_S = 300
STEPS, STEPS_PER_EPOCH = 8, 4  # 32 examples, 2 processes x batch 4, 2 epochs


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """The worker under `accelerate launch` on a free port, one thread per process (the CPU is shared)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(TESTS / "multiprocess_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO)


def read_steps(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"ids.rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    done = launch("toy", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The same run in this process, alone, at twice the batch."""
    out = tmp_path_factory.mktemp("one")
    worker.run_toy(Namespace(out=str(out), batch=8, resume=False, kill_at=None))
    return out


def test_the_two_ranks_train_on_disjoint_halves_that_cover_each_epoch(two_processes):
    ranks = [read_steps(two_processes, rank) for rank in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(1, STEPS + 1))
    for epoch in range(STEPS // STEPS_PER_EPOCH):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        seen = [[i for record in rank[steps] for i in record["ids"]] for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == worker.N_EXAMPLES // 2
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(worker.N_EXAMPLES))
    assert ranks[0][0]["ids"] != ranks[0][STEPS_PER_EPOCH]["ids"]  # each epoch is shuffled anew


def test_two_processes_at_batch_4_step_as_one_process_at_batch_8(two_processes, one_process):
    for step in range(1, STEPS + 1):  # the first step alone, and every one after it
        two = torch.load(two_processes / f"weights.step{step}.pt")
        one = torch.load(one_process / f"weights.step{step}.pt")
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
    first_weights = torch.load(one_process / "weights.step1.pt")
    assert not torch.equal(first_weights["body.0.weight"], worker.Linear().body[0].weight)  # it did learn
    two, one = (json.loads((d / "result.json").read_text()) for d in (two_processes, one_process))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    assert [e["eval_examples"] for e in two["eval"]] == [worker.N_EVAL, worker.N_EVAL]  # each held-out one once
    np.testing.assert_allclose([e["eval_loss"] for e in two["eval"]], [e["eval_loss"] for e in one["eval"]], rtol=1e-6)


def test_each_save_writes_one_checkpoint_and_the_record_once(two_processes):
    run = two_processes / "run"
    checkpoints = sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["step-6", "step-8"]  # saves at 3, 6 and the end; keep_last=2
    files = sorted(p.name for p in (run / CHECKPOINTS_DIR / "step-8").iterdir())
    assert files == [".complete", "loop_state.json", "optimizer.pt", "rng_0.pt", "rng_1.pt", "scheduler.pt",
                     "trainable.pt"]
    assert json.loads((run / CHECKPOINTS_DIR / "step-8" / "loop_state.json").read_text())["num_processes"] == 2
    record = json.loads((run / "train_config.json").read_text())
    assert (record["num_processes"], record["global_batch_size"]) == (2, 8)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, STEPS + 1))
    saved = torch.load(run / CHECKPOINTS_DIR / "step-8" / "trainable.pt")
    final = torch.load(two_processes / f"weights.step{STEPS}.pt")
    assert all(torch.equal(saved[name], final[name]) for name in final)


def test_a_run_killed_mid_way_resumes_with_nothing_repeated_or_skipped(two_processes, tmp_path):
    killed = launch("toy", str(tmp_path), "--kill-at", "5")
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS_DIR).iterdir()) == ["step-3"]
    before = {rank: read_steps(tmp_path, rank) for rank in (0, 1)}
    for rank in (0, 1):
        (tmp_path / f"ids.rank{rank}.jsonl").unlink()
    resumed = launch("toy", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    for rank in (0, 1):
        after = read_steps(tmp_path, rank)
        assert after[0]["step"] == 4  # the step after the checkpoint: steps 4 and 5 are trained again, once
        trained = [r for r in before[rank] if r["step"] <= 3] + after
        assert trained == read_steps(two_processes, rank)  # same ids, same losses, at every step
    resumed_result = json.loads((tmp_path / "result.json").read_text())
    assert resumed_result == json.loads((two_processes / "result.json").read_text())
    final, expected = (torch.load(d / f"weights.step{STEPS}.pt") for d in (tmp_path, two_processes))
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_a_checkpoint_resumes_only_under_as_many_processes(two_processes, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_processes / "run" / CHECKPOINTS_DIR, run / CHECKPOINTS_DIR)
    config = LoopConfig(**{**worker.toy_config(tmp_path, 8).to_dict(), "output_dir": str(run)})
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        train(worker.Linear(), worker.loss_fn, worker.toy_dataset(worker.N_EXAMPLES, 1), worker.collate, config,
              expected_trainable=("body.",), resume=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    lines = []
    for i, text in enumerate(["hello there", "the quick brown fox", "paris is a city", "the lazy dog sleeps",
                              "one two three", "four five six", "seven eight", "nine ten"]):
        sf.write(root / f"clip{i}.wav", tone(0.4 + 0.1 * len(text.split()), 200 + 40 * i, i), 16000)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": text, "response": text + ".",
                                 "instruction": "Continue the following text."}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def test_train_adapter_runs_on_two_processes_and_one_rank_stopping_stops_both(corpus, tmp_path):
    done = launch("adapter", str(tmp_path), str(corpus), "--stop-at", "3")
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"adapter_result.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1] and results[0]["steps"] == 3  # 4 planned; the last rank stopped at 3
    assert all(np.isfinite(results[0]["losses"]))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == ["step-2", "step-3"]
    for name in ("config.json", "model.safetensors", "README.md", "data_summary.json"):
        assert (run / name).is_file()
    assert json.loads((run / "train_config.json").read_text())["num_processes"] == 2
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 3 and evals[-1]["eval_examples"] == 8  # every held-out clip, once


def test_finetune_runs_on_two_processes(tmp_path):
    corpus = tmp_path / "st"
    corpus.mkdir()
    lines = []
    for i, (text, spanish) in enumerate([("hello there", "hola"), ("the quick fox", "el zorro"), ("one", "uno"),
                                         ("two", "dos"), ("the lazy dog", "el perro"), ("paris", "paris"),
                                         ("three", "tres"), ("four", "cuatro")]):
        sf.write(corpus / f"clip{i}.wav", tone(0.5 + 0.1 * i, 180 + 30 * i, i), 16000)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": text, "response": spanish,
                                 "instruction": TRANSLATE_INSTRUCTION.format(target="Spanish")}))
    (corpus / "train.jsonl").write_text("\n".join(lines) + "\n")
    done = launch("finetune", str(tmp_path), str(corpus / "train.jsonl"))
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp_path / f"finetune_result.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1] and len(results[0]["losses"]) == 3 and all(np.isfinite(results[0]["losses"]))
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"):
        assert (run / name).is_file()  # the BLSP adapter and encoder, and peft's LoRA beside them
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == ["step-2", "step-3"]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["eval_examples"] == 8


# --- the samplers, in this process -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 16, 33])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_eval_sampler_gives_every_example_to_exactly_one_rank(n, replicas):
    seen = [i for rank in range(replicas) for batch in ShardedEvalSampler(n, 4, num_replicas=replicas, rank=rank)
            for i in batch]
    assert sorted(seen) == list(range(n))
    lengths = [len(ShardedEvalSampler(n, 4, num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert max(lengths) - min(lengths) <= 1


def test_training_samplers_split_an_epoch_between_two_ranks():
    for n, full in ((32, True), (35, False)):
        shuffled = [list(ShuffledBatchSampler(n, 4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
        bucketed = [list(BucketBatchSampler([0.5 + (i % 7) / 10 for i in range(n)], 4, seed=3, mega_batch_factor=2,
                                            num_replicas=2, rank=r)) for r in (0, 1)]
        for ranks in (shuffled, bucketed):
            assert len(ranks[0]) == len(ranks[1])  # as many steps on each rank
            assert all(len(a) == len(b) for a, b in zip(*ranks))
        flat = [[i for batch in rank for i in batch] for rank in shuffled]
        assert not set(flat[0]) & set(flat[1])
        # An incomplete last global batch: the shuffled sampler drops it (3 examples), the bucketing one fills
        # it up with the epoch's first examples so that every clip is seen.
        assert len(set(flat[0]) | set(flat[1])) == (n if full else 32)
        bucket_flat = [i for rank in bucketed for batch in rank for i in batch]
        assert set(bucket_flat) == set(range(n)) and len(bucket_flat) == (n if full else 40)
