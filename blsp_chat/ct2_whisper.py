"""Convert a CTranslate2 Whisper directory (the faster-whisper layout) into a transformers one.

A CTranslate2 directory holds model.bin (the weights), config.json (suppressed token ids, alignment
heads) and tokenizer.json. The binary layout mirrors `ModelSpec._serialize` in CTranslate2's
python/ctranslate2/specs/model_spec.py, little-endian:

    u32 binary_version, str spec_name, u32 spec_revision,
    u32 n_variables, then per variable: str name, u8 rank, u32 dims[rank], u8 dtype_id,
                                        u32 n_bytes, bytes data
    u32 n_aliases, then per alias: str alias, str target_name

where `str` is a u16 length (counting a trailing NUL) followed by UTF-8 bytes and the NUL.
The weight names are the inverse of CTranslate2's `WhisperLoader` (converters/transformers.py).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors.torch import save_file

from blsp_chat.constants import ENCODER_STRIDE, HOP_LENGTH, SAMPLE_RATE

MODEL_BIN = "model.bin"
CT2_CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
VOCABULARY_TXT = "vocabulary.txt"
SAFETENSORS = "model.safetensors"

WHISPER_SPEC = "WhisperSpec"
# CTranslate2's C++ loader reads versions 4-6 with one layout (a dtype id per variable, aliases).
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
MAX_WHISPER_SPEC_REVISION = 3  # WhisperSpec.revision in CTranslate2 4.x

# Order of the DataType enum in CTranslate2's include/ctranslate2/types.h.
_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
GELU_ACTIVATION = 3  # ctranslate2.specs.common_spec.Activation.GELU
WHISPER_HEAD_DIM = 64  # every Whisper size uses 64-wide heads; used only if num_heads is not stored
MULTILINGUAL_MIN_VOCAB = 51865  # openai/whisper: English-only vocabularies have 51864 tokens

EOT, SOT, NO_TIMESTAMPS, PREV_SOT = (
    "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"
)
TASK_TOKENS = {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}

# Flags of the decoder spec this converter understands, with the value HF Whisper implies.
_EXPECTED_DECODER_FLAGS = {
    "activation": GELU_ACTIVATION, "alibi": 0, "pre_norm": 1,
    "scale_embeddings": 0, "start_from_zero_embedding": 0,
}
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")  # CT2 runtime options


class CT2FormatError(ValueError):
    """A CTranslate2 model directory that is missing, corrupt or not a supported Whisper."""


# --- model.bin parser ---------------------------------------------------------------------------

class _Reader:
    """Bounds-checked reads, so a truncated file fails with its name and offset."""

    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path
        self.size = path.stat().st_size

    def bytes(self, n: int, what: str) -> bytes:
        offset = self.f.tell()
        if n > self.size - offset:  # checked before reading: a corrupt length could be 4 GiB
            raise CT2FormatError(
                f"{self.path}: truncated or corrupt: {what} needs {n} bytes at offset {offset}, "
                f"only {self.size - offset} left"
            )
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.bytes(self.unpack("H", f"{what} length"), what)
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"{self.path}: corrupt {what} at offset {self.f.tell() - len(raw)}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CT2FormatError(f"{self.path}: {what} is not UTF-8 ({e})") from None


def _decode_array(raw: bytes, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype_name == "bfloat16":  # numpy has no bfloat16: it is the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype_name).newbyteorder("<")).reshape(shape).copy()


def _read_variable(r: _Reader) -> tuple[str, np.ndarray]:
    name = r.string("variable name")
    shape = tuple(r.unpack("I", f"dimension of {name}") for _ in range(r.unpack("B", f"rank of {name}")))
    type_id = r.unpack("B", f"dtype of {name}")
    if type_id not in _DTYPES:
        raise CT2FormatError(f"{r.path}: variable {name} has unsupported dtype id {type_id}")
    n_bytes = r.unpack("I", f"size of {name}")
    itemsize = 2 if _DTYPES[type_id] == "bfloat16" else np.dtype(_DTYPES[type_id]).itemsize
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    if n_bytes != expected:
        raise CT2FormatError(f"{r.path}: variable {name} {shape} {_DTYPES[type_id]} "
                             f"claims {n_bytes} bytes, expected {expected}")
    return name, _decode_array(r.bytes(n_bytes, f"data of {name}"), _DTYPES[type_id], shape)


def read_ct2_model_bin(path: Path | str, expected_spec: str | None = WHISPER_SPEC
                       ) -> dict[str, np.ndarray | str]:
    """Parse a CTranslate2 model.bin into {name: array}; aliases map to the name they repeat.

    Scalars (flags, head counts) come back as 0-d arrays. Raises CT2FormatError (a ValueError)
    naming the file for a missing, truncated or corrupt file, an unsupported binary version,
    or a spec other than `expected_spec` (None accepts any).
    """
    path = Path(path)
    if not path.is_file():
        raise CT2FormatError(f"{path}: no such file (a CTranslate2 model directory has a {MODEL_BIN})")
    with path.open("rb") as f:
        r = _Reader(f, path)
        version = r.unpack("I", "binary version")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise CT2FormatError(f"{path}: not a CTranslate2 model.bin this reader supports "
                                 f"(binary version {version}, supported {SUPPORTED_BINARY_VERSIONS})")
        spec, revision = r.string("spec name"), r.unpack("I", "spec revision")
        if expected_spec is not None and spec != expected_spec:
            raise CT2FormatError(f"{path}: spec is {spec!r}, expected {expected_spec!r}")
        if spec == WHISPER_SPEC and revision > MAX_WHISPER_SPEC_REVISION:
            raise CT2FormatError(f"{path}: {spec} revision {revision} is newer than the supported "
                                 f"{MAX_WHISPER_SPEC_REVISION}")
        variables: dict[str, np.ndarray | str] = dict(
            _read_variable(r) for _ in range(r.unpack("I", "variable count")))
        for _ in range(r.unpack("I", "alias count")):
            alias = r.string("alias name")
            variables[alias] = r.string(f"target of alias {alias}")
        if f.read(1):
            raise CT2FormatError(f"{path}: corrupt: unexpected bytes after the last alias")
    return variables


# --- from CT2 variables to float tensors ---------------------------------------------------------

def _resolve_aliases(variables: dict[str, np.ndarray | str], path: Path) -> dict[str, np.ndarray]:
    # Aliases are made before quantization, so like CTranslate2's loader an alias also names the
    # quantization scale of its target.
    variables = variables | {f"{name}_scale": f"{target}_scale" for name, target in variables.items()
                             if isinstance(target, str) and f"{target}_scale" in variables}
    resolved = {}
    for name, value in variables.items():
        seen = {name}
        while isinstance(value, str):  # an alias may, in principle, name another alias
            if value in seen or value not in variables:
                raise CT2FormatError(f"{path}: alias {name} points to missing variable {value}")
            seen.add(value)
            value = variables[value]
        resolved[name] = value
    return resolved


def _dequantize(arrays: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """int8 weights carry a per-row `<name>_scale`, int16 a scalar one: value = q / scale."""
    out = {}
    for name, value in arrays.items():
        if name.endswith("_scale") and name[: -len("_scale")] in arrays:
            continue
        if value.ndim > 0 and value.dtype in (np.int8, np.int16):
            scale = arrays.get(name + "_scale")
            if scale is None:
                raise CT2FormatError(f"{path}: quantized {name} has no {name}_scale")
            scale = scale.astype(np.float32)
            value = value.astype(np.float32) / (scale[:, None] if scale.ndim == 1 else scale)
        out[name] = value
    return out


# --- dimensions -------------------------------------------------------------------------------

def _count_layers(arrays: dict[str, np.ndarray], stack: str) -> int:
    layer = re.compile(rf"{stack}/layer_(\d+)/")  # not "layer_norm"
    return len({m.group(1) for m in map(layer.match, arrays) if m})


def _num_heads(arrays: dict[str, np.ndarray], stack: str, d_model: int) -> int:
    stored = arrays.get(f"{stack}/num_heads")
    return int(stored) if stored is not None else d_model // WHISPER_HEAD_DIM


def _dimensions(arrays: dict[str, np.ndarray], path: Path) -> dict[str, int]:
    """WhisperConfig sizes read off the tensors, so any Whisper size converts."""
    try:
        d_model, n_mels, _ = arrays["encoder/conv1/weight"].shape
        dims = dict(
            d_model=d_model, num_mel_bins=n_mels,
            vocab_size=arrays["decoder/embeddings/weight"].shape[0],
            encoder_layers=_count_layers(arrays, "encoder"),
            decoder_layers=_count_layers(arrays, "decoder"),
            encoder_attention_heads=_num_heads(arrays, "encoder", d_model),
            decoder_attention_heads=_num_heads(arrays, "decoder", d_model),
            encoder_ffn_dim=arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            decoder_ffn_dim=arrays["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_source_positions=arrays["encoder/position_encodings/encodings"].shape[0],
            max_target_positions=arrays["decoder/position_encodings/encodings"].shape[0],
        )
    except (KeyError, ValueError) as e:
        raise CT2FormatError(f"{path}: not a complete Whisper model (missing or misshapen {e})") from None
    return {k: int(v) for k, v in dims.items()}


# --- name mapping (inverse of CTranslate2's WhisperLoader) ---------------------------------------

class _Taker:
    """Pops CT2 variables as they are mapped, so anything left over is reported, not dropped."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self.arrays, self.path = dict(arrays), path

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.arrays:
            raise CT2FormatError(f"{self.path}: missing variable {name}")
        return torch.from_numpy(np.ascontiguousarray(self.arrays.pop(name), dtype=np.float32))


def _linear(take: _Taker, ct2: str, hf: str, bias: bool = True) -> dict[str, torch.Tensor]:
    out = {f"{hf}.weight": take(f"{ct2}/weight")}
    if bias:
        out[f"{hf}.bias"] = take(f"{ct2}/bias")
    return out


def _layer_norm(take: _Taker, ct2: str, hf: str) -> dict[str, torch.Tensor]:
    return {f"{hf}.weight": take(f"{ct2}/gamma"), f"{hf}.bias": take(f"{ct2}/beta")}


def _split_fused(take: _Taker, ct2: str, hf: str, projections: tuple[str, ...]
                 ) -> dict[str, torch.Tensor]:
    """Undo CT2's fusion of q/k/v (self-attention) or k/v (cross-attention) into one linear.

    HF's k_proj has no bias: CT2 stores zeros there, and any key bias b would only add q.b to
    every score of a query, which softmax ignores, so it is dropped.
    """
    weights = take(f"{ct2}/weight").chunk(len(projections))
    biases = take(f"{ct2}/bias").chunk(len(projections))
    out = {}
    for proj, w, b in zip(projections, weights, biases):
        out[f"{hf}.{proj}.weight"] = w
        if proj != "k_proj":
            out[f"{hf}.{proj}.bias"] = b
    return out


def _block(take: _Taker, ct2: str, hf: str, cross: bool) -> dict[str, torch.Tensor]:
    sd = _split_fused(take, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn",
                      ("q_proj", "k_proj", "v_proj"))
    sd |= _linear(take, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
    sd |= _layer_norm(take, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
    if cross:
        sd |= _linear(take, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        sd |= _split_fused(take, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
        sd |= _linear(take, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        sd |= _layer_norm(take, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    sd |= _linear(take, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
    sd |= _linear(take, f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    sd |= _layer_norm(take, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    return sd


def _stack(take: _Taker, stack: str, n_layers: int) -> dict[str, torch.Tensor]:
    hf = f"model.{stack}"
    sd = {f"{hf}.embed_positions.weight": take(f"{stack}/position_encodings/encodings")}
    sd |= _layer_norm(take, f"{stack}/layer_norm", f"{hf}.layer_norm")
    for i in range(n_layers):
        sd |= _block(take, f"{stack}/layer_{i}", f"{hf}.layers.{i}", cross=stack == "decoder")
    return sd


def _check_scalars(take: _Taker) -> None:
    """Refuse decoder variants HF Whisper cannot express; drop CT2-only runtime options."""
    for flag, expected in _EXPECTED_DECODER_FLAGS.items():
        value = take.arrays.pop(f"decoder/{flag}", None)
        if value is not None and int(value) != expected:
            raise CT2FormatError(f"{take.path}: unsupported decoder/{flag}={int(value)} "
                                 f"(HF Whisper needs {expected})")
    for name in (*_IGNORED_SCALARS, "encoder/num_heads", "decoder/num_heads"):
        take.arrays.pop(name, None)


def _check_tied_projection(take: _Taker, embeddings: torch.Tensor) -> None:
    """HF Whisper ties proj_out to the token embeddings; CT2 stores it as an alias of them."""
    projection = take.arrays.pop("decoder/projection/weight", None)
    if projection is not None and not np.array_equal(projection, embeddings.numpy()):
        raise CT2FormatError(f"{take.path}: decoder/projection/weight differs from the token "
                             "embeddings; untied output projections are not supported")


def ct2_to_hf_state_dict(arrays: dict[str, np.ndarray], dims: dict[str, int], path: Path
                         ) -> dict[str, torch.Tensor]:
    """Float32 WhisperForConditionalGeneration state dict (proj_out left to weight tying)."""
    take = _Taker(arrays, path)
    sd = _linear(take, "encoder/conv1", "model.encoder.conv1")
    sd |= _linear(take, "encoder/conv2", "model.encoder.conv2")
    sd |= _stack(take, "encoder", dims["encoder_layers"])
    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    sd |= _stack(take, "decoder", dims["decoder_layers"])
    _check_tied_projection(take, sd["model.decoder.embed_tokens.weight"])
    _check_scalars(take)
    if take.arrays:
        raise CT2FormatError(f"{path}: unsupported variables (not plain Whisper?): "
                             f"{sorted(take.arrays)[:8]}")
    return sd


# --- directory-level conversion ---------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CT2FormatError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CT2FormatError(f"{path}: invalid JSON ({e})") from None


def _load_tokenizer(ct2_dir: Path, vocab_size: int, max_length: int):
    """Whisper tokenizer from tokenizer.json, plus the timestamp tokens CT2 lists only in
    vocabulary.txt, so every id the model can emit decodes."""
    from transformers import AddedToken, WhisperTokenizerFast

    path = ct2_dir / TOKENIZER_JSON
    if not path.is_file():
        raise CT2FormatError(f"{path}: no such file")
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(path), model_max_length=max_length)
    vocabulary_path = ct2_dir / VOCABULARY_TXT
    if vocabulary_path.is_file():
        vocabulary = vocabulary_path.read_text(encoding="utf-8").split("\n")[:vocab_size]
        extra = vocabulary[len(tokenizer):]
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra])
    for token in (EOT, SOT, NO_TIMESTAMPS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise CT2FormatError(f"{path}: special token {token} is missing")
    if len(tokenizer) > vocab_size:
        raise CT2FormatError(f"{path}: {len(tokenizer)} tokens but the model has {vocab_size} embeddings")
    return tokenizer


def _token_ids(tokenizer, tokens) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    return {t: i for t, i in ids.items() if i is not None and i != tokenizer.unk_token_id}


def _generation_config(tokenizer, ct2_config: dict, dims: dict[str, int]):
    from transformers import GenerationConfig

    eot, sot = tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(SOT)
    multilingual = dims["vocab_size"] >= MULTILINGUAL_MIN_VOCAB
    extra = {}
    if multilingual:  # English-only models take no language or task token
        languages = tokenizer.convert_ids_to_tokens(ct2_config.get("lang_ids", []))
        extra = dict(lang_to_id=_token_ids(tokenizer, languages),
                     task_to_id={task: tokenizer.convert_tokens_to_ids(token)
                                 for task, token in TASK_TOKENS.items()})
    prev_sot = _token_ids(tokenizer, [PREV_SOT]).get(PREV_SOT)
    return GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=dims["max_target_positions"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids(NO_TIMESTAMPS),
        prev_sot_token_id=prev_sot, is_multilingual=multilingual, return_timestamps=False,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])] or None,
        **extra,
    )


def _feature_extractor(dims: dict[str, int]):
    from transformers import WhisperFeatureExtractor

    n_frames = dims["max_source_positions"] * ENCODER_STRIDE  # the encoder's input length
    return WhisperFeatureExtractor(feature_size=dims["num_mel_bins"], sampling_rate=SAMPLE_RATE,
                                   hop_length=HOP_LENGTH,
                                   chunk_length=n_frames * HOP_LENGTH // SAMPLE_RATE)


def _whisper_config(dims: dict[str, int], tokenizer, ct2_config: dict):
    from transformers import WhisperConfig

    eot, sot = tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(SOT)
    return WhisperConfig(
        **dims, decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True, architectures=["WhisperForConditionalGeneration"],
        dtype="float32",
    )


def _check_against_architecture(config, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Fail here, naming the file, if any name or shape differs from what transformers builds."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):  # shapes only: no memory, no random init
        model = WhisperForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "proj_out.weight"}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise CT2FormatError(f"{path}: converted weights do not fit WhisperForConditionalGeneration: {diff}")


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> None:
    """Write a transformers Whisper directory (config.json, model.safetensors, generation_config.json,
    tokenizer files, preprocessor_config.json) converted from a CTranslate2 Whisper directory."""
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    bin_path = ct2_dir / MODEL_BIN
    arrays = _dequantize(_resolve_aliases(read_ct2_model_bin(bin_path), bin_path), bin_path)
    dims = _dimensions(arrays, bin_path)
    state_dict = ct2_to_hf_state_dict(arrays, dims, bin_path)
    ct2_config = _read_json(ct2_dir / CT2_CONFIG)
    tokenizer = _load_tokenizer(ct2_dir, dims["vocab_size"], dims["max_target_positions"])

    config = _whisper_config(dims, tokenizer, ct2_config)
    _check_against_architecture(config, state_dict, bin_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    # proj_out.weight is not saved: transformers re-ties it to the token embeddings on load.
    save_file(state_dict, str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    _generation_config(tokenizer, ct2_config, dims).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _feature_extractor(dims).save_pretrained(out_dir)
