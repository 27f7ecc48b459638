"""Branch a training run at one of its checkpoints, so that it can go on with other data.

    python -m train.branch_run runs/base_ctx_names_s0 step-1500 runs/base_ctx_names_half_from_names1500_s0
    python -m train.train_adapter --resume --config OTHER_MIX.json loop.output_dir=runs/base_ctx_names_half_...

The new run directory starts exactly where the source run stood at that step: its trainable weights,
optimizer, learning-rate schedule, data position and RNG states (the checkpoint, copied), its metrics and eval
records up to the step, and its train_config.json (the resumed run rewrites it with its own; until then
`train.export_adapter` reads the branch point's model from it). `--resume` then goes on from there under
whatever config it is given; the loop accepts any config with the same trainable parameters, process count
and total steps. A config with another training manifest is the use: the source run going on and the branch
are two arms of one comparison from the same point, with nothing reset (a warm start, `model.init_adapter`,
restarts the optimizer and the schedule).

`branched_from.json` in the new directory names the source run and checkpoint. The source run is not touched.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from train.loop import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    CONFIG_NAME,
    EVAL_NAME,
    LOOP_STATE_NAME,
    METRICS_NAME,
    checkpoint_dirs,
    copy_records_through,
)

BRANCH_RECORD_NAME = "branched_from.json"


def branch_run(source: Path, checkpoint: str, target: Path) -> Path:
    """Copy `source`'s checkpoint `checkpoint` ("step-N" or "N") and its records up to step N into `target`,
    which must hold no checkpoint yet (a branch never overwrites work). Returns the copied checkpoint."""
    name = checkpoint if checkpoint.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{checkpoint}"
    kept = {directory.name: directory for directory in checkpoint_dirs(source)}
    if name not in kept:
        raise FileNotFoundError(f"{source} keeps no complete checkpoint {name!r}; kept: {', '.join(kept) or 'none'}")
    if checkpoint_dirs(target):
        raise FileExistsError(f"{target} already holds checkpoints: resume it, or branch into a new directory")
    step = json.loads((kept[name] / LOOP_STATE_NAME).read_text())["step"]
    target.mkdir(parents=True, exist_ok=True)
    copied = target / CHECKPOINTS_DIR / name
    scratch = copied.with_name(name + ".partial")
    for leftover in (scratch, copied):  # of a branch killed while copying: neither is marked complete
        shutil.rmtree(leftover, ignore_errors=True)
    # The complete marker arrives last, as in a checkpoint the loop saves, so a killed copy is never taken for one.
    shutil.copytree(kept[name], scratch, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    scratch.rename(copied)
    (copied / COMPLETE_MARKER).write_bytes((kept[name] / COMPLETE_MARKER).read_bytes())
    for record in (METRICS_NAME, EVAL_NAME):
        copy_records_through(source / record, target / record, step)
    shutil.copy2(source / CONFIG_NAME, target / CONFIG_NAME)
    (target / BRANCH_RECORD_NAME).write_text(json.dumps({"source": str(source), "checkpoint": name, "step": step},
                                                        indent=2) + "\n")
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the run directory to branch (its checkpoints/ is read)")
    parser.add_argument("checkpoint", help="the kept checkpoint to branch at: step-N or N")
    parser.add_argument("target", type=Path, help="the new run directory (it must hold no checkpoint)")
    args = parser.parse_args(argv)
    copied = branch_run(args.source, args.checkpoint, args.target)
    print(f"branched {args.source} at {copied.name} into {args.target}")


if __name__ == "__main__":
    main()
