"""Browser tests of the viewer: headless Debian Chromium against the app served on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("playwright")
pytest.importorskip("panel")

from browser_util import (click_data, data_to_page, edge_count, launch, rows, start_server, status, stop_server,
                          wait_for, wait_idle)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(smollm2):
    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry

    cfg = ViewerConfig(prompts=[PROMPT], max_tokens=64)
    reg = ModelRegistry(max_tokens=cfg.max_tokens, loader=lambda spec, **kw: smollm2)
    server, url = start_server(cfg, reg)
    yield url, reg
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def run_prompt(page, url, prompt):
    page.goto(url)
    wait_idle(page)
    page.locator("textarea").fill(prompt)
    page.locator("textarea").blur()
    page.get_by_role("button", name="Run").click()
    wait_for(page, "() => { const m = window.Bokeh && Bokeh.documents[0].get_model_by_name('rs-edges');"
                   " return m && m.data.src.length > 0; }", timeout=120_000)
    wait_idle(page)


def test_run_and_graph(served, browser, smollm2):
    url, reg = served
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    run_prompt(page, url, PROMPT)
    g = smollm2.trace(PROMPT)
    expected = len(g.route(0.04))
    assert edge_count(page) == expected
    st = status(page)
    assert st["state"] == "ready" and int(st["edges"]) == expected
    page.close()
