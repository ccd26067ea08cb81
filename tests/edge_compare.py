"""Comparing edge sets and routes computed by different processes or batch shapes.

Two traces of one prompt are the same computation only when they run the same kernels on the
same shapes. Across batch shapes (a prompt alone vs. left-padded in a batch) or processes (a Ray
actor with one thread vs. the driver with two) the matmuls reduce in another order, so float32
results differ by rounding. A contribution is a ratio of L1 norms over ``d_model`` coordinates of
vectors built from one or two matmuls; each of those reductions has a relative error of a few
float32 ulps times the square root of its length, so contributions (in [0, 1]) differ by up to a
few 1e-6 (1.01e-6 was seen). ``FLOAT32_ATOL`` = 1e-5, about 80 ulps at 1.0, bounds that with
margin while still catching any real error (a wrong term moves a contribution by 1e-3 or more).

Sparse columns keep parts ``>= tau_min``: a part that rounds to either side of ``tau_min`` is
kept by one trace and not the other. Such a part is allowed only when it sits within the
tolerance of ``tau_min``. Routes are compared at thresholds no weight lies near, for the same
reason (``stable_tau``).
"""

from __future__ import annotations

import numpy as np

FLOAT32_ATOL = 1e-5  # float32 contributions across batch shapes or processes (see the docstring)
HEAD_KEY = ("head_layer", "head_target", "head_source", "head_head")
EDGE_KEY = ("edge_layer", "edge_target", "edge_source")
DENSE = ("res_attn", "ffn", "res_ffn")


def assert_edge_sets_equal(ea, eb) -> None:
    """Bit-identical columns: the same computation (e.g. one model split into other stages)."""
    for col in HEAD_KEY + EDGE_KEY + ("head_weight", "edge_weight") + DENSE:
        assert np.array_equal(getattr(ea, col), getattr(eb, col)), col


def _parts(edges, key_cols, weight_col) -> dict[tuple[int, ...], float]:
    keys = np.stack([getattr(edges, c).astype(np.int64) for c in key_cols], 1)
    return {tuple(k): float(w) for k, w in zip(keys.tolist(), getattr(edges, weight_col))}


def assert_edge_sets_close(ea, eb, atol: float = FLOAT32_ATOL) -> None:
    """``ea`` and ``eb`` hold the same contributions up to float32 rounding (module docstring)."""
    assert (ea.n_layers, ea.n_tokens, ea.n_heads, ea.parallel, ea.norm, ea.tau_min) == \
        (eb.n_layers, eb.n_tokens, eb.n_heads, eb.parallel, eb.norm, eb.tau_min)
    assert (ea.layer_start, ea.layer_stop) == (eb.layer_start, eb.layer_stop)
    for col in DENSE:
        a, b = getattr(ea, col), getattr(eb, col)
        assert a.shape == b.shape, col
        assert np.abs(a - b).max(initial=0) <= atol, (col, float(np.abs(a - b).max()))
    for key_cols, wcol in ((HEAD_KEY, "head_weight"), (EDGE_KEY, "edge_weight")):
        pa, pb = _parts(ea, key_cols, wcol), _parts(eb, key_cols, wcol)
        assert len(pa) > 0 and len(pb) > 0, wcol
        for k in pa.keys() & pb.keys():
            assert abs(pa[k] - pb[k]) <= atol, (wcol, k, pa[k], pb[k])
        for k in pa.keys() ^ pb.keys():  # kept on one side only: must sit on the tau_min boundary
            w = pa.get(k, pb.get(k))
            assert abs(w - ea.tau_min) <= atol, (wcol, k, w, ea.tau_min)
        assert len(pa.keys() ^ pb.keys()) <= max(2, len(pa) // 100), wcol  # a boundary effect, not a drift


def stable_tau(graphs, tau: float, margin: float = 10 * FLOAT32_ATOL) -> float:
    """``tau``, or the middle of the nearest gap between the graphs' stored weights when one lies
    within ``margin`` of it (rounding could put that edge on either side of the threshold, which
    both modes apply to the stored weights)."""
    cols = ("head_weight", "edge_weight") + DENSE
    weights = np.unique(np.concatenate([getattr(g.edges, c).ravel() for g in graphs for c in cols]))
    if not np.any(np.abs(weights - tau) <= margin):
        return tau
    points = np.concatenate([[tau / 2], weights[(weights > tau / 2) & (weights < 2 * tau)], [2 * tau]])
    gaps = np.diff(points)
    mids = points[:-1] + gaps / 2
    ok = gaps > 2 * margin
    return float(mids[ok][np.argmin(np.abs(mids[ok] - tau))])


def assert_same_routes(ga, gb, taus=(0.04, 0.1), modes=("renormalize",), atol: float = FLOAT32_ATOL) -> None:
    """Equal route edges (same nodes, weights within ``atol``) at thresholds no weight is near."""
    for tau in taus:
        tau = stable_tau([ga, gb], tau)
        for mode in modes:
            _same_route(ga.route(tau, mode, targets="all"), gb.route(tau, mode, targets="all"), tau, atol)


def _same_route(ra, rb, tau: float, atol: float) -> None:
    ia, ib = (np.lexsort((r.target, r.source, r.layer, r.kind)) for r in (ra, rb))
    for col in ("kind", "layer", "source", "target"):
        assert np.array_equal(getattr(ra, col)[ia], getattr(rb, col)[ib]), (col, tau)
    assert np.abs(ra.weight[ia] - rb.weight[ib]).max(initial=0) <= atol, tau
