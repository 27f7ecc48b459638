"""Where the shipped assets are found: package data of an installed blsp_chat, else the checkout's assets/
(tests/test_wheel_install.py runs the installed case end to end); a missing stage-1 LoRA is named, not taken
for a hub id."""
import json
import sys

import pytest

from blsp_chat import resources, weights
from blsp_chat.offline import WeightsError

REPO = resources.CHECKOUT_ROOT


def test_a_checkout_uses_its_top_level_assets_folder():
    assert not (REPO / "blsp_chat" / "assets").exists()  # the folder the wheel adds
    assert resources.assets_dir() == REPO / "assets"
    assert (resources.DEFAULT_ADAPTER_DIR / "config.json").is_file()
    assert (resources.STAGE1_LORA_DIR / "adapter_config.json").is_file()
    assert (resources.EXAMPLES_DIR / "capital_of_france.wav").is_file()


def test_an_installed_package_uses_its_package_data(tmp_path, monkeypatch):
    package = tmp_path / "installed_blsp"
    (package / "assets" / "examples").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert resources.assets_dir("installed_blsp") == package / "assets"
    finally:
        sys.modules.pop("installed_blsp", None)


def test_a_missing_stage1_lora_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "STAGE1_LORA_DIR", tmp_path / "stage1_lora")
    with pytest.raises(WeightsError, match="stage-1 LoRA is missing from .*stage1_lora"):
        weights.resolve_base(weights.DEFAULT_LLM)


def test_the_shipped_adapter_names_the_base_models_download_fetches():
    """`blsp-chat download` warms the cache for the default model: the encoder and LLM the shipped adapter was
    trained on, or a first `python app.py` would fetch and convert another Whisper."""
    config = json.loads((weights.DEFAULT_ADAPTER_DIR / "config.json").read_text())
    assert config["whisper_name_or_path"] == weights.DEFAULT_WHISPER
    assert config["llm_name_or_path"] == weights.DEFAULT_LLM
