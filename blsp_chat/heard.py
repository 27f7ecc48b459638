"""What the model heard in a spoken turn, as words: the "ctc" readouts hand the LLM one vector per word
piece (the embedding of the piece heard, or a posterior mean at the readout's low temperature right next
to it), so the nearest word embedding of each vector names the piece. Read from the vectors the turn
already computed: no second pass through the encoder. The "embeddings" readout (the paper's) has no words.
"""
from __future__ import annotations

import torch

from .readout import READOUT_CHUNK, embedding_distance_logits


def heard_piece_ids(model, speech: torch.Tensor) -> list[int] | None:
    """(L, d_llm) vectors the LLM reads for one clip -> the word-piece ids they stand for; None when the
    model's readout does not read out words."""
    if not model.speech_length_varies:
        return None
    table = model.llama_model.get_input_embeddings().weight
    with torch.inference_mode():
        return [i for chunk in speech.split(READOUT_CHUNK)
                for i in embedding_distance_logits(chunk, table).argmax(-1).tolist()]


def heard_text(model, tokenizer, speech: torch.Tensor) -> str | None:
    """The words the model heard in one clip ("" when it heard none); None for a readout without words."""
    ids = heard_piece_ids(model, speech)
    if ids is None:
        return None
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
