"""Typed configuration of a BLSP model and of generation.

`BlspConfig` is a transformers config (`model_type: "blsp"`; model.py registers it with `AutoConfig`) that
keeps the key names of the released checkpoint (`whisper_config`, `llama_config`, `conv_kernel_sizes`,
`adapter_inner_dim`) so that its config.json loads unchanged; `llama_config` holds the config of any causal
LM (its `model_type` says which), the name is kept for compatibility.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig, WhisperConfig

from .characters import check_alphabet

EncoderPadding = Literal["30s", "none"]
ENCODER_PADDINGS: tuple[str, ...] = ("30s", "none")
PROMPT_TEMPLATES: tuple[str, ...] = ("blsp", "chat")
SPEECH_READOUTS: tuple[str, ...] = ("embeddings", "ctc")
CONFIG_NAME = "config.json"
MODEL_TYPE = "blsp"
ARCHITECTURE = "BlspModel"


class BlspConfig(PretrainedConfig):
    """A dataclass, as every transformers (v5) config is: fields below, `dataclasses.replace` to change one.
    Keys a config.json holds beyond these become attributes and are saved again, as transformers does."""

    model_type = MODEL_TYPE
    whisper_config: dict[str, Any]
    llama_config: dict[str, Any]
    conv_kernel_sizes: str = "5,5,5"
    adapter_inner_dim: int = 512
    # Transformer layers between the subsampler and the bottleneck (adapter.ContextEncoder), so each output
    # sees the whole window. 0 is the released BLSP adapter (no such layers, no such weights).
    adapter_context_layers: int = 0
    adapter_context_heads: int = 8
    adapter_context_ffn_dim: int = 1152
    # The top layers of the Whisper encoder (and its final LayerNorm) that train with the adapter and are saved
    # in its checkpoint; the layers below stay frozen. 0 is the released BLSP: the whole encoder frozen.
    # Needs encoder_padding "none": the tuned layers run on the real frames of each window, masked.
    encoder_tuned_layers: int = 0
    # "30s" pads every window to 30 s as the release does; "none" encodes only the real frames.
    # Training and decoding must agree, so inference follows what the adapter was trained with.
    encoder_padding: EncoderPadding = "30s"
    prompt_template: str = "blsp"
    # How adapter outputs reach the LLM. "embeddings": each output fills one LLM position (the paper).
    # "ctc": for adapters trained with the CTC loss, the CTC-compressed readout (readout.ctc_readout):
    # one position per word piece heard, so a clip's position count depends on what was said.
    speech_readout: str = "embeddings"
    ctc_blank_id: int | None = None       # the LLM token CTC used as its blank ("ctc" readout only)
    # Set: the adapter has a head that spells in this alphabet (characters.py; blank = class 0): a string of
    # characters, or a list of symbols of one or more characters. The "ctc" readout tokenizes the text it
    # heard for the LLM (the search settings below then apply to its symbols, the LLM scoring each word as
    # it ends). None: CTC over the LLM's word pieces.
    ctc_alphabet: str | list[str] | None = None
    ctc_readout_temperature: float = 0.1  # softness of the readout's posteriors; near 0: the nearest word
    # Above 0, the "ctc" readout decodes by prefix beam search with the frozen LLM fused in as a language
    # model at this weight (ctc_decode.py), and hands the LLM the embeddings of the word pieces it found.
    ctc_lm_weight: float = 0.0
    ctc_token_bonus: float = 0.0          # added per word piece in that search (offsets the LM's short bias)
    ctc_beam_size: int = 4
    # Labels of an output less likely than this (log-probability) are not tried in that search (pyctcdecode's
    # token_min_logp): the LLM then reads fewer sound-alike beams. None tries each output's 8 best labels
    # (a character head's: its 4 best above 1%, ctc_decode.CHARACTER_MIN_LOG_PROB).
    ctc_label_min_log_prob: float | None = None
    # Beams more than this (a log-probability, e.g. -3) below the best after an output are dropped in that
    # search (pyctcdecode's beam_prune_logp): each beam kept costs the LLM a read. None keeps ctc_beam_size.
    ctc_beam_prune_log_prob: float | None = None
    # Where the frozen base models come from when a checkpoint holds only the adapter: an `offline:` name, a
    # hub id, a local directory, or a path starting "./" that is read inside the checkpoint's own directory
    # (a base model, or a peft LoRA naming its base, shipped beside the adapter).
    whisper_name_or_path: str | None = None
    llm_name_or_path: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # a class attribute; the released config.json holds an empty one
        super().__post_init__(**kwargs)
        if not self.architectures:
            self.architectures = [ARCHITECTURE]
        self.check()

    def check(self) -> None:
        """Refuse values no model can be built or decoded with (run at creation; call it after editing fields)."""
        if self.encoder_padding not in ENCODER_PADDINGS:
            raise ValueError(f"encoder_padding must be one of {ENCODER_PADDINGS}, got {self.encoder_padding!r}")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_template must be one of {PROMPT_TEMPLATES}, got {self.prompt_template!r}")
        if self.speech_readout not in SPEECH_READOUTS:
            raise ValueError(f"speech_readout must be one of {SPEECH_READOUTS}, got {self.speech_readout!r}")
        if self.speech_readout == "ctc" and self.ctc_blank_id is None and self.ctc_alphabet is None:
            raise ValueError("speech_readout 'ctc' needs ctc_blank_id: the token id the CTC loss used as its blank")
        if self.ctc_alphabet is not None:
            self._check_character_readout()
        if not self.ctc_readout_temperature > 0:
            raise ValueError(f"ctc_readout_temperature must be positive, got {self.ctc_readout_temperature}")
        if self.ctc_lm_weight < 0 or self.ctc_beam_size < 1:
            raise ValueError(f"ctc_lm_weight must be >= 0 and ctc_beam_size >= 1, got {self.ctc_lm_weight} "
                             f"and {self.ctc_beam_size}")
        for name in ("ctc_label_min_log_prob", "ctc_beam_prune_log_prob"):
            value = getattr(self, name)
            if value is not None and not value <= 0:
                raise ValueError(f"{name} is a log-probability (<= 0) or None, got {value}")
        if self.adapter_context_layers < 0 or self.adapter_context_heads < 1 or self.adapter_context_ffn_dim < 1:
            raise ValueError("adapter_context_layers must be >= 0, adapter_context_heads and adapter_context_ffn_dim "
                             f">= 1; got {self.adapter_context_layers}, {self.adapter_context_heads}, "
                             f"{self.adapter_context_ffn_dim}")
        if not self.kernel_sizes:
            raise ValueError("conv_kernel_sizes must name at least one kernel size, e.g. '5,5,5'")
        self._check_tuned_encoder_layers()

    def _check_tuned_encoder_layers(self) -> None:
        check_encoder_split(self.encoder_tuned_layers, self.encoder_padding, self.whisper_config.get("encoder_layers"))

    def _check_character_readout(self) -> None:
        check_alphabet(self.ctc_alphabet)
        if self.speech_readout != "ctc":
            raise ValueError("ctc_alphabet gives the adapter a character head, which only speech_readout 'ctc' "
                             f"reads; got speech_readout {self.speech_readout!r}")

    @property
    def kernel_sizes(self) -> list[int]:
        return [int(k) for k in str(self.conv_kernel_sizes).split(",") if k.strip()]

    def whisper(self) -> WhisperConfig:
        return WhisperConfig(**self.whisper_config)

    def llm(self) -> PretrainedConfig:
        return llm_config_from_dict(self.llama_config)

    @classmethod
    def from_base_configs(cls, whisper: WhisperConfig, llm: PretrainedConfig, **kwargs: Any) -> "BlspConfig":
        return cls(whisper_config=whisper.to_dict(), llama_config=llm.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "BlspConfig":
        """transformers' reader (AutoConfig and from_pretrained come through here), refusing a dict that is
        not a BLSP config by name rather than with a missing-field TypeError."""
        if "whisper_config" not in config_dict or "llama_config" not in config_dict:
            raise ValueError("not a BLSP config: it needs both 'whisper_config' and 'llama_config'")
        return super().from_dict(dict(config_dict), **kwargs)

    def save(self, directory: str | Path) -> None:
        """config.json as transformers writes it (keys that differ from transformers' defaults, sorted)."""
        self.to_json_file(Path(directory) / CONFIG_NAME, use_diff=True)

    @classmethod
    def load(cls, directory: str | Path) -> "BlspConfig":
        return cls.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))


def check_encoder_split(tuned_layers: int, encoder_padding: str, depth: int | None = None) -> None:
    """Refuse an encoder split no model can run (BlspConfig's and the training config's one rule)."""
    if tuned_layers < 0 or (depth is not None and tuned_layers > depth):
        bound = f"between 0 and the encoder's {depth} layers" if depth is not None else "0 or more"
        raise ValueError(f"encoder_tuned_layers must be {bound}, got {tuned_layers}")
    if tuned_layers and encoder_padding != "none":
        raise ValueError("encoder_tuned_layers needs encoder_padding 'none': the tuned layers run on each "
                         "window's real frames, which a 30 s padded encoder pass does not keep apart")


def llm_config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """Any causal LM's config; the released checkpoint's `llama_config` may lack `model_type`."""
    data = dict(data)
    model_type = data.pop("model_type", None) or "llama"
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"unsupported LLM architecture {model_type!r}: {err}") from err


@dataclass(frozen=True)
class GenerationOptions:
    """How a reply is decoded. Change with `dataclasses.replace`."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0  # the paper decodes greedily with none; raise it if a small LLM loops
    # openai/whisper's answer to loops: a reply whose text compresses too well (zlib ratio above the
    # threshold) is decoded again by sampling at each of these temperatures in turn. Empty: no second try.
    # Applies to whole-reply generation (generate.generate_replies), not to streamed chat replies.
    fallback_temperatures: tuple[float, ...] = ()
    compression_ratio_threshold: float = 2.4
    # A reply ends when its last tokens are one phrase said three times or more in a row, the copies spanning
    # at least this many tokens (`generate.loops_at_end`): a greedy small LLM that starts to loop never stops
    # by itself, and a user would otherwise read it to max_new_tokens. Streamed and whole replies alike. 0: off.
    loop_stop_tokens: int = 24

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if any(not t > 0 for t in self.fallback_temperatures):
            raise ValueError(f"fallback temperatures must be positive, got {self.fallback_temperatures}")
        if self.loop_stop_tokens < 0:
            raise ValueError(f"loop_stop_tokens must be 0 (off) or more, got {self.loop_stop_tokens}")
        if not self.compression_ratio_threshold > 1:
            raise ValueError(f"compression_ratio_threshold must be above 1, got {self.compression_ratio_threshold}")

    def sampled_at(self, temperature: float) -> "GenerationOptions":
        """These options, sampling at `temperature` from the whole distribution (a fallback decode)."""
        return dataclasses.replace(self, do_sample=True, temperature=temperature, top_p=1.0, fallback_temperatures=())

    def to_hf_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs
