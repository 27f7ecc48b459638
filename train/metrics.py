"""The metrics of the paper's evaluation (section 5, Tables 2-3), as pure functions of strings.

- WER (ASR): corpus-level, (substitutions + deletions + insertions) / reference words, after Whisper's
  English text normaliser on both sides (jiwer aligns the words). Whisper's normaliser also maps British
  to American spelling with a dictionary (`normalizer.json` beside a hub Whisper checkpoint); where that
  file is absent the mapping is empty and the summary says so.
- BLEU, chrF (ST): SacreBLEU corpus scores with its default tokeniser (13a; `zh` for Chinese targets),
  one reference per item. COMET only when the `comet` package and a model are available.
- Accuracy (SLU): the reply is mapped onto the label list by `map_label` (exact, case-insensitive,
  contained, closest); an unmappable or ambiguous reply counts as wrong and is counted on its own.
- Continuation closeness: how close the reply from speech is to the reply the LLM writes from the
  transcript (the behaviour the adapter is aligned on): corpus chrF and BLEU with the text reply as the
  reference, and the mean bag-of-words token F1 (SQuAD style) after the same normaliser. Identical
  replies score 100 / 100 / 1.0.
"""
from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SPELLING_MAPPING_FILE = "normalizer.json"  # what hub Whisper checkpoints ship beside the tokenizer
# A reply is mapped to the closest label only when their similarity (difflib ratio, 0..1) reaches this:
# a misspelt or re-spaced label ("switch light of") passes, an unrelated word does not.
LABEL_SIMILARITY_THRESHOLD = 0.75
SACREBLEU_TOKENIZERS = {"chinese": "zh", "japanese": "ja-mecab", "korean": "ko-mecab"}


# --- normalisation ---------------------------------------------------------------------------------
def load_spelling_mapping(whisper_dir: str | Path | None) -> dict[str, str]:
    """Whisper's British->American spelling dictionary from a checkpoint directory, or {} if absent."""
    if whisper_dir is None:
        return {}
    path = Path(whisper_dir) / SPELLING_MAPPING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class EnglishNormalizer:
    """Whisper's EnglishTextNormalizer (numbers, contractions, symbols, fillers removed), offline."""

    def __init__(self, spelling_mapping: dict[str, str] | None = None):
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        self.spelling_mapping = dict(spelling_mapping or {})
        self._normalize = EnglishTextNormalizer(self.spelling_mapping)

    def __call__(self, text: str) -> str:
        return self._normalize(text or "")


# --- ASR -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordErrors:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors per reference word (may exceed 1); an empty reference scores by its insertions."""
        return self.errors / self.reference_words if self.reference_words else float(self.insertions > 0)

    def __add__(self, other: "WordErrors") -> "WordErrors":
        return WordErrors(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.reference_words + other.reference_words)


def word_errors(reference: str, hypothesis: str, normalizer=None) -> WordErrors:
    """Word-level edit operations between two texts, after `normalizer` (None: as given)."""
    import jiwer

    if normalizer is not None:
        reference, hypothesis = normalizer(reference), normalizer(hypothesis)
    ref_words, hyp_words = reference.split(), hypothesis.split()
    if not ref_words or not hyp_words:  # jiwer rejects empty strings
        return WordErrors(0, len(ref_words), len(hyp_words), len(ref_words))
    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return WordErrors(out.substitutions, out.deletions, out.insertions, len(ref_words))


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str], normalizer=None) -> WordErrors:
    _check_pairs(references, hypotheses)
    return sum((word_errors(r, h, normalizer) for r, h in zip(references, hypotheses)), WordErrors())


# --- translation -----------------------------------------------------------------------------------
def sacrebleu_tokenizer(target_language: str | None) -> str:
    return SACREBLEU_TOKENIZERS.get((target_language or "").strip().lower(), "13a")


def bleu(hypotheses: Sequence[str], references: Sequence[str], target_language: str | None = None) -> float:
    """SacreBLEU corpus BLEU (0..100), one reference per hypothesis."""
    import sacrebleu

    _check_pairs(references, hypotheses)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)],
                                       tokenize=sacrebleu_tokenizer(target_language)).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """SacreBLEU corpus chrF (0..100)."""
    import sacrebleu

    _check_pairs(references, hypotheses)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def comet_score(sources: Sequence[str], hypotheses: Sequence[str], references: Sequence[str],
                model_path: str | None, batch_size: int = 8) -> tuple[float | None, str]:
    """COMET system score (0..1) and a note; None with the reason when it cannot run here."""
    if not model_path:
        return None, "COMET skipped: no COMET model given (--comet-model PATH to a downloaded checkpoint)"
    try:
        from comet import load_from_checkpoint
    except ImportError:
        return None, "COMET skipped: the `comet` package (unbabel-comet) is not installed"
    try:
        model = load_from_checkpoint(model_path)
    except Exception as err:  # a missing or damaged checkpoint: report, do not fail the run
        return None, f"COMET skipped: cannot load {model_path}: {err}"
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    result = model.predict(data, batch_size=batch_size, gpus=0, progress_bar=False)
    return float(result.system_score), f"COMET from {model_path}"


# --- classification --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMatch:
    label: str | None  # None: the reply names no label (or several)
    how: str           # exact | case | contained | closest | ambiguous | unmappable


def _words_of(text: str) -> str:
    """'SwitchLightOn.' -> 'switch light on': camelCase split, punctuation to spaces, lower case."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def map_label(reply: str, labels: Sequence[str], threshold: float = LABEL_SIMILARITY_THRESHOLD) -> LabelMatch:
    """Map a free-form reply onto one of `labels`, trying in order:
    exact (after stripping whitespace); case-insensitive (also ignoring punctuation and camelCase
    spacing: 'switch light on' = 'switchlighton' = 'SwitchLightOn'); contained (the reply holds exactly
    one label as whole words; a label inside a longer contained label does not count); closest (the highest
    difflib ratio between the label and the reply, or any window of the reply as many words long as the label,
    at least `threshold`, with no tie). A reply holding several labels is 'ambiguous' (an echo of the
    label list is not an answer); anything else is 'unmappable'."""
    stripped = reply.strip()
    if stripped in labels:
        return LabelMatch(stripped, "exact")
    folded = {_words_of(label): label for label in labels}
    reply_words = _words_of(stripped)
    compact = {w.replace(" ", ""): label for w, label in folded.items()}
    if reply_words in folded or reply_words.replace(" ", "") in compact:
        return LabelMatch(folded.get(reply_words) or compact[reply_words.replace(" ", "")], "case")
    padded = f" {reply_words} "
    contained = [w for w in folded if f" {w} " in padded]
    contained = [w for w in contained if not any(w != o and f" {w} " in f" {o} " for o in contained)]
    if len(contained) == 1:
        return LabelMatch(folded[contained[0]], "contained")
    if contained:
        return LabelMatch(None, "ambiguous")
    return _closest(reply_words, folded, threshold)


def _closest(reply_words: str, folded: dict[str, str], threshold: float) -> LabelMatch:
    scores = sorted(((_similarity(w, reply_words), w) for w in folded), reverse=True)
    if not scores or scores[0][0] < threshold:
        return LabelMatch(None, "unmappable")
    if len(scores) > 1 and scores[1][0] == scores[0][0]:
        return LabelMatch(None, "ambiguous")
    return LabelMatch(folded[scores[0][1]], "closest")


def _similarity(label_words: str, reply_words: str) -> float:
    """Best difflib ratio of the label against the whole reply and its windows of the label's size."""
    words, size = reply_words.split(), len(label_words.split())
    candidates = [reply_words] + [" ".join(words[i:i + size]) for i in range(max(len(words) - size + 1, 0))]
    # Compared without spaces too, so that 'switchlight on' and 'switch light on' agree.
    return max(max(difflib.SequenceMatcher(None, label_words, c).ratio(),
                   difflib.SequenceMatcher(None, label_words.replace(" ", ""), c.replace(" ", "")).ratio())
               for c in candidates)


# --- closeness of two texts ------------------------------------------------------------------------
def token_f1(prediction: str, reference: str, normalizer=None) -> float:
    """SQuAD-style bag-of-words F1 (0..1) between two texts; two empty texts agree (1.0)."""
    norm = normalizer or _words_of
    pred, ref = norm(prediction).split(), norm(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def continuation_closeness(speech_replies: Sequence[str], text_replies: Sequence[str],
                           normalizer=None) -> dict[str, float]:
    """How close the replies from speech are to the replies from the transcripts (module docstring)."""
    _check_pairs(text_replies, speech_replies)
    n = len(speech_replies)
    return {
        "chrf": chrf(speech_replies, text_replies),
        "bleu": bleu(speech_replies, text_replies),
        "token_f1": sum(token_f1(s, t, normalizer) for s, t in zip(speech_replies, text_replies)) / n if n else 0.0,
        "exact_match": sum(s.strip() == t.strip() for s, t in zip(speech_replies, text_replies)) / n if n else 0.0,
    }


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
