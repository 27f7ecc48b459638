"""Stage 1 (issue 8): prompt templates, LoRA SFT, LoRA checkpoints, the self-distilled data builder."""
import copy
import json
import time

import pytest
import torch

from blsp_chat import weights
from blsp_chat.constants import IGNORE_INDEX, REPEAT_INSTRUCTION, SNIPS_LIGHT_INTENTS
from blsp_chat.offline import WeightsError
from blsp_chat.prompt import Turn, render, template_for
from blsp_chat.weights import load_llm
from tiny import tiny_llm, tiny_tokenizer
from train import build_sft_data as bd
from train import sft_llm
from train.build_sft_data import transcript_style
from train.io import read_jsonl
from train.loop import checkpoint_dirs
from train.metrics import word_errors

CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MIXED = [Turn("human", text="hello there"), Turn("assistant", text="paris."),
         Turn("human", instruction=REPEAT_INSTRUCTION, speech_tokens=2)]
GOLDEN_BLSP = [1, 274, 277, 263, 267, 259, 269, 81, 262, 271, 310, 201, 274, 276, 305, 306, 86, 267, 301, 264, 16, 310,
               201,
               274, 277, 263, 267, 278, 292, 71, 312, 302, 262, 275, 269, 270, 294, 73, 223, 309, 289, 16, 2, 2, 310,
               201, 274,
               276, 305, 306, 86, 267]
IM_START_USER = [30, 94, 75, 79, 65, 85, 86, 281, 86, 94, 32, 87, 85, 290, 201]
IM_END = [30, 94, 75, 79, 65, 71, 80, 70, 94, 32, 201]
IM_START_ASSISTANT = [30, 94, 75, 79, 65, 85, 86, 281, 86, 94, 32, 282, 305, 306, 86, 201]
GOLDEN_CHAT = (IM_START_USER + [259, 269, 81, 262,
                                271] + IM_END + IM_START_ASSISTANT + [301, 264, 16] + IM_END + IM_START_USER
               + [278, 292, 71, 312, 302, 262, 275, 269, 270, 294, 73, 223, 309, 289, 16, 2,
                  2] + IM_END + IM_START_ASSISTANT)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def records(n=12):
    return [{"instruction": REPEAT_INSTRUCTION, "input": f"the quick brown fox {i % 3}",
             "output": f"the quick brown fox {i % 3}"}
            for i in range(n)]


# --- templates -------------------------------------------------------------------------------------------
def test_blsp_template_renders_golden_ids(tokenizer):
    rendered = render(MIXED, tokenizer, template_for("blsp", tokenizer))
    assert rendered.input_ids == GOLDEN_BLSP
    assert tokenizer.decode(rendered.input_ids[1:]).replace("</s>", "") == (
        "###[Human]:hello there\n\n\n###[Assistant]:paris.\n\n\n"
        "###[Human]:Please repeat the following words.\n\n\n###[Assistant]:")
    assert [i for i, s in enumerate(rendered.speech_mask) if s] == [42, 43]


def test_chat_template_renders_golden_ids(tokenizer):
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    rendered = render(MIXED, tok, template_for("chat", tok))
    assert rendered.input_ids == GOLDEN_CHAT
    assert sum(rendered.speech_mask) == 2 and rendered.input_ids[0] != tok.bos_token_id


def test_sft_labels_cover_response_and_eos_only(tokenizer):
    ids, labels = sft_llm.encode({"instruction": "Say hi.", "input": "", "output": "hello there"}, tokenizer,
                                 template_for("blsp", tokenizer))
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learned == tokenizer("hello there", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert ids[-len(learned):] == learned  # the response is the tail


# --- training ---------------------------------------------------------------------------------------------
def lively_llm():
    torch.manual_seed(0)
    llm = tiny_llm()
    with torch.no_grad():  # tied embeddings of unit scale, so that logits (and the loss) can move
        llm.get_input_embeddings().weight.normal_(0, 1.0)
    return llm


def quiet(_):
    pass


def test_lora_sft_lowers_loss_and_touches_only_lora_weights(tokenizer, tmp_path):
    config = sft_llm.SftConfig(learning_rate=1e-2, batch_size=4, max_steps=30, warmup_steps=1, lora_dropout=0.0,
                               log_every=10, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                               run_dir=str(tmp_path))
    model = sft_llm.prepare_model(lively_llm(), config)
    encoded, _ = sft_llm.encode_all(records(), tokenizer, template_for("blsp", tokenizer), config.max_len)
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" in k}
    assert lora_before and all(k.split(".")[-3] in config.lora_targets or "lora_" in k for k in lora_before)
    before = sft_llm.mean_loss(model, tokenizer, encoded)
    result = sft_llm.train(model, tokenizer, encoded, config, log=quiet)
    after = sft_llm.mean_loss(result.model, tokenizer, encoded)
    curve = sft_llm.loss_curve(tmp_path, result.losses)
    assert after < 0.5 * before and [p["step"] for p in curve] == [10, 20, 30]
    assert curve[0]["loss"] == pytest.approx(sum(result.losses[:10]) / 10, abs=1e-4)
    for name, value in result.model.named_parameters():
        if name in base_before:
            assert torch.equal(value, base_before[name]), f"base weight {name} changed"
    assert any(not torch.equal(v, lora_before[k]) for k, v in result.model.named_parameters() if k in lora_before)


def kill_at(step):
    def callback(state, metrics):
        if state.step == step:
            raise KeyboardInterrupt("killed")

    return callback


def test_sft_resumed_after_a_kill_reproduces_the_loss_sequence(tokenizer, tmp_path):
    encoded, _ = sft_llm.encode_all(records(), tokenizer, template_for("blsp", tokenizer), 160)

    def run(name, **kwargs):  # lora_dropout stays on: the resumed run must restore the RNG too
        config = sft_llm.SftConfig(learning_rate=1e-2, batch_size=4, max_steps=8, warmup_steps=2, save_every=3,
                                   log_every=1, run_dir=str(tmp_path / name))
        return sft_llm.train(sft_llm.prepare_model(lively_llm(), config), tokenizer, encoded, config, log=quiet,
                             **kwargs)

    full = run("full")
    with pytest.raises(KeyboardInterrupt):
        run("cut", callbacks=[kill_at(5)])
    assert [d.name for d in checkpoint_dirs(tmp_path / "cut")] == ["step-3"]
    stepped = []
    resumed = run("cut", resume=True, callbacks=[lambda state, metrics: stepped.append(state.step)])
    assert stepped == [4, 5, 6, 7, 8]  # continued, not restarted (a restart would give the same losses)
    assert len(full.losses) == 8 and resumed.losses == full.losses  # 3 batches an epoch: two epoch boundaries
    expected = dict(full.model.named_parameters())
    for name, value in resumed.model.named_parameters():
        assert torch.equal(value, expected[name]), name


def test_cli_resume_keeps_the_time_budget_plan_and_writes_the_lora_and_card(tokenizer, tmp_path, monkeypatch, capsys):
    base_dir = tmp_path / "base"
    lively_llm().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    settings = dict(llm=str(base_dir), data=str(tmp_path / "data.jsonl"), learning_rate=1e-2, batch_size=4, epochs=3.0,
                    warmup_steps=2, save_every=2, log_every=1, time_budget_min=0.2)

    def config(name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(settings, out=str(tmp_path / name / "lora"),
                                        run_dir=str(tmp_path / name / "run"))))
        return path

    def probe_says(seconds):
        monkeypatch.setattr(sft_llm, "seconds_per_step", lambda *args: seconds)

    probe_says(2.0)  # 12 s budget: 5 of the 9 scheduled steps fit
    full = sft_llm.train_and_save(sft_llm.SftConfig.load(config("full")), log=quiet)
    assert full["training"]["steps"] == 5
    with pytest.raises(KeyboardInterrupt):
        sft_llm.train_and_save(sft_llm.SftConfig.load(config("cut")), callbacks=[kill_at(3)], log=quiet)
    probe_says(0.5)  # a new probe would plan all 9 steps; the resumed run must keep the checkpoint's 5
    capsys.readouterr()
    sft_llm.main(["--config", str(config("cut")), "--resume"])
    assert "step-2 at step 2" in capsys.readouterr().err  # continued from the kill's last checkpoint

    def logged_losses(name):
        return [r["loss"] for r in read_jsonl(tmp_path / name / "run" / "metrics.jsonl")]

    assert len(logged_losses("full")) == 5 and logged_losses("cut") == logged_losses("full")
    lora = tmp_path / "cut" / "lora"
    assert json.loads((lora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    card = json.loads((lora / sft_llm.CARD_JSON).read_text())
    assert card["training"]["curve"] == full["training"]["curve"] and card["data"]["used"] == 12
    assert "![loss curve](loss_curve.png)" in (lora / sft_llm.CARD_MD).read_text()
    assert (lora / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_time_budget_probe_times_steps_and_puts_the_weights_back(tokenizer):
    config = sft_llm.SftConfig(learning_rate=1e-2)
    model = sft_llm.prepare_model(lively_llm(), config)
    encoded, _ = sft_llm.encode_all(records(4), tokenizer, template_for("blsp", tokenizer), config.max_len)
    before = {k: v.clone() for k, v in model.named_parameters()}
    batch = sft_llm.collate(encoded, tokenizer.pad_token_id)
    assert sft_llm.seconds_per_step(model, [batch] * 4, gradient_accumulation_steps=2) > 0
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]) and value.grad is None, name


def test_lora_checkpoint_saves_loads_and_merges_to_identical_logits(tokenizer, tmp_path):
    torch.manual_seed(0)
    base_dir, lora_dir = tmp_path / "base", tmp_path / "lora"
    base = tiny_llm()
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = sft_llm.SftConfig(llm=str(base_dir))
    model = sft_llm.prepare_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a trained-looking LoRA (B starts at zero, which would merge to nothing)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    sft_llm.save(model, tokenizer, config, lora_dir)
    assert json.loads((lora_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ids = torch.tensor([GOLDEN_BLSP])
    expected = model.eval()(input_ids=ids).logits
    merged, merged_tokenizer = load_llm(str(lora_dir), torch.float32)
    assert not any("lora_" in k for k in merged.state_dict())
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # the LoRA does matter
    assert merged_tokenizer("hello").input_ids == tokenizer("hello").input_ids


def test_load_llm_rejects_a_lora_without_a_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(WeightsError, match="base"):
        load_llm(str(tmp_path), torch.float32)


# --- data builder -------------------------------------------------------------------------------------------
class FakeGenerator:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, messages, max_new_tokens):
        self.calls.extend(messages)
        return [self.answers(m) for m in messages]


def fake_tasks():
    intent = bd.INTENT_INSTRUCTION.format(labels=", ".join(SNIPS_LIGHT_INTENTS))
    return [
        bd.make_task("question", "What is the capital of Peru?"),
        bd.make_task("question", "What is the capital of Peru?"),  # a duplicate prompt: one task
        bd.make_task("define", "Define the word \"loop\"."),
        bd.make_task("define", "Define the word \"nothing\"."),
        bd.make_task("define", "Define the word \"cut\"."),
        bd.make_task("use_word", "Use the word \"same\" in a sentence."),
        bd.make_task("use_word", "Use the word \"twin\" in a sentence."),
        bd.make_task("sentiment", bd.SENTIMENT_INSTRUCTION, "i love it", labels=bd.SENTIMENT_LABELS),
        bd.make_task("sentiment", bd.SENTIMENT_INSTRUCTION, "it is a rock", labels=bd.SENTIMENT_LABELS),
        bd.make_task("intent", intent, "turn off the lights in the kitchen", labels=SNIPS_LIGHT_INTENTS,
                     gold="SwitchLightOff"),
        bd.make_task("intent", intent, "dim the lights in the bedroom", labels=SNIPS_LIGHT_INTENTS,
                     gold="DecreaseBrightness"),
        bd.make_task("repeat", REPEAT_INSTRUCTION, "he was not an ill disposed young man",
                     target="he was not an ill disposed young man"),
        bd.make_task("continue", bd.CONTINUATION_INSTRUCTION, "he cut a fine figure"),
    ]


def fake_answer(message):
    table = {
        "Peru": ("The capital of Peru is Lima.", True),
        "Chile": ("The capital of Chile is Santiago.", True),
        "loop": ("a loop is a loop is a loop is a loop is a loop", True),
        "nothing": ("   ", True),
        '"cut"': ("To cut is to divide with a blade. It is also used for", False),
        "same": ("This sentence is the same.", True),
        "twin": ("This sentence is the same.", True),
        "i love it": ("Positive.", True),
        "a rock": ("It is hard to say, maybe positive or negative", True),
        "kitchen": ("switchlightoff", True),
        "bedroom": ("IncreaseBrightness", True),
        "fine figure": ("He cut a fine figure.", True),
    }
    return next(v for k, v in table.items() if k in message)


def test_builder_filters_dedups_and_resumes(tmp_path):
    tasks = list({t.id: t for t in fake_tasks()}.values())
    assert len(tasks) == 12
    generator = FakeGenerator(fake_answer)
    card = bd.build(tasks, generator, tmp_path, batch_size=2, progress=False)
    kept = {r["input"] or r["instruction"]: r["output"] for r in bd.read_jsonl(tmp_path / bd.DATA_NAME)}
    assert kept == {
        "What is the capital of Peru?": "The capital of Peru is Lima.",
        "Define the word \"cut\".": "To cut is to divide with a blade.",
        "i love it": "positive",
        "turn off the lights in the kitchen": "SwitchLightOff",
        "he was not an ill disposed young man": "he was not an ill disposed young man",
    } | {k: v for k, v in kept.items() if "in a sentence" in k}
    assert sum("in a sentence" in k for k in kept) == 1  # two prompts, one answer: the second is a duplicate
    assert card["dropped_per_reason"] == {"disagrees_with_command_label": 1, "duplicate_output": 1, "echoes_input": 1,
                                          "empty": 1, "looping": 1, "not_a_label": 1}
    assert not any("repeat" in m for m in generator.calls)  # repetition targets need no generation
    assert (tmp_path / "DATA_CARD.md").is_file()
    again = FakeGenerator(fake_answer)
    card2 = bd.build(tasks + [bd.make_task("question", "What is the capital of Chile?")], again, tmp_path,
                     progress=False)
    assert again.calls == ["What is the capital of Chile?"]  # resume: decided ids are skipped
    assert card2["kept"] + card2["dropped"] == 13


def test_forget_rejects_lets_a_rerun_try_again(tmp_path):
    task = bd.make_task("sentiment", bd.SENTIMENT_INSTRUCTION, "i love it", labels=bd.SENTIMENT_LABELS)
    assert task.user_message.endswith(bd.CLASSIFY_HINT)
    bd.build([task], FakeGenerator(lambda m: ("I cannot tell.", True)), tmp_path, progress=False)
    assert bd.forget_rejects(tmp_path, ["not_a_label"]) == 1
    card = bd.build([task], FakeGenerator(lambda m: ("Positive", True)), tmp_path, progress=False)
    assert card["kept"] == 1 and card["dropped"] == 0


def test_refilter_moves_records_that_fail_a_filter(tmp_path):
    good = dict(id="a", kind="continue", split="train", instruction=bd.CONTINUATION_INSTRUCTION,
                input="he cut a fine figure",
                output="He smiled at the crowd and waved his hat.")
    echo = dict(good, id="b", output="He cut a fine figure.")
    repeat = dict(good, id="c", kind="repeat", instruction=REPEAT_INSTRUCTION, output="he cut a fine figure")
    (tmp_path / bd.DATA_NAME).write_text("".join(json.dumps(r) + "\n" for r in (good, echo, repeat)))
    card = bd.refilter(tmp_path)
    assert [r["id"] for r in bd.read_jsonl(tmp_path / bd.DATA_NAME)] == ["a", "c"]
    assert card["dropped_per_reason"] == {"echoes_input": 1}


def test_builder_time_budget_stops_between_batches(tmp_path):
    tasks = [bd.make_task("question", f"What is the capital of country {i}?") for i in range(6)]
    generator = FakeGenerator(lambda m: time.sleep(0.2) or (f"An answer to {m}", True))
    bd.build(tasks, generator, tmp_path, batch_size=2, time_budget_s=0.1, progress=False)
    assert len(generator.calls) == 2


def test_make_tasks_is_seed_deterministic_and_holds_out_by_source():
    sources = bd.Sources(words={"n": ["apple", "river"], "v": ["run", "jump"], "a": ["happy", "green"]},
                         examples=["the river runs fast", "she likes green apples"],
                         sentences=["A gift of a flower will soon be made to you."] * 1
                         + [f"Sentence number {i} is here." for i in range(40)],
                         passages=["One thing. Two things. Three things and more words "
                                   "to make this passage long enough for it."])
    counts = {"question": 5, "define": 3, "continue": 5, "repeat": 5, "intent": 5, "sentiment": 3}
    first, second = bd.make_tasks(sources, counts, seed=3), bd.make_tasks(sources, counts, seed=3)
    assert [t.id for t in first] == [t.id for t in second]
    assert [t.id for t in first] != [t.id for t in bd.make_tasks(sources, counts, seed=4)]
    assert all(t.target == t.input for t in first if t.kind == "repeat")
    numbered = (f"Sentence number {i} is here." for i in range(1000))
    held = next(sentence for sentence in numbered if bd.split_of(sentence) == "heldout")
    # a held-out source stays held out in every task made from it, in any spelling
    repeat = bd._repeat(held, __import__("random").Random(0))
    cont = bd._with_source("continue", bd.CONTINUATION_INSTRUCTION, held, __import__("random").Random(1))
    assert repeat.split == cont.split == "heldout"
    assert bd.make_task("repeat", REPEAT_INSTRUCTION, "x y z", source="x y z").split == bd.split_of("x y z")


@pytest.mark.parametrize("text,looping", [("the cat sat on the mat and the dog sat on the rug", False),
                                          ("I am here. I am here. I am here.", True)])
def test_looping_filter(text, looping):
    assert bd.loops(text) is looping


def test_pick_label():
    assert bd.pick_label("SetLightColor.", SNIPS_LIGHT_INTENTS) == "SetLightColor"
    assert bd.pick_label("switch light on", SNIPS_LIGHT_INTENTS) == "SwitchLightOn"
    assert bd.pick_label("SwitchLightOn or SwitchLightOff", SNIPS_LIGHT_INTENTS) is None
    assert bd.pick_label("The emotional tone of the text is positive.", bd.SENTIMENT_LABELS) == "positive"
    assert bd.pick_label("positive, not positive", bd.SENTIMENT_LABELS) is None
    assert bd.pick_label("Negative", bd.SENTIMENT_LABELS) == "negative"


# --- Alpaca input ---------------------------------------------------------------------------------------------
def test_read_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Greet.", "output": "Hello!"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("a.json", "a.jsonl"):
        got = bd.read_alpaca(tmp_path / name)
        assert [(r["instruction"], r["input"], r["output"]) for r in got] == [("Add.", "2 and 2", "4"),
                                                                               ("Greet.", "", "Hello!")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="instruction"):
        bd.read_alpaca(tmp_path / "bad.jsonl")


def test_training_records_skip_heldout(tmp_path):
    rows = [{"instruction": "A.", "input": "", "output": "a", "split": "train"},
            {"instruction": "B.", "input": "", "output": "b", "split": "heldout"}, {"instruction": "C.", "output": "c"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [r["instruction"] for r in sft_llm.load_training_records(tmp_path / "d.jsonl")] == ["A.", "C."]


def test_repeat_wer_counts_words_in_transcript_style():
    errors = word_errors("he was not an ill disposed young man", "He was not, an ill young man.", transcript_style)
    assert (errors.errors, errors.reference_words) == (1, 8)


# --- the shipped default ----------------------------------------------------------------------------------------
def test_offline_base_name_still_resolves_to_the_plain_base():
    assert weights.DEFAULT_LLM != "offline:smollm2-135m-instruct"
    assert weights.resolve_base(weights.DEFAULT_LLM).endswith("stage1_lora")


@pytest.mark.integration
def test_default_llm_with_stage1_lora_answers_in_blsp_format():
    base_dir = weights.resolve_base("offline:smollm2-135m-instruct")
    assert not (weights.Path(base_dir) / "adapter_config.json").exists()
    llm, tokenizer = weights.load_llm(weights.DEFAULT_LLM, torch.float32)
    replies = sft_llm.answer_all(llm.eval(), tokenizer, "blsp", [("What is the capital of France?", "")], 24)
    assert "paris" in replies[0].lower(), replies


def test_old_spellings_of_learning_rate_and_accumulation_still_work_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"lr": 3e-3, "grad_accum": 4}))
    with pytest.warns(FutureWarning) as caught:
        config = sft_llm.SftConfig.load(path)
    assert [str(w.message).split(": use ")[1].split()[0] for w in caught] == ["'learning_rate'",
                                                                              "'gradient_accumulation_steps'"]
    assert (config.learning_rate, config.gradient_accumulation_steps) == (3e-3, 4)
    assert sft_llm.loop_config(config, None).learning_rate == 3e-3  # what the loop is given
    path.write_text(json.dumps({"lr": 3e-3, "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="both 'lr' and 'learning_rate'"):
        sft_llm.SftConfig.load(path)

    seen = []
    monkeypatch.setattr(sft_llm, "train_and_save", lambda config, resume: seen.append(config))
    with pytest.warns(FutureWarning) as caught:
        sft_llm.main(["--lr", "0.02", "--grad-accum", "3", "--out", str(tmp_path / "o")])
    assert [str(w.message).split(" is deprecated")[0] for w in caught] == ["--lr", "--grad-accum"]
    assert (seen[0].learning_rate, seen[0].gradient_accumulation_steps) == (0.02, 3)
    sft_llm.main(["--learning-rate", "0.05", "--out", str(tmp_path / "o")])
    assert seen[1].learning_rate == 0.05
    with pytest.raises(SystemExit):
        sft_llm.main(["--lr", "0.02", "--learning-rate", "0.05"])
