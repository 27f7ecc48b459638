"""Turning a conversation into a reply.

`ChatSession` is the conversation engine, one per user: it keeps the history as `prompt.Turn`s, the
speech embeddings of each spoken turn (encoded once, on the model's device) and the LLM's KV cache of
the rendered history, and streams each reply as typed `ReplyChunk`s from a background thread.

KV reuse rests on one fact of `prompt.render`: the rendering of a history is a prefix of the rendering
of that history plus more turns, as long as assistant turns keep the token ids they were generated as.
The session remembers, for every position the cache holds, a key (the token id, or the speech clip and
frame for a speech position); before a reply it crops the cache to the longest prefix whose keys agree
with the new rendering and prefills only the rest. Dropped turns, `regenerate()` and `undo()` are all
handled by that one rule.

Dropping turns changes the prompt's start, so the whole kept history is prefilled again. A conversation
that outgrows the context therefore drops in one large step, down to `HISTORY_KEPT_ON_OVERFLOW` of
the room, so that the next several turns reuse the cache again. A `CacheBudget` shared by many
sessions caps the positions their caches hold together, dropping the least recently used idle ones.

Whole replies at once (one-shot and batched) are `generate.py`'s; a streamed reply samples its steps
with `generate.next_token`, so both follow the same rules. A reply's prefill runs in pieces under the
model's fair lock; its decode steps go through the model's `batcher.StepBatcher`, which runs the steps of
all sessions decoding at that moment as one batched forward pass.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from .audio import validate_audio
from .batcher import step_batcher
from .config import GenerationOptions
from .constants import STOP_STRINGS
from .generate import check_heard, loops_at_end, next_token
from .lock import model_lock, urgent_model_lock
from .prompt import RenderedPrompt, Turn, cut_at_stop, eos_token_ids, render, template_for
from .voice.sentences import SentenceSplitter, SplitterOptions
from .voice.speaker import spoken_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .model import BlspModel
    from .weights import LoadedBlsp

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence
CANCEL_JOIN_SECONDS = 60.0   # cancel() waits at most this long for the step in flight to finish
# On overflow the history is cut down to this share of the room (context - max_new_tokens). With kept
# history K of room H and turns of T tokens (question h + reply r), the next overflow comes after
# (H - K) / T turns, so re-prefilling K costs K * T / (H - K) per turn on average: T / 2 at K = H / 3,
# about one normal turn's prefill (h) when replies are as long as questions. Cutting to less keeps
# less of the conversation; cutting to more re-prefills more often (every turn when cut by one pair).
HISTORY_KEPT_ON_OVERFLOW = 1 / 3
# A prefill runs in pieces of this many positions, each one turn at the model lock, so that another
# session's decode step waits behind one piece rather than behind a whole long history.
PREFILL_CHUNK_TOKENS = 256

# Whole sentences only: a stopped reply is kept for the model up to its last sentence end, never cut
# through a run-on clause (the splitter's max_chars cut is for speaking early, not for completeness).
WHOLE_SENTENCES = SplitterOptions(max_chars=10**9)

StopReason = Literal["eos", "stop_string", "loop", "max_new_tokens", "cancelled"]


# --- streaming text ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplyChunk:
    """One piece of a streamed reply.

    delta: text new since the previous chunk (the deltas of a reply concatenate to the last chunk's text).
    text: the reply so far, as `cut_at_stop` would give it (never ends in half a character).
    done: True on the last chunk only, which carries `stopped_by`.
    stopped_by: "eos", "stop_string" (`###`), "max_new_tokens" or "cancelled"; None before the end.
    dropped_turns: how many of the oldest turns (human and assistant each count one) were dropped
        from the history to fit this reply into the context; the same on every chunk of a reply.
    """

    delta: str
    text: str
    done: bool = False
    stopped_by: StopReason | None = None
    dropped_turns: int = 0


class TextStream:
    """Token ids in, UTF-8-safe text deltas out, stopping at the stop strings.

    The whole id list is decoded each time; nothing is shown while it ends in U+FFFD (half a
    multi-byte character), nor a tail that could still grow into a stop string (`#`, `##`) or is only
    whitespace (the final text is stripped). So the shown text only ever grows, and equals
    `cut_at_stop(decode(ids))` at the end."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str] = STOP_STRINGS):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.shown = ""
        self.stop_hit = False

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def raw_before_stop(self) -> str:
        """Decoded ids up to the first stop string (unstripped)."""
        raw = self.decode(self.ids)
        hits = [raw.find(s) for s in self.stop_strings if s in raw]
        return raw[: min(hits)] if hits else raw

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text it made safe to show (often "")."""
        self.ids.append(int(token_id))
        raw = self.decode(self.ids)
        if any(s in raw for s in self.stop_strings):
            self.stop_hit = True
            return ""  # the rest is shown by finish()
        if raw.endswith(REPLACEMENT_CHAR):
            return ""
        visible = _hold_back_stop_prefix(raw, self.stop_strings).strip()
        return self._advance(visible)

    def finish(self) -> str:
        """The last delta: everything not yet shown of the final text."""
        return self._advance(self.final_text())

    def final_text(self) -> str:
        return cut_at_stop(self.raw_before_stop().rstrip(REPLACEMENT_CHAR))

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.shown):
            return ""  # a decoder that rewrote earlier text: wait (does not happen for byte-level BPE)
        delta, self.shown = visible[len(self.shown):], visible
        return delta


def _hold_back_stop_prefix(text: str, stop_strings: Sequence[str]) -> str:
    """`text` without a tail that is the start of a stop string (it may become one with more tokens)."""
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return text[:-size]
    return text


# --- the session ---------------------------------------------------------------------------------
class ContextOverflowError(ValueError):
    """The current turn alone (plus max_new_tokens) does not fit into the LLM's context."""


@dataclass
class _Entry:
    turn: Turn
    speech: torch.Tensor | None = None  # (L, d_llm) on the model's device, for a spoken human turn
    uid: int = 0                        # names this turn's speech positions in the cache keys
    read_as: Turn | None = None         # what the LLM reads in place of `turn` (a stopped reply's whole sentences)

    @property
    def read(self) -> Turn:
        return self.turn if self.read_as is None else self.read_as


@dataclass(eq=False)  # compared and hashed by identity: the set of running replies holds jobs
class _Job:
    options: GenerationOptions
    prompt: RenderedPrompt
    keys: list
    speech: list[torch.Tensor]
    dropped_turns: int
    chunks: "queue.Queue"
    cancel: threading.Event
    thread: threading.Thread | None = None


_DONE = object()
_uids = itertools.count(1)
# The replies whose threads may still run, so that the interpreter's exit stops them first (a job leaves with
# its session and thread).
_replies: "weakref.WeakSet[_Job]" = weakref.WeakSet()
_replies_lock = threading.Lock()


@atexit.register
def _stop_replies_at_exit() -> None:
    """Cancel the replies still running when the interpreter exits, and wait for each to finish its step.
    A reply's thread is a daemon, so that a reply nobody stopped cannot keep the process alive; but Python ends
    a daemon thread that is still inside a torch op at exit by unwinding it through C++ frames that may not
    unwind, and the process aborts ("terminate called without an active exception"), e.g. after a caller
    left a stream early and exited. atexit runs while daemon threads still run, after the other threads ended."""
    with _replies_lock:
        jobs = list(_replies)
    for job in jobs:
        job.cancel.set()
    for job in jobs:
        if job.thread is not None:
            job.thread.join(CANCEL_JOIN_SECONDS)


class ChatSession:
    """One user's conversation with a (shared) BlspModel.

        session = ChatSession(loaded.model, loaded.tokenizer)
        session.submit_audio(audio)          # or submit_text("...")
        for chunk in session.stream_reply(GenerationOptions(max_new_tokens=64)):
            print(chunk.delta, end="")

    The history alternates human and assistant turns; submit a human turn, then stream its reply.
    A reply runs on a background thread; while it runs only `cancel()` (and reading) is allowed.
    `max_context_tokens` caps the rendered history plus max_new_tokens (default: the LLM's
    max_position_embeddings); older turn pairs are dropped to fit. `reuse_cache=False` recomputes the
    whole history every reply (for comparison). Sessions given one `CacheBudget` keep their caches
    under its ceiling together.
    """

    def __init__(self, model: BlspModel, tokenizer: PreTrainedTokenizerBase, *, max_context_tokens: int | None = None,
                 reuse_cache: bool = True, generator: torch.Generator | None = None,
                 cache_budget: CacheBudget | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template_for(model.config.prompt_template, tokenizer)
        llm_limit = getattr(model.llama_model.config, "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or llm_limit
        if not self.max_context_tokens:
            raise ValueError("the LLM's config has no max_position_embeddings; pass max_context_tokens")
        self.reuse_cache = reuse_cache
        self.generator = generator
        self.cache_budget = cache_budget
        self.eos_ids = set(eos_token_ids(tokenizer, model.llama_model))
        self._entries: list[_Entry] = []
        self._cache: DynamicCache | None = None
        self._cache_keys: list = []  # one key per position the cache holds
        self._job: _Job | None = None
        self._state = threading.Lock()

    @classmethod
    def from_loaded(cls, loaded: LoadedBlsp, **kwargs) -> ChatSession:
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    # --- reading ---------------------------------------------------------------------------------
    @property
    def turns(self) -> tuple[Turn, ...]:
        with self._state:
            return tuple(e.turn for e in self._entries)

    @property
    def context_turns(self) -> tuple[Turn, ...]:
        """The history as the LLM reads it: `turns`, with each stopped reply cut back to its whole sentences."""
        with self._state:
            return tuple(e.read for e in self._entries)

    @property
    def busy(self) -> bool:
        return self._job is not None

    @property
    def cached_tokens(self) -> int:
        """How many positions of the history the KV cache holds."""
        return len(self._cache_keys)

    # --- human turns -----------------------------------------------------------------------------
    def submit_text(self, text: str, instruction: str = "") -> Turn:
        return self._append(_Entry(Turn("human", text=text, instruction=instruction)))

    def submit_audio(self, audio: np.ndarray, instruction: str = "", text: str = "") -> Turn:
        """A spoken turn: 16 kHz mono float audio, encoded here once and kept for later replies."""
        audio = validate_audio(audio, max_seconds=None)
        self._check_can_submit()
        with torch.inference_mode():  # the lock per forward pass: others' steps go between the readout's
            (speech,) = self.model.encode_speech([audio], guard=functools.partial(urgent_model_lock, self.model))
        check_heard([speech])  # refused before it joins the history: the conversation stays as it was
        turn = Turn("human", instruction=instruction, text=text, speech_tokens=speech.shape[0])
        return self._append(_Entry(turn, speech, next(_uids)))

    def add_reply(self, text: str) -> Turn:
        """An assistant turn the caller already has: a client that keeps its own history (the HTTP API)
        sends earlier replies as text, and they are rendered like any reply."""
        with self._state:
            self._check_idle()
            if not self._entries or self._entries[-1].turn.role != "human":
                raise ValueError("an assistant turn must follow a human turn")
            self._entries.append(_Entry(Turn("assistant", text=text)))
        return self._entries[-1].turn

    def _check_can_submit(self) -> None:
        self._check_idle()
        if self._entries and self._entries[-1].turn.role == "human":
            raise ValueError("the last human turn has no reply yet: call stream_reply() (or undo()) first")

    def _append(self, entry: _Entry) -> Turn:
        with self._state:
            self._check_can_submit()
            self._entries.append(entry)
        return entry.turn

    # --- editing ---------------------------------------------------------------------------------
    def undo(self) -> int:
        """Drop the last human turn and its reply (or a human turn still awaiting one); returns how
        many turns went. The cache is cropped lazily by the next reply."""
        with self._state:
            self._check_idle()
            if not self._entries:
                return 0
            count = 2 if self._entries[-1].turn.role == "assistant" else 1
            del self._entries[-count:]
            return count

    def clear(self) -> None:
        with self._state:
            self._check_idle()
            self._entries.clear()
            self._reset_cache()

    def trim_last_reply(self, text: str) -> None:
        """Keep the last reply only as far as `text` (what the user heard of it before interrupting);
        the model reads the trimmed reply from then on. The cache is cropped lazily by the next reply."""
        with self._state:
            self._check_idle()
            if not self._entries or self._entries[-1].turn.role != "assistant":
                raise ValueError("there is no reply to trim")
            self._entries[-1] = _Entry(Turn("assistant", text=text))

    def last_speech(self) -> torch.Tensor | None:
        """What the LLM reads for the last human turn's clip, (L, d_llm) (None for a typed turn): the
        readout's vectors, kept from submit_audio, e.g. to show the words a "ctc" readout heard."""
        with self._state:
            humans = [e for e in self._entries if e.turn.role == "human"]
        return humans[-1].speech if humans else None

    def regenerate(self, options: GenerationOptions = GenerationOptions()) -> Iterator[ReplyChunk]:
        """Drop the last reply and generate another (sample to get a different one)."""
        with self._state:
            self._check_idle()
            if not self._entries or self._entries[-1].turn.role != "assistant":
                raise ValueError("there is no reply to regenerate")
            self._entries.pop()
        return self.stream_reply(options)

    def cancel(self, timeout: float = CANCEL_JOIN_SECONDS) -> bool:
        """Stop the reply in flight after its current step; the partial reply stays in the history as it
        was shown, but the model reads it only up to its last whole sentence (none if none was finished):
        a small LLM reads a cut-off sentence as its own style and parrots it in later turns.
        Returns whether a reply was running."""
        job = self._job
        if job is None:
            return False
        job.cancel.set()
        if job.thread is not None and job.thread is not threading.current_thread():
            job.thread.join(timeout)
        return True

    def release_cache(self, wait: bool = True) -> int:
        """Free the KV cache of an idle session (its next reply recomputes it, so nothing is lost);
        returns how many positions it held. A busy session (or, with wait=False, one whose state another
        thread holds) keeps its cache and 0 is returned."""
        if not self._state.acquire(blocking=wait):
            return 0
        try:
            if self._job is not None:
                return 0
            held = len(self._cache_keys)
            self._reset_cache()
            return held
        finally:
            self._state.release()

    def _check_idle(self) -> None:
        if self._job is not None:
            raise RuntimeError("a reply is being generated: wait for it or cancel() it first")

    # --- replies ---------------------------------------------------------------------------------
    def stream_reply(self, options: GenerationOptions = GenerationOptions()) -> Iterator[ReplyChunk]:
        """Start the reply to the last human turn on a background thread and return an iterator of
        its chunks. Raises ContextOverflowError at once (and drops that turn) if the turn alone cannot
        fit. Leaving the iterator early cancels the reply."""
        with self._state:
            self._check_idle()
            if not self._entries or self._entries[-1].turn.role != "human":
                raise ValueError("submit a human turn before asking for a reply")
            dropped = self._fit_context(options.max_new_tokens)
            prompt = render([e.read for e in self._entries], self.tokenizer, self.template)
            job = _Job(options, prompt, self._keys_of(prompt),
                       [e.speech for e in self._entries if e.speech is not None],
                       dropped, queue.Queue(), threading.Event())
            self._job = job
            job.thread = threading.Thread(target=self._generate, args=(job,), name="blsp-reply", daemon=True)
            with _replies_lock:
                _replies.add(job)
            job.thread.start()
        return self._drain(job)

    def _drain(self, job: _Job) -> Iterator[ReplyChunk]:
        finished = False
        try:
            while True:
                item = job.chunks.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                job.cancel.set()

    def _fit_context(self, max_new_tokens: int) -> int:
        """Make history + max_new_tokens fit; returns turns dropped. A history that does not fit is cut
        (oldest pairs first) to `HISTORY_KEPT_ON_OVERFLOW` of the room, so that the prompt's start, and
        with it the KV cache, stays the same for the next several turns."""
        limit = self.max_context_tokens
        current = render([self._entries[-1].turn], self.tokenizer, self.template)
        if len(current) + max_new_tokens > limit:
            self._entries.pop()
            raise ContextOverflowError(
                f"this turn takes {len(current)} tokens and the reply up to {max_new_tokens} more, but the "
                f"model's context holds {limit}: send a shorter message or clip, or lower max_new_tokens "
                "(the turn was not added to the history)"
            )
        room = limit - max_new_tokens
        if self._history_length() <= room:
            return 0
        dropped = 0
        while len(self._entries) > 1 and self._history_length() > room * HISTORY_KEPT_ON_OVERFLOW:
            del self._entries[:2]
            dropped += 2
        return dropped

    def _history_length(self) -> int:
        return len(render([e.read for e in self._entries], self.tokenizer, self.template))

    def _keys_of(self, prompt: RenderedPrompt) -> list:
        """A key per position: the token id, or (speech uid, frame) so that different clips differ."""
        frames = iter([(e.uid, i) for e in self._entries if e.speech is not None for i in range(e.speech.shape[0])])
        return [next(frames) if speech else token for token, speech in zip(prompt.input_ids, prompt.speech_mask)]

    # --- the generation thread -------------------------------------------------------------------
    def _generate(self, job: _Job) -> None:
        stream = TextStream(self.tokenizer)
        generated: list[int] = []
        stopped_by: StopReason = "max_new_tokens"
        try:
            with torch.inference_mode():
                logits = None if job.cancel.is_set() else self._prefill(job)
                with step_batcher(self.model).decoding() as decode_step:
                    for step in range(job.options.max_new_tokens):
                        if logits is None or job.cancel.is_set():
                            stopped_by = "cancelled"
                            break
                        token = next_token(logits, generated, job.options, self.generator)
                        if token in self.eos_ids:
                            stopped_by = "eos"
                            break
                        generated.append(token)
                        delta = stream.push(token)
                        if stream.stop_hit:
                            stopped_by = "stop_string"
                            break
                        if loops_at_end(generated, job.options.loop_stop_tokens):
                            stopped_by = "loop"
                            break
                        if delta:
                            job.chunks.put(ReplyChunk(delta, stream.shown, dropped_turns=job.dropped_turns))
                        if step + 1 < job.options.max_new_tokens:
                            logits = self._decode_step(decode_step, token)
        except BaseException as err:  # handed to the caller's iterator; the cache may be half-written
            self._reset_cache()
            with self._state:
                self._job = None
            job.chunks.put(err)
            job.chunks.put(_DONE)
            return
        delta = stream.finish()
        reply = Turn("assistant", text=stream.shown, token_ids=tuple(self._kept_ids(stream, stopped_by)))
        read_as = self._whole_sentences_of(stream) if stopped_by == "cancelled" else None
        with self._state:
            self._entries.append(_Entry(reply, read_as=read_as))
            self._job = None
        job.chunks.put(ReplyChunk(delta, stream.shown, True, stopped_by, job.dropped_turns))
        job.chunks.put(_DONE)

    def _kept_ids(self, stream: TextStream, stopped_by: StopReason) -> list[int]:
        """The ids the reply is kept as in the history: all generated ids, or, cut at a stop string,
        the ids that spell the text before it."""
        if stopped_by != "stop_string":
            return stream.ids
        return self._ids_spelling(stream, stream.raw_before_stop().rstrip())

    def _whole_sentences_of(self, stream: TextStream) -> Turn | None:
        """A stopped reply as the model reads it later: up to its last whole sentence (empty if none was
        finished), as barge-in keeps a reply "as far as it was spoken"; None when it ends one already."""
        shown = stream.shown
        kept = whole_sentences(shown)
        if kept == shown:
            return None
        raw = stream.raw_before_stop()
        leading = len(raw) - len(raw.lstrip())  # the shown text is stripped; the ids spell the raw one
        return Turn("assistant", text=kept, token_ids=tuple(self._ids_spelling(stream, raw[:leading + len(kept)])))

    def _ids_spelling(self, stream: TextStream, target: str) -> list[int]:
        """The longest prefix of the generated ids that spells a prefix of `target`, plus the rest of it
        re-tokenised: a cache of the generated ids stays valid up to that prefix."""
        ids = stream.ids
        keep = next(k for k in range(len(ids), -1, -1) if target.startswith(stream.decode(ids[:k])))
        rest = target[len(stream.decode(ids[:keep])):]
        return ids[:keep] + (self.tokenizer(rest, add_special_tokens=False).input_ids if rest else [])

    def _prefill(self, job: _Job) -> torch.Tensor | None:
        """Crop the cache to the prefix it shares with the prompt and run the rest, `PREFILL_CHUNK_TOKENS`
        at a time; the last position's logits (V,), or None when cancelled on the way."""
        keys = job.keys
        if not self.reuse_cache:
            self._reset_cache()
        shared = _common_prefix(self._cache_keys, keys)
        shared = min(shared, len(keys) - 1)  # the last position is always run: its logits start the reply
        self._crop_cache(shared)
        ids, mask = job.prompt.input_ids, job.prompt.speech_mask
        speech = torch.cat(job.speech)[sum(mask[:shared]):] if job.speech else None
        logits = None
        for begin in range(shared, len(ids), PREFILL_CHUNK_TOKENS):
            if job.cancel.is_set():
                return None
            end = begin + PREFILL_CHUNK_TOKENS
            spoken = sum(mask[begin:end])
            chunk_speech = [] if speech is None else [speech[:spoken]]
            speech = None if speech is None else speech[spoken:]
            logits = self._forward(ids[begin:end], mask[begin:end], chunk_speech, start=begin, keys=keys[begin:end])
        return logits

    def _forward(self, ids: Sequence[int], speech_mask: Sequence[bool], speech: list[torch.Tensor],
                 start: int, keys: list) -> torch.Tensor:
        """Run positions start.. through the LLM on the cache; returns the last position's logits (V,)."""
        model = self.model
        with model_lock(model):
            if self._cache is None:
                self._cache = DynamicCache(config=model.llama_model.config)
            embeds = model.embed_inputs(torch.tensor([list(ids)]), torch.tensor([list(speech_mask)]), speech)
            positions = torch.arange(start, start + len(ids), device=model.device)[None]
            out = model.llama_model(inputs_embeds=embeds, past_key_values=self._cache, position_ids=positions,
                                    use_cache=True, logits_to_keep=1)
        self._cache_keys.extend(keys)
        if self.cache_budget is not None:
            self.cache_budget.note_use(self)
        return out.logits[0, -1]

    def _decode_step(self, decode_step, token: int) -> torch.Tensor:
        """One generated token through the LLM, batched with the other sessions' steps waiting for the
        model (`batcher.StepBatcher`); the next position's logits (V,)."""
        logits = decode_step(self._cache, token, len(self._cache_keys))
        self._cache_keys.append(token)
        if self.cache_budget is not None:
            self.cache_budget.note_use(self)
        return logits

    def _crop_cache(self, length: int) -> None:
        if length == 0:
            self._reset_cache()
        elif length < len(self._cache_keys):
            self._cache.crop(length - len(self._cache_keys))  # transformers 5: a negative count to remove
            del self._cache_keys[length:]

    def _reset_cache(self) -> None:
        self._cache = None
        self._cache_keys = []


class CacheBudget:
    """A ceiling on the KV-cache positions that the sessions sharing it hold together (a server's many
    users). When a session's cache grows past it, the caches of the least recently used idle sessions
    are freed until the total fits again; a freed session recomputes its cache on its next reply, so
    nothing is lost. Sessions generating right now keep theirs, so the total can exceed the ceiling
    while more of them run at once than it holds."""

    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"the cache ceiling must be at least 1 position, got {max_tokens}")
        self.max_tokens = max_tokens
        self._last_use: "weakref.WeakKeyDictionary[ChatSession, int]" = weakref.WeakKeyDictionary()
        self._clock = itertools.count()
        self._lock = threading.Lock()

    @property
    def cached_tokens(self) -> int:
        """Positions held by all sessions that use this budget."""
        return sum(session.cached_tokens for session in list(self._last_use.keys()))

    def note_use(self, session: ChatSession) -> None:
        """`session` just grew its cache: mark it most recently used, and free idle caches past the ceiling."""
        with self._lock:
            self._last_use[session] = next(self._clock)
            excess = self.cached_tokens - self.max_tokens
            by_age = sorted(self._last_use.items(), key=lambda item: item[1])
            for other, _ in by_age:
                if excess <= 0:
                    break
                if other is not session:
                    excess -= other.release_cache(wait=False)  # never waits on a session's lock: no deadlock


def whole_sentences(text: str) -> str:
    """`text` up to the end of its last complete sentence, "" if it finished none. A text that ends on
    a sentence end counts it complete (a stopped reply's text is shown stripped of what followed)."""
    return spoken_prefix(text, SentenceSplitter(WHOLE_SENTENCES).feed(text + " "))


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
