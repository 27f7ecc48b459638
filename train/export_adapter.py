"""Ship a trained adapter: copy a training run's adapter-only checkpoint, with its model card and training
record, into a folder such as assets/default_adapter (the folder `python app.py` loads by default).

    python -m train.export_adapter runs/adapter_tiny_offline assets/default_adapter --dtype float16

The weights are stored as --dtype (float16 halves them: 11.5 MB for the tiny default); loading casts them
back to the dtype the model runs in. Checkpoints, optimizer state and logs of the run stay behind.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import torch

from blsp_chat.weights import load_blsp_dir

RECORD_FILES = ("README.md", "loss_curve.png", "train_config.json", "data_summary.json", "eval.jsonl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(run_dir: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """Write the checkpoint and copy the record files the run has; returns the copied file names."""
    loaded = load_blsp_dir(run_dir, torch.float32)
    loaded.model.save_pretrained(out, dtype=dtype)
    copied = []
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
            copied.append(name)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a train_adapter output directory")
    parser.add_argument("out", type=Path, help="where to write the shipped adapter")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_args(argv)
    copied = export(args.run_dir, args.out, DTYPES[args.dtype])
    print(f"wrote {args.out} ({args.dtype} weights; record: {', '.join(copied) or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
