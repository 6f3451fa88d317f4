"""What the browser tests share: Debian's Chromium driven by Playwright, and pages that may only
talk to the app's own loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}: apt-get install chromium")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed on exit."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


@contextmanager
def app_page(browser: Browser, url: str, timeout_ms: int, **context_options: object) -> Iterator[Page]:
    """A page opened at ``url``; every request elsewhere is refused and fails the test on exit."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    outside: list[str] = []

    def only_the_app(route: Route) -> None:
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_app)
    page.goto(url)
    yield page
    context.close()
    assert outside == []
