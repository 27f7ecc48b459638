"""Ship a trained adapter: copy a training run's adapter-only checkpoint, with its model card and training
record, into a folder such as assets/default_adapter (the folder `python app.py` loads by default).

    python -m train.export_adapter runs/adapter_tiny_offline assets/default_adapter --dtype float16
    python -m train.export_adapter runs/base_ctx_s0 eval_models/base_ctx_s0_step3000 --checkpoint step-3000

`--checkpoint latest|step-N` takes a kept checkpoint of the run instead of its final adapter, also while the
run is still going: how a curve's points are evaluated beyond the run's own held-out score. Its record stops
at that step (eval.jsonl through step N; the card and loss curve the run writes when it ends stay behind).

The weights are stored as --dtype (float16 halves them: 33.6 MB for the default, v6); loading casts them
back to the dtype the model runs in. Checkpoints, optimizer state and logs of the run stay behind; a fine-tuned
run's encoder weights and its LLM LoRA (peft's files) go along. The model card keeps the Hub front matter
the run wrote, or gets one from the config (blsp_chat.model_card).
`--speech-readout ctc` serves an adapter trained with the CTC loss through the CTC-compressed readout
(blsp_chat.readout.ctc_readout), whatever readout the run itself was evaluated with; `--ctc-lm-weight`
decodes it by beam search with the LLM fused in as a language model (blsp_chat.ctc_decode).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from blsp_chat import model_card
from blsp_chat.config import SPEECH_READOUTS
from blsp_chat.weights import (
    DTYPES,
    ENCODER_PREFIX,
    LORA_CONFIG_NAME,
    LORA_WEIGHTS_NAME,
    default_model_card,
    load_blsp_dir,
    read_state_dict,
    save_adapter,
)
from train.loop import EVAL_NAME, checkpoint_step, copy_records_through
from train.losses import ctc_blank_id
from train.train_adapter import find_checkpoint, save_checkpoint_model

RECORD_FILES = (model_card.CARD_NAME, "loss_curve.png", "train_config.json", "data_summary.json", EVAL_NAME)
RUN_END_FILES = (model_card.CARD_NAME, "loss_curve.png")  # written when the run ends: its last step's
LORA_FILES = (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME)  # a fine-tuned LLM's LoRA, applied on load (weights.llm_source)


def export(run_dir: Path, out: Path, dtype: torch.dtype, speech_readout: str | None = None, ctc_blank: str = " ",
           checkpoint: str | None = None, **readout_settings: Any) -> list[str]:
    """Write the checkpoint and copy the record files the run has; returns the copied file names.
    `speech_readout` (with the CTC blank's text and `readout_settings`, BlspConfig's ctc_* fields) replaces
    the run's readout. `checkpoint` ("latest", "step-N"): that kept checkpoint's adapter instead of the final one."""
    if checkpoint:
        kept = find_checkpoint(run_dir, checkpoint)
        with tempfile.TemporaryDirectory() as scratch:
            save_checkpoint_model(run_dir, kept, Path(scratch))
            return write_export(Path(scratch), run_dir, out, dtype, speech_readout, ctc_blank,
                                through_step=checkpoint_step(kept), **readout_settings)
    return write_export(run_dir, run_dir, out, dtype, speech_readout, ctc_blank, **readout_settings)


def write_export(model_dir: Path, run_dir: Path, out: Path, dtype: torch.dtype, speech_readout: str | None,
                 ctc_blank: str, through_step: int | None = None, **readout_settings: Any) -> list[str]:
    """The model of model_dir written to out, with the record files of run_dir. Readout settings left None keep
    the run's own; the rest apply to the new readout, or to the run's own when no new one is named.
    `through_step` (a kept checkpoint's step): the record stops there, so an earlier checkpoint does not carry
    the evaluations of later steps, nor the card and loss curve written when the run ended."""
    loaded = load_blsp_dir(model_dir, torch.float32)
    settings = {name: value for name, value in readout_settings.items() if value is not None}
    if speech_readout:
        blank_id = ctc_blank_id(loaded.tokenizer, ctc_blank) if speech_readout == "ctc" else None
        set_fields(loaded.model.config, speech_readout=speech_readout, ctc_blank_id=blank_id, **settings)
    elif settings:
        if loaded.model.config.speech_readout != "ctc":
            raise ValueError(f"{', '.join(sorted(settings))} set the CTC readout's search, but this run serves the "
                             f"{loaded.model.config.speech_readout!r} readout: add --speech-readout ctc")
        set_fields(loaded.model.config, **settings)
    fine_tuned_encoder = any(k.startswith(ENCODER_PREFIX) for k in read_state_dict(model_dir))
    save_adapter(loaded.model, out, dtype=dtype, with_encoder=fine_tuned_encoder)
    copied = []
    for name in RECORD_FILES + LORA_FILES:
        if not (run_dir / name).is_file() or (through_step is not None and name in RUN_END_FILES):
            continue
        if through_step is not None and name == EVAL_NAME:
            copy_records_through(run_dir / name, out / name, through_step)
        else:
            shutil.copy2(run_dir / name, out / name)
        copied.append(name)
    card = out / model_card.CARD_NAME
    if not card.is_file():
        default_model_card(loaded.model.config).save(card)
    elif not model_card.read_card_data(card.read_text()).to_dict():
        model_card.write_front_matter(card, default_model_card(loaded.model.config).data)
    return copied


def set_fields(config, **changes: Any) -> None:
    """Change a BlspConfig in place and check it again (in place, so that keys it carries beyond its fields
    stay: dataclasses.replace would drop them)."""
    for name, value in changes.items():
        setattr(config, name, value)
    config.check()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a train_adapter output directory")
    parser.add_argument("out", type=Path, help="where to write the shipped adapter")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--checkpoint", help="latest or step-N: that kept checkpoint (the run may still be going) "
                                             "instead of the run's final adapter")
    parser.add_argument("--speech-readout", choices=SPEECH_READOUTS,
                        help="serve with this readout (default: the run's)")
    parser.add_argument("--ctc-blank", default=" ", help="text of the CTC blank token (--speech-readout ctc)")
    # The ctc_* settings default to the run's own (None): given, they change the served CTC readout.
    parser.add_argument("--ctc-readout-temperature", type=float)
    parser.add_argument("--ctc-lm-weight", type=float,
                        help="above 0: decode the ctc readout by beam search with the LLM as LM at this weight")
    parser.add_argument("--ctc-token-bonus", type=float, help="per word piece, in that search")
    parser.add_argument("--ctc-beam-size", type=int)
    parser.add_argument("--ctc-label-min-log-prob", type=float, default=None,
                        help="in that search, do not try labels less likely than this log-probability (e.g. -3)")
    parser.add_argument("--ctc-beam-prune-log-prob", type=float, default=None,
                        help="in that search, drop beams this far (a log-probability, e.g. -3) below the best")
    args = parser.parse_args(argv)
    try:
        copied = export(args.run_dir, args.out, DTYPES[args.dtype], args.speech_readout, args.ctc_blank,
                        args.checkpoint, ctc_readout_temperature=args.ctc_readout_temperature,
                        ctc_lm_weight=args.ctc_lm_weight, ctc_token_bonus=args.ctc_token_bonus,
                        ctc_beam_size=args.ctc_beam_size, ctc_label_min_log_prob=args.ctc_label_min_log_prob,
                        ctc_beam_prune_log_prob=args.ctc_beam_prune_log_prob)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    readout = args.speech_readout or "the run's"
    print(f"wrote {args.out} ({args.dtype} weights, {readout} readout; record: {', '.join(copied) or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
