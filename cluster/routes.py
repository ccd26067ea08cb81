"""Thresholds and routes over a merged edge set (SPEC sections 5-6), vectorised with numpy.

Nodes are ``X0_t`` (embedding), ``A{l}_t`` (residual after attention), ``M{l}_t`` (FFN block)
and ``I{l}_t`` (residual after layer ``l``). Parallel attention+FFN blocks have no ``A`` node:
their attention, residual and FFN parts all flow into ``I{l}_t``, and the FFN block ``M{l}_t``
reads from the layer's input residual. Every step below is an array operation over all edges
of a layer at once; the only Python loop is over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from routescope.workers.edgeset import EdgeSet
from routescope.workers.schema import (ATTN, FFN_IN, FFN_OUT, KIND_NAMES, MODES, RES_ATTN, RES_FFN, Mode,
                                       check_choice, node_names, parse_node, residual_node, source_node,
                                       source_nodes, target_node, target_nodes)

__all__ = ["ATTN", "RES_ATTN", "FFN_IN", "FFN_OUT", "RES_FFN", "KIND_NAMES", "MODES", "Mode", "Edges",
           "parse_node", "residual_node", "source_node", "target_node", "check_tau", "threshold", "route",
           "parse_targets", "check_targets"]


@dataclass
class Edges:
    """A set of graph edges as columns: kind, layer, source position, target position, weight."""

    kind: np.ndarray
    layer: np.ndarray
    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    parallel: bool

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def subset(self, mask: np.ndarray) -> "Edges":
        return Edges(self.kind[mask], self.layer[mask], self.source[mask], self.target[mask], self.weight[mask],
                     self.parallel)

    def source_nodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(node kind, layer, position)`` integer columns of the edges' source nodes."""
        code, layer = source_nodes(self.kind, self.layer, self.parallel)
        return code, layer, np.asarray(self.source, np.int64)

    def target_nodes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(node kind, layer, position)`` integer columns of the edges' target nodes."""
        code, layer = target_nodes(self.kind, self.layer, self.parallel)
        return code, layer, np.asarray(self.target, np.int64)

    def node_names(self) -> tuple[list[str], list[str]]:
        """``(sources, targets)`` as SPEC node names, e.g. ``("I3_2", "A4_5")``."""
        return node_names(*self.source_nodes()), node_names(*self.target_nodes())

    def records(self) -> list[dict]:
        """One dict per edge (for JSON export and display)."""
        src, dst = self.node_names()
        return [
            {"source": s, "target": d, "weight": float(w), "kind": KIND_NAMES[int(k)], "layer": int(l)}
            for s, d, w, k, l in zip(src, dst, self.weight, self.kind, self.layer)
        ]


def check_tau(tau: float, tau_min: float) -> float:
    tau = float(tau)
    if not np.isfinite(tau) or not 0 < tau < 1:
        raise ValueError(f"tau: {tau} must be a number in (0, 1)")
    if tau < tau_min - 1e-12:
        raise ValueError(f"tau: {tau} is below this graph's tau_min {tau_min}; retrace with a lower tau_min")
    return tau


@dataclass
class RenormalizedParts:
    """Renormalize mode at one ``tau`` (SPEC section 6): every part ``c <= tau`` dropped and the
    survivors of each target node divided by their own sum. Arrays ``[layers, T]`` are indexed by
    the edge set's layers from ``layer_start``."""

    keep: np.ndarray  # over the stored head parts: c > tau
    node: np.ndarray  # attention target node of each kept part, (layer - layer_start) * T + target
    raw: np.ndarray  # weight of each kept part as stored
    denom: np.ndarray  # [layers, T] sum of the survivors into each attention node (1 where none survive)
    res_attn: np.ndarray  # [layers, T] renormalised residual part of each attention node
    ffn: np.ndarray  # [layers, T] renormalised c_ffn: of I{l}_t in parallel blocks, else of its FFN node
    res_ffn: np.ndarray  # [layers, T] renormalised c_res_ffn (0 in parallel blocks)

    @property
    def head_weight(self) -> np.ndarray:
        """Renormalised weight of each kept head part (float64)."""
        return self.raw / self.denom.reshape(-1)[self.node]


def renormalized_parts(es: EdgeSet, tau: float) -> RenormalizedParts:
    """The parts of ``es`` that survive ``tau`` in renormalize mode, with their renormalised weights."""
    tau = check_tau(tau, es.tau_min)
    n_layers, n_tok = es.layer_stop - es.layer_start, es.n_tokens
    keep = es.head_weight > tau
    w = es.head_weight[keep]
    node = (es.head_layer[keep].astype(np.int64) - es.layer_start) * n_tok + es.head_target[keep]
    denom = np.bincount(node, weights=w, minlength=n_layers * n_tok).reshape(n_layers, n_tok)
    w_res = np.where(es.res_attn > tau, es.res_attn, 0.0)
    denom = denom + w_res
    w_ffn = np.where(es.ffn > tau, es.ffn, 0.0)
    if es.parallel:
        denom = denom + w_ffn
    safe = np.where(denom > 0, denom, 1.0)
    w_res = w_res / safe
    if es.parallel:
        w_ffn = w_ffn / safe
        w_res_ffn = np.zeros_like(w_ffn)
    else:
        w_res_ffn = np.where(es.res_ffn > tau, es.res_ffn, 0.0)
        ffn_denom = w_ffn + w_res_ffn
        ffn_safe = np.where(ffn_denom > 0, ffn_denom, 1.0)
        w_ffn, w_res_ffn = w_ffn / ffn_safe, w_res_ffn / ffn_safe
    return RenormalizedParts(keep, node, w, safe, w_res, w_ffn, w_res_ffn)


def threshold(es: EdgeSet, tau: float, mode: Mode = "renormalize") -> Edges:
    """Every edge of the graph that survives ``tau`` in ``mode`` (SPEC section 6)."""
    tau = check_tau(tau, es.tau_min)
    check_choice("mode", mode, MODES)
    n_layers, n_tok = es.layer_stop - es.layer_start, es.n_tokens
    res_attn, ffn, res_ffn = es.res_attn, es.ffn, es.res_ffn
    layer_idx = np.broadcast_to(np.arange(es.layer_start, es.layer_stop)[:, None], (n_layers, n_tok))
    pos_idx = np.broadcast_to(np.arange(n_tok)[None, :], (n_layers, n_tok))
    if mode == "plain":
        keep = es.edge_weight > tau
        attn = (es.edge_layer[keep], es.edge_source[keep], es.edge_target[keep], es.edge_weight[keep])
        w_res, w_ffn, w_res_ffn = (np.where(x > tau, x, 0.0) for x in (res_attn, ffn, res_ffn))
    else:
        rn = renormalized_parts(es, tau)
        w_res, w_ffn, w_res_ffn = rn.res_attn, rn.ffn, rn.res_ffn
        # Head parts -> one edge per (layer, target, source): sum the raw parts, then divide once
        # by the node's sum.
        key = rn.node * n_tok + es.head_source[rn.keep]
        uniq, inverse = np.unique(key, return_inverse=True)
        sums = np.bincount(inverse, weights=rn.raw, minlength=uniq.shape[0])
        e_node, e_src = uniq // n_tok, uniq % n_tok
        e_layer, e_tgt = e_node // n_tok + es.layer_start, e_node % n_tok
        attn = (e_layer, e_src, e_tgt, sums / rn.denom.reshape(-1)[e_node])
    cols = [_cols(ATTN, *attn)]
    for kind, weights in ((RES_ATTN, w_res), (FFN_IN, w_ffn), (FFN_OUT, w_ffn), (RES_FFN, w_res_ffn)):
        m = weights > 0
        cols.append(_cols(kind, layer_idx[m], pos_idx[m], pos_idx[m], weights[m]))
    return Edges(*(np.concatenate(c) for c in zip(*cols)), parallel=es.parallel)


def _cols(kind: int, layer, source, target, weight):
    n = len(layer)
    return (np.full(n, kind, np.uint8), np.asarray(layer, np.int32), np.asarray(source, np.int32),
            np.asarray(target, np.int32), np.asarray(weight, np.float32))


def parse_targets(text: str | None) -> list[int] | str | None:
    """Target positions written as ``N``, ``N,M`` or ``all`` (CLI flags, viewer links); None stays None."""
    if text is None or text == "all":
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"target: {text!r} is not N, N,M or 'all'") from None


def check_targets(targets: Iterable[int], n_tok: int) -> list[int]:
    """``targets`` as ints, each a position of a ``n_tok``-token prompt (else ``ValueError``)."""
    targets = [int(t) for t in targets]
    for t in targets:
        if not 0 <= t < n_tok:
            raise ValueError(f"target: position {t} outside [0, {n_tok - 1}]")
    return targets


def route(es: EdgeSet, targets: Iterable[int] | None = None, tau: float = 0.04,
          mode: Mode = "renormalize", edges: Edges | None = None) -> Edges:
    """Surviving edges from which an output node ``I{L-1}_t`` of ``targets`` is reachable.

    The search runs top-down, one layer at a time, over boolean reachability arrays.
    ``targets`` defaults to the last position; pass several (or ``range(T)``) for a union.
    """
    n_tok = es.n_tokens
    targets = [n_tok - 1] if targets is None else check_targets(targets, n_tok)
    if es.layer_start != 0 or es.layer_stop != es.n_layers:
        raise ValueError("route: the edge set must cover all layers (merge the stages first)")
    all_edges = threshold(es, tau, mode) if edges is None else edges
    n_layers = es.n_layers
    # reach_res[l]: residual entering layer l (l = n_layers is the output I{L-1}).
    reach_res = np.zeros((n_layers + 1, n_tok), bool)
    reach_mid = np.zeros((n_layers, n_tok), bool)  # A{l}
    reach_ffn = np.zeros((n_layers, n_tok), bool)  # M{l}
    reach_res[n_layers, targets] = True
    in_route = np.zeros(len(all_edges), bool)
    order = np.argsort(all_edges.layer, kind="stable")
    bounds = np.searchsorted(all_edges.layer[order], np.arange(n_layers + 1))
    for l in range(n_layers - 1, -1, -1):
        idx = order[bounds[l] : bounds[l + 1]]
        kind, src, dst = all_edges.kind[idx], all_edges.source[idx], all_edges.target[idx]
        out = reach_res[l + 1]
        # Into I{l}: the FFN block, and (sequential) the residual from A{l} / (parallel) attention parts.
        hit = (kind == FFN_OUT) & out[dst]
        reach_ffn[l, dst[hit]] = True
        in_route[idx[hit]] = True
        if es.parallel:
            hit = ((kind == ATTN) | (kind == RES_ATTN)) & out[dst]
            in_route[idx[hit]] = True
            reach_res[l, src[hit]] = True
            hit = (kind == FFN_IN) & reach_ffn[l][dst]
            in_route[idx[hit]] = True
            reach_res[l, src[hit]] = True
        else:
            hit = (kind == RES_FFN) & out[dst]
            in_route[idx[hit]] = True
            reach_mid[l, src[hit]] = True
            hit = (kind == FFN_IN) & reach_ffn[l][dst]
            in_route[idx[hit]] = True
            reach_mid[l, src[hit]] = True
            hit = ((kind == ATTN) | (kind == RES_ATTN)) & reach_mid[l][dst]
            in_route[idx[hit]] = True
            reach_res[l, src[hit]] = True
    return all_edges.subset(in_route)
