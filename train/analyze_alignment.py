"""Is speech aligned with text inside the LLM? The analysis of paper section 2, Appendix A and D.

For paired speech/transcript inputs under several instructions (paper Table 6: CW, SA, SR, ST), the
representation of an input is the final layer's hidden state (after the LLM's final norm, as
transformers returns it) of the last prompt token, right before the reply would start. Reported:
  - paired similarity (Tables 8/13): for each instruction, the mean over items of the cosine between
    the speech input's and its transcript's representation;
  - cross-instruction similarity (Tables 7/12): for each pair of instructions, the mean over items of
    the cosine between the same input's representations under the two (speech; text for reference);
  - both again after centring: the mean of all representations subtracted first. A small LLM's last
    hidden states share a large common component (the same prompt suffix, anisotropy), which puts every
    raw cosine near 1 (0.93-0.99 for text under different instructions with SmolLM2-135M); centred
    cosines show the differences the paper's raw ones show for Llama-2-7B;
  - a t-SNE plot (Figures 1/3): colour per instruction, triangle = speech, cross = text; dashed lines
    join the speech and text points of a few items.
An adapter that aligns well gives high paired similarity and distinct representations per instruction;
the ASR-pretrained adapter of Figure 1 gives the opposite.

    python -m train.analyze_alignment --manifest /work/data/eval_smoke/pairs.jsonl \\
        --out /work/data/eval_smoke/results/alignment

Manifest: JSON lines with `audio` and `text` (the transcript). Writes alignment.json, alignment.md and
alignment_tsne.png into --out; the last printed line is the mean paired similarity.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from blsp_chat.audio import load_audio
from blsp_chat.lock import model_lock
from blsp_chat.weights import load_pretrained

from .eval_run import LlmRunner, Request, read_manifest

# Paper Table 6: the instructions used to extract the cross-modal representations.
INSTRUCTIONS = {
    "CW": "Please continue the following sentence.",
    "SA": "Please classify the emotional tone of the following text.",
    "SR": "Please transcribe the following audio into English text.",
    "ST": "Please translate the following English text into German text.",
}
COLOURS = {"CW": "tab:orange", "SA": "tab:red", "SR": "tab:blue", "ST": "tab:gray"}  # as in Figure 1
MARKERS = {"speech": "^", "text": "x"}
MODALITIES = ("speech", "text")
HIGHLIGHTED_PAIRS = 3      # items whose speech and text points are joined in the plot (Figure 3)
TSNE_MAX_PERPLEXITY = 30.0
TSNE_SEED = 0


# --- representations ------------------------------------------------------------------------------
@torch.inference_mode()
def last_token_states(runner, requests) -> np.ndarray:
    """(B, d_llm) final-layer hidden state of each prompt's last token (prompts are left-padded, so
    it is the last column)."""

    inputs = runner.batch_inputs(requests)
    with model_lock(runner.model):
        out = runner.model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, -1].float().cpu().numpy()


def extract(runner, pairs: Sequence[tuple[np.ndarray, str]], instructions: Mapping[str, str],
            batch_size: int = 8) -> dict[tuple[str, str], np.ndarray]:
    """{(modality, instruction code): (N, d)} for N (audio, transcript) pairs."""
    from tqdm import tqdm

    states: dict[tuple[str, str], np.ndarray] = {}
    jobs = [(m, code) for code in instructions for m in MODALITIES]
    for modality, code in tqdm(jobs, desc="alignment", unit="set", file=sys.stderr):
        requests = [Request(instructions[code], audio=audio) if modality == "speech"
                    else Request(instructions[code], text=text)
                    for audio, text in pairs]
        states[modality, code] = np.concatenate([last_token_states(runner, requests[i:i + batch_size])
                                                 for i in range(0, len(requests), batch_size)])
    return states


# --- similarities -----------------------------------------------------------------------------------
def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosine between row i of a and row i of b; (N, d) each."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)


def paired_similarity(states: Mapping[tuple[str, str], np.ndarray], codes: Sequence[str]) -> dict[str, float]:
    """Tables 8/13: per instruction, mean cosine of each speech input with its own transcript."""
    return {code: float(row_cosines(states["speech", code], states["text", code]).mean()) for code in codes}


def cross_instruction_similarity(states: Mapping[tuple[str, str], np.ndarray], codes: Sequence[str],
                                 modality: str = "speech") -> np.ndarray:
    """Tables 7/12: (I, I) mean cosine of the same input's representations under two instructions."""
    return np.array([[row_cosines(states[modality, a], states[modality, b]).mean() for b in codes] for a in codes])


# --- report -----------------------------------------------------------------------------------------
def markdown_report(paired: Mapping[str, float], cross: Mapping[str, np.ndarray], codes: Sequence[str]) -> str:
    lines = ["Average similarity between representations of paired speech/text inputs under the same "
             "instruction (paper Tables 8/13):", "", "| " + " | ".join(codes) + " |", "|" + "---|" * len(codes),
             "| " + " | ".join(f"{paired[c]:.3f}" for c in codes) + " |"]
    for modality, matrix in cross.items():
        suffix = "-" + modality[0].upper()
        lines += ["", f"Average similarity between representations of the same {modality} inputs under "
                      "different instructions (paper Tables 7/12):", "",
                  "| | " + " | ".join(c + suffix for c in codes) + " |", "|" + "---|" * (len(codes) + 1)]
        lines += ["| " + a + suffix + " | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                  for a, row in zip(codes, matrix)]
    return "\n".join(lines)


def tsne_plot(states: Mapping[tuple[str, str], np.ndarray], codes: Sequence[str], path: Path, title: str = "") -> None:
    """Figures 1/3: t-SNE of every representation; colour = instruction, marker = modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    keys = [(m, c) for c in codes for m in MODALITIES]
    points = np.concatenate([states[k] for k in keys])
    perplexity = min(TSNE_MAX_PERPLEXITY, max(1.0, (len(points) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=TSNE_SEED).fit_transform(points)
    n = len(states[keys[0]])
    placed = {k: xy[i * n:(i + 1) * n] for i, k in enumerate(keys)}
    fig, ax = plt.subplots(figsize=(7, 6))
    for (modality, code), where in placed.items():
        ax.scatter(where[:, 0], where[:, 1], c=COLOURS.get(code, "black"), marker=MARKERS[modality], s=36,
                   label=f"{code} {modality}", alpha=0.8)
    for code in codes:  # join a few paired inputs, as Figure 3 highlights them
        for i in range(min(HIGHLIGHTED_PAIRS, n)):
            s, t = placed["speech", code][i], placed["text", code][i]
            ax.plot([s[0], t[0]], [s[1], t[1]], linestyle="--", linewidth=0.8, color=COLOURS.get(code, "black"))
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or "t-SNE of last-prompt-token representations")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def centred(states: Mapping[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """Every representation minus the mean of all of them (both modalities, all instructions)."""
    mean = np.concatenate(list(states.values())).mean(axis=0)
    return {key: value - mean for key, value in states.items()}


def similarities(states: Mapping[tuple[str, str], np.ndarray], codes: Sequence[str]) -> dict:
    paired = paired_similarity(states, codes)
    return {"paired": paired, "paired_mean": float(np.mean(list(paired.values()))),
            "cross_instruction": {m: cross_instruction_similarity(states, codes, m).tolist() for m in MODALITIES}}


def analyze(states: Mapping[tuple[str, str], np.ndarray], codes: Sequence[str]) -> dict:
    """Raw cosines (the paper's measure) and, under "centred", the same after `centred`."""
    return {"instructions": list(codes), "items": len(states["speech", codes[0]]),
            **similarities(states, codes), "centred": similarities(centred(states), codes)}


# --- command line ---------------------------------------------------------------------------------
def read_pairs(manifest: str | Path, limit: int | None) -> list[tuple[np.ndarray, str]]:
    items = [item for item in read_manifest(manifest, limit) if item.get("audio") and item.get("text")]
    if len(items) < 2:
        raise ValueError(f"{manifest} needs at least two items with both 'audio' and 'text'")
    return [(load_audio(item["audio"], max_seconds=None), item["text"]) for item in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.analyze_alignment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="JSONL with audio and text (transcript) per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="BLSP directory or hub id (default: the offline default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)


    loaded = load_pretrained(args.model, device=args.device)
    pairs = read_pairs(args.manifest, args.limit)
    codes = list(INSTRUCTIONS)
    states = extract(LlmRunner(loaded), pairs, INSTRUCTIONS, args.batch_size)
    result = analyze(states, codes)
    result.update(model=args.model or "default", adapter_trained=loaded.adapter_trained)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join(
        f"## {title}\n\n" + markdown_report(part["paired"],
                                            {m: np.array(v) for m, v in part["cross_instruction"].items()}, codes)
        for title, part in (("Raw cosine (the paper's measure)", result), ("Centred cosine", result["centred"])))
    (out / "alignment.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "alignment.md").write_text(report + "\n")
    trained = "trained" if loaded.adapter_trained else "untrained"
    tsne_plot(states, codes, out / "alignment_tsne.png", f"{result['model']} ({trained} adapter), {len(pairs)} pairs")
    print(report)
    print(f"paired speech/text similarity, mean over {len(codes)} instructions: raw {result['paired_mean']:.3f}, "
          f"centred {result['centred']['paired_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
