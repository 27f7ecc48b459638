"""Conversation -> token ids, speech slots and loss mask. The ONE renderer for training and serving,
and every tokenizer rule both share: which ids end a reply, what pads a batch, where a reply stops.

Templates are data. `blsp` is the released format (paper section 3):
    BOS ###[Human]:{instruction}{speech | transcript}\n\n\n###[Assistant]:{response}\n\n\n###[Human]:...
with EOS after the final response when training. `chat` is the LLM's own chat template, read off the
tokenizer. Every text piece is tokenised on its own without special tokens, so appending a turn only
appends tokens: the rendering of a history is a prefix of the rendering of the history plus a new turn.

Content never spells structure: whatever a user, a system message, a transcript or a client-sent reply holds,
the rendered ids hold exactly the turns the history holds (`neutral_text`). Training renders through here too,
so training data and serving follow the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from .constants import (
    ASSISTANT_PREFIX,
    DEFAULT_TRANSLATION_TARGET,
    HUMAN_PREFIX,
    IGNORE_INDEX,
    SNIPS_LIGHT_INTENTS,
    STOP_STRINGS,
    TASK_PRESETS,
    TURN_SEPARATOR,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Role = Literal["human", "assistant"]
# End-of-text spellings of common LLM families; any present in the vocabulary ends a reply.
END_OF_TEXT_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>")
_SENTINELS = ("\x00U1\x00", "\x00A1\x00", "\x00U2\x00")
# Breaks a role marker or special-token string inside content. Why a zero-width space after the marker's first
# character: the ids of a marker can only come from its exact string (the tokenizer reads text left to right and
# a byte-level or sentencepiece decoder concatenates), so once no content holds the string, no content holds
# the ids; the break is invisible where the text is shown again, the rest of the text tokenises as before, and
# genuine turns (no marker inside) render exactly as they always did. Replacing characters with look-alikes
# would change what people see in their own message, and refusing such text would refuse e.g. a pasted log.
MARKER_BREAK = "\u200b"


@dataclass(frozen=True)
class Turn:
    """A human turn: optional instruction, then typed text and/or `speech_tokens` speech positions.
    An assistant turn: its text, or the exact token ids it was generated as (kept so that a KV cache of
    the history stays valid)."""

    role: Role
    text: str = ""
    instruction: str = ""
    speech_tokens: int = 0
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.role not in ("human", "assistant"):
            raise ValueError(f"turn role must be 'human' or 'assistant', got {self.role!r}")
        if self.role == "assistant" and (self.speech_tokens or self.instruction):
            raise ValueError("an assistant turn holds text only")
        if self.role == "human" and not (self.text or self.instruction or self.speech_tokens):
            raise ValueError("a human turn needs text, an instruction or speech")


@dataclass(frozen=True)
class PromptTemplate:
    """The text around turns. `first_human_prefix` opens the conversation (it may carry a system
    prompt), `between_turns` closes an assistant reply and opens the next human turn."""

    name: str
    first_human_prefix: str
    human_suffix: str
    between_turns: str
    add_bos: bool  # prepend the tokenizer's own BOS (the blsp format does; chat templates write theirs)

    @property
    def role_markers(self) -> tuple[str, ...]:
        """The strings that open and close a turn (without the whitespace around them): content must never
        hold one."""
        pieces = (self.first_human_prefix, self.human_suffix, self.between_turns)
        return tuple(dict.fromkeys(piece.strip() for piece in pieces if piece.strip()))


BLSP_TEMPLATE = PromptTemplate(
    name="blsp",
    first_human_prefix=HUMAN_PREFIX,
    human_suffix=TURN_SEPARATOR + ASSISTANT_PREFIX,
    between_turns=TURN_SEPARATOR + HUMAN_PREFIX,
    add_bos=True,
)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    """Read the pieces of the LLM's own chat template by rendering a conversation of sentinels."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the 'chat' prompt template needs a tokenizer with a chat template; use 'blsp'")
    u1, a1, u2 = _SENTINELS
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    opening = tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    first_prefix, suffix = opening.split(u1)
    return PromptTemplate(
        name="chat",
        first_human_prefix=first_prefix,
        human_suffix=suffix,
        between_turns=full.split(a1)[1].split(u2)[0],
        add_bos=False,
    )


def template_for(name: str, tokenizer: PreTrainedTokenizerBase) -> PromptTemplate:
    if name == "blsp":
        return BLSP_TEMPLATE
    if name == "chat":
        return chat_template_of(tokenizer)
    raise ValueError(f"unknown prompt template {name!r}; choose 'blsp' or 'chat'")


@dataclass
class RenderedPrompt:
    input_ids: list[int] = field(default_factory=list)
    speech_mask: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], *, learn: bool = False, speech: bool = False) -> None:
        self.input_ids.extend(ids)
        self.speech_mask.extend([speech] * len(ids))
        self.labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The strings a tokenizer reads as one special id even with add_special_tokens=False (BOS, EOS,
    `<|im_start|>`, ...): typed into content they would inject structure."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [t.content for t in added.values() if t.special and t.content] + list(tokenizer.all_special_tokens)


def neutral_text(text: str, markers: Sequence[str]) -> str:
    """`text` with every occurrence of each marker broken by MARKER_BREAK after its first character; repeated
    until none is left (a marker that overlaps itself can reappear once its first occurrence is broken)."""
    for marker in sorted(set(markers), key=len, reverse=True):
        if len(marker) < 2:
            continue
        broken = marker[0] + MARKER_BREAK + marker[1:]
        while marker in text:
            text = text.replace(marker, broken)
    return text


def _content_tokens(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, text: str,
                    opening: str = "") -> list[int]:
    """`opening` (template text) + content, tokenised together as before, the content unable to spell a
    role marker or a special token."""
    return _tokens(tokenizer, opening + neutral_text(text, (*template.role_markers, *special_strings(tokenizer))))


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer itself puts in front of a text (Llama: [BOS]; SmolLM2, Qwen: nothing)."""
    return tokenizer("").input_ids


def render(
    turns: Sequence[Turn],
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate = BLSP_TEMPLATE,
    *,
    speech_placeholder_id: int | None = None,
    add_eos: bool = False,
) -> RenderedPrompt:
    """Render turns (alternating human/assistant, starting with human). Labels are the assistant
    responses (and EOS after a final one when `add_eos`); everything else is IGNORE_INDEX.
    A conversation ending in a human turn ends with the assistant prefix, ready for generation."""
    _check_alternation(turns)
    placeholder = tokenizer.pad_token_id if speech_placeholder_id is None else speech_placeholder_id
    out = RenderedPrompt()
    if template.add_bos:
        out.add(bos_ids(tokenizer))
    for index, turn in enumerate(turns):
        if turn.role == "human":
            opening = template.first_human_prefix if index == 0 else template.between_turns
            words = " ".join(part for part in (turn.instruction, turn.text) if part)
            out.add(_content_tokens(tokenizer, template, words, opening))
            out.add([placeholder] * turn.speech_tokens, speech=True)
            out.add(_tokens(tokenizer, template.human_suffix))
        else:
            # Ids the model generated are kept as they are (the reply ended at a stop string or EOS); a reply
            # given as text (an API client's history) is content like any other.
            given = turn.token_ids
            ids = list(given) if given is not None else _content_tokens(tokenizer, template, turn.text)
            out.add(ids, learn=True)
    if add_eos and turns and turns[-1].role == "assistant":
        out.add([tokenizer.eos_token_id], learn=True)
    return out


def _check_alternation(turns: Sequence[Turn]) -> None:
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ValueError(f"turn {index} is {turn.role!r} but turns must alternate human/assistant "
                             "from a human turn")


def task_instruction(task: str, target: str = DEFAULT_TRANSLATION_TARGET,
                     labels: Sequence[str] = SNIPS_LIGHT_INTENTS) -> str:
    """The instruction of a task preset, with its target language or label list filled in."""
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_PRESETS)}")
    return TASK_PRESETS[task].format(target=target, labels=", ".join(labels))


# --- tokenizer rules -------------------------------------------------------------------------------
def eos_token_ids(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS, the LLM's generation config, known spellings."""
    ids = {tokenizer.eos_token_id}
    configured = llm.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TEXT_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def cut_at_stop(text: str) -> str:
    """The raw `###` format can run on into an invented next turn: keep only what precedes it."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()


def left_padded_batch(prompts: Sequence[RenderedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Rendered prompts -> input_ids, attention_mask, speech_mask (B, T), padded on the left so that
    every row's next token is generated at the same column."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    return {
        "input_ids": torch.tensor([[pad_id] * n + p.input_ids for n, p in zip(pads, prompts)]),
        "attention_mask": torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts)]),
        "speech_mask": torch.tensor([[False] * n + p.speech_mask for n, p in zip(pads, prompts)]),
    }


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only real tokens, so padding anywhere in a row does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
