"""The OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client.

Tiny in-memory models for the API itself (each reply is checked against a ChatSession given the same
conversation directly); one test on the real default weights checks that `generate`, the app and the
server answer a spoken turn identically.
"""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn

from blsp_chat import cli, weights
from blsp_chat.audio import load_audio
from blsp_chat.config import GenerationOptions
from blsp_chat.constants import REPEAT_INSTRUCTION, SAMPLE_RATE
from blsp_chat.prompt import render
from blsp_chat.serve import MEBIBYTE, InProcessEngine, ServerLimits, create_app
from blsp_chat.session import ChatSession
from blsp_chat.weights import LoadedBlsp
from tiny import hears_only_long_clips, lively_blsp, tiny_tokenizer, tone

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "assets" / "examples" / "capital_of_france.wav"
MODEL = "tiny-blsp"
CONTEXT = 512          # small, so that a long typed turn overflows it
MAX_TOKENS = 12
LIMITS = ServerLimits(max_body_bytes=MEBIBYTE, max_audio_seconds=4.0, max_tokens=64)
SERVER_START_SECONDS = 30
REAL_SERVER_START_SECONDS = 600  # loading the default weights on a busy 2-core CPU


# --- servers -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """`app` under uvicorn on 127.0.0.1 in a thread; yields the API's base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def loaded():
    return LoadedBlsp(lively_blsp(seed=3), tiny_tokenizer(), "tiny", adapter_trained=True)


@pytest.fixture(scope="module")
def url(loaded):
    with running(create_app(InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT), limits=LIMITS)) as base:
        yield base


def make_client(base_url, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture
def client(url):
    return make_client(url)


# --- requests and what they should get -----------------------------------------------------------------
def wav_bytes(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages,
                                          max_tokens=kwargs.pop("max_tokens", MAX_TOKENS),
                                          **kwargs)


def expected(loaded, turns, max_tokens=MAX_TOKENS) -> tuple[str, int]:
    """The reply (and prompt length) of a ChatSession given the conversation directly. turns: ("text", s),
    ("audio", wav bytes, text) or ("reply", s)."""
    session = ChatSession.from_loaded(loaded, max_context_tokens=CONTEXT)
    for kind, *value in turns:
        if kind == "text":
            session.submit_text(value[0])
        elif kind == "audio":
            session.submit_audio(load_audio(value[0]), text=value[1] if len(value) > 1 else "")
        else:
            session.add_reply(value[0])
    prompt_tokens = len(render(list(session.turns), session.tokenizer, session.template))
    return list(session.stream_reply(GenerationOptions(max_new_tokens=max_tokens)))[-1].text, prompt_tokens


def stream_text(client, messages, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


TYPED = [{"role": "user", "content": "what is the capital of france?"}]


# --- the API -------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_typed_turn(client, loaded):
    response = chat(client, TYPED)
    text, prompt_tokens = expected(loaded, [("text", TYPED[0]["content"])])
    assert text and response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant" and response.model == MODEL
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_tokens
    assert 1 <= response.usage.completion_tokens <= MAX_TOKENS
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_spoken_turn_from_a_wav_file(client, loaded, tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5, freq=330), SAMPLE_RATE)
    clip = path.read_bytes()
    response = chat(client, [{"role": "user", "content": [audio_part(clip)]}])
    text, prompt_tokens = expected(loaded, [("audio", clip)])
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == prompt_tokens
    speech_positions = loaded.model.speech_token_count(len(load_audio(clip)))
    assert prompt_tokens > speech_positions > 0, "the speech positions are counted"
    # A data: URL (vLLM's audio_url part) is the same clip.
    url = "data:audio/wav;base64," + base64.b64encode(clip).decode()
    again = chat(client, [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}])
    assert again.choices[0].message.content == text


def test_multi_turn_conversation_mixing_typed_and_spoken(client, loaded):
    first, second = wav_bytes(tone(1.2, freq=200)), wav_bytes(tone(2.0, freq=440, seed=1))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [audio_part(first)]},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "the quick brown fox"},
        {"role": "assistant", "content": [{"type": "text", "text": "jumps over the lazy dog"}]},
        {"role": "user", "content": [{"type": "text", "text": REPEAT_INSTRUCTION}, audio_part(second)]},
    ]
    text, prompt_tokens = expected(loaded, [("audio", first, "Answer briefly."), ("reply", "hello there"),
                                            ("text", "the quick brown fox"), ("reply", "jumps over the lazy dog"),
                                            ("audio", second, REPEAT_INSTRUCTION)])
    response = chat(client, messages)
    assert response.choices[0].message.content == text and response.usage.prompt_tokens == prompt_tokens
    # The history matters: the last turn alone gets another reply.
    assert chat(client, messages[-1:]).choices[0].message.content != text


def test_streaming_sends_openai_chunks_that_add_up_to_the_reply(client, url):
    whole = chat(client, TYPED, max_tokens=24)
    text, chunks = stream_text(client, TYPED, max_tokens=24, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2, "the reply comes in pieces"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    raw = httpx.post(f"{url}/chat/completions",
                     json={"model": MODEL, "messages": TYPED, "max_tokens": 4, "stream": True},
                     timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_stop_sequences_cut_the_reply(client):
    whole = chat(client, TYPED, max_tokens=24).choices[0].message.content
    middle = len(whole) // 2
    stop = whole[middle:middle + 2]
    assert stop.strip(), f"pick a stop with letters in it: {whole!r}"
    cut = chat(client, TYPED, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert stream_text(client, TYPED, max_tokens=24, stop=stop)[0] == whole[: whole.find(stop)]


def test_sampling_follows_temperature_and_seed(client):
    replies = [chat(client, TYPED, temperature=1.0, seed=seed).choices[0].message.content for seed in (7, 7, 8, 9)]
    assert replies[0] == replies[1], "the same seed samples the same reply"
    assert len(set(replies)) > 1, "sampling differs across seeds"
    greedy = chat(client, TYPED).choices[0].message.content
    assert chat(client, TYPED, temperature=0).choices[0].message.content == greedy


def test_eight_concurrent_clients_do_not_cross_talk(url, loaded):
    conversations = []
    for i in range(8):
        if i % 2:
            clip = wav_bytes(tone(1.0 + 0.2 * i, freq=150 + 60 * i, seed=i))
            conversations.append(([{"role": "user", "content": [audio_part(clip)]}], [("audio", clip)]))
        else:
            words = f"the quick brown fox {i}"
            conversations.append(([{"role": "user", "content": words}], [("text", words)]))
    wanted = [expected(loaded, turns, max_tokens=16)[0] for _, turns in conversations]
    assert len(set(wanted)) > 4, "the conversations get different replies"
    got, errors = [None] * 8, []

    def talk(i):
        try:
            client, messages = make_client(url), conversations[i][0]
            if i % 4 < 2:
                got[i] = stream_text(client, messages, max_tokens=16)[0]
            else:
                got[i] = chat(client, messages, max_tokens=16).choices[0].message.content
        except Exception as err:  # reported below, with the thread's index
            errors.append((i, err))

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert got == wanted


def test_transcription_repeats_the_clip(client, loaded, tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5, freq=260), SAMPLE_RATE)
    session = ChatSession.from_loaded(loaded, max_context_tokens=CONTEXT)
    session.submit_audio(load_audio(path), instruction=REPEAT_INSTRUCTION)
    text = list(session.stream_reply(GenerationOptions(max_new_tokens=LIMITS.max_tokens)))[-1].text
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model=MODEL, file=f).text == text
    with path.open("rb") as f:
        assert client.audio.transcriptions.create(model=MODEL, file=f, response_format="text").strip() == text
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model=MODEL, file=("x.wav", b"not audio at all"))
    assert err.value.code == "invalid_audio"


def test_a_clip_heard_as_no_words_is_refused_by_chat_and_transcribed_as_nothing():
    loaded = LoadedBlsp(hears_only_long_clips(lively_blsp(seed=3), min_seconds=1.0), tiny_tokenizer(), "tiny",
                        adapter_trained=True)
    short, long = wav_bytes(tone(0.6, freq=300)), wav_bytes(tone(1.5, freq=300))
    with running(create_app(InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT), limits=LIMITS)) as base:
        client = make_client(base)
        with pytest.raises(openai.BadRequestError, match="No words were heard") as err:
            chat(client, [{"role": "user", "content": [audio_part(short)]}])
        assert err.value.code == "no_speech_heard"
        assert client.audio.transcriptions.create(model=MODEL, file=("short.wav", short)).text == ""
        assert chat(client, [{"role": "user", "content": [audio_part(long)]}]).choices[0].message.content


# --- bad input -------------------------------------------------------------------------------------------
def user_audio(data: bytes) -> dict:
    return {"messages": [{"role": "user", "content": [audio_part(data)]}]}


BAD_REQUESTS = {
    "bad base64": ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "not base64 at all!", "format": "wav"}}]}]},
        400, "invalid_base64", "messages[0].content[0].input_audio.data"),
    "undecodable audio": (user_audio(b"this is not audio, only text"), 400, "invalid_audio",
                          "messages[0].content[0].input_audio.data"),
    "silent audio": (user_audio(wav_bytes(np.zeros(SAMPLE_RATE, np.float32))), 400, "invalid_audio",
                     "messages[0].content[0].input_audio.data"),
    "too long audio": (user_audio(wav_bytes(tone(LIMITS.max_audio_seconds + 1))), 400, "audio_too_long",
                       "messages[0].content[0].input_audio.data"),
    "unknown model": ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
    "context overflow": ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "context_length_exceeded",
                         "messages"),
    "max_tokens over the limit": ({"max_tokens": LIMITS.max_tokens + 1}, 400, "invalid_value", "max_tokens"),
    "max_tokens zero": ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "temperature out of range": ({"temperature": 5.0}, 400, "invalid_value", "temperature"),
    "top_p zero": ({"top_p": 0.0}, 400, "invalid_value", "top_p"),
    "several choices": ({"n": 2}, 400, "invalid_value", "n"),
    "too many stops": ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    "no messages": ({"messages": []}, 400, "invalid_value", "messages"),
    "ends with a reply": ({"messages": TYPED + [{"role": "assistant", "content": "Paris."}]}, 400, "invalid_value",
                          "messages"),
    "an image": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 400, "invalid_value", "messages[0].content[0].type"),
    "two clips in one turn": ({"messages": [{"role": "user", "content": [audio_part(wav_bytes(tone(1))),
                                                                         audio_part(wav_bytes(tone(1)))]}]},
                              400, "invalid_value", "messages[0].content"),
    "a tool message": ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, 400, "invalid_value",
                       "messages[0].role"),
    "wrong type": ({"max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    "body too large": ({"messages": [{"role": "user", "content": "x" * (LIMITS.max_body_bytes + 1)}]}, 413,
                       "request_too_large", None),
    "seed over 64 bits": ({"seed": 1 << 64}, 400, "invalid_value", "seed"),
    "seed under 64 bits": ({"seed": -(1 << 63) - 1}, 400, "invalid_value", "seed"),
    "a text part that is not a string": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": {"not": "a string"}}]}]}, 400, "invalid_value", "messages[0].content[0].text"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_its_4xx_and_the_server_goes_on(client, name):
    changes, status, code, param = BAD_REQUESTS[name]
    request = {"model": MODEL, "messages": TYPED, "max_tokens": MAX_TOKENS, **changes}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert (error.status_code, error.code) == (status, code), error.body
    assert error.param == param and error.type == "invalid_request_error" and error.message
    assert chat(client, TYPED).choices[0].message.content, "the next request is answered"


LONE_SURROGATES = {
    "messages[0].content": [{"role": "user", "content": "hi \ud800"}],
    "messages[0].content[0].text": [{"role": "system", "content": [{"type": "text", "text": "\udfff"}]}, *TYPED],
    "messages[1].content": [*TYPED, {"role": "assistant", "content": "\ud800"}, *TYPED],
    "stop": TYPED,
}


@pytest.mark.parametrize("param", list(LONE_SURROGATES))
def test_a_lone_surrogate_is_the_clients_mistake(url, client, param):
    """JSON may escape a lone surrogate (the openai client cannot even send one); no tokenizer encodes it."""
    request = {"model": MODEL, "messages": LONE_SURROGATES[param], "max_tokens": MAX_TOKENS}
    if param == "stop":
        request["stop"] = ["\ud800"]
    body = json.dumps(request).encode()  # ensure_ascii: the surrogate travels as "\\ud800"
    response = httpx.post(f"{url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_text" and response.json()["error"]["param"] == param
    assert chat(client, TYPED).choices[0].message.content, "the next request is answered"


def test_messages_name_what_is_wrong_with_audio(client):
    with pytest.raises(openai.BadRequestError, match="silent"):
        client.chat.completions.create(**{"model": MODEL, **user_audio(wav_bytes(np.zeros(SAMPLE_RATE, np.float32)))})
    with pytest.raises(openai.BadRequestError, match=r"5\.0 s long, over this server's limit of 4 s"):
        client.chat.completions.create(**{"model": MODEL, **user_audio(wav_bytes(tone(5.0)))})


def test_malformed_json_and_unknown_routes_get_openai_errors(url):
    bad = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(f"{url}/no/such/route")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_a_failed_generation_is_a_500_and_the_server_goes_on(client, prefill_fails_once):
    with pytest.raises(openai.InternalServerError, match="out of memory"):
        chat(client, TYPED)
    assert chat(client, TYPED).choices[0].message.content


# --- the API key -----------------------------------------------------------------------------------------
def test_api_key_is_enforced(loaded):
    app = create_app(InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT), limits=LIMITS, api_key="s3cret")
    with running(app) as base:
        with pytest.raises(openai.AuthenticationError) as err:
            chat(make_client(base, "wrong"), TYPED)
        assert err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            make_client(base, "wrong").models.list()
        anonymous = httpx.get(f"{base}/models")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        assert chat(make_client(base, "s3cret"), TYPED).choices[0].message.content


def test_api_key_covers_every_route_and_comes_before_the_body(loaded):
    """The docs and the schema need the key too, and a client without it learns nothing from its body: 401, not
    the 400 of invalid JSON or the 413 of a body over the limit. Only /health is open."""
    app = create_app(InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT), limits=LIMITS, api_key="s3cret")
    with running(app) as base:
        root = base.removesuffix("/v1")
        for route in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/v1/models", "/no/such/route"):
            response = httpx.get(root + route)
            assert response.status_code == 401, route
            assert response.json()["error"]["code"] == "invalid_api_key"
        json_headers = {"content-type": "application/json"}
        bad_json = httpx.post(f"{base}/chat/completions", content=b"{not json", headers=json_headers)
        huge = httpx.post(f"{base}/chat/completions", content=b"x" * (2 * LIMITS.max_body_bytes), headers=json_headers)
        assert (bad_json.status_code, huge.status_code) == (401, 401)
        assert httpx.get(f"{root}/health").json() == {"status": "ok"}
        keyed = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{root}/openapi.json", headers=keyed).status_code == 200
        assert httpx.post(f"{base}/chat/completions", content=b"{not json", headers={**json_headers, **keyed}
                          ).status_code == 400


# --- the real default model: generate, the app and the server agree ------------------------------------------
@contextmanager
def serve_command(*args):
    """`python -m blsp_chat serve` in a subprocess on a free port; yields the API's base URL."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "blsp_chat", "serve", "--port", str(port), *args], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + REAL_SERVER_START_SECONDS
        while True:
            assert process.poll() is None, f"the server exited: {process.stderr.read()}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{base}/models", headers={"Authorization": "Bearer k"}).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.integration
def test_generate_the_app_and_the_server_answer_a_spoken_turn_identically(default_blsp, monkeypatch, capsys):
    from blsp_chat.ui import ChatHandlers  # here, not at the top: only this test of the file needs gradio

    max_tokens = 32
    monkeypatch.setattr(weights, "load_pretrained", lambda *args, **kwargs: default_blsp)
    assert cli.main(["generate", "--audio", str(EXAMPLE), "--max-new-tokens", str(max_tokens)]) == 0
    by_generate = capsys.readouterr().out.strip()

    handlers = ChatHandlers(default_blsp, max_audio_seconds=120)
    *_, last = handlers.send("", str(EXAMPLE), "Chat", "German", max_tokens, False, 0.7, 0.9, 1.0, None)
    by_app = last[0][-1]["content"]

    with serve_command("--device", "cpu", "--api-key", "k") as base:
        response = make_client(base, "k").chat.completions.create(
            model="blsp-chat", max_tokens=max_tokens,
            messages=[{"role": "user", "content": [audio_part(EXAMPLE.read_bytes())]}])
    by_server = response.choices[0].message.content
    assert by_generate == by_app == by_server
    assert "Paris" in by_server, by_server
