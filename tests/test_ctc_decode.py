"""CTC prefix beam search, with and without a language model fused in."""
import math

import torch

from blsp_chat.adapter import collapse_ctc, embedding_distance_logits
from blsp_chat.ctc_decode import cached_lm, prefix_beam_search
from blsp_chat.model import CTC_BEAM_LABELS
from tiny import tiny_blsp, tone

BLANK = 0


def frames(*rows):
    """Per-output probabilities {label: p} -> the (L, k) log-probabilities and ids prefix_beam_search takes."""
    labels = sorted({label for row in rows for label in row})
    log_probs = torch.tensor([[math.log(row.get(label, 1e-12)) for label in labels] for row in rows])
    return log_probs.sort(dim=-1, descending=True).values, torch.tensor(labels)[log_probs.argsort(dim=-1, descending=True)]


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
    pieces = prefix_beam_search(top.values, top.indices, 5, cached_lm(model.next_piece_log_probs),
                                lm_weight=0.3, token_bonus=0.5)
    (speech,) = model.encode_speech([audio])
    torch.testing.assert_close(speech, table[pieces or [5]])
    assert model.speech_token_count(len(audio)) == raw.shape[0] >= speech.shape[0]


def test_the_llm_scores_prefixes_as_plain_text_whatever_their_padding():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=1.0)
    alone = model.next_piece_log_probs([(7,)])
    padded = model.next_piece_log_probs([(7,), (3, 9, 11, 7)])
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(alone.exp().sum(-1), torch.ones(1))
    model.llama_model.config.bos_token_id = None  # an LLM without a BOS token starts from its EOS
    assert model.next_piece_log_probs([(7,)]).shape == alone.shape
