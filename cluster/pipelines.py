"""The process's pipelines: one cache, bounded by parameter bytes, shared by every caller.

``routescope.load``, the viewer's sessions and dataset jobs all get their pipelines here, so a
model is loaded once per process whoever asks, two callers asking for the same new model wait
for one load, and the bytes of loaded weights stay under ``CACHE.max_bytes`` (least recently used
pipelines are dropped from the cache; callers still holding one may finish with it). Each
pipeline carries its own lock (``Pipeline.lock``) for traces and detail questions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

from routescope.workers.schema import DEFAULT_MODEL, canonical_dtype

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, None: 4}


class LRUBytes:
    """A thread-safe LRU dict bounded by the sum of its values' sizes."""

    def __init__(self, max_bytes: int | None, size: Callable[[Any], int],
                 on_evict: Callable[[Any, Any], None] | None = None):
        self.max_bytes = None if max_bytes is None else int(max_bytes)
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
        with self._lock:
            if key in self._data:
                self.n_bytes -= self._data.pop(key)[1]
            self._data[key] = (value, n)
            self.n_bytes += n
        self.trim()

    def trim(self) -> None:
        """Evict least recently used entries until the bound holds (the newest always stays)."""
        evicted = []
        with self._lock:
            while self.max_bytes is not None and self.n_bytes > self.max_bytes and len(self._data) > 1:
                k, (v, m) = self._data.popitem(last=False)
                self.n_bytes -= m
                evicted.append((k, v))
        for k, v in evicted:
            if self.on_evict:
                self.on_evict(k, v)

    def pop_where(self, match: Callable[[Any], bool]) -> list[Any]:
        """Remove every entry whose value ``match``es; return their keys."""
        with self._lock:
            keys = [k for k, (v, _) in self._data.items() if match(v)]
            for k in keys:
                self.n_bytes -= self._data.pop(k)[1]
        return keys

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data


class PipelineCache:
    """Pipelines by key, loaded once (per-key gate), bounded by their weights' bytes."""

    def __init__(self, max_bytes: int | None = None):
        self._lru = LRUBytes(max_bytes, lambda entry: entry[1])
        self._gates: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many pipelines were really built (tests)

    @property
    def max_bytes(self) -> int | None:
        return self._lru.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self._lru.max_bytes = None if value is None else int(value)
        self._lru.trim()

    @property
    def n_bytes(self) -> int:
        return self._lru.n_bytes

    def get(self, key: Hashable, build: Callable[[], Any], dtype: str | None = None,
            n_bytes: int | Callable[[Any], int] | None = None) -> Any:
        """The cached pipeline of ``key``, or ``build()``'s, cached under its size: ``n_bytes`` (a
        number, or a function of the pipeline, e.g. weights + activation-cache bound), else its
        weights' bytes. With ``n_bytes``, a hit whose entry was counted differently (loaded by a
        caller that counted only weights) is counted again under ``n_bytes``, so the bound holds."""

        def size(pipe: Any) -> int:
            if n_bytes is None:
                n_params = int(getattr(getattr(pipe, "info", None), "n_params", 0) or 0)
                return n_params * DTYPE_BYTES.get(dtype, 4)
            return int(n_bytes(pipe) if callable(n_bytes) else n_bytes)

        hit = self._lru.get(key)
        if hit is not None:
            if n_bytes is not None and size(hit[0]) != hit[1]:
                self._lru.put(key, (hit[0], size(hit[0])))
            return hit[0]
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:  # two callers asking for the same new pipeline build it once
            hit = self._lru.get(key)
            if hit is not None:
                return hit[0]
            pipe = build()
            self.loads += 1
            self._lru.put(key, (pipe, size(pipe)))
            return pipe

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru

    def discard(self, pipeline: Any) -> bool:
        """Forget ``pipeline`` (it stays usable for whoever holds it); True if it was cached."""
        return bool(self._lru.pop_where(lambda entry: entry[0] is pipeline))


CACHE = PipelineCache()


def load(model: str = DEFAULT_MODEL, *, stages: int | None = None, layers: str | None = None,
         address: str | None = None, gpus_per_stage: float = 0, cpus_per_stage: float = 1,
         device: str = "cpu", dtype: str | None = None, max_tokens: int | None = None, reuse: bool = True,
         cache_bytes: int | None = None, adapter: Any = None):
    """A ``Pipeline`` for ``model``: in-process, or Ray stage actors when ``address`` is given
    (``address="local"`` starts a local Ray). With ``reuse`` the process cache is used.
    ``cache_bytes``: each stage's activation-cache bound (default: the stage's own default).
    ``adapter``: a user's model adapter, ``module.path:factory`` or ``module.path.ClassName``
    (``docs/adapters.md``; in-process also a factory, class or adapter object), given ``model``."""
    dtype = canonical_dtype(dtype)
    if gpus_per_stage and address is None:
        raise ValueError("gpus_per_stage: GPUs per stage need Ray stages; pass address= "
                         "(e.g. 'local'), or device='cuda' for one in-process stage")

    def build():
        if address is not None:
            from .ray_pipeline import ray_pipeline

            return ray_pipeline(model, stages=stages, layers=layers, address=address, gpus_per_stage=gpus_per_stage,
                                cpus_per_stage=cpus_per_stage, dtype=dtype, max_tokens=max_tokens, adapter=adapter,
                                **({} if cache_bytes is None else {"cache_bytes": int(cache_bytes)}))
        from .pipeline import Pipeline

        return Pipeline.local(model, stages=stages, layers=layers, device=device, dtype=dtype, max_tokens=max_tokens,
                              adapter=adapter, **({} if cache_bytes is None else {"cache_bytes": int(cache_bytes)}))

    if not reuse:
        return build()
    key = cache_key(model, stages=stages, layers=layers, address=address, gpus_per_stage=gpus_per_stage,
                    cpus_per_stage=cpus_per_stage, device=device, dtype=dtype, max_tokens=max_tokens, adapter=adapter)
    return CACHE.get(key, build, dtype)


def cache_key(model: str, *, stages: int | None = None, layers: str | None = None, address: str | None = None,
              gpus_per_stage: float = 0, cpus_per_stage: float = 1, device: str = "cpu", dtype: str | None = None,
              max_tokens: int | None = None, adapter: Any = None) -> tuple:
    """The cache key of ``load``'s arguments (the viewer shares entries with ``load`` through it)."""
    dtype = canonical_dtype(dtype)
    key = (str(model), stages, layers, address, gpus_per_stage, cpus_per_stage, device,
           None if dtype == "float32" else dtype, max_tokens)
    if adapter is None:  # the default adapter keeps the keys it always had
        return key
    return key + (("adapter", adapter if isinstance(adapter, str) else id(adapter)),)


def unload(pipeline: Any, close: bool = True) -> None:
    """Forget a cached pipeline; with ``close``, also release its stages (Ray actors)."""
    CACHE.discard(pipeline)
    if close:
        pipeline.close()
