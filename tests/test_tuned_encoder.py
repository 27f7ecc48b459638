"""The encoder's top layers trained with the adapter (BlspConfig.encoder_tuned_layers, issue 30 item 5):
what trains and is saved, that splitting the encoder changes nothing until it trains, the cache of the
frozen layers, padding, save/load, learning-rate groups, a training run, and refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_adapter import corpus, train_config  # noqa: F401 (corpus is a fixture)
from test_weights import _logits, _write_base_models

from blsp_chat.config import BlspConfig
from blsp_chat.weights import LoadedBlsp, load_pretrained, save_adapter, save_checkpoint
from tiny import tiny_blsp, tiny_tokenizer, tone
from train.adapter_config import ModelSection
from train.loop import LoopConfig, make_optimizer
from train.speech_data import EncoderCache
from train.train_adapter import build_model, learning_rate_scales, run

TOP = {"whisper_model.layers.1.", "whisper_model.layer_norm."}  # the tiny encoder has 2 layers


def tuned_blsp(**kwargs):
    return tiny_blsp("none", encoder_tuned_layers=1, **kwargs)


def test_the_top_layer_and_final_norm_train_and_are_adapter_weights():
    model = tuned_blsp()
    names = set(model.adapter_state_dict())
    encoder_names = {k for k in names if k.startswith("whisper_model.")}
    assert encoder_names and all(k.startswith(tuple(TOP)) for k in encoder_names)
    assert not any(k.startswith("whisper_model.layers.0.") or k.startswith("whisper_model.conv") for k in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names
    (speech,) = model.encode_speech([tone(1.0)])
    speech.square().sum().backward()
    assert model.whisper_model.layers[1].fc1.weight.grad.abs().sum() > 0
    assert model.whisper_model.layers[0].fc1.weight.grad is None


def test_untrained_split_hears_exactly_what_the_frozen_encoder_hears():
    """Same weights, encoder split after layer 0: the same vectors reach the LLM."""
    whole, split = tiny_blsp("none", seed=4), tuned_blsp(seed=4)
    split.load_state_dict(whole.state_dict())
    audios = [tone(1.3), tone(2.1, 330)]
    for a, b in zip(whole.encode_speech(audios), split.encode_speech(audios)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_cache_holds_the_frozen_layers_frames_and_the_adapter_runs_the_rest():
    model = tuned_blsp()
    audio = tone(1.7)
    (windows,) = model.encode_windows([audio])
    whole = tiny_blsp("none")
    whole.load_state_dict(model.state_dict())
    (final,) = whole.encode_windows([audio])
    assert windows[0].shape == final[0].shape and not torch.allclose(windows[0], final[0])
    (speech,) = model.encode_speech([audio])
    torch.testing.assert_close(model.adapt_windows([windows])[0], speech)


def test_a_padded_batch_hears_each_clip_as_alone():
    model = tuned_blsp()
    audios = [tone(0.6), tone(2.9, 330), tone(1.4, 440)]
    for audio, together in zip(audios, model.encode_speech(audios)):
        (alone,) = model.encode_speech([audio])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_cache_entries_of_a_split_encoder_are_kept_apart(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"not read")
    whole = EncoderCache.for_model(tmp_path / "cache", tiny_blsp("none"))
    split = EncoderCache.for_model(tmp_path / "cache", tuned_blsp())
    assert whole.key(clip) != split.key(clip)


def test_round_trip_keeps_the_tuned_layers_and_nothing_else_of_the_encoder(tmp_path):
    model, tokenizer = tuned_blsp(seed=2), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    with torch.no_grad():  # as a run would leave them: different from the base encoder's on disk
        model.whisper_model.layers[1].fc2.weight.add_(0.5)
        model.whisper_model.layer_norm.bias.add_(0.1)
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "model.safetensors"))
    assert {k for k in saved if k.startswith("whisper_model.")} == {
        k for k in model.adapter_state_dict() if k.startswith("whisper_model.")}
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["encoder_tuned_layers"] == 1
    loaded = load_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert not loaded.model.encoder_fine_tuned  # the tuned layers are the adapter's, not a fine-tuned encoder
    audio = tone(1.5)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, tokenizer, audio),
                               atol=0, rtol=0)
    save_checkpoint(loaded.model, tmp_path / "again")
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(saved)


def test_untuned_checkpoints_keep_their_keys_and_whole_encoder_checkpoints_still_load(tmp_path):
    assert not any(k.startswith("whisper_model.") for k in tiny_blsp("none").adapter_state_dict())
    model, tokenizer = tuned_blsp(seed=5), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "finetuned", with_encoder=True)  # train.finetune's layout
    loaded = load_pretrained(str(tmp_path / "finetuned"), device="cpu")
    assert loaded.model.encoder_fine_tuned


def test_an_adapter_trained_over_the_frozen_encoder_warm_starts_into_tuned_layers(tmp_path):
    """model.init_adapter + model.encoder_tuned_layers: the same model, hearing the same, whose top layer now
    trains, and whose cache is the one a fresh tuned run fills."""
    tokenizer = tiny_tokenizer()
    _write_base_models(tiny_blsp("none"), tokenizer, tmp_path)
    bases = dict(whisper=str(tmp_path / "whisper"), llm=str(tmp_path / "llm"), encoder_padding="none")
    frozen = build_model(ModelSection(**bases, seed=6)).model  # as the frozen run built it
    save_adapter(frozen, tmp_path / "frozen")
    warm = build_model(ModelSection(init_adapter=str(tmp_path / "frozen"), **bases, encoder_tuned_layers=1)).model
    assert warm.config.encoder_tuned_layers == 1
    trainable = {n for n, p in warm.named_parameters() if p.requires_grad}
    assert trainable == set(warm.adapter_state_dict()) and any(n.startswith(tuple(TOP)) for n in trainable)
    audio = tone(1.5)
    torch.testing.assert_close(_logits(warm, tokenizer, audio), _logits(frozen, tokenizer, audio), atol=1e-5, rtol=1e-5)
    fresh = build_model(ModelSection(**bases, encoder_tuned_layers=1)).model  # as precompute_encoder builds it
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"not read")
    assert EncoderCache.for_model(tmp_path, warm).key(clip) == EncoderCache.for_model(tmp_path, fresh).key(clip)
    with pytest.raises(ValueError, match="cannot tune fewer"):
        warm.tune_top_encoder_layers(0)
    with pytest.raises(ValueError, match="between 0 and the encoder's 2 layers"):
        warm.tune_top_encoder_layers(3)


def test_a_warm_started_run_trains_the_top_layer_from_the_frozen_adapter(corpus, tmp_path):  # noqa: F811
    tokenizer = tiny_tokenizer()
    _write_base_models(tiny_blsp("none"), tokenizer, tmp_path)
    bases = dict(whisper=str(tmp_path / "whisper"), llm=str(tmp_path / "llm"), encoder_padding="none")
    frozen = build_model(ModelSection(**bases, seed=6)).model
    save_adapter(frozen, tmp_path / "frozen")
    config = train_config(corpus, tmp_path / "run", per_device_batch_size=16, num_epochs=2)
    config.model = ModelSection(init_adapter=str(tmp_path / "frozen"), **bases, encoder_tuned_layers=1)
    config.data.encoder_cache_dir = str(tmp_path / "cache")
    after = run(config).model.blsp.state_dict()
    before = frozen.state_dict()
    for key in ("whisper_model.layers.1.fc1.weight", "speech_ln.weight"):
        assert not torch.equal(before[key], after[key]), f"{key} did not train"
    assert torch.equal(before["whisper_model.layers.0.fc1.weight"], after["whisper_model.layers.0.fc1.weight"])
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"started from the adapter in `{tmp_path / 'frozen'}`" in card and "Whisper's top 1 layers" in card


@pytest.mark.parametrize("bad, match", [
    (dict(encoder_tuned_layers=1, encoder_padding="30s"), "encoder_padding 'none'"),
    (dict(encoder_tuned_layers=3, encoder_padding="none"), "between 0 and the encoder's 2 layers"),
    (dict(encoder_tuned_layers=-1, encoder_padding="none"), "between 0"),
])
def test_impossible_splits_are_refused(bad, match):
    model = tiny_blsp()
    with pytest.raises(ValueError, match=match):
        BlspConfig.from_base_configs(model.config.whisper(), model.config.llm(), **bad)


@pytest.mark.parametrize("bad, match", [
    (dict(encoder_tuned_layers=1), "encoder_padding 'none'"),
    (dict(encoder_tuned_layers=1, encoder_padding="none", encoder_learning_rate_scale=0.0), "above 0"),
])
def test_a_training_config_refuses_them_when_read(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelSection(**bad)


def test_tuned_layers_learn_at_the_scaled_rate_and_plain_runs_keep_their_two_groups():
    model = tuned_blsp()
    section = ModelSection(encoder_padding="none", encoder_tuned_layers=1, encoder_learning_rate_scale=0.1)
    config = LoopConfig(output_dir="unused", learning_rate=1e-3, weight_decay=0.01)
    wrapped = torch.nn.ModuleDict({"blsp": model})  # the objective's names: "blsp." + the model's
    groups = make_optimizer(wrapped, config, learning_rate_scales(section)).param_groups
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith("whisper_model.") and p.requires_grad}
    for group in groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
    plain = make_optimizer(tiny_blsp("none"), config).param_groups
    assert [(g["weight_decay"], g["lr"]) for g in plain] == [(0.01, 1e-3), (0.0, 1e-3)]
    assert [g["params"][0].ndim >= 2 for g in plain] == [True, False]


def test_a_run_trains_the_top_layer_leaves_the_rest_and_saves_a_loadable_model(corpus, tmp_path):  # noqa: F811
    loaded = LoadedBlsp(tuned_blsp(), tiny_tokenizer(), "tiny", adapter_trained=False)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    config = train_config(corpus, tmp_path / "run", per_device_batch_size=16, num_epochs=3)
    config.model = ModelSection(encoder_padding="none", encoder_tuned_layers=1)
    config.data.encoder_cache_dir = str(tmp_path / "cache")
    result = run(config, loaded=loaded)
    after = result.model.blsp.state_dict()
    assert not torch.equal(before["whisper_model.layers.1.fc1.weight"], after["whisper_model.layers.1.fc1.weight"])
    for key in ("whisper_model.layers.0.fc1.weight", "whisper_model.conv1.weight", "llama_model.lm_head.weight"):
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.equal(saved["whisper_model.layers.1.fc1.weight"], after["whisper_model.layers.1.fc1.weight"])
    assert not any(k.startswith("whisper_model.layers.0.") for k in saved)
    assert "Whisper's top 1 layers and final LayerNorm, at 0.1 x" in (tmp_path / "run" / "README.md").read_text()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(config.loop.learning_rate)  # the loop's rate, not the encoder's tenth
