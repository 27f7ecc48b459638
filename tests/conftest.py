"""Shared fixtures. Real-weight fixtures fetch the offline default models once into the cache
(~/.cache/blsp_chat, or $BLSP_CHAT_CACHE) and reuse them across runs."""
import re
import socket
from pathlib import Path

import pytest

from blsp_chat import offline
from blsp_chat.session import ChatSession
from blsp_chat.weights import load_pretrained

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
LIBRIVOX_CLIP = "sense_and_sensibility_01_austen_64kb-0870"  # the longest clip, about 7 s


@pytest.fixture(scope="session")
def whisper_tiny_en_ct2_dir() -> Path:
    """The faster-whisper-tiny.en directory unpacked from its wheel."""

    return offline.whisper_tiny_en_ct2_dir()


@pytest.fixture(scope="session")
def whisper_tiny_en_dir() -> Path:
    """Whisper tiny.en converted to a transformers directory: the quick real Whisper that hears tests back."""

    return offline.whisper_tiny_en_dir()


@pytest.fixture(scope="session")
def default_blsp():
    """The offline default BLSP model on CPU, loaded once per test run."""

    return load_pretrained(None, device="cpu")


@pytest.fixture(scope="session")
def librivox_clip() -> tuple[Path, str]:
    """A human LibriVox recording (16 kHz mono wav) and its transcript, from pocketsphinx-testdata."""
    transcription = LIBRIVOX_DIR / "transcription"
    if not transcription.is_file():
        pytest.skip("needs the LibriVox clips: apt-get install -y pocketsphinx-testdata")
    for line in transcription.read_text().splitlines():  # "<s> words </s> (clip_id)"
        match = re.fullmatch(r"<s>(.*)</s>\s*\((\S+)\)", line.strip())
        if match and match.group(2) == LIBRIVOX_CLIP:
            return LIBRIVOX_DIR / f"{LIBRIVOX_CLIP}.wav", match.group(1).strip()
    pytest.skip(f"{LIBRIVOX_CLIP} not listed in {transcription}")


APP_MAX_CONTEXT = 400  # small, so that the app tests can overflow it with a long typed turn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(default_blsp):
    """The real app, served on 127.0.0.1 for the whole test run."""
    from blsp_chat.ui import build_demo  # here, not at the top: only the app's tests load gradio

    demo = build_demo(default_blsp, max_audio_seconds=60, concurrency=2, max_context_tokens=APP_MAX_CONTEXT)
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture
def prefill_fails_once(monkeypatch):
    """The next reply's prefill fails as a GPU out of memory does, once; the replies after it run."""
    import torch

    real_prefill, calls = ChatSession._prefill, []

    def out_of_memory_once(self, job):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(self, job)

    monkeypatch.setattr(ChatSession, "_prefill", out_of_memory_once)
