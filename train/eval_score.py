"""Scoring an evaluation run's records: one scorer per task (the metrics are train/metrics.py's), the
summary with its headline metric, and the QA judge of paper Listing 2 (verdicts cached resumably)."""
from __future__ import annotations

import dataclasses
import importlib
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from . import metrics
from .eval_run import EvalSettings, Judge, OutputsFile

# Listing 2 of the paper: the judge prompt of the general-purpose QA evaluation.
JUDGE_PROMPT = (
    "Given a question, related input, and answer, please help determine whether the\n"
    "answer is acceptable.\nThe output choose from acceptable or unacceptable.\n"
    "Question: {question}\nInput: {transcript}\nAnswer: {answer}\nYour output:"
)


def score_asr(records: Sequence[dict], settings: EvalSettings) -> dict:
    normalizer = metrics.EnglishNormalizer(settings.spelling_mapping)
    references = [r.get("reference") or r.get("text") or "" for r in records]
    errors = metrics.corpus_wer(references, [r["reply"] for r in records], normalizer)
    values = {"wer": 100 * errors.wer, "substitutions": errors.substitutions, "deletions": errors.deletions,
              "insertions": errors.insertions, "reference_words": errors.reference_words}
    return {"metrics": values, "headline": {"metric": "WER", "value": values["wer"], "higher_is_better": False}}


def score_st(records: Sequence[dict], settings: EvalSettings) -> dict:
    hypotheses, references = [r["reply"] for r in records], [r["reference"] for r in records]
    values = {"bleu": metrics.bleu(hypotheses, references, settings.target_language),
              "chrf": metrics.chrf(hypotheses, references),
              "sacrebleu_tokenize": metrics.sacrebleu_tokenizer(settings.target_language)}
    comet, note = metrics.comet_score([r.get("text", "") for r in records], hypotheses, references,
                                      settings.comet_model)
    values["comet"] = comet
    return {"metrics": values, "notes": [note],
            "headline": {"metric": "BLEU", "value": values["bleu"], "higher_is_better": True}}


def score_slu(records: Sequence[dict], settings: EvalSettings) -> dict:
    matches = [metrics.map_label(r["reply"], settings.labels) for r in records]
    correct = sum(m.label is not None and m.label.casefold() == str(r["label"]).casefold()
                  for m, r in zip(matches, records))
    kinds = ("exact", "case", "contained", "closest", "ambiguous", "unmappable")
    how = {kind: sum(m.how == kind for m in matches) for kind in kinds}
    values = {"accuracy": 100 * correct / len(records) if records else 0.0, "correct": correct,
              "unmappable": how["unmappable"] + how["ambiguous"], "mapped_by": how, "labels": list(settings.labels)}
    return {"metrics": values, "predictions": {r["id"]: m.label for r, m in zip(records, matches)},
            "headline": {"metric": "ACC", "value": values["accuracy"], "higher_is_better": True}}


def score_continuation(records: Sequence[dict], settings: EvalSettings) -> dict:
    normalizer = metrics.EnglishNormalizer(settings.spelling_mapping)
    values = metrics.continuation_closeness([r["reply"] for r in records], [r["reference_reply"] for r in records],
                                            normalizer)
    return {"metrics": values, "headline": {"metric": "chrF", "value": values["chrf"], "higher_is_better": True}}


def score_qa(records: Sequence[dict], settings: EvalSettings, verdicts: dict | None = None) -> dict:
    values: dict = {"answers": len(records)}
    with_reference = [r for r in records if r.get("reference")]
    if with_reference:
        f1s = [metrics.token_f1(r["reply"], r["reference"]) for r in with_reference]
        values["token_f1_vs_reference"] = sum(f1s) / len(f1s)
    judged = [v for v in (verdicts or {}).values() if v is not None]
    if not verdicts:
        return {"metrics": values, "notes": ["no judge configured: answers written for review"],
                "headline": {"metric": "answers", "value": len(records), "higher_is_better": True}}
    values.update(judged=len(judged), accept_rate=100 * sum(judged) / len(judged) if judged else 0.0)
    return {"metrics": values,
            "headline": {"metric": "Accept", "value": values["accept_rate"], "higher_is_better": True}}


def summarize(records: Sequence[dict], settings: EvalSettings, verdicts: dict | None = None) -> dict:
    scorer = {"asr": score_asr, "st": score_st, "slu": score_slu, "continuation": score_continuation}.get(settings.task)
    scored = score_qa(records, settings, verdicts) if settings.task == "qa" else scorer(records, settings)
    failed = sum("error" in r for r in records)
    notes = list(settings.notes) + scored.pop("notes", [])
    if failed:
        notes.append(f"{failed} items could not be read and were scored as empty replies (see their 'error')")
    if settings.task in ("asr", "continuation") and not settings.spelling_mapping:
        notes.append("Whisper's British->American spelling map (normalizer.json) was not found: normalised without it")
    return {
        "task": settings.task, "system": settings.system, "label": settings.row_label, "model": settings.model,
        "dataset": settings.dataset, "items": len(records), "failed": failed, **scored, "notes": notes,
        "settings": {"batch_size": settings.batch_size, "target_language": settings.target_language,
                     "instruction": settings.instruction, "speech_search": settings.speech_search,
                     "generation": dataclasses.asdict(settings.options)},
    }


def headline_line(summary: dict) -> str:
    """The last printed line of a run: `asr smoke BLSP: WER↓ 12.5 (12 items)`."""
    return (f"{summary['task']} {summary['dataset']} {summary['label']}: {metric_label(summary['headline'])} "
            f"{format_value(summary['headline']['value'])} ({summary['items']} items)")


def metric_label(headline: dict) -> str:
    """The headline metric's name with the direction that is better (none for a plain count of answers)."""
    if headline["metric"] == "answers":
        return headline["metric"]
    return headline["metric"] + ("↑" if headline["higher_is_better"] else "↓")


def format_value(value) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


# --- judge (qa) -----------------------------------------------------------------------------------
def parse_verdict(text: str) -> bool | None:
    """'unacceptable' -> False, 'acceptable' -> True, anything else -> None (not judged)."""
    lowered = text.lower()
    if "unacceptable" in lowered:
        return False
    return True if "acceptable" in lowered else None


def command_judge(command: str) -> Judge:
    """A judge that runs a shell command with the paper's Listing-2 prompt on stdin and reads its verdict."""
    def judge(question: str, transcript: str, answer: str) -> bool | None:
        prompt = JUDGE_PROMPT.format(question=question, transcript=transcript, answer=answer)
        result = subprocess.run(shlex.split(command), input=prompt, capture_output=True, text=True, check=True)
        return parse_verdict(result.stdout)
    return judge


def callable_judge(spec: str) -> Judge:
    """'package.module:function' -> that function (question, transcript, answer) -> bool | str | None."""
    module_name, _, name = spec.partition(":")
    function = getattr(importlib.import_module(module_name), name)

    def judge(question: str, transcript: str, answer: str) -> bool | None:
        verdict = function(question, transcript, answer)
        return parse_verdict(verdict) if isinstance(verdict, str) else verdict
    return judge


def judge_verdicts(records: Sequence[dict], judge: Judge | None, out_dir: Path, settings: EvalSettings) -> dict | None:
    """Verdicts per item id, cached (resumably) in `{stem}.judge.jsonl`; None without a judge."""
    if judge is None or settings.task != "qa":
        return None
    cache = OutputsFile(out_dir / f"{settings.stem()}.judge.jsonl")
    fresh = [{"id": r["id"], "verdict": judge(r["instruction"], r.get("text", ""), r["reply"])}
             for r in records if r["id"] not in cache.records]
    cache.append(fresh)
    return {r["id"]: cache.records[r["id"]]["verdict"] for r in records}
