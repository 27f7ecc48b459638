"""CTC prefix beam search with a language model fused in (shallow fusion).

A CTC-trained adapter labels each of its outputs with one of the LLM's word pieces or the blank. Greedy
decoding takes each output's best label; a name the adapter heard rarely in training loses there to a
common word that sounds alike ("capital of friends"). Prefix beam search keeps `beam_size` candidate
transcripts and scores each by its acoustic log-probability plus `lm_weight` times the language model's
log-probability of its word pieces, plus `token_bonus` per piece (the LM's scores would otherwise favour
short transcripts). Here the LM is the frozen LLM itself, so the transcript it is handed is one it finds
plausible: "capital of france".

The decoder is pure tensor code; the LM is a callable, so it is tested without any model. An LM that
reads ahead (the KV-cached LLM, prefix_scorer.py) has an `expect(pieces)` method: before each call the
search hands it the pieces the next outputs most likely add (their best labels, collapsed), so that it can
read them in the same forward. That changes what the LM computes when, never which beams are found.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Prefix = tuple[int, ...]
# prefixes -> (N, V) log-probabilities of the next word piece after each prefix
LmScorer = Callable[[Sequence[Prefix]], torch.Tensor]

NEG_INF = -math.inf
BLANK_CLASS = 0  # a character head's blank; characters.BLANK is this one (characters.py imports this module)
# Outputs whose blank probability exceeds this only extend beams by the blank: most outputs of a clip are
# blank, and skipping them saves the LM calls they would cost without changing any beam's ranking measurably.
BLANK_SKIP_PROBABILITY = 0.999
# Characters per output the character search tries: a character head is sure of most outputs, and each
# space tried ends a word, which costs the LM a read of that word's pieces.
CHARACTER_BEAM_LABELS = 4
# ... and only those at least this likely (1%): a space tried at every output would have the LM read a
# word ending at every character.
CHARACTER_MIN_LOG_PROB = math.log(0.01)
# What the LM is expected to charge per character (natural log) until the word it belongs to ends and the
# LM's own score replaces the estimate. Without it, a beam that never ends a word never pays the LM and
# outranks every beam that does: the search ran all words together (train/results/base_context_adapter.md).
# SmolLM2-135M charges 1.39 nats a character on the dev people's transcripts, spaces included.
CHARACTER_LM_ESTIMATE = -1.4
# How many of the next outputs' best labels an LM that reads ahead is told about: a few seconds of speech,
# a handful of word pieces.
LOOKAHEAD_OUTPUTS = 24


def collapse_ctc(ids: list[int], blank_id: int) -> list[int]:
    """Greedy CTC decoding of the adapter's labels: merge runs of the same class, then drop the blank."""
    return [i for n, i in enumerate(ids) if i != blank_id and (n == 0 or ids[n - 1] != i)]


def _logsumexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    high = max(a, b)
    return high + math.log(math.exp(a - high) + math.exp(b - high))


class _Beams:
    """prefix -> (log p of paths ending in blank, log p of paths ending in the prefix's last piece)."""

    def __init__(self) -> None:
        self.scores: dict[Prefix, tuple[float, float]] = {}

    def add(self, prefix: Prefix, blank: float = NEG_INF, label: float = NEG_INF) -> None:
        old_blank, old_label = self.scores.get(prefix, (NEG_INF, NEG_INF))
        self.scores[prefix] = (_logsumexp(old_blank, blank), _logsumexp(old_label, label))

    def best(self, count: int, prune_log_prob: float = NEG_INF) -> dict[Prefix, tuple[float, float]]:
        """The `count` best beams, without those more than `-prune_log_prob` below the best."""
        ranked = sorted(self.scores.items(), key=lambda item: -_logsumexp(*item[1]))[:count]
        floor = _logsumexp(*ranked[0][1]) + prune_log_prob
        return {prefix: scores for prefix, scores in ranked if _logsumexp(*scores) >= floor}


def prefix_beam_search(top_log_probs: torch.Tensor, top_ids: torch.Tensor, blank_id: int, lm: LmScorer | None,
                       *, lm_weight: float = 0.0, token_bonus: float = 0.0, beam_size: int = 4,
                       label_min_log_prob: float = NEG_INF, beam_prune_log_prob: float = NEG_INF) -> list[int]:
    """The best word-piece sequence for (L, k) log-probabilities of each output's k best labels and their ids.

    With `lm` None or `lm_weight` 0 this is plain CTC prefix beam search over those labels.
    Two prunings (as pyctcdecode's `token_min_logp` and `beam_prune_logp`) spare LM calls: labels below
    `label_min_log_prob` are not tried (an output's best label always is), and beams scoring more than
    `-beam_prune_log_prob` below the best after an output are dropped. Each beam kept costs the LM a read.
    """
    beams = {(): (0.0, NEG_INF)}
    blank_skip = math.log(BLANK_SKIP_PROBABILITY)
    expect = getattr(lm, "expect", None)
    best_labels = top_ids[:, 0].tolist()
    for output, (log_probs, ids) in enumerate(zip(top_log_probs.tolist(), top_ids.tolist())):
        candidates = [(label, log_p) for n, (label, log_p) in enumerate(zip(ids, log_probs))
                      if n == 0 or log_p >= label_min_log_prob]
        if ids[0] == blank_id and log_probs[0] > blank_skip:
            candidates = candidates[:1]
        fused = lm is not None and lm_weight > 0 and any(c != blank_id for c, _ in candidates)
        if fused and expect is not None:
            expect(collapse_ctc(best_labels[output:output + LOOKAHEAD_OUTPUTS], blank_id))
        lm_rows = dict(zip(beams, lm(list(beams)))) if fused else {}
        step = _Beams()
        for prefix, (p_blank, p_label) in beams.items():
            total = _logsumexp(p_blank, p_label)
            for label, log_p in candidates:
                if label == blank_id:
                    step.add(prefix, blank=total + log_p)
                    continue
                extend = token_bonus + (lm_weight * float(lm_rows[prefix][label]) if fused else 0.0)
                if prefix and prefix[-1] == label:
                    step.add(prefix, label=p_label + log_p)                        # the same piece, held
                    step.add(prefix + (label,), label=p_blank + log_p + extend)    # repeated after a blank
                else:
                    step.add(prefix + (label,), label=total + log_p + extend)
        beams = step.best(beam_size, beam_prune_log_prob)
    return list(max(beams.items(), key=lambda item: _logsumexp(*item[1]))[0])


def cached_lm(score_batch: LmScorer) -> LmScorer:
    """Memoise an LmScorer over one decode: beams share prefixes from one output to the next."""
    cache: dict[Prefix, torch.Tensor] = {}

    def score(prefixes: Sequence[Prefix]) -> list[torch.Tensor]:
        missing = [p for p in dict.fromkeys(prefixes) if p not in cache]
        if missing:
            cache.update(zip(missing, score_batch(missing)))
        return [cache[p] for p in prefixes]

    return score


def character_beam_search(log_probs: torch.Tensor, alphabet: Sequence[str], word_pieces: Callable[[str], list[int]],
                          lm: LmScorer | None, *, lm_weight: float = 0.0, token_bonus: float = 0.0,
                          beam_size: int = 4, label_min_log_prob: float = CHARACTER_MIN_LOG_PROB,
                          beam_prune_log_prob: float = NEG_INF) -> str:
    """The best text for a character head's (L, N+1) log-probabilities (blank = class 0, class i the
    alphabet's symbol i - 1: a character, or several), by CTC prefix beam search over each output's
    CHARACTER_BEAM_LABELS best classes, with the LM fused in at word boundaries.

    A word is scored when it is complete (a space follows it, or the clip ends): `lm_weight` times the LM's
    log-probability of its word pieces (`word_pieces(" " + word)`) after those of the words before it, plus
    `token_bonus` per piece, as `prefix_beam_search` scores word pieces. Until then each of its characters
    carries `lm_weight` x CHARACTER_LM_ESTIMATE, which the word's score replaces. A space where no word
    precedes it changes no text, as greedy decoding collapses it. The prunings are `prefix_beam_search`'s.
    A beam is its text and the last symbol it emitted: that symbol again, with no blank between, is held.
    """
    space = list(alphabet).index(" ") + 1
    fused = lm is not None and lm_weight > 0
    estimate = lm_weight * CHARACTER_LM_ESTIMATE if fused else 0.0
    word_score = _word_scorer(word_pieces, cached_lm(lm) if fused else None, lm_weight, token_bonus)

    def score_word(text: str) -> float:  # the word that just ended: its score, less the estimate it carried
        return word_score(text) - estimate * len(text.split()[-1])

    beams: dict[tuple[str, int], tuple[float, float]] = {("", BLANK_CLASS): (0.0, NEG_INF)}
    blank_skip = math.log(BLANK_SKIP_PROBABILITY)
    for row in log_probs.tolist():
        ranked = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:CHARACTER_BEAM_LABELS]
        if ranked[0] == BLANK_CLASS and row[BLANK_CLASS] > blank_skip:
            candidates = [BLANK_CLASS]
        else:
            candidates = [c for n, c in enumerate(ranked) if n == 0 or row[c] >= label_min_log_prob]
        step = _Beams()
        for (text, last), (p_blank, p_label) in beams.items():
            total = _logsumexp(p_blank, p_label)
            for label in candidates:
                log_p = row[label]
                if label == BLANK_CLASS or (label == space and (not text or text[-1] == " ")):
                    step.add((text, last), blank=total + log_p)  # the blank, or a space that adds nothing
                    continue
                symbol = alphabet[label - 1]
                extend = score_word(text) if label == space else estimate * len(symbol)
                if label == last:
                    step.add((text, last), label=p_label + log_p)                      # held
                    step.add((text + symbol, label), label=p_blank + log_p + extend)   # again, after a blank
                else:
                    step.add((text + symbol, label), label=total + log_p + extend)
        beams = step.best(beam_size, beam_prune_log_prob)
    finished: dict[str, float] = {}
    for (text, _), scores in beams.items():
        score = _logsumexp(*scores) + (score_word(text) if text and text[-1] != " " else 0.0)
        finished[text] = _logsumexp(finished.get(text, NEG_INF), score)  # one text, several last symbols
    return max(finished, key=finished.__getitem__).strip()


def _word_scorer(word_pieces: Callable[[str], list[int]], lm: LmScorer | None, lm_weight: float,
                 token_bonus: float) -> Callable[[str], float]:
    """text whose last word just ended -> that word's fused score: lm_weight x the LM's log-probability of its
    pieces after the pieces of the words before it, plus token_bonus per piece. Memoised per word sequence."""
    pieces_of: dict[str, list[int]] = {}
    scores: dict[tuple[str, ...], float] = {}

    def pieces(word: str) -> list[int]:
        if word not in pieces_of:
            pieces_of[word] = word_pieces(" " + word)
        return pieces_of[word]

    def score(text: str) -> float:
        words = tuple(text.split())
        if words not in scores:
            new = pieces(words[-1])
            fused = 0.0
            if lm is not None:
                context = tuple(p for w in words[:-1] for p in pieces(w))
                rows = lm([context + tuple(new[:i]) for i in range(len(new))])
                fused = lm_weight * sum(float(row[p]) for row, p in zip(rows, new))
            scores[words] = fused + token_bonus * len(new)
        return scores[words]

    return score
