"""The app's readout tabs (attribute lens, logit attribution, Patchscopes) in a real browser:
Debian's Chromium, headless, driven by Playwright, on a tiny model served on a loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator

import gradio as gr
import pytest
from browser_pages import app_page, chromium, needs_chromium
from playwright.sync_api import Browser, Page
from test_app import free_port
from tiny_models import tiny_model

from depthlens import LogitLens
from depthlens.analysis.dla import logit_attribution
from depthlens.analysis.patchscope import IDENTITY_PROMPT
from depthlens.apps.web import start
from depthlens.apps.web_readouts import readout_tabs

TIMEOUT_MS = 60_000
TEXT = "Fair is foul, and foul is fair"

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> Iterator[tuple[str, object]]:
    pytest.importorskip("country_capitals")
    model = tiny_model("llama")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    with gr.Blocks(analytics_enabled=False) as demo:
        readout_tabs(model, tiny_tokenizer, {"logit": LogitLens(model)}, max_tokens=48)
    demo.queue()
    url = start(demo, "127.0.0.1", free_port(), quiet=True)
    try:
        yield url, model
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, setup) -> Iterator[Page]:
    """A page of the app; fails the test if the page asked for anything outside the app's server."""
    with app_page(browser, setup[0], TIMEOUT_MS, viewport={"width": 1280, "height": 1000}) as page:
        yield page


def texts(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "nodes => nodes.map(node => node.textContent)")


def test_the_logit_attribution_tab_shows_the_grid_and_bars(page, setup, tiny_tokenizer):
    _, model = setup
    page.get_by_role("tab", name="Logit attribution").click()
    page.fill("#dla-text textarea", TEXT)
    page.click("#dla-run")
    page.locator("#dla-message").get_by_text("sum of").wait_for()
    ids = tiny_tokenizer(TEXT, return_tensors="pt").input_ids
    expected = logit_attribution(model, ids, tokenizer=tiny_tokenizer)
    assert f"logit {expected.logit:.4f} nats" in page.locator("#dla-message").inner_text()
    page.wait_for_selector("#dla-grid .xtick text", state="attached")
    assert texts(page, "#dla-grid .xtick text") == ["H0", "H1", "H2", "H3", "bias", "MLP"]
    assert texts(page, "#dla-grid .ytick text") == ["0", "1", "2"]
    page.wait_for_selector("#dla-bars .bars path", state="attached")
    assert page.locator("#dla-bars .bars path").count() >= 3
    assert (
        page.locator("#dla-table").get_by_text("embeddings").count()
        + page.locator("#dla-table").get_by_text("L0").count()
        >= 1
    )


def test_a_target_of_two_tokens_is_a_clear_message(page):
    page.get_by_role("tab", name="Logit attribution").click()
    page.fill("#dla-text textarea", TEXT)
    page.fill("#dla-target textarea", "thunderous lightning")
    page.click("#dla-run")
    page.locator("#dla-message").get_by_text("not one").wait_for()
    assert "pick a single token" in page.locator("#dla-message").inner_text()


def test_the_attribute_lens_tab_shows_faithfulness_and_a_trajectory(page):
    page.get_by_role("tab", name="Attribute lens").click()
    page.fill("#attr-text textarea", "The capital of Japan is")
    page.click("#attr-run")
    page.locator("#attr-message").get_by_text("Faithfulness").wait_for()
    assert "country-capital" in page.locator("#attr-message").inner_text()
    page.wait_for_selector("#attr-curve .scatterlayer .trace", state="attached")
    assert page.locator("#attr-curve .scatterlayer .trace").count() == 2
    page.wait_for_selector("#attr-heatmap .ytick text", state="attached")
    assert texts(page, "#attr-heatmap .ytick text") == ["0", "1", "2", "output"]


def test_the_patchscope_tab_reads_the_patched_target(page, tiny_tokenizer):
    page.get_by_role("tab", name="Patchscopes").click()
    page.fill("#ps-text textarea", TEXT)
    page.click("#ps-run")
    page.locator("#ps-message").get_by_text("patched into the target").wait_for()
    page.wait_for_selector("#ps-heatmap .xtick text", state="attached")
    assert len(texts(page, "#ps-heatmap .xtick text")) == len(tiny_tokenizer(IDENTITY_PROMPT).input_ids)


def test_an_over_long_source_is_refused(page):
    page.get_by_role("tab", name="Patchscopes").click()
    page.fill("#ps-text textarea", " ".join([TEXT] * 8))
    page.click("#ps-run")
    page.locator("#ps-message").get_by_text("too long").wait_for()
    assert "at most 48 tokens" in page.locator("#ps-message").inner_text()
