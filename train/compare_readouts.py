"""What a CTC model hears, greedily and by its LLM-fused search, on the same clips: the WER of each readout's
text (before the LLM says anything) and the time each search took (the encoder and adapter run once a clip).

    python -m train.compare_readouts --model eval_models/base_ctx_aug_chars_s0-step-1000 \
        --manifest data/base_ctx/dev_people_rep.jsonl --limit 12 --lm-weight 0.5 --token-bonus 0.5

The fused search runs at the given LM weight, piece bonus, beam size and prunings (the checkpoint's own
where not given). Prints one line per clip (reference, greedy, fused) and a summary line. Several values of any
of them search every combination (tune them on clips the reported scores do not use, e.g.
data/base_ctx/tune_people_rep.jsonl): one summary line each, then the clips of the setting with the lowest WER.

    python -m train.compare_readouts --model ... --manifest data/base_ctx/tune_people_rep.jsonl \
        --lm-weight 0.2 0.4 0.8 --token-bonus 0 0.5 1
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

import torch

from blsp_chat.audio import load_audio
from blsp_chat.heard import heard_text
from blsp_chat.readout import CTC_BEAM_LABELS
from blsp_chat.weights import load_pretrained
from train.metrics import EnglishNormalizer, corpus_wer
from train.speech_data import read_manifest


def adapter_outputs(loaded, audios: Sequence) -> tuple[list[torch.Tensor], float]:
    """Each clip's adapter outputs (encoder and adapter, one clip at a time as served) and the seconds they
    took. Computed once: every search setting reads the same outputs, so a grid costs its searches only."""
    model = loaded.model
    started = time.perf_counter()
    with torch.inference_mode():
        adapted = [model.adapter_outputs([audio])[0] for audio in audios]
    return adapted, time.perf_counter() - started


def heard_by(loaded, adapted: Sequence[torch.Tensor], **search) -> tuple[list[str], float]:
    """The text the model's readout hears in each clip's adapter outputs with the config's search fields set
    to `search`, and the seconds the readout took."""
    model = loaded.model
    saved = model.config
    model.config = dataclasses.replace(saved, **search)
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            texts = [heard_text(model, loaded.tokenizer, model.read_out(outputs)) for outputs in adapted]
        return texts, time.perf_counter() - started
    finally:
        model.config = saved


def search_grid(config, lm_weights: Sequence[float] | None, token_bonuses: Sequence[float] | None,
                beam_sizes: Sequence[int] | None, label_floors: Sequence[float] | None = None,
                beam_prunes: Sequence[float] | None = None) -> list[dict]:
    """Every combination of the given search values, the checkpoint's own where a list is not given."""
    return [{"ctc_lm_weight": lm, "ctc_token_bonus": bonus, "ctc_beam_size": beam,
             "ctc_label_min_log_prob": floor, "ctc_beam_prune_log_prob": prune}
            for lm in lm_weights or [config.ctc_lm_weight]
            for bonus in token_bonuses or [config.ctc_token_bonus]
            for beam in beam_sizes or [config.ctc_beam_size]
            for floor in label_floors or [config.ctc_label_min_log_prob]
            for prune in beam_prunes or [config.ctc_beam_prune_log_prob]]


def setting_text(search: dict) -> str:
    return (f"LM weight {search['ctc_lm_weight']}, bonus {search['ctc_token_bonus']}, "
            f"beam {search['ctc_beam_size']}, label floor {search['ctc_label_min_log_prob']}, "
            f"beam prune {search['ctc_beam_prune_log_prob']}")


def floor_or_none(text: str) -> float | None:
    """A log-probability floor, or "none" for no floor (every label tried, every beam kept)."""
    return None if text.lower() == "none" else float(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a CTC model's directory (or any load_pretrained source)")
    parser.add_argument("--manifest", required=True, help="JSON lines with audio and text")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips")
    parser.add_argument("--lm-weight", type=float, nargs="+", default=None)
    parser.add_argument("--token-bonus", type=float, nargs="+", default=None)
    parser.add_argument("--beam-size", type=int, nargs="+", default=None)
    parser.add_argument("--label-min-log-prob", type=floor_or_none, nargs="+", default=None,
                        help="labels below this log-probability are not tried; none: all of each output's "
                        f"best {CTC_BEAM_LABELS}")
    parser.add_argument("--beam-prune-log-prob", type=floor_or_none, nargs="+", default=None,
                        help="beams this far below the best are dropped; none: the beam size alone decides")
    args = parser.parse_args(argv)
    loaded = load_pretrained(args.model, device="cpu")
    if not loaded.model.speech_length_varies:
        raise SystemExit(f"{args.model} reads speech through the paper's readout: it hears no words to compare")
    grid = search_grid(loaded.model.config, args.lm_weight, args.token_bonus, args.beam_size,
                       args.label_min_log_prob, args.beam_prune_log_prob)
    if any(search["ctc_lm_weight"] <= 0 for search in grid):
        raise SystemExit("the checkpoint sets no LM weight: give --lm-weight (every value above 0)")
    examples = read_manifest(args.manifest, limit=args.limit)
    audios = [load_audio(e.audio, max_seconds=None) for e in examples]
    references = [e.text for e in examples]
    normalizer = EnglishNormalizer()
    adapted, adapter_s = adapter_outputs(loaded, audios)
    print(f"encoder and adapter: {adapter_s:.1f} s for {len(audios)} clips", flush=True)
    greedy, greedy_s = heard_by(loaded, adapted, ctc_lm_weight=0.0)
    greedy_wer = 100 * corpus_wer(references, greedy, normalizer).wer
    if len(grid) > 1:  # the baseline first: a grid stopped halfway still has it
        print(f"greedy WER {greedy_wer:.1f}% ({greedy_s:.1f} s)", flush=True)
    scored = []
    for search in grid:
        fused, fused_s = heard_by(loaded, adapted, **search)
        scored.append((100 * corpus_wer(references, fused, normalizer).wer, fused_s, search, fused))
        if len(grid) > 1:
            print(f"fused WER {scored[-1][0]:.1f}% ({fused_s:.1f} s) at {setting_text(search)}", flush=True)
    fused_wer, fused_s, best, fused = min(scored, key=lambda row: row[0])
    for reference, g, f in zip(references, greedy, fused):
        print(f"REF {reference}\n  greedy {g}\n  fused  {f}")
    print(f"{len(examples)} clips: greedy WER {greedy_wer:.1f}% ({greedy_s:.1f} s), fused WER {fused_wer:.1f}% "
          f"({fused_s:.1f} s) at {setting_text(best)}" + (f" (the best of {len(grid)})" if len(grid) > 1 else ""))


if __name__ == "__main__":
    main()
