"""Viewer benchmark, measured in headless Chromium against the app on 127.0.0.1 (canvas backend).

    .venv/bin/python benchmarks/bench_viewer.py [--tokens 64] [--screenshots docs/screenshots]

Times: click "Run" -> graph drawn (64-token prompt, SmolLM2, model already loaded; trace not cached),
a threshold step -> redrawn graph, a click on a node -> filled panel. Goals: threshold and click < 300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from routescope.workers.schema import DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser_util import (DEEP, click_data, edge_count, launch, start_server, status, stop_server,  # noqa: E402
                          wait_for, wait_idle)

GRAPH_DRAWN = ("(n) => { const m = window.Bokeh && Bokeh.documents[0].get_model_by_name('rs-edges');"
               " return m && m.data.src.length > 0 && m.data.src.length !== n && Bokeh.documents[0].is_idle; }")


def detail_is(page, node: str, t0: float) -> float:
    page.wait_for_function("(n) => { " + DEEP + " const d = deepAll('.rs-detail')[0];"
                           " return d && d.dataset.node === n && Bokeh.documents[0].is_idle; }", arg=node,
                           timeout=60_000, polling="raf")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--screenshots", default=None)
    args = ap.parse_args()

    import routescope
    from playwright.sync_api import sync_playwright

    from routescope.viewer.config import ViewerConfig
    from routescope.viewer.models import ModelRegistry
    from routescope.viewer.plot import node_xy

    pipe = routescope.load(DEFAULT_MODEL)
    words = "the quick brown fox jumps over the lazy dog and then runs far away into the forest".split()
    prompt = " ".join(words[i % len(words)] for i in range(400))
    ids = pipe.tokenize(prompt)[: args.tokens]
    prompt = pipe.tokenizer.decode(ids[1:])  # BOS is added back by the trace
    n_tok = len(pipe.tokenize(prompt))
    cfg = ViewerConfig(max_tokens=512, prompts=["The capital of France is"])
    reg = ModelRegistry(max_tokens=512, loader=lambda spec, **kw: pipe)
    server, url = start_server(cfg, reg)
    out = {}
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            wait_idle(page)
            # warm the model (load + first trace), not timed
            page.locator("textarea").fill("Hello")
            page.locator("textarea").blur()
            page.get_by_role("button", name="Run").click()
            wait_for(page, GRAPH_DRAWN, arg=-1, timeout=300_000)
            wait_idle(page)
            n_before = edge_count(page)
            page.locator("textarea").fill(prompt)
            page.locator("textarea").blur()
            wait_idle(page)
            t0 = time.perf_counter()
            page.get_by_role("button", name="Run").click()
            wait_for(page, GRAPH_DRAWN, arg=n_before, timeout=300_000)
            out["run_to_graph_s"] = time.perf_counter() - t0
            out["tokens"] = int(status(page)["tokens"])
            out["edges"] = edge_count(page)
            # threshold steps
            handle = page.locator(".noUi-handle").first
            ths = []
            for i in range(args.repeat):
                n = edge_count(page)
                handle.focus()
                t0 = time.perf_counter()
                page.keyboard.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
                page.wait_for_function("(n) => Bokeh.documents[0].get_model_by_name('rs-edges').data.src.length "
                                       "!== n && Bokeh.documents[0].is_idle", arg=n, timeout=60_000, polling="raf")
                ths.append(time.perf_counter() - t0)
            out["threshold_ms"] = [round(x * 1000) for x in ths]
            # clicks on residual nodes (alternating, so each click changes the panel)
            L = pipe.info.n_layers
            clicks = []
            nodes = [f"I{L - 1}_{n_tok - 1}", f"A{L - 1}_{n_tok - 1}"]
            for i in range(args.repeat):
                node = nodes[i % 2]
                # Park the pointer off the plot first: a hover tooltip left over from the previous
                # click can cover a node drawn beside it and swallow the next click.
                page.mouse.move(1, 1)
                page.wait_for_timeout(300)
                t0 = time.perf_counter()
                click_data(page, *node_xy(node), park=False)
                clicks.append(detail_is(page, node, t0))
            out["click_to_panel_ms"] = [round(x * 1000) for x in clicks]
            if args.screenshots:
                shots = Path(args.screenshots)
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / "graph_64_tokens.png"))
                page.locator("textarea").fill("The capital of France is")
                page.locator("textarea").blur()
                n = edge_count(page)
                page.get_by_role("button", name="Run").click()
                wait_for(page, GRAPH_DRAWN, arg=n, timeout=300_000)
                wait_idle(page)
                click_data(page, *node_xy(f"I{L - 1}_5"))
                detail_is(page, f"I{L - 1}_5", time.perf_counter())
                page.screenshot(path=str(shots / "residual_node.png"))
                from browser_util import clear_edge, px_per_unit

                app_layout = None
                g = pipe.trace("The capital of France is")
                from routescope.viewer.plot import build_layout

                app_layout = build_layout(g.route(0.04), g.tokens, L, [5])
                i = clear_edge(app_layout, *px_per_unit(page))
                click_data(page, (app_layout.x0[i] + app_layout.x1[i]) / 2, (app_layout.y0[i] + app_layout.y1[i]) / 2)
                page.wait_for_function("() => { " + DEEP + " const d = deepAll('.rs-detail')[0];"
                                       " return d && d.dataset.kind === 'attention'; }", timeout=60_000)
                page.wait_for_timeout(1500)
                wait_idle(page)
                page.screenshot(path=str(shots / "attention_edge.png"), full_page=True)
                m = max((n for n in app_layout.nodes["name"] if n.startswith("M")),
                        key=lambda s: tuple(int(x) for x in s[1:].split("_")))
                click_data(page, *node_xy(m))
                detail_is(page, m, time.perf_counter())
                page.wait_for_timeout(1500)
                page.screenshot(path=str(shots / "ffn_block.png"), full_page=True)
            browser.close()
    finally:
        stop_server(server)
    out["threshold_median_ms"] = statistics.median(out["threshold_ms"])
    out["click_median_ms"] = statistics.median(out["click_to_panel_ms"])
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
