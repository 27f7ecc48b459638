"""Whole replies at once: one conversation or a left-padded batch of them (the CLI's one-shot path,
manifests, evaluation, data generation), their fallback decoding, and the sampling rule a streamed reply
takes its steps with (`next_token`).

A reply that loops is cut where it starts to say one phrase over and over (`loops_at_end`,
`GenerationOptions.loop_stop_tokens`) and can be decoded again at the temperatures of
`GenerationOptions.fallback_temperatures` (openai/whisper's fallback); a clip in which the readout heard no
words is refused (`NothingHeardError`) rather than handed to the LLM as an empty turn.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .audio import AudioError
from .config import GenerationOptions
from .constants import STOP_STRINGS
from .lock import model_lock
from .prompt import Turn, cut_at_stop, eos_token_ids, left_padded_batch, pad_token_id, render, template_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .model import BlspModel
    from .weights import LoadedBlsp


class NothingHeardError(AudioError):
    """A spoken clip in which the speech readout found no words (a CTC readout that hears only blanks).
    Handed nothing, the LLM would answer an empty turn with a made-up or looping reply, so the turn is
    refused instead, with what to do about it."""

    def __init__(self):
        super().__init__("No words were heard in the recording. Speak a little longer, more clearly or closer "
                         "to the microphone, or type the message.")


def all_heard(speech: Sequence[torch.Tensor]) -> bool:
    """Whether every clip's readout holds at least one vector (a word heard)."""
    return all(clip.shape[0] for clip in speech)


def check_heard(speech: Sequence[torch.Tensor]) -> None:
    """Raise NothingHeardError if a clip's readout holds no vectors."""
    if not all_heard(speech):
        raise NothingHeardError()


def speech_turn(audio: np.ndarray, model: BlspModel, instruction: str = "", text: str = "") -> Turn:
    """A spoken human turn laid out for `audio` (with the "ctc" readout its speech count is an upper
    bound, settled to the encoded length by `generate_replies`)."""
    return Turn("human", instruction=instruction, text=text, speech_tokens=model.speech_token_count(len(audio)))


def with_speech_lengths(turns: Sequence[Turn], speech: Sequence[torch.Tensor]) -> list[Turn]:
    """`turns` with each speech turn's position count set to its encoded clip's length (clips in turn order)."""
    spoken = sum(1 for t in turns if t.speech_tokens)
    if spoken != len(speech):
        raise ValueError(f"{len(speech)} speech clips for {spoken} spoken turns")
    clips = iter(speech)
    return [dataclasses.replace(t, speech_tokens=next(clips).shape[0]) if t.speech_tokens else t for t in turns]


def generate_reply(loaded: LoadedBlsp, turns: Sequence[Turn], audios: Sequence[np.ndarray] = (),
                   options: GenerationOptions = GenerationOptions()) -> str:
    """One reply to a conversation ending in a human turn; `audios` in the order of the speech turns.
    Raises NothingHeardError when the readout heard no words in one of the clips."""
    (reply,) = replies_if_heard(loaded, [turns], [audios], options)
    if reply is None:
        raise NothingHeardError()
    return reply


@torch.inference_mode()
def generate_replies(loaded: LoadedBlsp, conversations: Sequence[Sequence[Turn]],
                     audios: Sequence[Sequence[np.ndarray]],
                     options: GenerationOptions = GenerationOptions()) -> list[str]:
    """One reply per conversation (each ending in a human turn), generated as one left-padded batch.

    audios[i]: the clips of conversation i's speech turns, in order. Greedy replies equal those of
    `generate_reply` one by one (positions come from the attention mask, so padding does not
    shift them); each stops at EOS or `###`. A reply that loops (see `GenerationOptions.fallback_temperatures`)
    is decoded again, and the first try under the compression threshold is kept, else the least looping one.
    A conversation with a clip in which the readout heard no words gets the empty reply (no LLM call):
    scored against a transcript, that is every word missed, not a made-up sentence."""
    return [reply or "" for reply in replies_if_heard(loaded, conversations, audios, options)]


def replies_if_heard(loaded: LoadedBlsp, conversations: Sequence[Sequence[Turn]],
                     audios: Sequence[Sequence[np.ndarray]], options: GenerationOptions) -> list[str | None]:
    """`generate_replies`, with None for each conversation that has a clip heard as nothing."""
    replies = _generate_batch(loaded, conversations, audios, options)
    for step, temperature in enumerate(options.fallback_temperatures):
        looping = [i for i, reply in enumerate(replies)
                   if reply is not None and compression_ratio(reply) > options.compression_ratio_threshold]
        if not looping:
            break
        device = loaded.model.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG is left alone
            torch.manual_seed(step)  # the same inputs give the same replies on every run
            retries = _generate_batch(loaded, [conversations[i] for i in looping], [audios[i] for i in looping],
                                      options.sampled_at(temperature))
        for i, retry in zip(looping, retries):
            if compression_ratio(retry) < compression_ratio(replies[i]):
                replies[i] = retry
    return replies


def compression_ratio(text: str) -> float:
    """How well `text` compresses (openai/whisper's loop detector): below about 1.5 for an ordinary
    sentence, above 2.4 for a phrase said over and over."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def encoded_batch(loaded: LoadedBlsp, conversations: Sequence[Sequence[Turn]],
                  audios: Sequence[Sequence[np.ndarray]]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Conversations -> their left-padded batch (`prompt.left_padded_batch`) and the encoded speech, in order.
    The clips are encoded first: with a content-dependent readout the prompts can be laid out only then.
    Raises NothingHeardError if the readout heard no words in a clip."""
    speech = loaded.model.encode_speech([a for clips in audios for a in clips])
    check_heard(speech)
    return _laid_out(loaded, conversations, _per_conversation(speech, audios)), speech


def _per_conversation(speech: Sequence[torch.Tensor],
                      audios: Sequence[Sequence[np.ndarray]]) -> list[list[torch.Tensor]]:
    clips = iter(speech)
    return [[next(clips) for _ in conversation] for conversation in audios]


def _laid_out(loaded: LoadedBlsp, conversations: Sequence[Sequence[Turn]],
              speech: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Conversations and their encoded clips -> the left-padded batch."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.speech_length_varies:
        conversations = [with_speech_lengths(turns, clips) for turns, clips in zip(conversations, speech)]
    template = template_for(model.config.prompt_template, tokenizer)
    prompts = [render(turns, tokenizer, template) for turns in conversations]
    return left_padded_batch(prompts, pad_token_id(tokenizer))


def _generate_batch(loaded: LoadedBlsp, conversations: Sequence[Sequence[Turn]],
                    audios: Sequence[Sequence[np.ndarray]], options: GenerationOptions) -> list[str | None]:
    """One batch's replies; None for a conversation with a clip heard as nothing (it is left out of the batch)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = eos_token_ids(tokenizer, model.llama_model)
    replies: list[str | None] = [None] * len(conversations)
    with model_lock(model):
        speech = _per_conversation(model.encode_speech([a for clips in audios for a in clips]), audios)
        heard = [i for i, clips in enumerate(speech) if all_heard(clips)]
        if not heard:
            return replies
        batch = _laid_out(loaded, [conversations[i] for i in heard], [speech[i] for i in heard])
        new_ids = model.generate(**batch, speech_embeds=[clip for i in heard for clip in speech[i]], options=options,
                                 eos_token_id=eos, pad_token_id=pad_token_id(tokenizer),
                                 stop_strings=list(STOP_STRINGS), tokenizer=tokenizer,
                                 stopping_criteria=loop_stopping(options))
    for i, row in zip(heard, new_ids):
        replies[i] = _reply_text(row.tolist(), set(eos), tokenizer)
    return replies


def _reply_text(ids: list[int], eos: set[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """A row of new ids -> the reply: up to the first EOS (finished rows are padded with it), cut at `###`."""
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return cut_at_stop(tokenizer.decode(ids[:end], skip_special_tokens=True))


# --- sampling ------------------------------------------------------------------------------------
def sampling_processors(options: GenerationOptions) -> LogitsProcessorList:
    """transformers' logits processors for `options`, in the order its `generate` applies them: the
    repetition penalty, then (when sampling) temperature and top-p. A no-op setting adds none, as there."""
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.do_sample:
        processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1.0:
            processors.append(TopPLogitsWarper(options.top_p))
    return processors


def next_token(logits: torch.Tensor, previous: Sequence[int], options: GenerationOptions,
               generator: torch.Generator | None = None) -> int:
    """logits (V,) of the last position, the ids generated so far -> the next id: greedy, or sampled."""
    scores = sampling_processors(options)(torch.tensor([list(previous)], dtype=torch.long, device=logits.device),
                                          logits.float()[None])[0]
    if not options.do_sample:
        return int(scores.argmax())
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


# --- loops ---------------------------------------------------------------------------------------
LOOP_REPEATS = 3  # copies of one phrase in a row that make a loop (two can be a figure of speech)


def loops_at_end(ids: Sequence[int], min_tokens: int) -> bool:
    """Whether `ids` end in one phrase said LOOP_REPEATS times or more in a row, the copies spanning at
    least `min_tokens` tokens ("a secret a secret a secret ..."). min_tokens 0 or less: never."""
    if min_tokens <= 0:
        return False
    ids = list(ids)
    n = len(ids)
    for period in range(1, n // LOOP_REPEATS + 1):
        phrase, copies = ids[n - period:], 1
        while (copies + 1) * period <= n and ids[n - (copies + 1) * period:n - copies * period] == phrase:
            copies += 1
        if copies >= LOOP_REPEATS and copies * period >= min_tokens:
            return True
    return False


class LoopStop(StoppingCriteria):
    """transformers' stopping criterion for `loops_at_end`, row by row over the new ids (generation from
    embeddings passes only those)."""

    def __init__(self, min_tokens: int):
        self.min_tokens = min_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([loops_at_end(row.tolist(), self.min_tokens) for row in input_ids],
                            dtype=torch.bool, device=input_ids.device)


def loop_stopping(options: GenerationOptions) -> StoppingCriteriaList:
    return StoppingCriteriaList([LoopStop(options.loop_stop_tokens)] if options.loop_stop_tokens else [])
