"""A pipeline stage as a Ray actor.

``StageActor`` holds one ``Stage`` (layers ``[start, stop)``, loaded straight onto the actor's
device; a user adapter given as a dotted path is imported on the actor's node) and exposes a narrow interface: ``forward`` (residual in, residual and msgpack edge sets
out: bytes, since they leave the process), the typed detail questions of ``details.StageDetails``
through ``detail`` (only the names in ``DETAIL_METHODS``; anything else is refused), ``ready`` and
``pid``. The coordinator's client for it is ``routescope.cluster.stage_clients.RayStageClient``.

Residual transport:

* object store (default, and always on CPU): ``forward`` returns ``(residual, payloads)`` as two
  objects; the next stage's task takes the residual's ObjectRef as its argument.
* Ray Direct Transport (stages on GPUs): ``forward_keep`` leaves the residual on the device under
  a key and returns the payloads; ``take(key)``, called with ``tensor_transport="nccl"`` (``"gloo"``
  on CPU, used by the tests), hands the device tensor to the next stage out of band. Actor tasks of
  one caller run in submission order, so ``take`` always follows its ``forward_keep``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

from .details import check_detail_method


class StageActorImpl:
    """The body of the stage actor (decorated by ``ray.remote`` in ``stage_actor_class``)."""

    def __init__(self, model: Any, start: int, stop: int, *, device: str = "cpu", dtype: str | None = None,
                 cache_bytes: int = 2 * 2**30, threads: int | None = None, adapter: Any = None):
        from .stage import Stage

        if threads:
            torch.set_num_threads(int(threads))
        if device == "cuda" and torch.cuda.is_available():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)
        t0 = time.perf_counter()
        # A user adapter named by a dotted path is imported again here, on the actor's node.
        self.stage = Stage(model, start, stop, device=device, dtype=dtype, cache_bytes=cache_bytes, adapter=adapter)
        self.load_s = time.perf_counter() - t0
        self._kept: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------- lifecycle
    def ready(self) -> dict[str, Any]:
        s = self.stage
        return {"info": s.info, "parameter_bytes": s.parameter_bytes(), "pid": os.getpid(),
                "device": str(s.device), "start": s.start, "stop": s.stop, "load_s": self.load_s,
                "node": ray.get_runtime_context().get_node_id()}

    def pid(self) -> int:
        return os.getpid()

    # ----------------------------------------------------------------------------- forward
    @ray.method(num_returns=2)
    def forward(self, inputs, lengths, run_ids, norm, tau_min, return_resid: bool = True):
        """Object-store transport: the residual (on the host) and the edge-set payloads."""
        resid, edge_sets = self.stage.forward(_host(inputs), lengths, run_ids=run_ids, norm=norm, tau_min=tau_min)
        return (_host(resid).clone() if return_resid else None), [e.encode() for e in edge_sets]

    def forward_keep(self, inputs, lengths, run_ids, norm, tau_min, key: str | None):
        """Direct transport: keep the residual on the device under ``key``; return the payloads."""
        resid, edge_sets = self.stage.forward(inputs, lengths, run_ids=run_ids, norm=norm, tau_min=tau_min)
        if key is not None:
            self._kept[key] = resid.detach().clone()
        return [e.encode() for e in edge_sets]

    def take(self, key: str) -> torch.Tensor:
        """The residual kept by ``forward_keep`` (returned with a ``tensor_transport``)."""
        return self._kept.pop(key)

    # ----------------------------------------------------------------------------- details
    def detail(self, method: str, *args: Any) -> Any:
        """Answer one typed detail question (``details.StageDetails``); other names are refused."""
        result = getattr(self.stage, check_detail_method(method))(*args)
        # A row of a cached activation is a view of the whole [T, d] tensor, and Ray serialises a
        # view's whole storage: answers travel as compact copies.
        return _host(result).clone() if isinstance(result, torch.Tensor) else result


def _host(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


_CLASSES: dict[bool, Any] = {}


def stage_actor_class(direct_transport: bool = False):
    """The Ray actor class of a stage (with out-of-band tensor transport enabled or not)."""
    if direct_transport not in _CLASSES:
        opts = {"enable_tensor_transport": True} if direct_transport else {}
        _CLASSES[direct_transport] = ray.remote(**opts)(StageActorImpl) if opts else ray.remote(StageActorImpl)
    return _CLASSES[direct_transport]


StageActor = stage_actor_class(False)


