"""Decode steps of concurrent sessions batched into one forward pass (blsp_chat/batcher.py): the same
replies as each session alone, steps that progress together, copies kept cheap, and one session's stop,
undo or error leaving the others' replies as they are."""
import threading
import time

import pytest

from blsp_chat import batcher as batcher_module
from blsp_chat.config import GenerationOptions
from blsp_chat.prompt import render
from blsp_chat.session import ChatSession
from tiny import lively_blsp, tiny_blsp, tiny_tokenizer, tone

REPEAT = "Please repeat the following words."
# Histories of different lengths (typed and spoken), each ending in a human turn; one reply is wanted.
SCRIPTS = {
    "short": [("text", "hello there")],
    "spoken": [("audio", tone(0.9, 330)), ("text", "the lazy dog")],
    "long": [("text", "the quick brown fox jumps over the lazy dog"), ("audio", tone(1.4, 440, seed=1)),
             ("text", "what is the capital of france?")],
    "penalised": [("text", "paris."), ("text", "hello")],
}
OPTIONS = {name: GenerationOptions(max_new_tokens=14) for name in SCRIPTS}
OPTIONS["penalised"] = GenerationOptions(max_new_tokens=14, repetition_penalty=1.3)  # options of its own


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def record_rows(model, before=None):
    """Wrap the LLM's forward: returns one (rows, input length, has padding) per call."""
    calls, original = [], model.llama_model.forward

    def forward(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        embeds = kwargs["inputs_embeds"]
        calls.append((embeds.shape[0], embeds.shape[1], mask is not None and bool((mask == 0).any())))
        if before is not None:
            before(len(calls), kwargs)
        return original(*args, **kwargs)

    model.llama_model.forward = forward
    return calls


def prepared(model, tok, script):
    """A session that has gone through `script`'s turns (replying to all but the last) and is ready to reply."""
    session = ChatSession(model, tok)
    for index, (kind, value) in enumerate(script):
        session.submit_audio(value, instruction=REPEAT) if kind == "audio" else session.submit_text(value)
        if index + 1 < len(script):
            list(session.stream_reply(GenerationOptions(max_new_tokens=6)))
    return session


def solo_replies(tok, seed, names):
    model = lively_blsp(seed=seed)
    replies = {}
    for name in names:
        session = prepared(model, tok, SCRIPTS[name])
        list(session.stream_reply(OPTIONS[name]))
        replies[name] = session.turns[-1]
    return replies


def together(sessions, options):
    """Start every session's reply, then read them all: the replies run at the same time."""
    streams = {name: session.stream_reply(options[name]) for name, session in sessions.items()}
    return {name: list(stream) for name, stream in streams.items()}


def slow_steps(model, seconds=0.003):
    """Each forward takes a little longer, so that the replies overlap even on a busy CPU."""
    return record_rows(model, before=lambda call, kwargs: time.sleep(seconds))


def test_concurrent_replies_with_different_histories_equal_their_solo_replies(tok):
    alone = solo_replies(tok, seed=7, names=SCRIPTS)
    model = lively_blsp(seed=7)
    sessions = {name: prepared(model, tok, script) for name, script in SCRIPTS.items()}
    calls = slow_steps(model)
    chunks = together(sessions, OPTIONS)
    assert {name: s.turns[-1] for name, s in sessions.items()} == alone  # token for token
    assert all(c[-1].done for c in chunks.values())
    batched = [rows for rows, length, _ in calls if rows > 1]
    assert batched and all(length == 1 for rows, length, _ in calls if rows > 1)  # decode steps only
    assert any(padded for rows, _, padded in calls if rows > 1), "histories of different lengths are left-padded"
    assert len(calls) < 0.6 * sum(len(s.turns[-1].token_ids) for s in sessions.values()), "steps went together"


def test_two_replies_take_one_forward_per_step_and_the_batch_is_kept_between_steps(tok, monkeypatch):
    model = tiny_blsp()  # its untrained LLM repeats one token: no early end of text
    layouts = []
    laid_out = batcher_module._laid_out
    monkeypatch.setattr(batcher_module, "_laid_out", lambda steps: layouts.append(len(steps)) or laid_out(steps))
    sessions = {name: ChatSession(model, tok) for name in ("a", "b")}
    for session, text in zip(sessions.values(), ("hello there", "the lazy dog")):
        session.submit_text(text)
    calls = slow_steps(model)
    # The loop stop is off: it would end these one-token loops at 24 tokens, and the test needs long replies.
    together(sessions, {name: GenerationOptions(max_new_tokens=40, loop_stop_tokens=0) for name in sessions})
    assert [len(s.turns[-1].token_ids) for s in sessions.values()] == [40, 40]
    pairs = sum(1 for rows, _, _ in calls if rows == 2)
    assert pairs >= 30, calls  # 39 decode steps each: nearly all of them taken together
    assert len(layouts) <= 3, "the batch's caches are copied in once, not at every step"
    for session in sessions.values():  # a finished reply's cache no longer keeps the batch's tensors alive
        keys = session._cache.layers[0].keys
        assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()


def test_a_session_decoding_alone_steps_on_its_own_cache(tok):
    model = lively_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hello there")
    caches = []
    record_rows(model, before=lambda call, kwargs: caches.append(kwargs["past_key_values"]))
    list(session.stream_reply(GenerationOptions(max_new_tokens=8)))
    assert all(cache is session._cache for cache in caches)  # no batch laid out, nothing copied


def test_groups_keep_padding_under_half_of_a_batch():
    steps = [batcher_module._Step(None, 0, position) for position in (100, 90, 51, 50, 20, 12, 9)]
    groups = batcher_module._groups_by_length(steps)
    assert [[s.position for s in group] for group in groups] == [[100, 90, 51, 50], [20, 12], [9]]


def test_stopping_one_reply_leaves_the_others_as_they_are_alone(tok):
    names = ["short", "spoken", "long"]
    alone = solo_replies(tok, seed=8, names=names)
    model = lively_blsp(seed=8)
    sessions = {name: prepared(model, tok, SCRIPTS[name]) for name in names}
    options = dict(OPTIONS, short=GenerationOptions(max_new_tokens=200))

    def stop_short(call, kwargs):
        time.sleep(0.003)
        if call == 6:
            threading.Thread(target=sessions["short"].cancel).start()

    record_rows(model, before=stop_short)
    chunks = together(sessions, options)
    assert chunks["short"][-1].stopped_by == "cancelled"
    assert {name: sessions[name].turns[-1] for name in ("spoken", "long")} == {n: alone[n] for n in ("spoken", "long")}


def test_undo_and_a_new_turn_during_anothers_reply_give_the_solo_replies(tok):
    def script(session, results):
        session.submit_text("hello there")
        list(session.stream_reply(GenerationOptions(max_new_tokens=6)))
        session.undo()
        session.submit_text("paris.")
        results["edited"] = list(session.stream_reply(GenerationOptions(max_new_tokens=10)))[-1].text

    alone = {}
    model = lively_blsp(seed=9)
    script(ChatSession(model, tok), alone)
    long_alone = prepared(model, tok, SCRIPTS["long"])
    list(long_alone.stream_reply(GenerationOptions(max_new_tokens=60)))
    model = lively_blsp(seed=9)
    editing, long = ChatSession(model, tok), prepared(model, tok, SCRIPTS["long"])
    slow_steps(model)
    stream = long.stream_reply(GenerationOptions(max_new_tokens=60))
    next(stream)  # the long reply is under way
    results = {}
    script(editing, results)
    list(stream)
    assert results == alone and long.turns[-1] == long_alone.turns[-1]


def test_an_error_in_one_sessions_step_reaches_that_session_only(tok):
    """The forward fails whenever it holds the long session's fourth decode step (a position only that
    session reaches): the batch it was in is retried step by step, and only that session's reply fails."""
    names = ["short", "spoken", "long"]
    alone = solo_replies(tok, seed=10, names=names)
    model = lively_blsp(seed=10)
    sessions = {name: prepared(model, tok, SCRIPTS[name]) for name in names}
    failing = sessions["long"]
    failing_at = len(render(failing.turns, tok)) + 3
    others_reach = max(len(render(s.turns, tok)) + OPTIONS[n].max_new_tokens
                       for n, s in sessions.items() if n != "long")
    assert others_reach < failing_at

    def broken_row(call, kwargs):
        time.sleep(0.003)
        positions = kwargs["position_ids"]
        if positions.shape[1] == 1 and failing_at in positions.flatten().tolist():
            raise RuntimeError("device lost")

    calls = record_rows(model, before=broken_row)
    streams = {name: session.stream_reply(OPTIONS[name]) for name, session in sessions.items()}
    with pytest.raises(RuntimeError, match="device lost"):
        list(streams.pop("long"))
    for stream in streams.values():
        list(stream)
    assert {name: sessions[name].turns[-1] for name in streams} == {n: alone[n] for n in streams}
    assert not failing.busy and failing.turns[-1].role == "human" and failing.cached_tokens == 0
    assert any(rows > 1 for rows, _, _ in calls)


@pytest.mark.integration
def test_real_default_model_batched_replies_equal_solo_replies(default_blsp):
    """The offline default model: four sessions with histories of different lengths reply at once, each
    exactly as it does alone (greedy, token for token)."""
    histories = {
        "fresh": ["What is the capital of France?"],
        "one": ["Name a colour.", "Why is the sky blue?"],
        "two": ["Hello!", "Tell me a fact about cats.", "And one about dogs?"],
        "three": ["Hi.", "What is two plus two?", "Name a large animal.", "Write one sentence about the sea."],
    }
    options = GenerationOptions(max_new_tokens=24)

    def prepared_real(texts):
        session = ChatSession.from_loaded(default_blsp)
        for index, text in enumerate(texts):
            session.submit_text(text)
            if index + 1 < len(texts):
                list(session.stream_reply(GenerationOptions(max_new_tokens=16)))
        return session

    alone = {}
    for name, texts in histories.items():
        session = prepared_real(texts)
        list(session.stream_reply(options))
        alone[name] = session.turns[-1]
    sessions = {name: prepared_real(texts) for name, texts in histories.items()}
    calls = record_rows(default_blsp.model)
    try:
        together(sessions, {name: options for name in sessions})
    finally:
        del default_blsp.model.llama_model.forward  # the instance's wrapper: back to the class's forward
    assert {name: s.turns[-1] for name, s in sessions.items()} == alone
    assert any(rows > 1 for rows, _, _ in calls)
