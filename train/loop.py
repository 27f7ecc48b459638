"""A generic accelerate training loop that resumes exactly after a kill.

Used by `train.train_adapter` (stage 2: the modality adapter) and `train.sft_llm` (stage 1: LoRA on the
LLM). It knows nothing about speech: it takes a model, a predicate naming the parameters that must train,
a dataset + collate function, and `loss_fn(model, batch) -> (loss, metrics)`.

    from train.loop import LoopConfig, train
    result = train(model, loss_fn, dataset, collate_fn, LoopConfig(output_dir="runs/x", max_steps=100),
                   expected_trainable=("adapter.",), eval_dataset=held_out, resume=True)
    result.losses          # one mean loss per optimizer step, in order

`loss_fn` receives the model as accelerate prepared it (DDP-wrapped on several GPUs): call the model
itself (`model(...)`), not its submodules, so that gradient synchronisation hooks run. A model whose
training loss needs more than `forward` should be wrapped in a small module whose forward computes it.

Run directory (`LoopConfig.output_dir`):
    train_config.json   the loop config and the caller's `run_info`
    metrics.jsonl       every `log_every` optimizer steps: step, epoch, loss, lr, grad_norm, samples_per_s, ...
    eval.jsonl          every `eval_every` steps and at the end: held-out loss (and the caller's eval_fn scores)
    loss_curve.png      training (and eval) loss against step (matplotlib)
    tracking/           accelerate's trackers (`LoopConfig.report_to`, e.g. ["tensorboard"]: `tensorboard
                        --logdir runs/`); the same metrics and eval records, per step; a resumed run purges
                        the killed run's records after the checkpoint, as metrics.jsonl does
    checkpoints/step-N  trainable weights, optimizer, scheduler, grad scaler, data position, RNG states
                        (the newest `keep_last` are kept); `resume=True` continues from the newest one

Exact resume: checkpoints are taken only at optimizer-step boundaries. The data order of an epoch is a
pure function of (seed, epoch) — see `ShuffledBatchSampler` — so on resume the sampler is set to the
saved epoch and the batches already consumed are skipped without being loaded (accelerate's
`skip_first_batches`); the Python, NumPy and
torch (CPU and CUDA) RNG states of every process are restored; the step counter continues. On a
deterministic device the resumed run's loss sequence equals the uninterrupted run's bit for bit.

Progress: a tqdm bar (steps, loss, lr) on the main process when stderr is a terminal and
`LoopConfig.progress_bar` is true; log lines are written above it.

Several processes (GPUs, nodes, or CPU processes with gloo): `accelerate launch --config_file
train/configs/accelerate_ddp.yaml ...`, or `accelerate launch --multi_gpu --num_processes 2 ...` on a
machine without GPUs (the loop then asks accelerate for CPU processes: MULTI_CPU, gloo). Each process
takes its slice of every global batch (batch samplers are built per rank by `batch_sampler_fn`), so the
ranks' data is disjoint and DDP averages their gradients: N processes at batch B step as one at N x B.
Evaluation gives every held-out example to exactly one rank and sums over ranks. Callbacks that stop the
run on one rank stop every rank. Only the main process writes (record, plot, checkpoints); a checkpoint
records the process count and resumes only under the same one. Under DDP (and one process) a checkpoint
holds the trainable weights only; under FSDP and DeepSpeed it is `accelerator.save_state` (which shards
optimizer state) plus the loop's own state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, ProjectConfiguration
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train.config_types import check_field_types
from train.io import append_line, read_jsonl

LOOP_STATE_NAME = "loop_state.json"
TRAINABLE_NAME = "trainable.pt"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
ACCELERATE_STATE_DIR = "accelerate_state"
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.jsonl"
PLOT_NAME = "loss_curve.png"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = ".complete"
TRACKING_DIR = "tracking"
# Where each tracker's package comes from: tensorboard is in blsp-chat's `train` extra, the others are not.
TRACKER_PACKAGES = {"tensorboard": "tensorboard (in the train extra: pip install 'blsp-chat[train]')",
                    "comet_ml": "comet-ml"}

Schedule = Literal["linear", "cosine", "constant"]
MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass
class LoopConfig:
    """Everything that shapes an optimisation run. Steps are optimizer steps (after accumulation)."""

    output_dir: str
    learning_rate: float = 5e-5
    weight_decay: float = 0.0          # applied to matrices only, never to biases or norm weights
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0              # linear warmup from 0
    lr_schedule: Schedule = "linear"   # decay after warmup, down to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.0
    num_epochs: float = 1.0            # used when max_steps is None; may be fractional
    max_steps: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    mixed_precision: MixedPrecision = "no"  # bf16 also works on CPU (autocast)
    eval_every: int = 0                # 0: only at the end (when there is eval data)
    save_every: int = 0                # 0: only at the end
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    num_workers: int = 0
    plot: bool = True
    # accelerate's trackers, e.g. ["tensorboard"] (or "wandb", "mlflow", ..., "all"); logs go to tracking/.
    report_to: tuple[str, ...] = ()
    progress_bar: bool = True          # a tqdm bar on the main process, when stderr is a terminal

    def __post_init__(self) -> None:
        check_field_types(self, "loop")
        check_trackers(self.report_to)
        checks = [
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.lr_schedule in ("linear", "cosine", "constant"), "lr_schedule must be linear, cosine or constant"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
            (self.per_device_batch_size >= 1, "per_device_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1 (or null)"),
            (self.max_steps is not None or self.num_epochs > 0, "num_epochs must be positive"),
            (self.warmup_steps >= 0 and self.log_every >= 1 and self.keep_last >= 1,
             "warmup_steps >= 0, log_every >= 1, keep_last >= 1"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"LoopConfig: {message}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown loop config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        data["report_to"] = list(self.report_to)
        return data


def check_trackers(names: Sequence[str]) -> None:
    """Each name is one of accelerate's trackers and its package is installed (accelerate itself would
    drop a missing one without a word, and the run would record nothing)."""
    known = LoggerType.list()
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ValueError(f"loop.report_to: unknown tracker {name!r}; accelerate knows {known}")
        if name != "all" and name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            raise ImportError(f"loop.report_to names {name!r}, whose package is not installed: pip install {package}")


def add_loop_arguments(parser) -> None:
    """The loop's command-line options, shared by the training commands (`loop_overrides` reads them)."""
    parser.add_argument("--report-to", nargs="+", metavar="TRACKER", default=None,
                        help="accelerate trackers to log to, e.g. tensorboard (logs in OUTPUT_DIR/tracking/); "
                             "same as loop.report_to=[...]")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only on a terminal anyway); same as loop.progress_bar=false")


def loop_overrides(args) -> list[str]:
    """`section.key=value` overrides for the options `add_loop_arguments` added."""
    overrides = []
    if args.report_to is not None:
        overrides.append(f"loop.report_to={json.dumps(args.report_to)}")
    if args.no_progress:
        overrides.append("loop.progress_bar=false")
    return overrides


# --- batch samplers ----------------------------------------------------------------------------------
class BatchSampler(Protocol):
    """Yields this process's batches (lists of dataset indices) of one epoch; the order must be a pure
    function of the seed and the epoch set by `set_epoch`, and every process must yield as many."""

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[list[int]]: ...
    def __len__(self) -> int: ...


class ShuffledBatchSampler:
    """Shuffle indices with seed+epoch, cut into global batches of batch_size * num_replicas, give rank r
    its slice. With several processes an incomplete last global batch is dropped so that every process
    takes the same number of steps; with one it is kept (unless drop_last)."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.drop_last = drop_last or num_replicas > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        yield from shard_global_batches(chunk(self._order(), self.batch_size * self.num_replicas),
                                        self.num_replicas, self.rank, self.drop_last)

    def __len__(self) -> int:
        global_size = self.batch_size * self.num_replicas
        full, rest = divmod(self.num_examples, global_size)
        return full + (1 if rest and not self.drop_last else 0)


class ShardedEvalSampler:
    """Held-out batches: rank r takes examples r, r + R, r + 2R, ... in batches of batch_size, so every
    example is evaluated exactly once across the ranks (no padding, no drop). Ranks may get one batch
    more than others; the loop evens the forward passes out. With one process: 0..N-1 in order."""

    def __init__(self, num_examples: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_examples, num_replicas))
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[list[int]]:
        yield from chunk(self.indices, self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def chunk(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def shard_global_batches(global_batches: Iterable[list[int]], num_replicas: int, rank: int,
                         drop_last: bool) -> Iterator[list[int]]:
    for batch in global_batches:
        per_rank = len(batch) // num_replicas if num_replicas > 1 else len(batch)
        if num_replicas > 1 and len(batch) % num_replicas:
            if drop_last:
                continue
        if per_rank == 0:
            continue
        yield batch[rank * per_rank:(rank + 1) * per_rank]


# --- state -------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where the run is. Saved in every checkpoint; `batches_in_epoch` counts this process's
    micro-batches already consumed in `epoch`."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    total_steps: int = 0
    num_processes: int = 1  # the data position above is per process: resume only with as many
    losses: list[float] = field(default_factory=list)  # one mean loss per optimizer step


@dataclass
class TrainResult:
    state: LoopState
    output_dir: Path
    losses: list[float]
    eval_history: list[dict[str, Any]]
    trainable_parameters: int
    samples_per_s: float  # mean training throughput over this invocation (all processes)
    model: nn.Module       # unwrapped


class StopTraining(Exception):
    """Raise from a callback to end the run cleanly after the current step (a checkpoint is written)."""


# --- helpers -----------------------------------------------------------------------------------------
def trainable_predicate(expected: Callable[[str], bool] | Sequence[str] | str) -> Callable[[str], bool]:
    if callable(expected):
        return expected
    prefixes = (expected,) if isinstance(expected, str) else tuple(expected)
    return lambda name: name.startswith(prefixes)


def check_trainable(model: nn.Module, expected: Callable[[str], bool] | Sequence[str] | str,
                    log: Callable[[str], None] = print) -> int:
    """Every parameter the predicate names requires grad and no other does; returns the count. Raises
    RuntimeError naming the offenders otherwise (a frozen LLM that trains is a silent, costly bug)."""
    is_expected = trainable_predicate(expected)
    params = list(model.named_parameters())
    leaked = [n for n, p in params if p.requires_grad and not is_expected(n)]
    frozen = [n for n, p in params if is_expected(n) and not p.requires_grad]
    if leaked or frozen:
        raise RuntimeError(
            f"trainable parameters are not the expected ones: {len(leaked)} should be frozen but require grad "
            f"(e.g. {leaked[:5]}), {len(frozen)} should train but are frozen (e.g. {frozen[:5]})"
        )
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    total = sum(p.numel() for _, p in params)
    if trainable == 0:
        raise RuntimeError("no parameter is trainable: the expected-trainable predicate matched nothing")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    return trainable


def lr_lambda(config: LoopConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step (0-based). After warmup this is transformers'
    linear, cosine-with-min-lr and constant decay (tests/test_loop.py checks they agree), but it is not
    built from transformers' schedulers: their warmup starts at 0 (step / warmup), so the first step would
    not learn and every run's schedule (and resumed checkpoints' position in it) would shift by a step;
    their linear decay also has no floor (`min_lr_ratio`)."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup  # the first step already learns
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1 - progress if config.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


def make_optimizer(model: nn.Module, config: LoopConfig,
                   learning_rate_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in groups by weight decay (matrices only) and learning rate
    (config.learning_rate times `learning_rate_scale(name)`, 1 when not given)."""
    # Matrices first, then the rest, in parameter order: the two groups every run had before scales
    # existed, so their optimizer checkpoints resume into the same groups.
    scale_of = learning_rate_scale or (lambda name: 1.0)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for is_matrix in (True, False):
        for name, param in model.named_parameters():
            if param.requires_grad and (param.ndim >= 2) == is_matrix:
                groups.setdefault((is_matrix, scale_of(name)), []).append(param)
    return torch.optim.AdamW([{"params": params, "weight_decay": config.weight_decay if is_matrix else 0.0,
                               "lr": config.learning_rate * scale}
                              for (is_matrix, scale), params in groups.items()],
                             lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps)


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started; 1 outside a launch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_processes() -> bool:
    """Several processes on a machine without an accelerator: accelerate only forms the gloo group on the
    CPU when asked to (`cpu=True`); otherwise each process would train alone on all the data."""
    return launched_processes() > 1 and not torch.accelerator.is_available()


def distributed_state() -> PartialState:
    """accelerate's process state, created as `make_accelerator` creates it (code that needs the rank
    before the loop starts, e.g. to write data on the main process only, must not create it otherwise)."""
    return PartialState(cpu=cpu_processes())


def make_accelerator(config: LoopConfig):
    """An Accelerator for this config. Outside a multi-process launch, state left by an earlier run in
    the same Python process (tests, notebooks) is reset so that mixed precision may change."""
    if launched_processes() == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=cpu_processes(), log_with=list(config.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TRACKING_DIR)))
    if launched_processes() > 1 and accelerator.num_processes == 1:
        raise RuntimeError(f"launched as {launched_processes()} processes, but accelerate formed a group of "
                           f"{accelerator.num_processes}: each would train alone on all the data")
    return accelerator


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    for value in values:
        if isinstance(value, (list, tuple)):
            return len(value)
    return 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The optimizer step a checkpoint directory (step-N) was saved at."""
    return int(checkpoint_dir.name[len(CHECKPOINT_PREFIX):])


def copy_records_through(source: Path, target: Path, step: int) -> None:
    """A run's JSON-lines record (metrics, eval) as it stood at `step`: its rows of steps up to `step`, in order."""
    rows = [row for row in read_jsonl(source) if row["step"] <= step]
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --- the loop ----------------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]
Callback = Callable[[LoopState, dict[str, Any]], None]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any],
    config: LoopConfig,
    *,
    expected_trainable: Callable[[str], bool] | Sequence[str] | str,
    batch_sampler_fn: Callable[[int, int], BatchSampler] | None = None,
    eval_dataset: Sequence[Any] | None = None,
    eval_batch_sampler_fn: Callable[[int, int], BatchSampler] | None = None,
    eval_fn: Callable[[nn.Module, Any], dict[str, float]] | None = None,
    resume: bool = False,
    accelerator=None,
    run_info: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    learning_rate_scale: Callable[[str], float] | None = None,
) -> TrainResult:
    """Train the parameters `expected_trainable` names and return the result (see the module doc).

    batch_sampler_fn(num_replicas, rank) -> this process's batch sampler; default: shuffled batches of
    `per_device_batch_size`. eval_fn(unwrapped_model, accelerator) -> extra scores, run at each eval on
    every process (reduce inside if it shards work). callbacks(state, metrics) run after every optimizer
    step on every process; raise StopTraining to end early with a checkpoint. learning_rate_scale(name) ->
    the factor on config.learning_rate (and its schedule) for that parameter; default 1 for all.
    """
    return _Loop(model, loss_fn, train_dataset, collate_fn, config, expected_trainable, batch_sampler_fn,
                 eval_dataset, eval_batch_sampler_fn, eval_fn, accelerator, run_info, callbacks,
                 learning_rate_scale).run(resume)


class _Loop:
    def __init__(self, model, loss_fn, train_dataset, collate_fn, config, expected_trainable, batch_sampler_fn,
                 eval_dataset, eval_batch_sampler_fn, eval_fn, accelerator, run_info, callbacks,
                 learning_rate_scale=None):
        self.config, self.loss_fn, self.collate_fn = config, loss_fn, collate_fn
        self.train_dataset, self.eval_dataset, self.eval_fn = train_dataset, eval_dataset, eval_fn
        self.callbacks, self.run_info = list(callbacks), dict(run_info or {})
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        seed_everything(config.seed + acc.process_index)
        self.num_trainable = check_trainable(model, expected_trainable, self.log)
        self.expected_trainable = trainable_predicate(expected_trainable)
        make = batch_sampler_fn or (lambda replicas, rank: ShuffledBatchSampler(
            len(train_dataset), config.per_device_batch_size, seed=config.seed, num_replicas=replicas, rank=rank))
        self.sampler = make(acc.num_processes, acc.process_index)
        if len(self.sampler) == 0:
            raise ValueError("the training data gives no batch: fewer examples than one global batch?")
        self.eval_sampler = None
        if eval_dataset is not None and len(eval_dataset):
            make_eval = eval_batch_sampler_fn or (lambda replicas, rank: ShardedEvalSampler(
                len(eval_dataset), config.per_device_batch_size, num_replicas=replicas, rank=rank))
            self.eval_sampler = make_eval(acc.num_processes, acc.process_index)
        self.total_steps = config.max_steps or max(
            1, int(config.num_epochs * len(self.sampler)) // config.gradient_accumulation_steps)
        if acc.distributed_type.value == "DEEPSPEED":  # no dataloader is prepared, so name the micro batch
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
        optimizer = make_optimizer(model, config, learning_rate_scale)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Stepped once per optimizer step by us (a prepared scheduler steps num_processes times).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer,
                                                           lr_lambda(config, self.total_steps))
        self.trainable = [(n, p) for n, p in acc.unwrap_model(self.model).named_parameters() if p.requires_grad]
        self.state = LoopState(total_steps=self.total_steps, num_processes=acc.num_processes)
        self.eval_history: list[dict[str, Any]] = []

    # --- logging ---
    def log(self, message: str) -> None:
        if getattr(self, "accelerator", None) is None or self.accelerator.is_main_process:
            tqdm.write(f"[train] {message}", file=sys.stderr)  # above the progress bar, when there is one
            sys.stderr.flush()

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.output_dir / name, "a", encoding="utf-8") as handle:
                append_line(handle, record)

    # --- run ---
    def run(self, resume: bool) -> TrainResult:
        self._prepare_output(resume)
        self._start_trackers()
        started, samples_at_start = time.perf_counter(), self.state.samples_seen
        try:
            self._train()
        finally:
            self._write_plot()
            for tracker in self.accelerator.trackers:  # not end_training(): the caller may still need the group
                tracker.finish()
        elapsed = time.perf_counter() - started
        self.accelerator.wait_for_everyone()
        return TrainResult(
            state=self.state, output_dir=self.output_dir, losses=list(self.state.losses),
            eval_history=self.eval_history, trainable_parameters=self.num_trainable,
            samples_per_s=(self.state.samples_seen - samples_at_start) / max(elapsed, 1e-9),
            model=self.accelerator.unwrap_model(self.model),
        )

    def _prepare_output(self, resume: bool) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        latest = checkpoint_dirs(self.output_dir)[-1:] if resume else []
        if latest:
            self._load_checkpoint(latest[0])
            self.log(f"resumed from {latest[0]} at step {self.state.step}, epoch {self.state.epoch}, "
                     f"batch {self.state.batches_in_epoch}")
            self.eval_history = [r for r in read_jsonl(self.output_dir / EVAL_NAME) if r["step"] <= self.state.step]
            self.accelerator.wait_for_everyone()  # every rank has read eval.jsonl before it is rewritten
            if self.is_main:  # drop records written after the checkpoint by the killed run
                for name in (METRICS_NAME, EVAL_NAME):
                    kept = [r for r in read_jsonl(self.output_dir / name) if r["step"] <= self.state.step]
                    (self.output_dir / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.is_main:
            if resume:
                self.log(f"no checkpoint in {self.output_dir / CHECKPOINTS_DIR}; starting from scratch")
            for name in (METRICS_NAME, EVAL_NAME):
                (self.output_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.output_dir / CHECKPOINTS_DIR, ignore_errors=True)
        if self.is_main:
            record = {"loop": self.config.to_dict(), "total_steps": self.total_steps,
                      "num_processes": self.accelerator.num_processes,
                      "global_batch_size": self.config.per_device_batch_size * self.accelerator.num_processes
                      * self.config.gradient_accumulation_steps,
                      "trainable_parameters": self.num_trainable, **self.run_info}
            (self.output_dir / CONFIG_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
        self.accelerator.wait_for_everyone()

    def _start_trackers(self) -> None:
        """accelerate's trackers (main process only), with the loop config and the caller's run_info as
        hyperparameters. A resumed run purges what the killed run logged after its checkpoint."""
        if not self.config.report_to:
            return
        hparams = flat_hparams({"loop": self.config.to_dict(), "total_steps": self.total_steps,
                                "num_processes": self.accelerator.num_processes, **self.run_info})
        init_kwargs = {"tensorboard": {"purge_step": self.state.step + 1}} if self.state.step else {}
        self.accelerator.init_trackers(self.output_dir.name or "run", config=hparams, init_kwargs=init_kwargs)

    def _track(self, prefix: str, record: dict[str, Any]) -> None:
        values = {f"{prefix}/{k}": v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(values, step=self.state.step)

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) from the saved data position on, forever (the caller stops). The batches this
        epoch already consumed are skipped in the batch sampler, so they are never loaded."""
        while True:
            self.sampler.set_epoch(self.state.epoch)
            loader = DataLoader(self.train_dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                                num_workers=self.config.num_workers,
                                generator=_private_generator(self.config.seed, self.state.epoch))
            for batch in skip_first_batches(loader, self.state.batches_in_epoch):
                yield self.state.epoch, batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def _train(self) -> None:
        config, state = self.config, self.state
        if state.step >= self.total_steps:
            self.log(f"already at step {state.step} of {self.total_steps}; nothing to train")
            return
        self.log(f"training {self.total_steps} steps ({len(self.sampler)} batches per epoch per process, "
                 f"accumulating {config.gradient_accumulation_steps})")
        self.model.train()
        bar = progress_bar(self.total_steps, state.step, enabled=self.is_main and config.progress_bar)
        try:
            self._train_steps(bar)
        finally:
            bar.close()
        self._final_eval_and_checkpoint()

    def _train_steps(self, bar) -> None:
        acc, state = self.accelerator, self.state
        window = _Window()
        window.start()
        for _, batch in self._batches():
            window.start()
            metrics = self._micro_step(batch)
            state.batches_in_epoch += 1
            window.add(metrics, batch_size_of(batch) * acc.num_processes)
            if not acc.sync_gradients:
                continue
            grad_norm, lr = self._optimizer_step()
            state.step += 1
            step_loss = self._reduce_mean(window.step_loss())
            state.losses.append(step_loss)
            state.samples_seen += window.step_samples
            record = {"lr": lr, **window.close_step(step_loss, grad_norm)}
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            stop = self._after_step(record)
            window.start()  # after eval and checkpointing, before the next batch loads: loading counts
            if stop or state.step >= self.total_steps:
                break

    def _micro_step(self, batch: Any) -> dict[str, float]:
        acc = self.accelerator
        batch = to_device(batch, acc.device)
        with acc.accumulate(self.model), acc.autocast():
            loss, metrics = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.state.step}")
            acc.backward(loss)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    def _optimizer_step(self) -> tuple[float, float]:
        """One optimizer step; returns (grad norm before clipping, the loop's learning rate it used: groups
        with a learning-rate scale used that times their scale)."""
        lr = self.config.learning_rate * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        params = [p for _, p in self.trainable]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (float(grad_norm) if grad_norm is not None else float("nan")), lr

    def _reduce_mean(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def _reduce_max(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.int64)
        return int(self.accelerator.reduce(tensor, reduction="max"))

    def _after_step(self, record: dict[str, Any]) -> bool:
        config, state = self.config, self.state
        metrics = {"step": state.step, "epoch": state.epoch, **record}
        if state.step % config.log_every == 0 or state.step == self.total_steps:
            self._append_jsonl(METRICS_NAME, metrics)
            self._track("train", metrics)
            self.log(f"step {state.step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                     f"grad_norm {metrics['grad_norm']:.3f} {metrics['samples_per_s']:.1f} samples/s")
        stop = False
        for callback in self.callbacks:
            try:
                callback(state, metrics)
            except StopTraining:
                stop = True
        if self._reduce_max(int(stop)):  # a callback that stops one rank stops them all, at the same step
            return True
        if config.eval_every and state.step % config.eval_every == 0 and state.step < self.total_steps:
            self._evaluate()
        if config.save_every and state.step % config.save_every == 0 and state.step < self.total_steps:
            self._save_checkpoint()
        return False

    def _final_eval_and_checkpoint(self) -> None:
        if not self.eval_history or self.eval_history[-1]["step"] != self.state.step:
            self._evaluate()
        self._save_checkpoint()

    # --- evaluation ---
    @torch.no_grad()
    def _evaluate(self) -> None:
        acc = self.accelerator
        scores: dict[str, Any] = {}
        if self.eval_sampler is not None:
            self.model.eval()
            sums, count, batches = {}, 0, 0
            loader = DataLoader(self.eval_dataset, batch_sampler=self.eval_sampler, collate_fn=self.collate_fn,
                                generator=_private_generator(self.config.seed, self.state.step))
            for batch in loader:
                with acc.autocast():
                    loss, metrics = self.loss_fn(self.model, to_device(batch, acc.device))
                n = batch_size_of(batch)
                for key, value in {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}.items():
                    sums[key] = sums.get(key, 0.0) + value * n
                count += n
                batches += 1
            self._even_out_eval_forwards(batches)
            self.model.train()
            keys = sorted(sums)
            totals = torch.tensor([sums[k] for k in keys] + [count], device=acc.device, dtype=torch.float64)
            totals = acc.reduce(totals, reduction="sum") if acc.num_processes > 1 else totals
            scores.update({f"eval_{k}": float(totals[i] / totals[-1]) for i, k in enumerate(keys)})
            scores["eval_examples"] = int(totals[-1])
        if self.eval_fn is not None:
            self.model.eval()
            scores.update(self.eval_fn(acc.unwrap_model(self.model), acc))
            self.model.train()
        if not scores:
            return
        record = {"step": self.state.step, "epoch": self.state.epoch, **scores}
        self.eval_history.append(record)
        self._append_jsonl(EVAL_NAME, record)
        self._track("eval", record)
        self.log("eval " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def _even_out_eval_forwards(self, done: int) -> None:
        """A rank with fewer held-out batches runs extra forward passes (results discarded) until it has
        run as many as the busiest rank: a wrapped model (FSDP's gathers, DDP's buffer broadcasts) may
        communicate in forward, and every rank must take part in every such exchange."""
        extra = self._reduce_max(done) - done
        if not extra:
            return
        batch = to_device(self.collate_fn([self.eval_dataset[0]]), self.accelerator.device)
        for _ in range(extra):
            with self.accelerator.autocast():
                self.loss_fn(self.model, batch)

    # --- checkpoints ---
    def _uses_accelerate_state(self) -> bool:
        return self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM")

    def _save_checkpoint(self) -> None:
        """Written by hand on one process and under DDP: accelerate's save_state would write the whole model
        (the frozen Whisper and LLM too: gigabytes per checkpoint for a 7B LLM, where the trainable weights
        are megabytes) in its own layout, which the checkpoints of earlier runs do not have, so they could
        no longer be resumed. Sharded runs (FSDP, DeepSpeed) need accelerate's, and use it."""
        acc, state = self.accelerator, self.state
        final = self.output_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{state.step}"
        scratch = final.with_name(final.name + ".partial")
        if self.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        acc.wait_for_everyone()
        if self._uses_accelerate_state():
            acc.save_state(str(scratch / ACCELERATE_STATE_DIR))
        elif self.is_main:
            torch.save({n: p.detach().cpu() for n, p in self.trainable}, scratch / TRAINABLE_NAME)
            torch.save(self.optimizer.state_dict(), scratch / OPTIMIZER_NAME)
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), scratch / SCALER_NAME)
        torch.save(rng_state(), scratch / f"rng_{acc.process_index}.pt")
        if self.is_main:
            torch.save(self.scheduler.state_dict(), scratch / SCHEDULER_NAME)
            (scratch / LOOP_STATE_NAME).write_text(json.dumps(dataclasses.asdict(state)) + "\n")
        acc.wait_for_everyone()
        if self.is_main:
            (scratch / COMPLETE_MARKER).write_text("ok\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(scratch, final)
            for old in checkpoint_dirs(self.output_dir)[:-self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"saved checkpoint {final}")
        acc.wait_for_everyone()

    def _load_checkpoint(self, directory: Path) -> None:
        acc = self.accelerator
        saved = LoopState(**json.loads((directory / LOOP_STATE_NAME).read_text()))
        if saved.num_processes != acc.num_processes:
            raise ValueError(f"{directory} was written by {saved.num_processes} processes, this run has "
                             f"{acc.num_processes}: each one's data position is its own, so resume with as many")
        if saved.total_steps != self.total_steps:
            raise ValueError(f"{directory} was written by a run of {saved.total_steps} steps, this one has "
                             f"{self.total_steps}: resume with the same data and schedule settings")
        if self._uses_accelerate_state():
            acc.load_state(str(directory / ACCELERATE_STATE_DIR))
        else:
            weights = torch.load(directory / TRAINABLE_NAME, map_location="cpu", weights_only=True)
            names = {n for n, _ in self.trainable}
            if set(weights) != names:
                missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
                raise ValueError(f"{directory} holds other trainable parameters than this model "
                                 f"(missing {missing[:5]}, extra {extra[:5]})")
            with torch.no_grad():
                for name, param in self.trainable:
                    param.copy_(weights[name].to(param.device, param.dtype))
            self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_NAME, map_location="cpu",
                                                      weights_only=False))
            if acc.scaler is not None and (directory / SCALER_NAME).is_file():
                acc.scaler.load_state_dict(torch.load(directory / SCALER_NAME, weights_only=False))
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_NAME, weights_only=False))
        rng_path = directory / f"rng_{acc.process_index}.pt"
        if rng_path.is_file():
            set_rng_state(torch.load(rng_path, weights_only=False))
        self.state = saved

    # --- plot ---
    def _write_plot(self) -> None:
        if not (self.is_main and self.config.plot):
            return
        train_points = [(r["step"], r["loss"]) for r in read_jsonl(self.output_dir / METRICS_NAME)]
        eval_points = [(r["step"], r["eval_loss"]) for r in read_jsonl(self.output_dir / EVAL_NAME) if "eval_loss" in r]
        if train_points:
            plot_loss_curve(self.output_dir / PLOT_NAME, train_points, eval_points)


def progress_bar(total: int, initial: int, *, enabled: bool):
    """A tqdm bar over optimizer steps on stderr; tqdm leaves it out when stderr is not a terminal
    (log files, CI), and it is left out entirely when not `enabled` (other ranks, progress_bar=false)."""
    return tqdm(total=total, initial=initial, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled else True)


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"loop/learning_rate": 0.001, ...} with the scalar types trackers take (lists and
    None as text)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def _private_generator(seed: int, salt: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed from the generator it is given (the global torch RNG
    by default); a private one keeps the global RNG identical between a resumed and an uninterrupted run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


class _Window:
    """Accumulates metrics over the micro-batches of one optimizer step and the time they took."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.step_samples = 0
        self.t0: float | None = None

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float], samples: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.micro += 1
        self.step_samples += samples

    def step_loss(self) -> float:
        return self.sums["loss"] / self.micro

    def close_step(self, loss: float, grad_norm: float) -> dict[str, Any]:
        elapsed = time.perf_counter() - (self.t0 or time.perf_counter())
        record = {"loss": loss, **{k: v / self.micro for k, v in self.sums.items() if k != "loss"},
                  "grad_norm": grad_norm, "samples_per_s": self.step_samples / max(elapsed, 1e-9),
                  "step_seconds": elapsed}
        self.sums, self.micro, self.step_samples, self.t0 = {}, 0, 0, None
        return record


# --- the loss curve ------------------------------------------------------------------------------------
PLOT_SIZE_INCHES = (8, 4.8)
PLOT_DPI = 100


def plot_loss_curve(path: Path, train_points: list[tuple[float, float]],
                    eval_points: list[tuple[float, float]] = ()) -> None:
    """Training loss (line) and eval loss (dots) against step, as a PNG. matplotlib's object API (a Figure
    of its own, no pyplot) draws without a display and without global state."""
    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, layout="tight")
    axes = figure.subplots()
    steps, losses = zip(*train_points)
    axes.plot(steps, losses, marker="o" if len(train_points) == 1 else None, label="train loss")
    if eval_points:
        eval_steps, eval_losses = zip(*eval_points)
        axes.plot(eval_steps, eval_losses, "o", label="eval loss")
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
