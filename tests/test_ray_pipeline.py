"""Ray stage actors and the coordinator, with real actors on this CPU machine (fractional CPUs).

One local Ray instance for the module; SmolLM2 is loaded in-process once and as 1-, 2- and
3-stage Ray pipelines; two tiny architectures (GPT-2, GPT-NeoX with parallel blocks) likewise.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from routescope.cluster.pipeline import Pipeline  # noqa: E402
from routescope.cluster.ray_pipeline import ClusterResourceError, StageError, StageTimeoutError, ray_pipeline  # noqa: E402
from routescope.workers.tiny import build_tiny_model  # noqa: E402
from routescope.workers.details import Component  # noqa: E402
from edge_compare import FLOAT32_ATOL, assert_edge_sets_close, assert_same_routes  # noqa: E402

CPUS = 0.25  # per stage: up to 8 stages at once on the module's 2 logical CPUs
SMOL = "smollm2-135m"
FRANCE = "The capital of France is"
SMOL_BATCH = [FRANCE, "Water boils at", "The quick brown fox", "def add(a, b):", "Berlin is the capital of",
              "She sold sea shells", "One, two, three,", "The opposite of hot is"]
EVICT = "The capital of France"
TINY_BATCH = ["The capital of France is", "def add(a, b): return a + b", "Water boils", "for i in range(10):",
              "The quick brown fox jumps", "She sold", "Berlin is in Germany.", "A transformer reads tokens"]



# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def smol_local():
    pipe = Pipeline.local(SMOL)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def smol_ray2(ray_local):
    pipe = ray_pipeline(SMOL, stages=2, cpus_per_stage=CPUS, retries=1, timeout_s=120)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(build_tiny_model(arch, root / arch, n_layers=4)) for arch in ("gpt2", "neox")}


@pytest.fixture(scope="module")
def tiny_local(tiny_dirs):
    return {arch: Pipeline.local(path) for arch, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def gpt2_two_stages(ray_local, tiny_dirs, tiny_local):
    """Layers 0-0 and 1-3; stage 1's activation cache holds one run of ``EVICT``, not two."""
    client = tiny_local["gpt2"].clients[0]
    before = client.counters()["cached_bytes"]
    local_trace(tiny_local["gpt2"], EVICT)
    one_run = client.counters()["cached_bytes"] - before  # all 4 layers; stage 1 keeps 3 of them (+ its input)
    pipe = ray_pipeline(tiny_dirs["gpt2"], layers="0-0,1-3", cpus_per_stage=CPUS, timeout_s=60,
                        cache_bytes=int(1.2 * one_run))
    yield pipe
    pipe.close()


# ----------------------------------------------------------------------------- comparison
def assert_same_contributions(ga, gb):
    """Ray actors and the driver run other thread counts: equal up to float32 rounding."""
    assert (ga.edges.layer_start, ga.edges.layer_stop) == (0, ga.edges.n_layers)
    assert_edge_sets_close(ga.edges, gb.edges)


_LOCAL: dict = {}


def local_trace(local, prompts, batch_size=8):
    """In-process graphs, computed once per pipeline, prompts and batch size."""
    key = (id(local), prompts if isinstance(prompts, str) else tuple(prompts), batch_size)
    if key not in _LOCAL:
        local.batch_size = batch_size
        try:
            _LOCAL[key] = (local, local.trace(prompts))
        finally:
            local.batch_size = 8
    return _LOCAL[key][1]


def assert_same_traces(local, remote, single, batch):
    gl, g = local_trace(local, single), remote.trace(single)
    assert_same_contributions(gl, g)
    assert_same_routes(gl, g)
    remote.batch_size = 2  # four batches in flight through the stages
    try:
        gl, gr = local_trace(local, batch, 2), remote.trace(batch)
    finally:
        remote.batch_size = 8
    assert [g.prompt for g in gr] == batch  # in the order asked
    for a, b in zip(gl, gr):
        assert_same_contributions(a, b)
        assert_same_routes(a, b)
    return g


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_smollm2_ray_stages_match_in_process(ray_local, smol_local, smol_ray2, n_stages):
    pipe = smol_ray2 if n_stages == 2 else ray_pipeline(SMOL, stages=n_stages, cpus_per_stage=CPUS)
    try:
        assert len(pipe.layout) == n_stages and pipe.layout[0][0] == 0 and pipe.layout[-1][1] == 30
        g = assert_same_traces(smol_local, pipe, FRANCE, SMOL_BATCH)
        assert g.live.prediction()[0]["token"] == " Paris"
    finally:
        if pipe is not smol_ray2:
            pipe.close()


def _tiny_pipeline(arch, n_stages, tiny_dirs, gpt2_two_stages):
    """Three layouts per architecture, each also exercising one more feature."""
    import routescope

    if n_stages == 1:
        return ray_pipeline(tiny_dirs[arch], stages=1, cpus_per_stage=CPUS)
    if n_stages == 2 and arch == "gpt2":  # explicit ranges, small activation cache
        return gpt2_two_stages
    if n_stages == 2:  # explicit ranges through the public API
        return routescope.load(tiny_dirs[arch], layers="0-0,1-3", address="local", cpus_per_stage=CPUS, reuse=False)
    if arch == "neox":  # the GPU code path (Ray Direct Transport, residual kept on the device) with gloo
        return ray_pipeline(tiny_dirs[arch], stages=3, cpus_per_stage=CPUS, transport="gloo")
    return ray_pipeline(tiny_dirs[arch], stages=3, cpus_per_stage=CPUS)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_tiny_ray_stages_match_in_process(ray_local, tiny_dirs, tiny_local, gpt2_two_stages, arch, n_stages):
    from routescope.cluster.ray_pipeline import RayPipeline

    pipe = _tiny_pipeline(arch, n_stages, tiny_dirs, gpt2_two_stages)
    try:
        assert isinstance(pipe, RayPipeline) and len(pipe.layout) == n_stages
        if n_stages == 2:
            assert pipe.layout == [(0, 1), (1, 4)]
        if arch == "neox" and n_stages == 3:
            assert pipe.transport == "gloo" and all(c.transport == "gloo" for c in pipe.clients)
        else:
            assert pipe.transport == "object_store"
        assert_same_traces(tiny_local[arch], pipe, TINY_BATCH[0], TINY_BATCH)
    finally:
        if pipe is not gpt2_two_stages:
            pipe.close()


# ----------------------------------------------------------------------------- stage memory
def test_stage_parameter_bytes_match_layer_share(ray_local, tmp_path):
    from routescope.cluster.layout import layer_bytes
    from routescope.workers.checkpoint import resolve

    path = build_tiny_model("llama", tmp_path / "llama8", n_layers=8, max_shard_size="150KB")
    assert (path / "model.safetensors.index.json").exists()  # sharded
    ckpt = resolve(str(path))
    per_layer, embed, unembed = layer_bytes(ckpt, 8)
    assert embed > 0 and unembed > 0
    pipe = ray_pipeline(str(path), stages=4, cpus_per_stage=CPUS)
    try:
        blocks = sum(per_layer)
        held = [info["parameter_bytes"] for info in pipe.stage_info]
        assert held == [c.parameter_bytes() for c in pipe.clients]
        assert pipe.layout == [(0, 2), (2, 4), (4, 6), (6, 8)]
        for i, ((a, b), n) in enumerate(zip(pipe.layout, held)):
            own = sum(per_layer[a:b])
            extra = n - own  # beyond the stage's own layers
            if i == 0:
                assert abs(extra - embed) <= 1024
            elif i == 3:
                assert abs(extra - unembed) <= 1024  # unembedding + final norm
            else:  # middle: a quarter of the blocks, no embedding or unembedding (final norm only)
                assert abs(own / blocks - 0.25) < 0.01
                assert 0 <= extra <= 1024 < embed
        # nothing loaded twice: beyond the checkpoint, only norms and 1-row placeholders (< 1 KiB a stage)
        assert blocks + embed + unembed <= sum(held) <= blocks + embed + unembed + 4 * 1024
        local = Pipeline.local(str(path))
        assert_same_contributions(local.trace(TINY_BATCH[0]), pipe.trace(TINY_BATCH[0]))
    finally:
        pipe.close()


# ----------------------------------------------------------------------------- details on demand
def test_detail_queries_through_actors(smol_local, smol_ray2):
    gl, gr = local_trace(smol_local, FRANCE), smol_ray2.trace(FRANCE)
    last = gl.n_tokens - 1
    for layer in (3, 20):  # one per stage
        a, b = gl.live.node_vector(f"I{layer}_{last}"), gr.live.node_vector(f"I{layer}_{last}")
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), layer  # 1 vs 2 threads
        for what, kw in (("attn_out", {}), ("head", {"head": 2}), ("edge", {"head": 1, "source": 2}),
                         ("neuron", {"neuron": 7})):
            a = gl.live.component_vector(Component(what, layer, last, **kw))
            b = gr.live.component_vector(Component(what, layer, last, **kw))
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (layer, what)  # 1 vs 2 threads
        np.testing.assert_allclose(gl.live.head_contributions(layer, last), gr.live.head_contributions(layer, last), atol=FLOAT32_ATOL)
        for x, y in zip(gl.live.attention_maps(layer, 3), gr.live.attention_maps(layer, 3)):
            np.testing.assert_allclose(x, y, atol=FLOAT32_ATOL)
        na, nb = gl.live.neurons(layer, last, k=5), gr.live.neurons(layer, last, k=5)
        assert [n["neuron"] for n in na] == [n["neuron"] for n in nb]
    # a middle layer's residual projected by the stage holding the final norm and unembedding
    ta, tb = gl.live.top_tokens(f"I10_{last}", k=5), gr.live.top_tokens(f"I10_{last}", k=5)
    assert [t["id"] for t in ta] == [t["id"] for t in tb]
    assert [t["rank_change"] for t in ta] == [t["rank_change"] for t in tb]
    assert gr.live.prediction()[0]["token"] == " Paris"
    with pytest.raises(ValueError, match="position"):
        gr.live.head_contributions(20, 99)
    with pytest.raises(ValueError, match="not one of"):
        smol_ray2.clients[0]._detail("forward", None)  # only detail methods are reachable


def test_evicted_run_is_recomputed(tiny_local, gpt2_two_stages):
    from routescope.workers.stage import RunEvictedError

    local, pipe = tiny_local["gpt2"], gpt2_two_stages
    ga, gb = pipe.trace([EVICT, EVICT])  # two runs; stage 1's cache holds one
    la = local_trace(local, EVICT)
    assert not pipe.clients[1].has_run(ga.live.run_id)  # evicted by the second run
    np.testing.assert_allclose(ga.live.head_contributions(3, 2), la.live.head_contributions(3, 2), atol=FLOAT32_ATOL)
    assert pipe.clients[1].has_run(ga.live.run_id)  # recomputed transparently
    assert not pipe.clients[1].has_run(gb.live.run_id)
    np.testing.assert_allclose(gb.live.head_contributions(2, 1), la.live.head_contributions(2, 1), atol=FLOAT32_ATOL)
    with pytest.raises(RunEvictedError, match="unknown"):
        pipe.ask("0" * 32, lambda: pipe.owner(1).head_contributions("0" * 32, 1, 0, "l1"))


# ----------------------------------------------------------------------------- faults, resources
def _kill_stage_mid_run(pipe, index, prompts, monkeypatch):
    """Trace ``prompts`` in a thread; SIGKILL stage ``index``'s process while it works on them."""
    pid = pipe.clients[index].pid()
    upstream = pipe.clients[index - 1]
    handles = []
    submit = upstream.submit_forward

    def spy(*args, **kwargs):
        out = submit(*args, **kwargs)
        handles.append(out[1])
        return out

    monkeypatch.setattr(upstream, "submit_forward", spy)
    box = {}

    def run():
        try:
            box["graphs"] = pipe.trace(prompts)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not handles and time.monotonic() < deadline:
        time.sleep(0.01)
    ray.wait(handles[:1], timeout=60)  # the upstream stage has handed over the first batch
    time.sleep(0.2)  # the victim is computing it now
    os.kill(pid, signal.SIGKILL)
    t.join(240)
    assert not t.is_alive()
    monkeypatch.undo()
    return pid, box


def test_stage_killed_mid_run_is_restarted_and_retried(smol_local, smol_ray2, monkeypatch):
    smol_ray2.batch_size = 2
    try:
        pid, box = _kill_stage_mid_run(smol_ray2, 1, SMOL_BATCH, monkeypatch)
    finally:
        smol_ray2.batch_size = 8
    assert "error" not in box, box.get("error")
    assert smol_ray2.clients[1].pid() != pid  # a new process
    for a, b in zip(local_trace(smol_local, SMOL_BATCH, 2), box["graphs"]):
        assert_same_contributions(a, b)
    g = box["graphs"][0]
    assert g.live.prediction()[0]["token"] == " Paris"  # asks the restarted last stage


def test_stage_killed_without_retries_gives_clear_error(smol_local, smol_ray2, monkeypatch):
    a, b = smol_ray2.layout[1]
    smol_ray2.retries = 0
    try:
        pid, box = _kill_stage_mid_run(smol_ray2, 1, SMOL_BATCH, monkeypatch)
    finally:
        smol_ray2.retries = 1
    err = box.get("error")
    assert isinstance(err, StageError) and "graphs" not in box, box
    assert f"stage 1 (layers {a}-{b - 1})" in str(err) and err.stage == 1 and "died" in str(err)
    # the coordinator stays usable: the actor was restarted and the next run is right
    g = smol_ray2.trace(FRANCE)
    assert smol_ray2.clients[1].pid() != pid
    assert_same_contributions(local_trace(smol_local, FRANCE), g)
    assert g.live.prediction()[0]["token"] == " Paris"


def test_timeout_is_reported_and_pipeline_stays_usable(gpt2_two_stages):
    pipe = gpt2_two_stages
    pipe.timeout_s = 1e-4
    try:
        with pytest.raises(StageTimeoutError, match=r"stage 0 \(layers 0-0\).*timeout"):
            pipe.trace(TINY_BATCH)
    finally:
        pipe.timeout_s = 60
    assert pipe.trace(TINY_BATCH[0]).n_tokens > 1


def test_missing_gpus_fail_fast(ray_local, tiny_dirs):
    t0 = time.perf_counter()
    with pytest.raises(ClusterResourceError, match=r"GPU.*missing 2 GPU"):
        ray_pipeline(tiny_dirs["gpt2"], stages=2, gpus_per_stage=1, cpus_per_stage=CPUS)
    with pytest.raises(ClusterResourceError, match=r"CPU.*missing"):
        ray_pipeline(tiny_dirs["gpt2"], stages=3, cpus_per_stage=4)
    assert time.perf_counter() - t0 < 10


def test_clients_expose_the_same_typed_detail_methods_and_refuse_others(tiny_local, gpt2_two_stages):
    """In-process and Ray clients offer exactly the typed ``StageDetails`` questions (plus the
    forward pass), and both refuse any other name, whatever the caller sends."""
    import inspect

    from routescope.cluster.stage_clients import LocalStageClient, RayStageClient, StageClient
    from routescope.workers.details import DETAIL_METHODS, StageDetails

    def public(cls):
        return {n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}

    forward = {"submit_forward", "fetch", "close"}
    assert DETAIL_METHODS == public(StageDetails) and len(DETAIL_METHODS) >= 10
    assert public(LocalStageClient) == DETAIL_METHODS | forward
    assert public(RayStageClient) - {"ready", "pid"} == DETAIL_METHODS | forward
    assert {n for n in vars(StageClient) if not n.startswith("_")} - {"start", "stop"} == DETAIL_METHODS | forward
    for name in DETAIL_METHODS:  # same signatures on both sides
        assert inspect.signature(getattr(LocalStageClient, name)) == inspect.signature(getattr(RayStageClient, name))
    local, remote = tiny_local["gpt2"].clients[0], gpt2_two_stages.clients[0]
    for client in (local, remote):
        for bad in ("forward", "__init__", "_acts", "store", "bridge", "load_state_dict"):
            with pytest.raises(ValueError, match=f"stage method '{bad}' is not one of"):
                client._detail(bad)
    with pytest.raises(ValueError, match="is not one of"):  # the actor checks on its own side too
        ray.get(remote.actor.detail.remote("forward", None, [1], None, "l1", 0.01))
    assert local.parameter_bytes() > 0 and remote.parameter_bytes() > 0


def test_mixtral_in_two_ray_stages_equals_in_process(ray_local, tmp_path):
    """A mixture-of-experts model (SPEC 4b) split over two stage actors: same contributions and
    routes as in-process, and each layer's expert detail answered by the actor holding it."""
    from moe_models import build_moe_model

    path = str(build_moe_model("mixtral", tmp_path / "mixtral"))
    local = Pipeline.local(path)
    pipe = ray_pipeline(path, layers="0-1,2-3", cpus_per_stage=CPUS, timeout_s=60)
    try:
        prompt = "The capital of France is Paris and the river"
        gl, gr = local.trace(prompt), pipe.trace(prompt)
        assert_same_contributions(gl, gr)
        assert_same_routes(gl, gr)
        last = gl.n_tokens - 1
        for layer in (1, 3):  # one per actor
            a, b = gl.live.experts(layer, last), gr.live.experts(layer, last)
            assert [r["expert"] for r in a["routed"]] == [r["expert"] for r in b["routed"]]
            np.testing.assert_allclose([r["contribution"] for r in a["routed"]],
                                       [r["contribution"] for r in b["routed"]], atol=FLOAT32_ATOL)
            np.testing.assert_allclose(a["router"], b["router"], atol=FLOAT32_ATOL)
        assert gr.live.prediction()[0]["id"] == gl.live.prediction()[0]["id"]
    finally:
        pipe.close()


def test_plain_torch_adapter_in_two_ray_stages_equals_in_process(ray_local, tmp_path):
    """A model of one's own (``plain_torch_model.py``, no Hugging Face class) named by a dotted path:
    each stage actor imports the adapter again on its node (the driver's working directory is on the
    workers' path) and reads the weights the model spec names; same contributions, details and
    prediction as in-process."""
    import plain_torch_model as ptm

    weights = str(ptm.save(tmp_path / "plain.pt"))
    adapter = "tests.plain_torch_model:make"  # importable from the repository root, where Ray's workers start
    local = Pipeline.local(weights, adapter="plain_torch_model:make")
    pipe = ray_pipeline(weights, adapter=adapter, layers="0-1,2-2", cpus_per_stage=CPUS, timeout_s=60)
    try:
        assert pipe.checkpoint is None and pipe.info == local.info and pipe.layout == [(0, 2), (2, 3)]
        assert {i["pid"] for i in pipe.stage_info}.isdisjoint({os.getpid()})
        prompts = ["The cat sat on the mat.", "Hi", "Paris is in France"]
        for gl, gr in zip(local.trace(prompts), pipe.trace(prompts)):
            assert_same_contributions(gl, gr)
            assert_same_routes(gl, gr)
            t = gl.n_tokens - 1
            for layer in (1, 2):  # one per actor
                np.testing.assert_allclose(gr.live.head_contributions(layer, t), gl.live.head_contributions(layer, t),
                                           atol=FLOAT32_ATOL)
                np.testing.assert_allclose(np.asarray(gr.live.component_vector(Component("neuron", layer, t, neuron=3))),
                                           np.asarray(gl.live.component_vector(Component("neuron", layer, t, neuron=3))),
                                           atol=1e-5)
            assert [p["id"] for p in gr.live.prediction()] == [p["id"] for p in gl.live.prediction()]
    finally:
        pipe.close()
    with pytest.raises(ValueError, match="module 'no_such_module_xyz' not found"):  # checked before any actor
        ray_pipeline(weights, adapter="no_such_module_xyz:make", cpus_per_stage=CPUS)
