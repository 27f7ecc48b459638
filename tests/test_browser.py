"""The page in headless Chromium: a typed turn, then an uploaded clip, on the real app."""
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLIP = Path(__file__).resolve().parent.parent / "assets" / "examples" / "capital_of_france.wav"
REPLY_TIMEOUT_MS = 180_000
SETTLED_POLLS = 6  # 3 s without change: the streamed reply is complete


@pytest.fixture
def page(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url)
        page.wait_for_selector("#send")
        yield page
        browser.close()


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
    assert users.count() == 2
    assert "audio" in users.nth(1).inner_html(), "the clip shows as a playable audio bubble"
    assert "France" in users.nth(0).inner_text()

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("BLSP_CHAT_SCREENSHOT"):
        shutil.copy(shot, os.environ["BLSP_CHAT_SCREENSHOT"])
