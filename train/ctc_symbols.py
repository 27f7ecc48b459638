"""Learn a CTC alphabet of symbols from a training mix's transcripts, and write the training config that uses it.

A CTC over characters sees each letter thousands of times but needs 25 outputs a second and spells words a
letter or two off; one over the LLM's 49,152 word pieces sees a rare piece a handful of times in hours of
speech. Symbols learnt by byte-pair merges sit between: the letters, the space and the most frequent
joined letters of the mix's own words ("the", "ing"), each seen often (`blsp_chat.characters.learn_symbols`).

    python -m train.ctc_symbols --manifest data/base_ctx/train_mix.jsonl --count 512 \\
        --base-config train/configs/adapter_base_context_ctc.json \\
        --out train/configs/adapter_base_context_symbols512_ctc.json --output-dir runs/base_ctx_symbols512_s0

The config is the base config with `model.ctc_alphabet` set to the symbols (the same transcripts give the
same symbols). It also prints how many of the mix's clips each subsampling rate could align.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import soundfile

from blsp_chat.characters import ENGLISH_ALPHABET, learn_symbols, spell
from train.io import read_jsonl
from train.losses import unalignable_fraction

OUTPUT_RATES = (12.5, 25.0)  # outputs a second after two or one stride-2 layers over Whisper's 50 frames


def transcripts(manifest: Path) -> list[tuple[dict, Path]]:
    """Each manifest row that has a transcript, with the folder its audio path is relative to."""
    return [(row, manifest.parent) for row in read_jsonl(manifest) if str(row.get("text", "")).strip()]


def alignable_report(rows: list[tuple[dict, Path]], symbols: list[str]) -> list[str]:
    """One line per output rate: the share of clips whose spelling needs more outputs than the clip has."""
    targets = [spell(row["text"], symbols) for row, _ in rows]
    seconds = [_seconds(row, folder) for row, folder in rows]
    lines = []
    for rate in OUTPUT_RATES:
        unalignable = unalignable_fraction([int(s * rate) for s in seconds], targets)
        lines.append(f"{rate:g} outputs a second: {100 * unalignable:.2f}% of {len(rows)} clips cannot be aligned")
    return lines


def _seconds(row: dict, folder: Path) -> float:
    if "duration" in row:
        return float(row["duration"])
    return soundfile.info(str(folder / row["audio"])).duration  # an absolute audio path stays as it is


def symbols_config(base_config: Path, symbols: list[str], count: int, train_manifest: Path,
                   output_dir: str | None) -> dict:
    """The base config, training on the mix the symbols were learnt from, over those symbols."""
    config = json.loads(base_config.read_text())
    config["model"]["ctc_alphabet"] = symbols
    config["data"]["train_manifest"] = str(train_manifest)
    if output_dir:
        config["loop"]["output_dir"] = output_dir
    config["description"] = (f"CTC over {len(symbols)} symbols learnt from the training mix's transcripts by "
                             f"python -m train.ctc_symbols --count {count} (the letters, the space and byte-pair "
                             f"merges), otherwise {base_config.name}: " + config.get("description", ""))
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True,
                        help="the training mix: the symbols are learnt from its transcripts, and the run trains on it")
    parser.add_argument("--count", type=int, required=True, help="symbols in all, letters and space included")
    parser.add_argument("--base-config", type=Path, required=True, help="the training config to copy")
    parser.add_argument("--out", type=Path, required=True, help="the training config to write")
    parser.add_argument("--output-dir", help="the run's loop.output_dir in the written config")
    args = parser.parse_args(argv)
    rows = transcripts(args.manifest)
    if not rows:
        print(f"no transcripts in {args.manifest}", file=sys.stderr)
        return 2
    symbols = learn_symbols((row["text"] for row, _ in rows), args.count, ENGLISH_ALPHABET)
    config = symbols_config(args.base_config, symbols, args.count, args.manifest, args.output_dir)
    args.out.write_text(json.dumps(config, indent=2) + "\n")
    print(f"{len(symbols)} symbols from {len(rows)} transcripts -> {args.out}")
    for line in alignable_report(rows, symbols):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
