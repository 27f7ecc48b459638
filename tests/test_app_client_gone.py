"""In the app, a reply whose client leaves stops within one decode step and frees its slot (issue 31, case 2), as
in the server (tests/test_client_gone.py): the real app on 127.0.0.1 over a tiny in-memory model whose decode steps
wait for the test's permission, driven over HTTP as the page drives it (`queue/join`, then the session's
`queue/data` event stream) and as an API client does (`/call/send`, then the event's stream). The decode steps
taken after the client closed its stream are counted, never timed."""
import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from blsp_chat import session as session_module
from blsp_chat.session import ChatSession, ReplyChunk
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer

MAX_NEW_TOKENS = 64
PROMPT = "Hello there"    # the tiny model's reply to it takes all MAX_NEW_TOKENS (the first test shows it)
STEPS_BEFORE_LEAVING = 4  # decode steps the reply takes while its client still listens
WAIT_SECONDS = 30         # for an event the server should cause; a bound on a hang, not a measurement


class Gate:
    """Decode steps run only when permitted. Counts the steps and the chunks the reply made, and notes when
    the reply's thread waits for its next permit."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.open = threading.Event()
        self.waiting = threading.Event()
        self.steps = 0
        self.chunks_made = 0
        self.job = None

    def allow(self, steps: int) -> None:
        for _ in range(steps):
            self.permits.release()

    def finish(self) -> None:
        """Let the reply run to its end (or its cancellation) and wait for its thread."""
        self.open.set()
        self.allow(MAX_NEW_TOKENS)
        if self.job is not None:
            self.job.thread.join(WAIT_SECONDS)


@pytest.fixture
def gate(monkeypatch):
    gate = Gate()
    real_step = ChatSession._decode_step

    def step(self, decode_step, token):
        gate.job = self._job
        if not gate.open.is_set():
            gate.waiting.set()
            gate.permits.acquire(timeout=WAIT_SECONDS)
            gate.waiting.clear()
        gate.steps += 1
        return real_step(self, decode_step, token)

    class CountedChunk(ReplyChunk):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gate.chunks_made += 1

    monkeypatch.setattr(ChatSession, "_decode_step", step)
    monkeypatch.setattr(session_module, "ReplyChunk", CountedChunk)
    yield gate
    gate.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    """The app on 127.0.0.1 with room for ONE reply at a time: (url, the Blocks serving it)."""
    from blsp_chat.ui import build_demo

    loaded = LoadedBlsp(lively_blsp(seed=3), tiny_tokenizer(), "tiny", adapter_trained=True)
    demo = build_demo(loaded, max_audio_seconds=10, concurrency=1, max_context_tokens=512)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url.rstrip("/"), demo
    demo.close()


SETTINGS = ["Chat", "German", MAX_NEW_TOKENS, False, 0.7, 0.9, 1.0]  # task, target, greedy generation settings


def page_turn(http: httpx.Client, url: str, demo):
    """A typed turn sent as the page sends it; yields the kinds of its messages ("generating", "complete", ...)
    from the session's event stream, which closes when this generator is closed."""
    send = next(index for index, fn in demo.fns.items() if fn.api_name == "send")
    session = uuid.uuid4().hex
    body = {"data": [PROMPT, None, *SETTINGS, None, False], "fn_index": send, "session_hash": session,
            "event_data": None, "trigger_id": None}
    http.post(f"{url}/gradio_api/queue/join", json=body).raise_for_status()
    kinds = {"process_generating": "generating", "process_completed": "complete"}
    with http.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                kind = json.loads(line.removeprefix("data:"))["msg"]
                yield kinds.get(kind, kind)


def api_turn(http: httpx.Client, url: str, demo=None):
    """The same turn through Gradio's call API; yields the event's message kinds from its stream."""
    event = http.post(f"{url}/gradio_api/call/send", json={"data": [PROMPT, None, *SETTINGS, False]}).json()
    with http.stream("GET", f"{url}/gradio_api/call/send/{event['event_id']}") as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                yield line.removeprefix("event:").strip()


TURNS = {"page": page_turn, "api": api_turn}


def wait_until(condition) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_undisturbed_reply_runs_all_its_steps(app, gate):
    """The baseline: nobody leaves, and the reply takes every step it may (so a cancelled one is shorter)."""
    url, demo = app
    gate.finish()
    with httpx.Client(timeout=WAIT_SECONDS) as http:
        kinds = list(api_turn(http, url))
    assert kinds[-1] == "complete" and "generating" in kinds
    assert gate.steps == MAX_NEW_TOKENS - 1  # the first token comes from the prefill


@pytest.mark.parametrize("route", TURNS)
def test_a_reply_stops_within_a_step_of_its_client_leaving_and_frees_its_slot(app, gate, route):
    url, demo = app
    with httpx.Client(timeout=WAIT_SECONDS) as http:
        messages = TURNS[route](http, url, demo)
        received = next(messages) == "generating"  # the turn joined the queue and its stream opened
        gate.allow(STEPS_BEFORE_LEAVING)
        assert wait_until(lambda: gate.steps == STEPS_BEFORE_LEAVING and gate.waiting.is_set()), "the reply ran"
        # Every chunk made so far reached the client: the handler now waits for the reply's next chunk, which
        # is when Gradio alone would not see that its client left.
        while received < gate.chunks_made:
            received += next(messages) == "generating"
        messages.close()  # the client leaves: its stream closes
    gate.job.cancel.wait(WAIT_SECONDS)
    gate.finish()
    after = gate.steps - STEPS_BEFORE_LEAVING
    assert after <= 1, f"{after} decode steps ran after the client left"

    # The app's one slot is free again: another user's turn is answered in full.
    with httpx.Client(timeout=WAIT_SECONDS) as http:
        kinds = list(api_turn(http, url))
    assert kinds[-1] == "complete" and "generating" in kinds
    assert gate.steps == STEPS_BEFORE_LEAVING + after + MAX_NEW_TOKENS - 1
