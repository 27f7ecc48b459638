"""The LLM-fused readout's beam search, variant by variant: LLM forwards, time and the transcript's WER.

Each clip's adapter label candidates are computed once; every variant of the search (label floor, beam
pruning, read-ahead, greedy) then decodes the same candidates with a fresh KV-cached scorer. The count of
LLM forwards is what a variant costs whatever the machine's load; the transcript the readout hands the LLM
is scored against the manifest's text (readout WER: before the LLM repeats it), per group of clips.

    PYTHONPATH=. python bench/bench_readout_search.py --manifest data/real_dev/manifest.jsonl \
        --manifest data/natural_test/kokoro/manifest.jsonl [--model DIR] \
        --variant shipped '{}' --variant greedy '{"lm_weight": 0}' --variant floor-5 '{"label_min_log_prob": -5}'

A variant is a name and the JSON keyword arguments of `ctc_decode.prefix_beam_search` that replace the
model's own, plus "read_ahead" for the scorer; `"label_min_log_prob": null` searches without a label floor,
`"beam_prune_log_prob": null` without beam pruning.
Clips are grouped by their manifest's "source": the real dev set's sources by `real_speech.SOURCE_GROUPS`
("sentences", "acted", "words"), other manifests by their file's folder.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from blsp_chat.audio import load_audio
from blsp_chat.ctc_decode import prefix_beam_search
from blsp_chat.prefix_scorer import READ_AHEAD_PIECES, KvCachedPrefixScorer
from blsp_chat.readout import CTC_BEAM_LABELS, ctc_label_candidates
from blsp_chat.weights import load_pretrained
from train.io import read_jsonl, resolve_audio
from train.metrics import word_errors
from train.real_speech import SOURCE_GROUPS


def group_of(record: dict, manifest: Path) -> str:
    source = record.get("source")
    if source in SOURCE_GROUPS and "pseudo_label" not in record:
        return SOURCE_GROUPS[source]
    return manifest.parent.name


def candidates(loaded, manifests: list[Path]) -> list[dict]:
    model = loaded.model
    table = model.llama_model.get_input_embeddings().weight
    clips = []
    with torch.no_grad():
        for manifest in manifests:
            for record in read_jsonl(manifest):
                speech = model.adapt_windows(model.encode_windows([load_audio(resolve_audio(manifest,
                                                                                            record["audio"]))]))[0]
                log_probs, ids = ctc_label_candidates(speech, table, CTC_BEAM_LABELS)
                clips.append({"group": group_of(record, manifest), "text": record["text"],
                              "log_probs": log_probs, "ids": ids})
    return clips


def run_variant(loaded, clips: list[dict], overrides: dict) -> dict:
    config = loaded.model.config
    overrides = dict(overrides)
    read_ahead = overrides.pop("read_ahead", READ_AHEAD_PIECES)
    search = dict(lm_weight=config.ctc_lm_weight, token_bonus=config.ctc_token_bonus, beam_size=config.ctc_beam_size)
    if config.ctc_label_min_log_prob is not None:
        search["label_min_log_prob"] = config.ctc_label_min_log_prob
    if config.ctc_beam_prune_log_prob is not None:
        search["beam_prune_log_prob"] = config.ctc_beam_prune_log_prob
    search.update(overrides)
    for key in ("label_min_log_prob", "beam_prune_log_prob"):
        if key in search and search[key] is None:  # null in a variant: none
            search[key] = -math.inf
    forwards, errors = 0, {}
    started = time.perf_counter()
    with torch.no_grad():
        for clip in clips:
            scorer = KvCachedPrefixScorer(loaded.model.llama_model, read_ahead=read_ahead)
            lm = scorer if search["lm_weight"] > 0 else None
            pieces = prefix_beam_search(clip["log_probs"], clip["ids"], config.ctc_blank_id, lm, **search)
            forwards += scorer.forwards
            counts = word_errors(clip["text"], loaded.tokenizer.decode(pieces))
            for group in (clip["group"], "all"):
                total = errors.setdefault(group, [0, 0])
                total[0] += counts.errors
                total[1] += counts.reference_words
    return {"forwards": forwards, "seconds": round(time.perf_counter() - started, 1),
            "wer": {group: round(100 * e / max(n, 1), 1) for group, (e, n) in sorted(errors.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, action="append", required=True)
    parser.add_argument("--model", default=None, help="BLSP directory (default: the shipped default)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_pretrained(args.model, device="cpu")
    clips = candidates(loaded, args.manifest)
    print(f"{len(clips)} clips; model {args.model or 'default'}; readout WER (%) of the transcript the LLM reads")
    for name, overrides in args.variant:
        result = run_variant(loaded, clips, json.loads(overrides))
        print(f"{name:24s} forwards {result['forwards']:5d}  {result['seconds']:7.1f} s  {result['wer']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
