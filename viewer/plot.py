"""Bokeh figures of flow graphs, built by pure functions (testable without a browser).

Layout: tokens left to right (x = position), layers bottom to top. The residual entering layer
``l`` (``X0`` or ``I{l-1}``) sits at ``y = 2l``, ``A{l}`` at ``2l + 1``, ``I{l}`` at ``2l + 2``;
the FFN block ``M{l}`` sits beside its position at ``(t + 0.3, 2l + 1.5)``. Parallel blocks
(no ``A`` node) draw attention straight into ``I{l}`` and ``M{l}`` at ``(t + 0.3, 2l + 1)``.
Only the route's edges and nodes are drawn. Edges are one ``multi_line``, nodes one ``scatter``;
highlights are separate renderers; clicks are hit-tested on the server (:func:`hit_test`).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from routescope.cluster.routes import Edges
from routescope.workers.schema import (A_NODE, ATTN, FFN_IN, FFN_OUT, I_NODE, KIND_NAMES, M_NODE, NODE_KINDS, RES_ATTN,
                                       RES_FFN, X_NODE, node_names, parse_node)

FFN_DX = 0.3
KIND_LABEL = {ATTN: "attention", RES_ATTN: "residual", FFN_IN: "FFN in", FFN_OUT: "FFN out", RES_FFN: "residual"}
# attention edges blue, FFN edges orange, residual edges grey; darker = heavier
_PALETTES = {
    "attn": ("#c6dbef", "#08306b"),
    "ffn": ("#fdd0a2", "#7f2704"),
    "res": ("#d9d9d9", "#252525"),
}


def display_token(tok: str) -> str:
    """A token label with whitespace made visible."""
    return (tok.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
            or "\u2205")


def nodes_xy(code: np.ndarray, layer: np.ndarray, pos: np.ndarray, parallel: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """Plot coordinates of integer node columns (``schema.X_NODE`` ..., layer, position)."""
    layer, pos = np.asarray(layer, float), np.asarray(pos, float)
    is_m = code == M_NODE
    x = pos + np.where(is_m, FFN_DX, 0.0)
    y = np.select([code == X_NODE, code == A_NODE, code == I_NODE],
                  [np.zeros_like(layer), 2.0 * layer + 1, 2.0 * layer + 2], 2.0 * layer + (1.0 if parallel else 1.5))
    return x, y


def node_xy(name: str, parallel: bool = False) -> tuple[float, float]:
    """Plot coordinates of one node given by name (clicks and highlights of a selection)."""
    kind, layer, pos = parse_node(name)
    x, y = nodes_xy(np.array([NODE_KINDS.index(kind)]), np.array([layer]), np.array([pos]), parallel)
    return float(x[0]), float(y[0])


def _mix(a: str, b: str, t: float) -> str:
    ca = [int(a[i : i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{int(round(x + (y - x) * t)):02x}" for x, y in zip(ca, cb))


def edge_color(kind: int, weight: float) -> str:
    group = "attn" if kind == ATTN else "ffn" if kind in (FFN_IN, FFN_OUT) else "res"
    lo, hi = _PALETTES[group]
    return _mix(lo, hi, 0.25 + 0.75 * min(max(float(weight), 0.0), 1.0))


def edge_width(weight: float) -> float:
    return 1.0 + 7.0 * min(max(float(weight), 0.0), 1.0)


@dataclass
class GraphLayout:
    """Everything the graph figure draws, as plain columns."""

    n_layers: int
    n_tokens: int
    parallel: bool
    tokens: list[str]
    edges: dict[str, list] = field(default_factory=dict)
    nodes: dict[str, list] = field(default_factory=dict)
    targets: dict[str, list] = field(default_factory=dict)
    x0: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y0: np.ndarray = field(default_factory=lambda: np.zeros(0))
    x1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y1: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_edges(self) -> int:
        return len(self.edges.get("src", []))

    @property
    def top_y(self) -> float:
        return 2.0 * self.n_layers + 1.2


def build_layout(edges: Edges, tokens: Sequence[str], n_layers: int, targets: Iterable[int]) -> GraphLayout:
    """Columns for the route ``edges`` of a graph with ``tokens`` and ``n_layers`` layers, laid
    out from the edges' integer columns (names are made only as labels)."""
    parallel = bool(edges.parallel)
    s_code, s_layer, s_pos = edges.source_nodes()
    d_code, d_layer, d_pos = edges.target_nodes()
    x0, y0 = nodes_xy(s_code, s_layer, s_pos, parallel)
    x1, y1 = nodes_xy(d_code, d_layer, d_pos, parallel)
    src, dst = node_names(s_code, s_layer, s_pos), node_names(d_code, d_layer, d_pos)
    kinds = [int(k) for k in edges.kind]
    weights = [float(w) for w in edges.weight]
    edge_cols = {
        "xs": np.stack([x0, x1], 1).tolist(),
        "ys": np.stack([y0, y1], 1).tolist(),
        "src": src, "dst": dst,
        "weight": weights,
        "weight_text": [f"{w:.6f}" for w in weights],
        "kind": [KIND_NAMES[k] for k in kinds],
        "kind_label": [KIND_LABEL[k] for k in kinds],
        "layer": [int(l) for l in edges.layer],
        "color": [edge_color(k, w) for k, w in zip(kinds, weights)],
        "width": [edge_width(w) for w in weights],
        "alpha": [0.35 + 0.6 * min(w, 1.0) for w in weights],
    }
    # Nodes on the route (plus the traced output nodes) as unique integer triples, with their
    # summed incoming weight.
    t_list = [int(t) for t in targets]
    out = np.array(t_list, np.int64)
    codes = np.concatenate([s_code, d_code, np.full(len(out), I_NODE)])
    layers = np.concatenate([s_layer, d_layer, np.full(len(out), n_layers - 1)])
    positions = np.concatenate([s_pos, d_pos, out])
    keys = (codes * (n_layers + 1) + layers) * (len(tokens) + 1) + positions
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)  # first-seen order, as the edges list them
    n_edges = len(weights)
    incoming = np.bincount(inverse[n_edges : 2 * n_edges], weights=np.asarray(weights, float), minlength=len(uniq))
    code, layer, pos = codes[first][order], layers[first][order], positions[first][order]
    nx, ny = nodes_xy(code, layer, pos, parallel)
    names = node_names(code, layer, pos)
    labels = {X_NODE: "embedding", A_NODE: "after attention L{}", I_NODE: "after layer L{}", M_NODE: "FFN block L{}"}
    node_cols = {
        "x": nx.tolist(), "y": ny.tolist(), "name": names, "kind": [NODE_KINDS[c] for c in code.tolist()],
        "marker": ["square" if c == M_NODE else "circle" for c in code.tolist()],
        "color": ["#f16913" if c == M_NODE else "#6baed6" if c == A_NODE else "#525252" for c in code.tolist()],
        "size": [11 if c == M_NODE else 9 for c in code.tolist()],
        "token": [display_token(tokens[p]) for p in pos.tolist()],
        "label": [labels[c].format(l) for c, l in zip(code.tolist(), layer.tolist())],
        "incoming": [f"{w:.6f}" for w in incoming[order]],
    }
    tset = set(t_list)
    n_tok = len(tokens)
    top = 2.0 * n_layers + 1.2
    target_cols = {"x": [float(i) for i in range(n_tok)], "y": [top] * n_tok,
                   "pos": list(range(n_tok)), "token": [display_token(t) for t in tokens],
                   "color": ["#d62728" if i in tset else "#bdbdbd" for i in range(n_tok)],
                   "traced": ["yes" if i in tset else "no" for i in range(n_tok)]}
    return GraphLayout(n_layers, n_tok, parallel, list(tokens), edge_cols, node_cols, target_cols, x0, y0, x1, y1)


# --------------------------------------------------------------------------------- hit testing
def _seg_dist(px: float, py: float, x0, y0, x1, y1) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy
    t = np.where(L2 > 0, ((px - x0) * dx + (py - y0) * dy) / np.where(L2 > 0, L2, 1), 0.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(x0 + t * dx - px, y0 + t * dy - py)


def hit_test(layout: GraphLayout, x: float, y: float, px_per_x: float, px_per_y: float,
             node_px: float = 9.0, edge_px: float = 6.0) -> tuple[str, Any] | None:
    """What a click at data point ``(x, y)`` hits, measured in screen pixels.

    Returns ``("target", pos)``, ``("node", name)``, ``("edge", index)`` or ``None``; markers
    and nodes win over edges, the nearest within tolerance wins.
    """
    sx, sy = x * px_per_x, y * px_per_y
    tx = np.asarray(layout.targets.get("x", []), float)
    if tx.size:
        ty = np.asarray(layout.targets["y"], float)
        d = np.hypot(tx * px_per_x - sx, ty * px_per_y - sy)
        i = int(np.argmin(d))
        if d[i] <= node_px + 2:
            return ("target", int(layout.targets["pos"][i]))
    nxs = np.asarray(layout.nodes.get("x", []), float)
    if nxs.size:
        nys = np.asarray(layout.nodes["y"], float)
        d = np.hypot(nxs * px_per_x - sx, nys * px_per_y - sy)
        i = int(np.argmin(d))
        if d[i] <= node_px:
            return ("node", layout.nodes["name"][i])
    if layout.n_edges:
        d = _seg_dist(sx, sy, layout.x0 * px_per_x, layout.y0 * px_per_y, layout.x1 * px_per_x, layout.y1 * px_per_y)
        i = int(np.argmin(d))
        if d[i] <= edge_px:
            return ("edge", i)
    return None


# --------------------------------------------------------------------------------- figures
def graph_figure(layout: GraphLayout, backend: str = "canvas", height: int | None = None, width: int | None = None,
                 sources: dict | None = None):
    """The route figure plus its data sources (edges, nodes, targets, highlight sources).

    Pass the ``sources`` of a previous figure to reuse them (one set of named sources per session)."""
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.plotting import figure

    n_tok, n_layers = layout.n_tokens, layout.n_layers
    height = height or int(min(900, max(420, 26 * n_layers + 120)))
    x_span = max(n_tok, 2)
    fig = figure(name="rs-graph", height=height, sizing_mode="stretch_width", output_backend=backend,
                 tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
                 x_range=Range1d(-0.7 if n_tok <= 48 else n_tok - 48.7, x_span - 0.3),
                 y_range=Range1d(-0.8, layout.top_y + 0.8),
                 toolbar_location="above")
    if width:
        fig.width = width
    if sources:
        sources["edges"].data = layout.edges
        sources["nodes"].data = layout.nodes
        sources["targets"].data = layout.targets
        sources["hl_edges"].data = {"xs": [], "ys": []}
        sources["hl_nodes"].data = {"x": [], "y": [], "marker": []}
    else:
        sources = {
        "edges": ColumnDataSource(layout.edges, name="rs-edges"),
        "nodes": ColumnDataSource(layout.nodes, name="rs-nodes"),
        "targets": ColumnDataSource(layout.targets, name="rs-targets"),
        "hl_edges": ColumnDataSource({"xs": [], "ys": []}, name="rs-hl-edges"),
        "hl_nodes": ColumnDataSource({"x": [], "y": [], "marker": []}, name="rs-hl-nodes"),
        }
    e = fig.multi_line("xs", "ys", source=sources["edges"], line_color="color", line_width="width",
                       line_alpha="alpha", name="rs-edge-renderer")
    fig.multi_line("xs", "ys", source=sources["hl_edges"], line_color="#d62728", line_width=4, line_alpha=0.9)
    nodes = fig.scatter("x", "y", source=sources["nodes"], marker="marker", size="size", fill_color="color",
                        line_color="white", name="rs-node-renderer")
    fig.scatter("x", "y", source=sources["hl_nodes"], marker="marker", size=17, fill_alpha=0,
                line_color="#d62728", line_width=3)
    tg = fig.scatter("x", "y", source=sources["targets"], marker="inverted_triangle", size=13,
                     fill_color="color", line_color="white", name="rs-target-renderer")
    fig.add_tools(HoverTool(renderers=[e], tooltips=[("edge", "@src \u2192 @dst"), ("kind", "@kind_label"),
                                                     ("weight", "@weight_text")], line_policy="nearest"))
    fig.add_tools(HoverTool(renderers=[nodes], tooltips=[("node", "@name"), ("", "@label"), ("token", "@token"),
                                                         ("incoming weight", "@incoming")]))
    fig.add_tools(HoverTool(renderers=[tg], tooltips=[("trace position", "@pos"), ("token", "@token"),
                                                      ("traced", "@traced")]))
    set_axes(fig, layout)
    fig.xgrid.visible = False
    fig.ygrid.grid_line_alpha = 0.25
    fig.toolbar.logo = None
    return fig, sources


def set_axes(fig, layout: GraphLayout, reset_ranges: bool = False) -> None:
    """Token labels, layer ticks (and, for a new graph on an old figure, ranges and height)."""
    n_tok, n_layers = layout.n_tokens, layout.n_layers
    fig.xaxis.ticker = list(range(n_tok))
    fig.xaxis.major_label_overrides = {i: display_token(t) for i, t in enumerate(layout.tokens)}
    fig.xaxis.major_label_orientation = math.pi / 4 if n_tok > 12 else 0
    fig.xaxis.major_label_text_font_size = "11pt"
    y_ticks = [0.0] + [2.0 * l + 1 for l in range(n_layers)]
    fig.yaxis.ticker = y_ticks
    fig.yaxis.major_label_overrides = {0: "emb", **{2 * l + 1: f"L{l}" for l in range(n_layers)}}
    if reset_ranges:
        x_span = max(n_tok, 2)
        fig.x_range.update(start=-0.7 if n_tok <= 48 else n_tok - 48.7, end=x_span - 0.3)
        fig.y_range.update(start=-0.8, end=layout.top_y + 0.8)


def heatmap_figure(matrix: np.ndarray, title: str, x_label: str, y_label: str, name: str,
                   x_ticks: Sequence[str] | None = None, y_ticks: Sequence[str] | None = None,
                   palette: str = "Viridis256", height: int = 300, width: int = 320):
    """A heatmap (rows bottom to top = index 0 up) with exact values in the hover."""
    from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper
    from bokeh.plotting import figure

    m = np.asarray(matrix, float)
    rows, cols = m.shape
    ys, xs = np.mgrid[0:rows, 0:cols]
    src = ColumnDataSource({"x": xs.ravel(), "y": ys.ravel(), "v": m.ravel(),
                            "v_text": [f"{v:.4f}" for v in m.ravel()]}, name=name + "-src")
    vmax = float(np.nanmax(m)) if m.size and np.isfinite(np.nanmax(m)) else 1.0
    mapper = LinearColorMapper(palette=palette, low=0.0, high=max(vmax, 1e-9))
    fig = figure(name=name, title=title, height=height, width=width, tools="hover,save,reset,pan,wheel_zoom",
                 x_range=(-0.5, cols - 0.5), y_range=(-0.5, rows - 0.5), toolbar_location="above")
    fig.rect("x", "y", 1, 1, source=src, fill_color={"field": "v", "transform": mapper}, line_color=None)
    fig.select_one(HoverTool).tooltips = [(x_label, "@x"), (y_label, "@y"), ("value", "@v_text")]
    fig.xaxis.axis_label = x_label
    fig.yaxis.axis_label = y_label
    if x_ticks is not None and len(x_ticks) <= 40:
        fig.xaxis.ticker = list(range(cols))
        fig.xaxis.major_label_overrides = {i: t for i, t in enumerate(x_ticks)}
        fig.xaxis.major_label_orientation = math.pi / 3
    if y_ticks is not None and len(y_ticks) <= 40:
        fig.yaxis.ticker = list(range(rows))
        fig.yaxis.major_label_overrides = {i: t for i, t in enumerate(y_ticks)}
    fig.grid.visible = False
    fig.toolbar.logo = None
    return fig


# --------------------------------------------------------------------------------- export
def route_svg(layout: GraphLayout, px_x: float = 60.0, px_y: float = 22.0, margin: float = 50.0) -> str:
    """A standalone SVG drawing of the route (edges, nodes, token labels)."""
    w = margin * 2 + px_x * max(layout.n_tokens, 1)
    h = margin * 2 + px_y * (layout.top_y + 1)

    def X(x: float) -> float:
        return margin + px_x * (x + 0.5)

    def Y(y: float) -> float:
        return h - margin - px_y * (y + 0.5)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">',
           '<rect width="100%" height="100%" fill="white"/>']
    e = layout.edges
    for i in range(layout.n_edges):
        out.append(f'<line x1="{X(layout.x0[i]):.1f}" y1="{Y(layout.y0[i]):.1f}" x2="{X(layout.x1[i]):.1f}" '
                   f'y2="{Y(layout.y1[i]):.1f}" stroke="{e["color"][i]}" stroke-width="{e["width"][i]:.2f}" '
                   f'stroke-opacity="{e["alpha"][i]:.2f}"><title>{html.escape(e["src"][i])} -&gt; '
                   f'{html.escape(e["dst"][i])} {e["weight"][i]:.6f}</title></line>')
    nd = layout.nodes
    for x, y, name, color, marker in zip(nd.get("x", []), nd.get("y", []), nd.get("name", []), nd.get("color", []),
                                         nd.get("marker", [])):
        if marker == "square":
            out.append(f'<rect x="{X(x) - 5:.1f}" y="{Y(y) - 5:.1f}" width="10" height="10" fill="{color}">'
                       f'<title>{name}</title></rect>')
        else:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4.5" fill="{color}"><title>{name}</title></circle>')
    for i, tok in enumerate(layout.tokens):
        out.append(f'<text x="{X(i):.1f}" y="{h - margin / 3:.1f}" font-size="12" text-anchor="middle" '
                   f'font-family="sans-serif">{html.escape(display_token(tok))}</text>')
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------------- dataset level
def head_importance(graphs: Sequence[Any], tau: float = 0.04, mode: str = "renormalize") -> np.ndarray:
    """``[L, H]`` importance frequency of every head over the predictions at the last position of
    each graph: the share where the head is important (SPEC section 8, defined in ``cluster.stats``).
    Graphs of models of different shapes raise ``ValueError``."""
    from routescope.cluster.stats import head_matrix, importance

    if not graphs:
        return np.zeros((0, 0))
    return head_matrix(importance(graphs, tau=tau, mode=mode, positions="last"), "frequency")
