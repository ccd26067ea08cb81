"""The stage engine against SPEC: invariants, a naive dense reference, stage splits, batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_compare import assert_edge_sets_close
from routescope.cluster.pipeline import Pipeline
from routescope.workers import reference
from routescope.workers.checkpoint import Checkpoint
from routescope.workers.edgeset import EdgeSet

PROMPTS = {
    5: "The capital of",
    17: "She sold sea shells by the sea shore, and the quick fox",
    40: "def add(a, b): return a + b\nfor i in range(10): print(i * i) # squares of the numbers, "
        "then The capital of Italy is Rome.",
}


def dense(es: EdgeSet, layer: int) -> np.ndarray:
    """Per-head parts of one layer as a dense [T, T, H] array (zeros below tau_min)."""
    out = np.zeros((es.n_tokens, es.n_tokens, es.n_heads))
    m = es.head_layer == layer
    out[es.head_target[m], es.head_source[m], es.head_head[m]] = es.head_weight[m]
    return out


def engine_edges(pipe: Pipeline, ids: list[int], norm: str) -> EdgeSet:
    return pipe.trace_ids([ids], norm=norm)[0].edges


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    """For every tiny architecture: (in-process pipeline, naive full-model bridge)."""
    return {arch: (Pipeline.local(Checkpoint(path, arch)), reference.load_bridge(path))
            for arch, path in tiny_dirs.items()}


def _token_ids(pipe: Pipeline, n: int) -> list[int]:
    text = PROMPTS[max(k for k in PROMPTS if k <= n)] * 3
    ids = pipe.tokenize(text)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "neox"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("n_tokens", [5, 17, 40])
def test_engine_matches_naive_dense_reference(tiny, arch, norm, n_tokens):
    pipe, bridge = tiny[arch]
    ids = _token_ids(pipe, n_tokens)
    es = engine_edges(pipe, ids, norm)
    cache = reference.capture(bridge, ids)
    for l in range(es.n_layers):
        ref = reference.layer_contributions(bridge, cache, l, norm)
        c_attn = ref.c_attn
        kept = np.where(c_attn >= es.tau_min, c_attn, 0.0)
        # A part right at tau_min may fall either side in fp32; compare away from the edge.
        edge = np.abs(c_attn - es.tau_min) < 1e-5
        assert np.abs(np.where(edge, 0, dense(es, l) - kept)).max() <= 1e-5
        assert np.abs(es.res_attn[l] - ref.c_res_attn).max() <= 1e-5
        assert es.parallel == ref.parallel and np.abs(es.ffn[l] - ref.c_ffn).max() <= 1e-5
        if not ref.parallel:
            assert np.abs(es.res_ffn[l] - ref.c_res_ffn).max() <= 1e-5
        summed = c_attn.sum(-1)
        m = es.edge_layer == l
        got = np.zeros_like(summed)
        got[es.edge_target[m], es.edge_source[m]] = es.edge_weight[m]
        want = np.where(summed >= es.tau_min, summed, 0)
        edge = np.abs(summed - es.tau_min) < 1e-5
        assert np.abs(np.where(edge, 0, got - want)).max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "neox"])
def test_attention_parts_reconstruct_block_output(tiny, arch):
    """sum_{s,h} part == attn_out - b_O and sum_s part(s,h) == hook_result[:, h] (SPEC 3)."""
    pipe, bridge = tiny[arch]
    ids = _token_ids(pipe, 17)
    cache = reference.capture(bridge, ids)
    for l in range(bridge.cfg.n_layers):
        total, per_head = reference.attention_parts_sum(bridge, cache, l)
        try:
            b_O = bridge.b_O[l].detach().double()
        except AttributeError:  # bias-free attention (Llama)
            b_O = torch.zeros(total.shape[-1], dtype=torch.float64)
        attn_out = cache[f"blocks.{l}.hook_attn_out"]
        scale = attn_out.abs().max()
        assert (total - (attn_out - b_O)).abs().max() <= 1e-4 * scale
        result = cache.get(f"blocks.{l}.attn.hook_result")
        if result is None:  # the model's own per-head outputs, before the O projection
            result = torch.einsum("the,hed->thd", cache[f"blocks.{l}.attn.hook_z"], bridge.W_O[l].detach().double())
        assert (per_head - result).abs().max() <= 1e-4 * result.abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_contributions_of_every_whole_sum_to_one(tiny, arch):
    pipe, _ = tiny[arch]
    g = pipe.trace_ids([_token_ids(pipe, 17)])[0]
    for l in range(g.n_layers):
        for t in range(g.n_tokens):
            heads = g.live.head_contributions(l, t)  # exact dense [t+1, H]
            total = heads.sum() + g.edges.res_attn[l, t] + (g.edges.ffn[l, t] if g.parallel else 0)
            assert abs(total - 1) < 1e-5
            assert np.all(heads >= 0)
    if not g.parallel:
        assert np.allclose(g.edges.ffn + g.edges.res_ffn, 1, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_renormalized_nodes_sum_to_one(tiny, arch):
    from routescope.cluster.routes import FFN_IN, RES_FFN

    pipe, _ = tiny[arch]
    g = pipe.trace_ids([_token_ids(pipe, 40)])[0]
    for tau in (0.02, 0.04, 0.08):
        e = g.graph_edges(tau, "renormalize")
        incoming = e.kind != FFN_IN  # A->M carries the same weight as M->I: count one of them
        _, dst = e.node_names()
        sums: dict[str, float] = {}
        for name, w, keep in zip(dst, e.weight, incoming):
            if keep:
                sums[name] = sums.get(name, 0.0) + float(w)
        assert sums and all(abs(s - 1) < 1e-5 for s in sums.values())
        assert not g.parallel or not np.any(e.kind == RES_FFN)


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_stage_splits_give_identical_contributions_and_routes(tiny_dirs, tiny, arch):
    one, _ = tiny[arch]
    ids = _token_ids(one, 17)
    ref = one.trace_ids([ids])[0]
    for layout in ("0-1,2-3", "0-0,1-2,3-3"):
        split = Pipeline.local(Checkpoint(tiny_dirs[arch], arch), layers=layout)
        assert len(split.layout) == layout.count(",") + 1
        g = split.trace_ids([ids])[0]
        for name in ("head_weight", "edge_weight", "res_attn", "ffn", "res_ffn", "head_source", "head_head"):
            assert np.array_equal(getattr(g.edges, name), getattr(ref.edges, name)), name
        for tau in (0.02, 0.05):
            a, b = g.route(tau, targets="all"), ref.route(tau, targets="all")
            assert a.records() == b.records()


def test_batch_with_padding_equals_single_prompts(tiny):
    pipe, _ = tiny["llama"]
    prompts = [PROMPTS[5], PROMPTS[17], "Water boils"]
    batch = pipe.trace(prompts)
    for p, g in zip(prompts, batch):
        alone = pipe.trace(p)
        assert g.n_tokens == alone.n_tokens
        assert_edge_sets_close(g.edges, alone.edges)  # other batch shapes: equal up to float32 rounding


@pytest.mark.parametrize("tau_min", [0.01, 0.05])
def test_fixed_size_selection_gives_the_same_edge_sets(tiny, monkeypatch, tau_min):
    """The GPUs' sync-free selection (fixed-size lists padded with -1, dropped on the host) keeps
    exactly the parts and edges ``nonzero`` keeps. At tau_min 0.05 the edge lists are padded too."""
    from routescope.workers import contributions

    pipe, _ = tiny["llama"]
    ids = _token_ids(pipe, 40)
    ref = pipe.trace_ids([ids], tau_min=tau_min)[0].edges
    calls = []
    monkeypatch.setattr(contributions, "FIXED_SIZE_SELECTION", True)
    real = torch.nonzero_static
    monkeypatch.setattr(torch, "nonzero_static", lambda *a, **k: calls.append(k["size"]) or real(*a, **k))
    got = pipe.trace_ids([ids], tau_min=tau_min)[0].edges
    assert len(calls) >= (2 if tau_min == 0.05 else 1) * got.n_layers  # the padded path really ran
    for name in ("head_layer", "head_target", "head_source", "head_head", "edge_layer", "edge_target", "edge_source"):
        assert np.array_equal(getattr(got, name), getattr(ref, name)), name
    for name in ("head_weight", "edge_weight", "res_attn"):
        assert np.array_equal(getattr(got, name), getattr(ref, name)), name


def test_chunking_does_not_change_results(tiny_dirs, tiny):
    pipe, _ = tiny["gpt2"]
    ids = _token_ids(pipe, 40)
    ref = pipe.trace_ids([ids])[0].edges
    # 4096 bytes force one-target chunks and many correction batches
    small = Pipeline.local(Checkpoint(tiny_dirs["gpt2"], "gpt2"), chunk_bytes=4096)
    got = small.trace_ids([ids])[0].edges
    assert np.array_equal(got.head_source, ref.head_source)
    assert np.abs(got.head_weight - ref.head_weight).max() <= 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_keep_contributions_normalised(tiny_dirs, dtype):
    pipe = Pipeline.local(Checkpoint(tiny_dirs["llama"], "llama"), dtype=dtype)
    g = pipe.trace("The capital of France is")
    assert g.edges.head_weight.dtype == np.float32
    assert np.allclose(g.edges.ffn + g.edges.res_ffn, 1, atol=1e-5)
    for t in range(g.n_tokens):
        assert abs(g.live.head_contributions(2, t).sum() + g.edges.res_attn[2, t] - 1) < 1e-4
    assert len(g.route(0.04)) > 0


def _random_layer(d_model: int, T: int = 24, H: int = 3, dh: int = 8):
    """Activations of one attention layer with peaked attention and ``|a u_i|`` of the order of ``|y_i|``."""
    from routescope.workers.contributions import LayerActivations

    gen = torch.Generator().manual_seed(d_model)
    y = torch.randn(T, d_model, generator=gen)
    y[::5, -1] = 0.0  # sign(0) = +1, in the last (padded) group only: a zero makes its group a candidate
    pattern = torch.softmax(4 * torch.randn(H, T, T, generator=gen), dim=-1).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    return LayerActivations(
        resid_pre=torch.randn(T, d_model, generator=gen), resid_mid=y, resid_post=y,
        mlp_out=torch.zeros(T, d_model),
        v=torch.randn(T, H, dh, generator=gen), pattern=pattern, W_O=torch.randn(H, dh, d_model, generator=gen) * 0.3,
    )


def test_unfused_bound_runs_in_blocks_of_targets_within_the_budget():
    """The unfused candidate search splits a chunk's targets into blocks its bound tensor fits (a
    chunk sized for the kernels is too large for it) and finds exactly the same corrections."""
    from routescope.workers.contributions import attention_proximity_chunk
    from routescope.workers.exact_l1 import MIN_CHUNK_TARGETS

    acts = _random_layer(100, T=150)
    whole = attention_proximity_chunk(acts, 0, 150, "l1", chunk_bytes=2**30)
    blocks = attention_proximity_chunk(acts, 0, 150, "l1", chunk_bytes=1)  # blocks of MIN_CHUNK_TARGETS
    assert 150 > 2 * MIN_CHUNK_TARGETS
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-6)


def test_kernel_failure_falls_back_to_the_unfused_path(monkeypatch):
    """A fused kernel that fails (no compiler for the GPU, ...) warns once and leaves the unfused path
    to compute the same result; forced with ROUTESCOPE_KERNEL=triton, its error is raised."""
    from routescope.workers import kernels
    from routescope.workers.contributions import attention_proximity_chunk

    acts = _random_layer(100)
    want = attention_proximity_chunk(acts, 0, 24, "l1")

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.delenv("ROUTESCOPE_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "available", lambda device: kernels._failure is None)
    monkeypatch.setattr(kernels, "bound_candidates", broken)
    with pytest.warns(UserWarning, match="fused L1 kernels failed .RuntimeError: PTX assembly failed"):
        got = attention_proximity_chunk(acts, 0, 24, "l1")
    assert torch.equal(got, want) and kernels._failure == "RuntimeError: PTX assembly failed"
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setenv("ROUTESCOPE_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="PTX assembly failed"):
        attention_proximity_chunk(acts, 0, 24, "l1")


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.bfloat16])  # bf16: the GPU default
@pytest.mark.parametrize("d_model", [64, 100, 200])  # one group; a padded second group; three, the last padded
def test_l1_correction_bound_is_exact_with_partial_coordinate_groups(d_model, matmul_dtype):
    """The grouped Hoelder bound never misses a coordinate, also where d is not a multiple of the group
    and where the bound's matmul runs in bf16.

    Real models hit this (Llama-2-13B d=5120, OPT-30B d=7168); the tiny models and SmolLM2 do not.
    Peaked attention and ``|a u_i|`` of the order of ``|y_i|`` put many bounds close to 1.
    """
    from routescope.workers.contributions import attention_proximity_chunk
    from routescope.workers.exact_l1 import L1Bounds, head_outputs

    acts = _random_layer(d_model)
    y, pattern, T = acts.resid_mid, acts.pattern, acts.resid_mid.shape[0]
    bounds = L1Bounds.build(acts.v, acts.W_O, matmul_dtype=matmul_dtype)
    assert bounds.powers.dtype == matmul_dtype
    got = attention_proximity_chunk(acts, 0, T, "l1", bounds=bounds).double()
    u = head_outputs(acts.v, acts.W_O).double()  # [H, S, d]
    y64, a64 = y.double(), pattern.double()
    n_corrected = 0
    for t in range(T):
        part = a64[:, t, : t + 1, None] * u[:, : t + 1]  # [H, t+1, d]
        want = y64[t].abs().sum() - (y64[t] - part).abs().sum(-1)
        main = (part * torch.where(y64[t] >= 0, 1.0, -1.0)).sum(-1)
        n_corrected += int((want < main - 1e-9).sum())
        torch.testing.assert_close(got[:, t, : t + 1], want, rtol=1e-5, atol=1e-5)
    assert n_corrected > 50  # the correction was really exercised


def test_fused_bound_test_matches_eager_and_leaves_its_input():
    """The ``torch.compile`` version of the L1 candidate test (used on GPUs) selects exactly what
    the eager one selects, over ranges that hit the underflow floor, and does not touch ``total``."""
    from routescope.workers.exact_l1 import _bound_exceeds, _bound_exceeds_fused

    gen = torch.Generator().manual_seed(3)
    G, S, H, C, dg = 3, 20, 4, 7, 72
    total = torch.rand(G, S, H, C, generator=gen) ** 8
    total[0, :4] = 0.0  # fully underflowed sums
    total[1, :2] = 1e-39  # subnormal
    max_abs = torch.rand(G, S, H, generator=gen) + 0.1
    a = torch.rand(H, C, S, generator=gen)
    y_min = torch.rand(C, G, generator=gen) * 0.5 + 1e-3
    a[0, :, :3] = 0.0  # outside the causal half: log 0 = -inf
    logs = (max_abs.log(), a.permute(2, 0, 1).log().contiguous(), (y_min.log().T - 0.05).contiguous())
    before = total.clone()
    got = _bound_exceeds_fused(total, *logs, dg)
    assert torch.equal(total, before)
    want = _bound_exceeds(total.clone(), *logs, dg)
    assert torch.equal(got, want) and 0 < int(want.sum()) < want.numel()


def test_fused_candidate_kernel_in_triton_interpreter(tiny_dirs):
    """The GPU path's fused candidate kernel (workers/kernels.py), run on the CPU by Triton's
    interpreter: its candidate sets equal the unfused test's (also when its list overflows), the
    proximities it leads to equal brute force, a tiny Llama traced with it has the same edges, the
    GPU code paths never make the host wait inside a layer, and overflowing lists are redone."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("kernel_checks.py")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ROUTESCOPE_KERNEL")}
    done = subprocess.run([sys.executable, str(script), str(tiny_dirs["llama"])], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "list sufficed" in done.stdout and "list overflowed and re-ran" in done.stdout
    assert "edge sets and routes equal with and without the kernel" in done.stdout
    assert "l1: 0 host syncs" in done.stdout and "l2: 0 host syncs" in done.stdout
    assert "the batch was computed again" in done.stdout


def test_run_records_are_bounded_and_leave_the_stage_caches_with_them(tiny_dirs):
    """The coordinator keeps what it needs to recompute ``max_runs`` runs; an older run is
    forgotten here and dropped from every stage's activation cache at the same time."""
    from routescope.workers.stage import RunEvictedError

    pipe = Pipeline.local(Checkpoint(tiny_dirs["llama"], "llama"), layers="0-1,2-3")
    pipe.max_runs = 2
    first, second, third = pipe.trace(["Water boils", "The capital of France is", "One two three"])
    assert [c.has_run(first.live.run_id) for c in pipe.clients] == [False, False]
    assert all(c.has_run(g.live.run_id) for c in pipe.clients for g in (second, third))
    with pytest.raises(RunEvictedError, match="unknown to this pipeline; trace the prompt again"):
        first.live.top_tokens("I3_1")
    assert second.live.top_tokens("I3_1", k=2)  # the others still answer
