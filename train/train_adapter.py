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
  on the accelerate command line. The global batch is per_device_batch_size x processes x
  gradient_accumulation_steps: adapter_7b_paper.json reaches the paper's 768 as 8 x 8 GPUs x 12; on
  another GPU count change `loop.gradient_accumulation_steps` to keep 768.

Config (JSON or YAML) sections: `model` (base models, adapter shape, dtype), `data` (manifests,
repetition mixing, encoder cache), `loss` (cross-entropy and distillation weights), `eval` (held-out
split, greedy repeat WER) and `loop` (`train.loop.LoopConfig`). Overrides `section.key=value` (value as
JSON, else a string) are applied on top and recorded.

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
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from blsp_chat.adapter import collapse_ctc
from blsp_chat.audio import load_audio
from blsp_chat.config import SPEECH_READOUTS, BlspConfig, GenerationOptions
from blsp_chat.constants import IGNORE_INDEX, REPEAT_INSTRUCTION
from blsp_chat.generate import generate_reply
from blsp_chat.model import TRAINABLE_PREFIXES, BlspModel
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
from train.io import read_jsonl
from train.loop import LoopConfig, TrainResult, train
from train.metrics import EnglishNormalizer, corpus_wer, load_spelling_mapping
from train.speech_data import (
    PAPER_REPETITION_RATIO,
    BucketBatchSampler,
    EncoderCache,
    FrameMasking,
    SpeechCollator,
    SpeechDataset,
    SpeechExample,
    read_manifest,
    speech_embeddings,
    summarize,
    with_repetition,
)

WRAPPER_PREFIX = "blsp."  # parameter names inside AdapterObjective
CARD_NAME = "README.md"
DATA_SUMMARY_NAME = "data_summary.json"


# --- configuration -----------------------------------------------------------------------------------
@dataclass
class ModelSection:
    whisper: str = "offline:whisper-tiny.en"        # offline: name, local dir or hub id
    llm: str = "offline:smollm2-135m-instruct"      # the (stage-1 tuned) instruction-following LLM
    init_adapter: str | None = None                 # a BLSP checkpoint dir to start from
    conv_kernel_sizes: str = "5,5,5"
    adapter_inner_dim: int = 512
    encoder_padding: str = "30s"
    prompt_template: str = "blsp"
    dtype: str = "float32"                          # weights of the frozen models: float32 | bfloat16 | float16
    seed: int = 0                                   # adapter initialisation
    # How the trained model is served and evaluated (BlspConfig.speech_readout): "ctc" reads the outputs
    # of a CTC-trained adapter through the CTC-compressed readout, its blank being loss.ctc_blank.
    speech_readout: str = "embeddings"
    ctc_readout_temperature: float = 0.1


@dataclass
class DataSection:
    train_manifest: str = ""
    eval_manifest: str | None = None        # else `eval_fraction` of the train clips is held out
    eval_fraction: float = 0.02
    max_eval_examples: int = 200
    repetition_ratio: float = PAPER_REPETITION_RATIO  # repeat lines per other line; 0 disables
    max_train_examples: int | None = None
    max_seconds: float | None = 30.0
    mega_batch_factor: int = 50
    encoder_cache_dir: str | None = None    # cache frozen Whisper outputs here
    # SpecAugment on the encoder outputs, training only (train.speech_data.FrameMasking): about this
    # fraction of each clip's frames in spans of mask_time_span frames, and this fraction of channels, zeroed.
    mask_time_fraction: float = 0.0
    mask_time_span: int = 10
    mask_channel_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.frame_masking()  # refuse impossible mask settings when the config is read, not at step 1

    def frame_masking(self) -> FrameMasking:
        return FrameMasking(self.mask_time_fraction, self.mask_time_span, self.mask_channel_fraction)


@dataclass
class LossSection:
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    # CTC pre-alignment: each adapter output is classified by its distance to every LLM word embedding,
    # and CTC aligns those classes with the transcript's tokens. No LLM pass, so it costs a fraction of
    # a step of the other losses: a cheap first stage that puts speech vectors near the words they carry.
    ctc_weight: float = 0.0
    ctc_blank: str = " "        # text of the one token that stands for "no new word" (a space: harmless to the LLM)
    # CTC alone only needs each vector closer to its word's embedding than to any other, and it gets
    # there by growing vectors 3x longer than any embedding, which the LLM has never read. This pulls
    # every vector onto its nearest embedding (VQ-VAE's commitment loss, the codebook frozen).
    commit_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.commit_weight and not self.ctc_weight:
            raise ValueError("loss.commit_weight needs loss.ctc_weight: it pulls vectors onto the words CTC chose")
        if not (self.ce_weight or self.kd_weight or self.ctc_weight):
            raise ValueError("every loss weight is 0: set loss.ce_weight, loss.kd_weight or loss.ctc_weight")

    @property
    def needs_llm(self) -> bool:
        return bool(self.ce_weight or self.kd_weight)


@dataclass
class EvalSection:
    repeat_wer_examples: int = 0    # greedy repeat-instruction WER on this many held-out clips at each eval
    max_new_tokens: int = 64


@dataclass
class AdapterTrainConfig:
    loop: LoopConfig
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.model.speech_readout not in SPEECH_READOUTS:  # at config load, not after the model is built
            raise ValueError(f"model.speech_readout must be one of {SPEECH_READOUTS}, "
                             f"got {self.model.speech_readout!r}")
        if self.model.speech_readout == "ctc" and (self.loss.needs_llm or not self.loss.ctc_weight):
            raise ValueError("model.speech_readout 'ctc' serves outputs trained by the CTC loss alone: set "
                             "loss.ctc_weight and leave loss.ce_weight and loss.kd_weight at 0 (those losses "
                             "lay speech out one position per output, which the readout does not)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterTrainConfig":
        sections = {"model": ModelSection, "data": DataSection, "loss": LossSection, "eval": EvalSection}
        unknown = sorted(set(data) - set(sections) - {"loop", "description"})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: loop, {', '.join(sections)}")
        kwargs: dict[str, Any] = {"loop": LoopConfig.from_dict(data.get("loop", {}))}
        for name, section in sections.items():
            values = data.get(name, {})
            bad = sorted(set(values) - {f.name for f in dataclasses.fields(section)})
            if bad:
                raise ValueError(f"unknown keys in config section {name!r}: {bad}")
            kwargs[name] = section(**values)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"loop": self.loop.to_dict(),
                **{n: dataclasses.asdict(getattr(self, n)) for n in ("model", "data", "loss", "eval")}}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> AdapterTrainConfig:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    for override in overrides:
        apply_override(data, override)
    return AdapterTrainConfig.from_dict(data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """`section.key=value`; value parsed as JSON (numbers, true, null, lists), else kept as a string."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ValueError(f"override {override!r} is not section.key=value")
    dotted, raw = override.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    data.setdefault(section, {})[key] = value


# --- model -------------------------------------------------------------------------------------------
def build_model(section: ModelSection):
    """Frozen base models + a fresh (or `init_adapter`) adapter -> LoadedBlsp."""
    dtype = DTYPES[section.dtype]
    if section.init_adapter:
        return load_blsp_dir(Path(section.init_adapter), dtype)
    encoder, extractor = load_whisper_encoder(section.whisper, dtype)
    llm, tokenizer = load_llm(section.llm, dtype)
    config = BlspConfig.from_base_configs(
        encoder.config, llm.config, conv_kernel_sizes=section.conv_kernel_sizes,
        adapter_inner_dim=section.adapter_inner_dim, encoder_padding=section.encoder_padding,
        prompt_template=section.prompt_template, whisper_name_or_path=section.whisper, llm_name_or_path=section.llm)
    torch.manual_seed(section.seed)
    model = BlspModel(config, whisper_encoder=encoder, llm=llm, feature_extractor=extractor).to(dtype)
    return LoadedBlsp(model, tokenizer, "training", adapter_trained=False)


def is_adapter_parameter(name: str) -> bool:
    return name.startswith(WRAPPER_PREFIX) and name[len(WRAPPER_PREFIX):].startswith(TRAINABLE_PREFIXES)


# --- losses ------------------------------------------------------------------------------------------
def response_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits that predict each response/EOS token, in order: (N, V), targets (N,)."""
    predicting = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return predicting[keep], targets[keep]


def response_span(labels: torch.Tensor) -> int:
    """How many trailing positions hold every response token and the position that predicts the first:
    the LLM's head (a 576 x 49152 product per position for SmolLM2) need not run on the prompt."""
    learned = (labels != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(learned[0]) + 1 if len(learned) else 1


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    chosen, targets = response_logits(logits, labels)
    return nn.functional.cross_entropy(chosen.float(), targets)


def distillation_kl(student_logits: torch.Tensor, student_labels: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at the response positions, mean per token,
    scaled by T^2. Both views must carry the same response tokens (checked)."""
    student, s_targets = response_logits(student_logits, student_labels)
    teacher, t_targets = response_logits(teacher_logits, teacher_labels)
    if not torch.equal(s_targets.cpu(), t_targets.cpu()):
        raise ValueError("speech and transcript views carry different responses; cannot distil")
    log_p_student = nn.functional.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = nn.functional.log_softmax(teacher.float() / temperature, dim=-1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def embedding_ctc(speech_embeds: Sequence[torch.Tensor], targets: Sequence[Sequence[int]], embeddings: torch.Tensor,
                  blank_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC between each clip's adapter outputs (L_i, d) and its transcript's token ids, the classes being the
    LLM's vocabulary with `blank_id` as the blank. Mean over clips of the loss per target token; clips with
    more tokens than speech positions contribute zero (zero_infinity) instead of inf.
    Also returns the commitment: the mean squared distance of each real vector to its nearest embedding."""
    lengths = torch.tensor([e.shape[0] for e in speech_embeds])
    padded = nn.utils.rnn.pad_sequence(list(speech_embeds), batch_first=True)
    logits = embedding_distance_logits(padded, embeddings)
    log_probs = nn.functional.log_softmax(logits, dim=-1)
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long)
    target_lengths = torch.tensor([len(row) for row in targets])
    ctc = nn.functional.ctc_loss(log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=blank_id,
                                 reduction="mean", zero_infinity=True)
    real = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    nearest = (padded.float() ** 2).sum(-1) - logits.max(-1).values   # ||x - e||^2 of the closest e
    return ctc, nearest[real.to(nearest.device)].mean()


class AdapterObjective(nn.Module):
    """forward(batch) -> (loss, metrics). Holds the BlspModel as `blsp`, so accelerate can wrap the whole
    objective (DDP hooks then see every adapter gradient) and the encoder cache stays outside model.py."""

    def __init__(self, blsp: BlspModel, loss: LossSection, cache: EncoderCache | None = None,
                 ctc_blank_id: int | None = None, masking: FrameMasking = FrameMasking()):
        super().__init__()
        self.blsp, self.loss, self.cache, self.ctc_blank_id = blsp, loss, cache, ctc_blank_id
        self.masking = masking
        if loss.ctc_weight and ctc_blank_id is None:
            raise ValueError("loss.ctc_weight is set but no CTC blank token id was given")

    def train(self, mode: bool = True) -> "AdapterObjective":
        super().train(mode)
        self.blsp.train(mode)  # keeps Whisper and the LLM in eval mode
        return self

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        augment = self.masking if self.training and self.masking.active else None
        embeds = speech_embeddings(self.blsp, batch, self.cache, augment)
        loss, metrics = self._llm_losses(batch, embeds) if self.loss.needs_llm else (0.0, {})
        if self.loss.ctc_weight:
            table = self.blsp.llama_model.get_input_embeddings().weight
            ctc, commit = embedding_ctc(embeds, batch["transcript_ids"], table, self.ctc_blank_id)
            loss = loss + self.loss.ctc_weight * ctc + self.loss.commit_weight * commit
            metrics.update(ctc=float(ctc.detach()), commit=float(commit.detach()))
        return loss, metrics

    def _llm_losses(self, batch: dict[str, Any], embeds: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        keep = response_span(batch["labels"])
        out = self.blsp(batch["input_ids"], batch["attention_mask"], batch["speech_mask"], speech_embeds=embeds,
                        logits_to_keep=keep)
        labels = batch["labels"][:, -keep:]
        ce = cross_entropy(out.logits, labels)
        loss = self.loss.ce_weight * ce
        metrics = {"ce": float(ce.detach()), "response_tokens": float((labels != IGNORE_INDEX).sum())}
        if self.loss.kd_weight:
            teacher = batch["teacher"]
            teacher_keep = response_span(teacher["labels"])
            with torch.no_grad():
                teacher_logits = self.blsp(teacher["input_ids"], teacher["attention_mask"],
                                           logits_to_keep=teacher_keep).logits
            kd = distillation_kl(out.logits, labels, teacher_logits, teacher["labels"][:, -teacher_keep:],
                                 self.loss.kd_temperature)
            loss = loss + self.loss.kd_weight * kd
            metrics["kd"] = float(kd.detach())
        return loss, metrics


def objective_loss(model: nn.Module, batch: dict[str, Any]):
    return model(batch)


def ctc_blank_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"loss.ctc_blank {text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


# --- data --------------------------------------------------------------------------------------------
def held_out(example: SpeechExample, fraction: float) -> bool:
    """A stable split by clip, so a clip's repeat line never sits on the other side of its continuation."""
    digest = hashlib.sha1(example.audio.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def load_splits(data: DataSection, seed: int) -> tuple[list[SpeechExample], list[SpeechExample]]:
    if not data.train_manifest:
        raise ValueError("data.train_manifest is not set: point it at the speech manifest (JSON lines)")
    examples = read_manifest(data.train_manifest, limit=data.max_train_examples)
    if data.eval_manifest:
        train_examples, eval_examples = examples, read_manifest(data.eval_manifest)
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
    as train.evaluate scores ASR (corpus WER after Whisper's English normaliser)."""
    normalizer = wer_normalizer(loaded.model)
    clips = [e for e in examples if e.text][: section.repeat_wer_examples]
    options = GenerationOptions(max_new_tokens=section.max_new_tokens)

    def evaluate(model, accelerator) -> dict[str, float]:
        if not clips:
            return {}
        hypotheses, references = [], []
        for example in clips:
            audio = load_audio(example.audio, max_seconds=None)
            turn = Turn("human", instruction=REPEAT_INSTRUCTION,
                        speech_tokens=model.blsp.speech_token_count(len(audio)))
            view = dataclasses.replace(loaded, model=model.blsp)
            hypotheses.append(generate_reply(view, [turn], [audio], options))
            references.append(example.text)
        wer = corpus_wer(references, hypotheses, normalizer).wer
        return {"repeat_wer": float(wer), "repeat_wer_examples": len(clips)}

    return evaluate


def readout_wer_fn(tokenizer, examples: Sequence[SpeechExample], section: EvalSection, blank_id: int):
    """eval_fn for CTC runs: read each held-out clip's adapter outputs as their nearest word embeddings
    (greedy CTC) and score that text against the transcript: what the LLM is given, before it says anything."""
    normalizer = EnglishNormalizer()
    clips = [e for e in examples if e.text][: section.repeat_wer_examples]

    def evaluate(model, accelerator) -> dict[str, float]:
        if not clips:
            return {}
        table = model.blsp.llama_model.get_input_embeddings().weight
        hypotheses = []
        with torch.no_grad():
            for example in clips:
                encoded = model.blsp.encode_windows([load_audio(example.audio, max_seconds=None)])
                speech = model.blsp.adapt_windows(encoded)[0]  # the raw outputs, before any readout
                ids = embedding_distance_logits(speech, table).argmax(-1).tolist()
                hypotheses.append(tokenizer.decode(collapse_ctc(ids, blank_id)))
        return {"readout_wer": float(corpus_wer([e.text for e in clips], hypotheses, normalizer).wer)}

    return evaluate


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
def run(config: AdapterTrainConfig, *, resume: bool = False, loaded=None, callbacks=()) -> TrainResult:
    """Train; `loaded` (a LoadedBlsp) skips building the model from `config.model` (tests)."""
    started = time.time()
    loaded = loaded or build_model(config.model)
    blsp, tokenizer = loaded.model, loaded.tokenizer
    template = template_for(blsp.config.prompt_template, tokenizer)
    train_examples, eval_examples = load_splits(config.data, config.loop.seed)
    cache = EncoderCache.for_model(config.data.encoder_cache_dir, blsp) if config.data.encoder_cache_dir else None
    kd = config.loss.kd_weight > 0

    blank_id = ctc_blank_id(tokenizer, config.loss.ctc_blank) if config.loss.ctc_weight else None
    blsp.config = dataclasses.replace(blsp.config, speech_readout=config.model.speech_readout, ctc_blank_id=blank_id,
                                      ctc_readout_temperature=config.model.ctc_readout_temperature)

    def dataset(examples):
        return SpeechDataset(examples, tokenizer, blsp.speech_token_count, template=template, cache=cache,
                             with_teacher=kd, max_seconds=config.data.max_seconds, ctc_blank_id=blank_id)

    train_set, eval_set = dataset(train_examples), dataset(eval_examples)
    data_summary = {"train": summarize(train_examples), "eval": summarize(eval_examples),
                    "train_manifest": config.data.train_manifest, "eval_manifest": config.data.eval_manifest}
    batch_size, seed, factor = config.loop.per_device_batch_size, config.loop.seed, config.data.mega_batch_factor
    objective = AdapterObjective(blsp, config.loss, cache, ctc_blank_id=blank_id, masking=config.data.frame_masking())
    eval_fn = None
    if config.eval.repeat_wer_examples:
        readout_fn = readout_wer_fn(tokenizer, eval_examples, config.eval, blank_id) if blank_id is not None else None
        eval_fn = combined(repeat_wer_fn(loaded, eval_examples, config.eval), readout_fn)
    result = train(
        objective, objective_loss, train_set, SpeechCollator(pad_token_id(tokenizer)), config.loop,
        expected_trainable=is_adapter_parameter,
        batch_sampler_fn=lambda replicas, rank: BucketBatchSampler(
            train_set.durations, batch_size, seed=seed, mega_batch_factor=factor, num_replicas=replicas, rank=rank),
        eval_dataset=eval_set if len(eval_set) else None, eval_fn=eval_fn, resume=resume,
        run_info={"adapter_config": config.to_dict(), "data": data_summary}, callbacks=callbacks,
    )
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        out = Path(config.loop.output_dir)
        save_adapter(result.model.blsp, out)
        (out / DATA_SUMMARY_NAME).write_text(json.dumps(data_summary, indent=2) + "\n")
        write_model_card(out, config, data_summary, result, time.time() - started, cache)
    return result


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
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.train_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON or YAML training config (see train/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in loop.output_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. loop.max_steps=20")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run(config, resume=args.resume)
    print(json.dumps({"steps": result.state.step, "final_loss": result.losses[-1] if result.losses else None,
                      "samples_per_s": round(result.samples_per_s, 3), "output_dir": str(result.output_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
