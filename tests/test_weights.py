"""Checkpoints: adapter-only round trip, the released full layout, the cache, and bad files."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import WhisperModel

from blsp_chat import weights
from blsp_chat.config import BlspConfig
from blsp_chat.model import BlspModel
from blsp_chat.offline import WeightsError
from blsp_chat.prompt import Turn, render
from blsp_chat.readout import ctc_readout
from blsp_chat.weights import load_pretrained, save_adapter
from tiny import TRAINING_TEXT, VOCAB, tiny_blsp, tiny_tokenizer, tone
from train.export_adapter import export
from train.export_adapter import main as export_main


def _logits(model, tokenizer, audio):
    prompt = render([Turn("human", instruction="hi", speech_tokens=model.speech_token_count(len(audio)))], tokenizer)
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), torch.tensor([prompt.speech_mask]), audios=[audio]).logits


def _write_base_models(model, tokenizer, tmp_path):
    """Save the tiny model's frozen parts the way a user's local base models would be laid out."""
    whisper = WhisperModel(model.config.whisper())
    whisper.encoder.load_state_dict(model.whisper_model.state_dict())
    whisper.save_pretrained(tmp_path / "whisper")
    model.feature_extractor.save_pretrained(tmp_path / "whisper")
    model.llama_model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    model.config.whisper_name_or_path = str(tmp_path / "whisper")
    model.config.llm_name_or_path = str(tmp_path / "llm")


def test_adapter_only_round_trip_gives_identical_logits(tmp_path):
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    saved = set(weights.read_state_dict(tmp_path / "adapter"))
    assert saved == set(model.adapter_state_dict())  # only trainable weights are written
    loaded = load_pretrained(str(tmp_path / "adapter"), device="cpu")
    assert loaded.adapter_trained and loaded.model.config.encoder_padding == "none"
    audio = tone(1.5)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, tokenizer, audio), atol=0,
                               rtol=0)
    from_path = load_pretrained(tmp_path / "adapter", device="cpu")  # a pathlib.Path names the same directory
    torch.testing.assert_close(_logits(from_path.model, from_path.tokenizer, audio), _logits(model, tokenizer, audio),
                               atol=0, rtol=0)


def test_exported_float16_adapter_loads_with_its_record(tmp_path):
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "run")
    (tmp_path / "run" / "README.md").write_text("# card\n")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert export(tmp_path / "run", tmp_path / "shipped", torch.float16) == ["README.md"]
    stored = weights.read_state_dict(tmp_path / "shipped")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert not (tmp_path / "shipped" / "metrics.jsonl").exists()  # the run's logs stay behind
    loaded = load_pretrained(str(tmp_path / "shipped"), device="cpu")
    assert loaded.model.speech_ln.weight.dtype == torch.float32
    audio = tone(1.5)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, tokenizer, audio),
                               atol=2e-3, rtol=2e-3)


def write_sentencepiece_tokenizer(directory):
    """A Llama tokenizer as the released checkpoint has it: only a sentencepiece tokenizer.model (byte
    fallback, <unk>=0 <s>=1 </s>=2, no pad token) and the configs the slow LlamaTokenizer saves beside it."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAINING_TEXT), model_writer=proto, model_type="bpe",
                                   vocab_size=VOCAB - 20, hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
         **specials}))
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def test_released_full_checkpoint_layout_loads(tmp_path):
    """config keys whisper_config/llama_config/conv_kernel_sizes/adapter_inner_dim, one pytorch_model.bin
    holding whisper_model.*, llama_model.*, subsampler.*, adapter.*, speech_ln.*, and a sentencepiece tokenizer"""
    model = tiny_blsp()
    released = tmp_path / "blsp_lslm"
    released.mkdir()
    config = {"whisper_config": model.config.whisper_config, "llama_config": model.config.llama_config,
              "conv_kernel_sizes": "5,5,5", "adapter_inner_dim": 8, "model_type": "blsp",
              "architectures": ["BlspModel"]}
    (released / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in model.state_dict().items() if k != "llama_model.lm_head.weight"}
    torch.save(state, released / "pytorch_model.bin")
    sentencepiece = write_sentencepiece_tokenizer(released)
    loaded = load_pretrained(str(released), device="cpu")
    assert loaded.model.config.encoder_padding == "30s"
    text = "###[Human]:the quick brown fox, what is the capital of france?"
    assert loaded.tokenizer(text).input_ids == [1] + sentencepiece.encode(text)
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 2  # Llama-2 has no pad token
    audio = tone(2.0)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, loaded.tokenizer, audio))


def test_released_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    model = tiny_blsp()
    (tmp_path / "config.json").write_text(json.dumps(
        {"whisper_config": model.config.whisper_config, "llama_config": model.config.llama_config,
         "conv_kernel_sizes": "5,5,5", "adapter_inner_dim": 16}))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"(?s)shapes do not fit its config.*adapter.fc1.weight"):
        load_pretrained(str(tmp_path), device="cpu")


def test_unsupported_llm_architecture_is_named(tmp_path):
    model = tiny_blsp()
    llm_config = dict(model.config.llama_config, model_type="no-such-lm")
    (tmp_path / "config.json").write_text(json.dumps({"whisper_config": model.config.whisper_config,
                                                      "llama_config": llm_config}))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unsupported LLM architecture 'no-such-lm'"):
        load_pretrained(str(tmp_path), device="cpu")


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="has no config.json"):
        load_pretrained(str(tmp_path), device="cpu")
    model = tiny_blsp()
    model.config.save(tmp_path)
    with pytest.raises(WeightsError, match="has no weight files"):
        load_pretrained(str(tmp_path), device="cpu")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match="cannot read weights from .*model.safetensors"):
        load_pretrained(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid BLSP config"):
        load_pretrained(str(tmp_path), device="cpu")
    with pytest.raises(WeightsError, match="is a file"):
        load_pretrained(str(tmp_path / "config.json"), device="cpu")


def test_adapter_checkpoint_not_matching_config_is_refused(tmp_path):
    model, tokenizer = tiny_blsp(), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "adapter")
    config = BlspConfig.load(tmp_path / "adapter")
    config.adapter_inner_dim = 4
    config.save(tmp_path / "adapter")
    with pytest.raises(WeightsError, match="shapes do not fit"):
        load_pretrained(str(tmp_path / "adapter"), device="cpu")


def test_unknown_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="not a local directory and could not be fetched"):
        load_pretrained("no-such-user/no-such-blsp-model", device="cpu")


def test_unknown_offline_name():
    with pytest.raises(WeightsError, match="unknown offline model"):
        weights.resolve_base("offline:gpt-17")


def test_export_can_serve_a_ctc_trained_adapter_through_the_ctc_readout(tmp_path):
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    save_adapter(model, tmp_path / "run")
    assert export_main([str(tmp_path / "run"), str(tmp_path / "shipped"), "--speech-readout", "ctc",
                        "--ctc-blank", " ", "--ctc-readout-temperature", "0.2"]) == 0
    loaded = load_pretrained(str(tmp_path / "shipped"), device="cpu")
    config = loaded.model.config
    blank = tokenizer(" ", add_special_tokens=False).input_ids
    assert (config.speech_readout, [config.ctc_blank_id], config.ctc_readout_temperature) == ("ctc", blank, 0.2)
    audio = tone(1.5)
    with torch.no_grad():
        raw = loaded.model.adapt_windows(loaded.model.encode_windows([audio]))[0]
        torch.testing.assert_close(loaded.model.encode_speech([audio])[0],
                                   ctc_readout(raw, loaded.model.llama_model.get_input_embeddings().weight, blank[0],
                                               0.2))
    assert export_main([str(tmp_path / "run"), str(tmp_path / "fused"), "--speech-readout", "ctc",
                        "--ctc-lm-weight", "0.3", "--ctc-token-bonus", "0.5", "--ctc-beam-size", "2",
                        "--ctc-label-min-log-prob", "-5", "--ctc-beam-prune-log-prob", "-3"]) == 0
    config = load_pretrained(str(tmp_path / "fused"), device="cpu").model.config
    assert (config.ctc_lm_weight, config.ctc_token_bonus, config.ctc_beam_size) == (0.3, 0.5, 2)
    assert (config.ctc_label_min_log_prob, config.ctc_beam_prune_log_prob) == (-5, -3)


# --- ModelScope (where BLSP's released 7B checkpoint lives) ---------------------------------------------
@pytest.mark.parametrize("bad", ["modelscope:", "modelscope:iic", "modelscope:/blsp", "modelscope:iic/",
                                 "modelscope:a/b/c", "modelscope:iic/blsp lslm"])
def test_malformed_modelscope_ids_are_refused(bad):
    with pytest.raises(WeightsError, match="is not a ModelScope model id: write modelscope:ORG/NAME"):
        load_pretrained(bad, device="cpu")


def test_modelscope_without_its_package_says_which_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails, as where it is not installed
    with pytest.raises(WeightsError, match=r"needs the optional 'modelscope' package.*pip install modelscope=="):
        load_pretrained("modelscope:iic/blsp_lslm_7b", device="cpu")


def test_modelscope_snapshot_is_fetched_into_the_cache_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("BLSP_CHAT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    calls = []

    def snapshot_download(repo_id, cache_dir=None, **kwargs):
        calls.append((repo_id, cache_dir))
        if repo_id.endswith("missing"):
            raise ValueError(f"model {repo_id} not found")
        target = Path(cache_dir) / repo_id
        save_adapter(model, target)
        return str(target)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = load_pretrained("modelscope:someone/tiny-blsp", device="cpu")
    assert calls == [("someone/tiny-blsp", str(tmp_path / "cache" / "modelscope"))]
    assert loaded.source == str(tmp_path / "cache" / "modelscope" / "someone" / "tiny-blsp")
    audio = tone(1.5)
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer, audio), _logits(model, tokenizer, audio), atol=0,
                               rtol=0)
    with pytest.raises(WeightsError,
                       match="could not fetch 'someone/missing' with modelscope: model someone/missing not found"):
        load_pretrained("modelscope:someone/missing", device="cpu")



def test_the_model_saves_and_loads_the_transformers_way(tmp_path):
    """BlspModel.save_pretrained / from_pretrained are weights.save_adapter / load_model, in any interpreter."""
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    assert set(weights.read_state_dict(tmp_path / "adapter")) == set(model.adapter_state_dict())
    again = BlspModel.from_pretrained(str(tmp_path / "adapter"), device="cpu")
    audio = tone(1.5)
    torch.testing.assert_close(_logits(again, tokenizer, audio), _logits(model, tokenizer, audio), atol=0, rtol=0)
    # an interpreter that imports only the model module gets both methods too
    code = "from blsp_chat.model import BlspModel; print(BlspModel.persistence is not None)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
