"""Mixture-of-experts models (SPEC 4b) against plain Hugging Face tensors: loading from the
per-expert checkpoint layout, residual nodes, the prediction, the block's routed and shared
experts' contributions and one expert's neurons, and 1- vs 2-stage splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_models import MOE_ARCHS, build_moe_model, reference_experts
from edge_compare import assert_edge_sets_equal
from routescope.cluster.pipeline import Pipeline
from routescope.workers.checkpoint import Checkpoint

PROMPT = "The capital of France is Paris and the river"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Per architecture: the checkpoint directory, a one-stage pipeline, the HF model, the graph."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in MOE_ARCHS:
        path = build_moe_model(arch, tmp_path_factory.mktemp(arch) / arch)
        pipe = Pipeline.local(Checkpoint(path, arch))
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        out[arch] = (path, pipe, hf, pipe.trace(PROMPT))
    return out


def _hf_run(hf, ids):
    """HF's hidden states and, per layer, the MoE block's input and output (forward hooks)."""
    blocks, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.register_forward_hook(
            lambda mod, inp, out, i=i: blocks.__setitem__(i, (inp[0][0].detach(), out[0].detach()))))
    try:
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return res, blocks


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_trace_equals_hugging_face(moe, arch):
    _, pipe, hf, g = moe[arch]
    res, blocks = _hf_run(hf, g.token_ids)
    last = g.n_tokens - 1
    assert g.live.prediction()[0]["id"] == int(res.logits[0, -1].argmax())
    for layer in range(g.n_layers - 1):  # HF's last hidden state is after the final norm
        got = g.live.node_vector(f"I{layer}_{last}")
        assert torch.allclose(got, res.hidden_states[layer + 1][0, last], atol=1e-4), layer
    # M{l}_t is the whole MoE output: c_ffn is its share of I{l}_t next to the residual (SPEC 2, 4b)
    for layer in (0, g.n_layers - 1):
        x_in, out = blocks[layer]
        whole = res.hidden_states[layer + 1][0] if layer < g.n_layers - 1 else None
        if whole is None:
            continue
        mid = whole - out
        for t in (1, last):
            prox = [max(whole[t].abs().sum() - (whole[t] - p).abs().sum(), 1e-5) for p in (out[t], mid[t])]
            assert abs(g.edges.ffn[layer, t] - prox[0] / sum(prox)) < 1e-5


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_detail_equals_an_independent_reading(moe, arch):
    _, pipe, hf, g = moe[arch]
    res, blocks = _hf_run(hf, g.token_ids)
    layer, t = 1, g.n_tokens - 1
    x_in, out = blocks[layer]
    probs, experts, gates, outputs, shared = reference_experts(hf.model.layers[layer].mlp, x_in[t])
    total = outputs.sum(0) + (0 if shared is None else shared)
    assert torch.allclose(total.float(), out[t], atol=1e-4)  # the reference reads the block right
    d = g.live.experts(layer, t)
    np.testing.assert_allclose(d["router"], probs.numpy(), atol=1e-6)
    assert [r["expert"] for r in d["routed"]] == experts
    np.testing.assert_allclose([r["gate"] for r in d["routed"]], gates, atol=1e-6)
    whole = res.hidden_states[layer + 1][0, t].double()
    parts = list(outputs) + ([] if shared is None else [shared]) + [whole - out[t].double()]
    prox = torch.stack([torch.clamp(whole.abs().sum() - (whole - p).abs().sum(), min=1e-5) for p in parts])
    c = (prox / prox.sum()).numpy()
    got = [r["contribution"] for r in d["routed"]] + ([] if shared is None else [d["shared"]["contribution"]])
    np.testing.assert_allclose(got + [d["residual"]], c, atol=1e-5)
    assert (d["shared"] is None) == (arch != "qwen2_moe")
    # one expert's neurons: gate * act[n] * W_out[n], adding up to that expert's output
    e = experts[0]
    neurons = g.live.neurons(layer, t, k=4, expert=e)
    assert len(neurons) == 4 and neurons[0]["contribution"] >= neurons[-1]["contribution"]
    from routescope.workers.details import Component

    vec = sum(g.live.component_vector(Component("neuron", layer, t, neuron=n, expert=e)) for n in range(
        hf.model.layers[layer].mlp.experts.down_proj.shape[-1]))
    assert torch.allclose(vec.double(), outputs[0], atol=1e-4)
    with pytest.raises(ValueError, match="is not routed at position"):
        g.live.neurons(layer, t, expert=next(i for i in range(4) if i not in experts))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_stage_splits_agree(moe, arch):
    path, pipe, _, g = moe[arch]
    split = Pipeline.local(Checkpoint(path, arch), layers="0-1,2-3")
    g2 = split.trace(PROMPT)
    assert_edge_sets_equal(g.edges, g2.edges)
    assert g2.live.experts(3, 2) == g.live.experts(3, 2)  # answered by the second stage
