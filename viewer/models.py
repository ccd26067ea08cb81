"""Models and traces shared by every browser session of one server, with bounded memory.

* ``ModelRegistry.get(spec, device, dtype)`` takes the pipeline from the process's one pipeline
  cache (``cluster.pipelines``), so the viewer, notebooks and jobs in one process share a model;
  a different device or precision is a different entry, so switching them really reloads the
  model. An entry counts its parameter bytes plus the bound of its stages' activation caches
  (the viewer loads pipelines with ``activation_cache_bytes`` per stage), so
  ``model_cache_bytes`` bounds what loaded models really hold.
* Prompts longer than ``max_prompt_chars`` characters are refused before they are tokenised.
* Every call into a pipeline (trace or detail query) runs under that pipeline's own lock
  (``Pipeline.lock``): one model instance is shared safely between sessions.
* ``trace`` results are cached per (model, prompt, options) in an LRU bounded by edge-set bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from routescope.cluster import pipelines
from routescope.cluster.pipelines import DTYPE_BYTES, LRUBytes, PipelineCache

from .config import CHARS_PER_TOKEN, MAX_PROMPT_CHARS_CAP

__all__ = ["Loaded", "LRUBytes", "ModelRegistry", "activation_bound", "entry_bytes", "graph_bytes"]

DEFAULT_ACTIVATION_CACHE_BYTES = 512 * 2**20


@dataclass
class Loaded:
    key: tuple
    pipeline: Any
    lock: threading.RLock
    device: str
    dtype: str | None  # None: float32

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` with exclusive use of this model."""
        with self.lock:
            return fn(*args, **kwargs)


def graph_bytes(graph: Any) -> int:
    return graph.edges.n_bytes + 1024


def activation_bound(pipe: Any, per_stage: int | None) -> int:
    """The bytes the activation caches of ``pipe``'s stages may hold: ``per_stage`` (the bound
    the pipeline was loaded with, ``cache_bytes`` of each stage) times its stages
    (``Pipeline.layout``); 0 for a stand-in without stages or when the bound is unknown."""
    layout = getattr(pipe, "layout", None)
    try:
        n_stages = len(layout) if layout is not None else 0
    except TypeError:
        n_stages = 0
    return int(per_stage or 0) * n_stages


def entry_bytes(pipe: Any, dtype: str | None, configured: int | None) -> int:
    """The size the pipeline cache counts for ``pipe``: parameter bytes + activation-cache bound."""
    n_params = int(getattr(getattr(pipe, "info", None), "n_params", 0) or 0)
    return n_params * DTYPE_BYTES.get(dtype, 4) + activation_bound(pipe, configured)


class ModelRegistry:
    """The server's view of the pipeline cache, and its traced graphs (shared, bounded)."""

    def __init__(self, *, cache_bytes: int = 512 * 2**20, max_tokens: int | None = None,
                 address: str | None = None, loader: Callable[..., Any] | None = None,
                 pipeline_cache: PipelineCache | None = None, max_prompt_chars: int | None = None,
                 activation_cache_bytes: int = DEFAULT_ACTIVATION_CACHE_BYTES):
        self.max_tokens = max_tokens
        if max_prompt_chars is None:
            max_prompt_chars = CHARS_PER_TOKEN * max_tokens if max_tokens else MAX_PROMPT_CHARS_CAP
        self.max_prompt_chars = min(int(max_prompt_chars), MAX_PROMPT_CHARS_CAP)
        self.activation_cache_bytes = int(activation_cache_bytes)
        self.address = address
        self._loader = loader
        self.pipelines = pipeline_cache or pipelines.CACHE
        self._graphs = LRUBytes(cache_bytes, graph_bytes)
        self._handles: dict[tuple, Loaded] = {}  # one handle (and lock) per cached pipeline

    @classmethod
    def for_config(cls, cfg: Any) -> "ModelRegistry":
        """The registry of a viewer configuration; its ``model_cache_bytes`` bounds the process's
        pipeline cache (the one cache of this process)."""
        pipelines.CACHE.max_bytes = cfg.model_cache_bytes
        return cls(cache_bytes=cfg.cache_bytes, max_tokens=cfg.max_tokens, address=cfg.address,
                   max_prompt_chars=cfg.prompt_chars_limit, activation_cache_bytes=cfg.activation_cache_bytes)

    def key(self, spec: str, device: str = "cpu", dtype: str | None = "float32", adapter: str | None = None) -> tuple:
        """The pipeline cache's key: the one ``routescope.load`` uses for the same model, so both
        share the loaded pipeline (a custom ``loader`` gets keys of its own)."""
        dtype = None if dtype in (None, "float32") else str(dtype)
        opts: dict[str, Any] = {"address": self.address} if self.address else {"device": str(device)}
        key = pipelines.cache_key(str(spec), dtype=dtype, adapter=adapter, **opts)
        return key if self._loader is None else ("loader", *key)

    @property
    def loads(self) -> int:
        """How many times a model was really loaded (tests)."""
        return self.pipelines.loads

    def _load(self, spec: str, device: str, dtype: str | None, adapter: str | None = None) -> Any:
        if self._loader is not None:
            return self._loader(spec, device=device, dtype=dtype)
        opts: dict[str, Any] = {"address": self.address} if self.address else {"device": device}
        return pipelines.load(spec, dtype=dtype, reuse=False, cache_bytes=self.activation_cache_bytes,
                              adapter=adapter, **opts)

    def get(self, spec: str, device: str = "cpu", dtype: str | None = "float32", adapter: str | None = None) -> Loaded:
        """The loaded pipeline of a model entry (``adapter``: a dotted path, ``docs/adapters.md``)."""
        dtype = None if dtype in (None, "float32") else str(dtype)
        key = self.key(spec, device, dtype, adapter)
        # the bound this registry loads pipelines with (a custom loader is expected to honour it too)
        configured = self.activation_cache_bytes
        pipe = self.pipelines.get(key, lambda: self._load(spec, device, dtype, adapter), dtype,
                                  n_bytes=lambda p: entry_bytes(p, dtype, configured))
        held = self._handles.get(key)
        if held is None or held.pipeline is not pipe:
            lock = getattr(pipe, "lock", None)  # a test's stand-in pipeline may have none
            held = self._handles[key] = Loaded(key, pipe, lock if lock is not None else threading.RLock(),
                                               str(device), dtype)
        return held

    def is_loaded(self, spec: str, device: str = "cpu", dtype: str | None = "float32",
                  adapter: str | None = None) -> bool:
        return self.key(spec, device, dtype, adapter) in self.pipelines

    def trace(self, loaded: Loaded, prompt: str, *, prepend_bos: bool = True, norm: str = "l1",
              tau_min: float = 0.01) -> Any:
        """The flow graph of ``prompt`` (cached); raises ``ValueError`` for bad prompts (one over
        ``max_prompt_chars`` characters before it is tokenised)."""
        pipe = loaded.pipeline
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be text")
        if len(prompt) > self.max_prompt_chars:
            raise ValueError(f"prompt: {len(prompt)} characters exceeds this viewer's limit of "
                             f"{self.max_prompt_chars} characters")
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
    def model_cache(self) -> PipelineCache:
        return self.pipelines
