"""The chat page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): load it,
send a message, see streamed text appear; a screenshot lands in the test's tmp folder."""

import shutil

import pytest

from quintet.deploy.convert import quantize_folder
from quintet.models.jamba.create import create_model
from quintet.serve.launch import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_the_chat_page_streams_an_answer(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where apt-get is available)")
    create_model("jamba-tiny", tmp_path / "float", seed=0)
    quintet_dir = tmp_path / "chat-fp4"
    quantize_folder(tmp_path / "float", quintet_dir, group_size=32)
    args = ("--max-context", "1024", "--threads", "1")
    with running_server(quintet_dir, *args) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(  # a fresh profile
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(url + "/")
            assert page.title() == "quintet chat"
            page.click("summary")  # the settings
            page.fill("#max-tokens", "40")
            page.fill("#input", "Hello, quintet!")
            page.click("#send")
            page.wait_for_selector(".msg.user")
            answer = page.locator(".msg.assistant .text").last
            page.wait_for_function(
                "() => document.querySelector('#stats').textContent.includes('first token')", timeout=60_000
            )
            assert answer.text_content()  # streamed text arrived
            assert "tokens/s" in page.text_content("#stats")
            page.screenshot(path=str(tmp_path / "chat.png"))
            history = page.evaluate("JSON.parse(localStorage.getItem('quintet-history'))")
            assert [m["role"] for m in history] == ["user", "assistant"]
            page.reload()  # the history survives a reload
            assert page.locator(".msg").count() == 2
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 1000
