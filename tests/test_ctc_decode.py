"""CTC prefix beam search, with and without a language model fused in, and the KV-cached LLM scorer."""
import contextlib
import functools
import math
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from blsp_chat.audio import load_audio
from blsp_chat.ctc_decode import cached_lm, collapse_ctc, prefix_beam_search
from blsp_chat.offline import WeightsError
from blsp_chat.prefix_scorer import KvCachedPrefixScorer, _shared_reads
from blsp_chat.readout import (
    CTC_BEAM_LABELS,
    ctc_label_candidates,
    ctc_readout,
    embedding_distance_logits,
    next_piece_log_probs,
)
from blsp_chat.weights import choose_speech_search
from tiny import VOCAB, blank_hearing_blsp, lively_lm_blsp, tiny_blsp, tone

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"

BLANK = 0


def read_from_start(model):
    """The LLM's next-piece log-probabilities, each prefix read from the start: what a scorer must equal."""
    return functools.partial(next_piece_log_probs, model.llama_model)


def frames(*rows):
    """Per-output probabilities {label: p} -> the (L, k) log-probabilities and ids prefix_beam_search takes."""
    labels = sorted({label for row in rows for label in row})
    log_probs = torch.tensor([[math.log(row.get(label, 1e-12)) for label in labels] for row in rows])
    return log_probs.sort(dim=-1,
                          descending=True).values, torch.tensor(labels)[log_probs.argsort(dim=-1, descending=True)]


def test_the_beam_sums_the_paths_of_a_labelling_where_greedy_takes_the_best_single_path():
    # Greedy reads blank, blank (p 0.36); "a" has the paths a-a, a-_, _-a (0.16 + 0.24 + 0.24 = 0.64).
    log_probs, ids = frames({BLANK: 0.6, 1: 0.4}, {BLANK: 0.6, 1: 0.4})
    assert collapse_ctc(ids[:, 0].tolist(), BLANK) == []
    assert prefix_beam_search(log_probs, ids, BLANK, None) == [1]


def test_a_repeated_piece_needs_a_blank_between_its_two_outputs():
    sharp = {BLANK: 0.01, 1: 0.98, 2: 0.01}
    blank = {BLANK: 0.98, 1: 0.01, 2: 0.01}
    assert prefix_beam_search(*frames(sharp, sharp), BLANK, None) == [1]
    assert prefix_beam_search(*frames(sharp, blank, sharp), BLANK, None) == [1, 1]


def test_the_language_model_decides_between_pieces_that_sound_alike():
    # Output 2 sounds a little more like piece 3 ("friends") than piece 4 ("france"); the LM, after piece 1
    # ("of"), expects 4.
    heard = frames({1: 0.9, BLANK: 0.1}, {3: 0.55, 4: 0.45})
    calls = []

    def lm(prefixes):
        calls.append(list(prefixes))
        rows = torch.full((len(prefixes), 5), math.log(0.01))
        for r, prefix in enumerate(prefixes):
            rows[r, 4 if prefix == (1,) else 1] = math.log(0.96)
        return rows

    assert prefix_beam_search(*heard, BLANK, lm, lm_weight=0.0) == [1, 3]
    assert prefix_beam_search(*heard, BLANK, lm, lm_weight=0.5) == [1, 4]
    assert calls, "the LM was consulted"


def test_outputs_that_are_surely_blank_cost_no_language_model_call():
    silence = {BLANK: 0.9999, 1: 0.0001}
    calls = []

    def lm(prefixes):
        calls.append(list(prefixes))
        return torch.zeros(len(prefixes), 2)

    assert prefix_beam_search(*frames(silence, silence, silence), BLANK, lm, lm_weight=1.0) == []
    assert calls == []


def sound_alike_lm(prefixes):
    """After piece 1 ("of") this LM all but insists on piece 4 ("france"); elsewhere it expects piece 1."""
    rows = torch.full((len(prefixes), 5), math.log(0.001))
    for r, prefix in enumerate(prefixes):
        rows[r, 4 if prefix[-1:] == (1,) else 1] = math.log(0.99)
    return rows


def test_a_label_below_the_floor_is_not_tried_however_much_the_lm_wants_it():
    # Output 2 is almost surely piece 3; piece 4 is a 0.3% outsider that only the LM favours.
    heard = frames({1: 0.9, BLANK: 0.1}, {3: 0.997, 4: 0.003})
    assert prefix_beam_search(*heard, BLANK, sound_alike_lm, lm_weight=1.0) == [1, 4]
    assert prefix_beam_search(*heard, BLANK, sound_alike_lm, lm_weight=1.0,
                              label_min_log_prob=math.log(0.01)) == [1, 3]
    # an output's best label is always tried, however unsure
    flat = frames({1: 0.004, BLANK: 0.003, 2: 0.003})
    assert prefix_beam_search(*flat, BLANK, None, label_min_log_prob=math.log(0.01)) == [1]


def test_pruned_beams_are_not_read_by_the_lm_and_the_best_beam_is_kept():
    # frames() gives every label a 1e-12 floor, so after output 1 the full beam also keeps (2,), (3,), (4,)
    heard = frames({1: 0.9, BLANK: 0.1}, {BLANK: 0.99, 2: 0.01}, {3: 0.6, 4: 0.4})
    asked = {"all": [], "pruned": []}

    def counting(key):
        def lm(prefixes):
            asked[key].extend(prefixes)
            return sound_alike_lm(prefixes)
        return lm

    full = prefix_beam_search(*heard, BLANK, counting("all"), lm_weight=0.5)
    pruned = prefix_beam_search(*heard, BLANK, counting("pruned"), lm_weight=0.5, beam_prune_log_prob=-3.0)
    assert pruned == full == [1, 4]
    hopeless = {(2,), (3,)}  # about 27 nats below the best beam
    assert hopeless <= set(asked["all"]) and not hopeless & set(asked["pruned"])


def test_an_lm_that_reads_ahead_is_told_the_next_outputs_best_pieces_and_the_beams_do_not_change():
    heard = frames({1: 0.9, BLANK: 0.1}, {BLANK: 0.6, 1: 0.4}, {3: 0.55, 4: 0.45}, {3: 0.6, BLANK: 0.4})

    def lm(prefixes):
        rows = torch.full((len(prefixes), 5), math.log(0.01))
        for r, prefix in enumerate(prefixes):
            rows[r, 4 if prefix[-1:] == (1,) else 1] = math.log(0.96)
        return rows

    class ReadingAhead:
        def __init__(self):
            self.expected = []

        def __call__(self, prefixes):
            return lm(prefixes)

        def expect(self, pieces):
            self.expected.append(list(pieces))

    reader = ReadingAhead()
    assert prefix_beam_search(*heard, BLANK, reader,
                              lm_weight=0.5) == prefix_beam_search(*heard, BLANK, lm, lm_weight=0.5)
    # the best labels are 1, blank, 3, 3: collapsed from each output on
    assert reader.expected == [[1, 3], [3], [3], [3]]


def test_the_cache_scores_each_prefix_once():
    seen = []

    def score(prefixes):
        seen.extend(prefixes)
        return torch.tensor([[float(len(p))] for p in prefixes])

    lm = cached_lm(score)
    assert [float(r) for r in lm([(), (1,), (1,)])] == [0.0, 1.0, 1.0]
    assert [float(r) for r in lm([(1,), (1, 2)])] == [1.0, 2.0]
    assert seen == [(), (1,), (1, 2)]


def test_the_model_reads_out_the_embeddings_of_the_pieces_the_fused_search_finds():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=0.3, ctc_token_bonus=0.5)
    audio = tone(2.0)
    raw = model.adapt_windows(model.encode_windows([audio]))[0]
    table = model.llama_model.get_input_embeddings().weight
    top = embedding_distance_logits(raw, table).log_softmax(-1).topk(CTC_BEAM_LABELS, dim=-1)
    pieces = prefix_beam_search(top.values, top.indices, 5, cached_lm(read_from_start(model)),
                                lm_weight=0.3, token_bonus=0.5)
    (speech,) = model.encode_speech([audio])
    torch.testing.assert_close(speech, table[pieces or [5]])
    assert model.speech_token_count(len(audio)) == raw.shape[0] >= speech.shape[0]


def test_the_fused_readout_of_a_clip_heard_as_only_blanks_is_empty():
    model = blank_hearing_blsp(ctc_lm_weight=0.3, ctc_token_bonus=0.5)
    raw = model.adapt_windows(model.encode_windows([tone(2.0)]))[0]
    (speech,) = model.encode_speech([tone(2.0)])
    assert raw.shape[0] > 0 and speech.shape == (0, raw.shape[1])


def test_the_llm_scores_prefixes_as_plain_text_whatever_their_padding():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=1.0)
    alone = read_from_start(model)([(7,)])
    padded = read_from_start(model)([(7,), (3, 9, 11, 7)])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(alone.exp().sum(-1), torch.ones(1))
    model.llama_model.config.bos_token_id = None  # an LLM without a BOS token starts from its EOS
    assert read_from_start(model)([(7,)]).shape == alone.shape


def beam_like_requests(steps: int, beam_size: int = 4, seed: int = 0):
    """What a beam search asks: the live beams at each step, some of them last step's plus one piece."""
    rng = random.Random(seed)
    beams = [()]
    for _ in range(steps):
        yield beams
        grown = set(beams) | {b + (rng.randrange(VOCAB),) for b in beams if rng.random() < 0.7}
        beams = rng.sample(sorted(grown), min(beam_size, len(grown)))


@pytest.mark.parametrize("llm_kind, bos", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_the_kv_cached_scorer_equals_reading_each_prefix_from_its_start(llm_kind, bos):
    model = lively_lm_blsp(llm_kind, bos)
    scorer = KvCachedPrefixScorer(model.llama_model)
    assert scorer.start_id == (1 if bos else 2)
    lengths = set()
    for beams in beam_like_requests(30):
        rows = scorer(beams)
        torch.testing.assert_close(torch.stack(rows), read_from_start(model)(beams), atol=1e-4, rtol=1e-4)
        # caches only for the beams alive and what was read ahead of them
        assert set(beams) <= set(scorer.cached_prefixes)
        assert all(any(c[:len(b)] == b for b in beams) for c in scorer.cached_prefixes)
        lengths.update(map(len, beams))
    assert len(lengths) > 10, "prefixes of many lengths were compared"


def test_the_kv_cached_scorer_reads_any_prefix_whatever_it_has_cached():
    model = lively_lm_blsp()
    scorer = KvCachedPrefixScorer(model.llama_model)
    asked = [(9, 4, 17), (), (9,), (9, 4, 17, 3), (9, 4, 17)]  # unrelated, out of order, repeated
    torch.testing.assert_close(torch.stack(scorer(asked)), read_from_start(model)(asked), atol=1e-4, rtol=1e-4)
    later = [(9, 4, 17, 3, 8), (250, 1)]  # one extends a cached prefix by a piece, one the empty prefix by two
    torch.testing.assert_close(torch.stack(scorer(later)), read_from_start(model)(later), atol=1e-4, rtol=1e-4)
    assert sorted(scorer.cached_prefixes) == [(9, 4, 17, 3, 8), (250, 1)]
    # three pieces over the first, batched with a prefix that has no read ancestor and reads from the start
    last = [(9, 4, 17, 3, 8, 6, 6, 2), (30, 31)]
    torch.testing.assert_close(torch.stack(scorer(last)), read_from_start(model)(last), atol=1e-4, rtol=1e-4)


def test_the_kv_cached_scorer_reads_the_expected_pieces_ahead_in_the_same_forward():
    model = lively_lm_blsp()
    scorer = KvCachedPrefixScorer(model.llama_model, read_ahead=3)
    scorer([()])  # the start token's read
    scorer.expect([12, 40, 40, 7, 99])
    scorer([(5,)])
    assert scorer.forwards == 2
    ahead = [(5,), (5, 12), (5, 12, 40), (5, 12, 40, 40)]
    assert set(scorer.cached_prefixes) == set(ahead)
    rows = scorer(ahead)  # the beams took the expected pieces: no forward more, and the rows are exact
    assert scorer.forwards == 2
    torch.testing.assert_close(torch.stack(rows), read_from_start(model)(ahead), atol=1e-4, rtol=1e-4)
    scorer.expect([8, 7])  # a beam that ends with the first expected piece holds it: read on from the next
    scorer([(5, 12, 40, 40, 8)])
    assert (5, 12, 40, 40, 8, 7) in scorer.cached_prefixes and scorer.forwards == 3
    scorer([(5, 12, 40, 40, 8, 7)])  # only this one is alive now: its shorter prefixes are dropped
    scorer.expect([7, 3])
    shorter = [(5, 12, 40, 40, 8)]  # read again, though the expected pieces after it are cached
    torch.testing.assert_close(torch.stack(scorer(shorter)), read_from_start(model)(shorter), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="read_ahead"):
        KvCachedPrefixScorer(model.llama_model, read_ahead=-1)


def test_the_start_tokens_read_is_kept_across_decodes_until_the_llms_weights_change():
    model = lively_lm_blsp()
    llm = model.llama_model
    first = KvCachedPrefixScorer(llm)
    first([(), (7,)])
    assert first.forwards == 2  # the start token, then the piece after it
    second = KvCachedPrefixScorer(llm)  # the next clip's decode: its start is known
    torch.testing.assert_close(torch.stack(second([()])), read_from_start(model)([()]), atol=1e-4, rtol=1e-4)
    assert second.forwards == 0
    asked = [(7,), (3, 9)]
    torch.testing.assert_close(torch.stack(second(asked)), read_from_start(model)(asked), atol=1e-4, rtol=1e-4)
    assert second.forwards == 1  # one piece each after the kept start, in one forward
    with torch.no_grad():  # an optimiser step changes the weights in place
        llm.get_input_embeddings().weight.mul_(1.5)
    third = KvCachedPrefixScorer(llm)
    torch.testing.assert_close(torch.stack(third(asked)), read_from_start(model)(asked), atol=1e-4, rtol=1e-4)
    assert third.forwards == 2  # the start token read again with the new weights


def read_together(llm, asked: dict[str, list]) -> dict:
    """Each name's prefixes scored by its own scorer, in its own thread, all handed in before the model lock
    (held by someone else meanwhile) comes free: {name: (rows, forwards) or the error raised}."""
    results, gate = {}, threading.Lock()

    @contextlib.contextmanager
    def model_lock():
        with gate:
            yield

    def decode(name):
        scorer = KvCachedPrefixScorer(llm, guard=model_lock)
        scorer.expect([11, 12])
        try:
            results[name] = (scorer(asked[name]), scorer.forwards)
        except Exception as err:  # noqa: BLE001  (what the test checks)
            results[name] = err

    gate.acquire()
    threads = [threading.Thread(target=decode, args=(name,)) for name in asked]
    for count, thread in enumerate(threads, 1):
        thread.start()
        while len(_shared_reads(llm)._pending) < count:
            time.sleep(0.001)
    gate.release()
    for thread in threads:
        thread.join(30)
    return results


def test_two_clips_read_at_once_share_one_forward_and_each_reads_as_alone():
    """Two people's spoken turns: the second scorer's rows join the forward the first is waiting to run."""
    model = lively_lm_blsp()
    llm = model.llama_model
    KvCachedPrefixScorer(llm)([()])  # the start token's read, kept
    runs, original = [], llm.forward
    llm.forward = lambda *args, **kwargs: runs.append(kwargs["input_ids"].shape) or original(*args, **kwargs)
    asked = {"first": [(5,), (6, 7)], "second": [(9, 3, 3)]}
    results = read_together(llm, asked)
    assert len(runs) == 1 and runs[0][0] == 3  # one forward, the three rows of both
    for name, prefixes in asked.items():
        rows, forwards = results[name]
        assert forwards == 1
        torch.testing.assert_close(torch.stack(rows), read_from_start(model)(prefixes), atol=1e-4, rtol=1e-4)
    llm.forward = original
    later = KvCachedPrefixScorer(llm)  # alone again: its rows read as before
    torch.testing.assert_close(torch.stack(later([(9, 3, 3, 4)])), read_from_start(model)([(9, 3, 3, 4)]),
                               atol=1e-4, rtol=1e-4)


def test_a_shared_forward_that_fails_is_read_again_per_clip_and_only_the_failing_clip_fails():
    model = lively_lm_blsp()
    llm = model.llama_model
    KvCachedPrefixScorer(llm)([()])
    original = llm.forward

    def forward(*args, **kwargs):
        if (kwargs["input_ids"] == 13).any():  # a piece this LLM cannot read, say
            raise RuntimeError("piece 13 is poison")
        return original(*args, **kwargs)

    llm.forward = forward
    results = read_together(llm, {"poisoned": [(13,)], "healthy": [(9, 3)], "also healthy": [(4,)]})
    assert isinstance(results["poisoned"], RuntimeError) and "poison" in str(results["poisoned"])
    for name, prefixes in [("healthy", [(9, 3)]), ("also healthy", [(4,)])]:
        rows, _ = results[name]
        torch.testing.assert_close(torch.stack(rows), read_from_start(model)(prefixes), atol=1e-4, rtol=1e-4)
    assert not _shared_reads(llm)._pending and not _shared_reads(llm)._leader_waiting


def test_an_llm_with_sliding_window_layers_is_refused_by_the_kv_cached_scorer():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                       sliding_window=8, max_window_layers=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="sliding-window"):
        KvCachedPrefixScorer(llm)


def test_the_fused_readout_with_the_kv_cache_finds_the_pieces_that_full_rereading_finds():
    model = lively_lm_blsp()
    table = model.llama_model.get_input_embeddings().weight
    for seed in range(3):
        raw = model.adapt_windows(model.encode_windows([tone(3.0, freq=180.0 + 60 * seed, seed=seed)]))[0]
        log_probs, ids = ctc_label_candidates(raw, table, CTC_BEAM_LABELS)
        search = dict(lm_weight=1.0, token_bonus=0.5, beam_size=4)
        scorer = KvCachedPrefixScorer(model.llama_model)
        cached = prefix_beam_search(log_probs, ids, 5, scorer, **search)
        assert cached == prefix_beam_search(log_probs, ids, 5, cached_lm(read_from_start(model)), **search)
        assert 0 < scorer.forwards
        (speech,) = model.encode_speech([tone(3.0, freq=180.0 + 60 * seed, seed=seed)])
        torch.testing.assert_close(speech, table[cached or [5]])


class RecordingGuard:
    """A guard (a context manager factory) that counts how often it is entered and knows whether it is held."""

    def __init__(self):
        self.entered = 0
        self.held = False

    @contextlib.contextmanager
    def __call__(self):
        assert not self.held, "the guard was entered while held: a forward inside another"
        self.entered += 1
        self.held = True
        try:
            yield
        finally:
            self.held = False


def record_held(model, guard, attribute):
    """Wrap `model.<attribute>` (a module or method): returns, per call, whether `guard` was held around it."""
    held, original = [], getattr(model, attribute)

    def wrapped(*args, **kwargs):
        held.append(guard.held)
        return original(*args, **kwargs)

    setattr(model, attribute, wrapped)
    return held


def test_the_guard_is_held_around_each_forward_of_the_readout_and_it_reads_the_same():
    """A chat session passes the model lock as the guard: each forward holds it alone (others' steps run
    between them), and what the clip is heard as does not change."""
    model = lively_lm_blsp()
    for seed in range(3):
        clip = tone(3.0, freq=180.0 + 60 * seed, seed=seed)
        (plain,) = model.encode_speech([clip])
        guard = RecordingGuard()
        llm_held = record_held(model.llama_model, guard, "forward")
        encoder_held = record_held(model, guard, "encode_frames")
        (guarded,) = model.encode_speech([clip], guard=guard)
        assert torch.equal(guarded, plain)
        assert encoder_held == [True] and len(llm_held) >= 2 and all(llm_held)
        assert guard.entered == 1 + len(llm_held)  # once for the encoder and adapter, then once per LLM forward
        assert not guard.held
        del model.llama_model.forward, model.encode_frames  # unwrapped for the next clip's plain reading


@pytest.mark.integration
def test_the_default_model_reads_the_example_clips_as_full_rereading_does(default_blsp):
    """The shipped default's replies do not change: the KV-cached readout picks the same word pieces, with
    or without a guard around its forwards."""

    model = default_blsp.model
    config = model.config
    table = model.llama_model.get_input_embeddings().weight
    search = dict(lm_weight=config.ctc_lm_weight, token_bonus=config.ctc_token_bonus, beam_size=config.ctc_beam_size)
    clips = sorted(EXAMPLES.glob("*.wav"))
    assert clips and config.ctc_lm_weight > 0 and config.ctc_label_min_log_prob is not None
    for clip in clips:
        audio = load_audio(clip)
        raw = model.adapt_windows(model.encode_windows([audio]))[0]
        log_probs, ids = ctc_label_candidates(raw, table, CTC_BEAM_LABELS)
        reference = prefix_beam_search(log_probs, ids, config.ctc_blank_id, cached_lm(read_from_start(model)),
                                       **search)
        cached = prefix_beam_search(log_probs, ids, config.ctc_blank_id, KvCachedPrefixScorer(model.llama_model),
                                    **search)
        assert cached == reference, clip.name
        (speech,) = model.encode_speech([audio])  # with the shipped label floor, which the reference lacks
        assert torch.equal(speech, table[reference].to(speech.dtype)), clip.name
        guard = RecordingGuard()  # as a chat session reads it: the lock taken per forward, not per clip
        (guarded,) = model.encode_speech([audio], guard=guard)
        assert torch.equal(guarded, speech) and guard.entered > 2, clip.name


def test_a_greedy_speech_search_reads_out_without_the_llm_and_fused_keeps_the_checkpoints_search():
    """--speech-search greedy: the readout is the greedy ctc one, and the LLM is not run before the prefill;
    fused (or no choice) keeps the checkpoint's LM weight."""
    audio = tone(2.0)
    fused = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=0.3, ctc_token_bonus=0.5)
    choose_speech_search(fused.config, None)
    choose_speech_search(fused.config, "fused")
    assert fused.config.ctc_lm_weight == 0.3
    greedy = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=0.3, ctc_token_bonus=0.5)
    choose_speech_search(greedy.config, "greedy")
    llm_calls = []
    greedy.llama_model.register_forward_hook(lambda *_: llm_calls.append(1))
    (speech,) = greedy.encode_speech([audio])
    raw = greedy.adapt_windows(greedy.encode_windows([audio]))[0]
    table = greedy.llama_model.get_input_embeddings().weight
    torch.testing.assert_close(speech, ctc_readout(raw, table, 5, greedy.config.ctc_readout_temperature))
    assert not llm_calls


@pytest.mark.parametrize("config, search, problem", [
    (dict(speech_readout="ctc", ctc_blank_id=5), "fused", "no fused search"),
    (dict(), "greedy", "not through the ctc readout"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=0.3), "beam", "must be one of"),
])
def test_a_speech_search_the_checkpoint_cannot_do_is_refused(config, search, problem):
    with pytest.raises(WeightsError, match=problem):
        choose_speech_search(tiny_blsp("none", **config).config, search)
