"""The Gradio page. It adapts ChatSession to Gradio's messages format and never touches the GPU itself.

Each browser session holds its own `UserChat` in `gr.State`, so histories never mix; generation handlers
sit behind a concurrency limit, while cheap steps (stop, undo, clear) skip the queue. Memory follows use:
all sessions' KV caches share one `CacheBudget`, and a closed page frees its cache at once (Gradio keeps
a closed session's state for an hour). Clear and Undo bump the chat's `generation`, and a stream started
before stops touching the page, so a reply finishing at that moment cannot bring the removed exchange back.

Voice: with "Hands-free" on, a streaming microphone feeds each browser session's end-of-turn detector
(voice/live.py); a pause ends the turn, which a hidden trigger then sends as a recorded turn is sent. With
"Speak replies" on, each reply is spoken sentence by sentence while it streams (voice/speaker.py), the
clips paced into an autoplaying audio output (voice/paced.py); once it is spoken (or cut), its audio as
heard joins the conversation under its text, to be played again. Speech heard while a reply is generated or
spoken stops it (barge-in), and the reply is kept as far as it was spoken.

Files: each session's uploads, hands-free turns and spoken replies belong to the browser that sent or heard them
(web_files: an owner cookie, checked in front of Gradio's file route and on every audio input), and are
deleted when no message of the session shows them any more (Undo, Clear, Regenerate) or the session's state is
dropped. The app's own wavs are written inside Gradio's upload folder, which Gradio serves without copying, so
no cached copy outlives them; their folder goes when the server process ends.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import gradio as gr
import numpy as np
import soundfile as sf
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from .audio import AudioError, decode_mono, load_audio
from .config import GenerationOptions
from .constants import DEFAULT_TRANSLATION_TARGET, SAMPLE_RATE, TASK_PRESETS
from .heard import heard_text
from .prompt import task_instruction
from .resources import EXAMPLES_DIR
from .session import CacheBudget, ChatSession, ContextOverflowError
from .voice.live import LiveTurns
from .voice.paced import PacedPlayer
from .voice.speaker import SpokenReply, spoken_prefix
from .voice.tts import VoiceOptions, try_load_voice
from .voice.vad import SPEECH_START, TURN_END, TurnOptions
from .web_files import FileOwners, OwnerGate, owner_from_cookies

if TYPE_CHECKING:
    from .weights import LoadedBlsp

TITLE = "BLSP chat: talk to a language model"
# Replies generated at once. Their decode steps share one batched forward (batcher.StepBatcher) and
# their prefills take turns at the model (lock.FairLock), so a short question starts answering after one
# step of each running reply instead of after the whole of the longest. Fewer would leave the other
# sessions' turns in Gradio's queue (bench_load: at 4, 12 of 16 sessions waited there).
DEFAULT_CONCURRENCY = 16
# The live microphone's chunks. Gradio keeps only the latest chunk that arrives while the handler is busy,
# so each chunk's overhead (an upload, a queue round) must stay below this, or audio is lost; barge-in hears
# speech at most this late.
STREAM_EVERY_S = 0.5
# A live chunk is STREAM_EVERY_S of audio, a little more when the browser falls behind; a longer one is not
# from the page's microphone and is dropped before it is decoded.
LIVE_CHUNK_MAX_SECONDS = 20 * STREAM_EVERY_S
PLAYBACK_POLL_S = 0.1      # how often a spoken reply's stream looks for its next sentence's audio
GPU_SECONDS = 120          # ZeroGPU: the longest a reply (generated and spoken) may hold the GPU
TURN_GAP_S = 0.3           # silence between hands-free turns heard while one reply ran, sent as one
# Turning hands-free on starts the streaming microphone at once (a click on its record button, once the
# box is shown): no further click is needed to talk.
START_LIVE_MIC_JS = """(on) => {
  const press = (tries) => {
    const button = document.querySelector('#live-mic button.record-button');
    if (button) { console.log('hands-free: starting the microphone'); button.click(); }
    else if (tries > 0) setTimeout(() => press(tries - 1), 200);
  };
  if (on) press(25);
  return on;
}"""
UNTRAINED_NOTICE = ("**Note:** this model's speech adapter is untrained, so spoken turns are not understood yet; "
                    "typed turns work.")


@dataclass
class UserChat:
    """One browser session: the engine's history and what the page shows of it."""

    session: ChatSession
    messages: list[dict] = field(default_factory=list)
    turn_sizes: list[int] = field(default_factory=list)  # page messages per human+assistant exchange
    generation: int = 0  # bumped by Clear and Undo: streams of an older generation no longer update the page
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # page edits
    live: LiveTurns | None = field(default=None, repr=False, compare=False)  # hands-free: made on its first chunk
    heard_turns: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)  # ended, not yet sent
    turns_ended: int = 0  # hands-free turns the detector ended: the hidden trigger's value
    reply: "ReplyInFlight | None" = field(default=None, repr=False, compare=False)  # for barge-in to stop
    voice_notice_shown: bool = False
    # Each exchange's reply message: notices go above it, its audio (and a notice about its voice) under it.
    replies: list[dict] = field(default_factory=list, repr=False, compare=False)
    files: set[Path] = field(default_factory=set, repr=False, compare=False)  # its uploads and wavs written for it
    owner: str | None = None  # the browser's owner cookie (web_files), from its first request
    owners: FileOwners | None = field(default=None, repr=False, compare=False)  # deletes files with their claims

    def add_exchange(self, user_messages: list[dict]) -> None:
        reply = {"role": "assistant", "content": ""}
        self.messages.extend(user_messages + [reply])
        self.turn_sizes.append(len(user_messages) + 1)
        self.replies.append(reply)

    def note_before_reply(self, message: dict) -> None:
        """A notice that stays in the page just above the reply it concerns."""
        self.messages.insert(len(self.messages) - 1, message)
        self.turn_sizes[-1] += 1

    def add_under_reply(self, reply: dict, message: dict) -> bool:
        """`message` at the end of the exchange whose reply is `reply` (its audio, a notice about its voice);
        False when that exchange is gone (Undo, Clear, Regenerate)."""
        for index, candidate in enumerate(self.replies):
            if candidate is reply:
                self.messages.insert(sum(self.turn_sizes[:index + 1]), message)
                self.turn_sizes[index] += 1
                return True
        return False

    def restart_reply(self) -> None:
        """Regenerate: the last exchange gets a new, empty reply message in place of the old one and of what
        came under it. A new message, so that the old reply's stream, still speaking, finds its exchange gone."""
        old = self.replies[-1]
        at = next(index for index in range(len(self.messages) - 1, -1, -1) if self.messages[index] is old)
        self.turn_sizes[-1] -= len(self.messages) - at - 1
        self.messages[at:] = [{"role": "assistant", "content": ""}]
        self.replies[-1] = self.messages[at]
        self.delete_unshown_files()

    def drop_last_exchange(self) -> None:
        if self.turn_sizes:
            del self.messages[-self.turn_sizes.pop():]
            self.replies.pop()
            self.delete_unshown_files()

    def clear_page(self) -> None:
        self.messages.clear()
        self.turn_sizes.clear()
        self.replies.clear()
        self.delete_unshown_files()

    def delete_unshown_files(self) -> None:
        """Delete this session's wavs that no message shows any more (a shown one is served again with
        each update of the page, so it must stay)."""
        shown = paths_shown(self.messages)
        for path in self.files - shown:
            self._delete(path)
        self.files &= shown

    def delete_files(self) -> None:
        """The session is gone: delete all its wavs."""
        for path in self.files:
            self._delete(path)
        self.files.clear()

    def _delete(self, path: Path) -> None:
        if self.owners is not None:
            self.owners.release(path, self.owner)
        else:
            path.unlink(missing_ok=True)


def paths_shown(messages: list[dict]) -> set[Path]:
    """The files the messages show (a content is a text, a {"path": ...} file, or a list of these)."""
    shown = set()
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, dict) and "path" in part:
                shown.add(Path(part["path"]))
    return shown


class ReplyInFlight:
    """A reply being generated and, with "Speak replies", spoken: what barge-in stops."""

    def __init__(self, session: ChatSession, voice=None):
        self.session = session
        self.player = PacedPlayer() if voice is not None else None
        self.spoken = SpokenReply(voice, self.player.play, self.player.stop) if voice is not None else None
        self.interrupted = threading.Event()

    def feed(self, delta: str) -> None:
        if self.spoken is not None:
            self.spoken.feed(delta)

    def next_clip(self) -> tuple[int, np.ndarray] | None:
        """The next sentence's (rate, audio) for the page to play, when its turn has come."""
        return self.player.take() if self.player is not None else None

    def interrupt(self) -> None:
        """Barge-in (on the microphone's handler): stop the voice at once, then the generation."""
        self.interrupted.set()
        self.stop_speaking()
        self.session.cancel()

    def stop_speaking(self) -> None:
        if self.spoken is not None:
            self.spoken.stop()

    def heard(self) -> tuple[list[str], np.ndarray, int]:
        """(the sentences heard to their end, their audio joined, its sample rate); nothing without a voice."""
        if self.spoken is None:
            return [], np.zeros(0, np.float32), SAMPLE_RATE
        return (*self.spoken.heard(), self.spoken.voice.sample_rate)


def release_chat(chat: UserChat | None) -> None:
    """A closed page: stop its reply and free its KV cache (recomputed if the session comes back: Gradio
    keeps a closed session's state for an hour). A plain function, not a bound method: Gradio deep-copies
    a component's arguments, and a method would drag the shared model along."""
    if chat is not None:
        _stop_reply(chat)
        chat.session.release_cache()


def forget_chat(chat: UserChat | None) -> None:
    """Gradio dropped the session's state (an hour after its page closed): nothing can show its history
    again, so its wavs go too. Until then they stay, as the history that points at them may come back."""
    if chat is not None:
        release_chat(chat)
        chat.delete_files()


def _stop_reply(chat: UserChat, wait: bool = True) -> None:
    """Stop the reply's voice and its generation (Stop, Undo, Clear, a new turn, a closed page). `wait`: until
    the step in flight has finished; without it only the flags are set (on Gradio's event loop, which must not
    block), and the reply stops at its next step all the same."""
    reply = chat.reply
    if reply is not None:
        reply.stop_speaking()
    if wait:
        chat.session.cancel()
    else:
        chat.session.cancel(timeout=0)


def _options(max_new_tokens, do_sample, temperature, top_p, repetition_penalty) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                             temperature=float(temperature), top_p=float(top_p),
                             repetition_penalty=float(repetition_penalty))


def _audio_update(clip: tuple[int, np.ndarray] | None):
    """The reply audio output's update: a clip to play, or no change (the one playing goes on)."""
    return gr.skip() if clip is None else clip


def _notice(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": "⚠️ Notice"}}


def model_name(loaded) -> str:
    """What the page calls the model: a hub id, or the names of its parts; never a local path (a Space's
    or a user's directories are no business of the people chatting)."""
    source = str(loaded.source)
    hub_cache = re.search(r"models--([^/\\]+?)--([^/\\]+)", source)
    if hub_cache:  # a hub snapshot: .../models--ORG--NAME/snapshots/REVISION
        return f"{hub_cache.group(1)}/{hub_cache.group(2)}"
    path = Path(source).expanduser()
    if not (path.is_absolute() or path.exists()):  # a hub id, or a description ("offline default ...")
        return source
    config = loaded.model.config
    parts = [str(name).split(":", 1)[-1].rstrip("/\\").rsplit("/", 1)[-1]
             for name in (config.whisper_name_or_path, config.llm_name_or_path) if name]
    return " + ".join(parts) if parts else path.name


def on_gpu(handler):
    """`handler` under the `spaces` package's GPU decorator on a ZeroGPU Space (which lends a GPU only
    inside such functions); elsewhere, where the package is absent, `handler` itself."""
    try:
        import spaces  # here, not at the top: only Hugging Face Spaces have it
    except ImportError:
        return handler
    return spaces.GPU(duration=GPU_SECONDS)(handler)


class ChatHandlers:
    """The page's event handlers, bound to one shared model."""

    def __init__(self, loaded: LoadedBlsp, max_audio_seconds: float | None, max_context_tokens: int | None = None,
                 cache_budget: CacheBudget | None = None, voice_options: VoiceOptions | None = None,
                 turn_options: TurnOptions = TurnOptions()):
        self.loaded = loaded
        self.max_audio_seconds = max_audio_seconds
        self.max_context_tokens = max_context_tokens
        self.cache_budget = cache_budget
        self.voice_options = voice_options or VoiceOptions()
        self.turn_options = turn_options
        self._voice: tuple | None = None  # (voice or None, notice or None), loaded on first use
        self._voice_lock = threading.Lock()
        # Hands-free turns and spoken replies are written here for the chat's audio bubbles: inside Gradio's
        # upload folder, which it serves without making a copy that would outlive ours. The folder goes with
        # the server (at exit, or when the handlers are collected).
        uploads = Path(get_upload_folder())
        uploads.mkdir(parents=True, exist_ok=True)
        self.turn_dir = Path(tempfile.mkdtemp(prefix="blsp-chat-turns-", dir=uploads))
        self.remove_turn_dir = weakref.finalize(self, shutil.rmtree, self.turn_dir, ignore_errors=True)
        self.files = FileOwners(roots=(uploads, self.turn_dir))
        # Each browser session's chat by Gradio's session hash, from the session's first turn on (its gr.State
        # holds it only from the turn's first update), so that a client that leaves stops its reply at once.
        self._chats: "weakref.WeakValueDictionary[str, UserChat]" = weakref.WeakValueDictionary()

    def _chat(self, state: UserChat | None, request: gr.Request | None = None) -> UserChat:
        chat = state
        if chat is None:
            chat = UserChat(ChatSession.from_loaded(self.loaded, max_context_tokens=self.max_context_tokens,
                                                    cache_budget=self.cache_budget), owners=self.files)
        if chat.owner is None and request is not None:
            chat.owner = owner_from_cookies(getattr(request, "cookies", None))
        if request is not None and request.session_hash:
            self._chats[request.session_hash] = chat
        return chat

    def client_gone(self, session_hash: str) -> None:
        """Gradio lost the event stream of `session_hash` (the page closed, a client hung up) and dropped the
        session's events: its reply stops now, within one decode step, instead of when its next chunk finds
        nobody to send it to. Runs on Gradio's event loop, so it only sets the stop flags."""
        chat = self._chats.get(session_hash)
        if chat is not None:
            _stop_reply(chat, wait=False)

    def voice(self):
        """(voice, None), or (None, why not): loaded once, on the first spoken reply, for all sessions."""
        with self._voice_lock:
            if self._voice is None:
                self._voice = try_load_voice(self.voice_options)
            return self._voice

    # --- turns -------------------------------------------------------------------------------------
    # Handlers take the settings sliders' values, then the session state, then "Speak replies" (last and
    # optional, so that a caller that never speaks keeps the shorter call).
    def send(self, text, audio_path, task, target, max_new_tokens, do_sample, temperature, top_p, repetition_penalty,
             state: UserChat | None = None, speak: bool = False, request: gr.Request = None) -> Iterator[tuple]:
        settings = (max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
        chat, text = self._chat(state, request), (text or "").strip()
        _stop_reply(chat)  # a new turn: the reply before it, still generated or spoken, stops
        if not text and not audio_path:
            yield (chat.messages + [_notice("Type a message or record/upload audio first.")], chat, text, audio_path,
                   gr.skip())
            return
        yield from self._turn(chat, text, audio_path, task, target, settings, speak, ("", None))

    def take_heard_turn(self, _trigger, task, target, max_new_tokens, do_sample, temperature, top_p,
                        repetition_penalty, state: UserChat | None = None, speak: bool = False,
                        request: gr.Request = None) -> Iterator[tuple]:
        """Hands-free: send what the detector heard (the hidden trigger changed). Turns that ended while
        a reply ran are sent together, in order, as one."""
        settings = (max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
        chat = self._chat(state, request)
        with chat.lock:
            turns, chat.heard_turns = chat.heard_turns, []
        if not turns:
            yield chat.messages, chat, gr.skip()
            return
        _stop_reply(chat)
        gap = np.zeros(int(TURN_GAP_S * SAMPLE_RATE), np.float32)
        audio = np.concatenate([piece for turn in turns for piece in (turn, gap)][:-1])
        path = self._write_wav(audio, SAMPLE_RATE, "turn", chat.owner)
        yield from self._turn(chat, "", str(path), task, target, settings, speak, (), own_audio=True)

    def _write_wav(self, audio: np.ndarray, rate: int, kind: str, owner: str | None) -> Path:
        """A wav for one session's page, claimed for `owner` (its browser) before anyone can be shown it."""
        path = self.turn_dir / f"{kind}-{uuid.uuid4().hex}.wav"
        self.files.claim(path, owner)
        sf.write(path, audio, rate)
        return path

    def _turn(self, chat: UserChat, text: str, audio_path, task, target, settings, speak, extra,
              own_audio: bool = False) -> Iterator[tuple]:
        """Submit a turn and stream its reply. `own_audio`: the clip is a wav this server wrote (a
        hands-free turn), which the session then owns, or which goes at once if the turn is refused."""
        try:
            options = _options(*settings)
            user = self._submit(chat, text, audio_path, task, target)
            chunks = chat.session.stream_reply(options)  # a turn too long for the context is refused here
        except (AudioError, ContextOverflowError, ValueError) as err:
            if own_audio:
                Path(audio_path).unlink(missing_ok=True)
            yield (chat.messages + [_notice(str(err))], chat, *extra, gr.skip())
            return
        with chat.lock:
            chat.add_exchange(user)
            if own_audio or (audio_path and self.files.owns(audio_path, chat.owner)):
                chat.files.add(Path(audio_path))  # written for this session, or this browser's upload
        yield from self._stream(chat, chunks, extra, speak)

    def _submit(self, chat: UserChat, text: str, audio_path, task, target) -> list[dict]:
        if not audio_path:
            chat.session.submit_text(text)
            return [{"role": "user", "content": text}]
        if not self.files.may_use(audio_path, chat.owner):
            raise AudioError("That audio file belongs to another session. Record or upload your own clip.")
        audio = load_audio(audio_path, max_seconds=self.max_audio_seconds)
        chat.session.submit_audio(audio, instruction=task_instruction(task, target or DEFAULT_TRANSLATION_TARGET),
                                  text=text)
        heard = heard_text(self.loaded.model, self.loaded.tokenizer, chat.session.last_speech())
        clip: dict | list = {"path": audio_path}
        if heard is not None:  # under the clip: whether a wrong answer is a mishearing shows at once
            clip = [clip, f"*heard:* {heard or '(no words)'}"]
        return [{"role": "user", "content": clip}] + ([{"role": "user", "content": text}] if text else [])

    # --- replies -----------------------------------------------------------------------------------
    def _start_reply(self, chat: UserChat, speak: bool) -> ReplyInFlight:
        voice = None
        if speak:
            voice, notice = self.voice()
            if notice and not chat.voice_notice_shown:
                chat.note_before_reply(_notice(f"Replies stay text only: {notice}."))
                chat.voice_notice_shown = True
        chat.reply = ReplyInFlight(chat.session, voice)
        return chat.reply

    def _stream(self, chat: UserChat, chunks, extra: tuple, speak: bool = False) -> Iterator[tuple]:
        generation, message = chat.generation, chat.replies[-1]  # the reply's message (notices go above it)
        reply = self._start_reply(chat, speak)
        try:
            try:
                for index, chunk in enumerate(chunks):
                    with chat.lock:
                        if chat.generation != generation:  # Clear or Undo took over: the page is theirs now
                            break
                        if index == 0 and chunk.dropped_turns:
                            chat.note_before_reply(_notice(f"The conversation outgrew the model's context: the "
                                                           f"oldest {chunk.dropped_turns} turns are no longer seen "
                                                           "by the model."))
                        message["content"] = chunk.text
                    reply.feed(chunk.delta)
                    yield (chat.messages, chat, *extra, _audio_update(reply.next_clip()))
            except Exception as err:  # out of memory, a broken model: say so, keep the page usable
                reply.stop_speaking()
                with chat.lock:
                    if chat.generation == generation:
                        chat.session.undo()
                        chat.drop_last_exchange()
                yield (chat.messages + [_notice(f"Generation failed: {err}. Please try again.")], chat, *extra,
                       gr.skip())
                return
            finally:
                chunks.close()
            if chat.generation == generation:
                yield from self._speak_rest(chat, reply, extra)
        finally:
            reply.stop_speaking()
            if chat.reply is reply:  # not a newer turn's reply
                chat.reply = None
        if reply.spoken is not None:
            self._keep_spoken_reply(chat, reply, message, generation)
            yield (chat.messages, chat, *extra, gr.skip())
        if chat.generation != generation:
            with chat.lock:  # waits until Clear/Undo has finished editing (never held across a yield)
                messages = list(chat.messages)
            # An update of this stream sent just before theirs can reach the page after it: end on their
            # page, so that the last word (and the stream's closing message) agrees with the server.
            yield (messages, chat, *extra, gr.skip())

    def _speak_rest(self, chat: UserChat, reply: ReplyInFlight, extra: tuple) -> Iterator[tuple]:
        """The text is complete: hand over each remaining sentence's audio as its turn to play comes."""
        if reply.spoken is None:
            return
        reply.spoken.finish()
        while not reply.spoken.wait(timeout=PLAYBACK_POLL_S):
            clip = reply.next_clip()
            if clip is not None:
                yield (chat.messages, chat, *extra, clip)

    def _keep_spoken_reply(self, chat: UserChat, reply: ReplyInFlight, message: dict, generation: int) -> None:
        """A spoken reply ended (played out, stopped, or cut by barge-in): its audio as heard goes into the
        conversation under its text, and a reply cut by barge-in stays in the history (the model's and the
        page's) as far as the user heard it. Display only: the session's history stays text."""
        sentences, audio, rate = reply.heard()
        with chat.lock:  # Undo/Clear/Regenerate either came first (the exchange is gone) or find it whole
            if chat.generation != generation or not any(candidate is message for candidate in chat.replies):
                return
            if reply.interrupted.is_set() and chat.replies[-1] is message:
                self._trim_to_what_was_heard(chat, message, sentences)
            if len(audio):
                path = self._write_wav(audio, rate, "reply", chat.owner)
                chat.files.add(path)
                chat.add_under_reply(message, {"role": "assistant", "content": {"path": str(path)}})
            if reply.spoken.error is not None:
                chat.add_under_reply(message, _notice(f"The voice failed ({reply.spoken.error}); this reply is "
                                                      "text only from there."))

    @staticmethod
    def _trim_to_what_was_heard(chat: UserChat, message: dict, sentences: list[str]) -> None:
        turns = chat.session.turns
        if not turns or turns[-1].role != "assistant":
            return
        heard = spoken_prefix(turns[-1].text, sentences)
        chat.session.trim_last_reply(heard)
        message["content"] = f"{heard} … *(interrupted)*" if heard else "*(interrupted)*"

    # --- hands-free ----------------------------------------------------------------------------------
    def listen(self, chunk, hands_free, state):
        """Each chunk of the streaming microphone: run this session's detector. Speech over a reply stops
        it (barge-in: the page stops playing it too); a turn that ended bumps the hidden trigger, whose
        change sends it. Cheap (~0.1 ms of VAD per 32 ms of audio): it runs outside the GPU queue."""
        chat = self._chat(state)
        if not hands_free or chunk is None:
            return chat, gr.skip(), gr.skip()
        try:  # a short wav the browser recorded, or anything a client sends in its place: bounded
            rate, samples = decode_mono(chunk, max_seconds=LIVE_CHUNK_MAX_SECONDS)
        except AudioError:
            return chat, gr.skip(), gr.skip()
        if chat.live is None:
            chat.live = LiveTurns(self.turn_options)
        trigger = reply_audio = gr.skip()
        for event in chat.live.feed(rate, samples):
            reply = chat.reply
            if event.kind == SPEECH_START and reply is not None:
                reply.interrupt()
                reply_audio = None
            elif event.kind == TURN_END:
                with chat.lock:
                    chat.heard_turns.append(event.audio)
                chat.turns_ended += 1
                trigger = str(chat.turns_ended)
        return chat, trigger, reply_audio

    def switch_hands_free(self, hands_free: bool, state: UserChat | None):
        """Swap the record/upload box (and Send) for the streaming microphone, and back. The detector is
        made here, before the first chunk: a chunk that arrives while the handler is still busy replaces
        the one waiting (Gradio keeps the latest), so a slow first call would lose the first words."""
        chat = self._chat(state)
        if hands_free and chat.live is None:
            chat.live = LiveTurns(self.turn_options)
        elif not hands_free and chat.live is not None:
            chat.live.reset()
        return (gr.update(visible=not hands_free), gr.update(visible=True if hands_free else "hidden"),
                gr.update(visible=not hands_free), chat)

    def stop_listening(self, state: UserChat | None) -> None:
        """The microphone stopped: its next recording starts afresh (a half-heard turn is dropped)."""
        if state is not None and state.live is not None:
            state.live.reset()

    # --- editing -------------------------------------------------------------------------------------
    def regenerate(self, max_new_tokens, do_sample, temperature, top_p, repetition_penalty,
                   state: UserChat | None = None, speak: bool = False, request: gr.Request = None) -> Iterator[tuple]:
        settings = (max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
        chat = self._chat(state, request)
        if not chat.turn_sizes or chat.session.busy:
            yield chat.messages, chat, gr.skip()
            return
        _stop_reply(chat)  # the reply still being spoken
        try:
            chunks = chat.session.regenerate(_options(*settings))
        except ValueError as err:
            yield chat.messages + [_notice(str(err))], chat, gr.skip()
            return
        with chat.lock:
            chat.restart_reply()
        yield from self._stream(chat, chunks, (), speak)

    def stop(self, state: UserChat | None) -> None:
        if state is not None:
            _stop_reply(state)

    def undo(self, state: UserChat | None):
        chat = self._chat(state)
        with chat.lock:  # a stream sees the new generation only with the edit done
            chat.generation += 1
            _stop_reply(chat)
            if chat.turn_sizes:
                chat.session.undo()
                chat.drop_last_exchange()  # its reply's audio and its turn's wav too
        return chat.messages, chat

    def clear(self, state: UserChat | None):
        chat = self._chat(state)
        with chat.lock:
            chat.generation += 1
            _stop_reply(chat)
            chat.session.clear()
            chat.clear_page()
        return chat.messages, chat


def build_demo(loaded: LoadedBlsp, *, max_audio_seconds: float | None = 120.0, concurrency: int = DEFAULT_CONCURRENCY,
               max_context_tokens: int | None = None, max_cached_tokens: int | None = None,
               voice_options: VoiceOptions | None = None, turn_options: TurnOptions = TurnOptions()) -> gr.Blocks:
    """The page for one shared model; `max_context_tokens` caps each conversation (default: the LLM's),
    `max_cached_tokens` the KV-cache positions of all sessions together (default: no ceiling);
    `voice_options` the spoken replies' voice (default: piper, else espeak-ng), `turn_options` the hands-free
    end of turn."""
    budget = CacheBudget(max_cached_tokens) if max_cached_tokens is not None else None
    handlers = ChatHandlers(loaded, max_audio_seconds, max_context_tokens, budget, voice_options, turn_options)
    with GuardedBlocks(handlers.files, handlers.client_gone, title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nSpeak or type; spoken and typed turns share one conversation. "
                    f"Model: `{model_name(loaded)}`." + ("" if loaded.adapter_trained else "\n\n" + UNTRAINED_NOTICE))
        state = gr.State(None, delete_callback=forget_chat)
        chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chatbot", buttons=["copy"])
        reply_audio = gr.Audio(label="Spoken reply", autoplay=True, interactive=False, visible=False,
                               elem_id="reply-audio")
        with gr.Row():
            hands_free = gr.Checkbox(False, label="Hands-free: each spoken turn is sent when you pause; speaking "
                                     "over a reply interrupts it (use headphones)", elem_id="hands-free")
            speak = gr.Checkbox(False, label="Speak replies", elem_id="speak-replies")
        with gr.Row():
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speak or upload audio", scale=2,
                             elem_id="audio-input")
            # "hidden", not False: mounted from the start, so that its recorder (loaded when it mounts) is
            # ready by the time hands-free presses its record button.
            live_mic = gr.Audio(sources=["microphone"], streaming=True, type="filepath", label="Listening (hands-free)",
                                scale=2, visible="hidden", elem_id="live-mic")
            with gr.Column(scale=3):
                text = gr.Textbox(label="Message", placeholder="Type a message, or add text to your audio", lines=2)
                with gr.Row():
                    task = gr.Dropdown(list(TASK_PRESETS), value="Chat", label="Task for the next spoken turn")
                    target = gr.Textbox(value=DEFAULT_TRANSLATION_TARGET, label="Translate into")
        heard_trigger = gr.Textbox(visible="hidden", elem_id="heard-turn")  # bumped when a hands-free turn ends
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", elem_id="stop")
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            undo = gr.Button("Undo", elem_id="undo")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            defaults = GenerationOptions()
            settings = [
                gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens"),
                gr.Checkbox(value=defaults.do_sample, label="Sample (off: greedy)"),
                gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature"),
                gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
                gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
            ]
        examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.wav"))
        if examples:
            gr.Examples([[p] for p in examples], inputs=[audio], label="Example clips")
        gr.Examples([["What is the capital of France?"], ["Write a haiku about the sea."]], inputs=[text],
                    label="Example prompts")

        inputs = [text, audio, task, target, *settings, state, speak]
        outputs = [chatbot, state, text, audio, reply_audio]
        gpu = dict(concurrency_limit=concurrency, concurrency_id="gpu")
        send_on_gpu = on_gpu(handlers.send)
        for trigger in (send.click, text.submit):
            trigger(send_on_gpu, inputs, outputs, api_name="send" if trigger == send.click else False, **gpu)
        regenerate.click(on_gpu(handlers.regenerate), [*settings, state, speak], [chatbot, state, reply_audio],
                         api_name="regenerate", **gpu)
        stop.click(handlers.stop, [state], None, queue=False, api_name="stop")
        undo.click(handlers.undo, [state], [chatbot, state], queue=False, api_name="undo")
        clear.click(handlers.clear, [state], [chatbot, state], queue=False, api_name="clear")

        hands_free.change(handlers.switch_hands_free, [hands_free, state], [audio, live_mic, send, state], queue=False,
                          api_name=False)
        hands_free.change(None, [hands_free], None, js=START_LIVE_MIC_JS)
        speak.change(lambda on: gr.update(visible=on), [speak], [reply_audio], queue=False, api_name=False)
        live_mic.stream(handlers.listen, [live_mic, hands_free, state], [state, heard_trigger, reply_audio],
                        stream_every=STREAM_EVERY_S, concurrency_limit=None, concurrency_id="listen",
                        show_progress="hidden", api_name=False)
        live_mic.stop_recording(handlers.stop_listening, [state], None, queue=False, api_name=False)
        heard_trigger.change(on_gpu(handlers.take_heard_turn), [heard_trigger, task, target, *settings, state, speak],
                             [chatbot, state, reply_audio], show_progress="hidden", api_name=False, **gpu)

        def release_closed_page(request: gr.Request) -> None:
            release_chat(_session_state(demo, state, request))

        demo.unload(release_closed_page)
    return demo


class GuardedBlocks(gr.Blocks):
    """gr.Blocks whose server puts `web_files.OwnerGate` in front of Gradio's routes and tells `on_client_gone`
    (a session hash) the moment a session's event stream closes, however it is launched (app.py, a Space, the
    tests)."""

    def __init__(self, owners: FileOwners, on_client_gone: Callable[[str], None] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.file_owners = owners
        self.on_client_gone = on_client_gone

    def launch(self, *args, **kwargs):
        app_kwargs = dict(kwargs.get("app_kwargs") or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(OwnerGate, owners=self.file_owners)]
        kwargs["app_kwargs"] = app_kwargs
        if self.on_client_gone is not None:
            _report_departures(self._queue, self.on_client_gone)  # the queue the server will use (queue() makes anew)
        return super().launch(*args, **kwargs)


def _report_departures(queue, on_client_gone: Callable[[str], None]) -> None:
    """Call `on_client_gone(session_hash)` whenever Gradio finds a session's event stream closed.

    Gradio 6.31 notices at once that the stream of a session's events closed (the page's `/queue/data`, an API
    client's `/call/<name>/<event>`: Starlette listens for the disconnect while it streams) and calls its queue's
    `clean_events(session_hash=...)`, which drops the session's waiting events and marks its running ones dead.
    A running generator learns of that only when its next output finds nobody to send it to, which a reply
    reaches a few decode steps later, or at its end when its steps show no new text. So the call is wrapped to
    report it first. The queue is Gradio's internal (gradio is pinned): tests/test_app_client_gone.py fails if a
    version stops calling it."""
    clean_events = queue.clean_events
    if getattr(clean_events, "reports_departures", False):  # launched again on the same queue
        return

    async def clean_events_reporting(*, session_hash: str | None = None, event_id: str | None = None) -> None:
        try:
            if session_hash is not None:
                on_client_gone(session_hash)
        finally:
            await clean_events(session_hash=session_hash, event_id=event_id)

    clean_events_reporting.reports_departures = True
    queue.clean_events = clean_events_reporting


def _session_state(demo: gr.Blocks, state: gr.State, request: gr.Request) -> UserChat | None:
    """The value of `state` in the browser session `request` came from (None if it has none yet)."""
    holder = demo.state_holder
    if request is None or request.session_hash not in holder:
        return None
    return holder[request.session_hash].state_data.get(state._id)
