"""``depthlens app`` in a real browser: Debian's Chromium, headless, driven by Playwright, on an app
served on a free loopback port with a tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from browser_pages import app_page, chromium, needs_chromium
from playwright.sync_api import Browser, Page
from test_app import MAX_TOKENS, TEXT, make_run, running_app
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens
from depthlens.analysis.trajectory import Trajectory

TIMEOUT_MS = 30_000

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> Iterator[tuple[str, object, Path]]:
    run = make_run(tmp_path_factory.mktemp("browser"), tiny_tokenizer)
    model = tiny_model("llama")
    with running_app(model, tiny_tokenizer, [run / "lens"], tmp_path_factory.mktemp("gradio")) as url:
        yield url, model, run


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, setup) -> Iterator[Page]:
    """A page of the app, opened and showing its first picture; fails the test if the page asked
    for anything outside the app's own server."""
    with app_page(browser, setup[0], TIMEOUT_MS, viewport={"width": 1280, "height": 900}, accept_downloads=True) as page:
        page.wait_for_selector("#message p", state="attached")
        yield page


def show(page: Page, text: str, view: str | None = None) -> None:
    """Enter ``text``, pick the lens ``view`` if given, and press Show."""
    page.fill("#text textarea", text)
    if view is not None:
        page.click("#lens input")
        page.get_by_role("option", name=view, exact=True).click()
    page.click("#show")


def svg_texts(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"#heatmap {selector}", "nodes => nodes.map(node => node.textContent)")


def wait_for_inputs(page: Page, trajectory: Trajectory) -> None:
    """Wait until the heatmap's bottom axis shows the input tokens of ``trajectory``."""
    page.wait_for_function(
        """expected => {
            const ticks = [...document.querySelectorAll('#heatmap .xtick text')].map(node => node.textContent);
            return ticks.length === expected.length && ticks.every((tick, i) => tick === expected[i]);
        }""",
        arg=trajectory.input_labels(max_chars=8),
    )


def test_the_heatmap_shows_the_expected_labels_and_hover(page, setup, tiny_tokenizer):
    _, model, run = setup
    tuned = TunedLens.from_pretrained(run / "lens", model)
    show(page, TEXT)
    trajectory = Trajectory.from_text(model, tiny_tokenizer, tuned, TEXT)
    wait_for_inputs(page, trajectory)
    cells = trajectory.top1_labels(max_chars=8)
    assert svg_texts(page, ".heatmap-label text") == [label for row in cells for label in row]
    assert svg_texts(page, ".ytick text") == ["0", "1", "2", "output"]
    area = page.locator("#heatmap .nsewdrag").first.bounding_box()
    rows, columns = len(cells), len(cells[0])
    page.mouse.move(area["x"] + area["width"] / (2 * columns), area["y"] + area["height"] * (1 - 1 / (2 * rows)))
    hover = page.locator("#heatmap .hoverlayer .hovertext")
    hover.wait_for(state="attached")
    top = [trajectory.label(t) for t in trajectory.top_ids[0, 0, 0].tolist()]
    assert "layer 0 · position 0" in hover.text_content()
    assert all(f"{rank}. {label!r}" in hover.text_content() for rank, label in enumerate(top, start=1))


def test_side_by_side_and_the_downloads(page, setup, tiny_tokenizer, tmp_path):
    _, model, run = setup
    lenses = [LogitLens(model), TunedLens.from_pretrained(run / "lens", model)]
    show(page, TEXT, "logit vs tuned")
    trajectories = [Trajectory.from_text(model, tiny_tokenizer, lens, TEXT, lens_name=name)
                    for lens, name in zip(lenses, ("logit", "tuned"), strict=True)]
    wait_for_inputs(page, trajectories[0])
    page.wait_for_selector("#heatmap text:text-is('logit − tuned')", state="attached")
    assert svg_texts(page, ".heatmap-label text") == [
        label for trajectory in trajectories for row in trajectory.top1_labels(max_chars=8) for label in row
    ]
    saved = {}
    for suffix in ("png", "html", "csv"):
        button = page.locator(f"#download-{suffix}")
        button.wait_for(state="visible")
        with page.expect_download() as download:
            button.click()
        saved[suffix] = tmp_path / download.value.suggested_filename
        download.value.save_as(saved[suffix])
    assert saved["png"].name == "depthlens-logit-tuned-entropy.png"
    assert saved["png"].read_bytes().startswith(b"\x89PNG")
    assert b"Plotly.newPlot" in saved["html"].read_bytes()
    assert saved["csv"].read_text() == pd.concat([t.to_dataframe() for t in trajectories], ignore_index=True).to_csv(index=False)


def test_an_over_long_text_gets_a_clear_message(page):
    show(page, " ".join([TEXT] * 3))
    message = page.locator("#message")
    message.get_by_text("too long").wait_for()
    assert f"at most {MAX_TOKENS} tokens" in message.inner_text()
    assert page.locator("#heatmap .heatmap-label").count() == 0


def test_the_evaluation_tab_shows_the_curves_and_table(page):
    page.get_by_role("tab", name="Evaluation").click()
    page.locator("#evaluation-curves img").wait_for()
    assert "held-out tokens" in page.locator("#evaluation-note").inner_text()
    assert page.locator("#evaluation-table").get_by_text("kl · tuned").count() >= 1
