"""OpenAI-compatible HTTP API over an engine: `python -m blsp_chat serve`.

Routes (all behind `--api-key` when one is set, except `GET /health`): `POST /v1/chat/completions` (text and
`input_audio` parts in any user turn, streamed as server-sent events on request; with `modalities: ["text",
"audio"]` the reply is also spoken), `GET /v1/models`, `POST /v1/audio/transcriptions` (the repeat instruction on
an uploaded file, as json, text, verbose_json, srt or vtt), `POST /v1/audio/speech` (text -> the server's voice).
The web layer only adapts: it turns an OpenAI request into `EngineTurn`s (text and decoded audio) and
`GenerationOptions`, checks the server's limits, and writes the engine's chunks as OpenAI's JSON.

Spoken output comes from one voice (`voice.tts`: piper's, or espeak-ng's), which answers to every one of OpenAI's
voice names, so that clients written for OpenAI work unchanged; all audio leaves at OpenAI's 24 kHz mono.

The engine is one seam (`Engine`): `InProcessEngine` runs a fresh `ChatSession` per request on the shared
model (its own history and KV cache, so requests cannot see each other; forward passes take turns under the
model's lock, step by step). A scale-out engine (vLLM) plugs in behind the same two members.

Every refusal is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}` with a 4xx status, and a
parameter the server cannot honour is refused that way rather than ignored; a 500 means the server itself failed,
and it keeps serving either way.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Literal, Protocol, Sequence

import anyio
import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .audio import DEFAULT_MAX_AUDIO_SECONDS, AudioError, AudioTooLongError, load_audio, resample
from .audio_out import MEDIA_TYPES, encode_audio
from .config import GenerationOptions
from .constants import REPEAT_INSTRUCTION, SAMPLE_RATE
from .generate import NothingHeardError
from .prompt import render
from .session import ChatSession, ContextOverflowError, ReplyChunk
from .voice.sentences import SentenceSplitter

if TYPE_CHECKING:
    from .voice.tts import Voice, VoiceOptions
    from .weights import LoadedBlsp

DEFAULT_MODEL_ID = "blsp-chat"
OWNER = "blsp-chat"
MEBIBYTE = 1 << 20
DEFAULT_MAX_BODY_BYTES = 25 * MEBIBYTE   # OpenAI's own limit on an uploaded audio file
DEFAULT_MAX_TOKENS_LIMIT = 1024          # the most max_tokens a request may ask for (the app's slider maximum)
DEFAULT_MAX_TOKENS = GenerationOptions().max_new_tokens  # when a request names none
MAX_TEMPERATURE = 2.0                    # OpenAI's range is [0, 2]
MAX_STOP_SEQUENCES = 4                   # OpenAI accepts up to four stop strings
SSE_DONE = "data: [DONE]\n\n"
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # a signed 64-bit integer, as OpenAI documents `seed`
HEALTH_ROUTE = "/health"                   # the one route open without the API key (load balancers probe it)
# How the engine's reply ended -> OpenAI's finish_reason.
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "loop": "stop", "max_new_tokens": "length", "cancelled": "stop"}
NO_SPEECH_HEARD = "no_speech_heard"         # error code of a clip in which the model heard no words

# Spoken output, as OpenAI's API defines it.
OUTPUT_SAMPLE_RATE = 24_000  # OpenAI's `pcm` is headerless 24 kHz 16-bit mono, so every format is written at it
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-03-20", "gpt-4o-mini-tts-2025-12-15")
CHAT_AUDIO_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "opus", "aac": "aac", "pcm16": "pcm"}
STREAMED_AUDIO_FORMAT = "pcm16"  # as OpenAI: raw samples are what join across a stream's chunks
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
DEFAULT_SPEECH_FORMAT = "mp3"    # OpenAI's default for /v1/audio/speech
MAX_SPEECH_INPUT_CHARS = 4096    # OpenAI's limit on /v1/audio/speech's input
SPEED_RANGE = (0.25, 4.0)        # OpenAI's range for /v1/audio/speech's speed
BASE64_GROUP = 3                 # bytes per 4 base64 characters: pieces cut at multiples of it join unpadded
# Transcriptions.
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TRANSCRIPTION_LANGUAGE = "en"    # the repeat instruction is English; the model cannot be told another language
TRANSCRIPTION_LANGUAGE_NAME = "english"  # as verbose_json names it


# --- errors ----------------------------------------------------------------------------------------
class ApiError(Exception):
    """A refused request, answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def generation_failed(err: Exception) -> ApiError:
    return ApiError(500, f"the reply failed: {err}", kind="server_error", code="generation_failed")


# --- limits ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or not self.max_audio_seconds > 0 or self.max_tokens < 1:
            raise ValueError(f"server limits must be positive, got {self}")


# --- the engine seam -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineTurn:
    """One turn as the engine takes it: a human turn's instruction, text and (16 kHz mono) audio, or an
    assistant turn's text."""

    role: Literal["human", "assistant"]
    text: str = ""
    instruction: str = ""
    audio: np.ndarray | None = None


class ReplyStream(Protocol):
    """One reply in progress: its chunks (`session.ReplyChunk`, the last one `done`), the prompt's size, and
    after the last chunk (or `close`) the number of tokens generated."""

    prompt_tokens: int

    def __iter__(self) -> Iterator[ReplyChunk]: ...
    def completion_tokens(self) -> int: ...
    def close(self) -> None: ...
    def cancel(self) -> None: ...  # from any thread, without waiting: the client has gone


class Engine(Protocol):
    """What the server needs of a model: its name, and a reply to a conversation ending in a human turn.
    `start` raises ContextOverflowError when the conversation and max_new_tokens do not fit."""

    model_id: str

    def start(self, turns: Sequence[EngineTurn], options: GenerationOptions,
              seed: int | None = None) -> ReplyStream: ...


class SessionReply:
    """A ChatSession's reply as a ReplyStream."""

    def __init__(self, session: ChatSession, prompt_tokens: int, chunks: Iterator[ReplyChunk]):
        self.session, self.prompt_tokens, self._chunks = session, prompt_tokens, chunks

    def __iter__(self) -> Iterator[ReplyChunk]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()  # leaving the session's iterator cancels the reply
        self.session.cancel()  # and waits for its last step, so that the reply is in the history

    def cancel(self) -> None:
        self.session.cancel(timeout=0)  # the step in flight is the last; nobody waits for it

    def completion_tokens(self) -> int:
        turns = self.session.turns
        return len(turns[-1].token_ids or ()) if turns and turns[-1].role == "assistant" else 0


class InProcessEngine:
    """The shared in-process model: a fresh ChatSession per request."""

    def __init__(self, loaded: LoadedBlsp, model_id: str = DEFAULT_MODEL_ID, max_context_tokens: int | None = None):
        self.loaded = loaded
        self.model_id = model_id
        self.max_context_tokens = max_context_tokens

    def start(self, turns: Sequence[EngineTurn], options: GenerationOptions, seed: int | None = None) -> SessionReply:
        session = ChatSession.from_loaded(self.loaded, max_context_tokens=self.max_context_tokens,
                                          generator=self._generator(seed))
        for turn in turns:
            if turn.role == "assistant":
                session.add_reply(turn.text)
            elif turn.audio is not None:
                session.submit_audio(turn.audio, instruction=turn.instruction, text=turn.text)
            else:
                session.submit_text(turn.text, instruction=turn.instruction)
        prompt_tokens = self._check_fits(session, options.max_new_tokens)
        return SessionReply(session, prompt_tokens, session.stream_reply(options))

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.loaded.model.device).manual_seed(seed)

    @staticmethod
    def _check_fits(session: ChatSession, max_new_tokens: int) -> int:
        """The rendered conversation's length; refuses one that does not fit with its reply (the chat app
        drops old turns instead, but an API client sent them on purpose)."""
        length = len(render(list(session.turns), session.tokenizer, session.template))
        if length + max_new_tokens > session.max_context_tokens:
            raise ContextOverflowError(
                f"the conversation takes {length} tokens and the reply up to {max_new_tokens} more, but the "
                f"model's context holds {session.max_context_tokens}: send fewer or shorter messages or clips, "
                "or lower max_tokens")
        return length


# --- requests ----------------------------------------------------------------------------------------
class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat request that this server honours; any other is checked by `check_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


def generation_options(request: ChatCompletionRequest, limits: ServerLimits) -> GenerationOptions:
    if request.max_completion_tokens is not None:
        return decoding_options(request.max_completion_tokens, request.temperature, request.top_p, limits,
                                "max_completion_tokens")
    return decoding_options(request.max_tokens, request.temperature, request.top_p, limits)


def decoding_options(max_tokens: int | None, temperature: float | None, top_p: float | None, limits: ServerLimits,
                     max_tokens_param: str = "max_tokens") -> GenerationOptions:
    """Greedy when temperature is 0 or omitted (the paper decodes greedily); sampled otherwise. Without
    max_tokens, a reply may take DEFAULT_MAX_TOKENS (or the server's limit, if lower)."""
    max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_tokens) if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}", max_tokens_param)
    if max_tokens > limits.max_tokens:
        raise bad_request(f"{max_tokens_param} is {max_tokens}, above this server's limit of {limits.max_tokens}",
                          max_tokens_param)
    temperature = temperature or 0.0
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}", "temperature")
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if temperature == 0:
        return GenerationOptions(max_new_tokens=max_tokens)
    return GenerationOptions(max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=top_p)


def _anything(value: Any) -> bool:
    return True


def _unset(value: Any) -> bool:
    return value is None


def _falsy(value: Any) -> bool:
    return not value


# OpenAI's chat fields that this server does not use, each with the values that ask nothing of it. A request that
# asks something of one (a penalty, a JSON schema, a stored completion) is refused: served without it, the client
# would take a reply for one it did not get. Fields that only describe the request (user, metadata) are accepted.
NEUTRAL_CHAT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "user": _anything, "metadata": _anything, "safety_identifier": _anything, "prompt_cache_key": _anything,
    "parallel_tool_calls": _anything,  # there are no tools to call in parallel
    "service_tier": lambda value: value in (None, "auto", "default"),
    "store": _falsy, "frequency_penalty": _falsy, "presence_penalty": _falsy, "logit_bias": _falsy,
    "top_logprobs": _falsy, "functions": _falsy,
    "tool_choice": lambda value: value in (None, "none"), "function_call": lambda value: value in (None, "none"),
    "response_format": lambda value: value is None or value == {"type": "text"},
    "prediction": _unset, "reasoning_effort": _unset, "verbosity": _unset, "web_search_options": _unset,
}


def check_unsupported(request: ChatCompletionRequest) -> None:
    if request.n not in (None, 1):
        raise bad_request(f"this server generates one choice per request (n=1), got n={request.n}", "n")
    if request.logprobs:
        raise bad_request("logprobs are not available from this server", "logprobs")
    if request.tools:
        raise bad_request("this model does not call tools", "tools")
    for name, value in (request.model_extra or {}).items():
        if name not in NEUTRAL_CHAT_FIELDS:
            raise bad_request(f"unrecognized request argument supplied: {name}", name, code="unknown_parameter")
        if not NEUTRAL_CHAT_FIELDS[name](value):
            raise bad_request(f"{name}={json.dumps(value)[:100]} is not supported by this server; leave {name} out",
                              name, code="unsupported_parameter")


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", "stop")
    return [checked_text(s, "stop") for s in stops]


# --- messages -> turns ---------------------------------------------------------------------------------
def parse_messages(messages: Sequence[Any], limits: ServerLimits) -> list[EngineTurn]:
    """OpenAI messages -> alternating engine turns ending in a human turn. System (and developer) text goes
    in front of the next user turn's text (the blsp format has no system prompt); consecutive user messages
    are one turn."""
    if not messages:
        raise bad_request("messages must hold at least one user message", "messages")
    turns: list[EngineTurn] = []
    system: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with a role and content", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_only(message.get("content"), where))
        elif role == "user":
            text, audio = parse_content(message.get("content"), where, limits)
            turn = EngineTurn("human", text=" ".join(t for t in (*system, text) if t), audio=audio)
            system = []
            if turns and turns[-1].role == "human":
                turns[-1] = _merge_human(turns[-1], turn, where)
            else:
                turns.append(turn)
        elif role == "assistant":
            if not turns or turns[-1].role != "human":
                raise bad_request(f"{where}: an assistant message must follow a user message", where)
            turns.append(EngineTurn("assistant", text=_assistant_text(message, where)))
        else:
            raise bad_request(f"{where}: role {role!r} is not supported; use system, user or assistant",
                              f"{where}.role")
    if not turns or turns[-1].role != "human":
        raise bad_request("the last message must be a user message: it is the turn the model replies to", "messages")
    return turns


def _merge_human(first: EngineTurn, second: EngineTurn, where: str) -> EngineTurn:
    if first.audio is not None and second.audio is not None:
        raise bad_request(f"{where}: one audio clip per user turn; put an assistant reply between two clips", where)
    text = " ".join(t for t in (first.text, second.text) if t)
    return EngineTurn("human", text=text, audio=first.audio if first.audio is not None else second.audio)


def _assistant_text(message: dict, where: str) -> str:
    """An earlier reply's text. A spoken reply sent back as the client received it (content null, `audio` with its
    transcript) is its transcript; one that names its audio only by id cannot be read, as the server keeps no
    audio between requests."""
    audio = message.get("audio")
    if message.get("content") is not None or audio is None:
        return _text_only(message.get("content"), where)
    transcript = audio.get("transcript") if isinstance(audio, dict) else None
    if not isinstance(transcript, str):
        raise bad_request(f"{where}.audio: this server keeps no audio between requests, so a reply's audio id "
                          "cannot be looked up; send the reply's text as content (or as audio.transcript)",
                          f"{where}.audio")
    return checked_text(transcript, f"{where}.audio.transcript")


def _text_only(content: Any, where: str) -> str:
    if isinstance(content, str):
        return checked_text(content, f"{where}.content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return " ".join(text_part(p, f"{where}.content[{i}]") for i, p in enumerate(content))
    raise bad_request(f"{where}: this message's content must be text", f"{where}.content")


def text_part(part: dict, where: str) -> str:
    """A {"type": "text", "text": ...} part's text: a string, or the request is refused (never its repr)."""
    text = part.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string, got {type(text).__name__}", f"{where}.text")
    return checked_text(text, f"{where}.text")


def checked_text(text: str, where: str) -> str:
    """JSON can carry a lone surrogate (\\ud800) that no tokenizer can encode: refuse it as the client's mistake."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(f"{where} is not valid Unicode text: {err.reason} at position {err.start}", where,
                          code="invalid_text") from err
    return text


def parse_content(content: Any, where: str, limits: ServerLimits) -> tuple[str, np.ndarray | None]:
    """A user message's content -> its text (parts joined) and its one audio clip, decoded."""
    if isinstance(content, str):
        if not content.strip():
            raise bad_request(f"{where} is empty: send text or an input_audio part", f"{where}.content")
        return checked_text(content, f"{where}.content"), None
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, audios = [], []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(text_part(part, at))
        elif kind == "input_audio":
            audios.append(decode_input_audio(part.get("input_audio"), f"{at}.input_audio", limits))
        elif kind == "audio_url":
            audios.append(decode_audio_url(part.get("audio_url"), f"{at}.audio_url", limits))
        else:
            raise bad_request(f"{at}: content part type {kind!r} is not supported; use text or input_audio",
                              f"{at}.type")
    if len(audios) > 1:
        raise bad_request(f"{where} holds {len(audios)} audio parts; send one clip per user message",
                          f"{where}.content")
    text = " ".join(t for t in texts if t)
    if not text.strip() and not audios:
        raise bad_request(f"{where} is empty: send text or an input_audio part", f"{where}.content")
    return text, audios[0] if audios else None


def decode_input_audio(part: Any, where: str, limits: ServerLimits) -> np.ndarray:
    """{"data": base64, "format": "wav"|"mp3"|...}: the format is recognised from the bytes themselves."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise bad_request(f"{where} must be an object with base64 'data' and a 'format'", where)
    return decode_audio(decode_base64(part["data"], f"{where}.data"), f"{where}.data", limits)


def decode_audio_url(part: Any, where: str, limits: ServerLimits) -> np.ndarray:
    """vLLM's {"url": "data:audio/wav;base64,..."}; the server fetches nothing, so only data: URLs."""
    url = part.get("url") if isinstance(part, dict) else None
    header, comma, data = (url or "").partition(",")
    if not (isinstance(url, str) and url.startswith("data:") and comma and header.endswith(";base64")):
        raise bad_request(f"{where}.url must be a data: URL with base64 audio (this server fetches no URLs)",
                          f"{where}.url")
    return decode_audio(decode_base64(data, f"{where}.url"), f"{where}.url", limits)


def decode_base64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"{where} is not valid base64: {err}", where, code="invalid_base64") from err


def decode_audio(data: bytes, where: str, limits: ServerLimits) -> np.ndarray:
    """Encoded audio -> 16 kHz mono float32, checked (empty, silent, corrupt, too long). The limit goes to the
    decoder: a small body can hold hours of many-channel audio, refused from its header (or as soon as decoding
    passes the limit) rather than decoded whole."""
    try:
        return load_audio(data, max_seconds=limits.max_audio_seconds)
    except AudioTooLongError as err:
        raise bad_request(f"The audio is {err.seconds:.1f} s long, over this server's limit of "
                          f"{limits.max_audio_seconds:g} s. Trim it or send a shorter clip.", where,
                          code="audio_too_long") from err
    except AudioError as err:
        raise bad_request(str(err), where, code="invalid_audio") from err


# --- replies -------------------------------------------------------------------------------------------
class StopCutter:
    """The client's stop sequences over a reply's growing text: what is safe to show (a tail that could
    still become a stop sequence is held back) and whether one was hit (the text is cut before it)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)

    def visible(self, text: str, final: bool) -> tuple[str, bool]:
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            return text[: min(hits)], True
        return (text if final else self._hold_back(text)), False

    def _hold_back(self, text: str) -> str:
        held = max((size for stop in self.stops for size in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:size])), default=0)
        return text[: len(text) - held]


def reply_deltas(reply: ReplyStream, stops: StopCutter) -> Iterator[tuple[str, str | None]]:
    """The reply as (text delta, finish_reason) pairs; finish_reason only on the last. A stop sequence
    ends the reply early (and the engine's generation with it)."""
    shown = ""
    for chunk in reply:
        visible, hit = stops.visible(chunk.text, chunk.done)
        delta, shown = visible[len(shown):], visible
        if hit:
            reply.close()
            yield delta, "stop"
            return
        if chunk.done:
            yield delta, FINISH_REASONS[chunk.stopped_by]
            return
        if delta:
            yield delta, None


def usage(reply: ReplyStream) -> dict[str, int]:
    prompt, completion = reply.prompt_tokens, reply.completion_tokens()
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def reply_text(reply: ReplyStream, stops: StopCutter) -> tuple[str, str]:
    """The whole reply's text and its finish_reason."""
    text, finish = "", "stop"
    try:
        for delta, reason in reply_deltas(reply, stops):
            text, finish = text + delta, reason or finish
    finally:
        reply.close()
    return text, finish


def completion_body(reply: ReplyStream, message: dict, finish: str, model_id: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage(reply),
    }


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def completion_events(reply: ReplyStream, stops: StopCutter, model_id: str, include_usage: bool,
                      speech: StreamedSpeech | None = None) -> Iterator[str]:
    """The reply as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; with `speech`, its
    text comes as the audio's transcript and each sentence's samples follow as soon as it is complete. A failure
    after the stream has begun is sent as an error event (the status line has gone already)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_id}

    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": None if speech else ""})
        for delta, finish in reply_deltas(reply, stops):
            if delta:
                yield from (chunk(d) for d in (speech.text(delta) if speech else [{"content": delta}]))
            if finish:
                yield from (chunk(d) for d in (speech.finish() if speech else ()))
                yield chunk({}, finish)
        reply.close()
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(reply)})
        yield SSE_DONE
    except Exception as err:  # a failed generation (out of memory): say so; the server goes on
        yield sse(generation_failed(err).body())
    finally:
        reply.close()


# --- spoken output -------------------------------------------------------------------------------------------
def sentences_of(text: str) -> list[str]:
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()


def new_audio_id() -> str:
    return f"audio_{uuid.uuid4().hex}"


class ServerVoice:
    """The server's one voice (`voice.tts.Voice`) under OpenAI's names: every built-in voice name maps to it, since
    a client written for OpenAI names one. Speech leaves at OUTPUT_SAMPLE_RATE."""

    def __init__(self, voice: Voice):
        self.voice = voice

    def check_voice(self, voice: Any, param: str) -> None:
        names = ", ".join(OPENAI_VOICES)
        if isinstance(voice, dict):
            raise bad_request(f"{param}: custom voices are not available on this server; name one of {names} "
                              f"(each is this server's {self.voice.description})", param)
        if voice not in OPENAI_VOICES:
            raise bad_request(f"{param} {voice!r} is not a voice of this server; use one of {names} (each is "
                              f"this server's {self.voice.description})", param)

    def speak(self, text: str, speed: float = 1.0) -> np.ndarray:
        """(n,) float32 at OUTPUT_SAMPLE_RATE."""
        return resample(self.voice.synthesize(text, speed), self.voice.sample_rate, OUTPUT_SAMPLE_RATE)

    def speak_all(self, text: str, speed: float = 1.0, gone: threading.Event | None = None) -> np.ndarray:
        """The whole text, sentence by sentence; once `gone` is set, nothing more is spoken."""
        pieces = []
        for sentence in sentences_of(text):
            if gone is not None and gone.is_set():
                break
            pieces.append(self.speak(sentence, speed))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def speech_failed(err: Exception) -> ApiError:
    return ApiError(500, f"the voice failed: {err}", kind="server_error", code="speech_failed")


def spoken_format(request: ChatCompletionRequest, voice: ServerVoice | None) -> str | None:
    """The format (chat's names: wav, ..., pcm16) that a chat request wants its reply spoken in; None: text only."""
    modalities = request.modalities or ["text"]
    unknown = sorted(set(modalities) - {"text", "audio"})
    if unknown:
        raise bad_request(f"modalities {unknown} are not supported; use ['text'] or ['text', 'audio']", "modalities")
    if "audio" not in modalities:
        if request.audio is not None:
            raise bad_request("audio describes a spoken reply, but modalities does not ask for one: add 'audio' "
                              "to modalities or leave audio out", "audio")
        return None
    if voice is None:
        raise bad_request("this server has no voice to speak replies with (its operator can start it with --voice "
                          "piper or --voice espeak-ng); ask for modalities ['text']", "modalities",
                          code="unsupported_value")
    return check_audio_param(request.audio, bool(request.stream), voice)


def check_audio_param(audio: dict[str, Any] | None, stream: bool, voice: ServerVoice) -> str:
    if audio is None:
        raise bad_request("a spoken reply needs the audio parameter, e.g. {\"voice\": \"alloy\", \"format\": "
                          "\"wav\"}", "audio", code="missing_required_parameter")
    extra = sorted(set(audio) - {"voice", "format"})
    if extra:
        raise bad_request(f"audio.{extra[0]} is not supported; audio takes voice and format", f"audio.{extra[0]}",
                          code="unknown_parameter")
    for key in ("voice", "format"):
        if key not in audio:
            raise bad_request(f"audio.{key} is required", f"audio.{key}", code="missing_required_parameter")
    voice.check_voice(audio["voice"], "audio.voice")
    fmt = audio["format"]
    if not isinstance(fmt, str) or fmt not in CHAT_AUDIO_FORMATS:
        raise bad_request(f"audio.format {fmt!r} is not supported; use one of {', '.join(CHAT_AUDIO_FORMATS)}",
                          "audio.format")
    if stream and fmt != STREAMED_AUDIO_FORMAT:
        raise bad_request(f"a streamed reply's audio is sent as {STREAMED_AUDIO_FORMAT} (raw {OUTPUT_SAMPLE_RATE} Hz "
                          f"16-bit mono samples, which join across chunks), as OpenAI's API does; got audio.format "
                          f"{fmt!r}", "audio.format", code="unsupported_value")
    return fmt


def spoken_message(text: str, voice: ServerVoice, fmt: str, gone: threading.Event) -> dict:
    """A whole reply's message with its speech. The server keeps no audio, so it expires when it is sent."""
    try:
        data = encode_audio(voice.speak_all(text, gone=gone), OUTPUT_SAMPLE_RATE, CHAT_AUDIO_FORMATS[fmt])
    except Exception as err:
        raise speech_failed(err) from err
    audio = {"id": new_audio_id(), "data": base64.b64encode(data).decode(), "expires_at": int(time.time()),
             "transcript": text}
    return {"role": "assistant", "content": None, "audio": audio}


class StreamedSpeech:
    """A streamed reply's `delta.audio` pieces: its text as transcript deltas as it comes, and each sentence's
    pcm16 samples once the sentence is complete. The official client's stream accumulator joins every string
    field of the deltas, so the id is sent once and the base64 pieces are cut at multiples of BASE64_GROUP bytes
    (they join into one valid base64 string); the last piece carries only the expiry, as OpenAI's does."""

    def __init__(self, voice: ServerVoice):
        self.voice, self.splitter, self.id = voice, SentenceSplitter(), new_audio_id()
        self.pending = b""  # samples not yet sent: fewer than BASE64_GROUP bytes between sentences

    def text(self, delta: str) -> Iterator[dict]:
        yield self._audio(transcript=delta)
        for sentence in self.splitter.feed(delta):
            yield from self._spoken(sentence)

    def finish(self) -> Iterator[dict]:
        for sentence in self.splitter.flush():
            yield from self._spoken(sentence)
        if self.pending:
            yield self._audio(data=base64.b64encode(self.pending).decode())
            self.pending = b""
        yield {"audio": {"expires_at": int(time.time())}}

    def _spoken(self, sentence: str) -> Iterator[dict]:
        self.pending += encode_audio(self.voice.speak(sentence), OUTPUT_SAMPLE_RATE, "pcm")
        whole = len(self.pending) - len(self.pending) % BASE64_GROUP
        if whole:
            data, self.pending = self.pending[:whole], self.pending[whole:]
            yield self._audio(data=base64.b64encode(data).decode())

    def _audio(self, **fields: str) -> dict:
        if self.id is not None:
            fields, self.id = {"id": self.id, **fields}, None
        return {"audio": fields}


# --- /v1/audio/speech ----------------------------------------------------------------------------------------
class SpeechRequest(BaseModel):
    """OpenAI's speech request; a field it does not have is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: str | dict[str, Any]
    response_format: str = DEFAULT_SPEECH_FORMAT
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str | None = None


def check_speech_request(request: SpeechRequest, voice: ServerVoice) -> None:
    voice.check_voice(request.voice, "voice")
    text = checked_text(request.input, "input")
    if not any(ch.isalnum() for ch in text):
        raise bad_request("input holds nothing to speak", "input")
    if len(text) > MAX_SPEECH_INPUT_CHARS:
        raise bad_request(f"input is {len(text)} characters, over the limit of {MAX_SPEECH_INPUT_CHARS}", "input")
    if request.response_format not in SPEECH_FORMATS:
        raise bad_request(f"response_format {request.response_format!r} is not supported; use one of "
                          f"{', '.join(SPEECH_FORMATS)}", "response_format")
    if not SPEED_RANGE[0] <= request.speed <= SPEED_RANGE[1]:
        raise bad_request(f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}, got {request.speed}", "speed")
    if request.instructions:
        raise bad_request("instructions cannot steer this server's voice; leave them out", "instructions",
                          code="unsupported_parameter")
    if request.stream_format not in (None, "audio"):
        raise bad_request(f"stream_format {request.stream_format!r} is not supported; this server sends the audio "
                          "file itself ('audio')", "stream_format", code="unsupported_value")


# --- /v1/audio/transcriptions ----------------------------------------------------------------------------------
TRANSCRIPTION_FIELDS = frozenset({"file", "model", "response_format", "prompt", "language", "temperature"})
# OpenAI's other multipart fields that this server knows: the values that ask nothing it cannot do, and why others
# are refused. The model writes no timestamps, so the whole clip as one segment is the only timing it can honestly
# give ("segment"); it cannot give words' times.
NEUTRAL_TRANSCRIPTION_FIELDS: dict[str, tuple[Callable[[str], bool], str]] = {
    "stream": (lambda value: value.lower() == "false", "transcripts are not streamed by this server"),
    "timestamp_granularities[]": (lambda value: value == "segment",
                                  "the model writes no timestamps: verbose_json gives the whole clip as one segment "
                                  "('segment'), and no word timings"),
    "include[]": (lambda value: False, "this server gives no logprobs"),
    "chunking_strategy": (lambda value: False, "the clip is transcribed whole (up to the server's audio limit)"),
}


def check_transcription_form(form, response_format: str, prompt: str, language: str | None) -> None:
    """Refuses what the transcription cannot honour, naming the field."""
    for name in form.keys():
        if name in TRANSCRIPTION_FIELDS:
            continue
        if name not in NEUTRAL_TRANSCRIPTION_FIELDS:
            raise bad_request(f"unrecognized request argument supplied: {name}", name, code="unknown_parameter")
        neutral, reason = NEUTRAL_TRANSCRIPTION_FIELDS[name]
        for value in form.getlist(name):
            if not (isinstance(value, str) and neutral(value)):
                raise bad_request(f"{name}={value!r} is not supported: {reason}", name, code="unsupported_parameter")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise bad_request(f"response_format {response_format!r} is not supported; use one of "
                          f"{', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
    if "timestamp_granularities[]" in form and response_format != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format verbose_json", "timestamp_granularities[]")
    if prompt:
        raise bad_request("a prompt cannot steer this model's transcription (it repeats what it hears); leave it "
                          "out", "prompt", code="unsupported_parameter")
    if language not in (None, TRANSCRIPTION_LANGUAGE):
        raise bad_request(f"language {language!r}: this model transcribes with an English instruction and cannot "
                          f"be told another language; send {TRANSCRIPTION_LANGUAGE!r} or leave it out", "language",
                          code="unsupported_value")


def timestamp(seconds: float, decimal: str) -> str:
    """hh:mm:ss,mmm (SubRip) or hh:mm:ss.mmm (WebVTT)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    return f"{hours:02d}:{minutes:02d}:{millis // 1000:02d}{decimal}{millis % 1000:03d}"


def compression_ratio(text: str) -> float:
    """openai/whisper's measure of a looping transcript: its UTF-8 size over its zlib-compressed size."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def transcription_response(text: str, seconds: float, fmt: str, temperature: float) -> Response | dict:
    """The transcript in `fmt`. The model writes no timestamps, so the timed formats give the whole clip as one
    segment (none when nothing was heard); verbose_json leaves out the scores it cannot compute (avg_logprob,
    no_speech_prob)."""
    if fmt == "json":
        return {"text": text}
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt == "verbose_json":
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": round(seconds, 3), "text": text,
                   "temperature": temperature, "compression_ratio": compression_ratio(text)}
        return {"task": "transcribe", "language": TRANSCRIPTION_LANGUAGE_NAME, "duration": round(seconds, 3),
                "text": text, "segments": [segment] if text else []}
    decimal = "." if fmt == "vtt" else ","
    span = f"{timestamp(0, decimal)} --> {timestamp(seconds, decimal)}"
    text = "\n".join(line for line in text.splitlines() if line.strip())  # a blank line would end the cue
    if fmt == "srt":
        return PlainTextResponse(f"1\n{span}\n{text}\n" if text else "")
    return PlainTextResponse("WEBVTT\n\n" + (f"{span}\n{text}\n" if text else ""), media_type="text/vtt")


# --- clients that leave ---------------------------------------------------------------------------------
# A reply nobody will read must not go on costing the model: when the client's connection closes, the reply is
# cancelled at once (not when its next chunk fails to send, nor when a generator is collected), so that it stops
# within one decode step and its place in the batch goes to someone still there.
async def client_gone(receive) -> None:
    """Returns once the client has closed its connection (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def while_watching(receive, on_gone: Callable[[], None], work: Callable[[], Awaitable[Any]]) -> Any:
    """`await work()`, calling `on_gone()` if the client leaves meanwhile. An error of `work` is raised as itself
    (a task group would wrap it in an ExceptionGroup)."""
    outcome: dict[str, Any] = {}

    async def watch() -> None:
        await client_gone(receive)
        on_gone()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            outcome["result"] = await work()
        except Exception as err:
            outcome["error"] = err
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


async def until_done_or_gone(receive, work: Callable[[threading.Event], Any], *replies: ReplyStream) -> Any:
    """`work(gone)` (reading a whole reply, speaking it) on a worker thread. If the client leaves, `replies` are
    cancelled and `gone` is set, so that speech stops after the sentence in hand."""
    gone = threading.Event()

    def on_gone() -> None:
        gone.set()
        for reply in replies:
            reply.cancel()

    return await while_watching(receive, on_gone, lambda: run_in_threadpool(work, gone))


class ReplyEvents(StreamingResponse):
    """A reply's server-sent events, cancelled as soon as the client leaves (Starlette itself notices only at
    the next chunk it fails to send, and leaves the generator to the garbage collector)."""

    def __init__(self, reply: ReplyStream, events: Iterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.reply, self.events = reply, events

    async def __call__(self, scope, receive, send) -> None:
        try:
            with anyio.CancelScope() as sending:
                def gone() -> None:
                    self.reply.cancel()
                    sending.cancel()  # the event in flight arrives within a step; nothing more is sent

                await while_watching(receive, gone, lambda: self.stream_response(send))
        except OSError:  # the connection broke while sending
            self.reply.cancel()
        finally:
            await run_in_threadpool(self.events.close)  # its own cleanup (the reply's close) off the event loop


# --- the app -------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before any route reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = ApiError(413, f"the request body is over this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every request but `GET /health` must carry `Authorization: Bearer <api_key>`. The
    outermost layer, so that the key is checked before anything reads the body (a client without it learns
    nothing from a 400 or 413) and no route, the docs and the schema included, is open by mistake."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._allowed(scope):
            return await self.app(scope, receive, send)
        error = ApiError(401, "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                         code="invalid_api_key")
        await error.response()(scope, receive, send)

    def _allowed(self, scope) -> bool:
        if scope.get("path") == HEALTH_ROUTE and scope.get("method") in ("GET", "HEAD"):
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.api_key)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return bad_request("the request body is not valid JSON", code="invalid_json").response()
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(first.get("type"),
                                                                                              "invalid_value")
    return bad_request(message, param, code=code).response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, str(exc.detail), code=code).response()


def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return ApiError(500, f"the server failed: {exc}", kind="server_error", code="server_error").response()


def create_app(engine: Engine, *, limits: ServerLimits = ServerLimits(), api_key: str | None = None,
               voice: Voice | None = None) -> FastAPI:
    """The API over `engine`. `api_key`: every request must carry it as a Bearer token (None: open). `voice`:
    speaks replies and /v1/audio/speech (None: text only, and a request for speech is refused)."""
    app = FastAPI(title="blsp-chat OpenAI-compatible API")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)  # added last: the outermost layer, before BodyLimit
    app.add_exception_handler(ApiError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    created = int(time.time())
    server_voice = ServerVoice(voice) if voice is not None else None

    def check_model(name: str) -> None:
        if name != engine.model_id:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")

    def start(turns: Sequence[EngineTurn], options: GenerationOptions, seed: int | None = None) -> ReplyStream:
        try:
            return engine.start(turns, options, seed)
        except ContextOverflowError as err:
            raise bad_request(str(err), "messages", code="context_length_exceeded") from err
        except NothingHeardError as err:  # a valid clip with no words in it: say so, with its own code
            raise bad_request(str(err), "messages", code=NO_SPEECH_HEARD) from err
        except AudioError as err:
            raise bad_request(str(err), "messages", code="invalid_audio") from err
        except Exception as err:  # a failed encoding or prefill (out of memory): say so; the server goes on
            raise generation_failed(err) from err

    def read(reply: ReplyStream, stops: StopCutter) -> tuple[str, str]:
        try:
            return reply_text(reply, stops)
        except Exception as err:
            raise generation_failed(err) from err

    def answer(reply: ReplyStream, stops: StopCutter, spoken: str | None, gone: threading.Event) -> dict:
        text, finish = read(reply, stops)
        message = ({"role": "assistant", "content": text} if spoken is None
                   else spoken_message(text, server_voice, spoken, gone))
        return completion_body(reply, message, finish, engine.model_id)

    @app.get(HEALTH_ROUTE)
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": created, "owned_by": OWNER}

    def begin(request: ChatCompletionRequest) -> tuple[ReplyStream, StopCutter, str | None]:
        """Check the request, decode its audio and start its reply (work for a worker thread)."""
        check_model(request.model)
        check_unsupported(request)
        spoken = spoken_format(request, server_voice)
        options = generation_options(request, limits)
        stops = StopCutter(stop_sequences(request.stop))
        return start(parse_messages(request.messages, limits), options, request.seed), stops, spoken

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        reply, stops, spoken = await run_in_threadpool(begin, request)
        if not request.stream:
            return await until_done_or_gone(http.receive, lambda gone: answer(reply, stops, spoken, gone), reply)
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        speech = StreamedSpeech(server_voice) if spoken else None
        return ReplyEvents(reply, completion_events(reply, stops, engine.model_id, include_usage, speech))

    def start_transcription(audio: np.ndarray, options: GenerationOptions) -> ReplyStream | None:
        """The repeat instruction on the clip; None when the model heard no words in it."""
        try:
            return start([EngineTurn("human", instruction=REPEAT_INSTRUCTION, audio=audio)], options)
        except ApiError as err:
            if err.code != NO_SPEECH_HEARD:
                raise
            return None  # transcribed as nothing, as Whisper transcribes a clip without words

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(http: Request, file: UploadFile = File(...), model: str = Form(...),
                             response_format: str = Form("json"), prompt: str = Form(""),
                             language: str | None = Form(None), temperature: float = Form(0.0)):
        check_model(model)
        check_transcription_form(await http.form(), response_format, prompt, language)
        options = decoding_options(None, temperature, None, limits)
        audio = await run_in_threadpool(decode_audio, await file.read(), "file", limits)
        reply = await run_in_threadpool(start_transcription, audio, options)
        text = "" if reply is None else await until_done_or_gone(
            http.receive, lambda gone: read(reply, StopCutter(()))[0], reply)
        return transcription_response(text, len(audio) / SAMPLE_RATE, response_format, temperature)

    @app.post("/v1/audio/speech")
    async def speech(request: SpeechRequest, http: Request) -> Response:
        if server_voice is None:
            raise ApiError(404, "this server has no voice, so it cannot speak (its operator can start it with "
                           "--voice piper or --voice espeak-ng)", param="model", code="model_not_found")
        if request.model not in (*SPEECH_MODELS, engine.model_id):
            raise ApiError(404, f"the speech model {request.model!r} does not exist here; name one of "
                           f"{', '.join((*SPEECH_MODELS, engine.model_id))} (each is this server's voice)",
                           param="model", code="model_not_found")
        check_speech_request(request, server_voice)

        def spoken(gone: threading.Event) -> bytes:
            try:
                samples = server_voice.speak_all(request.input, request.speed, gone)
                return encode_audio(samples, OUTPUT_SAMPLE_RATE, request.response_format)
            except Exception as err:
                raise speech_failed(err) from err

        data = await until_done_or_gone(http.receive, spoken)
        return Response(data, media_type=MEDIA_TYPES[request.response_format])

    return app


def load_server_voice(options: VoiceOptions | None) -> Voice | None:
    """The voice for spoken output (None: text only). With engine "auto", a server where no voice loads says so and
    serves text only; a voice asked for by name must load."""
    from .voice.tts import AUTO, VoiceUnavailable, load_voice, try_load_voice

    if options is None:
        return None
    if options.engine != AUTO:
        try:
            return load_voice(options)
        except VoiceUnavailable as err:
            raise ValueError(f"the server's voice ({options.engine}) cannot load: {err}") from err
    voice, notice = try_load_voice(options)
    print(f"({notice})" if voice is None else f"(spoken replies and /v1/audio/speech by {voice.description})",
          file=sys.stderr)
    return voice


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits = ServerLimits(), voice: VoiceOptions | None = None) -> None:
    """Run the API until interrupted. `voice`: the voice to load for spoken output (None: text only)."""
    import uvicorn

    app = create_app(engine, limits=limits, api_key=api_key, voice=load_server_voice(voice))
    uvicorn.run(app, host=host, port=port)
