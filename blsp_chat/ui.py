"""The Gradio page. It adapts ChatSession to Gradio's messages format and never touches the GPU itself.

Each browser session holds its own `UserChat` in `gr.State`, so histories never mix; generation handlers
sit behind a concurrency limit, while cheap steps (stop, undo, clear) skip the queue. Memory follows use:
all sessions' KV caches share one `CacheBudget`, and a closed page frees its cache at once (Gradio keeps
a closed session's state for an hour). Clear and Undo bump the chat's `generation`, and a stream started
before stops touching the page, so a reply finishing at that moment cannot bring the removed exchange back.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import gradio as gr

from .audio import AudioError, load_audio
from .config import GenerationOptions
from .constants import DEFAULT_TRANSLATION_TARGET, TASK_PRESETS
from .prompt import task_instruction
from .session import CacheBudget, ChatSession, ContextOverflowError

if TYPE_CHECKING:
    from .weights import LoadedBlsp

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
TITLE = "BLSP chat: talk to a language model"
# Replies generated at once. Their steps take turns at the model (lock.FairLock), so a short question
# starts answering after one step of each running reply instead of after the whole of the longest.
DEFAULT_CONCURRENCY = 4
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

    def add_exchange(self, user_messages: list[dict]) -> None:
        self.messages.extend(user_messages + [{"role": "assistant", "content": ""}])
        self.turn_sizes.append(len(user_messages) + 1)

    def note_before_reply(self, message: dict) -> None:
        """A notice that stays in the page just above the reply it concerns."""
        self.messages.insert(len(self.messages) - 1, message)
        self.turn_sizes[-1] += 1

    def drop_last_exchange(self) -> None:
        if self.turn_sizes:
            del self.messages[-self.turn_sizes.pop():]


def release_chat(chat: UserChat | None) -> None:
    """A closed page: stop its reply and free its KV cache (its history stays until Gradio drops it).
    A plain function, not a bound method: Gradio deep-copies a component's arguments, and a method would
    drag the shared model along."""
    if chat is not None:
        chat.session.cancel()
        chat.session.release_cache()


def _options(max_new_tokens, do_sample, temperature, top_p, repetition_penalty) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                             temperature=float(temperature), top_p=float(top_p),
                             repetition_penalty=float(repetition_penalty))


def _notice(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": "⚠️ Notice"}}


class ChatHandlers:
    """The page's event handlers, bound to one shared model."""

    def __init__(self, loaded: LoadedBlsp, max_audio_seconds: float | None, max_context_tokens: int | None = None,
                 cache_budget: CacheBudget | None = None):
        self.loaded = loaded
        self.max_audio_seconds = max_audio_seconds
        self.max_context_tokens = max_context_tokens
        self.cache_budget = cache_budget

    def _chat(self, state: UserChat | None) -> UserChat:
        if state is not None:
            return state
        return UserChat(ChatSession.from_loaded(self.loaded, max_context_tokens=self.max_context_tokens,
                                                cache_budget=self.cache_budget))

    def send(self, text, audio_path, task, target, *settings_and_state) -> Iterator[tuple]:
        *settings, state = settings_and_state
        chat, text = self._chat(state), (text or "").strip()
        if chat.session.busy:
            chat.session.cancel()
        if not text and not audio_path:
            yield chat.messages + [_notice("Type a message or record/upload audio first.")], chat, text, audio_path
            return
        try:
            options = _options(*settings)
            user = self._submit(chat, text, audio_path, task, target)
            chunks = chat.session.stream_reply(options)  # a turn too long for the context is refused here
        except (AudioError, ContextOverflowError, ValueError) as err:
            yield chat.messages + [_notice(str(err))], chat, "", None
            return
        chat.add_exchange(user)
        yield from self._stream(chat, chunks, ("", None))

    def _submit(self, chat: UserChat, text: str, audio_path, task, target) -> list[dict]:
        if not audio_path:
            chat.session.submit_text(text)
            return [{"role": "user", "content": text}]
        audio = load_audio(audio_path, max_seconds=self.max_audio_seconds)
        chat.session.submit_audio(audio, instruction=task_instruction(task, target or DEFAULT_TRANSLATION_TARGET),
                                  text=text)
        return [{"role": "user",
                 "content": {"path": audio_path}}] + ([{"role": "user", "content": text}] if text else [])

    def _stream(self, chat: UserChat, chunks, extra: tuple) -> Iterator[tuple]:
        generation = chat.generation
        try:
            for index, chunk in enumerate(chunks):
                with chat.lock:
                    if chat.generation != generation:  # Clear or Undo took over: the page is theirs now
                        break
                    if index == 0 and chunk.dropped_turns:
                        chat.note_before_reply(_notice(f"The conversation outgrew the model's context: the oldest "
                                                       f"{chunk.dropped_turns} turns are no longer seen by the model."))
                    chat.messages[-1]["content"] = chunk.text
                yield (chat.messages, chat, *extra)
        except Exception as err:  # out of memory, a broken model: say so, keep the page usable
            with chat.lock:
                if chat.generation == generation:
                    chat.session.undo()
                    chat.drop_last_exchange()
            yield (chat.messages + [_notice(f"Generation failed: {err}. Please try again.")], chat, *extra)
            return
        finally:
            chunks.close()
        if chat.generation != generation:
            with chat.lock:  # waits until Clear/Undo has finished editing (never held across a yield)
                messages = list(chat.messages)
            # An update of this stream sent just before theirs can reach the page after it: end on their
            # page, so that the last word (and the stream's closing message) agrees with the server.
            yield (messages, chat, *extra)

    def regenerate(self, *settings_and_state) -> Iterator[tuple]:
        *settings, state = settings_and_state
        chat = self._chat(state)
        if not chat.turn_sizes or chat.session.busy:
            yield chat.messages, chat
            return
        try:
            chunks = chat.session.regenerate(_options(*settings))
        except ValueError as err:
            yield chat.messages + [_notice(str(err))], chat
            return
        chat.messages[-1]["content"] = ""
        yield from self._stream(chat, chunks, ())

    def stop(self, state: UserChat | None) -> None:
        if state is not None:
            state.session.cancel()

    def undo(self, state: UserChat | None):
        chat = self._chat(state)
        with chat.lock:  # a stream sees the new generation only with the edit done
            chat.generation += 1
            chat.session.cancel()
            if chat.turn_sizes:
                chat.session.undo()
                chat.drop_last_exchange()
        return chat.messages, chat

    def clear(self, state: UserChat | None):
        chat = self._chat(state)
        with chat.lock:
            chat.generation += 1
            chat.session.cancel()
            chat.session.clear()
            chat.messages.clear()
            chat.turn_sizes.clear()
        return chat.messages, chat


def build_demo(loaded: LoadedBlsp, *, max_audio_seconds: float | None = 120.0, concurrency: int = DEFAULT_CONCURRENCY,
               max_context_tokens: int | None = None, max_cached_tokens: int | None = None) -> gr.Blocks:
    """The page for one shared model; `max_context_tokens` caps each conversation (default: the LLM's),
    `max_cached_tokens` the KV-cache positions of all sessions together (default: no ceiling)."""
    budget = CacheBudget(max_cached_tokens) if max_cached_tokens is not None else None
    handlers = ChatHandlers(loaded, max_audio_seconds, max_context_tokens, budget)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nSpeak or type; spoken and typed turns share one conversation. "
                    f"Model: `{loaded.source}`." + ("" if loaded.adapter_trained else "\n\n" + UNTRAINED_NOTICE))
        state = gr.State(None, delete_callback=release_chat)
        chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chatbot", buttons=["copy"])
        with gr.Row():
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speak or upload audio", scale=2,
                             elem_id="audio-input")
            with gr.Column(scale=3):
                text = gr.Textbox(label="Message", placeholder="Type a message, or add text to your audio", lines=2)
                with gr.Row():
                    task = gr.Dropdown(list(TASK_PRESETS), value="Chat", label="Task for the next spoken turn")
                    target = gr.Textbox(value=DEFAULT_TRANSLATION_TARGET, label="Translate into")
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

        inputs = [text, audio, task, target, *settings, state]
        outputs = [chatbot, state, text, audio]
        for trigger in (send.click, text.submit):
            trigger(handlers.send, inputs, outputs, concurrency_limit=concurrency, concurrency_id="gpu",
                    api_name="send" if trigger == send.click else False)
        regenerate.click(handlers.regenerate, [*settings, state], [chatbot, state], concurrency_limit=concurrency,
                         concurrency_id="gpu", api_name="regenerate")
        stop.click(handlers.stop, [state], None, queue=False, api_name="stop")
        undo.click(handlers.undo, [state], [chatbot, state], queue=False, api_name="undo")
        clear.click(handlers.clear, [state], [chatbot, state], queue=False, api_name="clear")

        def release_closed_page(request: gr.Request) -> None:
            release_chat(_session_state(demo, state, request))

        demo.unload(release_closed_page)
    return demo


def _session_state(demo: gr.Blocks, state: gr.State, request: gr.Request) -> UserChat | None:
    """The value of `state` in the browser session `request` came from (None if it has none yet)."""
    holder = demo.state_holder
    if request is None or request.session_hash not in holder:
        return None
    return holder[request.session_hash].state_data.get(state._id)
