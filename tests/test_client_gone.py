"""A reply whose client has gone stops within one decode step (issue 31, case 2): through a real server on
127.0.0.1 and a tiny in-memory model whose decode steps wait for the test's permission, so the steps taken after
the client left are counted, never timed."""
import json
import socket
import threading

import pytest
from test_serve import LIMITS, MODEL, TYPED, running

from blsp_chat.serve import InProcessEngine, create_app
from blsp_chat.session import ChatSession
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer

LONG_REPLY = LIMITS.max_tokens  # 64 steps if nobody stops it
WAIT_SECONDS = 30               # for an event the server should cause; a bound on a hang, not a measurement


class Gate:
    """Decode steps run only when permitted; counts them and notes how many had run when the reply was cancelled."""

    def __init__(self):
        self.permits = threading.Semaphore(0)
        self.open = threading.Event()
        self.steps = 0
        self.first_step = threading.Event()
        self.cancelled = threading.Event()
        self.steps_at_cancel: int | None = None
        self.session: ChatSession | None = None

    def allow(self, steps: int) -> None:
        for _ in range(steps):
            self.permits.release()

    def open_fully(self) -> None:
        self.open.set()
        self.allow(LONG_REPLY)

    def finish(self) -> None:
        """Let the reply run to its end (or its cancellation) and wait for its thread."""
        self.open_fully()
        job = self.session._job if self.session is not None else None
        if job is not None and job.thread is not None:
            job.thread.join(WAIT_SECONDS)


@pytest.fixture
def gate(monkeypatch):
    gate = Gate()
    real_step, real_cancel = ChatSession._decode_step, ChatSession.cancel

    def step(self, decode_step, token):
        gate.session = self
        gate.first_step.set()
        if not gate.open.is_set():
            gate.permits.acquire(timeout=WAIT_SECONDS)
        gate.steps += 1
        return real_step(self, decode_step, token)

    def cancel(self, *args, **kwargs):
        if self._job is not None and gate.steps_at_cancel is None:
            gate.steps_at_cancel = gate.steps
            gate.cancelled.set()
        return real_cancel(self, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "_decode_step", step)
    monkeypatch.setattr(ChatSession, "cancel", cancel)
    yield gate
    gate.open_fully()


@pytest.fixture(scope="module")
def base():
    loaded = LoadedBlsp(lively_blsp(seed=3), tiny_tokenizer(), "tiny", adapter_trained=True)
    with running(create_app(InProcessEngine(loaded, MODEL, max_context_tokens=512), limits=LIMITS)) as url:
        yield url


def send_request(url: str, stream: bool) -> socket.socket:
    """A chat request on a raw connection, which the test closes as a client that gives up does."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps({"model": MODEL, "messages": TYPED, "max_tokens": LONG_REPLY, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_an_undisturbed_reply_runs_all_its_steps(base, gate):
    """The baseline: without a disconnect, the reply takes every step it may (so a cancelled one is shorter)."""
    sock = send_request(base, stream=False)
    gate.open_fully()
    sock.settimeout(WAIT_SECONDS)
    answer = b""
    while b'"usage"' not in answer:
        answer += sock.recv(65536)
    sock.close()
    assert gate.steps == LONG_REPLY - 1  # the first token comes from the prefill


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
def test_a_reply_stops_within_a_step_of_its_client_leaving(base, gate, stream):
    sock = send_request(base, stream)
    assert gate.first_step.wait(WAIT_SECONDS), "the reply started"
    gate.allow(3)
    if stream:
        sock.settimeout(WAIT_SECONDS)
        assert b"data:" in sock.recv(65536), "the stream began"
    sock.close()
    assert gate.cancelled.wait(WAIT_SECONDS), "the server cancelled the reply when its client left"
    gate.finish()
    assert gate.steps - gate.steps_at_cancel <= 1, f"{gate.steps - gate.steps_at_cancel} steps after the client left"
    assert gate.steps <= 5
