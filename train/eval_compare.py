"""The comparison of evaluation runs: every summary in the run folders as one markdown table laid out
like paper Table 2 (rows systems, columns task/dataset headline metrics)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .eval_score import format_value, metric_label

SYSTEM_ORDER = ("text", "cascade", "whisper", "blsp")  # rows of paper Table 2, top to bottom
TASK_TITLES = {"asr": "ASR", "st": "ST", "slu": "SLU", "continuation": "Continuation", "qa": "QA"}


def load_summaries(dirs: Sequence[str | Path]) -> list[dict]:
    summaries = []
    for directory in dirs:
        files = sorted(Path(directory).glob("*.summary.json"))
        if not files:
            raise ValueError(f"{directory} holds no *.summary.json: run train.evaluate with --out {directory} first")
        summaries += [json.loads(f.read_text()) for f in files]
    return summaries


def compare_table(summaries: Sequence[dict]) -> str:
    """Markdown: rows are systems (Text+LLM, Whisper+LLM, ..., BLSP), columns task/dataset headline
    metrics. A `whisper` run shows as the left value of the cascade row ('ASR component / LLM
    repeating'), as in the paper's ASR columns; without a cascade run it is a row of its own."""
    columns = list(dict.fromkeys((s["task"], s["dataset"]) for s in summaries))
    cascade = next((s["label"] for s in summaries if s["system"] == "cascade"), None)
    cells: dict[str, dict] = {}
    components: dict[tuple, str] = {}  # Whisper alone, per column, shown left in the cascade row
    order: dict[str, int] = {}
    for s in summaries:
        column, value = (s["task"], s["dataset"]), format_value(s["headline"]["value"])
        if s["system"] == "whisper" and cascade is not None:
            components[column] = value
            continue
        cells.setdefault(s["label"], {})[column] = value
        order.setdefault(s["label"], SYSTEM_ORDER.index(s["system"]))
    for column, value in components.items():
        cells.setdefault(cascade, {})[column] = f"{value} / {cells[cascade].get(column, '-')}"
    rows = sorted(cells, key=lambda row: order.get(row, SYSTEM_ORDER.index("cascade")))
    header = ["Method"] + [_column_title(task, dataset, summaries) for task, dataset in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row] + [cells[row].get(c, "-") for c in columns]) + " |" for row in rows]
    return "\n".join(lines)


def _column_title(task: str, dataset: str, summaries: Sequence[dict]) -> str:
    head = next(s["headline"] for s in summaries if (s["task"], s["dataset"]) == (task, dataset))
    return f"{TASK_TITLES[task]} ({metric_label(head)}) {dataset}"
