"""Decode bombs: a few hundred kilobytes of FLAC can hold ten minutes of 8-channel 96 kHz audio, gigabytes once
decoded. Every audio path refuses it by its duration before decoding it whole (issue 31, case 3): the counted
frames show how much was decoded, never a clock."""
import base64
import io
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_serve import LIMITS, MODEL, running

from blsp_chat import audio as audio_module
from blsp_chat.audio import AudioTooLongError, load_audio
from blsp_chat.serve import InProcessEngine, create_app
from blsp_chat.weights import LoadedBlsp
from tiny import tiny_blsp, tiny_tokenizer

MEGABYTE = 1 << 20


def flac(seconds: int, rate: int, channels: int) -> bytes:
    """Silence as FLAC: tiny on disk, `seconds * rate * channels * 4` bytes once decoded to float32."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((10 * rate, channels), np.float32)
        for _ in range(seconds // 10):
            f.write(block)
    return out.getvalue()


def without_length(data: bytes) -> bytes:
    """The FLAC with its STREAMINFO total-samples field zeroed: "length unknown", as streamed encoders write."""
    head = bytearray(data)
    assert head[:4] == b"fLaC"
    head[21] &= 0xF0           # the 36-bit count starts at bit 28 of STREAMINFO (which starts at byte 8)
    head[22:26] = bytes(4)
    return bytes(head)


@pytest.fixture(scope="module")
def ten_minutes() -> bytes:
    """The probe's file: ten minutes, 8 channels, 96 kHz (1.8 GB as float32)."""
    return flac(600, 96_000, 8)


@pytest.fixture(scope="module")
def one_minute() -> bytes:
    return flac(60, 48_000, 8)  # 92 MB as float32


@pytest.fixture
def frames_read(monkeypatch) -> list[int]:
    """Every frame soundfile decodes, and every sample PyAV's decoder hands over, counted."""
    counted: list[int] = []
    real_read, real_chunks = sf.SoundFile.read, audio_module._pyav_mono_chunks

    def read(self, *args, **kwargs):
        data = real_read(self, *args, **kwargs)
        counted.append(len(data))
        return data

    def chunks(*args):
        for rate, chunk in real_chunks(*args):
            counted.append(len(chunk))
            yield rate, chunk

    monkeypatch.setattr(sf.SoundFile, "read", read)
    monkeypatch.setattr(audio_module, "_pyav_mono_chunks", chunks)
    return counted


def test_a_stated_length_is_refused_from_the_header(ten_minutes, frames_read, tmp_path):
    path = tmp_path / "long.flac"
    path.write_bytes(ten_minutes)
    for source in (ten_minutes, path):  # the server's bytes; the CLI's and the manifest runner's files
        with pytest.raises(AudioTooLongError, match=r"600\.0 s long, over the limit of 120 s"):
            load_audio(source, max_seconds=120)
    assert sum(frames_read) == 0


def test_an_unstated_length_is_decoded_only_up_to_the_limit(one_minute, frames_read, tmp_path):
    pytest.importorskip("av")
    limit = 4.0
    path = tmp_path / "streamed.flac"
    path.write_bytes(without_length(one_minute))
    for source in (path.read_bytes(), path):
        with pytest.raises(AudioTooLongError, match="over the limit of 4 s") as err:
            load_audio(source, max_seconds=limit)
        assert limit < err.value.seconds < limit + 1
    one_frame = 65536  # FLAC's largest block
    assert sum(frames_read) <= 2 * (limit * 48_000 + one_frame)


def test_the_server_refuses_a_long_body_without_decoding_it(one_minute, frames_read):
    loaded = LoadedBlsp(tiny_blsp(), tiny_tokenizer(), "tiny", adapter_trained=True)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(one_minute).decode(), "format": "flac"}}
    request = {"model": MODEL, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    with running(create_app(InProcessEngine(loaded, MODEL), limits=LIMITS)) as base:
        tracemalloc.start()
        try:
            response = httpx.post(f"{base}/chat/completions", json=request, timeout=120)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "audio_too_long"
    assert "60.0 s long, over this server's limit of 4 s" in error["message"]
    assert sum(frames_read) == 0, "refused from the header"
    assert peak < 20 * MEGABYTE, f"{peak / MEGABYTE:.0f} MB traced while refusing it"


def test_the_live_microphone_drops_a_chunk_that_is_not_from_a_microphone(one_minute, frames_read, tmp_path):
    pytest.importorskip("gradio")
    from blsp_chat.ui import ChatHandlers

    handlers = ChatHandlers(LoadedBlsp(tiny_blsp(), tiny_tokenizer(), "tiny", adapter_trained=True), 60)
    chunk = tmp_path / "chunk.flac"
    chunk.write_bytes(one_minute)
    chat, trigger, _ = handlers.listen(str(chunk), True, None)
    assert sum(frames_read) == 0 and chat.turns_ended == 0
