"""Viewer security and reliability (issue 14): script injection, bad files, server-side limits,
login throttling, malformed links and CLI errors.

Browser tests run the real server in this process and real headless Chromium (``browser_util``).
Injection payloads set ``window.__pwned``; every page check asserts it stayed undefined and that
the payload text is shown literally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("panel")

from browser_util import (DEEP, data_to_page, deep_eval, error_text, free_port, start_server, status, stop_server,
                          wait_for, wait_idle, wait_listening)

PROMPT = "Water boils at"
IMG = "<img src=x onerror=window.__pwned=1>"  # a dataset file's name (plus .txt)
IMG_PROMPT = "<img src=x onerror=window.__pwned=2>"  # a prompt of that dataset
SVG = "<svg onload=window.__pwned=3>"  # a bad dataset file's name (plus .json)
RESULTS_NAME = "<img src=x onerror=window.__pwned=4>"  # a results directory's name
SCRIPT_MODEL = "<script>window.__pwned=6</script>"  # the manifest's model field
TOKEN = "<img src=x onerror=window.__pwned=8>"  # a token of a stored graph
MODEL_NAME = "<img src=x onerror=window.__pwned=9>"  # the model name stored in that graph
BAD_UTF8_NAME = os.fsdecode(b"bad\xff.txt")
MAX_DATASET_BYTES = 1 << 20

# file name -> (content, what the page says about it)
BAD_DATASETS = {
    "nocol.csv": ("text\nhello\n", "dataset nocol.csv: no column 'prompt' (columns: text)"),
    "scalar.json": ("5", "dataset scalar.json: a .json dataset is an array of records, not a number"),
    SVG + ".json": ('{"prompt": "x"}', f"dataset {SVG}.json: a .json dataset is an array of records, not an object"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "dataset deep.json: JSON nested too deeply"),
    "latin1.txt": (b"caf\xe9\n", "dataset latin1.txt holds no usable prompts (line 1: not valid UTF-8 (byte 3))"),
    "huge.txt": (b"x" * (MAX_DATASET_BYTES + 1), f"dataset huge.txt: {MAX_DATASET_BYTES + 1} bytes exceeds this "
                                                  f"viewer's limit of {MAX_DATASET_BYTES} bytes"),
    BAD_UTF8_NAME: ("hello\n", "dataset bad\ufffd.txt: the file name is not valid UTF-8"),
}


def digest(root: Path) -> dict:
    """SHA-256 of every file under ``root`` (names as bytes: some are not UTF-8)."""
    return {os.fsencode(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def evil(smollm2, tmp_path_factory):
    """A data folder and a results directory a colleague could hand over, full of payloads and bad files."""
    import routescope

    root = tmp_path_factory.mktemp("evil")
    data = root / "data"
    data.mkdir()
    (data / "good.txt").write_text(f"{PROMPT}\nOne, two, three\n")
    (data / f"{IMG}.txt").write_text(f"{IMG_PROMPT}\n{PROMPT}\n")
    for name, (content, _) in BAD_DATASETS.items():
        path = data / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    job = data / "job"  # a results directory inside the data folder, with corrupt json files
    (job / "prompts").mkdir(parents=True)
    (job / "manifest.json").write_text("{not json")
    (job / "failed.json").write_text("[")

    prompts = root / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n<b onmouseover=window.__pwned=5>bold</b> is\n")
    results = root / RESULTS_NAME
    routescope.run_job(prompts, results, pipeline=smollm2)
    manifest = json.loads((results / "manifest.json").read_text())
    manifest["model"] = SCRIPT_MODEL
    manifest["status"] = "<i onclick=window.__pwned=10>done</i>"
    (results / "manifest.json").write_text(json.dumps(manifest))
    g = smollm2.trace("One two three")  # a stored graph with a crafted token and model name
    g.meta.tokens[1] = TOKEN
    g.meta.model_info = dataclasses.replace(g.meta.model_info, name=MODEL_NAME)
    g.save(results / "prompts" / "000005.msgpack")
    (results / "prompts" / "000009.msgpack").write_bytes(b"\x93not an edge set")

    corrupt = root / "corrupt"  # manifest.json and failed.json that are not JSON
    (corrupt / "prompts").mkdir(parents=True)
    (corrupt / "manifest.json").write_text('{"model": "<script>window.__pwned=11</script>", ')
    (corrupt / "failed.json").write_bytes(b"\xff\xfe[")
    return {"root": root, "data": data, "results": results, "corrupt": corrupt}


@pytest.fixture(scope="module")
def served(smollm2, evil):
    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry

    cfg = ViewerConfig(prompts=[PROMPT], max_tokens=32, data_dirs=[evil["data"]], results=[evil["results"]],
                       max_dataset_bytes=MAX_DATASET_BYTES)
    reg = ModelRegistry(max_tokens=cfg.max_tokens, loader=lambda spec, **kw: smollm2)
    server, url = start_server(cfg, reg)
    yield url, reg, cfg
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright")
    from browser_util import launch
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def new_page(browser, url):
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    page.goto(url)
    wait_idle(page)
    return ctx, page


def pwned(page):
    return page.evaluate("() => window.__pwned")


def injected_elements(page) -> int:
    """Elements a payload would have created (an <img src=x>, <svg onload>, <script> with a payload, <b>/<i> with handlers)."""
    return deep_eval(page, """return deepAll('img[src="x"], svg[onload], [onerror], [onmouseover], [onclick]').length
        + deepAll('script').filter(s => s.textContent.includes('__pwned')).length;""")


def texts(page, selector: str) -> list[str]:
    return deep_eval(page, "return deepAll(arg).map(e => e.textContent);", selector)


def select_option(page, option_text: str) -> None:
    """Pick the option whose text is ``option_text`` in whichever select holds it."""
    sel = page.locator("select").filter(has=page.locator("option", has_text=option_text))
    sel.select_option(label=option_text)


def wait_graph(page, timeout=120_000):
    wait_for(page, "() => { const m = window.Bokeh && Bokeh.documents[0].get_model_by_name('rs-edges');"
                   " return m && m.data.src.length > 0 && Bokeh.documents[0].is_idle; }", timeout=timeout)
    wait_idle(page)


def wait_error(page, message, timeout=120_000):
    wait_for(page, "(m) => { " + DEEP + " return deepAll('.rs-error').some(e => e.textContent.trim() === m); }",
             arg=message, timeout=timeout)


def tooltip_text(page) -> str:
    return deep_eval(page, "return deepAll('.bk-tooltip-content').map(e => e.textContent).join(' | ');")


# ------------------------------------------------------------------------------------ 1. injection
def hover_target(page, pos: int) -> None:
    """Hover the target triangle of position ``pos`` (its tooltip shows @token)."""
    page.mouse.move(1, 1)
    page.wait_for_timeout(200)
    x, y = page.evaluate("(i) => { const t = Bokeh.documents[0].get_model_by_name('rs-targets').data;"
                         " return [t.x[i], t.y[i]]; }", pos)
    px, py = data_to_page(page, x, y)
    page.mouse.move(px, py)
    page.wait_for_timeout(200)
    page.mouse.move(px + 1, py)


def test_names_prompts_tokens_are_escaped(served, browser, evil):
    """File and directory names, prompts, tokens, model names and the status line carry payloads:
    none runs, each is shown as text; the data and results folders are unchanged."""
    url, _, _ = served
    before = digest(evil["root"])
    ctx, page = new_page(browser, url)
    options = texts(page, "option")
    assert f"data/{IMG}.txt" in options  # a file name in the dataset list, as text
    assert any(SVG in t for t in texts(page, ".rs-dataset-errors li"))  # a bad file's name in its error
    select_option(page, f"data/{IMG}.txt")
    wait_for(page, "(p) => { " + DEEP + " return deepAll('option').some(o => o.textContent === p); }", arg=IMG_PROMPT)
    select_option(page, IMG_PROMPT)  # a prompt with HTML: into the prompt box, then traced
    wait_for(page, "(p) => { " + DEEP + " return deepAll('textarea').some(t => t.value === p); }", arg=IMG_PROMPT)
    page.get_by_role("button", name="Run").click()
    wait_graph(page)
    assert int(status(page)["tokens"]) > 10
    link = deep_eval(page, "return deepAll('.rs-link')[0].getAttribute('href');")
    assert "%3Cimg" in link and "<" not in link
    # hover a target triangle: BokehJS escapes @token in tooltips
    hover_target(page, 1)
    wait_for(page, "() => { " + DEEP + " return deepAll('.bk-tooltip-content').some(e => e.textContent.includes('<')); }",
             timeout=10_000)
    assert pwned(page) is None and injected_elements(page) == 0

    # stored results: a directory named with a payload, a manifest with a script, a crafted graph
    page.get_by_role("button", name="stored").click()
    select_option(page, RESULTS_NAME)
    page.get_by_role("button", name="Open results").click()
    wait_for(page, "() => { " + DEEP + " return deepAll('.rs-status').some(e => e.dataset.state === 'results')"
                   " && deepAll('.rs-importance').length > 0; }")
    wait_idle(page)
    assert status(page)["text"] == f"4 stored graphs in {RESULTS_NAME}"
    skipped = texts(page, ".rs-results-errors li")
    assert len(skipped) == 1 and skipped[0].startswith("prompts/000009.msgpack: ")
    select_option(page, "prompts/000005.msgpack")
    wait_for(page, "(t) => { " + DEEP + " return deepAll('.rs-model-info').some(e => e.textContent.includes(t)); }",
             arg=MODEL_NAME)
    wait_graph(page)
    info = deep_eval(page, "return deepAll('.rs-model-info tr').map(r => r.textContent);")
    assert f"model{MODEL_NAME}" in info
    from routescope.viewer.plot import display_token

    shown_token = display_token(TOKEN)  # whitespace made visible: "<img\u2423src=x\u2423onerror=..."
    hover_target(page, 1)
    wait_for(page, "(t) => { " + DEEP + " return deepAll('.bk-tooltip-content').some(e => e.textContent.includes(t)); }",
             arg=shown_token, timeout=10_000)
    assert shown_token in tooltip_text(page)
    page.wait_for_timeout(300)
    assert pwned(page) is None and injected_elements(page) == 0
    ctx.close()
    assert digest(evil["root"]) == before


def test_stats_panel_escapes_manifest_and_survives_corrupt_files(browser, evil):
    """``stats_view.panel`` of a results directory with a payload name, a <script> model and a
    corrupt prompt file, and of one whose manifest.json and failed.json are not JSON: both pages
    render, show the text literally, list each unreadable part; nothing runs."""
    import panel as pn

    from routescope.viewer.stats_view import panel

    before = digest(evil["root"])
    port = free_port()
    server = pn.serve({"/evil": lambda: panel(evil["results"]), "/corrupt": lambda: panel(evil["corrupt"])},
                      port=port, address="127.0.0.1", show=False, threaded=True,
                      websocket_origin=[f"127.0.0.1:{port}"])
    try:
        wait_listening(port)
        ctx, page = new_page(browser, f"http://127.0.0.1:{port}/evil")
        wait_for(page, "() => { " + DEEP + " return deepAll('.rs-results-header').length > 0; }")
        header = texts(page, ".rs-results-header")[0]
        assert header == f"{RESULTS_NAME}: {SCRIPT_MODEL} (4 prompts, 0 failed, status <i onclick=window.__pwned=10>done</i>)"
        errors = texts(page, ".rs-error li")
        assert any(e.startswith("prompt 9: skipped: ") for e in errors), errors
        assert pwned(page) is None and injected_elements(page) == 0
        ctx.close()
        ctx, page = new_page(browser, f"http://127.0.0.1:{port}/corrupt")
        wait_for(page, "() => { " + DEEP + " return deepAll('.rs-error li').length > 0; }")
        errors = texts(page, ".rs-error li")
        assert any(e.startswith("manifest.json: ") for e in errors) and any(e.startswith("failed.json: ") for e in errors)
        assert texts(page, ".rs-results-header")[0] == "corrupt: None (0 prompts, ? failed, status None)"
        assert pwned(page) is None and injected_elements(page) == 0
        ctx.close()
    finally:
        server.stop()
    assert digest(evil["root"]) == before


def test_html_helpers_escape_every_cell():
    """The app's table and message helpers escape text (unit level, every helper)."""
    from routescope.viewer.app import _Safe, _table, promoted_html, tokens_table

    payload = "<img src=x onerror=alert(1)>"
    html = _table([[payload, _Safe("<b>ok</b>")]], [payload], "c", [{"k": payload}])
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html and "<b>ok</b>" in html
    t = tokens_table([{"token": payload, "score": 1.0, "rank_change": 2}], "t")
    assert "<img" not in t
    p = promoted_html(payload, {"promoted": [{"token": payload, "score": 1.0}], "suppressed": []}, "p")
    assert "<img" not in p


def test_no_tooltip_renders_html(smollm2):
    """Hover tooltips only use ``@field`` placeholders (escaped by BokehJS), never ``{safe}``."""
    import numpy as np
    from bokeh.models import HoverTool

    from routescope.viewer.plot import build_layout, graph_figure, heatmap_figure

    g = smollm2.trace(PROMPT)
    lay = build_layout(g.route(0.04), g.tokens, g.n_layers, [g.n_tokens - 1])
    figs = [graph_figure(lay)[0], heatmap_figure(np.zeros((2, 2)), "t", "x", "y", "h", ["<a>", "b"], ["c", "d"])]
    tips = [tip for f in figs for h in f.select(HoverTool) for tip in h.tooltips]
    assert tips and all(isinstance(v, str) and "{safe}" not in v for _, v in tips)


# ------------------------------------------------------------------------------------ 2. bad files
def test_bad_files_never_blank_the_page(served, browser, evil, smollm2):
    """The page loads, offers exactly the good dataset files, names each bad one with its error;
    a later session still gets a working page; nothing on disk changes."""
    url, _, _ = served
    before = digest(evil["root"])
    ctx, page = new_page(browser, url)
    dataset_select = deep_eval(page, """const s = deepAll('select').find(s => [...s.options].some(o => o.textContent === 'data/good.txt'));
        return [...s.options].map(o => o.textContent);""")
    assert dataset_select == ["(configured prompts)", f"data/{IMG}.txt", "data/good.txt"]
    errors = texts(page, ".rs-dataset-errors li")
    assert sorted(errors) == sorted(msg for _, msg in BAD_DATASETS.values())
    assert error_text(page) == ""
    ctx.close()
    ctx, page = new_page(browser, url)  # a second visitor afterwards
    page.locator("textarea").fill(PROMPT)
    page.locator("textarea").blur()
    page.get_by_role("button", name="Run").click()
    wait_graph(page)
    assert int(status(page)["edges"]) == len(smollm2.trace(PROMPT).route(0.04)) and error_text(page) == ""
    ctx.close()
    assert digest(evil["root"]) == before


def test_results_dirs_are_never_datasets(evil):
    """``list_datasets`` skips a results directory inside a data folder (even with corrupt json)
    and a results directory configured as a data folder."""
    from routescope.viewer.config import list_datasets

    listed = {rel for _, rel in list_datasets([evil["data"]])}
    assert not any(rel.startswith("job/") for rel in listed) and "good.txt" in listed
    assert list_datasets([evil["data"] / "job"]) == [] and list_datasets([evil["results"]]) == []


def test_page_construction_never_raises(evil, monkeypatch):
    """A page whose construction fails anyway (here: forced) is one escaped message, not a blank page."""
    from routescope.viewer import app as app_mod
    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry

    cfg = ViewerConfig(data_dirs=[evil["data"]], max_dataset_bytes=MAX_DATASET_BYTES)
    page = app_mod.create_app(cfg, ModelRegistry())
    app = page.routescope_app
    assert [f for _, f in app._datasets] == [f"{IMG}.txt", "good.txt"]
    assert len(app._dataset_errors) == len(BAD_DATASETS)
    app.open_results(relative="data/job")  # a results folder whose manifest/failed are corrupt
    assert app.error.visible and "holds no .msgpack graphs" in app.error.object

    def boom(*a, **k):
        raise RuntimeError("<script>window.__pwned=12</script>")

    monkeypatch.setattr(app_mod, "scan_datasets", boom)
    broken = app_mod.create_app(cfg, ModelRegistry())
    html = broken.objects[1].object
    assert "&lt;script&gt;" in html and "<script>" not in html


def test_stats_panel_never_raises(evil, tmp_path):
    from routescope.viewer.stats_view import panel

    for path in (evil["corrupt"], evil["results"], tmp_path):  # corrupt json, a corrupt prompt, not results
        col = panel(path)
        assert col.objects and "rs-error" in col.objects[0 if path == tmp_path else 1].object


# ------------------------------------------------------------------------------------ 3. limits
WS_FLOOD_JS = """async ([url, n]) => {
  const html = await (await fetch(url)).text();
  const token = html.match(/"token":"([^"]+)"/)[1];
  const big = JSON.stringify({events: [{kind: "ModelChanged", model: {id: "x"}, attr: "value", new: "x".repeat(n)}]});
  const ws = new WebSocket(url.replace("http", "ws") + "ws", ["bokeh", token]);
  await new Promise((ok, bad) => { ws.onmessage = ok; ws.onerror = bad; });
  const closed = new Promise(ok => { ws.onclose = e => ok([performance.now(), e.code]); });
  const t0 = performance.now();
  ws.send(JSON.stringify({msgid: "1", msgtype: "PATCH-DOC", num_buffers: 0}));
  ws.send("{}");
  ws.send(big);
  const [t1, code] = await closed;
  return {seconds: (t1 - t0) / 1000, code};
}"""


class PeakRSS:
    """Peak resident memory of this process (the server's) while in the block, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_websocket_message_of_5mb_is_refused(served, browser):
    """A 5 MB prompt sent on the page's websocket (Bokeh PATCH-DOC): the server closes the
    connection at the frame header (max_message_bytes, 2 MiB) in under 2 s, reading almost none
    of it (peak server RSS growth < 100 MiB); the next visitor gets a working page."""
    url, _, cfg = served
    assert cfg.max_message_bytes == 2 * 2**20
    ctx, page = new_page(browser, url)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        got = page.evaluate(WS_FLOOD_JS, [url, 5_000_000])
        wall = time.perf_counter() - t0
    print(f"5 MB websocket message: closed after {got['seconds']:.3f} s (code {got['code']}), "
          f"peak server RSS growth {rss.growth / 2**20:.1f} MiB")
    assert got["code"] in (1009, 1006) and got["seconds"] < 2.0 and wall < 10
    assert rss.growth < 100 * 2**20
    ctx.close()
    ctx, page = new_page(browser, url)
    assert status(page)["state"] == "idle"
    ctx.close()


def test_long_prompt_refused_before_tokenising(served, browser, smollm2, monkeypatch):
    """A 1,000,000-character prompt set through the page's websocket (under the message cap):
    one error message in under 2 s, the tokenizer never called, little server memory."""
    url, _, cfg = served
    calls = []
    real = smollm2.tokenize
    monkeypatch.setattr(smollm2, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctx, page = new_page(browser, url)
    limit = cfg.prompt_chars_limit
    assert limit == 16 * 32
    page.evaluate("(n) => { window.__big = 'x'.repeat(n); }", 1_000_000)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        page.evaluate("() => { const m = [...Bokeh.documents[0].all_models].find("
                      "m => m.type === 'panel.models.widgets.TextAreaInput'); m.value = window.__big; }")
        page.get_by_role("button", name="Run").click()
        wait_error(page, f"Cannot trace: prompt: 1000000 characters exceeds this viewer's limit of {limit} characters",
                   timeout=30_000)
        elapsed = time.perf_counter() - t0
    print(f"1 MB prompt refused after {elapsed:.2f} s, peak server RSS growth {rss.growth / 2**20:.1f} MiB")
    assert elapsed < 2.0 and calls == [] and rss.growth < 100 * 2**20
    ctx.close()


def test_prompt_limit_on_the_server_side():
    """The registry refuses a prompt over ``max_prompt_chars`` before tokenising; the config
    derives the limit from max_tokens (16 chars a token) with a hard cap."""
    from routescope.viewer.config import MAX_PROMPT_CHARS_CAP, ConfigError, ViewerConfig, parse_config
    from routescope.viewer.models import Loaded, ModelRegistry

    class Pipe:
        def tokenize(self, *a):
            raise AssertionError("tokenised")

    reg = ModelRegistry(max_tokens=32)
    loaded = Loaded(("k",), Pipe(), threading.RLock(), "cpu", None)
    with pytest.raises(ValueError, match="^prompt: 513 characters exceeds this viewer's limit of 512 characters$"):
        reg.trace(loaded, "x" * 513)
    assert ViewerConfig(max_tokens=256).prompt_chars_limit == 4096
    assert ViewerConfig(max_tokens=100_000).prompt_chars_limit == MAX_PROMPT_CHARS_CAP
    assert parse_config({"max_prompt_chars": 100}).prompt_chars_limit == 100
    with pytest.raises(ConfigError, match="at most"):
        parse_config({"max_prompt_chars": MAX_PROMPT_CHARS_CAP + 1})
    cfg = parse_config({"max_tokens": 64})
    assert ModelRegistry.for_config(cfg).max_prompt_chars == 1024


# ------------------------------------------------------------------------------------ 4. authentication
def test_password_check_is_constant_time_over_all_users(monkeypatch):
    """Every configured user is compared (no early exit), whoever logs in."""
    from routescope.viewer import server

    users = {"alice": "s3cret", "bob": "hunter2", "carol": "pw"}
    assert server.check_password(users, "bob", "hunter2") and server.check_password(users, "carol", "pw")
    for user, pw in (("bob", "s3cret"), ("alice", ""), ("mallory", "s3cret"), ("", ""), ("alice", "s3cret ")):
        assert not server.check_password(users, user, pw)
    calls = []
    real = server.hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: calls.append(len(a)) or real(a, b))
    for user in ("alice", "carol", "nobody"):
        calls.clear()
        server.check_password(users, user, "wrong")
        assert len(calls) == 2 * len(users) and set(calls) == {32}  # all users, equal-length digests


def test_login_throttle_state():
    """Free failures, then exponential lockouts per client; success resets; bounded memory."""
    from routescope.viewer.server import LoginThrottle

    now = [1000.0]
    t = LoginThrottle(free=3, base_s=1, max_s=8, forget_s=60, max_clients=100, clock=lambda: now[0])
    assert [t.failure("10.0.0.1") for _ in range(7)] == [0, 0, 0, 1, 2, 4, 8]
    assert t.retry_after("10.0.0.1") == 8 and t.refused == 1
    assert t.retry_after("10.0.0.2") == 0  # another client is not affected
    now[0] += 8
    assert t.retry_after("10.0.0.1") == 0
    assert t.failure("10.0.0.1") == 8  # capped at max_s
    t.success("10.0.0.1")
    assert t.failures("10.0.0.1") == 0 and t.retry_after("10.0.0.1") == 0
    t.failure("2001:db8::1")  # IPv6: one entry per /64
    t.failure("2001:db8::2")
    assert t.failures("2001:db8::ffff") == 2
    for i in range(1000):
        t.failure(f"10.1.{i // 256}.{i % 256}")
    assert len(t) == 100
    now[0] += 61
    assert t.failures("10.1.3.231") == 0  # forgotten after forget_s


def _post_login(port: int, user: str, password: str):
    import http.client
    import urllib.parse

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/login", urllib.parse.urlencode({"username": user, "password": password}),
                 {"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    conn.close()
    headers = dict(r.getheaders())
    headers["cookies"] = r.msg.get_all("Set-Cookie") or []
    return r.status, headers


def test_login_failures_are_throttled_on_the_server(caplog):
    """Real server with basic auth: wrong passwords redirect back to the form until the free
    failures are spent; then the next attempt, even with the right password, is refused at once
    with 429 and Retry-After, without a password check; failures are logged."""
    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry
    from routescope.viewer.server import LoginThrottle, serve

    throttle = LoginThrottle(free=2, base_s=60)
    port = free_port()
    srv = serve(ViewerConfig(), host="127.0.0.1", port=port, registry=ModelRegistry(), threaded=True,
                basic_auth={"alice": "s3cret"}, throttle=throttle)
    try:
        wait_listening(port)
        with caplog.at_level("WARNING", logger="routescope.viewer"):
            assert _post_login(port, "alice", "wrong")[0] == 302
            assert _post_login(port, "mallory", "wrong")[0] == 302
            assert _post_login(port, "alice", "wrong2")[0] == 302  # third failure: lockout starts
            t0 = time.perf_counter()
            code, headers = _post_login(port, "alice", "s3cret")
            assert code == 429 and 0 < int(headers["Retry-After"]) <= 60 and time.perf_counter() - t0 < 2
        assert throttle.failed == 3 and throttle.refused == 1 and throttle.failures("127.0.0.1") == 3
        assert sum("failed login for user 'alice' from 127.0.0.1" in r.getMessage() for r in caplog.records) == 2
        assert any("login refused for 127.0.0.1" in r.getMessage() for r in caplog.records)
        throttle.success("127.0.0.1")  # (the lockout over) the right password logs in
        code, headers = _post_login(port, "alice", "s3cret")
        assert code == 302 and any(c.startswith("user=") for c in headers["cookies"])
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ 5. URL state
BAD_LINKS = [
    ("sel=edge:attn:x", "Link: selection: 'edge:attn:x' is not node:NAME or edge:KIND:SRC:DST "
                        "(KIND one of attn, res_attn, ffn_in, ffn_out, res_ffn)"),
    ("sel=node:Q9_9", "Link: node: 'Q9_9' is not a node name like X0_3, A4_5, M4_5 or I4_5"),
    ("sel=node:I99_2", "Link: node: 'I99_2': layer 99 outside [0, 29]"),
    ("sel=node:I29_77", "Link: node: 'I29_77': position 77 outside [0, {last}]"),
    ("sel=%3Cscript%3Ewindow.__pwned%3D13%3C%2Fscript%3E",
     "Link: selection: '<script>window.__pwned=13</script>' is not node:NAME or edge:KIND:SRC:DST "
     "(KIND one of attn, res_attn, ffn_in, ffn_out, res_ffn)"),
    ("head=abc", "Link: head: 'abc' is not an integer"),
    ("neuron=1e5", "Link: neuron: '1e5' is not an integer"),
    ("tau=1e999", "Link: tau: inf must be a number in (0, 1)"),
    ("targets=,,", "Link: target: ',,' is not N, N,M or 'all'"),
    ("targets=1,x", "Link: target: '1,x' is not N, N,M or 'all'"),
]


@pytest.mark.parametrize("query,message", BAD_LINKS, ids=[q for q, _ in BAD_LINKS])
def test_malformed_links_are_one_message(served, browser, smollm2, query, message):
    url, _, _ = served
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    page.goto(f"{url}?prompt=Water+boils+at&{query}")
    wait_idle(page)
    expected = message.format(last=len(smollm2.tokenize(PROMPT)) - 1)
    wait_error(page, expected)
    wait_idle(page)
    assert error_text(page) == expected and len(texts(page, ".rs-error")) == 1
    assert pwned(page) is None and injected_elements(page) == 0
    ctx.close()


def test_malformed_links_unit(smollm2):
    """The same links without a browser: apply_query/apply_pending never raise."""
    from routescope.viewer.app import ViewerApp
    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry

    g = smollm2.trace(PROMPT)
    for query, message in BAD_LINKS:
        app = ViewerApp(ViewerConfig(max_tokens=32), ModelRegistry(max_tokens=32, loader=lambda s, **k: smollm2))
        app.panel()
        q = dict(x.split("=", 1) for x in f"prompt={PROMPT}&{query}".split("&"))
        q = {k: __import__("urllib.parse").parse.unquote(v) for k, v in q.items()}
        if app.apply_query(q):
            app.set_graph(g, app.reg.get("smollm2-135m"))
            app.apply_pending()
        assert app.error.visible, query
        assert message.format(last=g.n_tokens - 1).replace("'", "&#x27;").replace("<", "&lt;").replace(
            ">", "&gt;") in app.error.object, (query, app.error.object)


# ------------------------------------------------------------------------------------ CLI
def _serve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routescope.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[1])


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    files = {
        "syntax.yaml": "models: [unclosed\n",
        "syntax.json": '{"models": [}',
        "types.yaml": "max_tokens: many\n",
        "bool.yaml": "demo_mode: 'yes'\nprompts: [a]\n",
        "tau.yaml": "tau_min: [1]\n",
        "list.yaml": "- a\n- b\n",
        "prompts.yaml": "prompts: [{a: 1}]\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.yaml").write_bytes(b"prompts: [caf\xe9]\n")
    return root


def _cli_cases():
    return [
        (["--port", "abc"], "routescope serve: error: --port 'abc': not a port number (an integer in 1-65535)"),
        (["--port", "0"], "routescope serve: error: --port 0: out of range (1-65535)"),
        (["--port", "70000"], "routescope serve: error: --port 70000: out of range (1-65535)"),
        (["--port", "-1"], "routescope serve: error: --port -1: out of range (1-65535)"),
        (["--host", "::1", "--port", "1e3"], "routescope serve: error: --port '1e3': not a port number (an integer in 1-65535)"),
        (["--host", "fe80::zz"], "routescope serve: error: --host 'fe80::zz': not a host name or IP address "
                                 "(IPv6 addresses look like ::1)"),
        (["--config", "{d}/types.yaml"], "routescope serve: error: config: max_tokens must be an integer (in {d}/types.yaml)"),
        (["--config", "{d}/bool.yaml"], "routescope serve: error: config: demo_mode must be true or false, not 'yes' "
                                        "(in {d}/bool.yaml)"),
        (["--config", "{d}/tau.yaml"], "routescope serve: error: config: tau_min must be a number, not [1] (in {d}/tau.yaml)"),
        (["--config", "{d}/list.yaml"], "routescope serve: error: config: {d}/list.yaml: top level must be a mapping"),
        (["--config", "{d}/prompts.yaml"], "routescope serve: error: config: prompts[0] must be text, not dict "
                                           "(in {d}/prompts.yaml)"),
        (["--config", "{d}/latin1.yaml"], "routescope serve: error: config: {d}/latin1.yaml: not valid UTF-8 (byte 13)"),
        (["--config", "{d}/syntax.yaml"], "routescope serve: error: config: {d}/syntax.yaml: cannot parse: "),
        (["--config", "{d}/syntax.json"], "routescope serve: error: config: {d}/syntax.json: cannot parse: "
                                          "Expecting value: line 1 column 13 (char 12)"),
    ]


@pytest.mark.parametrize("case", range(len(_cli_cases())), ids=[" ".join(a) for a, _ in _cli_cases()])
def test_serve_cli_errors(bad_configs, case):
    """Each bad argument is one line on stderr, 'routescope serve: error: ...', exit status 2, no traceback."""
    args, message = _cli_cases()[case]
    args = [a.format(d=bad_configs) for a in args]
    message = message.format(d=bad_configs)
    r = _serve_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in lines if ln.startswith("routescope serve: error: ")] == [lines[-1]]
    if message.endswith(": "):  # a parser's message: one line after the fixed prefix
        assert lines[-1].startswith(message) and len(lines[-1]) > len(message)
    else:
        assert lines[-1] == message


def test_serve_cli_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve_cli("--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"routescope serve: error: --host 127.0.0.1 --port {port}: cannot listen: Address already in use"


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_serve_cli_ipv6_loopback(browser, host):
    """``--host ::1`` and ``--host [::1]`` are loopback: the server starts (no --allow-remote), and
    a browser at http://[::1]:PORT/ gets a live page (its websocket origin is allowed)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proc = subprocess.Popen([sys.executable, "-m", "routescope.cli", "serve", "--host", host, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("::1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        ctx, page = new_page(browser, f"http://[::1]:{port}/")
        assert status(page)["state"] == "idle" and error_text(page) == ""
        ctx.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and f"http://[::1]:{port}/" in err and "Refusing websocket" not in err, err


def test_host_and_port_parsing():
    from routescope.viewer.server import check_bind, is_loopback, normalize_host, parse_port, url_host

    assert is_loopback("::1") and is_loopback("[::1]") and is_loopback("127.0.0.2") and not is_loopback("::")
    assert normalize_host("[::1]") == "::1" and url_host("::1") == "[::1]"
    assert check_bind("[::1]", False, None) is None
    assert parse_port("5006") == 5006 and parse_port(8080) == 8080
    for bad in ("abc", "", "0", "65536", "1.5", "١٢٣"):
        with pytest.raises(ValueError, match="^--port "):
            parse_port(bad)


def test_config_file_errors_are_config_errors(bad_configs):
    """Every malformed config file is a one-line ConfigError (never a TypeError or a traceback)."""
    from routescope.viewer.config import ConfigError, load_config, parse_config

    for p in sorted(bad_configs.iterdir()):
        with pytest.raises(ConfigError) as err:
            load_config(p)
        assert "\n" not in str(err.value) and str(err.value).startswith("config: "), p
    for data in ({"models": 5}, {"models": [{"name": "a", "spec": 1}]}, {"devices": {"a": 1}},
                 {"max_tokens": True}, {"max_tokens": 1.5}, {"cache_bytes": -1}, {"backend": ["canvas"]},
                 {"address": {"x": 1}}, {"data_dirs": [None]}, {"tau_min": "x"}, {"max_message_bytes": 1000}, [1]):
        with pytest.raises(ConfigError):
            parse_config(data)


# ------------------------------------------------------------------------------------ 6. memory bound
def test_registry_counts_the_activation_cache(tmp_path):
    """The viewer loads pipelines with its activation-cache bound (each stage keeps at most that
    many bytes of activations), and the pipeline cache counts parameter bytes + that bound per
    stage, so ``model_cache_bytes`` bounds what models really hold."""
    from routescope.cluster.pipelines import PipelineCache
    from routescope.viewer.config import parse_config
    from routescope.viewer.models import ModelRegistry, entry_bytes
    from routescope.workers.tiny import build_tiny_model

    model = str(build_tiny_model("llama", tmp_path / "tiny"))
    cached = {}
    for bound in (2**30, 1024):  # a bound above one run's activations, and one below
        cache = PipelineCache(max_bytes=10 * 2**30)
        reg = ModelRegistry(pipeline_cache=cache, activation_cache_bytes=bound)
        loaded = reg.get(model)
        pipe = loaded.pipeline
        n_stages = len(pipe.layout)
        assert cache.n_bytes == pipe.info.n_params * 4 + bound * n_stages == entry_bytes(pipe, None, bound)
        for prompt in ("one two three four", "five six seven"):
            pipe.trace(prompt)
        cached[bound] = [c.counters()["cached_bytes"] for c in pipe.clients]
        assert all(n <= bound for n in cached[bound])
    assert all(n > 1024 for n in cached[2**30])  # so the small bound really limited the stores
    # an entry loaded by a caller counting only weights is counted again on the viewer's next get
    other = PipelineCache()
    other.get(reg.key(model), lambda: pipe)
    assert other.n_bytes == pipe.info.n_params * 4
    ModelRegistry(pipeline_cache=other, activation_cache_bytes=5000).get(model)
    assert other.n_bytes == pipe.info.n_params * 4 + 5000 * n_stages
    cfg = parse_config({"activation_cache_bytes": 1234, "model_cache_bytes": 10**9})
    assert ModelRegistry.for_config(cfg).activation_cache_bytes == 1234
