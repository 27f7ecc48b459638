r"""The paper's fine-tuning stage (section 5.2, Table 4): a pretrained BLSP model learns a downstream task,
speech translation, from speech directly.

    python -m train.finetune --config train/configs/finetune_st_offline.json
    python -m train.finetune --config train/configs/finetune_st_offline.json --resume    # after a kill
    python -m train.finetune --config ... loop.max_steps=20 model.train_encoder=false lora.r=8
    accelerate launch --config_file train/configs/accelerate_ddp.yaml -m train.finetune --config ...

What trains (each switchable in the config): a peft LoRA on the LLM's self-attention projections
(`lora.target_modules`, default q_proj, k_proj, v_proj, o_proj; r = alpha = 16, the paper's setting), the
Whisper encoder (`model.train_encoder`) and the modality adapter (`model.train_adapter`), as the paper
updates all three. The loss is cross-entropy on the response + EOS of the paper's translate instruction
(Table 11) over the speech: `train.build_st_data` makes such manifests offline.

The speech positions: with the paper's readout ("embeddings") each adapter output fills one position. A
model whose adapter was trained by CTC ("ctc" readout, the offline default) is read in training by the
greedy CTC readout (`readout.ctc_readout`: one vector per word piece heard, a softmax over the nearest
word embeddings, so the adapter and encoder get gradients), and each prompt is laid out after its clip
is read, as serving does; the checkpoint keeps its own readout settings for serving (the LM-fused search
has no gradient and runs the LLM per beam, so it does not train here). Measured on the offline default
(train/results/speech_translation.md): training its encoder and adapter that way collapses the readout to
one word piece per clip within 10 steps (the cross-entropy pulls every output towards one word and the
greedy segmentation has nothing to keep them apart), so for a CTC-readout model train the LoRA alone
(train/configs/finetune_st_offline_lora.json); the paper's setting is for the paper's readout.

Output directory (`loop.output_dir`): the loop's record (train_config.json, metrics.jsonl, eval.jsonl,
loss_curve.png, checkpoints/) and the model, loadable wherever a BLSP checkpoint loads (`python app.py
--model DIR`, `python -m blsp_chat generate|chat|serve --model DIR`, `python -m train.evaluate --model DIR`):
config.json + model.safetensors (the adapter, and the encoder when it trained), adapter_config.json +
adapter_model.safetensors (peft's LoRA, its base_model_name_or_path the LLM the config names;
`blsp_chat.weights` applies and merges it on load), data_summary.json and README.md, the model card.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from accelerate.state import PartialState
from torch import nn

from blsp_chat.constants import IGNORE_INDEX
from blsp_chat.model import TRAINABLE_PREFIXES, BlspModel
from blsp_chat.offline import WeightsError
from blsp_chat.prompt import pad_token_id, template_for
from blsp_chat.weights import DTYPES, ENCODER_PREFIX, LLM_PREFIX, LoadedBlsp, load_pretrained, save_adapter
from train.adapter_config import apply_override
from train.io import read_jsonl
from train.loop import METRICS_NAME, LoopConfig, TrainResult, train
from train.losses import cross_entropy, readout_prompts, response_span, training_readout
from train.speech_data import (
    BucketBatchSampler,
    EncoderCache,
    SpeechCollator,
    SpeechDataset,
    read_manifest,
    speech_embeddings,
    summarize,
)

WRAPPER_PREFIX = "blsp."  # parameter names inside FinetuneObjective
PAPER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the self-attention's query, key, value, output
FINETUNE_CONFIG_NAME = "finetune_config.json"
DATA_SUMMARY_NAME = "data_summary.json"
CARD_NAME = "README.md"
# Whisper's positional table is sinusoidal and frozen in the encoder itself: it stays frozen when the encoder trains.
FROZEN_ENCODER_PARTS = ("embed_positions",)


# --- config --------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    init: str = "default"        # the pretrained BLSP model: "default" (the shipped one), a directory or hub id
    dtype: str = "float32"
    train_encoder: bool = True   # the paper updates the speech encoder too
    train_adapter: bool = True
    seed: int = 0                # LoRA initialisation

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass
class LoraSection:
    enabled: bool = True
    r: int = 16
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PAPER_LORA_TARGETS

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.enabled and not (self.r >= 1 and self.alpha > 0 and 0 <= self.dropout < 1 and self.target_modules):
            raise ValueError("lora needs r >= 1, alpha > 0, 0 <= dropout < 1 and at least one target module; got "
                             f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, targets={self.target_modules}")


@dataclass
class DataSection:
    train_manifest: str = "data/st_eng_spa/train.jsonl"
    eval_manifest: str | None = "data/st_eng_spa/valid.jsonl"  # held-out loss during training
    max_train_examples: int | None = None
    max_eval_examples: int = 48
    max_seconds: float | None = 30.0
    mega_batch_factor: int = 50
    encoder_cache_dir: str | None = None    # frozen-encoder runs only: its outputs never change then


@dataclass
class FinetuneConfig:
    loop: LoopConfig
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)

    def __post_init__(self) -> None:
        if not (self.lora.enabled or self.model.train_encoder or self.model.train_adapter):
            raise ValueError("nothing trains: enable lora, model.train_encoder or model.train_adapter")
        if self.model.train_encoder and self.data.encoder_cache_dir:
            raise ValueError("data.encoder_cache_dir caches the frozen encoder's outputs, but model.train_encoder is "
                             "true (they change every step): unset one of them")

    SECTIONS = {"model": ModelSection, "lora": LoraSection, "data": DataSection}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        unknown = sorted(set(data) - set(cls.SECTIONS) - {"loop", "description"})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: loop, {', '.join(cls.SECTIONS)}")
        kwargs: dict[str, Any] = {"loop": LoopConfig.from_dict(data.get("loop", {}))}
        for name, section in cls.SECTIONS.items():
            values = data.get(name, {})
            bad = sorted(set(values) - {f.name for f in dataclasses.fields(section)})
            if bad:
                raise ValueError(f"unknown keys in config section {name!r}: {bad}")
            kwargs[name] = section(**values)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"loop": self.loop.to_dict(), **{n: dataclasses.asdict(getattr(self, n)) for n in self.SECTIONS}}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    for override in overrides:
        apply_override(data, override)
    return FinetuneConfig.from_dict(data)


# --- the model ---------------------------------------------------------------------------------------
def module_leaf_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in module.named_modules() if name}


def check_lora_targets(llm: nn.Module, targets: Sequence[str]) -> None:
    """Every target names linear layers of this LLM: peft matches names by suffix and would quietly skip a
    name the LLM lacks when another name matches."""
    linear = {name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        attention = sorted(n for n in linear if n.endswith("_proj") or "attn" in n)
        raise ValueError(f"lora.target_modules names {missing}, which this LLM ({type(llm).__name__}) does not have; "
                         f"its linear layers are {sorted(linear)}: for the paper's LoRA name its attention "
                         f"projections ({attention})")


def apply_lora(blsp: BlspModel, section: LoraSection, seed: int) -> None:
    """Wrap the LLM in a peft LoRA on `section.target_modules` (in place: blsp.llama_model becomes the peft model)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(blsp.llama_model, section.target_modules)
    lora = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # lora_A starts random: the seed makes the run a function of its config
    blsp.llama_model = get_peft_model(blsp.llama_model, lora)
    blsp.llama_model.peft_config["default"].base_model_name_or_path = blsp.config.llm_name_or_path


def is_trainable(name: str, config: FinetuneConfig) -> bool:
    """Whether a BlspModel parameter trains under `config`: the one rule for requires_grad and the loop's check."""
    if name.startswith(TRAINABLE_PREFIXES):
        return config.model.train_adapter
    if name.startswith(ENCODER_PREFIX):
        return config.model.train_encoder and not any(part in name for part in FROZEN_ENCODER_PARTS)
    return config.lora.enabled and name.startswith(LLM_PREFIX) and ".lora_" in name


def set_trainable(blsp: BlspModel, config: FinetuneConfig) -> None:
    for name, param in blsp.named_parameters():
        param.requires_grad = is_trainable(name, config)


def prepare_model(loaded: LoadedBlsp, config: FinetuneConfig) -> LoadedBlsp:
    """The pretrained model with the config's LoRA, and exactly the config's parts trainable."""
    if loaded.model.ctc_head is not None:
        raise ValueError("this model's adapter spells characters, and the text it spells passes no gradient "
                         "back to the adapter or encoder: fine-tuning reads speech through a CTC readout over "
                         "word pieces or the paper's embeddings readout")
    if config.lora.enabled:
        apply_lora(loaded.model, config.lora, config.model.seed)
    set_trainable(loaded.model, config)
    return loaded


def build_model(config: FinetuneConfig) -> LoadedBlsp:
    init = None if config.model.init in ("", "default") else config.model.init
    loaded = load_pretrained(init, device="cpu", dtype=DTYPES[config.model.dtype])
    if not loaded.adapter_trained:
        raise ValueError(f"{config.model.init!r} has an untrained adapter: fine-tuning starts from a pretrained "
                         "BLSP model (train one with train.train_adapter, or set model.init to its directory)")
    return prepare_model(loaded, config)


# --- the objective -----------------------------------------------------------------------------------
class FinetuneObjective(nn.Module):
    """forward(batch) -> (loss, metrics): speech -> encoder -> adapter -> readout, each prompt rendered for the
    positions its clip was read into, cross-entropy on the response. Holds the BlspModel as `blsp` so that
    accelerate wraps every trainable part (DDP then sees the LoRA, adapter and encoder gradients)."""

    def __init__(self, blsp: BlspModel, tokenizer, config: FinetuneConfig, cache: EncoderCache | None = None):
        super().__init__()
        self.blsp, self.tokenizer, self.config, self.cache = blsp, tokenizer, config, cache
        self.template = template_for(blsp.config.prompt_template, tokenizer)
        self.pad_id = pad_token_id(tokenizer)

    def train(self, mode: bool = True) -> "FinetuneObjective":
        super().train(mode)
        self.blsp.train(mode)  # puts the frozen Whisper and LLM in eval mode; the trained ones go back to `mode`
        if self.config.lora.enabled:
            self.blsp.llama_model.train(mode)  # LoRA dropout
        if self.config.model.train_encoder:
            self.blsp.whisper_model.train(mode)
        return self

    def speech(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        if self.config.model.train_encoder:  # through the encoder with gradients; no cache can hold its outputs
            adapted = self.blsp.adapt_windows(self.blsp.encode_windows(batch["audios"]))
        else:
            adapted = speech_embeddings(self.blsp, batch, self.cache)
        return [training_readout(self.blsp, s) for s in adapted]

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        reads = self.speech(batch)
        tokens = readout_prompts(batch, reads, self.tokenizer, self.template, self.pad_id)
        tokens = {k: v.to(self.blsp.device) for k, v in tokens.items()}
        keep = response_span(tokens["labels"])
        out = self.blsp(tokens["input_ids"], tokens["attention_mask"], tokens["speech_mask"], speech_embeds=reads,
                        logits_to_keep=keep)
        labels = tokens["labels"][:, -keep:]
        ce = cross_entropy(out.logits, labels)
        return ce, {"ce": float(ce.detach()), "response_tokens": float((labels != IGNORE_INDEX).sum()),
                    "speech_positions": sum(r.shape[0] for r in reads) / max(len(reads), 1),
                    "unheard_clips": float(sum(r.shape[0] == 0 for r in reads))}


def objective_loss(model: nn.Module, batch: dict[str, Any]):
    return model(batch)


def expected_trainable(config: FinetuneConfig):
    return lambda name: name.startswith(WRAPPER_PREFIX) and is_trainable(name[len(WRAPPER_PREFIX):], config)


# --- saving ---------------------------------------------------------------------------------------
def save_finetuned(blsp: BlspModel, directory: str | Path, config: FinetuneConfig) -> None:
    """config.json + model.safetensors (adapter, and encoder when it trained) + peft's LoRA files beside them."""
    directory = Path(directory)
    save_adapter(blsp, directory, with_encoder=config.model.train_encoder)
    if config.lora.enabled:
        blsp.llama_model.save_pretrained(str(directory))  # adapter_config.json + adapter_model.safetensors


# --- run -------------------------------------------------------------------------------------------
def run(config: FinetuneConfig, *, resume: bool = False, loaded: LoadedBlsp | None = None,
        callbacks=()) -> TrainResult:
    """Fine-tune; `loaded` (a LoadedBlsp, already through `prepare_model`) skips building the model (tests)."""
    started = time.time()
    loaded = loaded or build_model(config)
    blsp, tokenizer = loaded.model, loaded.tokenizer
    data = config.data
    train_examples = read_manifest(data.train_manifest, limit=data.max_train_examples)
    eval_examples = read_manifest(data.eval_manifest)[: data.max_eval_examples] if data.eval_manifest else []
    cache = EncoderCache.for_model(data.encoder_cache_dir, blsp) if data.encoder_cache_dir else None

    def dataset(examples):
        return SpeechDataset(examples, tokenizer, blsp.speech_token_count, cache=cache, max_seconds=data.max_seconds)

    train_set, eval_set = dataset(train_examples), dataset(eval_examples)
    summary = {"train": summarize(train_examples), "eval": summarize(eval_examples),
               "train_manifest": data.train_manifest, "eval_manifest": data.eval_manifest}
    batch_size, seed = config.loop.per_device_batch_size, config.loop.seed
    objective = FinetuneObjective(blsp, tokenizer, config, cache)
    result = train(
        objective, objective_loss, train_set, SpeechCollator(pad_token_id(tokenizer)), config.loop,
        expected_trainable=expected_trainable(config),
        batch_sampler_fn=lambda replicas, rank: BucketBatchSampler(
            train_set.durations, batch_size, seed=seed, mega_batch_factor=data.mega_batch_factor,
            num_replicas=replicas, rank=rank),
        eval_dataset=eval_set if len(eval_set) else None, resume=resume,
        run_info={"finetune_config": config.to_dict(), "init": loaded.source, "data": summary}, callbacks=callbacks,
    )
    if PartialState().is_main_process:
        out = Path(config.loop.output_dir)
        save_finetuned(result.model.blsp, out, config)
        (out / FINETUNE_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (out / DATA_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        write_card(out, config, loaded.source, summary, result, time.time() - started)
    return result


def write_card(out: Path, config: FinetuneConfig, source: str, summary: dict, result: TrainResult,
               seconds: float) -> None:
    """README.md: what was fine-tuned from what, on which data, how long, the loss, and how to load it."""
    lora = config.lora
    parts = [f"LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {', '.join(lora.target_modules)}"
             if lora.enabled else None, "the Whisper encoder" if config.model.train_encoder else None,
             "the modality adapter" if config.model.train_adapter else None]
    last_eval = result.eval_history[-1] if result.eval_history else {}
    losses = result.losses
    first = sum(losses[:10]) / len(losses[:10]) if losses else float("nan")
    last = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    eval_line = f"{last_eval['eval_loss']:.3f}" if "eval_loss" in last_eval else "not measured"
    heard = [r["speech_positions"] for r in read_jsonl(out / METRICS_NAME) if "speech_positions" in r]
    heard_line = (f"{heard[0]:.1f} at the first logged step, {heard[-1]:.1f} at the last (a collapse to ~1 means the "
                  "readout stopped hearing words)") if heard else "not logged"
    out.joinpath(CARD_NAME).write_text(f"""# BLSP fine-tuned for speech translation (`python -m train.finetune`)

Fine-tuned from **{source}** (paper section 5.2: the pretrained BLSP model learns the downstream task from
speech directly). Trained: {'; '.join(p for p in parts if p)} ({result.trainable_parameters:,} parameters).

- Data: {summary['train']['examples']:,} clips ({summary['train']['hours']} h) of `{summary['train_manifest']}`;
  held-out loss on {summary['eval']['examples']} clips of `{summary['eval_manifest']}`.
- Schedule: {result.state.step} optimizer steps of {config.loop.per_device_batch_size} x
  {config.loop.gradient_accumulation_steps} (accumulation), learning rate {config.loop.learning_rate:g}
  ({config.loop.lr_schedule}, {config.loop.warmup_steps} warmup steps); {seconds / 60:.1f} min in this invocation.
- Loss (cross-entropy on the response + EOS): {first:.3f} over the first 10 steps, {last:.3f} over the last 10;
  held-out {eval_line}. Curve: loss_curve.png, metrics.jsonl, eval.jsonl.
- LLM positions each clip was read into (mean over a batch): {heard_line}.

Load it wherever a BLSP checkpoint loads; the LoRA (adapter_config.json + adapter_model.safetensors, peft's
layout, base `{config_llm(out)}`) is applied to the LLM and merged:

    python app.py --model {out}                       # Task: Translate
    python -m blsp_chat generate --model {out} ...
    python -m train.evaluate --task st --model {out} --manifest data/st_eng_spa/test.jsonl ...

Training config: {FINETUNE_CONFIG_NAME}; the loop's record: train_config.json.
""")


def config_llm(out: Path) -> str:
    return json.loads((out / "config.json").read_text()).get("llm_name_or_path", "?")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON or YAML fine-tuning config (train/configs/finetune_*)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in loop.output_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. loop.max_steps=20 lora.r=8")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        loaded = build_model(config)
    except (ValueError, TypeError, OSError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run(config, resume=args.resume, loaded=loaded)
    print(json.dumps({"steps": result.state.step, "final_loss": result.losses[-1] if result.losses else None,
                      "samples_per_s": round(result.samples_per_s, 3), "output_dir": str(result.output_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
