"""The stage-2 training config (`python -m train.train_adapter --config ...`): its sections `model`, `data`,
`loss`, `eval` and `loop` (`train.loop.LoopConfig`) as typed dataclasses, read from JSON or YAML with
`section.key=value` overrides on top. Bad keys, values of the wrong type (`loop.learning_rate=fast`, checked
against each field's annotation by `train.config_types`) and impossible settings fail when the config is read,
naming the key."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from blsp_chat.characters import check_alphabet
from blsp_chat.config import SPEECH_READOUTS, check_encoder_split
from train.config_types import ConfigTypeError, check_field_types, field_annotation, parse_override_value
from train.loop import LoopConfig
from train.speech_data import PAPER_REPETITION_RATIO, FrameMasking


@dataclass
class ModelSection:
    whisper: str = "offline:whisper-tiny.en"        # offline: name, local dir or hub id
    llm: str = "offline:smollm2-135m-instruct"      # the (stage-1 tuned) instruction-following LLM
    init_adapter: str | None = None                 # a BLSP checkpoint dir to start from
    conv_kernel_sizes: str = "5,5,5"
    adapter_inner_dim: int = 512
    # Transformer layers after the subsampler (BlspConfig.adapter_context_*); 0: the paper's adapter.
    adapter_context_layers: int = 0
    adapter_context_heads: int = 8
    adapter_context_ffn_dim: int = 1152
    encoder_padding: str = "30s"
    prompt_template: str = "blsp"
    dtype: str = "float32"                          # weights of the frozen models: float32 | bfloat16 | float16
    seed: int = 0                                   # adapter initialisation
    # How the trained model is served and evaluated (BlspConfig.speech_readout): "ctc" reads the outputs
    # of a CTC-trained adapter through the CTC-compressed readout, its blank being loss.ctc_blank.
    speech_readout: str = "embeddings"
    ctc_readout_temperature: float = 0.1
    # CTC over characters (BlspConfig.ctc_alphabet; e.g. blsp_chat.characters.ENGLISH_ALPHABET), or over a
    # list of symbols of one or more characters (`python -m train.ctc_symbols`), instead of the LLM's word
    # pieces: the adapter gains a character head, and loss.ctc_blank is not used.
    ctc_alphabet: str | list[str] | None = None
    # The Whisper encoder's top layers that train with the adapter (BlspConfig.encoder_tuned_layers; needs
    # encoder_padding "none"), at the loop's learning rate times this scale: pretrained layers move less
    # than a fresh adapter's. The encoder cache then holds the frozen layers' frames.
    encoder_tuned_layers: int = 0
    encoder_learning_rate_scale: float = 0.1

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        check_encoder_split(self.encoder_tuned_layers, self.encoder_padding)
        if not self.encoder_learning_rate_scale > 0:
            raise ValueError("model.encoder_learning_rate_scale must be above 0, "
                             f"got {self.encoder_learning_rate_scale}")


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
    # Keep up to this many GB of the cache's frames in memory once read (0: read each clip from disk every
    # time). A 9-hour mix of Whisper base frames is about 3.3 GB in float32.
    encoder_cache_memory_gb: float = 0.0
    # SpecAugment on the encoder outputs, training only (train.speech_data.FrameMasking): about this
    # fraction of each clip's frames in spans of mask_time_span frames, and this fraction of channels, zeroed.
    mask_time_fraction: float = 0.0
    mask_time_span: int = 10
    mask_channel_fraction: float = 0.0
    # A Hugging Face dataset instead of train_manifest (train.hf_datasets): saved with save_to_disk
    # (`dataset_dir`) or found by datasets.load_dataset (`dataset_name`, `dataset_config`). Its rows become
    # manifest lines under dataset_audio_dir (default OUTPUT_DIR/dataset): audio_column's clips as 16 kHz
    # wavs, text_column, and instruction/response columns when named, else repeat lines (response = text).
    dataset_name: str | None = None
    dataset_dir: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_eval_split: str | None = None   # else eval_manifest, else eval_fraction of the training rows
    audio_column: str = "audio"
    text_column: str = "text"
    instruction_column: str | None = None
    response_column: str | None = None
    dataset_audio_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        sources = [n for n in ("train_manifest", "dataset_name", "dataset_dir") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"data: {' and '.join(sources)} are both set; the training data comes from one of them")
        if self.dataset_eval_split and self.eval_manifest:
            raise ValueError("data: dataset_eval_split and eval_manifest are both set; the held-out data comes "
                             "from one of them")
        if self.dataset_eval_split and not self.uses_dataset:
            raise ValueError("data.dataset_eval_split needs data.dataset_name or data.dataset_dir")
        self.frame_masking()  # refuse impossible mask settings when the config is read, not at step 1
        if self.encoder_cache_memory_gb < 0:
            raise ValueError(f"data.encoder_cache_memory_gb must be 0 or more, got {self.encoder_cache_memory_gb}")

    @property
    def uses_dataset(self) -> bool:
        return bool(self.dataset_name or self.dataset_dir)

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
        check_field_types(self, "loss")
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

    def __post_init__(self) -> None:
        check_field_types(self, "eval")


@dataclass
class AdapterTrainConfig:
    loop: LoopConfig
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        for name, section in SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ConfigTypeError(f"config section {name!r} must be a {section.__name__}")
        if self.model.speech_readout not in SPEECH_READOUTS:  # at config load, not after the model is built
            raise ValueError(f"model.speech_readout must be one of {SPEECH_READOUTS}, "
                             f"got {self.model.speech_readout!r}")
        if self.model.speech_readout == "ctc" and not self.loss.ctc_weight:
            raise ValueError("model.speech_readout 'ctc' reads each output as the word CTC taught it: set "
                             "loss.ctc_weight. loss.ce_weight and loss.kd_weight may join it (they read speech "
                             "through the same readout); alone they collapse its segmentation (train/finetune.py)")
        if self.model.ctc_alphabet is not None:
            self._check_character_ctc()

    def _check_character_ctc(self) -> None:
        check_alphabet(self.model.ctc_alphabet)
        if self.model.speech_readout != "ctc":
            raise ValueError("model.ctc_alphabet trains a character head, which only model.speech_readout 'ctc' reads")
        if self.loss.commit_weight:
            raise ValueError("loss.commit_weight pulls outputs onto word embeddings; a character head has none "
                             "to pull towards (set it to 0)")
        if self.loss.needs_llm:
            raise ValueError("loss.ce_weight and loss.kd_weight cannot train a character head: the text it "
                             "spells passes no gradient back to the adapter (set them to 0)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterTrainConfig":
        if not isinstance(data, dict):
            raise ConfigTypeError(f"a training config is an object of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS) - {"description"})
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: {', '.join(SECTIONS)}")
        kwargs: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigTypeError(f"config section {name!r} must be an object of keys, got {values!r}")
            if section is LoopConfig:
                kwargs[name] = LoopConfig.from_dict(values)
                continue
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
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    for override in overrides:
        apply_override(data, override)
    return AdapterTrainConfig.from_dict(data)


SECTIONS: dict[str, type] = {"loop": LoopConfig, "model": ModelSection, "data": DataSection, "loss": LossSection,
                             "eval": EvalSection}


def apply_override(data: dict[str, Any], override: str, sections: dict[str, type] = SECTIONS) -> None:
    """`section.key=value`; the value is parsed as JSON (numbers, true, null, lists) unless the field takes a
    string and JSON does not fit it (`model.conv_kernel_sizes=5` stays "5"); the config's types are checked
    when it is built."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ValueError(f"override {override!r} is not section.key=value")
    dotted, raw = override.split("=", 1)
    section, key = dotted.split(".", 1)
    annotation = field_annotation(sections[section], key) if section in sections else Any
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigTypeError(f"override {override!r}: config section {section!r} is not an object")
    target[key] = parse_override_value(raw, annotation)
