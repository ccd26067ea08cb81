"""The real SmolLM2-135M weights: predictions, routes, invariants where numbers must mean something."""

from __future__ import annotations

import numpy as np
import pytest

from routescope.workers import reference

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def paris(smollm2):
    return smollm2.trace(PROMPT)


def test_predicts_paris(paris):
    assert paris.tokens[0] == "<|im_start|>"  # BOS prepended by default
    assert paris.live.prediction()[0]["token"] == " Paris"


def test_route_reaches_embedding_and_grows_as_tau_falls(paris):
    last = f"I{paris.n_layers - 1}_{paris.n_tokens - 1}"
    r04 = paris.route(0.04)
    assert len(r04) > 0
    src, dst = r04.node_names()
    assert last in dst
    assert any(s.startswith("X0_") for s in src)
    r06 = paris.route(0.06)
    e04 = {(a, b, k) for a, b, k in zip(*r04.node_names(), r04.kind.tolist())}
    e06 = {(a, b, k) for a, b, k in zip(*r06.node_names(), r06.kind.tolist())}
    assert e06 <= e04 and len(e06) < len(e04)
    plain = paris.route(0.04, "plain")
    assert 0 < len(plain)


def test_matches_naive_reference_on_real_weights(smollm2, smollm2_checkpoint, paris):
    bridge = reference.load_bridge(smollm2_checkpoint.path)
    cache = reference.capture(bridge, paris.token_ids)
    for l in (0, 7, 15, 29):
        ref = reference.layer_contributions(bridge, cache, l, "l1")
        c_attn = ref.c_attn
        got = np.zeros_like(c_attn)
        m = paris.edges.head_layer == l
        got[paris.edges.head_target[m], paris.edges.head_source[m], paris.edges.head_head[m]] = paris.edges.head_weight[m]
        assert np.abs(got - np.where(c_attn >= 0.01, c_attn, 0)).max() <= 1e-5
        assert np.abs(paris.edges.res_attn[l] - ref.c_res_attn).max() <= 1e-5
        assert np.abs(paris.edges.ffn[l] - ref.c_ffn).max() <= 1e-5
        total, _ = reference.attention_parts_sum(bridge, cache, l)
        attn_out = cache[f"blocks.{l}.hook_attn_out"]  # SmolLM2 has no b_O
        assert (total - attn_out).abs().max() <= 1e-4 * attn_out.abs().max()


def test_detail_readings(paris, smollm2):
    last = paris.n_tokens - 1
    top = paris.live.top_tokens(f"I29_{last}", k=5)
    assert top[0]["token"] == " Paris" and top[0]["rank"] == 0 and "rank_change" in top[0]
    raw = paris.live.top_tokens(f"I29_{last}", k=5, normalize=False)
    assert [t["id"] for t in raw] != [] and raw[0]["score"] != top[0]["score"]
    assert paris.predecessor(f"A3_{last}") == f"I2_{last}"
    assert paris.predecessor(f"I3_{last}") == f"A3_{last}"
    heads = paris.live.head_contributions(10, last)
    assert heads.shape == (last + 1, 9)
    stored = paris.head_parts(10, last)
    for part in stored:
        assert abs(heads[part["source"], part["head"]] - part["weight"]) < 1e-6
    pattern, cmap = paris.live.attention_maps(10, 3)
    assert pattern.shape == cmap.shape == (paris.n_tokens, paris.n_tokens)
    assert np.allclose(pattern.sum(1), 1, atol=1e-5) and np.allclose(np.triu(cmap, 1), 0)
    neurons = paris.live.neurons(20, last, k=10)
    assert len(neurons) == 10 and neurons[0]["contribution"] >= neurons[-1]["contribution"]
    promo = paris.live.promoted("mlp_out", 20, last, k=5)
    assert len(promo["promoted"]) == 5 and promo["promoted"][0]["score"] > promo["suppressed"][0]["score"]
    # One head's output at a position is the sum of its edge vectors over sources.
    import torch

    from routescope.workers.details import Component

    head = paris.live.component_vector(Component("head", 10, last, head=2))
    edges = sum(paris.live.component_vector(Component("edge", 10, last, head=2, source=s)) for s in range(last + 1))
    assert torch.allclose(head, edges, atol=1e-4)
    n = neurons[0]["neuron"]
    vec = paris.live.component_vector(Component("neuron", 20, last, neuron=n))
    assert vec.shape == (576,)


def test_evicted_run_is_recomputed_transparently(smollm2):
    g = smollm2.trace("Water boils at")
    expected = g.live.top_tokens(f"A5_{g.n_tokens - 1}", k=3)
    for client in smollm2.clients:
        client.drop_runs([g.live.run_id])  # as an eviction from the stage's cache would
        assert not client.has_run(g.live.run_id)
    assert g.live.top_tokens(f"A5_{g.n_tokens - 1}", k=3) == expected


def test_export_json_networkx_and_msgpack(paris, tmp_path):
    import json

    from routescope.cluster.graph import DetailsUnavailableError, FlowGraph

    js = paris.save(tmp_path / "g.json")
    doc = json.loads(js.read_text())
    assert doc["tokens"][-1] == " is" and len(doc["edges"]) == len(paris.route(0.04))
    nx_graph = paris.to_networkx(0.04)
    assert nx_graph.number_of_edges() == len({(a, b) for a, b in zip(*paris.route(0.04).node_names())})
    path = paris.save(tmp_path / "g.msgpack")
    back = FlowGraph.load(path)
    assert back.tokens == paris.tokens
    assert back.route(0.04).records() == paris.route(0.04).records()
    with pytest.raises(DetailsUnavailableError):
        back.live.top_tokens("I29_5")
