"""The sparse edge set of one prompt over a layer range, and its msgpack wire format.

A stage returns one ``EdgeSet`` per prompt for its layers (global layer indices); the coordinator
concatenates them into the edge set of the whole model. In one process edge sets travel as
objects; msgpack bytes exist only at process and file boundaries (Ray actors, saved graphs).
On the wire every numeric column is raw little-endian bytes with an explicit dtype and shape, so
decoding is a validated ``frombuffer`` (no Python floats, no pickle), and the metadata is a
``TraceMeta`` (``workers.schema``) validated field by field. Decoding is defensive: a file from a
colleague or a corrupted transfer is rejected with a ``EdgeSetError`` naming the problem, never
half-loaded.

Wire versions: 2 (this writer) carries ``"trace"``; version 1 files carried an untyped
``"extra"`` map with the same field names and are still read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import msgpack
import numpy as np

from .schema import NORMS, MetaError, TraceMeta

SCHEMA = "routescope.edgeset"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_PAYLOAD_BYTES = 1 << 30
MAX_TOKENS = 1 << 20
MAX_LAYERS = 4096
MAX_HEADS = 4096

# column -> (dtype, group). Groups share a length; "dense" columns are [n_layers, n_tokens].
COLUMNS: dict[str, tuple[str, str]] = {
    "head_layer": ("<i2", "head"),
    "head_target": ("<i4", "head"),
    "head_source": ("<i4", "head"),
    "head_head": ("<i2", "head"),
    "head_weight": ("<f4", "head"),
    "edge_layer": ("<i2", "edge"),
    "edge_target": ("<i4", "edge"),
    "edge_source": ("<i4", "edge"),
    "edge_weight": ("<f4", "edge"),
    "res_attn": ("<f4", "dense"),
    "ffn": ("<f4", "dense"),
    "res_ffn": ("<f4", "dense"),
}
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "n_layers": int,
    "n_heads": int,
    "n_tokens": int,
    "layer_start": int,
    "layer_stop": int,
    "parallel": bool,
    "norm": str,
    "tau_min": float,
}


class EdgeSetError(ValueError):
    """A payload that is not a valid edge set."""


@dataclass
class EdgeSet:
    """Contributions of layers ``[layer_start, layer_stop)`` for one prompt (SPEC sections 3-6).

    ``head_*``: per (layer, target, source, head) attention parts with ``c >= tau_min``.
    ``edge_*``: head-summed attention edge weights ``>= tau_min``.
    ``res_attn``, ``ffn``, ``res_ffn``: ``[n_stage_layers, n_tokens]`` per-position parts.
    ``trace``: the prompt's metadata (tokens, prompt, model, job data), a ``TraceMeta``.
    """

    model: str
    n_layers: int
    n_heads: int
    n_tokens: int
    layer_start: int
    layer_stop: int
    parallel: bool
    norm: str
    tau_min: float
    head_layer: np.ndarray
    head_target: np.ndarray
    head_source: np.ndarray
    head_head: np.ndarray
    head_weight: np.ndarray
    edge_layer: np.ndarray
    edge_target: np.ndarray
    edge_source: np.ndarray
    edge_weight: np.ndarray
    res_attn: np.ndarray
    ffn: np.ndarray
    res_ffn: np.ndarray
    trace: TraceMeta = field(default_factory=TraceMeta)

    def __post_init__(self) -> None:
        for name, (dtype, _) in COLUMNS.items():
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.dtype(dtype)))
        if not isinstance(self.trace, TraceMeta):
            raise EdgeSetError(f"trace must be a TraceMeta, got {type(self.trace).__name__}")

    @property
    def n_bytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in COLUMNS)

    def validate(self) -> "EdgeSet":
        """Check shapes, index ranges and weights; raise ``EdgeSetError`` or return self."""
        _check_meta({f.name: getattr(self, f.name) for f in fields(self) if f.name in META_TYPES})
        n_stage = self.layer_stop - self.layer_start
        for group in ("head", "edge"):
            lengths = {getattr(self, c).shape for c, (_, g) in COLUMNS.items() if g == group}
            if len(lengths) != 1 or len(next(iter(lengths))) != 1:
                raise EdgeSetError(f"{group}_* columns must be 1-D of one length, got shapes {sorted(lengths)}")
        for name in ("res_attn", "ffn", "res_ffn"):
            if getattr(self, name).shape != (n_stage, self.n_tokens):
                raise EdgeSetError(
                    f"{name}: shape {getattr(self, name).shape} != (layers {n_stage}, tokens {self.n_tokens})"
                )
        for group in ("head", "edge"):
            layer = getattr(self, f"{group}_layer")
            target = getattr(self, f"{group}_target")
            source = getattr(self, f"{group}_source")
            _check_range(f"{group}_layer", layer, self.layer_start, self.layer_stop)
            _check_range(f"{group}_target", target, 0, self.n_tokens)
            _check_range(f"{group}_source", source, 0, self.n_tokens)
            if np.any(source > target):
                raise EdgeSetError(f"{group}_source: a source position after its target (not causal)")
        _check_range("head_head", self.head_head, 0, self.n_heads)
        for name in ("head_weight", "edge_weight", "res_attn", "ffn", "res_ffn"):
            w = getattr(self, name)
            if w.size and (not np.isfinite(w).all() or w.min() < 0 or w.max() > 1 + 1e-4):
                raise EdgeSetError(f"{name}: weights must be finite and within [0, 1]")
        return self

    def encode(self) -> bytes:
        """Serialise to msgpack bytes (columns as raw little-endian buffers)."""
        meta = {name: getattr(self, name) for name in META_TYPES}
        arrays = {
            name: {"dtype": dtype, "shape": list(getattr(self, name).shape), "data": getattr(self, name).tobytes()}
            for name, (dtype, _) in COLUMNS.items()
        }
        return msgpack.packb(
            {"schema": SCHEMA, "version": VERSION, "meta": meta, "arrays": arrays, "trace": self.trace.to_dict()},
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> "EdgeSet":
        """Parse and validate msgpack bytes; raise ``EdgeSetError`` on anything malformed."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise EdgeSetError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > max_bytes:
            raise EdgeSetError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
        try:
            # Limits stop a crafted header from asking for huge containers before any data arrives.
            doc = msgpack.unpackb(
                payload, raw=False, strict_map_key=True, max_bin_len=len(payload), max_str_len=1 << 24,
                max_array_len=MAX_TOKENS * 2, max_map_len=1024, max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise EdgeSetError(f"not a msgpack edge set ({type(exc).__name__}: {exc})") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise EdgeSetError(f"not a routescope edge set (schema {_get(doc, 'schema')!r})")
        version = doc.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise EdgeSetError(f"unsupported edge-set version {_get(doc, 'version')!r} "
                               f"(this reader: {', '.join(map(str, READABLE_VERSIONS))})")
        meta, arrays = doc.get("meta"), doc.get("arrays")
        trace = doc.get("trace", {}) if version >= 2 else _v1_trace(doc.get("extra", {}))
        if not isinstance(meta, dict) or not isinstance(arrays, dict) or not isinstance(trace, dict):
            raise EdgeSetError("meta, arrays and trace must be maps")
        _check_meta(meta)
        if set(arrays) != set(COLUMNS):
            raise EdgeSetError(f"columns {sorted(arrays)} != expected {sorted(COLUMNS)}")
        columns = {name: _decode_array(name, arrays[name], dtype) for name, (dtype, _) in COLUMNS.items()}
        es = cls(**{k: meta[k] for k in META_TYPES}, **columns).validate()
        try:
            es.trace = TraceMeta.from_dict(trace, n_tokens=es.n_tokens)
        except MetaError as exc:
            raise EdgeSetError(str(exc)) from None
        return es

    @classmethod
    def concatenate(cls, parts: list["EdgeSet"]) -> "EdgeSet":
        """Merge the edge sets of consecutive stages into one covering all their layers."""
        if not parts:
            raise EdgeSetError("no edge sets to merge")
        parts = sorted(parts, key=lambda p: p.layer_start)
        first = parts[0]
        for prev, nxt in zip(parts, parts[1:]):
            if nxt.layer_start != prev.layer_stop:
                raise EdgeSetError(
                    f"stage layer ranges do not tile: [{prev.layer_start}, {prev.layer_stop}) then "
                    f"[{nxt.layer_start}, {nxt.layer_stop})"
                )
        for p in parts[1:]:
            for key in ("model", "n_layers", "n_heads", "n_tokens", "parallel", "norm", "tau_min"):
                if getattr(p, key) != getattr(first, key):
                    raise EdgeSetError(f"edge sets disagree on {key}: {getattr(p, key)!r} != {getattr(first, key)!r}")
        columns = {name: np.concatenate([getattr(p, name) for p in parts], axis=0) for name in COLUMNS}
        # Stages know nothing of the prompt: the coordinator fills the merged set's metadata.
        return replace(first, layer_stop=parts[-1].layer_stop, **columns, trace=TraceMeta())


def _v1_trace(extra: Any) -> Any:
    """A version-1 ``extra`` map as version-2 trace metadata (same field names; others dropped,
    since version 1 had no schema to hold them to)."""
    if not isinstance(extra, dict):
        return extra
    known = {f.name for f in fields(TraceMeta)}
    out = {k: v for k, v in extra.items() if k in known}
    job = out.get("job")
    if isinstance(job, dict) and job.get("job_id") is None:  # in-process jobs wrote no id
        out["job"] = {**job, "job_id": ""}
    return out


def _get(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


def _check_meta(meta: dict[str, Any]) -> None:
    for key, typ in META_TYPES.items():
        if key not in meta:
            raise EdgeSetError(f"meta: missing {key!r}")
        value = meta[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise EdgeSetError(f"meta: {key} must be {typ.__name__}, got {type(value).__name__}")
    if not 0 < meta["n_layers"] <= MAX_LAYERS:
        raise EdgeSetError(f"meta: n_layers {meta['n_layers']} outside [1, {MAX_LAYERS}]")
    if not 0 < meta["n_heads"] <= MAX_HEADS:
        raise EdgeSetError(f"meta: n_heads {meta['n_heads']} outside [1, {MAX_HEADS}]")
    if not 0 < meta["n_tokens"] <= MAX_TOKENS:
        raise EdgeSetError(f"meta: n_tokens {meta['n_tokens']} outside [1, {MAX_TOKENS}]")
    if not 0 <= meta["layer_start"] < meta["layer_stop"] <= meta["n_layers"]:
        raise EdgeSetError(
            f"meta: layer range [{meta['layer_start']}, {meta['layer_stop']}) not within [0, {meta['n_layers']}]"
        )
    if meta["norm"] not in NORMS:
        raise EdgeSetError(f"meta: norm {meta['norm']!r} is not one of {', '.join(NORMS)}")
    if not 0 <= meta["tau_min"] < 1:
        raise EdgeSetError(f"meta: tau_min {meta['tau_min']} outside [0, 1)")


def _decode_array(name: str, spec: Any, dtype: str) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise EdgeSetError(f"{name}: array must be a map of dtype, shape and data")
    if spec["dtype"] != dtype:
        raise EdgeSetError(f"{name}: dtype {spec['dtype']!r} != expected {dtype!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2:
        raise EdgeSetError(f"{name}: shape must be a list of 1 or 2 sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise EdgeSetError(f"{name}: shape {shape} has a negative or non-integer size")
    data = spec["data"]
    if not isinstance(data, bytes):
        raise EdgeSetError(f"{name}: data must be raw bytes")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise EdgeSetError(f"{name}: {len(data)} data bytes != {expected} declared by shape {shape}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _check_range(name: str, values: np.ndarray, low: int, high: int) -> None:
    if values.size and (values.min() < low or values.max() >= high):
        raise EdgeSetError(f"{name}: values {values.min()}..{values.max()} outside [{low}, {high})")
