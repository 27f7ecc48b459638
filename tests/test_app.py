"""The real app on 127.0.0.1, driven by gradio_client, on the offline default model."""
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.ui import build_demo, paths_shown

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _send(client, text="", audio=None, speak=False):
    from gradio_client import handle_file

    job = client.submit(text, handle_file(str(audio)) if audio else None, "Chat", "German", 24, False, 0.7, 0.9, 1.0,
                        speak, api_name="/send")
    updates = list(job)
    return updates, job.result()


def _contents(messages):
    return [m["content"] for m in messages]


def _last_text(messages) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content if isinstance(c, dict))


def test_spoken_typed_spoken_in_one_session_stream(app_url):
    client = _client(app_url)
    for turn in (dict(audio=EXAMPLES / "capital_of_france.wav"), dict(text="Tell me more."),
                 dict(audio=EXAMPLES / "walk_in_the_park.wav")):
        updates, final = _send(client, **turn)
        assert len(updates) > 2, "the reply should stream in several updates"
        assert _last_text(final[0]).strip()
    messages = final[0]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    kinds = ["file" if "file" in str(m["content"]) else "text" for m in messages[::2]]
    assert kinds == ["file", "text", "file"], "spoken turns show as audio, typed turns as text"


def test_two_clients_keep_separate_histories(app_url):
    a, b = _client(app_url), _client(app_url)
    results = {}

    def talk(name, client, text):
        results[name] = _send(client, text=text)[1][0]

    threads = [threading.Thread(target=talk, args=("a", a, "What is the capital of France?")),
               threading.Thread(target=talk, args=("b", b, "Name a colour of the sky."))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results["a"]) == len(results["b"]) == 2
    assert "capital of France" in str(results["a"][0]["content"]) and "sky" in str(results["b"][0]["content"])


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p.write_bytes(b"not audio at all"), "could not|unreadable|not .*audio"),
    (lambda p: sf.write(p, np.zeros(16000, dtype=np.float32), 16000), "silent"),
    (lambda p: sf.write(p, 0.1 * np.sin(np.arange(16000 * 61) / 10).astype(np.float32), 16000), "60"),
])
def test_bad_audio_shows_a_message_and_the_next_turn_works(app_url, tmp_path, make_bad, message):
    import re

    bad = tmp_path / "bad.wav"
    make_bad(bad)
    client = _client(app_url)
    _, final = _send(client, audio=bad)
    assert re.search(message, _last_text(final[0]), re.IGNORECASE), final[0]
    _, final = _send(client, text="What is the capital of France?")
    assert "Paris" in _last_text(final[0])
    assert [m["role"] for m in final[0]] == ["user", "assistant"]


def test_undo_and_clear(app_url):
    client = _client(app_url)
    _send(client, text="What is the capital of France?")
    _send(client, text="And of Italy?")
    messages, = [client.predict(api_name="/undo")]
    assert len(messages) == 2
    cleared = client.predict(api_name="/clear")
    assert cleared == []


def test_context_overflow_shows_a_message_and_the_session_goes_on(app_url):
    client = _client(app_url)
    _, final = _send(client, text="word " * 600)
    assert "context" in _last_text(final[0]).lower()
    _, final = _send(client, text="What is the capital of France?")
    assert [m["role"] for m in final[0]] == ["user", "assistant"] and "Paris" in _last_text(final[0])


def test_long_conversation_drops_old_turns_and_says_so(app_url):
    client = _client(app_url)
    for _ in range(10):
        _, final = _send(client, text="Please describe the history of Paris in some detail. " * 3)
    notices = [m for m in final[0] if "no longer seen" in str(m["content"])]
    assert notices, "dropping old turns must be said in the page"
    assert final[0][-1]["role"] == "assistant" and _last_text(final[0]).strip()


def test_generation_failure_shows_a_message_and_the_next_turn_works(app_url, prefill_fails_once):
    client = _client(app_url)
    _, final = _send(client, text="What is the capital of France?")
    assert "out of memory" in _last_text(final[0])
    _, final = _send(client, text="What is the capital of France?")
    assert [m["role"] for m in final[0]] == ["user", "assistant"] and "Paris" in _last_text(final[0])


# --- many people at once: a server of our own, whose sessions the tests can look into ---------------------
RACE_TRIALS = 12
RACE_MAX_NEW_TOKENS = 6  # short replies, so that Clear/Undo often lands as one finishes


@pytest.fixture(scope="module")
def own_app(default_blsp):
    """The app with a cache ceiling, on 127.0.0.1: (url, demo, the state component)."""
    import gradio as gr

    demo = build_demo(default_blsp, max_audio_seconds=60, concurrency=2, max_context_tokens=400,
                      max_cached_tokens=100_000)
    state = next(block for block in demo.blocks.values() if isinstance(block, gr.State))
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url, demo, state
    demo.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_chat(demo, state, client):
    """The UserChat the server holds for this client's browser session."""
    return demo.state_holder.session_data[client.session_hash].state_data[state._id]


def _wait_until(condition, seconds=60.0):
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_closed_page_frees_its_cache_and_an_open_one_keeps_it(own_app):
    url, demo, state = own_app
    closing, staying = _client(url), _client(url)
    for client in (closing, staying):
        _send(client, text="What is the capital of France?")
    closed_chat, open_chat = _server_chat(demo, state, closing), _server_chat(demo, state, staying)
    assert closed_chat.session.cached_tokens > 0 and open_chat.session.cached_tokens > 0
    closing.close()  # ends the page's heartbeat, as closing the tab does
    assert _wait_until(lambda: closed_chat.session.cached_tokens == 0), "the closed page's KV cache was not freed"
    assert open_chat.session.cached_tokens > 0
    _, final = _send(staying, text="And of Italy?")
    assert [m["role"] for m in final[0]] == ["user", "assistant"] * 2
    staying.close()


def _race(client, action, wait_updates: int):
    """Send a turn and run `action` (clear or undo) once `wait_updates` updates of the reply arrived.
    Returns (what the page shows last, the action's own result): a reply update that arrives after the
    action's answer is what a browser would show."""
    from gradio_client import handle_file  # noqa: F401  (the client module, loaded before timing starts)

    job = client.submit("Tell me about Paris.", None, "Chat", "German", RACE_MAX_NEW_TOKENS, False, 0.7, 0.9, 1.0,
                        api_name="/send")
    _wait_until(lambda: len(job.outputs()) >= wait_updates or job.done(), seconds=120)
    answer = client.predict(api_name=f"/{action}")
    seen, finished_before = len(job.outputs()), job.done()
    final = job.result()
    late = job.outputs()[seen:] + ([] if finished_before else [final[0] if isinstance(final, tuple) else final])
    late = [update[0] if isinstance(update, (tuple, list)) and update and isinstance(update[0], list) else update
            for update in late]
    return (late[-1] if late else answer), answer


def _plain(messages) -> list[tuple[str, str]]:
    """(role, text) of each message, as the server keeps it or as the client receives it."""
    return [(m["role"], m["content"] if isinstance(m["content"], str) else _last_text([m])) for m in messages]


@pytest.mark.parametrize("action", ["clear", "undo"])
def test_clear_and_undo_win_over_a_finishing_reply_on_the_page_and_the_server(own_app, action):
    url, demo, state = own_app
    client = _client(url)
    _send(client, text="What is the capital of France?")
    for trial in range(RACE_TRIALS):
        if action == "clear":
            client.predict(api_name="/clear")
            _send(client, text="What is the capital of France?")
        before = _plain(_server_chat(demo, state, client).messages)
        page, answer = _race(client, action, wait_updates=1 + trial % 4)
        chat = _server_chat(demo, state, client)
        expected = [] if action == "clear" else before
        assert _plain(answer) == expected, f"trial {trial}: the {action} answer"
        assert _plain(page) == expected, f"trial {trial}: a finishing reply overwrote the page after {action}"
        assert _plain(chat.messages) == expected
        assert len(chat.session.turns) == len(expected), f"trial {trial}: the server's history"
    client.close()


def _audio_messages(messages) -> list[dict]:
    """The messages that hold a wav file (gradio_client hands a Chatbot's file back as a downloaded copy)."""
    return [m for m in messages
            if any(isinstance(c, dict) and c.get("type") == "file" and str(c["file"]).endswith(".wav")
                   for c in m["content"])]


def test_a_spoken_reply_is_an_audio_message_that_undo_removes_and_a_dropped_session_deletes(own_app):
    """With "Speak replies", each reply's audio joins the conversation right under its text; Undo takes
    it away with its exchange (page and server agree); the session's state dropped, its wavs go."""
    url, demo, state = own_app
    client = _client(url)
    _, final = _send(client, text="What is the capital of France?", speak=True)
    if "text only" in str(final[0]):
        pytest.skip("no voice here (piper or espeak-ng)")
    assert [m["role"] for m in final[0]] == ["user", "assistant", "assistant"]
    assert "Paris" in _last_text(final[0][:2]) and _audio_messages(final[0]) == [final[0][2]]
    _, final = _send(client, text="And of Italy?", speak=True)
    assert [m["role"] for m in final[0]] == ["user", "assistant", "assistant"] * 2
    chat = _server_chat(demo, state, client)
    first, second = (sorted(map(str, paths_shown(chat.messages[start:start + 3]))) for start in (0, 3))
    assert len(first) == len(second) == 1 and all(Path(path).exists() for path in first + second)
    assert len(chat.session.turns) == 4, "the server's history stays text: a user and an assistant turn each"

    messages = client.predict(api_name="/undo")
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"] and len(_audio_messages(messages)) == 1
    assert _plain(messages) == _plain(chat.messages) and len(chat.session.turns) == 2
    assert Path(first[0]).exists() and not Path(second[0]).exists(), "the undone reply's audio is deleted"

    demo.state_holder.delete_state(client.session_hash)  # as Gradio drops a closed session's state
    assert not Path(first[0]).exists()
    client.close()

