"""Helpers for the viewer's browser tests: in-process server, headless Debian Chromium, BokehJS geometry."""

from __future__ import annotations

import shutil
import socket
import time
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def start_server(cfg, registry, port: int | None = None):
    """Serve the viewer in this process on 127.0.0.1; returns ``(server_thread, url)``."""
    from routescope.viewer.server import serve

    port = port or free_port()
    server = serve(cfg, host="127.0.0.1", port=port, registry=registry, threaded=True)
    wait_listening(port)
    return server, f"http://127.0.0.1:{port}/"


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port`` (or ``timeout`` passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)


def stop_server(server) -> None:
    try:
        server.stop()
    except Exception:  # noqa: BLE001
        pass


def wait_idle(page, timeout: float = 30_000) -> None:
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                           timeout=timeout)


def wait_for(page, js: str, timeout: float = 60_000, arg: Any = None):
    return page.wait_for_function(js, arg=arg, timeout=timeout, polling=50)


# Shadow-DOM-piercing query for a selector, used inside page.evaluate.
DEEP = """const deepAll = (sel, root = document) => {
  const out = [...root.querySelectorAll(sel)];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) out.push(...deepAll(sel, el.shadowRoot));
  return out; };"""


def deep_eval(page, body: str, arg: Any = None):
    """Evaluate ``body`` (statements using ``deepAll`` and ``arg``, ending in a return)."""
    return page.evaluate("(arg) => { " + DEEP + body + " }", arg)


def status(page) -> dict:
    """The status line's data attributes."""
    return deep_eval(page, """const el = deepAll('.rs-status')[0];
        return el ? Object.assign({text: el.textContent}, el.dataset) : {};""")




def rows(page, selector: str) -> list[dict]:
    """``data-*`` attributes of every ``tr`` under ``selector`` (shadow DOM pierced)."""
    return deep_eval(page, "return deepAll(arg + ' tbody tr').map(r => Object.assign({}, r.dataset));", selector)


def edge_count(page) -> int:
    return page.evaluate("""() => { const m = Bokeh.documents[0].get_model_by_name('rs-edges');
                                    return m ? m.data.src.length : -1; }""")


def data_to_page(page, x: float, y: float) -> tuple[float, float]:
    """Page pixel of data point ``(x, y)`` of the graph figure, through BokehJS's scales."""
    return tuple(page.evaluate("""([x, y]) => {
        const v = Bokeh.index.query_one(v => v.model.name === 'rs-graph' && v.frame != null);
        const r = v.canvas_view.el.getBoundingClientRect();
        return [r.left + v.frame.x_scale.compute(x), r.top + v.frame.y_scale.compute(y)];
    }""", [x, y]))


def click_data(page, x: float, y: float, park: bool = True) -> None:
    """Click the graph at data point ``(x, y)``; ``park`` first moves the pointer off the plot: a
    hover tooltip left over from the previous click can cover what is drawn beside it and swallow
    the click (timed callers park before starting the clock)."""
    if park:
        page.mouse.move(1, 1)
        page.wait_for_timeout(300)
    px, py = data_to_page(page, x, y)
    if px != px or py != py:
        print("NaN", x, y, page.evaluate("""() => { const v = Bokeh.index.query_one(v => v.model.name === 'rs-graph' && v.frame != null);
          const r = v.model.x_range, q = v.model.y_range; return [r.start, r.end, q.start, q.end, v.frame.bbox.width, v.frame.bbox.height]; }"""))
    page.mouse.click(px, py)


def launch(playwright):
    exe = chromium_path()
    if exe is None:
        import pytest

        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)


def error_text(page) -> str:
    """Text of the visible error alert ('' when none)."""
    return deep_eval(page, """const el = deepAll('.rs-error').find(e => e.getClientRects().length > 0);
        return el ? el.textContent.trim() : '';""")


def detail(page) -> dict:
    return deep_eval(page, """const el = deepAll('.rs-detail')[0];
        return el ? Object.assign({text: el.textContent}, el.dataset) : {};""")


def px_per_unit(page) -> tuple[float, float]:
    (x0, y0), (x1, y1) = data_to_page(page, 0, 0), data_to_page(page, 1, 1)
    return abs(x1 - x0), abs(y1 - y0)


def clear_edge(layout, ppx: float, ppy: float, kind: str = "attn") -> int:
    """Index of the ``kind`` edge whose midpoint is farthest (in pixels) from every other edge and node."""
    import numpy as np

    from routescope.viewer.plot import _seg_dist

    best, best_d = -1, -1.0
    nx = np.asarray(layout.nodes["x"]) * ppx
    ny = np.asarray(layout.nodes["y"]) * ppy
    for i, k in enumerate(layout.edges["kind"]):
        if k != kind or layout.x0[i] == layout.x1[i]:
            continue
        mx, my = (layout.x0[i] + layout.x1[i]) / 2 * ppx, (layout.y0[i] + layout.y1[i]) / 2 * ppy
        d = _seg_dist(mx, my, layout.x0 * ppx, layout.y0 * ppy, layout.x1 * ppx, layout.y1 * ppy)
        d[i] = np.inf
        dn = np.hypot(nx - mx, ny - my).min()
        score = min(d.min(), dn)
        if score > best_d:
            best, best_d = i, score
    return best
