"""Dataset-level statistics (SPEC section 8): which heads and FFN blocks matter, how often.

Definitions (one *prediction* is the output node ``I{L-1}_t`` of one traced position; a job with
``positions="last"`` has one per prompt, with ``"all"`` one per token):

* A head ``(l, h)`` is **important** for a prediction when some stored part
  ``c_attn[t, s, h]`` of layer ``l`` exceeds ``tau`` and its target node ``A{l}_t`` is on the
  prediction's route (``FlowGraph.route``). An FFN ``l`` is important when ``c_ffn[t] > tau`` and
  ``M{l}_t`` is on the route. The **importance frequency** is the share of predictions where it is.
* **Contribution-weighted** importance (``weighted``): the route's flow through the component,
  averaged over predictions. Flow starts as 1 at the output node and is passed down the route,
  each node handing its flow to its surviving incoming edges in proportion to their weights
  (renormalised weights in ``renormalize`` mode, raw in ``plain``; an FFN block passes all of its
  flow to its input). A head's flow is the sum over its important parts of
  ``flow(A{l}_t) * w(part)``, an FFN's is ``flow(M{l}_t)``. In ``renormalize`` mode the flow
  through one layer sums to at most 1, so a head that is on every route but carries little
  (all heads of layer 0, for example) gets a small weight instead of 100%.
* **Previous-token score** of a head: mean over positions of ``pattern[h, t, t-1]``. With a
  BOS token prepended, position 0 is the attention sink and ``t = 1`` (whose previous token is the
  sink) is left out: the mean runs over ``t >= 2``, token-weighted over the dataset (sum over
  all prompts' positions / number of positions). ``prev_token_excl_bos`` is the share of the
  attention *not* parked on BOS that goes to the previous token, a ratio of dataset sums:
  ``sum pattern[t, t-1] / sum_{t, s >= 1} pattern[t, s]`` (a ratio of sums, so positions where a
  head sends almost nothing beyond the sink cannot blow it up).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from routescope.workers.edgeset import EdgeSet, EdgeSetError

from .routes import ATTN, FFN_IN, FFN_OUT, RES_ATTN, RES_FFN, check_tau, threshold

# ================================================================================= per prediction


@dataclass
class Summary:
    """Importance and flow of every head and FFN for the predictions of one prompt."""

    tau: float
    mode: str
    targets: list[int]
    head_important: np.ndarray  # [P, L, H] bool
    head_flow: np.ndarray  # [P, L, H]
    ffn_important: np.ndarray  # [P, L] bool
    ffn_flow: np.ndarray  # [P, L]

    def to_dict(self) -> dict[str, Any]:
        return {"tau": float(self.tau), "mode": self.mode, "targets": [int(t) for t in self.targets],
                "head_important": self.head_important.astype(int).tolist(),
                "head_flow": np.round(self.head_flow, 7).tolist(),
                "ffn_important": self.ffn_important.astype(int).tolist(),
                "ffn_flow": np.round(self.ffn_flow, 7).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Summary":
        return cls(float(d["tau"]), str(d["mode"]), [int(t) for t in d["targets"]],
                   np.asarray(d["head_important"], bool), np.asarray(d["head_flow"], float),
                   np.asarray(d["ffn_important"], bool), np.asarray(d["ffn_flow"], float))


def prediction_summary(es: EdgeSet, tau: float = 0.04, mode: str = "renormalize",
                       targets: Iterable[int] | None = None) -> Summary:
    """Which heads/FFNs are important for the prediction at each of ``targets`` (default: the
    last position), and the route flow through each (see the module docstring)."""
    if es.layer_start != 0 or es.layer_stop != es.n_layers:
        raise ValueError("prediction_summary: the edge set must cover all layers")
    tau = check_tau(tau, es.tau_min)
    L, H, T = es.n_layers, es.n_heads, es.n_tokens
    targets = [T - 1] if targets is None else [int(t) for t in targets]
    for t in targets:
        if not 0 <= t < T:
            raise ValueError(f"target: position {t} outside [0, {T - 1}]")
    P = len(targets)
    edges = threshold(es, tau, mode)  # validates mode
    # Part-level weights of the parts above tau.
    keep = es.head_weight > tau
    p_layer, p_tgt, p_src, p_head = (es.head_layer[keep].astype(np.int64), es.head_target[keep].astype(np.int64),
                                     es.head_source[keep].astype(np.int64), es.head_head[keep].astype(np.int64))
    p_w = es.head_weight[keep].astype(np.float64)
    if mode == "renormalize":
        denom = np.bincount(p_layer * T + p_tgt, weights=p_w, minlength=L * T).reshape(L, T)
        denom = denom + np.where(es.res_attn > tau, es.res_attn, 0.0)
        if es.parallel:
            denom = denom + np.where(es.ffn > tau, es.ffn, 0.0)
        p_w = p_w / np.where(denom > 0, denom, 1.0)[p_layer, p_tgt]
    head_important = np.zeros((P, L, H), bool)
    head_flow = np.zeros((P, L, H))
    ffn_important = np.zeros((P, L), bool)
    ffn_flow = np.zeros((P, L))

    rows = np.arange(P)
    flow = np.zeros((P, T))  # flow of the residual leaving the current layer
    reach = np.zeros((P, T))  # 1 where reachable (an OR, kept as floats)
    flow[rows, targets] = 1.0
    reach[rows, targets] = 1.0
    order = np.argsort(edges.layer, kind="stable")
    bounds = np.searchsorted(edges.layer[order], np.arange(L + 1))
    p_order = np.argsort(p_layer, kind="stable")
    p_bounds = np.searchsorted(p_layer[p_order], np.arange(L + 1))

    def spread(dst_flow, dst_reach, src, dst, w, out_flow, out_reach):
        if len(src):
            np.add.at(out_flow, (slice(None), src), dst_flow[:, dst] * w)
            np.add.at(out_reach, (slice(None), src), dst_reach[:, dst])

    for l in range(L - 1, -1, -1):
        idx = order[bounds[l] : bounds[l + 1]]
        kind, src, dst = edges.kind[idx], edges.source[idx].astype(np.int64), edges.target[idx].astype(np.int64)
        w = edges.weight[idx].astype(np.float64)
        f_m, r_m = np.zeros((P, T)), np.zeros((P, T))
        # FFN block: M{l}_t -> I{l}_t.
        m = kind == FFN_OUT
        f_m[:, dst[m]] += flow[:, dst[m]] * w[m]
        r_m[:, dst[m]] += reach[:, dst[m]]
        r_m = np.minimum(r_m, 1.0)
        f_in, r_in = np.zeros((P, T)), np.zeros((P, T))  # flow of the residual entering the layer
        if es.parallel:
            f_a, r_a = flow, reach  # the attention parts feed I{l} directly
            m = (kind == ATTN) | (kind == RES_ATTN)
            spread(flow, reach, src[m], dst[m], w[m], f_in, r_in)
            m = kind == FFN_IN
            spread(f_m, r_m, src[m], dst[m], np.ones(int(m.sum())), f_in, r_in)
        else:
            f_a, r_a = np.zeros((P, T)), np.zeros((P, T))
            m = kind == RES_FFN
            spread(flow, reach, src[m], dst[m], w[m], f_a, r_a)
            m = kind == FFN_IN
            spread(f_m, r_m, src[m], dst[m], np.ones(int(m.sum())), f_a, r_a)
            r_a = np.minimum(r_a, 1.0)
            m = (kind == ATTN) | (kind == RES_ATTN)
            spread(f_a, r_a, src[m], dst[m], w[m], f_in, r_in)
        ffn_flow[:, l] = f_m.sum(1)
        ffn_important[:, l] = (r_m > 0).any(1)
        pi = p_order[p_bounds[l] : p_bounds[l + 1]]
        if len(pi):
            heads, tgts = p_head[pi], p_tgt[pi]
            contrib = f_a[:, tgts] * p_w[pi]  # [P, parts]
            on = r_a[:, tgts] > 0
            for p in range(P):
                head_flow[p, l] = np.bincount(heads, weights=contrib[p] * on[p], minlength=H)
                head_important[p, l] = np.bincount(heads, weights=on[p].astype(float), minlength=H) > 0
        flow, reach = f_in, np.minimum(r_in, 1.0)
    return Summary(float(tau), mode, targets, head_important, head_flow, ffn_important, ffn_flow)


# ================================================================================= result sets
class Results:
    """A results directory of a dataset job: manifest, per-prompt graphs, summaries, statistics."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not a results directory (no manifest.json)")
        self._cache: dict[int, EdgeSet] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    @property
    def failed(self) -> list[dict[str, Any]]:
        p = self.path / "failed.json"
        return json.loads(p.read_text()) if p.is_file() else []

    @property
    def indexes(self) -> list[int]:
        from .jobs import done_indexes

        return sorted(done_indexes(self.path))

    def __len__(self) -> int:
        return len(self.indexes)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Results({str(self.path)!r}, model={m.get('model')!r}, done={len(self)}, "
                f"failed={len(self.failed)}, status={m.get('status')!r})")

    def edges(self, index: int) -> EdgeSet:
        if index not in self._cache:
            from .jobs import prompt_path

            p = prompt_path(self.path, index)
            if not p.is_file():
                raise KeyError(f"prompt {index} has no result in {self.path}")
            try:
                self._cache[index] = EdgeSet.decode(p.read_bytes())
            except EdgeSetError as exc:
                raise EdgeSetError(f"{p}: {exc}") from None
        return self._cache[index]

    def problems(self) -> dict[int, str]:
        """Prompt files that do not decode to a valid edge set, by index: ``{index: 'path: why'}``.
        The others load as usual; statistics skip these with a warning."""
        out = {}
        for i in self.indexes:
            try:
                self.edges(i)
            except EdgeSetError as exc:
                out[i] = str(exc)
        return out

    def graph(self, index: int):
        """The ``FlowGraph`` of prompt ``index`` (routes; no live details)."""
        from .graph import FlowGraph

        return FlowGraph(self.edges(index))

    def graphs(self) -> Iterator[Any]:
        for i in self.indexes:
            yield self.graph(i)

    def __iter__(self):
        return self.graphs()

    def table(self):
        """One row per traced prompt: index, line, prompt, tokens, top prediction."""
        import pandas as pd

        rows = []
        for i in self.indexes:
            e = self.edges(i).extra
            pred = e.get("prediction") or [{}]
            rows.append({"index": i, "line": e.get("job", {}).get("line"), "prompt": e.get("prompt"),
                         "n_tokens": self.edges(i).n_tokens, "prediction": pred[0].get("token")})
        return pd.DataFrame(rows)

    def summaries(self, tau: float | None = None, mode: str | None = None,
                  positions: str | None = None) -> list[Summary]:
        return [s for s, _ in _summaries_of(self, tau, mode, positions)]

    # conveniences
    def importance(self, **kw):
        return importance(self, **kw)

    def previous_token(self, **kw):
        return previous_token(self, **kw)

    def compare(self, other, **kw):
        return compare(self, other, **kw)

    def heatmap(self, value: str = "frequency", **kw):
        return heatmap(importance(self, tau=kw.pop("tau", None), mode=kw.pop("mode", None)), value, **kw)

    def viewer(self, **kw):
        """A Panel layout of the statistics and per-prompt routes (display it in a notebook)."""
        return panel(self, **kw)

    def serve_command(self) -> str:
        return f"routescope serve --results {self.path}"


def _as_edgesets(source) -> Iterator[tuple[EdgeSet, Any]]:
    from .graph import FlowGraph

    if isinstance(source, (str, os.PathLike)):
        source = Results(source)
    if isinstance(source, Results):
        for i in source.indexes:
            try:
                es = source.edges(i)
            except EdgeSetError as exc:  # reported by name; the rest still counts
                warnings.warn(f"skipping a corrupted result: {exc}", stacklevel=3)
                continue
            yield es, None
        return
    for item in source:
        if isinstance(item, FlowGraph):
            yield item.edges, None
        elif isinstance(item, EdgeSet):
            yield item, None
        elif isinstance(item, Summary):
            yield None, item
        else:
            raise TypeError(f"statistics: cannot read a {type(item).__name__} (use Results, FlowGraph, EdgeSet or Summary)")


def _summaries_of(source, tau, mode, positions) -> Iterator[tuple[Summary, EdgeSet | None]]:
    for es, summ in _as_edgesets(source):
        if es is None:
            if tau is not None and abs(summ.tau - tau) > 1e-12 or mode is not None and summ.mode != mode:
                raise ValueError("statistics: a Summary was computed at another tau/mode")
            yield summ, None
            continue
        stored = es.extra.get("summary")
        pos = positions or es.extra.get("job", {}).get("positions", "last")
        if pos not in ("last", "all"):
            raise ValueError(f"positions: {pos!r} is not 'last' or 'all'")
        targets = [es.n_tokens - 1] if pos == "last" else list(range(es.n_tokens))
        if stored:
            s = Summary.from_dict(stored)
            if ((tau is None or abs(s.tau - tau) < 1e-12) and (mode is None or s.mode == mode)
                    and s.targets == targets):
                yield s, es
                continue
        yield prediction_summary(es, 0.04 if tau is None else tau, mode or "renormalize", targets), es


def _component_frame(head_count, head_flow, ffn_count, ffn_flow, n_pred):
    import pandas as pd

    L, H = head_count.shape
    n = max(n_pred, 1)
    rows = []
    for l in range(L):
        for h in range(H):
            rows.append({"component": f"L{l}H{h}", "kind": "head", "layer": l, "head": h,
                         "count": int(head_count[l, h]), "n_predictions": n_pred,
                         "frequency": head_count[l, h] / n, "weighted": head_flow[l, h] / n})
    for l in range(L):
        rows.append({"component": f"FFN{l}", "kind": "ffn", "layer": l, "head": -1,
                     "count": int(ffn_count[l]), "n_predictions": n_pred,
                     "frequency": ffn_count[l] / n, "weighted": ffn_flow[l] / n})
    df = pd.DataFrame(rows)
    for col, rank in (("frequency", "rank"), ("weighted", "weighted_rank")):
        df[rank] = df.groupby("kind")[col].rank(ascending=False, method="min").astype(int)
    return df


def importance(source, *, tau: float | None = None, mode: str | None = None, positions: str | None = None):
    """Per head and per FFN layer: ``count``, ``frequency`` (share of predictions where it is
    important), ``weighted`` (mean route flow) and their ranks within heads / within FFNs.

    ``source``: a ``Results`` (or its path), or a list of ``FlowGraph`` / ``EdgeSet`` /
    ``Summary``. ``tau``/``mode`` default to the job's (stored summaries); other values are
    recomputed from the stored edge sets (any ``tau >= tau_min``).
    """
    head_count = head_flow = ffn_count = ffn_flow = None
    n_pred = 0
    for s, _ in _summaries_of(source, tau, mode, positions):
        if head_count is None:
            L, H = s.head_important.shape[1:]
            head_count, head_flow = np.zeros((L, H)), np.zeros((L, H))
            ffn_count, ffn_flow = np.zeros(L), np.zeros(L)
        elif s.head_important.shape[1:] != head_count.shape:
            raise ValueError("statistics: result sets of models of different shapes")
        head_count += s.head_important.sum(0)
        head_flow += s.head_flow.sum(0)
        ffn_count += s.ffn_important.sum(0)
        ffn_flow += s.ffn_flow.sum(0)
        n_pred += len(s.targets)
    if head_count is None:
        raise ValueError("statistics: no predictions (the result set is empty)")
    return _component_frame(head_count, head_flow, ffn_count, ffn_flow, n_pred)


def compare(a, b, *, labels: Sequence[str] = ("a", "b"), tau: float | None = None, mode: str | None = None,
            positions: str | None = None):
    """Importance of every component in two result sets (e.g. code vs prose).

    Columns ``frequency_<a>``, ``frequency_<b>``, ``difference`` (a - b), ``ratio`` (a / b:
    ``inf`` when only ``a`` is non-zero, NaN when both are zero), and the same for ``weighted``.
    Sorted by ``difference``, largest first.
    """
    la, lb = labels
    ta = importance(a, tau=tau, mode=mode, positions=positions)
    tb = importance(b, tau=tau, mode=mode, positions=positions)
    if len(ta) != len(tb):
        raise ValueError("compare: result sets of models of different shapes")
    keys = ["component", "kind", "layer", "head"]
    df = ta[keys].copy()
    for col in ("frequency", "weighted"):
        x, y = ta[col].to_numpy(float), tb[col].to_numpy(float)
        prefix = "" if col == "frequency" else "weighted_"
        df[f"{col}_{la}"] = x
        df[f"{col}_{lb}"] = y
        df[f"{prefix}difference"] = x - y
        with np.errstate(divide="ignore", invalid="ignore"):
            df[f"{prefix}ratio"] = np.where(y > 0, x / np.where(y > 0, y, 1), np.where(x > 0, np.inf, np.nan))
    df["n_predictions_" + la] = ta["n_predictions"].to_numpy()
    df["n_predictions_" + lb] = tb["n_predictions"].to_numpy()
    return df.sort_values(["difference", "weighted_difference"], ascending=False, kind="stable").reset_index(drop=True)


def previous_token(source, *, tau: float | None = None, mode: str | None = None, positions: str | None = None):
    """Per head: previous-token scores (see module docstring), their ranks, and the head's
    importance frequency / weighted importance with their ranks among all heads."""
    raw = nobos = None
    count = 0
    graphs = []
    for es, _ in _as_edgesets(source):
        if es is None:
            raise TypeError("previous_token: needs edge sets with attention sums, not Summaries")
        att = es.extra.get("attention")
        if not att:
            raise ValueError("previous_token: results without attention sums (job run with attention=False)")
        if raw is None:
            raw, nobos = np.zeros((es.n_layers, es.n_heads)), np.zeros((es.n_layers, es.n_heads))
        raw += np.asarray(att["prev_sum"], float)
        nobos += np.asarray(att["nonsink_sum"], float)
        count += int(att["count"])
        graphs.append(es)
    if raw is None:
        raise ValueError("statistics: no predictions (the result set is empty)")
    imp = importance(graphs, tau=tau, mode=mode, positions=positions)
    df = imp[imp.kind == "head"].drop(columns=["kind"]).reset_index(drop=True)
    df = df.rename(columns={"rank": "importance_rank"})
    c = max(count, 1)
    df["prev_token"] = raw.reshape(-1) / c if count else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        df["prev_token_excl_bos"] = np.where(nobos.reshape(-1) > 0, raw.reshape(-1) / nobos.reshape(-1), np.nan)
    df["n_positions"] = count
    df["prev_rank"] = df["prev_token"].rank(ascending=False, method="min").astype(int)
    df["prev_rank_excl_bos"] = df["prev_token_excl_bos"].rank(ascending=False, method="min", na_option="bottom").astype(int)
    return df


# ================================================================================= plots
def head_matrix(table, value: str = "frequency") -> np.ndarray:
    """The ``[layers, heads]`` matrix of one column of an importance/compare/previous-token table."""
    t = table[table["head"] >= 0] if "head" in table else table
    L, H = int(t["layer"].max()) + 1, int(t["head"].max()) + 1
    m = np.full((L, H), np.nan)
    m[t["layer"].to_numpy(int), t["head"].to_numpy(int)] = t[value].to_numpy(float)
    return m


def heatmap(table, value: str = "frequency", *, ax=None, title: str | None = None, cmap: str | None = None,
            annotate_top: int = 0):
    """A layer x head heatmap of ``value`` (matplotlib); returns the Axes."""
    import matplotlib.pyplot as plt

    m = head_matrix(table, value)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.45 * m.shape[1] + 1.5), max(3.0, 0.22 * m.shape[0] + 1)))
    diverging = "difference" in value
    finite = m[np.isfinite(m)]
    if diverging:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        im = ax.imshow(m, aspect="auto", cmap=cmap or "RdBu_r", vmin=-lim or -1, vmax=lim or 1, origin="lower")
    else:
        im = ax.imshow(np.where(np.isfinite(m), m, np.nan), aspect="auto", cmap=cmap or "viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(m.shape[1]))
    ax.set_title(title or value)
    ax.figure.colorbar(im, ax=ax, fraction=0.05)
    if annotate_top:
        flat = np.where(np.isfinite(m), m, -np.inf).reshape(-1)
        for k in np.argsort(-flat)[:annotate_top]:
            ax.text(k % m.shape[1], k // m.shape[1], "*", ha="center", va="center", color="red")
    return ax


def plot_overview(source, *, tau: float | None = None, mode: str | None = None):
    """A figure: importance frequency, weighted importance, previous-token score, FFN bars."""
    import matplotlib.pyplot as plt

    imp = importance(source, tau=tau, mode=mode)
    try:
        prev = previous_token(source, tau=tau, mode=mode)
    except (ValueError, TypeError):
        prev = None
    n = 4 if prev is not None else 3
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 5.5))
    heatmap(imp, "frequency", ax=axes[0], title="importance frequency")
    heatmap(imp, "weighted", ax=axes[1], title="contribution-weighted")
    if prev is not None:
        heatmap(prev, "prev_token", ax=axes[2], title="previous-token score", cmap="magma")
    ffn = imp[imp.kind == "ffn"]
    ax = axes[-1]
    ax.barh(ffn["layer"], ffn["frequency"], color="lightgray", label="frequency")
    ax.barh(ffn["layer"], ffn["weighted"], color="tab:blue", label="weighted")
    ax.set_xlabel("FFN importance")
    ax.set_ylabel("layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def panel(results: "Results | str", *, tau: float | None = None, mode: str | None = None):
    """The stored-results view: statistics heatmaps, tables, and the route of a chosen prompt."""
    import matplotlib.pyplot as plt
    import panel as pn

    res = results if isinstance(results, Results) else Results(results)
    fig = plot_overview(res, tau=tau, mode=mode)
    plt.close(fig)
    imp = importance(res, tau=tau, mode=mode)
    heads = imp[imp.kind == "head"].sort_values("weighted", ascending=False).head(20)
    try:
        prev = previous_token(res, tau=tau, mode=mode).sort_values("prev_token", ascending=False).head(20)
    except (ValueError, TypeError):
        prev = None
    prompts = res.table()
    options = {f"{r['index']}: {str(r['prompt'])[:60]}": int(r["index"]) for _, r in prompts.iterrows()}
    select = pn.widgets.Select(name="prompt", options=options)
    m = res.manifest

    def route_table(index):
        g = res.graph(index)
        t = m.get("options", {}).get("tau", 0.04) if tau is None else tau
        import pandas as pd

        return pn.pane.DataFrame(pd.DataFrame(g.route(t, mode or m.get("options", {}).get("mode", "renormalize"))
                                              .records()), max_rows=40)

    header = pn.pane.Markdown(
        f"### {res.path.name}: {m.get('model')} ({len(res)} prompts, {len(res.failed)} failed, "
        f"status {m.get('status')})")
    return pn.Column(
        header, pn.pane.Matplotlib(fig, tight=True, dpi=80),
        pn.Row(pn.Column("#### heads by weighted importance", pn.pane.DataFrame(heads, index=False)),
               *([pn.Column("#### previous-token heads", pn.pane.DataFrame(prev, index=False))] if prev is not None else [])),
        select, pn.bind(route_table, select),
    )
