"""The model card (README.md) of a stage-2 run, written from the loop's record: what was trained on what,
how (optimiser, losses, readout), the data, the held-out evaluation and the loss curve, under the Hub's YAML
front matter (blsp_chat.model_card).

Run as a command, it (re)writes the front matter of checkpoints' cards in place, keeping their text: a BLSP
checkpoint's (config.json) from its base models, an LLM LoRA's (adapter_config.json) from its base.

    python -m train.adapter_card assets/default_adapter --dataset beneath-a-steel-sky ...
    python -m train.adapter_card assets/stage1_lora --dataset wordnet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from huggingface_hub import ModelCardData

from blsp_chat import model_card
from blsp_chat.config import CONFIG_NAME, BlspConfig
from blsp_chat.weights import LORA_CONFIG_NAME, blsp_card_data, hub_id
from train.adapter_config import AdapterTrainConfig, LossSection, ModelSection
from train.io import read_jsonl
from train.loop import TrainResult
from train.speech_data import EncoderCache

CARD_NAME = model_card.CARD_NAME


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
        f"trained by {training_description(config)}: {trained_parts(config.model)} Load with `import blsp_chat` "
        "and `transformers.AutoModel.from_pretrained(\"<this directory>\")` (or `BlspModel.from_pretrained`).",
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
        f"- loss: {loss_description(config.loss, config.model)}",
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
    data = card_data(config.model, manifest_sources(config.data.train_manifest))
    (out / CARD_NAME).write_text(model_card.with_front_matter("\n".join(lines), data))


def card_data(model: ModelSection, datasets: Sequence[str]) -> ModelCardData:
    bases = [hub_id(model.whisper), hub_id(model.llm)]
    return model_card.blsp_card_data([b for b in bases if b], datasets)


def manifest_sources(manifest: str | Path) -> list[str]:
    """The corpora a manifest's clips come from (their `source` fields), in order of first appearance."""
    return list(dict.fromkeys(str(r["source"]) for r in read_jsonl(manifest) if r.get("source")))


def training_description(config: AdapterTrainConfig) -> str:
    if config.loss.needs_llm:
        return "behaviour alignment (BLSP)" + (" with CTC pre-alignment terms" if config.loss.ctc_weight else "")
    if config.model.ctc_alphabet is not None:
        alphabet = config.model.ctc_alphabet
        units = "characters" if all(len(symbol) == 1 for symbol in alphabet) else "symbols of one or more characters"
        return (f"CTC over {units} alone (a head on its outputs spells the transcript, "
                f"{len(alphabet)} {units.split()[0]} and the blank; no LLM pass)")
    return "CTC pre-alignment alone (its outputs spell the transcript in the LLM's word embeddings; no LLM pass)"


def trained_parts(model: ModelSection) -> str:
    adapter = "the adapter (subsampler, any context layers, bottleneck, LayerNorm and any character head)"
    start = f" Training started from the adapter in `{model.init_adapter}`." if model.init_adapter else ""
    if not model.encoder_tuned_layers:
        return f"Whisper and the LLM are frozen, only {adapter} trains.{start}"
    return (f"the LLM and Whisper's lower layers are frozen; {adapter} trains, and so do Whisper's top "
            f"{model.encoder_tuned_layers} layers and final LayerNorm, at {model.encoder_learning_rate_scale} x "
            f"the learning rate, saved with the adapter.{start}")


def readout_description(model: ModelSection) -> str:
    if model.ctc_alphabet is not None:
        return ("the character readout (`speech_readout: ctc` with `ctc_alphabet`): the text its head spells, "
                "greedily decoded, as the LLM's own word pieces")
    if model.speech_readout == "ctc":
        return ("the CTC-compressed readout (`speech_readout: ctc`): blank outputs dropped, runs merged, one "
                f"posterior-weighted word embedding per word heard (temperature {model.ctc_readout_temperature})")
    return "its outputs as they are, one LLM position per adapter output (the paper's readout)"


def loss_description(loss: LossSection, model: ModelSection) -> str:
    # The LLM's losses read speech as it is served: through the CTC readout when the model uses it.
    read = " (speech read through the CTC readout)" if model.speech_readout == "ctc" else ""
    parts = []
    if loss.ce_weight:
        parts.append(f"{loss.ce_weight} x cross-entropy on the response{read}")
    if loss.kd_weight:
        parts.append(f"{loss.kd_weight} x KL(transcript || speech), T={loss.kd_temperature}{read}")
    if loss.ctc_weight:
        parts.append(f"{loss.ctc_weight} x CTC of the adapter outputs against the transcript's tokens "
                     f"(blank {loss.ctc_blank!r}; this term needs no LLM pass)")
    if loss.commit_weight:
        parts.append(f"{loss.commit_weight} x squared distance of each adapter output to its nearest word embedding")
    return " + ".join(parts)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# --- front matter of existing cards -------------------------------------------------------------------------
def checkpoint_card_data(directory: Path, datasets: Sequence[str] = (),
                         license: str = model_card.LICENSE) -> ModelCardData:
    """The Hub metadata of a BLSP checkpoint or an LLM LoRA directory, from its own config."""
    if (directory / CONFIG_NAME).is_file():
        return blsp_card_data(BlspConfig.load(directory), datasets, license=license)
    if (directory / LORA_CONFIG_NAME).is_file():
        base = json.loads((directory / LORA_CONFIG_NAME).read_text()).get("base_model_name_or_path")
        return model_card.lora_card_data(hub_id(base), datasets, license=license)
    raise FileNotFoundError(f"{directory} holds neither a BLSP {CONFIG_NAME} nor a LoRA's {LORA_CONFIG_NAME}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.adapter_card",
                                     description="(Re)write the Hub front matter of checkpoints' README.md cards.")
    parser.add_argument("directories", nargs="+", type=Path, help="BLSP checkpoints or LLM LoRA directories")
    parser.add_argument("--dataset", action="append", default=[],
                        help="a corpus the weights were trained on (repeat; default: those the card lists)")
    parser.add_argument("--license", default=model_card.LICENSE, help="the weights' licence (a Hub licence id)")
    args = parser.parse_args(argv)
    for directory in args.directories:
        try:
            data = checkpoint_card_data(directory, args.dataset, args.license)
        except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
            parser.error(f"{directory}: {err}")
        model_card.write_front_matter(directory / CARD_NAME, data)
        bases = [data.base_model] if isinstance(data.base_model, str) else data.base_model or ["no hub base model"]
        print(f"{directory / CARD_NAME}: front matter for {', '.join(bases)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
