"""CTranslate2 Whisper -> transformers conversion: exact on a random tiny model, accurate on real weights."""

from __future__ import annotations

import json
import re
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from blsp_chat.ct2_whisper import convert_ct2_whisper, read_ct2_model_bin

MAX_WER = 0.25
MAX_ENCODER_DIFF_VS_CT2 = 1e-3

# --- a CTranslate2 writer mirroring ModelSpec._serialize (ctranslate2/specs/model_spec.py) ---------

CT2_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def _ct2_string(s: str) -> bytes:
    return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"


def _ct2_variable(name: str, value) -> bytes:
    if isinstance(value, torch.Tensor):  # bfloat16, which numpy cannot hold
        dtype, shape, data = "bfloat16", tuple(value.shape), value.view(torch.int16).numpy().tobytes()
    else:
        dtype, shape, data = value.dtype.name, value.shape, value.tobytes()
    header = _ct2_string(name) + struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
    return header + struct.pack("<BI", CT2_TYPE_IDS[dtype], len(data)) + data


def write_ct2_model_bin(path: Path, variables: dict, spec="WhisperSpec", revision=3, version=6) -> None:
    """Sorted variables, then aliases (string values), exactly as CTranslate2 writes them."""
    tensors = sorted((k, v) for k, v in variables.items() if not isinstance(v, str))
    aliases = sorted((k, v) for k, v in variables.items() if isinstance(v, str))
    blob = struct.pack("<I", version) + _ct2_string(spec) + struct.pack("<II", revision, len(tensors))
    blob += b"".join(_ct2_variable(k, v) for k, v in tensors)
    blob += struct.pack("<I", len(aliases)) + b"".join(_ct2_string(a) + _ct2_string(t) for a, t in aliases)
    path.write_bytes(blob)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _linear(sd, hf, ct2, out):
    out[f"{ct2}/weight"] = _np(sd[f"{hf}.weight"])
    out[f"{ct2}/bias"] = _np(sd[f"{hf}.bias"])


def _layer_norm(sd, hf, ct2, out):
    out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = _np(sd[f"{hf}.weight"]), _np(sd[f"{hf}.bias"])


def _fused(sd, hf, ct2, projections, out):
    """CTranslate2's utils.fuse_linear: concatenate, with a zero bias for the bias-less k_proj."""
    weights = [sd[f"{hf}.{p}.weight"] for p in projections]
    biases = [sd.get(f"{hf}.{p}.bias", torch.zeros(w.shape[0])) for p, w in zip(projections, weights)]
    out[f"{ct2}/weight"], out[f"{ct2}/bias"] = _np(torch.cat(weights)), _np(torch.cat(biases))


def hf_to_ct2_variables(model: WhisperForConditionalGeneration) -> dict:
    """What CTranslate2's WhisperLoader makes of `model` (float32, before quantization)."""
    sd, cfg, out = model.state_dict(), model.config, {}
    for conv in ("conv1", "conv2"):
        _linear(sd, f"model.encoder.{conv}", f"encoder/{conv}", out)
    out["decoder/embeddings/weight"] = _np(sd["model.decoder.embed_tokens.weight"])
    out["decoder/projection/weight"] = "decoder/embeddings/weight"  # the alias CT2 writes
    for stack, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        hf = f"model.{stack}"
        out[f"{stack}/position_encodings/encodings"] = _np(sd[f"{hf}.embed_positions.weight"])
        _layer_norm(sd, f"{hf}.layer_norm", f"{stack}/layer_norm", out)
        for i in range(n_layers):
            h, c = f"{hf}.layers.{i}", f"{stack}/layer_{i}"
            _fused(sd, f"{h}.self_attn", f"{c}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"), out)
            _linear(sd, f"{h}.self_attn.out_proj", f"{c}/self_attention/linear_1", out)
            _layer_norm(sd, f"{h}.self_attn_layer_norm", f"{c}/self_attention/layer_norm", out)
            if stack == "decoder":
                _linear(sd, f"{h}.encoder_attn.q_proj", f"{c}/attention/linear_0", out)
                _fused(sd, f"{h}.encoder_attn", f"{c}/attention/linear_1", ("k_proj", "v_proj"), out)
                _linear(sd, f"{h}.encoder_attn.out_proj", f"{c}/attention/linear_2", out)
                _layer_norm(sd, f"{h}.encoder_attn_layer_norm", f"{c}/attention/layer_norm", out)
            _linear(sd, f"{h}.fc1", f"{c}/ffn/linear_0", out)
            _linear(sd, f"{h}.fc2", f"{c}/ffn/linear_1", out)
            _layer_norm(sd, f"{h}.final_layer_norm", f"{c}/ffn/layer_norm", out)
    out |= {  # the scalars a real faster-whisper model.bin carries
        "encoder/num_heads": np.int16(cfg.encoder_attention_heads),
        "decoder/num_heads": np.int16(cfg.decoder_attention_heads),
        "decoder/activation": np.int8(3), "decoder/alibi": np.int8(0), "decoder/pre_norm": np.int8(1),
        "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0),
        "decoder/alignment_heads": np.int16(1), "decoder/alignment_layer": np.int16(-1),
    }
    return {k: np.asarray(v) if not isinstance(v, str) else v for k, v in out.items()}


def _quantize(variables: dict, dtype: str) -> dict:
    """CTranslate2's LayerSpec._quantize for weights (int8: per-row scale) or a float cast."""
    out = {}
    for name, value in variables.items():
        if isinstance(value, str) or value.ndim == 0:
            out[name] = value
        elif dtype == "int8" and name.endswith("weight") and value.ndim == 2:
            scale = (127.0 / np.abs(value).max(axis=1)).astype(np.float32)
            out[name] = np.rint(value * scale[:, None]).astype(np.int8)
            out[name + "_scale"] = scale
        elif dtype == "float16":
            out[name] = value.astype(np.float16)
        elif dtype == "bfloat16":
            out[name] = torch.from_numpy(value).to(torch.bfloat16)
        else:
            out[name] = value
    return out


def _dequantized(variables: dict) -> dict[str, np.ndarray]:
    """The float32 values the converter should recover from `_quantize`'s output."""
    out = {}
    for name, value in variables.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.float().numpy()
        elif not isinstance(value, str) and value.dtype == np.int8 and value.ndim == 2:
            out[name] = value.astype(np.float32) / variables[name + "_scale"][:, None]
        elif not isinstance(value, str) and not name.endswith("_scale"):
            out[name] = value.astype(np.float32) if value.ndim else value
    return out


# --- a tiny model and CTranslate2 directory --------------------------------------------------------

TINY_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                 "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
TINY_TIMESTAMPS = 6
TINY_SUPPRESS = [1, 2, 257]


def _write_tiny_tokenizer(ct2_dir: Path) -> int:
    """Byte-level BPE with no merges and Whisper's special tokens; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tok.save(str(ct2_dir / "tokenizer.json"))
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(TINY_TIMESTAMPS)]
    vocabulary = alphabet + TINY_SPECIALS + timestamps
    (ct2_dir / "vocabulary.txt").write_text("\n".join(vocabulary), encoding="utf-8")
    return len(vocabulary)


def _tiny_model(vocab_size: int) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=24,
        max_source_positions=50, max_target_positions=12,
        decoder_start_token_id=257, pad_token_id=256, bos_token_id=256, eos_token_id=256,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF init leaves biases at 0 and norms at 1: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture
def tiny_ct2(tmp_path):
    """(ct2_dir, original model, CT2 variables) for a random tiny Whisper."""
    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    model = _tiny_model(_write_tiny_tokenizer(ct2_dir))
    config = {"suppress_ids": TINY_SUPPRESS, "suppress_ids_begin": [220, 256],
              "lang_ids": [258], "alignment_heads": [[1, 0], [2, 1]]}
    (ct2_dir / "config.json").write_text(json.dumps(config))
    variables = hf_to_ct2_variables(model)
    write_ct2_model_bin(ct2_dir / "model.bin", variables)
    return ct2_dir, model, variables


def test_conversion_reproduces_tiny_model(tiny_ct2, tmp_path):
    ct2_dir, original, _ = tiny_ct2
    convert_ct2_whisper(ct2_dir, tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()

    features = torch.randn(2, 8, 100)
    decoder_ids = torch.randint(0, original.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = original(input_features=features, decoder_input_ids=decoder_ids)
        got = converted(input_features=features, decoder_input_ids=decoder_ids)
    for name in ("encoder_last_hidden_state", "logits"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-6, rtol=0)


def test_conversion_writes_config_tokenizer_and_features(tiny_ct2, tmp_path):
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    ct2_dir, original, _ = tiny_ct2
    convert_ct2_whisper(ct2_dir, tmp_path / "hf")
    config = WhisperConfig.from_pretrained(tmp_path / "hf")
    for key in ("d_model", "num_mel_bins", "vocab_size", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                "decoder_ffn_dim", "max_source_positions", "max_target_positions"):
        assert getattr(config, key) == getattr(original.config, key), key

    tokenizer = WhisperTokenizerFast.from_pretrained(tmp_path / "hf")
    assert len(tokenizer) == original.config.vocab_size  # timestamps from vocabulary.txt included
    assert tokenizer.decode(tokenizer("hi there").input_ids, skip_special_tokens=True) == "hi there"

    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIALS}
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"] == config.decoder_start_token_id
    assert gen.eos_token_id == ids["<|endoftext|>"]
    assert gen.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert gen.suppress_tokens == TINY_SUPPRESS and gen.max_length == 12 and gen.is_multilingual is False

    features = WhisperFeatureExtractor.from_pretrained(tmp_path / "hf")
    assert features.feature_size == 8 and features.sampling_rate == 16_000
    assert features.nb_max_frames == 2 * original.config.max_source_positions


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_reduced_precision_weights_are_recovered(tiny_ct2, tmp_path, dtype):
    ct2_dir, _, variables = tiny_ct2
    quantized = _quantize(variables, dtype)
    write_ct2_model_bin(ct2_dir / "model.bin", quantized)
    parsed = read_ct2_model_bin(ct2_dir / "model.bin")
    assert parsed["decoder/projection/weight"] == "decoder/embeddings/weight"

    convert_ct2_whisper(ct2_dir, tmp_path / "hf")
    got = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    want = _dequantized(quantized)
    q_weight = want["decoder/layer_1/self_attention/linear_0/weight"][:16]  # q of the fused q/k/v
    np.testing.assert_array_equal(got["model.decoder.layers.1.self_attn.q_proj.weight"].numpy(), q_weight)
    np.testing.assert_array_equal(got["model.encoder.layers.0.fc2.weight"].numpy(),
                                  want["encoder/layer_0/ffn/linear_1/weight"])
    np.testing.assert_array_equal(got["model.decoder.layer_norm.bias"].numpy(),
                                  want["decoder/layer_norm/beta"])


def test_reader_returns_arrays_scalars_and_aliases(tiny_ct2):
    ct2_dir, _, variables = tiny_ct2
    parsed = read_ct2_model_bin(ct2_dir / "model.bin")
    assert parsed.keys() == variables.keys()
    assert int(parsed["encoder/num_heads"]) == 4 and parsed["encoder/num_heads"].dtype == np.int16
    np.testing.assert_array_equal(parsed["encoder/conv1/weight"], variables["encoder/conv1/weight"])


# --- errors ----------------------------------------------------------------------------------------

def _assert_clear_error(path: Path, pattern: str, convert_dir: Path | None = None) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        if convert_dir is None:
            read_ct2_model_bin(path)
        else:
            convert_ct2_whisper(convert_dir, convert_dir.parent / "out")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [2, 9, 40, 0.5, -1])
def test_truncated_file_is_a_clear_error(tiny_ct2, keep):
    path = tiny_ct2[0] / "model.bin"
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep) if isinstance(keep, float) else keep])
    _assert_clear_error(path, "truncated")


def test_wrong_version_or_magic_is_a_clear_error(tiny_ct2):
    ct2_dir, _, variables = tiny_ct2
    path = ct2_dir / "model.bin"
    write_ct2_model_bin(path, variables, version=99)
    _assert_clear_error(path, "binary version 99")
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    _assert_clear_error(path, "binary version")


def test_unknown_spec_is_a_clear_error(tiny_ct2):
    ct2_dir, _, variables = tiny_ct2
    write_ct2_model_bin(ct2_dir / "model.bin", variables, spec="TransformerSpec")
    _assert_clear_error(ct2_dir / "model.bin", "TransformerSpec")


def test_missing_model_bin_is_a_clear_error(tiny_ct2):
    ct2_dir = tiny_ct2[0]
    (ct2_dir / "model.bin").unlink()
    _assert_clear_error(ct2_dir / "model.bin", "no such file", convert_dir=ct2_dir)


def test_unsupported_variables_are_reported_not_dropped(tiny_ct2):
    ct2_dir, _, variables = tiny_ct2
    n_vocab = variables["decoder/embeddings/weight"].shape[0]
    variables = variables | {"decoder/projection/bias": np.zeros(n_vocab, dtype=np.float32)}
    write_ct2_model_bin(ct2_dir / "model.bin", variables)
    _assert_clear_error(ct2_dir / "model.bin", "decoder/projection/bias", convert_dir=ct2_dir)


# --- real weights ------------------------------------------------------------------------------------

def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16_000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _features(whisper_dir: Path, clip: Path) -> torch.Tensor:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    return extractor(_read_wav(clip), sampling_rate=16_000, return_tensors="pt").input_features


@pytest.mark.integration
def test_converted_tiny_en_transcribes_librivox(whisper_tiny_en_dir, librivox_clip):
    import jiwer
    from transformers import WhisperTokenizerFast

    clip, transcript = librivox_clip
    model = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en_dir).eval()
    tokenizer = WhisperTokenizerFast.from_pretrained(whisper_tiny_en_dir)
    assert [tokenizer.convert_tokens_to_ids(t) for t in
            ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")] == [50256, 50257, 50362]
    with torch.no_grad():
        ids = model.generate(_features(whisper_tiny_en_dir, clip))
    hypothesis = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert jiwer.wer(_words(transcript), _words(hypothesis)) < MAX_WER, hypothesis


@pytest.mark.integration
def test_converted_encoder_matches_ctranslate2(whisper_tiny_en_ct2_dir, whisper_tiny_en_dir, librivox_clip):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install ctranslate2==4.8.5 to compare")
    features = _features(whisper_tiny_en_dir, librivox_clip[0])
    reference = ctranslate2.models.Whisper(str(whisper_tiny_en_ct2_dir), device="cpu", compute_type="float32")
    want = np.array(reference.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    model = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en_dir).eval()
    with torch.no_grad():
        got = model.model.encoder(features).last_hidden_state.numpy()
    assert np.abs(got - want).max() < MAX_ENCODER_DIFF_VS_CT2


@pytest.fixture(scope="session")
def whisper_base_dir() -> Path:
    from blsp_chat import offline

    return offline.whisper_base_dir()


@pytest.mark.integration
def test_converted_base_is_multilingual_and_transcribes_english_when_told(whisper_base_dir, librivox_clip):
    """Whisper base from its two wheels: English is forced with <|en|> <|transcribe|>, as the baselines run it."""
    import jiwer

    from train.eval_run import WhisperTranscriber

    clip, transcript = librivox_clip
    transcriber = WhisperTranscriber(str(whisper_base_dir))
    config = transcriber.model.generation_config
    assert config.is_multilingual and config.lang_to_id["<|en|>"] == 50259 and config.task_to_id["transcribe"] == 50359
    assert transcriber.generate_kwargs["language"] == "en"
    model = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()
    assert (model.config.d_model, model.config.encoder_layers) == (512, 6)
    prompts = []  # the decoder's first input: the prompt tokens generate forced
    model.model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["input_ids"][0].tolist()) if not prompts else None,
        with_kwargs=True)
    with torch.no_grad():
        model.generate(_features(whisper_base_dir, clip), language="en", task="transcribe", max_new_tokens=3)
    assert prompts[0] == [50258, 50259, 50359, 50363]  # SOT, <|en|>, <|transcribe|>, <|notimestamps|>
    from blsp_chat.audio import load_audio

    hypothesis = transcriber([load_audio(clip)])[0]
    assert jiwer.wer(_words(transcript), _words(hypothesis)) < MAX_WER, hypothesis
