"""Turning a conversation into a reply: rendering, stop rules and decoding around BlspModel.generate."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import GenerationOptions
from .constants import STOP_STRINGS
from .prompt import Turn, render, template_for

# End-of-text spellings of common LLM families; any present in the vocabulary ends a reply.
END_OF_TEXT_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def eos_token_ids(tokenizer, llm) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS, the LLM's generation config, known spellings."""
    ids = {tokenizer.eos_token_id}
    configured = llm.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TEXT_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


def cut_at_stop(text: str) -> str:
    """The raw `###` format can run on into an invented next turn: keep only what precedes it."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()


def speech_turn(audio: np.ndarray, model, instruction: str = "", text: str = "") -> Turn:
    return Turn("human", instruction=instruction, text=text, speech_tokens=model.speech_token_count(len(audio)))


@torch.inference_mode()
def generate_reply(loaded, turns: Sequence[Turn], audios: Sequence[np.ndarray] = (), options: GenerationOptions = GenerationOptions()) -> str:
    """One reply to a conversation ending in a human turn; `audios` in the order of the speech turns."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = render(turns, tokenizer, template_for(model.config.prompt_template, tokenizer))
    ids = torch.tensor([prompt.input_ids])
    new_ids = model.generate(
        ids, torch.ones_like(ids), torch.tensor([prompt.speech_mask]), audios=list(audios), options=options,
        eos_token_id=eos_token_ids(tokenizer, model.llama_model), pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(STOP_STRINGS), tokenizer=tokenizer,
    )
    return cut_at_stop(tokenizer.decode(new_ids[0], skip_special_tokens=True))
