"""The model card (README.md) of a stage-2 run, written from the loop's record: what was trained on what,
how (optimiser, losses, readout), the data, the held-out evaluation and the loss curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train.adapter_config import AdapterTrainConfig, LossSection, ModelSection
from train.io import read_jsonl
from train.loop import TrainResult
from train.speech_data import EncoderCache

CARD_NAME = "README.md"


def write_model_card(out: Path, config: AdapterTrainConfig, data_summary: dict[str, Any], result: TrainResult,
                     seconds: float, cache: EncoderCache | None) -> None:
    metrics = read_jsonl(out / "metrics.jsonl")
    evals = read_jsonl(out / "eval.jsonl")
    record = json.loads((out / "train_config.json").read_text())
    throughput = [m["samples_per_s"] for m in metrics]
    lines = [
        "# BLSP modality adapter",
        "",
        f"Adapter-only checkpoint for **{config.model.whisper}** (speech encoder) + **{config.model.llm}** (LLM), "
        f"trained by {training_description(config)}: Whisper and the LLM are frozen, only the subsampler, bottleneck "
        "and LayerNorm train. Load with `BlspModel.from_pretrained(\"<this directory>\")`.",
        "",
        f"The LLM reads it through {readout_description(config.model)}.",
        "",
        "## Training",
        f"- steps: {result.state.step} of {record['total_steps']}, epoch reached: {result.state.epoch}, "
        f"samples seen: {result.state.samples_seen}",
        f"- global batch: {record['global_batch_size']} ({config.loop.per_device_batch_size} per device x "
        f"{record['num_processes']} processes x {config.loop.gradient_accumulation_steps} accumulation)",
        f"- optimiser: AdamW lr {config.loop.learning_rate}, weight decay {config.loop.weight_decay}, "
        f"warmup {config.loop.warmup_steps}, {config.loop.lr_schedule} decay, clip {config.loop.max_grad_norm}, "
        f"mixed precision {config.loop.mixed_precision}",
        f"- loss: {loss_description(config.loss)}",
        f"- trainable parameters: {result.trainable_parameters:,}; encoder padding: {config.model.encoder_padding}; "
        f"prompt template: {config.model.prompt_template}",
        f"- throughput: {result.samples_per_s:.2f} samples/s over this invocation"
        + (f" (median per step {sorted(throughput)[len(throughput) // 2]:.2f})" if throughput else "")
        + f"; wall time {seconds / 60:.1f} min"
        + (f"; encoder cache hits {cache.hits}, misses {cache.misses} (this process)" if cache else ""),
        "",
        "## Data",
        "",
        "| split | examples | repeat lines | distinct clips | hours | mean s | max s |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("train", "eval"):
        s = data_summary[split]
        lines.append(f"| {split} | {s['examples']} | {s['repeat_examples']} | {s['distinct_clips']} | {s['hours']} | "
                     f"{s['mean_seconds']} | {s['max_seconds']} |")
    lines += ["", f"Manifest: `{config.data.train_manifest}`; repetition ratio {config.data.repetition_ratio:.3f} "
              "(repeat lines per other line; paper 1:9).", "", "## Evaluation (held-out split)", ""]
    if evals:
        keys = [k for k in evals[-1] if k not in ("step", "epoch")]
        lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in evals:
            lines.append(f"| {r['step']} | " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    else:
        lines.append("No held-out evaluation was run.")
    lines += ["", "## Loss curve", "", "![loss curve](loss_curve.png)", "",
              "Full record: `train_config.json`, `metrics.jsonl`, `eval.jsonl`, `data_summary.json`.", ""]
    (out / CARD_NAME).write_text("\n".join(lines))


def training_description(config: AdapterTrainConfig) -> str:
    if config.loss.needs_llm:
        return "behaviour alignment (BLSP)" + (" with CTC pre-alignment terms" if config.loss.ctc_weight else "")
    return "CTC pre-alignment alone (its outputs spell the transcript in the LLM's word embeddings; no LLM pass)"


def readout_description(model: ModelSection) -> str:
    if model.speech_readout == "ctc":
        return ("the CTC-compressed readout (`speech_readout: ctc`): blank outputs dropped, runs merged, one "
                f"posterior-weighted word embedding per word heard (temperature {model.ctc_readout_temperature})")
    return "its outputs as they are, one LLM position per adapter output (the paper's readout)"


def loss_description(loss: LossSection) -> str:
    parts = []
    if loss.ce_weight:
        parts.append(f"{loss.ce_weight} x cross-entropy on the response")
    if loss.kd_weight:
        parts.append(f"{loss.kd_weight} x KL(transcript || speech), T={loss.kd_temperature}")
    if loss.ctc_weight:
        parts.append(f"{loss.ctc_weight} x CTC of the adapter outputs against the transcript's tokens "
                     f"(blank {loss.ctc_blank!r}; this term needs no LLM pass)")
    if loss.commit_weight:
        parts.append(f"{loss.commit_weight} x squared distance of each adapter output to its nearest word embedding")
    return " + ".join(parts)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
