"""What a CTC model hears, greedily and by its LLM-fused search, on the same clips: the WER of each readout's
text (before the LLM says anything) and the time each took.

    python -m train.compare_readouts --model eval_models/base_ctx_aug_chars_s0-step-1000 \
        --manifest data/base_ctx/dev_people_rep.jsonl --limit 12 --lm-weight 0.5 --token-bonus 0.5

The fused search runs at the given LM weight and piece bonus (the checkpoint's own when not given); every
other setting is the checkpoint's. Prints one line per clip (reference, greedy, fused) and a summary line.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

import torch

from blsp_chat.audio import load_audio
from blsp_chat.heard import heard_text
from blsp_chat.weights import load_pretrained
from train.metrics import EnglishNormalizer, corpus_wer
from train.speech_data import read_manifest


def heard_by(loaded, audios: Sequence, **search) -> tuple[list[str], float]:
    """The text the model's readout hears in each clip with the config's search fields set to `search`,
    and the seconds it took (encoder, adapter and readout)."""
    model = loaded.model
    saved = model.config
    model.config = dataclasses.replace(saved, **search)
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            texts = [heard_text(model, loaded.tokenizer, model.encode_speech([audio])[0]) for audio in audios]
        return texts, time.perf_counter() - started
    finally:
        model.config = saved


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a CTC model's directory (or any load_pretrained source)")
    parser.add_argument("--manifest", required=True, help="JSON lines with audio and text")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips")
    parser.add_argument("--lm-weight", type=float, default=None)
    parser.add_argument("--token-bonus", type=float, default=None)
    args = parser.parse_args(argv)
    loaded = load_pretrained(args.model, device="cpu")
    if not loaded.model.speech_length_varies:
        raise SystemExit(f"{args.model} reads speech through the paper's readout: it hears no words to compare")
    examples = read_manifest(args.manifest, limit=args.limit)
    audios = [load_audio(e.audio, max_seconds=None) for e in examples]
    config = loaded.model.config
    fused_search = {"ctc_lm_weight": config.ctc_lm_weight if args.lm_weight is None else args.lm_weight,
                    "ctc_token_bonus": config.ctc_token_bonus if args.token_bonus is None else args.token_bonus}
    if fused_search["ctc_lm_weight"] <= 0:
        raise SystemExit("the checkpoint sets no LM weight: give --lm-weight")
    greedy, greedy_s = heard_by(loaded, audios, ctc_lm_weight=0.0)
    fused, fused_s = heard_by(loaded, audios, **fused_search)
    references = [e.text for e in examples]
    for reference, g, f in zip(references, greedy, fused):
        print(f"REF {reference}\n  greedy {g}\n  fused  {f}")
    normalizer = EnglishNormalizer()
    print(f"{len(examples)} clips: greedy WER {100 * corpus_wer(references, greedy, normalizer).wer:.1f}% "
          f"({greedy_s:.1f} s), fused WER {100 * corpus_wer(references, fused, normalizer).wer:.1f}% "
          f"({fused_s:.1f} s) at LM weight {fused_search['ctc_lm_weight']}, bonus {fused_search['ctc_token_bonus']}")


if __name__ == "__main__":
    main()
