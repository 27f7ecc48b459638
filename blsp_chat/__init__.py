"""blsp-chat: a BLSP speech LLM (frozen Whisper encoder -> modality adapter -> frozen LLM) you can talk to."""

__version__ = "0.1.0"
