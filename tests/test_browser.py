"""The page in headless Chromium: a typed turn, then an uploaded clip, on the real app; and a hands-free
spoken conversation through Chromium's fake microphone, fed from a wav file."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLIP = Path(__file__).resolve().parent.parent / "assets" / "examples" / "capital_of_france.wav"
REPLY_TIMEOUT_MS = 180_000
SETTLED_POLLS = 6  # 3 s without change: the streamed reply is complete
# The longest duration of the audio elements under the elements `selector` finds: Gradio's player keeps its
# <audio> inside the waveform's shadow root, so the search goes through shadow roots. null while none holds
# playable audio.
AUDIO_DURATION_JS = """(selector) => {
  const found = [];
  const walk = (root) => root.querySelectorAll('*').forEach((node) => {
    if (node.tagName === 'AUDIO' && node.src && isFinite(node.duration) && node.duration > 0) found.push(node.duration);
    if (node.shadowRoot) walk(node.shadowRoot);
  });
  document.querySelectorAll(selector).forEach(walk);
  return found.length ? Math.max(...found) : null;
}"""
REPLY_PLAYER = "#reply-audio"                         # plays each sentence as the reply streams
CONVERSATION_REPLIES = "#chatbot [data-testid='bot']"  # the reply's audio joins them once spoken
LEAD_SILENCE_S = 3.0   # before the question: the microphone is streaming by the time it is spoken
TAIL_SILENCE_S = 120.0  # after it: Chromium loops the file, and the question must not come round again (barge-in)


def open_page(app_url: str, extra_args: list[str] = ()):
    """The page in a headless Chromium launched with CHROMIUM_ARGS + extra_args (a generator for fixtures)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url)
        page.wait_for_selector("#send")
        yield page
        browser.close()


@pytest.fixture
def page(app_url):
    yield from open_page(app_url)


@pytest.fixture
def spoken_question(tmp_path) -> Path:
    """The example question with silence around it, as the fake microphone's recording."""
    question, rate = sf.read(CLIP, dtype="float32")
    lead, tail = np.zeros(int(LEAD_SILENCE_S * rate), np.float32), np.zeros(int(TAIL_SILENCE_S * rate), np.float32)
    path = tmp_path / "question.wav"
    sf.write(path, np.concatenate([lead, question, tail]), rate, subtype="PCM_16")
    return path


@pytest.fixture
def mic_page(app_url, spoken_question):
    """The page in a Chromium whose microphone "says" spoken_question, with autoplay allowed."""
    yield from open_page(app_url, ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                   f"--use-file-for-fake-audio-capture={spoken_question}",
                                   "--autoplay-policy=no-user-gesture-required"])


def _wait_for_replies(page, count: int) -> list[str]:
    """Wait until `count` bot messages exist and the last one has stopped changing; return their texts."""
    bot = page.locator("#chatbot [data-testid='bot']")
    bot.nth(count - 1).wait_for(state="attached", timeout=REPLY_TIMEOUT_MS)
    last, stable_since = None, 0
    for _ in range(REPLY_TIMEOUT_MS // 500):
        text = bot.nth(count - 1).inner_text()
        stable_since = stable_since + 1 if text == last else 0
        if stable_since >= SETTLED_POLLS:
            break
        last = text
        page.wait_for_timeout(500)
    return [bot.nth(i).inner_text() for i in range(bot.count())]


def test_typed_message_and_uploaded_clip(page, tmp_path):
    page.get_by_label("Message").fill("What is the capital of France?")
    page.click("#send")
    replies = _wait_for_replies(page, 1)
    assert "Paris" in replies[0]

    page.locator("#audio-input button[aria-label='Upload file']").click()
    page.locator("#audio-input input[data-testid='file-upload']").set_input_files(str(CLIP))
    loaded_clip = ("#audio-input audio, #audio-input .waveform-container, "
                   "#audio-input [data-testid='waveform-controls']")
    page.locator(loaded_clip).first.wait_for(state="attached", timeout=30_000)
    page.click("#send")
    replies = _wait_for_replies(page, 2)
    assert len(replies) == 2, "the spoken turn gets its own reply"
    users = page.locator("#chatbot [data-testid='user']")
    assert users.count() == 3, "the typed turn; the spoken turn's clip and, under it, the words the model heard"
    assert "audio" in users.nth(1).inner_html(), "the clip shows as a playable audio bubble"
    assert "heard:" in users.nth(2).inner_text() and "france" in users.nth(2).inner_text().lower()
    assert "France" in users.nth(0).inner_text()

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("BLSP_CHAT_SCREENSHOT"):
        shutil.copy(shot, os.environ["BLSP_CHAT_SCREENSHOT"])


def test_hands_free_question_is_sent_at_the_pause_and_answered_aloud(mic_page):
    """No click sends the turn: switching hands-free on starts the microphone, the pause after the question
    ends the turn, the reply streams and is spoken; the player's audio element holds playable audio, and once
    spoken, the reply's audio is in the conversation, playable again."""
    page = mic_page
    page.locator("#speak-replies input").check()
    page.locator("#hands-free input").check()
    replies = _wait_for_replies(page, 1)
    assert replies[0].strip(), "the spoken question was answered"
    users = page.locator("#chatbot [data-testid='user']")
    assert "audio" in users.first.inner_html(), "the spoken turn shows as an audio bubble"
    heard = " ".join(users.nth(i).inner_text() for i in range(users.count())).lower()
    assert "heard:" in heard and "france" in heard, "what the model heard, under the clip"
    duration = page.wait_for_function(AUDIO_DURATION_JS, arg=REPLY_PLAYER, timeout=REPLY_TIMEOUT_MS)
    assert duration.json_value() > 0
    in_conversation = page.wait_for_function(AUDIO_DURATION_JS, arg=CONVERSATION_REPLIES, timeout=REPLY_TIMEOUT_MS)
    assert in_conversation.json_value() > 0
    bot = page.locator(CONVERSATION_REPLIES)
    assert bot.count() == 2 and replies[0].strip() in bot.nth(0).inner_text(), "the audio, right under the text"
