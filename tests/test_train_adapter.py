"""Adapter training (train/train_adapter.py, train/speech_data.py) on tiny in-memory models and short real
clips (espeak-ng when installed, else tones)."""
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from test_weights import _write_base_models

from blsp_chat.audio import load_audio
from blsp_chat.characters import ENGLISH_ALPHABET, learn_symbols, spell
from blsp_chat.constants import IGNORE_INDEX, REPEAT_INSTRUCTION, SAMPLE_RATE
from blsp_chat.ctc_decode import collapse_ctc
from blsp_chat.prompt import Turn, render, template_for
from blsp_chat.readout import ctc_readout
from blsp_chat.weights import LoadedBlsp
from tiny import blank_hearing_blsp, tiny_blsp, tiny_tokenizer, tone
from train import export_adapter, precompute_encoder, train_adapter
from train.adapter_config import (
    AdapterTrainConfig,
    DataSection,
    EvalSection,
    LossSection,
    ModelSection,
    load_config,
)
from train.loop import LoopConfig
from train.losses import (
    AdapterObjective,
    character_ctc,
    cross_entropy,
    ctc_blank_id,
    distillation_kl,
    embedding_ctc,
    readout_prompts,
    response_span,
    unalignable_fraction,
)
from train.precompute_encoder import fill, missing_clips
from train.speech_data import (
    BucketBatchSampler,
    EncoderCache,
    FrameMasking,
    SpeechCollator,
    SpeechDataset,
    SpeechExample,
    read_manifest,
    speech_embeddings,
    with_repetition,
    word_piece_targets,
)
from train.train_adapter import readout_wer_fn, repeat_wer_fn, run

SENTENCES = ["hello there", "the quick brown fox", "what is the capital of france", "paris is a city",
             "the lazy dog sleeps", "jumps over the dog"]
CONTINUATIONS = ["and welcome.", "runs away fast.", "it is paris.", "in france.", "all day long.", "again and again."]
CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"


def speak(text: str, path: Path, seed: int) -> None:
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-s", "220", "-w", str(path), text], check=True, capture_output=True)
    else:
        sf.write(path, tone(0.4 + 0.1 * len(text.split()), 200 + 40 * seed, seed), SAMPLE_RATE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A manifest of six spoken sentences with continuation responses."""
    root = tmp_path_factory.mktemp("corpus")
    lines = []
    for i, (text, response) in enumerate(zip(SENTENCES, CONTINUATIONS)):
        speak(text, root / f"clip{i}.wav", i)
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": text, "response": response,
                                 "instruction": "Continue the following text."}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def loaded_tiny(padding="none", sharp=False):
    """sharp: a frozen LLM with larger random weights, whose predictions depend on its input enough for
    the adapter to move the loss (the default init predicts a near-uniform distribution whatever it reads)."""
    model = tiny_blsp(padding)
    if sharp:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.llama_model.parameters():
                if param.ndim == 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.25)
    return LoadedBlsp(model, tiny_tokenizer(), "tiny", adapter_trained=False)


def train_config(corpus, out, **loop):
    loop_kwargs = dict(output_dir=str(out), learning_rate=1e-2, per_device_batch_size=3, num_epochs=4,
                       warmup_steps=1, log_every=1, seed=1)
    loop_kwargs.update(loop)
    return AdapterTrainConfig(
        loop=LoopConfig(**loop_kwargs), model=ModelSection(encoder_padding="none"),
        data=DataSection(train_manifest=str(corpus), eval_manifest=str(corpus), repetition_ratio=0.5,
                         mega_batch_factor=2),
        loss=LossSection(kd_weight=0.5), eval=EvalSection(repeat_wer_examples=1, max_new_tokens=4))


# --- training ----------------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss_and_change_only_the_adapter(corpus, tmp_path):
    loaded = loaded_tiny(sharp=True)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    config = train_config(corpus, tmp_path, per_device_batch_size=16, num_epochs=12, learning_rate=3e-2)
    result = run(config, loaded=loaded)  # one batch holds the whole set, so every step sees the same data
    assert result.losses[-1] < 0.95 * result.losses[0], result.losses  # ~8% in 12 steps
    after = result.model.blsp.state_dict()
    adapter_keys = set(loaded.model.adapter_state_dict())
    for key, value in before.items():
        if key in adapter_keys:
            assert not torch.equal(value, after[key]), f"{key} did not train"
        else:
            assert torch.equal(value, after[key]), f"frozen {key} changed"
    # The output directory is an adapter-only checkpoint with its card and training record.
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == adapter_keys and torch.equal(saved["speech_ln.weight"], after["speech_ln.weight"])
    assert json.loads((tmp_path / "config.json").read_text())["encoder_padding"] == "none"
    card = (tmp_path / "README.md").read_text()
    assert "loss_curve.png" in card and "repeat_wer" in card and "samples/s" in card
    assert (tmp_path / "loss_curve.png").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "kd", "lr", "grad_norm", "samples_per_s"} <= set(metrics[0])


def test_resume_after_a_kill_reproduces_the_loss_sequence(corpus, tmp_path):
    cache_dir = str(tmp_path / "cache")
    full = run(train_config(corpus, tmp_path / "full", save_every=2), loaded=loaded_tiny())

    def kill(state, metrics):
        if state.step == 5:
            raise KeyboardInterrupt("killed")

    cut = train_config(corpus, tmp_path / "cut", save_every=2)
    cut.data.encoder_cache_dir = cache_dir  # the cache must not change the numbers either
    with pytest.raises(KeyboardInterrupt):
        run(cut, loaded=loaded_tiny(), callbacks=[kill])
    resumed = run(cut, loaded=loaded_tiny(), resume=True)
    assert len(full.losses) == 12  # 9 examples (6 + 3 repeats) / 3 per batch x 4 epochs
    assert resumed.losses == full.losses


def test_a_checkpoint_exports_as_the_model_the_run_would_have_saved_at_that_step(corpus, tmp_path, monkeypatch, capsys):
    config = train_config(corpus, tmp_path / "run", per_device_batch_size=3, num_epochs=2, save_every=2, keep_last=10,
                          eval_every=2)
    config.loss = LossSection(ce_weight=0.0, ctc_weight=1.0)
    config.eval = EvalSection(repeat_wer_examples=0)
    config.model.speech_readout = "ctc"

    def with_base_models_on_disk(section=None):  # build_model's offline bases, as tiny ones the loader finds
        loaded = loaded_tiny(sharp=True)
        _write_base_models(loaded.model, loaded.tokenizer, tmp_path / "bases")
        return loaded

    run(config, loaded=with_base_models_on_disk())
    monkeypatch.setattr(train_adapter, "build_model", with_base_models_on_disk)
    run_dir = tmp_path / "run"
    last = tmp_path / "last"
    assert export_adapter.main([str(run_dir), str(last), "--checkpoint", "latest", "--dtype", "float32"]) == 0
    final = load_file(str(run_dir / "model.safetensors"))
    exported = load_file(str(last / "model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert json.loads((last / "config.json").read_text()) == json.loads((run_dir / "config.json").read_text())
    assert (last / "eval.jsonl").is_file()  # the run's record goes along
    assert export_adapter.main([str(run_dir), str(tmp_path / "early"), "--checkpoint", "step-2"]) == 0
    early = load_file(str(tmp_path / "early" / "model.safetensors"))
    assert not all(torch.equal(early[k].float(), final[k]) for k in final)
    # An earlier checkpoint's record stops at its step: no later evaluation, no card or curve of the run's end.
    run_steps = [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    early_steps = [json.loads(line)["step"] for line in (tmp_path / "early" / "eval.jsonl").read_text().splitlines()]
    assert min(run_steps) <= 2 < max(run_steps) and early_steps == [step for step in run_steps if step <= 2]
    assert not (tmp_path / "early" / "loss_curve.png").exists()
    assert "- steps:" in (run_dir / "README.md").read_text()  # the run's card, of its last step, stays behind
    assert "- steps:" not in (tmp_path / "early" / "README.md").read_text()
    assert export_adapter.main([str(run_dir), str(tmp_path / "none"), "--checkpoint", "99"]) == 2
    assert "keeps no checkpoint 'step-99'; kept: step-2, step-4" in capsys.readouterr().err
    # The search settings given apply to the run's own CTC readout (they were once dropped without a word).
    fused = tmp_path / "fused"
    assert export_adapter.main([str(run_dir), str(fused), "--checkpoint", "step-2", "--ctc-lm-weight", "0.2",
                                "--ctc-token-bonus", "0.3", "--ctc-beam-prune-log-prob", "-3"]) == 0
    served = json.loads((fused / "config.json").read_text())
    run_config = json.loads((run_dir / "config.json").read_text())
    assert (served["ctc_lm_weight"], served["ctc_token_bonus"], served["ctc_beam_prune_log_prob"]) == (0.2, 0.3, -3.0)
    assert served["ctc_beam_size"] == run_config["ctc_beam_size"]  # the settings not given stay the run's
    assert served["ctc_readout_temperature"] == run_config["ctc_readout_temperature"]
    embeddings_run = Path(shutil.copytree(run_dir, tmp_path / "embeddings_run"))
    (embeddings_run / "config.json").write_text(json.dumps(dict(run_config, speech_readout="embeddings")))
    assert export_adapter.main([str(embeddings_run), str(tmp_path / "refused"), "--ctc-lm-weight", "0.2"]) == 2
    assert "serves the 'embeddings' readout: add --speech-readout ctc" in capsys.readouterr().err


# --- losses ------------------------------------------------------------------------------------------
def test_kl_is_zero_when_speech_embeddings_equal_the_transcript_embeddings():
    model, tokenizer = loaded_tiny(sharp=True).model, tiny_tokenizer()

    teacher = render([Turn("human", instruction=REPEAT_INSTRUCTION, text="hello there"),
                      Turn("assistant", text="hello there")], tokenizer, add_eos=True)
    ids = torch.tensor([teacher.input_ids])
    labels = torch.tensor([teacher.labels])
    # The student sees the same sequence, with the transcript's positions filled through the speech path.
    prefix = len(render([Turn("human", instruction=REPEAT_INSTRUCTION)], tokenizer).input_ids) - len(
        tokenizer("\n\n\n###[Assistant]:", add_special_tokens=False).input_ids)
    span = slice(prefix - 3, prefix)  # the last tokens of the human text
    speech_mask = torch.zeros_like(ids, dtype=torch.bool)
    speech_mask[0, span] = True
    word_embeds = model.llama_model.get_input_embeddings()(ids[0, span])
    with torch.no_grad():
        teacher_logits = model(ids).logits
        same = model(ids, speech_mask=speech_mask, speech_embeds=[word_embeds]).logits
        other = model(ids, speech_mask=speech_mask, speech_embeds=[torch.randn_like(word_embeds)]).logits
    assert distillation_kl(same, labels, teacher_logits, labels).abs() < 1e-6
    assert distillation_kl(other, labels, teacher_logits, labels) > 1e-4


def test_ctc_is_low_when_speech_vectors_spell_the_transcript_and_high_when_they_spell_another():
    model, tokenizer = loaded_tiny().model, tiny_tokenizer()
    table = model.llama_model.get_input_embeddings().weight.detach() * 100  # well-separated classes
    blank = ctc_blank_id(tokenizer, " ")
    words = tokenizer(" the quick brown fox", add_special_tokens=False).input_ids
    spoken = torch.stack([table[i] for w in words for i in (w, w, blank)])  # each word twice, then a pause
    other = tokenizer(" paris is a city", add_special_tokens=False).input_ids
    right, commit = embedding_ctc([spoken], [words], table, blank)
    wrong, _ = embedding_ctc([spoken], [other], table, blank)
    assert right < 0.05 and wrong > 10 * right + 1
    assert commit.abs() < 1e-3  # every vector is an embedding
    # Vectors 3x too long still win CTC, but sit far from every embedding: the commitment says so.
    longer, far = embedding_ctc([3 * spoken], [words], table, blank)
    assert longer < 0.05 and far > 100
    # A clip with more tokens than speech positions cannot be aligned: it adds nothing, not inf.
    assert embedding_ctc([spoken[:2]], [words], table, blank)[0] == 0


def test_clips_too_short_for_their_targets_are_counted_not_hidden():
    """CTC scores a clip it cannot align as zero; the metric says how many there were."""
    assert unalignable_fraction([5, 5, 5, 3], [[1, 2, 3], [1, 1, 2, 2], [1, 1, 1], [1, 2, 3, 4]]) == 0.5
    head = torch.nn.Linear(4, 6)
    fits, short = torch.randn(6, 4), torch.randn(2, 4)
    assert character_ctc([fits, short], [[1, 2, 3], [1, 2, 3]], head) > 0  # the short clip adds nothing ...
    torch.testing.assert_close(character_ctc([fits, short], [[1, 2, 3], [1, 2, 3]], head),
                               character_ctc([fits], [[1, 2, 3]], head) / 2)  # ... but still counts in the mean


def test_ctc_readout_merges_repeats_and_drops_blanks():
    assert collapse_ctc([5, 5, 0, 5, 7, 7, 0, 0, 9], blank_id=0) == [5, 5, 7, 9]
    assert collapse_ctc([0, 0], blank_id=0) == []


def test_ctc_readout_wer_reads_speech_vectors_as_words(corpus, monkeypatch):
    loaded = loaded_tiny(sharp=True)
    tokenizer, model = loaded.tokenizer, loaded.model
    table = model.llama_model.get_input_embeddings().weight.detach()
    blank = ctc_blank_id(tokenizer, " ")
    examples = read_manifest(corpus)[:2]
    spelled = {}
    for example in examples:  # an "adapter" that outputs exactly the transcript's embeddings, with pauses
        words = tokenizer(" " + example.text, add_special_tokens=False).input_ids
        spelled[example.text] = torch.stack([table[i] for w in words for i in (w, blank)])
    texts = iter([e.text for e in examples])
    monkeypatch.setattr(model, "adapt_windows", lambda encoded: [spelled[next(texts)]])
    evaluate = readout_wer_fn(tokenizer, examples, EvalSection(repeat_wer_examples=2), blank)
    assert evaluate(SimpleNamespace(blsp=model), None) == {"readout_wer": 0.0}


def test_repeat_wer_scores_a_clip_heard_as_nothing_as_all_deletions(corpus):
    """A young CTC adapter reads every clip as blanks: the eval scores that instead of ending the run."""
    loaded = LoadedBlsp(blank_hearing_blsp(), tiny_tokenizer(), "tiny", adapter_trained=False)
    examples = read_manifest(corpus)[:2]
    evaluate = repeat_wer_fn(loaded, examples, EvalSection(repeat_wer_examples=2, max_new_tokens=4))
    assert evaluate(SimpleNamespace(blsp=loaded.model), None) == {
        "repeat_wer": 1.0, "repeat_wer_examples": 2, "repeat_wer_unheard": 2}


def test_ctc_blank_must_be_one_token():
    with pytest.raises(ValueError, match="exactly one"):
        ctc_blank_id(tiny_tokenizer(), " the quick brown")
    with pytest.raises(ValueError, match="every loss weight is 0"):
        LossSection(ce_weight=0.0)
    with pytest.raises(ValueError, match="commit_weight needs"):
        LossSection(commit_weight=1.0)


def test_ctc_prealignment_trains_the_adapter_without_running_the_llm(corpus, tmp_path, monkeypatch):
    loaded = loaded_tiny(sharp=True)
    frozen_llm = {k: v.clone() for k, v in loaded.model.llama_model.state_dict().items()}

    def no_llm(*args, **kwargs):
        raise AssertionError("the CTC stage must not run the LLM")

    config = train_config(corpus, tmp_path, per_device_batch_size=16, num_epochs=15, learning_rate=3e-2)
    config.loss = LossSection(ce_weight=0.0, ctc_weight=1.0, commit_weight=0.01)
    config.eval = EvalSection(repeat_wer_examples=0)
    config.model.speech_readout = "ctc"  # the checkpoint is then served through the CTC readout
    monkeypatch.setattr(loaded.model.llama_model, "forward", no_llm)
    result = run(config, loaded=loaded)
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert "eval_ctc" in evals[-1]
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    after = result.model.blsp.llama_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_llm.items())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "ctc" in metrics[0] and "commit" in metrics[0] and "ce" not in metrics[0]
    card = (tmp_path / "README.md").read_text()
    assert "CTC pre-alignment alone" in card and "CTC-compressed readout" in card
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["speech_readout"], saved["ctc_blank_id"]) == ("ctc", ctc_blank_id(loaded.tokenizer, " "))


@pytest.mark.parametrize("symbols", [False, True], ids=["characters", "symbols"])
def test_character_ctc_trains_the_head_without_the_llm_and_serves_what_it_spells(corpus, tmp_path, monkeypatch,
                                                                                 symbols):
    # one stride-2 layer: 25 outputs a second, room for every character of espeak's fast speech
    alphabet = learn_symbols(SENTENCES, 60) if symbols else ENGLISH_ALPHABET  # symbols: letters and merges
    model = tiny_blsp("none", speech_readout="ctc", ctc_alphabet=alphabet, conv_kernel_sizes="5", seed=3)
    loaded = LoadedBlsp(model, tiny_tokenizer(), "tiny", adapter_trained=False)
    head_before = model.ctc_head.weight.clone()

    def no_llm(*args, **kwargs):
        raise AssertionError("character CTC must not run the LLM")

    config = train_config(corpus, tmp_path, per_device_batch_size=16, num_epochs=15, learning_rate=3e-2)
    config.loss = LossSection(ce_weight=0.0, ctc_weight=1.0)
    config.eval = EvalSection(repeat_wer_examples=2, max_new_tokens=2)
    config.model = ModelSection(encoder_padding="none", speech_readout="ctc", ctc_alphabet=alphabet,
                                conv_kernel_sizes="5")
    monkeypatch.setattr(loaded.model.llama_model, "forward", no_llm)
    monkeypatch.setattr(train_adapter, "repeat_wer_fn", lambda *args: None)  # the one eval that runs the LLM
    result = run(config, loaded=loaded)
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert not torch.equal(head_before, result.model.blsp.ctc_head.weight)
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert "eval_ctc" in evals[-1] and 0.0 <= evals[-1]["readout_wer"]
    assert evals[-1]["eval_ctc_unalignable"] == 0.0  # 25 outputs a second leave room for espeak's letters
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["speech_readout"], saved["ctc_alphabet"]) == ("ctc", alphabet)
    assert saved.get("ctc_blank_id") is None
    assert load_file(str(tmp_path / "model.safetensors"))["ctc_head.weight"].shape[0] == len(alphabet) + 1
    card = (tmp_path / "README.md").read_text()
    assert ("CTC over symbols of one or more characters alone" if symbols else "CTC over characters alone") in card


def test_character_targets_are_the_spelled_transcript(corpus):
    loaded = loaded_tiny()
    data = SpeechDataset(read_manifest(corpus)[:1], loaded.tokenizer, loaded.model.speech_token_count,
                         ctc_targets=lambda text: spell(text, ENGLISH_ALPHABET))
    assert data[0]["transcript_ids"] == spell(SENTENCES[0], ENGLISH_ALPHABET)


def test_a_run_naming_an_alphabet_its_adapter_lacks_is_refused(corpus, tmp_path):
    config = train_config(corpus, tmp_path)
    config.loss = LossSection(ce_weight=0.0, ctc_weight=1.0)
    config.model = ModelSection(encoder_padding="none", speech_readout="ctc", ctc_alphabet=ENGLISH_ALPHABET)
    with pytest.raises(ValueError, match="spells None"):
        run(config, loaded=loaded_tiny())
    data = config.to_dict()
    data["loss"]["commit_weight"] = 0.1
    with pytest.raises(ValueError, match="commit_weight pulls"):
        AdapterTrainConfig.from_dict(data)
    data["loss"]["commit_weight"], data["model"]["speech_readout"] = 0.0, "embeddings"
    with pytest.raises(ValueError, match="only model.speech_readout 'ctc' reads"):
        AdapterTrainConfig.from_dict(data)


def test_ctc_readout_needs_the_ctc_loss_which_the_llm_losses_may_join(corpus, tmp_path):
    config = train_config(corpus, tmp_path)
    data = config.to_dict() | {"model": {"speech_readout": "ctc"}}
    with pytest.raises(ValueError, match="set loss.ctc_weight"):
        AdapterTrainConfig.from_dict(data)  # CE alone collapses the readout's segmentation
    data["loss"] = {"ce_weight": 0.0, "ctc_weight": 1.0}
    assert AdapterTrainConfig.from_dict(data).model.speech_readout == "ctc"
    data["loss"] = {"ce_weight": 0.5, "ctc_weight": 1.0}
    assert AdapterTrainConfig.from_dict(data).loss.needs_llm
    characters = data | {"model": {"speech_readout": "ctc", "ctc_alphabet": ENGLISH_ALPHABET}}
    with pytest.raises(ValueError, match="cannot train a character head"):
        AdapterTrainConfig.from_dict(characters)  # the text a head spells passes no gradient
    data["model"] = {"speech_readout": "ctcc"}
    with pytest.raises(ValueError, match="model.speech_readout must be one of .*'ctcc'"):
        AdapterTrainConfig.from_dict(data)


def ctc_read_tiny(temperature=1.0):
    """A sharp tiny model served through the CTC readout, its blank the word piece of a space."""
    loaded = loaded_tiny(sharp=True)
    blank = ctc_blank_id(loaded.tokenizer, " ")
    loaded.model.config = dataclasses.replace(loaded.model.config, speech_readout="ctc", ctc_blank_id=blank,
                                              ctc_readout_temperature=temperature)
    return loaded, blank


def test_llm_losses_read_speech_as_the_ctc_readout_serves_it_and_train_the_adapter_through_it(corpus):
    loaded, blank = ctc_read_tiny()
    model, tokenizer = loaded.model, loaded.tokenizer
    data = SpeechDataset(read_manifest(corpus)[:3], tokenizer, model.speech_token_count,
                         ctc_targets=word_piece_targets(tokenizer, blank))
    batch = SpeechCollator(tokenizer.pad_token_id)([data[i] for i in range(3)])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        AdapterObjective(model, LossSection(ce_weight=1.0, ctc_weight=1.0), ctc_blank_id=blank)
    loss, metrics = AdapterObjective(model, LossSection(ce_weight=1.0, ctc_weight=1.0), ctc_blank_id=blank,
                                     tokenizer=tokenizer)(batch)
    assert float(loss.detach()) == pytest.approx(metrics["ce"] + metrics["ctc"], rel=1e-5)
    # The LLM read one vector per word piece heard, not one per adapter output, in a prompt laid out for it.
    table = model.llama_model.get_input_embeddings().weight
    with torch.no_grad():
        outputs = speech_embeddings(model, batch)
        reads = [ctc_readout(o, table, blank, 1.0) for o in outputs]
        served = [Turn("human", instruction=i, speech_tokens=len(r)) for i, r in zip(batch["instructions"], reads)]
        tokens = readout_prompts(batch, reads, tokenizer, template_for("blsp", tokenizer), tokenizer.pad_token_id)
        logits = model(tokens["input_ids"], tokens["attention_mask"], tokens["speech_mask"], speech_embeds=reads).logits
    assert 0 < sum(len(r) for r in reads) < sum(len(o) for o in outputs)
    assert metrics["speech_positions"] == pytest.approx(sum(len(r) for r in reads) / 3)
    assert metrics["ce"] == pytest.approx(float(cross_entropy(logits, tokens["labels"])), rel=1e-5)
    first = render([served[0], Turn("assistant", text=batch["responses"][0])], tokenizer,
                   template_for("blsp", tokenizer), add_eos=True)
    assert tokens["input_ids"][0, :len(first.input_ids)].tolist() == first.input_ids
    # Its cross-entropy alone reaches the adapter through the readout's posteriors, and nothing frozen.
    ce_only = AdapterObjective(model, LossSection(ce_weight=1.0), tokenizer=tokenizer)
    ce_only(batch)[0].backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    assert set(grads) <= set(model.adapter_state_dict()) and any(float(g.abs().sum()) > 0 for g in grads.values())


def test_a_run_trains_ctc_and_the_llm_cross_entropy_together_through_the_readout(corpus, tmp_path):
    loaded, _ = ctc_read_tiny()
    config = train_config(corpus, tmp_path, per_device_batch_size=16, num_epochs=2)
    config.loss = LossSection(ce_weight=0.5, ctc_weight=1.0)
    config.eval = EvalSection(repeat_wer_examples=0)
    config.model.speech_readout, config.model.ctc_readout_temperature = "ctc", 1.0
    run(config, loaded=loaded)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "ctc", "speech_positions", "unheard_clips"} <= set(metrics[0])
    assert "0.5 x cross-entropy on the response (speech read through the CTC readout)" in (
        tmp_path / "README.md").read_text()


def test_objective_skips_the_head_on_the_prompt_without_changing_the_losses(corpus):
    loaded = loaded_tiny(sharp=True)
    examples = read_manifest(corpus)[:3]
    data = SpeechDataset(examples, loaded.tokenizer, loaded.model.speech_token_count, with_teacher=True)
    batch = SpeechCollator(loaded.tokenizer.pad_token_id)([data[i] for i in range(3)])
    assert response_span(batch["labels"]) < batch["labels"].shape[1]
    _, metrics = AdapterObjective(loaded.model, LossSection(kd_weight=1.0))(batch)
    model = loaded.model
    with torch.no_grad():
        embeds = speech_embeddings(model, batch)
        full = model(batch["input_ids"], batch["attention_mask"], batch["speech_mask"], speech_embeds=embeds).logits
        teacher = model(batch["teacher"]["input_ids"], batch["teacher"]["attention_mask"]).logits
    assert metrics["ce"] == pytest.approx(float(cross_entropy(full, batch["labels"])), rel=1e-5)
    assert metrics["kd"] == pytest.approx(float(distillation_kl(full, batch["labels"], teacher,
                                                                batch["teacher"]["labels"])), rel=1e-4)


def test_objective_views_carry_the_same_response(corpus):
    loaded = loaded_tiny()
    examples = read_manifest(corpus)[:2]
    data = SpeechDataset(examples, loaded.tokenizer, loaded.model.speech_token_count, with_teacher=True)
    batch = SpeechCollator(loaded.tokenizer.pad_token_id)([data[0], data[1]])
    loss, metrics = AdapterObjective(loaded.model, LossSection(kd_weight=1.0))(batch)
    assert loss > 0 and metrics["kd"] > 0 and metrics["response_tokens"] == sum(
        len(loaded.tokenizer(e.response, add_special_tokens=False).input_ids) + 1 for e in examples)


def test_frame_masking_zeroes_spans_and_channels_and_nothing_else():
    window = torch.randn(200, 16) + 5  # no zeros of its own
    torch.manual_seed(0)
    masked = FrameMasking(time_fraction=0.2, time_span=10, channel_fraction=0.25)(window)
    assert masked.shape == window.shape and not torch.equal(masked, window)
    kept = masked != 0
    assert torch.equal(masked[kept], window[kept])  # what is not masked is untouched
    dead_channels = (~kept).all(dim=0)
    dead_frames = (~kept[:, ~dead_channels]).all(dim=1)
    assert 1 <= int(dead_channels.sum()) <= 10 and 10 <= int(dead_frames.sum()) <= 40  # ~4 and ~40 at most
    assert torch.equal(FrameMasking()(window), window)  # off by default
    torch.manual_seed(0)
    assert torch.equal(FrameMasking(time_fraction=0.2, time_span=10, channel_fraction=0.25)(window), masked)
    with pytest.raises(ValueError, match="mask fractions"):
        load_config(CONFIGS / "adapter_tiny_offline.json", ["data.mask_time_fraction=1.5"])


def test_masking_applies_in_training_only_and_leaves_the_cache_clean(corpus, tmp_path):
    loaded = loaded_tiny()
    cache = EncoderCache.for_model(tmp_path / "cache", loaded.model)
    data = SpeechDataset(read_manifest(corpus)[:2], loaded.tokenizer, loaded.model.speech_token_count, cache=cache)
    collate = SpeechCollator(loaded.tokenizer.pad_token_id)
    objective = AdapterObjective(loaded.model, LossSection(), cache,
                                 masking=FrameMasking(time_fraction=0.5, time_span=4))
    objective.eval()
    with torch.no_grad():
        clean, _ = objective(collate([data[0], data[1]]))  # fills the cache
        objective.train()
        noisy, _ = objective(collate([data[0], data[1]]))
        objective.eval()
        again, _ = objective(collate([data[0], data[1]]))  # read back from the cache: not masked
    assert float(noisy) != pytest.approx(float(clean)) and float(again) == pytest.approx(float(clean))


# --- data --------------------------------------------------------------------------------------------
def test_bucketing_covers_every_example_exactly_once_per_epoch():
    durations = list(np.random.default_rng(0).uniform(0.5, 20, size=103))
    sampler = BucketBatchSampler(durations, 4, seed=7, mega_batch_factor=3)
    def spread(batches):
        return np.mean([max(durations[i] for i in b) - min(durations[i] for i in b) for b in batches])

    unsorted = spread([list(range(i, min(i + 4, 103))) for i in range(0, 103, 4)])
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(103)) and len(batches) == len(sampler) == 26
        # Within a batch lengths are close: each batch is a run of a sorted mega-batch.
        assert spread(batches) < 0.5 * unsorted
        orders.append(flat)
    assert orders[0] != orders[1]
    shards = [BucketBatchSampler(durations, 4, seed=7, mega_batch_factor=3, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(103)) and len(list(shards[0])) == len(list(shards[1])) == 13


def test_collator_labels_are_ignored_except_response_and_eos(corpus):
    loaded = loaded_tiny()
    tokenizer = loaded.tokenizer
    examples = read_manifest(corpus)[:3]
    data = SpeechDataset(examples, tokenizer, loaded.model.speech_token_count)
    batch = SpeechCollator(tokenizer.pad_token_id)([data[i] for i in range(3)])
    for row, example in enumerate(examples):
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        learned = labels[labels != IGNORE_INDEX].tolist()
        assert learned == tokenizer(example.response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        # The response sits right before the padding; everything after the real tokens is padding.
        real = int(mask.sum())
        assert labels[real - len(learned):real].tolist() == learned and (labels[real:] == IGNORE_INDEX).all()
        assert int(batch["speech_mask"][row].sum()) == loaded.model.speech_token_count(len(batch["audios"][row]))
        assert not batch["speech_mask"][row][labels != IGNORE_INDEX].any()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["speech_mask"].shape


def test_repetition_mixing_adds_transcript_lines_at_the_ratio(corpus):
    examples = [SpeechExample(f"/a{i}.wav", f"words {i}", "Continue.", f"cont {i}", 1.0) for i in range(18)]
    mixed = with_repetition(examples, 1 / 9, seed=0)
    repeats = [e for e in mixed if e.instruction == REPEAT_INSTRUCTION]
    assert len(mixed) == 20 and len(repeats) == 2
    assert all(e.response == e.text for e in repeats) and len({e.audio for e in repeats}) == 2


def test_encoder_cache_returns_identical_adapter_inputs_and_notices_a_changed_file(corpus, tmp_path):
    loaded = loaded_tiny("30s")
    model, tokenizer = loaded.model, loaded.tokenizer
    clip = tmp_path / "clip.wav"
    shutil.copy(corpus.parent / "clip1.wav", clip)
    example = read_manifest(corpus)[1]
    example = SpeechExample(str(clip), example.text, example.instruction, example.response, example.duration)
    cache = EncoderCache.for_model(tmp_path / "cache", model)
    data = SpeechDataset([example], tokenizer, model.speech_token_count, cache=cache)
    collate = SpeechCollator(tokenizer.pad_token_id)

    first = collate([data[0]])
    assert first["encodeds"][0] is None and cache.misses == 1
    fresh_embeds = speech_embeddings(model, first, cache)  # encodes and stores
    direct = model.encode_windows(first["audios"])
    second = collate([data[0]])
    assert second["audios"][0] is None and second["encodeds"][0] is not None and cache.hits == 1
    for cached, computed in zip(second["encodeds"][0], direct[0]):
        assert torch.equal(cached, computed)
    assert torch.equal(speech_embeddings(model, second, cache)[0], fresh_embeds[0])
    torch.testing.assert_close(fresh_embeds[0], model.encode_speech(first["audios"])[0], atol=1e-5, rtol=1e-4)

    # A changed file (new contents, new mtime) is a miss and is encoded again.
    sf.write(clip, tone(1.3, 500), SAMPLE_RATE)
    os.utime(clip, ns=(os.stat(clip).st_atime_ns, os.stat(clip).st_mtime_ns + 10**9))
    third = collate([data[0]])
    assert third["encodeds"][0] is None and third["audios"][0] is not None and cache.misses == 2
    assert not torch.equal(model.encode_windows(third["audios"])[0][0][:5], direct[0][0][:5])


def test_precomputed_cache_matches_training_and_an_interrupted_fill_resumes(corpus, tmp_path):
    model = loaded_tiny().model
    cache = EncoderCache.for_model(tmp_path / "cache", model)
    todo = missing_clips([str(corpus), str(corpus)], cache)  # a clip named twice is encoded once
    assert len(todo) == len(SENTENCES)
    fill(model, cache, todo[:2], batch_size=4, max_seconds=30)  # as if killed after two clips
    rest = missing_clips([str(corpus)], cache)
    assert [path for path, _ in rest] == [path for path, _ in todo[2:]]
    fill(model, cache, rest, batch_size=4, max_seconds=30)
    assert missing_clips([str(corpus)], cache) == []
    # What training then reads is what it would have computed itself (batching in `fill` changes nothing).
    example = read_manifest(corpus)[3]
    item = SpeechDataset([example], loaded_tiny().tokenizer, model.speech_token_count, cache=cache)[0]
    direct = model.encode_windows([load_audio(example.audio)])[0][0]
    assert torch.allclose(item["encoded"][0], direct, atol=1e-5)


def test_a_cache_held_in_memory_reads_each_clip_once_and_keeps_to_its_budget(corpus, tmp_path):
    """With `data.encoder_cache_memory_gb`, a clip's frames come from memory after the first read (the next
    epoch reads no file) and give the same tensors; clips past the budget are read from disk as before."""
    model = loaded_tiny().model
    on_disk = EncoderCache.for_model(tmp_path / "cache", model)
    fill(model, on_disk, missing_clips([str(corpus)], on_disk), batch_size=4, max_seconds=30)
    examples = read_manifest(corpus)[:3]
    first = [on_disk.get(on_disk.key(e.audio)) for e in examples]
    one_clip = sum(h.numel() * h.element_size() for h in first[0]["hidden"])
    held = EncoderCache.for_model(tmp_path / "cache", model, memory_bytes=one_clip)
    keys = [held.key(e.audio) for e in examples]
    read = [held.get(k) for k in keys]
    assert held.held_bytes == one_clip  # the first clip fits; the others are over budget
    for key in keys:
        held._file(key).unlink()  # a later epoch: no file left to read
    assert torch.equal(held.get(keys[0])["hidden"][0], read[0]["hidden"][0])
    assert torch.equal(read[0]["hidden"][0], first[0]["hidden"][0])
    assert held.get(keys[1]) is None and held.get(keys[2]) is None  # over budget: read from disk, now gone
    with pytest.raises(ValueError, match="encoder_cache_memory_gb"):
        load_config(CONFIGS / "adapter_tiny_offline.json", ["data.encoder_cache_memory_gb=-1"])


def test_each_example_is_tokenized_once_however_many_epochs(corpus, monkeypatch):
    loaded = loaded_tiny()
    data = SpeechDataset(read_manifest(corpus)[:2], loaded.tokenizer, loaded.model.speech_token_count,
                         ctc_targets=word_piece_targets(loaded.tokenizer, 3))
    first = [data[0], data[1]]
    rendered = []
    monkeypatch.setattr(data, "render_speech", lambda *args: rendered.append(args) or {})
    again = [data[1], data[0], data[1]]
    assert rendered == []  # the second epoch renders nothing
    for before, after in zip([first[1], first[0], first[1]], again):
        assert after["input_ids"] == before["input_ids"] and after["transcript_ids"] == before["transcript_ids"]


def test_precompute_cli_fills_the_cache_without_the_runs_starting_adapter(corpus, tmp_path, monkeypatch, capsys):
    sections = []

    def build(section):
        sections.append(section)
        return loaded_tiny()

    monkeypatch.setattr(precompute_encoder, "build_model", build)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"init_adapter": str(tmp_path / "not_trained_yet")},
                                  "data": {"train_manifest": str(corpus), "encoder_cache_dir": str(tmp_path / "cache")},
                                  "loop": {"output_dir": str(tmp_path / "run")}}))
    assert precompute_encoder.main(["--config", str(config), "--manifest", str(corpus), "--device", "cpu"]) == 0
    assert [s.init_adapter for s in sections] == [None]
    assert f"{len(SENTENCES)} clips to encode" in capsys.readouterr().out
    cache = EncoderCache.for_model(tmp_path / "cache", loaded_tiny().model)
    assert precompute_encoder.missing_clips([str(corpus)], cache) == []


# --- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("adapter_*.json")), ids=lambda p: p.name)
def test_every_adapter_config_in_the_repository_loads(path):
    config = load_config(path, [])
    assert config.loop.output_dir and config.data.train_manifest
    alphabet = config.model.ctc_alphabet
    if alphabet is not None:
        assert config.model.speech_readout == "ctc"
    if alphabet is not None and all(len(symbol) == 1 for symbol in alphabet):
        assert config.model.conv_kernel_sizes.count(",") == 0  # one stride-2 layer leaves room for each letter


@pytest.mark.parametrize("name",
                         ["adapter_tiny_offline.json", "adapter_tiny_offline_ctc.json", "adapter_7b_paper.json"])
def test_shipped_configs_parse_and_take_overrides(name):
    readout = ["model.speech_readout=embeddings"] if name == "adapter_tiny_offline_ctc.json" else []  # kd needs it
    config = load_config(CONFIGS / name,
                         ["loop.max_steps=7", "loss.kd_weight=0.5", "data.encoder_cache_dir=null", *readout])
    assert config.loop.max_steps == 7 and config.loss.kd_weight == 0.5 and config.data.encoder_cache_dir is None
    if name == "adapter_7b_paper.json":
        loop = config.loop
        assert (loop.learning_rate, loop.warmup_steps, loop.num_epochs, loop.mixed_precision) == (5e-5, 1000, 1, "bf16")
        assert loop.per_device_batch_size * 8 * loop.gradient_accumulation_steps == 768  # on 8 GPUs
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(CONFIGS / name, ["loss.kd_weigth=1"])
