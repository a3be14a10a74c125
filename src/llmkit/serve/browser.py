"""Driving the web page in a real browser: headless Chromium (Debian's `chromium` package) through Playwright for
Python's `executable_path` — never `playwright install`, which downloads. Used by the demo (a screenshot of the page
with an answer in it) and by the browser tests."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

from llmkit.errors import LlmkitError


def find_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise LlmkitError("Chromium is not installed", "run `make browser` (as root: apt-get install chromium)")
    return path


class BackgroundServer:
    """`app` on uvicorn on a free 127.0.0.1 port in a thread (for the demo and tests); `stop()` ends it."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise LlmkitError("the server did not start", "see the log above")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def chat_screenshot(
    base_url: str, path: str | Path, question: str, *, model: str | None = None, max_tokens: int = 60, timeout_s: float = 180
) -> str:
    """Open the page, ask `question` in the chat (greedy), wait for the whole answer, screenshot the page to `path`;
    returns the answer's text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(
                viewport={"width": 1200, "height": 760}, bypass_csp=True
            )  # the test harness evaluates JS; the page needs no eval
            page.goto(base_url + "/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')", timeout=timeout_s * 1000)
            if model:
                page.select_option("#chat-model", model)
            page.fill("#chat-temperature", "0")
            page.fill("#chat-max-tokens", str(max_tokens))
            page.fill("#chat-input", question)
            page.click("#chat-send")
            page.wait_for_function(
                "!document.getElementById('chat-send').disabled && document.querySelector('.msg.assistant')", timeout=timeout_s * 1000
            )
            answer = page.inner_text(".msg.assistant .body")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path))
            return answer
        finally:
            browser.close()
