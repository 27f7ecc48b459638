"""The fine-tuning stage (train/finetune.py) on tiny in-memory models: the LoRA and the trainable parts the
config names, the checkpoint's layout and its round trip through the app's loader, resume, and bad input."""
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import WhisperModel

from blsp_chat import cli
from blsp_chat.characters import ENGLISH_ALPHABET
from blsp_chat.constants import SAMPLE_RATE, TRANSLATE_INSTRUCTION
from blsp_chat.offline import WeightsError
from blsp_chat.prompt import Turn, render
from blsp_chat.readout import ctc_readout
from blsp_chat.weights import LoadedBlsp, load_pretrained
from tiny import tiny_blsp, tiny_llm, tiny_tokenizer, tone
from train.finetune import (
    DataSection,
    FinetuneConfig,
    FinetuneObjective,
    LoraSection,
    ModelSection,
    load_config,
    prepare_model,
    run,
)
from train.loop import LoopConfig
from train.speech_data import SpeechCollator, SpeechDataset, read_manifest

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"
PAIRS = [("hello there", "hola"), ("the quick brown fox", "el zorro"), ("what is the capital", "la capital"),
         ("paris is a city", "paris es"), ("the lazy dog", "el perro"), ("jumps again", "salta")]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("st")
    lines = []
    for i, (text, spanish) in enumerate(PAIRS):
        sf.write(root / f"clip{i}.wav", tone(0.5 + 0.1 * i, 180 + 30 * i, i), SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": text, "response": spanish, "reference": spanish,
                                 "instruction": TRANSLATE_INSTRUCTION.format(target="Spanish")}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def tiny_loaded(tmp_path: Path, **config_kwargs) -> LoadedBlsp:
    """A tiny model whose base models are saved where its config names them, so its checkpoints load."""
    model, tokenizer = tiny_blsp("none", **config_kwargs), tiny_tokenizer()
    whisper = WhisperModel(model.config.whisper())
    whisper.encoder.load_state_dict(model.whisper_model.state_dict())
    whisper.save_pretrained(tmp_path / "whisper")
    model.feature_extractor.save_pretrained(tmp_path / "whisper")
    model.llama_model.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    model.config.whisper_name_or_path = str(tmp_path / "whisper")
    model.config.llm_name_or_path = str(tmp_path / "llm")
    return LoadedBlsp(model, tokenizer, "tiny", adapter_trained=True)


def config_for(corpus: Path, out: Path, *, train_encoder=True, train_adapter=True, lora=True, **loop) -> FinetuneConfig:
    loop_kwargs = dict(output_dir=str(out), learning_rate=5e-2, per_device_batch_size=3, max_steps=4,
                       warmup_steps=0, log_every=1, seed=1)
    loop_kwargs.update(loop)
    return FinetuneConfig(loop=LoopConfig(**loop_kwargs),
                          model=ModelSection(train_encoder=train_encoder, train_adapter=train_adapter),
                          lora=LoraSection(enabled=lora, dropout=0.0),
                          data=DataSection(train_manifest=str(corpus), eval_manifest=str(corpus), mega_batch_factor=2))


def spoken_logits(model, tokenizer, audio):
    speech = model.encode_speech([audio])
    prompt = render([Turn("human", instruction="translate", speech_tokens=speech[0].shape[0])], tokenizer)
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), torch.tensor([prompt.speech_mask]), speech_embeds=speech).logits


# --- what trains --------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_encoder, train_adapter", [(True, True), (False, True), (True, False), (False, False)])
def test_lora_sits_on_exactly_the_attention_projections_and_the_config_picks_what_trains(
        corpus, tmp_path, train_encoder, train_adapter):
    loaded = prepare_model(tiny_loaded(tmp_path), config_for(corpus, tmp_path / "out", train_encoder=train_encoder,
                                                             train_adapter=train_adapter))
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert wrapped == set(ATTENTION)
    layers = loaded.model.llama_model.config.num_hidden_layers
    assert len(lora) == 2 * len(ATTENTION) * layers  # A and B of every projection in every layer
    encoder = {n for n in trainable if n.startswith("whisper_model.")}
    adapter = {n for n in trainable if n.startswith(("subsampler.", "adapter.", "speech_ln."))}
    assert bool(encoder) == train_encoder and bool(adapter) == train_adapter
    if train_encoder:  # all of the encoder but its fixed sinusoidal positions
        every = {n for n, _ in loaded.model.named_parameters() if n.startswith("whisper_model.")}
        assert encoder == every - {"whisper_model.embed_positions.weight"}
    assert trainable == lora | encoder | adapter  # the LLM's own weights stay frozen


def test_lora_naming_modules_the_llm_lacks_is_refused_with_its_real_names(corpus, tmp_path):
    config = config_for(corpus, tmp_path / "out")
    config.lora = LoraSection(target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ValueError, match=r"query_key_value.*does not have.*q_proj"):
        prepare_model(tiny_loaded(tmp_path), config)


def test_a_character_model_is_refused_because_its_text_passes_no_gradient(corpus, tmp_path):
    loaded = tiny_loaded(tmp_path, speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    with pytest.raises(ValueError, match="spells characters.*no gradient"):
        prepare_model(loaded, config_for(corpus, tmp_path / "out"))


@pytest.mark.parametrize("data, message", [
    ({"lora": {"enabled": False}, "model": {"train_encoder": False, "train_adapter": False}}, "nothing trains"),
    ({"data": {"encoder_cache_dir": "cache"}}, "encoder_cache_dir"),
    ({"lora": {"r": 0}}, "r >= 1"),
    ({"lora": {"rank": 8}}, "unknown keys"),
    ({"model": {"dtype": "float8"}}, "model.dtype"),
])
def test_bad_configs_are_refused_when_read(data, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig.from_dict({"loop": {"output_dir": "x"}, **data})


@pytest.mark.parametrize("name", ["finetune_st_offline.json", "finetune_st_offline_lora.json"])
def test_shipped_configs_parse_with_the_papers_lora_and_take_overrides(name):
    config = load_config(CONFIGS / name, ["loop.max_steps=3", "model.train_encoder=false"])
    assert (config.lora.r, config.lora.alpha, config.lora.target_modules) == (16, 16, ATTENTION)
    assert config.loop.max_steps == 3 and not config.model.train_encoder


# --- training, saving, loading -----------------------------------------------------------------------
def test_finetuned_checkpoint_loads_through_the_apps_loader_with_its_lora_and_equal_logits(corpus, tmp_path):
    loaded = tiny_loaded(tmp_path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = tmp_path / "finetuned"
    result = run(config_for(corpus, out), loaded=prepare_model(loaded, config_for(corpus, out)))
    trained = result.model.blsp.eval()
    # peft's layout beside the BLSP adapter; the adapter file holds the fine-tuned encoder too
    lora_config = json.loads((out / "adapter_config.json").read_text())
    assert lora_config["base_model_name_or_path"] == str(tmp_path / "llm")
    assert set(lora_config["target_modules"]) == set(ATTENTION) and lora_config["r"] == 16
    assert any(".lora_B." in k for k in load_file(str(out / "adapter_model.safetensors")))
    saved = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("whisper_model.") for k in saved) and "speech_ln.weight" in saved
    assert not any(k.startswith("llama_model.") for k in saved)
    card = (out / "README.md").read_text()
    assert "loss_curve.png" in card and "LLM positions each clip was read into" in card
    assert (out / "loss_curve.png").is_file()

    reloaded = load_pretrained(str(out), device="cpu")  # what app.py, generate/chat/serve and train.evaluate call
    audio = tone(1.2, 300)
    expected = spoken_logits(trained, loaded.tokenizer, audio)
    torch.testing.assert_close(spoken_logits(reloaded.model, reloaded.tokenizer, audio), expected,
                               atol=1e-5, rtol=1e-5)
    # the LoRA matters: the trained adapter and encoder on the LLM without it answer otherwise
    without_lora = tiny_loaded(tmp_path / "base").model
    assert all(torch.equal(v, before[k]) for k, v in without_lora.state_dict().items())
    without_lora.load_state_dict(saved, strict=False)
    assert not torch.allclose(spoken_logits(without_lora, loaded.tokenizer, audio), expected, atol=1e-3)


def test_save_pretrained_of_a_loaded_finetuned_model_keeps_its_lora_and_encoder(corpus, tmp_path):
    out = tmp_path / "finetuned"
    loaded = tiny_loaded(tmp_path)
    run(config_for(corpus, out), loaded=prepare_model(loaded, config_for(corpus, out)))
    reloaded = load_pretrained(str(out), device="cpu")
    reloaded.model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_config.json").is_file()
    assert any(k.startswith("whisper_model.") for k in load_file(str(tmp_path / "again" / "model.safetensors")))
    again = load_pretrained(str(tmp_path / "again"), device="cpu")
    audio = tone(1.2, 300)
    torch.testing.assert_close(spoken_logits(again.model, again.tokenizer, audio),
                               spoken_logits(reloaded.model, reloaded.tokenizer, audio), atol=1e-5, rtol=1e-5)
    reloaded.model.save_pretrained(out)  # over its own files: nothing to copy, nothing lost
    assert load_pretrained(str(out), device="cpu").model.llm_lora_dir == out


def test_finetuned_checkpoint_answers_through_the_generate_command(corpus, tmp_path, capsys):
    loaded = tiny_loaded(tmp_path)
    out = tmp_path / "finetuned"
    config = config_for(corpus, out, train_encoder=False, max_steps=1)
    run(config, loaded=prepare_model(loaded, config))
    assert not any(k.startswith("whisper_model.") for k in load_file(str(out / "model.safetensors")))
    code = cli.main(["generate", "--model", str(out), "--device", "cpu", "--audio", str(corpus.parent / "clip0.wav"),
                     "--instruction", TRANSLATE_INSTRUCTION.format(target="Spanish"), "--max-new-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_resume_after_a_kill_reproduces_the_loss_sequence(corpus, tmp_path):
    full = run(config_for(corpus, tmp_path / "full", max_steps=6, save_every=2),
               loaded=prepare_model(tiny_loaded(tmp_path / "a"), config_for(corpus, tmp_path / "full")))

    def kill(state, metrics):
        if state.step == 3:
            raise KeyboardInterrupt("killed")

    cut = config_for(corpus, tmp_path / "cut", max_steps=6, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(cut, loaded=prepare_model(tiny_loaded(tmp_path / "b"), cut), callbacks=[kill])
    resumed = run(cut, loaded=prepare_model(tiny_loaded(tmp_path / "c"), cut), resume=True)
    assert len(full.losses) == 6 and resumed.losses == full.losses


def test_a_lora_trained_on_another_llm_is_refused_with_what_to_do(corpus, tmp_path):
    loaded = tiny_loaded(tmp_path)
    out = tmp_path / "finetuned"
    config = config_for(corpus, out, max_steps=1)
    run(config, loaded=prepare_model(loaded, config))
    lora_config = out / "adapter_config.json"
    # named for another base
    data = json.loads(lora_config.read_text())
    data["base_model_name_or_path"] = "some/other-llm"
    lora_config.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"trained on the LLM 'some/other-llm'.*fine-tune again"):
        load_pretrained(str(out), device="cpu")
    # named for this base but shaped for another (a wider LLM saved under the same name)
    data["base_model_name_or_path"] = str(tmp_path / "llm")
    lora_config.write_text(json.dumps(data))
    wider = tiny_llm()
    wider_config = wider.config
    wider_config.hidden_size = 32
    type(wider)(wider_config).save_pretrained(tmp_path / "llm")
    with pytest.raises(WeightsError, match="cannot apply the LoRA"):
        load_pretrained(str(out), device="cpu")


# --- the CTC readout ------------------------------------------------------------------------------------
def test_ctc_readout_models_lay_each_prompt_out_for_the_words_read_and_train_the_adapter(corpus, tmp_path):
    loaded = tiny_loaded(tmp_path, speech_readout="ctc", ctc_blank_id=5)
    config = config_for(corpus, tmp_path / "out", train_encoder=False)
    prepare_model(loaded, config)
    model = loaded.model
    dataset = SpeechDataset(read_manifest(corpus), loaded.tokenizer, model.speech_token_count)
    batch = SpeechCollator(2)([dataset[i] for i in range(3)])
    objective = FinetuneObjective(model, loaded.tokenizer, config).train()
    loss, metrics = objective(batch)
    table = model.llama_model.get_input_embeddings().weight
    with torch.no_grad():
        read = [ctc_readout(s, table, 5, model.config.ctc_readout_temperature)
                for s in model.adapt_windows(model.encode_windows(batch["audios"]))]
    assert metrics["speech_positions"] == pytest.approx(sum(r.shape[0] for r in read) / 3)
    assert any(r.shape[0] < model.speech_token_count(len(a)) for r, a in zip(read, batch["audios"]))
    loss.backward()
    assert model.adapter.fc1.weight.grad is not None and model.adapter.fc1.weight.grad.abs().sum() > 0
