"""Browser tests of the viewer: headless Debian Chromium against the app served on 127.0.0.1."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright")
pytest.importorskip("panel")

from browser_util import (DEEP, clear_edge, click_data, detail, edge_count, error_text, launch, px_per_unit, rows,
                          start_server, status, stop_server, wait_for, wait_idle)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPT = "The capital of France is"
PROMPT2 = "One, two, three"
TOL = 1e-3


@pytest.fixture(scope="module")
def stored(smollm2, tmp_path_factory):
    """A results directory the viewer serves: bad input must leave it byte for byte unchanged."""
    import routescope

    root = tmp_path_factory.mktemp("viewer-stored")
    data = root / "prompts.txt"
    data.write_text("Water boils at\nOne, two, three\n")
    routescope.run_job(data, root / "results", pipeline=smollm2)
    return root / "results"


@pytest.fixture(scope="module")
def served(smollm2, stored):
    import routescope
    from routescope.viewer.config import ModelEntry, ViewerConfig
    from routescope.viewer.models import ModelRegistry

    cfg = ViewerConfig(prompts=[PROMPT], max_tokens=32, results=[stored],
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
    want = graph.live.top_tokens(node, k=10, normalize=True)
    assert [r["token"] for r in top] == [w["token"] for w in want]
    assert all(abs(float(r["score"]) - w["score"]) < TOL for r, w in zip(top, want))
    assert [int(r["rankChange"]) for r in top] == [w["rank_change"] for w in want]
    prom = rows(page, ".rs-block-promoted-promoted")
    want_p = graph.live.promoted("mlp_out", L - 1, last, k=10, normalize=True)
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
    heads = graph.live.head_contributions(layer, tgt, source)
    got = rows(page, ".rs-heads")
    assert int(got[0]["head"]) == -1 and abs(float(got[0]["value"]) - heads.sum()) < TOL  # "all heads"
    order = [int(r["head"]) for r in got[1:]]
    assert sorted(order) == list(range(graph.n_heads))
    assert all(abs(float(r["value"]) - heads[int(r["head"])]) < TOL for r in got[1:])
    assert list(heads[order]) == sorted(heads, reverse=True)
    edge_p = rows(page, ".rs-edge-promoted-promoted")
    want_e = graph.live.promoted("edge", layer, tgt, source=source, k=10, normalize=True)  # all heads
    assert [r["token"] for r in edge_p] == [w["token"] for w in want_e["promoted"]]

    # an FFN block
    mnode = max((n for n in layout.nodes["name"] if n.startswith("M")), key=lambda n: parse_node(n)[1:])
    _, ml, mpos = parse_node(mnode)
    click_data(page, *node_xy(mnode))
    wait_detail(page, "ffn", mnode)
    neurons = rows(page, ".rs-neurons")
    want_n = graph.live.neurons(ml, mpos, 20)
    assert [int(r["neuron"]) for r in neurons] == [n["neuron"] for n in want_n]
    assert all(abs(float(r["contribution"]) - n["contribution"]) < 1e-4 for r, n in zip(neurons, want_n))
    top_neuron = want_n[0]["neuron"]
    page.wait_for_function("(n) => { " + DEEP + " const d = deepAll('.rs-neuron-detail')[0];"
                           " return d && d.dataset.neuron == String(n); }", arg=top_neuron, timeout=30_000)
    npro = rows(page, ".rs-neuron-promoted-promoted")
    want_np = graph.live.promoted("neuron", ml, mpos, neuron=top_neuron, k=10, normalize=True)
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


LONG = "word " * 60
# (case, how, value, exact message): "type" fills the prompt box and clicks Run; "link" opens a URL.
BAD_INPUT = [
    ("empty prompt", "type", "   ", "The prompt is empty: type a prompt or pick one from the dataset."),
    ("prompt over the viewer's limit", "type", LONG, "Cannot trace: prompt: {n_long} tokens exceeds this viewer's limit of 32"),
    ("control character", "type", "bell\x07", "Cannot trace: prompt: contains control character U+0007"),
    ("model that fails to load", "model", "broken",
     "Model 'broken' failed to load: ModelNotFoundError: model: path /nonexistent/model does not exist"),
    ("link with tau NaN", "link", "?prompt=Water+boils+at&tau=nan", "Link: tau: nan must be a number in (0, 1)"),
    ("link with tau 1.5", "link", "?prompt=Water+boils+at&tau=1.5", "Link: tau: 1.5 must be a number in (0, 1)"),
    ("link with tau not a number", "link", "?prompt=Water+boils+at&tau=high", "Link: tau: 'high' is not a number"),
    ("link with a target past the end", "link", "?prompt=Water+boils+at&targets=99",
     "Link: target: position 99 outside [0, {last}]"),
    ("link with a model not configured", "link", "?prompt=Water+boils+at&model=..%2F..%2Fetc",
     "Link: model: '../../etc' is not one of the configured models (smollm2-135m, broken)"),
]


def _digest(root) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_messages(served, stored, browser, smollm2, case):
    """Each bad input shows one exact message in that session; stored results are unchanged."""
    _, how, value, message = case
    url, _ = served
    before = _digest(stored)
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    if how == "link":
        page = ctx.new_page()
        page.goto(url + value)
        wait_idle(page)
    else:
        page = open_page(browser, url, ctx)
        if how == "model":
            page.get_by_role("combobox").first.select_option(value)
            value = PROMPT
        run_prompt(page, value, expect_graph=False)
    expected = message.format(n_long=len(smollm2.tokenize(LONG)), last=len(smollm2.tokenize("Water boils at")) - 1)
    wait_for(page, "(m) => { const deepAll = (sel, root = document) => { const out = [...root.querySelectorAll(sel)];"
                   " for (const el of root.querySelectorAll('*')) if (el.shadowRoot) out.push(...deepAll(sel, el.shadowRoot));"
                   " return out; }; return deepAll('.rs-error').some(e => e.textContent.trim() === m); }",
             arg=expected, timeout=120_000)
    assert error_text(page) == expected
    ctx.close()
    assert _digest(stored) == before


def test_server_still_serves_after_bad_input(served, browser):
    url, _ = served
    page = open_page(browser, url)
    run_prompt(page, PROMPT)
    assert edge_count(page) > 0 and error_text(page) == ""
    page.close()


CONCURRENT = ["The capital of France is", "Water boils at", "One, two, three,", "The quick brown fox",
              "def add(a, b):", "Berlin is the capital of", "She sold sea shells", "The opposite of hot is"]
SERVER_GROWTH_BOUND = 512 * 2**20  # server RSS growth allowed for 8 sessions of short prompts (measured: 89 MiB)


def test_eight_concurrent_sessions(served, browser, smollm2):
    """Eight sessions run different prompts at the same time: each gets its own, correct graph,
    and the server's memory grows by less than the stated bound."""
    import psutil

    url, reg = served
    rss0 = psutil.Process().memory_info().rss
    contexts = [browser.new_context(viewport={"width": 1400, "height": 900}) for _ in CONCURRENT]
    pages = [open_page(browser, url, c) for c in contexts]
    for page, prompt in zip(pages, CONCURRENT):  # all clicks first: the runs overlap on the server
        page.locator("textarea").fill(prompt)
        page.locator("textarea").blur()
    for page in pages:
        page.get_by_role("button", name="Run").click()
    for page in pages:
        wait_for(page, "() => { const m = window.Bokeh && Bokeh.documents[0].get_model_by_name('rs-edges');"
                       " return m && m.data.src.length > 0 && Bokeh.documents[0].is_idle; }", timeout=240_000)
        wait_idle(page)
    growth = psutil.Process().memory_info().rss - rss0
    for page, prompt in zip(pages, CONCURRENT):
        g = smollm2.trace(prompt)
        assert page.locator("textarea").input_value() == prompt
        assert int(status(page)["tokens"]) == g.n_tokens
        assert edge_count(page) == len(g.route(0.04)), prompt
        assert error_text(page) == ""
    for c in contexts:
        c.close()
    print(f"server RSS growth for {len(CONCURRENT)} concurrent sessions: {growth / 2**20:.0f} MiB")
    assert growth < SERVER_GROWTH_BOUND
