"""BlspModel: frozen Whisper encoder -> modality adapter -> frozen causal LM.

Speech enters the LLM only at placeholder positions (`speech_mask`), filled in order with
`masked_scatter`. No file, network, session or UI code here: inputs are 16 kHz float arrays and token ids.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Sequence

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from . import readout
from .adapter import Bottleneck, ContextEncoder, Conv1dSubsampler, subsampled_lengths, zero_past
from .audio import split_into_windows
from .config import MODEL_TYPE, BlspConfig, GenerationOptions, check_encoder_split
from .constants import HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE
from .prefix_scorer import KvCachedPrefixScorer
from .prompt import position_ids_from_mask

TRAINABLE_PREFIXES = ("subsampler.", "context.", "adapter.", "speech_ln.", "ctc_head.")
ENCODER_PREFIX = "whisper_model."
SPEECH_LN_EPS = 1e-5


@dataclass
class SpeechBatch:
    """Log-mel features of a batch of <=30 s windows and the number of real frames in each."""

    features: torch.Tensor       # (B, n_mels, F)
    frame_lengths: torch.Tensor  # (B,)


def window_lengths(num_samples: int, window_samples: int = N_SAMPLES) -> list[int]:
    """Lengths of the windows `split_into_windows` makes, without touching any audio."""
    full, rest = divmod(num_samples, window_samples)
    return [window_samples] * full + ([rest] if rest or not full else [])


def mel_frame_count(num_samples: int) -> int:
    return -(-num_samples // HOP_LENGTH)


def encoder_lengths(frame_lengths: torch.Tensor) -> torch.Tensor:
    """Whisper's stride-2 conv: floor((F - 1) / 2) + 1 output frames."""
    return subsampled_lengths(frame_lengths, 1)


def merge_speech(inputs_embeds: torch.Tensor, speech_mask: torch.Tensor,
                 speech_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fill the positions where speech_mask is True, in row-major order, with the speech vectors.

    inputs_embeds (B, T, d), speech_mask (B, T) bool, speech_embeds: one (L_i, d) per speech slot.
    """
    num_slots = int(speech_mask.sum())
    flat = torch.cat(list(speech_embeds)) if speech_embeds else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    if num_slots != flat.shape[0]:
        raise ValueError(
            f"speech placeholder count ({num_slots}) does not match the number of speech vectors "
            f"({flat.shape[0]}): the prompt was rendered for different audio than was encoded"
        )
    if num_slots == 0:
        return inputs_embeds
    return inputs_embeds.masked_scatter(speech_mask.unsqueeze(-1), flat.to(inputs_embeds.dtype))


class BlspModel(nn.Module, ModelHubMixin):
    """Parameter names match the released checkpoint: whisper_model.*, llama_model.*, subsampler.*,
    adapter.*, speech_ln.*.

    A Hugging Face model through huggingface_hub's ModelHubMixin: save_pretrained, from_pretrained and
    push_to_hub, and `AutoModel.from_pretrained` after `import blsp_chat`. Not a transformers PreTrainedModel:
    that one's init pass and tied-weight bookkeeping would run over the pretrained Whisper and LLM it wraps,
    its save_pretrained writes every weight where BLSP saves only the adapter, and its push_to_hub replaces
    the card that save_pretrained wrote."""

    def __init__(
        self,
        config: BlspConfig,
        whisper_encoder: WhisperEncoder | None = None,
        llm: PreTrainedModel | None = None,
        feature_extractor: WhisperFeatureExtractor | None = None,
    ):
        super().__init__()
        self.config = config
        whisper_config = config.whisper()
        self.whisper_model = whisper_encoder if whisper_encoder is not None else WhisperEncoder(whisper_config)
        self.llama_model = llm if llm is not None else AutoModelForCausalLM.from_config(config.llm())
        llm_dim = self.llama_model.get_input_embeddings().embedding_dim
        self.subsampler = Conv1dSubsampler(whisper_config.d_model, llm_dim, config.kernel_sizes)
        self.context = self._context_encoder(config, llm_dim)
        self.adapter = Bottleneck(llm_dim, config.adapter_inner_dim)
        self.speech_ln = nn.LayerNorm(llm_dim, eps=SPEECH_LN_EPS)
        # A character-CTC adapter's head (config.ctc_alphabet): the blank and each character, from the
        # adapter's outputs. None for every other adapter, whose checkpoints hold no such weights.
        self.ctc_head = nn.Linear(llm_dim, len(config.ctc_alphabet) + 1) if config.ctc_alphabet else None
        # The LLM's tokenizer, which the character readout spells the text it heard into word pieces with.
        # Set by whoever pairs the model with its tokenizer (weights.LoadedBlsp).
        self.text_tokenizer = None
        self.match_speech_scale_to_embeddings()
        self.feature_extractor = feature_extractor or WhisperFeatureExtractor(
            feature_size=whisper_config.num_mel_bins, sampling_rate=SAMPLE_RATE
        )
        self.freeze_base_models()
        # What a fine-tuned checkpoint (train.finetune) held beyond the adapter, set by the loader so that
        # save_pretrained writes it again: its encoder's weights, and the directory of the LLM LoRA that
        # loading merged into the LLM (merged weights cannot be split back into a LoRA).
        self.encoder_fine_tuned = False
        self.llm_lora_dir: Path | None = None

    @staticmethod
    def _context_encoder(config: BlspConfig, llm_dim: int) -> ContextEncoder | None:
        """None for the released adapter, so its checkpoints hold exactly the keys they always held."""
        if config.adapter_context_layers == 0:
            return None
        if llm_dim % config.adapter_context_heads:
            raise ValueError(f"adapter_context_heads ({config.adapter_context_heads}) must divide the LLM's "
                             f"embedding width ({llm_dim})")
        return ContextEncoder(llm_dim, config.adapter_context_layers, config.adapter_context_heads,
                              config.adapter_context_ffn_dim)

    # --- parameters ------------------------------------------------------------------------------
    @property
    def trainable_prefixes(self) -> tuple[str, ...]:
        """Names of the weights that train and that an adapter checkpoint holds: the adapter's, and the
        encoder's tuned top layers and final LayerNorm (config.encoder_tuned_layers) where there are any."""
        if not self.config.encoder_tuned_layers:
            return TRAINABLE_PREFIXES
        tuned = [f"{ENCODER_PREFIX}layers.{i}." for i in range(self.frozen_encoder_layers, self.encoder_depth)]
        return TRAINABLE_PREFIXES + tuple(tuned) + (f"{ENCODER_PREFIX}layer_norm.",)

    @property
    def encoder_depth(self) -> int:
        return len(self.whisper_model.layers)

    @property
    def frozen_encoder_layers(self) -> int:
        """How many of the encoder's layers stay frozen: their output is what `encode_windows` gives and
        a training cache holds."""
        return self.encoder_depth - self.config.encoder_tuned_layers

    def tune_top_encoder_layers(self, count: int) -> None:
        """Let the encoder's top `count` layers and final LayerNorm train from their present weights: a warm
        start for an adapter that was trained over the frozen encoder. Until they train, the model hears
        exactly as before. Layers already tuned stay tuned: their trained weights live only in the adapter."""
        if count < self.config.encoder_tuned_layers:
            raise ValueError(f"this model already tunes the encoder's top {self.config.encoder_tuned_layers} "
                             f"layers; it cannot tune fewer ({count}) without losing their trained weights")
        check_encoder_split(count, self.config.encoder_padding, self.encoder_depth)
        self.config.encoder_tuned_layers = count
        self.freeze_base_models()

    def freeze_base_models(self) -> None:
        """Only the adapter (and any tuned encoder layers) trains; Whisper and the LLM are frozen and kept
        in eval mode."""
        for name, param in self.named_parameters():
            param.requires_grad = name.startswith(self.trainable_prefixes)
        self.whisper_model.eval()
        self.llama_model.eval()

    def train(self, mode: bool = True) -> "BlspModel":
        super().train(mode)
        self.whisper_model.eval()  # Whisper's own dropout stays off, in its frozen and its tuned layers
        self.llama_model.eval()
        return self

    @torch.no_grad()
    def match_speech_scale_to_embeddings(self) -> None:
        """Start speech vectors at the scale of the LLM's word vectors.

        A unit LayerNorm emits vectors of norm sqrt(d) (24 for SmolLM2) where its word embeddings have
        norm ~3; the frozen LLM then sees speech as loud outliers, and a small learning rate spends most of
        a short run shrinking the scale. Checkpoints overwrite this; it only shapes a fresh adapter.
        """
        embedding_std = self.llama_model.get_input_embeddings().weight.float().std()
        self.speech_ln.weight.fill_(float(embedding_std))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.trainable_prefixes)}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return self.speech_ln.weight.device

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.whisper_model.conv1.weight.dtype

    # --- speech ----------------------------------------------------------------------------------
    @property
    def speech_length_varies(self) -> bool:
        """True when a clip's LLM positions depend on what was said (the "ctc" readout), so that prompts
        can be laid out only after `encode_speech`; else `speech_token_count` gives them from the length."""
        return self.config.speech_readout != "embeddings"

    def speech_token_count(self, num_samples: int) -> int:
        """How many LLM positions a clip of `num_samples` 16 kHz samples occupies (with the "ctc"
        readout, the most it can occupy: `encode_speech` gives the count itself)."""
        frames = torch.tensor([mel_frame_count(n) for n in window_lengths(num_samples)])
        return int(subsampled_lengths(encoder_lengths(frames), len(self.subsampler.conv_layers)).sum())

    def extract_features(self, windows: Sequence[np.ndarray]) -> SpeechBatch:
        """Windows of <=30 s -> log-mel features, padded to 30 s or to the longest window."""
        frame_lengths = torch.tensor([mel_frame_count(len(w)) for w in windows])
        if self.config.encoder_padding == "30s":
            out = self.feature_extractor(list(windows), sampling_rate=SAMPLE_RATE, padding="max_length",
                                         return_tensors="pt")
            return SpeechBatch(out.input_features, frame_lengths)
        # Zeros past the last frame's STFT window, as the 30 s path has, so that no clip's edge frames
        # depend on how far the batch padded it.
        target = int(frame_lengths.max()) * HOP_LENGTH + N_FFT // 2
        padded = [np.pad(np.asarray(w, dtype=np.float32), (0, target - len(w))) for w in windows]
        out = self.feature_extractor(padded, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt")
        return SpeechBatch(out.input_features[..., : int(frame_lengths.max())], frame_lengths)

    def encode_frames(self, batch: SpeechBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper encoder's frozen layers: (B, n_mels, F) -> (B, T, d_whisper) sliced to the longest real
        length, lengths (B,). With tuned top layers, their input: `adapt` runs them."""
        features = batch.features.to(self.device, self.encoder_dtype)
        frame_lengths = batch.frame_lengths.to(self.device)
        lengths = encoder_lengths(frame_lengths)
        if self.config.encoder_padding == "30s":
            hidden = self.whisper_model(features).last_hidden_state
        else:
            hidden = self._encode_unpadded(features, frame_lengths, lengths)
        return hidden[:, : int(lengths.max())], lengths

    def _encode_unpadded(self, features: torch.Tensor, frame_lengths: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder on the real frames only: its positional table is sliced to the length,
        batch padding is zeroed before each conv (as a lone clip's conv padding is) and masked out of
        attention."""
        enc = self.whisper_model
        x = nn.functional.gelu(enc.conv1(zero_past(features, frame_lengths)))
        x = nn.functional.gelu(enc.conv2(zero_past(x, frame_lengths))).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        x = self._run_encoder_layers(x, lengths, enc.layers[: self.frozen_encoder_layers])
        return x if self.config.encoder_tuned_layers else enc.layer_norm(x)

    def _run_encoder_layers(self, x: torch.Tensor, lengths: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
        """Whisper encoder layers over (B, T, d) frames, the padding past each row's length masked out."""
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        mask = mask[:, None, None, :]
        for layer in layers:
            x = layer(x, mask)
        return x

    def encode_tuned_layers(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The encoder's tuned top layers and final LayerNorm over the frozen layers' frames; no-op without."""
        if not self.config.encoder_tuned_layers:
            return hidden
        enc = self.whisper_model
        x = self._run_encoder_layers(hidden.to(self.encoder_dtype), lengths, enc.layers[self.frozen_encoder_layers:])
        return enc.layer_norm(x)

    def adapt(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d_whisper) frozen encoder frames -> (B, T', d_llm) in the LLM's embedding space, lengths (B,)."""
        hidden = self.encode_tuned_layers(hidden, lengths)
        x, out_lengths = self.subsampler(hidden.to(self.speech_ln.weight.dtype), lengths)
        if self.context is not None:
            x = self.context(x, out_lengths)
        return self.speech_ln(self.adapter(x)), out_lengths

    def encode_windows(self, audios: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """Frozen encoder layers only: per clip, one (T_w, d_whisper) tensor of real frames per <=30 s window.
        (Training caches these, so later epochs skip the encoder.)"""
        windows, owners = [], []
        for index, audio in enumerate(audios):
            for window in split_into_windows(np.asarray(audio, dtype=np.float32)):
                windows.append(window)
                owners.append(index)
        per_clip: list[list[torch.Tensor]] = [[] for _ in audios]
        if not windows:
            return per_clip
        hidden, lengths = self.encode_frames(self.extract_features(windows))
        for row, owner in enumerate(owners):
            per_clip[owner].append(hidden[row, : int(lengths[row])])
        return per_clip

    def adapt_windows(self, per_clip: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Encoder frames per clip and window -> one (L_i, d_llm) tensor per clip, its windows'
        adapter outputs concatenated in order, so a clip longer than 30 s is heard whole."""
        flat = [w for clip in per_clip for w in clip]
        if not flat:
            return [self.speech_ln.weight.new_zeros(0, self.speech_ln.normalized_shape[0]) for _ in per_clip]
        lengths = torch.tensor([w.shape[0] for w in flat], device=self.device)
        hidden = nn.utils.rnn.pad_sequence([w.to(self.device, self.encoder_dtype) for w in flat], batch_first=True)
        embeds, out_lengths = self.adapt(hidden, lengths)
        out, row = [], 0
        for clip in per_clip:
            out.append(torch.cat([embeds[r, : int(out_lengths[r])] for r in range(row, row + len(clip))]))
            row += len(clip)
        return out

    def encode_speech(self, audios: Sequence[np.ndarray],
                      guard: Callable[[], ContextManager] = contextlib.nullcontext) -> list[torch.Tensor]:
        """16 kHz mono clips of any length -> one (L_i, d_llm) tensor per clip, as the LLM reads them.
        guard: a context manager factory entered around each forward pass, the encoder and adapter's
        as one and each of the LM-fused readout's LLM forwards, so a caller sharing the model can hold
        its lock per forward rather than for the whole clips (by default nothing is entered)."""
        with guard():
            adapted = self.adapter_outputs(audios)
        return [self.read_out(e, guard) for e in adapted]

    def adapter_outputs(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono clips -> one (L_i, d_llm) tensor of adapter outputs per clip, before the readout."""
        return self.adapt_windows(self.encode_windows(audios))

    def read_out(self, speech: torch.Tensor,
                 guard: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """One clip's adapter outputs (L, d_llm) -> the vectors the LLM reads (`readout.read_out`; the
        LM-fused readout runs the LLM here, as a KV-cached scorer whose every forward is inside `guard()`)."""
        table = self.llama_model.get_input_embeddings().weight
        new_scorer = functools.partial(KvCachedPrefixScorer, self.llama_model, guard=guard)
        if self.ctc_head is not None:
            return readout.character_readout(self.ctc_head(speech), table, self.config, self._word_pieces, new_scorer)
        return readout.read_out(speech, table, self.config, new_scorer)

    def _word_pieces(self, text: str) -> list[int]:
        """Heard text -> the LLM's word pieces for it, as they follow other words (leading space)."""
        if self.text_tokenizer is None:
            raise RuntimeError("this model's character readout needs the LLM's tokenizer: load it with "
                               "blsp_chat.weights (LoadedBlsp pairs them) or set model.text_tokenizer")
        return self.text_tokenizer(" " + text, add_special_tokens=False).input_ids

    # --- language model ----------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, speech_mask: torch.Tensor | None,
                     speech_embeds: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        embeds = self.llama_model.get_input_embeddings()(input_ids)
        if speech_mask is None:
            speech_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        return merge_speech(embeds, speech_mask.to(self.device), speech_embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        audios: Sequence[np.ndarray] | None = None,
        speech_embeds: Sequence[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs: Any,
    ):
        """input_ids (B, T) with placeholders where speech_mask is True; speech comes as raw `audios`
        (encoded here) or precomputed `speech_embeds`. Returns the LLM's output; `.loss` only with labels."""
        if speech_embeds is None:
            speech_embeds = self.encode_speech(audios or [])
        inputs_embeds = self.embed_inputs(input_ids, speech_mask, speech_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        attention_mask = attention_mask.to(self.device)
        return self.llama_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            labels=None if labels is None else labels.to(self.device),
            **llm_kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        audios: Sequence[np.ndarray] | None = None,
        options: GenerationOptions = GenerationOptions(),
        speech_embeds: Sequence[torch.Tensor] | None = None,
        **hf_kwargs: Any,
    ) -> torch.Tensor:
        """Left-padded prompts -> new token ids (B, N). Speech comes as raw `audios` (encoded here) or
        precomputed `speech_embeds`. `hf_kwargs` go to the LLM's generate (eos_token_id, stop_strings
        with tokenizer, streamer, ...)."""
        if speech_embeds is None:
            speech_embeds = self.encode_speech(audios or [])
        inputs_embeds = self.embed_inputs(input_ids, speech_mask, speech_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        return self.llama_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.to(self.device),
            **options.to_hf_kwargs(),
            **hf_kwargs,
        )

    # --- Hugging Face persistence ------------------------------------------------------------------
    # weights.py owns every file and download and imports this module, so it plugs its functions in here
    # when it is imported (blsp_chat/__init__.py imports it): model.py never imports weights.py.
    persistence: ClassVar[Persistence | None] = None
    config_class = BlspConfig  # what AutoModel.register checks
    # What transformers' AutoModel.from_pretrained adds to its call: no remote code runs here, and a LoRA's
    # files beside the adapter (adapter_kwargs) are applied by weights.py itself.
    AUTO_MODEL_KWARGS: ClassVar[tuple[str, ...]] = ("_from_auto", "trust_remote_code", "adapter_kwargs")

    def _save_pretrained(self, save_directory: Path) -> None:
        """ModelHubMixin's hook behind save_pretrained and push_to_hub: the adapter-only checkpoint
        (`weights.save_checkpoint`), with a model card from the config where the directory has none."""
        self._persistence().save_checkpoint(self, save_directory)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return self._persistence().model_card(self.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, *,
                        revision: str | None = None, config: BlspConfig | None = None, **kwargs: Any) -> "BlspModel":
        """Any source `weights.load_pretrained` accepts (None: the offline default) -> the model.
        revision: the hub branch, tag or commit of a hub id. config: use this config instead of the checkpoint's
        (AutoModel passes the one it read, with any overrides it was given). Other keywords go to
        load_pretrained: device, dtype, speech_search, and the hub's cache_dir, token, force_download,
        local_files_only."""
        for name in cls.AUTO_MODEL_KWARGS:
            kwargs.pop(name, None)
        source = None if pretrained_model_name_or_path is None else str(pretrained_model_name_or_path)
        return cls._persistence().load_model(source, revision=revision, config=config, **kwargs)

    @classmethod
    def _persistence(cls) -> "Persistence":
        if cls.persistence is None:
            raise RuntimeError("BlspModel's save/load functions are in blsp_chat.weights: import it first")
        return cls.persistence


@dataclass(frozen=True)
class Persistence:
    """What BlspModel's save_pretrained / from_pretrained / model card call (set by blsp_chat.weights)."""

    save_checkpoint: Callable[..., None]
    load_model: Callable[..., BlspModel]
    model_card: Callable[[BlspConfig], ModelCard]


# `AutoConfig` / `AutoModel.from_pretrained(dir)` find BLSP checkpoints (config.json "model_type": "blsp") once
# blsp_chat is imported, as transformers' own models are found.
AutoConfig.register(MODEL_TYPE, BlspConfig, exist_ok=True)
AutoModel.register(BlspConfig, BlspModel, exist_ok=True)
