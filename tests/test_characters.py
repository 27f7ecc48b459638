"""CTC over characters: spelling transcripts into targets, greedy decoding, the adapter's character head
(its weights, save/load, refusals) and the readout that hands the LLM the word pieces of the text heard."""
import json

import pytest
import torch
from test_weights import _write_base_models

from blsp_chat import weights
from blsp_chat.characters import BLANK, ENGLISH_ALPHABET, check_alphabet, greedy_characters, learn_symbols, spell
from blsp_chat.config import BlspConfig
from blsp_chat.ctc_decode import character_beam_search
from blsp_chat.heard import heard_text
from blsp_chat.weights import LoadedBlsp, choose_speech_search, load_pretrained, save_adapter
from tiny import tiny_blsp, tiny_tokenizer, tone

CHARACTERS = dict(speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)


def spelled(text: str) -> str:
    return "".join(ENGLISH_ALPHABET[i - 1] for i in spell(text, ENGLISH_ALPHABET))


def scores_spelling(text: str, repeat: int = 2) -> torch.Tensor:
    """(L, N+1) scores a head would give while hearing `text`: each character held `repeat` outputs, a blank
    after each (so doubled letters survive the merge)."""
    rows = []
    for c in text:
        rows += [ENGLISH_ALPHABET.index(c) + 1] * repeat + [BLANK]
    return torch.nn.functional.one_hot(torch.tensor(rows), len(ENGLISH_ALPHABET) + 1).float()


def test_transcripts_are_spelled_in_lower_case_without_punctuation():
    assert spelled("Well-known, Dashwood\u2019s 2 CATS!") == "well known dashwood's 2 cats"
    assert spelled("  Caf\u00e9 na\u00efve\u2014r\u00e9sum\u00e9 ") == "cafe naive resume"
    assert spelled("Hello... (there)\n\tfriend") == "hello there friend"
    assert spelled("\u00bf\u00a1?!") == ""
    assert spell("ab", "ba ") == [2, 1]  # classes follow the alphabet's order, from 1 (0 is the blank)


def test_greedy_decoding_merges_runs_keeps_doubled_letters_and_drops_blanks():
    assert greedy_characters(scores_spelling("look at  that"), ENGLISH_ALPHABET) == "look at that"
    merged = torch.nn.functional.one_hot(torch.tensor([3, 3, 0, 3, 1, 1, 2, 0, 0]), 39).float()
    assert greedy_characters(merged, ENGLISH_ALPHABET) == "bb a"  # a run is one letter; a blank parts two
    assert greedy_characters(scores_spelling("   "), ENGLISH_ALPHABET) == ""
    assert greedy_characters(torch.zeros(0, 39), ENGLISH_ALPHABET) == ""


@pytest.mark.parametrize("alphabet, match", [("abc", "needs the space"), (" abca", r"repeated: \['a'\]")])
def test_alphabets_without_a_space_or_with_repeats_are_refused(alphabet, match):
    with pytest.raises(ValueError, match=match):
        check_alphabet(alphabet)


# --- symbols of several characters ------------------------------------------------------------------------
SYMBOL_TEXTS = ["The cat sat on the mat.", "The theory of the thing", "there, then: the end"]


def test_symbols_are_the_letters_then_the_most_frequent_merges_learnt_the_same_every_time():
    symbols = learn_symbols(SYMBOL_TEXTS, 44)
    assert symbols[:len(ENGLISH_ALPHABET)] == list(ENGLISH_ALPHABET)
    # "th" (9 words), then "th"+"e" (8), "at" (cat, sat, mat); then pairs seen once, the first met first
    assert symbols[len(ENGLISH_ALPHABET):] == ["th", "the", "at", "cat", "sat", "on"]
    assert learn_symbols(SYMBOL_TEXTS, 44) == symbols
    whole = learn_symbols(SYMBOL_TEXTS, 10_000)  # merges until every word is one symbol, then stops
    assert {"the", "theory", "thing", "there", "then", "end", "mat"} <= set(whole) and len(whole) < 70
    check_alphabet(symbols)
    with pytest.raises(ValueError, match="cannot hold the 38 letters"):
        learn_symbols(SYMBOL_TEXTS, 20)


def test_words_are_spelled_by_their_longest_symbols_and_read_back_as_they_were():
    symbols = learn_symbols(SYMBOL_TEXTS, 44)
    ids = spell("Then THE theatre, Cat!", symbols)
    assert [symbols[i - 1] for i in ids] == ["the", "n", " ", "the", " ", "the", "at", "r", "e", " ", "cat"]
    for text in ["then the theatre cat", "zebra's 42 quiche", "the"]:
        one_hot = torch.nn.functional.one_hot(torch.tensor([c for i in spell(text, symbols) for c in (i, BLANK)]),
                                              len(symbols) + 1).float()
        assert greedy_characters(one_hot, symbols) == text


def test_the_search_holds_a_symbol_only_where_the_same_symbol_was_heard_last():
    symbols = [" ", "e", "h", "t", "the"]
    the, e = symbols.index("the") + 1, symbols.index("e") + 1
    outputs = torch.nn.functional.one_hot(torch.tensor([the, the, e, e, BLANK]), len(symbols) + 1).float()
    scores = (outputs * 0.99 + 0.01 / len(symbols)).log()
    assert character_beam_search(scores, symbols, lambda text: [1] * len(text), None) == \
        greedy_characters(scores, symbols) == "thee"  # "e" after "the" is new, though the text ends in "e"


@pytest.mark.parametrize("symbols, match", [
    ([" ", "a", "b", "ab", "ab"], r"repeated: \['ab'\]"),
    ([" ", "a", "b", "a b"], "the space is a symbol of its own"),
    ([" ", "a", "abc"], r"missing: \['b', 'c'\]"),
    ([" ", "a", ""], "non-empty strings"),
])
def test_symbol_alphabets_that_cannot_spell_every_word_or_name_a_symbol_twice_are_refused(symbols, match):
    with pytest.raises(ValueError, match=match):
        check_alphabet(symbols)


def test_a_symbol_head_saves_its_symbols_and_loads_hearing_the_same(tmp_path):
    symbols = learn_symbols(SYMBOL_TEXTS, 44)
    model, tokenizer = tiny_blsp("none", speech_readout="ctc", ctc_alphabet=symbols), tiny_tokenizer()
    assert model.ctc_head.weight.shape == (45, 24)
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["ctc_alphabet"] == symbols
    loaded = load_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert loaded.model.config.ctc_alphabet == symbols
    torch.testing.assert_close(loaded.model.ctc_head.weight, model.ctc_head.weight, atol=0, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(ctc_alphabet=ENGLISH_ALPHABET), "only speech_readout 'ctc' reads"),
    (dict(speech_readout="ctc", ctc_alphabet="ab"), "needs the space"),
])
def test_impossible_character_settings_are_refused(bad, match):
    model = tiny_blsp()
    with pytest.raises(ValueError, match=match):
        BlspConfig.from_base_configs(model.config.whisper(), model.config.llm(), **bad)


def test_the_character_head_is_an_adapter_weight_and_only_character_models_have_one():
    model = tiny_blsp("none", **CHARACTERS)
    names = model.adapter_state_dict()
    assert names["ctc_head.weight"].shape == (len(ENGLISH_ALPHABET) + 1, 24)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert tiny_blsp().ctc_head is None and not any(k.startswith("ctc_head") for k in tiny_blsp().adapter_state_dict())


def test_the_readout_hands_the_llm_the_word_pieces_of_the_text_spelled(monkeypatch):
    model = tiny_blsp("none", **CHARACTERS)
    tokenizer = tiny_tokenizer()
    LoadedBlsp(model, tokenizer, "tiny", adapter_trained=True)  # pairs the model with its tokenizer
    table = model.llama_model.get_input_embeddings().weight
    monkeypatch.setattr(model.ctc_head, "forward", lambda speech: scores_spelling("hello there"))
    read = model.read_out(torch.zeros(33, 24))
    pieces = tokenizer(" hello there", add_special_tokens=False).input_ids
    torch.testing.assert_close(read, table[pieces])
    assert heard_text(model, tokenizer, read) == "hello there"  # what the app shows as heard
    monkeypatch.setattr(model.ctc_head, "forward", lambda speech: scores_spelling("  "))
    assert model.read_out(torch.zeros(6, 24)).shape == (0, 24)  # heard nothing: no position at all


def test_a_model_never_paired_with_its_tokenizer_says_what_is_missing(monkeypatch):
    model = tiny_blsp("none", **CHARACTERS)
    monkeypatch.setattr(model.ctc_head, "forward", lambda speech: scores_spelling("hi"))
    with pytest.raises(RuntimeError, match="needs the LLM's tokenizer"):
        model.read_out(torch.zeros(6, 24))


def test_real_clips_never_take_more_positions_than_the_prompt_allows():
    model = tiny_blsp("none", **CHARACTERS)
    LoadedBlsp(model, tiny_tokenizer(), "tiny", adapter_trained=True)
    with torch.no_grad():
        model.ctc_head.bias[BLANK] = -10.0  # a head that spells something at every output
    for seconds in (0.3, 1.7):
        (speech,) = model.encode_speech([tone(seconds)])
        assert 0 < speech.shape[0] <= model.speech_token_count(int(seconds * 16000))


def test_adapter_only_round_trip_keeps_the_head_and_what_it_hears(tmp_path):
    model, tokenizer = tiny_blsp("none", **CHARACTERS), tiny_tokenizer()
    LoadedBlsp(model, tokenizer, "tiny", adapter_trained=True)
    with torch.no_grad():
        model.ctc_head.bias[BLANK] = -10.0
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["ctc_alphabet"] == ENGLISH_ALPHABET
    loaded = load_pretrained(str(tmp_path / "adapter"), device="cpu")
    torch.testing.assert_close(loaded.model.ctc_head.weight, model.ctc_head.weight, atol=0, rtol=0)
    audio = tone(1.5)
    torch.testing.assert_close(loaded.model.encode_speech([audio])[0], model.encode_speech([audio])[0], atol=0, rtol=0)


def test_head_weights_without_the_alphabet_are_refused(tmp_path):
    model, tokenizer = tiny_blsp("none", **CHARACTERS), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    del config["ctc_alphabet"]
    config["ctc_blank_id"] = 5
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="unexpected .*ctc_head"):
        load_pretrained(str(tmp_path / "adapter"), device="cpu")


def test_a_character_model_searches_as_its_checkpoint_says():
    config = tiny_blsp("none", **CHARACTERS, ctc_lm_weight=0.4).config
    choose_speech_search(config, "fused")
    assert config.ctc_lm_weight == 0.4
    choose_speech_search(config, "greedy")
    assert config.ctc_lm_weight == 0.0
    with pytest.raises(weights.WeightsError, match="no fused search"):
        choose_speech_search(config, "fused")


# --- the character search with the LLM fused in -----------------------------------------------------------
ALPHABET = " acehnot"
PIECES = {" the": [10], " cat": [11, 12], " cot": [13], " on": [14], " to": [15], " too": [16]}


def word_pieces(text: str) -> list[int]:
    """A word the table does not know is spelled piece by piece, as a BPE spells an unknown string."""
    return [p for word in text.split() for p in PIECES.get(" " + word, [99] * len(word))]


def heard(*outputs: str | dict[str, float]) -> torch.Tensor:
    """(L, N+1) log-probabilities: one output per item, a character heard surely or a {character: p} choice
    (the rest of the mass spread over the other classes), each followed by a sure blank."""
    rows = []
    for output in outputs:
        choice = {output: 0.99} if isinstance(output, str) else output
        row = torch.full((len(ALPHABET) + 1,), (1 - sum(choice.values())) / len(ALPHABET))
        for c, p in choice.items():
            row[ALPHABET.index(c) + 1] = p
        blank = torch.full((len(ALPHABET) + 1,), 0.001 / len(ALPHABET))
        blank[BLANK] = 0.999
        rows += [row, blank]
    return torch.stack(rows).log()


def favouring(*pieces: int, unlikely: float = -8.0):
    """An LM scorer for which `pieces` are likely and every other piece unlikely, after any prefix; it
    records the prefixes it was asked about."""
    calls = []

    def lm(prefixes):
        calls.extend(prefixes)
        row = torch.full((100,), unlikely)
        row[list(pieces)] = -0.5
        return [row] * len(prefixes)

    return lm, calls


THE_COT = heard(*"the c", {"o": 0.55, "a": 0.4}, "t")  # "cot" by a little


def test_the_search_without_an_lm_finds_what_greedy_decoding_finds():
    assert character_beam_search(THE_COT, ALPHABET, word_pieces, None, beam_size=8) == \
        greedy_characters(THE_COT, ALPHABET) == "the cot"
    doubled = heard(*"too", " ", " ", *"on")  # a doubled letter, and a doubled space that adds nothing
    assert character_beam_search(doubled, ALPHABET, word_pieces, None) == "too on"


def test_the_llm_turns_a_word_it_finds_unlikely_into_one_that_sounds_alike():
    lm, calls = favouring(10, 11, 12)
    assert character_beam_search(THE_COT, ALPHABET, word_pieces, lm, lm_weight=1.0, beam_size=8) == "the cat"
    lm, calls = favouring(10, 13)
    assert character_beam_search(THE_COT, ALPHABET, word_pieces, lm, lm_weight=1.0, beam_size=8) == "the cot"


def test_each_word_is_scored_piece_by_piece_after_the_words_before_it():
    lm, calls = favouring(10, 11, 12)
    character_beam_search(heard(*"the cat"), ALPHABET, word_pieces, lm, lm_weight=1.0, beam_size=1)
    assert calls == [(), (10,), (10, 11)]  # " the" from the start; " cat"'s two pieces after it, once each


def test_the_piece_bonus_offsets_the_lms_preference_for_fewer_pieces():
    the_cat = heard(*"the c", {"a": 0.55, "o": 0.4}, "t")  # "cat" (two pieces) by a little over "cot" (one)
    flat, _ = favouring(unlikely=-2.0)  # every piece as likely as any other: each costs the same
    assert character_beam_search(the_cat, ALPHABET, word_pieces, flat, lm_weight=1.0, beam_size=8) == "the cot"
    assert character_beam_search(the_cat, ALPHABET, word_pieces, flat, lm_weight=1.0, token_bonus=2.0,
                                 beam_size=8) == "the cat"


def test_a_fused_character_model_reads_through_the_llm_and_keeps_what_it_clearly_heard(monkeypatch):
    model = tiny_blsp("none", **CHARACTERS, ctc_lm_weight=0.3, ctc_token_bonus=0.5)
    tokenizer = tiny_tokenizer()
    LoadedBlsp(model, tokenizer, "tiny", adapter_trained=True)
    monkeypatch.setattr(model.ctc_head, "forward", lambda speech: scores_spelling("hello there").log())
    forwards = []
    llm_forward = model.llama_model.forward
    monkeypatch.setattr(model.llama_model, "forward", lambda *a, **k: forwards.append(1) or llm_forward(*a, **k))
    read = model.read_out(torch.zeros(33, 24))
    table = model.llama_model.get_input_embeddings().weight
    torch.testing.assert_close(read, table[tokenizer(" hello there", add_special_tokens=False).input_ids])
    assert forwards  # the LLM scored the words


def test_a_word_not_yet_ended_carries_the_lms_expected_cost_so_words_are_not_run_together():
    """Every piece costs the LM 3 nats and the head is only 60% sure of each space: a beam that leaves the
    spaces out would pay the LM only at the clip's end, and without the estimate it wins ("thecatonthecot")."""
    lm, _ = favouring(unlikely=-3.0)
    spoken = "the cat on the cot"
    outputs = [{" ": 0.6} if c == " " else c for c in spoken]
    assert character_beam_search(heard(*outputs), ALPHABET, word_pieces, lm, lm_weight=1.0) == spoken
