"""The headless-Chromium harness itself: the page tests' "no errors, nothing fetched" checks can fail."""

from __future__ import annotations

from pathlib import Path


def test_harness_sees_exceptions_console_errors_and_fetches(browser, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>broken</title><img src='missing.png'>"
                    "<script>console.error('logged error'); throw new Error('thrown error')</script>")
    browser.load(page.as_uri())
    errors = browser.page_errors()
    assert any("logged error" in e for e in errors) and any("thrown error" in e for e in errors)
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)
    assert browser.requested_urls() == [page.as_uri(), (tmp_path / "missing.png").as_uri()]
