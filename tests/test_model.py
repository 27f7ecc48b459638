"""BlspModel on tiny in-memory models: shapes, merging, labels, positions, both encoder paths."""
import pytest
import torch

from blsp_chat.adapter import Conv1dSubsampler
from blsp_chat.config import GenerationOptions
from blsp_chat.constants import IGNORE_INDEX, N_SAMPLES, SAMPLE_RATE
from blsp_chat.ctc_decode import collapse_ctc
from blsp_chat.model import merge_speech, split_into_windows, window_lengths
from blsp_chat.prompt import Turn, position_ids_from_mask, render
from blsp_chat.readout import ctc_readout, embedding_distance_logits
from tiny import tiny_blsp, tiny_tokenizer, tone


@pytest.mark.parametrize("kernels", [[5, 5, 5], [3, 3], [5]])
def test_subsampler_output_lengths_match_formula(kernels):
    sub = Conv1dSubsampler(8, 12, kernels)
    for length in [1, 2, 3, 7, 8, 9, 100, 1499, 1500]:
        out, out_len = sub(torch.randn(1, length, 8), torch.tensor([length]))
        assert out.shape == (1, int(out_len), 12)
        expected = length
        for _ in kernels:
            expected = (expected - 1) // 2 + 1
        assert int(out_len) == expected


def test_released_parameter_names_and_shapes():
    model = tiny_blsp()
    names = dict(model.adapter_state_dict())
    # d_whisper=16 -> 16 -> 16 -> d_llm=24, GLU doubling each conv's outputs; bottleneck 24 -> 8 -> 24.
    assert names["subsampler.conv_layers.0.weight"].shape == (32, 16, 5)
    assert names["subsampler.conv_layers.2.weight"].shape == (48, 16, 5)
    assert names["adapter.fc1.weight"].shape == (8, 24) and "adapter.fc1.bias" not in names
    assert names["speech_ln.weight"].shape == (24,)
    assert any(k.startswith("whisper_model.layers.0") for k in model.state_dict())
    assert any(k.startswith("llama_model.model.layers.0") for k in model.state_dict())


def test_only_the_adapter_is_trainable():
    model = tiny_blsp()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("subsampler.", "adapter.", "speech_ln.")) for n in trainable)
    assert model.num_trainable_parameters() == sum(v.numel() for v in model.adapter_state_dict().values())
    model.train()
    assert not model.whisper_model.training and not model.llama_model.training


@pytest.mark.parametrize("padding", ["30s", "none"])
def test_speech_token_count_matches_encoder_output(padding):
    model = tiny_blsp(padding)
    for seconds in [0.2, 1.0, 2.71, 29.99, 30.0]:
        audio = tone(seconds)
        (embeds,) = model.encode_speech([audio])
        assert embeds.shape == (model.speech_token_count(len(audio)), 24)


@pytest.mark.parametrize("padding", ["30s", "none"])
def test_batched_mixed_lengths_equal_one_by_one(padding):
    model = tiny_blsp(padding)
    audios = [tone(0.7), tone(3.3, 330), tone(1.9, 440)]
    batched = model.encode_speech(audios)
    for audio, together in zip(audios, batched):
        (alone,) = model.encode_speech([audio])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_unpadded_path_sees_the_same_speech_as_the_padded_one():
    """Both paths run the same weights; away from the clip's end the frames agree closely."""
    audio = tone(2.0)
    padded = tiny_blsp("30s").encode_speech([audio])[0]
    unpadded = tiny_blsp("none").encode_speech([audio])[0]
    assert padded.shape == unpadded.shape
    cosine = torch.nn.functional.cosine_similarity(padded, unpadded, dim=-1)
    assert cosine.mean() > 0.9


def test_long_audio_is_heard_whole_in_windows():
    model = tiny_blsp("none")
    audio = tone(70.0)
    expected = [N_SAMPLES, N_SAMPLES, 10 * SAMPLE_RATE]
    assert [len(w) for w in split_into_windows(audio)] == window_lengths(len(audio)) == expected
    (embeds,) = model.encode_speech([audio])
    parts = [model.encode_speech([w])[0] for w in split_into_windows(audio)]
    torch.testing.assert_close(embeds, torch.cat(parts), atol=1e-5, rtol=1e-4)
    assert embeds.shape[0] == model.speech_token_count(len(audio))


def test_merge_fills_placeholders_in_order_and_rejects_count_mismatch():
    embeds = torch.zeros(2, 5, 3)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    speech = [torch.full((2, 3), 7.0), torch.full((1, 3), 9.0)]
    merged = merge_speech(embeds, mask, speech)
    assert merged[0, 1:3].eq(7).all() and merged[1, 3].eq(9).all() and merged[~mask].eq(0).all()
    with pytest.raises(ValueError, match=r"placeholder count \(3\) does not match .* \(2\)"):
        merge_speech(embeds, mask, speech[:1])


def test_position_ids_ignore_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def _speech_example(model, tokenizer, audio, response="hello there"):
    turns = [Turn("human", instruction="Please repeat the following words.",
                  speech_tokens=model.speech_token_count(len(audio))),
             Turn("assistant", text=response)]
    return render(turns, tokenizer, add_eos=True)


def test_labels_cover_only_the_response_and_eos():
    model, tokenizer = tiny_blsp(), tiny_tokenizer()
    prompt = _speech_example(model, tokenizer, tone(1.0))
    response_ids = tokenizer("hello there", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    learned = [label for label in prompt.labels if label != IGNORE_INDEX]
    assert learned == response_ids
    assert prompt.labels[-len(response_ids):] == response_ids
    assert all(label == IGNORE_INDEX for label, speech in zip(prompt.labels, prompt.speech_mask) if speech)


def _batch(prompts, pad_id, left=False):
    width = max(len(p) for p in prompts)
    def pad(seq, value):
        gap = [value] * (width - len(seq))
        return gap + list(seq) if left else list(seq) + gap
    return (torch.tensor([pad(p.input_ids, pad_id) for p in prompts]),
            torch.tensor([pad([1] * len(p), 0) for p in prompts]),
            torch.tensor([pad(p.speech_mask, False) for p in prompts]),
            torch.tensor([pad(p.labels, IGNORE_INDEX) for p in prompts]))


def test_forward_returns_loss_only_with_labels_and_batches_like_singles():
    model, tokenizer = tiny_blsp(), tiny_tokenizer()
    audios = [tone(0.8), tone(2.4, 330)]
    prompts = [_speech_example(model, tokenizer, a, r) for a, r in zip(audios, ["hello there", "the lazy dog"])]
    ids, attn, speech, labels = _batch(prompts, tokenizer.pad_token_id)
    assert model(ids, attn, speech, audios=audios).loss is None
    batched = model(ids, attn, speech, audios=audios, labels=labels)
    assert torch.isfinite(batched.loss)
    for row, (prompt, audio) in enumerate(zip(prompts, audios)):
        one = model(*_batch([prompt], tokenizer.pad_token_id)[:3], audios=[audio]).logits[0]
        torch.testing.assert_close(batched.logits[row, : len(prompt)], one, atol=1e-4, rtol=1e-4)


def test_left_padded_generation_matches_unpadded():
    model, tokenizer = tiny_blsp(), tiny_tokenizer()
    audios = [tone(0.8), tone(2.4, 330)]
    turns = [[Turn("human", speech_tokens=model.speech_token_count(len(a)))] for a in audios]
    prompts = [render(t, tokenizer) for t in turns]
    ids, attn, speech, _ = _batch(prompts, tokenizer.pad_token_id, left=True)
    options = GenerationOptions(max_new_tokens=5, repetition_penalty=1.0)
    together = model.generate(ids, attn, speech, audios=audios, options=options, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)
    for row, (prompt, audio) in enumerate(zip(prompts, audios)):
        alone = model.generate(*_batch([prompt], tokenizer.pad_token_id)[:3], audios=[audio], options=options,
                               eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        assert together[row].tolist() == alone[0].tolist()


def test_any_causal_lm_works_qwen2():
    model, tokenizer = tiny_blsp(llm_kind="qwen2"), tiny_tokenizer()
    prompt = _speech_example(model, tokenizer, tone(1.0))
    ids, attn, speech, labels = _batch([prompt], tokenizer.pad_token_id)
    assert torch.isfinite(model(ids, attn, speech, audios=[tone(1.0)], labels=labels).loss)


def test_loss_gradient_reaches_only_the_adapter():
    model, tokenizer = tiny_blsp(), tiny_tokenizer()
    prompt = _speech_example(model, tokenizer, tone(1.0))
    ids, attn, speech, labels = _batch([prompt], tokenizer.pad_token_id)
    model(ids, attn, speech, audios=[tone(1.0)], labels=labels).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith(("subsampler.", "adapter.", "speech_ln.")) for n in grads)
    assert len(grads) == len(model.adapter_state_dict())


def test_fresh_speech_vectors_start_at_the_word_embedding_scale():
    model = tiny_blsp()
    embedding_norm = model.llama_model.get_input_embeddings().weight.norm(dim=-1).mean()
    speech = model.speech_ln(torch.randn(50, 24) * 7)
    ratio = float(speech.norm(dim=-1).mean() / embedding_norm)
    assert 0.7 < ratio < 1.4, ratio


def readout_table():
    torch.manual_seed(0)
    return torch.randn(6, 4)  # 6 words; word 0 is the blank


def test_ctc_readout_drops_blanks_and_merges_runs_into_one_vector_per_word():
    table = readout_table()
    heard = [1, 1, 0, 1, 3, 3, 0, 0, 5]  # greedy CTC: 1, 1, 3, 5
    speech = table[heard] + 0.01 * torch.randn(len(heard), 4)
    out = ctc_readout(speech, table, blank_id=0, temperature=1e-3)
    torch.testing.assert_close(out, table[[1, 1, 3, 5]])
    ids = embedding_distance_logits(speech, table).argmax(-1).tolist()
    assert collapse_ctc(ids, blank_id=0) == [1, 1, 3, 5]


def test_ctc_readout_is_the_mean_posterior_of_each_segment_times_the_table(monkeypatch):
    table = readout_table()
    speech = table[[2, 2, 0, 4]] + 0.3 * torch.randn(4, 4)
    labels = embedding_distance_logits(speech, table).argmax(-1)
    assert labels.tolist() == [2, 2, 0, 4]
    posteriors = torch.softmax(embedding_distance_logits(speech, table) / 2.0, dim=-1)
    expected = torch.stack([posteriors[:2].mean(0), posteriors[3]]) @ table
    torch.testing.assert_close(ctc_readout(speech, table, 0, temperature=2.0), expected)
    monkeypatch.setattr("blsp_chat.readout.READOUT_CHUNK", 1)  # chunking changes nothing
    torch.testing.assert_close(ctc_readout(speech, table, 0, temperature=2.0), expected)


def test_ctc_readout_of_only_blanks_or_of_nothing_is_nothing():
    table = readout_table()
    assert ctc_readout(table[[0, 0, 0]], table, 0, 0.1).shape == (0, 4)
    assert ctc_readout(torch.zeros(0, 4), table, 0, 0.1).shape == (0, 4)


def test_ctc_readout_model_lays_out_one_position_per_word_heard():
    model = tiny_blsp("none", speech_readout="ctc", ctc_blank_id=5)
    audio = tone(2.0)
    (speech,) = model.encode_speech([audio])
    raw = model.adapt_windows(model.encode_windows([audio]))[0]
    table = model.llama_model.get_input_embeddings().weight
    words = collapse_ctc(embedding_distance_logits(raw, table).argmax(-1).tolist(), blank_id=5)
    assert speech.shape == (max(len(words), 1), 24)
    assert speech.shape[0] <= model.speech_token_count(len(audio)) == raw.shape[0]
    assert model.speech_length_varies and not tiny_blsp("none").speech_length_varies


@pytest.mark.parametrize("bad, match", [
    (dict(speech_readout="tokens"), "speech_readout must be one of"),
    (dict(speech_readout="ctc"), "needs ctc_blank_id"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_readout_temperature=0.0), "temperature must be positive"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_lm_weight=-0.1), "ctc_lm_weight must be >= 0"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_beam_size=0), "ctc_beam_size >= 1"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_label_min_log_prob=0.5), "is a log-probability"),
    (dict(speech_readout="ctc", ctc_blank_id=5, ctc_beam_prune_log_prob=1.0), "ctc_beam_prune_log_prob is a"),
])
def test_readout_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_blsp(**bad)


def test_ctc_readout_keeps_only_the_nearest_words_of_each_posterior_without_changing_it(monkeypatch):
    torch.manual_seed(1)
    table = torch.randn(500, 8)
    speech = table[torch.randint(0, 500, (40,))] + 0.3 * torch.randn(40, 8)
    truncated = ctc_readout(speech, table, blank_id=0, temperature=0.1)
    monkeypatch.setattr("blsp_chat.readout.READOUT_TOP_K", 500)  # the whole posterior
    torch.testing.assert_close(truncated, ctc_readout(speech, table, blank_id=0, temperature=0.1))
