"""Models and traces shared by every browser session of one server, with bounded memory.

* ``ModelRegistry.get(spec, device, dtype)`` loads a pipeline once (``routescope.load``) and keeps
  it in an LRU bounded by parameter bytes; a different device or precision is a different entry,
  so switching them really reloads the model.
* Every call into a pipeline (trace or detail query) runs under that pipeline's lock: one model
  instance is shared safely between sessions.
* ``trace`` results are cached per (model, prompt, options) in an LRU bounded by edge-set bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, None: 4}


@dataclass
class Loaded:
    key: tuple
    pipeline: Any
    lock: threading.RLock
    n_bytes: int

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` with exclusive use of this model."""
        with self.lock:
            return fn(*args, **kwargs)


def graph_bytes(graph: Any) -> int:
    es = graph.edges
    total = 0
    for v in vars(es).values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
    return total + 1024


class LRUBytes:
    """A thread-safe LRU dict bounded by the sum of its values' sizes."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int], on_evict: Callable[[Any, Any], None] | None = None):
        self.max_bytes = int(max_bytes)
        self.size = size
        self.on_evict = on_evict
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.n_bytes = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key][0]

    def put(self, key: Any, value: Any) -> None:
        n = int(self.size(value))
        evicted = []
        with self._lock:
            if key in self._data:
                self.n_bytes -= self._data.pop(key)[1]
            self._data[key] = (value, n)
            self.n_bytes += n
            while self.n_bytes > self.max_bytes and len(self._data) > 1:
                k, (v, m) = self._data.popitem(last=False)
                self.n_bytes -= m
                evicted.append((k, v))
        for k, v in evicted:
            if self.on_evict:
                self.on_evict(k, v)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data


class ModelRegistry:
    """Loaded pipelines (shared, bounded) and traced graphs (shared, bounded)."""

    def __init__(self, *, model_cache_bytes: int = 4 * 2**30, cache_bytes: int = 512 * 2**20,
                 max_tokens: int | None = None, address: str | None = None,
                 loader: Callable[..., Any] | None = None):
        self.max_tokens = max_tokens
        self.address = address
        self._loader = loader
        self._models = LRUBytes(model_cache_bytes, lambda m: m.n_bytes, self._evicted)
        self._graphs = LRUBytes(cache_bytes, graph_bytes)
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many times a model was really loaded (tests)

    @staticmethod
    def key(spec: str, device: str = "cpu", dtype: str | None = "float32") -> tuple:
        return (str(spec), str(device), None if dtype in (None, "float32") else str(dtype))

    def _load(self, spec: str, device: str, dtype: str | None) -> Any:
        import routescope

        if self._loader is not None:
            return self._loader(spec, device=device, dtype=dtype)
        opts: dict[str, Any] = {}
        if self.address:
            opts["address"] = self.address
        else:
            opts["device"] = device
        if dtype is not None:
            opts["dtype"] = dtype
        # reuse=True shares the pipeline with routescope.load callers (notebooks, tests)
        return routescope.load(spec, **opts)

    def _evicted(self, key: tuple, loaded: Loaded) -> None:
        import routescope

        # Sessions may still hold this pipeline: drop it from the cache, let them finish with it.
        routescope.unload(loaded.pipeline, close=False)

    def get(self, spec: str, device: str = "cpu", dtype: str | None = "float32") -> Loaded:
        key = self.key(spec, device, dtype)
        hit = self._models.get(key)
        if hit is not None:
            return hit
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # two sessions asking for the same new model load it once
            hit = self._models.get(key)
            if hit is not None:
                return hit
            pipe = self._load(spec, device, key[2])
            self.loads += 1
            info = getattr(pipe, "info", None)
            n_params = int(getattr(info, "n_params", 0) or 0)
            loaded = Loaded(key, pipe, threading.RLock(), n_params * DTYPE_BYTES.get(key[2], 4))
            self._models.put(key, loaded)
            return loaded

    def is_loaded(self, spec: str, device: str = "cpu", dtype: str | None = "float32") -> bool:
        return self.key(spec, device, dtype) in self._models

    def trace(self, loaded: Loaded, prompt: str, *, prepend_bos: bool = True, norm: str = "l1",
              tau_min: float = 0.01) -> Any:
        """The flow graph of ``prompt`` (cached); raises ``ValueError`` for bad prompts."""
        pipe = loaded.pipeline
        if self.max_tokens is not None:
            n = len(loaded.call(pipe.tokenize, prompt, prepend_bos))
            if n > self.max_tokens:
                raise ValueError(f"prompt: {n} tokens exceeds this viewer's limit of {self.max_tokens}")
        key = (loaded.key, prompt, prepend_bos, norm, tau_min)
        hit = self._graphs.get(key)
        if hit is not None:
            return hit
        graph = loaded.call(pipe.trace, prompt, norm=norm, tau_min=tau_min, prepend_bos=prepend_bos)
        self._graphs.put(key, graph)
        return graph

    @property
    def graph_cache(self) -> LRUBytes:
        return self._graphs

    @property
    def model_cache(self) -> LRUBytes:
        return self._models
