"""Continuation targets (paper section 3, step 1): the LLM continues each transcript, text in.

    python -m train.generate_continuations --manifest IN.jsonl --out OUT.jsonl [--model PATH_OR_ID]
        [--batch-size B] [--max-new-tokens 64] [--backend auto|hf|vllm]
    accelerate launch --num_processes 8 -m train.generate_continuations --manifest ... --out ...

Prompt: `prompt.render` of one human turn (instruction = constants.CONTINUATION_INSTRUCTION, text = the
transcript) with the model's template, i.e. `BOS###[Human]:Continue ... 40 words. {text}\n\n\n###[Assistant]:`
for the released `blsp` format. Greedy, at most --max-new-tokens, stopping at EOS (prompt.eos_token_ids)
or at `###` (the text is cut there, prompt.cut_at_stop). Prompts longer than --max-prompt-tokens are
skipped (the release keeps < 192 tokens). Prompts are sorted by length (longest first, so a batch that does
not fit in memory fails at once) and batched with LEFT padding.

--model: None (default) loads what `blsp_chat.weights.load_pretrained(None)` loads and uses its LLM and
template; a BLSP checkpoint directory likewise; anything else is read as a plain causal LM (directory or
hub id) with --template (default blsp).

Sharding: under `accelerate launch` rank r of W takes every W-th prompt of the length-sorted list (so
ranks get similar lengths) and appends to OUT.parts/part-<r>.jsonl; rank 0 merges when all are done.
Checkpointing: every finished batch is appended (one write per line, flush + fsync); a restarted run --
with any number of ranks -- skips every manifest line whose key (its "id", else its "audio") is in a part
file or in OUT already. A kill leaves at most a partial last line, which is never read as a result. So no
line is lost or doubled.

Output: OUT (kept lines, manifest order): the manifest's fields plus "instruction", "response",
"response_tokens", "stopped_by"; OUT.rejected.jsonl (dropped lines with "filter"); OUT.summary.json.

Quality filter (`quality_issue`, a light heuristic, counted in the summary; every merge judges all lines
again, so rerunning a finished command applies a changed filter without generating anything):
- "empty": fewer than MIN_RESPONSE_WORDS words after cutting at `###`.
- "copy": the response only repeats the transcript: fewer than MIN_RESPONSE_WORDS of its words are not
  words of the transcript (so "The dress was a violent red." for "Her dress was a violent red." is a copy).
- "looping": a word 3-gram occurs LOOP_MAX_REPEATS or more times, or under LOOP_MIN_DISTINCT of the
  3-grams are distinct (greedy decoding of small LLMs falls into cycles).
- "off_topic": the transcript has at least --min-topic-words content words (3+ letters, not a stop word)
  and the response shares none of them, compared by their first STEM_CHARS letters (so "rains"/"raining"
  match). A continuation usually picks up a name, a noun or a verb of what it continues; one that shares
  nothing with a content-rich transcript is usually a generic reply. Short transcripts are never judged.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from blsp_chat import weights
from blsp_chat.constants import CONTINUATION_INSTRUCTION, STOP_STRINGS
from blsp_chat.prompt import PromptTemplate, Turn, cut_at_stop, eos_token_ids, render, template_for

from .io import append_line, read_jsonl_tolerant, repair_tail, write_jsonl_atomic

MAX_NEW_TOKENS = 64          # the release's setting
MAX_PROMPT_TOKENS = 192      # the release keeps prompts shorter than this
MIN_RESPONSE_WORDS = 3
LOOP_NGRAM = 3
LOOP_MAX_REPEATS = 3
LOOP_MIN_DISTINCT = 0.5
MIN_TOPIC_WORDS = 4
STEM_CHARS = 5
VLLM_CHUNK = 1024            # prompts per vLLM call (one checkpoint per call)
PARTS_SUFFIX = ".parts"
_WORD = re.compile(r"[a-z0-9']+")
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each even ever every few for from further
get got had has have having he her here hers herself him himself his how however i if in into is it its
itself just like made make many may me might more most much must my myself never no nor not now of off
on once one only or other our ours ourselves out over own really said same say says see she should so
some still such than that the their theirs them themselves then there these they this those through
thus to too under until up upon us very was way we well were what when where which while who whom whose
why will with within without would yet you your yours yourself yourselves
""".split())


# --- the quality filter ------------------------------------------------------------------------------
def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def content_stems(words: Iterable[str]) -> set[str]:
    return {w[:STEM_CHARS] for w in words if len(w) >= 3 and w not in STOP_WORDS and not w.isdigit()}


def is_looping(words: Sequence[str], n: int = LOOP_NGRAM, max_repeats: int = LOOP_MAX_REPEATS,
               min_distinct: float = LOOP_MIN_DISTINCT) -> bool:
    """A word n-gram said `max_repeats` times, or (over at least 2n n-grams) fewer than `min_distinct` of
    them distinct: the mark of an LLM reply stuck in a loop."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return False
    if max(Counter(grams).values()) >= max_repeats:
        return True
    return len(grams) >= 2 * n and len(set(grams)) / len(grams) < min_distinct


def quality_issue(transcript: str, response: str, min_topic_words: int = MIN_TOPIC_WORDS) -> str | None:
    """Why a continuation should be dropped ("empty", "copy", "looping", "off_topic"), or None."""
    said, wrote = words_of(transcript), words_of(response)
    if len(wrote) < MIN_RESPONSE_WORDS:
        return "empty"
    transcript_words = set(said)
    if sum(word not in transcript_words for word in wrote) < MIN_RESPONSE_WORDS:
        return "copy"
    if is_looping(wrote):
        return "looping"
    topic = content_stems(said)
    if min_topic_words and len(topic) >= min_topic_words and not topic & content_stems(wrote):
        return "off_topic"
    return None


# --- prompts and batched greedy generation ------------------------------------------------------------
def prompt_ids(tokenizer, template: PromptTemplate, transcript: str) -> list[int]:
    return render([Turn("human", instruction=CONTINUATION_INSTRUCTION, text=transcript)], tokenizer, template).input_ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the left, and the attention mask (0 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


@dataclass
class Generation:
    response: str
    tokens: int
    stopped_by: str  # "eos", "stop_string" or "max_new_tokens"


class HFGenerator:
    """Greedy, left-padded batched generation with a transformers causal LM."""

    def __init__(self, llm, tokenizer, template: PromptTemplate, *, max_new_tokens: int = MAX_NEW_TOKENS):
        self.llm = llm.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_token_ids(tokenizer, llm)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def prompt(self, transcript: str) -> list[int]:
        return prompt_ids(self.tokenizer, self.template, transcript)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        ids, mask = left_pad(prompts, self.pad_id)
        device = next(self.llm.parameters()).device
        out = self.llm.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=self.max_new_tokens,
            do_sample=False, num_beams=1, repetition_penalty=1.0, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            stop_strings=list(STOP_STRINGS), tokenizer=self.tokenizer,
        )
        return [self._finish(row) for row in out[:, ids.shape[1]:].tolist()]

    def _finish(self, new_ids: list[int]) -> Generation:
        eos = set(self.eos_ids)
        end = next((i for i, t in enumerate(new_ids) if t in eos), None)
        kept = new_ids if end is None else new_ids[:end]
        raw = self.tokenizer.decode(kept, skip_special_tokens=True)
        if any(s in raw for s in STOP_STRINGS):
            stopped = "stop_string"
        else:
            stopped = "eos" if end is not None else "max_new_tokens"
        return Generation(cut_at_stop(raw), len(kept), stopped)


class VLLMGenerator:
    """The same prompts and greedy decoding through vLLM (GPU only; not exercised by the tests)."""

    def __init__(self, llm_path: str, tokenizer, template: PromptTemplate, *, max_new_tokens: int = MAX_NEW_TOKENS,
                 eos_ids: Sequence[int] = ()):
        from vllm import LLM, SamplingParams  # guarded: only when the backend is chosen

        self.tokenizer, self.template = tokenizer, template
        self.llm = LLM(model=llm_path, tokenizer=llm_path, dtype="auto")
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(STOP_STRINGS),
                                     stop_token_ids=list(eos_ids), skip_special_tokens=True)

    def prompt(self, transcript: str) -> list[int]:
        return prompt_ids(self.tokenizer, self.template, transcript)

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], self.params, use_tqdm=False)
        result = []
        for out in outputs:
            choice = out.outputs[0]
            stopped = {"stop": "eos" if choice.stop_reason is None else "stop_string", "length": "max_new_tokens"}
            result.append(Generation(cut_at_stop(choice.text), len(choice.token_ids),
                                     stopped.get(choice.finish_reason, "eos")))
        return result


# --- loading -------------------------------------------------------------------------------------------
def _is_blsp_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "whisper_config" in json.loads(config.read_text())


def load_generator(model: str | None, *, backend: str = "auto", template_name: str = "blsp", device=None,
                   max_new_tokens: int = MAX_NEW_TOKENS):
    """The LLM, its tokenizer and template, wrapped for generation; see the module doc for --model."""

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    blsp = model in (None, "", "default") or (Path(model).is_dir() and _is_blsp_dir(Path(model)))
    if blsp:
        loaded = weights.load_pretrained(model, device="cpu", dtype=dtype)
        llm, tokenizer = loaded.model.llama_model, loaded.tokenizer
        template = template_for(loaded.model.config.prompt_template, tokenizer)
        llm_name = loaded.model.config.llm_name_or_path
        llm_path = weights.resolve_base(llm_name) if llm_name else None
        del loaded.model.whisper_model  # only the LLM is needed here
    else:
        llm, tokenizer = weights.load_llm(model, dtype)
        template = template_for(template_name, tokenizer)
        llm_path = weights.resolve_base(model)
    if backend == "vllm" or (backend == "auto" and llm_path and _vllm_usable(llm_path)):
        eos = eos_token_ids(tokenizer, llm)
        del llm
        return VLLMGenerator(llm_path, tokenizer, template, max_new_tokens=max_new_tokens, eos_ids=eos)
    return HFGenerator(llm.to(device), tokenizer, template, max_new_tokens=max_new_tokens)


def _vllm_usable(llm_path: str) -> bool:
    """vLLM reads a plain model directory (or hub id); a LoRA directory is merged by the HF path instead."""
    import importlib.util

    if (Path(llm_path) / "adapter_config.json").is_file():
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


# --- one rank's work -------------------------------------------------------------------------------------
def key_of(record: dict) -> str:
    return str(record.get("id") or record["audio"])


def parts_dir(out: Path) -> Path:
    return Path(str(out) + PARTS_SUFFIX)


def rejected_file(out: Path) -> Path:
    return Path(out).with_suffix(".rejected.jsonl")


def summary_file(out: Path) -> Path:
    return Path(out).with_suffix(".summary.json")


def done_keys(out: Path) -> set[str]:
    """Keys of every complete result already on disk: part files of any rank, OUT and its rejects."""
    files = [Path(out), rejected_file(out)] + sorted(parts_dir(out).glob("part-*.jsonl"))
    return {r["key"] if "key" in r else key_of(r) for path in files for r in read_jsonl_tolerant(path)}


@dataclass
class Plan:
    records: list[dict]               # input lines, duplicates removed, manifest order
    prompts: dict[str, list[int]]     # key -> prompt ids
    too_long: list[str]
    duplicates: int
    order: list[str] = field(default_factory=list)  # generation order of the keys that fit

    def shard(self, rank: int, world: int) -> list[str]:
        return self.order[rank::world]


def make_plan(records: Sequence[dict], prompt_fn: Callable[[str], list[int]],
              max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Plan:
    unique, seen, duplicates = [], set(), 0
    for record in records:
        key = key_of(record)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        unique.append(record)
    prompts = {key_of(r): prompt_fn(r["text"]) for r in unique}
    too_long = [k for k, p in prompts.items() if len(p) >= max_prompt_tokens]
    index = {key_of(r): i for i, r in enumerate(unique)}
    fitting = [k for k in prompts if len(prompts[k]) < max_prompt_tokens]
    order = sorted(fitting, key=lambda k: (-len(prompts[k]), index[k]))
    return Plan(unique, prompts, too_long, duplicates, order)


def run_shard(plan: Plan, generate: Callable, out: Path, *, rank: int = 0, world: int = 1, batch_size: int = 8,
              min_topic_words: int = MIN_TOPIC_WORDS, progress: bool = True) -> dict:
    """Generate every not-yet-done line of this rank's shard, appending each batch to its part file."""
    out = Path(out)
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"part-{rank:05d}.jsonl"
    repair_tail(part)
    done = done_keys(out)
    by_key = {key_of(r): r for r in plan.records}
    pending = [k for k in plan.shard(rank, world) if k not in done]
    stats = {"rank": rank, "lines": 0, "tokens": 0, "seconds": 0.0}
    bar = _bar(len(pending), progress and rank == 0)
    started = time.perf_counter()
    with open(part, "a", encoding="utf-8") as handle:
        for start in range(0, len(pending), batch_size):
            keys = pending[start:start + batch_size]
            results = generate([plan.prompts[k] for k in keys])
            for key, gen in zip(keys, results):
                append_line(handle, result_record(by_key[key], key, gen, min_topic_words))
                stats["tokens"] += gen.tokens
            stats["lines"] += len(keys)
            if bar is not None:
                elapsed = time.perf_counter() - started
                bar.update(len(keys))
                bar.set_postfix(lines_per_s=f"{stats['lines'] / elapsed:.2f}",
                                tok_per_s=f"{stats['tokens'] / elapsed:.1f}")
    if bar is not None:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    (parts / f"stats-{rank:05d}.json").write_text(json.dumps(stats) + "\n")
    return stats


def result_record(record: dict, key: str, gen: Generation, min_topic_words: int) -> dict:
    out = dict(record)
    out.update(instruction=CONTINUATION_INSTRUCTION, response=gen.response, response_tokens=gen.tokens,
               stopped_by=gen.stopped_by, key=key, filter=quality_issue(record["text"], gen.response, min_topic_words))
    return out


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="line", desc="continuations", file=sys.stderr, dynamic_ncols=True)


def _last_run(stats: Sequence[dict], out: Path) -> dict:
    """Throughput of the run that generated; a rerun that only re-filters keeps the recorded one."""
    stats = [s for s in stats if s["lines"]]
    if not stats and summary_file(out).is_file():
        return json.loads(summary_file(out).read_text())["last_run"]
    seconds = max((s["seconds"] for s in stats), default=0.0)
    lines, tokens = sum(s["lines"] for s in stats), sum(s["tokens"] for s in stats)
    return {"lines": lines, "tokens": tokens, "seconds": seconds, "ranks": len(stats),
            "lines_per_second": round(lines / seconds, 3) if seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None}


# --- merging ----------------------------------------------------------------------------------------------
def merge(plan: Plan, out: Path, min_topic_words: int = MIN_TOPIC_WORDS) -> dict:
    """Collect all results into OUT (kept) and OUT.rejected.jsonl in manifest order, write the summary;
    the part files go once every line that fits has its result. Every line is judged again by the current
    filter, so rerunning a finished command applies a changed filter without generating anything."""
    out = Path(out)
    parts = parts_dir(out)
    results: dict[str, dict] = {}
    for path in [Path(out), rejected_file(out)] + sorted(parts.glob("part-*.jsonl")):
        for record in read_jsonl_tolerant(path):
            key = record.get("key") or key_of(record)
            results.setdefault(key, {**record, "key": key})
    too_long = set(plan.too_long)
    keys = [key_of(r) for r in plan.records if key_of(r) not in too_long]
    missing = [k for k in keys if k not in results]
    stats = [json.loads(p.read_text()) for p in sorted(parts.glob("stats-*.json"))]
    ordered = [{**results[k], "filter": quality_issue(results[k]["text"], results[k]["response"], min_topic_words)}
               for k in keys if k in results]
    kept = [_public(r) for r in ordered if not r.get("filter")]
    dropped = [{k: v for k, v in r.items() if k != "key"} for r in ordered if r.get("filter")]
    summary = {
        "input_lines": len(plan.records) + plan.duplicates, "duplicates": plan.duplicates,
        "too_long": len(plan.too_long), "generated": len(ordered), "missing": len(missing),
        "kept": len(kept), "dropped": dict(Counter(r["filter"] for r in dropped)),
        "stopped_by": dict(Counter(r.get("stopped_by") for r in ordered)),
        "mean_response_words": round(sum(len(words_of(r["response"])) for r in kept) / len(kept), 1) if kept else 0,
        "last_run": _last_run(stats, out),
        "complete": not missing,
    }
    if not missing:
        write_jsonl_atomic(out, kept)
        write_jsonl_atomic(rejected_file(out), dropped)
        for path in parts.glob("*"):
            path.unlink()
        parts.rmdir()
    summary_file(out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("key", "filter")}


# --- command line -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="JSONL with audio and text (prepare_data / synthesize)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None,
                        help="BLSP checkpoint or causal LM (default: the offline default's LLM)")
    parser.add_argument("--template", default="blsp", help="prompt template for a plain causal LM: blsp or chat")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS)
    parser.add_argument("--min-topic-words", type=int, default=MIN_TOPIC_WORDS, help="0 turns the off-topic filter off")
    parser.add_argument("--limit", type=int, default=None, help="only the first N manifest lines")
    parser.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from accelerate import PartialState

    state = PartialState()
    records = read_jsonl_tolerant(Path(args.manifest))[: args.limit]
    generator = load_generator(args.model, backend=args.backend, template_name=args.template,
                               device=state.device, max_new_tokens=args.max_new_tokens)
    plan = make_plan(records, generator.prompt, args.max_prompt_tokens)
    batch = args.batch_size if isinstance(generator, HFGenerator) else VLLM_CHUNK
    run_shard(plan, generator, Path(args.out), rank=state.process_index, world=state.num_processes,
              batch_size=batch, min_topic_words=args.min_topic_words, progress=not args.no_progress)
    state.wait_for_everyone()
    if state.is_main_process:
        summary = merge(plan, Path(args.out), args.min_topic_words)
        print(json.dumps(summary, indent=2))
        if not summary["complete"]:
            print(f"{summary['missing']} lines still missing: run the same command again to finish", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
