"""The playground page in a real headless Chromium: the same prompt to base and an adapter, side by side."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import httpx2 as httpx

from tests.serve.conftest import API_KEY
from tests.serve.test_server import client


def test_playground_page_is_served_without_a_key(server: str) -> None:
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "tunelab playground" in page.text and "/v1/chat/completions" in page.text


def test_playground_shows_base_and_adapter_answers(server: str, browser, tmp_path: Path) -> None:
    prompt = "Extract the animal: I saw a cat."
    query = urlencode({"prompt": prompt, "key": API_KEY, "left": "base", "right": "alpha"})
    browser.open(f"{server}/?{query}")
    browser.wait_for("document.body.dataset.finished === '1'")
    shown = {side: browser.evaluate(f"document.getElementById('{side}-out').textContent") for side in ("left", "right")}
    names = [browser.evaluate(f"document.getElementById('{side}-name').textContent") for side in ("left", "right")]
    browser.screenshot(tmp_path / "playground.png")
    assert browser.page_errors() == []
    assert all(url.startswith(f"{server}/") for url in browser.requested_urls())  # nothing from elsewhere
    assert names == ["base", "alpha"]
    c = client(server)
    for side, model in (("left", "base"), ("right", "alpha")):
        reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=128)
        assert shown[side] == reply.choices[0].message.content, side
    assert shown["left"] != shown["right"]
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
