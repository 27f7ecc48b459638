"""ChatSession on tiny in-memory models: KV reuse equals recompute, streaming, editing, limits, threads."""
import threading
import time

import pytest
import torch

from blsp_chat import session as session_module
from blsp_chat.audio import AudioError
from blsp_chat.config import GenerationOptions
from blsp_chat.generate import (
    NothingHeardError,
    encoded_batch,
    generate_replies,
    generate_reply,
    speech_turn,
)
from blsp_chat.lock import FairLock, model_lock
from blsp_chat.prompt import Turn, cut_at_stop, eos_token_ids, render
from blsp_chat.readout import embedding_distance_logits
from blsp_chat.session import (
    HISTORY_KEPT_ON_OVERFLOW,
    REPLACEMENT_CHAR,
    CacheBudget,
    ChatSession,
    ContextOverflowError,
    TextStream,
    whole_sentences,
)
from blsp_chat.weights import LoadedBlsp
from tiny import (
    blank_hearing_blsp,
    hears_only_long_clips,
    lively_blsp,
    lively_lm_blsp,
    tiny_blsp,
    tiny_tokenizer,
    tone,
)

REPEAT = "Please repeat the following words."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def record_forward(model, before=None):
    """Wrap the LLM's forward: returns the list of input lengths of every call."""
    llm, original, lengths = model.llama_model, model.llama_model.forward, []

    def forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        lengths.append(embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1])
        if before is not None:
            before(len(lengths))
        return original(*args, **kwargs)

    llm.forward = forward
    return lengths


def reply(session, options=GenerationOptions(max_new_tokens=12)):
    chunks = list(session.stream_reply(options))
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    assert "".join(c.delta for c in chunks) == chunks[-1].text
    assert session.turns[-1].text == chunks[-1].text
    return chunks


def scratch(model, tokenizer, turns, audios, max_new_tokens=12, repetition_penalty=1.0):
    """The reply `model.generate` gives to the whole history at once: (text, ids up to EOS). The text
    drops a half character at the very end, as the session's does."""
    prompt = render(turns, tokenizer)
    ids = torch.tensor([prompt.input_ids])
    options = GenerationOptions(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    eos = eos_token_ids(tokenizer, model.llama_model)
    new = model.generate(ids, torch.ones_like(ids), torch.tensor([prompt.speech_mask]), audios=audios, options=options,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)[0].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return cut_at_stop(text.rstrip(REPLACEMENT_CHAR)), new


def assert_same_as_scratch(session, chunks, audios, **kwargs):
    """The session's last reply equals a from-scratch `model.generate` on the history before it (as the
    model reads it)."""
    text, ids = scratch(session.model, session.tokenizer, session.context_turns[:-1], audios, **kwargs)
    last = session.turns[-1]
    assert last.text == text
    if chunks[-1].stopped_by != "stop_string":
        assert list(last.token_ids) == ids
    else:
        assert list(last.token_ids[:1]) == ids[:1]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("spoken", [False, True])
def test_greedy_first_turn_equals_model_generate(tok, spoken, penalty):
    model = lively_blsp()
    session = ChatSession(model, tok)
    audio = tone(1.3)
    if spoken:
        session.submit_audio(audio, instruction=REPEAT)
    else:
        session.submit_text("what is the capital of france?")
    options = GenerationOptions(max_new_tokens=16, repetition_penalty=penalty)
    chunks = reply(session, options)
    assert_same_as_scratch(session, chunks, [audio] if spoken else [], max_new_tokens=16, repetition_penalty=penalty)
    assert len(chunks[-1].text) > 0


def test_mixed_conversation_with_cache_equals_recompute_from_scratch(tok):
    model = lively_blsp(seed=3)
    session = ChatSession(model, tok)
    lengths = record_forward(model)
    audios, previous_prompt_len = [], 0
    steps = [("text", "hello there"), ("audio", tone(0.9, 330)), ("text", "the quick brown fox"),
             ("audio", tone(1.7, 440, seed=1)), ("text", "paris.")]
    for kind, value in steps:
        if kind == "audio":
            session.submit_audio(value, instruction=REPEAT)
            audios.append(value)
        else:
            session.submit_text(value)
        cached = session.cached_tokens
        prompt_len = len(render(session.turns, tok))
        del lengths[:]
        chunks = reply(session)
        # Only the positions the cache lacked are prefilled, and it lacked none of the last prompt.
        assert lengths[0] == prompt_len - cached
        assert cached >= previous_prompt_len
        previous_prompt_len = prompt_len
        assert_same_as_scratch(session, chunks, list(audios))
    assert len(session.turns) == 2 * len(steps)
    # A session that recomputes everything each turn gives the same conversation.
    again = ChatSession(model, tok, reuse_cache=False)
    for kind, value in steps:
        again.submit_audio(value, instruction=REPEAT) if kind == "audio" else again.submit_text(value)
        reply(again)
    assert again.turns == session.turns


def test_a_prefill_in_pieces_equals_one_in_a_piece(tok, monkeypatch):
    """Spoken and typed turns prefilled a few positions at a time (pieces cut through speech) give the
    replies of one long prefill."""
    steps = [("text", "hello there"), ("audio", tone(0.9, 330)), ("text", "the quick brown fox"),
             ("audio", tone(1.7, 440, seed=1)), ("text", "paris.")]
    conversations = {}
    for piece in (10_000, 7):
        monkeypatch.setattr(session_module, "PREFILL_CHUNK_TOKENS", piece)
        model = lively_blsp(seed=3)
        session = ChatSession(model, tok, reuse_cache=False)  # every reply prefills the whole history
        lengths = record_forward(model)
        for kind, value in steps:
            session.submit_audio(value, instruction=REPEAT) if kind == "audio" else session.submit_text(value)
            prompt_len = len(render(session.turns, tok))
            del lengths[:]
            reply(session)
            pieces = -(-prompt_len // piece)  # ceiling
            assert lengths[:pieces] == [min(piece, prompt_len - i * piece) for i in range(pieces)]
        conversations[piece] = session.turns
    assert conversations[7] == conversations[10_000]


def test_a_long_prefill_does_not_hold_up_another_sessions_reply(tok, monkeypatch):
    """An overflowing turn prefills its whole kept history: in pieces, between which the other session's
    decode steps run, so the other reply advances about one step per piece instead of waiting for all."""
    monkeypatch.setattr(session_module, "PREFILL_CHUNK_TOKENS", 8)
    model = tiny_blsp()
    calls = []
    original = model.llama_model.forward

    def forward(*args, **kwargs):
        calls.append((id(kwargs["past_key_values"]), kwargs["inputs_embeds"].shape[1]))
        time.sleep(0.002)
        return original(*args, **kwargs)

    model.llama_model.forward = forward
    long, short = ChatSession(model, tok), ChatSession(model, tok)
    long.submit_text("the quick brown fox jumps over the lazy dog " * 12)
    short.submit_text("hello there")
    short_stream = short.stream_reply(GenerationOptions(max_new_tokens=60, loop_stop_tokens=0))  # tiny LLMs loop
    next(short_stream)  # the short reply is under way
    long_stream = long.stream_reply(GenerationOptions(max_new_tokens=2))
    list(long_stream)
    list(short_stream)
    long_cache = id(long._cache)
    pieces = [i for i, (cache, length) in enumerate(calls) if cache == long_cache and length > 1]
    assert len(pieces) >= 8, "the long prompt is prefilled in pieces"
    short_steps_between = [sum(1 for cache, _ in calls[a + 1:b] if cache != long_cache)
                           for a, b in zip(pieces, pieces[1:])]
    assert all(steps >= 1 for steps in short_steps_between), short_steps_between


def test_another_sessions_typed_reply_runs_between_the_forwards_of_a_spoken_turns_readout(tok):
    """The LM-fused readout runs the LLM once per word piece or two heard: each forward takes the model
    lock alone, so a typed reply that asks for the lock during a readout runs before the readout's next
    forward instead of after the whole clip."""
    model = lively_lm_blsp()
    lock, order, replies, threads = model_lock(model), [], [], []
    typed, spoken = ChatSession(model, tok), ChatSession(model, tok)
    typed.submit_text("hello there")
    original = model.llama_model.forward

    def typed_reply():
        replies.append(list(typed.stream_reply(GenerationOptions(max_new_tokens=3))))

    def forward(*args, **kwargs):
        readout = "input_ids" in kwargs  # the readout's scorer reads word pieces; a session reads embeddings
        if readout and not order:  # the readout's first forward: the typed reply starts and queues for the lock
            threads.append(threading.Thread(target=typed_reply))
            threads[0].start()
            while not lock._waiters:
                time.sleep(0.001)
        order.append("readout" if readout else "typed")
        return original(*args, **kwargs)

    model.llama_model.forward = forward
    spoken.submit_audio(tone(3.0, 180.0))
    threads[0].join(60)
    assert replies, "the typed reply did not finish"
    assert order.count("readout") >= 2 and order.count("typed") >= 1
    first_typed = order.index("typed")
    assert order[:first_typed] == ["readout"]  # it went next, before the readout's second forward
    assert "readout" in order[first_typed:]


def test_fair_lock_hands_over_in_arrival_order():
    lock, order, started = FairLock(), [], []
    lock.acquire()

    def waiter(name):
        started.append(name)
        with lock:
            order.append(name)

    threads = []
    for name in "abc":
        threads.append(threading.Thread(target=waiter, args=(name,)))
        threads[-1].start()
        while len(lock._waiters) < len(threads):  # each queues before the next starts
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == ["a", "b", "c"] and not lock.locked()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_fair_lock_hands_urgent_work_over_first_but_lets_the_others_through_every_few_turns():
    """A readout's forward waits behind other readouts, not behind a whole round of decode steps; the
    decode steps still get one hand-over in every urgent_streak + 1 while urgent work waits."""
    lock, order = FairLock(urgent_streak=2), []
    lock.acquire()

    def waiter(name, urgent):
        lock.acquire(urgent=urgent)
        order.append(name)
        lock.release()

    threads = []
    for name, urgent in [("d1", False), ("d2", False), ("u1", True), ("u2", True), ("u3", True), ("u4", True)]:
        threads.append(threading.Thread(target=waiter, args=(name, urgent)))
        threads[-1].start()
        while len(lock._waiters) + len(lock._urgent_waiters) < len(threads):
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == ["u1", "u2", "d1", "u3", "u4", "d2"] and not lock.locked()
    with lock.urgent():  # free: taken at once, as a plain acquire would be
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(ValueError, match="urgent_streak"):
        FairLock(urgent_streak=0)


def test_speech_is_encoded_once_per_turn(tok):
    model = lively_blsp()
    calls = []
    original = model.encode_speech
    model.encode_speech = lambda audios, **guard: calls.append(len(audios)) or original(audios, **guard)
    session = ChatSession(model, tok)
    for seconds in (0.6, 1.1, 0.8):
        session.submit_audio(tone(seconds), instruction=REPEAT)
        reply(session)
        session.submit_text("and again")
        reply(session)
    list(session.regenerate(GenerationOptions(max_new_tokens=4)))
    session.undo()
    session.submit_text("more")
    reply(session)
    assert calls == [1, 1, 1]
    # Dropping the cache does not re-encode: the embeddings live in the session.
    fresh = ChatSession(model, tok, reuse_cache=False)
    fresh.submit_audio(tone(0.5))
    reply(fresh)
    fresh.submit_text("next")
    reply(fresh)
    assert calls == [1, 1, 1, 1]


def test_context_overflow_drops_oldest_pairs_in_one_large_step_and_reports_it(tok):
    model = lively_blsp(seed=1)
    options = GenerationOptions(max_new_tokens=8)
    probe = ChatSession(model, tok)
    texts = ["hello there", "what is the capital of france?", "the lazy dog", "paris."]
    for text in texts[:2]:
        probe.submit_text(text)
        reply(probe, options)
    probe.submit_text(texts[2])
    limit = len(render(probe.turns, tok)) + options.max_new_tokens - 1  # one token short for 3 turns
    session = ChatSession(model, tok, max_context_tokens=limit)
    for text in texts[:2]:
        session.submit_text(text)
        assert {c.dropped_turns for c in reply(session, options)} == {0}
    session.submit_text(texts[2])
    chunks = reply(session, options)
    kept = session.turns[:-1]
    dropped = chunks[0].dropped_turns
    assert {c.dropped_turns for c in chunks} == {dropped} and dropped >= 2 and len(kept) == 5 - dropped
    assert kept[-1].text == texts[2] and [t.text for t in kept[:-1]] == [t.text for t in probe.turns[dropped:-1]]
    room = limit - options.max_new_tokens
    assert len(render(kept, tok)) <= room * HISTORY_KEPT_ON_OVERFLOW or len(kept) == 1  # one large step
    assert len(render(probe.turns[dropped - 2:], tok)) > room * HISTORY_KEPT_ON_OVERFLOW  # and no larger
    assert_same_as_scratch(session, chunks, [], max_new_tokens=8)  # the cache was rebuilt, not reused wrongly


def test_overflowing_conversation_prefills_about_one_normal_turn_more_per_turn(tok):
    """A long conversation under a small context: the prefilled positions per turn, averaged over all
    turns, stay within twice a turn that drops nothing (dropping one pair at a time re-prefills the whole
    history every turn), and each reply after a drop equals a fresh session's on the kept history."""
    model = lively_blsp(seed=3)
    options = GenerationOptions(max_new_tokens=8)
    session = ChatSession(model, tok, max_context_tokens=160)
    prefilled = record_forward(model)
    questions = ["hello there", "what is the capital of france?", "the lazy dog", "paris.", "the quick brown fox"]
    per_turn, normal, drops = [], [], 0
    for turn in range(40):
        session.submit_text(questions[turn % len(questions)])
        calls_before = len(prefilled)
        chunks = reply(session, options)
        prefill = prefilled[calls_before]  # the first forward of a reply is its prefill
        per_turn.append(prefill)
        if chunks[0].dropped_turns:
            drops += 1
            assert_same_as_scratch(session, chunks, [], max_new_tokens=8)
        else:
            normal.append(prefill)
    assert drops >= 3, "the test must overflow several times"
    normal_turn = sorted(normal)[len(normal) // 2]
    assert sum(per_turn) / len(per_turn) <= 2 * normal_turn, (per_turn, normal_turn)


def test_cache_budget_frees_the_least_recently_used_idle_cache_and_replies_stay_the_same(tok):
    model = lively_blsp(seed=6)
    options = GenerationOptions(max_new_tokens=8)
    script = {"a": ["hello there", "paris."], "b": ["the lazy dog", "what is the capital"],
              "c": ["the quick brown fox", "hello"]}
    alone = {}
    for name, texts in script.items():
        session = ChatSession(model, tok)
        for text in texts:
            session.submit_text(text)
            alone[name, text] = reply(session, options)[-1].text
    probe = ChatSession(model, tok)
    probe.submit_text(script["a"][0])
    reply(probe, options)
    budget = CacheBudget(max_tokens=int(2.5 * probe.cached_tokens))  # room for about two first exchanges
    sessions = {name: ChatSession(model, tok, cache_budget=budget) for name in script}
    for name in ("a", "b"):
        sessions[name].submit_text(script[name][0])
        reply(sessions[name], options)
    assert sessions["a"].cached_tokens and sessions["b"].cached_tokens
    sessions["c"].submit_text(script["c"][0])
    reply(sessions["c"], options)
    assert sessions["a"].cached_tokens == 0, "the least recently used idle cache goes first"
    assert sessions["b"].cached_tokens and sessions["c"].cached_tokens
    assert budget.cached_tokens <= budget.max_tokens
    prefilled = record_forward(model)
    sessions["a"].submit_text(script["a"][1])
    assert reply(sessions["a"], options)[-1].text == alone["a", script["a"][1]]
    assert prefilled[0] == len(render(sessions["a"].turns[:-1], tok)), "the freed cache is recomputed whole"
    for name in ("b", "c"):
        sessions[name].submit_text(script[name][1])
        assert reply(sessions[name], options)[-1].text == alone[name, script[name][1]]
    with pytest.raises(ValueError, match="at least 1"):
        CacheBudget(0)


def test_a_generating_session_keeps_its_cache(tok):
    model = lively_blsp(seed=4)
    reached, release = threading.Event(), threading.Event()

    def gate(call):
        if call == 2:
            reached.set()
            release.wait(10)

    session = ChatSession(model, tok)
    session.submit_text("hello there")
    record_forward(model, before=gate)
    stream = session.stream_reply(GenerationOptions(max_new_tokens=4))
    assert reached.wait(10)
    assert session.release_cache() == 0 and session.cached_tokens > 0
    release.set()
    list(stream)
    held = session.cached_tokens
    assert held > 0 and session.release_cache() == held and session.cached_tokens == 0


def test_a_turn_too_long_alone_raises_and_leaves_the_session_usable(tok):
    model = lively_blsp()
    session = ChatSession(model, tok, max_context_tokens=64)
    session.submit_text("hello")
    reply(session, GenerationOptions(max_new_tokens=4))
    before = session.turns
    session.submit_text("the quick brown fox jumps over the lazy dog " * 8)
    with pytest.raises(ContextOverflowError, match="context holds 64") as err:
        session.stream_reply(GenerationOptions(max_new_tokens=4))
    assert isinstance(err.value, ValueError)
    assert session.turns == before and not session.busy
    session.submit_audio(tone(12.0))  # 12 s of speech: 75 positions of the tiny model
    with pytest.raises(ContextOverflowError):
        session.stream_reply(GenerationOptions(max_new_tokens=4))
    assert session.turns == before
    session.submit_text("short")
    reply(session, GenerationOptions(max_new_tokens=4))


def test_sessions_sharing_a_model_on_threads_match_running_alone(tok):
    model = lively_blsp(seed=2)
    scripts = {
        "a": [("text", "hello there"), ("audio", tone(0.8)), ("text", "paris.")],
        "b": [("audio", tone(1.2, 440)), ("text", "the lazy dog"), ("text", "what is the capital")],
    }

    def run(name, results, barrier=None):
        session = ChatSession(model, tok)
        for kind, value in scripts[name]:
            if barrier is not None:
                barrier.wait()
            session.submit_audio(value) if kind == "audio" else session.submit_text(value)
            reply(session, GenerationOptions(max_new_tokens=10))
        results[name] = session.turns

    alone = {}
    for name in scripts:
        run(name, alone)
    active, most = [0], [0]
    original = model.llama_model.forward

    def forward(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.001)
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    model.llama_model.forward = forward
    together, barrier = {}, threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(name, together, barrier)) for name in scripts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == alone
    assert together["a"][0].text == "hello there" and together["b"][0].speech_tokens > 0
    assert most[0] == 1  # the model lock: never two forward passes at once


def test_model_lock_is_one_per_model():
    first, second = tiny_blsp(), tiny_blsp()
    assert model_lock(first) is model_lock(first) and model_lock(first) is not model_lock(second)


def test_cancel_stops_promptly_and_keeps_the_partial_reply(tok):
    model = lively_blsp(seed=4)
    reached, release = threading.Event(), threading.Event()

    def gate(call):
        if call == 4:  # prefill + 3 decode steps, then hold
            reached.set()
            release.wait(10)

    session = ChatSession(model, tok)
    session.submit_text("hello there")
    record_forward(model, before=gate)
    stream = session.stream_reply(GenerationOptions(max_new_tokens=200))
    assert reached.wait(10)
    with pytest.raises(RuntimeError, match="cancel"):
        session.submit_text("too early")
    threading.Timer(0.05, release.set).start()
    assert session.cancel() is True
    assert not session.busy
    chunks = list(stream)
    assert chunks[-1].done and chunks[-1].stopped_by == "cancelled"
    partial = session.turns[-1]
    assert partial.role == "assistant" and 1 <= len(partial.token_ids) <= 5
    assert partial.text == chunks[-1].text
    assert session.cancel() is False
    model.llama_model.forward = type(model.llama_model).forward.__get__(model.llama_model)
    session.submit_text("paris.")
    assert_same_as_scratch(session, reply(session), [])  # the cache is consistent with the partial reply


@pytest.mark.parametrize("text, whole", [
    ("Paris is big. It is o", "Paris is big."), ("Yes! Really?", "Yes! Really?"), ("It is big.\nNext li", "It is big."),
    ("Dr. Smith came", ""), ("Pi is 3.14 and", ""), ("", ""), ("Go on, " * 60, ""),
])
def test_whole_sentences_cut_at_the_last_sentence_end(text, whole):
    assert whole_sentences(text) == whole


def stopped_then_next_prompt(tok, said, reuse_cache):
    """A session whose first reply is stopped right after saying `said`; then a second turn. Returns the
    session, the stopped reply's last chunk, the ids of the first forward of the second reply and its chunks."""
    model = lively_blsp(seed=4)
    session = ChatSession(model, tok, reuse_cache=reuse_cache)
    session.submit_text("hello")
    script = tok(said, add_special_tokens=False).input_ids
    scripted(model, tok, said)
    record_forward(model, before=lambda call: call == len(script) + 1 and session.cancel())  # the reply's own thread
    last = reply(session, GenerationOptions(max_new_tokens=60))[-1]
    model.llama_model.forward = type(model.llama_model).forward.__get__(model.llama_model)
    read, embed = [], model.embed_inputs
    model.embed_inputs = lambda ids, *args: read.append(ids[0].tolist()) or embed(ids, *args)
    session.submit_text("and then?")
    chunks = reply(session)
    return session, last, read[0], chunks


@pytest.mark.parametrize("said, kept", [("Hello there. How are yo", "Hello there."), ("Hello there, how", "")])
def test_a_stopped_reply_is_shown_whole_but_read_only_up_to_its_last_sentence(tok, said, kept):
    # reuse_cache=False: the second reply reads its whole prompt anew, in its first forward
    session, last, prompt, chunks = stopped_then_next_prompt(tok, said, reuse_cache=False)
    assert last.stopped_by == "cancelled" and last.text == said
    assert session.turns[1].text == said  # the history shows what was said (regenerate, barge-in read it)
    assert session.context_turns[1].text == kept
    expected = render([Turn("human", text="hello"), Turn("assistant", text=kept), Turn("human", text="and then?")], tok)
    assert prompt == expected.input_ids
    assert said[len(kept):].strip() not in tok.decode(prompt)  # no cut-off fragment for the model to parrot
    assert_same_as_scratch(session, chunks, [])
    cached, *_ = stopped_then_next_prompt(tok, said, reuse_cache=True)  # a cropped cache reads the same
    assert cached.turns == session.turns and cached.context_turns == session.context_turns


def test_leaving_the_stream_early_cancels_the_reply(tok):
    model = lively_blsp(seed=4)
    record_forward(model, before=lambda call: time.sleep(0.005))
    session = ChatSession(model, tok)
    session.submit_text("hello there")
    stream = session.stream_reply(GenerationOptions(max_new_tokens=300))
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while session.busy and time.time() < deadline:
        time.sleep(0.01)
    assert not session.busy and len(session.turns[-1].token_ids) < 300


def test_regenerate_undo_clear(tok):
    model = lively_blsp(seed=5)
    session = ChatSession(model, tok)
    lengths = record_forward(model)
    session.submit_text("hello there")
    first = reply(session)[-1]
    session.submit_audio(tone(0.9), instruction=REPEAT)
    second = reply(session)[-1]
    turns = session.turns
    del lengths[:]
    again = list(session.regenerate(GenerationOptions(max_new_tokens=12)))
    assert lengths[0] == 1  # the cache was cropped to the prompt, only its last position re-run
    assert session.turns == turns and again[-1].text == second.text  # greedy: the same reply
    sampled = list(session.regenerate(GenerationOptions(max_new_tokens=12, do_sample=True, temperature=1.5)))
    assert len(session.turns) == 4 and session.turns[-1].text == sampled[-1].text
    assert session.undo() == 2
    assert session.turns == turns[:2] and session.turns[-1].text == first.text
    session.submit_text("paris.")
    assert_same_as_scratch(session, reply(session), [])
    session.submit_text("pending")
    assert session.undo() == 1 and session.turns[-1].role == "assistant"
    session.clear()
    assert session.turns == () and session.cached_tokens == 0
    session.submit_text("hello there")
    assert reply(session)[-1].text == first.text
    with pytest.raises(ValueError, match="no reply"):
        session.clear() or session.regenerate()


def test_turn_order_is_enforced(tok):
    session = ChatSession(lively_blsp(), tok)
    with pytest.raises(ValueError, match="submit a human turn"):
        session.stream_reply()
    session.submit_text("hi")
    with pytest.raises(ValueError, match="no reply yet"):
        session.submit_text("hi again")
    with pytest.raises(ValueError, match="no reply to regenerate"):
        session.regenerate()


def test_errors_in_generation_reach_the_caller(tok):
    model = lively_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hi")
    reply(session)

    def boom(call):
        raise RuntimeError("device lost")

    record_forward(model, before=boom)
    session.submit_text("again")
    with pytest.raises(RuntimeError, match="device lost"):
        list(session.stream_reply())
    assert not session.busy and session.cached_tokens == 0 and session.turns[-1].role == "human"


# --- text streaming ------------------------------------------------------------------------------
def test_text_stream_never_splits_a_character_and_cuts_at_the_stop(tok):
    text = "Grüße, C# café 😀 ok"
    ids = tok(text + "\n\n\n###[Human]: more", add_special_tokens=False).input_ids
    stream, deltas, split_seen = TextStream(tok), [], False
    for index, token in enumerate(ids):
        split_seen |= stream.decode(ids[: index + 1]).endswith(REPLACEMENT_CHAR)
        deltas.append(stream.push(token))
        if stream.stop_hit:
            break
    deltas.append(stream.finish())
    assert split_seen  # the emoji and umlauts really span several byte-level tokens
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == stream.final_text() == text
    assert stream.stop_hit


def test_text_stream_holds_back_a_possible_stop_and_trailing_space(tok):
    stream = TextStream(tok)
    shown = [stream.push(t) for t in tok(" a #", add_special_tokens=False).input_ids]
    assert "".join(shown) == "a"
    shown += [stream.push(t) for t in tok("# b", add_special_tokens=False).input_ids]
    assert "".join(shown) == "a ## b" and not stream.stop_hit


def scripted(model, tokenizer, text):
    """Make the LLM say `text` (plus anything after) by boosting the scripted id at each step."""
    script = tokenizer(text, add_special_tokens=False).input_ids
    step = [0]
    original = model.llama_model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if step[0] < len(script):
            out.logits[:, -1, script[step[0]]] += 1e4
        step[0] += 1
        return out

    model.llama_model.forward = forward
    return step


def test_session_streams_multibyte_text_and_keeps_the_reply_before_the_stop(tok):
    model = lively_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hello")
    step = scripted(model, tok, "Grüße 😀 C# ok\n\n\n###[Human]: invented")
    chunks = reply(session, GenerationOptions(max_new_tokens=60))
    assert chunks[-1].text == "Grüße 😀 C# ok" and chunks[-1].stopped_by == "stop_string"
    assert len(chunks) > 3 and not any(REPLACEMENT_CHAR in c.delta for c in chunks)
    kept = session.turns[-1].token_ids
    assert tok.decode(kept) == "Grüße 😀 C# ok"
    step[0] = 10**9  # stop scripting
    session.submit_text("and?")
    assert_same_as_scratch(session, reply(session), [])


def test_eos_and_max_new_tokens_end_a_reply(tok):
    model = lively_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hello")
    scripted(model, tok, "hi</s>")
    chunks = reply(session, GenerationOptions(max_new_tokens=20))
    assert chunks[-1].stopped_by == "eos" and chunks[-1].text == "hi"
    assert tok.eos_token_id not in session.turns[-1].token_ids
    model.llama_model.forward = type(model.llama_model).forward.__get__(model.llama_model)
    session.submit_text("go on")
    chunks = reply(session, GenerationOptions(max_new_tokens=3))
    assert chunks[-1].stopped_by in ("max_new_tokens", "eos", "stop_string")
    assert len(session.turns[-1].token_ids) <= 3


def test_a_reply_that_says_one_phrase_over_and_over_is_stopped_after_the_third_time(tok):
    model = lively_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hello")
    said = "we are here and we stay here. " * 8
    phrase = len(tok(said, add_special_tokens=False).input_ids) // 8
    scripted(model, tok, said)
    chunks = reply(session, GenerationOptions(max_new_tokens=200, loop_stop_tokens=2 * phrase))
    assert chunks[-1].stopped_by == "loop"  # the third copy spans more than loop_stop_tokens
    assert chunks[-1].text.count("we stay here") == 3 and len(session.turns[-1].token_ids) < 4 * phrase
    session.submit_text("go on")
    scripted(model, tok, said)
    chunks = reply(session, GenerationOptions(max_new_tokens=6 * phrase, loop_stop_tokens=0))
    assert chunks[-1].stopped_by == "max_new_tokens"  # off: it runs on
    assert chunks[-1].text.count("we stay here") >= 5


def test_dtype_follows_the_model_bf16_on_cpu(tok):
    model = lively_blsp().to(torch.bfloat16)
    session = ChatSession(model, tok)
    session.submit_audio(tone(0.7))
    chunks = reply(session, GenerationOptions(max_new_tokens=6))
    assert session._entries[0].speech.dtype == torch.bfloat16
    assert_same_as_scratch(session, chunks, [tone(0.7)], max_new_tokens=6)


def test_a_different_clip_of_the_same_length_is_not_taken_from_the_cache(tok):
    model = lively_blsp(seed=6)
    original = model.encode_speech

    def distinct(audios, **guard):  # the tiny random encoder hears tones alike; make each clip's vectors its own
        return [torch.randn(e.shape, generator=torch.Generator().manual_seed(int(abs(a).sum() * 1000)))
                for a, e in zip(audios, original(audios, **guard))]

    model.encode_speech = distinct
    session = ChatSession(model, tok)
    session.submit_audio(tone(1.0, 220), instruction=REPEAT)
    first = session.turns[-1]
    reply(session)
    before = session.turns[-1].text
    session.undo()
    other = tone(1.0, 880, seed=3)
    session.submit_audio(other, instruction=REPEAT)
    assert session.turns[-1] == first  # the same placeholders: only the cache keys tell the clips apart
    assert_same_as_scratch(session, reply(session), [other])
    assert session.turns[-1].text != before


def ctc_readout_blsp(audio, seed=0):
    """lively_blsp served through the CTC readout, its blank the word the clip is heard as most: so the
    readout drops and merges positions, and a clip's count comes only from encoding it. (The adapter's
    output scale is raised so that its outputs are nearest to different words, not all to one.)"""
    import dataclasses

    model = lively_blsp(seed=seed)
    with torch.no_grad():
        scale = torch.randn(model.speech_ln.weight.shape, generator=torch.Generator().manual_seed(seed + 1))
        model.speech_ln.weight.copy_(3 * scale)
    raw = model.adapt_windows(model.encode_windows([audio]))[0]
    labels = embedding_distance_logits(raw, model.llama_model.get_input_embeddings().weight).argmax(-1)
    model.config = dataclasses.replace(model.config, speech_readout="ctc", ctc_blank_id=int(labels.mode().values))
    return model


def test_ctc_readout_turns_take_their_encoded_length_in_every_path(tok):
    audio = tone(1.5, 330)
    model = ctc_readout_blsp(audio)
    with torch.no_grad():
        (speech,) = model.encode_speech([audio])
    assert 0 < speech.shape[0] < model.speech_token_count(len(audio))
    session = ChatSession(model, tok)
    session.submit_audio(audio, instruction=REPEAT)
    assert session.turns[-1].speech_tokens == speech.shape[0]
    chunks = reply(session, GenerationOptions(max_new_tokens=16))
    assert_same_as_scratch(session, chunks, [audio], max_new_tokens=16)
    # the one-shot path lays out speech_turn's upper bound again, settled once the clip is encoded
    loaded = LoadedBlsp(model, tok, "tiny", adapter_trained=True)
    one_shot = generate_replies(loaded, [[speech_turn(audio, model, REPEAT)]], [[audio]],
                                GenerationOptions(max_new_tokens=16))
    assert one_shot == [chunks[-1].text]


def test_ctc_readout_batches_of_conversations_equal_one_by_one(tok):
    first, second = tone(1.5, 330), tone(0.8, 520, seed=2)
    model = ctc_readout_blsp(first)
    loaded = LoadedBlsp(model, tok, "tiny", adapter_trained=True)
    options = GenerationOptions(max_new_tokens=12)
    two_clips = [speech_turn(first, model, REPEAT), Turn("assistant", text="hello there"), speech_turn(second, model)]
    conversations = [two_clips, [Turn("human", text="the quick brown fox")], [speech_turn(second, model, REPEAT)]]
    audios = [[first, second], [], [second]]
    batched = generate_replies(loaded, conversations, audios, options)
    assert batched == [generate_replies(loaded, [c], [a], options)[0] for c, a in zip(conversations, audios)]
    with pytest.raises(ValueError, match="1 speech clips for 0 spoken turns"):
        generate_replies(loaded, [[Turn("human", text="hi")]], [[first]], options)
    with pytest.raises(ValueError, match="0 speech clips for 1 spoken turns"):
        generate_replies(loaded, [[speech_turn(first, model)]], [[]], options)


# --- a clip in which the readout hears no words ----------------------------------------------------------
def test_a_clip_heard_as_no_words_is_refused_and_the_conversation_goes_on(tok):
    model = blank_hearing_blsp()
    session = ChatSession(model, tok)
    session.submit_text("hello")
    first = reply(session, GenerationOptions(max_new_tokens=4))[-1].text
    before = list(session.turns)
    with pytest.raises(NothingHeardError, match="No words were heard in the recording"):
        session.submit_audio(tone(2.0), instruction=REPEAT)
    assert isinstance(NothingHeardError(), AudioError)  # every front end already reports audio errors
    assert list(session.turns) == before  # nothing was added, nothing lost
    session.submit_text("and now?")
    assert reply(session, GenerationOptions(max_new_tokens=4))[-1].done
    assert session.turns[1].text == first


def test_batches_answer_the_heard_clips_and_leave_the_unheard_empty(tok):
    heard, unheard = tone(1.5, 330), tone(0.6, 520, seed=2)
    model = hears_only_long_clips(ctc_readout_blsp(heard), min_seconds=1.0)
    loaded = LoadedBlsp(model, tok, "tiny", adapter_trained=True)
    options = GenerationOptions(max_new_tokens=8)
    conversations = [[speech_turn(unheard, model, REPEAT)], [speech_turn(heard, model, REPEAT)],
                     [Turn("human", text="the quick brown fox")]]
    audios = [[unheard], [heard], []]
    batched = generate_replies(loaded, conversations, audios, options)
    assert batched[0] == "" and batched[1:] == generate_replies(loaded, conversations[1:], audios[1:], options)
    assert batched[1]  # the LLM ran for the others
    with pytest.raises(NothingHeardError):
        generate_reply(loaded, conversations[0], audios[0], options)
    with pytest.raises(NothingHeardError):  # the layout for analysis needs every clip heard
        encoded_batch(loaded, conversations[:2], audios[:2])
