"""The adapter that sees context (transformer layers after the subsampler): shapes, padding masks, what
trains, save/load, and that checkpoints without it load exactly as before."""
import json

import pytest
import torch
from test_weights import _logits, _write_base_models, write_sentencepiece_tokenizer

from blsp_chat import weights
from blsp_chat.adapter import ContextEncoder
from blsp_chat.config import BlspConfig
from blsp_chat.weights import load_pretrained, save_adapter
from tiny import tiny_blsp, tiny_tokenizer, tone

CONTEXT = dict(adapter_context_layers=2, adapter_context_heads=2, adapter_context_ffn_dim=16)


def test_context_layers_are_adapter_weights_and_train():
    model = tiny_blsp(**CONTEXT)
    names = model.adapter_state_dict()
    assert {k.split(".")[2] for k in names if k.startswith("context.layers.")} == {"0", "1"}
    assert names["context.layers.0.linear1.weight"].shape == (16, 24)
    assert names["context.norm.weight"].shape == (24,)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    model.train()
    (speech,) = model.encode_speech([tone(1.0)])
    speech.square().sum().backward()
    assert model.context.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_released_adapter_has_no_context_weights():
    assert not any(k.startswith("context.") for k in tiny_blsp().adapter_state_dict())
    assert tiny_blsp().context is None


@pytest.mark.parametrize("padding", ["30s", "none"])
def test_padded_batch_hears_each_clip_as_alone(padding):
    model = tiny_blsp(padding, **CONTEXT)
    audios = [tone(0.7), tone(3.3, 330), tone(1.9, 440)]
    for audio, together in zip(audios, model.encode_speech(audios)):
        (alone,) = model.encode_speech([audio])
        assert together.shape == (model.speech_token_count(len(audio)), 24)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_every_output_sees_the_whole_window():
    """Unlike the convolutions, a change at the clip's start reaches its last output."""
    encoder = ContextEncoder(8, 1, 2, 16).eval()
    frames = torch.randn(1, 30, 8)
    changed = frames.clone()
    changed[0, 0] = torch.randn(8)  # a different first frame (not a uniform shift, which LayerNorm removes)
    lengths = torch.tensor([30])
    assert not torch.allclose(encoder(frames, lengths)[0, -1], encoder(changed, lengths)[0, -1])


def test_padding_frames_are_zero_and_do_not_leak():
    encoder = ContextEncoder(8, 2, 2, 16).eval()
    frames = torch.randn(2, 10, 8)
    noisy = frames.clone()
    noisy[1, 4:] = 1e3  # garbage past row 1's length
    out = encoder(noisy, torch.tensor([10, 4]))
    assert out[1, 4:].abs().max() == 0
    torch.testing.assert_close(out[1, :4], encoder(frames[1:, :4], torch.tensor([4]))[0], atol=1e-5, rtol=1e-4)


def test_adapter_only_round_trip_keeps_the_context_layers(tmp_path):
    model, tokenizer = tiny_blsp("none", **CONTEXT), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    assert any(k.startswith("context.") for k in weights.read_state_dict(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert saved["adapter_context_layers"] == 2
    loaded = load_pretrained(str(tmp_path / "adapter"), device="cpu")
    audio = tone(1.5)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, tokenizer, audio),
                               atol=0, rtol=0)


def test_context_weights_without_the_config_are_refused(tmp_path):
    model, tokenizer = tiny_blsp("none", **CONTEXT), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    config["adapter_context_layers"] = 0
    (tmp_path / "adapter" / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="unexpected .*context"):
        load_pretrained(str(tmp_path / "adapter"), device="cpu")


def test_full_layout_with_context_layers_loads(tmp_path):
    model = tiny_blsp(**CONTEXT)
    directory = tmp_path / "full"
    directory.mkdir()
    model.config.save(directory)
    torch.save({k: v for k, v in model.state_dict().items() if k != "llama_model.lm_head.weight"},
               directory / "pytorch_model.bin")
    write_sentencepiece_tokenizer(directory)
    loaded = load_pretrained(str(directory), device="cpu")
    audio = tone(2.0)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, loaded.tokenizer, audio))


@pytest.mark.parametrize("bad, match", [
    (dict(adapter_context_layers=-1), "adapter_context_layers"),
    (dict(adapter_context_layers=1, adapter_context_heads=0), "adapter_context_heads"),
])
def test_impossible_context_settings_are_refused(bad, match):
    model = tiny_blsp()
    with pytest.raises(ValueError, match=match):
        BlspConfig.from_base_configs(model.config.whisper(), model.config.llm(), **bad)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="must divide the LLM's embedding width"):
        tiny_blsp(adapter_context_layers=1, adapter_context_heads=5)  # width 24
