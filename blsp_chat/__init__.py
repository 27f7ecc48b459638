"""blsp-chat: a BLSP speech LLM (frozen Whisper encoder -> modality adapter -> frozen LLM) you can talk to."""

# weights.py gives BlspModel its from_pretrained/save_pretrained when imported (model.py cannot import it
# without a circle), so importing any part of the package makes both work.
from . import weights  # noqa: F401

__version__ = "0.1.0"
