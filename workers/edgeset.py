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
import os
import stat
import sys
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
# What decoding may build besides the columns: the metadata's Python objects may take this much
# memory, plus META_PER_COLUMN_BYTE times the bytes of the columns it describes. Msgpack can
# expand 70-fold (an empty map is one byte, a Python dict 64); legitimate metadata (tokens,
# route summaries) stays far below this, a crafted file is stopped while it is being decoded.
META_MEMORY_BYTES = 48 << 20
META_PER_COLUMN_BYTE = 4
# Contributions are float32 arrays: a tau_min below the smallest normal float32 underflows there.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)

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


def check_tau_min(tau_min: Any, what: str = "tau_min") -> float:
    """``tau_min`` as a float in ``(0, 1)``, at least float32's smallest normal number (the
    contributions it thresholds are float32; anything smaller would underflow to 0 there)."""
    number = isinstance(tau_min, (int, float, np.integer, np.floating)) and not isinstance(tau_min, (bool, np.bool_))
    if not number or not math.isfinite(tau_min) or not 0 < tau_min < 1:
        raise ValueError(f"{what}: {tau_min} must be a number in (0, 1)")
    if tau_min < FLOAT32_TINY:
        raise ValueError(f"{what}: {tau_min} is below the smallest normal float32 ({FLOAT32_TINY:.8g}); "
                         "contributions are float32, where it would underflow to 0")
    return float(tau_min)


def read_file(path: str | os.PathLike, max_bytes: int, *, what: str = "file",
              error: type[Exception] = ValueError) -> bytes:
    """The bytes of a regular file, refused *before* reading when larger than ``max_bytes``.

    The size is taken from the opened file (``fstat``), so the check and the read see the same
    file; FIFOs, devices and directories are refused (a FIFO would block, ``/dev/zero`` never
    ends). A file that grows while it is read is refused too. Errors: ``FileNotFoundError`` for a
    missing file, ``error`` (a ``ValueError`` by default) for everything else, with the path.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {what} is not a regular file")
        raise error(f"{path}: {what} of {st.st_size} bytes exceeds the limit of {max_bytes} bytes")
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            data = f.read(st.st_size)
            grew = f.read(1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if grew or len(data) != st.st_size:
        raise error(f"{path}: {what} changed size while it was read")
    return data


class _TooMuchMetadata(Exception):
    pass


class _DecodeBudget:
    """Msgpack hooks that tally the memory of the containers decoding builds (shallow sizes of
    every map and list and of their items, a bound on the real cost) and stop decoding once it
    exceeds ``META_MEMORY_BYTES`` plus ``META_PER_COLUMN_BYTE`` times the binary data seen."""

    def __init__(self) -> None:
        self.used = 0
        self.paid = 0

    def _check(self) -> None:
        if self.used > META_MEMORY_BYTES + (META_PER_COLUMN_BYTE + 1) * self.paid:
            raise _TooMuchMetadata

    def on_list(self, items: list) -> list:
        self.used += sys.getsizeof(items) + sum(map(sys.getsizeof, items))
        self._check()
        return items

    def on_map(self, items: dict) -> dict:
        values = items.values()
        self.paid += sum(len(v) for v in values if type(v) is bytes)
        self.used += sys.getsizeof(items) + sum(map(sys.getsizeof, items)) + sum(map(sys.getsizeof, values))
        self._check()
        return items


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
    def read(cls, path: str | os.PathLike, max_bytes: int = MAX_PAYLOAD_BYTES) -> "EdgeSet":
        """Read and decode an edge-set file; its size is checked before it is read (``read_file``).
        ``FileNotFoundError`` if it is missing, ``EdgeSetError`` for anything else (messages do
        not repeat the path: callers name the file)."""
        try:
            payload = read_file(path, max_bytes, what="edge set", error=EdgeSetError)
        except EdgeSetError as exc:
            raise EdgeSetError(str(exc).removeprefix(f"{path}: ")) from None
        return cls.decode(payload, max_bytes)

    @classmethod
    def decode(cls, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> "EdgeSet":
        """Parse and validate msgpack bytes; raise ``EdgeSetError`` on anything malformed."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise EdgeSetError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > max_bytes:
            raise EdgeSetError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
        n = len(payload)
        budget = _DecodeBudget()
        try:
            # Limits relative to the payload stop a crafted header from asking for containers
            # larger than the data behind it (msgpack allocates a declared length up front); the
            # budget's hooks stop many small containers from expanding the payload 70-fold.
            doc = msgpack.unpackb(
                payload, raw=False, strict_map_key=True, max_bin_len=n, max_str_len=min(4 << 20, n),
                max_array_len=min(MAX_TOKENS, n), max_map_len=min(1024, n // 2), max_ext_len=0,
                list_hook=budget.on_list, object_hook=budget.on_map,
            )
        except _TooMuchMetadata:
            raise EdgeSetError(
                f"metadata: decoding would build over {budget.used >> 20} MiB of objects from a {n}-byte payload "
                f"(limit {META_MEMORY_BYTES >> 20} MiB + {META_PER_COLUMN_BYTE} x the column bytes)") from None
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
    if 0 < meta["tau_min"] < FLOAT32_TINY:
        raise EdgeSetError(f"meta: tau_min {meta['tau_min']} is below the smallest normal float32 ({FLOAT32_TINY:.8g})")


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
