"""Your own model through a documented adapter (``workers/adapter.py``, ``docs/adapters.md``).

A transformer written in plain torch (``plain_torch_model.py``: no Hugging Face class) is selected
by a dotted path and traced in one and two in-process stages; its edge sets and detail answers equal
a naive dense float64 computation of SPEC 2-4 written here from the model's own tensors. The stage's
load-time probe (``workers/support.py``) passes for it and refuses a broken adapter. Bad dotted
paths give one clear line. (Two Ray stage actors: ``test_ray_pipeline.py``.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import plain_torch_model as ptm
import routescope
from routescope.cluster.pipeline import Pipeline
from routescope.workers import support
from routescope.workers.adapter import AdapterError, ModelAdapter, LayerRange, resolve_adapter
from routescope.workers.details import Component
from edge_compare import assert_edge_sets_close

ADAPTER = "plain_torch_model:make"
PROMPT = "The cat sat on the mat."
BATCH = [PROMPT, "Hi", "Paris is in France"]
TAU_MIN = 1e-3
ATOL = 2e-5  # float32 stage vs float64 reference, contributions in [0, 1]
EPS = 1e-5   # SPEC 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(ptm.save(tmp_path_factory.mktemp("plain") / "plain.pt"))


@pytest.fixture(scope="module")
def one_stage(weights):
    return Pipeline.local(weights, adapter=ADAPTER)


@pytest.fixture(scope="module")
def two_stages(weights):
    return Pipeline.local(weights, adapter=ADAPTER, layers="0-0,1-2")


# ----------------------------------------------------------------------------- the naive reference
def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _contrib(whole: torch.Tensor, parts: torch.Tensor, norm: str) -> torch.Tensor:
    """SPEC 2 for ``parts`` ``[k, d]`` of ``whole`` ``[d]``."""
    p = 1 if norm == "l1" else 2
    prox = (torch.linalg.vector_norm(whole, p) - torch.linalg.vector_norm(whole[None] - parts, p, dim=-1)).clamp_min(EPS)
    return prox / prox.sum()


def naive(weights_path: str, ids: list[int], norm: str) -> dict:
    """Everything SPEC 1-4 define for one prompt, dense and in float64, from the state dict."""
    W = {k: v.double() for k, v in torch.load(weights_path, weights_only=True).items()}
    T, H, dh = len(ids), ptm.N_HEADS, ptm.D_MODEL // ptm.N_HEADS
    x = W["embed.weight"][ids] + W["pos.weight"][:T]
    out = {"layers": []}
    for l in range(ptm.N_LAYERS):
        P = lambda name: W[f"blocks.{l}.{name}"]  # noqa: E731
        h = _ln(x, P("ln1.weight"), P("ln1.bias"))
        q, k, v = ((h @ P(f"{n}.weight").T + P(f"{n}.bias")).reshape(T, H, dh) for n in "qkv")
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        pattern = scores.softmax(-1)                                     # [H, T, T]
        W_O = P("o.weight").T.reshape(H, dh, -1)                          # [H, dh, d]
        vo = torch.einsum("shd,hde->she", v, W_O)                         # [S, H, d]
        attn_out = torch.einsum("hts,she->te", pattern, vo) + P("o.bias")
        mid = x + attn_out
        act = torch.nn.functional.gelu(_ln(mid, P("ln2.weight"), P("ln2.bias")) @ P("fc1.weight").T + P("fc1.bias"))
        W_out = P("fc2.weight").T                                         # [d_ff, d]
        mlp_out = act @ W_out + P("fc2.bias")
        post = mid + mlp_out
        c_attn = torch.zeros(T, T, H, dtype=torch.float64)
        c_res_attn, c_ffn, c_res_ffn = (torch.zeros(T, dtype=torch.float64) for _ in range(3))
        for t in range(T):
            parts = (pattern[:, t, : t + 1].T[..., None] * vo[: t + 1]).reshape(-1, vo.shape[-1])  # (s, h) rows
            c = _contrib(mid[t], torch.cat([parts, x[t][None]]), norm)
            c_attn[t, : t + 1] = c[:-1].reshape(t + 1, H)
            c_res_attn[t] = c[-1]
            c = _contrib(post[t], torch.stack([mlp_out[t], mid[t]]), norm)
            c_ffn[t], c_res_ffn[t] = c
        out["layers"].append(dict(pre=x, mid=mid, post=post, pattern=pattern, vo=vo, act=act, W_out=W_out,
                                  mlp_out=mlp_out, c_attn=c_attn, c_res_attn=c_res_attn, c_ffn=c_ffn,
                                  c_res_ffn=c_res_ffn))
        x = post
    out["logits"] = _ln(x, W["ln_f.weight"], W["ln_f.bias"]) @ W["unembed.weight"].T + W["unembed.bias"]
    return out


def assert_matches_naive(edges, ref: dict) -> None:
    """Dense columns within ``ATOL``; sparse heads and edges exactly those above ``tau_min``."""
    L = len(ref["layers"])
    for col, key in (("res_attn", "c_res_attn"), ("ffn", "c_ffn"), ("res_ffn", "c_res_ffn")):
        want = np.stack([r[key].numpy() for r in ref["layers"]])
        np.testing.assert_allclose(getattr(edges, col), want, atol=ATOL, rtol=0, err_msg=col)
    heads = {(int(a), int(b), int(c), int(d)): float(w) for a, b, c, d, w in
             zip(edges.head_layer, edges.head_target, edges.head_source, edges.head_head, edges.head_weight)}
    pairs = {(int(a), int(b), int(c)): float(w) for a, b, c, w in
             zip(edges.edge_layer, edges.edge_target, edges.edge_source, edges.edge_weight)}
    tau = edges.tau_min
    for got, dense in ((heads, lambda l: ref["layers"][l]["c_attn"]),
                       (pairs, lambda l: ref["layers"][l]["c_attn"].sum(-1))):
        for l in range(L):
            c = dense(l).numpy()
            for idx in zip(*np.nonzero(c >= tau + ATOL)):
                key = (l, *map(int, idx))
                assert key in got, key
                assert abs(got[key] - c[idx]) <= ATOL, (key, got[key], c[idx])
        for key, w in got.items():
            assert dense(key[0]).numpy()[key[1:]] >= tau - ATOL, key


# ----------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_plain_torch_model_traces_as_the_naive_computation(one_stage, two_stages, weights, norm):
    assert one_stage.checkpoint is None and one_stage.adapter == ADAPTER
    for pipe in (one_stage, two_stages):
        g = pipe.trace(PROMPT, norm=norm, tau_min=TAU_MIN)
        ids = g.edges.trace.token_ids
        assert ids[0] == ptm.CharTokenizer.bos_token_id and len(ids) == len(PROMPT) + 1
        assert g.tokens[1:4] == ["T", "h", "e"]
        assert_matches_naive(g.edges, naive(weights, ids, norm))


def test_two_stages_and_batches_equal_one_stage(one_stage, two_stages, weights):
    assert two_stages.layout == [(0, 1), (1, 3)]
    even = Pipeline.local(weights, adapter=ADAPTER, stages=2)  # no checkpoint to balance bytes: by layers
    assert even.layout == [(0, 2), (2, 3)]
    single = one_stage.trace(PROMPT, tau_min=TAU_MIN)
    for pipe in (two_stages, even):
        assert_edge_sets_close(single.edges, pipe.trace(PROMPT, tau_min=TAU_MIN).edges)
    for g, p in zip(two_stages.trace(BATCH, tau_min=TAU_MIN), BATCH):  # left-padded together
        assert_edge_sets_close(one_stage.trace(p, tau_min=TAU_MIN).edges, g.edges)
        assert_matches_naive(g.edges, naive(weights, g.edges.trace.token_ids, "l1"))


def test_model_info_and_parameters(one_stage, two_stages):
    n_params = sum(p.numel() for p in ptm.PlainTransformer().parameters())
    for pipe in (one_stage, two_stages):
        info = pipe.info
        assert (info.name, info.architecture, info.n_layers, info.n_heads, info.d_model, info.d_ff, info.d_vocab) == \
            ("plain-torch-3l", "PlainTransformer", 3, 4, 32, 64, ptm.VOCAB)
        assert info.n_params == n_params
        assert sum(c.parameter_bytes() for c in pipe.clients) == 4 * n_params


def test_detail_answers_equal_the_naive_computation(two_stages, weights):
    g = two_stages.trace(PROMPT)
    ids = g.edges.trace.token_ids
    ref = naive(weights, ids, "l1")
    T = len(ids)
    t = T - 1
    for l in range(3):
        r = ref["layers"][l]
        head = g.live.component_vector(Component("head", l, t, head=2))
        want = (r["pattern"][2, t, :, None] * r["vo"][:, 2]).sum(0)
        np.testing.assert_allclose(np.asarray(head), want.numpy(), atol=1e-4)
        edge = g.live.component_vector(Component("edge", l, t, source=3))
        np.testing.assert_allclose(np.asarray(edge), (r["pattern"][:, t, 3, None] * r["vo"][3]).sum(0).numpy(), atol=1e-4)
        neuron = g.live.component_vector(Component("neuron", l, t, neuron=5))
        np.testing.assert_allclose(np.asarray(neuron), (r["act"][t, 5] * r["W_out"][5]).numpy(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(g.live.node_vector(f"A{l}_{t}")), r["mid"][t].numpy(), atol=1e-4)
        # per-neuron detail (SPEC 4): parts act[t, n] W_out[n] and resid_mid[t] of resid_post[t]
        c = _contrib(r["post"][t], torch.cat([r["act"][t, :, None] * r["W_out"], r["mid"][t][None]]), "l1")
        top = g.live.neurons(l, t, k=5)
        assert [n["neuron"] for n in top] == torch.topk(c[:-1], 5).indices.tolist()
        np.testing.assert_allclose([n["contribution"] for n in top], torch.topk(c[:-1], 5).values.numpy(), atol=ATOL)
        heads = g.live.head_contributions(l, t)  # [t+1, H]
        np.testing.assert_allclose(np.asarray(heads), r["c_attn"][t, : t + 1].numpy(), atol=ATOL)
        pattern, contrib = g.live.attention_maps(l, [1, 3])
        np.testing.assert_allclose(pattern, r["pattern"][[1, 3]].numpy(), atol=1e-5)
        np.testing.assert_allclose(contrib, r["c_attn"][:, :, [1, 3]].permute(2, 0, 1).numpy(), atol=ATOL)
    pred = g.live.prediction(k=3)
    assert [p["id"] for p in pred] == torch.topk(ref["logits"][t], 3).indices.tolist()
    np.testing.assert_allclose([p["score"] for p in pred], torch.topk(ref["logits"][t], 3).values.numpy(), atol=1e-3)
    logits = two_stages.clients[0].plain_forward(torch.tensor([ids]))
    logits = two_stages.clients[1].plain_forward(logits)
    np.testing.assert_allclose(logits[0].numpy(), ref["logits"].numpy(), atol=1e-3)


# ----------------------------------------------------------------------------- the probe
def test_the_probe_passes_for_the_adapter_and_refuses_a_broken_one(weights):
    stage_layers = resolve_adapter(ADAPTER, weights).build(0, 3, torch.device("cpu"), torch.float32)
    assert isinstance(stage_layers, LayerRange) and isinstance(resolve_adapter(ADAPTER, weights), ModelAdapter)
    x = support.probe_inputs(ptm.VOCAB, ptm.D_MODEL, True, torch.device("cpu"), torch.float32)
    seen = []

    def check(i, acts):
        acts = {k: v[0] for k, v in acts.items()}
        support.check_decomposition("PlainTransformer", i, acts, stage_layers.W_O[i], stage_layers.W_out[i], False,
                                    torch.float32)
        seen.append(i)

    with torch.inference_mode():
        stage_layers.forward(x, torch.ones_like(x), torch.arange(x.shape[1])[None], check)
    assert seen == [0, 1, 2]
    for layers in ("0-2", "0-0,1-2"):  # every stage probes its own layers
        with pytest.raises(support.UnsupportedModelError) as err:
            Pipeline.local(weights, adapter="plain_torch_model:make_broken", layers=layers)
        assert "PlainTransformer: layer 0: the attention parts pattern * (v @ W_O) do not add up to the attention " \
               "output" in str(err.value)


def test_missing_or_misshapen_activations_are_named(weights, monkeypatch):
    real = ptm.Block.forward

    def no_mid(self, x, mask, record=None):
        out = real(self, x, mask, record)
        if record is not None:
            record.pop("hook_resid_mid")
        return out

    monkeypatch.setattr(ptm.Block, "forward", no_mid)
    with pytest.raises(AdapterError, match=r"adapter 'plain-torch-3l': layer 0 reported nothing as 'hook_resid_mid', "
                                           r"expected a tensor of shape \[1, 6, 32\]"):
        Pipeline.local(weights, adapter=ADAPTER)

    def flat_v(self, x, mask, record=None):
        out = real(self, x, mask, record)
        if record is not None:
            record["attn.hook_v"] = record["attn.hook_v"].flatten(2)
        return out

    monkeypatch.setattr(ptm.Block, "forward", flat_v)
    with pytest.raises(AdapterError, match=r"reported \[1, 6, 32\] as 'attn.hook_v', expected a tensor of shape "
                                           r"\[1, 6, 'H_kv', 8\]"):
        Pipeline.local(weights, adapter=ADAPTER)


# ----------------------------------------------------------------------------- selection
def test_every_way_of_naming_the_adapter(weights, one_stage):
    want = one_stage.trace(PROMPT).edges
    for adapter in ("plain_torch_model.make", "plain_torch_model:PlainAdapter", "plain_torch_model.PlainAdapter",
                    ptm.make, ptm.PlainAdapter, ptm.PlainAdapter(weights)):
        pipe = Pipeline.local(weights, adapter=adapter)
        assert_edge_sets_close(want, pipe.trace(PROMPT).edges)
    g = routescope.trace(weights, PROMPT, adapter=ADAPTER, reuse=False)
    assert_edge_sets_close(want, g.edges)
    a = routescope.load(weights, adapter=ADAPTER)
    assert routescope.load(weights, adapter=ADAPTER) is a                 # one cache entry per adapter
    assert routescope.load(weights, adapter="plain_torch_model.make") is not a
    routescope.unload(a)


def test_a_factory_without_a_model_parameter_is_called_without_one(monkeypatch):
    monkeypatch.setattr(ptm, "no_args", lambda: ptm.PlainAdapter(), raising=False)
    adapter = resolve_adapter("plain_torch_model:no_args", "ignored")
    assert adapter.model is None and adapter.n_layers == 3


@pytest.mark.parametrize("path,message", [
    ("no_such_module_xyz:make", "adapter 'no_such_module_xyz:make': module 'no_such_module_xyz' not found"),
    ("no_such_module_xyz.sub.Thing", "adapter 'no_such_module_xyz.sub.Thing': module 'no_such_module_xyz.sub' not found"),
    ("plain_torch_model:nope", "adapter 'plain_torch_model:nope': 'plain_torch_model' has no attribute 'nope'"),
    ("plain_torch_model:CharTokenizer.nope", "'plain_torch_model:CharTokenizer' has no attribute 'nope'"),
    ("plainmodule", "adapter 'plainmodule': not a dotted path (module.path:factory or module.path.ClassName)"),
    ("plain torch:make", "adapter 'plain torch:make': not a dotted path"),
    ("plain_torch_model:VOCAB", "adapter 'plain_torch_model:VOCAB': an int is neither a model adapter nor a factory"),
    ("plain_torch_model:load", "adapter 'plain_torch_model:load': calling it returned a PlainTransformer, not a model "
                               "adapter (it lacks name, n_layers, tokenizer, build"),
    ("plain_torch_model:CharTokenizer", "calling it returned a CharTokenizer, not a model adapter"),
])
def test_bad_adapter_paths_give_one_clear_line(weights, path, message):
    with pytest.raises(AdapterError) as err:
        Pipeline.local(weights, adapter=path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_adapter_whose_range_is_incomplete_is_refused(weights, monkeypatch):
    class NoWout(ptm.PlainAdapter):
        def build(self, *args):
            layers = super().build(*args)
            layers.W_out = layers.W_out[:, :10]
            return layers

    with pytest.raises(AdapterError, match=r"W_out is \(3, 10, 32\), expected \[3, 64, 32\]"):
        Pipeline.local(weights, adapter=NoWout)

    class NoFacts(ptm.PlainAdapter):
        def build(self, *args):
            return object()

    with pytest.raises(AdapterError, match="build\\(\\) returned an object, not a layer range"):
        Pipeline.local(weights, adapter=NoFacts)


def test_cli_trace_with_an_adapter(weights, capsys):
    from routescope.cli import main

    assert main(["trace", "--adapter", ADAPTER, "--model", weights, "--prompt", PROMPT, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "model: plain-torch-3l (3 layers, 4 heads)" in out and "route of last position" in out
    assert main(["trace", "--adapter", "no_such_module_xyz:make", "--prompt", PROMPT]) == 2
    assert "routescope trace: error: adapter 'no_such_module_xyz:make': module 'no_such_module_xyz' not found" \
        in capsys.readouterr().err


def test_viewer_config_names_an_adapter():
    from routescope.viewer.config import ConfigError, parse_config

    cfg = parse_config({"models": [{"name": "mine", "spec": "/w/plain.pt", "adapter": ADAPTER}, "smollm2-135m"]})
    assert cfg.model("mine").adapter == ADAPTER and cfg.model("smollm2-135m").adapter is None
    assert cfg.model("mine").to_dict()["adapter"] == ADAPTER
    with pytest.raises(ConfigError, match="adapter"):
        parse_config({"models": [{"name": "mine", "spec": "x", "adapter": 3}]})


def test_the_default_adapter_named_explicitly_is_the_default(tmp_path):
    from routescope.workers.tiny import build_tiny_model

    path = str(build_tiny_model("llama", tmp_path / "llama"))
    default = Pipeline.local(path, layers="0-1,2-3")
    named = Pipeline.local(path, layers="0-1,2-3", adapter="routescope.workers.bridge_adapter:BridgeAdapter")
    assert named.checkpoint == default.checkpoint and named.info == default.info
    assert Pipeline.local(path, stages=2, adapter="routescope.workers.bridge_adapter.BridgeAdapter").layout == \
        Pipeline.local(path, stages=2).layout  # balanced by the checkpoint's bytes, as the default
    a, b = default.trace(BATCH), named.trace(BATCH)
    for ga, gb in zip(a, b):
        for col in ("head_weight", "head_source", "edge_weight", "res_attn", "ffn", "res_ffn"):
            assert np.array_equal(getattr(ga.edges, col), getattr(gb.edges, col)), col
