"""Browser tests of the viewer: headless Debian Chromium against the app served on 127.0.0.1."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright")
pytest.importorskip("panel")

from browser_util import (DEEP, deep_eval, clear_edge, click_data, detail, edge_count, error_text, launch, px_per_unit, rows,
                          start_server, status, stop_server, wait_for, wait_idle)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = "The capital of France is"
PROMPT2 = "One, two, three"
TOL = 1e-3


@pytest.fixture(scope="module")
def served(smollm2):
    import routescope
    from routescope.viewer.config import ModelEntry, ViewerConfig
    from routescope.viewer.models import ModelRegistry

    cfg = ViewerConfig(prompts=[PROMPT], max_tokens=32,
                       models=[ModelEntry("smollm2-135m", "smollm2-135m"), ModelEntry("broken", "/nonexistent/model")])

    def loader(spec, **kw):
        return smollm2 if spec == "smollm2-135m" else routescope.load(spec, reuse=False, **kw)

    reg = ModelRegistry(max_tokens=cfg.max_tokens, loader=loader)
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


@pytest.fixture(scope="module")
def graph(smollm2):
    return smollm2.trace(PROMPT)


def open_page(browser, url, context=None):
    page = context.new_page() if context is not None else browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    wait_idle(page)
    return page


def run_prompt(page, prompt, expect_graph=True):
    page.locator("textarea").fill(prompt)
    page.locator("textarea").blur()
    before = status(page).get("runs", "")
    page.get_by_role("button", name="Run").click()
    if expect_graph:
        wait_for(page, "(p) => { const m = window.Bokeh && Bokeh.documents[0].get_model_by_name('rs-edges');"
                       " return m && m.data.src.length > 0 && Bokeh.documents[0].is_idle; }", timeout=120_000)
        wait_idle(page)
    return before


def wait_detail(page, kind, node=None, timeout=30_000):
    wait_for(page, "(a) => { const d = (" + _DETAIL_JS + ")(); return d && d.kind === a[0] && "
                   "(a[1] === null || d.node === a[1] || d.edge === a[1]); }", arg=[kind, node], timeout=timeout)
    wait_idle(page)


_DETAIL_JS = """() => { const deepAll = (sel, root = document) => { const out = [...root.querySelectorAll(sel)];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) out.push(...deepAll(sel, el.shadowRoot));
  return out; }; const el = deepAll('.rs-detail')[0]; return el ? el.dataset : null; }"""


def test_graph_panels_and_threshold(served, browser, graph):
    url, reg = served
    page = open_page(browser, url)
    run_prompt(page, PROMPT)
    last = graph.n_tokens - 1
    L = graph.n_layers
    expected = len(graph.route(0.04))
    assert edge_count(page) == expected
    st = status(page)
    assert st["state"] == "ready" and int(st["edges"]) == expected and st["targets"] == str(last)

    # residual node: the output node of the last position
    from routescope.viewer.plot import build_layout, node_xy

    node = f"I{L - 1}_{last}"
    click_data(page, *node_xy(node))
    wait_detail(page, "residual", node)
    top = rows(page, ".rs-top-tokens")
    want = graph.top_tokens(node, k=10, normalize=True)
    assert [r["token"] for r in top] == [w["token"] for w in want]
    assert all(abs(float(r["score"]) - w["score"]) < TOL for r, w in zip(top, want))
    assert [int(r["rankChange"]) for r in top] == [w["rank_change"] for w in want]
    prom = rows(page, ".rs-block-promoted-promoted")
    want_p = graph.promoted("mlp_out", L - 1, last, k=10, normalize=True)
    assert "promoted" in detail(page)["text"]
    assert [r["token"] for r in prom] == [w["token"] for w in want_p["promoted"]]
    assert all(abs(float(r["score"]) - w["score"]) < TOL for r, w in zip(prom, want_p["promoted"]))

    # an attention edge (the one with most clearance around its midpoint)
    route = graph.route(0.04)
    layout = build_layout(route, graph.tokens, L, [last])
    ppx, ppy = px_per_unit(page)
    i = clear_edge(layout, ppx, ppy)
    src, dst = layout.edges["src"][i], layout.edges["dst"][i]
    click_data(page, (layout.x0[i] + layout.x1[i]) / 2, (layout.y0[i] + layout.y1[i]) / 2)
    wait_detail(page, "attention", f"{src}:{dst}")
    from routescope.cluster.routes import parse_node

    _, layer, tgt = parse_node(dst)
    _, _, source = parse_node(src)
    heads = graph.head_contributions(layer, tgt, source)
    got = rows(page, ".rs-heads")
    assert int(got[0]["head"]) == -1 and abs(float(got[0]["value"]) - heads.sum()) < TOL  # "all heads"
    order = [int(r["head"]) for r in got[1:]]
    assert sorted(order) == list(range(graph.n_heads))
    assert all(abs(float(r["value"]) - heads[int(r["head"])]) < TOL for r in got[1:])
    assert list(heads[order]) == sorted(heads, reverse=True)
    edge_p = rows(page, ".rs-edge-promoted-promoted")
    want_e = graph.promoted("edge", layer, tgt, source=source, k=10, normalize=True)  # all heads
    assert [r["token"] for r in edge_p] == [w["token"] for w in want_e["promoted"]]

    # an FFN block
    mnode = max((n for n in layout.nodes["name"] if n.startswith("M")), key=lambda n: parse_node(n)[1:])
    _, ml, mpos = parse_node(mnode)
    click_data(page, *node_xy(mnode))
    wait_detail(page, "ffn", mnode)
    neurons = rows(page, ".rs-neurons")
    want_n = graph.neurons(ml, mpos, 20)
    assert [int(r["neuron"]) for r in neurons] == [n["neuron"] for n in want_n]
    assert all(abs(float(r["contribution"]) - n["contribution"]) < 1e-4 for r, n in zip(neurons, want_n))
    top_neuron = want_n[0]["neuron"]
    page.wait_for_function("(n) => { " + DEEP + " const d = deepAll('.rs-neuron-detail')[0];"
                           " return d && d.dataset.neuron == String(n); }", arg=top_neuron, timeout=30_000)
    npro = rows(page, ".rs-neuron-promoted-promoted")
    want_np = graph.promoted("neuron", ml, mpos, neuron=top_neuron, k=10, normalize=True)
    assert [r["token"] for r in npro] == [w["token"] for w in want_np["promoted"]]

    # threshold: one step right re-thresholds without rerunning the model
    traced = reg.graph_cache.n_bytes
    page.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    wait_for(page, "(n) => Bokeh.documents[0].get_model_by_name('rs-edges').data.src.length !== n", arg=expected)
    wait_idle(page)
    assert edge_count(page) == len(graph.route(0.045))
    assert status(page)["tau"] == "0.045"
    assert reg.graph_cache.n_bytes == traced
    page.close()


def test_sessions_are_isolated(served, browser, smollm2):
    url, _ = served
    ctx1, ctx2 = (browser.new_context(viewport={"width": 1600, "height": 1000}) for _ in range(2))
    p1, p2 = open_page(browser, url, ctx1), open_page(browser, url, ctx2)
    run_prompt(p1, PROMPT)
    run_prompt(p2, PROMPT2)
    g1, g2 = smollm2.trace(PROMPT), smollm2.trace(PROMPT2)
    assert int(status(p1)["tokens"]) == g1.n_tokens and int(status(p2)["tokens"]) == g2.n_tokens
    assert edge_count(p1) == len(g1.route(0.04)) and edge_count(p2) == len(g2.route(0.04))
    assert p1.locator("textarea").input_value() == PROMPT and p2.locator("textarea").input_value() == PROMPT2
    ctx1.close()
    ctx2.close()


def test_bad_input_messages(served, browser):
    url, _ = served
    page = open_page(browser, url)
    run_prompt(page, "   ", expect_graph=False)
    page.wait_for_timeout(500)
    assert "empty" in error_text(page)
    run_prompt(page, "word " * 60, expect_graph=False)
    page.wait_for_timeout(1500)
    assert "exceeds" in error_text(page)
    page.get_by_role("combobox").first.select_option("broken")
    run_prompt(page, PROMPT, expect_graph=False)
    page.wait_for_timeout(2000)
    assert "broken" in error_text(page) and "failed" in error_text(page)
    # the server still serves
    page2 = open_page(browser, url)
    run_prompt(page2, PROMPT)
    assert edge_count(page2) > 0
    page.close()
    page2.close()
