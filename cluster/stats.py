"""Dataset-level statistics (SPEC section 8): which heads and FFN blocks matter, how often.

Pure functions over results: a ``Results`` (or its path), or a list of ``FlowGraph`` /
``EdgeSet`` / ``Summary``, in; numbers and DataFrames out. Plots and the Panel view of these
numbers are in ``viewer.stats_view``.

Definitions (one *prediction* is the output node ``I{L-1}_t`` of one traced position; a job with
``positions="last"`` has one per prompt, with ``"all"`` one per token):

* A head ``(l, h)`` is **important** for a prediction when one of its parts ``c_attn[t, s, h]``
  of layer ``l`` exceeds ``tau`` and that part's edge ``src(l, s) -> A{l}_t`` is on the
  prediction's route (``FlowGraph.route``; ``-> I{l}_t`` in parallel blocks). An FFN ``l`` is
  important when its edge ``M{l}_t -> I{l}_t`` is on the route (so ``c_ffn[t] > tau``). The
  **importance frequency** is the share of predictions where it is.
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

Sizes come from the files read: before anything is allocated for a result, what its statistics
would allocate is bounded from its declared sizes (tokens, layers, heads, predictions, stored
parts); a result over ``MAX_STATS_BYTES`` (``ROUTESCOPE_STATS_MAX_BYTES``, default 4 GiB) or
with more than ``MAX_COMPONENTS`` heads is refused with a ``StatsSizeError`` naming the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from routescope.workers.edgeset import EdgeSet, EdgeSetError
from routescope.workers.schema import ATTN, FFN_IN, FFN_OUT, RES_ATTN, RES_FFN, check_choice

from .graph import FlowGraph
from .results import Results, prompt_path
from .routes import check_targets, check_tau, renormalized_parts, threshold

if TYPE_CHECKING:
    import pandas as pd

# Which positions of a prompt a job summarises: the last one, or every one.
POSITIONS: tuple[str, ...] = ("last", "all")

# What the statistics of one result may allocate (bytes), and how many heads a model may have
# (layers x heads: the rows of the tables). Real models are far below both: SmolLM2 has 270 heads,
# the largest open models some 10^4.
MAX_STATS_BYTES = int(os.environ.get("ROUTESCOPE_STATS_MAX_BYTES") or 4 << 30)
MAX_COMPONENTS = 1 << 20


class StatsSizeError(ValueError):
    """A result whose statistics would allocate more than the bounds allow."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def stats_bytes(es: EdgeSet, n_targets: int) -> int:
    """An upper estimate of the bytes ``prediction_summary`` allocates for ``es`` and
    ``n_targets`` predictions, from declared sizes only (no array of those sizes is made):
    ten ``[P, T]`` float rows of route flow, ``[P, L, H]`` head flags and flows, and per layer
    ``[P, parts]`` products of the stored head parts of that layer."""
    P, L, H, T = int(n_targets), int(es.n_layers), int(es.n_heads), int(es.n_tokens)
    n_parts = int(es.head_layer.shape[0])
    per_layer = n_parts  # at most every part in one layer; the real maximum when the layers are valid
    if n_parts and es.layer_start <= int(es.head_layer.min()) and int(es.head_layer.max()) < es.layer_stop:
        per_layer = int(np.bincount(es.head_layer.astype(np.int64) - es.layer_start).max())
    return 8 * (10 * P * T + 2 * P * L + 6 * L * T) + 9 * P * L * H + 26 * P * per_layer + 32 * L * H


def check_stats_size(es: EdgeSet, n_targets: int, where: str = "edge set") -> None:
    """``StatsSizeError`` naming ``where`` when statistics over ``es`` would exceed the bounds."""
    L, H, T = int(es.n_layers), int(es.n_heads), int(es.n_tokens)
    if L * H > MAX_COMPONENTS:
        raise StatsSizeError(f"{where}: {L} layers x {H} heads = {L * H} heads exceeds the limit of "
                             f"{MAX_COMPONENTS} for statistics; refused")
    need = stats_bytes(es, n_targets)
    if need > MAX_STATS_BYTES:
        raise StatsSizeError(f"{where}: statistics over {n_targets} predictions of {T} tokens x {L} layers x {H} "
                             f"heads would allocate about {_human(need)}, over the limit of "
                             f"{_human(MAX_STATS_BYTES)} (ROUTESCOPE_STATS_MAX_BYTES); refused")


def prediction_targets(n_tokens: int, positions: str) -> list[int]:
    """The traced positions whose predictions a job with ``positions`` summarises."""
    check_choice("positions", positions, POSITIONS)
    return [n_tokens - 1] if positions == "last" else list(range(n_tokens))


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

    def to_dict(self) -> dict[str, object]:
        return {"tau": float(self.tau), "mode": self.mode, "targets": [int(t) for t in self.targets],
                "head_important": self.head_important.astype(int).tolist(),
                "head_flow": np.round(self.head_flow, 7).tolist(),
                "ffn_important": self.ffn_important.astype(int).tolist(),
                "ffn_flow": np.round(self.ffn_flow, 7).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
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
    targets = [T - 1] if targets is None else check_targets(targets, T)
    P = len(targets)
    check_stats_size(es, P, "prediction_summary")
    edges = threshold(es, tau, mode)  # validates mode
    # The parts above tau, with their weights in this mode.
    keep = es.head_weight > tau
    p_layer, p_tgt, p_src, p_head = (es.head_layer[keep].astype(np.int64), es.head_target[keep].astype(np.int64),
                                     es.head_source[keep].astype(np.int64), es.head_head[keep].astype(np.int64))
    p_w = renormalized_parts(es, tau).head_weight if mode == "renormalize" else es.head_weight[keep].astype(np.float64)
    # A part counts only through its own edge: the attention edge (layer, target, source) that survived.
    attn = edges.kind == ATTN
    p_edge = np.isin((p_layer * T + p_tgt) * T + p_src,
                     (edges.layer[attn].astype(np.int64) * T + edges.target[attn]) * T + edges.source[attn])
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
            on = (r_a[:, tgts] > 0) & p_edge[pi]  # the part's edge enters a node on the route
            for p in range(P):
                head_flow[p, l] = np.bincount(heads, weights=contrib[p] * on[p], minlength=H)
                head_important[p, l] = np.bincount(heads, weights=on[p].astype(float), minlength=H) > 0
        flow, reach = f_in, np.minimum(r_in, 1.0)
    return Summary(float(tau), mode, targets, head_important, head_flow, ffn_important, ffn_flow)


# ================================================================================= over many predictions
# What the statistics read: a results directory (or its path), or graphs, edge sets or summaries.
Source = Results | str | os.PathLike | Iterable[FlowGraph | EdgeSet | Summary]


def _as_edgesets(source: Source) -> Iterator[tuple[EdgeSet | None, Summary | None, str]]:
    """``(edge set, summary, where)`` of every item; ``where`` names it in errors (its file)."""
    if isinstance(source, (str, os.PathLike)):
        source = Results(source)
    if isinstance(source, Results):
        for i in source.indexes:
            try:
                es = source.edges(i)
            except EdgeSetError as exc:  # reported by name; the rest still counts
                warnings.warn(f"skipping a corrupted result: {exc}", stacklevel=3)
                continue
            yield es, None, str(prompt_path(source.path, i))
        return
    for n, item in enumerate(source):
        if isinstance(item, FlowGraph):
            yield item.edges, None, f"item {n} (a FlowGraph)"
        elif isinstance(item, EdgeSet):
            yield item, None, f"item {n} (an EdgeSet)"
        elif isinstance(item, Summary):
            yield None, item, f"item {n} (a Summary)"
        else:
            raise TypeError(f"statistics: cannot read a {type(item).__name__} (use Results, FlowGraph, EdgeSet or Summary)")


def _summaries_of(source: Source, tau: float | None, mode: str | None,
                  positions: str | None) -> Iterator[tuple[Summary, EdgeSet | None]]:
    for es, summ, where in _as_edgesets(source):
        if es is None:
            if tau is not None and abs(summ.tau - tau) > 1e-12 or mode is not None and summ.mode != mode:
                raise ValueError("statistics: a Summary was computed at another tau/mode")
            yield summ, None
            continue
        stored = es.trace.summary
        pos = _checked_positions(es, positions, where)
        targets = prediction_targets(es.n_tokens, pos)
        if stored:
            s = Summary.from_dict(stored)
            if ((tau is None or abs(s.tau - tau) < 1e-12) and (mode is None or s.mode == mode)
                    and s.targets == targets):
                yield s, es
                continue
        yield prediction_summary(es, 0.04 if tau is None else tau, mode or "renormalize", targets), es


def _checked_positions(es: EdgeSet, positions: str | None, where: str) -> str:
    """The positions summarised for ``es`` (``positions``, else its job's), after checking that
    its statistics fit the bounds (``StatsSizeError`` naming ``where``), before any array."""
    job = es.trace.job
    pos = positions or (job.positions if job else "last")
    check_choice("positions", pos, POSITIONS)
    check_stats_size(es, es.n_tokens if pos == "all" else 1, where)
    return pos


def summaries(source: Source, *, tau: float | None = None, mode: str | None = None,
              positions: str | None = None) -> list[Summary]:
    """The ``Summary`` of every prompt of ``source``: the stored one where it was computed at
    ``tau``/``mode``/``positions`` (default: the job's), else recomputed from the edge set."""
    return [s for s, _ in _summaries_of(source, tau, mode, positions)]


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


def importance(source: Source, *, tau: float | None = None, mode: str | None = None,
               positions: str | None = None) -> "pd.DataFrame":
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


def compare(a: Source, b: Source, *, labels: Sequence[str] = ("a", "b"), tau: float | None = None,
            mode: str | None = None, positions: str | None = None) -> "pd.DataFrame":
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


def previous_token(source: Source, *, tau: float | None = None, mode: str | None = None,
                   positions: str | None = None) -> "pd.DataFrame":
    """Per head: previous-token scores (see module docstring), their ranks, and the head's
    importance frequency / weighted importance with their ranks among all heads."""
    raw = nobos = None
    count = 0
    graphs = []
    for es, _, where in _as_edgesets(source):
        if es is None:
            raise TypeError("previous_token: needs edge sets with attention sums, not Summaries")
        _checked_positions(es, positions, where)  # before the [L, H] sums and the importance table
        att = es.trace.attention
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


def head_matrix(table: "pd.DataFrame", value: str = "frequency") -> np.ndarray:
    """The ``[layers, heads]`` matrix of one column of an importance/compare/previous-token table."""
    t = table[table["head"] >= 0] if "head" in table else table
    L, H = int(t["layer"].max()) + 1, int(t["head"].max()) + 1
    m = np.full((L, H), np.nan)
    m[t["layer"].to_numpy(int), t["head"].to_numpy(int)] = t[value].to_numpy(float)
    return m
