"""Fuzzing the edge-set decoder: random and mutated payloads decode to a valid edge set or raise
``EdgeSetError``; nothing else escapes, and declared sizes never drive allocations."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routescope.workers.edgeset import EdgeSet, EdgeSetError
from test_wire import make_edge_set

VALID = make_edge_set().encode()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_reject(payload: bytes) -> None:
    try:
        es = EdgeSet.decode(payload)
    except EdgeSetError:
        return
    es.validate()  # anything accepted is a valid edge set
    assert es.n_bytes <= len(payload)  # columns are views of the payload, never larger


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(payload):
    decode_or_reject(payload)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips_of_a_valid_payload(flips):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    decode_or_reject(bytes(data))


@FUZZ
@given(st.integers(1, len(VALID) - 1))
def test_truncations(n):
    decode_or_reject(VALID[:n])


@FUZZ
@given(st.sampled_from(["head_weight", "head_target", "ffn", "edge_layer"]),
       st.lists(st.integers(-3, 2**31 - 1), min_size=1, max_size=2))
def test_crafted_huge_shapes_are_refused_without_allocating(column, shape):
    doc = msgpack.unpackb(VALID, raw=False)
    doc["arrays"][column]["shape"] = shape
    decode_or_reject(msgpack.packb(doc, use_bin_type=True))


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
                    max_leaves=20))
def test_arbitrary_msgpack_documents(doc):
    decode_or_reject(msgpack.packb(doc, use_bin_type=True))


def test_header_claiming_gigabytes_is_refused_quickly():
    # A msgpack bin header announcing 2 GiB with no data behind it.
    payload = msgpack.packb({"schema": "routescope.edgeset"})[:-1] + b"\xc6\x7f\xff\xff\xff"
    with pytest.raises(EdgeSetError, match="not a msgpack edge set"):
        EdgeSet.decode(payload)
