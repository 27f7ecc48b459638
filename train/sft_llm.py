"""Stage 1: instruction-tune the LLM in the `blsp` format (paper section 4.1, issue 8).

Every example is an Alpaca record (instruction, input, output) rendered by `blsp_chat.prompt.render`
as one human turn (instruction and input joined, as the paper does) and one assistant turn, with EOS;
the loss covers the response and EOS only. LoRA (peft; rank 16, alpha 16 on q, k, v, o: the paper's LoRA
setting) by default, full fine-tuning with `--method full`. The LoRA is saved with `save_pretrained`,
its adapter_config naming the base as the user gave it (an `offline:` name for the default), so
`blsp_chat.weights.load_llm` loads and merges it. A card beside it records config, data and loss curve.

    python -m train.sft_llm --config train/configs/sft_smollm2.json
    python -m train.sft_llm --config train/configs/sft_smollm2.json --resume   # after a kill
    python -m train.sft_llm --evaluate --out assets/stage1_lora     # before/after table into the card

Training runs on `train.loop` (warmup, then cosine decay to 10% of `learning_rate`; batches of similar
length). The knobs carry the loop's names (`learning_rate`, `gradient_accumulation_steps`); the old
spellings `lr` / `--lr` and `grad_accum` / `--grad-accum` are still read, with a deprecation warning.
Its record and checkpoints (every `save_every` steps) go to `run_dir`, default runs/sft/<name of out>;
`--resume` continues from the newest checkpoint there. `time_budget_min` times a few steps first and
shortens the schedule to fit the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from blsp_chat import model_card
from blsp_chat.constants import IGNORE_INDEX, INTENT_INSTRUCTION, REPEAT_INSTRUCTION, SNIPS_LIGHT_INTENTS
from blsp_chat.prompt import Turn, cut_at_stop, eos_token_ids, left_padded_batch, pad_token_id, render, template_for
from blsp_chat.weights import hub_id, load_llm
from train.build_sft_data import intent_commands, load_sources, pick_label, read_alpaca, split_of, transcript_style
from train.io import read_jsonl
from train.loop import (
    LOOP_STATE_NAME,
    METRICS_NAME,
    PLOT_NAME,
    LoopConfig,
    TrainResult,
    checkpoint_dirs,
    to_device,
)
from train.loop import train as run_loop
from train.metrics import WordErrors, word_errors
from train.speech_data import BucketBatchSampler

CARD_JSON, CARD_MD = "sft_card.json", "README.md"  # README.md replaces peft's boilerplate card
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
OPTIONAL_TYPES = {"max_per_kind": int, "max_steps": int, "time_budget_min": float, "threads": int,
                  "max_grad_norm": float}  # fields whose default is None
BUDGET_PROBE_STEPS = 5  # steps timed before a time budget fixes the schedule
LENGTH_GROUP_BATCHES = 16  # batches sorted by length together: less padding, still shuffled
MIN_LR_RATIO = 0.1  # the cosine decays to 10% of learning_rate
# Old spellings of SftConfig fields -> the names train.loop and the adapter configs use. Configs and command
# lines that still carry them keep working, with a warning that names the new spelling.
DEPRECATED_NAMES = {"lr": "learning_rate", "grad_accum": "gradient_accumulation_steps"}


@dataclass
class SftConfig:
    llm: str = "offline:smollm2-135m-instruct"   # the base: offline: name, directory or hub id
    data: str = "runs/sft_data/sft_data.jsonl"   # Alpaca JSON/JSONL (records with split=heldout are skipped)
    out: str = "runs/stage1_lora"
    template: str = "blsp"
    method: str = "lora"                         # "lora" or "full"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    epochs: float = 1.0
    max_steps: int | None = None                  # overrides epochs
    time_budget_min: float | None = None          # time 5 steps first, shorten the schedule to fit this
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_len: int = 160                            # longer examples are skipped, not cut
    max_per_kind: int | None = None               # cap each `kind` of a self-distilled set (file order)
    seed: int = 0
    log_every: int = 10
    threads: int | None = None
    max_grad_norm: float | None = None            # None: no clipping
    save_every: int = 50                          # checkpoint interval (optimizer steps) for --resume
    run_dir: str | None = None                    # the loop's record and checkpoints; None: runs/sft/<name of out>

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        self.lora_targets = tuple(self.lora_targets)

    def run_directory(self) -> Path:
        # Not inside `out`: checkpoints hold optimizer state, and `out` may be a shipped asset directory.
        return Path(self.run_dir) if self.run_dir else Path("runs/sft") / Path(self.out).name

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "SftConfig":
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls(**{**canonical_names(data, str(path)), **{k: v for k, v in overrides.items() if v is not None}})


def canonical_names(data: dict, source: str) -> dict:
    """`data` with each deprecated key renamed to its canonical name (warning once per key); an error when
    both spellings are given."""
    data = dict(data)
    for old, new in DEPRECATED_NAMES.items():
        if old not in data:
            continue
        if new in data:
            raise ValueError(f"{source}: both {old!r} and {new!r} are set; keep {new!r}")
        warn_deprecated(f"{source}: {old!r}", repr(new))
        data[new] = data.pop(old)
    return data


def warn_deprecated(what: str, instead: str) -> None:
    # FutureWarning, not DeprecationWarning: Python shows it to the user running the command by default.
    warnings.warn(f"{what} is deprecated and will be removed: use {instead} (the name train.loop uses)",
                  FutureWarning, stacklevel=3)


# --- data ---------------------------------------------------------------------------------------------
def example_turns(record: dict) -> list[Turn]:
    return [Turn("human", instruction=record["instruction"], text=record.get("input", "")),
            Turn("assistant", text=record["output"])]


def encode(record: dict, tokenizer, template) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the response + EOS, IGNORE_INDEX elsewhere."""
    rendered = render(example_turns(record), tokenizer, template, add_eos=True)
    return rendered.input_ids, rendered.labels


def load_training_records(path: str | Path, max_per_kind: int | None = None) -> list[dict]:
    records, counts = [], {}
    for record in read_alpaca(path):
        kind = record.get("kind", "alpaca")
        if record.get("split", "train") == "heldout" or not record["output"].strip():
            continue
        counts[kind] = counts.get(kind, 0) + 1
        if max_per_kind is None or counts[kind] <= max_per_kind:
            records.append(record)
    return records


def encode_all(records: Sequence[dict], tokenizer, template,
               max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    encoded, skipped = [], 0
    for record in records:
        ids, labels = encode(record, tokenizer, template)
        if len(ids) > max_len:
            skipped += 1
            continue
        encoded.append((ids, labels))
    return encoded, skipped


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def length_grouped_sampler(encoded: Sequence, config: SftConfig):
    """batch_sampler_fn for the loop: shuffled each epoch, neighbours of similar length share a batch."""
    lengths = [len(ids) for ids, _ in encoded]
    return lambda replicas, rank: BucketBatchSampler(lengths, config.batch_size, seed=config.seed,
                                                     mega_batch_factor=LENGTH_GROUP_BATCHES,
                                                     num_replicas=replicas, rank=rank)


# --- model and training -----------------------------------------------------------------------------
def prepare_model(llm, config: SftConfig):
    """LoRA: only the adapters train. Full: every weight trains."""
    if config.method == "full":
        for param in llm.parameters():
            param.requires_grad = True
        return llm
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # lora_A starts random: the seed makes the run a function of its config
    return get_peft_model(llm, lora)


def is_trainable(config: SftConfig):
    """The parameters the loop must find trainable (and the only ones)."""
    return (lambda name: True) if config.method == "full" else (lambda name: "lora_" in name)


def response_loss(model, batch: dict[str, torch.Tensor]):
    return model(**batch).loss, {}


def loop_config(config: SftConfig, max_steps: int | None) -> LoopConfig:
    return LoopConfig(
        output_dir=str(config.run_directory()), learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, lr_schedule="cosine", min_lr_ratio=MIN_LR_RATIO,
        num_epochs=config.epochs, max_steps=max_steps, per_device_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_grad_norm=config.max_grad_norm,
        save_every=config.save_every, log_every=config.log_every, seed=config.seed)


def train(model, tokenizer, encoded: Sequence, config: SftConfig, *, resume: bool = False, callbacks=(),
          log=print) -> TrainResult:
    """Train on `train.loop`; its record and checkpoints go to `config.run_directory()`."""
    collate_fn = functools.partial(collate, pad_id=pad_token_id(tokenizer))
    sampler_fn = length_grouped_sampler(encoded, config)
    max_steps = planned_steps(model, encoded, collate_fn, sampler_fn(1, 0), config, resume, log)
    result = run_loop(model, response_loss, encoded, collate_fn, loop_config(config, max_steps),
                      expected_trainable=is_trainable(config), batch_sampler_fn=sampler_fn, resume=resume,
                      run_info={"sft_config": dataclasses.asdict(config)}, callbacks=callbacks)
    result.model.eval()
    return result


def planned_steps(model, encoded: Sequence, collate_fn, sampler, config: SftConfig, resume: bool, log) -> int | None:
    """`max_steps` for the loop: config.max_steps, or under a time budget the steps that fit it. The loop
    builds its schedule before the first step and checkpoints record its length, so the budget becomes a
    step count up front: by timing BUDGET_PROBE_STEPS steps, or, on resume, as the checkpoint planned it."""
    if not config.time_budget_min:
        return config.max_steps
    saved = checkpoint_dirs(config.run_directory()) if resume else []
    if saved:
        return json.loads((saved[-1] / LOOP_STATE_NAME).read_text())["total_steps"]
    accumulation = config.gradient_accumulation_steps
    scheduled = config.max_steps or max(1, int(config.epochs * len(sampler)) // accumulation)  # as the loop counts
    micro = list(itertools.islice(itertools.cycle(sampler), BUDGET_PROBE_STEPS * accumulation))
    started = time.monotonic()
    per_step = seconds_per_step(model, [collate_fn([encoded[i] for i in batch]) for batch in micro], accumulation)
    # The probe's steps are thrown away (weights restored), so its time comes out of the budget.
    fits = int((config.time_budget_min * 60 - (time.monotonic() - started)) / per_step)
    total = max(1, min(scheduled, fits))
    log(json.dumps({"seconds_per_step": round(per_step, 2), "planned_steps": total}))
    return total


def seconds_per_step(model, micro_batches: Sequence[dict], gradient_accumulation_steps: int) -> float:
    """Mean time of an optimizer step over these micro-batches. The trained weights are put back
    afterwards: the run proper starts from the untouched model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params)
    started = time.monotonic()
    for index, batch in enumerate(micro_batches, 1):
        (model(**to_device(batch, device)).loss / gradient_accumulation_steps).backward()
        if index % gradient_accumulation_steps == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.monotonic() - started
    with torch.no_grad():
        for param, value in zip(params, saved):
            param.copy_(value)
    return elapsed / (len(micro_batches) / gradient_accumulation_steps)


def loss_curve(run_dir: Path, losses: Sequence[float]) -> list[dict]:
    """The card's curve: a point per logged step, its loss the mean over the steps since the last point."""
    curve, previous = [], 0
    for record in read_jsonl(run_dir / METRICS_NAME):
        window = losses[previous:record["step"]]
        curve.append({"step": record["step"], "loss": round(sum(window) / len(window), 4), "lr": record["lr"]})
        previous = record["step"]
    return curve


@torch.no_grad()
def mean_loss(model, tokenizer, encoded: Sequence, batch_size: int = 8) -> float:
    """Token-weighted response loss over examples (for held-out loss and tests)."""
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        inputs = collate(encoded[start:start + batch_size], pad_token_id(tokenizer))
        n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**inputs).loss) * n
        count += n
    return total / max(1, count)


def save(model, tokenizer, config: SftConfig, out: Path) -> None:
    """LoRA: adapter weights + adapter_config naming the base as configured. Full: the whole model."""
    out.mkdir(parents=True, exist_ok=True)
    if config.method == "full":
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return
    model.save_pretrained(out)
    adapter_config = out / "adapter_config.json"
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = config.llm
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- evaluation (typed prompts the LoRA never saw) -----------------------------------------------------
# (question, pattern any correct answer contains); none of these facts is a training prompt.
EVAL_QUESTIONS = (
    ("What is the capital of France?", r"\bparis\b"),
    ("How many days are there in a week?", r"\b(seven|7)\b"),
    ("What color is the sky on a clear day?", r"\bblue\b"),
    ("What is the largest planet in our solar system?", r"\bjupiter\b"),
    ("What do bees make?", r"\bhoney\b"),
    ("At what temperature in degrees Celsius does water freeze?", r"\b(0|zero)\b"),
    ("Who wrote Romeo and Juliet?", r"\bshakespeare\b"),
    ("What is the opposite of hot?", r"\bcold\b"),
)
LIBRIVOX_TRANSCRIPTS = Path("/usr/share/pocketsphinx/test/data/librivox/transcription")
EVAL_REPEATS = 24
EVAL_INTENTS = 36


def eval_repeat_sentences(count: int = EVAL_REPEATS) -> list[str]:
    """ASR-style sentences held out of every training task: LibriVox transcripts, then held-out fortunes."""

    found = []
    if LIBRIVOX_TRANSCRIPTS.is_file():
        found = [re.sub(r"</?s>|\(.*\)", "", line).strip() for line in LIBRIVOX_TRANSCRIPTS.read_text().splitlines()]
    sources = load_sources()
    pool = sorted({transcript_style(s) for s in sources.sentences + sources.examples if split_of(s) == "heldout"})
    pool = [s for s in pool if 6 <= len(s.split()) <= 20]
    random.Random(0).shuffle(pool)
    return (found + pool)[:count]


def eval_intents(count: int = EVAL_INTENTS) -> list[tuple[str, str]]:
    held = [c for c in intent_commands() if split_of(c[0]) == "heldout"]
    random.Random(0).shuffle(held)
    return held[:count]


@torch.no_grad()
def answer_all(llm, tokenizer, template_name: str, prompts: Sequence[tuple[str, str]], max_new_tokens: int,
               batch_size: int = 16) -> list[str]:
    """Greedy replies to (instruction, text) human turns, batched with left padding, cut at `###`."""

    template = template_for(template_name, tokenizer)
    eos, pad_id = eos_token_ids(tokenizer, llm), pad_token_id(tokenizer)
    replies = []
    for start in range(0, len(prompts), batch_size):
        rendered = [render([Turn("human", instruction=i, text=t)], tokenizer, template)
                    for i, t in prompts[start:start + batch_size]]
        batch = left_padded_batch(rendered, pad_id)
        width = batch["input_ids"].shape[1]
        out = llm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
        replies.extend(cut_at_stop(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out)
    return replies


def evaluate(llm, tokenizer, template_name: str, examples: bool = False) -> dict:
    """Questions (keyword), light intents (accuracy against the label list), repeats (exact, WER)."""
    questions = answer_all(llm, tokenizer, template_name, [(q, "") for q, _ in EVAL_QUESTIONS], 48)
    q_ok = [bool(re.search(p, a.lower())) for (_, p), a in zip(EVAL_QUESTIONS, questions)]
    intents = eval_intents()
    instruction = INTENT_INSTRUCTION.format(labels=", ".join(SNIPS_LIGHT_INTENTS))
    intent_answers = answer_all(llm, tokenizer, template_name, [(instruction, c) for c, _ in intents], 16)
    i_ok = [pick_label(a, SNIPS_LIGHT_INTENTS) == gold for (_, gold), a in zip(intents, intent_answers)]
    sentences = eval_repeat_sentences()
    repeats = answer_all(llm, tokenizer, template_name, [(REPEAT_INSTRUCTION, s) for s in sentences], 48)
    # train.metrics' WER, on the transcript style the SFT data is written in (lower case, no punctuation)
    errors = [word_errors(r, h, transcript_style) for h, r in zip(repeats, sentences)]
    result = {
        "template": template_name,
        "questions_correct": f"{sum(q_ok)}/{len(q_ok)}",
        "intent_accuracy": round(sum(i_ok) / len(i_ok), 3), "intent_n": len(i_ok),
        "repeat_exact": round(sum(e.errors == 0 for e in errors) / len(errors), 3), "repeat_n": len(errors),
        "repeat_wer": round(sum(errors, WordErrors()).wer, 3),
    }
    if examples:
        result["examples"] = {"questions": list(zip([q for q, _ in EVAL_QUESTIONS], questions)),
                              "intents": list(zip([c for c, _ in intents[:6]], intent_answers[:6])),
                              "repeats": list(zip(sentences[:4], repeats[:4]))}
    return result


def heldout_loss(llm, tokenizer, data: str | Path, max_len: int, limit: int = 200) -> float | None:
    records = [r for r in read_alpaca(data) if r.get("split") == "heldout"][:limit]
    if not records:
        return None
    encoded, _ = encode_all(records, tokenizer, template_for("blsp", tokenizer), max_len)
    return round(mean_loss(llm, tokenizer, encoded), 4)


def training_overlap(data: str | Path | None) -> int:
    """How many evaluation prompts appear in the training data (must be 0)."""
    if not data or not Path(data).is_file():
        return 0
    seen = {(r["instruction"], r["input"]) for r in read_alpaca(data) if r.get("split", "train") != "heldout"}
    intent = INTENT_INSTRUCTION.format(labels=", ".join(SNIPS_LIGHT_INTENTS))
    prompts = [(q, "") for q, _ in EVAL_QUESTIONS] + [(intent, c) for c, _ in eval_intents()]
    prompts += [(REPEAT_INSTRUCTION, s) for s in eval_repeat_sentences()]
    return sum(p in seen for p in prompts)


def run_evaluation(base: str, tuned_dir: Path, data: str | Path | None, max_len: int) -> dict:
    table = {}
    overlap = training_overlap(data)
    if overlap:
        raise SystemExit(f"{overlap} evaluation prompts appear in the training data; the numbers would not be held out")
    llm, tokenizer = load_llm(base, torch.float32)
    llm.eval()
    table["base_chat_template"] = evaluate(llm, tokenizer, "chat")
    table["base_blsp"] = evaluate(llm, tokenizer, "blsp", examples=True)
    if data and Path(data).is_file():
        table["base_blsp"]["heldout_loss"] = heldout_loss(llm, tokenizer, data, max_len)
    llm, tokenizer = load_llm(str(tuned_dir), torch.float32)
    llm.eval()
    table["stage1_blsp"] = evaluate(llm, tokenizer, "blsp", examples=True)
    if data and Path(data).is_file():
        table["stage1_blsp"]["heldout_loss"] = heldout_loss(llm, tokenizer, data, max_len)
    return table


# --- card -------------------------------------------------------------------------------------------------
def write_card(out: Path, updates: dict) -> dict:
    path = out / CARD_JSON
    card = json.loads(path.read_text()) if path.is_file() else {}
    card.update(updates)
    path.write_text(json.dumps(card, indent=2) + "\n")
    base = hub_id(card.get("config", {}).get("llm"))
    model_card.write_card(out / CARD_MD, card_markdown(card), model_card.lora_card_data(base))  # Hub front matter
    return card


def card_markdown(card: dict) -> str:
    cfg = card.get("config", {})
    lines = ["# Stage-1 LoRA for SmolLM2-135M-Instruct (blsp format)", "",
             "Teaches the LLM the `###[Human]:...\\n\\n\\n###[Assistant]:` format (paper section 4.1, issue 8).",
             f"Base: `{cfg.get('llm')}`; method {cfg.get('method')} "
             f"(r={cfg.get('lora_r')}, alpha={cfg.get('lora_alpha')}, "
             f"targets {', '.join(cfg.get('lora_targets', []))}). Loaded and merged by `blsp_chat.weights.load_llm`.",
             ""]
    if "data" in card:
        lines += ["## Data", "", "```", json.dumps(card["data"], indent=2), "```", ""]
    if "training" in card:
        t = card["training"]
        lines += ["## Training", "",
                  f"{t['steps']} steps, {t['examples_seen']} examples seen, {t['seconds']} s on {t['device']}.", "",
                  "| step | loss | lr |", "|---|---|---|",
                  *[f"| {p['step']} | {p['loss']} | {p['lr']:.2e} |" for p in t["curve"]], ""]
        if t.get("loss_curve"):
            lines += [f"![loss curve]({t['loss_curve']})", ""]
    if "evaluation" in card:
        lines += ["## Before / after (held-out typed prompts, greedy)", "",
                  "| model / template | questions | intent acc | repeat exact | repeat WER | held-out loss |",
                  "|---|---|---|---|---|---|"]
        for name, r in card["evaluation"].items():
            lines.append(f"| {name} | {r['questions_correct']} | {r['intent_accuracy']} (n={r['intent_n']}) | "
                         f"{r['repeat_exact']} (n={r['repeat_n']}) | {r['repeat_wer']} | "
                         f"{r.get('heldout_loss', '-')} |")
        lines += ["",
                  "Questions: 8 hand-written, judged by keyword. Intents: held-out light commands, answer must name",
                  "the right SNIPS label. Repeats: 'Please repeat the following words.' + held-out ASR-style sentences",
                  "(LibriVox transcripts first); exact after lower-casing and removing punctuation.", ""]
    if "config" in card:
        lines += ["## Config", "", "```", json.dumps(card["config"], indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file of SftConfig fields")
    for f in dataclasses.fields(SftConfig):
        if f.name != "lora_targets":
            kind = OPTIONAL_TYPES.get(f.name) or {int: int, float: float}.get(type(f.default), str)
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    parser.add_argument("--evaluate", action="store_true",
                        help="only measure base vs the LoRA in --out; write the card")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the run directory")
    for old, new in DEPRECATED_NAMES.items():  # the old flags, hidden from --help
        kind = type(getattr(SftConfig, new))
        parser.add_argument(f"--{old.replace('_', '-')}", dest=f"deprecated_{old}", type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SftConfig) if f.name != "lora_targets"}
    for old, new in DEPRECATED_NAMES.items():
        value = getattr(args, f"deprecated_{old}")
        if value is None:
            continue
        if overrides[new] is not None:
            parser.error(f"--{old.replace('_', '-')} and --{new.replace('_', '-')} are both given; "
                         f"keep --{new.replace('_', '-')}")
        warn_deprecated(f"--{old.replace('_', '-')}", f"--{new.replace('_', '-')}")
        overrides[new] = value
    if args.config:
        config = SftConfig.load(args.config, **overrides)
    else:
        config = SftConfig(**{k: v for k, v in overrides.items() if v is not None})
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    if args.evaluate:
        table = run_evaluation(config.llm, out, config.data, config.max_len)
        print(json.dumps(table, indent=2))
        write_card(out, {"evaluation": table})
        return
    train_and_save(config, resume=args.resume)


def train_and_save(config: SftConfig, *, resume: bool = False, callbacks=(), log=print) -> dict:
    llm, tokenizer = load_llm(config.llm, torch.float32)
    template = template_for(config.template, tokenizer)
    records = load_training_records(config.data, config.max_per_kind)
    encoded, skipped = encode_all(records, tokenizer, template, config.max_len)
    model = prepare_model(llm, config)
    start = time.monotonic()
    result = train(model, tokenizer, encoded, config, resume=resume, callbacks=callbacks, log=log)
    seconds = round(time.monotonic() - start, 1)
    out, run_dir = Path(config.out), config.run_directory()
    save(result.model, tokenizer, config, out)
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r.get("kind", "alpaca")] = kinds.get(r.get("kind", "alpaca"), 0) + 1
    training = {"steps": result.state.step, "examples_seen": result.state.samples_seen, "seconds": seconds,
                "device": "cuda" if torch.cuda.is_available() else "cpu", "run_dir": str(run_dir),
                "curve": loss_curve(run_dir, result.losses)}
    if (run_dir / PLOT_NAME).is_file():
        shutil.copyfile(run_dir / PLOT_NAME, out / PLOT_NAME)
        training["loss_curve"] = PLOT_NAME
    return write_card(out, {
        "config": dataclasses.asdict(config),
        "data": {"source": config.data, "train_records": len(records), "used": len(encoded),
                 "skipped_longer_than_max_len": skipped, "per_kind": kinds},
        "training": training,
    })


if __name__ == "__main__":
    main()
