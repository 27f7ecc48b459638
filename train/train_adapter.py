r"""Stage 2 of BLSP: train the modality adapter by behaviour alignment (Whisper and the LLM frozen).

One CPU (or one GPU):
    python -m train.train_adapter --config train/configs/adapter_tiny_offline.json
    python -m train.train_adapter --config train/configs/adapter_tiny_offline.json --resume   # after a kill
    python -m train.train_adapter --config ... loop.max_steps=20 data.repetition_ratio=0.25 loss.kd_weight=1
Several GPUs or nodes (same command line behind `accelerate launch`):
    accelerate launch --config_file train/configs/accelerate_ddp.yaml -m train.train_adapter \
        --config train/configs/adapter_7b_paper.json
    accelerate launch --config_file train/configs/accelerate_fsdp.yaml -m train.train_adapter ...
    accelerate launch --config_file train/configs/accelerate_deepspeed_zero2.yaml -m train.train_adapter ...
  Set `num_processes` (and `num_machines`, `machine_rank`, `main_process_ip` for nodes) in the yaml or
  on the accelerate command line. Without GPUs, CPU processes (gloo):
    accelerate launch --multi_gpu --num_processes 2 -m train.train_adapter --config ...
  The global batch is per_device_batch_size x processes x gradient_accumulation_steps: adapter_7b_paper.json
  reaches the paper's 768 as 8 x 8 GPUs x 12; on another GPU count change `loop.gradient_accumulation_steps`
  to keep 768.

The code: `train.adapter_config` (the config), `train.losses` (the losses and `AdapterObjective`),
`train.adapter_card` (the model card); this module builds the model and data, and runs `train.loop`.

Config (JSON or YAML) sections: `model` (base models, adapter shape, dtype), `data` (manifests,
repetition mixing, encoder cache), `loss` (cross-entropy and distillation weights), `eval` (held-out
split, greedy repeat WER) and `loop` (`train.loop.LoopConfig`). Overrides `section.key=value` (value as
JSON, else a string) are applied on top and recorded; every value is checked against its field's type.
A Hugging Face dataset may replace `data.train_manifest`: `--dataset-dir DIR` (save_to_disk) or
`--dataset-name NAME` (datasets.load_dataset), see `train.hf_datasets`. `--report-to tensorboard` logs to
accelerate's trackers; a progress bar shows on a terminal (`--no-progress` hides it).

Loss: cross-entropy on the response + EOS (labels from `blsp_chat.prompt.render`), plus optionally
`kd_weight` x KL(LLM given the transcript || LLM given the speech) over the response positions (BLSP-KD,
Ultravox), and `ctc_weight` x CTC pre-alignment: each adapter output is classified by its distance to the
LLM's word embeddings, CTC against the transcript's tokens with a space token as the blank, and
`commit_weight` x the squared distance of each output to its nearest word embedding. With the CE and KD
weights at 0 the LLM never runs, so the offline recipe starts with that cheap stage (A:
adapter_tiny_offline_ctc.json, then A2 with commitment) before behaviour alignment (B:
adapter_tiny_offline.json); train/results/offline_v2_adapter_cpu.md has the commands and what each gave.
Output directory: the loop's record (train_config.json, metrics.jsonl, eval.jsonl, loss_curve.png,
checkpoints/), the adapter-only checkpoint (config.json + model.safetensors, loadable by
`BlspModel.from_pretrained(dir)` / `python app.py --model dir`), data_summary.json, and README.md, the
model card written from the record.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.state import PartialState

from blsp_chat.audio import load_audio
from blsp_chat.characters import greedy_characters, spell
from blsp_chat.config import BlspConfig, GenerationOptions
from blsp_chat.constants import REPEAT_INSTRUCTION
from blsp_chat.ctc_decode import collapse_ctc
from blsp_chat.generate import NothingHeardError, generate_reply
from blsp_chat.model import ENCODER_PREFIX, BlspModel
from blsp_chat.prompt import Turn, pad_token_id, template_for
from blsp_chat.readout import embedding_distance_logits
from blsp_chat.weights import (
    DTYPES,
    LoadedBlsp,
    load_blsp_dir,
    load_llm,
    load_whisper_encoder,
    resolve_base,
    save_adapter,
)
from train.adapter_card import write_model_card
from train.adapter_config import AdapterTrainConfig, DataSection, EvalSection, ModelSection, load_config
from train.hf_datasets import manifest_for_split
from train.loop import (
    CHECKPOINT_PREFIX,
    TRAINABLE_NAME,
    TrainResult,
    add_loop_arguments,
    checkpoint_dirs,
    loop_overrides,
    train,
)
from train.loop import CONFIG_NAME as LOOP_CONFIG_NAME
from train.losses import WRAPPER_PREFIX, AdapterObjective, ctc_blank_id, objective_loss
from train.metrics import EnglishNormalizer, corpus_wer, load_spelling_mapping
from train.speech_data import (
    BucketBatchSampler,
    EncoderCache,
    SpeechCollator,
    SpeechDataset,
    SpeechExample,
    read_manifest,
    summarize,
    with_repetition,
    word_piece_targets,
)

DATA_SUMMARY_NAME = "data_summary.json"
DATASET_DIR = "dataset"  # a Hugging Face dataset's manifests and clips, under loop.output_dir by default


# --- model -------------------------------------------------------------------------------------------
def build_model(section: ModelSection):
    """Frozen base models + a fresh (or `init_adapter`) adapter -> LoadedBlsp."""
    dtype = DTYPES[section.dtype]
    if section.init_adapter:
        loaded = load_blsp_dir(Path(section.init_adapter), dtype)
        if section.encoder_tuned_layers:  # a warm start may go on to tune the encoder's top layers too
            loaded.model.tune_top_encoder_layers(section.encoder_tuned_layers)
        return loaded
    encoder, extractor = load_whisper_encoder(section.whisper, dtype)
    llm, tokenizer = load_llm(section.llm, dtype)
    config = BlspConfig.from_base_configs(
        encoder.config, llm.config, conv_kernel_sizes=section.conv_kernel_sizes,
        adapter_inner_dim=section.adapter_inner_dim, encoder_padding=section.encoder_padding,
        adapter_context_layers=section.adapter_context_layers, adapter_context_heads=section.adapter_context_heads,
        adapter_context_ffn_dim=section.adapter_context_ffn_dim, prompt_template=section.prompt_template,
        encoder_tuned_layers=section.encoder_tuned_layers, whisper_name_or_path=section.whisper,
        llm_name_or_path=section.llm, **character_head(section))
    torch.manual_seed(section.seed)
    model = BlspModel(config, whisper_encoder=encoder, llm=llm, feature_extractor=extractor).to(dtype)
    return LoadedBlsp(model, tokenizer, "training", adapter_trained=False)


def character_head(section: ModelSection) -> dict[str, Any]:
    """The config fields that give a fresh adapter its character head (none for word-piece CTC): the head
    is built with the model, so its readout is named with it."""
    if section.ctc_alphabet is None:
        return {}
    return {"ctc_alphabet": section.ctc_alphabet, "speech_readout": "ctc"}


def adapter_parameters(blsp: BlspModel) -> Callable[[str], bool]:
    """The objective's parameter names that train: the adapter's and any tuned encoder layers'."""
    prefixes = blsp.trainable_prefixes
    return lambda name: name.startswith(WRAPPER_PREFIX) and name[len(WRAPPER_PREFIX):].startswith(prefixes)


def learning_rate_scales(section: ModelSection) -> Callable[[str], float]:
    """The factor on the loop's learning rate of each trainable parameter: the tuned encoder layers take
    `encoder_learning_rate_scale`, everything fresh 1."""
    encoder = WRAPPER_PREFIX + ENCODER_PREFIX
    return lambda name: section.encoder_learning_rate_scale if name.startswith(encoder) else 1.0


# --- losses ------------------------------------------------------------------------------------------
# --- data --------------------------------------------------------------------------------------------
def held_out(example: SpeechExample, fraction: float) -> bool:
    """A stable split by clip, so a clip's repeat line never sits on the other side of its continuation."""
    digest = hashlib.sha1(example.audio.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def data_manifests(config: AdapterTrainConfig) -> tuple[str, str | None]:
    """(training manifest, held-out manifest or None): the config's, or written from its Hugging Face dataset."""
    data = config.data
    if not data.uses_dataset:
        return data.train_manifest, data.eval_manifest
    out = Path(data.dataset_audio_dir or Path(config.loop.output_dir) / DATASET_DIR)
    train_manifest = manifest_for_split(data, data.dataset_split, out)
    eval_manifest = manifest_for_split(data, data.dataset_eval_split, out) if data.dataset_eval_split else None
    return str(train_manifest), (str(eval_manifest) if eval_manifest else None)


def load_splits(data: DataSection, seed: int, manifests: tuple[str, str | None] | None = None,
                ) -> tuple[list[SpeechExample], list[SpeechExample]]:
    """Training and held-out examples; `manifests` (from data_manifests) replaces the config's."""
    train_manifest, eval_manifest = manifests or (data.train_manifest, data.eval_manifest)
    if not train_manifest:
        raise ValueError("data.train_manifest is not set: point it at the speech manifest (JSON lines), or give a "
                         "Hugging Face dataset (--dataset-dir / --dataset-name)")
    examples = read_manifest(train_manifest, limit=data.max_train_examples)
    if eval_manifest:
        train_examples, eval_examples = examples, read_manifest(eval_manifest)
    else:
        train_examples = [e for e in examples if not held_out(e, data.eval_fraction)]
        eval_examples = [e for e in examples if held_out(e, data.eval_fraction)]
    if data.repetition_ratio:
        train_examples = with_repetition(train_examples, data.repetition_ratio, seed=seed)
        eval_examples = with_repetition(eval_examples, data.repetition_ratio, seed=seed)
    return train_examples, eval_examples[: data.max_eval_examples]


# --- evaluation: greedy repeat WER ------------------------------------------------------------------------
def repeat_wer_fn(loaded, examples: Sequence[SpeechExample], section: EvalSection):
    """eval_fn for the loop: greedy decoding with the repeat instruction, through the serving code, scored
    as train.evaluate scores ASR (corpus WER after Whisper's English normaliser). A clip whose readout hears
    no words (a young CTC adapter's all-blank outputs) repeats nothing: every reference word is a deletion,
    and the count is recorded, where serving would refuse the turn."""
    normalizer = wer_normalizer(loaded.model)
    clips = [e for e in examples if e.text][: section.repeat_wer_examples]
    options = GenerationOptions(max_new_tokens=section.max_new_tokens)

    def evaluate(model, accelerator) -> dict[str, float]:
        if not clips:
            return {}
        hypotheses, references, unheard = [], [], 0
        for example in clips:
            audio = load_audio(example.audio, max_seconds=None)
            turn = Turn("human", instruction=REPEAT_INSTRUCTION,
                        speech_tokens=model.blsp.speech_token_count(len(audio)))
            view = dataclasses.replace(loaded, model=model.blsp)
            try:
                hypotheses.append(generate_reply(view, [turn], [audio], options))
            except NothingHeardError:
                hypotheses.append("")
                unheard += 1
            references.append(example.text)
        wer = corpus_wer(references, hypotheses, normalizer).wer
        return {"repeat_wer": float(wer), "repeat_wer_examples": len(clips), "repeat_wer_unheard": unheard}

    return evaluate


def readout_wer_fn(tokenizer, examples: Sequence[SpeechExample], section: EvalSection, blank_id: int | None):
    """eval_fn for CTC runs: read each held-out clip's adapter outputs greedily (the characters a character
    head spells, else the nearest word embeddings) and score that text against the transcript: what the LLM
    is given, before it says anything."""
    normalizer = EnglishNormalizer()
    clips = [e for e in examples if e.text][: section.repeat_wer_examples]

    def evaluate(model, accelerator) -> dict[str, float]:
        if not clips:
            return {}
        with torch.no_grad():
            hypotheses = [greedy_ctc_text(model.blsp, tokenizer, blank_id, e.audio) for e in clips]
        return {"readout_wer": float(corpus_wer([e.text for e in clips], hypotheses, normalizer).wer)}

    return evaluate


def greedy_ctc_text(blsp: BlspModel, tokenizer, blank_id: int | None, audio_path: str) -> str:
    """The text a CTC adapter's raw outputs (before any readout) spell for one clip, by greedy decoding."""
    speech = blsp.adapt_windows(blsp.encode_windows([load_audio(audio_path, max_seconds=None)]))[0]
    if blsp.ctc_head is not None:
        return greedy_characters(blsp.ctc_head(speech), blsp.config.ctc_alphabet)
    table = blsp.llama_model.get_input_embeddings().weight
    return tokenizer.decode(collapse_ctc(embedding_distance_logits(speech, table).argmax(-1).tolist(), blank_id))


def combined(*eval_fns):
    fns = [f for f in eval_fns if f is not None]
    if not fns:
        return None

    def evaluate(model, accelerator) -> dict[str, float]:
        scores: dict[str, float] = {}
        for fn in fns:
            scores.update(fn(model, accelerator))
        return scores

    return evaluate


def wer_normalizer(blsp: BlspModel) -> EnglishNormalizer:
    """train.evaluate's normaliser: Whisper's English one, with the base Whisper's spelling map where its
    directory has one."""
    name = blsp.config.whisper_name_or_path
    return EnglishNormalizer(load_spelling_mapping(resolve_base(name)) if name else None)


# --- run ---------------------------------------------------------------------------------------------
def set_readout(loaded, config: AdapterTrainConfig) -> int | None:
    """The readout the run evaluates and serves with, in the model's config (saved with the adapter);
    returns the CTC blank's token id when the run trains CTC over word pieces."""
    blsp = loaded.model
    if blsp.config.ctc_alphabet != config.model.ctc_alphabet:
        raise ValueError(f"model.ctc_alphabet is {config.model.ctc_alphabet!r} but the adapter being trained "
                         f"spells {blsp.config.ctc_alphabet!r} (None: no character head)")
    word_pieces = config.loss.ctc_weight and config.model.ctc_alphabet is None
    blank_id = ctc_blank_id(loaded.tokenizer, config.loss.ctc_blank) if word_pieces else None
    blsp.config = dataclasses.replace(blsp.config, speech_readout=config.model.speech_readout, ctc_blank_id=blank_id,
                                      ctc_readout_temperature=config.model.ctc_readout_temperature)
    return blank_id


def ctc_targets(config: AdapterTrainConfig, tokenizer, blank_id: int | None) -> Callable[[str], list[int]] | None:
    """What the run's CTC aligns each transcript with: its characters, or the LLM's word pieces; None without CTC."""
    if config.model.ctc_alphabet is not None:
        return functools.partial(spell, alphabet=config.model.ctc_alphabet)
    return word_piece_targets(tokenizer, blank_id) if blank_id is not None else None


def encoder_cache(data: DataSection, blsp) -> EncoderCache | None:
    if not data.encoder_cache_dir:
        return None
    return EncoderCache.for_model(data.encoder_cache_dir, blsp, memory_bytes=int(data.encoder_cache_memory_gb * 2**30))


def run(config: AdapterTrainConfig, *, resume: bool = False, loaded=None, callbacks=()) -> TrainResult:
    """Train; `loaded` (a LoadedBlsp) skips building the model from `config.model` (tests)."""
    started = time.time()
    loaded = loaded or build_model(config.model)
    blsp, tokenizer = loaded.model, loaded.tokenizer
    template = template_for(blsp.config.prompt_template, tokenizer)
    manifests = data_manifests(config)
    train_examples, eval_examples = load_splits(config.data, config.loop.seed, manifests)
    cache = encoder_cache(config.data, blsp)
    kd = config.loss.kd_weight > 0

    blank_id = set_readout(loaded, config)

    def dataset(examples):
        return SpeechDataset(examples, tokenizer, blsp.speech_token_count, template=template, cache=cache,
                             with_teacher=kd, max_seconds=config.data.max_seconds,
                             ctc_targets=ctc_targets(config, tokenizer, blank_id))

    train_set, eval_set = dataset(train_examples), dataset(eval_examples)
    data_summary = {"train": summarize(train_examples), "eval": summarize(eval_examples),
                    "train_manifest": manifests[0], "eval_manifest": manifests[1]}
    if config.data.uses_dataset:
        data_summary["dataset"] = {k: getattr(config.data, k) for k in (
            "dataset_name", "dataset_dir", "dataset_config", "dataset_split", "dataset_eval_split")}
    batch_size, seed, factor = config.loop.per_device_batch_size, config.loop.seed, config.data.mega_batch_factor
    objective = AdapterObjective(blsp, config.loss, cache, ctc_blank_id=blank_id, masking=config.data.frame_masking(),
                                 tokenizer=tokenizer)
    eval_fn = None
    if config.eval.repeat_wer_examples:
        readout_fn = readout_wer_fn(tokenizer, eval_examples, config.eval, blank_id) if config.loss.ctc_weight else None
        eval_fn = combined(repeat_wer_fn(loaded, eval_examples, config.eval), readout_fn)
    result = train(
        objective, objective_loss, train_set, SpeechCollator(pad_token_id(tokenizer)), config.loop,
        expected_trainable=adapter_parameters(blsp), learning_rate_scale=learning_rate_scales(config.model),
        batch_sampler_fn=lambda replicas, rank: BucketBatchSampler(
            train_set.durations, batch_size, seed=seed, mega_batch_factor=factor, num_replicas=replicas, rank=rank),
        eval_dataset=eval_set if len(eval_set) else None, eval_fn=eval_fn, resume=resume,
        run_info={"adapter_config": config.to_dict(), "data": data_summary}, callbacks=callbacks,
    )
    if PartialState().is_main_process:
        out = Path(config.loop.output_dir)
        save_adapter(result.model.blsp, out)
        (out / DATA_SUMMARY_NAME).write_text(json.dumps(data_summary, indent=2) + "\n")
        write_model_card(out, config, data_summary, result, time.time() - started, cache)
    return result


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """A run's kept checkpoint: "latest", "step-N" or "N"."""
    kept = checkpoint_dirs(run_dir)
    if not kept:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/step-N)")
    if which == "latest":
        return kept[-1]
    name = which if which.startswith(CHECKPOINT_PREFIX) else f"{CHECKPOINT_PREFIX}{which}"
    for directory in kept:
        if directory.name == name:
            return directory
    raise FileNotFoundError(f"{run_dir} keeps no checkpoint {name!r}; kept: {', '.join(d.name for d in kept)}")


def save_checkpoint_model(run_dir: Path, checkpoint: Path, out: Path) -> None:
    """A checkpoint of a run, finished or still going, as an adapter-only model directory that every loader
    takes: the run's model config and readout (train_config.json) with the checkpoint's adapter weights."""
    weights = checkpoint / TRAINABLE_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {TRAINABLE_NAME} (a sharded FSDP/DeepSpeed checkpoint: "
                                "let the run finish, or resume it on one process, to get the adapter)")
    config = AdapterTrainConfig.from_dict(json.loads((run_dir / LOOP_CONFIG_NAME).read_text())["adapter_config"])
    loaded = build_model(config.model)  # init_adapter, where the run had one, gives the architecture it trained
    set_readout(loaded, config)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    adapter = {name.removeprefix(WRAPPER_PREFIX): tensor for name, tensor in state.items()}
    missing, unexpected = set(loaded.model.adapter_state_dict()) - set(adapter), set(adapter) - set(
        loaded.model.adapter_state_dict())
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the run's model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    loaded.model.load_state_dict(adapter, strict=False)
    save_adapter(loaded.model, out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.train_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON or YAML training config (see train/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in loop.output_dir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset-dir", help="train on a Hugging Face dataset saved with save_to_disk (replaces "
                                              "data.train_manifest; columns: data.audio_column, data.text_column, ...)")
    source.add_argument("--dataset-name", help="train on a dataset datasets.load_dataset finds by this name or path")
    parser.add_argument("--dataset-config", help="the dataset's configuration (load_dataset's second argument)")
    parser.add_argument("--dataset-split", help="its training split (default: train)")
    parser.add_argument("--dataset-eval-split", help="its held-out split (replaces data.eval_manifest)")
    add_loop_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. loop.max_steps=20")
    return parser.parse_args(argv)


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """The options as `section.key=value` overrides, before the positional ones (which win)."""
    overrides = loop_overrides(args)
    if args.dataset_dir or args.dataset_name:  # the dataset replaces the config's training manifest
        key = "dataset_dir" if args.dataset_dir else "dataset_name"
        overrides += [f"data.{key}={json.dumps(args.dataset_dir or args.dataset_name)}", 'data.train_manifest=""']
    for option, key in (("dataset_config", "dataset_config"), ("dataset_split", "dataset_split")):
        if getattr(args, option):
            overrides.append(f"data.{key}={json.dumps(getattr(args, option))}")
    if args.dataset_eval_split:
        overrides += [f"data.dataset_eval_split={json.dumps(args.dataset_eval_split)}", "data.eval_manifest=null"]
    return overrides + list(args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, cli_overrides(args))
    except (ValueError, TypeError, OSError, ImportError) as err:  # ImportError: a tracker's package missing
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run(config, resume=args.resume)
    print(json.dumps({"steps": result.state.step, "final_loss": result.losses[-1] if result.losses else None,
                      "samples_per_s": round(result.samples_per_s, 3), "output_dir": str(result.output_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
