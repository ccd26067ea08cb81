"""The Panel app: one ``ViewerApp`` per browser session, sharing a ``ModelRegistry``.

Notebook use::

    import panel as pn; pn.extension()
    from routescope.viewer.app import view
    view()                       # embedded default model, in-process

Session state (model, prompt, threshold, targets, selection) lives in a ``ViewState``
parameterized object, synced to the page URL, so a link reopens the same view.

Untrusted text (prompts, tokens, file and directory names, model names, messages) reaches the
page only through ``_esc`` (HTML-escaped, bytes that were not UTF-8 shown as U+FFFD): table
cells are escaped unless they are ``_Safe`` markup built here from escaped parts, and the status
line and the error alert escape what they are given. Bokeh hover tooltips use ``@field``
placeholders, which BokehJS escapes (no ``{safe}`` format is used).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import time
import urllib.parse
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
import param

from routescope.cluster.routes import check_targets, check_tau, parse_targets
from routescope.workers.schema import parse_node

from .config import (UnsafePathError, ViewerConfig, dataset_prompts, find_root, is_utf8_name, printable,
                     safe_path, scan_datasets)
from .models import ModelRegistry
from .plot import build_layout, display_token, graph_figure, head_importance, heatmap_figure, hit_test, route_svg

log = logging.getLogger("routescope.viewer")


def _esc(text: Any) -> str:
    """``text`` as HTML text (quotes too), with bytes that were not UTF-8 shown as U+FFFD."""
    return html.escape(printable(str(text)))


class _Safe(str):
    """Markup built here from escaped parts: ``_table`` puts it into a cell as it is."""


class _LoadError(RuntimeError):
    pass


def parse_selection(sel: str, graph: Any) -> str:
    """The canonical form of a selection ``node:NAME`` or ``edge:KIND:SRC:DST`` of ``graph``
    (its nodes' layers and positions inside the graph); ``ValueError`` naming the problem."""
    if not isinstance(sel, str) or len(sel) > 200:
        raise ValueError("selection: too long")

    def node(name: str) -> str:
        kind, layer, pos = parse_node(name)
        name = f"{kind}{layer}_{pos}"
        if graph is not None:
            if not 0 <= layer < graph.n_layers:
                raise ValueError(f"node: {name!r}: layer {layer} outside [0, {graph.n_layers - 1}]")
            if not 0 <= pos < graph.n_tokens:
                raise ValueError(f"node: {name!r}: position {pos} outside [0, {graph.n_tokens - 1}]")
        return name

    what, _, rest = sel.partition(":")
    if what == "node" and rest:
        return "node:" + node(rest)
    if what == "edge":
        parts = rest.split(":")
        if len(parts) == 3 and parts[0] in EDGE_KINDS:
            return f"edge:{parts[0]}:{node(parts[1])}:{node(parts[2])}"
    raise ValueError(f"selection: {printable(sel)!r} is not node:NAME or edge:KIND:SRC:DST "
                     f"(KIND one of {', '.join(EDGE_KINDS)})")


EDGE_KINDS = ("attn", "res_attn", "ffn_in", "ffn_out", "res_ffn")


class ViewState(param.Parameterized):
    """What a URL reopens."""

    source = param.String(default="live")
    model = param.String(default="")
    device = param.String(default="")
    dtype = param.String(default="")
    prompt = param.String(default="")
    bos = param.Boolean(default=True)
    tau = param.Number(default=0.04, bounds=(0.01, 0.10))
    renormalize = param.Boolean(default=True)
    normalize = param.Boolean(default=True)
    targets = param.String(default="")  # "" = last position, else "3,5"
    sel = param.String(default="")  # node:NAME | edge:KIND:SRC:DST
    head = param.Integer(default=-1)  # -1 = all heads
    neuron = param.Integer(default=-1)  # -1 = top neuron
    result = param.String(default="")  # stored: "<results dir name>/<file>"


def _table(rows: list[list[Any]], header: list[str], cls: str, attrs: list[dict[str, Any]] | None = None) -> str:
    """An HTML table; cells are escaped unless they are ``_Safe``, attribute values always."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        a = "" if attrs is None else " ".join(f'data-{k}="{_esc(str(v))}"' for k, v in attrs[i].items())
        body.append(f"<tr {a}>" + "".join(f"<td>{c if isinstance(c, _Safe) else _esc(c)}</td>" for c in r) + "</tr>")
    return (f'<table class="rs-table {cls}" style="border-collapse:collapse;font-size:12px">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _tok(t: str) -> _Safe:
    return _Safe(f"<code>{_esc(display_token(t))}</code>")


def _rank_change(item: dict) -> str:
    ch = item.get("rank_change")
    if ch is None:
        return ""
    ch = int(ch)
    if ch > 0:
        return _Safe(f'<span style="color:#2ca02c">\u2191{ch}</span>')
    if ch < 0:
        return _Safe(f'<span style="color:#d62728">\u2193{-ch}</span>')
    return "="


def tokens_table(items: list[dict], cls: str) -> str:
    rows = [[i + 1, _tok(x["token"]), f"{x['score']:.3f}", _rank_change(x)] for i, x in enumerate(items)]
    attrs = [{"token": x["token"], "score": f"{x['score']:.6f}", "rank-change": x.get("rank_change", "")} for x in items]
    return _table(rows, ["#", "token", "score", "rank \u0394"], cls, attrs)


def promoted_html(title: str, res: dict, cls: str) -> str:
    up = [[_tok(x["token"]), f"{x['score']:.3f}"] for x in res["promoted"]]
    down = [[_tok(x["token"]), f"{x['score']:.3f}"] for x in res["suppressed"]]
    ua = [{"token": x["token"], "score": f"{x['score']:.6f}"} for x in res["promoted"]]
    da = [{"token": x["token"], "score": f"{x['score']:.6f}"} for x in res["suppressed"]]
    return (f'<div class="{_esc(cls)}"><b>{_esc(title)}</b><div style="display:flex;gap:12px">'
            f"<div>promoted{_table(up, ['token', 'logit'], cls + '-promoted', ua)}</div>"
            f"<div>suppressed{_table(down, ['token', 'logit'], cls + '-suppressed', da)}</div></div></div>")


class ViewerApp:
    """One browser session."""

    def __init__(self, config: ViewerConfig, registry: ModelRegistry):
        self.cfg = config
        self.reg = registry
        self.state = ViewState(model=config.default_model, device=config.devices[0], dtype=config.dtypes[0])
        self.doc = pn.state.curdoc
        self.graph: Any = None
        self.loaded: Any = None
        self.layout: Any = None
        self.fig: Any = None
        self.sources: dict[str, Any] = {}
        self.route_edges: Any = None
        self.busy = False
        self.detail: dict[str, Any] = {}  # the numbers shown in the selection panel (tests read these)
        self._stored: dict[str, Any] = {}
        self._pending: dict[str, str] = {}
        # every dataset file is tried once per file version (cached for all sessions): the page
        # offers the usable ones and lists why the others cannot be used
        self._datasets, self._dataset_errors = scan_datasets(config.data_dirs, config.max_dataset_bytes)
        self._build_widgets()

    # ----------------------------------------------------------------------------- widgets
    def _build_widgets(self) -> None:
        cfg = self.cfg
        self.w_source = pn.widgets.RadioButtonGroup(label="source", options=["live", "stored"], value="live",
                                                    disabled=not (cfg.results or cfg.data_dirs))
        self.w_model = pn.widgets.Select(label="Model", options=cfg.model_names, value=cfg.default_model)
        self.w_device = pn.widgets.Select(label="Device", options=cfg.devices, value=cfg.devices[0],
                                          disabled=len(cfg.devices) < 2)
        self.w_dtype = pn.widgets.Select(label="Precision", options=cfg.dtypes, value=cfg.dtypes[0],
                                         disabled=len(cfg.dtypes) < 2)
        ds_opts = {"(configured prompts)": ""} if cfg.prompts else {}
        ds_opts.update({f"{d}/{f}": f"{d}/{f}" for d, f in self._datasets})
        self.w_dataset = pn.widgets.Select(label="Dataset", options=ds_opts or {"(none)": ""},
                                           disabled=not ds_opts)
        self.w_pick = pn.widgets.Select(label="Prompt from dataset", options=[""] + list(cfg.prompts), value="")
        self.w_prompt = pn.widgets.TextAreaInput(label=f"Prompt (at most {cfg.max_tokens} tokens)",
                                                 placeholder="Type a prompt", height=80,
                                                 max_length=cfg.prompt_chars_limit,  # the server checks too
                                                 disabled=cfg.demo_mode)
        self.w_bos = pn.widgets.Checkbox(label="prepend BOS", value=True)
        self.w_run = pn.widgets.Button(label="Run", color="primary")
        self.w_tau = pn.widgets.FloatSlider(label="Threshold", start=0.01, end=0.10, step=0.005, value=0.04)
        self.w_renorm = pn.widgets.Checkbox(label="renormalize", value=True)
        self.w_norm = pn.widgets.Checkbox(label="normalize before unembedding", value=True)
        self.w_all_targets = pn.widgets.Button(label="Trace all positions")
        self.w_last_target = pn.widgets.Button(label="Trace last position")
        self.spinner = pn.indicators.LoadingSpinner(value=False, size=22)
        self.status = pn.pane.HTML('<div class="rs-status" data-state="idle">Pick a prompt and press Run.</div>')
        self.error = pn.pane.HTML("", visible=False, sizing_mode="stretch_width")
        self.info = pn.pane.HTML("", css_classes=["rs-info"])
        self.link = pn.pane.HTML("")
        self.dataset_errors = pn.pane.HTML(self._dataset_errors_html(), visible=bool(self._dataset_errors),
                                           sizing_mode="stretch_width")
        self.graph_pane = pn.pane.Bokeh(None, sizing_mode="stretch_width")
        self.w_head = pn.widgets.Select(label="Head", options={"all heads": -1}, value=-1, visible=False)
        self.w_neuron = pn.widgets.Select(label="Neuron", options={"top neuron": -1}, value=-1, visible=False)
        self.detail_html = pn.pane.HTML("", sizing_mode="stretch_width")
        self.sub_html = pn.pane.HTML("", sizing_mode="stretch_width")
        self.maps = pn.Row()
        self.w_export_json = pn.widgets.FileDownload(callback=self._export_json, filename="route.json",
                                                     label="Export route JSON", color="light")
        self.w_export_svg = pn.widgets.FileDownload(callback=self._export_svg, filename="route.svg",
                                                    label="Export graph SVG", color="light")
        # stored results
        self.w_results = pn.widgets.Select(label="Results directory", options=self._results_options())
        self.w_results_path = pn.widgets.TextInput(label="or a results folder inside a data directory",
                                                   placeholder="data_dir_name/job_results")
        self.w_open_results = pn.widgets.Button(label="Open results")
        self.w_files = pn.widgets.Select(label="Stored prompt", options=[])
        self.importance = pn.Column()

        self.w_run.on_click(self._on_run_click)
        self.w_tau.param.watch(self._on_route_option, "value")
        self.w_renorm.param.watch(self._on_route_option, "value")
        self.w_norm.param.watch(self._on_normalize, "value")
        self.w_all_targets.on_click(lambda e: self.set_targets("all"))
        self.w_last_target.on_click(lambda e: self.set_targets(""))
        self.w_dataset.param.watch(self._on_dataset, "value")
        self.w_pick.param.watch(lambda e: setattr(self.w_prompt, "value", e.new) if e.new else None, "value")
        self.w_head.param.watch(lambda e: self._on_sub_choice("head", e.new), "value")
        self.w_neuron.param.watch(lambda e: self._on_sub_choice("neuron", e.new), "value")
        self.w_open_results.on_click(lambda e: self.open_results(self.w_results.value, self.w_results_path.value))
        self.w_files.param.watch(lambda e: self.open_stored(e.new) if e.new else None, "value")
        self.w_source.param.watch(lambda e: self._show_source(e.new), "value")
        if self._datasets or cfg.prompts:
            self._on_dataset(None)

    def _dataset_errors_html(self) -> str:
        items = "".join(f'<li data-file="{_esc(name)}">{_esc(why)}</li>' for name, why in self._dataset_errors)
        return (f'<div class="rs-dataset-errors" data-count="{len(self._dataset_errors)}" style="font-size:12px;'
                f'color:#842029"><b>{len(self._dataset_errors)} dataset file(s) cannot be used:</b>'
                f'<ul style="margin:2px 0;padding-left:18px">{items}</ul></div>')

    def _results_options(self) -> dict[str, str]:
        opts = {"": ""}
        for i, r in enumerate(self.cfg.results):
            label = printable(r.name)
            opts[label if label not in opts else f"{label} ({i})"] = str(i)  # index: names may not be UTF-8
        return opts

    # ----------------------------------------------------------------------------- layout
    def panel(self) -> pn.viewable.Viewable:
        live = pn.Column(self.w_model, pn.Row(self.w_device, self.w_dtype), self.w_dataset, self.w_pick,
                         self.w_prompt, self.w_bos, pn.Row(self.w_run, self.spinner))
        self.stored_box = pn.Column(self.w_results, self.w_results_path, self.w_open_results, self.w_files,
                                    visible=False)
        controls = pn.Column(
            "### routescope", self.w_source, live, self.stored_box, pn.layout.Divider(), self.w_tau,
            self.w_renorm, self.w_norm, pn.Row(self.w_last_target, self.w_all_targets),
            pn.Row(self.w_export_json, self.w_export_svg), self.link, self.info, self.dataset_errors, width=320)
        self.live_box = live
        main = pn.Column(self.error, self.status, self.graph_pane, sizing_mode="stretch_width")
        detail = pn.Column("#### Selection", self.detail_html, self.w_head, self.w_neuron, self.sub_html,
                           self.maps, self.importance, width=430)
        root = pn.Row(controls, main, detail, sizing_mode="stretch_width")
        return root

    def _show_source(self, source: str) -> None:
        self.state.source = source
        self.live_box.visible = source == "live"
        self.stored_box.visible = source == "stored"

    # ----------------------------------------------------------------------------- messages
    def show_error(self, msg: str) -> None:
        """Show ``msg`` (plain text, escaped here) as the page's one error alert."""
        msg = printable(str(msg))
        if len(msg) > 2000:
            msg = msg[:2000] + "\u2026"
        log.info("viewer: %s", msg)
        self.error.object = (f'<div class="rs-error" role="alert" style="background:#f8d7da;color:#842029;'
                             f'border:1px solid #f5c2c7;border-radius:4px;padding:8px 12px">{_esc(msg)}</div>')
        self.error.visible = True
        self._set_status("error", msg)

    def clear_error(self) -> None:
        self.error.visible = False
        self.error.object = ""

    def _set_status(self, state: str, text: str, **data: Any) -> None:
        """The status line: ``text`` is plain text (escaped here), ``data`` its data attributes."""
        attrs = " ".join(f'data-{k}="{_esc(str(v))}"' for k, v in data.items())
        self.status.object = f'<div class="rs-status" data-state="{_esc(state)}" {attrs}>{_esc(text)}</div>'

    def _busy(self, on: bool, text: str = "") -> None:
        self.busy = on
        self.spinner.value = on
        self.w_run.disabled = on
        if on:
            self._set_status("busy", text)

    # ----------------------------------------------------------------------------- inputs
    def _read_dataset(self, value: str) -> list[str]:
        if (value or "") not in {f"{d}/{f}" for d, f in self._datasets}:
            raise ValueError(f"dataset {printable(str(value))!r} is not offered by this viewer")
        dname, rel = value.split("/", 1)
        return dataset_prompts(find_root(self.cfg.data_dirs, dname), rel, self.cfg.max_dataset_bytes)

    def _on_dataset(self, event) -> None:
        value = self.w_dataset.value
        try:
            prompts = self._read_dataset(value) if value else list(self.cfg.prompts)
        except (ValueError, OSError) as exc:
            self.show_error(f"Dataset: {exc}")
            return
        self.w_pick.options = [""] + prompts[:500]
        self.w_pick.value = ""

    def allowed_prompts(self) -> set[str]:
        out = set(self.cfg.prompts)
        for d, f in self._datasets:
            try:
                out.update(self._read_dataset(f"{d}/{f}"))
            except (ValueError, OSError):
                pass
        return out

    def check_prompt(self, prompt: Any) -> str:
        """The prompt, if this viewer traces it: refused here, before any tokenising, when it is
        not text, empty, over ``max_prompt_chars`` characters, or (demo mode) not configured."""
        limit = self.cfg.prompt_chars_limit
        if not isinstance(prompt, str):
            raise ValueError("The prompt must be text.")
        if len(prompt) > limit:
            raise ValueError(f"Cannot trace: prompt: {len(prompt)} characters exceeds this viewer's limit of "
                             f"{limit} characters")
        if not prompt.strip():
            raise ValueError("The prompt is empty: type a prompt or pick one from the dataset.")
        if self.cfg.demo_mode and prompt not in self.allowed_prompts():
            raise ValueError("Demo mode: only the configured prompts can be traced.")
        return prompt

    async def _on_run_click(self, event=None) -> None:
        await self.run()

    def _schedule(self, fn, *args, **kwargs) -> None:
        """Run a UI update with the document lock held (from threads and coroutines)."""
        doc = self.doc
        if doc is None or getattr(doc, "session_context", None) is None:
            fn(*args, **kwargs)
            return
        doc.add_next_tick_callback(partial(fn, *args, **kwargs))

    async def run(self, prompt: str | None = None, then=None) -> None:
        """Load (if needed) the chosen model and trace the prompt, off the event loop."""
        if self.busy:
            return
        prompt = self.w_prompt.value if prompt is None else prompt
        try:
            self.check_prompt(prompt)
            entry = self.cfg.model(self.w_model.value)
        except ValueError as exc:
            self._schedule(self.show_error, str(exc))
            return
        device, dtype, bos = self.w_device.value, self.w_dtype.value, self.w_bos.value
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self.busy = True
        try:
            if not self.reg.is_loaded(entry.spec, device, dtype, entry.adapter):
                self._schedule(self._busy, True, f"Loading model {entry.name} ({device}, {dtype})\u2026")
            else:
                self._schedule(self._busy, True, f"Tracing {len(prompt)} characters\u2026")
            try:
                loaded = await loop.run_in_executor(None, self.reg.get, entry.spec, device, dtype, entry.adapter)
            except Exception as exc:  # noqa: BLE001
                raise _LoadError(f"Model {entry.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
            self._schedule(self._busy, True, f"Tracing {len(prompt)} characters\u2026")
            graph = await loop.run_in_executor(
                None, partial(self.reg.trace, loaded, prompt, prepend_bos=bos, tau_min=self.cfg.tau_min))
        except _LoadError as exc:
            self.busy = False
            log.warning("viewer: %s", exc)
            self._schedule(self._fail, str(exc))
            return
        except ValueError as exc:
            self.busy = False
            self._schedule(self._fail, f"Cannot trace: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a model that fails to load must not kill the session
            self.busy = False
            log.exception("viewer: load/trace failed")
            self._schedule(self._fail, f"Model {entry.name!r} failed: {type(exc).__name__}: {exc}")
            return
        self.busy = False
        self._schedule(self._finish_run, graph, loaded, entry.name, device, dtype, prompt, bos,
                       time.perf_counter() - t0, then)

    def _fail(self, msg: str) -> None:
        self._busy(False)
        self.show_error(msg)

    def _finish_run(self, graph, loaded, model, device, dtype, prompt, bos, elapsed, then) -> None:
        self._busy(False)
        self.clear_error()
        self.w_source.value = "live"
        self.state.param.update(model=model, device=device, dtype=dtype, prompt=prompt, bos=bos, source="live",
                                result="")
        self.set_graph(graph, loaded, elapsed=elapsed)
        if then is not None:
            then()

    # ----------------------------------------------------------------------------- graph
    def set_graph(self, graph: Any, loaded: Any = None, elapsed: float | None = None, keep_selection: bool = False) -> None:
        self.graph = graph
        self.loaded = loaded
        if not keep_selection:
            self.state.param.update(targets="", sel="", head=-1, neuron=-1)
        self._render(new_figure=True)
        self._show_info(elapsed)
        self._clear_detail()
        if keep_selection and self.state.sel:
            self.select(self.state.sel)

    def targets(self) -> list[int]:
        if self.graph is None:
            return []
        if self.state.targets == "all":
            return list(range(self.graph.n_tokens))
        if not self.state.targets:
            return [self.graph.n_tokens - 1]
        return [int(x) for x in self.state.targets.split(",") if x.strip() != ""]

    def set_targets(self, spec: str | list[int]) -> None:
        if isinstance(spec, list):
            spec = ",".join(str(t) for t in sorted(set(spec)))
            if self.graph is not None and spec == str(self.graph.n_tokens - 1):
                spec = ""
        self.state.targets = spec
        self._render()

    def toggle_target(self, pos: int) -> None:
        cur = self.targets()
        new = [t for t in cur if t != pos] if pos in cur else cur + [pos]
        self.set_targets(new or [pos])

    def _mode(self) -> str:
        return "renormalize" if self.w_renorm.value else "plain"

    def _on_route_option(self, event) -> None:
        self.state.tau = float(self.w_tau.value)
        self.state.renormalize = bool(self.w_renorm.value)
        if self.graph is not None:
            self._render()

    def _on_normalize(self, event) -> None:
        self.state.normalize = bool(self.w_norm.value)
        if self.state.sel:
            self.select(self.state.sel)

    def _render(self, new_figure: bool = False) -> None:
        """Re-threshold the stored edge set (no model run) and redraw the route."""
        if self.graph is None:
            return
        t0 = time.perf_counter()
        g = self.graph
        targets = self.targets()
        edges = g.route(float(self.w_tau.value), self._mode(), targets)
        self.route_edges = edges
        self.layout = build_layout(edges, g.tokens, g.n_layers, targets)
        if self.fig is not None and new_figure:
            # one figure per session: new graphs update it (a replaced figure left stale views behind)
            from .plot import set_axes

            self.sources["edges"].data = self.layout.edges
            self.sources["nodes"].data = self.layout.nodes
            self.sources["targets"].data = self.layout.targets
            set_axes(self.fig, self.layout, reset_ranges=True)
        elif new_figure or self.fig is None:
            from bokeh.events import Tap

            self.fig, self.sources = graph_figure(self.layout, backend=self.cfg.backend, sources=self.sources)
            self.fig.on_event(Tap, self._on_tap)
            self.graph_pane.object = self.fig
        else:
            self.sources["edges"].data = self.layout.edges
            self.sources["nodes"].data = self.layout.nodes
            self.sources["targets"].data = self.layout.targets
        self._highlight()
        ms = (time.perf_counter() - t0) * 1000
        self._set_status("ready", f"{len(edges)} edges on the route of position(s) "
                         f"{', '.join(map(str, targets))} at threshold {self.w_tau.value:.3f} "
                         f"({self._mode()}); {g.n_tokens} tokens, {g.n_layers} layers",
                         edges=len(edges), targets=",".join(map(str, targets)), tau=f"{self.w_tau.value:.3f}",
                         tokens=g.n_tokens, render_ms=f"{ms:.1f}")
        self._update_link()

    def _show_info(self, elapsed: float | None) -> None:
        g = self.graph
        info = g.meta.model_info.to_dict() if g is not None and g.meta.model_info is not None else {}
        if self.loaded is not None:
            info.update(self.loaded.pipeline.info.to_dict())
        rows = []
        for key, label in (("name", "model"), ("architecture", "architecture"), ("n_layers", "layers"),
                           ("n_heads", "heads"), ("n_kv_heads", "KV heads"), ("d_model", "width"),
                           ("d_ff", "FFN width"), ("d_vocab", "vocabulary"), ("n_params", "parameters")):
            if key in info:
                v = info[key]
                rows.append([label, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)])
        if self.loaded is not None:
            rows.append(["device / precision", f"{self.loaded.device} / {self.loaded.dtype or 'float32'}"])
        if elapsed is not None:
            rows.append(["load + trace", f"{elapsed:.2f} s"])
        attrs = [{"key": r[0]} for r in rows]
        self.info.object = "<b>Model</b>" + _table(rows, ["", ""], "rs-model-info", attrs)

    def _update_link(self) -> None:
        s = self.state
        q = {"model": s.model, "prompt": s.prompt, "tau": f"{s.tau:.3f}"}
        if s.source == "stored":
            q = {"source": "stored", "result": s.result, "tau": f"{s.tau:.3f}"}
        if not s.renormalize:
            q["renormalize"] = "false"
        if s.targets:
            q["targets"] = s.targets
        if s.sel:
            q["sel"] = s.sel
        if s.head >= 0:
            q["head"] = str(s.head)
        if s.neuron >= 0:
            q["neuron"] = str(s.neuron)
        query = urllib.parse.urlencode(q)
        self.link.object = f'<a class="rs-link" href="?{_esc(query)}" target="_blank">Link to this view</a>'
        try:
            if pn.state.location is not None:
                pn.state.location.search = "?" + query
        except Exception:  # noqa: BLE001 - outside a server there is no location
            pass

    # ----------------------------------------------------------------------------- clicks
    def _on_tap(self, event) -> None:
        if self.layout is None:
            return
        try:
            hit = self.hit(event.x, event.y)
            if hit is None:
                return
            kind, what = hit
            if kind == "target":
                self.toggle_target(int(what))
            elif kind == "node":
                self.select(f"node:{what}")
            else:
                i = int(what)
                e = self.layout.edges
                self.select(f"edge:{e['kind'][i]}:{e['src'][i]}:{e['dst'][i]}")
        except Exception as exc:  # noqa: BLE001
            log.exception("viewer: click failed")
            self.show_error(f"Click failed: {type(exc).__name__}: {exc}")

    def hit(self, x: float, y: float):
        fig = self.fig
        xr, yr = fig.x_range, fig.y_range
        w = fig.inner_width or (fig.width or 800) - 60
        h = fig.inner_height or (fig.height or 600) - 60
        ppx = w / max(xr.end - xr.start, 1e-9)
        ppy = h / max(yr.end - yr.start, 1e-9)
        return hit_test(self.layout, x, y, ppx, ppy)

    def _highlight(self) -> None:
        if not self.sources:
            return
        hl_nodes = {"x": [], "y": [], "marker": []}
        hl_edges = {"xs": [], "ys": []}
        sel = self.state.sel
        try:
            sel = parse_selection(sel, None) if sel else ""
        except ValueError:
            sel = ""
        if sel and self.layout is not None:
            from .plot import node_xy

            if sel.startswith("node:"):
                x, y = node_xy(sel[5:], self.layout.parallel)
                hl_nodes = {"x": [x], "y": [y], "marker": ["square" if sel[5] == "M" else "circle"]}
            else:
                _, kind, src, dst = sel.split(":")
                x0, y0 = node_xy(src, self.layout.parallel)
                x1, y1 = node_xy(dst, self.layout.parallel)
                hl_edges = {"xs": [[x0, x1]], "ys": [[y0, y1]]}
        self.sources["hl_nodes"].data = hl_nodes
        self.sources["hl_edges"].data = hl_edges

    def _clear_detail(self) -> None:
        self.detail = {}
        self.detail_html.object = ('<div class="rs-detail" data-kind="none">Click a node, an edge or an FFN block '
                                   "(square) in the graph. Click a triangle at the top to trace that position.</div>")
        self.sub_html.object = ""
        self.maps.objects = []
        self.w_head.visible = False
        self.w_neuron.visible = False

    def _details(self, fn, *args, **kwargs):
        if self.loaded is None:
            from routescope.cluster.graph import DetailsUnavailableError

            raise DetailsUnavailableError("stored graph: details need the live model")
        return self.loaded.call(fn, *args, **kwargs)

    def select(self, sel: str, prefix: str = "Selection") -> None:
        """Show the panel of a selection: ``node:NAME`` or ``edge:KIND:SRC:DST``; a malformed one
        (from a link) or one outside the graph is an error message."""
        if self.graph is None:
            return
        t0 = time.perf_counter()
        try:
            sel = parse_selection(sel, self.graph)
        except ValueError as exc:
            self.show_error(f"{prefix}: {exc}")
            return
        if sel != self.state.sel:
            self.state.param.update(sel=sel, head=-1, neuron=-1)
        self._highlight()
        from routescope.cluster.graph import DetailsUnavailableError

        try:
            if sel.startswith("node:"):
                name = sel[5:]
                if name.startswith("M"):
                    self._show_ffn(name)
                else:
                    self._show_residual(name)
            else:
                _, kind, src, dst = sel.split(":")
                if kind == "attn":
                    self._show_attention_edge(src, dst)
                elif kind in ("ffn_in", "ffn_out"):
                    self._show_ffn(dst if dst.startswith("M") else src)
                else:
                    self._show_residual(dst)
        except DetailsUnavailableError:
            try:
                self._show_stored_detail(sel)
            except Exception as exc:  # noqa: BLE001 - a stored file's oddity is a message, not a dead session
                log.exception("viewer: stored detail failed")
                self.show_error(f"{prefix} {sel}: {type(exc).__name__}: {exc}")
        except ValueError as exc:
            self.show_error(f"{prefix} {sel}: {exc}")
        except Exception as exc:  # noqa: BLE001
            log.exception("viewer: selection failed")
            self.show_error(f"{prefix} {sel}: {type(exc).__name__}: {exc}")
        ms = (time.perf_counter() - t0) * 1000
        self.detail["ms"] = ms
        self._update_link()

    def _edge_weight(self, kind: str, src: str, dst: str) -> float | None:
        if self.layout is None:
            return None
        e = self.layout.edges
        for k, a, b, w in zip(e["kind"], e["src"], e["dst"], e["weight"]):
            if k == kind and a == src and b == dst:
                return w
        return None

    def _show_residual(self, name: str) -> None:
        g = self.graph
        kind, layer, pos = parse_node(name)
        normalize = bool(self.w_norm.value)
        top = self._details(g.live.top_tokens, name, k=10, normalize=normalize)
        pred = g.predecessor(name)
        parts = [f'<div class="rs-detail" data-kind="residual" data-node="{_esc(name)}">'
                 f"<b>Residual node {_esc(name)}</b> ({_esc({'X': 'embedding', 'A': 'after attention', 'I': 'after layer'}[kind])}"
                 f" L{layer}, token {_tok(g.tokens[pos])} at position {pos})<br>"
                 f"Top tokens{' (normalized)' if normalize else ''}, rank change against {_esc(pred or 'nothing')}:"
                 f"{tokens_table(top, 'rs-top-tokens')}"]
        self.detail = {"kind": "residual", "node": name, "top": top}
        if kind != "X":
            what = "attn_out" if kind == "A" else ("block" if g.parallel else "mlp_out")
            block = {"attn_out": "attention block", "mlp_out": "FFN block", "block": "layer"}[what]
            prom = self._details(g.live.promoted, what, layer, pos, k=10, normalize=normalize)
            parts.append(promoted_html(f"Tokens the incoming {block} promoted and suppressed", prom, "rs-block-promoted"))
            self.detail["promoted"] = prom
            self.detail["promoted_what"] = what
        parts.append("</div>")
        self.detail_html.object = "".join(parts)
        self.sub_html.object = ""
        self.maps.objects = []
        self.w_head.visible = False
        self.w_neuron.visible = False

    def _show_attention_edge(self, src: str, dst: str) -> None:
        g = self.graph
        _, layer, tgt = parse_node(dst)
        _, _, source = parse_node(src)
        heads = np.asarray(self._details(g.live.head_contributions, layer, tgt, source), float)
        order = np.argsort(-heads)
        w = self._edge_weight("attn", src, dst)
        rows = [["all heads", f"{heads.sum():.4f}"]] + [[f"head {h}", f"{heads[h]:.4f}"] for h in order]
        attrs = [{"head": -1, "value": f"{heads.sum():.6f}"}] + [{"head": int(h), "value": f"{heads[h]:.6f}"} for h in order]
        self.detail = {"kind": "attention", "layer": layer, "target": tgt, "source": source, "heads": heads}
        self.detail_html.object = (
            f'<div class="rs-detail" data-kind="attention" data-edge="{_esc(src)}:{_esc(dst)}"><b>Attention edge '
            f'{_esc(src)} \u2192 {_esc(dst)}</b>'
            f" (layer {layer}, from {_tok(g.tokens[source])} at {source} to {_tok(g.tokens[tgt])} at {tgt})"
            f"{'' if w is None else f'; route weight {w:.4f}'}<br>Heads ranked by contribution c_attn[{tgt}, {source}, h]:"
            f"{_table(rows, ['head', 'contribution'], 'rs-heads', attrs)}</div>")
        opts = {"all heads": -1}
        opts.update({f"head {h} ({heads[h]:.3f})": int(h) for h in order})
        self.w_head.options = opts
        want = self.state.head if self.state.head in opts.values() else -1
        self.w_neuron.visible = False
        self.w_head.visible = True
        if self.w_head.value != want:
            self.w_head.value = want  # triggers _on_sub_choice
        else:
            self._show_head(want)

    def _show_head(self, head: int) -> None:
        g = self.graph
        d = self.detail
        layer, tgt, source = d["layer"], d["target"], d["source"]
        normalize = bool(self.w_norm.value)
        h = None if head < 0 else int(head)
        if h is None:
            pats, cons = self._details(g.live.attention_maps, layer)  # every head, in one pass
            pattern = pats.mean(axis=0)
            contrib = cons.sum(axis=0)
            title = f"L{layer} all heads"
            at_pos = self._details(g.live.promoted, "attn_out", layer, tgt, k=10, normalize=normalize)
            at_label = f"Whole attention block L{layer} at position {tgt}"
        else:
            pattern, contrib = self._details(g.live.attention_maps, layer, h)
            title = f"L{layer} head {h}"
            at_pos = self._details(g.live.promoted, "head", layer, tgt, head=h, k=10, normalize=normalize)
            at_label = f"Head {h} of L{layer} at position {tgt}"
        edge = self._details(g.live.promoted, "edge", layer, tgt, head=h, source=source, k=10, normalize=normalize)
        d.update(head=head, pattern=pattern, contrib=contrib, head_promoted=at_pos, edge_promoted=edge)
        self.sub_html.object = (f'<div class="rs-head-detail" data-head="{int(head)}">'
                                + promoted_html(at_label, at_pos, "rs-head-promoted")
                                + promoted_html(f"This edge's vector ({'all heads' if h is None else f'head {h}'}, "
                                                f"source {source})", edge, "rs-edge-promoted") + "</div>")
        toks = [display_token(t) for t in g.tokens]
        self.maps.objects = [
            pn.pane.Bokeh(heatmap_figure(pattern, f"Attention {title}" + (" (mean)" if h is None else ""),
                                         "source", "target", "rs-attn-map", toks, toks)),
            pn.pane.Bokeh(heatmap_figure(contrib, f"Contribution {title}" + (" (sum)" if h is None else ""),
                                         "source", "target", "rs-contrib-map", toks, toks, palette="Magma256")),
        ]

    def _show_ffn(self, name: str) -> None:
        g = self.graph
        _, layer, pos = parse_node(name)
        normalize = bool(self.w_norm.value)
        neurons = self._details(g.live.neurons, layer, pos, 20)
        block = self._details(g.live.promoted, "mlp_out", layer, pos, k=10, normalize=normalize)
        rows = [[n["neuron"], f"{n['contribution']:.4f}", f"{n['activation']:.3f}"] for n in neurons]
        attrs = [{"neuron": n["neuron"], "contribution": f"{n['contribution']:.6f}"} for n in neurons]
        self.detail = {"kind": "ffn", "node": name, "layer": layer, "pos": pos, "neurons": neurons, "promoted": block}
        self.detail_html.object = (
            f'<div class="rs-detail" data-kind="ffn" data-node="{_esc(name)}"><b>FFN block {_esc(name)}</b> (layer {layer}, '
            f"token {_tok(g.tokens[pos])} at {pos})<br>Top neurons by contribution:"
            f"{_table(rows, ['neuron', 'contribution', 'activation'], 'rs-neurons', attrs)}"
            + promoted_html("Tokens the FFN block promoted and suppressed", block, "rs-block-promoted") + "</div>")
        opts = {f"neuron {n['neuron']} ({n['contribution']:.3f})": int(n["neuron"]) for n in neurons}
        self.w_neuron.options = opts
        want = self.state.neuron if self.state.neuron in opts.values() else (neurons[0]["neuron"] if neurons else -1)
        self.w_head.visible = False
        self.w_neuron.visible = True
        self.maps.objects = []
        if self.w_neuron.value != want:
            self.w_neuron.value = want
        else:
            self._show_neuron(want)

    def _show_neuron(self, neuron: int) -> None:
        g = self.graph
        d = self.detail
        if neuron < 0:
            self.sub_html.object = ""
            return
        prom = self._details(g.live.promoted, "neuron", d["layer"], d["pos"], neuron=int(neuron), k=10,
                             normalize=bool(self.w_norm.value))
        act = next((n["activation"] for n in d["neurons"] if n["neuron"] == neuron), None)
        d.update(neuron=neuron, neuron_promoted=prom)
        self.sub_html.object = (f'<div class="rs-neuron-detail" data-neuron="{int(neuron)}">'
                                + promoted_html(f"Neuron {neuron} (activation {act:.3f}; vector = activation \u00d7 "
                                                "W_out row, sign respected)" if act is not None else f"Neuron {neuron}",
                                                prom, "rs-neuron-promoted") + "</div>")

    def _on_sub_choice(self, what: str, value: int) -> None:
        if value is None or self.graph is None:
            return
        try:
            if what == "head" and self.detail.get("kind") == "attention":
                self.state.head = int(value)
                self._show_head(int(value))
            elif what == "neuron" and self.detail.get("kind") == "ffn":
                self.state.neuron = int(value)
                self._show_neuron(int(value))
        except Exception as exc:  # noqa: BLE001
            self.show_error(f"{what}: {type(exc).__name__}: {exc}")
        self._update_link()

    def _show_stored_detail(self, sel: str) -> None:
        """Stored graphs carry contributions but no activations: show what the edge set knows."""
        g = self.graph
        parts = [f'<div class="rs-detail" data-kind="stored"><b>{_esc(sel)}</b><br>This graph was loaded from a '
                 "results file: token readings need the live model (run the prompt live to see them).<br>"]
        if sel.startswith("edge:attn:"):
            _, _, src, dst = sel.split(":")
            _, layer, tgt = parse_node(dst)
            _, _, source = parse_node(src)
            hp = g.head_parts(layer, tgt, source)
            rows = [[f"head {p['head']}", f"{p['weight']:.4f}"] for p in hp]
            parts.append("Stored head parts (c \u2265 tau_min):" + _table(rows, ["head", "contribution"], "rs-heads"))
        elif sel.startswith("node:") and self.layout is not None:
            name = sel[5:]
            e = self.layout.edges
            rows = [[f"{a}", k, f"{w:.4f}"] for a, b, k, w in zip(e["src"], e["dst"], e["kind_label"], e["weight"])
                    if b == name]
            parts.append("Incoming route edges:" + _table(rows, ["from", "kind", "weight"], "rs-incoming"))
        parts.append("</div>")
        self.detail = {"kind": "stored", "sel": sel}
        self.detail_html.object = "".join(parts)
        self.sub_html.object = ""
        self.maps.objects = []
        self.w_head.visible = False
        self.w_neuron.visible = False

    # ----------------------------------------------------------------------------- stored results
    def open_results(self, configured: str = "", relative: str = "") -> list[str]:
        """List the stored graphs of a results directory (configured, or relative to a data dir)."""
        self.clear_error()
        self._stored = {}
        try:
            if relative:
                if "/" not in relative.strip("/"):
                    root_name, rel = relative, ""
                else:
                    root_name, rel = relative.split("/", 1)
                root = find_root(self.cfg.data_dirs, root_name)
                folder = safe_path(root, rel) if rel else root
            elif configured:
                if configured.isdigit() and int(configured) < len(self.cfg.results):  # the Select's value
                    folder = self.cfg.results[int(configured)]
                else:
                    folder = Path(configured)
                    if folder not in self.cfg.results:
                        raise UnsafePathError("results directory is not configured")
            else:
                raise ValueError("choose a results directory")
            shown = printable(relative or folder.name)
            if not folder.is_dir():
                raise FileNotFoundError(f"results directory {shown!r} does not exist")
            files, skipped = [], []
            for p in sorted(list(folder.glob("*.msgpack")) + list(folder.glob("*/*.msgpack"))):
                rel_p = p.relative_to(folder).as_posix()
                if not is_utf8_name(rel_p):
                    skipped.append((printable(rel_p), "the file name is not valid UTF-8"))
                    continue
                try:
                    safe_path(folder, rel_p)
                except UnsafePathError as exc:  # symlinks pointing out are refused
                    skipped.append((rel_p, str(exc)))
                    continue
                files.append(rel_p)
            if not files:
                raise FileNotFoundError(f"results directory {shown!r} holds no .msgpack graphs")
        except (ValueError, OSError) as exc:
            self.w_files.options = []
            self.importance.objects = []
            self.show_error(f"Results: {exc}")
            return []
        self._results_folder = folder
        self.w_files.options = [""] + files
        self._set_status("results", f"{len(files)} stored graphs in {printable(folder.name)}", files=len(files))
        try:
            self._show_importance(files, skipped)
        except Exception as exc:  # noqa: BLE001 - odd files are a message, not a dead session
            log.exception("viewer: head importance failed")
            self.show_error(f"Results: {type(exc).__name__}: {exc}")
        return files

    def _show_importance(self, files: list[str], skipped: list[tuple[str, str]] = ()) -> None:
        from routescope.cluster.graph import FlowGraph

        graphs, bad, why = [], [], list(skipped)
        for f in files[:500]:
            try:
                graphs.append(FlowGraph.load(safe_path(self._results_folder, f)))
            except Exception as exc:  # noqa: BLE001 - corrupt files are reported, not fatal
                bad.append(f)
                why.append((f, f"{type(exc).__name__}: {exc}"))
        self._stored = {"graphs": graphs, "bad": bad, "errors": why}
        if not graphs:
            first = f": {why[0][0]}: {why[0][1][:300]}" if why else ""
            self.show_error(f"Results: none of the {len(files)} graphs could be read (corrupt files?){first}")
            return
        tau = float(self.w_tau.value)
        try:
            imp = head_importance(graphs, tau, self._mode())
        except ValueError as exc:  # graphs of models of different shapes in one folder
            self.show_error(f"Results: {exc}")
            return
        self._stored["importance"] = imp
        fig = heatmap_figure(imp.T, f"Head importance over {len(graphs)} prompts (tau {tau:.3f})", "layer", "head",
                             "rs-importance", palette="Viridis256", height=260, width=420)
        note = ""
        if why:
            items = "".join(f'<li data-file="{_esc(f)}">{_esc(f)}: {_esc(w[:300])}</li>' for f, w in why[:20])
            note = (f'<div class="rs-results-errors" data-count="{len(why)}"><i>{len(why)} unreadable file(s) '
                    f"skipped:</i><ul style=\"margin:2px 0;padding-left:18px;font-size:12px\">{items}</ul></div>")
        self.importance.objects = [pn.pane.HTML(f'<div class="rs-importance" data-prompts="{len(graphs)}">'
                                                f"<b>Dataset head importance</b> {note}</div>"), pn.pane.Bokeh(fig)]

    def open_stored(self, rel: str) -> None:
        from routescope.cluster.graph import FlowGraph

        self.clear_error()
        try:
            path = safe_path(self._results_folder, rel)
            graph = FlowGraph.load(path)
        except Exception as exc:  # noqa: BLE001 - corrupt or missing file
            self.show_error(f"Stored graph {rel!r} cannot be read: {type(exc).__name__}: {exc}")
            return
        prompt = graph.prompt if isinstance(graph.prompt, str) else ""
        try:
            self.state.param.update(source="stored", result=printable(f"{self._results_folder.name}/{rel}"),
                                    prompt=printable(prompt))
            self.set_graph(graph, None)
        except Exception as exc:  # noqa: BLE001 - a file that loads but cannot be drawn
            log.exception("viewer: stored graph cannot be shown")
            self.show_error(f"Stored graph {rel!r} cannot be shown: {type(exc).__name__}: {exc}")

    # ----------------------------------------------------------------------------- export
    def _export_json(self):
        import io

        if self.graph is None:
            return io.BytesIO(b"{}")
        d = {"model": self.graph.model, "prompt": self.graph.prompt, "tokens": self.graph.tokens,
             "tau": float(self.w_tau.value), "mode": self._mode(), "targets": self.targets(),
             "edges": self.route_edges.records()}
        return io.BytesIO(json.dumps(d, indent=1).encode())

    def _export_svg(self):
        import io

        return io.BytesIO(route_svg(self.layout).encode() if self.layout is not None else b"<svg/>")

    # ----------------------------------------------------------------------------- URL state
    def apply_query(self, query: dict[str, str]) -> bool:
        """Set widgets from a URL query; returns whether a live run should start.

        A malformed value (tau not a number or outside (0, 1), head/neuron not an integer, a model
        not offered) is one error message and runs nothing; targets and selection are checked
        against the traced graph (``apply_pending``)."""
        if query.get("model"):
            try:
                self.w_model.value = self.cfg.model(query["model"]).name
            except ValueError as exc:  # a model this viewer does not offer: say so and run nothing
                self.show_error(f"Link: {exc}")
                return False
        if query.get("tau"):
            try:  # a wrong link says so and runs nothing
                tau = float(query["tau"])
            except ValueError:
                self.show_error(f"Link: tau: {query['tau']!r} is not a number")
                return False
            try:
                check_tau(tau, 0.0)
            except ValueError as exc:
                self.show_error(f"Link: {exc}")
                return False
            self.w_tau.value = min(max(round(tau / 0.005) * 0.005, 0.01), 0.10)
        for key in ("head", "neuron"):
            if key in query:
                text = query[key].strip()
                if not re.fullmatch(r"-?[0-9]{1,9}", text):
                    self.show_error(f"Link: {key}: {query[key]!r} is not an integer")
                    return False
        if query.get("renormalize") == "false":
            self.w_renorm.value = False
        self._pending = {k: query[k] for k in ("targets", "sel", "head", "neuron") if k in query}
        prompt = query.get("prompt", "")
        if not prompt:
            return False
        if self.cfg.demo_mode and prompt not in self.allowed_prompts():
            return False
        if len(prompt) > self.cfg.prompt_chars_limit:
            self.show_error(f"Link: prompt: {len(prompt)} characters exceeds this viewer's limit of "
                            f"{self.cfg.prompt_chars_limit} characters")
            return False
        self.w_prompt.value = prompt
        return True

    def apply_pending(self) -> None:
        """The link's targets, head/neuron and selection, once its graph is traced."""
        p = self._pending
        self._pending = {}
        if not p or self.graph is None:
            return
        if p.get("targets"):
            try:
                spec = parse_targets(p["targets"])
                targets = check_targets(range(self.graph.n_tokens) if spec == "all" else spec, self.graph.n_tokens)
            except ValueError as exc:
                self.show_error(f"Link: {exc}")
                return
            self.set_targets("all" if spec == "all" else targets)
        head, neuron = int(p.get("head", -1)), int(p.get("neuron", -1))  # checked by apply_query
        if p.get("sel"):
            try:
                sel = parse_selection(p["sel"], self.graph)
            except ValueError as exc:
                self.show_error(f"Link: {exc}")
                return
            self.state.param.update(sel=sel, head=head, neuron=neuron)
            self.select(sel, prefix="Link")


def _broken_page(exc: BaseException) -> pn.viewable.Viewable:
    """What a visitor gets when the page itself cannot be built: one message, no traceback."""
    return pn.Column("### routescope", pn.pane.HTML(
        '<div class="rs-error" role="alert" style="background:#f8d7da;color:#842029;border:1px solid #f5c2c7;'
        f'border-radius:4px;padding:8px 12px">The viewer could not build this page: {_esc(type(exc).__name__)}: '
        f"{_esc(exc)}</div>", sizing_mode="stretch_width"))


def create_app(config: ViewerConfig, registry: ModelRegistry) -> pn.viewable.Viewable:
    """A new session's page; runs the URL's prompt when the link carries one. Never raises: a
    failure while building the page is shown as one error message (and logged)."""
    try:
        app = ViewerApp(config, registry)
        root = app.panel()
    except Exception as exc:  # noqa: BLE001 - a bad file must never blank the page for everyone
        log.exception("viewer: building a page failed")
        return _broken_page(exc)
    root.routescope_app = app  # tests and notebooks can reach the session
    query = {}
    try:
        args = pn.state.session_args or {}
        query = {str(k): v[0].decode("utf-8", "replace") for k, v in args.items() if v}
    except Exception:  # noqa: BLE001
        pass
    try:
        start_run = bool(query) and app.apply_query(query)
    except Exception as exc:  # noqa: BLE001
        log.exception("viewer: applying a link failed")
        app.show_error(f"Link: {type(exc).__name__}: {exc}")
        start_run = False
    if start_run:
        async def start():
            await app.run(then=app.apply_pending)

        pn.state.onload(start)
    return root


def view(config: ViewerConfig | str | None = None, registry: ModelRegistry | None = None) -> pn.viewable.Viewable:
    """The viewer as a Panel object, for a notebook cell."""
    from .config import load_config

    cfg = config if isinstance(config, ViewerConfig) else load_config(config)
    reg = registry or ModelRegistry.for_config(cfg)
    return create_app(cfg, reg)
