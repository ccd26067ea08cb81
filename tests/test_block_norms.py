"""Norms inside blocks (SPEC 4a): Gemma-2, Gemma-3 and OLMo-2 normalise the attention and FFN
outputs before the residual. Checked against plain Hugging Face tensors (forward hooks on the
modules, ``output_attentions``, ``output_hidden_states``), with the linearisation written out here:
``N_lin(p) = g / rms(x) * p`` with Gemma's gain ``1 + w`` and OLMo-2's ``w``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_compare import assert_edge_sets_equal
from routescope.cluster.pipeline import Pipeline
from routescope.workers.checkpoint import Checkpoint
from routescope.workers.tiny import train_tokenizer

ARCHS = ("gemma2", "gemma3", "olmo2")
PROMPT = "The capital of France is Paris and the river"


def _config(arch: str, vocab: int):
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, num_hidden_layers=3,
                  hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if arch == "gemma2":  # soft-capped logits and attention, a short sliding window on alternate layers
        return T.Gemma2Config(head_dim=8, sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
                              **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(head_dim=8, sliding_window=4, **common)
    return T.Olmo2Config(**common)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer()
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch, len(tok)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.mul_(4.0)
                elif "norm" in name:  # gains away from 1 (Gemma: 1 + w), so the norms matter
                    p.normal_(0.3, 0.3)
        path = tmp_path_factory.mktemp(arch) / arch
        model.save_pretrained(path)
        tok.save_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        pipe = Pipeline.local(Checkpoint(path, arch))
        out[arch] = (path, hf, pipe, pipe.trace(PROMPT))
    return out


def _hf_reading(hf, ids):
    """Per layer: v (before rotary), the attention-output norm's input and output, from hooks."""
    got, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        handles += [
            layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("v", i), o[0])),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, i=i: got.update({("x", i): a[0][0], ("nx", i): o[0]})),
        ]
    try:
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return res, got


def _gain(arch: str, norm: torch.nn.Module) -> torch.Tensor:
    w = norm.weight.detach().double()
    return 1 + w if arch.startswith("gemma") else w


@pytest.mark.parametrize("arch", ARCHS)
def test_block_norms_traced_exactly_against_hugging_face(models, arch):
    _, hf, pipe, g = models[arch]
    res, got = _hf_reading(hf, g.token_ids)
    T = g.n_tokens
    cfg = hf.config
    H, H_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    assert g.live.prediction()[0]["id"] == int(res.logits[0, -1].argmax())
    top = g.live.top_tokens(f"I{g.n_layers - 1}_{T - 1}", k=3)
    np.testing.assert_allclose([t["score"] for t in top], torch.topk(res.logits[0, -1], 3).values.numpy(), atol=1e-4)
    for layer in range(g.n_layers):
        attn = hf.model.layers[layer].self_attn
        norm = hf.model.layers[layer].post_attention_layernorm
        pattern = res.attentions[layer][0].double()  # [H, T, T]
        v = got[("v", layer)].double().view(T, H_kv, dh).repeat_interleave(H // H_kv, 1)  # [T, H, dh]
        W_O = attn.o_proj.weight.detach().double().view(d, H, dh).permute(1, 2, 0)  # [H, dh, d]
        x = got[("x", layer)].double()
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
        D = _gain(arch, norm)[None, :] / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
        pre = res.hidden_states[layer][0].double()
        mid = pre + got[("nx", layer)].double()
        assert torch.allclose((D * x).float(), got[("nx", layer)], atol=1e-4)  # the linearisation is exact
        for t in (1, T // 2, T - 1):
            parts = pattern[:, t, : t + 1, None] * torch.einsum("shd,hde->hse", v[: t + 1], W_O) * D[t]  # [H, S, d]
            assert torch.allclose(parts.sum((0, 1)), mid[t] - pre[t], atol=1e-4)  # parts add up (SPEC 4a)
            y = mid[t]
            prox = (y.abs().sum() - (y - parts).abs().sum(-1)).clamp_min(1e-5)  # [H, S]
            prox_res = (y.abs().sum() - (y - pre[t]).abs().sum()).clamp_min(1e-5)
            total = prox.sum() + prox_res
            np.testing.assert_allclose(g.live.head_contributions(layer, t), (prox / total).T.numpy(), atol=1e-5)
            assert abs(g.edges.res_attn[layer, t] - float(prox_res / total)) < 1e-5
        assert torch.allclose(g.live.node_vector(f"A{layer}_{T - 1}").double(), mid[T - 1], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_norms_stage_splits_and_l2_agree(models, arch):
    path, _, pipe, g = models[arch]
    split = Pipeline.local(Checkpoint(path, arch), layers="0-0,1-2")
    g2 = split.trace(PROMPT)
    assert_edge_sets_equal(g.edges, g2.edges)
    # L2 through the same linearisation: per-head values sum with the residual to 1
    g_l2 = pipe.trace(PROMPT, norm="l2")
    t = g_l2.n_tokens - 1
    assert abs(g_l2.live.head_contributions(1, t).sum() + g_l2.edges.res_attn[1, t] - 1) < 1e-4
    neurons = g.live.neurons(1, t, k=5)
    assert len(neurons) == 5 and neurons[0]["contribution"] >= neurons[-1]["contribution"]
