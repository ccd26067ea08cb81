"""Dataset statistics (SPEC section 8) on hand-made result sets, checked against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from routescope.cluster.jobs import previous_token_sums
from routescope.cluster.stats import Summary, compare, head_matrix, importance, prediction_summary, previous_token
from routescope.workers.edgeset import EdgeSet
from routescope.workers.schema import TraceMeta


def make_edgeset(trace: TraceMeta | None = None) -> EdgeSet:
    """L=2 layers, H=2 heads, T=3 tokens, sequential blocks; every node's parts sum to 1.

    layer 1: t=2: (s2,h0) .5, (s1,h1) .3, (s0,h1) .05, res .15 | t=1: (s0,h0) .9, res .1 | t=0: (s0,h1) .5, res .5
    layer 0: t=2: (s2,h1) .6, res .4 | t=1: (s0,h1) .7, res .3 | t=0: (s0,h0) .2, res .8
    ffn = [[.5, .05, .3], [.2, .2, .4]], res_ffn = 1 - ffn
    """
    parts = [  # layer, target, source, head, weight
        (1, 2, 2, 0, .5), (1, 2, 1, 1, .3), (1, 2, 0, 1, .05), (1, 1, 0, 0, .9), (1, 0, 0, 1, .5),
        (0, 2, 2, 1, .6), (0, 1, 0, 1, .7), (0, 0, 0, 0, .2),
    ]
    edges: dict[tuple[int, int, int], float] = {}
    for l, t, s, h, w in parts:
        edges[(l, t, s)] = edges.get((l, t, s), 0.0) + w
    ffn = np.array([[.5, .05, .3], [.2, .2, .4]])
    col = lambda rows, i: [r[i] for r in rows]  # noqa: E731
    e = sorted((k + (v,) for k, v in edges.items()))
    return EdgeSet(
        model="hand", n_layers=2, n_heads=2, n_tokens=3, layer_start=0, layer_stop=2, parallel=False, norm="l1",
        tau_min=0.01, head_layer=col(parts, 0), head_target=col(parts, 1), head_source=col(parts, 2),
        head_head=col(parts, 3), head_weight=col(parts, 4), edge_layer=col(e, 0), edge_target=col(e, 1),
        edge_source=col(e, 2), edge_weight=col(e, 3), res_attn=[[.8, .3, .4], [.5, .1, .15]], ffn=ffn,
        res_ffn=1 - ffn, trace=trace or TraceMeta(),
    ).validate()


def test_summary_renormalize_last_position_by_hand():
    s = prediction_summary(make_edgeset(), tau=0.1, mode="renormalize")
    assert s.targets == [2]
    # layer 0 head 0 only has a part at t=0, which no route reaches; (1,2,0,1) .05 is below tau.
    assert s.head_important[0].tolist() == [[False, True], [True, True]]
    np.testing.assert_allclose(s.head_flow[0], [[0, 0.6 / 0.95], [0.5 / 0.95, 0.3 / 0.95]], atol=1e-6)
    assert s.ffn_important[0].tolist() == [True, True]
    np.testing.assert_allclose(s.ffn_flow[0], [0.195 / 0.95, 0.4], atol=1e-6)


def test_summary_plain_by_hand():
    s = prediction_summary(make_edgeset(), tau=0.1, mode="plain")
    assert s.head_important[0].tolist() == [[False, True], [True, True]]
    # plain: raw weights; layer 0 A-flow = [0, .3*.95, .65*.7 + .65*.3]
    np.testing.assert_allclose(s.head_flow[0], [[0, 0.285 * 0.7 + 0.65 * 0.6], [0.5, 0.3]], atol=1e-6)
    np.testing.assert_allclose(s.ffn_flow[0], [0.65 * 0.3, 0.4], atol=1e-6)


def test_summary_all_positions_by_hand():
    s = prediction_summary(make_edgeset(), tau=0.1, mode="renormalize", targets=[0, 1, 2])
    assert s.head_important.tolist() == [
        [[True, False], [False, True]],  # t=0
        [[True, False], [True, False]],  # t=1: res .1 is not > tau, so (s0,h0) .9 renormalises to 1
        [[False, True], [True, True]],  # t=2
    ]
    np.testing.assert_allclose(s.head_flow[0], [[0.2, 0], [0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(s.head_flow[1], [[0.2, 0], [1.0, 0]], atol=1e-6)
    np.testing.assert_allclose(s.ffn_flow[:2], [[0.5, 0.2], [0.5, 0.2]], atol=1e-6)
    assert s.ffn_important.all()


def test_summary_agrees_with_routes():
    """SPEC 8: "a component (head (l, h), or FFN l) is important for a prediction when its part
    exceeds tau on that prediction's route": a part > tau whose own attention edge
    (layer, target, source) is an edge of the route (an FFN: its edge M{l}_t -> I{l}_t)."""
    from routescope.cluster.graph import FlowGraph
    from routescope.cluster.routes import ATTN, FFN_OUT

    es = make_edgeset()
    for mode in ("renormalize", "plain"):
        for tau in (0.04, 0.1, 0.35):
            for t in range(3):
                r = FlowGraph(es).route(tau, mode, [t])
                on = {(int(l), int(d), int(s)) for l, d, s, k in zip(r.layer, r.target, r.source, r.kind) if k == ATTN}
                want = np.zeros((2, 2), bool)
                for l, tt, ss, h, w in zip(es.head_layer, es.head_target, es.head_source, es.head_head, es.head_weight):
                    if w > tau and (int(l), int(tt), int(ss)) in on:
                        want[l, h] = True
                got = prediction_summary(es, tau, mode, [t])
                assert got.head_important[0].tolist() == want.tolist(), (mode, tau, t)
                ffn = np.zeros(2, bool)
                ffn[r.layer[r.kind == FFN_OUT]] = True
                assert got.ffn_important[0].tolist() == ffn.tolist(), (mode, tau, t)


def test_summary_roundtrip_and_tau_check():
    s = prediction_summary(make_edgeset(), tau=0.1)
    back = Summary.from_dict(s.to_dict())
    assert back.head_important.tolist() == s.head_important.tolist()
    np.testing.assert_allclose(back.head_flow, s.head_flow, atol=1e-6)
    with pytest.raises(ValueError, match="tau_min"):
        prediction_summary(make_edgeset(), tau=0.001)
    with pytest.raises(ValueError, match="mode"):
        prediction_summary(make_edgeset(), tau=0.1, mode="sideways")


def _summary(important: list[list[list[int]]], flow=None, ffn=None) -> Summary:
    imp = np.asarray(important, bool)
    P, L, H = imp.shape
    return Summary(0.04, "renormalize", list(range(P)), imp,
                   np.asarray(flow, float) if flow is not None else imp * 0.5,
                   np.asarray(ffn, bool) if ffn is not None else np.ones((P, L), bool), np.full((P, L), 0.25))


def test_importance_frequency_by_hand():
    a = [_summary([[[1, 0], [0, 1]], [[1, 0], [0, 0]]]), _summary([[[1, 1], [0, 0]]], ffn=[[0, 1]]),
         _summary([[[0, 0], [0, 0]]], flow=[[[0, 0], [0, 0]]])]
    t = importance(a)
    heads = t[t.kind == "head"].set_index("component")
    # 4 predictions: L0H0 in 3, L0H1 in 1, L1H0 in 0, L1H1 in 1
    assert heads.loc["L0H0", "count"] == 3 and heads.loc["L0H0", "frequency"] == 0.75
    assert heads.loc["L0H1", "frequency"] == 0.25 and heads.loc["L1H0", "frequency"] == 0
    assert heads.loc["L1H1", "frequency"] == 0.25
    assert heads.loc["L0H0", "weighted"] == pytest.approx(1.5 / 4)  # 3 predictions x .5 flow
    assert heads.loc["L0H0", "rank"] == 1 and heads.loc["L0H1", "rank"] == 2 and heads.loc["L1H1", "rank"] == 2
    assert heads.loc["L1H0", "rank"] == 4
    ffn = t[t.kind == "ffn"].set_index("layer")
    assert ffn.loc[0, "frequency"] == 0.75 and ffn.loc[1, "frequency"] == 1.0
    assert ffn.loc[1, "weighted"] == pytest.approx(0.25)
    assert (t.n_predictions == 4).all()
    m = head_matrix(t, "frequency")
    assert m.tolist() == [[0.75, 0.25], [0.0, 0.25]]


def test_compare_by_hand():
    a = [_summary([[[1, 0], [0, 1]], [[1, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]])]  # 4 predictions
    b = [_summary([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])]  # 2 predictions
    c = compare(a, b, labels=("code", "prose")).set_index("component")
    assert c.loc["L0H0", "frequency_code"] == 0.75 and c.loc["L0H0", "frequency_prose"] == 0.5
    assert c.loc["L0H0", "difference"] == pytest.approx(0.25) and c.loc["L0H0", "ratio"] == pytest.approx(1.5)
    assert c.loc["L1H1", "difference"] == pytest.approx(0.25) and c.loc["L1H1", "ratio"] == math.inf
    assert math.isnan(c.loc["L0H1", "ratio"]) and c.loc["L0H1", "difference"] == 0
    assert c.loc["L0H0", "weighted_difference"] == pytest.approx(0.75 * 0.5 - 0.5 * 0.5)
    # sorted by difference, largest first
    assert list(c["difference"]) == sorted(c["difference"], reverse=True)


class FakeGraph:
    """What ``previous_token_sums`` reads from a live graph: shape and per-head attention maps."""

    def __init__(self, patterns: np.ndarray):
        self.patterns = patterns  # [L, H, T, T]
        self.n_layers, self.n_heads, self.n_tokens = patterns.shape[:3]
        self.is_live = False

    def attention_maps(self, layer, head):
        return self.patterns[layer, head], None


def _pattern(rows):
    return np.array(rows, float)


def test_previous_token_scores_by_hand():
    # one layer, two heads, T=4; head 0 is a previous-token head, head 1 parks on BOS.
    h0 = _pattern([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.8, 0, 0], [0.4, 0, 0.6, 0]])
    h1 = _pattern([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.9, 0.05, 0.05, 0], [0.7, 0.1, 0.1, 0.1]])
    p1 = np.stack([h0, h1])[None]  # [1, 2, 4, 4]
    s1 = previous_token_sums(FakeGraph(p1), bos_sink=True)
    assert s1["count"] == 2  # t = 2, 3 (t = 1 attends to the sink as its previous token)
    np.testing.assert_allclose(s1["prev_sum"], [[0.8 + 0.6, 0.05 + 0.1]])
    np.testing.assert_allclose(s1["nonsink_sum"], [[0.8 + 0.6, 0.1 + 0.3]])  # attention beyond position 0
    s_nobos = previous_token_sums(FakeGraph(p1), bos_sink=False)
    assert s_nobos["count"] == 3
    np.testing.assert_allclose(s_nobos["prev_sum"], [[0.5 + 0.8 + 0.6, 0.9 + 0.05 + 0.1]])
    # a second prompt, T=3: one counted position
    h0b = _pattern([[1, 0, 0], [1, 0, 0], [0.5, 0.1, 0.4]])
    h1b = _pattern([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    s2 = previous_token_sums(FakeGraph(np.stack([h0b, h1b])[None]), bos_sink=True)
    assert s2["count"] == 1

    def es_with(att):
        # a 1-layer, 2-head edge set carrying the attention sums (routes: everything flows through head 0)
        return EdgeSet(model="hand", n_layers=1, n_heads=2, n_tokens=1, layer_start=0, layer_stop=1, parallel=False,
                       norm="l1", tau_min=0.01, head_layer=[0], head_target=[0], head_source=[0], head_head=[0],
                       head_weight=[0.7], edge_layer=[0], edge_target=[0], edge_source=[0], edge_weight=[0.7],
                       res_attn=[[0.3]], ffn=[[0.5]], res_ffn=[[0.5]], trace=TraceMeta(attention=att))

    t = previous_token([es_with(s1), es_with(s2)]).set_index("component")
    assert t.loc["L0H0", "prev_token"] == pytest.approx((1.4 + 0.1) / 3)
    assert t.loc["L0H1", "prev_token"] == pytest.approx((0.15 + 0.3) / 3)
    assert t.loc["L0H0", "prev_token_excl_bos"] == pytest.approx((1.4 + 0.1) / (1.4 + 0.5))
    assert t.loc["L0H1", "prev_token_excl_bos"] == pytest.approx((0.15 + 0.3) / (0.4 + 0.8))
    assert t.loc["L0H0", "prev_rank"] == 1 and t.loc["L0H1", "prev_rank"] == 2
    assert t.loc["L0H0", "frequency"] == 1.0 and t.loc["L0H1", "frequency"] == 0.0
    assert t.loc["L0H0", "importance_rank"] == 1 and t.loc["L0H1", "importance_rank"] == 2
    assert (t["n_positions"] == 3).all()


def test_statistics_reject_empty_and_missing_attention():
    with pytest.raises(ValueError, match="empty"):
        importance([])
    with pytest.raises(ValueError, match="attention"):
        previous_token([make_edgeset()])


def test_heatmap_and_overview(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from routescope.viewer.stats_view import heatmap, plot_overview

    t = importance([make_edgeset(), make_edgeset()])
    ax = heatmap(t, "weighted", annotate_top=2)
    assert ax.get_xlabel() == "head" and ax.images[0].get_array().shape == (2, 2)
    c = compare([make_edgeset()], [make_edgeset()])
    ax = heatmap(c, "difference")
    assert ax.images
    fig = plot_overview([make_edgeset()])  # no attention sums: no previous-token panel
    titles = [a.get_title() for a in fig.axes]
    assert "importance frequency" in titles and "contribution-weighted" in titles
    assert "previous-token score" not in titles
