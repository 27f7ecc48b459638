"""BLSP as a Hugging Face model: BlspConfig (model_type "blsp") and BlspModel found by transformers' Auto classes,
save_pretrained -> from_pretrained, push_to_hub to a local stand-in of the Hub, --revision reaching the hub
download, and the Hub front matter of every model card."""
import base64
import json
import threading
import types
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from test_weights import _logits, _write_base_models, write_sentencepiece_tokenizer
from transformers import AutoConfig, AutoModel

from blsp_chat import model_card, weights
from blsp_chat.config import BlspConfig, GenerationOptions
from blsp_chat.model import BlspModel
from blsp_chat.offline import WeightsError
from tiny import tiny_blsp, tiny_tokenizer, tone

REPO = Path(__file__).resolve().parent.parent
CARD_KEYS = {"base_model", "license", "library_name", "pipeline_tag", "tags", "datasets"}


def front_matter(path: Path) -> dict:
    """The YAML between a card's leading '---' lines, parsed by yaml and by huggingface_hub (which must agree)."""
    text = path.read_text()
    assert text.startswith("---\n"), f"{path} has no front matter"
    parsed = yaml.safe_load(text.split("---\n")[1])
    assert ModelCard.load(path).data.to_dict() == parsed
    return parsed


def saved_tiny(tmp_path: Path):
    """A tiny model whose base models are saved as a user's local ones are, and its adapter-only checkpoint."""
    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    model.save_pretrained(tmp_path / "blsp")
    return model, tokenizer, tmp_path / "blsp"


def assert_same_weights(a: BlspModel, b: BlspModel) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


# --- config and Auto classes ---------------------------------------------------------------------------------
def test_config_is_a_transformers_config_found_by_auto_config(tmp_path):
    model, _, directory = saved_tiny(tmp_path)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["model_type"] == "blsp" and saved["architectures"] == ["BlspModel"]
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is BlspConfig and config.whisper_name_or_path == model.config.whisper_name_or_path
    assert AutoConfig.for_model("blsp", whisper_config={}, llama_config={}).adapter_inner_dim == 512
    with pytest.raises(ValueError, match="encoder_padding must be one of"):
        BlspConfig(whisper_config={}, llama_config={}, encoder_padding="10s")
    with pytest.raises(ValueError, match="not a BLSP config"):
        BlspConfig.from_dict({"whisper_config": {}})


def test_save_pretrained_then_auto_model_gives_equal_weights_and_logits(tmp_path):
    model, tokenizer, directory = saved_tiny(tmp_path)
    assert set(weights.read_state_dict(directory)) == set(model.adapter_state_dict())  # the adapter only
    assert CARD_KEYS <= set(front_matter(directory / "README.md"))  # the card save_pretrained writes
    again = AutoModel.from_pretrained(directory, device="cpu")
    assert type(again) is BlspModel and not again.training
    assert_same_weights(again, model)
    audio = tone(1.5)
    torch.testing.assert_close(_logits(again, tokenizer, audio), _logits(model, tokenizer, audio), atol=0, rtol=0)
    # saved again, loaded again: the same files, the same model
    again.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == (directory / "config.json").read_text()
    assert_same_weights(BlspModel.from_pretrained(tmp_path / "again", device="cpu"), model)


def test_auto_model_applies_config_overrides_as_transformers_does(tmp_path):
    _, _, directory = saved_tiny(tmp_path)
    model = AutoModel.from_pretrained(directory, device="cpu", prompt_template="chat", dtype="bfloat16")
    assert model.config.prompt_template == "chat" and model.speech_ln.weight.dtype == torch.bfloat16
    with pytest.raises(WeightsError, match="dtype must be one of"):
        BlspModel.from_pretrained(directory, device="cpu", dtype="float8")


def released_checkpoint(tmp_path: Path, model_type: str) -> tuple[BlspModel, Path]:
    """The released BLSP layout: every weight in one pytorch_model.bin, a sentencepiece tokenizer beside it."""
    model = tiny_blsp()
    released = tmp_path / f"released-{model_type or 'untyped'}"
    released.mkdir()
    config = {"whisper_config": model.config.whisper_config, "llama_config": model.config.llama_config,
              "conv_kernel_sizes": "5,5,5", "adapter_inner_dim": 8, "model_type": model_type,
              "architectures": ["BlspModel"], "torch_dtype": "float32", "transformers_version": "4.31.0"}
    (released / "config.json").write_text(json.dumps(config))
    torch.save({k: v for k, v in model.state_dict().items() if k != "llama_model.lm_head.weight"},
               released / "pytorch_model.bin")
    write_sentencepiece_tokenizer(released)
    return model, released


def test_auto_model_loads_the_released_layout(tmp_path):
    model, released = released_checkpoint(tmp_path, "blsp")
    loaded = AutoModel.from_pretrained(released, device="cpu")
    assert_same_weights(loaded, model)
    tokenizer = weights.load_tokenizer(released)
    audio = tone(2.0)
    torch.testing.assert_close(_logits(loaded, tokenizer, audio), _logits(model, tokenizer, audio))


def test_a_released_config_without_model_type_loads_through_blsp_model(tmp_path):
    """transformers' AutoConfig needs a model_type; BlspModel reads the release's config.json whatever it says,
    and a checkpoint it saves has one."""
    model, released = released_checkpoint(tmp_path, "")
    with pytest.raises(ValueError, match="model type ``"):
        AutoModel.from_pretrained(released)
    loaded = BlspModel.from_pretrained(released, device="cpu")
    assert_same_weights(loaded, model)
    assert type(loaded.config).model_type == loaded.config.model_type == "blsp"


# --- the hub: revision, push_to_hub ------------------------------------------------------------------------------
@pytest.fixture
def fake_snapshot_download(tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download answered from a tiny checkpoint on disk, recording each call."""
    _, _, directory = saved_tiny(tmp_path)
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision, kwargs))
        if revision == "no-such-branch":
            raise ValueError(f"Invalid rev id: {revision}")
        return str(directory)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_revision_and_hub_options_reach_the_hub_download(fake_snapshot_download, tmp_path):
    model = BlspModel.from_pretrained("someone/tiny-blsp", revision="v1.0", device="cpu", cache_dir=str(tmp_path))
    assert isinstance(model, BlspModel)
    assert fake_snapshot_download == [("someone/tiny-blsp", "v1.0", {"cache_dir": str(tmp_path)})]
    with pytest.raises(WeightsError, match="could not be fetched from the hub at revision 'no-such-branch'"):
        weights.load_pretrained("someone/tiny-blsp", revision="no-such-branch", device="cpu")


def test_cli_revision_reaches_the_hub_download(fake_snapshot_download, capsys):
    from blsp_chat import cli

    assert cli.main(["generate", "--model", "someone/tiny-blsp", "--revision", "v2", "--device", "cpu",
                     "--text", "hello", "--max-new-tokens", "2"]) == 0
    assert [call[:2] for call in fake_snapshot_download] == [("someone/tiny-blsp", "v2")]
    assert cli.main(["generate", "--model", "someone/tiny-blsp", "--revision", "no-such-branch", "--text", "hi"]) == 1
    assert "could not be fetched from the hub at revision 'no-such-branch'" in capsys.readouterr().err


class PageBuilt(Exception):
    """Raised in place of building the app's page: the model has loaded by then."""


def test_app_revision_reaches_the_hub_download(fake_snapshot_download, monkeypatch):
    from blsp_chat import app, ui

    def build_demo(loaded, **kwargs):
        raise PageBuilt(loaded.source)

    monkeypatch.setattr(ui, "build_demo", build_demo)
    monkeypatch.setenv("BLSP_CHAT_REVISION", "from-the-environment")
    with pytest.raises(PageBuilt):
        app.main(["--model", "someone/tiny-blsp", "--device", "cpu"])
    with pytest.raises(PageBuilt):
        app.main(["--model", "someone/tiny-blsp", "--device", "cpu", "--revision", "v3"])
    assert [call[:2] for call in fake_snapshot_download] == [("someone/tiny-blsp", "from-the-environment"),
                                                             ("someone/tiny-blsp", "v3")]


def test_revision_of_a_local_model_is_refused(tmp_path):
    _, _, directory = saved_tiny(tmp_path)
    with pytest.raises(WeightsError, match="--revision names a version of a hub model"):
        weights.load_pretrained(str(directory), revision="main", device="cpu")
    with pytest.raises(WeightsError, match="--revision names a version of a hub model"):
        weights.load_pretrained(None, revision="main", device="cpu")


class LocalHub(BaseHTTPRequestHandler):
    """The endpoints huggingface_hub's push_to_hub calls: create the repo, validate the card's YAML, ask how each
    file is uploaded (all inline here), and commit (an ndjson header and base64 files). Commits land in `repos`."""

    repos: dict[str, dict[str, dict[str, bytes]]] = {}

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "validate-yaml"]:
            content = json.loads(body)["content"]
            try:
                metadata = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            except yaml.YAMLError as err:
                return self.reply({"errors": [{"message": str(err)}]}, status=400)
            if not isinstance(metadata, dict):
                return self.reply({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            return self.reply({"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.repos.setdefault(repo_id, {})
            return self.reply({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": repo_id})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(body)["files"]]
            return self.reply({"files": files})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo_id, revision = f"{parts[2]}/{parts[3]}", parts[5]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines[1:] if item["key"] == "file"}
            self.repos[repo_id][revision] = files
            return self.reply({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/0", "commitOid": "0" * 40,
                               "pullRequestUrl": None})
        self.send_error(404)

    def reply(self, data: dict, status: int = 200) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), LocalHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")  # as HF_ENDPOINT sets
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    LocalHub.repos = {}
    yield LocalHub.repos
    server.shutdown()


def test_push_to_hub_uploads_the_checkpoint_that_loads_back(local_hub, tmp_path):
    model, tokenizer, _ = saved_tiny(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stand-in warns, as the Hub does, of a card without metadata
        model.push_to_hub("someone/tiny-blsp", branch="v1", token="hf_test")
    files = local_hub["someone/tiny-blsp"]["v1"]
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, content in files.items():
        (pulled / name).write_bytes(content)
    assert CARD_KEYS <= set(front_matter(pulled / "README.md"))
    again = AutoModel.from_pretrained(pulled, device="cpu")
    audio = tone(1.0)
    torch.testing.assert_close(_logits(again, tokenizer, audio), _logits(model, tokenizer, audio), atol=0, rtol=0)


# --- model cards --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("directory, library, pipeline", [("default_adapter", "blsp-chat", "audio-text-to-text"),
                                                          ("stage1_lora", "peft", "text-generation")])
def test_shipped_cards_carry_hub_front_matter(directory, library, pipeline):
    data = front_matter(REPO / "assets" / directory / "README.md")
    assert CARD_KEYS <= set(data) and data["datasets"] and data["license"] == "apache-2.0"
    assert (data["library_name"], data["pipeline_tag"]) == (library, pipeline)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in data["base_model"]


def test_rewriting_front_matter_keeps_the_card_and_its_datasets(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# My adapter\n\nIt hears.\n")
    data = model_card.blsp_card_data(["openai/whisper-tiny.en"], ["my-corpus"])
    model_card.write_front_matter(card, data)
    model_card.write_front_matter(card, model_card.blsp_card_data(["openai/whisper-base"]))
    assert front_matter(card)["datasets"] == ["my-corpus"] and front_matter(card)["base_model"] == [
        "openai/whisper-base"]
    assert model_card.card_body(card.read_text()).strip() == "# My adapter\n\nIt hears."
    with pytest.raises(ValueError, match="no closing"):
        model_card.card_body("---\nlicense: mit\n# no end\n")


def test_hub_ids_of_base_models():
    assert weights.hub_id("offline:whisper-tiny.en") == "openai/whisper-tiny.en"
    assert weights.hub_id("offline:smollm2-135m-instruct-stage1") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert weights.hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert weights.hub_id("whisper-dir") is None and weights.hub_id("modelscope:iic/blsp_lslm_7b") is None
    assert weights.hub_id(str(REPO / "assets")) is None


def test_the_stage2_training_card_has_front_matter(tmp_path):
    from train.adapter_card import write_model_card
    from train.adapter_config import AdapterTrainConfig, DataSection, ModelSection
    from train.loop import LoopConfig

    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"{i}.wav", "text": "hi", "source": source}) + "\n"
                                for i, source in enumerate(["librivox", "steel-sky", "librivox", ""])))
    config = AdapterTrainConfig(loop=LoopConfig(output_dir=str(tmp_path / "run")),
                                model=ModelSection(whisper="offline:whisper-base", llm="my/llm"),
                                data=DataSection(train_manifest=str(manifest)))
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"total_steps": 2, "global_batch_size": 4, "num_processes": 1}))
    (out / "metrics.jsonl").write_text(json.dumps({"samples_per_s": 3.0}) + "\n")
    state = types.SimpleNamespace(step=2, epoch=1, samples_seen=8)
    result = types.SimpleNamespace(state=state, trainable_parameters=10, samples_per_s=3.0)
    summary = {s: {"examples": 2, "repeat_examples": 0, "distinct_clips": 2, "hours": 0.1, "mean_seconds": 1.0,
                   "max_seconds": 1.0} for s in ("train", "eval")}
    write_model_card(out, config, summary, result, seconds=60.0, cache=None)
    data = front_matter(out / "README.md")
    assert data["base_model"] == ["openai/whisper-base", "my/llm"]
    assert data["datasets"] == ["librivox", "steel-sky"]
    assert (data["library_name"], data["pipeline_tag"]) == ("blsp-chat", "audio-text-to-text")
    assert "## Training" in (out / "README.md").read_text()


def test_the_stage1_lora_card_has_front_matter_and_keeps_its_datasets(tmp_path):
    from train import sft_llm

    sft_llm.write_card(tmp_path, {"config": {"llm": "offline:smollm2-135m-instruct", "method": "lora"}})
    data = front_matter(tmp_path / "README.md")
    assert (data["base_model"], data["library_name"], data["datasets"]) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "peft", [])
    model_card.write_front_matter(tmp_path / "README.md", model_card.lora_card_data(data["base_model"], ["wordnet"]))
    sft_llm.write_card(tmp_path, {"evaluation": {}})  # a later evaluation rewrites the card
    assert front_matter(tmp_path / "README.md")["datasets"] == ["wordnet"]


def test_exported_adapter_card_gets_front_matter(tmp_path):
    from train.export_adapter import export

    model, tokenizer = tiny_blsp("none"), tiny_tokenizer()
    _write_base_models(model, tokenizer, tmp_path)
    weights.save_adapter(model, tmp_path / "run")
    (tmp_path / "run" / "README.md").write_text("# A run\n\nits record\n")
    export(tmp_path / "run", tmp_path / "shipped", torch.float16)
    assert CARD_KEYS <= set(front_matter(tmp_path / "shipped" / "README.md"))
    assert "its record" in (tmp_path / "shipped" / "README.md").read_text()
    (tmp_path / "run" / "README.md").unlink()
    export(tmp_path / "run", tmp_path / "bare", torch.float16)
    assert CARD_KEYS <= set(front_matter(tmp_path / "bare" / "README.md"))


def test_card_command_rewrites_front_matter_of_checkpoints(tmp_path, capsys):
    from train.adapter_card import main

    _, _, directory = saved_tiny(tmp_path)
    (directory / "README.md").write_text("# tiny\n")
    assert main([str(directory), "--dataset", "tones", "--license", "mit"]) == 0
    data = front_matter(directory / "README.md")
    assert (data["datasets"], data["license"], data["base_model"]) == (["tones"], "mit", [])
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "neither a BLSP config.json nor a LoRA's adapter_config.json" in capsys.readouterr().err


# --- the shipped default, on its real weights ---------------------------------------------------------------------
@pytest.mark.integration
def test_auto_model_loads_the_shipped_default_as_before(default_blsp):
    """AutoModel on assets/default_adapter gives the very model the app loads (same weights, same config, same
    speech vectors), and it answers the spoken question."""
    from blsp_chat.audio import load_audio
    from blsp_chat.generate import generate_reply, speech_turn

    model = AutoModel.from_pretrained(weights.DEFAULT_ADAPTER_DIR, device="cpu")
    assert_same_weights(model, default_blsp.model)
    assert model.config.to_diff_dict() == default_blsp.model.config.to_diff_dict()
    audio = load_audio(REPO / "assets" / "examples" / "capital_of_france.wav")
    heard = model.encode_speech([audio])[0]
    torch.testing.assert_close(heard, default_blsp.model.encode_speech([audio])[0], atol=0, rtol=0)
    loaded = weights.LoadedBlsp(model, default_blsp.tokenizer, "AutoModel", adapter_trained=True)
    short = GenerationOptions(max_new_tokens=24)  # the answer comes first; the rest of the reply is not at issue
    assert "Paris" in generate_reply(loaded, [speech_turn(audio, model)], [audio], short)
