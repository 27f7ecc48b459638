"""Build the offline stage-1 instruction set: self-distilled, no downloads (paper section 4.1, issue 8).

Instructions are made from text that Debian packages ship (WordNet glosses and usage examples from
`wordnet-base`, sentences from `fortunes-min`) and from small hand-written templates (capitals, light
commands). Each is answered by the same LLM through its OWN chat template (greedy, batched, left
padding); the answers are then used as targets in the `blsp` format at training time (`sft_llm.py`).
Repetition targets are the words themselves (no generation, paper section 3). Classification targets
are the model's own answer only when it names exactly one label of the list (and, for light commands,
the label the command was written for); everything else is dropped.

Output (Alpaca-style JSONL, one record a line): `sft_data.jsonl` with id, kind, split, instruction,
input, output; `sft_rejects.jsonl` with id, kind, reason, raw; `DATA_CARD.md` and `data_card.json`.
Both JSONL files are appended as batches finish, so a rerun skips every id already decided (resume).

    python -m train.build_sft_data --out data/sft --time-budget-min 15
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from blsp_chat.constants import (
    CONTINUATION_INSTRUCTION,
    INTENT_INSTRUCTION,
    REPEAT_INSTRUCTION,
    SENTIMENT_INSTRUCTION,
    SNIPS_LIGHT_INTENTS,
)
from blsp_chat.weights import resolve_base
from train import text_sources
from train.generate_continuations import is_looping
from train.io import append_lines, read_jsonl, write_jsonl_atomic

WORDNET_DIR = text_sources.WORDNET_DIR
FORTUNES_DIR = text_sources.FORTUNES_DIR
DATA_NAME, REJECTS_NAME = "sft_data.jsonl", "sft_rejects.jsonl"
SENTIMENT_LABELS = ("positive", "negative", "neutral")
HELDOUT_PERCENT = 5          # share of source texts reserved for evaluation (by hash of the text)
MIN_WORDNET_COUNT = 5        # tagged-corpus count a WordNet sense needs to count as a common word
LOOP_NGRAM, LOOP_REPEATS = 3, 3  # a word 3-gram seen 3 times marks a looping answer
MIN_NEW_WORDS = 4          # an answer that starts with its input must add this many words
ECHO_OVERLAP = 0.75         # ... or share less than this share of its words with the input
MIN_TRUNCATED_KEEP = 0.5     # a truncated answer is cut at its last sentence end if that keeps half of it

# Tokens of new text each kind may generate: classification needs a word, the rest a few sentences.
MAX_NEW_TOKENS = {"question": 40, "define": 56, "use_word": 40, "continue": 56, "summarize": 56,
                  "sentiment": 24, "intent": 24}
# Said to the teacher only (the stored instruction stays as the user would type it): a 135M chat model
# otherwise explains the task instead of naming a label.
CLASSIFY_HINT = "Answer with the label only."
# How many tasks of each kind the default build makes (generation order interleaves the kinds, so a
# time budget that stops early still leaves a balanced set).
DEFAULT_COUNTS = {"question": 300, "define": 400, "use_word": 300, "continue": 500, "summarize": 150,
                  "sentiment": 300, "intent": 400, "repeat": 900}

GenerateFn = Callable[[Sequence[str], int], Sequence[tuple[str, bool]]]  # prompts, max_new -> (text, finished)

# --- hand-written templates ----------------------------------------------------------------------
COUNTRIES = ("Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico", "Egypt",
             "Kenya", "Peru", "Chile", "Argentina", "Russia", "Greece", "Portugal", "Norway", "Sweden",
             "Finland", "Poland", "Austria", "Ireland", "Turkey", "Thailand", "Vietnam", "Australia",
             "Cuba", "Belgium", "Netherlands", "Denmark", "Hungary", "Morocco", "Nigeria", "Colombia",
             "Indonesia", "Switzerland", "South Korea", "Iran", "Iraq")
QUESTION_TEMPLATES = ("What is the capital of {country}?", "What language do people speak in {country}?",
                      "On which continent is {country}?", "Tell me one interesting fact about {country}.")
WORD_QUESTION_TEMPLATES = {
    "n": ("What is a {word}?", "Where would you usually find a {word}?", "Tell me something about a {word}."),
    "a": ("What is the opposite of {word}?", "Give me a synonym for {word}."),
    "v": ("What does it mean to {word}?", "Give me an example of when people {word}."),
}
DEFINE_TEMPLATES = ("What does the word \"{word}\" mean?", "Define the word \"{word}\".",
                    "Explain the meaning of \"{word}\" in simple terms.")
USE_WORD_TEMPLATES = ("Use the word \"{word}\" in a sentence.", "Write a sentence that contains the word \"{word}\".")
SUMMARIZE_INSTRUCTIONS = ("Summarize the following text in one sentence.",
                          "Please summarize the following text briefly.")
ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "hallway", "office", "garage", "dining room",
         "basement", "kids room", "attic", "porch", "study", "laundry room")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "warm white", "cyan")
LEVELS = ("10", "20", "25", "30", "40", "50", "60", "70", "75", "80", "90")
INTENT_PHRASES = {
    "SwitchLightOn": ("turn on the lights in the {room}", "switch on the {room} light", "lights on in the {room}",
                      "please turn the {room} lights on", "can you switch the light on in the {room}"),
    "SwitchLightOff": ("turn off the lights in the {room}", "switch off the {room} light", "lights off in the {room}",
                       "please turn the {room} lights off", "kill the lights in the {room}"),
    "IncreaseBrightness": ("make the {room} lights brighter", "increase the brightness in the {room}",
                           "brighten the lights in the {room}", "turn up the lights in the {room}",
                           "the {room} is too dark, raise the lights"),
    "DecreaseBrightness": ("dim the lights in the {room}", "make the {room} lights dimmer",
                           "decrease the brightness in the {room}", "turn down the lights in the {room}",
                           "the {room} lights are too bright, lower them"),
    "SetLightBrightness": ("set the {room} lights to {level} percent", "set the brightness in the {room} to {level}",
                           "change the {room} light level to {level} percent",
                           "put the {room} lights at {level} percent"),
    "SetLightColor": ("change the {room} lights to {color}", "make the lights in the {room} {color}",
                      "set the {room} light color to {color}", "turn the {room} lights {color}"),
}


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    instruction: str
    input: str = ""
    labels: tuple[str, ...] = ()
    gold: str | None = None     # the label a templated command was written for
    target: str | None = None   # a target known without generation (repetition)
    split: str = "train"

    @property
    def user_message(self) -> str:
        """What the LLM reads through its own chat template (the same join as prompt.render)."""
        return " ".join(part for part in (self.instruction, self.input, CLASSIFY_HINT if self.labels else "") if part)


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


def split_of(source_text: str) -> str:
    """A source text is held out (never trained on, in any task) by its hash alone."""
    return "heldout" if stable_hash(source_text.lower()) % 100 < HELDOUT_PERCENT else "train"


def make_task(kind: str, instruction: str, input: str = "", *, source: str | None = None, **kwargs) -> Task:
    task_id = hashlib.sha1(f"{kind}\x00{instruction}\x00{input}".encode("utf-8")).hexdigest()[:16]
    return Task(task_id, kind, instruction, input,
                split=split_of(source if source is not None else input or instruction), **kwargs)


def transcript_style(text: str) -> str:
    """How an ASR transcript reads: lower case, no punctuation but apostrophes."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


# --- offline sources -------------------------------------------------------------------------------
@dataclass
class Sources:
    words: dict[str, list[str]]  # part of speech (n, v, a) -> common single words
    examples: list[str]          # WordNet usage examples (short phrases and sentences)
    sentences: list[str]         # one-line fortunes, 5 to 30 words
    passages: list[str]          # multi-sentence fortunes for summaries


def common_lemmas(wordnet_dir: Path = WORDNET_DIR, min_count: int = MIN_WORDNET_COUNT) -> dict[str, list[str]]:
    """Single lower-case words whose senses are seen often in WordNet's tagged corpus."""
    pos_of = {"1": "n", "2": "v", "3": "a", "5": "a"}
    words: dict[str, set[str]] = {"n": set(), "v": set(), "a": set()}
    for line in (wordnet_dir / "cntlist.rev").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or int(parts[2]) < min_count:
            continue
        lemma, key = parts[0].split("%", 1)
        if re.fullmatch(r"[a-z]{3,12}", lemma) and key[:1] in pos_of:
            words[pos_of[key[:1]]].add(lemma)
    return {pos: sorted(found) for pos, found in words.items()}


def wordnet_examples(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """WordNet's usage examples (train.text_sources) of 5 to 25 plain words."""
    return sorted({example.strip() for example in text_sources.wordnet_examples(wordnet_dir)
                   if 5 <= len(example.split()) <= 25 and re.fullmatch(r"[A-Za-z ,.'!?;:-]+", example)})


def fortunes(fortunes_dir: Path = FORTUNES_DIR) -> tuple[list[str], list[str]]:
    """(one-line sentences, short passages) of plain prose from the fortune files."""
    sentences, passages = set(), set()
    for name in ("fortunes", "literature", "riddles"):
        path = fortunes_dir / name
        if not path.is_file():
            continue
        for block in text_sources.fortune_blocks(path):
            lines = [ln.strip() for ln in block if ln.strip()]
            text = re.sub(r"\s+", " ", " ".join(lines)).strip()
            if not text or not re.fullmatch(r"[A-Za-z0-9 ,.'!?;:()-]+", text):
                continue
            words = len(text.split())
            if 5 <= words <= 30 and len(lines) <= 2:
                sentences.add(text)
            if 25 <= words <= 90 and text.count(".") >= 2:
                passages.add(text)
    return sorted(sentences), sorted(passages)


def load_sources() -> Sources:
    missing = [str(p) for p in (WORDNET_DIR / "cntlist.rev", FORTUNES_DIR / "fortunes") if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: apt-get install -y wordnet-base fortunes-min")
    sentences, passages = fortunes()
    return Sources(common_lemmas(), wordnet_examples(), sentences, passages)


# --- tasks -------------------------------------------------------------------------------------------
def intent_commands() -> list[tuple[str, str]]:
    """(command, label) for every light command the templates can write."""
    commands = []
    for label, phrases in INTENT_PHRASES.items():
        for phrase in phrases:
            for room in ROOMS:
                if "{" in phrase.replace("{room}", ""):
                    fills = [dict(room=room, level=lv, color=c) for lv, c in zip(LEVELS, COLORS)]
                else:
                    fills = [dict(room=room)]
                commands.extend((phrase.format(**fill), label) for fill in fills)
    return sorted(set(commands))


def make_tasks(sources: Sources, counts: dict[str, int], seed: int = 0) -> list[Task]:
    """Every task of the build, deterministic for a seed, deduplicated by id."""
    rng = random.Random(seed)
    pick = lambda seq: seq[rng.randrange(len(seq))]  # noqa: E731
    makers: dict[str, Callable[[], Task]] = {
        "question": lambda: _question(sources, rng, pick),
        "define": lambda: (w := pick(sources.words[pick("nva")]))
        and make_task("define", pick(DEFINE_TEMPLATES).format(word=w), source=w),
        "use_word": lambda: (w := pick(sources.words[pick("nva")]))
        and make_task("use_word", pick(USE_WORD_TEMPLATES).format(word=w), source=w),
        "continue": lambda: _with_source("continue", CONTINUATION_INSTRUCTION,
                                         pick(sources.sentences + sources.examples), rng),
        "summarize": lambda: make_task("summarize", pick(SUMMARIZE_INSTRUCTIONS), pick(sources.passages)),
        "sentiment": lambda: _with_source("sentiment", SENTIMENT_INSTRUCTION,
                                          pick(sources.sentences + sources.examples), rng, labels=SENTIMENT_LABELS),
        "intent": lambda: _intent(pick(intent_commands())),
        "repeat": lambda: _repeat(pick(sources.sentences + sources.examples), rng),
    }
    tasks: dict[str, Task] = {}
    for kind, count in counts.items():
        made, attempts = 0, 0
        while made < count and attempts < count * 20:
            attempts += 1
            task = makers[kind]()
            if task.id not in tasks:
                tasks[task.id] = task
                made += 1
    return list(tasks.values())


def _question(sources: Sources, rng: random.Random, pick) -> Task:
    if rng.random() < 0.4:
        country = pick(COUNTRIES)
        return make_task("question", pick(QUESTION_TEMPLATES).format(country=country), source=country)
    pos = pick("nva")
    word = pick(sources.words[pos])
    return make_task("question", pick(WORD_QUESTION_TEMPLATES[pos]).format(word=word), source=word)


def _with_source(kind: str, instruction: str, sentence: str, rng: random.Random, **kwargs) -> Task:
    """Half the inputs read like ASR transcripts (the form speech turns take), half as written."""
    text = transcript_style(sentence) if rng.random() < 0.5 else sentence
    return make_task(kind, instruction, text, source=sentence, **kwargs)


def _intent(command_label: tuple[str, str]) -> Task:
    command, label = command_label
    instruction = INTENT_INSTRUCTION.format(labels=", ".join(SNIPS_LIGHT_INTENTS))
    return make_task("intent", instruction, command, labels=SNIPS_LIGHT_INTENTS, gold=label)


def _repeat(sentence: str, rng: random.Random) -> Task:
    text = transcript_style(sentence) if rng.random() < 0.7 else sentence
    return make_task("repeat", REPEAT_INSTRUCTION, text, source=sentence, target=text)


def interleave(tasks: Sequence[Task], batch_size: int, seed: int = 0) -> list[list[Task]]:
    """Batches of one kind each (so each batch has one token budget), kinds taken in turn."""
    rng = random.Random(seed)
    by_kind: dict[str, list[Task]] = {}
    for task in tasks:
        by_kind.setdefault(task.kind, []).append(task)
    queues = []
    for kind in sorted(by_kind):
        items = sorted(by_kind[kind], key=lambda t: t.id)
        rng.shuffle(items)
        queues.append([items[i:i + batch_size] for i in range(0, len(items), batch_size)])
    batches = []
    while any(queues):
        for queue in queues:
            if queue:
                batches.append(queue.pop(0))
    return batches


# --- filters -----------------------------------------------------------------------------------------
def loops(text: str) -> bool:
    """A word 3-gram said 3 times (train.generate_continuations.is_looping without its distinct-ratio rule)."""
    return is_looping(re.findall(r"\w+", text.lower()), LOOP_NGRAM, LOOP_REPEATS, min_distinct=0.0)


def trim_truncated(text: str) -> str | None:
    """An answer cut off by the token budget, ended at its last full sentence (None if too little is left)."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    if not ends or ends[-1] < MIN_TRUNCATED_KEEP * len(text):
        return None
    return text[: ends[-1]]


def echoes(answer: str, source: str, min_new_words: int = MIN_NEW_WORDS) -> bool:
    """An answer that only restates its input (a continuation that does not continue)."""
    said, given = transcript_style(answer).split(), transcript_style(source).split()
    if not said or len(said) - len(given) >= min_new_words:
        return False
    return sum(word in given for word in said) >= ECHO_OVERLAP * len(said)


def pick_label(answer: str, labels: Sequence[str]) -> str | None:
    """The one label an answer names (case, spaces and punctuation ignored), or None."""
    compact = re.sub(r"[^a-z]", "", answer.lower())
    named = [label for label in labels if compact.count(re.sub(r"[^a-z]", "", label.lower())) == 1]
    mentioned = [label for label in labels if re.sub(r"[^a-z]", "", label.lower()) in compact]
    return named[0] if len(named) == 1 and len(mentioned) == 1 else None


def judge(task: Task, raw: str, finished: bool) -> tuple[str | None, str | None]:
    """(target, None) to keep, (None, reason) to drop."""
    text = raw.strip()
    if not text:
        return None, "empty"
    if "###" in text or "<|im_" in text:
        return None, "format_leak"
    if task.labels:
        label = pick_label(text, task.labels)
        if label is None:
            return None, "not_a_label"
        if task.gold is not None and label != task.gold:
            return None, "disagrees_with_command_label"
        return label, None
    if loops(text):
        return None, "looping"
    if task.kind == "continue" and echoes(text, task.input):  # a summary may well reuse its input's words
        return None, "echoes_input"
    if not finished:
        text = trim_truncated(text)
        if text is None:
            return None, "truncated"
    return text, None


# --- the build ------------------------------------------------------------------------------------------
def forget_rejects(out_dir: Path, reasons: Sequence[str]) -> int:
    """Remove rejects with these reasons, so that a rerun tries those tasks again (after a fix)."""
    path = out_dir / REJECTS_NAME
    rows = read_jsonl(path)
    keep = [r for r in rows if r["reason"] not in reasons]
    write_jsonl_atomic(path, keep)
    return len(rows) - len(keep)


def done_ids(out_dir: Path) -> set[str]:
    ids = set()
    for name in (DATA_NAME, REJECTS_NAME):
        path = out_dir / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    ids.add(json.loads(line)["id"])
    return ids


def build(tasks: Sequence[Task], generate: GenerateFn, out_dir: Path, *, batch_size: int = 32,
          time_budget_s: float | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Answer every task not yet decided, appending kept and dropped records; returns the data card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_dir)
    seen_outputs = {(r["kind"], r["output"]) for r in read_jsonl(out_dir / DATA_NAME)}
    todo = [t for t in tasks if t.id not in done]
    batches = interleave(todo, batch_size, seed)
    start = time.monotonic()
    bar = _progress(len(todo), progress)
    with (open(out_dir / DATA_NAME, "a", encoding="utf-8") as kept,
          open(out_dir / REJECTS_NAME, "a", encoding="utf-8") as rejected):
        for batch in batches:
            if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                break
            answers = _answers(batch, generate)
            for task, (raw, finished) in zip(batch, answers):
                target, reason = (task.target, None) if task.target is not None else judge(task, raw, finished)
                if reason is None and not task.labels and (task.kind, target) in seen_outputs:
                    reason = "duplicate_output"
                if reason is None:
                    seen_outputs.add((task.kind, target))
                    record = dict(id=task.id, kind=task.kind, split=task.split, instruction=task.instruction,
                                  input=task.input, output=target)
                    kept.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    rejected.write(json.dumps(dict(id=task.id, kind=task.kind, reason=reason, raw=raw),
                                              ensure_ascii=False) + "\n")
            kept.flush()
            rejected.flush()
            bar.update(len(batch))
    bar.close()
    return write_card(out_dir, planned=len(tasks))


def refilter(out_dir: Path) -> dict:
    """Apply the current filters again to kept records (after a filter changed); drops move to rejects."""
    path = out_dir / DATA_NAME
    kept, moved = [], []
    for record in read_jsonl(path):
        task = Task(record["id"], record["kind"], record["instruction"], record["input"],
                    labels={"sentiment": SENTIMENT_LABELS, "intent": SNIPS_LIGHT_INTENTS}.get(record["kind"], ()))
        reason = None if record["kind"] == "repeat" else judge(task, record["output"], True)[1]
        if reason is None:
            kept.append(record)
        else:
            moved.append(dict(id=record["id"], kind=record["kind"], reason=reason, raw=record["output"]))
    write_jsonl_atomic(path, kept)
    with open(out_dir / REJECTS_NAME, "a", encoding="utf-8") as rejected:
        append_lines(rejected, moved)
    return write_card(out_dir)


def _answers(batch: Sequence[Task], generate: GenerateFn) -> Sequence[tuple[str, bool]]:
    if batch[0].target is not None:
        return [("", True)] * len(batch)
    answers = generate([t.user_message for t in batch], MAX_NEW_TOKENS[batch[0].kind])
    if len(answers) != len(batch):
        raise RuntimeError(f"generator returned {len(answers)} answers for {len(batch)} prompts")
    return answers


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="sft data", unit="task", disable=not enabled)


def write_card(out_dir: Path, planned: int | None = None, extra: dict | None = None) -> dict:
    kept, rejected = read_jsonl(out_dir / DATA_NAME), read_jsonl(out_dir / REJECTS_NAME)
    card = {
        "kept": len(kept), "dropped": len(rejected), "planned": planned,
        "kept_per_kind": dict(sorted(Counter(r["kind"] for r in kept).items())),
        "kept_per_split": dict(sorted(Counter(r["split"] for r in kept).items())),
        "dropped_per_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "dropped_per_kind_reason": dict(sorted(Counter(f"{r['kind']}/{r['reason']}" for r in rejected).items())),
        **(extra or {}),
    }
    (out_dir / "data_card.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = ["# Stage-1 self-distilled instruction data", "",
             "Instructions from WordNet (wordnet-base), fortunes (fortunes-min) and hand-written templates;",
             "answers from the LLM itself through its own chat template (greedy). Built by train/build_sft_data.py.",
             "",
             f"Kept {card['kept']}, dropped {card['dropped']}" + (f" (of {planned} planned tasks)" if planned else "")
             + ".", "",
             "| kind | kept |", "|---|---|", *[f"| {k} | {v} |" for k, v in card["kept_per_kind"].items()], "",
             "| drop reason | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in card["dropped_per_reason"].items()],
             ""]
    (out_dir / "DATA_CARD.md").write_text("\n".join(lines))
    return card


# --- Alpaca input for users who have a real set ------------------------------------------------------------
def read_alpaca(path: str | Path) -> list[dict]:
    """An Alpaca JSON list or JSONL file -> records with instruction, input ('' if absent), output."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise ValueError(f"{path}: record {index} needs 'instruction' and 'output' (Alpaca format)")
        out.append({**record, "instruction": str(record["instruction"]), "input": str(record.get("input") or ""),
                    "output": str(record["output"])})
    return out


# --- the LLM as generator ------------------------------------------------------------------------------------
def chat_generator(llm_dir: str | Path, threads: int | None = None) -> GenerateFn:
    """Greedy answers through the LLM's own chat template, batched with left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(messages: Sequence[str], max_new_tokens: int) -> list[tuple[str, bool]]:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                               add_generation_prompt=True)
                 for m in messages]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        return [(tokenizer.decode(row, skip_special_tokens=True), bool((row == eos).any())) for row in new]

    return generate


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sft")
    parser.add_argument("--llm", default="offline:smollm2-135m-instruct",
                        help="the LLM that answers (offline: name or directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the default count of every kind")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--time-budget-min", type=float, default=None, help="stop starting batches after this long")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--refilter", action="store_true", help="only re-apply the filters to the kept records")
    parser.add_argument("--retry", default="", help="comma-separated drop reasons whose tasks are tried again")
    parser.add_argument("--kinds", default="", help="comma-separated kinds to work on (default: all)")
    args = parser.parse_args(argv)
    if args.retry:
        print(f"retrying {forget_rejects(Path(args.out), args.retry.split(','))} dropped tasks")
    if args.refilter:
        print(json.dumps(refilter(Path(args.out)), indent=2))
        return

    counts = {k: max(1, round(v * args.scale)) for k, v in DEFAULT_COUNTS.items()}
    tasks = make_tasks(load_sources(), counts, args.seed)
    if args.kinds:
        tasks = [t for t in tasks if t.kind in args.kinds.split(",")]
    generate = chat_generator(resolve_base(args.llm), args.threads)
    card = build(tasks, generate, Path(args.out), batch_size=args.batch_size, seed=args.seed,
                 time_budget_s=None if args.time_budget_min is None else args.time_budget_min * 60)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
