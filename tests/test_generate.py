"""Whole replies at once (one conversation or a batch) and the sampling rule every reply takes its steps by.
The batch-equals-one-by-one and session-equals-one-shot checks are in test_session.py."""
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from blsp_chat.config import GenerationOptions
from blsp_chat.generate import compression_ratio, generate_replies, loops_at_end, next_token, speech_turn
from blsp_chat.prompt import Turn
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer, tone

REPEAT = "Please repeat the following words."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- sampling ------------------------------------------------------------------------------------
def test_sampling_follows_transformers_repetition_penalty_and_top_p():
    logits = torch.linspace(-5, 5, 50)  # id 49 is the best, 48 the next
    previous = [49, 3, 3]
    penalised = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([previous]), logits[None].clone())[0]
    assert next_token(logits, previous, GenerationOptions()) == 49
    assert next_token(logits, previous, GenerationOptions(repetition_penalty=1.4)) == int(penalised.argmax()) == 48
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    for top_p in (0.3, 0.9):
        nucleus = set(torch.isfinite(TopPLogitsWarper(top_p)(torch.tensor([[0]]), logits[None].clone())[0])
                      .nonzero().flatten().tolist())
        options = GenerationOptions(do_sample=True, temperature=1.0, top_p=top_p)
        generator = torch.Generator().manual_seed(3)
        draws = {next_token(logits, [], options, generator) for _ in range(300)}
        assert draws <= nucleus and len(nucleus) < 50
    wide = GenerationOptions(do_sample=True, temperature=1.0, top_p=1.0)  # the whole distribution
    generator = torch.Generator().manual_seed(3)
    assert not {next_token(logits, [], wide, generator) for _ in range(300)} <= nucleus


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    logits = torch.randn(50)
    options = GenerationOptions(do_sample=True, temperature=1.0, top_p=1e-6)
    assert next_token(logits, [], options) == int(logits.argmax())
    wide = GenerationOptions(do_sample=True, temperature=2.0, top_p=1.0)
    draws = [next_token(logits, [], wide, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    assert len({next_token(logits, [], wide) for _ in range(50)}) > 1


# --- fallback decoding -------------------------------------------------------------------------
def test_compression_ratio_flags_a_phrase_said_over_and_over():
    assert compression_ratio("") == 0.0
    assert compression_ratio("the weather is lovely today so let us walk to the park by the river") < 2.4
    assert compression_ratio("a period of time " * 12) > 2.4


def test_a_loop_is_one_phrase_three_times_at_the_end_spanning_enough_tokens():
    phrase = [5, 6, 7, 8]
    assert loops_at_end([1, 2] + phrase * 3, min_tokens=12)
    assert not loops_at_end([1, 2] + phrase * 3, min_tokens=13)  # too short to be sure
    assert not loops_at_end(phrase * 2, min_tokens=4)  # twice can be a figure of speech
    assert not loops_at_end(phrase * 3 + [9], min_tokens=4)  # it has moved on
    assert loops_at_end([3] * 24, min_tokens=24) and not loops_at_end([3] * 23, min_tokens=24)
    assert loops_at_end([1, 2, 3, 4, 5, 6] * 3, min_tokens=10)  # the longest phrase counts
    assert not loops_at_end([3] * 50, min_tokens=0)  # off
    assert not loops_at_end([], min_tokens=24)
    with pytest.raises(ValueError, match="loop_stop_tokens"):
        GenerationOptions(loop_stop_tokens=-1)


def test_whole_replies_stop_looping_unless_that_is_turned_off(tok):
    model = lively_blsp(seed=0)
    loaded = LoadedBlsp(model, tok, "tiny", adapter_trained=True)
    conversations, audios = [[Turn("human", text="hello there")], [Turn("human", text="the quick brown fox")]], [[], []]
    runs_on = generate_replies(loaded, conversations, audios, GenerationOptions(max_new_tokens=64, loop_stop_tokens=0))
    stopped = generate_replies(loaded, conversations, audios, GenerationOptions(max_new_tokens=64, loop_stop_tokens=8))
    ids = [tok(r, add_special_tokens=False).input_ids for r in runs_on + stopped]
    assert compression_ratio(runs_on[1]) > 2.4 and len(ids[1]) > 48  # the tiny model loops on the second prompt
    assert runs_on[1].startswith(stopped[1]) and len(ids[3]) < len(ids[1]) // 2
    assert not loops_at_end(ids[0], 8) and stopped[0] == runs_on[0]  # a reply that does not loop is left alone


def test_fallback_decodes_only_looping_replies_again_and_keeps_the_less_looping(tok):
    model = lively_blsp(seed=0)
    loaded = LoadedBlsp(model, tok, "tiny", adapter_trained=True)
    conversations = [[Turn("human", text="hello there")], [Turn("human", text="the quick brown fox")],
                     [speech_turn(tone(1.0), model, REPEAT)]]
    audios = [[], [], [tone(1.0)]]
    greedy = generate_replies(loaded, conversations, audios, GenerationOptions(max_new_tokens=48))
    ratios = [compression_ratio(reply) for reply in greedy]
    assert ratios[1] > 2.4 and ratios[0] < 2.4 and ratios[2] < 2.4  # the tiny model loops on the second prompt
    options = GenerationOptions(max_new_tokens=48, fallback_temperatures=(1.0,))
    caller_rng = torch.get_rng_state()
    retried = generate_replies(loaded, conversations, audios, options)
    assert torch.equal(torch.get_rng_state(), caller_rng)  # the fallback's seeding does not leak out
    assert retried[0] == greedy[0] and retried[2] == greedy[2]
    assert compression_ratio(retried[1]) < ratios[1]
    assert generate_replies(loaded, conversations, audios, options) == retried  # seeded: the same every run


def test_fallback_options_are_checked():
    with pytest.raises(ValueError, match="fallback temperatures"):
        GenerationOptions(fallback_temperatures=(0.0,))
    with pytest.raises(ValueError, match="compression_ratio_threshold"):
        GenerationOptions(compression_ratio_threshold=0.5)
    sampled = GenerationOptions(fallback_temperatures=(0.2, 0.4)).sampled_at(0.4)
    assert sampled.do_sample and sampled.temperature == 0.4 and sampled.top_p == 1.0
    assert not sampled.fallback_temperatures
