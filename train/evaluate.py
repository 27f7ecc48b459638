r"""Evaluate a BLSP model the way the paper does (section 5, Tables 2-3), beside its baselines.

    python -m train.evaluate --task asr --manifest M.jsonl --system blsp --out results/blsp
    python -m train.evaluate --compare results/text results/cascade results/blsp

Tasks (instructions of paper Table 11; the metrics are defined in train/metrics.py):
  asr           "Please repeat the following words." -> WER (%) after Whisper's English normaliser
  st            "Please translate ... into <target> text." -> SacreBLEU (+ chrF; COMET with --comet-model)
  slu           intent / sentiment with a label list -> accuracy (%), replies mapped onto labels
  continuation  continuation instruction -> closeness (chrF, BLEU, token F1) of the reply to the reply
                the LLM writes from the transcript (the manifest's `reference`, else generated here)
  qa            the item's question (`instruction`) + speech -> answers for review; accept rate (%)
                when a judge is configured (--judge-command / --judge-callable, paper Listing 2)
Systems (paper section 4.2):
  blsp     speech through the adapter into the LLM
  text     the LLM reads the true transcript (`text`): the upper bound ("Text+LLM")
  cascade  Whisper's own decoder transcribes, the LLM reads that ("Whisper+LLM")
  whisper  asr only: Whisper's decoder alone (the cascade's "ASR component")
The Whisper of `cascade`/`whisper` is the base Whisper named in the BLSP config (or --whisper).

Manifest: JSON lines `{"audio", "text"?, "reference"?, "label"?, "instruction"?, "id"?}`; relative audio
paths are read from the manifest's folder. In --out DIR the run writes `{task}.{dataset}.jsonl` (one
record per item, appended and flushed batch by batch: a rerun skips the items already there, so a
killed run resumes) and `{task}.{dataset}.summary.json`; the last printed line is the headline metric.
One DIR is one row of the comparison (one system and model); --compare reads every summary in the DIRs
and prints a markdown table laid out like paper Table 2 (rows systems, columns task/dataset metrics;
a `whisper` run shows as the left WER of the cascade row, as the paper's ASR columns do).

The code: `train.eval_run` generates the replies (settings, instructions, engines, resumable outputs),
`train.eval_score` scores them (one scorer per task, summary, judge), `train.eval_compare` builds the table;
this module joins them (`evaluate`) and is the command line.

Smoke run on the offline default model (untrained adapter: BLSP numbers are a baseline). The test split
is 12 sentences (asr.jsonl) and 10 SNIPS-style light commands (slu.jsonl) spoken by
`espeak-ng -v en-us -s 150 -w wav/NAME.wav "TEXT"` into /work/data/eval_smoke/ (its make.py):
    D=/work/data/eval_smoke R=$D/results
    for s in whisper cascade text blsp; do
      python -m train.evaluate --task asr --manifest $D/asr.jsonl --dataset smoke --system $s --out $R/$s \
        --batch-size 4; done
    for s in cascade text blsp; do
      python -m train.evaluate --task slu --manifest $D/slu.jsonl --dataset smoke --system $s --out $R/$s \
        --batch-size 5; done
    python -m train.evaluate --compare $R/text $R/cascade $R/whisper $R/blsp --compare-out $R/table.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from blsp_chat.config import CONFIG_NAME, BlspConfig, GenerationOptions
from blsp_chat.constants import FALLBACK_TEMPERATURES, SNIPS_LIGHT_INTENTS
from blsp_chat.weights import DEFAULT_ADAPTER_DIR, DEFAULT_WHISPER, SPEECH_SEARCHES, load_pretrained, resolve_base

from . import metrics
from .eval_compare import compare_table, load_summaries
from .eval_run import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    SYSTEMS,
    TASKS,
    Engines,
    EvalSettings,
    LlmRunner,
    WhisperTranscriber,
    check_items,
    generate_outputs,
    read_manifest,
)
from .eval_score import callable_judge, command_judge, headline_line, judge_verdicts, summarize


# --- the run: generate what is missing, then score every item --------------------------------------
def evaluate(items: Sequence[dict], settings: EvalSettings, engines: Engines, out_dir: str | Path,
             progress: bool = True) -> dict:
    """Generate what is missing from the outputs file, then score every item; returns the summary (also
    written to `{task}.{dataset}.summary.json`)."""
    out_dir = Path(out_dir)
    records = generate_outputs(items, settings, engines, out_dir, progress)
    summary = summarize(records, settings, judge_verdicts(records, engines.judge, out_dir, settings))
    (out_dir / f"{settings.stem()}.summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


# --- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--manifest", help="JSONL: {audio, text?, reference?, label?, instruction?, id?} per line")
    parser.add_argument("--model", default=None, help="BLSP directory or hub id (default: the offline default)")
    parser.add_argument("--system", choices=SYSTEMS, default="blsp")
    parser.add_argument("--out", help="folder for the outputs and summary (one folder per system/model)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--target-language", default="German", help="st: the language to translate into")
    parser.add_argument("--labels", default=None, help="slu: comma-separated label list (default: SNIPS light intents)")
    parser.add_argument("--instruction", default=None, help="replace the task's instruction (an item's own wins)")
    parser.add_argument("--dataset", default=None, help="name of the test set (default: the manifest's file stem)")
    parser.add_argument("--label", default=None, help="row name in --compare (default: the system's name)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: per task")
    parser.add_argument("--fallback", action="store_true",
                        help="decode a looping LLM reply again at rising temperature (0.2 ... 1.0), as openai/whisper "
                             "does and as the whisper system always does; default: greedy only, as in the paper")
    parser.add_argument("--loop-stop-tokens", type=int, default=GenerationOptions().loop_stop_tokens,
                        help="end a reply that says one phrase 3 times in a row over at least this many tokens, "
                             "as the app does (default %(default)s); 0: let it run to --max-new-tokens")
    parser.add_argument("--speech-search", choices=SPEECH_SEARCHES, default=None,
                        help="blsp: the readout's search, fused or greedy (default: the checkpoint's own)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--whisper", default=None, help="cascade/whisper: Whisper to use (default: the BLSP config's)")
    parser.add_argument("--comet-model", default=None, help="st: a local COMET checkpoint (needs unbabel-comet)")
    parser.add_argument("--judge-command", default=None, help="qa: shell command reading the judge prompt on stdin")
    parser.add_argument("--judge-callable", default=None, help="qa: module:function(question, transcript, answer)")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="print a Table-2 style markdown table of these runs")
    parser.add_argument("--compare-out", default=None, help="also write the --compare table to this file")
    return parser


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip()) if args.labels else SNIPS_LIGHT_INTENTS
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task]
    return EvalSettings(
        task=args.task, system=args.system, model=args.model or "default", label=args.label,
        dataset=args.dataset or Path(args.manifest).stem, batch_size=args.batch_size,
        target_language=args.target_language, labels=labels, instruction=args.instruction,
        options=GenerationOptions(max_new_tokens=max_new,
                                  fallback_temperatures=FALLBACK_TEMPERATURES[1:] if args.fallback else (),
                                  loop_stop_tokens=args.loop_stop_tokens),
        comet_model=args.comet_model, speech_search=args.speech_search,
    )


def whisper_source(args: argparse.Namespace, loaded) -> str:
    """The base Whisper named in the BLSP config (adapter-only checkpoints name it), or --whisper."""

    if args.whisper:
        return resolve_base(args.whisper)
    if loaded is not None:
        name = loaded.model.config.whisper_name_or_path
    elif args.model in (None, "", "default"):
        default_config = DEFAULT_ADAPTER_DIR / CONFIG_NAME
        if default_config.is_file():
            name = BlspConfig.load(DEFAULT_ADAPTER_DIR).whisper_name_or_path
        else:
            name = DEFAULT_WHISPER
    else:
        name = BlspConfig.load(args.model).whisper_name_or_path
    if not name:
        raise ValueError("this checkpoint names no base Whisper (the released full layout has no decoder): "
                         "pass --whisper")
    return resolve_base(name)


def build_engines(args: argparse.Namespace, settings: EvalSettings) -> Engines:
    engines = Engines()
    loaded = None
    if settings.system != "whisper":
        loaded = load_pretrained(args.model, device=args.device, speech_search=settings.speech_search)
        engines.llm = LlmRunner(loaded, settings.options)
        if settings.system == "blsp" and not loaded.adapter_trained:
            settings.notes.append("the adapter is untrained: BLSP results on speech are a chance baseline")
    if settings.system in ("cascade", "whisper"):
        source = whisper_source(args, loaded)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engines.transcriber = WhisperTranscriber(source, device, settings.batch_size)
        settings.spelling_mapping = metrics.load_spelling_mapping(source)
    elif settings.task in ("asr", "continuation"):
        try:
            settings.spelling_mapping = metrics.load_spelling_mapping(whisper_source(args, loaded))
        except Exception:  # noqa: BLE001 - the mapping is optional; its absence is noted in the summary
            pass
    if args.judge_command:
        engines.judge = command_judge(args.judge_command)
    elif args.judge_callable:
        engines.judge = callable_judge(args.judge_callable)
    return engines


def run_compare(args: argparse.Namespace) -> int:
    table = compare_table(load_summaries(args.compare))
    if args.compare_out:
        Path(args.compare_out).write_text(table + "\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return run_compare(args)
    if not (args.task and args.manifest and args.out):
        print("error: --task, --manifest and --out are needed (or --compare DIR ...)", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        items = read_manifest(args.manifest, args.limit)
        check_items(items, settings)
        engines = build_engines(args, settings)
        summary = evaluate(items, settings, engines, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in summary["notes"]:
        print(f"note: {note}")
    print(headline_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
