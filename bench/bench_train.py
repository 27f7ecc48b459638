"""Adapter training throughput (samples/s) with and without the frozen-encoder cache.

    PYTHONPATH=. python bench/bench_train.py --config train/configs/adapter_tiny_offline.json --steps 20

Three runs of the same `--steps` steps (same seed, so the same batches) on one loaded model:
`no cache` (Whisper runs every step), `cold cache` (Whisper runs and its outputs are written) and
`warm cache` (outputs read back; what every epoch after the first costs). Extra arguments are config
overrides (`section.key=value`), e.g. `loop.per_device_batch_size=32 loop.mixed_precision=bf16`.
A one-step warm-up run comes first. The adapter keeps training across the runs, which does not change
the cost of a step. Throughput is the loop's own (samples over the run's wall time, its closing evaluation
and checkpoint included), so short runs understate it a little and alike.

    PYTHONPATH=. python bench/bench_train.py --config train/configs/adapter_base_context_ctc.json --steps 20 \
        --workers 0,1

`--workers N,M,...` instead compares DataLoader worker counts on the config's own, already filled encoder
cache (`data.encoder_cache_dir`, e.g. by train/precompute_encoder.py): one warm-cache run per count, each
against the first. With workers, reading cached frames and rendering prompts overlap the step's compute.
`--memory-gb 0,10` likewise compares budgets of `data.encoder_cache_memory_gb` (frames held in memory after
their first read): give it a small mix (`data.train_manifest=...`) or enough steps that clips are read again.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from train.adapter_config import load_config
from train.train_adapter import build_model, run


def timed_run(config, loaded, *, cache_dir: str | None, out_dir: Path, steps: int) -> float:
    config.data.encoder_cache_dir = cache_dir
    config.loop.output_dir = str(out_dir)
    config.loop.max_steps = steps
    config.loop.save_every = config.loop.eval_every = steps * 10  # measure steps, not checkpoints
    config.eval.repeat_wer_examples = 0
    return run(config, loaded=loaded).samples_per_s


def cache_rates(config, loaded, root: Path, steps: int) -> dict[str, float]:
    cache = str(root / "encoder_cache")
    timed_run(config, loaded, cache_dir=None, out_dir=root / "warmup", steps=1)  # first-call costs out of the way
    return {
        "no cache": timed_run(config, loaded, cache_dir=None, out_dir=root / "a", steps=steps),
        "cold cache": timed_run(config, loaded, cache_dir=cache, out_dir=root / "b", steps=steps),
        "warm cache": timed_run(config, loaded, cache_dir=cache, out_dir=root / "c", steps=steps),
    }


def setting_rates(config, loaded, root: Path, steps: int, flag: str, values: list, apply, label) -> dict[str, float]:
    """One warm-cache run per distinct value of a setting, on the config's own filled encoder cache."""
    cache = config.data.encoder_cache_dir
    if not cache:
        raise SystemExit(f"{flag} reads the config's filled encoder cache: set data.encoder_cache_dir")
    timed_run(config, loaded, cache_dir=cache, out_dir=root / "warmup", steps=1)
    rates = {}
    for number, value in enumerate(dict.fromkeys(values)):  # each value once
        apply(config, value)
        rates[label(value)] = timed_run(config, loaded, cache_dir=cache, out_dir=root / f"v{number}", steps=steps)
    return rates


def worker_rates(config, loaded, root: Path, steps: int, workers: str) -> dict[str, float]:
    return setting_rates(config, loaded, root, steps, "--workers", [int(c) for c in workers.split(",")],
                         lambda config, count: setattr(config.loop, "num_workers", count),
                         lambda count: f"{count} workers")


def memory_rates(config, loaded, root: Path, steps: int, budgets: str) -> dict[str, float]:
    return setting_rates(config, loaded, root, steps, "--memory-gb", [float(b) for b in budgets.split(",")],
                         lambda config, gb: setattr(config.data, "encoder_cache_memory_gb", gb),
                         lambda gb: f"{gb:g} GB held")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", help="comma-separated DataLoader worker counts to compare on the filled "
                        "encoder cache of the config, e.g. 0,1")
    parser.add_argument("--memory-gb", help="comma-separated budgets of data.encoder_cache_memory_gb to compare on "
                        "the filled encoder cache of the config, e.g. 0,10 (run enough steps for a second epoch)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    loaded = build_model(config.model)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        if args.workers:
            rates = worker_rates(config, loaded, Path(scratch), args.steps, args.workers)
        elif args.memory_gb:
            rates = memory_rates(config, loaded, Path(scratch), args.steps, args.memory_gb)
        else:
            rates = cache_rates(config, loaded, Path(scratch), args.steps)
    baseline = next(iter(rates))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {platform.python_version()}; torch {torch.__version__}; "
          f"batch {config.loop.per_device_batch_size}; precision {config.loop.mixed_precision}; "
          f"{args.steps} steps per run")
    for name, rate in rates.items():
        print(f"{name:>10}: {rate:8.2f} samples/s  ({rate / rates[baseline]:.2f}x {baseline})")
    print(json.dumps({k.replace(" ", "_"): round(v, 3) for k, v in rates.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
