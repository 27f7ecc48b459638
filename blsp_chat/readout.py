"""Speech readouts: one clip's adapter outputs (L, d_llm) -> the vectors the LLM reads in its place.

- "embeddings" (the paper's): the adapter outputs themselves.
- "ctc" (as in LegoSLM): a CTC-trained adapter's outputs are classified by their distance to the LLM's word
  embeddings, and each word piece heard becomes one vector in the span of those embeddings (`ctc_readout`).
- "ctc" with a character head (BlspConfig.ctc_alphabet): the text the head spells (greedily, or with an LM
  weight by the character search with the LLM fused in at word boundaries), as the LLM's word pieces
  (`character_readout`).
- "ctc" with an LM weight: the word pieces are found by prefix beam search (`ctc_decode.py`) with the LLM as
  its language model, passed in as a scorer (`prefix_scorer.KvCachedPrefixScorer`), and read as their
  embeddings (`lm_fused_readout`). That runs the LLM, once per forward of the scorer, each inside the
  guard the caller of `BlspModel.encode_speech` passes (a chat session's: the model lock, so that other
  sessions' steps run between the forwards of a long clip).
Everything here is pure tensor code over what it is handed: the embedding table, the config, the scorer.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel

from .characters import greedy_characters
from .config import BlspConfig
from .ctc_decode import CHARACTER_MIN_LOG_PROB, LmScorer, character_beam_search, prefix_beam_search
from .prefix_scorer import scoring_start_id
from .prompt import position_ids_from_mask

# Labels per adapter output the LM-fused readout considers: the right word piece is nearly always among
# the first few, and each extra one multiplies the beams the LLM scores.
CTC_BEAM_LABELS = 8


def read_out(speech: torch.Tensor, table: torch.Tensor, config: BlspConfig,
             new_scorer: Callable[[], LmScorer]) -> torch.Tensor:
    """One clip's adapter outputs (L, d_llm) -> the vectors the LLM reads (see BlspConfig.speech_readout).
    table: the LLM's (V, d_llm) input embeddings; new_scorer: a fresh LM scorer for one decode (called only
    by the LM-fused readout)."""
    if config.speech_readout == "embeddings":
        return speech
    if config.ctc_lm_weight > 0:
        return lm_fused_readout(speech, table, new_scorer(), config)
    return ctc_readout(speech, table, config.ctc_blank_id, config.ctc_readout_temperature)


def character_readout(logits: torch.Tensor, table: torch.Tensor, config: BlspConfig,
                      word_pieces: Callable[[str], list[int]], new_scorer: Callable[[], LmScorer]) -> torch.Tensor:
    """A character head's (L, N+1) scores for one clip -> the embeddings of the word pieces of the text it
    spelled: (L', d), L' <= L since every piece holds at least one character. Nothing heard: (0, d).
    Greedy CTC, or with an LM weight the character search with `new_scorer()` (the LLM) fused in."""
    text = heard_characters(logits, config, word_pieces, new_scorer)
    ids = word_pieces(text) if text else []
    return table[torch.tensor(ids, dtype=torch.long, device=table.device)]


def heard_characters(logits: torch.Tensor, config: BlspConfig, word_pieces: Callable[[str], list[int]],
                     new_scorer: Callable[[], LmScorer]) -> str:
    """The text a character head's (L, N+1) scores spell, by the search the config names."""
    if config.ctc_lm_weight <= 0:
        return greedy_characters(logits, config.ctc_alphabet)
    return character_beam_search(
        logits.float().log_softmax(-1), config.ctc_alphabet, word_pieces, new_scorer(),
        lm_weight=config.ctc_lm_weight, token_bonus=config.ctc_token_bonus, beam_size=config.ctc_beam_size,
        label_min_log_prob=(CHARACTER_MIN_LOG_PROB if config.ctc_label_min_log_prob is None
                            else config.ctc_label_min_log_prob),
        beam_prune_log_prob=_no_floor_if_none(config.ctc_beam_prune_log_prob))


def embedding_distance_logits(speech: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """(..., d) speech vectors x, (V, d) word embeddings e -> (..., V) logits -||x - e||^2 up to a per-row
    constant (2 x.e - ||e||^2): the nearest embedding wins, and a vector is pulled towards the embedding
    itself, not only along its direction, which is what the LLM reads."""
    embeddings = embeddings.float()
    return 2 * speech.float() @ embeddings.T - (embeddings * embeddings).sum(-1)


READOUT_CHUNK = 256  # adapter outputs scored at once: bounds the (chunk, V) logits to ~50 MB for V=49k
# Words of each output's posterior that are kept: at the readout's low temperatures the rest carry
# less than exp(-50) of it, and skipping them spares a second (chunk, V) x (V, d) product.
READOUT_TOP_K = 64


def ctc_label_candidates(speech: torch.Tensor, embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each output's k most likely CTC labels: (L, k) log-probabilities (as the CTC loss scores them) and ids."""
    table = embeddings.float()
    values, ids = [], []
    for chunk in speech.split(READOUT_CHUNK):
        top = embedding_distance_logits(chunk, table).log_softmax(-1).topk(min(k, table.shape[0]), dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


def ctc_readout(speech: torch.Tensor, embeddings: torch.Tensor, blank_id: int, temperature: float) -> torch.Tensor:
    """CTC-compressed readout (as in LegoSLM): (L, d) adapter outputs -> (L', d) vectors, L' <= L.

    Each output is classified by its distance to the (V, d) word embeddings, as the CTC loss trained it.
    Runs of outputs with the same nearest word form a segment (greedy CTC decoding); blank segments are
    dropped, and each other segment becomes its mean posterior (softmax of the logits / temperature, over
    each output's READOUT_TOP_K nearest words) times the embedding table: one vector per word piece,
    inside the span of the LLM's own word embeddings.
    Low temperatures approach the nearest word's embedding. A clip heard as all blank reads as nothing: (0, d).
    """
    if speech.shape[0] == 0:
        return speech
    table = embeddings.float()
    labels, expected = [], []  # per output: its nearest word, and posterior @ table (mean commutes with @)
    for chunk in speech.split(READOUT_CHUNK):
        top, words = embedding_distance_logits(chunk, table).topk(min(READOUT_TOP_K, table.shape[0]), dim=-1)
        labels.append(words[:, 0])
        posterior = torch.softmax(top / temperature, dim=-1)
        expected.append(torch.einsum("lk,lkd->ld", posterior, table[words]))
    labels = torch.cat(labels)
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[1:] = labels[1:] != labels[:-1]
    segment_of = starts.cumsum(0) - 1
    keep = labels[starts] != blank_id
    if not keep.any():
        return speech[:0]
    sums = torch.zeros(len(keep), table.shape[1], device=speech.device).index_add_(0, segment_of, torch.cat(expected))
    sizes = torch.bincount(segment_of, minlength=len(keep)).to(sums.dtype)
    return (sums[keep] / sizes[keep, None]).to(speech.dtype)


def lm_fused_readout(speech: torch.Tensor, table: torch.Tensor, scorer: LmScorer, config: BlspConfig) -> torch.Tensor:
    """The "ctc" readout decoded by prefix beam search with `scorer` (the LLM) as its language model: the
    embeddings of the word pieces found (none if it heard only blanks). The KV-cached scorer reads each new
    beam as one decode step over its parent's cached keys and values."""
    if speech.shape[0] == 0:
        return speech
    log_probs, ids = ctc_label_candidates(speech, table, CTC_BEAM_LABELS)
    pieces = prefix_beam_search(log_probs, ids, config.ctc_blank_id, scorer, lm_weight=config.ctc_lm_weight,
                                token_bonus=config.ctc_token_bonus, beam_size=config.ctc_beam_size,
                                label_min_log_prob=_no_floor_if_none(config.ctc_label_min_log_prob),
                                beam_prune_log_prob=_no_floor_if_none(config.ctc_beam_prune_log_prob))
    return table[torch.tensor(pieces, dtype=torch.long, device=table.device)].to(speech.dtype)


def _no_floor_if_none(log_prob: float | None) -> float:
    return -math.inf if log_prob is None else log_prob


@torch.no_grad()
def next_piece_log_probs(llm: PreTrainedModel, prefixes: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """(N, V) log-probabilities of the LLM's next word piece after each prefix, as plain text, each
    prefix read from its start: the reference the KV-cached scorer of the readout is checked against."""
    start = scoring_start_id(llm.config)
    rows = [[start, *prefix] for prefix in prefixes]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):  # left-padded, so every row's last position is its next piece
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    logits = llm(input_ids=ids.to(llm.device), attention_mask=mask.to(llm.device),
                 position_ids=position_ids_from_mask(mask).to(llm.device)).logits[:, -1]
    return logits.float().log_softmax(-1).cpu()
