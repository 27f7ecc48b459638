"""Hub model cards: the YAML front matter the Hugging Face Hub reads from a checkpoint's README.md (base_model,
license, library_name, pipeline_tag, tags, datasets), for BLSP adapters and for the LLM LoRAs they use.

The card's body is written by whoever trained the weights (train/adapter_card.py, train/sft_llm.py); this
module owns only the metadata and how it sits at the top of the file, so that every writer agrees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from huggingface_hub import ModelCard, ModelCardData

CARD_NAME = "README.md"
LICENSE = "apache-2.0"  # the project's (pyproject.toml): the licence its trained weights are released under
LIBRARY_NAME = "blsp-chat"  # AutoModel loads a BLSP checkpoint only after `import blsp_chat`
BLSP_PIPELINE_TAG = "audio-text-to-text"  # speech (with a typed instruction) in, text out
LORA_LIBRARY_NAME = "peft"  # an LLM LoRA is a peft adapter, loaded the peft way
LORA_PIPELINE_TAG = "text-generation"
BLSP_TAGS = ("blsp", "speech-llm", "speech", "whisper", "modality-adapter")
LORA_TAGS = ("blsp", "lora", "peft")
FRONT_MATTER_FENCE = "---"


def blsp_card_data(base_models: Iterable[str], datasets: Iterable[str] = (), license: str = LICENSE,
                   tags: Iterable[str] = ()) -> ModelCardData:
    """Metadata of a BLSP checkpoint. base_models: the hub ids of its speech encoder and LLM (base models
    known only by a local path cannot be named on the Hub and are left out)."""
    return ModelCardData(base_model=_unique(base_models), license=license, library_name=LIBRARY_NAME,
                         pipeline_tag=BLSP_PIPELINE_TAG, tags=_unique([*BLSP_TAGS, *tags]), datasets=_unique(datasets))


def lora_card_data(base_model: str | None, datasets: Iterable[str] = (), license: str = LICENSE,
                   tags: Iterable[str] = ()) -> ModelCardData:
    """Metadata of a LoRA on an LLM (the stage-1 LoRA, a fine-tuned checkpoint's LLM LoRA)."""
    return ModelCardData(base_model=base_model, license=license, library_name=LORA_LIBRARY_NAME,
                         pipeline_tag=LORA_PIPELINE_TAG, tags=_unique([*LORA_TAGS, *tags]), datasets=_unique(datasets))


def with_front_matter(text: str, data: ModelCardData) -> str:
    """`text` (a card, with or without front matter) with its front matter replaced by `data`'s."""
    return f"{FRONT_MATTER_FENCE}\n{data.to_yaml()}\n{FRONT_MATTER_FENCE}\n\n{card_body(text).lstrip()}"


def card_body(text: str) -> str:
    """A card's text below its front matter (all of it when it has none)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != FRONT_MATTER_FENCE:
        return text
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == FRONT_MATTER_FENCE:
            return "".join(lines[index + 1:])
    raise ValueError("the card's front matter has no closing '---' line")


def write_card(path: str | Path, body: str, data: ModelCardData) -> None:
    """Write a card: `data` as front matter over `body`. Where `data` names no datasets, those the card at
    `path` already lists stay: a writer that cannot know them (a LoRA trained from a local file) does not
    erase what someone recorded."""
    path = Path(path)
    if not data.datasets:
        data.datasets = (read_card_data(path.read_text()).datasets if path.is_file() else None) or []
    path.write_text(with_front_matter(body, data))


def write_front_matter(path: str | Path, data: ModelCardData) -> None:
    """Give the card at `path` this front matter, keeping its text (a new card gets a one-line title)."""
    path = Path(path)
    write_card(path, path.read_text() if path.is_file() else f"# {path.parent.name}\n", data)


def read_card_data(text: str) -> ModelCardData:
    """The front matter of a card's text (empty metadata when it has none)."""
    if card_body(text) is text:
        return ModelCardData()
    return ModelCard(text, ignore_metadata_errors=True).data


def new_card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(with_front_matter(body, data))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))
