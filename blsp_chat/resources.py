"""The files the package ships beside its code: the default adapter, the stage-1 LoRA of the default LLM and the
example clips.

They live in the repository's top-level `assets/` folder. pyproject.toml installs that folder as
`blsp_chat/assets`, package data found here through importlib.resources, so an installed package finds them
wherever it is installed. A checkout run in place (`python app.py`, the tests) has no `blsp_chat/assets`, and
uses the top-level folder itself.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED_ASSETS = "assets"  # the folder's name inside the installed package
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def assets_dir(package: str = __package__) -> Path:
    """The shipped assets: `package`'s data when installed, else the checkout's top-level folder. A directory on
    disk, as from_pretrained and Gradio need one (wheels install unzipped)."""
    packaged = resources.files(package).joinpath(PACKAGED_ASSETS)
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return CHECKOUT_ROOT / "assets"


ASSETS_DIR = assets_dir()
DEFAULT_ADAPTER_DIR = ASSETS_DIR / "default_adapter"  # the offline default model's speech adapter
STAGE1_LORA_DIR = ASSETS_DIR / "stage1_lora"  # the stage-1 LoRA of the default LLM (train/sft_llm.py)
EXAMPLES_DIR = ASSETS_DIR / "examples"  # spoken example clips (the app's examples)
