"""Tiny random Whisper/LLM pairs built in memory: fast, no downloads."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from blsp_chat.config import BlspConfig
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.model import BlspModel

VOCAB = 320
TRAINING_TEXT = [
    "###[Human]:Please repeat the following words.\n\n\n###[Assistant]:hello there",
    "the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with Llama-like specials: <unk>=0, <s>=1 (added as BOS), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(TRAINING_TEXT, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def tiny_whisper_config(**overrides) -> WhisperConfig:
    kwargs = dict(
        d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80,
        vocab_size=64, max_source_positions=1500, max_target_positions=32,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1,
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def tiny_llm(kind: str = "llama"):
    common = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def tiny_blsp(encoder_padding: str = "30s", llm_kind: str = "llama", seed: int = 0, **config_kwargs) -> BlspModel:
    torch.manual_seed(seed)
    whisper_config = tiny_whisper_config()
    llm = tiny_llm(llm_kind)
    config = BlspConfig.from_base_configs(
        whisper_config, llm.config, adapter_inner_dim=8, encoder_padding=encoder_padding,
        whisper_name_or_path="whisper-dir", llm_name_or_path="llm-dir", **config_kwargs,
    )
    return BlspModel(config, whisper_encoder=WhisperEncoder(whisper_config), llm=llm).eval()


def tone(seconds: float, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def lively_blsp(seed: int = 0, std: float = 0.3):
    """tiny_blsp with larger LLM weights: its greedy replies depend on the context (the default init
    repeats one token whatever it reads), so a wrong cache or position shows."""
    return _with_larger_llm_weights(tiny_blsp(seed=seed), seed + 1, std)


def _with_larger_llm_weights(model: BlspModel, seed: int, std: float) -> BlspModel:
    """`model` with its LLM's matrices redrawn at standard deviation `std` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.llama_model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def lively_lm_blsp(llm_kind: str = "llama", bos: bool = True, std: float = 0.3) -> BlspModel:
    """A tiny "ctc"-readout model with the LLM fused into its readout (blank id 5), the LLM's weights
    larger, so that its next-piece distribution depends on the whole prefix (the default init is nearly
    uniform): a wrong cache, position or mask shows."""
    model = _with_larger_llm_weights(tiny_blsp("none", llm_kind=llm_kind, speech_readout="ctc", ctc_blank_id=5,
                                               ctc_lm_weight=1.0), 7, std)
    if not bos:
        model.llama_model.config.bos_token_id = None
    return model


def hears_only_long_clips(model: BlspModel, min_seconds: float = 1.0) -> BlspModel:
    """`model` with a readout that hears no words in clips shorter than `min_seconds` (a CTC readout
    that finds only blanks in them), as the default one does on some short real words."""
    read_out = model.read_out
    min_outputs = model.speech_token_count(int(min_seconds * SAMPLE_RATE))

    def selective(speech, guard=contextlib.nullcontext):
        heard = read_out(speech, guard)
        return heard if speech.shape[0] >= min_outputs else heard[:0]

    model.read_out = selective
    return model


def blank_hearing_blsp(**config_kwargs) -> BlspModel:
    """A tiny "ctc"-readout model whose adapter outputs all sit on the blank's word embedding (blank id 5,
    moved far from the other words), so its readout hears nothing in any clip."""
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, **config_kwargs)
    table = model.llama_model.get_input_embeddings().weight
    with torch.no_grad():
        table[5] = 10 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
        model.speech_ln.weight.zero_()
        model.speech_ln.bias.copy_(table[5])
    return model
