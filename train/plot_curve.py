"""The curve a run climbs: held-out WER against step, read from one or more runs' eval.jsonl, beside the
baselines' WER on the same clips as horizontal lines.

    python -m train.plot_curve runs/base_ctx_s0 runs/base_ctx_s1 --metric repeat_wer --metric readout_wer \\
        --baseline "Whisper base=0.123" --baseline "Whisper tiny.en=0.15" --out train/results/curve.png

Prints the table the PNG draws (step, then one column per run and metric) as Markdown, so a record can
quote the figures beside the picture.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .loop import PLOT_DPI, PLOT_SIZE_INCHES


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every eval that recorded `metric`; a resumed run's rewritten records count once."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eval.jsonl (has the run reached its first eval?)")
    points: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if metric in record:
            points[int(record["step"])] = float(record[metric])
    return sorted(points.items())


def parse_baseline(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if sep and name.strip():
            return name.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a baseline is NAME=WER (a fraction), got {text!r}")


def plot(path: Path, curves: dict[str, list[tuple[int, float]]], baselines: Sequence[tuple[str, float]]) -> None:
    figure = draw(curves, baselines)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def draw(curves: dict[str, list[tuple[int, float]]], baselines: Sequence[tuple[str, float]]) -> Figure:
    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, layout="tight")
    axes = figure.subplots()
    for label, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, [100 * v for v in values], marker="o", label=label)
    for name, value in baselines:
        axes.axhline(100 * value, linestyle="--", color="grey", linewidth=1)
        # x in axes fraction: the first step of a curve is rarely 0, and a label at x=0 would fall off the plot
        axes.annotate(name, (0, 100 * value), xycoords=("axes fraction", "data"), textcoords="offset points",
                      xytext=(4, 3), fontsize=8)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("WER (%)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def markdown_table(curves: dict[str, list[tuple[int, float]]]) -> str:
    steps = sorted({step for points in curves.values() for step, _ in points})
    lookup = {label: dict(points) for label, points in curves.items()}
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for step in steps:
        cells = [f"{100 * lookup[label][step]:.1f}" if step in lookup[label] else "" for label in curves]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training output directories (with eval.jsonl)")
    parser.add_argument("--metric", action="append", help="eval.jsonl key(s) to draw (default: repeat_wer)")
    parser.add_argument("--baseline", action="append", type=parse_baseline, default=[], help="NAME=WER (a fraction)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    metrics = args.metric or ["repeat_wer"]
    curves = {}
    for run in args.runs:
        for metric in metrics:
            points = read_curve(run, metric)
            if not points:
                parser.error(f"{run}/eval.jsonl records no {metric!r}")
            curves[f"{run.name} {metric}"] = points
    plot(args.out, curves, args.baseline)
    print(markdown_table(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
