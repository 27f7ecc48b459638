"""A session's files belong to its browser and go with its conversation (issue 31, case 4): through the real app
on 127.0.0.1 (a tiny in-memory model), driven by gradio_client and by bare HTTP clients."""
import io
import json
import socket

import httpx
import pytest
import soundfile as sf

from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer, tone

gradio_client = pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    from blsp_chat.ui import build_demo

    loaded = LoadedBlsp(lively_blsp(seed=3), tiny_tokenizer(), "tiny", adapter_trained=True)
    demo = build_demo(loaded, max_audio_seconds=10, concurrency=2, max_context_tokens=512)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    app_demos[demo.local_url.rstrip("/")] = demo
    yield demo.local_url.rstrip("/")
    demo.close()


app_demos = {}  # url -> the Blocks serving it (to end a session as Gradio does, an hour after its page closed)


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5, freq=330), SAMPLE_RATE)
    return path


def client(url):
    """A browser-like client: it keeps the page's cookies, and leaves the files it is shown on the server (its
    downloads would land in the same temp folder on this one machine)."""
    return gradio_client.Client(url, verbose=False, download_files=False)


def send(client, audio, text=""):
    return client.predict(text, audio, "Chat", "German", 4, False, 0.7, 0.9, 1.0, False, api_name="/send")


def shown_paths(messages) -> list[str]:
    paths = []
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, dict) and part.get("type") == "file":
                file = part["file"]  # a path, or (files left on the server) its FileData
                paths.append(file["path"] if isinstance(file, dict) else file)
    return paths


def server_path_of_upload(client, clip) -> str:
    """Upload `clip` as the client does for a turn; the path the server stored it at."""
    return client.upload_files([str(clip)])[0] if hasattr(client, "upload_files") else _upload(client, clip)


def _upload(client, clip) -> str:
    response = httpx.post(f"{client.src.rstrip('/')}/gradio_api/upload", cookies=client.cookies,
                          files={"files": (clip.name, clip.read_bytes(), "audio/wav")})
    response.raise_for_status()
    return response.json()[0]


def file_url(url: str, path: str) -> str:
    return f"{url}/gradio_api/file={path}"


def test_an_upload_is_served_only_to_the_browser_that_sent_it(app_url, clip):
    owner = client(app_url)
    path = _upload(owner, clip)
    assert httpx.get(file_url(app_url, path), cookies=owner.cookies).status_code == 200
    assert httpx.get(file_url(app_url, path)).status_code == 404, "a client without cookies"
    other = client(app_url)
    assert other.cookies and other.cookies != owner.cookies
    assert httpx.get(file_url(app_url, path), cookies=other.cookies).status_code == 404, "another browser"


def call_send(url: str, cookies, path: str) -> list[dict]:
    """/send through Gradio's HTTP call API, naming a server path as the audio (gradio_client would upload its own
    copy of a path it can read, and anyone holding the bytes may upload them)."""
    audio = {"path": path, "meta": {"_type": "gradio.FileData"}}
    data = ["", audio, "Chat", "German", 4, False, 0.7, 0.9, 1.0, False]
    with httpx.Client(cookies=cookies, timeout=120) as http:
        event = http.post(f"{url}/gradio_api/call/send", json={"data": data}).json()["event_id"]
        stream = http.get(f"{url}/gradio_api/call/send/{event}").text
    finals = [line for line in stream.splitlines() if line.startswith("data:")]
    return json.loads(finals[-1].removeprefix("data:"))[0]


def test_another_session_cannot_name_an_upload_as_its_input(app_url):
    owner, other = client(app_url), client(app_url)
    clip = io.BytesIO()
    sf.write(clip, tone(1.5, freq=271, seed=5), SAMPLE_RATE, format="WAV")
    response = httpx.post(f"{app_url}/gradio_api/upload", cookies=owner.cookies,
                          files={"files": ("mine.wav", clip.getvalue(), "audio/wav")})
    path = response.json()[0]
    messages = call_send(app_url, other.cookies, path)
    assert "belongs to another session" in str(messages[-1]["content"])
    assert not [m for m in messages if m["role"] == "user"], "nothing joined the other session's conversation"
    assert "belongs to another session" in str(call_send(app_url, None, path)[-1]["content"]), "nor without cookies"
    mine = call_send(app_url, owner.cookies, path)
    assert [m["role"] for m in mine][:1] == ["user"] and mine[-1]["content"], "the owner can send it"


def test_clear_and_undo_delete_the_sessions_files(app_url, clip, tmp_path):
    from gradio_client import handle_file

    owner = client(app_url)
    first = shown_paths(send(owner, handle_file(str(clip)))[0])
    second_clip = tmp_path / "second.wav"
    sf.write(second_clip, tone(1.2, freq=440, seed=1), SAMPLE_RATE)
    second = shown_paths(send(owner, handle_file(str(second_clip)))[0])
    uploaded = [p for p in second if p not in first]
    assert len(first) == 1 and len(uploaded) == 1
    for path in first + uploaded:
        assert httpx.get(file_url(app_url, path), cookies=owner.cookies).status_code == 200
    owner.predict(api_name="/undo")
    assert httpx.get(file_url(app_url, uploaded[0]), cookies=owner.cookies).status_code != 200, "undone: gone"
    assert httpx.get(file_url(app_url, first[0]), cookies=owner.cookies).status_code == 200, "still shown: kept"
    owner.predict(api_name="/clear")
    assert httpx.get(file_url(app_url, first[0]), cookies=owner.cookies).status_code != 200, "cleared: gone"


def test_a_file_route_path_that_is_nobodys_is_served_as_before(app_url):
    """Unclaimed files (examples, Gradio's assets) keep Gradio's own rules: arbitrary paths stay refused."""
    assert httpx.get(file_url(app_url, "/etc/passwd")).status_code in (403, 404)


def test_a_sessions_files_go_when_gradio_drops_the_session(app_url, clip):
    from gradio_client import handle_file

    owner = client(app_url)
    paths = shown_paths(send(owner, handle_file(str(clip)))[0])
    assert paths and httpx.get(file_url(app_url, paths[0]), cookies=owner.cookies).status_code == 200
    app_demos[app_url].state_holder.delete_state(owner.session_hash)  # what Gradio does when the session expires
    assert httpx.get(file_url(app_url, paths[0]), cookies=owner.cookies).status_code != 200
