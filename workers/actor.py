"""A pipeline stage as a Ray actor, and the coordinator's client for it.

``StageActor`` holds one ``Stage`` (layers ``[start, stop)``, loaded straight onto the actor's
device) and exposes a narrow interface: ``forward`` (residual in, residual and msgpack edge sets
out), the detail queries of SPEC section 7 through ``call`` (only the names in ``DETAIL_METHODS``),
``ready`` and ``pid``. ``RayStageClient`` implements the coordinator's ``StageClient`` protocol:
residuals travel as ObjectRefs from actor to actor, never through the driver.

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

DETAIL_METHODS = frozenset(
    {"vector", "head_contributions", "attention_maps", "attention_patterns", "neurons", "project",
     "parameter_bytes", "has_run"}
)


class StageError(RuntimeError):
    """A stage failed (its actor died, could not be restarted, or raised) or gave no answer in time."""

    def __init__(self, message: str, *, stage: int, start: int, stop: int):
        super().__init__(message)
        self.stage, self.start, self.stop = stage, start, stop


class StageTimeoutError(StageError, TimeoutError):
    """A stage gave no answer within the configured timeout."""


class StageActorImpl:
    """The body of the stage actor (decorated by ``ray.remote`` in ``stage_actor_class``)."""

    def __init__(self, model: Any, start: int, stop: int, *, device: str = "cpu", dtype: str | None = None,
                 cache_bytes: int = 2 * 2**30, threads: int | None = None):
        from .stage import Stage

        if threads:
            torch.set_num_threads(int(threads))
        if device == "cuda" and torch.cuda.is_available():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)
        t0 = time.perf_counter()
        self.stage = Stage(model, start, stop, device=device, dtype=dtype, cache_bytes=cache_bytes)
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
        resid, payloads = self.stage.forward(_host(inputs), lengths, run_ids=run_ids, norm=norm, tau_min=tau_min)
        return (_host(resid).clone() if return_resid else None), payloads

    def forward_keep(self, inputs, lengths, run_ids, norm, tau_min, key: str | None):
        """Direct transport: keep the residual on the device under ``key``; return the payloads."""
        resid, payloads = self.stage.forward(inputs, lengths, run_ids=run_ids, norm=norm, tau_min=tau_min)
        if key is not None:
            self._kept[key] = resid.detach().clone()
        return payloads

    def take(self, key: str) -> torch.Tensor:
        """The residual kept by ``forward_keep`` (returned with a ``tensor_transport``)."""
        return self._kept.pop(key)

    # ----------------------------------------------------------------------------- details
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in DETAIL_METHODS:
            raise ValueError(f"stage method {method!r} is not one of {', '.join(sorted(DETAIL_METHODS))}")
        return getattr(self.stage, method)(*args, **kwargs)


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


class RayStageClient:
    """``StageClient`` of a ``StageActor``: handles are ObjectRefs, answers are awaited with a timeout.

    ``retries`` is how often Ray re-runs a task of this stage after its actor died (the actor itself
    is restarted by Ray, re-loading its layers); ``timeout_s`` bounds every wait (None: no bound).
    Failures surface as ``StageError`` naming the stage and its layer range.
    """

    def __init__(self, actor, index: int, start: int, stop: int, *, last: bool, retries: int = 1,
                 timeout_s: float | None = 300.0, transport: str | None = None):
        self.actor = actor
        self.index, self.start, self.stop, self.last = index, start, stop, last
        self.retries = retries
        self.timeout_s = timeout_s
        self.transport = transport  # None: object store; "nccl" / "gloo": Ray Direct Transport
        self._seq = 0

    @property
    def name(self) -> str:
        return f"stage {self.index} (layers {self.start}-{self.stop - 1})"

    # ----------------------------------------------------------------------------- StageClient
    def submit_forward(self, inputs, lengths, run_ids, norm, tau_min):
        opts = {"max_task_retries": int(self.retries)}
        if self.transport is None:
            resid, payloads = self.actor.forward.options(**opts).remote(
                inputs, lengths, run_ids, norm, tau_min, not self.last)
            return resid, payloads
        self._seq += 1
        key = None if self.last else f"{run_ids[0]}:{self._seq}"
        payloads = self.actor.forward_keep.options(**opts).remote(inputs, lengths, run_ids, norm, tau_min, key)
        resid = None if key is None else self.actor.take.options(tensor_transport=self.transport, **opts).remote(key)
        return resid, payloads

    def fetch(self, handle):
        return self._get(handle, "forward")

    def call(self, method, *args, **kwargs):
        ref = self.actor.call.options(max_task_retries=int(self.retries)).remote(method, *args, **kwargs)
        return self._get(ref, method, detail=True)

    def ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._get(self.actor.ready.remote(), "loading its layers", timeout_s=timeout_s or self.timeout_s)

    def pid(self) -> int:
        return self._get(self.actor.pid.remote(), "pid")

    def close(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone, or Ray shut down
            pass

    # ----------------------------------------------------------------------------- errors
    def _get(self, ref, what: str, *, detail: bool = False, timeout_s: float | None = None):
        from ray import exceptions as rex

        from .stage import RunEvictedError

        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except rex.GetTimeoutError:
            raise StageTimeoutError(f"{self.name}: no answer to {what} within {timeout} s (timeout_s)",
                                    stage=self.index, start=self.start, stop=self.stop) from None
        except (rex.RayActorError, rex.ActorUnavailableError) as exc:
            raise StageError(
                f"{self.name}: actor died during {what} and the task was retried {self.retries} time(s) "
                f"without success ({type(exc).__name__}: {_first_line(exc)})",
                stage=self.index, start=self.start, stop=self.stop) from exc
        except (rex.ObjectLostError, rex.OwnerDiedError) as exc:
            raise StageError(f"{self.name}: input or output of {what} was lost ({type(exc).__name__})",
                             stage=self.index, start=self.start, stop=self.stop) from exc
        except rex.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RunEvictedError):
                raise RunEvictedError(*cause.args) from None
            if detail and isinstance(cause, (ValueError, KeyError, IndexError, TypeError)):
                raise cause from None  # a bad question (position, head ...): the caller's error, as is
            if isinstance(cause, (rex.RayActorError, rex.ActorUnavailableError)):
                raise StageError(f"{self.name}: an upstream stage's actor died during {what}",
                                 stage=self.index, start=self.start, stop=self.stop) from exc
            raise StageError(f"{self.name}: {what} failed: {type(cause or exc).__name__}: {_first_line(cause or exc)}",
                             stage=self.index, start=self.start, stop=self.stop) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
