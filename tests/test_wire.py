"""The msgpack edge-set wire format: lossless round trips, strict rejection of bad payloads."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from routescope.workers.edgeset import EdgeSet, EdgeSetError
from routescope.workers.schema import JobMeta, ModelInfo, TraceMeta

INFO = ModelInfo(name="m", architecture="LlamaForCausalLM", n_layers=6, n_heads=4, n_kv_heads=2, d_model=8,
                 d_head=2, d_ff=16, d_vocab=50, n_ctx=64, parallel=False, n_params=1234)


def make_edge_set(n_tokens: int = 6, layers: tuple[int, int] = (2, 4), seed: int = 0) -> EdgeSet:
    rng = np.random.default_rng(seed)
    n = 25
    target = rng.integers(0, n_tokens, n)
    source = (rng.random(n) * (target + 1)).astype(int)
    nl = layers[1] - layers[0]
    return EdgeSet(
        model="m", n_layers=6, n_heads=4, n_tokens=n_tokens, layer_start=layers[0], layer_stop=layers[1],
        parallel=False, norm="l1", tau_min=0.01,
        head_layer=rng.integers(*layers, n), head_target=target, head_source=source,
        head_head=rng.integers(0, 4, n), head_weight=rng.random(n).astype(np.float32),
        edge_layer=rng.integers(*layers, 7), edge_target=np.full(7, n_tokens - 1), edge_source=np.arange(7) % n_tokens,
        edge_weight=rng.random(7).astype(np.float32), res_attn=rng.random((nl, n_tokens)),
        ffn=rng.random((nl, n_tokens)), res_ffn=rng.random((nl, n_tokens)),
        trace=TraceMeta(prompt="a b", token_ids=list(range(n_tokens)), tokens=["a"] * n_tokens, model_info=INFO,
                        job=JobMeta(index=3, line=4, positions="last", job_id="j")),
    ).validate()


def test_round_trip_is_lossless():
    es = make_edge_set()
    back = EdgeSet.decode(es.encode())
    for name in ("head_layer", "head_target", "head_source", "head_head", "head_weight", "edge_weight", "res_attn"):
        a, b = getattr(es, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert back.trace == es.trace and back.layer_start == 2
    assert back.trace.model_info == INFO and back.trace.job.index == 3


def test_version_1_files_are_still_read():
    """Version 1 carried the same metadata as an untyped ``extra`` map."""
    doc = msgpack.unpackb(make_edge_set().encode(), raw=False)
    trace = doc.pop("trace")
    doc.update(version=1, extra={**trace, "unknown_v1_key": 1})
    back = EdgeSet.decode(msgpack.packb(doc, use_bin_type=True))
    assert back.trace == make_edge_set().trace


def test_columns_travel_as_raw_bytes():
    doc = msgpack.unpackb(make_edge_set().encode(), raw=False)
    col = doc["arrays"]["head_weight"]
    assert col["dtype"] == "<f4" and isinstance(col["data"], bytes) and len(col["data"]) == 4 * col["shape"][0]


def _mutate(fn):
    doc = msgpack.unpackb(make_edge_set().encode(), raw=False)
    fn(doc)
    return msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize("payload,message", [
    (make_edge_set().encode()[:-10], "not a msgpack edge set"),
    (b"", "not a msgpack edge set"),
    (_mutate(lambda d: d.update(version=99)), "unsupported edge-set version 99"),
    (_mutate(lambda d: d.update(schema="other")), "not a routescope edge set"),
    (_mutate(lambda d: d["arrays"]["head_weight"].update(dtype="<f8")), "head_weight: dtype '<f8' != expected '<f4'"),
    (_mutate(lambda d: d["arrays"]["head_weight"].update(shape=[1000])), "head_weight: 100 data bytes != 4000"),
    (_mutate(lambda d: d["meta"].update(n_tokens=2)), "res_attn: shape (2, 6) != (layers 2, tokens 2)"),
    (_mutate(lambda d: d["arrays"]["head_head"].update(data=np.full(25, 7, "<i2").tobytes())),
     "head_head: values 7..7 outside [0, 4)"),
    (_mutate(lambda d: d["meta"].update(layer_stop=9)), "layer range [2, 9) not within [0, 6]"),
    (_mutate(lambda d: d["arrays"].pop("ffn")), "columns"),
    (_mutate(lambda d: d["meta"].update(norm="l3")), "norm 'l3'"),
    (_mutate(lambda d: d["arrays"]["ffn"].update(data=np.full(12, np.nan, "<f4").tobytes())), "ffn: weights must be finite"),
    (_mutate(lambda d: d["trace"].update(tokens=["a"])), "trace.tokens: 1 entries for 6 tokens"),
    (_mutate(lambda d: d["trace"].update(prompt=7)), "trace.prompt must be text"),
    (_mutate(lambda d: d["trace"].update(surprise=1)), "trace metadata: unknown field(s) 'surprise'"),
    (_mutate(lambda d: d["trace"]["model_info"].update(n_layers="6")), "model_info.n_layers must be int"),
    (_mutate(lambda d: d["trace"].update(job={"index": 1})), "trace.job must be a map of"),
    (_mutate(lambda d: d["trace"].update(summary={"a": [[[[[[[[1]]]]]]]]})), "nested deeper than"),
    (_mutate(lambda d: d.update(trace=[1])), "meta, arrays and trace must be maps"),
])
def test_bad_payloads_are_rejected_with_a_clear_error(payload, message):
    with pytest.raises(EdgeSetError) as err:
        EdgeSet.decode(payload)
    assert message in str(err.value)


def test_size_limit_applies_before_parsing():
    with pytest.raises(EdgeSetError, match="exceeds the limit"):
        EdgeSet.decode(make_edge_set().encode(), max_bytes=100)


def test_concatenate_checks_tiling():
    a, b = make_edge_set(layers=(0, 2)), make_edge_set(layers=(2, 4), seed=1)
    merged = EdgeSet.concatenate([b, a])
    assert (merged.layer_start, merged.layer_stop) == (0, 4) and merged.res_attn.shape == (4, 6)
    with pytest.raises(EdgeSetError, match="do not tile"):
        EdgeSet.concatenate([a, make_edge_set(layers=(3, 4))])


def test_stage_columns_reach_the_host_in_one_packed_copy():
    """``to_host`` packs a stage's columns (int64, fp32, fp16 and 2-D stacks, empty ones too) into one
    buffer for a single device-to-host copy and unpacks every column with its dtype, shape and values."""
    import torch

    from routescope.workers.stage import to_host

    gen = torch.Generator().manual_seed(0)
    cols = {
        "hw": torch.rand(13, generator=gen), "ht": torch.randint(0, 99, (13,), generator=gen),
        "half": torch.rand(5, generator=gen).half(), "empty": torch.zeros(0, dtype=torch.int64),
        "ra": torch.rand(3, 7, generator=gen), "el": torch.randint(0, 9, (4,), generator=gen),
        "odd": torch.rand(3, generator=gen)[::2],  # a non-contiguous view
    }
    host = to_host(cols)
    assert set(host) == set(cols)
    for name, col in cols.items():
        got = host[name]
        assert got.dtype == col.numpy().dtype and got.shape == tuple(col.shape), name
        assert np.array_equal(got, col.numpy()), name
